"""Data access for evaluation: thin wrappers over ``reddino.data`` with local fallbacks.

The evaluation harness only needs four things from a Parquet dataset dir: its content hash (for the
feature cache), its metadata columns (labels, groups, sources), its encoded images, and a decoder.
``reddino.data`` owns all of these; the fallbacks here read the same layout directly with pyarrow so
the harness keeps working on any dir that follows the schema (Parquet files + ``manifest.json``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

META_COLUMNS = ("source", "group", "label", "label_name", "unit", "sha256", "image_id")


def _data_module():
    try:
        import reddino.data as data  # noqa: PLC0415

        return data
    except Exception:  # pragma: no cover - depends on the parallel data layer
        return None


def _data_fn(name: str):
    mod = _data_module()
    return getattr(mod, name, None) if mod is not None else None


def parquet_files(path: str | Path) -> list[Path]:
    """Every ``*.parquet`` file under ``path`` (or ``path`` itself), sorted."""
    path = Path(path).expanduser()
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*.parquet") if p.is_file())
    if not files:
        raise FileNotFoundError(f"no *.parquet files under {path}")
    return files


def manifest_hash(path: str | Path) -> str:
    """Content hash of a dataset dir: ``reddino.data.manifest_hash`` or the manifest file's bytes.

    Without a manifest, the names, sizes and modification times of the Parquet files stand in.
    """
    fn = _data_fn("manifest_hash")
    if fn is not None:
        try:
            return str(fn(path))
        except Exception:  # fall through to the local rule
            pass
    path = Path(path).expanduser()
    manifest = path / "manifest.json" if path.is_dir() else path.with_name("manifest.json")
    h = hashlib.sha256()
    if manifest.is_file():
        h.update(manifest.read_bytes())
    else:
        for f in parquet_files(path):
            st = f.stat()
            h.update(f"{f.relative_to(path) if path.is_dir() else f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def read_manifest(path: str | Path) -> dict[str, Any]:
    path = Path(path).expanduser()
    manifest = path / "manifest.json" if path.is_dir() else path.with_name("manifest.json")
    if manifest.is_file():
        try:
            return json.loads(manifest.read_text())
        except json.JSONDecodeError:
            return {}
    return {}


def load_table(path: str | Path, columns: Sequence[str] | None = None) -> pa.Table:
    """All rows of one dataset dir as a pyarrow table (only ``columns`` if given), in file order."""
    fn = _data_fn("load_table")
    if fn is not None:
        try:
            return fn([str(path)], columns=list(columns) if columns else None)
        except Exception:  # e.g. an extra column the data layer does not know: read it directly
            pass
    import pyarrow.parquet as pq  # noqa: PLC0415

    tables = []
    for f in parquet_files(path):
        pf = pq.ParquetFile(f)
        cols = [c for c in columns if c in pf.schema_arrow.names] if columns else None
        tables.append(pf.read(columns=cols))
    table = pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]
    return table


def decode_image(data: bytes) -> np.ndarray:
    """Encoded bytes -> HxWx3 uint8 RGB: the data layer's decoder (format detected from the bytes)."""
    from reddino.data import decode_image as _decode  # noqa: PLC0415

    return _decode(data)


def read_ray_dataset(paths: Sequence[str | Path], columns: Sequence[str] | None = None):
    """A ``ray.data.Dataset`` over the dirs (``reddino.data.read_rbc_dataset``: manifests checked)."""
    from reddino.data import read_rbc_dataset  # noqa: PLC0415

    return read_rbc_dataset([str(p) for p in paths], columns=list(columns) if columns else None)
