"""`reddino sweep`: the options are the fields of :class:`reddino.config.SweepConfig`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer

from reddino.cli.options import config_command, param
from reddino.config import SweepConfig


def _run(updates: dict[str, Any], *, config: Optional[Path], out: Optional[str], name: Optional[str],
         resume: Optional[str], report_only: bool, overrides: Optional[List[str]]) -> None:
    """Ray Tune + Optuna sweep over a config space, early-stopped by ASHA on in-training kNN."""
    from reddino.config import load_section
    from reddino.tune import sweep as run_sweep

    if overrides:
        updates["overrides"] = list(overrides)
    if report_only and not resume:
        raise typer.BadParameter("--report-only needs --resume <sweep dir>")
    if resume:
        result = run_sweep(resume=resume, report_only=report_only)
    else:
        result = run_sweep(config=load_section(SweepConfig, config, updates), out=out, name=name)
    from reddino.tune.sweep import failed_trials

    failed, total, files = failed_trials(result)
    if total and failed == total:
        where = files[0] if len(files) == 1 else f"{Path(files[0]).parent.parent}/*/error.txt" if files else \
            str(result.sweep_dir / "trials.csv")
        typer.echo(f"error: all {total} trials of sweep {result.sweep_dir} failed; their errors: {where}", err=True)
        raise typer.Exit(code=1)
    typer.echo(f"sweep: {result.sweep_dir}")
    if failed:
        typer.echo(f"warning: {failed} of {total} trials failed; their errors: "
                   f"{', '.join(files) or result.sweep_dir / 'trials.csv'}", err=True)
    if result.ablation_markdown:
        typer.echo(result.ablation_markdown)
    if result.best_config_path:
        typer.echo(f"best config: {result.best_config_path}")


sweep = config_command(
    SweepConfig, _run,
    params=[
        param("config", Optional[Path], typer.Option(None, "--config", help="SweepConfig YAML; options given here override it.")),
        param("out", Optional[str], typer.Option(None, "--out", help="Folder for sweep results (default $REDDINO_HOME/sweeps).")),
        param("name", Optional[str], typer.Option(None, "--name", help="Sweep dir name (default sweep-<space>-<time>).")),
        param("resume", Optional[str], typer.Option(None, "--resume", help="Resume the sweep in this folder (its sweep.yaml).")),
        param("report_only", bool, typer.Option(False, "--report-only", help="With --resume: no new trials; rewrite the report from the finished ones.")),
        param("overrides", Optional[List[str]], typer.Argument(None, help="key=value overrides for every trial.")),
    ],
    skip=("overrides",),
)


def register(app: typer.Typer) -> None:
    app.command("sweep")(sweep)
