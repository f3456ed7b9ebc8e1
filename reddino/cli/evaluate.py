"""`reddino evaluate`: frozen-feature evaluation (RedDino protocol + grouped / cross-source) of backbones.

The options are the fields of :class:`reddino.config.EvalConfig` (``--config eval.yaml`` sets any of them).
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Any, List, Optional

import typer

from reddino.cli.options import config_command, param
from reddino.config import EvalConfig


class Pooling(str, Enum):  # the same choices as EvalConfig.pooling, for `embed` / `probe fit`
    cls = "cls"
    cls_mean = "cls+mean"


class Precision(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"


def _run(updates: dict[str, Any], *, model: List[str], data: List[Path], config: Optional[Path], no_cache: bool) -> None:
    """How well do frozen features separate RBC morphologies, and do they hold up on another lab's images?"""
    from rich.console import Console  # noqa: PLC0415

    from reddino.config import load_section  # noqa: PLC0415
    from reddino.evaluate import evaluate  # noqa: PLC0415

    console = Console()
    try:
        if no_cache:
            updates["cache_dir"] = None
        cfg = load_section(EvalConfig, config, updates)
        res = evaluate(list(model), [str(p) for p in data], cfg)
    except (ValueError, FileNotFoundError) as exc:
        Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(code=2) from None
    console.print(Path(res["files"]["markdown"]).read_text(), markup=False, highlight=False, soft_wrap=True)
    console.print(f"results: {res['files']['json']}\nreport: {res['files']['html']}", markup=False, highlight=False)
    if res.get("mlflow_run_ids"):
        console.print(f"MLflow runs: {', '.join(res['mlflow_run_ids'])}", markup=False, highlight=False)


evaluate_cmd = config_command(
    EvalConfig, _run,
    params=[
        param("model", List[str], typer.Option(..., "--model", "-m", help="Backbone export, run checkpoint dir, MLflow "
              "URI (models:/name@alias, runs:/id/backbone), random:<timm arch>, or 'handcrafted'. Repeat to compare "
              "models in one table.")),
        param("data", List[Path], typer.Option(..., "--data", "-d", help="Labelled Parquet dataset dir. Repeatable: "
              "kfold/fixed evaluate each on its own, cross-source pools them and splits by source.")),
        param("config", Optional[Path], typer.Option(None, "--config", help="EvalConfig YAML; options given here "
              "override it.")),
        param("no_cache", bool, typer.Option(False, "--no-cache", help="Do not read or write the embedding store.")),
    ],
    skip=("figures", "progress"),
    decls={"ks": ("--k",), "use_groups": ("--groups/--no-groups",), "use_ray": ("--ray/--no-ray",),
           "out_dir": ("--out",)},
)


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate_cmd)
