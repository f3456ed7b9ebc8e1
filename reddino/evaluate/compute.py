"""Features + metadata of the labelled rows of one dataset dir (:func:`compute_features`): selects the rows and
takes their vectors from the embedding store (:func:`reddino.features.embedding.embed`: a store of the same model and
data is read, whoever wrote it; otherwise one is computed, by Ray Data actors for large sets, in process for small
ones)."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa

from reddino.data import load_table
from reddino.features.embedding import DEFAULT_ROOT, embed, store_root
from reddino.features.extract import POOLINGS
from reddino.features.pipeline import row_keys_of
from reddino.features.store import read_embeddings

from .featureset import FeatureSet, feature_set_from, row_keys, select_rows

RAY_MIN_ROWS = 5000  # use_ray=None: below this many rows, in-process extraction beats starting Ray actors
BASE_COLUMNS = ["label", "label_name", "source", "group", "image_id", "sha256"]


def _labelled_meta(data_dir: str, extra_columns: Sequence[str]) -> pa.Table:
    meta = load_table([data_dir], columns=BASE_COLUMNS + [c for c in extra_columns if c not in BASE_COLUMNS])
    missing_cols = [c for c in extra_columns if c not in meta.column_names]
    if missing_cols:
        raise ValueError(f"{data_dir}: no column(s) {missing_cols}")
    if "label" not in meta.column_names:
        raise ValueError(f"{data_dir}: no 'label' column - evaluation needs labelled cells")
    return meta


def _selection(meta: pa.Table, data_dir: str, exclude_labels, max_images, seed) -> tuple[np.ndarray, bool]:
    """The rows to embed and whether they are a subset (``max_images``) rather than every labelled row; the
    excluded classes are dropped later, so excluding classes re-uses the same store."""
    idx = select_rows(meta, exclude_labels=exclude_labels, max_images=max_images, seed=seed)
    subset = max_images is not None and len(idx) < len(select_rows(meta, exclude_labels=exclude_labels))
    if not subset:
        idx = select_rows(meta)
    if len(idx) == 0:
        raise ValueError(f"{data_dir}: no labelled rows to evaluate")
    return idx, subset


def _aligned(table: pa.Table, X: np.ndarray, manifest: dict, keys: list[str], data_dir: str) -> np.ndarray:
    """The store's vectors of ``keys``, in that order; one clear error when some have none (did not decode)."""
    where = {k: i for i, k in enumerate(row_keys_of(table))} if table.num_rows else {}
    missing = [k for k in keys if k not in where]
    if missing:
        why = {s["image_id"]: s["error"] for s in manifest.get("skipped", {}).get("examples", [])}
        first = missing[0].split("|", 1)[0]
        raise ValueError(f"{data_dir}: {len(missing)} labelled row(s) have no features, e.g. {first}"
                         f"{': ' + why[first] if first in why else ''} (an image that does not decode; "
                         f"`reddino verify` finds them)")
    return X[np.array([where[k] for k in keys], dtype=np.int64)]


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
    cache_dir: str | Path | None = DEFAULT_ROOT,
    use_ray: bool | None = None,
    num_cpus: int | None = None,
    device: Any = None,
    precision: str = "auto",
    progress: Any = None,
    extra_columns: Sequence[str] = (),
) -> FeatureSet:
    """Features + metadata of the labelled rows of one dataset dir, from the embedding store.

    ``use_ray``: True = Ray Data batch inference, False = in process, None = Ray from
    :data:`RAY_MIN_ROWS` rows up (actor start-up costs more than it saves on small sets).

    ``cache_dir`` is the store root (``"default"``: ``$REDDINO_HOME/cache/features``; ``None``: nothing read or
    kept). A complete store of the same model weights, data content, pooling, image size and precision is read
    instead of running the model (``meta["cached"]``), be it this root's own or a ``reddino embed --out`` folder
    listed in its index. A new store holds every row of the dataset unless ``max_images`` subsamples (then only
    that subset), so excluding classes later re-uses it. ``precision`` (``auto``/``fp32``/``bf16``, see
    :func:`~reddino.features.extract.resolve_precision`) is resolved for the device the extraction runs on and
    recorded in ``meta["precision"]``. ``progress`` is an optional ``rich.progress.Progress``.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    data_dir = str(Path(data_dir).expanduser())
    if img_size:
        info = {**info, "img_size": int(img_size)}
    meta = _labelled_meta(data_dir, extra_columns)
    idx, subset = _selection(meta, data_dir, exclude_labels, max_images, seed)
    keys = row_keys(meta, idx)
    if use_ray is None:
        use_ray = len(idx) >= RAY_MIN_ROWS
    task: list = []

    def on_rows(n: int) -> None:
        if progress is not None:
            if not task:
                task.append(progress.add_task(f"features {Path(data_dir).name}", total=len(idx)))
            progress.advance(task[0], n)

    root = store_root(cache_dir)
    with (tempfile.TemporaryDirectory(prefix="reddino-features-") if root is None
          else contextlib.nullcontext(None)) as tmp:
        res = embed((model, info), data_dir, Path(tmp) / "store" if tmp else None, pooling=pooling,
                    batch_size=batch_size, precision=precision, num_cpus=num_cpus, progress=False, on_rows=on_rows,
                    rows=keys if subset else None, engine="ray" if use_ray else "local", device=device, root=root)
        table, X, manifest = read_embeddings(res.out)
    feats = _aligned(table, X, manifest, keys, data_dir)
    job = manifest["job"]
    extra = {"data": data_dir, "data_hash": job["data_hash"], "job": job, "precision": job["precision"],
             "store": str(res.out) if root is not None else None, "cached": res.found, "ray": bool(use_ray)}
    return feature_set_from(meta, idx, feats, extra, extra_columns).exclude(exclude_labels)
