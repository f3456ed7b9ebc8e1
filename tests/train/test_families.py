"""Each backbone family through the normal pretraining path on real local Ray: 2 Train workers (DDP), Gram anchoring
on (a frozen Gram teacher refreshed during the run), a worker crash after a checkpoint, resume from it at the exact
step and data position, then export → load_backbone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from reddino.config import load_config
from reddino.data import generate_synthetic
from reddino.model import family, load_backbone
from reddino.train import pretrain
from reddino.train.checkpoint import DATA_STATE_FILE

TINY_CONFIG = str(Path(__file__).parents[1] / "tiny.yaml")

# small members of each family (the shipped recipes use ViT-S/16 and ConvNeXt-T)
FAMILIES = {
    "eva": ["model.arch=vit_small_patch16_dinov3_qkvb", "model.patch_size=8",
            "model.timm_kwargs={depth: 2, embed_dim: 64, num_heads: 2, rope_rescale_coords: 2.0}",
            "crops.local_crops_size=24", "loss.ibot_weight=1.0"],
    "convnext": ["model.arch=convnext_atto", "model.timm_kwargs={depths: [1, 1, 1, 1], dims: [16, 32, 64, 128]}",
                 "crops.local_crops_size=32", "loss.ibot_weight=0.0", "loss.koleo_weight=0.1"],
}


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate_synthetic(root / "data", n_per_class=4, sources=2, unit="both", seed=0, n_patches=48)
    return root / "data"


def _cfg(synth, tmp_path, steps, fam, *extra):
    return load_config(TINY_CONFIG, [
        f"data.paths=[{synth}]", "data.resize=64", "crops.global_crops_size=64", "crops.local_crops_number=1",
        "model.img_size=64", "loss.gram_weight=1.0", "loss.gram_first_refresh=2", "loss.gram_refresh_every=2", "model.head_prototypes=256", "model.head_hidden_dim=64", "model.head_bottleneck_dim=32",
        "train.epochs=1", f"train.iters_per_epoch={steps}", "train.batch_size_per_worker=4", "train.num_workers=2",
        "train.torch_threads=1", "train.checkpoint_every=2", "train.keep_checkpoints=10", "train.log_every=1",
        "train.monitor_every=2", "train.max_failures=1", f"train.storage_path={tmp_path / 'runs'}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", *FAMILIES[fam], *extra,
    ])


@pytest.mark.slow
@pytest.mark.parametrize("fam", list(FAMILIES))
def test_family_trains_on_two_workers_and_resumes_after_a_crash(ray_train, synth, tmp_path, fam):
    cfg = _cfg(synth, tmp_path, 6, fam)
    marker = tmp_path / "crashed"

    def crash_once_at_5(step):
        import os

        if step == 5 and not marker.exists():
            marker.write_text(str(step))
            os._exit(1)

    result = pretrain(cfg, run_name=f"fam-{fam}", step_hooks=[crash_once_at_5])
    assert marker.exists()
    assert result.metrics["step"] == 6 and not result.stopped
    resumed = result.metrics["resumed_from_step"]
    assert resumed in (2, 4), result.metrics
    run_dir = tmp_path / "runs" / f"fam-{fam}"
    before = np.load(run_dir / f"checkpoint_{resumed:07d}" / DATA_STATE_FILE)["consumed"]
    after = np.load(result.checkpoint_dir / DATA_STATE_FILE)["consumed"]
    assert set(before.tolist()) <= set(after.tolist())
    assert len(np.unique(after)) == len(after) == 6 * 8  # the rows of 6 steps of 2 workers, none twice
    assert np.isfinite(result.metrics["loss"]) and "loss_gram" in result.metrics
    assert result.metrics["gram_refreshes"] >= 2  # refreshed at steps 2 and 4, across the resume

    back = load_backbone(result.backbone_path)
    assert family.family_of(back).name == fam
    state = torch.load(result.checkpoint_dir / "state.pt", map_location="cpu", weights_only=False)["model"]
    teacher = {k[len("teacher.backbone."):]: v for k, v in state.items() if k.startswith("teacher.backbone.")}
    assert teacher.keys() == back.state_dict().keys()
    assert all(torch.equal(teacher[k], v) for k, v in back.state_dict().items())  # the export is the teacher
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        t = family.tokens(back, x)
    assert t["cls"].shape == (2, family.embed_dim(back)) and t["patch"].shape[1] >= 1


def test_convnext_refuses_ibot_before_any_worker_starts(synth, tmp_path):
    cfg = _cfg(synth, tmp_path, 2, "convnext", "loss.ibot_weight=1.0")
    with pytest.raises(ValueError, match="iBOT needs masked patch tokens.*ConvNeXt.*ibot_weight=0"):
        pretrain(cfg, run_name="conv-ibot")
