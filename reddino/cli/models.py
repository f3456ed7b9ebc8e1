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


HEADLINE = "knn20_balanced_accuracy"  # the metric `promote` ranks on by default


def _table(rows: list[list[str]]) -> str:
    """Plain aligned columns: nothing cut, at any width or in a pipe."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


@models_app.command("list")
def list_cmd(
    name: Optional[str] = typer.Argument(None, help="Only this registered model."),
    details: bool = typer.Option(False, "--details", help="Every metric, the backbone a probe needs, the tags."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable: one JSON list of versions on stdout."),
) -> None:
    """Registered models, one line per version: name, version, aliases, kind, arch and the headline kNN-20
    balanced accuracy (the store read is said on stderr)."""
    import json

    from reddino.registry import list_models
    from reddino.registry.core import registry_uri

    rows = [r for r in list_models(announce=False) if name is None or r["name"] == name]
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
        return
    typer.echo(f"registry: {registry_uri()}")
    if not rows:
        typer.echo(f"no registered models{' named ' + repr(name) if name else ''} in {registry_uri()}")
        return
    table = [["name", "version", "aliases", "kind", "arch", "knn20_bacc"]]  # bacc: HEADLINE, short
    for r in rows:
        metric = r["metrics"].get(HEADLINE)
        table.append([r["name"], str(r["version"]), ",".join("@" + a for a in r["aliases"]) or "-", r["kind"] or "-",
                      r["arch"] or "-", "-" if metric is None else f"{metric:.3f}"])
    typer.echo(_table(table))
    if not details:
        typer.echo(f"({len(rows)} versions; knn20_bacc = {HEADLINE}; --details: every metric; --json: all fields)")
        return
    for r in rows:
        typer.echo(f"\n{r['name']} v{r['version']}" + (f"  (backbone {r['backbone']})" if r["backbone"] else "")
                   + (f"  (distilled from {r['teacher']})" if r.get("teacher") else ""))
        for key, value in sorted(r["metrics"].items()):
            typer.echo(f"  {key} = {value:.4f}")


def register(app: typer.Typer) -> None:
    app.add_typer(models_app, name="models")
