"""`reddino embed`, `reddino probe fit`, `reddino classify`: use a backbone on your own cells."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from reddino.cli.evaluate import Pooling, Precision  # the same choices as `reddino evaluate`

probe_app = typer.Typer(help="Probes on frozen features: fit (k-fold scored), save, register.", no_args_is_help=True)

MODEL_HELP = ("Backbone: models:/name@alias, a run dir, an export file, random:<timm arch> or 'handcrafted' "
              "(anything `reddino evaluate` takes).")


class Dtype(str, Enum):
    float32 = "float32"
    float16 = "float16"


def _fail(exc: Exception) -> None:
    from rich.console import Console  # noqa: PLC0415

    Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False)
    raise typer.Exit(code=2)


def embed_cmd(
    model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
    data: Path = typer.Option(..., "--data", "-d", help="reddino Parquet dataset dir (labelled or not)."),
    out: Path = typer.Option(..., "--out", help="Output dir: emb-*.parquet shards + _manifest.json."),
    pooling: Pooling = typer.Option(Pooling.cls, help="cls, or CLS concatenated with the mean patch token."),
    img_size: Optional[int] = typer.Option(None, help="Input size (default: the model's own)."),
    batch_size: int = typer.Option(64, help="Images per forward pass (and per Ray Data batch)."),
    concurrency: int = typer.Option(1, help="Model actors (one GPU each when the cluster has GPUs)."),
    precision: Precision = typer.Option(Precision.auto, help="auto = bf16 where the device computes it natively."),
    dtype: Dtype = typer.Option(Dtype.float32, help="Stored embedding dtype."),
    num_cpus: Optional[int] = typer.Option(None, help="CPUs of the local Ray (default: all)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output of other settings."),
) -> None:
    """Embeddings of every cell in a dataset, by Ray Data batch inference; resumable after an interruption."""
    from reddino.features import EmbedError, embed  # noqa: PLC0415

    try:
        res = embed(model, data, out, pooling=pooling.value, img_size=img_size, batch_size=batch_size,
                    concurrency=concurrency, precision=precision.value, dtype=dtype.value, num_cpus=num_cpus,
                    overwrite=overwrite)
    except EmbedError as exc:
        _fail(exc)
    m = res.manifest
    note = f"; {res.reused} shard(s) reused" if res.reused else ""
    skipped = m["skipped"]["count"]
    typer.echo(f"{m['num_rows']:,} embeddings ({m['dim']}-d {m['dtype']}, {m['pooling']}, {m['img_size']} px, "
               f"{m['precision']}) → {res.out}  [{res.seconds:.1f} s{note}]")
    if skipped:
        ex = m["skipped"]["examples"][0]
        typer.echo(f"skipped {skipped} image(s) that do not decode, e.g. {ex['image_id']} ({ex['error']}); "
                   f"listed in {res.out / '_manifest.json'}")


@probe_app.command("fit")
def probe_fit_cmd(
    model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
    data: Path = typer.Option(..., "--data", "-d", help="Labelled reddino Parquet dataset dir."),
    classifier: str = typer.Option("probe", help="probe (RedDino logistic rule), knn<k> or cosknn<k>."),
    out: Optional[Path] = typer.Option(None, help="Save probe.pkl + probe.json here."),
    register: Optional[str] = typer.Option(None, "--register", help="Register in MLflow under this name (@candidate)."),
    exclude_classes: Optional[List[int]] = typer.Option(None, "--exclude-classes", help="Leave out these labels."),
    folds: int = typer.Option(5, help="Grouped stratified folds for the reported scores."),
    pooling: Pooling = typer.Option(Pooling.cls),
    img_size: Optional[int] = typer.Option(None, help="Input size (default: the model's own)."),
    seed: int = typer.Option(0),
) -> None:
    """Fit a classifier on a backbone's frozen features; report grouped k-fold scores; save and register it."""
    from reddino.features import EmbedError  # noqa: PLC0415
    from reddino.infer.probe import fit_probe  # noqa: PLC0415

    if out is None and register is None:
        raise typer.BadParameter("nothing would keep the probe: pass --out and/or --register")
    try:
        p = fit_probe(model, data, classifier=classifier, out=out, register=register, exclude_labels=exclude_classes,
                      folds=folds, pooling=pooling.value, img_size=img_size, seed=seed)
    except EmbedError as exc:
        _fail(exc)
    k = p.meta["kfold"]
    typer.echo(f"{classifier} on {p.meta['data']['rows']:,} cells, {len(p.classes)} classes, backbone "
               f"{p.meta['backbone']}: {k['folds']}-fold{' grouped' if k['grouped'] else ''} balanced accuracy "
               f"{k['balanced_accuracy_mean']:.3f} ± {k['balanced_accuracy_std']:.3f}, weighted F1 "
               f"{k['f1_weighted_mean']:.3f} ± {k['f1_weighted_std']:.3f}")
    if out is not None:
        typer.echo(f"saved: {out}")
    if "registered" in p.meta:
        r = p.meta["registered"]
        typer.echo(f"registered {r['name']} v{r['version']} @{r['alias']}  (models:/{r['name']}@{r['alias']})")


