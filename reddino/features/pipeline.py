"""Running a frozen model over a dataset's shards, shard by shard into the store.

Two engines, one contract (finished shards handed to :func:`reddino.features.store.assemble_shard`):

* ``ray``: the Ray Data inference pipeline, ``map_batches`` with a callable class that holds the model on each
  actor (one GPU per actor where the cluster has GPUs, bf16 where native);
* ``local``: the same forward pass in this process, for small sets where starting actors costs more than it saves.

Both decode every image on its own (one that does not decode is reported, not fatal) and compute the vectors with
:func:`reddino.features.extract.extract_features`, so the engines agree to float rounding.
"""

from __future__ import annotations

import logging
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .store import assemble_shard

ENGINES = ("ray", "local")
ShardDone = Callable[[str, dict], None]  # (input shard file, its output record)


@dataclass
class Pass:
    """One embedding pass: the model and how its vectors are made and stored."""

    net: Any
    img_size: int | None
    pooling: str
    batch_size: int
    precision: str
    dtype: str
    work: Path
    keep: frozenset[str] | None = None  # rows to embed (``image_id|sha256``); None: every row


def row_keys_of(table: pa.Table) -> list[str]:
    return [f"{a}|{b}" for a, b in zip(table.column("image_id").to_pylist(), table.column("sha256").to_pylist())]


def keep_mask(table: pa.Table, keep: frozenset[str] | None) -> np.ndarray:
    if keep is None:
        return np.ones(table.num_rows, dtype=bool)
    return np.array([k in keep for k in row_keys_of(table)], dtype=bool)


def decode_all(blobs: list) -> tuple[list[np.ndarray], np.ndarray, list[str]]:
    """Decoded images of the rows that decode, which did, and why the others did not."""
    from reddino.data.images import ImageDecodeError, decode_image  # noqa: PLC0415

    images, ok, errors = [], np.zeros(len(blobs), dtype=bool), [""] * len(blobs)
    for i, blob in enumerate(blobs):
        try:
            images.append(decode_image(blob))
            ok[i] = True
        except (ImageDecodeError, ValueError) as exc:
            errors[i] = str(exc)
    return images, ok, errors


def _embed_rows(p: Pass, blobs: list, device: Any, on_batch=None) -> tuple[np.ndarray, list[str], np.ndarray]:
    from .extract import extract_features  # noqa: PLC0415

    images, ok, errors = decode_all(blobs)
    feats = extract_features(p.net, images, p.img_size, p.batch_size, device, pooling=p.pooling,
                             precision=p.precision, on_batch=on_batch)
    full = np.zeros((len(blobs), feats.shape[1]), dtype=np.float32)  # extract_features knows D even for 0 rows
    full[ok] = feats
    return ok, errors, full


# ----------------------------------------------------------------------------------------------------------------
# Where the forward pass runs
# ----------------------------------------------------------------------------------------------------------------


def ensure_ray(num_cpus: int | None = None) -> bool:
    """Start a local Ray if none is running; returns True when this call started it."""
    import ray  # noqa: PLC0415

    from reddino.runtime import init_ray, verbose  # noqa: PLC0415

    if ray.is_initialized():
        return False
    # Ray's "Started a local Ray instance" INFO line is not news to someone embedding cells.
    init_ray(num_cpus=num_cpus, announce=False, log_to_driver=False,
             **({} if verbose() else {"logging_level": logging.WARNING}))
    return True


