"""Pretraining on a real local Ray: 2 CPU workers, kill + resume, NaN stop, MLflow, export."""

from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from reddino.config import load_config
from reddino.data import generate_synthetic
from reddino.train import pretrain
from reddino.train.checkpoint import DATA_STATE_FILE
from reddino.runtime import free_port

TINY_CONFIG = str(Path(__file__).parents[1] / "tiny.yaml")  # the tests' own tiny recipe


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate_synthetic(root / "data", n_per_class=4, sources=2, unit="both", seed=0, n_patches=48)
    return root / "data"


def _cfg(synth, tmp_path, steps, workers=2, **extra):
    overrides = [
        f"data.paths=[{synth}]", "data.resize=56", "crops.global_crops_size=56", "crops.local_crops_size=28",
        "crops.local_crops_number=1", "model.img_size=56", "model.head_prototypes=256",
        "model.head_hidden_dim=64", "model.head_bottleneck_dim=32",
        "train.epochs=1", f"train.iters_per_epoch={steps}", "train.batch_size_per_worker=4",
        f"train.num_workers={workers}", "train.torch_threads=1", "train.checkpoint_every=2", "train.keep_checkpoints=10",
        "train.log_every=1", "train.monitor_every=2", f"train.storage_path={tmp_path / 'runs'}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
    ] + [f"{k}={v}" for k, v in extra.items()]
    return load_config(TINY_CONFIG, overrides)


def _reported_steps(path):
    """A Ray Train callback (it runs in the controller) writing the step of every report it receives to ``path``."""
    from ray.train import UserCallback

    class Steps(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            with open(path, "a") as f:
                f.write(f"{metrics[0]['step']}\n")

    return Steps()


def _consumed(ckpt_dir):
    data = np.load(ckpt_dir / DATA_STATE_FILE)
    return data["consumed"], int(data["data_pass"])


def test_kill_then_resume_past_a_damaged_checkpoint_continues_step_and_data_position(ray_train, synth, tmp_path):
    # 2 sources × 48 patches = 96 rows; 2 workers × 4 = 8 rows/step → one pass is 12 steps. The run crosses into
    # pass 1 (started early, on the second dataset: data.overlap_passes) and is killed there.
    cfg = _cfg(synth, tmp_path, steps=16)
    assert cfg.data.overlap_passes
    marker = tmp_path / "crashed"

    def crash_once_at_15(step):  # a closure: cloudpickled to the workers by value
        import os

        if step == 15 and not marker.exists():
            marker.write_text(str(step))  # fire once: a restarted worker must go on
            os._exit(1)  # a crashed worker process

    with pytest.raises(Exception) as failed:
        pretrain(cfg, run_name="killed", step_hooks=[crash_once_at_15])
    assert marker.exists(), f"the run failed before the injected crash: {failed.value!r}"
    run_dir = tmp_path / "runs" / "killed"
    # A run that failed after starting says so: FAILED in MLflow, and its run dir holds the error.
    crashed = MlflowClient(tracking_uri=cfg.mlflow.tracking_uri).get_run((run_dir / "mlflow_run_id").read_text())
    assert crashed.info.status == "FAILED" and crashed.data.tags["reddino.status"] == "failed"
    assert (run_dir / "error.txt").read_text().split(":")[0] in crashed.data.tags["reddino.error"]
    assert (run_dir / "checkpoint_0000014").exists()
    # Ray registers a checkpoint asynchronously, so the last committed one is step 14 or 12: truncate both.
    for step in (12, 14):
        state = run_dir / f"checkpoint_{step:07d}" / "state.pt"
        state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])

    reports = tmp_path / "reports.txt"
    result = pretrain(cfg, run_name="killed", resume=True, callbacks=[_reported_steps(reports)])
    assert result.metrics["step"] == 16
    # Ray Train got the checkpoints only (no kNN in this run): a step log is no report, since report() waits for
    # the controller's next poll (2 s) and held the run to one logged step per poll.
    assert [int(x) for x in reports.read_text().split()] == [12, 14, 16]
    assert result.metrics["resumed_from_step"] == 10  # the newest checkpoint that loads
    before, pass_before = _consumed(run_dir / "checkpoint_0000010")
    assert len(before) == 10 * 8 and len(np.unique(before)) == len(before) and pass_before == 0
    # The stream continued: pass 0 ended with every row exactly once (the resumed run rewrote step 12) ...
    full, pass_full = _consumed(run_dir / "checkpoint_0000012")
    assert pass_full == 0 and set(before.tolist()) <= set(full.tolist())
    assert len(np.unique(full)) == len(full) == 96
    # ... and pass 1 holds exactly the last 4 steps' rows, none twice.
    after, pass_after = _consumed(result.checkpoint_dir)
    assert result.checkpoint_dir.name == "checkpoint_0000016" and pass_after == 1
    assert len(np.unique(after)) == len(after) == 4 * 8
    assert result.backbone_path is not None and result.backbone_path.exists()

    client = MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    run = client.get_run(result.mlflow_run_id)
    assert run.data.tags["reddino.status"] == "finished" and run.info.status == "FINISHED"
    assert not (run_dir / "error.txt").exists()  # the resumed run finished
    assert "checkpoint_0000012 (" in run.data.tags["reddino.damaged_checkpoints"]  # said so, in MLflow too
    steps = [m.step for m in client.get_metric_history(result.mlflow_run_id, "loss")]
    assert max(steps) == 16 and 1 in steps
    assert "model.arch" in run.data.params
    artifacts = {a.path for a in client.list_artifacts(result.mlflow_run_id, "backbone")}
    assert any(p.endswith(".safetensors") for p in artifacts)