def classify_cmd(
    model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
    probe: str = typer.Option(..., "--probe", help="models:/name@alias, name@alias, or a `probe fit --out` dir."),
    data: Path = typer.Option(..., "--data", "-d", help="reddino Parquet dataset dir of the cells to classify."),
    out: Path = typer.Option(..., "--out", help="Output dir (predictions, summaries, chart, embeddings)."),
    batch_size: int = typer.Option(64),
    concurrency: int = typer.Option(1, help="Model actors for the embedding pass."),
    num_cpus: Optional[int] = typer.Option(None, help="CPUs of the local Ray (default: all)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Recompute embeddings made with other settings."),
    detect: bool = typer.Option(False, "--detect", help="--data is a folder of smear photos (flat, Chula or VOC tree): find the cells first, then classify them; adds overlays/ and report.html."),
    detector: str = typer.Option("classical", help="--detect: which detector."),
    detector_params: Optional[str] = typer.Option(None, help="--detect: detector parameters, key=value,... or JSON."),
    crop_size: Optional[int] = typer.Option(None, help="--detect: crop side (px; default 3.2 cell radii per smear)."),
    overlays: int = typer.Option(12, help="--detect: smears drawn with their cells' outlines coloured by class."),
    workers: Optional[int] = typer.Option(None, help="--detect: detection processes (default: all CPUs)."),
) -> None:
    """Per-cell morphology predictions and per-smear / per-source fractions (CSV, markdown, bar chart)."""
    from rich.console import Console  # noqa: PLC0415

    from reddino.infer.classify import classify  # noqa: PLC0415
    from reddino.features import EmbedError  # noqa: PLC0415

    if detect:
        _classify_smears(model, probe, data, out, detector, detector_params, crop_size, overlays, workers, batch_size,
                         concurrency, num_cpus, overwrite)
        return
    try:
        res = classify(model, probe, data, out, batch_size=batch_size, concurrency=concurrency, num_cpus=num_cpus,
                       overwrite=overwrite)
    except EmbedError as exc:
        _fail(exc)
    Console().print(Path(res.files["markdown"]).read_text(), markup=False, highlight=False, soft_wrap=True)
    typer.echo(f"per cell: {res.files['csv']}\nper smear: {res.files['by_smear']}\nchart: {res.files['plot']}")


def _classify_smears(model, probe, data, out, detector, detector_params, crop_size, overlays, workers, batch_size,
                     concurrency, num_cpus, overwrite) -> None:
    import logging  # noqa: PLC0415

    from rich.console import Console  # noqa: PLC0415

    from reddino.data.detect import DetectError  # noqa: PLC0415
    from reddino.data.detect_ingest import parse_params  # noqa: PLC0415
    from reddino.data.ingest import IngestError  # noqa: PLC0415
    from reddino.data.shards import DatasetExistsError  # noqa: PLC0415
    from reddino.features import EmbedError  # noqa: PLC0415
    from reddino.infer.smears import classify_smears  # noqa: PLC0415

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    err = Console(stderr=True)
    try:
        res = classify_smears(model, probe, data, out, detector=detector, detector_params=parse_params(detector_params),
                              crop_size=crop_size, overlays=overlays, workers=workers, batch_size=batch_size,
                              concurrency=concurrency, num_cpus=num_cpus, overwrite=overwrite,
                              report=lambda msg: err.print(msg, style="yellow", markup=False, highlight=False))
    except (EmbedError, IngestError, DetectError, DatasetExistsError, FileNotFoundError) as exc:
        _fail(exc)
    Console().print(Path(res.files["markdown"]).read_text(), markup=False, highlight=False, soft_wrap=True)
    typer.echo(f"per cell: {res.files['csv']}\nper smear: {res.files['by_smear']}\nchart: {res.files['plot']}\n"
               f"overlays: {len(res.files['overlays'])} in {Path(out) / 'overlays'}\nreport: {res.files['report']}")


def register(app: typer.Typer) -> None:
    app.command("embed")(embed_cmd)
    app.command("classify")(classify_cmd)
    app.add_typer(probe_app, name="probe")
