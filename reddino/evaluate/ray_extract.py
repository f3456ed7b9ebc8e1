"""Ray Data batch inference over the Parquet shards: ``map_batches`` with a callable class that holds
the model on one actor (one GPU when the cluster has any). Ray is imported only when used."""

from __future__ import annotations

import logging
import warnings
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from reddino.data import read_rbc_dataset
from reddino.runtime import init_ray, quiet_data_progress, verbose

from .extract import extract_features, is_extractor


class FeatureUDF:
    """``map_batches`` callable class: holds the model on its actor and embeds pyarrow batches.

    Keeps only rows whose ``image_id|sha256`` key is in ``keep`` (all labelled rows when ``None``) and
    returns ``features`` plus the key of every embedded row, so the driver can re-align them.
    """

    def __init__(self, model, img_size, pooling="cls", batch_size=64, device=None, keep=None, num_threads=None,
                 precision="fp32"):
        if num_threads:
            torch.set_num_threads(int(num_threads))
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        self.model = model
        if not is_extractor(model):
            self.model = model.to(device).eval()
        self.img_size, self.pooling, self.batch_size, self.precision = img_size, pooling, batch_size, precision
        self.keep = set(keep) if keep is not None else None

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        has_label = "label" in batch.column_names
        ids = batch.column("image_id").to_pylist() if "image_id" in batch.column_names else [""] * batch.num_rows
        shas = batch.column("sha256").to_pylist() if "sha256" in batch.column_names else [""] * batch.num_rows
        keys = [f"{a}|{b}" for a, b in zip(ids, shas)]
        if self.keep is not None:
            rows = [i for i, k in enumerate(keys) if k in self.keep]
        elif has_label:
            rows = np.nonzero(pc.is_valid(batch.column("label")).to_numpy(zero_copy_only=False))[0].tolist()
        else:
            rows = list(range(batch.num_rows))
        images = batch.column("image").take(pa.array(rows, type=pa.int64())).to_pylist() if rows else []
        feats = extract_features(
            self.model, images, self.img_size, self.batch_size, self.device, pooling=self.pooling,
            precision=self.precision,
        )
        return {"features": feats, "key": np.array([keys[i] for i in rows], dtype=object)}


def ray_device() -> str:
    """Where the extraction actor runs on the connected Ray cluster: one GPU if it has any, else CPU."""
    import ray  # noqa: PLC0415

    return "cuda" if ray.cluster_resources().get("GPU", 0) >= 1 else "cpu"


def _ray_resources(num_cpus: float | None) -> tuple[dict[str, Any], str | None]:
    if ray_device() == "cuda":
        return {"num_gpus": 1, "num_cpus": 1}, "cuda"
    return {"num_cpus": max(1, int(num_cpus or 1))}, "cpu"


def ensure_ray(num_cpus: int | None = None) -> bool:
    """Start a local Ray if none is running; returns True when this call started it."""
    import ray  # noqa: PLC0415

    if ray.is_initialized():
        return False
    # Ray's "Started a local Ray instance" INFO line is not news to someone embedding cells.
    init_ray(num_cpus=num_cpus, announce=False, log_to_driver=False, **({} if verbose() else {"logging_level": logging.WARNING}))
    return True


def run_extraction_ray(
    model, data_dir, keys: list[str], img_size, pooling, batch_size, *, num_cpus=None, on_batch=None, all_labelled=True,
    precision="fp32",
) -> dict[str, np.ndarray]:
    """Features of the labelled rows of ``data_dir`` (or of the rows ``keys`` unless ``all_labelled``), by row key."""
    import ray  # noqa: PLC0415

    ensure_ray(num_cpus)
    quiet_data_progress()
    cluster_cpus = int(ray.cluster_resources().get("CPU", 1))
    usable = max(1, min(int(num_cpus or cluster_cpus), cluster_cpus))
    # One actor; reserve all but one CPU for it and leave that one to the Parquet read tasks, or the
    # pipeline deadlocks on small machines. Torch still gets every usable core: decoding/reading is
    # light next to the forward pass, so the reserved CPU count would under-use a 2-core machine.
    actor_cpus = max(1, usable - 1)
    resources, device = _ray_resources(actor_cpus)
    threads = usable if device == "cpu" else None
    ds = read_rbc_dataset([data_dir], columns=["image", "image_id", "sha256", "label"])
    with warnings.catch_warnings():
        # `max_restarts` has no named map_batches parameter in Ray 2.60 (only the deprecated **ray_remote_args).
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        ds = ds.map_batches(
            FeatureUDF,
            fn_constructor_kwargs={
                "model": model,
                "img_size": img_size,
                "pooling": pooling,
                "batch_size": batch_size,
                "device": device,
                "keep": None if all_labelled else keys,
                "num_threads": threads,
                "precision": precision,
            },
            batch_size=max(batch_size, 64),
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=1),
            max_restarts=0,  # a lost actor fails the pass (rerun: the cache keeps nothing half-done); no restart warning
            **resources,
        )
    got: dict[str, np.ndarray] = {}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for k, f in zip(batch["key"].tolist(), batch["features"]):
            got[str(k)] = f
        if on_batch:
            on_batch(len(batch["key"]))
    return got
