"""Reading reddino datasets: a Ray Data stream for training, a pyarrow Table for small sets.

Filters (both readers): ``sources`` / ``labels`` / ``units`` keep rows whose value is in the list;
``exclude_labels`` drops rows with those labels (unlabelled rows are kept). In Ray they are
``Dataset.filter(expr=...)`` predicate expressions, which Ray Data pushes down into the Parquet scan.

Source weighting (``source_weights={"a": 2.0, "b": 0.5}``): each row of source ``s`` appears
``floor(w_s)`` times plus once more with probability ``w_s - floor(w_s)``, so the expected number of
rows from ``s`` is ``w_s * count_s`` (weight 1 / unlisted: unchanged; 0: dropped). The coin is a hash
of the row's ``sha256`` and the source (and ``shuffle_seed``), so the result is deterministic and
independent of block layout. Repeated rows are identical; augmentation makes them differ downstream.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa

from reddino.data.images import decode_image
from reddino.data.schema import COLUMNS, RBC_SCHEMA
from reddino.data.shards import ManifestError, read_manifest

PathLike = str | os.PathLike


def _as_paths(paths: PathLike | Iterable[PathLike]) -> list[Path]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out = [Path(p) for p in paths]
    if not out:
        raise ValueError("no dataset dirs given")
    return out


def dataset_files(paths: PathLike | Iterable[PathLike]) -> list[str]:
    """Shard files of one or more dataset dirs, after validating each dir's manifest."""
    files: list[str] = []
    for d in _as_paths(paths):
        m = read_manifest(d)  # raises ManifestError naming the dir
        for s in m["shards"]:
            f = d / s["file"]
            if not f.exists():
                raise ManifestError(f"dataset dir {d}: shard {s['file']} listed in the manifest is missing")
            files.append(str(f.resolve()))
    return files


def _list(v: Any) -> list | None:
    if v is None:
        return None
    if isinstance(v, (str, int)):
        return [v]
    return list(v)


def _check_weights(source_weights: Mapping[str, float] | None) -> dict[str, float] | None:
    if not source_weights:
        return None
    w = {str(k): float(v) for k, v in source_weights.items()}
    bad = {k: v for k, v in w.items() if not (v >= 0 and math.isfinite(v))}
    if bad:
        raise ValueError(f"source weights must be finite and >= 0, got {bad}")
    return w


def _pa_filter(sources=None, labels=None, units=None, exclude_labels=None):
    """The filters as one pyarrow compute expression (None if no filter)."""
    import pyarrow.dataset as ds

    parts = []
    if sources is not None:
        parts.append(ds.field("source").isin(pa.array([str(s) for s in sources], pa.string())))
    if labels is not None:
        parts.append(ds.field("label").isin(pa.array([int(x) for x in labels], pa.int32())))
    if units is not None:
        parts.append(ds.field("unit").isin(pa.array([str(u) for u in units], pa.string())))
    if exclude_labels is not None:
        ex = pa.array([int(x) for x in exclude_labels], pa.int32())
        parts.append(ds.field("label").is_null() | ~ds.field("label").isin(ex))
    if not parts:
        return None
    expr = parts[0]
    for p in parts[1:]:
        expr = expr & p
    return expr


def _ray_filter(sources=None, labels=None, units=None, exclude_labels=None):
    """The filters as a Ray Data predicate expression (None if no filter)."""
    from ray.data.expressions import col

    parts = []
    if sources is not None:
        parts.append(col("source").is_in([str(s) for s in sources]))
    if labels is not None:
        parts.append(col("label").is_in([int(x) for x in labels]))
    if units is not None:
        parts.append(col("unit").is_in([str(u) for u in units]))
    if exclude_labels is not None:
        parts.append(col("label").is_null() | col("label").not_in([int(x) for x in exclude_labels]))
    if not parts:
        return None
    expr = parts[0]
    for p in parts[1:]:
        expr = expr & p
    return expr


def _row_coins(sha256: Sequence[str], sources: Sequence[str], seed: int | None) -> np.ndarray:
    """Deterministic uniform [0, 1) per row from (sha256, source, seed)."""
    salt = f"{seed if seed is not None else 0}".encode()
    out = np.empty(len(sha256), np.float64)
    for i, (h, s) in enumerate(zip(sha256, sources)):
        d = hashlib.blake2b(h.encode() + b"|" + s.encode() + b"|" + salt, digest_size=8).digest()
        out[i] = int.from_bytes(d, "little") / 2.0**64
    return out


def apply_source_weights(table: pa.Table, source_weights: Mapping[str, float] | None, seed: int | None = None) -> pa.Table:
    """Repeat / subsample rows per source (see module doc); keeps the table's row order."""
    w = _check_weights(source_weights)
    if not w or table.num_rows == 0:
        return table
    src = table.column("source").to_pylist()
    weights = np.array([w.get(s, 1.0) for s in src], np.float64)
    if np.all(weights == 1.0):
        return table
    base = np.floor(weights)
    frac = weights - base
    coins = _row_coins(table.column("sha256").to_pylist(), src, seed)
    copies = (base + (coins < frac)).astype(np.int64)
    idx = np.repeat(np.arange(table.num_rows), copies)
    return table.take(pa.array(idx, pa.int64()))


