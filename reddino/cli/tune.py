"""`reddino sweep`."""

from __future__ import annotations

from typing import List, Optional

import typer


def sweep(
    space: str = typer.Option("ablation", "--space", help="Sweep-space YAML or shipped name (reddino/configs/sweeps)."),
    data: Optional[List[str]] = typer.Option(None, "--data", help="Training Parquet dirs (patches and/or cells)."),
    eval_data: Optional[str] = typer.Option(None, "--eval-data", help="Labelled cell Parquet dir for kNN scoring."),
    trials: int = typer.Option(8, "--trials", help="Number of trials (search mode)."),
    concurrency: int = typer.Option(1, "--concurrency", help="Trials running at once."),
    mode: str = typer.Option("search", "--mode", help="search (Optuna TPE + ASHA) or ablation (one factor at a time)."),
    out: Optional[str] = typer.Option(None, "--out", help="Folder for sweep results (default $REDDINO_HOME/sweeps)."),
    name: Optional[str] = typer.Option(None, "--name"),
    seed: int = typer.Option(0, "--seed"),
    cpus_per_trial: Optional[float] = typer.Option(None, help="CPUs reserved by each trial's driver."),
    gpus_per_trial: float = typer.Option(0.0, help="GPUs (or fraction) reserved per trial."),
    resume: Optional[str] = typer.Option(None, "--resume", help="Resume the sweep in this folder."),
    optuna_storage: Optional[str] = typer.Option(None, "--optuna-storage", help="SQLAlchemy URL of the Optuna "
                                                 "study (default: sqlite:///<sweep dir>/optuna.db)."),
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides for every trial"),
) -> None:
    """Ray Tune + Optuna sweep over a config space, early-stopped by ASHA on in-training kNN."""
    from reddino.tune import sweep as run_sweep

    result = run_sweep(space, data=data, eval_data=eval_data, trials=trials, concurrency=concurrency, mode=mode,
                       out=out, name=name, seed=seed, overrides=overrides, cpus_per_trial=cpus_per_trial,
                       gpus_per_trial=gpus_per_trial, resume=resume, optuna_storage=optuna_storage)
    typer.echo(f"sweep: {result.sweep_dir}")
    if result.ablation_markdown:
        typer.echo(result.ablation_markdown)
    if result.best_config_path:
        typer.echo(f"best config: {result.best_config_path}")


def register(app: typer.Typer) -> None:
    app.command("sweep")(sweep)
