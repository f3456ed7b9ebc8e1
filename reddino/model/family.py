"""The backbone contract: one small interface, three families of timm backbones.

Every stage (train, the iBOT-masked forward, export, ``load_backbone``, the registry pyfunc, embed, evaluate,
serve) talks to a backbone only through the functions here, never through a timm class:

* :func:`family_of` → the :class:`Family` of a module (``vit``, ``eva``, ``convnext``), or an error naming
  the class; :data:`SUPPORT` says what each family can do;
* :func:`tokens` → final-norm ``{"cls": [B, D], "patch": [B, N, D], "storage": [B, R, D]}`` (iBOT masks where the
  family supports them); ``patch`` is what a patch-level loss (iBOT, Gram anchoring) reads;
* :func:`features` → the pooled feature of frozen evaluation (``cls``, ``mean`` or ``cls+mean``);
* :func:`token_stride`, :func:`embed_dim`, :func:`layer_ids` (layer-wise lr decay), :func:`rebuild_kwargs` (what
  an export records to build the same module again).

Families:

* ``vit``: timm ``VisionTransformer`` (DINOv2 layouts, the tiny CPU ViTs): CLS token, optional registers,
  learned absolute position embeddings, iBOT masking.
* ``eva``: timm ``Eva`` built as a DINOv3 ViT (``vit_*_patch16_dinov3*``): RoPE (with DINOv3's training-time
  coordinate rescale, redrawn in every block as the official model does), storage (register) tokens, iBOT masking.
  The RoPE periods are a persistent buffer here (timm recomputes them): a checkpoint's stored values, bf16-rounded in
  DINOv3's released files, are what the model then uses, and they travel with exports and training checkpoints.
* ``convnext``: timm ``ConvNeXt``: no tokens to mask. The global feature (``cls``) is the final norm of the
  pooled last-stage map, ``patch`` the final norm of that map flattened row-major (DINOv3's ConvNeXt outputs);
  iBOT is refused. Its token stride is the network's total downsampling (32 for 4 stages).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

POOLINGS = ("cls", "cls+mean", "mean")


@dataclass(frozen=True)
class Family:
    name: str
    module: str  # the timm class it wraps
    mask: bool  # iBOT masked forward (mask token replaces patch embeddings)
    storage_tokens: bool  # register / storage tokens
    rope: bool
    warm_start: str  # checkpoint layouts load_pretrained reads for it


def _classes() -> dict[str, type]:
    from timm.models.convnext import ConvNeXt
    from timm.models.eva import Eva
    from timm.models.vision_transformer import VisionTransformer

    return {"vit": VisionTransformer, "eva": Eva, "convnext": ConvNeXt}


FAMILIES: dict[str, Family] = {
    "vit": Family("vit", "timm VisionTransformer", mask=True, storage_tokens=True, rope=False,
                  warm_start="timm ViT, original DINOv2 (with/without registers), reddino exports, training checkpoints"),
    "eva": Family("eva", "timm Eva (DINOv3 ViT)", mask=True, storage_tokens=True, rope=True,
                  warm_start="official DINOv3 ViT, timm Eva, reddino exports, training checkpoints"),
    "convnext": Family("convnext", "timm ConvNeXt", mask=False, storage_tokens=False, rope=False,
                       warm_start="official DINOv3 ConvNeXt, timm ConvNeXt, reddino exports, training checkpoints"),
}

# One place that states what each family supports (the README's table is this one).
SUPPORT = {
    name: {"ibot": f.mask, "masked_forward": f.mask, "koleo": True, "dino": True, "patch_tokens": True,
           "storage_tokens": f.storage_tokens, "rope": f.rope, "warm_start": f.warm_start}
    for name, f in FAMILIES.items()
}


def family_of(model: nn.Module) -> Family:
    """The family of a backbone module (DDP / wrappers unwrapped); a clear error for anything else."""
    model = getattr(model, "module", model)
    for name, cls in _classes().items():
        if isinstance(model, cls):
            return FAMILIES[name]
    raise ValueError(
        f"{type(model).__name__} is not a supported backbone; reddino's families are "
        + ", ".join(f"{n} ({f.module})" for n, f in FAMILIES.items())
    )


def is_backbone(model: Any) -> bool:
    try:
        family_of(model)
    except ValueError:
        return False
    return True


def require_ibot(model: nn.Module) -> None:
    """Refuse iBOT (and any masked forward) on a family without patch tokens to mask."""
    fam = family_of(model)
    if not fam.mask:
        raise ValueError(
            f"iBOT needs masked patch tokens, which a {fam.module} backbone does not have: set loss.ibot_weight=0 "
            f"for the {fam.name} family (DINO + KoLeo on the pooled feature train it)"
        )


# --------------------------------------------------------------------------------------------------------------
# Shape facts
# --------------------------------------------------------------------------------------------------------------


def embed_dim(model: nn.Module) -> int:
    model = getattr(model, "module", model)
    return int(getattr(model, "embed_dim", 0) or getattr(model, "num_features", 0))


def token_stride(model: nn.Module) -> int:
    """Input pixels per patch token along one side: the ViT patch, or ConvNeXt's total downsampling."""
    model = getattr(model, "module", model)
    if family_of(model).name == "convnext":
        return int(model.feature_info[-1]["reduction"])
    size = model.patch_embed.patch_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def patch_size(model: nn.Module) -> int | None:
    """The patch size an export records (None for a ConvNeXt: its stem is part of the architecture)."""
    model = getattr(model, "module", model)
    if family_of(model).name == "convnext":
        return None
    return token_stride(model)


