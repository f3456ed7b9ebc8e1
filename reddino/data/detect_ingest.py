"""``reddino ingest FORMAT SRC --unit cell --detect``: smear photos → one row per detected cell.

Each smear is decoded, its cells are found by a detector (:mod:`reddino.data.detect`, ``classical`` by default),
and every cell becomes a square crop centred on its centroid (``crop_size`` px, or ``crop_scale`` x the smear's
cell radius when no size is given, so 50 px and 100 px cells both get about a cell and a half of context; past
the border the smear is padded like Chula crops). A row's ``group`` is the smear, ``image_id`` says where the
crop and the cell are::

    Dataset/12.jpg#x=301,y=88,w=80,h=80&cell=7&cx=341.2&cy=128.9&box=316,104,367,154&area=2011&flags=border_cut

(``flags`` ``-`` when none; :func:`parse_cell_id` reads it back). Cells are unlabelled unless the source has
labels: Chula centres are matched one to one to the detected cells (:func:`reddino.data.detect_eval.match_centres`),
VOC boxes at IoU >= 0.5; a labelled point or box with no detected cell is not a row (counted in the manifest's
``meta["detection"]``). Smears where nothing is detected are skipped with the reason. The detector's name,
version and parameters are in ``manifest["meta"]["config"]["detect"]``; per-smear cell counts and what the
detector dropped in ``manifest["meta"]["detection"]``.
"""

from __future__ import annotations

import importlib
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from reddino.data.detect import DEFAULT_DETECTOR, DetectError, describe, get_detector
from reddino.data.schema import make_row

DEFAULT_CROP_SCALE = 3.2  # Chula: 80 px crops around ~25 px-radius cells
MIN_CROP = 16


@dataclass(frozen=True)
class DetectSpec:
    """Which detector, with which parameters, and how cells are cropped (picklable, hashable)."""

    name: str = DEFAULT_DETECTOR
    params: tuple[tuple[str, Any], ...] = ()
    crop_size: int | None = None
    crop_scale: float = DEFAULT_CROP_SCALE

    @classmethod
    def make(cls, name: str | None = None, params: dict | None = None, crop_size: int | None = None,
             crop_scale: float = DEFAULT_CROP_SCALE) -> "DetectSpec":
        spec = cls(name or DEFAULT_DETECTOR, tuple(sorted((params or {}).items())), crop_size, float(crop_scale))
        spec.detector()  # unknown detector or parameter: fail now, in the caller, with the detector's message
        if crop_size is not None and crop_size < MIN_CROP:
            raise DetectError(f"crop size must be >= {MIN_CROP} px, got {crop_size}")
        return spec

    def detector(self):
        return _detector(self.name, self.params)

    def config(self) -> dict[str, Any]:
        return {**describe(self.detector()), "crop_size": self.crop_size,
                "crop_scale": None if self.crop_size else self.crop_scale}


@lru_cache(maxsize=8)
def _detector(name: str, params: tuple[tuple[str, Any], ...]):
    return get_detector(name, **dict(params))


def crop_side(spec: DetectSpec, radius: float) -> int:
    if spec.crop_size:
        return int(spec.crop_size)
    return max(MIN_CROP, 2 * int(round(spec.crop_scale * radius / 2)))


_ID = re.compile(r"^(?P<rel>.*)#x=(?P<x>-?\d+),y=(?P<y>-?\d+),w=(?P<w>\d+),h=(?P<h>\d+)(?P<rest>(&[a-z]+=[^&]*)*)$")


def cell_id(rel: str, crop_xy: tuple[int, int], side: int, i: int, cell) -> str:
    flags = "|".join(cell.flags) or "-"
    return (f"{rel}#x={crop_xy[0]},y={crop_xy[1]},w={side},h={side}&cell={i}&cx={cell.cx:.1f}&cy={cell.cy:.1f}"
            f"&box={cell.x0},{cell.y0},{cell.x1},{cell.y1}&area={cell.area}&flags={flags}")


def parse_cell_id(image_id: str) -> dict[str, Any] | None:
    """The smear path, crop window and detected cell (centre, box, area, flags) of a detected cell's ``image_id``;
    None for ids of other rows (labelled crops, tiles)."""
    m = _ID.match(image_id)
    if not m or "&cell=" not in image_id:
        return None
    kv = dict(part.split("=", 1) for part in m.group("rest").strip("&").split("&"))
    return {
        "smear": m.group("rel"), "crop": tuple(int(m.group(k)) for k in ("x", "y", "w", "h")),
        "cell": int(kv["cell"]), "cx": float(kv["cx"]), "cy": float(kv["cy"]),
        "box": tuple(int(v) for v in kv["box"].split(",")), "area": int(kv["area"]),
        "flags": [] if kv.get("flags", "-") == "-" else kv["flags"].split("|"),
    }


