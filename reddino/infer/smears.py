"""`reddino classify --detect`: smear photos → cells → embeddings → probe → a morphology report per smear.

1. the smears are ingested with detection (:mod:`reddino.data.detect_ingest`) into ``out/cells`` (a reddino
   dataset; a re-run with the same settings reuses it);
2. :func:`reddino.infer.classify.classify` embeds and classifies the cells: ``predictions.*`` (one row per cell,
   with its smear, centre, box and flags parsed from ``image_id``), ``summary_by_smear.csv`` /
   ``summary_by_source.csv`` (counts and fractions of each morphology), ``summary.md``, ``morphology.png``;
3. for a sample of smears (``overlays``, the ones with most cells first), ``overlays/<smear>.png``: the smear with
   each detected cell's outline coloured by its predicted class;
4. ``report.html``: the per-source table, the chart, the per-smear table and the overlays in one page.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from reddino.paths import atomic_path


def smear_format(src: Path) -> str:
    """chula (``Dataset/``), voc (``JPEGImages/``) or folder."""
    if (src / "Dataset").is_dir():
        return "chula"
    if (src / "JPEGImages").is_dir():
        return "voc"
    return "folder"


def class_colours(names: list[str]) -> dict[str, tuple[int, int, int]]:
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    return {n: tuple(int(255 * v) for v in cmap(i % 20)[:3]) for i, n in enumerate(names)}


def draw_overlay(rgb: np.ndarray, labels: np.ndarray, cell_classes: dict[int, str],
                 colours: dict[str, tuple[int, int, int]], thickness: int = 2) -> np.ndarray:
    """The smear with each cell's outline (``labels`` = i + 1 for cell i) in its class colour."""
    import cv2

    out = rgb.copy()
    for i, name in cell_classes.items():
        m = (labels == i + 1).astype(np.uint8)
        if not m.any():
            continue
        cnts, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, cnts, -1, colours.get(name, (0, 0, 0)), thickness)
    return out


def _legend(img: np.ndarray, counts: dict[str, int], colours: dict[str, tuple[int, int, int]]) -> np.ndarray:
    import cv2

    items = [(n, c) for n, c in counts.items() if c]
    h = 18 * len(items) + 8
    pad = np.full((max(h, img.shape[0]), 230, 3), 255, np.uint8)
    for k, (n, c) in enumerate(items):
        y = 8 + 18 * k
        cv2.rectangle(pad, (6, y), (20, y + 12), colours[n], -1)
        cv2.putText(pad, f"{n} ({c})", (26, y + 11), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (0, 0, 0), 1, cv2.LINE_AA)
    canvas = np.full((pad.shape[0], img.shape[1], 3), 255, np.uint8)
    canvas[: img.shape[0]] = img
    return np.concatenate([canvas, pad], axis=1)


def write_overlays(pred: pd.DataFrame, manifest: dict, out: Path, names: list[str], n: int) -> list[dict[str, Any]]:
    """``overlays/<smear>.png`` for the ``n`` smears with most detected cells (ties by name)."""
    import cv2

    from reddino.data.detect_ingest import DetectSpec
    from reddino.data.images import decode_image_strict

    if n <= 0 or pred.empty:
        return []
    cfg = manifest["meta"]["config"]
    src = Path(cfg["src"])
    d = cfg["detect"]
    spec = DetectSpec.make(d["name"], d["params"], d.get("crop_size"), d.get("crop_scale") or 3.2)
    colours = class_colours(names)
    counts = pred.groupby("smear").size().sort_values(ascending=False, kind="stable")
    chosen = sorted(counts.index[:n], key=lambda s: (-counts[s], s))
    odir = out / "overlays"
    odir.mkdir(parents=True, exist_ok=True)
    done = []
    for smear in chosen:
        rows = pred[pred["smear"] == smear]
        try:
            rgb = decode_image_strict((src / smear).read_bytes())
        except (OSError, ValueError):
            continue  # the smear moved since ingest: no overlay, the tables still hold its cells
        det = spec.detector().detect(rgb, keep_labels=True)  # deterministic: the same cells as at ingest
        cls = {int(c): name for c, name in zip(rows["cell"], rows["class_name"]) if int(c) < det.n}
        img = _legend(draw_overlay(rgb, det.labels, cls, colours), rows["class_name"].value_counts()
                      .reindex(names, fill_value=0).to_dict(), colours)
        name = smear.replace("/", "__").rsplit(".", 1)[0] + ".png"
        with atomic_path(odir / name) as tmp:
            ok, buf = cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
            Path(tmp).write_bytes(buf.tobytes())
        done.append({"smear": smear, "file": f"overlays/{name}", "cells": int(len(rows))})
    return done


def _html_table(df: pd.DataFrame, max_rows: int = 200) -> str:
    fr = [c for c in df.columns if c.startswith("frac_")]
    show = df.head(max_rows).copy()
    for c in fr:
        show[c] = show[c].map(lambda v: f"{v:.1%}")
    show = show[[c for c in show.columns if not c.startswith("n_")]]
    show.columns = [c.removeprefix("frac_") for c in show.columns]
    return show.to_html(index=False, border=0, classes="t")


