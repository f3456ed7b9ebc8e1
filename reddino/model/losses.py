"""Self-supervised losses of DINOv2: DINO (CLS), iBOT (masked patches), KoLeo (uniformity), and centering.

References
----------
* DINO: Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021.
* iBOT: Zhou et al., "iBOT: Image BERT Pre-Training with Online Tokenizer", ICLR 2022.
* DINOv2: Oquab et al., "DINOv2: Learning Robust Visual Features without Supervision", TMLR 2024.
* Sinkhorn-Knopp centering: Caron et al., "Unsupervised Learning of Visual Features by Contrasting Cluster
  Assignments" (SwAV), NeurIPS 2020.
* KoLeo: Sablayrolles et al., "Spreading vectors for similarity search", ICLR 2019.

All teacher-side statistics (Sinkhorn sums, EMA centre means) are all-reduced when ``torch.distributed`` is
initialised, so the result is that of the global batch, whatever the number of workers.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from reddino.config import LossConfig


def _all_reduce(x: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Sum (or max) over workers, in place, when running distributed; identity otherwise."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return x


# ---------------------------------------------------------------------------------------------------------------
# Centering of the teacher outputs
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, teacher_temp: float, n_iterations: int = 3) -> torch.Tensor:
    """Sinkhorn-Knopp centering (SwAV; DINOv2's ``sinkhorn_knopp_teacher``, RedDino's choice).

    Turns teacher logits [B, K] into assignments whose rows sum to 1 and whose columns each sum to about B/K
    over the *global* batch (exactly after many iterations): every prototype gets an equal share, which
    prevents collapse without an EMA centre. B may differ between workers (e.g. masked patch counts).

    Matches the official code to float rounding. The one difference: before ``exp`` we subtract a single
    scalar, the max logit of the global batch (all-reduced, so every worker uses the same). One scalar cancels
    in the first normalisation; a per-sample shift would not (3 iterations do not converge, so it would change
    the targets by up to 15 % at T = 0.04). Without any shift exp overflows float32 above |logit/T| ≈ 88.
    """
    logits = teacher_logits.float()
    shift = logits.max() if logits.numel() else logits.new_tensor(float("-inf"))
    shift = _all_reduce(shift.reshape(1).clone(), op="max")
    q = torch.exp((logits - shift) / teacher_temp).t()  # [K, B]
    K = q.shape[0]
    B = _all_reduce(torch.tensor(float(q.shape[1]), device=q.device))
    total = _all_reduce(q.sum())
    q = q / total.clamp_min(1e-30)
    for _ in range(int(n_iterations)):
        rows = _all_reduce(q.sum(dim=1, keepdim=True))  # per-prototype mass over the global batch
        q = q / rows.clamp_min(1e-30) / K
        q = q / q.sum(dim=0, keepdim=True).clamp_min(1e-30) / B  # per-sample mass
    return (q * B).t()


class EMACenter(nn.Module):
    """DINO's softmax centering: ``softmax((t - c) / T)`` with ``c`` an EMA of the batch-mean teacher logits.

    ``c ← m·c + (1 − m)·mean(t)``, the mean over the global batch; updated after it is used.
    """

    def __init__(self, out_dim: int, momentum: float = 0.9) -> None:
        super().__init__()
        self.momentum = float(momentum)
        self.register_buffer("center", torch.zeros(1, out_dim))

    @torch.no_grad()
    def forward(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        probs = F.softmax((teacher_logits.float() - self.center) / teacher_temp, dim=-1)
        self.update(teacher_logits)
        return probs

    @torch.no_grad()
    def update(self, teacher_logits: torch.Tensor) -> None:
        t = teacher_logits.float().reshape(-1, self.center.shape[-1])
        total = _all_reduce(t.sum(dim=0, keepdim=True))
        count = _all_reduce(torch.tensor(float(t.shape[0]), device=t.device))
        # clamp, not `if count.item() == 0`: no host sync per step (a forward always has rows)
        self.center.mul_(self.momentum).add_(total / count.clamp_min(1.0), alpha=1.0 - self.momentum)


#: Valid ``loss.centering`` values → what implements them.
CENTERING = {"ema": EMACenter, "sinkhorn_knopp": sinkhorn_knopp}


def check_centering(name: str) -> str:
    if name not in CENTERING:
        raise ValueError(f"unknown centering {name!r}; valid values: {', '.join(sorted(CENTERING))}")
    return name


class _TeacherCentering(nn.Module):
    """Shared by the DINO and iBOT losses: centred/sharpened teacher probabilities."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.student_temp = float(student_temp)
        self.ema = EMACenter(out_dim, center_momentum)

    @property
    def center(self) -> torch.Tensor:
        return self.ema.center

    @torch.no_grad()
    def teacher_probs(
        self,
        teacher_logits: torch.Tensor,
        teacher_temp: float,
        centering: str = "sinkhorn_knopp",
        n_iterations: int = 3,
    ) -> torch.Tensor:
        """Teacher logits [B, K] → target probabilities [B, K] (``centering``: a key of :data:`CENTERING`)."""
        if check_centering(centering) == "ema":
            return self.ema(teacher_logits, teacher_temp)
        return sinkhorn_knopp(teacher_logits, teacher_temp, n_iterations)


