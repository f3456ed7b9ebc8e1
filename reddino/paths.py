"""Where reddino keeps its files on this machine, and how it writes them.

Everything local lives under one home folder: ``$REDDINO_HOME``, else ``~/.reddino`` (read at call time, so a
test or a job can point it elsewhere). Files are written under a temporary name in the target's own folder and
renamed into place, so a reader never sees half a file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator


def home() -> Path:
    return Path(os.environ.get("REDDINO_HOME", "~/.reddino")).expanduser()


def runs_dir() -> Path:
    """Default ``train.storage_path``: one folder per pretraining run (checkpoints, export, curves)."""
    return home() / "runs"


def sweeps_dir() -> Path:
    return home() / "sweeps"


def exports_dir() -> Path:
    """Local copies of backbones exported by runs whose storage is remote."""
    return home() / "exports"


def feature_cache() -> Path:
    return home() / "cache" / "features"


def model_cache() -> Path:
    """MLflow artifacts downloaded for ``models:/`` references."""
    return home() / "cache" / "models"


def mlflow_db() -> Path:
    return home() / "mlflow.db"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed onto ``path`` when the block succeeds, removed if not."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    """A matplotlib figure as PNG, renamed into place when complete."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    return Path(path)


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def swap_dir_into_place(tmp: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Rename a finished temp dir to ``out``; previous content of ``out`` is moved aside first and removed only
    after the rename, so ``out`` is always either the old or the new version, never half of one."""
    tmp, out = Path(tmp), Path(out)
    if out.exists():
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        else:
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out, old)
            os.rename(tmp, out)
            fsync_dir(out.parent)
            shutil.rmtree(old, ignore_errors=True)
            return out
    os.rename(tmp, out)
    fsync_dir(out.parent)
    return out
