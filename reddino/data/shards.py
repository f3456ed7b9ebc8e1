"""Parquet shards + ``_manifest.json``, written atomically.

Layout of a dataset directory::

    DIR/
      shard-00000.parquet   # RBC_SCHEMA rows, at most max_rows_per_shard rows / ~max_bytes_per_shard bytes
      shard-00001.parquet
      _manifest.json        # written last; the only entry point reddino readers use (Parquet readers skip it)

The whole directory is first built under a hidden sibling temp dir (``.DIR.tmp-<id>``) and then
renamed into place, so a crash never leaves a manifest that points at half-written shards. Rows are
deduplicated by ``sha256`` (first occurrence wins; the number dropped and examples go into the manifest).

Manifest fields (``schema_version``, ``num_rows``, ``content_hash``, ``sources``, ``labels``,
``units``, ``unlabelled``, ``classes``, ``shards``, ``duplicates``, ``skipped``, ``meta``,
``created``) are described in :func:`write_dataset`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from reddino.paths import fsync_dir, swap_dir_into_place
from reddino.data.schema import RBC_SCHEMA, SCHEMA_VERSION, UNITS, SchemaError, rows_to_table, sha256_hex, validate_table

# A leading "_" makes Parquet readers (pandas, pyarrow.dataset, polars, duckdb, Spark) skip the manifest, so a
# dataset dir opens as plain Parquet.
MANIFEST_NAME = "_manifest.json"
SHARD_PATTERN = "shard-{:05d}.parquet"
MANIFEST_FORMAT = "reddino-rbc-parquet"
DEFAULT_MAX_ROWS_PER_SHARD = 10_000
DEFAULT_MAX_BYTES_PER_SHARD = 32 * 1024 * 1024
DEFAULT_ROW_GROUP_SIZE = 1024
MAX_EXAMPLES = 20


class DatasetExistsError(FileExistsError):
    """The output directory already holds a different dataset (or foreign files)."""


class ManifestError(ValueError):
    """A dataset directory has no readable / compatible manifest."""


class Manifest(dict):
    """The parsed ``_manifest.json`` (a plain dict) plus the directory it lives in."""

    def __init__(self, data: Mapping[str, Any], path: str | os.PathLike | None = None):
        super().__init__(data)
        self.path = Path(path) if path is not None else None

    @property
    def num_rows(self) -> int:
        return int(self["num_rows"])

    @property
    def content_hash(self) -> str:
        return self["content_hash"]

    @property
    def shard_paths(self) -> list[Path]:
        base = self.path if self.path is not None else Path(".")
        return [base / s["file"] for s in self["shards"]]

    def __repr__(self) -> str:  # keep reprs short: manifests can hold long skip lists
        return (
            f"Manifest(path={str(self.path)!r}, num_rows={self.get('num_rows')}, "
            f"content_hash={str(self.get('content_hash'))[:12]}…, shards={len(self.get('shards', []))})"
        )


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def content_hash_of(row_hashes: Iterable[str]) -> str:
    """The dataset content hash: sha256 over the sorted row sha256s joined by newlines."""
    return hashlib.sha256("\n".join(sorted(row_hashes)).encode()).hexdigest()


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class _ShardWriter:
    """Buffers rows, deduplicates by sha256 and flushes bounded Parquet shards into ``tmp_dir``."""

    def __init__(self, tmp_dir: Path, max_rows: int, max_bytes: int, row_group_size: int, dedup: bool):
        self.tmp_dir = tmp_dir
        self.max_rows = max(1, int(max_rows))
        self.max_bytes = max(1, int(max_bytes))
        self.row_group_size = max(1, int(row_group_size))
        self.dedup = dedup
        self.buffer: list[dict[str, Any]] = []
        self.buffer_bytes = 0
        self.seen: dict[str, str] = {}  # sha256 -> image_id of first occurrence
        self.row_hashes: list[str] = []
        self.dup_count = 0
        self.dup_examples: list[dict[str, str]] = []
        self.shards: list[dict[str, Any]] = []
        self.sources: Counter = Counter()
        self.units: Counter = Counter()
        self.labels: Counter = Counter()
        self.label_names: dict[int, str | None] = {}
        self.unlabelled = 0

    def add_row(self, row: Mapping[str, Any], where: str = "row") -> None:
        missing = [c for c in RBC_SCHEMA.names if c not in row and c not in ("sha256", "label", "label_name")]
        if missing:
            raise SchemaError(f"{where} ({row.get('image_id', '?')}): missing field(s) {missing}")
        if not isinstance(row["image"], (bytes, bytearray)) or not row["image"]:
            raise SchemaError(f"{where} ({row['image_id']}): field 'image' must be non-empty encoded bytes")
        sha = sha256_hex(row["image"])
        if row.get("sha256") is None:
            row = {**row, "sha256": sha}
        elif row["sha256"] != sha:
            raise SchemaError(f"{where} ({row['image_id']}): field 'sha256' does not match the image bytes")
        if row["unit"] not in UNITS:
            raise SchemaError(f"{where} ({row['image_id']}): field 'unit' has value {row['unit']!r}, expected one of {UNITS}")
        if sha in self.seen:
            self.dup_count += 1
            if len(self.dup_examples) < MAX_EXAMPLES:
                self.dup_examples.append({"image_id": row["image_id"], "duplicate_of": self.seen[sha]})
            return
        if self.dedup:
            self.seen[sha] = row["image_id"]
        self.row_hashes.append(sha)
        self.sources[row["source"]] += 1
        self.units[row["unit"]] += 1
        label = row.get("label")
        if label is None:
            self.unlabelled += 1
        else:
            self.labels[int(label)] += 1
            self.label_names.setdefault(int(label), row.get("label_name"))
        size = len(row["image"]) + 256  # image bytes + a rough allowance for the other columns
        if self.buffer and self.buffer_bytes + size > self.max_bytes:
            self.flush()  # keep shards under the byte bound (a single oversized row gets its own shard)
        self.buffer.append(row)
        self.buffer_bytes += size
        if len(self.buffer) >= self.max_rows:
            self.flush()

    def add_table(self, table: pa.Table, where: str) -> None:
        table = validate_table(table, where)
        for j, row in enumerate(table.to_pylist()):
            self.add_row(row, f"{where} row {j}")

    def flush(self) -> None:
        if not self.buffer:
            return
        table = rows_to_table(self.buffer)
        name = SHARD_PATTERN.format(len(self.shards))
        write_shard(table, self.tmp_dir / name, self.row_group_size)
        self.shards.append(
            {
                "file": name,
                "rows": table.num_rows,
                "bytes": (self.tmp_dir / name).stat().st_size,
                "sha256": file_sha256(self.tmp_dir / name),
            }
        )
        self.buffer = []
        self.buffer_bytes = 0


def write_shard(table: pa.Table, path: Path, row_group_size: int = DEFAULT_ROW_GROUP_SIZE) -> None:
    """Write one shard (a seam tests monkeypatch to simulate a crash mid-write)."""
    with open(path, "wb") as f:
        pq.write_table(table, f, row_group_size=row_group_size, compression="zstd", write_statistics=True)
        f.flush()
        os.fsync(f.fileno())


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def manifest_path(dataset_dir: str | os.PathLike) -> Path:
    """Where ``dataset_dir``'s manifest is (``_manifest.json``)."""
    return Path(dataset_dir) / MANIFEST_NAME


