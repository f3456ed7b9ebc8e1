"""Turn a model reference into a frozen feature extractor.

A reference is one of:

* ``handcrafted`` - the morphology feature baseline (:mod:`reddino.features.handcrafted`);
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


def find_backbone_file(path: str | Path) -> Path:
    """The one rule for which file is the backbone, for evaluation, embedding, the registry and sweeps alike.

    A file is itself. In a folder (a run dir, a checkpoint, a downloaded MLflow artifact dir; searched 3 levels
    deep) the shallowest export wins: a run's own ``backbone.safetensors`` (where the trainer exports it, see
    :func:`reddino.train.checkpoint.export_target`) before any checkpoint's copy; among checkpoints the latest
    (``checkpoint_000007`` before ``checkpoint_000003``); then names saying ``backbone`` / ``teacher``, a sidecar
    json, safetensors."""
    directory = Path(path)
    if directory.is_file():
        return directory
    cands: list[Path] = []
    for depth in ("*", "*/*", "*/*/*"):
        cands += [p for p in directory.glob(depth)
                  if p.is_file() and p.suffix in WEIGHT_SUFFIXES and p.name != "state.pt"]  # not a training state
    if not cands:
        hint = ""
        if any(directory.glob("checkpoint_*/state.pt")) or (directory / "state.pt").is_file():
            hint = f" (it holds checkpoints: `reddino export {directory}` writes one from the latest)"
        raise FileNotFoundError(f"no exported backbone (*.safetensors / *.pt) under {directory}{hint}")

    def rank(p: Path) -> tuple:
        name = p.name.lower()
        checkpoint = max((int(d) for part in p.relative_to(directory).parts[:-1]
                          for d in [part.rsplit("_", 1)[-1]] if d.isdigit()), default=-1)
        return (
            len(p.relative_to(directory).parts),
            -checkpoint,
            "backbone" not in name and "teacher" not in name,
            _sidecar(p) is None,
            p.suffix != ".safetensors",
            str(p),
        )

    return sorted(cands, key=rank)[0]


file_hash = file_sha256  # a weights file's content hash (the embedding store's model key): the data layer's file hash


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


def load_backbone_file(path: str | Path, device: str = "cpu"):
    """The one place reddino turns an exported backbone file into a module (strict: every tensor present, nothing
    left over); evaluation, embedding, the registry's pyfunc and ``reddino.load_backbone`` all come through here."""
    return load_backbone(Path(path), device=device)


def _backbone_info(model, path: Path | None = None) -> dict[str, Any]:
    info: dict[str, Any] = dict(backbone_info(model))
    if path is not None:
        for k, v in _sidecar_info(path).items():
            info.setdefault(k, v)
    return info


def _mlflow_links(ref: str, uri: str) -> dict[str, Any]:
    """``model_name`` / ``model_version`` / ``model_run_id`` of an MLflow ref, linking the features to the
    registry entry the weights came from (read from the same store the weights were downloaded from)."""
    if ref.startswith("runs:/"):
        return {"model_run_id": ref[len("runs:/") :].split("/", 1)[0]}
    if not ref.startswith("models:/"):
        return {}
    from mlflow.tracking import MlflowClient  # noqa: PLC0415

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    body = ref[len("models:/") :]
    if "@" in body:
        name, alias = body.split("@", 1)
        mv = client.get_model_version_by_alias(name, alias.split("/")[0])
    else:
        name, _, version = body.partition("/")
        version = version.split("/")[0]
        if not version.isdigit():
            return {"model_name": name}  # a stage or "latest": the downloaded weights' hash identifies them
        mv = client.get_model_version(name, version)
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


def resolve_model(ref: Any, *, img_size: int | None = None, seed: int = 0, cache_dir: str | Path | None = None,
                  tracking_uri: str | None = None):
    """Resolve a model reference to ``(module | extractor, info)`` (the extractor: handcrafted features).

    ``info`` always has ``ref``, ``kind`` (handcrafted/file/checkpoint/mlflow/random/module), ``hash``
    (content hash for the feature cache) and ``img_size``; ViTs add ``arch``, ``embed_dim``,
    ``patch_size``; MLflow refs add ``model_run_id`` / ``model_version`` when known.
    ``img_size`` overrides the model's own input size (random init builds the model at that size).
    ``tracking_uri``: the MLflow store of ``models:/`` / ``runs:/`` refs (default
    :func:`reddino.runtime.default_tracking_uri`); used as given, nothing global is set.
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
        import mlflow.artifacts  # noqa: PLC0415

        from reddino import paths  # noqa: PLC0415
        from reddino.runtime import check_tracking  # noqa: PLC0415
        from reddino.runtime import default_tracking_uri, mlflow_at  # noqa: PLC0415

        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one model file: no bar
        uri = tracking_uri or default_tracking_uri()
        check_tracking(uri)  # an unreachable server: one line naming it, within seconds
        dst = Path(cache_dir) if cache_dir else paths.model_cache()
        dst = dst / hashlib.sha256(f"{uri}|{ref}".encode()).hexdigest()[:16]
        dst.mkdir(parents=True, exist_ok=True)
        with mlflow_at(uri):
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=ref, dst_path=str(dst), tracking_uri=uri))
        path = local if local.is_file() else find_backbone_file(local)
        model = load_backbone_file(path).eval()
        info = _backbone_info(model, path)
        info.update(ref=ref, kind="mlflow", path=str(path), hash=file_hash(path))
        info.update(_mlflow_links(ref, uri))
        if img_size:
            info["img_size"] = int(img_size)
        return model, info

    path = Path(ref).expanduser()
    if path.exists():
        kind = "file"
        if path.is_dir():
            path, kind = find_backbone_file(path), "checkpoint"
        model = load_backbone_file(path).eval()
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


def resolve(ref: Any, img_size: int | None = None, *, tracking_uri: str | None = None, seed: int = 0):
    """:func:`resolve_model` with one clear :class:`~reddino.features.store.EmbedError` for a reference that does not
    exist (a missing file, an unknown arch, a registry name / alias / run MLflow does not know)."""
    from .store import EmbedError  # noqa: PLC0415

    try:
        return resolve_model(ref, img_size=img_size, tracking_uri=tracking_uri, seed=seed)
    except (FileNotFoundError, ValueError) as exc:
        raise EmbedError(f"model {ref!r}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - MLflow raises its own type for a missing name / alias / run
        if type(exc).__name__ in ("MlflowException", "RestException"):
            raise EmbedError(f"model {ref!r}: {str(exc).splitlines()[0]}") from None
        raise
