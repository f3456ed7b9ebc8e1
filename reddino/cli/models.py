"""`reddino models register|promote|pull|list`."""

from __future__ import annotations

from typing import List, Optional

import typer

models_app = typer.Typer(help="MLflow model registry: register, promote, pull and list backbones and probes.",
                         no_args_is_help=True)


def _metrics(pairs: Optional[List[str]]) -> dict[str, float]:
    out = {}
    for item in pairs or []:
        key, _, value = item.partition("=")
        if not value:
            raise typer.BadParameter(f"--metric {item!r} must be name=value")
        out[key] = float(value)
    return out


@models_app.command("register")
def register_cmd(
    run: str = typer.Argument(..., help="Run dir, checkpoint dir, backbone file or MLflow run id."),
    name: str = typer.Option("reddino-backbone", "--name"),
    metric: Optional[List[str]] = typer.Option(None, "--metric", help="Headline eval metric name=value (repeatable)."),
    eval_json: Optional[str] = typer.Option(None, "--eval-json", help="metrics.json from `reddino evaluate` (its "
                                            "random:<arch> model, if evaluated, becomes the baseline)."),
    baseline: Optional[List[str]] = typer.Option(None, "--baseline", help="Random-init baseline name=value "
                                                 "(repeatable); promotion needs the model to beat it."),
) -> None:
    """Register a run's exported teacher backbone (alias @candidate)."""
    from reddino.registry import register_backbone

    metrics, baselines = _metrics(metric), {}
    if eval_json:
        from reddino.registry.core import baseline_metrics, headline_metrics

        metrics.update(headline_metrics(eval_json))
        baselines.update(baseline_metrics(eval_json))
    baselines.update(_metrics(baseline))
    mv = register_backbone(run, name=name, metrics=metrics, baselines=baselines)
    typer.echo(f"registered {mv.name} v{mv.version} @candidate  (models:/{mv.name}@candidate)")
    if not baselines:
        typer.echo("note: no random-init baseline recorded (evaluate beside random:<arch>); promote will refuse it")


@models_app.command("promote")
def promote_cmd(
    name: str = typer.Argument("reddino-backbone"),
    alias: str = typer.Option("champion", "--alias"),
    metric: str = typer.Option("knn20_balanced_accuracy", "--metric"),
    force: bool = typer.Option(False, "--force"),
) -> None:
    """Move @alias to @candidate when it beats its random-init baseline and the current holder on --metric."""
    from reddino.registry import promote

    moved, reason = promote(name, alias=alias, metric=metric, force=force)
    typer.echo(("promoted: " if moved else "not promoted: ") + reason)
    if not moved:
        raise typer.Exit(code=1)


@models_app.command("pull")
def pull_cmd(ref: str = typer.Argument(..., help="name@alias, name/version or models:/..."),
             out: str = typer.Option(..., "--out")) -> None:
    """Download a registered backbone to a folder (timm-loadable file + its config)."""
    from reddino.registry import pull

    typer.echo(str(pull(ref, out)))


@models_app.command("list")
def list_cmd() -> None:
    """Names, versions, aliases and metrics of registered models."""
    from rich.console import Console
    from rich.table import Table

    from reddino.registry import list_models

    rows = list_models()
    distilled = any(row["teacher"] for row in rows)
    table = Table("name", "version", "aliases", "kind", "arch / backbone", *(["distilled from"] if distilled else []),
                  "metrics")
    for row in rows:
        table.add_row(row["name"], str(row["version"]), ",".join(row["aliases"]), row["kind"],
                      row["arch"] or row["backbone"], *([row["teacher"]] if distilled else []),
                      " ".join(f"{k}={v:.3f}" for k, v in row["metrics"].items()))
    Console().print(table)


def register(app: typer.Typer) -> None:
    app.add_typer(models_app, name="models")