# ---------------------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------------------


class DINOLoss(_TeacherCentering):
    """DINO self-distillation on CLS tokens (Caron et al. 2021; DINOv2 §4).

    Cross-entropy ``−Σ_k p_t(k) log softmax(s / τ_s)(k)`` (batch mean) between each teacher global crop ``i``
    and each student crop ``j`` (global crops first, in the teacher's order, then local crops), skipping
    ``j == i``, summed over the pairs and divided as DINOv2 does (``ssl_meta_arch.py:147-148``): by
    ``G(G−1) + max(G·L, 1)``. With 2 global and L ≥ 1 local crops that is the number of pairs; with no local
    crop it is 3 for the 2 global pairs (the official ``max(…, 1)``; kept so losses and gradients equal the
    official ones). One local crop counts like any other (RedDino's code dropped the local loss for a single
    local crop; we don't).
    """

    def forward(
        self,
        student_logits: list[torch.Tensor],
        teacher_probs: list[torch.Tensor],
        ignore_same_crop: bool = True,
    ) -> torch.Tensor:
        total = student_logits[0].new_zeros((), dtype=torch.float32)
        n_global = len(teacher_probs)
        n_pairs = 0
        for j, s in enumerate(student_logits):
            log_p = F.log_softmax(s.float() / self.student_temp, dim=-1)
            for i, t in enumerate(teacher_probs):
                if ignore_same_crop and i == j:
                    continue
                total = total - (t * log_p).sum(dim=-1).mean()
                n_pairs += 1
        if n_pairs == 0:  # a single global crop and no local crop: nothing to compare
            return total + sum(s.sum() for s in student_logits) * 0.0
        if not ignore_same_crop:
            return total / n_pairs
        n_local_pairs = n_global * (len(student_logits) - n_global)
        return total / (n_global * (n_global - 1) + max(n_local_pairs, 1))


class IBOTPatchLoss(_TeacherCentering):
    """iBOT masked-image-modelling loss on patch tokens (Zhou et al. 2022; DINOv2 §4).

    For the masked patches only: CE between the teacher's probabilities for the *unmasked* view and the
    student's logits for the masked view. Each token is weighted by 1/(masked tokens of its image), so every
    image with a mask counts equally. DINOv2 divides the sum by *all* global crops (``average_over="all"``,
    the default, as ``loss.ibot_average_over``), which scales the loss by the fraction of masked crops
    (≈ ``mask.sample_probability``); ``"masked"`` divides by the images that have a mask instead.
    """

    def __init__(
        self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9, average_over: str = "all"
    ) -> None:
        super().__init__(out_dim, student_temp, center_momentum)
        if average_over not in ("masked", "all"):
            raise ValueError(f"average_over must be 'masked' or 'all', not {average_over!r}")
        self.average_over = average_over

    def forward(
        self,
        student_patch_logits: torch.Tensor,
        teacher_patch_probs: torch.Tensor,
        masks: torch.Tensor,
    ) -> torch.Tensor:
        """``student_patch_logits``/``teacher_patch_probs``: [M, K] for the M masked tokens of ``masks``
        ([B, N] bool, row-major order as ``tokens[masks]``). Returns 0 (graph intact) if M == 0."""
        masks = masks.reshape(masks.shape[0], -1)
        if student_patch_logits.shape[0] == 0 or not bool(masks.any()):
            return student_patch_logits.float().sum() * 0.0
        per_image = masks.sum(dim=1)
        weights = (1.0 / per_image.clamp_min(1).float()).repeat_interleave(per_image)
        ce = -(teacher_patch_probs * F.log_softmax(student_patch_logits.float() / self.student_temp, dim=-1)).sum(-1)
        n_images = (per_image > 0).sum() if self.average_over == "masked" else masks.shape[0]
        return (ce * weights.to(ce.device)).sum() / n_images


