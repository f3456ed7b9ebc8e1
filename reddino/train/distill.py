"""Driver side of distillation: check the teacher and the pair before anything starts, then run the pretraining
platform (Ray Data, Ray Train DDP workers, checkpoints with exact resume, guards, kNN, MLflow, export) with the
distillation method (:class:`reddino.model.distill.DistillSSL`) plugged into its loop.

The teacher is anything ``reddino evaluate`` accepts that has weights (an export, a run dir, ``models:/name@alias``,
``runs:/...``), or an official DINOv2 / DINOv3 file with ``distill.teacher_arch``. The workers load it from the local
file it resolves to (a shared path on a cluster, as ``model.pretrained``). Lineage: the run's MLflow tags and the
exported student's metadata name the teacher (ref, registry name and version where it has them, weights hash);
``reddino models register`` copies them onto the model version.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from reddino.config import RunConfig


class DistillInputError(ValueError):
    """A teacher or teacher/student pair that cannot be distilled; the message names the model and the reason."""


def resolve_ref(ref: str):
    """``(module, info)`` of a model reference: the one call into the model-reference resolver (reddino.features)."""
    from reddino.features.models import resolve_model

    return resolve_model(ref)


def resolve_teacher(ref: str, arch: str | None = None):
    """``(teacher module, lineage)``: the frozen teacher and what names it (``ref``, ``path`` of its local weights,
    ``name``, ``version``, ``hash``, ``arch``). Raises :class:`DistillInputError` naming the ref if it does not
    load."""
    from reddino.model.distill import load_teacher

    try:
        if arch:
            from reddino.data.shards import file_sha256

            model = load_teacher(ref, arch)
            path = Path(ref).expanduser().resolve()
            info = {"kind": "file", "path": str(path), "hash": file_sha256(path), "arch": arch}
        else:
            looks_like_path = "/" in str(ref) or Path(str(ref)).suffix in (".safetensors", ".pt", ".pth", ".bin")
            if looks_like_path and ":/" not in str(ref) and not Path(str(ref)).expanduser().exists():
                raise FileNotFoundError(f"no such file or directory: {ref}")
            model, info = resolve_ref(ref)
            if info.get("kind") in ("handcrafted", "random"):
                raise ValueError(f"a {info['kind']} model has no trained weights to distil (use an export, a run "
                                 "dir, models:/name@alias, or an official file with --teacher-arch)")
            if not info.get("path"):
                raise ValueError("it resolves to no local weights file")
        for p in model.parameters():
            p.requires_grad_(False)
    except Exception as exc:  # noqa: BLE001 - any failure to load is the same user-facing error
        msg = str(exc).split("\n")[0]
        raise DistillInputError(f"teacher {str(ref)!r} does not load: {type(exc).__name__}: {msg}") from None
    name = info.get("model_name") or info.get("run_name") or Path(info["path"]).parent.name
    lineage = {"ref": str(ref), "path": str(info["path"]), "name": str(name),
               "version": str(info.get("model_version", "")), "hash": str(info["hash"]),
               "arch": str(info.get("arch") or "")}
    return model.eval(), lineage


def _student_meta(cfg: RunConfig):
    import torch

    from reddino.model import create_backbone

    m = cfg.model
    with torch.device("meta"):  # the architecture only (stride, family)
        return create_backbone(m.arch, m.img_size, m.patch_size, timm_kwargs=m.timm_kwargs)


def check_inputs(cfg: RunConfig, teacher, lineage: dict[str, Any]) -> None:
    """Everything that would fail inside the workers, refused here with one message naming the model."""
    from reddino.model.distill import check_pair, check_teacher_output

    name = f"teacher {lineage['ref']!r}"
    try:
        student = _student_meta(cfg)
    except ValueError as exc:
        raise DistillInputError(f"student {cfg.model.arch!r}: {exc}") from None
    size = cfg.crops.global_crops_size
    try:
        check_pair(teacher, student, size, cfg.distill.teacher_img_size, name, f"student {cfg.model.arch!r}")
        check_teacher_output(teacher, cfg.distill.teacher_img_size or size, name)
    except ValueError as exc:
        raise DistillInputError(str(exc)) from None


def distill(cfg: RunConfig, *, run_name: str | None = None, resume: bool = False, **pretrain_kwargs):
    """Distil ``cfg.distill.teacher`` into the student ``cfg.model`` (see the module doc); returns the
    :class:`~reddino.train.trainer.PretrainResult` (its ``backbone_path``: the exported student, EMA weights)."""
    from reddino.train.trainer import pretrain

    if not cfg.distill.enabled:
        raise DistillInputError("no teacher: set --teacher (distill.teacher)")
    teacher, lineage = resolve_teacher(cfg.distill.teacher, cfg.distill.teacher_arch)
    check_inputs(cfg, teacher, lineage)
    del teacher  # each worker loads its own copy from the local file
    print(f"[reddino] distilling {lineage['name']}"
          + (f" v{lineage['version']}" if lineage["version"] else "")
          + f" ({lineage['arch'] or 'teacher'}, weights {lineage['hash'][:12]}) into {cfg.model.arch}", flush=True)
    cfg = cfg.model_copy(deep=True)
    cfg.distill.teacher = lineage["path"]
    tags = {f"reddino.teacher.{k}": v for k, v in lineage.items() if k != "path"}
    tags["reddino.method"] = "distill"
    extra_tags = pretrain_kwargs.pop("mlflow_tags", None) or {}
    return pretrain(cfg, run_name=run_name, resume=resume, mlflow_tags={**tags, **extra_tags},
                    export_meta={"method": "distill", "teacher": {k: v for k, v in lineage.items() if k != "path"}},
                    **pretrain_kwargs)
