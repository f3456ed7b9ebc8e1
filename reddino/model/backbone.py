"""timm backbones: creation, warm start from local checkpoints, iBOT-masked token forward, export.

Three families share one contract (:mod:`reddino.model.family`): timm ``VisionTransformer`` (DINOv2 layouts),
timm ``Eva`` built as a DINOv3 ViT, and timm ``ConvNeXt``. Weights are only ever read from local files: timm is
always called with ``pretrained=False``. The ViT-specific conversion lives here; the DINOv3 layouts (official ViT
and ConvNeXt files) in :mod:`reddino.model.convert`.

ViT checkpoint layouts understood by :func:`load_pretrained`:

* a timm state dict (``pos_embed``, ``patch_embed.proj.weight``, ``blocks.N.*``, ``norm.*``);
* the original DINOv2 layout (facebookresearch/dinov2 ``dinov2_vits14_pretrain.pth``): the same names as
  timm plus ``mask_token``; SwiGLU ``mlp.w12``/``mlp.w3`` and ``register_tokens`` are renamed;
* training checkpoints that nest the backbone under a prefix (``teacher.backbone.``, ``student.backbone.``,
  ``model.``, ``module.`` ...; the teacher is preferred) and/or chunk the blocks (``blocks.0.3.`` → ``blocks.3.``);
* a reddino export written by :func:`export_backbone`.

Position embeddings are resampled (bicubic) once, at load, to the model's patch grid, e.g. DINOv2's 37×37
grid at 518 px → 16×16 at 224 px, the way the checkpoint's own code does it, so a warm start gives the
official model's tokens at the model's image size: original DINOv2 files without registers as DINOv2's
``interpolate_pos_encoding`` (scale factor (g + 0.1)/37, no antialias), everything else (registers, timm
files) as timm (output size, antialias).

A file that cannot be what the model needs is an error, never a silent conversion: a patch kernel of
another size, registers on one side only, missing or extra weights. A file without ``mask_token`` (not an
original DINOv2 checkpoint) loads with a warning: iBOT's mask token then starts at zero.
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from reddino.model import convert, family

log = logging.getLogger(__name__)

EXPORT_FORMAT = "reddino-backbone"
EXPORT_VERSION = 1


# --------------------------------------------------------------------------------------------------------------
# Tiny ViTs for CPU demos, tests and the tiny_cpu recipe
# --------------------------------------------------------------------------------------------------------------


def _tiny_vit(name: str, pretrained: bool, defaults: dict[str, Any], kwargs: dict[str, Any]) -> VisionTransformer:
    if pretrained:
        raise ValueError(f"{name} has no published weights; pass a local file instead")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    args = dict(embed_dim=192, depth=6, num_heads=3, mlp_ratio=4.0, init_values=0.1, dynamic_img_size=True)
    args.update(defaults)
    args.update(kwargs)
    model = VisionTransformer(**args)
    model.pretrained_cfg = {"architecture": name, "input_size": (3, args["img_size"], args["img_size"])}
    return model


@register_model
def vit_tiny_patch14_reddino(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-Ti/14 (patch 14, dim 192, depth 6, 3 heads, 112 px): a CPU-sized RedDino.

    Layer scale starts at 0.1, not DINOv2's 1e-5: trained from scratch for minutes, a 1e-5 start leaves the
    CLS token identical for every image (measured std 1e-5 across images), so the DINO loss sits at ln K.
    """
    return _tiny_vit("vit_tiny_patch14_reddino", pretrained, {"img_size": 112, "patch_size": 14}, kwargs)


