"""`reddino ingest`, `reddino synth`, `reddino summary`: thin wrappers over :mod:`reddino.data`."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer


class Format(str, Enum):
    folder = "folder"
    chula = "chula"
    voc = "voc"


class Unit(str, Enum):
    cell = "cell"
    patch = "patch"


class SynthUnit(str, Enum):
    cell = "cell"
    patch = "patch"
    both = "both"


class Encode(str, Enum):
    png = "png"
    jpeg = "jpeg"
    tiff_zstd = "tiff-zstd"
    keep = "keep"


class Pad(str, Enum):
    reflect = "reflect"
    constant = "constant"


def _detector_params(text: Optional[str]) -> dict:
    from reddino.data.detect import DetectError
    from reddino.data.detect_ingest import parse_params

    try:
        return parse_params(text)
    except (DetectError, ValueError) as exc:
        _fail(exc)


def _command() -> str:
    return " ".join(["reddino", *sys.argv[1:]])


def _fail(exc: Exception) -> None:
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True).print(f"[bold red]error:[/] {escape(str(exc))}", markup=True, highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


def _print_summary(manifest, title: str | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    head = Table(title=title or f"dataset {manifest.path}", show_header=False)
    head.add_column(no_wrap=True)
    head.add_column(overflow="fold")
    head.add_row("rows", f"{manifest['num_rows']:,}")
    head.add_row("content hash", manifest["content_hash"])
    head.add_row("schema version", str(manifest["schema_version"]))
    head.add_row("shards", f"{len(manifest['shards'])} ({sum(s['bytes'] for s in manifest['shards']) / 1e6:.1f} MB)")
    head.add_row("units", ", ".join(f"{k}: {v:,}" for k, v in manifest["units"].items()))
    head.add_row("unlabelled", f"{manifest.get('unlabelled', 0):,}")
    head.add_row("duplicates dropped", str(manifest.get("duplicates", {}).get("count", 0)))
    head.add_row("skipped inputs", str(len(manifest.get("skipped", []))))
    head.add_row("created", str(manifest.get("created")))
    console.print(head)
    src = Table(title="per source")
    src.add_column("source")
    src.add_column("rows", justify="right")
    for k, v in manifest["sources"].items():
        src.add_row(k, f"{v:,}")
    console.print(src)
    if manifest.get("labels"):
        lab = Table(title="per label")
        lab.add_column("id", justify="right")
        lab.add_column("name")
        lab.add_column("rows", justify="right")
        for k, v in manifest["labels"].items():
            lab.add_row(k, str(v["name"]), f"{v['count']:,}")
        console.print(lab)


def ingest_cmd(
    format: Format = typer.Argument(..., help="Input layout: folder (ImageFolder or flat), chula (Chula RBC-12), voc (Pascal VOC)."),
    src: Path = typer.Argument(..., help="Source directory."),
    out: Path = typer.Option(..., "--out", "-o", help="Output dataset directory (Parquet shards + _manifest.json)."),
    unit: Unit = typer.Option(Unit.cell, help="cell: one row per annotated cell / crop file; patch: tile whole smears."),
    crop_size: Optional[int] = typer.Option(None, help="Chula: square crop size (px) centred on each annotated cell (default 80); --detect: crop side for every cell (default 3.2 cell radii per smear)."),
    patch_size: int = typer.Option(224, help="--unit patch: tile size (px); grid centred, remainders dropped."),
    source: Optional[str] = typer.Option(None, help="Source name (default: chula-rbc-12 / bccd / the folder name)."),
    workers: Optional[int] = typer.Option(None, help="Worker processes (default: all CPUs; 1 = in-process)."),
    encode: Optional[Encode] = typer.Option(None, help="keep (folder cells only; default there), png (default), tiff-zstd (lossless, ~1/3 of PNG's decode CPU for ~12 % more bytes: for GPU training), jpeg."),
    classes: Optional[str] = typer.Option(None, help="Class names in id order: comma-separated or a file with one per line."),
    pad: Pad = typer.Option(Pad.reflect, help="Chula border padding: reflect or constant (median colour)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing different dataset in --out."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    detect: bool = typer.Option(False, "--detect", help="--unit cell: find the cells in every smear photo with a detector (one row per detected cell; labels attached where the source's labels match)."),
    detector: str = typer.Option("classical", help="--detect: which detector (see reddino.data.detect.register_detector)."),
    detector_params: Optional[str] = typer.Option(None, help="--detect: detector parameters, key=value,... or JSON (e.g. cell_radius=48)."),
    ray: bool = typer.Option(False, "--ray", help="Run the per-image work on Ray (RAY_ADDRESS's cluster, else a local Ray) instead of --workers processes; SRC must be on storage every node reads."),
) -> None:
    """Ingest raw images/annotations into a reddino Parquet dataset."""
    import logging
    import time

    from rich.console import Console

    from reddino.data.ingest import IngestError, ingest
    from reddino.data.shards import DatasetExistsError, ManifestError

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    err = Console(stderr=True)
    t0 = time.perf_counter()
    try:
        m = ingest(
            format.value, src, out, unit=unit.value, crop_size=80 if crop_size is None else crop_size,
            patch_size=patch_size, source=source,
            workers=workers, encode=encode.value if encode else None, classes=classes, pad=pad.value,
            overwrite=overwrite, progress=progress, command=_command(),
            report=lambda msg: err.print(msg, style="yellow", markup=False, highlight=False, soft_wrap=True),
            detect=detect, detector=detector, detector_params=_detector_params(detector_params) if detect else None,
            detect_crop_size=crop_size if detect else None, use_ray=ray,
        )
    except (IngestError, DatasetExistsError, ManifestError, FileNotFoundError) as exc:
        _fail(exc)
    _print_summary(m, title=f"{out} ({time.perf_counter() - t0:.1f} s)")
    if detect and (m.get("meta") or {}).get("detection"):
        d = m["meta"]["detection"]
        err.print(f"detected {d['cells']:,} cells in {d['smears']:,} smears (median {d['cells_per_smear_median']:.0f} "
                  f"per smear; dropped: {d['dropped'] or 'none'}; labelled points/boxes without a detected cell: "
                  f"{d['labels_unmatched']})", markup=False, highlight=False)


def synth_cmd(
    out: Path = typer.Option(..., "--out", "-o", help="Output dataset directory."),
    n_per_class: int = typer.Option(50, help="Cells per class per source."),
    sources: int = typer.Option(3, help="Number of synthetic sources (stain/optics styles)."),
    unit: SynthUnit = typer.Option(SynthUnit.cell, help="cell, patch or both."),
    seed: int = typer.Option(0, help="Random seed (output is deterministic given it)."),
    size: int = typer.Option(64, help="Cell image size (px)."),
    patch_size: int = typer.Option(224, help="Patch size (px) for --unit patch/both."),
    n_patches: Optional[int] = typer.Option(None, help="Patches per source (default: --n-per-class)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing different dataset in --out."),
) -> None:
    """Generate a procedural synthetic RBC dataset (9 morphology classes, several sources)."""
    import time

    from reddino.data.shards import DatasetExistsError
    from reddino.data.synth import generate_synthetic

    t0 = time.perf_counter()
    try:
        m = generate_synthetic(out, n_per_class=n_per_class, sources=sources, unit=unit.value, seed=seed, size=size,
                               patch_size=patch_size, n_patches=n_patches, overwrite=overwrite, command=_command())
    except (DatasetExistsError, ValueError) as exc:
        _fail(exc)
    _print_summary(m, title=f"{out} ({time.perf_counter() - t0:.1f} s)")


def _verify(path: Path):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from reddino.data.shards import read_manifest, verify_dataset

    n = read_manifest(path)["num_rows"]
    with Progress(TextColumn("verify"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  transient=True) as bar:
        task = bar.add_task("rows", total=n)
        return verify_dataset(path, progress=lambda k: bar.advance(task, k))


def verify_cmd(
    path: Path = typer.Argument(..., help="Dataset directory."),
) -> None:
    """Check a dataset against its manifest: shard sizes, sha256, schema, row counts, every image decodes."""
    from reddino.data.shards import ManifestError

    try:
        m = _verify(path)
    except ManifestError as exc:
        _fail(exc)
    typer.echo(f"ok: {m.path} — {m['num_rows']} rows in {len(m['shards'])} shard(s) match the manifest")


def summary_cmd(
    path: Path = typer.Argument(..., help="Dataset directory (or its _manifest.json)."),
    verify: bool = typer.Option(False, "--verify", help="Also check the shards against the manifest "
                                "(as `reddino verify`)."),
    skipped: int = typer.Option(10, help="How many skipped inputs to list."),
) -> None:
    """Print a dataset manifest's counts."""
    from rich.console import Console

    from reddino.data.shards import ManifestError, read_manifest

    try:
        m = _verify(path) if verify else read_manifest(path)
    except ManifestError as exc:
        _fail(exc)
    _print_summary(m)
    sk = m.get("skipped", [])
    if sk and skipped > 0:
        console = Console()
        console.print(f"skipped inputs ({len(sk)}), first {min(skipped, len(sk))}:")
        for s in sk[:skipped]:
            console.print(f"  {s['file']}: {s['reason']}", highlight=False, markup=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("ingest")(ingest_cmd)
    app.command("synth")(synth_cmd)
    app.command("verify")(verify_cmd)
    app.command("summary")(summary_cmd)