def num_layers(model: nn.Module) -> int:
    """Blocks counted by layer-wise lr decay (ViT/Eva: blocks; ConvNeXt: timm's fine-grained stage groups)."""
    return max(layer_ids(model).values(), default=0)


def layer_ids(model: nn.Module) -> dict[str, int]:
    """Parameter name → layer id for layer-wise lr decay: 0 embeddings (patch embedding / stem, tokens),
    1..L the blocks, L + 1 everything after them (final norm). timm's own grouping of each family."""
    from timm.models import group_parameters

    model = getattr(model, "module", model)
    fam = family_of(model)
    ids = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    names = [n for n, p in model.named_parameters()]
    if fam.name == "convnext":
        out = {n: int(ids.get(n, 0)) for n in names}
        top = max(out.values(), default=0) + 1
        return {n: (top if n.startswith("head.") else i) for n, i in out.items()}
    top = len(model.blocks) + 1
    # timm folds the final norm into the last block; the official DINOv2 puts it with the heads
    return {n: (ids.get(n, top) if n.startswith("blocks.") or ids.get(n) == 0 else top) for n in names}


def stem_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Names of the patch embedding (``optim.patch_embed_lr_mult`` applies to them)."""
    return ("stem.",) if family_of(model).name == "convnext" else ("patch_embed",)


def rebuild_kwargs(model: nn.Module) -> dict[str, Any]:
    """timm kwargs that rebuild this module (an export records them beside the arch name)."""
    model = getattr(model, "module", model)
    fam = family_of(model)
    if fam.name == "convnext":
        kw: dict[str, Any] = {}
    else:
        kw = {"patch_size": token_stride(model)}
    # timm records the constructor kwargs it was called with; the ones an export re-supplies itself are dropped
    args = {k: v for k, v in (getattr(model, "_model_args", None) or {}).items() if k not in _NOT_REBUILT}
    return {**args, **kw}


_NOT_REBUILT = {"num_classes", "img_size", "dynamic_img_size", "drop_path_rate", "pretrained_cfg",
                "pretrained_cfg_overlay", "cache_dir", "pretrained_strict"}


# --------------------------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------------------------


def _apply_mask(x: torch.Tensor, masks: torch.Tensor | None, mask_token: torch.Tensor | None) -> torch.Tensor:
    """Replace masked patch embeddings ([B, H, W, D] or [B, N, D]) by the mask token (iBOT / DINOv3: no blending)."""
    if masks is None:
        return x
    if mask_token is None:
        raise ValueError("masks given but no mask_token")
    B, D = x.shape[0], x.shape[-1]
    m = masks.reshape(B, *x.shape[1:-1], 1)
    if m[..., 0].shape != x.shape[:-1]:
        raise ValueError(f"masks {tuple(masks.shape)} do not match the patch grid {tuple(x.shape[1:-1])}")
    return torch.where(m, mask_token.to(x.dtype).reshape(*([1] * (x.dim() - 1)), D), x)


def _vit_tokens(model, x, masks, mask_token):
    x = _apply_mask(model.patch_embed(x), masks, mask_token)  # [B, H, W, D] with dynamic_img_size
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    x = model.norm_pre(x)
    if model.grad_checkpointing and torch.is_grad_enabled():
        from timm.models._manipulate import checkpoint_seq

        x = checkpoint_seq(model.blocks, x)
    else:
        x = model.blocks(x)
    x = model.norm(x)
    n = model.num_prefix_tokens
    return {"cls": x[:, 0], "patch": x[:, n:], "storage": x[:, 1:n] if model.cls_token is not None else x[:, :n]}


def _eva_tokens(model, x, masks, mask_token):
    x = _apply_mask(model.patch_embed(x), masks, mask_token)
    if x.dim() != 4:
        raise ValueError("an Eva backbone needs dynamic_img_size=True (create it with create_backbone)")
    H, W = x.shape[1:3]
    x, rope = model._pos_embed(x)
    x = model.norm_pre(x)
    # DINOv3 draws the training-time RoPE coordinate augmentation anew in every block
    redraw = model.rope is not None and model.training and getattr(model.rope, "aug_active", False)
    for blk in model.blocks:
        r = model.rope.get_embed(shape=(H, W)) if redraw else rope
        if model.grad_checkpointing and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            x = checkpoint(blk, x, rope=r, use_reentrant=False)
        else:
            x = blk(x, rope=r)
    x = model.norm(x)
    n = model.num_prefix_tokens
    start = 1 if model.cls_token is not None else 0
    return {"cls": x[:, 0], "patch": x[:, n:], "storage": x[:, start:n]}


def _convnext_tokens(model, x, masks, mask_token):
    if masks is not None and bool(masks.any()):
        require_ibot(model)
    stride = token_stride(model)
    if min(x.shape[-2:]) < stride:
        raise ValueError(
            f"a {x.shape[-2]}x{x.shape[-1]} input is smaller than this ConvNeXt's total stride {stride}: "
            f"use crops of at least {stride} px (crops.local_crops_size / global_crops_size)"
        )
    x = model.norm_pre(model.stages(model.stem(x)))  # [B, C, H, W]
    norm = model.head.norm  # LayerNorm2d over channels (Identity with head_norm_first: then norm_pre did it)
    pooled = norm(x.mean((2, 3), keepdim=True)).flatten(1)  # DINOv3: pool before the norm, then norm
    patch = norm(x).flatten(2).transpose(1, 2)
    return {"cls": pooled, "patch": patch, "storage": patch[:, :0]}


_TOKENS: dict[str, Callable] = {"vit": _vit_tokens, "eva": _eva_tokens, "convnext": _convnext_tokens}


def tokens(
    model: nn.Module,
    x: torch.Tensor,
    masks: torch.Tensor | None = None,
    mask_token: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Final-norm tokens ``{"cls": [B, D], "patch": [B, N, D], "storage": [B, R, D]}`` of any family.

    Where ``masks`` (bool [B, N], N = the patch grid) is True the patch embedding is replaced by ``mask_token``
    ([D] or [1, D], owned by the caller) before position information is added (iBOT). ConvNeXt refuses masks
    that mask anything (an all-False mask is no mask).
    """
    inner = getattr(model, "module", model)
    return _TOKENS[family_of(inner).name](inner, x, masks, mask_token)


