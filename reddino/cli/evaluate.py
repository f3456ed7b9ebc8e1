"""`reddino evaluate`: frozen-feature evaluation (RedDino protocol + grouped / cross-source) of backbones."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer


class Protocol(str, Enum):
    kfold = "kfold"
    fixed = "fixed"
    cross_source = "cross-source"


class Pooling(str, Enum):
    cls = "cls"
    cls_mean = "cls+mean"


class Precision(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"


class Embedding(str, Enum):
    umap = "umap"
    pca = "pca"
    none = "none"


def evaluate_cmd(
    model: List[str] = typer.Option(..., "--model", "-m", help="Backbone export, run checkpoint dir, MLflow URI "
                                    "(models:/name@alias, runs:/id/backbone), random:<timm arch>, or 'handcrafted'. "
                                    "Repeat to compare models in one table."),
    data: List[Path] = typer.Option(..., "--data", "-d", help="Labelled Parquet dataset dir. Repeatable: kfold/fixed "
                                    "evaluate each on its own, cross-source pools them and splits by source."),
    protocol: Protocol = typer.Option(Protocol.kfold, help="kfold (RedDino), fixed split, or cross-source "
                                      "(leave-one-source-out + source x source matrix)."),
    folds: int = typer.Option(5, help="CV folds (kfold, and the cross-source matrix diagonal)."),
    k: Optional[List[int]] = typer.Option(None, "--k", help="kNN k (Euclidean, uniform); repeatable. Default: 1 and 20."),
    cosine_knn: bool = typer.Option(True, "--cosine-knn/--no-cosine-knn", help="Also the DINOv2 cosine kNN (T=0.07)."),
    probe: bool = typer.Option(True, "--probe/--no-probe", help="Logistic-regression probe (RedDino lambda)."),
    probe_sweep: bool = typer.Option(False, "--probe-sweep/--no-probe-sweep", help="Pick the probe's C on an inner split."),
    pooling: Pooling = typer.Option(Pooling.cls, help="cls (RedDino) or cls+mean (CLS concatenated with mean patch token)."),
    img_size: Optional[int] = typer.Option(None, help="Input size (default: the model's own)."),
    exclude_classes: Optional[List[int]] = typer.Option(None, "--exclude-classes", help="Drop these labels (repeatable)."),
    report_both_excluded: Optional[List[int]] = typer.Option(
        None, "--report-both-excluded", help="Also report every dataset without these labels (e.g. Chula class 12)."),
    max_images: Optional[int] = typer.Option(None, help="Deterministic subset of at most this many labelled cells per dataset."),
    groups: bool = typer.Option(True, "--groups/--no-groups", help="Keep each smear/slide (`group`) on one side of a split."),
    split_column: Optional[str] = typer.Option(None, help="fixed: column whose value --test-value marks test rows."),
    test_value: str = typer.Option("test", help="fixed: the --split-column value of test rows."),
    test_fraction: float = typer.Option(0.2, help="fixed without --split-column: grouped stratified holdout fraction."),
    out: Optional[Path] = typer.Option(None, help="Output dir (default ./eval/<timestamp>)."),
    cache_dir: Optional[Path] = typer.Option(None, help="Feature cache dir (default $REDDINO_HOME/cache/features)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Do not read or write the feature cache."),
    no_mlflow: bool = typer.Option(False, "--no-mlflow", help="Do not log an MLflow evaluation run."),
    experiment: str = typer.Option("reddino-eval", help="MLflow experiment."),
    tracking_uri: Optional[str] = typer.Option(None, help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite)."),
    embedding: Embedding = typer.Option(Embedding.umap, help="2-D feature map for the figures."),
    embedding_max: int = typer.Option(3000, help="At most this many points in the 2-D map."),
    seed: int = typer.Option(0, help="Seed of folds, subsets, random init and UMAP."),
    batch_size: int = typer.Option(64, help="Images per forward pass."),
    precision: Precision = typer.Option(Precision.auto, help="Feature extraction precision: auto = bf16 autocast "
                                        "where the device computes bf16 natively (recent CPUs/GPUs), else fp32."),
    num_cpus: Optional[int] = typer.Option(None, help="CPUs for the local Ray (default: all)."),
    ray: Optional[bool] = typer.Option(None, "--ray/--no-ray", help="Force Ray Data batch inference or in-process "
                                       "extraction (default: Ray from 5,000 cells up)."),
) -> None:
    """How well do frozen features separate RBC morphologies, and do they hold up on another lab's images?"""
    from rich.console import Console  # noqa: PLC0415

    from reddino.evaluate import evaluate  # noqa: PLC0415

    console = Console()
    try:
        res = evaluate(
            list(model),
            [str(p) for p in data],
            protocol=protocol.value,
            folds=folds,
            ks=tuple(k) if k else (1, 20),
            cosine_knn=cosine_knn,
            probe=probe,
            probe_sweep=probe_sweep,
            pooling=pooling.value,
            img_size=img_size,
            exclude_classes=exclude_classes,
            report_both_excluded=report_both_excluded,
            max_images=max_images,
            use_groups=groups,
            split_column=split_column,
            test_value=test_value,
            test_fraction=test_fraction,
            seed=seed,
            batch_size=batch_size,
            precision=precision.value,
            num_cpus=num_cpus,
            use_ray=ray,
            cache_dir=None if no_cache else (cache_dir.expanduser() if cache_dir else "default"),
            out_dir=out,
            mlflow=not no_mlflow,
            tracking_uri=tracking_uri,
            experiment=experiment,
            embedding=embedding.value,
            embedding_max=embedding_max,
        )
    except (ValueError, FileNotFoundError) as exc:
        Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(code=2) from None
    console.print(Path(res["files"]["markdown"]).read_text(), markup=False, highlight=False, soft_wrap=True)
    console.print(f"results: {res['files']['json']}\nreport: {res['files']['html']}", markup=False, highlight=False)
    if res.get("mlflow_run_ids"):
        console.print(f"MLflow runs: {', '.join(res['mlflow_run_ids'])}", markup=False, highlight=False)


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate_cmd)