def placement(concurrency: int, num_cpus: int | None) -> tuple[dict[str, Any], str, int | None]:
    """Ray resources of each actor, its device, and its torch threads (None: torch's default)."""
    import ray  # noqa: PLC0415

    if ray.cluster_resources().get("GPU", 0) >= 1:
        return {"num_gpus": 1, "num_cpus": 1}, "cuda", None
    cluster = int(ray.cluster_resources().get("CPU", 1))
    usable = max(1, min(int(num_cpus or cluster), cluster))
    # Leave one CPU to the Parquet read tasks, or the pipeline waits forever on a small machine; torch still
    # gets every usable core (decoding is light next to the forward pass).
    per_actor = max(1, (usable - 1) // concurrency)
    return {"num_cpus": per_actor}, "cpu", max(1, usable // concurrency)


def planned_device(net: Any, engine: str, device: Any = None) -> Any:
    """Where the forward passes will run, known without starting Ray (for the precision, part of the job)."""
    from .extract import is_extractor, model_device, unwrap_ddp  # noqa: PLC0415

    if is_extractor(net):
        return "cpu"
    if engine == "local":
        return device if device is not None else model_device(unwrap_ddp(net))
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return "cuda" if ray.cluster_resources().get("GPU", 0) >= 1 else "cpu"
    import torch  # noqa: PLC0415

    return "cuda" if torch.cuda.is_available() else "cpu"  # ensure_ray starts a local Ray on this machine


# ----------------------------------------------------------------------------------------------------------------
# In process
# ----------------------------------------------------------------------------------------------------------------


def run_local(p: Pass, data: Path, pending: list[dict], metas: dict[str, pa.Table], *, device: Any,
              on_rows: Callable[[int], None], on_done: ShardDone) -> None:
    for shard in pending:
        table = pq.read_table(data / shard["file"], columns=["image", "image_id", "sha256"])
        mask = keep_mask(table, p.keep)
        blobs = table.column("image").filter(pa.array(mask)).to_pylist() if not mask.all() else \
            table.column("image").to_pylist()
        ok, errors, vectors = _embed_rows(p, blobs, device, on_batch=on_rows)
        on_rows(len(blobs) - int(ok.sum()))  # rows that did not decode count as done too
        on_done(shard["file"], assemble_shard(p.work, shard, metas[shard["file"]], ok, errors, vectors, p.dtype))


# ----------------------------------------------------------------------------------------------------------------
# Ray Data
# ----------------------------------------------------------------------------------------------------------------


class EmbedUDF:
    """``map_batches`` callable class: holds the model on its actor, decodes and embeds pyarrow batches."""

    def __init__(self, p: Pass, device: str = "cpu", num_threads: int | None = None):
        import torch  # noqa: PLC0415

        from .extract import is_extractor  # noqa: PLC0415

        if num_threads:
            torch.set_num_threads(int(num_threads))
        if not is_extractor(p.net):
            p.net = p.net.to(device).eval()
        self.p, self.device = p, device

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        mask = keep_mask(batch, self.p.keep)
        if not mask.all():
            batch = batch.filter(pa.array(mask))
        ok, errors, full = _embed_rows(self.p, batch.column("image").to_pylist(), self.device)
        return {
            "shard": np.array([Path(s).name for s in batch.column("path").to_pylist()], dtype=object),
            "key": np.array(row_keys_of(batch), dtype=object),
            "ok": ok,
            "error": np.array(errors, dtype=object),
            "embedding": full,
        }


def run_ray(p: Pass, data: Path, pending: list[dict], metas: dict[str, pa.Table], *, concurrency: int,
            num_cpus: int | None, on_rows: Callable[[int], None], on_done: ShardDone) -> None:
    """The pending shards through an actor pool; each shard is handed on as soon as all its rows are back."""
    from ray.data import DataContext  # noqa: PLC0415

    by_name = {s["file"]: s for s in pending}
    got: dict[str, dict[str, list]] = {name: {} for name in by_name}
    seen = {name: 0 for name in by_name}
    # Rows in input-file order, so shards finish (are written, and skipped by a rerun) one after another instead
    # of all at the very end; restored when this pass ends.
    opts = DataContext.get_current().execution_options
    keep_order, opts.preserve_order = opts.preserve_order, True
    try:
        for batch in _stream(p, [str(data / s["file"]) for s in pending], concurrency, num_cpus):
            for name, key, ok, err, vec in zip(batch["shard"], batch["key"], batch["ok"], batch["error"],
                                               batch["embedding"]):
                got[name].setdefault(key, []).append((bool(ok), str(err), vec))
                seen[name] += 1
            on_rows(len(batch["key"]))
            for name in [n for n in got if seen[n] == metas[n].num_rows]:
                on_done(name, _assemble(p, by_name[name], metas[name], got.pop(name)))
    finally:
        opts.preserve_order = keep_order
    if got:
        missing = ", ".join(f"{n} ({seen[n]}/{metas[n].num_rows} rows)" for n in got)
        raise RuntimeError(f"Ray Data returned incomplete shards: {missing}")


def _stream(p: Pass, files: list[str], concurrency: int, num_cpus: int | None):
    import ray  # noqa: PLC0415

    resources, device, threads = placement(concurrency, num_cpus)
    ds = ray.data.read_parquet(files, include_paths=True).select_columns(["image", "image_id", "sha256", "path"])
    with warnings.catch_warnings():
        # `max_restarts` has no named map_batches parameter in Ray 2.60 (only the deprecated **ray_remote_args).
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        ds = ds.map_batches(
            EmbedUDF,
            fn_constructor_kwargs={"p": p, "device": device, "num_threads": threads},
            batch_size=p.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=concurrency),
            # An actor restart would need its constructor args (the model) from the object store, which Ray warns
            # may be gone; a lost actor fails the pass instead, and rerunning the command resumes at the shard.
            max_restarts=0,
            **resources,
        )
    yield from ds.iter_batches(batch_size=None, batch_format="numpy")


def _assemble(p: Pass, shard: dict, meta: pa.Table, rows: dict[str, list]) -> dict:
    """Put a shard's rows back into the input shard's order and write it."""
    keys = row_keys_of(meta)
    dim = next((len(v) for lst in rows.values() for ok, _, v in lst if ok), 0)
    ok = np.zeros(len(keys), dtype=bool)
    errors, vectors = [""] * len(keys), np.zeros((len(keys), dim), dtype=np.float32)
    for i, key in enumerate(keys):
        ok[i], errors[i], vec = rows[key].pop(0)
        if ok[i]:
            vectors[i] = vec
    return assemble_shard(p.work, shard, meta, ok, errors, vectors, p.dtype)
