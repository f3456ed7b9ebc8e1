"""`reddino embed`: frozen embeddings of a reddino dataset, by Ray Data batch inference, as Parquet shards.

One output shard per input shard (``emb-00007.parquet`` holds the rows of ``shard-00007.parquet`` in the same
order): ``image_id, sha256, source, group, label, label_name, embedding`` (a fixed-size list of float32 or
float16). ``_manifest.json`` names the model (ref, registry name / version, run id, content and config hash),
the pooling, image size and precision, and the input dataset's content hash.

Work happens in a hidden ``.<out>.partial`` folder beside ``out``: every finished shard is written there under
a temporary name and renamed, so after an interruption the same command skips the shards already written and
computes only the rest; the folder becomes ``out`` (one rename) when the manifest is complete. The forward pass
is :func:`reddino.evaluate.extract.extract_features`, so the vectors are exactly ``reddino evaluate``'s features.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from reddino.data.shards import file_sha256
from reddino.paths import atomic_path, swap_dir_into_place, write_json_atomic

log = logging.getLogger(__name__)

EMBED_FORMAT = "reddino-embeddings"
EMBED_VERSION = 1
DTYPES = ("float32", "float16")
META_COLUMNS = ("image_id", "sha256", "source", "group", "label", "label_name")
MAX_SKIP_EXAMPLES = 50
LINE_EVERY_S = 30.0  # without a terminal: a progress line this often (besides one per finished shard)


class EmbedError(ValueError):
    """Bad input to embed / classify (names the file, folder or model)."""


@dataclass
class EmbedResult:
    out: Path
    manifest: dict[str, Any]
    written: int  # shards computed by this call
    reused: int  # shards found finished from an interrupted call (or the whole output, already complete)
    seconds: float

    @property
    def num_rows(self) -> int:
        return int(self.manifest["num_rows"])


# ----------------------------------------------------------------------------------------------------------------
# The Ray Data actor
# ----------------------------------------------------------------------------------------------------------------


class EmbedUDF:
    """``map_batches`` callable class: holds the model on its actor, decodes and embeds pyarrow batches.

    An image that does not decode is reported (``ok`` False, ``error``) instead of failing the whole pass."""

    def __init__(self, model, img_size, pooling="cls", batch_size=64, device="cpu", num_threads=None,
                 precision="fp32"):
        import torch  # noqa: PLC0415

        from reddino.evaluate.extract import is_extractor  # noqa: PLC0415

        if num_threads:
            torch.set_num_threads(int(num_threads))
        self.model = model if is_extractor(model) else model.to(device).eval()
        self.img_size, self.pooling, self.batch_size = img_size, pooling, batch_size
        self.device, self.precision = device, precision

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        from reddino.data.images import ImageDecodeError, decode_image  # noqa: PLC0415
        from reddino.evaluate.extract import extract_features  # noqa: PLC0415

        blobs = batch.column("image").to_pylist()
        images, ok, errors = [], np.zeros(len(blobs), dtype=bool), [""] * len(blobs)
        for i, blob in enumerate(blobs):
            try:
                images.append(decode_image(blob))
                ok[i] = True
            except (ImageDecodeError, ValueError) as exc:
                errors[i] = str(exc)
        feats = extract_features(self.model, images, self.img_size, self.batch_size, self.device,
                                 pooling=self.pooling, precision=self.precision)
        full = np.zeros((len(blobs), feats.shape[1]), dtype=np.float32)  # extract_features knows D even for 0 rows
        full[ok] = feats
        return {
            "shard": np.array([Path(p).name for p in batch.column("path").to_pylist()], dtype=object),
            "key": np.array([f"{a}|{b}" for a, b in zip(batch.column("image_id").to_pylist(),
                                                          batch.column("sha256").to_pylist())], dtype=object),
            "ok": ok,
            "error": np.array(errors, dtype=object),
            "embedding": full,
        }


# ----------------------------------------------------------------------------------------------------------------
# Output folder: job identity, finished shards, manifest
# ----------------------------------------------------------------------------------------------------------------


def _job_spec(info: dict[str, Any], data_manifest, pooling: str, img_size, precision: str, dtype: str) -> dict:
    """What makes two embed runs produce the same bytes: a finished shard is reused only under the same spec."""
    return {
        "format": EMBED_FORMAT,
        "version": EMBED_VERSION,
        "model_hash": info["hash"],
        "data_hash": data_manifest.content_hash,
        "pooling": pooling,
        "img_size": img_size,
        "precision": precision,
        "dtype": dtype,
    }


def _model_record(info: dict[str, Any]) -> dict[str, Any]:
    keys = ("ref", "kind", "arch", "model_name", "model_version", "model_run_id", "hash", "config_hash",
            "embed_dim", "patch_size")
    return {k: info[k] for k in keys if info.get(k) not in (None, "")}


def _out_name(shard_file: str) -> str:
    stem = Path(shard_file).stem
    return f"emb-{stem.split('-')[-1]}.parquet" if stem.startswith("shard-") else f"emb-{stem}.parquet"


def _embedding_array(vectors: np.ndarray, dtype: str) -> pa.FixedSizeListArray:
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.dtype(dtype)).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, int(vectors.shape[1]))


def _write_shard(work: Path, shard: dict, meta: pa.Table, vectors: np.ndarray, keep: np.ndarray,
                 skipped: list[dict], dtype: str) -> dict:
    """One finished output shard (temp name, then rename) and its record; the record file marks it done."""
    name = _out_name(shard["file"])
    table = meta.filter(pa.array(keep)) if not keep.all() else meta
    table = table.append_column("embedding", _embedding_array(vectors[keep], dtype))
    with atomic_path(work / name) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    record = {"file": name, "source_shard": shard["file"], "rows": table.num_rows,
              "bytes": (work / name).stat().st_size, "sha256": file_sha256(work / name), "skipped": skipped}
    write_json_atomic(work / f"{name}.done.json", record)
    return record


def _finished(work: Path, shard: dict) -> dict | None:
    name = _out_name(shard["file"])
    done = work / f"{name}.done.json"
    if not (done.is_file() and (work / name).is_file()):
        return None
    try:
        record = json.loads(done.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if (work / name).stat().st_size != record.get("bytes"):
        return None  # damaged since: recompute it
    return record


def _prepare_work(out: Path, spec: dict, overwrite: bool) -> tuple[Path, dict | None]:
    """The partial folder for this job (kept when it belongs to the same spec) or the finished manifest."""
    if out.exists():
        mpath = out / "_manifest.json"
        if mpath.is_file():
            existing = json.loads(mpath.read_text())
            if existing.get("job") == spec and not overwrite:
                return out, existing
        if not overwrite:
            what = "embeddings of another model / data / settings" if mpath.is_file() else "other files"
            raise EmbedError(f"{out} already exists and holds {what}; choose another --out or pass --overwrite")
    work = out.parent / f".{out.name}.partial"
    job = work / "_job.json"
    if work.exists():
        try:
            same = json.loads(job.read_text()) == spec
        except (OSError, json.JSONDecodeError):
            same = False
        if not same:
            shutil.rmtree(work)  # our own leftovers from an interrupted run with other settings
    work.mkdir(parents=True, exist_ok=True)
    if not job.is_file():
        write_json_atomic(job, spec)
    return work, None


def _publish(work: Path, out: Path) -> None:
    for f in work.glob("*.done.json"):
        f.unlink()
    (work / "_job.json").unlink(missing_ok=True)
    swap_dir_into_place(work, out)


# ----------------------------------------------------------------------------------------------------------------
# Progress
# ----------------------------------------------------------------------------------------------------------------


class _Progress:
    """A rich bar on a terminal; one line per finished shard otherwise (log files)."""

    def __init__(self, total_rows: int, done_rows: int, label: str, enabled: bool):
        self.enabled, self.total, self.t0 = enabled, total_rows, time.time()
        self.rows = done_rows
        self.start_rows = done_rows
        self.last_line = time.time()
        self.bar = None
        if enabled and sys.stderr.isatty():
            from rich.console import Console  # noqa: PLC0415
            from rich.progress import (  # noqa: PLC0415
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[speed]}"), TimeRemainingColumn(),
                                console=Console(stderr=True), transient=False)
            self.task = self.bar.add_task(label, total=total_rows, completed=done_rows, speed="")
            self.bar.start()

    def rate(self) -> float:
        return (self.rows - self.start_rows) / max(time.time() - self.t0, 1e-9)

    def advance(self, n: int) -> None:
        self.rows += n
        if self.bar is not None:
            self.bar.update(self.task, advance=n, speed=f"{self.rate():.0f} img/s")
        elif self.enabled and time.time() - self.last_line >= LINE_EVERY_S:
            self.last_line = time.time()
            print(f"embedding: {self.rows:,}/{self.total:,} rows, {self.rate():.1f} img/s", file=sys.stderr, flush=True)

    def shard_done(self, name: str, index: int, count: int) -> None:
        if self.enabled and self.bar is None:
            print(f"embedded {name} ({index}/{count} shards, {self.rows:,}/{self.total:,} rows, "
                  f"{self.rate():.1f} img/s)", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


# ----------------------------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------------------------


def _read_input(data_dir: Path):
    from reddino.data.shards import ManifestError, read_manifest  # noqa: PLC0415

    try:
        m = read_manifest(data_dir)
    except ManifestError as exc:
        raise EmbedError(str(exc)) from None
    for p in m.shard_paths:
        if not p.is_file():
            raise EmbedError(f"{p}: listed in {data_dir}'s manifest but missing")
    return m


def resolve(ref: Any, img_size: int | None):
    """``resolve_model`` with one clear error for a reference that does not exist."""
    from reddino.evaluate.models import resolve_model  # noqa: PLC0415

    try:
        return resolve_model(ref, img_size=img_size)
    except (FileNotFoundError, ValueError) as exc:
        raise EmbedError(f"model {ref!r}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - MLflow raises its own type for a missing name / alias / run
        if type(exc).__name__ in ("MlflowException", "RestException"):
            raise EmbedError(f"model {ref!r}: {str(exc).splitlines()[0]}") from None
        raise


def _placement(concurrency: int, num_cpus: int | None) -> tuple[dict[str, Any], str, int | None]:
    import ray  # noqa: PLC0415

    if ray.cluster_resources().get("GPU", 0) >= 1:
        return {"num_gpus": 1, "num_cpus": 1}, "cuda", None
    cluster = int(ray.cluster_resources().get("CPU", 1))
    usable = max(1, min(int(num_cpus or cluster), cluster))
    # Leave one CPU to the Parquet read tasks, or the pipeline waits forever on a small machine; torch still
    # gets every usable core (decoding is light next to the forward pass).
    per_actor = max(1, (usable - 1) // concurrency)
    return {"num_cpus": per_actor}, "cpu", max(1, usable // concurrency)


def embed(
    model: Any,
    data: str | Path,
    out: str | Path,
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
) -> EmbedResult:
    """Embed every row of the dataset at ``data`` with ``model`` (any ``reddino evaluate`` reference, or a
    ``(module, info)`` pair from ``resolve``) into ``out``. Returns at once when ``out`` already holds this job's complete output."""
    from reddino.evaluate.extract import POOLINGS, is_extractor, resolve_precision  # noqa: PLC0415
    from reddino.evaluate.ray_extract import ensure_ray  # noqa: PLC0415

    t0 = time.time()
    if pooling not in POOLINGS:
        raise EmbedError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if dtype not in DTYPES:
        raise EmbedError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if concurrency < 1 or batch_size < 1:
        raise EmbedError("concurrency and batch size must be at least 1")
    data, out = Path(data).expanduser().resolve(), Path(out).expanduser().resolve()
    m = _read_input(data)
    net, info = model if isinstance(model, tuple) else resolve(model, img_size)
    size = int(info["img_size"]) if info.get("img_size") else None  # None: handcrafted at native size

    ensure_ray(num_cpus)
    from reddino.runtime import quiet_data_progress  # noqa: PLC0415

    quiet_data_progress()
    resources, device, threads = _placement(concurrency, num_cpus)
    precision = "fp32" if is_extractor(net) else resolve_precision(precision, device)
    spec = _job_spec(info, m, pooling, size, precision, dtype)
    work, complete = _prepare_work(out, spec, overwrite)
    if complete is not None:
        return EmbedResult(out, complete, written=0, reused=len(complete["shards"]), seconds=time.time() - t0)

    shards = list(m["shards"])
    records: dict[str, dict] = {}
    for s in shards:
        rec = _finished(work, s)
        if rec is not None:
            records[s["file"]] = rec
    pending = [s for s in shards if s["file"] not in records]
    done_rows = sum(int(s["rows"]) for s in shards if s["file"] in records)
    bar = _Progress(m.num_rows, done_rows, f"embed {data.name}", progress)
    try:
        if pending:
            _run(net, data, pending, work, size, pooling, batch_size, concurrency, resources, device, threads,
                 precision, dtype, records, bar, on_shard, len(shards))
    finally:
        bar.close()

    ordered = [records[s["file"]] for s in shards]
    skipped = [dict(x, shard=r["source_shard"]) for r in ordered for x in r["skipped"]]
    dim = _dim(work / ordered[0]["file"]) if ordered else 0
    manifest = {
        "format": EMBED_FORMAT,
        "version": EMBED_VERSION,
        "num_rows": sum(r["rows"] for r in ordered),
        "dim": dim,
        "dtype": dtype,
        "pooling": pooling,
        "img_size": size,
        "precision": precision,
        "model": _model_record(info),
        "input": {"path": str(data), "content_hash": m.content_hash, "num_rows": m.num_rows,
                  "classes": m.get("classes", {})},
        "shards": [{k: r[k] for k in ("file", "source_shard", "rows", "bytes", "sha256")} for r in ordered],
        "skipped": {"count": len(skipped), "examples": skipped[:MAX_SKIP_EXAMPLES]},
        "job": spec,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json_atomic(work / "_manifest.json", manifest)
    _publish(work, out)
    return EmbedResult(out, manifest, written=len(pending), reused=len(shards) - len(pending),
                       seconds=time.time() - t0)


def _dim(path: Path) -> int:
    return int(pq.read_schema(path).field("embedding").type.list_size)


def _run(net, data: Path, pending: list[dict], work: Path, size: int, pooling: str, batch_size: int,
         concurrency: int, resources: dict, device: str, threads, precision: str, dtype: str,
         records: dict[str, dict], bar: _Progress, on_shard, n_shards: int) -> None:
    files = [str(data / s["file"]) for s in pending]
    by_name = {s["file"]: s for s in pending}
    metas = {s["file"]: pq.read_table(data / s["file"], columns=list(META_COLUMNS)) for s in pending}
    got: dict[str, dict[str, list]] = {name: {} for name in by_name}
    seen = {name: 0 for name in by_name}
    # Rows in input-file order, so shards finish (are written, and skipped by a rerun) one after another instead
    # of all at the very end; restored when this pass ends.
    from ray.data import DataContext  # noqa: PLC0415

    opts = DataContext.get_current().execution_options
    keep_order, opts.preserve_order = opts.preserve_order, True
    try:
        _stream(net, files, size, pooling, batch_size, concurrency, resources, device, threads, precision, dtype,
                work, by_name, metas, got, seen, records, bar, on_shard, n_shards)
    finally:
        opts.preserve_order = keep_order
    if got:
        missing = ", ".join(f"{n} ({seen[n]}/{by_name[n]['rows']} rows)" for n in got)
        raise RuntimeError(f"Ray Data returned incomplete shards: {missing}")


def _stream(net, files, size, pooling, batch_size, concurrency, resources, device, threads, precision, dtype, work,
            by_name, metas, got, seen, records, bar, on_shard, n_shards) -> None:
    import ray  # noqa: PLC0415

    ds = ray.data.read_parquet(files, include_paths=True).select_columns(["image", "image_id", "sha256", "path"])
    with warnings.catch_warnings():
        # `max_restarts` has no named map_batches parameter in Ray 2.60 (only the deprecated **ray_remote_args).
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        ds = ds.map_batches(
            EmbedUDF,
            fn_constructor_kwargs={"model": net, "img_size": size, "pooling": pooling, "batch_size": batch_size,
                                   "device": device, "num_threads": threads, "precision": precision},
            batch_size=batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=concurrency),
            # An actor restart would need its constructor args (the model) from the object store, which Ray warns
            # may be gone; a lost actor fails the pass instead, and rerunning the command resumes at the shard.
            max_restarts=0,
            **resources,
        )
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for name, key, ok, err, vec in zip(batch["shard"], batch["key"], batch["ok"], batch["error"],
                                           batch["embedding"]):
            got[name].setdefault(key, []).append((bool(ok), str(err), vec))
            seen[name] += 1
        bar.advance(len(batch["key"]))
        for name in [n for n in got if seen[n] == int(by_name[n]["rows"])]:
            records[name] = _assemble(work, by_name[name], metas.pop(name), got.pop(name), dtype)
            bar.shard_done(name, len(records), n_shards)
            if on_shard is not None:
                on_shard(name)


