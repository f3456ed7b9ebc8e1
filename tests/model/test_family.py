"""The backbone contract: what each family gives (tokens, pooled feature, stride, export) and refuses."""

from __future__ import annotations

import pytest
import torch

from reddino.config import LossConfig, ModelConfig
from reddino.model import DINOv2SSL, SUPPORT, create_backbone, export_backbone, family, load_backbone

SMALL = {
    "vit": ("vit_mini_patch8_reddino", None, None),
    "eva": ("vit_small_patch16_dinov3_qkvb", 8, {"depth": 1, "embed_dim": 64, "num_heads": 2}),
    "convnext": ("convnext_atto", None, {"depths": (1, 1, 1, 1), "dims": (16, 32, 64, 128)}),
}


def _small(fam):
    arch, patch, kw = SMALL[fam]
    torch.manual_seed(0)
    return create_backbone(arch, 56, patch, timm_kwargs=kw)


def test_support_table_states_each_family():
    assert set(SUPPORT) == {"vit", "eva", "convnext"}
    assert SUPPORT["vit"]["ibot"] and SUPPORT["eva"]["ibot"] and not SUPPORT["convnext"]["ibot"]
    assert SUPPORT["eva"]["rope"] and SUPPORT["eva"]["storage_tokens"]


@pytest.mark.parametrize("fam", list(SMALL))
def test_tokens_features_stride_and_export_round_trip(fam, tmp_path):
    bb = _small(fam).eval()
    assert family.family_of(bb).name == fam
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        t = family.tokens(bb, x)
    D, s = family.embed_dim(bb), family.token_stride(bb)
    assert t["cls"].shape == (2, D) and t["patch"].shape == (2, (56 // s) ** 2, D)
    assert {"cls": 1, "cls+mean": 2, "mean": 1} == {p: family.features(bb, x, p).shape[1] // D for p in
                                                  ("cls", "cls+mean", "mean")}
    back = load_backbone(export_backbone(bb, tmp_path / "bb.safetensors"))
    with torch.no_grad():
        assert torch.equal(family.features(back, x), family.features(bb, x))


def test_convnext_global_feature_is_the_normed_pooled_map():
    bb = _small("convnext").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = bb.forward_head(bb.forward_features(x), pre_logits=True)  # timm's own pooled + LayerNorm head
        assert torch.allclose(family.tokens(bb, x)["cls"], ref, atol=1e-6)
    with pytest.raises(ValueError, match="smaller than this ConvNeXt's total stride 32"):
        family.tokens(bb, torch.randn(1, 3, 24, 24))
    with pytest.raises(ValueError, match="iBOT needs masked patch tokens"):
        family.tokens(bb, x, torch.ones(2, 4, dtype=torch.bool), torch.zeros(1, 16))


@pytest.mark.parametrize("fam", ["eva", "convnext"])
def test_ssl_trains_each_family_and_refuses_ibot_on_convnext(fam):
    arch, patch, kw = SMALL[fam]
    mc = ModelConfig(arch=arch, img_size=56, patch_size=patch, timm_kwargs=kw, head_prototypes=64,
                     head_hidden_dim=32, head_bottleneck_dim=16, head_use_bn=True)
    lc = LossConfig(ibot_weight=1.0 if fam == "eva" else 0.0, koleo_weight=0.1, centering="ema")
    ssl = DINOv2SSL.from_config(mc, lc)
    g, l = torch.randn(4, 2, 3, 56, 56), torch.randn(4, 1, 3, 32, 32)
    n = (56 // ssl.patch_size) ** 2
    masks = torch.zeros(4, 2, n, dtype=torch.bool)
    masks[:, :, : n // 3] = True
    loss, parts = ssl(g, l, masks)
    loss.backward()
    assert torch.isfinite(loss) and (parts["masked_fraction"] > 0) == (fam == "eva")
    backbone = ssl.student["backbone"]
    assert all(p.grad is not None for p in backbone.parameters())
    groups = ssl.param_groups()
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in ssl.parameters() if p.requires_grad)
    if fam == "convnext":
        with pytest.raises(ValueError, match="iBOT needs masked patch tokens.*ibot_weight=0"):
            DINOv2SSL.from_config(mc, LossConfig(ibot_weight=1.0))


def test_unsupported_module_is_named():
    with pytest.raises(ValueError, match="Linear is not a supported backbone.*vit.*eva.*convnext"):
        family.family_of(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="resnet18"):
        create_backbone("resnet18", 56)
