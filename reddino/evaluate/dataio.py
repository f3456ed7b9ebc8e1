"""Data access for evaluation: the four things the harness needs from ``reddino.data``.

A dataset dir's content hash (feature-cache key), its metadata columns, its encoded images (in memory
or as a Ray dataset) and the image decoder. Errors are the data layer's own (they name the file or
column); nothing is swallowed here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa


def manifest_hash(path: str | Path) -> str:
    """The dataset's content hash from its manifest (``reddino.data.manifest_hash``)."""
    from reddino.data import manifest_hash as _hash  # noqa: PLC0415

    return str(_hash(Path(path).expanduser()))


def load_table(path: str | Path, columns: Sequence[str] | None = None) -> pa.Table:
    """All rows of one dataset dir as a pyarrow table (only ``columns`` if given), in file order."""
    from reddino.data import load_table as _load  # noqa: PLC0415

    return _load([str(Path(path).expanduser())], columns=list(columns) if columns else None)


def decode_image(data: bytes) -> np.ndarray:
    """Encoded bytes -> HxWx3 uint8 RGB: the data layer's decoder (format detected from the bytes)."""
    from reddino.data import decode_image as _decode  # noqa: PLC0415

    return _decode(data)


def read_ray_dataset(paths: Sequence[str | Path], columns: Sequence[str] | None = None):
    """A ``ray.data.Dataset`` over the dirs (``reddino.data.read_rbc_dataset``: manifests checked)."""
    from reddino.data import read_rbc_dataset  # noqa: PLC0415

    return read_rbc_dataset([str(p) for p in paths], columns=list(columns) if columns else None)
