"""DINOv3 warm start, offline and exact: official-layout checkpoints load through reddino's own path
(``create_backbone`` + ``load_pretrained``) and give the official tokens at relative error ≤ 1e-5.

Reference tokens were computed by the official code (facebookresearch/dinov3 @ 6876159a; ``data/dinov3/README.md``).
Relative error = max|got − ref| / max|ref| per tensor, as the reference README defines it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from reddino.model import create_backbone, export_backbone, family, load_backbone, load_pretrained

DATA = Path(__file__).parent / "data" / "dinov3"
FX = torch.load(DATA / "fixtures_tokens.pt", weights_only=True)
VIT_FILE = DATA / "vits16_d2_seed0.pth"
CNX_FILE = DATA / "convnext_small_dims_seed0.pth"
TOL = 1e-5
X256 = FX["vit"]["inputs"]["x256"].float()
X224 = X256[:, :, :224, :224]
PARTS = {"cls": "x_norm_clstoken", "storage": "x_storage_tokens", "patch": "x_norm_patchtokens"}


def rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    if ref.numel() == 0:
        return 0.0 if got.numel() == 0 else float("inf")
    return float((got.float() - ref.float()).abs().max() / ref.float().abs().max())


def vit(path: Path = VIT_FILE):
    model = create_backbone("vit_small_patch16_dinov3_qkvb", 224, timm_kwargs={"depth": 2})
    mask_token = load_pretrained(model, path)
    return model.eval(), mask_token


def convnext():
    kw = FX["convnext"]["model_kwargs"]
    model = create_backbone("convnext_tiny", 224, timm_kwargs={"depths": tuple(kw["depths"]), "dims": tuple(kw["dims"])})
    load_pretrained(model, CNX_FILE)
    return model.eval()


def check(tokens: dict, ref: dict, parts=PARTS) -> None:
    for ours, theirs in parts.items():
        assert tokens[ours].shape == ref[theirs].shape, ours
        assert rel(tokens[ours], ref[theirs]) <= TOL, (ours, rel(tokens[ours], ref[theirs]))


@torch.no_grad()
def test_vit_tokens_224_256_and_masked():
    model, mask_token = vit()
    assert family.family_of(model).name == "eva" and mask_token is not None
    check(family.tokens(model, X224), FX["vit"]["out"]["x224"])
    check(family.tokens(model, X256), FX["vit"]["out"]["x256"])
    masks = FX["vit"]["inputs"]["masks224"]
    check(family.tokens(model, X224, masks, mask_token), FX["vit"]["out"]["x224_masked"])


@torch.no_grad()
def test_vit_bf16_periods_are_honoured_and_survive_export(tmp_path):
    sd = torch.load(VIT_FILE, weights_only=True)
    sd["rope_embed.periods"] = FX["vit"]["periods_bf16"]
    path = tmp_path / "bf16_periods.pth"
    torch.save(sd, path)
    model, _ = vit(path)
    assert model.rope.periods.dtype == torch.float32
    assert torch.equal(model.rope.periods, FX["vit"]["periods_bf16"].float())
    for size, x in (("x224", X224), ("x256", X256)):
        check(family.tokens(model, x), FX["vit"]["out_periods_bf16"][size])
    # recomputed fp32 periods would be 2e-3..6e-3 off: the stored values must travel with an export
    back = load_backbone(export_backbone(model, tmp_path / "bb.safetensors"))
    check(family.tokens(back, X224), FX["vit"]["out_periods_bf16"]["x224"])


@torch.no_grad()
def test_convnext_tokens():
    model = convnext()
    ref = FX["convnext"]["out"]["x224"]
    check(family.tokens(model, X224), ref)
    assert family.features(model, X224).shape == (2, 256)


def test_strict_loading_names_file_and_keys(tmp_path):
    # wrong family: a DINOv3 ViT file into a ConvNeXt, and the other way round
    cnx = create_backbone("convnext_tiny", 224, timm_kwargs={"depths": (1, 1, 1, 1), "dims": (32, 64, 128, 256)})
    with pytest.raises(ValueError, match=r"(?s)vits16_d2_seed0\.pth.*official DINOv3 ViT.*storage_tokens.*convnext"):
        load_pretrained(cnx, VIT_FILE)
    vit_model = create_backbone("vit_small_patch16_dinov3_qkvb", 224, timm_kwargs={"depth": 2})
    with pytest.raises(ValueError, match=r"(?s)convnext_small_dims_seed0\.pth.*ConvNeXt.*eva"):
        load_pretrained(vit_model, CNX_FILE)
    # a DINOv2-family ViT refuses it too
    v2 = create_backbone("vit_small_patch14_dinov2", 224, timm_kwargs={"depth": 2})
    with pytest.raises(ValueError, match=r"(?s)vits16_d2_seed0\.pth.*official DINOv3 ViT"):
        load_pretrained(v2, VIT_FILE)
    # wrong patch size
    p14 = create_backbone("vit_small_patch16_dinov3_qkvb", 224, patch_size=14, timm_kwargs={"depth": 2})
    with pytest.raises(ValueError, match=r"(?s)vits16_d2_seed0\.pth.*patch embedding is 16x16.*14x14"):
        load_pretrained(p14, VIT_FILE)
    # wrong number of storage tokens
    reg0 = create_backbone("vit_small_patch16_dinov3_qkvb", 224, timm_kwargs={"depth": 2, "num_reg_tokens": 0})
    with pytest.raises(ValueError, match=r"(?s)vits16_d2_seed0\.pth.*4 storage tokens but the model has 0"):
        load_pretrained(reg0, VIT_FILE)
    # a missing key, and the wrong depth: every offending key named
    sd = torch.load(VIT_FILE, weights_only=True)
    del sd["blocks.1.mlp.fc2.bias"]
    path = tmp_path / "missing.pth"
    torch.save(sd, path)
    with pytest.raises(ValueError, match=r"(?s)missing\.pth.*missing keys \(1\): blocks\.1\.mlp\.fc2\.bias"):
        load_pretrained(vit()[0], path)
    deep = create_backbone("vit_small_patch16_dinov3_qkvb", 224, timm_kwargs={"depth": 3})
    with pytest.raises(ValueError, match=r"(?s)missing keys .*blocks\.2\."):
        load_pretrained(deep, VIT_FILE)
    # timm's DINOv3 arch without qkv bias cannot hold the official S/16's biases
    nob = create_backbone("vit_small_patch16_dinov3", 224, timm_kwargs={"depth": 2})
    with pytest.raises(ValueError, match=r"(?s)unexpected keys .*q_bias"):
        load_pretrained(nob, VIT_FILE)


@torch.no_grad()
def test_training_rope_rescale_is_redrawn_per_block_and_off_in_eval():
    model = create_backbone("vit_small_patch16_dinov3_qkvb", 64, timm_kwargs={"depth": 2, "rope_rescale_coords": 2.0})
    load_pretrained(model, VIT_FILE)
    x = X224[:, :, :64, :64]
    model.eval()
    a, b = family.tokens(model, x)["patch"], family.tokens(model, x)["patch"]
    assert torch.equal(a, b)  # eval: no augmentation
    model.train()
    torch.manual_seed(0)
    c = family.tokens(model, x)["patch"]
    assert rel(c, a) > 1e-3  # training: coordinates rescaled
    calls = []
    orig = model.rope.get_embed
    model.rope.get_embed = lambda *a, **k: calls.append(1) or orig(*a, **k)
    family.tokens(model, x)
    assert len(calls) == 1 + len(model.blocks)  # one draw per block (+ timm's own in _pos_embed)
