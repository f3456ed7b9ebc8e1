"""`reddino distill`: a small, fast student from a larger frozen teacher, on the pretraining platform."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

_REF_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:")


def student_overrides(student: str) -> list[str]:
    """``--student``: a timm arch (from scratch) or a model reference with weights (warm start: arch, kwargs and
    weights of that export)."""
    if not (student.startswith(_REF_SCHEMES) or Path(student).expanduser().exists()):
        return [f"model.arch={student}"]
    import json

    from reddino.model.backbone import read_export_meta
    from reddino.train.distill import resolve_ref

    _, info = resolve_ref(student)
    meta = read_export_meta(info["path"])
    kwargs = dict(meta.get("timm_kwargs") or {})
    patch = kwargs.pop("patch_size", None)
    out = [f"model.arch={meta['arch']}", f"model.pretrained={info['path']}",
           f"model.timm_kwargs={json.dumps(kwargs) if kwargs else 'null'}"]
    if patch:
        out.append(f"model.patch_size={patch}")
    return out


def distill(
    teacher: str = typer.Option(..., "--teacher", "-t", help="Teacher: export, run dir, models:/name@alias, runs:/..., "
                                "or an official DINOv2/DINOv3 file with --teacher-arch."),
    student: Optional[str] = typer.Option(None, "--student", "-s", help="Student: a timm arch (from scratch) or a "
                                          "model reference (warm start); default: the preset's model.arch."),
    data: Optional[List[str]] = typer.Option(None, "--data", help="Parquet dirs (sets data.paths)."),
    teacher_arch: Optional[str] = typer.Option(None, "--teacher-arch", help="timm arch of an official (non-export) "
                                               "teacher file, e.g. vit_large_patch16_dinov3."),
    config: str = typer.Option("distill_cpu", "--config", "-c", help="YAML file or shipped preset name."),
    overrides: Optional[List[str]] = typer.Argument(None, help="key.sub=value overrides, e.g. distill.loss=cosine"),
    run_name: Optional[str] = typer.Option(None, help="Run name; reuse one to resume it."),
    resume: bool = typer.Option(False, "--resume", help="Resume the run named --run-name from its latest checkpoint."),
) -> None:
    """Distil a frozen teacher into a student backbone (Ray Train workers, as `pretrain`)."""
    from reddino.config import load_config
    from reddino.train.distill import DistillInputError, distill as run_distill

    extra = []
    try:
        extra += student_overrides(student) if student else []
    except Exception as exc:  # noqa: BLE001
        typer.echo(f"error: student {student!r} does not load: {exc}", err=True)
        raise typer.Exit(code=2) from None
    extra.append(f"distill.teacher={teacher}")
    if teacher_arch:
        extra.append(f"distill.teacher_arch={teacher_arch}")
    if data:
        extra.append("data.paths=[" + ",".join(data) + "]")
    cfg = load_config(config, extra + list(overrides or []))
    if resume and not run_name:
        raise typer.BadParameter("--resume needs --run-name")
    try:
        result = run_distill(cfg, run_name=run_name, resume=resume)
    except DistillInputError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from None
    from reddino.cli.train import report_run  # noqa: PLC0415

    report_run(result, "student backbone")


def register(app: typer.Typer) -> None:
    app.command("distill")(distill)
