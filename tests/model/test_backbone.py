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



def _warm(arch, img_size, path):
    """(backbone, mask token) warm-started from a local file, as DINOv2SSL.from_config does."""
    model = create_backbone(arch, img_size=img_size)
    return model, load_pretrained(model, path)

def test_registered_arch_and_info():
    m = timm.create_model(ARCH)
    assert m.patch_embed.patch_size == (14, 14) and m.embed_dim == 192
    b = create_backbone(ARCH, img_size=56)
    assert backbone_info(b) == {"arch": ARCH, "family": "vit", "img_size": 56, "patch_size": 14, "embed_dim": 192}
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
    dst, token = _warm(ARCH, 42, str(path))
    dst.eval()
    x = torch.randn(2, 3, 42, 42)
    assert torch.allclose(backbone_tokens(dst, x)["cls"], backbone_tokens(src, x)["cls"], atol=1e-6)
    assert torch.allclose(token, torch.full((1, 192), 0.5))


def _official_interpolate(pos_embed, grid, offset, antialias):
    """DINOv2's ``interpolate_pos_encoding`` (vision_transformer.py), written out from the official code."""
    cls, patch = pos_embed[:, :1].float(), pos_embed[:, 1:].float()
    M, dim = int(round(patch.shape[1] ** 0.5)), patch.shape[-1]
    kw = {"scale_factor": ((grid + offset) / M, (grid + offset) / M)} if offset else {"size": (grid, grid)}
    patch = torch.nn.functional.interpolate(patch.reshape(1, M, M, dim).permute(0, 3, 1, 2), mode="bicubic",
                                            antialias=antialias, **kw)
    return torch.cat([cls, patch.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)


def test_warm_start_resizes_pos_embed(tmp_path):
    src = create_backbone(ARCH, img_size=42)  # 3×3 grid
    torch.save(_dinov2_layout(src), tmp_path / "d.pth")
    dst = _warm(ARCH, 28, str(tmp_path / "d.pth"))[0].eval()  # 2×2 grid
    assert dst.pos_embed.shape == (1, 5, 192)
    # an original DINOv2 file (mask_token, no registers): DINOv2's own scale-factor interpolation
    expected = _official_interpolate(src.pos_embed.detach(), 2, offset=0.1, antialias=False)
    assert torch.allclose(dst.pos_embed, expected, atol=1e-6)
    assert torch.allclose(dst.pos_embed[:, 0], src.pos_embed[:, 0])  # CLS position untouched
    assert torch.allclose(dst.blocks[2].mlp.fc1.weight, src.blocks[2].mlp.fc1.weight)
    assert torch.isfinite(backbone_tokens(dst, torch.randn(1, 3, 28, 28))["cls"]).all()
    # a timm state dict (no mask_token): timm's resampling, and a warning that the mask token starts at zero
    torch.save(src.state_dict(), tmp_path / "timm.pth")
    with pytest.warns(UserWarning, match="no 'mask_token'"):
        dst, token = _warm(ARCH, 28, str(tmp_path / "timm.pth"))
    expected = resample_abs_pos_embed(src.pos_embed.detach(), new_size=[2, 2], old_size=[3, 3], num_prefix_tokens=1)
    assert torch.allclose(dst.pos_embed, expected, atol=1e-6) and token is None


def _vits14_official_layout(seed: int, registers: bool = False) -> dict[str, torch.Tensor]:
    """Names and shapes of dinov2_vits14[_reg4]_pretrain.pth (518 px: 1 + 37×37 positions), seeded weights."""
    arch = "vit_small_patch14_reg4_dinov2" if registers else "vit_small_patch14_dinov2"
    torch.manual_seed(seed)
    m = timm.create_model(arch, pretrained=False, num_classes=0, img_size=518)
    sd = {}
    for k, v in m.state_dict().items():
        sd[k] = torch.randn_like(v) * 0.02 if ("pos_embed" in k or "token" in k) else v.clone()
    if registers:  # DINOv2 keeps the CLS position inside pos_embed and names registers register_tokens
        sd["pos_embed"] = torch.cat([torch.randn(1, 1, 384) * 0.02, sd["pos_embed"]], dim=1)
        sd["register_tokens"] = sd.pop("reg_token")
    sd["mask_token"] = torch.randn(1, 384)
    assert sd["pos_embed"].shape == (1, 1370, 384) and sd["patch_embed.proj.weight"].shape == (384, 3, 14, 14)
    return sd


def _official_tokens(sd, x, registers: bool):
    """The official DinoVisionTransformer.forward_features at x's size, from the 518 px weights."""
    arch = "vit_small_patch14_reg4_dinov2" if registers else "vit_small_patch14_dinov2"
    m = timm.create_model(arch, pretrained=False, num_classes=0, img_size=518).eval()
    own = {k: v for k, v in sd.items() if k in m.state_dict() and k != "pos_embed"}
    m.load_state_dict(own, strict=False)  # blocks, norms, patch embed, cls token: used as they are
    grid = x.shape[-1] // 14
    pos = _official_interpolate(sd["pos_embed"], grid, offset=0.0 if registers else 0.1, antialias=registers)
    with torch.no_grad():
        t = m.patch_embed.proj(x).flatten(2).transpose(1, 2)
        t = torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), t], dim=1) + pos
        if registers:
            t = torch.cat([t[:, :1], sd["register_tokens"].expand(x.shape[0], -1, -1), t[:, 1:]], dim=1)
        t = m.norm(m.blocks(t))
    n_reg = 4 if registers else 0
    return t[:, 0], t[:, 1 + n_reg:]


