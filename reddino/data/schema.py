"""The one-row-per-image table every reddino dataset is stored as.

A row is one image: a single-cell crop (``unit="cell"``) or a fixed-size smear tile
(``unit="patch"``). ``image`` holds the encoded bytes (PNG/JPEG/zstd TIFF as stored; crops and tiles are
encoded once at ingest), ``sha256`` is the hex digest of exactly those bytes, and ``image_id``
says where the pixels came from (original file name plus crop coordinates).
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

SCHEMA_VERSION = 1

UNITS = ("cell", "patch")

RBC_SCHEMA = pa.schema(
    [
        pa.field("image", pa.binary(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("group", pa.string(), nullable=False),
        pa.field("label", pa.int32(), nullable=True),
        pa.field("label_name", pa.string(), nullable=True),
        pa.field("unit", pa.string(), nullable=False),
        pa.field("sha256", pa.string(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
    ],
    metadata={b"reddino.schema_version": str(SCHEMA_VERSION).encode()},
)

COLUMNS = tuple(RBC_SCHEMA.names)

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class SchemaError(ValueError):
    """A table, row or manifest does not match the reddino RBC schema."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_row(
    image: bytes,
    *,
    height: int,
    width: int,
    source: str,
    group: str,
    unit: str,
    image_id: str,
    label: int | None = None,
    label_name: str | None = None,
    sha256: str | None = None,
) -> dict[str, Any]:
    """One schema row as a dict (``sha256`` computed from ``image`` unless given)."""
    return {
        "image": image,
        "height": int(height),
        "width": int(width),
        "source": source,
        "group": group,
        "label": None if label is None else int(label),
        "label_name": label_name,
        "unit": unit,
        "sha256": sha256 or sha256_hex(image),
        "image_id": image_id,
    }


def rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Build a schema-typed table from row dicts (raises :class:`SchemaError` on a bad row)."""
    try:
        return pa.Table.from_pylist(rows, schema=RBC_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowTypeError, KeyError, TypeError) as exc:
        raise SchemaError(f"rows do not fit RBC_SCHEMA: {exc}") from exc


def validate_table(table: pa.Table, where: str = "<table>", *, check_hashes: bool = False) -> pa.Table:
    """Check ``table`` against :data:`RBC_SCHEMA`; return it with the canonical column order/types.

    Raises :class:`SchemaError` whose message names ``where`` (a file or dataset) and the field.
    Compatible types (e.g. int64 heights, large_binary images) are cast; missing columns,
    uncastable types, nulls in non-nullable fields, unknown ``unit`` values and malformed
    ``sha256`` values are errors. With ``check_hashes`` the digests are recomputed too.
    """
    names = set(table.column_names)
    missing = [f.name for f in RBC_SCHEMA if f.name not in names]
    if missing:
        raise SchemaError(f"{where}: missing field(s) {missing} (have {table.column_names})")
    extra = sorted(names - set(COLUMNS))
    if extra:
        raise SchemaError(f"{where}: unexpected field(s) {extra}")
    arrays = []
    for field in RBC_SCHEMA:
        col = table.column(field.name)
        if not col.type.equals(field.type):
            try:
                col = col.cast(field.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
                raise SchemaError(
                    f"{where}: field '{field.name}' has type {col.type}, expected {field.type} ({exc})"
                ) from exc
        if not field.nullable and col.null_count:
            raise SchemaError(f"{where}: field '{field.name}' has {col.null_count} null value(s)")
        arrays.append(col)
    out = pa.Table.from_arrays(arrays, schema=RBC_SCHEMA)
    if out.num_rows:
        bad_unit = pc.invert(pc.is_in(out.column("unit"), value_set=pa.array(UNITS)))
        if pc.any(bad_unit).as_py():
            value = pc.filter(out.column("unit"), bad_unit)[0].as_py()
            raise SchemaError(f"{where}: field 'unit' has value {value!r}, expected one of {UNITS}")
        shas = out.column("sha256").to_pylist()
        for i, s in enumerate(shas):
            if not _HEX64.match(s):
                raise SchemaError(f"{where}: field 'sha256' row {i} is not a 64-char lowercase hex digest: {s!r}")
        for name in ("height", "width"):
            if pc.any(pc.less_equal(out.column(name), 0)).as_py():
                raise SchemaError(f"{where}: field '{name}' has non-positive values")
        if check_hashes:
            for i, (img, s) in enumerate(zip(out.column("image").to_pylist(), shas)):
                if sha256_hex(img) != s:
                    raise SchemaError(f"{where}: field 'sha256' row {i} does not match the image bytes")
    return out
