"""Embed a reddino dataset with a frozen model into the store, or find the store that already holds it.

:func:`embed` is the one way frozen features are computed for a dataset: ``reddino embed`` (into ``--out``),
``reddino evaluate`` and ``reddino probe fit`` (into the store root, ``$REDDINO_HOME/cache/features`` unless told
otherwise) and ``reddino classify`` call it. A store of the same job (model weights hash, data content hash,
pooling, image size, precision, dtype) is read instead of running the model again, wherever it was written: the
second and third of ``embed``, ``evaluate``, ``probe fit`` on one model and dataset extract nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from reddino import paths

from . import store as S
from .pipeline import ENGINES, Pass, ensure_ray, keep_mask, planned_device, run_local, run_ray
from .progress import EmbedProgress

DEFAULT_ROOT = "default"  # resolved at call time to reddino.paths.feature_cache() ($REDDINO_HOME)


@dataclass
class EmbedResult:
    out: Path
    manifest: dict[str, Any]
    written: int  # shards computed by this call
    reused: int  # shards found finished (an interrupted call's, or a complete store's)
    seconds: float
    found: bool = False  # the whole store was already there: the model did not run

    @property
    def num_rows(self) -> int:
        return int(self.manifest["num_rows"])


def store_root(root: str | Path | None) -> Path | None:
    """The folder holding evaluation stores and the index (``"default"``: ``$REDDINO_HOME/cache/features``)."""
    if root is None:
        return None
    return paths.feature_cache() if str(root) == DEFAULT_ROOT else Path(root).expanduser()


def read_input(data_dir: Path):
    """The dataset's manifest, every shard it lists present (one clear error otherwise)."""
    from reddino.data.shards import ManifestError, read_manifest  # noqa: PLC0415

    try:
        m = read_manifest(data_dir)
    except ManifestError as exc:
        raise S.EmbedError(str(exc)) from None
    for p in m.shard_paths:
        if not p.is_file():
            raise S.EmbedError(f"{p}: listed in {data_dir}'s manifest but missing")
    return m


def _check(pooling: str, dtype: str, concurrency: int, batch_size: int, engine: str) -> None:
    from .extract import POOLINGS  # noqa: PLC0415

    if pooling not in POOLINGS:
        raise S.EmbedError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if dtype not in S.DTYPES:
        raise S.EmbedError(f"dtype must be one of {S.DTYPES}, got {dtype!r}")
    if engine not in ENGINES:
        raise S.EmbedError(f"engine must be one of {ENGINES}, got {engine!r}")
    if concurrency < 1 or batch_size < 1:
        raise S.EmbedError("concurrency and batch size must be at least 1")


def job_for(net: Any, info: dict, data_hash: str, *, pooling: str, precision: str, engine: str, device: Any = None,
            dtype: str = "float32", rows: Sequence[str] | None = None) -> dict[str, Any]:
    """The store job of embedding ``data_hash``'s rows (all, or ``rows``) with a resolved model."""
    from .extract import is_extractor, resolve_precision  # noqa: PLC0415

    size = int(info["img_size"]) if info.get("img_size") else None  # None: handcrafted at native size
    if is_extractor(net):
        precision = "fp32"  # no network
    else:
        precision = resolve_precision(precision, planned_device(net, engine, device))
    return S.job_spec(info["hash"], data_hash, pooling, size, precision, dtype, S.rows_digest(rows))


def find(root: Path | None, spec: dict) -> Path | None:
    """A complete store for ``spec``: of exactly its rows, or of every row of the dataset."""
    found = S.find_store(root, spec)
    if found is None and "rows" in spec:
        found = S.find_store(root, {k: v for k, v in spec.items() if k != "rows"})
    return found


