"""Gram anchoring (DINOv3: Siméoni et al., "DINOv3", 2025, §4): keep the student's patch-to-patch similarity
structure close to that of an earlier, frozen teacher, so patch features stay sharp over long training.

For patch features S (student) and T (Gram teacher), each L2-normalised, the loss is the mean over all entries
(diagonal included) of (S·Sᵀ − T·Tᵀ)², per image ([B, N, N], ``img_level``) or over all tokens of the local
batch at once ([BN, BN]). Only the student side carries gradients. The semantics, options and numbers are those of
the official code (checked to 1e-5 against its outputs in ``tests/model/test_gram.py``):

* ``remove_neg``: negative entries of both Gram matrices are set to 0, each independently;
* ``remove_only_teacher_neg``: only the teacher's negative entries are set to 0 (the official code also names a
  student-side condition, but evaluates it after clipping the teacher, so it never holds; we do what it does);
* the two together are refused, as the official constructor refuses them.

Where it enters training (:class:`GramAnchoringLoss`): the student's final-norm patch tokens of the global crops
(masked patches are mask tokens, the same forward iBOT uses) against the Gram teacher's patch tokens of the same
crops, possibly seen at a higher resolution: the teacher's token grid is then resized to the student's (bicubic,
no antialias, as official) before the loss normalises them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from reddino.config import LossConfig


class GramLoss(nn.Module):
    """MSE between the student's and the teacher's Gram matrices of patch features (see the module docstring).

    ``forward(student, teacher)``: [B, N, D] (or [M, D]) each; returns a float32 scalar.
    """

    def __init__(
        self,
        apply_norm: bool = True,
        img_level: bool = True,
        remove_neg: bool = False,
        remove_only_teacher_neg: bool = False,
    ) -> None:
        super().__init__()
        if remove_neg and remove_only_teacher_neg:
            raise ValueError("Gram loss: remove_neg and remove_only_teacher_neg exclude each other; set at most one")
        self.apply_norm = bool(apply_norm)
        self.img_level = bool(img_level)
        self.remove_neg = bool(remove_neg)
        self.remove_only_teacher_neg = bool(remove_only_teacher_neg)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        if student.shape != teacher.shape:
            raise ValueError(f"Gram loss: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ")
        s = student.float()
        t = teacher.detach().float()
        if self.apply_norm:
            s = F.normalize(s, dim=-1, eps=1e-12)
            t = F.normalize(t, dim=-1, eps=1e-12)
        if not self.img_level and s.dim() == 3:  # one Gram matrix over every token of the local batch
            s, t = s.flatten(0, 1), t.flatten(0, 1)
        gram_s = s @ s.transpose(-1, -2)
        gram_t = t @ t.transpose(-1, -2)
        if self.remove_neg:
            gram_s = gram_s.clamp_min(0.0)
            gram_t = gram_t.clamp_min(0.0)
        elif self.remove_only_teacher_neg:
            gram_t = gram_t.clamp_min(0.0)
        return F.mse_loss(gram_s, gram_t)


def resize_patch_tokens(
    tokens: torch.Tensor, n_out: int, mode: str = "bicubic", antialias: bool = False
) -> torch.Tensor:
    """Patch tokens [B, N, D] of a square row-major grid → [B, n_out, D] on the square grid of ``n_out`` tokens,
    resampled with ``F.interpolate`` (``align_corners=False``) as DINOv3 resizes a Gram teacher's tokens."""
    B, N, D = tokens.shape
    side_in, side_out = math.isqrt(N), math.isqrt(n_out)
    if side_in * side_in != N or side_out * side_out != n_out:
        raise ValueError(f"Gram teacher tokens: {N} → {n_out} tokens, but both must be square grids")
    if N == n_out:
        return tokens
    x = tokens.transpose(1, 2).reshape(B, D, side_in, side_in)
    kwargs = {} if mode == "nearest" else {"align_corners": False, "antialias": bool(antialias)}
    x = F.interpolate(x, size=(side_out, side_out), mode=mode, **kwargs)
    return x.flatten(2).transpose(1, 2)


class GramAnchoringLoss(nn.Module):
    """The Gram term as training adds it (unweighted; the step multiplies by the scheduled weight).

    ``forward(student_patches [G·B, N_s, D], teacher_patches [G·B, N_t, D], masks [G·B, N_s] bool or None)``:
    crop-major rows (crop 0 of every image, then crop 1 ...). The teacher's grid is resized to the student's
    (``loss.gram_resize_method`` / ``gram_resize_antialias``); ``loss.gram_tokens_used`` keeps all patch tokens,
    or only the masked / unmasked ones (then over the whole batch: ``img_level`` must be off).
    """

    def __init__(self, cfg: LossConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.loss = GramLoss(cfg.gram_normalized, cfg.gram_img_level, cfg.gram_remove_neg,
                             cfg.gram_remove_only_teacher_neg)

    def teacher_tokens(self, teacher_patches: torch.Tensor, n_student: int) -> torch.Tensor:
        """The Gram teacher's patch tokens on the student's grid."""
        c = self.cfg
        return resize_patch_tokens(teacher_patches, n_student, c.gram_resize_method, c.gram_resize_antialias)

    def forward(
        self, student_patches: torch.Tensor, teacher_patches: torch.Tensor, masks: torch.Tensor | None = None
    ) -> torch.Tensor:
        t = self.teacher_tokens(teacher_patches.detach(), student_patches.shape[1])
        s = student_patches
        used = self.cfg.gram_tokens_used
        if used != "all":
            if masks is None:
                raise ValueError(f"loss.gram_tokens_used={used!r} needs the student's masks")
            keep = masks.reshape(s.shape[:2]).to(device=s.device, dtype=torch.bool)
            keep = keep if used == "masked" else ~keep
            s, t = s[keep], t[keep]  # [n, D]: one Gram matrix over the batch's selected tokens
            if s.shape[0] == 0:  # no token selected (e.g. no mask this batch): nothing to anchor
                return student_patches.float().sum() * 0.0
        return self.loss(s, t)
