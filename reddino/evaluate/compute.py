"""Features + metadata of the labelled rows of one dataset dir (:func:`compute_features`): selects the
rows, reads them from the feature cache or embeds them (Ray Data actors for large sets, in process for
small ones) and writes the cache."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import torch

from reddino.data import load_table

from .cache import DEFAULT_CACHE_DIR, cache_key, cache_path, load_features, resolve_cache_dir, save_features
from .extract import POOLINGS, extract_features, is_extractor, model_device, resolve_precision, unwrap_ddp
from .featureset import FeatureSet, feature_set_from, row_keys, select_rows
from .ray_extract import ray_device, run_extraction_ray

RAY_MIN_ROWS = 5000  # use_ray=None: below this many rows, in-process extraction beats starting Ray actors


def _run_extraction_local(model, data_dir, idx, img_size, pooling, batch_size, *, device=None, on_batch=None,
                          precision="fp32"):
    table = load_table([data_dir], columns=["image"])
    images = table.column("image").take(pa.array(idx)).to_pylist()
    return extract_features(model, images, img_size, batch_size, device, pooling=pooling, on_batch=on_batch,
                            precision=precision)


def _extraction_device(model, use_ray: bool, device: Any) -> Any:
    """Where the forward passes will run, known without starting Ray (for the precision and cache key)."""
    if is_extractor(model):
        return "cpu"
    if not use_ray:
        return device if device is not None else model_device(unwrap_ddp(model))
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return ray_device()
    return "cuda" if torch.cuda.is_available() else "cpu"  # ensure_ray starts a local Ray on this machine


def compute_features(
    model,
    info: dict[str, Any],
    data_dir: str | Path,
    *,
    pooling: str = "cls",
    img_size: int | None = None,
    batch_size: int = 64,
    exclude_labels: Iterable[int] | None = None,
    max_images: int | None = None,
    seed: int = 0,
    cache_dir: str | Path | None = DEFAULT_CACHE_DIR,
    use_ray: bool | None = None,
    num_cpus: int | None = None,
    device: Any = None,
    precision: str = "auto",
    progress: Any = None,
    extra_columns: Sequence[str] = (),
) -> FeatureSet:
    """Features + metadata of the labelled rows of one dataset dir (cached).

    ``use_ray``: True = Ray Data batch inference, False = in process, None = Ray from
    :data:`RAY_MIN_ROWS` rows up (actor start-up costs more than it saves on small sets).

    The cache holds every labelled row unless ``max_images`` subsamples (then the subset is part of
    the key), so excluding classes later re-uses the same file. ``cache_dir=None`` disables caching.
    ``precision`` (``auto``/``fp32``/``bf16``, see :func:`~reddino.evaluate.extract.resolve_precision`)
    is resolved for the device the extraction runs on; the resolved value is part of the cache key and
    of ``meta["precision"]``. ``progress`` is an optional ``rich.progress.Progress``.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    data_dir = str(Path(data_dir).expanduser())
    img_size = img_size or info.get("img_size")
    base_cols = ["label", "label_name", "source", "group", "image_id", "sha256"]
    meta = load_table([data_dir], columns=base_cols + [c for c in extra_columns if c not in base_cols])
    missing_cols = [c for c in extra_columns if c not in meta.column_names]
    if missing_cols:
        raise ValueError(f"{data_dir}: no column(s) {missing_cols}")
    if "label" not in meta.column_names:
        raise ValueError(f"{data_dir}: no 'label' column - evaluation needs labelled cells")
    all_idx = select_rows(meta)
    idx = select_rows(meta, exclude_labels=exclude_labels, max_images=max_images, seed=seed)
    subset = max_images is not None and len(idx) < len(select_rows(meta, exclude_labels=exclude_labels))
    if not subset:
        idx = all_idx
    if len(idx) == 0:
        raise ValueError(f"{data_dir}: no labelled rows to evaluate")
    keys = row_keys(meta, idx)
    if use_ray is None:
        use_ray = len(idx) >= RAY_MIN_ROWS
    if is_extractor(model):
        precision = "fp32"  # no network
    else:
        precision = resolve_precision(precision, _extraction_device(model, use_ray, device))
    key = cache_key(info["hash"], data_dir, pooling, img_size, keys, subset=subset, precision=precision)
    cache_dir = resolve_cache_dir(cache_dir)
    path = cache_path(cache_dir, key) if cache_dir else None
    extra = {"data": data_dir, "cache_key": key, "cache_file": str(path) if path else None, "cached": False,
             "precision": precision}
    if path is not None:
        feats = load_features(path, keys)
        if feats is not None:
            extra["cached"] = True
            return feature_set_from(meta, idx, feats, extra, extra_columns).exclude(exclude_labels)

    task = None
    if progress is not None:
        task = progress.add_task(f"features {Path(data_dir).name}", total=len(idx))

    def on_batch(n: int) -> None:
        if task is not None:
            progress.advance(task, n)

    extra["ray"] = bool(use_ray)
    if use_ray:
        got = run_extraction_ray(
            model, data_dir, keys, img_size, pooling, batch_size, num_cpus=num_cpus, on_batch=on_batch,
            all_labelled=not subset, precision=precision,
        )
        missing = [k for k in keys if k not in got]
        if missing:
            raise RuntimeError(f"{data_dir}: {len(missing)} rows came back without features (e.g. {missing[0]})")
        feats = np.stack([got[k] for k in keys]).astype(np.float32)
    else:
        feats = _run_extraction_local(
            model, data_dir, idx, img_size, pooling, batch_size, device=device, on_batch=on_batch,
            precision=precision,
        )
    if path is not None:
        save_features(path, feats, keys, key)
    return feature_set_from(meta, idx, feats, extra, extra_columns).exclude(exclude_labels)
