"""Frozen-feature evaluation of RBC backbones: the RedDino protocol (kNN k=1/20, logistic probe,
stratified 5-fold CV) plus grouped folds, fixed splits and cross-source generalisation.

Public API (imported lazily so ``import reddino.evaluate`` stays cheap):

* :func:`evaluate` - full evaluation of one or more models on Parquet datasets -> JSON/markdown/PNGs/MLflow
* :func:`knn_score` - fast in-process kNN score for the trainer's eval hook and sweeps
* :func:`extract_features` - frozen CLS (or CLS+mean) features of a model for images / a table
* :func:`resolve_model` - model reference -> (module | "handcrafted", info)
* :func:`handcrafted_features` - the morphology feature baseline
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["evaluate", "knn_score", "extract_features", "resolve_model", "handcrafted_features"]

_WHERE = {
    "evaluate": "runner",
    "knn_score": "runner",
    "extract_features": "extract",
    "resolve_model": "models",
    "handcrafted_features": "handcrafted",
}

if TYPE_CHECKING:  # pragma: no cover
    from .extract import extract_features
    from .handcrafted import handcrafted_features
    from .models import resolve_model
    from .runner import evaluate, knn_score


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
