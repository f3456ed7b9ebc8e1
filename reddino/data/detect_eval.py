"""Scoring a cell detector against labelled centres (Chula RBC-12) and boxes (Pascal VOC / BCCD).

Used by ``benchmarks/detect_quality.py`` and the detector tests, so the README's numbers and the asserted ones
are computed the same way.

- :func:`match_centres`: one-to-one matching of labelled centres to detected cells. A pair may match when the
  centre lies inside the cell's mask or within ``tol`` (default half the median cell radius) of its centroid;
  among those, the assignment maximises the number of matches and then minimises the total distance
  (Hungarian).
- :func:`fully_labelled`: the rule for "every cell in this image is labelled" (Chula labels only some cells in
  many images): at least ``min_ratio`` labelled centres per detected whole (not border-cut) cell... see the docs.
- :func:`match_boxes`: one-to-one box matching at IoU >= ``iou``.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from reddino.data.detect import BORDER_CUT, Detection


@dataclass
class CentreMatch:
    n_labels: int
    n_cells: int
    matched: int
    label_to_cell: np.ndarray  # per label: matched cell index or -1
    point_cell: np.ndarray  # per label: the cell whose mask holds the point (-1: background)

    @property
    def recall(self) -> float:
        return self.matched / self.n_labels if self.n_labels else float("nan")

    @property
    def precision(self) -> float:
        return self.matched / self.n_cells if self.n_cells else float("nan")


def match_centres(det: Detection, points: np.ndarray, tol: float | None = None) -> CentreMatch:
    """Match labelled centres ``points`` (N x 2, x y) one to one to ``det``'s cells (needs ``det.labels``)."""
    from scipy.optimize import linear_sum_assignment

    pts = np.asarray(points, np.float64).reshape(-1, 2)
    n, m = len(pts), det.n
    inside = np.full(n, -1, np.int64)
    if det.labels is not None and n:
        h, w = det.labels.shape
        xi = np.clip(np.round(pts[:, 0]).astype(int), 0, w - 1)
        yi = np.clip(np.round(pts[:, 1]).astype(int), 0, h - 1)
        inside = det.labels[yi, xi].astype(np.int64) - 1
    if n == 0 or m == 0:
        return CentreMatch(n, m, 0, np.full(n, -1, np.int64), inside)
    if tol is None:
        tol = 0.5 * _median_radius(det)
    cx = np.array([c.cx for c in det.cells])
    cy = np.array([c.cy for c in det.cells])
    d = np.hypot(pts[:, 0:1] - cx[None, :], pts[:, 1:2] - cy[None, :])
    ok = d <= tol
    ok[np.arange(n)[inside >= 0], inside[inside >= 0]] = True
    big = 1e6
    cost = np.where(ok, d, big)
    rows, cols = linear_sum_assignment(cost)
    good = cost[rows, cols] < big
    l2c = np.full(n, -1, np.int64)
    l2c[rows[good]] = cols[good]
    return CentreMatch(n, m, int(good.sum()), l2c, inside)


def _median_radius(det: Detection) -> float:
    areas = [c.area for c in det.cells if BORDER_CUT not in c.flags] or [c.area for c in det.cells]
    return math.sqrt(float(np.median(areas)) / math.pi) if areas else det.radius


def fully_labelled(n_labels: int, det: Detection, min_ratio: float = 0.9) -> bool:
    """An image counts as fully labelled when it has at least ``min_ratio`` labelled centres per detected cell.

    Chula images are either labelled throughout (ratio ≈ 1) or only for one class of interest (image 200:
    the burr cells, ratio ≈ 0.2); the ratio's histogram over the 623 labelled images is bimodal, so the rule is
    robust to the exact cut (the benchmark prints the count at 0.8 / 0.9 / 1.0).
    """
    return det.n > 0 and n_labels >= min_ratio * det.n


def touching_pairs(points: np.ndarray, m: CentreMatch, diameter: float, factor: float = 1.1) -> tuple[int, int, int]:
    """Labelled pairs closer than ``factor`` cell diameters (touching cells): (pairs, split, merged).

    Split: both centres matched, to different cells. Merged: both centres inside the same cell's mask.
    """
    pts = np.asarray(points, np.float64).reshape(-1, 2)
    if len(pts) < 2:
        return 0, 0, 0
    d = np.hypot(pts[:, None, 0] - pts[None, :, 0], pts[:, None, 1] - pts[None, :, 1])
    ii, jj = np.nonzero(np.triu(d < factor * diameter, 1))
    split = merged = 0
    for i, j in zip(ii, jj):
        a, b = m.label_to_cell[i], m.label_to_cell[j]
        if a >= 0 and b >= 0 and a != b:
            split += 1
        elif m.point_cell[i] >= 0 and m.point_cell[i] == m.point_cell[j]:
            merged += 1
    return len(ii), split, merged


# --------------------------------------------------------------------------- boxes


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes ``a`` (N x 4) and ``b`` (M x 4), each ``x0 y0 x1 y1`` (x1, y1 exclusive)."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    ix = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    iy = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = ix * iy
    area = lambda z: (z[:, 2] - z[:, 0]) * (z[:, 3] - z[:, 1])  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-9), 0.0)


def match_boxes(gt: np.ndarray, pred: np.ndarray, iou: float = 0.5) -> np.ndarray:
    """One-to-one matching (maximum total IoU among pairs >= ``iou``); per gt box the matched pred index or -1."""
    from scipy.optimize import linear_sum_assignment

    gt = np.asarray(gt, np.float64).reshape(-1, 4)
    pred = np.asarray(pred, np.float64).reshape(-1, 4)
    out = np.full(len(gt), -1, np.int64)
    if len(gt) == 0 or len(pred) == 0:
        return out
    m = iou_matrix(gt, pred)
    rows, cols = linear_sum_assignment(-np.where(m >= iou, m, 0))
    ok = m[rows, cols] >= iou
    out[rows[ok]] = cols[ok]
    return out


def cell_boxes(det: Detection) -> np.ndarray:
    return np.array([[c.x0, c.y0, c.x1, c.y1] for c in det.cells], np.float64).reshape(-1, 4)


# --------------------------------------------------------------------------- dataset readers


def chula_points(label_file: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(points N x 2 as x y, classes N)`` from a Chula ``Label/<n>.txt``."""
    rows = []
    for line in Path(label_file).read_text().splitlines():
        parts = line.replace(",", " ").split()
        if len(parts) == 3:
            rows.append([float(parts[0]), float(parts[1]), float(parts[2])])
    a = np.asarray(rows, np.float64).reshape(-1, 3)
    return a[:, :2], a[:, 2].astype(np.int64)


def voc_boxes(xml_file: str | Path) -> list[tuple[str, tuple[int, int, int, int]]]:
    """``[(name, (x0, y0, x1, y1))]`` in 0-based exclusive pixel coords; degenerate boxes dropped."""
    out = []
    root = ET.parse(xml_file).getroot()
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        bb = obj.find("bndbox")
        try:
            x0, y0, x1, y1 = (int(round(float(bb.findtext(t)))) for t in ("xmin", "ymin", "xmax", "ymax"))
        except (TypeError, ValueError, AttributeError):
            continue
        if x1 > x0 and y1 > y0:
            out.append((name, (x0 - 1, y0 - 1, x1, y1)))
    return out


__all__ = ["match_centres", "fully_labelled", "touching_pairs", "match_boxes", "iou_matrix", "cell_boxes",
           "chula_points", "voc_boxes", "CentreMatch"]