def write_report(out: Path, res, overlays: list[dict], detection: dict, meta: dict) -> Path:
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>reddino morphology report</title>",
        "<style>body{font-family:sans-serif;margin:24px;max-width:1200px}table.t{border-collapse:collapse;"
        "font-size:12px}table.t td,table.t th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
        "img{max-width:100%}figure{display:inline-block;margin:8px;width:45%}</style></head><body>",
        "<h1>Morphology report</h1>",
        f"<p>{res.predictions.shape[0]:,} cells detected in {detection.get('smears', 0):,} smears by "
        f"{html.escape(str(detection.get('detector')))} (median {detection.get('cells_per_smear_median', 0):.0f} per smear;"
        f" dropped: {html.escape(json.dumps(detection.get('dropped', {})))}); backbone "
        f"{html.escape(str(meta.get('backbone')))}, probe {html.escape(str(meta.get('classifier')))}.</p>",
        "<h2>Per source</h2>", _html_table(res.by_source),
        "<img src='morphology.png' alt='morphology chart'>",
    ]
    if res.metrics:
        m = res.metrics
        parts.append(f"<p>Against the {m['n']} cells whose label matched a detected cell: balanced accuracy "
                     f"{m['balanced_accuracy']:.3f}, accuracy {m['accuracy']:.3f}.</p>")
    if overlays:
        parts.append("<h2>Smears (outlines coloured by predicted class)</h2>")
        for o in overlays:
            parts.append(f"<figure><img src='{html.escape(o['file'])}'><figcaption>{html.escape(o['smear'])} — "
                         f"{o['cells']} cells</figcaption></figure>")
    parts += ["<h2>Per smear</h2>", _html_table(res.by_smear), "</body></html>"]
    path = out / "report.html"
    with atomic_path(path) as tmp:
        Path(tmp).write_text("\n".join(parts))
    return path


def classify_smears(model: str, probe: str, smears: str | Path, out: str | Path, *, detector: str = "classical",
                    detector_params: dict | None = None, crop_size: int | None = None, source: str | None = None,
                    workers: int | None = None, overlays: int = 12, batch_size: int = 64, concurrency: int = 1,
                    num_cpus: int | None = None, overwrite: bool = False, progress: bool = True,
                    report=None):
    """Detect, embed and classify the cells of every smear photo under ``smears``; returns the classify result
    with ``files["report"]`` and ``files["overlays"]`` added."""
    from reddino.data.ingest import ingest
    from reddino.data.detect_ingest import parse_cell_id
    from reddino.infer.classify import classify
    from reddino.infer.probe import load_probe

    smears, out = Path(smears).expanduser(), Path(out).expanduser()
    probe_meta = load_probe(probe).meta  # a bad probe reference fails before the detection pass
    cells = out / "cells"
    fmt = smear_format(smears)
    ingest(fmt, smears, cells, unit="cell", detect=True, detector=detector, detector_params=detector_params,
           detect_crop_size=crop_size, source=source or (None if fmt != "folder" else smears.resolve().name),
           workers=workers, overwrite=overwrite, progress=progress, report=report)
    mdict = json.loads((cells / "_manifest.json").read_text())
    res = classify(model, probe, cells, out, batch_size=batch_size, concurrency=concurrency, num_cpus=num_cpus,
                   overwrite=overwrite, progress=progress)
    info = [parse_cell_id(i) or {} for i in res.predictions["image_id"]]
    pred = res.predictions
    pred["smear"] = [d.get("smear", "") for d in info]
    pred["cell"] = [d.get("cell", -1) for d in info]
    pred["cx"] = [d.get("cx", np.nan) for d in info]
    pred["cy"] = [d.get("cy", np.nan) for d in info]
    pred["box"] = [",".join(map(str, d["box"])) if "box" in d else "" for d in info]
    pred["flags"] = ["|".join(d.get("flags", [])) for d in info]
    # predictions with the cell columns (rewrite, atomically, what classify wrote)
    with atomic_path(Path(res.files["parquet"])) as tmp:
        pred.drop(columns=["image"], errors="ignore").to_parquet(tmp, index=False)
    with atomic_path(Path(res.files["csv"])) as tmp:
        pred.drop(columns=["image"], errors="ignore").to_csv(tmp, index=False)
    names = [c.removeprefix("frac_") for c in res.by_source.columns if c.startswith("frac_")]
    ov = write_overlays(pred, mdict, out, names, overlays)
    res.files["overlays"] = [str(out / o["file"]) for o in ov]
    res.files["report"] = str(write_report(out, res, ov, (mdict.get("meta") or {}).get("detection", {}), probe_meta))
    return res


__all__ = ["classify_smears", "draw_overlay", "write_overlays", "smear_format"]