def check_output_dir(out_dir: str | os.PathLike, meta: Mapping[str, Any] | None = None, overwrite: bool = False) -> None:
    """Fail early when ``out_dir`` holds something a new dataset must not silently replace.

    OK: missing or empty dir, ``overwrite``, or an existing reddino dataset whose
    ``meta["config"]`` equals ``meta["config"]`` (a re-run; the final content check decides).
    """
    out = Path(out_dir)
    if overwrite or not out.exists() or _is_empty_dir(out):
        return
    if not out.is_dir():
        raise DatasetExistsError(f"output path {out} exists and is not a directory")
    mpath = manifest_path(out)
    if not mpath.exists():
        raise DatasetExistsError(
            f"output dir {out} is not empty and holds no {MANIFEST_NAME} (not a reddino dataset); "
            "choose another --out or pass --overwrite"
        )
    try:
        old = json.loads(mpath.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DatasetExistsError(f"output dir {out} holds an unreadable {MANIFEST_NAME} ({exc}); pass --overwrite") from exc
    new_cfg = (meta or {}).get("config")
    old_cfg = (old.get("meta") or {}).get("config")
    if _jsonable(new_cfg) != old_cfg:
        raise DatasetExistsError(
            f"output dir {out} already holds a different dataset ({old.get('num_rows')} rows, content hash "
            f"{str(old.get('content_hash'))[:12]}…, made with config {old_cfg}); choose another --out or pass --overwrite"
        )


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str)) if x is not None else None