def test_collapse_guard_warns_once_then_a_non_finite_loss_stops_cleanly(ray_train, synth, tmp_path, monkeypatch,
                                                                         capfd):
    # Collapse thresholds every run meets, so the guard's plumbing is what is tested (the signs themselves:
    # test_ssl); then a NaN loss at step 7 stops the run, keeping the last good checkpoint.
    # The driver acts as on a terminal: the worker feeds the live bar through progress.json (tests/train/
    # test_console.py runs the CLI under a real pseudo-terminal, marked slow).
    import reddino.train.progress

    monkeypatch.setattr(reddino.train.progress, "live_wanted", lambda: True)
    monkeypatch.setenv("COLUMNS", "200")  # the whole bar on one line
    cfg = _cfg(synth, tmp_path, steps=10, workers=1, **{"train.collapse_uniform_frac": 0.0})

    def nan_at_7(step, loss, parts):
        import torch

        if step != 7:
            return loss, parts
        return loss * float("nan"), {**parts, "ibot": torch.tensor(float("nan"))}

    result = pretrain(cfg, run_name="nan", loss_hook=nan_at_7)
    assert result.stopped and "step 7" in result.stopped and "ibot" in result.stopped
    assert result.checkpoint_dir is not None and result.checkpoint_dir.name == "checkpoint_0000006"
    assert result.backbone_path is None  # no export from a diverged run
    client = MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    tags = client.get_run(result.mlflow_run_id).data.tags
    assert tags["reddino.status"] == "stopped"
    assert "uniform teacher targets" in tags["reddino.collapse_warning"]
    assert tags["reddino.collapse_warning"].startswith("step 4:")  # 2 monitor steps in a row after warm-up
    assert [m.step for m in client.get_metric_history(result.mlflow_run_id, "collapse")] == [4, 6]
    # Every run draws its learning curve, a stopped one too (RankMe and losses here; kNN when eval.data is set).
    curve = result.run_dir / "learning_curve.png"
    assert curve.stat().st_size > 5000 and curve.read_bytes()[:4] == b"\x89PNG"
    import json

    progress = json.loads((result.run_dir / "progress.json").read_text())
    assert progress["step"] == 7 and {"loss", "lr", "ips"} <= set(progress), progress  # the last finished step
    bar = capfd.readouterr().out
    assert "pretrain nan" in bar and "7/10" in bar and "img/s" in bar, bar  # the bar the driver drew from it