class _SourceWeighter:
    def __init__(self, weights: dict[str, float], seed: int | None, columns: list[str] | None):
        self.weights, self.seed, self.columns = weights, seed, columns

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = apply_source_weights(batch, self.weights, self.seed)
        return out.select(self.columns) if self.columns is not None else out


def _check_columns(columns: Sequence[str] | None) -> list[str] | None:
    if columns is None:
        return None
    cols = list(columns)
    unknown = [c for c in cols if c not in COLUMNS]
    if unknown:
        raise ValueError(f"unknown column(s) {unknown}; RBC_SCHEMA has {list(COLUMNS)}")
    return cols


def read_rbc_dataset(
    paths: PathLike | Iterable[PathLike],
    *,
    sources: Sequence[str] | str | None = None,
    labels: Sequence[int] | int | None = None,
    units: Sequence[str] | str | None = None,
    exclude_labels: Sequence[int] | int | None = None,
    source_weights: Mapping[str, float] | None = None,
    columns: Sequence[str] | None = None,
    shuffle_seed: int | None = None,
    file_shuffle_seed: int | None = None,
    override_num_blocks: int | None = None,
    num_cpus: float | None = None,
    concurrency: int | None = None,
):
    """A :class:`ray.data.Dataset` over one or more reddino dataset dirs (rows in RBC_SCHEMA).

    Each dir must hold a ``_manifest.json`` of this schema version (else :class:`ManifestError`
    naming the dir); only the shards listed there are read. Filters and source weighting are
    described in the module doc; ``columns`` projects the output; ``shuffle_seed`` adds a seeded
    ``random_shuffle`` (a full shuffle; skip it for streaming-only use and shuffle locally instead);
    ``file_shuffle_seed`` shuffles the order of the shard files instead (streaming; a new order on every
    execution of the dataset, reproducible from the seed);
    ``num_cpus`` / ``concurrency`` bound the read tasks (useful on small machines).
    """
    import ray

    files = dataset_files(paths)
    cols = _check_columns(columns)
    w = _check_weights(source_weights)
    read_kwargs: dict[str, Any] = {}
    if override_num_blocks is not None:
        read_kwargs["override_num_blocks"] = override_num_blocks
    if num_cpus is not None:
        read_kwargs["num_cpus"] = num_cpus
    if concurrency is not None:
        read_kwargs["concurrency"] = concurrency
    if file_shuffle_seed is not None:
        from ray.data import FileShuffleConfig

        read_kwargs["shuffle"] = FileShuffleConfig(seed=int(file_shuffle_seed), reseed_after_execution=True)
    ds = ray.data.read_parquet(files, schema=RBC_SCHEMA, file_extensions=["parquet"], **read_kwargs)
    flt = dict(sources=_list(sources), labels=_list(labels), units=_list(units), exclude_labels=_list(exclude_labels))
    try:
        expr = _ray_filter(**flt)
        if expr is not None:
            ds = ds.filter(expr=expr)
    except ImportError:  # older Ray without predicate expressions: pyarrow-side filter per batch
        pexpr = _pa_filter(**flt)
        if pexpr is not None:
            ds = ds.map_batches(lambda t: t.filter(pexpr), batch_format="pyarrow")
    if w and any(v != 1.0 for v in w.values()):
        ds = ds.map_batches(_SourceWeighter(w, shuffle_seed, cols), batch_format="pyarrow", batch_size=None,
                            zero_copy_batch=True)
    elif cols is not None:
        ds = ds.select_columns(cols)
    if shuffle_seed is not None:
        ds = ds.random_shuffle(seed=shuffle_seed)
    return ds


def load_table(
    paths: PathLike | Iterable[PathLike],
    *,
    sources: Sequence[str] | str | None = None,
    labels: Sequence[int] | int | None = None,
    units: Sequence[str] | str | None = None,
    exclude_labels: Sequence[int] | int | None = None,
    source_weights: Mapping[str, float] | None = None,
    columns: Sequence[str] | None = None,
    shuffle_seed: int | None = None,
) -> pa.Table:
    """Same as :func:`read_rbc_dataset` but an in-memory ``pyarrow.Table`` (no Ray), for small sets/tests."""
    import pyarrow.dataset as pds

    files = dataset_files(paths)
    cols = _check_columns(columns)
    expr = _pa_filter(_list(sources), _list(labels), _list(units), _list(exclude_labels))
    dataset = pds.dataset(files, schema=RBC_SCHEMA, format="parquet")
    w = _check_weights(source_weights)
    need = list(cols) if cols is not None else list(COLUMNS)
    if w:
        need += [c for c in ("source", "sha256") if c not in need]
    table = dataset.to_table(columns=need, filter=expr)
    table = apply_source_weights(table, w, shuffle_seed)
    if shuffle_seed is not None and table.num_rows:
        perm = np.random.default_rng(shuffle_seed).permutation(table.num_rows)
        table = table.take(pa.array(perm, pa.int64()))
    if cols is not None:
        table = table.select(cols)
    return table.replace_schema_metadata(RBC_SCHEMA.metadata) if cols is None else table


__all__ = ["read_rbc_dataset", "load_table", "decode_image", "dataset_files", "apply_source_weights"]
