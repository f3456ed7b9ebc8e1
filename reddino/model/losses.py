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


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum over workers (in place) when running distributed; identity otherwise."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x)
    return x


# ---------------------------------------------------------------------------------------------------------------
# Centering of the teacher outputs
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, teacher_temp: float, n_iterations: int = 3) -> torch.Tensor:
    """Sinkhorn-Knopp centering (SwAV; DINOv2's default for ViT-g, RedDino's choice).

    Turns teacher logits [B, K] into assignments whose rows sum to 1 and whose columns each sum to about B/K
    over the *global* batch (exactly after many iterations): every prototype gets an equal share, which
    prevents collapse without an EMA centre. B may differ between workers (e.g. masked patch counts).
    """
    logits = teacher_logits.float()
    # A per-sample shift cancels in the normalisation; it keeps exp() from overflowing.
    q = torch.exp((logits - logits.max(dim=1, keepdim=True).values) / teacher_temp).t()  # [K, B]
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
        if count.item() == 0:
            return
        self.center.mul_(self.momentum).add_(total / count, alpha=1.0 - self.momentum)


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

    Cross-entropy ``−Σ_k p_t(k) log softmax(s / τ_s)(k)`` between each teacher global crop ``i`` and each
    student crop ``j`` (global crops first, in the teacher's order, then local crops), skipping ``j == i``,
    averaged over the pairs. With no local crops only the global↔global pairs remain; one local crop counts
    like any other (RedDino's code silently dropped the local loss for a single local crop; we don't).
    """

    def forward(
        self,
        student_logits: list[torch.Tensor],
        teacher_probs: list[torch.Tensor],
        ignore_same_crop: bool = True,
    ) -> torch.Tensor:
        total = student_logits[0].new_zeros((), dtype=torch.float32)
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
        return total / n_pairs


class IBOTPatchLoss(_TeacherCentering):
    """iBOT masked-image-modelling loss on patch tokens (Zhou et al. 2022; DINOv2 §4).

    For the masked patches only: CE between the teacher's probabilities for the *unmasked* view and the
    student's logits for the masked view. Each token is weighted by 1/(masked tokens of its image), so every
    image with a mask counts equally; the loss is the mean over those images (``average_over="masked"``,
    the default). DINOv2's code divides by *all* global crops instead (``average_over="all"``), which scales
    the loss by the fraction of masked crops (≈ ``mask.sample_probability``).
    """

    def __init__(
        self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9, average_over: str = "masked"
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

    ``−mean_i log(‖x_i − x_nn(i)‖ + ε)`` on L2-normalised features: pushes each sample away from its nearest
    neighbour, spreading the batch uniformly. Returns 0 for a batch of one; duplicates give a large but finite
    value (distances are floored at ε).
    """

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(x.float(), dim=-1, p=2, eps=1e-8)
        n = x.shape[0]
        if n < 2:
            return x.sum() * 0.0
        with torch.no_grad():
            sim = x @ x.t()
            sim.fill_diagonal_(-3.0)  # never your own neighbour
            nn_idx = sim.argmax(dim=1)
        diff = x - x[nn_idx]
        dist = torch.sqrt((diff * diff).sum(dim=-1) + self.eps * self.eps)  # finite gradient at 0
        return -torch.log(dist + self.eps).mean()