@register_model
def vit_tiny_patch8_reddino(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-Ti/8 at 56 px (7×7 tokens). Single cells at 56 px keep the 8-px detail the
    morphology classes differ by (pallor, spicules, fragments) at a token count a CPU trains quickly."""
    return _tiny_vit("vit_tiny_patch8_reddino", pretrained, {"img_size": 56, "patch_size": 8}, kwargs)


@register_model
def vit_mini_patch8_reddino(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-Mini/8 at 56 px (dim 128, depth 4, 2 heads; 7×7 tokens): the tiny_cpu model. A third of ViT-Ti's
    compute per image, so 2 CPU cores see ~3x more images in the same minutes, which is what a from-scratch
    run is short of (measured on Chula cells: kNN-20 after 500 steps 0.438 vs 0.36 at random init)."""
    return _tiny_vit("vit_mini_patch8_reddino", pretrained,
                     {"img_size": 56, "patch_size": 8, "embed_dim": 128, "depth": 4, "num_heads": 2}, kwargs)


@register_model
def vit_micro_patch8_reddino(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-Micro/8 at 56 px (dim 96, depth 3, 2 heads; 7×7 tokens): the distill_cpu student, ~0.4x ViT-Mini/8's
    compute per image (half the depth-width product or less is what distillation into "half the cost" asks)."""
    return _tiny_vit("vit_micro_patch8_reddino", pretrained,
                     {"img_size": 56, "patch_size": 8, "embed_dim": 96, "depth": 3, "num_heads": 2}, kwargs)


# --------------------------------------------------------------------------------------------------------------
# Creation
# --------------------------------------------------------------------------------------------------------------


def create_backbone(
    arch: str,
    img_size: int | None,
    patch_size: int | None = None,
    drop_path_rate: float = 0.0,
    timm_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """A headless timm backbone of one of reddino's families (:mod:`reddino.model.family`): a ViT or a DINOv3
    ViT (``Eva``) with ``dynamic_img_size=True``, or a ConvNeXt. Warm start: :func:`load_pretrained`.

    ``timm_kwargs`` go to the timm constructor (e.g. ``depth``, ``dims``, ``ls_init_value``) and are recorded by an
    export. What an export records about the module (:func:`backbone_info`) is read back from the module itself: the
    timm architecture name from ``pretrained_cfg``, the input size, the patch size from its patch embedding.
    """
    from timm.models.convnext import ConvNeXt

    kwargs: dict[str, Any] = dict(timm_kwargs or {})
    if patch_size is not None:
        kwargs["patch_size"] = int(patch_size)
    if drop_path_rate:
        kwargs["drop_path_rate"] = float(drop_path_rate)
    try:
        entry = timm.models.model_entrypoint(arch)
    except RuntimeError as exc:  # timm: "Unknown model (...)"
        raise ValueError(f"cannot create backbone {arch!r}: {exc}") from None
    is_conv = entry.__module__.endswith(".convnext")
    try:
        if is_conv:  # a ConvNeXt takes any input size; the size the model is meant for is recorded below
            model = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
        else:
            if img_size is not None:  # None: the arch's own
                kwargs["img_size"] = int(img_size)
            model = timm.create_model(arch, pretrained=False, num_classes=0, dynamic_img_size=True, **kwargs)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"cannot create backbone {arch!r} with {kwargs}: {exc}") from None
    if not family.is_backbone(model):
        raise ValueError(
            f"{arch!r} is a {type(model).__name__}; reddino's backbone families are "
            + ", ".join(f"{n} ({f.module})" for n, f in family.FAMILIES.items())
        )
    if isinstance(model, ConvNeXt) and img_size is not None:
        model.pretrained_cfg = {**(model.pretrained_cfg or {}), "architecture": arch,
                                "input_size": (3, int(img_size), int(img_size))}
    family.keep_rope_periods(model)
    return model


def model_img_size(model: nn.Module, default: int = 224) -> int:
    """The square input size a timm ViT was built for (``default`` for a model that does not say)."""
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size:
        return int(size[0] if isinstance(size, (tuple, list)) else size)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if "input_size" in cfg:
        return int(cfg["input_size"][-1])
    return default


def backbone_info(model: nn.Module) -> dict[str, Any]:
    """``{"arch", "family", "img_size", "patch_size", "embed_dim"}`` of a backbone (``patch_size`` None for a
    ConvNeXt; other modules give what they have)."""
    model = getattr(model, "module", model)
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    fam = family.family_of(model).name if family.is_backbone(model) else None
    if fam is not None:
        patch = family.patch_size(model)
    else:
        patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    return {
        "arch": arch,
        "family": fam,
        "img_size": model_img_size(model),
        "patch_size": None if patch is None else int(patch[0] if isinstance(patch, (tuple, list)) else patch),
        "embed_dim": int(getattr(model, "embed_dim", getattr(model, "num_features", 0)) or 0),
    }


# --------------------------------------------------------------------------------------------------------------
# Warm start from a local checkpoint
# --------------------------------------------------------------------------------------------------------------


def read_state_dict(path: str | Path) -> dict[str, Any]:
    """Read a ``.safetensors`` or torch file on CPU; a clear error names the path if it can't be read."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"pretrained weights not found: {p}")
    try:
        if p.suffix == ".safetensors" or _looks_like_safetensors(p):
            from safetensors.torch import load_file

            return load_file(str(p), device="cpu")
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure: say which file and why
        raise ValueError(f"cannot read weights from {p}: {type(exc).__name__}: {exc}") from None


def _looks_like_safetensors(p: Path) -> bool:
    # safetensors: 8-byte little-endian header length, then a JSON header starting with '{'
    with p.open("rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < (1 << 32)


def _unwrap(obj: Any) -> dict[str, torch.Tensor]:
    """Descend into ``{"model": ...}`` / ``{"state_dict": ...}`` / ``{"teacher": ...}`` wrappers to a ViT's tensors."""
    return convert.unwrap_state(obj, lambda k, v: isinstance(v, torch.Tensor) and k.endswith("pos_embed"))


def _backbone_prefix(keys: list[str]) -> str:
    """The prefix in front of ``pos_embed``; the teacher's if several backbones are present."""
    # never a Gram run's frozen Gram teacher (an older copy of the teacher)
    prefixes = [k[: -len("pos_embed")] for k in keys
                if k.endswith("pos_embed") and "ibot" not in k and not k.startswith("gram_teacher.")]
    if not prefixes:
        raise ValueError("no 'pos_embed' key: not a ViT checkpoint")
    for wanted in ("teacher", "backbone", ""):
        for p in prefixes:
            if wanted in p:
                return p
    return prefixes[0]


def convert_state_dict(state: dict[str, Any], model: VisionTransformer) -> tuple[dict[str, torch.Tensor], Any]:
    """Any supported layout → (timm state dict matching ``model``'s shapes, DINOv2 mask token or None)."""
    full = _unwrap(state)
    prefix = _backbone_prefix(list(full))
    sd = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        k = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k)  # FSDP chunked blocks
        k = re.sub(r"^(blocks\.\d+\.mlp)\.w12\.", r"\1.fc1.", k)  # DINOv2 SwiGLU naming
        k = re.sub(r"^(blocks\.\d+\.mlp)\.w3\.", r"\1.fc2.", k)
        out[k] = v
    mask_token = out.pop("mask_token", None)
    if mask_token is None:  # a reddino training checkpoint keeps it beside the backbones
        mask_token = full.get("mask_token")
    if "register_tokens" in out:  # DINOv2 +registers → timm no_embed_class layout
        out["reg_token"] = out.pop("register_tokens")
        out["cls_token"] = out["cls_token"] + out["pos_embed"][:, :1]
        out["pos_embed"] = out["pos_embed"][:, 1:]
    if isinstance(model.head, nn.Identity):  # a classifier's head is not part of a backbone
        for k in [k for k in out if k.startswith(("head.", "fc_norm.")) and k not in model.state_dict()]:
            log.info("ignoring classifier weight %s", k)
            out.pop(k)

    convert.check_tokens(out, model, "register tokens", hint="use a *_reg4_* arch for weights with registers "
                         "and a plain arch for weights without registers")
    has_reg = "reg_token" in out
    pe = out.get("pos_embed")
    if pe is not None and model.pos_embed is not None:
        n_prefix = 0 if model.no_embed_class else model.num_prefix_tokens
        n_old = pe.shape[1] - n_prefix
        side = int(round(n_old**0.5))
        if side * side != n_old:
            raise ValueError(f"pos_embed with {n_old} patch positions is not a square grid")
        new_grid = list(model.patch_embed.grid_size)
        if [side, side] != new_grid:
            if mask_token is not None and not has_reg:
                out["pos_embed"] = resample_pos_embed_dinov2(pe, new_grid, n_prefix)
            else:
                out["pos_embed"] = resample_abs_pos_embed(
                    pe.float(), new_size=new_grid, old_size=[side, side], num_prefix_tokens=n_prefix
                ).to(pe.dtype)
    return out, mask_token


def resample_pos_embed_dinov2(pos_embed: torch.Tensor, new_grid: list[int], n_prefix: int = 1) -> torch.Tensor:
    """DINOv2's ``interpolate_pos_encoding`` for its models without registers (``interpolate_offset=0.1``,
    ``interpolate_antialias=False``): bicubic by *scale factor* (g + 0.1)/M, which samples at other
    positions than resizing to g×g (timm's way; CLS tokens differ by ~1 %, patch tokens by ~4 % at 224 px)."""
    prefix, grid = pos_embed[:, :n_prefix], pos_embed[:, n_prefix:].float()
    M = int(round(grid.shape[1] ** 0.5))
    dim = grid.shape[-1]
    scale = (float(new_grid[0] + 0.1) / M, float(new_grid[1] + 0.1) / M)
    patch = F.interpolate(grid.reshape(1, M, M, dim).permute(0, 3, 1, 2), scale_factor=scale, mode="bicubic",
                          antialias=False)
    if list(patch.shape[-2:]) != list(new_grid):
        raise ValueError(f"DINOv2 pos_embed interpolation gave {tuple(patch.shape[-2:])}, not {tuple(new_grid)}")
    patch = patch.permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat([prefix.float(), patch], dim=1).to(pos_embed.dtype)


def load_pretrained(model: nn.Module, path: str | Path) -> torch.Tensor | None:
    """Load a local checkpoint into ``model`` of any family (strict: missing/unexpected keys are listed in the
    error; a file of another family, patch size or number of storage tokens is refused, naming the file).

    Returns the DINOv2 / DINOv3 ``mask_token`` ([1, D]) if the file had one, else None.
    """
    state = read_state_dict(path)
    try:
        convert.check_layout(state, model)
        if family.family_of(model).name == "vit":
            sd, mask_token = convert_state_dict(state, model)
        else:
            sd, mask_token = convert.convert_state_dict(state, model)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = sorted(k for k in set(own) & set(sd) if own[k].shape != sd[k].shape)
    if missing or unexpected or wrong:
        lines = [f"{path}: checkpoint does not match {backbone_info(model)['arch'] or type(model).__name__}"]
        for label, keys in (("missing", missing), ("unexpected", unexpected)):
            if keys:
                more = " ..." if len(keys) > 20 else ""
                lines.append(f"  {label} keys ({len(keys)}): {', '.join(keys[:20])}{more}")
        for k in wrong[:20]:
            lines.append(f"  shape mismatch {k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}")
        raise ValueError("\n".join(lines))
    model.load_state_dict(sd, strict=True)
    if not family.family_of(model).mask:
        return None
    if mask_token is None:
        warnings.warn(
            f"{path}: no 'mask_token' (not an original DINOv2 checkpoint): backbone weights loaded, iBOT's mask "
            "token starts at zero", stacklevel=2,
        )
        return None
    return mask_token.reshape(1, -1).float()


# --------------------------------------------------------------------------------------------------------------
# Forward with iBOT masking
# --------------------------------------------------------------------------------------------------------------


def backbone_tokens(
    backbone: nn.Module,
    x: torch.Tensor,
    masks: torch.Tensor | None = None,
    mask_token: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Final-norm tokens ``{"cls": [B, D], "patch": [B, N, D], "storage": [B, R, D]}`` of any backbone family
    (:func:`reddino.model.family.tokens`).

    Where ``masks`` (bool [B, N], N = patch grid) is True the patch embedding is replaced by ``mask_token``
    ([D] or [1, D], a learnable parameter owned by the caller) before position embeddings are added (iBOT).
    """
    return family.tokens(backbone, x, masks, mask_token)


# --------------------------------------------------------------------------------------------------------------
# Export / load
# --------------------------------------------------------------------------------------------------------------


def export_backbone(backbone: nn.Module, path: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Write the backbone alone as a plain timm state dict (safetensors, else torch) + ``<path>.json``.

    Both files are written atomically (temp name, then rename). Returns the weights path.
    """
    backbone = getattr(backbone, "module", backbone)
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    info = backbone_info(backbone)
    if info["arch"] is None:
        raise ValueError("backbone has no arch name; create it with create_backbone()")
    header = {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        **info,
        "timm_kwargs": family.rebuild_kwargs(backbone),  # the module's own (it may differ from the arch's)
        **(meta or {}),
    }
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in backbone.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        from safetensors.torch import save_file

        save_file(state, str(tmp), metadata={"reddino": json.dumps(header, default=str)})
        header["file_format"] = "safetensors"
    except ImportError:  # pragma: no cover - safetensors ships with timm
        torch.save(state, tmp)
        header["file_format"] = "torch"
    tmp.replace(path)
    side = path.with_name(path.name + ".json")
    tmp_side = side.with_name(f".{side.name}.tmp{os.getpid()}")
    tmp_side.write_text(json.dumps(header, indent=2, sort_keys=True, default=str))
    tmp_side.replace(side)
    return path


def read_export_meta(path: str | Path) -> dict[str, Any]:
    """The metadata of an export: the ``.json`` sidecar, else the safetensors header."""
    path = Path(path).expanduser()
    side = path.with_name(path.name + ".json")
    if side.is_file():
        return json.loads(side.read_text())
    if path.is_file() and _looks_like_safetensors(path):
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
        if "reddino" in md:
            return json.loads(md["reddino"])
    raise ValueError(f"{path}: no reddino export metadata (expected {side.name} or a safetensors header)")


def load_backbone(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild an exported backbone (same arch, img size, kwargs, family) with its exact weights, in eval mode."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"backbone export not found: {path}")
    meta = read_export_meta(path)
    kwargs = dict(meta.get("timm_kwargs") or {})
    patch = kwargs.pop("patch_size", None)
    model = create_backbone(meta["arch"], int(meta["img_size"]), patch, timm_kwargs=kwargs)
    sd = _unwrap(read_state_dict(path))
    own = model.state_dict()
    if "rope.periods" in own and "rope.periods" not in sd:  # an export written before the periods were kept
        sd["rope.periods"] = own["rope.periods"]
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{path}: weights do not match {meta['arch']}: {exc}") from None
    return model.to(device).eval()