class KoLeoLoss(nn.Module):
    """Kozachenko-Leonenko differential-entropy regulariser (Sablayrolles et al. 2019; DINOv2 §4).

    ``−mean_i log(‖x_i − x_nn(i)‖ + ε)`` on L2-normalised features, as DINOv2's ``koleo_loss.py``: nearest
    neighbour by dot product (diagonal set to −1), distance by ``pairwise_distance(eps=1e-8)`` (ε added to
    the difference, so duplicates give a large but finite value and gradient). Returns 0 for a batch of one.
    """

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(x.float(), dim=-1, p=2, eps=self.eps)
        n = x.shape[0]
        if n < 2:
            return x.sum() * 0.0
        with torch.no_grad():
            sim = x @ x.t()
            sim.fill_diagonal_(-1.0)  # never your own neighbour
            nn_idx = sim.argmax(dim=1)
        dist = F.pairwise_distance(x, x[nn_idx], p=2, eps=self.eps)
        return -torch.log(dist + self.eps).mean()


# ---------------------------------------------------------------------------------------------------------------
# The DINOv2 objective: the three losses combined as SSLMetaArch.forward_backward does
# ---------------------------------------------------------------------------------------------------------------


class DINOv2Loss(nn.Module):
    """``dino_weight·DINO + ibot_weight·iBOT + koleo_weight·Σ_global views KoLeo`` (DINOv2 ``ssl_meta_arch``).

    Model-free, so the numbers can be checked against the official code's (``tests/model/test_dinov2_parity``):
    it takes head outputs and tokens, not images. The EMA centres live here (``dino.center``, ``ibot.center``).
    """

    def __init__(self, dino_dim: int, ibot_dim: int, cfg: LossConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or LossConfig()
        check_centering(cfg.centering)
        self.dino = DINOLoss(dino_dim, cfg.student_temp, cfg.center_momentum)
        self.ibot = IBOTPatchLoss(ibot_dim, cfg.student_temp, cfg.center_momentum, average_over=cfg.ibot_average_over)
        self.koleo = KoLeoLoss()

    @torch.no_grad()
    def teacher_targets(
        self, cls_logits: torch.Tensor, patch_logits: torch.Tensor | None, teacher_temp: float
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher CLS logits of all global crops [G·B, K] (centred jointly, as the official code stacks both
        views) and masked-patch logits [M, K] or None → target probabilities of the same shapes."""
        c = self.cfg
        cls_probs = self.dino.teacher_probs(cls_logits, teacher_temp, c.centering, c.sinkhorn_iterations)
        patch_probs = None
        if patch_logits is not None:
            patch_probs = self.ibot.teacher_probs(patch_logits, teacher_temp, c.centering, c.sinkhorn_iterations)
        return cls_probs, patch_probs

    def forward(
        self,
        student_cls_logits: torch.Tensor,
        teacher_cls_probs: torch.Tensor,
        n_global: int,
        student_patch_logits: torch.Tensor | None = None,
        teacher_patch_probs: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
        student_global_cls: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Crop-major inputs: ``student_cls_logits`` [(G+L)·B, K] (global crops, then local), ``teacher_cls_probs``
        [G·B, K]; ``student_patch_logits``/``teacher_patch_probs`` [M, K] for the masked tokens of ``masks``
        [G·B, N]; ``student_global_cls`` [G·B, D] (backbone CLS before the head, for KoLeo).
        Returns (total, detached float parts ``dino``, ``ibot``, ``koleo``)."""
        c = self.cfg
        B = teacher_cls_probs.shape[0] // n_global
        dino = self.dino(list(student_cls_logits.split(B)), list(teacher_cls_probs.split(B)))
        total = c.dino_weight * dino
        zero = dino.detach() * 0.0
        ibot = koleo = zero
        if c.ibot_weight > 0 and student_patch_logits is not None:
            ibot = self.ibot(student_patch_logits, teacher_patch_probs, masks)
            total = total + c.ibot_weight * ibot
        if c.koleo_weight > 0 and student_global_cls is not None:
            # per global crop, summed over them, as DINOv2 does (so weight 0.1 means the same as there)
            koleo = torch.stack([self.koleo(x) for x in student_global_cls.split(B)]).sum()
            total = total + c.koleo_weight * koleo
        return total, {"dino": dino.detach().float(), "ibot": ibot.detach().float(), "koleo": koleo.detach().float()}