def features(model: nn.Module, x: torch.Tensor, pooling: str = "cls") -> torch.Tensor:
    """The frozen feature of evaluation / embed / serve: CLS (ConvNeXt: pooled map), mean patch, or both."""
    t = tokens(model, x)
    if pooling == "cls":
        return t["cls"]
    if pooling == "mean":
        return t["patch"].mean(1)
    if pooling == "cls+mean":
        return torch.cat([t["cls"], t["patch"].mean(1)], dim=1)
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


# --------------------------------------------------------------------------------------------------------------
# Persistent RoPE periods (Eva)
# --------------------------------------------------------------------------------------------------------------


def keep_rope_periods(model: nn.Module) -> None:
    """Make an Eva's RoPE ``periods`` a persistent float32 buffer, so a checkpoint's stored values (bf16-rounded in
    DINOv3's files) are the ones used, and survive export / resume (timm recomputes them on load)."""
    rope = getattr(model, "rope", None)
    if rope is not None and isinstance(getattr(rope, "periods", None), torch.Tensor):
        rope.register_buffer("periods", rope.periods.detach().float().clone(), persistent=True)
        if getattr(rope, "pos_embed_cached", None) is not None and getattr(rope, "feat_shape", None) is not None:
            rope._cache_embed(list(rope.feat_shape))
