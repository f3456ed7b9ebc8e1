"""Collapse monitors for self-distillation.

* Teacher entropy: the mean per-sample entropy of the teacher's probabilities (low = confident) and the
  entropy of their mean (low = every sample picks the same few prototypes, i.e. collapse).
* RankMe (Garrido et al., "RankMe: Assessing the Downstream Performance of Pretrained Self-Supervised
  Representations by Their Rank", ICML 2023): the effective rank of a batch of embeddings,
  ``exp(H(σ / ‖σ‖₁))`` over singular values σ. 1 = collapsed to a line, min(N, D) = full rank.

All return plain Python floats and never raise on non-finite input (non-finite rows are dropped).
"""

from __future__ import annotations

import math

import torch


def _finite_rows(x: torch.Tensor) -> torch.Tensor:
    x = x.detach().float().reshape(x.shape[0], -1) if x.dim() > 1 else x.detach().float().reshape(1, -1)
    return x[torch.isfinite(x).all(dim=1)]


def _entropy(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp_min(0)
    p = p / p.sum(dim=-1, keepdim=True).clamp_min(1e-30)
    return -(p * torch.log(p.clamp_min(1e-30))).sum(dim=-1)


def teacher_entropy(probs: torch.Tensor) -> tuple[float, float]:
    """Teacher probabilities [N, K] → (mean per-sample entropy, entropy of the mean distribution), in nats.

    The first is low when the teacher is confident (sharp); the second is low when all samples pick the same
    few prototypes (collapse). Both ≤ log K.
    """
    p = _finite_rows(probs)
    if p.shape[0] == 0:
        return float("nan"), float("nan")
    return float(_entropy(p).mean()), float(_entropy(p.mean(dim=0, keepdim=True))[0])


def marginal_entropy(probs: torch.Tensor) -> float:
    """Entropy (nats) of the mean teacher distribution over the batch; ≤ log K, collapse → near 0."""
    p = _finite_rows(probs)
    if p.shape[0] == 0:
        return float("nan")
    return float(_entropy(p.mean(dim=0, keepdim=True))[0])


def rankme(embeddings: torch.Tensor, eps: float = 1e-7) -> float:
    """RankMe effective rank of embeddings [N, D]; 0.0 for an empty or all-zero batch."""
    z = _finite_rows(embeddings).double()
    if z.shape[0] == 0:
        return 0.0
    s = torch.linalg.svdvals(z)
    total = s.sum()
    if not torch.isfinite(total) or total <= 0:
        return 0.0
    p = s / total + eps
    value = float(torch.exp(-(p * torch.log(p)).sum()))
    return value if math.isfinite(value) else 0.0


def collapse_signs(*, rankme_value: float | None, n_rows: int, dim: int, mean_entropy: float | None,
                   marginal: float | None, prototypes: int, rankme_frac: float, uniform_frac: float,
                   marginal_frac: float) -> list[str]:
    """Which of DINO's two collapses (and a rank collapse) the monitors show, in plain words; [] = none.

    ``n_rows``: the batch rows the monitors saw (teacher CLS features and targets of the global crops).

    * uniform targets: mean per-image teacher entropy ≥ ``uniform_frac``·ln K (every target ~flat);
    * one prototype: entropy of the batch-mean target ≤ ``marginal_frac``·ln min(K, rows);
    * rank: RankMe ≤ ``rankme_frac``·min(rows, D) (the most a batch of that size can show).
    """
    signs = []
    ln_k = math.log(max(prototypes, 2))
    if mean_entropy is not None and math.isfinite(mean_entropy) and mean_entropy >= uniform_frac * ln_k:
        signs.append(f"uniform teacher targets (mean per-image entropy {mean_entropy:.2f} of max ln K = {ln_k:.2f})")
    ln_b = math.log(max(min(prototypes, n_rows), 2))
    if marginal is not None and math.isfinite(marginal) and marginal <= marginal_frac * ln_b:
        signs.append(f"every image on the same prototypes (entropy of the batch-mean target {marginal:.2f}, "
                     f"max {ln_b:.2f})")
    ceiling = max(min(n_rows, dim), 1)
    if rankme_value is not None and rankme_value <= rankme_frac * ceiling:
        signs.append(f"rank-collapsed features (RankMe {rankme_value:.1f} of at most {ceiling} dims)")
    return signs
