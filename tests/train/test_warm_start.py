"""Warm start: a run started from an exported backbone sees identical features at step 0."""

from pathlib import Path

import torch

from reddino.config import load_config
from reddino.evaluate import extract_features
from reddino.model import DINOv2SSL, create_backbone, export_backbone, load_backbone

TINY_CONFIG = str(Path(__file__).parents[1] / "tiny.yaml")  # the tests' own tiny recipe


def test_warm_start_from_export_gives_identical_features_at_step_0(tmp_path):
    torch.manual_seed(3)
    trained = create_backbone("vit_tiny_patch14_reddino", img_size=56)
    with torch.no_grad():  # make it differ from any fresh init
        for p in trained.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = export_backbone(trained, tmp_path / "backbone.safetensors", meta={"step": 7})

    cfg = load_config(TINY_CONFIG, ["model.img_size=56", f"model.pretrained={path}", "model.head_prototypes=64",
                                   "model.head_hidden_dim=32", "model.head_bottleneck_dim=16"])
    torch.manual_seed(123)  # a different seed: heads are random, the backbones must not be
    ssl = DINOv2SSL.from_config(cfg.model, cfg.loss)
    images = torch.rand(6, 3, 56, 56)
    reference = extract_features(load_backbone(path), [(x.permute(1, 2, 0).numpy() * 255).astype("uint8") for x in images], img_size=56)
    for part in (ssl.teacher, ssl.student):
        got = extract_features(part["backbone"].eval(), [(x.permute(1, 2, 0).numpy() * 255).astype("uint8") for x in images], img_size=56)
        assert torch.allclose(torch.as_tensor(got), torch.as_tensor(reference), atol=1e-6)
