"""Classification metrics (all computed by sklearn) and their aggregation over folds."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)

SCALAR_METRICS = ("accuracy", "balanced_accuracy", "f1_weighted")


def compute_metrics(y_true, y_pred, labels: Sequence[int] | None = None) -> dict[str, Any]:
    """Accuracy, balanced accuracy, weighted F1, per-class precision/recall/F1/support, confusion matrix.

    ``labels`` fixes the class order of the per-class lists and the confusion matrix (rows = true,
    columns = predicted); by default the sorted union of both label sets.
    """
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    if labels is None:
        labels = np.unique(np.concatenate([y_true, y_pred]))
    labels = [int(x) for x in labels]
    with warnings.catch_warnings():
        # Classes predicted but absent from y_true (cross-source tests) are expected, not an error.
        warnings.simplefilter("ignore", category=UserWarning)
        p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
        out = {
            "accuracy": float(accuracy_score(y_true, y_pred)),
            "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
            "f1_weighted": float(f1_score(y_true, y_pred, average="weighted", labels=labels, zero_division=0)),
        }
    out.update(
        {
            "n": int(len(y_true)),
            "labels": labels,
            "per_class": {
                str(lab): {"precision": float(pi), "recall": float(ri), "f1": float(fi), "support": int(si)}
                for lab, pi, ri, fi, si in zip(labels, p, r, f, s)
            },
            "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        }
    )
    return out


def aggregate(fold_metrics: Sequence[dict[str, Any]], keys: Sequence[str] = SCALAR_METRICS) -> dict[str, Any]:
    """``{metric: {"mean", "std", "folds"}}`` over folds (population std, ddof = 0, like numpy)."""
    out: dict[str, Any] = {}
    for k in keys:
        vals = [float(m[k]) for m in fold_metrics if m.get(k) is not None]
        out[k] = {
            "mean": float(np.mean(vals)) if vals else float("nan"),
            "std": float(np.std(vals)) if vals else float("nan"),
            "folds": vals,
        }
    return out


@dataclass(frozen=True)
class Scores:
    """Mean ± std of each scalar metric per classifier of one protocol result: the one place results are
    flattened (the headline, the in-training kNN and the MLflow metrics all use :meth:`flat`)."""

    values: dict[str, dict[str, tuple[float, float]]]  # classifier -> metric -> (mean, std)

    @classmethod
    def of(cls, result: dict[str, Any]) -> "Scores":
        """From a protocol result (``{"classifiers": {name: {metric: {"mean", "std", ...}}}}``); metrics without a
        finite mean (e.g. a fold with one class) are left out."""
        values: dict[str, dict[str, tuple[float, float]]] = {}
        for clf, cr in result.get("classifiers", {}).items():
            for m in SCALAR_METRICS:
                v = cr.get(m) or {}
                if v.get("mean") is not None and not math.isnan(v["mean"]):
                    values.setdefault(clf, {})[m] = (float(v["mean"]), float(v["std"]))
        return cls(values)

    def mean(self, classifier: str, metric: str = "balanced_accuracy") -> float | None:
        got = self.values.get(classifier, {}).get(metric)
        return None if got is None else got[0]

    def flat(self, prefix: str = "", sep: str = "_") -> dict[str, float]:
        """``{prefix + classifier + sep + metric: mean, ... + "_std": std}``, e.g. ``knn20_balanced_accuracy``."""
        out: dict[str, float] = {}
        for clf, metrics in self.values.items():
            for m, (mean, std) in metrics.items():
                out[f"{prefix}{clf}{sep}{m}"] = mean
                out[f"{prefix}{clf}{sep}{m}_std"] = std
        return out
