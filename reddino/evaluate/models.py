"""Turn a model reference into a frozen feature extractor.

A reference is one of:

* ``handcrafted`` - the morphology feature baseline (:mod:`reddino.evaluate.handcrafted`);
* an exported backbone file (``*.safetensors`` / ``*.pt`` with a sidecar json);
* a run checkpoint dir (any dir holding such an export; ``teacher_*`` files win);
* an MLflow URI (``models:/name@alias``, ``models:/name/3``, ``runs:/<id>/backbone``, ...): the artifacts
  are downloaded and resolved as a dir;
* ``random:<timm arch>`` or a bare timm arch name: a randomly initialised baseline (fixed seed).

All of it lives in :func:`resolve_model` so there is one place to extend.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from reddino.data.shards import file_sha256
from reddino.model import backbone_info, load_backbone

from .handcrafted import FEATURE_NAMES, VERSION, HandcraftedExtractor

HANDCRAFTED = "handcrafted"
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
_MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:", "dbfs:/")


def _sidecar(path: Path) -> Path | None:
    for cand in (
        path.with_name(path.name + ".json"),
        path.with_suffix(".json"),
        path.parent / "backbone.json",
        path.parent / "config.json",
    ):
        if cand.is_file():
            return cand
    return None


def _sidecar_info(path: Path) -> dict[str, Any]:
    side = _sidecar(path)
    if side is None:
        return {}
    try:
        data = json.loads(side.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def find_backbone_file(directory: str | Path) -> Path:
    """The exported backbone inside a run checkpoint / artifact dir (searched 3 levels deep)."""
    directory = Path(directory)
    cands: list[Path] = []
    for depth in ("*", "*/*", "*/*/*"):
        cands += [p for p in directory.glob(depth) if p.is_file() and p.suffix in WEIGHT_SUFFIXES]
    if not cands:
        raise FileNotFoundError(f"no exported backbone (*.safetensors / *.pt) under {directory}")

    def rank(p: Path) -> tuple:
        name = p.name.lower()
        return (
            "teacher" not in name,
            "backbone" not in name,
            _sidecar(p) is None,
            p.suffix != ".safetensors",
            len(p.relative_to(directory).parts),
            str(p),
        )

    return sorted(cands, key=rank)[0]


file_hash = file_sha256  # a weights file's content hash (the feature cache key): the data layer's file hash


def module_hash(model) -> str:
    """Content hash of a module's architecture name and every tensor of its state dict."""
    import torch  # noqa: PLC0415

    h = hashlib.sha256(type(model).__name__.encode())
    for name, tensor in model.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        if t.dtype == torch.bfloat16:
            t = t.float()
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _load_backbone_file(path: Path):
    return load_backbone(path)  # strict: every tensor present, nothing left over


def _backbone_info(model, path: Path | None = None) -> dict[str, Any]:
    info: dict[str, Any] = dict(backbone_info(model))
    if path is not None:
        for k, v in _sidecar_info(path).items():
            info.setdefault(k, v)
    return info


def _mlflow_links(ref: str) -> dict[str, Any]:
    """``model_name`` / ``model_version`` / ``model_run_id`` of an MLflow ref, when knowable (best effort: the
    weights are already loaded, this only links the evaluation to the registry)."""
    if ref.startswith("runs:/"):
        return {"model_run_id": ref[len("runs:/") :].split("/", 1)[0]}
    if not ref.startswith("models:/"):
        return {}
    from reddino.registry.core import model_version  # noqa: PLC0415 - mlflow only for registry refs

    try:
        mv = model_version(ref)
    except Exception:  # noqa: BLE001
        return {}
    return {"model_name": mv.name, "model_version": str(mv.version), **({"model_run_id": mv.run_id} if mv.run_id else {})}


