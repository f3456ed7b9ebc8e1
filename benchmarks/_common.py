"""Shared helpers of the benchmark scripts (not part of the reddino package)."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

WORK_DIR = Path(tempfile.gettempdir()) / "reddino-bench"


def env_setup() -> None:
    """Before Ray is imported: loopback only, no telemetry, no progress bars."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def loadavg() -> str:
    try:
        one, five, fifteen = os.getloadavg()
        return f"load {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} cores"
    except OSError:
        return "load n/a"


def header(name: str) -> None:
    import torch

    print(f"== {name} | python {platform.python_version()} torch {torch.__version__} | {platform.machine()} "
          f"{os.cpu_count()} cores | {loadavg()}", flush=True)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg} | {loadavg()}", flush=True)


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def synthetic_patches(n_images: int, size: int = 224, root: Path | None = None) -> Path:
    """A cached synthetic smear-patch dataset of ~``n_images`` rows (3 sources); generation is not timed."""
    from reddino.data import generate_synthetic

    per_source = max(1, -(-n_images // 3))
    out = (root or WORK_DIR) / f"synth_patches_{per_source}x3_{size}"
    if not (out / "_manifest.json").is_file():
        t = time.perf_counter()
        generate_synthetic(out, n_per_class=1, sources=3, unit="patch", seed=0, patch_size=size,
                           n_patches=per_source, overwrite=True)
        log(f"generated {per_source * 3} synthetic {size} px patches in {time.perf_counter() - t:.1f} s "
            f"(not timed) -> {out}")
    return out


def reencoded(blobs: list[bytes], fmt: str) -> list[bytes]:
    """The same images re-encoded as ``fmt`` (as ``reddino ingest --encode fmt`` stores them), pixels checked equal."""
    import numpy as np

    from reddino.data.images import decode_for_size, encode_image

    out = []
    for b in blobs:
        rgb = decode_for_size(b, None)
        e = encode_image(rgb, fmt)
        assert np.array_equal(decode_for_size(e, None), rgb), f"{fmt} changed the pixels"
        out.append(e)
    return out


def ratio_line(name: str, value: float, goal: str, met: bool | None, extra: str = "") -> None:
    verdict = "n/a" if met is None else ("MET" if met else "NOT MET")
    print(f"RATIO {name} = {value:.3f} (goal {goal}: {verdict}){(' ' + extra) if extra else ''} | {loadavg()}",
          flush=True)


def flush_exit(code: int = 0) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
