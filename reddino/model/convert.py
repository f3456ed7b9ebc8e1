"""Checkpoint layouts of the DINOv3-era families → timm state dicts (reddino's own mapping, written from the
layouts documented in ``dinov3-reference/README.md``; no DINOv3 code).

* official DINOv3 ViT (``cls_token``, ``storage_tokens``, ``rope_embed.periods``, ``blocks.i.attn.qkv.bias_mask``,
  ``ls1.gamma``) → timm ``Eva`` (``reg_token``, ``rope.periods``, ``q_bias`` / ``v_bias``, ``gamma_1``). The official
  attention multiplies the qkv bias by ``bias_mask`` (0 on the k third), so the k bias is dropped: timm's Eva has
  none. The stored RoPE periods are kept as stored (bf16-rounded in files from bf16-RoPE training runs).
* official DINOv3 ConvNeXt (``downsample_layers``, ``stages.s.b``, ``dwconv``, ``pwconv1/2``, ``norm``, ``norms.3``)
  → timm ``ConvNeXt`` (``stem``, ``stages.s.downsample``, ``stages.s.blocks.b``, ``conv_dw``, ``mlp.fc1/2``,
  ``head.norm``). ``norms.3`` is the final norm a second time: dropped once checked equal.
* timm layouts (timm files, reddino exports, training checkpoints under ``teacher.backbone.``) pass through.

:func:`check_layout` refuses a file of another family before any key is compared.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch
from torch import nn

from reddino.model import family

log = logging.getLogger(__name__)

# key (suffix) that marks where a backbone starts inside a checkpoint, per layout
_MARKERS = ("storage_tokens", "rope_embed.periods", "downsample_layers.0.0.weight", "stem.0.weight", "rope.periods",
            "reg_token", "pos_embed", "cls_token")
_ANCHORS = ("patch_embed.proj.weight", "downsample_layers.0.0.weight", "stem.0.weight")


def unwrap_state(obj: Any, found=lambda k, v: isinstance(v, torch.Tensor)) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint, descending into ``{"teacher"|"model"|"state_dict"|"module"|"student": ...}``
    wrappers until an entry satisfies ``found(key, value)``."""
    for _ in range(4):
        if not isinstance(obj, dict):
            break
        if any(found(k, v) for k, v in obj.items()):
            break
        for key in ("teacher", "model", "state_dict", "module", "student"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        else:
            break
    if not isinstance(obj, dict):
        raise ValueError("checkpoint is not a state dict")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def backbone_part(state: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the backbone's tensors with their prefix removed, all tensors). The teacher's backbone is preferred."""
    full = unwrap_state(state)
    prefixes = [k[: -len(a)] for k in full for a in _ANCHORS  # never a Gram run's (older) Gram teacher
                if k.endswith(a) and "ibot" not in k and not k.startswith("gram_teacher.")]
    if not prefixes:
        some = ", ".join(sorted(full)[:8])
        raise ValueError(f"no backbone found: none of {', '.join(_ANCHORS)} among the keys ({some} ...)")
    prefix = prefixes[0]
    for wanted in ("teacher", "backbone", ""):
        hits = [p for p in prefixes if wanted in p]
        if hits:
            prefix = min(hits, key=len)
            break
    return {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}, full


def layout(sd: dict[str, torch.Tensor]) -> tuple[str, str]:
    """(family, layout name) of a backbone state dict (prefix removed)."""
    keys = set(sd)
    if "downsample_layers.0.0.weight" in keys:
        return "convnext", "official DINOv3 ConvNeXt"
    if "stem.0.weight" in keys:
        return "convnext", "timm ConvNeXt"
    if "storage_tokens" in keys or "rope_embed.periods" in keys:
        return "eva", "official DINOv3 ViT"
    if any(k.endswith(("attn.q_bias", ".gamma_1")) for k in keys) or "rope.periods" in keys:
        return "eva", "timm Eva"
    if "pos_embed" in keys:
        return "vit", "DINOv2 / timm ViT"
    return "unknown", "unknown"


def check_layout(state: Any, model: nn.Module) -> None:
    """One error if the file holds another family's backbone than ``model`` is."""
    sd, _ = backbone_part(state)
    fam, name = layout(sd)
    own = family.family_of(model)
    if fam != own.name:
        arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__
        markers = [k for k in _MARKERS if k in sd]
        marks = ", ".join(markers + [k for k in sorted(sd) if k not in markers][: max(0, 6 - len(markers))])
        raise ValueError(
            f"this is a{'n' if name[0] in 'aeiou' else ''} {name} checkpoint (keys {marks} ...) but the model {arch} "
            f"is a {own.module} ({own.name} family): choose an arch of the file's family"
        )


def check_tokens(out: dict[str, torch.Tensor], model: nn.Module, what: str, hint: str = "") -> None:
    """The file's patch kernel and number of register / storage tokens are the model's (never resampled)."""
    w = out.get("patch_embed.proj.weight")
    own = tuple(model.patch_embed.proj.weight.shape[-2:])
    if w is not None and tuple(w.shape[-2:]) != own:
        raise ValueError(
            f"patch embedding is {w.shape[-2]}x{w.shape[-1]} but the model's patch is {own[0]}x{own[1]}: these "
            f"weights need model.patch_size={w.shape[-1]} (or an arch with that patch); reddino does not resample "
            "patch kernels silently"
        )
    n_file = int(out["reg_token"].shape[1]) if "reg_token" in out else 0
    n_model = int(model.reg_token.shape[1]) if getattr(model, "reg_token", None) is not None else 0
    if n_file != n_model:
        raise ValueError(f"the checkpoint has {n_file} {what} but the model has {n_model}"
                         + (f": {hint}" if hint else ""))


def _dinov3_vit(sd: dict[str, torch.Tensor], model: nn.Module) -> tuple[dict[str, torch.Tensor], Any]:
    out: dict[str, torch.Tensor] = {}
    mask_token = None
    for k, v in sd.items():
        if k == "mask_token":
            mask_token = v
            continue
        if k == "storage_tokens":
            out["reg_token"] = v
            continue
        if k == "rope_embed.periods":
            out["rope.periods"] = v.float()  # the stored values (maybe bf16-rounded), as DINOv3's fp32 RoPE uses them
            continue
        m = re.match(r"^(blocks\.\d+\.attn)\.qkv\.(bias|bias_mask)$", k)
        if m:
            if m.group(2) == "bias_mask":
                d = v.shape[0] // 3
                want = torch.ones_like(v)
                want[d : 2 * d] = 0
                if not torch.equal(v, want):
                    raise ValueError(f"{k} is not DINOv3's [1 | 0 | 1] k-bias mask; timm's Eva cannot express it")
                continue
            q, _k_unused, vb = v.chunk(3, dim=0)  # bias_mask zeroes the k third at run time: dropped
            out[f"{m.group(1)}.q_bias"] = q
            out[f"{m.group(1)}.v_bias"] = vb
            continue
        k = re.sub(r"\.ls1\.gamma$", ".gamma_1", k)
        k = re.sub(r"\.ls2\.gamma$", ".gamma_2", k)
        out[k] = v
    check_tokens(out, model, "storage tokens")
    return out, mask_token


def _dinov3_convnext(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    own = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        m = re.match(r"^norms\.(\d+)\.(weight|bias)$", k)
        if m and f"norm.{m.group(2)}" in sd and torch.equal(v, sd[f"norm.{m.group(2)}"]):
            continue  # the final norm listed a second time
        k = re.sub(r"^downsample_layers\.0\.", "stem.", k)
        k = re.sub(r"^downsample_layers\.(\d+)\.", r"stages.\1.downsample.", k)
        k = re.sub(r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2.", k)
        k = k.replace(".dwconv.", ".conv_dw.").replace(".pwconv1.", ".mlp.fc1.").replace(".pwconv2.", ".mlp.fc2.")
        k = re.sub(r"^norm\.", "head.norm.", k)
        if k in own and v.ndim == 2 and own[k].ndim == 4 and own[k].numel() == v.numel():
            v = v.reshape(own[k].shape)  # timm's conv_mlp ConvNeXts hold the pointwise Linear as a 1x1 conv
        out[k] = v
    return out


def convert_state_dict(state: Any, model: nn.Module) -> tuple[dict[str, torch.Tensor], Any]:
    """A checkpoint of an ``eva`` or ``convnext`` family layout → (timm state dict for ``model``, mask token or None).
    The ``vit`` family has its own (:func:`reddino.model.backbone.convert_state_dict`)."""
    sd, full = backbone_part(state)
    fam, name = layout(sd)
    mask_token = None
    if name == "official DINOv3 ViT":
        out, mask_token = _dinov3_vit(sd, model)
    elif name == "official DINOv3 ConvNeXt":
        out = _dinov3_convnext(sd, model)
    else:
        out = dict(sd)
        mask_token = out.pop("mask_token", None)
        if fam == "eva":
            check_tokens(out, model, "register tokens")
    if mask_token is None:  # a reddino training checkpoint keeps it beside the backbones
        mask_token = full.get("mask_token")
    own = model.state_dict()
    if "rope.periods" in own and "rope.periods" not in out:  # a timm file: timm's computed periods
        log.info("no RoPE periods in the checkpoint: using the model's computed ones")
        out["rope.periods"] = own["rope.periods"].clone()
    for k in [k for k in out if k.startswith(("head.fc.", "head.pre_logits.", "fc_norm.", "head.weight", "head.bias"))
              and k not in own]:
        log.info("ignoring classifier weight %s", k)
        out.pop(k)
    return out, mask_token
