"""The embedding store: frozen embeddings of a reddino dataset as Parquet shards plus a manifest.

One output shard per input shard (``emb-00007.parquet`` holds the rows of ``shard-00007.parquet`` in the same
order): ``image_id, sha256, source, group, label, label_name, embedding`` (a fixed-size list of float32 or
float16). ``_manifest.json`` names the model (ref, registry name / version, run id, weights hash, config hash),
the pooling, image size and precision, the input dataset's content hash and the rows embedded (``all``, or the
hash of a subset). Its ``job`` block is the store's identity: two stores with the same job hold the same vectors.

Work happens in a hidden ``.<out>.partial`` folder beside ``out``: every finished shard is written there under
a temporary name and renamed, so an interrupted job resumes at the shard; the folder becomes ``out`` (one rename)
when the manifest is complete.

Every finished store is listed in an index (``<store root>/index/<job digest>.json``, the root by default
``$REDDINO_HOME/cache/features``), so ``reddino evaluate`` and ``reddino probe fit`` find the embeddings that
``reddino embed`` wrote for the same model, data, pooling, image size and precision and read them instead of
running the model again.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from reddino.data.shards import file_sha256
from reddino.paths import atomic_path, swap_dir_into_place, write_json_atomic

EMBED_FORMAT = "reddino-embeddings"
EMBED_VERSION = 1
DTYPES = ("float32", "float16")
META_COLUMNS = ("image_id", "sha256", "source", "group", "label", "label_name")
MAX_SKIP_EXAMPLES = 50
ALL_ROWS = "all"


class EmbedError(ValueError):
    """Bad input to embed / evaluate / classify (names the file, folder or model)."""


def rows_digest(keys: Iterable[str] | None) -> str:
    """The ``rows`` field of a job: ``all``, or a hash of the selected rows' ``image_id|sha256`` keys."""
    if keys is None:
        return ALL_ROWS
    return hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()


def job_spec(model_hash: str, data_hash: str, pooling: str, img_size: int | None, precision: str,
             dtype: str = "float32", rows: str = ALL_ROWS) -> dict[str, Any]:
    """What makes two stores hold the same vectors: a store (or a finished shard) is reused only under the same job."""
    spec = {
        "format": EMBED_FORMAT,
        "version": EMBED_VERSION,
        "model_hash": model_hash,
        "data_hash": data_hash,
        "pooling": pooling,
        "img_size": img_size,
        "precision": precision,
        "dtype": dtype,
    }
    if rows != ALL_ROWS:  # a subset names its rows; a store of every row serves any subset
        spec["rows"] = rows
    return spec


def job_digest(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:24]


def model_record(info: dict[str, Any]) -> dict[str, Any]:
    keys = ("ref", "kind", "arch", "model_name", "model_version", "model_run_id", "hash", "config_hash",
            "embed_dim", "patch_size")
    return {k: info[k] for k in keys if info.get(k) not in (None, "")}


# ----------------------------------------------------------------------------------------------------------------
# Writing: shards, resume, manifest, publish
# ----------------------------------------------------------------------------------------------------------------


def out_name(shard_file: str) -> str:
    stem = Path(shard_file).stem
    return f"emb-{stem.split('-')[-1]}.parquet" if stem.startswith("shard-") else f"emb-{stem}.parquet"


def _embedding_array(vectors: np.ndarray, dtype: str) -> pa.FixedSizeListArray:
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.dtype(dtype)).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, int(vectors.shape[1]))


def write_shard(work: Path, shard: dict, meta: pa.Table, vectors: np.ndarray, keep: np.ndarray,
                skipped: list[dict], dtype: str) -> dict:
    """One finished output shard (temp name, then rename) and its record; the record file marks it done."""
    name = out_name(shard["file"])
    table = meta.filter(pa.array(keep)) if not keep.all() else meta
    table = table.append_column("embedding", _embedding_array(vectors[keep], dtype))
    with atomic_path(work / name) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    record = {"file": name, "source_shard": shard["file"], "rows": table.num_rows, "dim": int(vectors.shape[1]),
              "bytes": (work / name).stat().st_size, "sha256": file_sha256(work / name), "skipped": skipped}
    write_json_atomic(work / f"{name}.done.json", record)
    return record


def assemble_shard(work: Path, shard: dict, meta: pa.Table, ok: np.ndarray, errors: list[str],
                   vectors: np.ndarray, dtype: str) -> dict:
    """Write one shard from its rows' results (in ``meta``'s order); rows that did not decode are listed."""
    ids = meta.column("image_id").to_pylist()
    skipped = [{"image_id": ids[i], "error": errors[i]} for i in np.flatnonzero(~ok)]
    return write_shard(work, shard, meta, vectors.astype(np.float32, copy=False), ok, skipped, dtype)