def _random_model(arch: str, img_size: int | None, seed: int):
    import timm  # noqa: PLC0415
    import torch  # noqa: PLC0415

    from reddino.model import create_backbone  # noqa: PLC0415

    if not timm.is_model(arch):
        raise ValueError(f"unknown model reference or timm arch: {arch!r}")
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = create_backbone(arch, int(img_size) if img_size else None)
    finally:
        torch.random.set_rng_state(state)
    return model.eval()


def resolve_model(ref: Any, *, img_size: int | None = None, seed: int = 0, cache_dir: str | Path | None = None):
    """Resolve a model reference to ``(module | extractor, info)`` (the extractor: handcrafted features).

    ``info`` always has ``ref``, ``kind`` (handcrafted/file/checkpoint/mlflow/random/module), ``hash``
    (content hash for the feature cache) and ``img_size``; ViTs add ``arch``, ``embed_dim``,
    ``patch_size``; MLflow refs add ``model_run_id`` / ``model_version`` when known.
    ``img_size`` overrides the model's own input size (random init builds the model at that size).
    """
    import torch  # noqa: PLC0415

    if isinstance(ref, torch.nn.Module):
        model = ref.eval()
        info = _backbone_info(model)
        info.update(ref=type(ref).__name__, kind="module", hash=module_hash(model))
        if img_size:
            info["img_size"] = int(img_size)
        return model, info

    ref = str(ref)
    if ref == HANDCRAFTED:
        return HandcraftedExtractor(), {
            "ref": ref,
            "kind": "handcrafted",
            "hash": hashlib.sha256(f"handcrafted-v{VERSION}".encode()).hexdigest(),
            "img_size": int(img_size) if img_size else None,
            "embed_dim": len(FEATURE_NAMES),
            "standardize": True,
        }

    if ref.startswith(_MLFLOW_SCHEMES):
        import mlflow  # noqa: PLC0415
        import mlflow.artifacts  # noqa: PLC0415

        from reddino import paths  # noqa: PLC0415

        # The same store `reddino models register` wrote to ($MLFLOW_TRACKING_URI, else $REDDINO_HOME/mlflow.db),
        # said once on stderr; an unreachable server or a missing model / alias is one line naming it.
        from reddino.registry.core import _client, model_version  # noqa: PLC0415

        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one model file: no bar
        _client()
        if ref.startswith("models:/"):
            model_version(ref)

        dst = Path(cache_dir) if cache_dir else paths.model_cache()
        dst = dst / hashlib.sha256(ref.encode()).hexdigest()[:16]
        dst.mkdir(parents=True, exist_ok=True)
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=ref, dst_path=str(dst)))
        path = local if local.is_file() else find_backbone_file(local)
        model = _load_backbone_file(path).eval()
        info = _backbone_info(model, path)
        info.update(ref=ref, kind="mlflow", path=str(path), hash=file_hash(path))
        info.update(_mlflow_links(ref))
        if img_size:
            info["img_size"] = int(img_size)
        return model, info

    path = Path(ref).expanduser()
    if path.exists():
        kind = "file"
        if path.is_dir():
            path, kind = find_backbone_file(path), "checkpoint"
        model = _load_backbone_file(path).eval()
        info = _backbone_info(model, path)
        info.update(ref=ref, kind=kind, path=str(path), hash=file_hash(path))
        for key in ("model_run_id", "mlflow_run_id", "run_id"):
            if info.get(key):
                info["model_run_id"] = info[key]
                break
        if img_size:
            info["img_size"] = int(img_size)
        return model, info

    arch = ref.split(":", 1)[1] if ref.startswith("random:") else ref
    model = _random_model(arch, img_size, seed)
    info = _backbone_info(model)
    info.update(ref=ref, kind="random", arch=arch, seed=seed)
    if img_size:
        info["img_size"] = int(img_size)
    info["hash"] = hashlib.sha256(f"random:{arch}:{info['img_size']}:{seed}:{module_hash(model)}".encode()).hexdigest()
    return model, info