def write_dataset(
    rows: Iterable[Mapping[str, Any] | pa.Table | pa.RecordBatch],
    out_dir: str | os.PathLike,
    meta: Mapping[str, Any] | None = None,
    *,
    classes: Mapping[int, str] | None = None,
    skipped: list[dict[str, str]] | None = None,
    overwrite: bool = False,
    dedup: bool = True,
    max_rows_per_shard: int = DEFAULT_MAX_ROWS_PER_SHARD,
    max_bytes_per_shard: int = DEFAULT_MAX_BYTES_PER_SHARD,
    row_group_size: int = DEFAULT_ROW_GROUP_SIZE,
) -> Manifest:
    """Write ``rows`` (row dicts and/or RBC_SCHEMA tables/batches) as shards + manifest into ``out_dir``.

    - ``meta``: provenance stored verbatim under ``manifest["meta"]``; by convention
      ``{"command": "...", "config": {...}}`` where ``config`` holds the options that determine the
      content (used to recognise a re-run into the same ``out_dir``).
    - ``classes``: the full class table ``{id: name}`` (kept even for classes with no rows).
    - ``skipped``: ``[{"file", "reason"}]`` recorded in the manifest; may be a list the ``rows``
      generator fills while it is consumed (it is read after the last row).
    - Duplicate images (same ``sha256``) are written once (first occurrence wins).

    Idempotence: if ``out_dir`` already holds a dataset with identical shards (same content, same
    order, same labels), the existing manifest is kept untouched and returned. If it holds a different
    dataset (or non-dataset files) a :class:`DatasetExistsError` is raised unless ``overwrite``.
    """
    out = Path(out_dir).absolute()
    check_output_dir(out, meta, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        writer = _ShardWriter(tmp, max_rows_per_shard, max_bytes_per_shard, row_group_size, dedup)
        for i, item in enumerate(rows):
            if isinstance(item, pa.RecordBatch):
                item = pa.Table.from_batches([item])
            if isinstance(item, pa.Table):
                writer.add_table(item, where=f"input table #{i}")
            else:
                writer.add_row(item, f"input row #{i}")
        writer.flush()

        class_table = {int(k): v for k, v in (classes or {}).items()}
        for lid, name in writer.label_names.items():
            if lid not in class_table:
                class_table[lid] = name
            elif name is not None and class_table[lid] != name:
                raise SchemaError(f"label {lid} is named {name!r} in the rows but {class_table[lid]!r} in the class table")
        manifest = {
            "format": MANIFEST_FORMAT,
            "schema_version": SCHEMA_VERSION,
            "num_rows": len(writer.row_hashes),
            "content_hash": content_hash_of(writer.row_hashes),
            "sources": dict(sorted(writer.sources.items())),
            "labels": {
                str(lid): {"name": class_table.get(lid), "count": writer.labels.get(lid, 0)}
                for lid in sorted(set(class_table) | set(writer.labels))
            },
            "unlabelled": writer.unlabelled,
            "units": dict(sorted(writer.units.items())),
            "classes": {str(k): class_table[k] for k in sorted(class_table)},
            "shards": writer.shards,
            "duplicates": {"count": writer.dup_count, "examples": writer.dup_examples},
            "skipped": list(skipped or []),
            "meta": _jsonable(dict(meta or {})),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        _write_json_atomic(tmp / MANIFEST_NAME, manifest)
        fsync_dir(tmp)

        if manifest_path(out).exists():
            try:
                old = json.loads(manifest_path(out).read_text())
            except (OSError, json.JSONDecodeError):
                old = None
            if old is not None and _same_dataset(old, manifest) and _shards_intact(out, old):
                shutil.rmtree(tmp, ignore_errors=True)
                return Manifest(old, out)
            if not overwrite:
                old_hash = str((old or {}).get("content_hash"))
                why = (
                    "same images but different labels/groups/sources/order"
                    if old_hash == manifest["content_hash"]
                    else f"content hash {old_hash[:12]}… vs new {manifest['content_hash'][:12]}…"
                )
                raise DatasetExistsError(
                    f"output dir {out} already holds a different dataset ({why}); choose another --out or pass --overwrite"
                )
        swap_dir_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Manifest(manifest, out)


def _same_dataset(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    return (
        old.get("schema_version") == new["schema_version"]
        and old.get("content_hash") == new["content_hash"]
        and [s.get("sha256") for s in old.get("shards", [])] == [s["sha256"] for s in new["shards"]]
        and old.get("classes") == new["classes"]
        and old.get("skipped", []) == new["skipped"]
    )


def _shards_intact(out: Path, old: Mapping[str, Any]) -> bool:
    for s in old.get("shards", []):
        p = out / s["file"]
        if not p.exists() or p.stat().st_size != s.get("bytes", p.stat().st_size):
            return False
    return True


def read_manifest(path: str | os.PathLike, *, verify: bool = False) -> Manifest:
    """Read ``DIR/_manifest.json`` (``path`` may be the dir or the manifest file itself).

    Raises :class:`ManifestError` naming the dir when it is missing, unreadable or has another
    schema version. With ``verify`` the shards are checked too (:func:`verify_dataset`, without decoding).
    """
    p = Path(path)
    mpath = p if p.name == MANIFEST_NAME else manifest_path(p)
    d = mpath.parent
    if not d.exists():
        raise ManifestError(f"dataset dir {d} does not exist")
    if not mpath.exists():
        raise ManifestError(f"dataset dir {d} has no {MANIFEST_NAME} (not a reddino dataset, or an unfinished write)")
    try:
        data = json.loads(mpath.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{mpath}: unreadable manifest ({exc})") from exc
    if not isinstance(data, dict) or "shards" not in data or "schema_version" not in data:
        raise ManifestError(f"{mpath}: not a reddino manifest (no 'shards'/'schema_version')")
    if data["schema_version"] != SCHEMA_VERSION:
        raise ManifestError(
            f"{mpath}: schema version {data['schema_version']!r} does not match this reddino's {SCHEMA_VERSION}; re-ingest the data"
        )
    m = Manifest(data, d)
    if verify:
        verify_dataset(d, decode=False)
    return m


def verify_dataset(path: str | os.PathLike, *, decode: bool = True, progress=None) -> Manifest:
    """Check a dataset against its manifest, not only the manifest itself: every shard exists, has the listed
    size and sha256, reads as Parquet with the reddino schema and the listed row count, the rows add up to the
    manifest's, and (``decode``) every image decodes. Raises :class:`ManifestError` naming the file and row."""
    import pyarrow.parquet as pq

    from reddino.data.images import ImageDecodeError, decode_image
    from reddino.data.schema import RBC_SCHEMA

    m = read_manifest(path)
    d = m.path
    total = 0
    for s in m["shards"]:
        sp = d / s["file"]
        if not sp.exists():
            raise ManifestError(f"{sp}: listed in the manifest but missing")
        if "bytes" in s and sp.stat().st_size != s["bytes"]:
            raise ManifestError(f"{sp}: {sp.stat().st_size} bytes, the manifest says {s['bytes']} (truncated?)")
        if file_sha256(sp) != s["sha256"]:
            raise ManifestError(f"{sp}: content does not match its sha256 in the manifest")
        try:
            table = pq.read_table(sp)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a damaged file
            raise ManifestError(f"{sp}: not readable as Parquet ({exc})") from exc
        missing = [f.name for f in RBC_SCHEMA if f.name not in table.column_names]
        if missing:
            raise ManifestError(f"{sp}: column(s) {', '.join(missing)} missing from the reddino schema")
        if "rows" in s and table.num_rows != s["rows"]:
            raise ManifestError(f"{sp}: {table.num_rows} rows, the manifest says {s['rows']}")
        total += table.num_rows
        if decode:
            ids = table.column("image_id").to_pylist()
            for i, blob in enumerate(table.column("image").to_pylist()):
                try:
                    decode_image(blob)
                except (ImageDecodeError, ValueError) as exc:
                    raise ManifestError(f"{sp}: row {i} ({ids[i]}) does not decode: {exc}") from exc
        if progress is not None:
            progress(table.num_rows)
    if total != m["num_rows"]:
        raise ManifestError(f"{d}: shards hold {total} rows, the manifest says {m['num_rows']}")
    return m


def manifest_hash(path: str | os.PathLike) -> str:
    """The dataset content hash (sha256 over sorted row sha256s) recorded in the dataset's manifest."""
    return read_manifest(path)["content_hash"]


__all__ = [
    "Manifest",
    "ManifestError",
    "DatasetExistsError",
    "MANIFEST_NAME",
    "manifest_path",
    "write_dataset",
    "read_manifest",
    "manifest_hash",
    "verify_dataset",
    "content_hash_of",
    "check_output_dir",
    "RBC_SCHEMA",
]