def finished(work: Path, shard: dict) -> dict | None:
    """The record of a shard an interrupted job already finished, else None."""
    name = out_name(shard["file"])
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


def prepare_work(out: Path, spec: dict, overwrite: bool) -> tuple[Path, dict | None]:
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


def build_manifest(spec: dict, info: dict, records: list[dict], data: Path, data_manifest) -> dict[str, Any]:
    skipped = [dict(x, shard=r["source_shard"]) for r in records for x in r["skipped"]]
    return {
        "format": EMBED_FORMAT,
        "version": EMBED_VERSION,
        "num_rows": sum(r["rows"] for r in records),
        "dim": max((int(r.get("dim", 0)) for r in records), default=0),
        "dtype": spec["dtype"],
        "pooling": spec["pooling"],
        "img_size": spec["img_size"],
        "precision": spec["precision"],
        "rows": spec.get("rows", ALL_ROWS),
        "model": model_record(info),
        "input": {"path": str(data), "content_hash": data_manifest.content_hash, "num_rows": data_manifest.num_rows,
                  "classes": data_manifest.get("classes", {})},
        "shards": [{k: r[k] for k in ("file", "source_shard", "rows", "bytes", "sha256")} for r in records],
        "skipped": {"count": len(skipped), "examples": skipped[:MAX_SKIP_EXAMPLES]},
        "job": spec,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def publish(work: Path, out: Path, manifest: dict) -> None:
    """The manifest, then the partial folder becomes ``out`` in one rename."""
    write_json_atomic(work / "_manifest.json", manifest)
    for f in work.glob("*.done.json"):
        f.unlink()
    (work / "_job.json").unlink(missing_ok=True)
    swap_dir_into_place(work, out)


# ----------------------------------------------------------------------------------------------------------------
# The index: finding a finished store by its job
# ----------------------------------------------------------------------------------------------------------------


def _intact(path: Path, spec: dict) -> dict | None:
    """The manifest of the store at ``path`` when it is complete and holds this job, else None."""
    mpath = path / "_manifest.json"
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if manifest.get("format") != EMBED_FORMAT or manifest.get("job") != spec:
        return None
    for s in manifest.get("shards", []):
        f = path / s["file"]
        if not f.is_file() or f.stat().st_size != s["bytes"]:
            return None
    return manifest


def index_store(root: Path, out: Path, spec: dict) -> None:
    """List the finished store ``out`` under its job in ``root``'s index (the newest store of a job wins)."""
    if root.resolve() / job_digest(spec) == out.resolve():
        return  # the root's own store of this job: found without a pointer
    write_json_atomic(root / "index" / f"{job_digest(spec)}.json", {"path": str(out.resolve()), "job": spec})


def find_store(root: Path | None, spec: dict) -> Path | None:
    """A complete store of this job: the root's own (``<root>/<digest>``) or one listed in its index (a
    ``reddino embed --out`` folder). A listed folder that was deleted or changed since is not used."""
    if root is None:
        return None
    own = root / job_digest(spec)
    if _intact(own, spec) is not None:
        return own
    pointer = root / "index" / f"{job_digest(spec)}.json"
    try:
        path = Path(json.loads(pointer.read_text())["path"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return None
    return path if _intact(path, spec) is not None else None


# ----------------------------------------------------------------------------------------------------------------
# Reading embeddings back
# ----------------------------------------------------------------------------------------------------------------


def load_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of the store at ``path`` (one clear error when it is not a finished store)."""
    mpath = Path(path).expanduser() / "_manifest.json"
    if not mpath.is_file():
        raise EmbedError(f"{mpath.parent} has no _manifest.json (not a `reddino embed` output, or an unfinished one)")
    manifest = json.loads(mpath.read_text())
    if manifest.get("format") != EMBED_FORMAT:
        raise EmbedError(f"{mpath}: format {manifest.get('format')!r}, expected {EMBED_FORMAT!r}")
    return manifest


def read_embeddings(path: str | Path) -> tuple[pa.Table, np.ndarray, dict[str, Any]]:
    """``(metadata table, [N, D] float32 matrix, manifest)`` of a store, in shard order."""
    path = Path(path).expanduser()
    manifest = load_manifest(path)
    tables = [pq.read_table(path / s["file"]) for s in manifest["shards"]]
    tables = [t for t in tables if t.num_rows]
    table = pa.concat_tables(tables) if tables else pa.table({c: [] for c in META_COLUMNS})
    dim = int(manifest["dim"])
    if table.num_rows:
        flat = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        matrix = flat.reshape(-1, dim).astype(np.float32, copy=False)
    else:
        matrix = np.zeros((0, dim), np.float32)
    return table.drop_columns(["embedding"]) if table.num_rows else table, matrix, manifest