@pytest.mark.parametrize("registers", [False, True])
def test_warm_start_gives_the_official_tokens_at_224(tmp_path, registers):
    sd = _vits14_official_layout(seed=3, registers=registers)
    torch.save(sd, tmp_path / "dinov2.pth")
    arch = "vit_small_patch14_reg4_dinov2" if registers else "vit_small_patch14_dinov2"
    ours, token = _warm(arch, 224, str(tmp_path / "dinov2.pth"))
    ours.eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = backbone_tokens(ours, x)
    cls, patch = _official_tokens(sd, x, registers)

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max())

    assert rel(got["cls"], cls) <= 1e-5 and rel(got["patch"], patch) <= 1e-5
    assert torch.equal(token, sd["mask_token"])


def test_warm_start_refuses_mismatched_patch_and_registers(tmp_path):
    sd = _vits14_official_layout(seed=0)
    torch.save(sd, tmp_path / "plain.pth")
    with pytest.raises(ValueError, match="registers"):
        _warm("vit_small_patch14_reg4_dinov2", 224, str(tmp_path / "plain.pth"))
    torch.save(_vits14_official_layout(seed=0, registers=True), tmp_path / "reg.pth")
    with pytest.raises(ValueError, match="registers"):
        _warm("vit_small_patch14_dinov2", 224, str(tmp_path / "reg.pth"))
    p16 = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0).state_dict()
    sd16 = {**sd, "patch_embed.proj.weight": p16["patch_embed.proj.weight"]}
    torch.save(sd16, tmp_path / "p16.pth")
    with pytest.raises(ValueError, match="16x16 but the model's patch is 14x14"):
        _warm("vit_small_patch14_dinov2", 224, str(tmp_path / "p16.pth"))


def test_warm_start_errors(tmp_path):
    src = create_backbone(ARCH, img_size=28)
    sd = _dinov2_layout(src)
    del sd["blocks.0.norm1.weight"]
    sd["blocks.0.extra"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"missing keys \(1\): blocks.0.norm1.weight") as err:
        _warm(ARCH, 28, str(tmp_path / "bad.pth"))
    assert "unexpected keys (1): blocks.0.extra" in str(err.value)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        _warm(ARCH, 28, str(tmp_path / "junk.pth"))
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        _warm(ARCH, 28, str(tmp_path / "nope.pth"))
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
    again = _warm(ARCH, 56, str(path))[0].eval()
    assert torch.equal(again.pos_embed, b.pos_embed)
    # what the export records is read from the module (timm's pretrained_cfg, its patch embedding), no side
    # attributes: a /14 architecture built with patch 8 comes back with patch 8
    p8 = create_backbone(ARCH, img_size=56, patch_size=8)
    assert not [k for k in vars(p8) if k.startswith("reddino")]
    back = load_backbone(export_backbone(p8, tmp_path / "p8" / "backbone.safetensors"))
    assert backbone_info(back) == {"arch": ARCH, "family": "vit", "img_size": 56, "patch_size": 8, "embed_dim": 192}
