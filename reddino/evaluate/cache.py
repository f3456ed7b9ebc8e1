"""The on-disk feature cache: one ``.npz`` per (model hash, data manifest hash, pooling, image size,
row selection, precision), so re-evaluating the same model on the same data is a file read."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from reddino import paths
from reddino.data import manifest_hash

CACHE_VERSION = 1
DEFAULT_CACHE_DIR = "default"  # resolved at call time to reddino.paths.feature_cache() ($REDDINO_HOME)


def cache_key(
    model_hash: str, data_dir: str, pooling: str, img_size: int | None, keys: Sequence[str], *, subset: bool,
    precision: str,
) -> dict[str, Any]:
    """What the features depend on; ``keys`` (the rows' ``image_id|sha256``) count only for a subset."""
    key = {
        "v": CACHE_VERSION,
        "model": model_hash,
        "data": str(manifest_hash(data_dir)),
        "pooling": pooling,
        "img_size": img_size or "native",
        "selection": hashlib.sha256("\n".join(keys).encode()).hexdigest() if subset else "labelled",
    }
    if precision != "fp32":  # fp32 keeps the keys (and cache files) written before precision existed
        key["precision"] = precision
    return key


def resolve_cache_dir(cache_dir: str | Path | None) -> str | Path | None:
    return paths.feature_cache() if cache_dir == DEFAULT_CACHE_DIR else cache_dir


def cache_path(cache_dir: str | Path, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    pool = str(key["pooling"]).replace("+", "-")
    return Path(cache_dir).expanduser() / f"{key['model'][:12]}_{key['data'][:12]}_{pool}_{key['img_size']}_{digest}.npz"


def save_npz_atomic(path: Path, **arrays) -> Path:
    with paths.atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    return path


def load_features(path: Path, keys: Sequence[str]) -> np.ndarray | None:
    """The cached features at ``path`` when it holds exactly the rows ``keys``, in that order; else None."""
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as z:
        feats, cached_keys = z["features"], z["keys"].tolist()
    return feats if cached_keys == list(keys) else None


def save_features(path: Path, feats: np.ndarray, keys: Sequence[str], key: dict[str, Any]) -> Path:
    return save_npz_atomic(path, features=feats, keys=np.array(keys, dtype=str), key=np.array(json.dumps(key)))