def embed(
    model: Any,
    data: str | Path,
    out: str | Path | None = None,
    *,
    pooling: str = "cls",
    img_size: int | None = None,
    batch_size: int = 64,
    concurrency: int = 1,
    precision: str = "auto",
    dtype: str = "float32",
    num_cpus: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    on_shard: Callable[[str], None] | None = None,
    on_rows: Callable[[int], None] | None = None,
    rows: Sequence[str] | None = None,
    engine: str = "ray",
    device: Any = None,
    root: str | Path | None = DEFAULT_ROOT,
    tracking_uri: str | None = None,
) -> EmbedResult:
    """Embed the rows of the dataset at ``data`` (every row, or the ``image_id|sha256`` keys ``rows``) with
    ``model`` (any model reference, or a ``(module, info)`` pair from :func:`~reddino.features.models.resolve`).

    ``out``: the store folder to write (resumable: a rerun computes only the shards not yet finished). Without
    ``out`` the store goes to ``root/<job digest>``, and a complete store of the same job found under ``root``
    (its own, or one that ``reddino embed`` listed in its index) is returned without running the model.
    Every finished store is listed in ``root``'s index (``root=None``: no index, nothing looked up).
    ``engine``: ``ray`` (Ray Data actors) or ``local`` (this process, on ``device``).
    """
    from .models import resolve  # noqa: PLC0415

    t0 = time.time()
    _check(pooling, dtype, concurrency, batch_size, engine)
    data = Path(data).expanduser().resolve()
    m = read_input(data)
    net, info = model if isinstance(model, tuple) else resolve(model, img_size, tracking_uri=tracking_uri)

    def job() -> dict[str, Any]:
        return job_for(net, info, m.content_hash, pooling=pooling, precision=precision, engine=engine, device=device,
                       dtype=dtype, rows=rows)

    spec, root_dir = job(), store_root(root)
    if out is None and root_dir is None:
        raise S.EmbedError("embed needs an output folder or a store root")
    if out is None and (found := find(root_dir, spec)) is not None:  # looked up before any Ray starts
        manifest = S.load_manifest(found)
        return EmbedResult(found, manifest, 0, len(manifest["shards"]), time.time() - t0, found=True)
    if engine == "ray":
        ensure_ray(num_cpus)
        from reddino.runtime import quiet_data_progress  # noqa: PLC0415

        quiet_data_progress()
        spec = job()  # the cluster joined may hold GPUs: the precision follows where the actors run
    if out is None:
        out = root_dir / S.job_digest(spec)
    out = Path(out).expanduser().resolve()
    work, complete = S.prepare_work(out, spec, overwrite)
    if complete is None:
        p = Pass(net, spec["img_size"], pooling, batch_size, spec["precision"], dtype, work,
                 frozenset(rows) if rows is not None else None)
        records, written = _compute(p, data, m, engine, concurrency=concurrency, num_cpus=num_cpus, device=device,
                                    progress=progress, on_shard=on_shard, on_rows=on_rows)
        complete = S.build_manifest(spec, info, records, data, m)
        S.publish(work, out, complete)
    else:
        written = 0
    if root_dir is not None:
        S.index_store(root_dir, out, spec)
    return EmbedResult(out, complete, written, len(complete["shards"]) - written, time.time() - t0)


def _compute(p: Pass, data: Path, m, engine: str, *, concurrency: int, num_cpus: int | None, device: Any,
             progress: bool, on_shard, on_rows) -> tuple[list[dict], int]:
    """Every shard's record (finished ones from an interrupted call kept), and how many this call computed."""
    metas = {}
    for s in m["shards"]:
        meta = pq.read_table(data / s["file"], columns=list(S.META_COLUMNS))
        mask = keep_mask(meta, p.keep)
        if mask.any():  # a subset skips the shards it has no row of
            metas[s["file"]] = meta if mask.all() else meta.filter(pa.array(mask))
    shards = [s for s in m["shards"] if s["file"] in metas]
    records = {s["file"]: r for s in shards if (r := S.finished(p.work, s)) is not None}
    pending = [s for s in shards if s["file"] not in records]
    total = sum(t.num_rows for t in metas.values())
    bar = EmbedProgress(total, sum(metas[f].num_rows for f in records), f"embed {data.name}", progress, on_rows)

    def done(name: str, record: dict) -> None:
        records[name] = record
        bar.shard_done(name, len(records), len(shards))
        if on_shard is not None:
            on_shard(name)

    try:
        if pending and engine == "ray":
            run_ray(p, data, pending, metas, concurrency=concurrency, num_cpus=num_cpus, on_rows=bar.advance,
                    on_done=done)
        elif pending:
            run_local(p, data, pending, metas, device=device, on_rows=bar.advance, on_done=done)
    finally:
        bar.close()
    return [records[s["file"]] for s in shards], len(pending)
