"""`reddino pretrain`, `reddino export` and `reddino config`."""

from __future__ import annotations

from typing import List, Optional

import typer


def pretrain(
    config: str = typer.Option("tiny_cpu", "--config", "-c", help="YAML file or shipped preset name."),
    overrides: Optional[List[str]] = typer.Argument(None, help="key.sub=value overrides, e.g. train.epochs=2"),
    run_name: Optional[str] = typer.Option(None, help="Run name; reuse one to resume it."),
    resume: bool = typer.Option(False, "--resume", help="Resume the run named --run-name from its latest checkpoint."),
    data: Optional[List[str]] = typer.Option(None, "--data", help="Parquet dirs (sets data.paths)."),
) -> None:
    """DINOv2 pretraining on Ray Train (GPU workers if present, CPU otherwise)."""
    from reddino.config import load_config
    from reddino.train import pretrain as run_pretrain

    extra = list(overrides or [])
    if data:
        extra.append("data.paths=[" + ",".join(data) + "]")
    cfg = load_config(config, extra)
    if resume and not run_name:
        raise typer.BadParameter("--resume needs --run-name")
    result = run_pretrain(cfg, run_name=run_name, resume=resume)
    report_run(result, "teacher backbone")


def report_run(result, backbone_label: str) -> None:
    """The end of a training command: run, exported backbone, MLflow run; a stopped run exits 3."""
    typer.echo(f"run: {result.run_name}  dir: {result.run_dir}")
    if result.backbone_path:
        typer.echo(f"{backbone_label}: {result.backbone_path}")
    if result.mlflow_run_id:
        typer.echo(f"mlflow run: {result.mlflow_run_id}")
    if result.stopped:
        typer.echo(f"STOPPED: {result.stopped}", err=True)
        raise typer.Exit(code=3)


def show_config(
    config: str = typer.Argument("tiny_cpu", help="YAML file or shipped preset name."),
    overrides: Optional[List[str]] = typer.Argument(None),
) -> None:
    """Print a resolved config (preset + overrides) as YAML."""
    import yaml

    from reddino.config import load_config

    typer.echo(yaml.safe_dump(load_config(config, overrides).to_dict(), sort_keys=False))


def register(app: typer.Typer) -> None:
    app.command("pretrain")(pretrain)
    app.command("config")(show_config)
    app.command("export")(export)


def export(
    run: str = typer.Argument(..., help="A run dir (its latest checkpoint, or --step) or a checkpoint dir."),
    step: Optional[int] = typer.Option(None, "--step", help="The checkpoint of this step (default: the latest)."),
    out: Optional[str] = typer.Option(None, "--out", "-o",
                                      help="Backbone file to write (default: <checkpoint>/backbone.safetensors)."),
) -> None:
    """A checkpoint's EMA teacher backbone as an export, e.g. of a run stopped before its end."""
    from reddino.train.checkpoint import export_checkpoint

    typer.echo(f"backbone: {export_checkpoint(run, step=step, out=out)}")
