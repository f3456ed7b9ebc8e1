"""Frozen features: the layer below ``evaluate``, ``infer`` and ``registry``.

* :mod:`~reddino.features.models` - a model reference (export file, run dir, ``models:/``, ``random:<arch>``,
  ``handcrafted``) → ``(module | extractor, info)`` with the weights hash; the one loader of backbone files.
* :mod:`~reddino.features.extract` - preprocessing, token pooling, precision, and the in-process forward pass.
* :mod:`~reddino.features.pipeline` - the one Ray Data inference pipeline (and its in-process twin).
* :mod:`~reddino.features.store` - the Parquet embedding store, its manifest and its index.
* :mod:`~reddino.features.embedding` - :func:`embed`: compute a store, or find the one that already holds the job.

Public names are imported lazily so ``import reddino.features`` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from reddino.lazy import lazy_getattr

__all__ = ["EmbedError", "EmbedResult", "embed", "extract_features", "read_embeddings", "resolve", "resolve_model",
           "handcrafted_features"]

if TYPE_CHECKING:  # pragma: no cover
    from .embedding import EmbedResult, embed
    from .extract import extract_features
    from .handcrafted import handcrafted_features
    from .models import resolve, resolve_model
    from .store import EmbedError, read_embeddings

__getattr__ = lazy_getattr(__name__, {
    "EmbedError": ".store",
    "read_embeddings": ".store",
    "EmbedResult": ".embedding",
    "embed": ".embedding",
    "extract_features": ".extract",
    "resolve": ".models",
    "resolve_model": ".models",
    "handcrafted_features": ".handcrafted",
})
