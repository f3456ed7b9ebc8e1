"""Pretraining on a real local Ray: 2 CPU workers, kill + resume, NaN stop, MLflow, export."""

from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from reddino.config import load_config
from reddino.data import generate_synthetic
from reddino.train import pretrain
from reddino.train.checkpoint import DATA_STATE_FILE

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


def _consumed(ckpt_dir):
    data = np.load(ckpt_dir / DATA_STATE_FILE)
    return data["consumed"], int(data["data_pass"])


def test_kill_and_resume_continues_step_and_data_position(ray_train, synth, tmp_path):
    # 2 sources × 48 patches = 96 rows; 2 workers × 4 = 8 rows/step → one pass is 12 steps.
    cfg = _cfg(synth, tmp_path, steps=10)
    marker = tmp_path / "crashed"
    with pytest.raises(Exception) as failed:
        pretrain(cfg, run_name="killed", faults={"crash_at_step": 5, "crash_marker": str(marker)})
    assert marker.exists(), f"the run failed before the injected crash: {failed.value!r}"
    run_dir = tmp_path / "runs" / "killed"
    assert (run_dir / "checkpoint_0000004").exists()

    result = pretrain(cfg, run_name="killed", resume=True)
    assert result.metrics["step"] == 10
    # Ray registers a checkpoint asynchronously: a crash right after step 4's report may leave step 2 as
    # the last committed one. Either way the run continues from a committed step, not from scratch.
    resumed = result.metrics["resumed_from_step"]
    assert resumed in (2, 4)
    before, pass_before = _consumed(run_dir / f"checkpoint_{resumed:07d}")
    assert len(before) == resumed * 8 and len(np.unique(before)) == len(before) and pass_before == 0
    after, pass_after = _consumed(result.checkpoint_dir)
    # The stream continued: what was consumed before is still there, nothing twice, and exactly the
    # remaining steps' rows were added.
    assert result.checkpoint_dir.name == "checkpoint_0000010" and pass_after == 0
    assert set(before.tolist()) <= set(after.tolist())
    assert len(np.unique(after)) == len(after) == 10 * 8
    assert result.backbone_path is not None and result.backbone_path.exists()

    client = MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    run = client.get_run(result.mlflow_run_id)
    assert run.data.tags["reddino.status"] == "finished"
    steps = [m.step for m in client.get_metric_history(result.mlflow_run_id, "loss")]
    assert max(steps) == 10 and 1 in steps
    assert "model.arch" in run.data.params
    artifacts = {a.path for a in client.list_artifacts(result.mlflow_run_id, "backbone")}
    assert any(p.endswith(".safetensors") for p in artifacts)


def test_non_finite_loss_stops_cleanly_keeping_last_good_checkpoint(ray_train, synth, tmp_path):
    cfg = _cfg(synth, tmp_path, steps=8, workers=1)
    result = pretrain(cfg, run_name="nan", faults={"nan_at_step": 5})
    assert result.stopped and "step 5" in result.stopped and "ibot" in result.stopped
    assert result.checkpoint_dir is not None and result.checkpoint_dir.name == "checkpoint_0000004"
    assert result.backbone_path is None  # no export from a diverged run
    client = MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    assert client.get_run(result.mlflow_run_id).data.tags["reddino.status"] == "stopped"


def test_collapse_guard_warns_once_then_stops_when_asked(ray_train, synth, tmp_path):
    # Thresholds every run meets, so the guard's plumbing is what is tested (the signs themselves: test_ssl).
    cfg = _cfg(synth, tmp_path, steps=8, workers=1, **{"train.collapse_uniform_frac": 0.0})
    result = pretrain(cfg, run_name="warned")
    assert not result.stopped and result.metrics["step"] == 8
    client = MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    tags = client.get_run(result.mlflow_run_id).data.tags
    assert "uniform teacher targets" in tags["reddino.collapse_warning"]
    assert tags["reddino.collapse_warning"].startswith("step 4:")  # 2 monitor steps in a row after warm-up
    assert [m.step for m in client.get_metric_history(result.mlflow_run_id, "collapse")] == [4, 6, 8]
    # Every finished run draws its learning curve (RankMe and losses here; kNN when eval.data is set).
    curve = result.run_dir / "learning_curve.png"
    assert curve.stat().st_size > 5000 and curve.read_bytes()[:4] == b"\x89PNG"
    assert "learning_curve.png" in {a.path for a in client.list_artifacts(result.mlflow_run_id)}

    cfg = _cfg(synth, tmp_path, steps=8, workers=1,
               **{"train.collapse_rankme_frac": 1.0, "train.collapse_stop": "true"})
    result = pretrain(cfg, run_name="collapsed")
    assert result.stopped and "collapse at step 4" in result.stopped and "RankMe" in result.stopped
    assert result.backbone_path is None
    assert client.get_run(result.mlflow_run_id).data.tags["reddino.status"] == "stopped"
