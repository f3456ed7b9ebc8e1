"""Frozen features of a backbone over a labelled dataset, with a content-keyed cache.

Two paths share one preprocessing + pooling implementation (:func:`extract_features`):

* :func:`compute_features` - Ray Data batch inference over the Parquet shards (``map_batches`` with a
  callable class that holds the model, on an actor pool, one GPU per actor when the cluster has
  GPUs), cached as ``.npz`` keyed by (model hash, data manifest hash, pooling, image size, row
  selection). Re-evaluating the same model on the same data is a file read.
* in process (``use_ray=False``, and :func:`reddino.evaluate.knn_score` inside a training worker).

Images are decoded as RGB, resized to the model's square input size (area interpolation when
shrinking, bicubic when enlarging) and ImageNet-normalised; the feature is the final-norm CLS token
(``pooling="cls"``) or CLS concatenated with the mean patch token (``pooling="cls+mean"``).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pyarrow as pa

from reddino.data import load_table, manifest_hash, read_rbc_dataset
from reddino.data.images import normalize_chw, resize_square, to_rgb_list

from reddino.model.backbone import model_img_size


def is_extractor(model: Any) -> bool:
    """A non-network feature extractor (``extract`` method) rather than a torch module."""
    return callable(getattr(model, "extract", None)) and not hasattr(model, "forward_features")

POOLINGS = ("cls", "cls+mean", "mean")
PRECISIONS = ("auto", "fp32", "bf16")
CACHE_VERSION = 1
DEFAULT_CACHE_DIR = "default"  # resolved at call time to reddino.paths.feature_cache() ($REDDINO_HOME)
RAY_MIN_ROWS = 5000  # use_ray=None: below this many rows, in-process extraction beats starting Ray actors


# --------------------------------------------------------------------------------------------------
# Preprocessing and the in-process extractor
# --------------------------------------------------------------------------------------------------


def preprocess(images: Sequence[np.ndarray], img_size: int) -> np.ndarray:
    """RGB uint8 crops -> ``[B, 3, S, S]`` float32, ImageNet-normalised (the training normalisation)."""
    batch = np.stack([resize_square(np.ascontiguousarray(im[..., :3]), img_size) for im in images])
    return normalize_chw(batch)


def _unwrap(model):
    try:
        from torch.nn.parallel import DistributedDataParallel  # noqa: PLC0415

        if isinstance(model, DistributedDataParallel):
            return model.module
    except Exception:  # pragma: no cover
        pass
    return model


def pool_tokens(model, tokens, pooling: str = "cls"):
    """CLS / mean patch / CLS+mean from ``forward_features`` tokens ``[B, prefix+N, D]``."""
    import torch  # noqa: PLC0415

    if tokens.ndim == 2:  # the model already pooled
        return tokens
    n_prefix = int(getattr(model, "num_prefix_tokens", 1 if getattr(model, "cls_token", None) is not None else 0))
    cls = tokens[:, 0]
    patches = tokens[:, n_prefix:] if tokens.shape[1] > n_prefix else tokens
    if pooling == "cls":
        return cls
    if pooling == "mean":
        return patches.mean(1)
    if pooling == "cls+mean":
        return torch.cat([cls, patches.mean(1)], dim=1)
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


def resolve_precision(precision: str, device: Any) -> str:
    """``auto`` → ``bf16`` where the device computes bfloat16 natively (CUDA with bf16, CPUs with
    AVX512-BF16/AMX through oneDNN), else ``fp32``. Emulated bf16 on older CPUs is slower than fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    import torch  # noqa: PLC0415

    kind = torch.device(device).type if device is not None else "cpu"
    if kind == "cuda":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    if kind == "cpu":
        try:
            return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
        except (AttributeError, RuntimeError):
            return "fp32"
    return "fp32"


