import json

import pytest
import timm
import torch
from timm.layers import resample_abs_pos_embed

from reddino.model import backbone_info, backbone_tokens, create_backbone, export_backbone, load_backbone
from reddino.model.backbone import load_pretrained

ARCH = "vit_tiny_patch14_reddino"


def _dinov2_layout(model, prefix="", chunked=False):
    """A state dict in facebookresearch/dinov2's layout (timm names + mask_token; optional prefix/chunks)."""
    sd = {}
    for k, v in model.state_dict().items():
        if chunked and k.startswith("blocks."):
            i = int(k.split(".")[1])
            k = f"blocks.{i // 3}.{i}." + k.split(".", 2)[2]
        sd[prefix + k] = v.clone()
    sd[prefix + "mask_token"] = torch.full((1, model.embed_dim), 0.5)
    return sd


def test_registered_arch_and_info():
    m = timm.create_model(ARCH)
    assert m.patch_embed.patch_size == (14, 14) and m.embed_dim == 192
    b = create_backbone(ARCH, img_size=56)
    assert backbone_info(b) == {"arch": ARCH, "img_size": 56, "patch_size": 14, "embed_dim": 192}
    assert b.num_classes == 0


def test_tokens_and_dynamic_size():
    b = create_backbone(ARCH, img_size=56).eval()
    x = torch.randn(2, 3, 56, 56)
    out = backbone_tokens(b, x)
    assert out["cls"].shape == (2, 192) and out["patch"].shape == (2, 16, 192)
    assert torch.allclose(out["cls"], b.forward_features(x)[:, 0], atol=1e-6)
    assert backbone_tokens(b, torch.randn(2, 3, 28, 28))["patch"].shape == (2, 4, 192)


def test_mask_token_replaces_masked_patches():
    b = create_backbone(ARCH, img_size=28).eval()
    x = torch.randn(2, 3, 28, 28)
    token = torch.nn.Parameter(torch.randn(1, 192))
    none = torch.zeros(2, 4, dtype=torch.bool)
    assert torch.allclose(backbone_tokens(b, x, none, token)["cls"], backbone_tokens(b, x)["cls"], atol=1e-6)
    masks = none.clone()
    masks[0, 1] = True
    out = backbone_tokens(b, x, masks, token)
    assert not torch.allclose(out["cls"][0], backbone_tokens(b, x)["cls"][0])
    assert torch.allclose(out["cls"][1], backbone_tokens(b, x)["cls"][1], atol=1e-6)
    (out["patch"] * torch.randn_like(out["patch"])).sum().backward()
    assert token.grad is not None and token.grad.abs().sum() > 0


@pytest.mark.parametrize("prefix,chunked", [("", False), ("teacher.backbone.", True), ("module.", False)])
def test_warm_start_dinov2_layout_same_size(tmp_path, prefix, chunked):
    src = create_backbone(ARCH, img_size=42).eval()
    sd = _dinov2_layout(src, prefix, chunked)
    if prefix == "teacher.backbone.":  # a training checkpoint also holds the student and heads
        sd.update({"student.backbone." + k: torch.zeros_like(v) for k, v in src.state_dict().items()})
        sd["teacher.dino_head.last_layer.weight"] = torch.zeros(3, 3)
        sd = {"model": sd, "iteration": 7}
    path = tmp_path / "ckpt.pth"
    torch.save(sd, path)
    dst = create_backbone(ARCH, img_size=42, pretrained=str(path)).eval()
    x = torch.randn(2, 3, 42, 42)
    assert torch.allclose(backbone_tokens(dst, x)["cls"], backbone_tokens(src, x)["cls"], atol=1e-6)
    assert torch.allclose(dst.reddino_mask_token, torch.full((1, 192), 0.5))


def test_warm_start_resizes_pos_embed(tmp_path):
    src = create_backbone(ARCH, img_size=42)  # 3×3 grid
    torch.save(_dinov2_layout(src), tmp_path / "d.pth")
    dst = create_backbone(ARCH, img_size=28, pretrained=str(tmp_path / "d.pth")).eval()  # 2×2 grid
    assert dst.pos_embed.shape == (1, 5, 192)
    expected = resample_abs_pos_embed(src.pos_embed.detach(), new_size=[2, 2], old_size=[3, 3], num_prefix_tokens=1)
    assert torch.allclose(dst.pos_embed, expected, atol=1e-6)
    assert torch.allclose(dst.pos_embed[:, 0], src.pos_embed[:, 0])  # CLS position untouched
    assert torch.allclose(dst.blocks[2].mlp.fc1.weight, src.blocks[2].mlp.fc1.weight)
    assert torch.isfinite(backbone_tokens(dst, torch.randn(1, 3, 28, 28))["cls"]).all()


def test_warm_start_errors(tmp_path):
    src = create_backbone(ARCH, img_size=28)
    sd = _dinov2_layout(src)
    del sd["blocks.0.norm1.weight"]
    sd["blocks.0.extra"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"missing keys \(1\): blocks.0.norm1.weight") as err:
        create_backbone(ARCH, img_size=28, pretrained=str(tmp_path / "bad.pth"))
    assert "unexpected keys (1): blocks.0.extra" in str(err.value)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        create_backbone(ARCH, img_size=28, pretrained=str(tmp_path / "junk.pth"))
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        create_backbone(ARCH, img_size=28, pretrained=str(tmp_path / "nope.pth"))
    with pytest.raises(ValueError, match="shape mismatch"):
        load_pretrained(create_backbone("vit_small_patch14_dinov2", img_size=28), tmp_path / "bad.pth")


def test_export_load_round_trip(tmp_path):
    b = create_backbone(ARCH, img_size=56, drop_path_rate=0.1)
    with torch.no_grad():
        b.pos_embed.add_(1.0)
    path = export_backbone(b, tmp_path / "out" / "backbone.safetensors", meta={"step": 3})
    meta = json.loads((tmp_path / "out" / "backbone.safetensors.json").read_text())
    assert meta["arch"] == ARCH and meta["img_size"] == 56 and meta["step"] == 3 and meta["embed_dim"] == 192
    assert not list((tmp_path / "out").glob(".*tmp*"))
    loaded = load_backbone(path)
    assert not loaded.training
    x = torch.randn(2, 3, 56, 56)
    assert torch.equal(backbone_tokens(loaded, x)["cls"], backbone_tokens(b.eval(), x)["cls"])
    # an export also warm-starts a new backbone
    again = create_backbone(ARCH, img_size=56, pretrained=str(path)).eval()
    assert torch.equal(again.pos_embed, b.pos_embed)