def detect_cell_rows(rgb: np.ndarray, rel: str, group: str, source: str, spec: DetectSpec, *, encode: str = "png",
                     pad: str = "reflect", points: Sequence | None = None, boxes: Sequence | None = None):
    """Rows for the cells detected in one decoded smear; ``(rows, skips, summary)``.

    ``points``: Chula-style ``(where, x, y, label, name)`` centres; ``boxes``: VOC-style
    ``(x0, y0, x1, y1, label, name)`` (1-based inclusive corners, as in the annotation files)."""
    from reddino.data.detect_eval import match_boxes, match_centres
    from reddino.data.images import encode_image
    from reddino.data.ingest import crop_centered, pad_image

    det = spec.detector().detect(rgb, keep_labels=bool(points))
    summary = {"cells": det.n, "radius": round(det.radius, 2), "dropped": det.dropped}
    if det.n == 0:
        why = det.note or "nothing cell-like"
        return [], [{"file": rel, "reason": f"no cells detected ({why})"}], summary
    labels: list[tuple[int, str] | None] = [None] * det.n
    if points:
        pts = np.array([[p[1], p[2]] for p in points], np.float64)
        m = match_centres(det, pts)
        for j, ci in enumerate(m.label_to_cell):
            if ci >= 0:
                labels[ci] = (points[j][3], points[j][4])
        summary["labels_unmatched"] = int((m.label_to_cell < 0).sum())
    if boxes:
        gt = np.array([[b[0] - 1, b[1] - 1, b[2], b[3]] for b in boxes], np.float64)
        cb = np.array([[c.x0, c.y0, c.x1, c.y1] for c in det.cells], np.float64)
        mb = match_boxes(gt, cb)
        for j, ci in enumerate(mb):
            if ci >= 0:
                labels[ci] = (boxes[j][4], boxes[j][5])
        summary["labels_unmatched"] = int((mb < 0).sum())
    side = crop_side(spec, det.radius)
    padded = pad_image(rgb, side, pad)
    fmt = "png" if encode == "keep" else encode
    rows = []
    for i, c in enumerate(det.cells):
        cx, cy = int(round(c.cx)), int(round(c.cy))
        crop = crop_centered(rgb, cx, cy, side, pad, padded=padded)
        lab = labels[i]
        rows.append(make_row(encode_image(crop, fmt), height=side, width=side, source=source, group=group, unit="cell",
                             image_id=cell_id(rel, (cx - side // 2, cy - side // 2), side, i, c),
                             label=None if lab is None else lab[0], label_name=None if lab is None else lab[1]))
    return rows, [], summary


def task_detect(img_path: str, rel: str, group: str, ann: tuple[str, list] | None, opts, spec: DetectSpec):
    """Worker task: one smear file → ``(rows, skips, {rel: summary})``."""
    from reddino.data.ingest import _load

    _, rgb, err = _load(Path(img_path), rel)
    if err:
        if ann and ann[1]:
            err["reason"] += f"; its {len(ann[1])} annotation(s) were dropped"
        return [], [err], {}
    kind, items = ann if ann else (None, None)
    try:
        rows, skips, summary = detect_cell_rows(rgb, rel, group, opts.source, spec, encode=opts.encode, pad=opts.pad,
                                                points=items if kind == "points" else None,
                                                boxes=items if kind == "boxes" else None)
    except (DetectError, MemoryError) as exc:
        return [], [{"file": rel, "reason": f"detection failed ({exc})"}], {}
    return rows, skips, {rel: summary}


# --------------------------------------------------------------------------- planning


def plan(format: str, src: Path, opts, classes: Sequence[str] | None, skips: list, spec: DetectSpec):
    """Tasks for every smear image of ``src`` (labelled or not), the class table and the smear groups."""
    ing = importlib.import_module("reddino.data.ingest")

    cell_opts = opts
    if format == "chula":
        ddir, ldir = src / "Dataset", src / "Label"
        if not ddir.is_dir():
            raise ing.IngestError(f"{src} is not a Chula RBC-12 tree: missing {ddir}")
        class_table = dict(enumerate(classes)) if classes else dict(ing.CHULA_CLASSES)
        images = {p.stem: p for p in ing._files(ddir)}
        if not images:
            raise ing.IngestError(f"no images in {ddir}")
        labels = {p.stem: p for p in ing._files(ldir) if p.suffix.lower() == ".txt"} if ldir.is_dir() else {}
        order = sorted(images, key=ing._natural)
        groups = ing._canonical_groups(images, order)
        tasks = []
        for stem in order:
            ann = None
            if stem in labels:
                ann = ("points", ing._parse_chula_labels(labels[stem], f"Label/{labels[stem].name}", class_table, skips))
            tasks.append(("detect", (str(images[stem]), f"Dataset/{images[stem].name}", groups[stem], ann, opts, spec)))
        return tasks, class_table, groups
    if format == "voc":
        jdir = src / "JPEGImages"
        if not jdir.is_dir():
            raise ing.IngestError(f"{src} is not a Pascal VOC tree: missing {jdir}")
        images = {p.stem: p for p in ing._files(jdir)}
        if not images:
            raise ing.IngestError(f"no images in {jdir}")
        boxes: dict[str, list] = {}
        class_table: dict[int, str] = {}
        if (src / "Annotations").is_dir():
            try:
                vtasks, class_table, _ = ing._plan_voc(src, cell_opts, classes, skips)
            except ing.IngestError:
                vtasks = []
            for _, (img, _rel, _g, _xml, kept, _o) in vtasks:
                boxes[Path(img).stem] = kept
        groups = ing._canonical_groups(images, sorted(images))
        tasks = [("detect", (str(p), f"JPEGImages/{p.name}", groups[stem],
                             ("boxes", boxes[stem]) if stem in boxes else None, opts, spec))
                 for stem, p in sorted(images.items())]
        return tasks, class_table, groups
    if format == "folder":
        if classes:
            raise ing.IngestError("--classes does not apply to --detect on a folder (detected cells are unlabelled)")
        files = sorted(p for p in src.rglob("*") if p.is_file()
                       and not any(q.startswith(".") for q in p.relative_to(src).parts))
        if not files:
            raise ing.IngestError(f"no image files found in {src}")
        tasks = []
        for p in files:
            rel = str(p.relative_to(src))
            tasks.append(("detect", (str(p), rel, rel.rsplit(".", 1)[0] if "." in Path(rel).name else rel, None, opts, spec)))
        return tasks, {}, {}
    raise ing.IngestError(f"--detect does not support format {format!r}")


def summarise(per_smear: dict[str, dict], spec: DetectSpec) -> dict[str, Any]:
    """The manifest's ``meta["detection"]``: totals, and per smear its cell count, radius and drops."""
    dropped: dict[str, int] = {}
    for s in per_smear.values():
        for k, v in s.get("dropped", {}).items():
            dropped[k] = dropped.get(k, 0) + v
    cells = [s["cells"] for s in per_smear.values()]
    return {
        "detector": f"{spec.name} {spec.detector().version}",
        "smears": len(per_smear),
        "cells": int(sum(cells)),
        "cells_per_smear_median": float(np.median(cells)) if cells else 0.0,
        "dropped": dict(sorted(dropped.items())),
        "labels_unmatched": int(sum(s.get("labels_unmatched", 0) for s in per_smear.values())),
        "per_smear": {k: {"cells": v["cells"], "radius": v["radius"]} for k, v in per_smear.items()},
    }


def parse_params(text: str | None) -> dict[str, Any]:
    """``--detector-params``: ``key=value,key=value`` (numbers parsed) or a JSON object."""
    import json

    if not text:
        return {}
    text = text.strip()
    if text.startswith("{"):
        return dict(json.loads(text))
    out: dict[str, Any] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        if "=" not in part:
            raise DetectError(f"detector parameter {part!r} is not key=value")
        k, v = (s.strip() for s in part.split("=", 1))
        try:
            val: Any = int(v)
        except ValueError:
            try:
                val = float(v)
            except ValueError:
                val = None if v.lower() in ("none", "null") else v
        if isinstance(val, float) and not math.isfinite(val):
            raise DetectError(f"detector parameter {k} must be finite")
        out[k] = val
    return out


__all__ = ["DetectSpec", "detect_cell_rows", "parse_cell_id", "cell_id", "plan", "summarise", "parse_params",
           "task_detect", "crop_side"]
