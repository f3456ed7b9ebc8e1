"""What a user sees: `reddino pretrain` in a log file (stdout not a terminal) is short and says each thing once."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from reddino.data import generate_synthetic

ROOT = Path(__file__).parents[2]


def _quiet_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("REDDINO_VERBOSE", "RAY_DATA_LOGGING_CONFIG")}
    env.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    return env


def _pretrain_cmd(tmp_path) -> list[str]:
    generate_synthetic(tmp_path / "data", n_per_class=2, sources=2, unit="patch", seed=0, n_patches=24)
    return [str(Path(sys.executable).parent / "reddino"), "pretrain", "--config", str(ROOT / "tests" / "tiny.yaml"),
           "--data", str(tmp_path / "data"), "--run-name", "console",
           "data.resize=56", "crops.global_crops_size=56", "crops.local_crops_size=28", "model.img_size=56",
           "model.head_prototypes=64", "model.head_hidden_dim=32", "model.head_bottleneck_dim=16",
           "train.epochs=1", "train.iters_per_epoch=6", "train.batch_size_per_worker=8", "train.log_every=2",
           "train.checkpoint_every=6", f"train.storage_path={tmp_path / 'runs'}",
           f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]


@pytest.mark.slow  # the quick demo test asserts the same of its pretraining
def test_pretrain_console_has_no_ray_chatter_and_no_repeats(tmp_path):
    cmd = _pretrain_cmd(tmp_path)
    proc = subprocess.run(cmd, cwd=ROOT, env=_quiet_env(), capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "TrainingReport(" not in out and "Reporting training result" not in out
    assert "Execution plan" not in out and "Starting execution of Dataset" not in out
    assert "Requesting resources" not in out and "Started training worker group" not in out  # Ray Train INFO
    assert "Progress bars disabled" not in out and "DeprecationWarning" not in out
    assert "Token authentication is enabled" not in out and "Started a local Ray instance" not in out
    assert "MLflow database tables" not in out
    assert out.count("[reddino] Ray dashboard") == 1, out  # Ray's own line for it is off the console
    steps = [line for line in out.splitlines() if "[reddino] step " in line]
    assert len(steps) == 3 and len(set(steps)) == 3, steps  # steps 2, 4, 6, each once
    assert len(out.splitlines()) < 60, out


@pytest.mark.slow  # the quick demo test asserts the same of its Ray Data evaluation
def test_embed_and_evaluate_consoles_are_their_own_lines_only(tmp_path):
    """Ray Data batch inference (forced for evaluate) prints no Ray internals: only the command's own result."""
    import torch

    from reddino.model import create_backbone, export_backbone

    generate_synthetic(tmp_path / "cells", n_per_class=2, sources=2, unit="cell", seed=0)
    torch.manual_seed(0)
    export_backbone(create_backbone("vit_tiny_patch14_reddino", img_size=56), tmp_path / "bb" / "backbone.safetensors")
    exe = str(Path(sys.executable).parent / "reddino")
    env = {**_quiet_env(), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "REDDINO_HOME": str(tmp_path / "home")}
    runs = {
        "embed": [exe, "embed", "-m", str(tmp_path / "bb"), "-d", str(tmp_path / "cells"), "--out",
                  str(tmp_path / "emb"), "--num-cpus", "2"],
        "evaluate": [exe, "evaluate", "-m", str(tmp_path / "bb"), "-d", str(tmp_path / "cells"), "--ray",
                     "--num-cpus", "2", "--folds", "3", "--embedding", "none", "--out", str(tmp_path / "ev"),
                     "--no-mlflow", "--no-cache"],  # --no-cache: the model runs (on Ray), not read from embed's store
    }
    for name, cmd in runs.items():
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, (name, out[-3000:])
        for noise in ("Execution plan", "Starting execution", "Progress bars disabled", "core_worker.cc",
                      "Started a local Ray instance", "Token authentication", "DeprecationWarning", "INFO"):
            assert noise not in out, (name, noise, out)
        lines = [line for line in out.splitlines() if line.strip()]
        prose = [line for line in lines if not line.lstrip().startswith(("|", "#"))]  # tables repeat rulers
        assert len(prose) == len(set(prose)), (name, out)
        if name == "embed":
            assert "36 embeddings (192-d float32" in out and len(lines) <= 3, out


def _on_a_terminal(cmd: list[str]) -> tuple[int, str]:
    """Run ``cmd`` under a pseudo-terminal; its exit code and everything it drew."""
    import pty
    import time

    leader, follower = pty.openpty()
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**_quiet_env(), "COLUMNS": "160", "TERM": "xterm"}, stdin=follower,
                            stdout=follower, stderr=follower, close_fds=True)
    os.close(follower)
    chunks, deadline = [], time.time() + 600
    while time.time() < deadline:
        try:
            data = os.read(leader, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=60)
    os.close(leader)
    return proc.returncode, b"".join(chunks).decode(errors="replace")


@pytest.mark.slow  # the collapse-guard test in test_pretrain.py runs the worker -> progress.json -> bar path
def test_pretrain_on_a_terminal_draws_one_live_bar_instead_of_step_lines(tmp_path):
    """Under a pseudo-terminal: a rich bar fed by the worker's progress.json, no per-step lines."""
    returncode, out = _on_a_terminal(_pretrain_cmd(tmp_path))
    assert returncode == 0, out[-3000:]
    assert "[reddino] step " not in out
    assert "pretrain console" in out and "6/6" in out and "img/s" in out, out[-3000:]
    assert (tmp_path / "runs" / "console" / "progress.json").is_file()


@pytest.mark.slow  # a second pretraining on a terminal; the pieces are checked fast in test_eval_k.py
def test_eval_k_10_reaches_the_live_bar_and_the_learning_curve(tmp_path):
    """With eval.k=10 the live bar and the learning curve show the kNN-10 the run computes (the bar used to
    look for a kNN-20 that was never computed, and the curve dropped the kNN panel)."""
    generate_synthetic(tmp_path / "cells", n_per_class=3, sources=2, unit="cell", seed=1, size=32)
    returncode, out = _on_a_terminal(_pretrain_cmd(tmp_path) + [
        f"eval.data={tmp_path / 'cells'}", "eval.k=10", "eval.every=2", "eval.max_images=60"])
    assert returncode == 0, out[-3000:]
    bar = [line for line in out.splitlines() if "pretrain console" in line]
    assert any("kNN-10 " in line for line in bar) and "kNN-20" not in out, out[-3000:]
    from mlflow.tracking import MlflowClient

    from reddino.train.curves import metric_histories

    run_id = (tmp_path / "runs" / "console" / "mlflow_run_id").read_text().strip()
    hist = metric_histories(MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}"), run_id, k=10)
    assert len(hist["eval_knn10_balanced_accuracy"]) == 3  # steps 2, 4, 6: the curve's kNN panel
    assert (tmp_path / "runs" / "console" / "learning_curve.png").is_file()


def test_verbose_flag_turns_on_ray_and_mlflow_output(monkeypatch):
    from typer.testing import CliRunner

    from reddino.cli import app
    from reddino.runtime import verbose

    monkeypatch.setenv("REDDINO_VERBOSE", "0")  # recorded, so the flag's change is undone afterwards
    assert not verbose()
    result = CliRunner().invoke(app, ["--verbose", "summary", "--help"])
    assert result.exit_code == 0, result.output
    assert verbose()  # set in the environment, so Ray's worker processes started later inherit it