def _assemble(work: Path, shard: dict, meta: pa.Table, rows: dict[str, list], dtype: str) -> dict:
    """Put a shard's embeddings back into the input shard's row order and write it."""
    ids, shas = meta.column("image_id").to_pylist(), meta.column("sha256").to_pylist()
    keep = np.zeros(meta.num_rows, dtype=bool)
    vectors, skipped = [], []
    dim = next((len(v) for lst in rows.values() for ok, _, v in lst if ok), 0)
    for i, key in enumerate(f"{a}|{b}" for a, b in zip(ids, shas)):
        ok, err, vec = rows[key].pop(0)
        keep[i] = ok
        vectors.append(vec if ok else np.zeros(dim, dtype=np.float32))
        if not ok:
            skipped.append({"image_id": ids[i], "error": err})
    mat = np.stack(vectors).astype(np.float32) if vectors else np.zeros((0, dim), np.float32)
    return _write_shard(work, shard, meta, mat, keep, skipped, dtype)


# ----------------------------------------------------------------------------------------------------------------
# Reading embeddings back
# ----------------------------------------------------------------------------------------------------------------


def read_embeddings(path: str | Path) -> tuple[pa.Table, np.ndarray, dict[str, Any]]:
    """``(metadata table, [N, D] float32 matrix, manifest)`` of an embed output folder, in shard order."""
    path = Path(path).expanduser()
    mpath = path / "_manifest.json"
    if not mpath.is_file():
        raise EmbedError(f"{path} has no _manifest.json (not a `reddino embed` output, or an unfinished one)")
    manifest = json.loads(mpath.read_text())
    if manifest.get("format") != EMBED_FORMAT:
        raise EmbedError(f"{mpath}: format {manifest.get('format')!r}, expected {EMBED_FORMAT!r}")
    tables = [pq.read_table(path / s["file"]) for s in manifest["shards"]]
    table = pa.concat_tables(tables) if tables else pa.table({c: [] for c in META_COLUMNS})
    dim = int(manifest["dim"])
    if table.num_rows:
        flat = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        matrix = flat.reshape(-1, dim).astype(np.float32, copy=False)
    else:
        matrix = np.zeros((0, dim), np.float32)
    return table.drop_columns(["embedding"]) if table.num_rows else table, matrix, manifest
