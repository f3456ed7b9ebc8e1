"""`reddino demo`: the whole platform on a laptop, in one command, with no GPU and no network.

synthetic multi-source RBCs → Parquet → local Ray → tiny DINOv2 pretraining (Ray Train) → evaluation
against random-init and handcrafted baselines (kNN, probe, cross-source) → registry (candidate →
champion) → a results table and the command to open the MLflow UI. Everything lands in one folder.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from reddino.paths import write_text_atomic

console = Console()


@dataclass
class DemoSize:
    n_per_class: int = 40  # labelled cells per class per source (9 classes × 3 sources)
    n_patches: int = 300  # unlabelled smear patches per source (the sweep's patch arm)
    n_pool: int = 120  # cells per class per source of the pretraining pool (labels never read)
    steps: int = 150  # optimizer steps of the tiny preset (~4 min on 2 cores)
    batch: int = 32
    eval_every: int = 50
    sweep_trials: int = 4
    sweep_steps: int = 40


QUICK = DemoSize(n_per_class=6, n_patches=24, n_pool=6, steps=6, batch=8, eval_every=3, sweep_trials=2, sweep_steps=4)


@dataclass
class DemoResult:
    out: Path
    table: list[dict[str, Any]] = field(default_factory=list)
    backbone_path: Path | None = None
    model_version: str | None = None
    promoted: str = ""
    tracking_uri: str = ""
    seconds: float = 0.0
    sweep_dir: Path | None = None


def _step(i: int, n: int, text: str) -> None:
    console.rule(f"[bold cyan]{i}/{n}[/] {text}")


def _row(entry: dict[str, Any], label: str) -> dict[str, Any]:
    head = entry.get("headline", {})
    return {"model": label, **{k: v for k, v in head.items() if isinstance(v, (int, float))}}


def run_demo(out: str | Path = "reddino-demo", *, quick: bool = False, with_sweep: bool = False,
             num_cpus: int | None = None) -> DemoResult:
    size = QUICK if quick else DemoSize()
    t0 = time.perf_counter()
    out = Path(out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    # The demo's own store unless the user chose one; handed to every step explicitly.
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{out / 'mlflow.db'}"
    result = DemoResult(out=out, tracking_uri=tracking_uri)
    n = 6 if with_sweep else 5

    _step(1, n, "synthetic RBCs: 9 morphologies × 3 sources (stain, optics, scale) → Parquet")
    from reddino.data import generate_synthetic

    cells, patches = out / "data" / "cells", out / "data" / "patches"
    pool = out / "data" / "pool"  # the pretraining set: other cells of the same sources, their labels unused
    generate_synthetic(cells, n_per_class=size.n_per_class, sources=3, unit="cell", seed=0, overwrite=True)
    generate_synthetic(pool, n_per_class=size.n_pool, sources=3, unit="cell", seed=2, overwrite=True)
    generate_synthetic(patches, n_per_class=size.n_per_class, sources=3, unit="patch", seed=1,
                       n_patches=size.n_patches, overwrite=True)

    _step(2, n, "local Ray (loopback only) + DINOv2 pretraining of the tiny ViT on unlabelled cells")
    from reddino.config import load_config
    from reddino.runtime import cpus_with_driver_headroom, init_ray
    from reddino.train import pretrain

    init_ray(num_cpus=num_cpus or cpus_with_driver_headroom(), log_to_driver=True)
    cfg = load_config("tiny_cpu", [
        f"data.paths=[{pool}]", f"eval.data={cells}", f"eval.every={size.eval_every}",
        "train.epochs=1", f"train.iters_per_epoch={size.steps}", f"train.batch_size_per_worker={size.batch}",
        f"train.checkpoint_every={size.eval_every}", f"train.storage_path={out / 'runs'}",
        f"mlflow.tracking_uri={tracking_uri}", "mlflow.experiment=reddino-demo",
    ])
    trained = pretrain(cfg, run_name=f"demo-{time.strftime('%Y%m%d-%H%M%S')}")
    if trained.stopped or trained.backbone_path is None:
        raise RuntimeError(f"demo pretraining did not finish: {trained.stopped or 'no backbone exported'}")
    result.backbone_path = trained.backbone_path

    _step(3, n, "frozen-feature evaluation: kNN-1/20 + linear probe, grouped 5-fold and leave-one-source-out")
    from reddino.evaluate import evaluate

    arch = cfg.model.arch
    refs = [str(trained.backbone_path), f"random:{arch}", "handcrafted"]
    labels = ["pretrained", "random init", "handcrafted"]  # same architecture for the first two
    # use_ray=None: in process below evaluate's RAY_MIN_ROWS (the demo's ~1,000 cells embed in seconds; a Ray Data
    # actor pool per model would cost ~30 s each here)
    kfold = evaluate(refs, str(cells), protocol="kfold", folds=3 if quick else 5, img_size=cfg.model.img_size,
                     out_dir=out / "eval" / "kfold", tracking_uri=tracking_uri, use_ray=None, progress=True)
    xsrc = evaluate(refs, str(cells), protocol="cross-source", img_size=cfg.model.img_size,
                    out_dir=out / "eval" / "cross-source", tracking_uri=tracking_uri, use_ray=None, progress=True)
    for entry, label in zip(kfold["models"], labels):
        result.table.append(_row(entry, label))
    for entry, row in zip(xsrc["models"], result.table):
        for k, v in entry.get("headline", {}).items():
            if isinstance(v, (int, float)):
                row[f"xsrc_{k}"] = v

    _step(4, n, "MLflow registry: register the backbone (@candidate), promote it to @champion if it wins")
    from reddino.registry import promote, register_backbone

    headline = {k: v for k, v in result.table[0].items() if isinstance(v, (int, float))}
    baseline = {k: v for k, v in result.table[1].items() if isinstance(v, (int, float))}  # random init, same arch
    version = register_backbone(str(trained.run_dir), name="reddino-demo-backbone", metrics=headline,
                                baselines=baseline, tracking_uri=tracking_uri)
    result.model_version = str(version.version)
    metric = next((k for k in headline if "knn20" in k and "balanced" in k), next(iter(headline), "knn20_balanced_accuracy"))
    moved, reason = promote("reddino-demo-backbone", metric=metric, tracking_uri=tracking_uri)
    result.promoted = reason

    if with_sweep:
        _step(5, n, "Optuna + ASHA sweep over the RedDino ablation axes (in-training kNN)")
        from reddino.tune import sweep

        sw = sweep("ablation", data=[patches, pool], eval_data=str(cells), trials=size.sweep_trials,
                   out=out / "sweeps", name="demo", overrides=[
                       f"train.iters_per_epoch={size.sweep_steps}", "train.epochs=1",
                       f"train.batch_size_per_worker={size.batch}", f"eval.every={max(size.sweep_steps // 4, 1)}",
                       f"train.checkpoint_every={size.sweep_steps}", f"mlflow.tracking_uri={tracking_uri}"])
        result.sweep_dir = sw.sweep_dir

    _step(n, n, "results")
    result.seconds = time.perf_counter() - t0
    show(result)
    return result


def _short(key: str) -> str:
    """knn20_balanced_accuracy → kNN-20, cosknn20_… → cos kNN-20, probe_… → probe (fits 80 columns)."""
    name = key.removeprefix("xsrc_").removesuffix("_balanced_accuracy")
    return name.replace("cosknn", "cos kNN-").replace("knn", "kNN-")


def summary_tables(result: DemoResult) -> list[tuple[str, list[str], list[list[str]]]]:
    """One (title, headers, rows) of balanced accuracies per protocol, short labels: console and summary.md."""
    keys = [k for k in result.table[0] if k.endswith("_balanced_accuracy")]
    out = []
    for title, ks in (("grouped 5-fold", [k for k in keys if not k.startswith("xsrc_")]),
                      ("leave one source out (LOSO)", [k for k in keys if k.startswith("xsrc_")])):
        if ks:
            rows = [[row["model"], *[f"{row.get(k, float('nan')):.3f}" for k in ks]] for row in result.table]
            out.append((title, ["model", *[_short(k) for k in ks]], rows))
    return out


def write_summary(result: DemoResult) -> Path:
    lines = ["# reddino demo", "", "Synthetic RBC morphology (9 classes, 3 sources), balanced accuracy.", ""]
    for title, headers, rows in summary_tables(result):
        lines += [f"**{title}**", "", "| " + " | ".join(headers) + " |", "|---|" + "---:|" * (len(headers) - 1)]
        lines += ["| " + " | ".join(r) + " |" for r in rows] + [""]
    lines += [f"- backbone: `{result.backbone_path}`",
              f"- registry: reddino-demo-backbone v{result.model_version} — {result.promoted}",
              f"- wall time: {result.seconds / 60:.1f} min", ""]
    return write_text_atomic(result.out / "summary.md", "\n".join(lines))


def show(result: DemoResult) -> None:
    if result.table:
        for title, headers, rows in summary_tables(result):
            table = Table(title=f"Synthetic RBCs, balanced accuracy: {title}")
            for i, h in enumerate(headers):
                table.add_column(h, justify="left" if i == 0 else "right", no_wrap=True)
            for r in rows:
                table.add_row(*r)
            console.print(table)
        console.print(f"summary: {write_summary(result)}")
    console.print(f"backbone: {result.backbone_path}")
    console.print(f"registry: reddino-demo-backbone v{result.model_version} — {result.promoted}")
    if result.sweep_dir:
        console.print(f"sweep: {result.sweep_dir}")
    console.print(f"everything is in {result.out}  ({result.seconds / 60:.1f} min)")
    console.print(f"MLflow UI: mlflow ui --backend-store-uri {result.tracking_uri} --host 127.0.0.1")