def _mlflow_server(tmp_path, port):
    import subprocess
    import sys
    import time
    import urllib.request

    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination",
         str(tmp_path / "server-artifacts")],
        stdout=open(tmp_path / "server.log", "ab"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except OSError:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
            time.sleep(0.5)
    proc.kill()
    raise TimeoutError("mlflow server did not start")


@pytest.mark.slow
def test_mlflow_server_outage_mid_run_loses_no_metrics(ray_train, synth, tmp_path):
    """A real `mlflow server` on loopback is stopped at step 3 and back at step 9: training goes on, the
    metrics of steps 3-9 are retried and land, and the run ends 'finished'."""
    import os
    import signal
    import threading
    import time

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = {"proc": _mlflow_server(tmp_path, port)}
    cfg = _cfg(synth, tmp_path, steps=12, workers=1, **{"mlflow.tracking_uri": uri})
    down, up = tmp_path / "server-down", tmp_path / "server-up"

    def outage(step):  # in the worker: ask for the outage at step 3, wait for the server at step 9
        import time as t
        import urllib.request

        def reachable():
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2)
                return True
            except OSError:
                return False

        if step == 3:
            down.write_text("")
            while reachable():
                t.sleep(0.2)
        if step == 9:
            up.write_text("")
            while not reachable():
                t.sleep(0.5)

    def operator():  # in the test: stop the server when asked, start it again when asked
        while not down.exists():
            time.sleep(0.2)
        os.killpg(server["proc"].pid, signal.SIGKILL)
        server["proc"].wait()
        while not up.exists():
            time.sleep(0.2)
        server["proc"] = _mlflow_server(tmp_path, port)

    thread = threading.Thread(target=operator, daemon=True)
    thread.start()
    try:
        result = pretrain(cfg, run_name="outage", step_hooks=[outage])
        thread.join(5)
        assert not result.stopped and result.metrics["step"] == 12
        client = MlflowClient(tracking_uri=uri)
        run = client.get_run(result.mlflow_run_id)
        assert run.data.tags["reddino.status"] == "finished" and "reddino.mlflow_lost_metrics" not in run.data.tags
        assert sorted(m.step for m in client.get_metric_history(result.mlflow_run_id, "loss")) == list(range(1, 13))
    finally:
        if server["proc"].poll() is None:
            os.killpg(server["proc"].pid, signal.SIGKILL)


@pytest.mark.slow  # two Ray Train runs of 2 workers (the exact-resume check itself is in-process: test_gram_train)
def test_gram_anchoring_across_a_kill_resumes_teacher_refreshes_and_metrics(ray_train, synth, tmp_path):
    # 2 workers, Gram anchoring with the Gram teacher at twice the crop size (112 px: 8×8 tokens resized to 4×4),
    # refreshed after steps 4 and 8; a worker crashes at step 7, between the refreshes, and the run resumes.
    import torch

    cfg = _cfg(synth, tmp_path, steps=10, **{
        "data.resize": 112, "loss.gram_weight": 1.0, "loss.gram_teacher_crops_size": 112,
        "loss.gram_first_refresh": 4, "loss.gram_refresh_every": 4, "loss.gram_max_refreshes": 2})
    marker = tmp_path / "crashed"

    def crash_once_at_7(step):
        import os

        if step == 7 and not marker.exists():
            marker.write_text(str(step))
            os._exit(1)

    with pytest.raises(Exception):
        pretrain(cfg, run_name="gram", step_hooks=[crash_once_at_7])
    assert marker.exists()
    result = pretrain(cfg, run_name="gram", resume=True)
    # resumed from checkpoint 6, or an earlier one when Ray had not yet registered 6 (it does so asynchronously)
    assert result.metrics["step"] == 10 and result.metrics["resumed_from_step"] in (2, 4, 6)

    run_dir = tmp_path / "runs" / "gram"

    def model_state(step):
        return torch.load(run_dir / f"checkpoint_{step:07d}" / "state.pt", weights_only=False)["model"]

    def same(a, a_prefix, b, b_prefix):
        keys = [k[len(a_prefix):] for k in a if k.startswith(a_prefix)]
        return bool(keys) and all(torch.equal(a[a_prefix + k], b[b_prefix + k]) for k in keys)

    s4, s6, s8, s10 = (model_state(s) for s in (4, 6, 8, 10))
    assert [int(s["gram_refreshes"]) for s in (s4, s6, s8, s10)] == [1, 1, 2, 2]  # the count survived the kill
    assert same(s4, "gram_teacher.", s4, "teacher.backbone.")  # refreshed from the EMA teacher after step 4 ...
    assert same(s6, "gram_teacher.", s4, "gram_teacher.")  # ... frozen in between (and checkpointed) ...
    assert same(s8, "gram_teacher.", s8, "teacher.backbone.")  # ... refreshed by the resumed run after step 8
    assert same(s10, "gram_teacher.", s8, "gram_teacher.") and not same(s10, "gram_teacher.", s10, "teacher.backbone.")

    client = MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    history = {name: {m.step: m.value for m in client.get_metric_history(result.mlflow_run_id, name)}
               for name in ("loss_gram", "gram_weight", "gram_refreshes")}
    assert set(history["loss_gram"]) == set(range(1, 11)) and all(v > 0 for v in history["loss_gram"].values())
    assert set(history["gram_weight"].values()) == {1.0}
    assert [history["gram_refreshes"][s] for s in (3, 4, 7, 8, 10)] == [0, 1, 1, 2, 2]