def _model_device(model):
    import torch  # noqa: PLC0415

    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def extract_features(
    model,
    table_or_images: Any,
    img_size: int | None = None,
    batch_size: int = 64,
    device: Any = None,
    *,
    pooling: str = "cls",
    precision: str = "fp32",
    on_batch: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Frozen features ``[N, D]`` (float32) of ``model`` for a table / list of images, in input order.

    ``model`` is a timm ViT (``forward_features``) or an extractor (``.extract``, e.g. the handcrafted
    baseline of :func:`~reddino.evaluate.models.resolve_model`). ``img_size`` defaults to the
    model's own input size; ``device`` to where the model's parameters live. The model's train/eval
    mode and device are restored afterwards, so a training loop can call this on its teacher.
    ``precision``: ``fp32``, ``bf16`` (autocast, as DINOv2's evaluations use reduced precision) or
    ``auto`` (:func:`resolve_precision`). ``on_batch(n)`` is called after each batch of ``n`` images.
    """
    images = to_rgb_list(table_or_images)
    if is_extractor(model):
        return model.extract(images, img_size=img_size, batch_size=batch_size, on_batch=on_batch)

    import torch  # noqa: PLC0415

    net = _unwrap(model)
    img_size = int(img_size or model_img_size(net))
    orig_device = _model_device(net)
    device = torch.device(device) if device is not None else orig_device
    use_bf16 = resolve_precision(precision, device) == "bf16"
    was_training = net.training
    net.eval()
    if device != orig_device:
        net.to(device)
    feats = []
    try:
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            for i in range(0, len(images), batch_size):
                x = torch.from_numpy(preprocess(images[i : i + batch_size], img_size)).to(device)
                f = pool_tokens(net, net.forward_features(x), pooling)
                feats.append(f.float().cpu().numpy())
                if on_batch:
                    on_batch(x.shape[0])
    finally:
        if device != orig_device:
            net.to(orig_device)
        net.train(was_training)
    if not feats:
        dim = int(getattr(net, "num_features", getattr(net, "embed_dim", 0)))
        return np.zeros((0, dim * (2 if pooling == "cls+mean" else 1)), dtype=np.float32)
    return np.concatenate(feats).astype(np.float32, copy=False)


# --------------------------------------------------------------------------------------------------
# Feature sets (features + aligned metadata)
# --------------------------------------------------------------------------------------------------


@dataclass
class FeatureSet:
    """Features with the labels, groups, sources and ids of the same rows."""

    features: np.ndarray
    labels: np.ndarray
    groups: np.ndarray | None
    sources: np.ndarray
    label_names: np.ndarray
    image_ids: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, np.ndarray] = field(default_factory=dict)  # further per-row columns (e.g. a split)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, mask_or_idx) -> "FeatureSet":
        idx = np.asarray(mask_or_idx)
        return FeatureSet(
            features=self.features[idx],
            labels=self.labels[idx],
            groups=None if self.groups is None else self.groups[idx],
            sources=self.sources[idx],
            label_names=self.label_names[idx],
            image_ids=self.image_ids[idx],
            meta=dict(self.meta),
            extras={k: v[idx] for k, v in self.extras.items()},
        )

    def exclude(self, labels: Iterable[int] | None) -> "FeatureSet":
        labels = list(labels or [])
        if not labels:
            return self
        return self.subset(~np.isin(self.labels, labels))

    @property
    def class_names(self) -> dict[int, str]:
        out: dict[int, str] = {}
        for lab, name in zip(self.labels.tolist(), self.label_names.tolist()):
            out.setdefault(int(lab), str(name) if name not in (None, "") else str(lab))
        return dict(sorted(out.items()))

    @staticmethod
    def concat(sets: Sequence["FeatureSet"]) -> "FeatureSet":
        if len(sets) == 1:
            return sets[0]
        groups = None
        if all(s.groups is not None for s in sets):
            groups = np.concatenate([s.groups for s in sets])
        return FeatureSet(
            features=np.concatenate([s.features for s in sets]),
            labels=np.concatenate([s.labels for s in sets]),
            groups=groups,
            sources=np.concatenate([s.sources for s in sets]),
            label_names=np.concatenate([s.label_names for s in sets]),
            image_ids=np.concatenate([s.image_ids for s in sets]),
            meta={"parts": [s.meta for s in sets]},
            extras={
                k: np.concatenate([s.extras[k] for s in sets])
                for k in sets[0].extras
                if all(k in s.extras for s in sets)
            },
        )


def _str_array(values) -> np.ndarray:
    return np.array(["" if v is None else str(v) for v in values], dtype=str)


def select_rows(
    meta: pa.Table,
    *,
    exclude_labels: Iterable[int] | None = None,
    max_images: int | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Indices of the labelled, non-excluded rows; at most ``max_images`` of them.

    The subset is deterministic and independent of row order: rows are ranked by a hash of
    (seed, sha256, image_id) and the first ``max_images`` kept (then returned in table order).
    """
    labels = meta.column("label").to_pylist()
    excl = set(int(x) for x in (exclude_labels or []))
    idx = np.array([i for i, lab in enumerate(labels) if lab is not None and int(lab) not in excl], dtype=np.int64)
    if max_images is not None and max_images > 0 and len(idx) > max_images:
        shas = meta.column("sha256").to_pylist() if "sha256" in meta.column_names else [""] * meta.num_rows
        ids = meta.column("image_id").to_pylist() if "image_id" in meta.column_names else [""] * meta.num_rows
        ranks = [hashlib.sha256(f"{seed}:{shas[i]}:{ids[i]}:{i if not ids[i] else ''}".encode()).digest() for i in idx]
        order = sorted(range(len(idx)), key=lambda j: ranks[j])[:max_images]
        idx = np.sort(idx[order])
    return idx


def _feature_set_from(
    meta: pa.Table, idx: np.ndarray, feats: np.ndarray, extra: dict[str, Any], extra_columns: Sequence[str] = ()
) -> FeatureSet:
    sub = meta.take(pa.array(idx)) if len(idx) != meta.num_rows else meta
    names = sub.column_names
    n = sub.num_rows
    groups = _str_array(sub.column("group").to_pylist()) if "group" in names else None
    return FeatureSet(
        features=feats,
        labels=np.array(sub.column("label").to_pylist(), dtype=np.int64),
        groups=groups,
        sources=_str_array(sub.column("source").to_pylist()) if "source" in names else np.array([""] * n),
        label_names=_str_array(sub.column("label_name").to_pylist()) if "label_name" in names else np.array([""] * n),
        image_ids=_str_array(sub.column("image_id").to_pylist()) if "image_id" in names else _str_array(idx),
        meta=extra,
        extras={c: _str_array(sub.column(c).to_pylist()) for c in extra_columns if c in names},
    )


# --------------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------------


def cache_path(cache_dir: str | Path, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    pool = str(key["pooling"]).replace("+", "-")
    return Path(cache_dir).expanduser() / f"{key['model'][:12]}_{key['data'][:12]}_{pool}_{key['img_size']}_{digest}.npz"


def save_npz_atomic(path: Path, **arrays) -> Path:
    from reddino.paths import atomic_path  # noqa: PLC0415

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    return path


def _row_keys(meta: pa.Table, idx: np.ndarray) -> list[str]:
    ids = meta.column("image_id").to_pylist() if "image_id" in meta.column_names else None
    shas = meta.column("sha256").to_pylist() if "sha256" in meta.column_names else None
    if ids is None or shas is None:
        return [str(i) for i in idx]
    return [f"{ids[i]}|{shas[i]}" for i in idx]


# --------------------------------------------------------------------------------------------------
# Ray Data batch inference
# --------------------------------------------------------------------------------------------------


class FeatureUDF:
    """``map_batches`` callable class: holds the model on its actor and embeds pyarrow batches.

    Keeps only rows whose ``image_id|sha256`` key is in ``keep`` (all labelled rows when ``None``) and
    returns ``features`` plus the key of every embedded row, so the driver can re-align them.
    """

    def __init__(self, model, img_size, pooling="cls", batch_size=64, device=None, keep=None, num_threads=None,
                 precision="fp32"):
        import torch  # noqa: PLC0415

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
        import pyarrow.compute as pc  # noqa: PLC0415

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


def _ray_device() -> str:
    """Where the extraction actor runs on the connected Ray cluster: one GPU if it has any, else CPU."""
    import ray  # noqa: PLC0415

    return "cuda" if ray.cluster_resources().get("GPU", 0) >= 1 else "cpu"


def _ray_resources(num_cpus: float | None) -> tuple[dict[str, Any], str | None]:
    if _ray_device() == "cuda":
        return {"num_gpus": 1, "num_cpus": 1}, "cuda"
    return {"num_cpus": max(1, int(num_cpus or 1))}, "cpu"


def ensure_ray(num_cpus: int | None = None) -> bool:
    """Start a local Ray if none is running; returns True when this call started it."""
    import ray  # noqa: PLC0415

    if ray.is_initialized():
        return False
    import logging  # noqa: PLC0415

    from reddino.runtime import init_ray, verbose  # noqa: PLC0415

    # Ray's "Started a local Ray instance" INFO line is not news to someone embedding cells.
    init_ray(num_cpus=num_cpus, log_to_driver=False, **({} if verbose() else {"logging_level": logging.WARNING}))
    return True


def _run_extraction_ray(
    model, data_dir, keys: list[str], img_size, pooling, batch_size, *, num_cpus=None, on_batch=None, all_labelled=True,
    precision="fp32",
) -> dict[str, np.ndarray]:
    import ray  # noqa: PLC0415

    from reddino.runtime import quiet_data_progress  # noqa: PLC0415

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


def _run_extraction_local(model, data_dir, idx, img_size, pooling, batch_size, *, device=None, on_batch=None,
                          precision="fp32"):
    table = load_table([data_dir], columns=["image"])
    images = table.column("image").take(pa.array(idx)).to_pylist()
    return extract_features(model, images, img_size, batch_size, device, pooling=pooling, on_batch=on_batch,
                            precision=precision)


def _extraction_device(model, use_ray: bool, device: Any) -> Any:
    """Where the forward passes will run, known without starting Ray (for the precision and cache key)."""
    if is_extractor(model):
        return "cpu"
    import sys  # noqa: PLC0415

    import torch  # noqa: PLC0415

    if not use_ray:
        return device if device is not None else _model_device(_unwrap(model))
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return _ray_device()
    return "cuda" if torch.cuda.is_available() else "cpu"  # ensure_ray starts a local Ray on this machine


def compute_features(
    model,
    info: dict[str, Any],
    data_dir: str | Path,
    *,
    pooling: str = "cls",
    img_size: int | None = None,
    batch_size: int = 64,
    exclude_labels: Iterable[int] | None = None,
    max_images: int | None = None,
    seed: int = 0,
    cache_dir: str | Path | None = DEFAULT_CACHE_DIR,
    use_ray: bool | None = None,
    num_cpus: int | None = None,
    device: Any = None,
    precision: str = "auto",
    progress: Any = None,
    extra_columns: Sequence[str] = (),
) -> FeatureSet:
    """Features + metadata of the labelled rows of one dataset dir (cached).

    ``use_ray``: True = Ray Data batch inference, False = in process, None = Ray from
    :data:`RAY_MIN_ROWS` rows up (actor start-up costs more than it saves on small sets).

    The cache holds every labelled row unless ``max_images`` subsamples (then the subset is part of
    the key), so excluding classes later re-uses the same file. ``cache_dir=None`` disables caching.
    ``precision`` (``auto``/``fp32``/``bf16``, see :func:`resolve_precision`) is resolved for the device
    the extraction runs on; the resolved value is part of the cache key and of ``meta["precision"]``.
    ``progress`` is an optional ``rich.progress.Progress``.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    data_dir = str(Path(data_dir).expanduser())
    img_size = img_size or info.get("img_size")
    base_cols = ["label", "label_name", "source", "group", "image_id", "sha256"]
    meta = load_table([data_dir], columns=base_cols + [c for c in extra_columns if c not in base_cols])
    missing_cols = [c for c in extra_columns if c not in meta.column_names]
    if missing_cols:
        raise ValueError(f"{data_dir}: no column(s) {missing_cols}")
    if "label" not in meta.column_names:
        raise ValueError(f"{data_dir}: no 'label' column - evaluation needs labelled cells")
    all_idx = select_rows(meta)
    idx = select_rows(meta, exclude_labels=exclude_labels, max_images=max_images, seed=seed)
    subset = max_images is not None and len(idx) < len(select_rows(meta, exclude_labels=exclude_labels))
    if not subset:
        idx = all_idx
    if len(idx) == 0:
        raise ValueError(f"{data_dir}: no labelled rows to evaluate")
    keys = _row_keys(meta, idx)
    if use_ray is None:
        use_ray = len(idx) >= RAY_MIN_ROWS
    if is_extractor(model):
        precision = "fp32"  # no network
    else:
        precision = resolve_precision(precision, _extraction_device(model, use_ray, device))
    key = {
        "v": CACHE_VERSION,
        "model": info["hash"],
        "data": str(manifest_hash(data_dir)),
        "pooling": pooling,
        "img_size": img_size or "native",
        "selection": hashlib.sha256("\n".join(keys).encode()).hexdigest() if subset else "labelled",
    }
    if precision != "fp32":  # fp32 keeps the keys (and cache files) written before precision existed
        key["precision"] = precision
    if cache_dir == DEFAULT_CACHE_DIR:
        from reddino import paths  # noqa: PLC0415

        cache_dir = paths.feature_cache()
    path = cache_path(cache_dir, key) if cache_dir else None
    extra = {"data": data_dir, "cache_key": key, "cache_file": str(path) if path else None, "cached": False,
             "precision": precision}
    if path is not None and path.is_file():
        with np.load(path, allow_pickle=False) as z:
            feats, cached_keys = z["features"], z["keys"].tolist()
        if cached_keys == keys:
            extra["cached"] = True
            return _feature_set_from(meta, idx, feats, extra, extra_columns).exclude(exclude_labels)

    task = None
    if progress is not None:
        task = progress.add_task(f"features {Path(data_dir).name}", total=len(idx))

    def on_batch(n: int) -> None:
        if task is not None:
            progress.advance(task, n)

    extra["ray"] = bool(use_ray)
    if use_ray:
        got = _run_extraction_ray(
            model, data_dir, keys, img_size, pooling, batch_size, num_cpus=num_cpus, on_batch=on_batch,
            all_labelled=not subset, precision=precision,
        )
        missing = [k for k in keys if k not in got]
        if missing:
            raise RuntimeError(f"{data_dir}: {len(missing)} rows came back without features (e.g. {missing[0]})")
        feats = np.stack([got[k] for k in keys]).astype(np.float32)
    else:
        feats = _run_extraction_local(
            model, data_dir, idx, img_size, pooling, batch_size, device=device, on_batch=on_batch,
            precision=precision,
        )
    if path is not None:
        save_npz_atomic(path, features=feats, keys=np.array(keys, dtype=str), key=np.array(json.dumps(key)))
    return _feature_set_from(meta, idx, feats, extra, extra_columns).exclude(exclude_labels)
