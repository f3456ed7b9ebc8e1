"""Distillation on the pretraining platform: 2 Ray Train workers learn a frozen teacher (the cosine to its features
rises), survive a kill with an exact resume, export a student whose registry version names its teacher; bad teachers
and pairs are refused before anything starts."""

from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from reddino.config import ConfigError, load_config
from reddino.data import generate_synthetic
from reddino.data.shards import file_sha256
from reddino.model import create_backbone, export_backbone
from reddino.model.backbone import read_export_meta
from reddino.train.checkpoint import DATA_STATE_FILE
from reddino.train.distill import DistillInputError, distill


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate_synthetic(root / "data", n_per_class=4, sources=2, unit="cell", seed=0)
    return root / "data"


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    """A ViT-Mini/8 teacher export (random init: what is learnt is matching it, which any teacher shows)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "teacher" / "backbone.safetensors"
    export_backbone(create_backbone("vit_mini_patch8_reddino", 56), path, meta={"run_name": "chula-teacher"})
    return path


def _cfg(synth, tmp_path, teacher, steps, workers=2, **extra):
    overrides = [
        f"data.paths=[{synth}]", "data.resize=56", "data.shuffle_buffer=16", f"distill.teacher={teacher}",
        "optim.base_lr=2e-2", "optim.warmup_epochs=0.1",
        "train.epochs=1", f"train.iters_per_epoch={steps}", "train.batch_size_per_worker=4",
        f"train.num_workers={workers}", "train.torch_threads=1", "train.checkpoint_every=2", "train.keep_checkpoints=10",
        "train.log_every=1", "train.monitor_every=2", f"train.storage_path={tmp_path / 'runs'}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
    ] + [f"{k}={v}" for k, v in extra.items()]
    return load_config("distill_cpu", overrides)


@pytest.mark.slow  # two Ray Train fits (kill + resume) and a registration: ~12 min on the loaded 2-core machine
def test_two_workers_learn_the_teacher_survive_a_kill_and_register_with_lineage(ray_train, synth, tmp_path,
                                                                                teacher_file, monkeypatch):
    cfg = _cfg(synth, tmp_path, teacher_file, steps=14, **{"eval.data": synth})
    marker = tmp_path / "crashed"

    def crash_once_at_11(step):  # cloudpickled to the workers by value
        import os

        if step == 11 and not marker.exists():
            marker.write_text(str(step))
            os._exit(1)

    with pytest.raises(Exception):
        distill(cfg, run_name="d", step_hooks=[crash_once_at_11])
    assert marker.exists()
    result = distill(cfg, run_name="d", resume=True)
    assert not result.stopped and result.metrics["step"] == 14
    assert result.metrics["resumed_from_step"] in (8, 10)  # Ray commits a checkpoint asynchronously
    # exact resume: the resumed stream continued the pass, every row of it once (8 rows a step, 2 workers)
    data = np.load(result.run_dir / "checkpoint_0000014" / DATA_STATE_FILE)
    assert len(np.unique(data["consumed"])) == len(data["consumed"])

    client = MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    cos = {m.step: m.value for m in client.get_metric_history(result.mlflow_run_id, "loss_distill_cos")}
    assert sorted(cos) == list(range(1, 15))
    early, late = np.mean([cos[s] for s in (1, 2, 3)]), np.mean([cos[s] for s in (12, 13, 14)])
    assert late > early + 0.1, cos  # the student learns the teacher's features, across the resume too
    run = client.get_run(result.mlflow_run_id)
    sha = file_sha256(teacher_file)
    assert run.data.tags["reddino.teacher.hash"] == sha and run.data.tags["reddino.method"] == "distill"
    assert "eval_knn20_balanced_accuracy" in run.data.metrics  # the in-training kNN of the student

    # the export is the student, and names its teacher; the registry version carries it
    meta = read_export_meta(result.backbone_path)
    assert meta["arch"] == "vit_micro_patch8_reddino" and meta["embed_dim"] == 96
    assert meta["teacher"]["hash"] == sha and meta["teacher"]["name"] == "chula-teacher"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", cfg.mlflow.tracking_uri)
    from reddino.registry import list_models, register_backbone

    mv = register_backbone(str(result.run_dir), name="student")
    assert mv.tags["reddino.teacher.hash"] == sha and mv.tags["reddino.teacher.name"] == "chula-teacher"
    row = next(r for r in list_models() if r["name"] == "student")
    assert row["teacher"] == f"chula-teacher (weights {sha[:12]})"


def test_bad_teachers_and_pairs_are_refused_before_training_starts(tmp_path, synth, teacher_file):
    # No Ray fixture: each error comes from the driver's checks, before Ray or MLflow start.
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(DistillInputError, match=f"teacher '{missing}' does not load: FileNotFoundError: no such file"):
        distill(_cfg(synth, tmp_path, missing, steps=2))
    not_weights = tmp_path / "junk.safetensors"
    not_weights.write_bytes(b"not a model")
    with pytest.raises(DistillInputError, match=f"teacher '{not_weights}' does not load"):
        distill(_cfg(synth, tmp_path, not_weights, steps=2))
    with pytest.raises(DistillInputError, match="random model has no trained weights"):
        distill(_cfg(synth, tmp_path, "random:vit_mini_patch8_reddino", steps=2))

    nan_model = create_backbone("vit_mini_patch8_reddino", 56)
    with torch.no_grad():
        nan_model.blocks[1].attn.qkv.weight.fill_(float("nan"))
    nan_file = export_backbone(nan_model, tmp_path / "nan" / "backbone.safetensors")
    with pytest.raises(DistillInputError, match=f"teacher '{nan_file}'.*not finite"):
        distill(_cfg(synth, tmp_path, nan_file, steps=2))

    big = export_backbone(create_backbone("vit_small_patch16_dinov3", 64, timm_kwargs={"depth": 1}),
                          tmp_path / "l16" / "backbone.safetensors")
    with pytest.raises(DistillInputError, match=f"teacher '{big}'.*56-px views do not tile into whole 16-px"):
        distill(_cfg(synth, tmp_path, big, steps=2))
    # a view the student cannot tile: the config itself refuses it, before distillation looks at the models
    with pytest.raises(ConfigError, match="crops.global_crops_size .*multiple of the patch size 8.*got 60"):
        distill(_cfg(synth, tmp_path, teacher_file, steps=2, **{"crops.global_crops_size": 60,
                                                                "distill.teacher_img_size": 56}))
    assert not (tmp_path / "runs").exists()  # nothing started, nothing half-written


def test_cli_refuses_a_bad_teacher_with_exit_2_and_takes_a_student_reference(tmp_path, teacher_file):
    from typer.testing import CliRunner

    from reddino.cli import app
    from reddino.cli.distill import student_overrides

    res = CliRunner().invoke(app, ["distill", "--teacher", str(tmp_path / "missing.pt"), "--data", str(tmp_path)])
    assert res.exit_code == 2 and "does not load: FileNotFoundError" in res.output
    # a student reference warm-starts: its arch, kwargs and weights
    assert student_overrides(str(teacher_file)) == ["model.arch=vit_mini_patch8_reddino",
                                                    f"model.pretrained={teacher_file}", "model.timm_kwargs=null",
                                                    "model.patch_size=8"]
    assert student_overrides("convnext_atto") == ["model.arch=convnext_atto"]
