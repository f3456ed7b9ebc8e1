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

from typing import TYPE_CHECKING

from reddino.lazy import lazy_getattr

__all__ = ["evaluate", "knn_score", "extract_features", "resolve_model", "handcrafted_features"]

_FEATURES = ("extract_features", "resolve_model", "handcrafted_features")  # the features layer's, for convenience
__getattr__ = lazy_getattr(__name__, {"evaluate": ".runner", "knn_score": ".runner",
                                      **{name: "reddino.features" for name in _FEATURES}})

if TYPE_CHECKING:  # pragma: no cover
    from reddino.features import extract_features, handcrafted_features, resolve_model

    from .runner import evaluate, knn_score
