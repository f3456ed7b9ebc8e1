"""Procedural synthetic red blood cells, for the embedded demo and tests.

Each cell is an optical-density map (a soft shape mask times a thickness profile: central pallor,
target ring, slit, ...) rendered through Beer-Lambert with a per-source stain, background colour,
illumination gradient, blur, noise and scale, so sources differ the way labs/cameras do while the
morphology classes stay separable by shape. Everything is vectorised numpy/cv2 and deterministic
given ``seed`` (every image has its own RNG stream keyed by seed/source/class/index).

``generate_synthetic(out_dir, ...)`` writes the rows straight into a reddino Parquet dataset:
``unit="cell"`` single labelled cells (``size`` px), ``unit="patch"`` unlabelled smear-like
``patch_size`` tiles with 6–15 cells of mixed classes, or ``"both"``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Iterator, Sequence

import cv2
import numpy as np

from reddino.data.images import encode_image
from reddino.data.schema import make_row
from reddino.data.shards import Manifest, check_output_dir, write_dataset

SYNTH_VERSION = 1

SYNTH_CLASSES: dict[int, str] = {
    0: "normal",
    1: "spherocyte",
    2: "elliptocyte",
    3: "target",
    4: "echinocyte",
    5: "sickle",
    6: "schistocyte",
    7: "stomatocyte",
    8: "dacrocyte",
}
SLIDES_PER_SOURCE = 4


@dataclass(frozen=True)
class SourceStyle:
    """How one synthetic lab/camera renders cells."""

    name: str
    background: tuple[float, float, float]  # RGB of the empty field
    absorbance: tuple[float, float, float]  # RGB optical density per unit cell density
    gradient: float  # illumination ramp amplitude (fraction)
    blur: float  # gaussian sigma (px) of the optics
    noise: float  # gaussian noise sigma (grey levels)
    scale: float  # cell size multiplier (magnification)


_PRESETS = [
    SourceStyle("synth-a", (236, 231, 226), (0.30, 1.25, 0.95), 0.06, 0.6, 3.0, 1.00),
    SourceStyle("synth-b", (212, 218, 236), (0.60, 1.15, 0.55), 0.18, 1.2, 5.0, 0.86),
    SourceStyle("synth-c", (241, 236, 198), (0.18, 0.90, 1.10), 0.10, 0.3, 8.0, 1.12),
]


def source_styles(sources: int | Sequence[str], seed: int = 0) -> list[SourceStyle]:
    """``sources`` styles: the three presets first, then random (seeded) ones; names may be given."""
    names = [f"synth-{chr(ord('a') + i)}" if i < 26 else f"synth-{i}" for i in range(sources)] if isinstance(sources, int) else list(sources)
    if not names:
        raise ValueError("need at least one source")
    styles = []
    for i, name in enumerate(names):
        if i < len(_PRESETS):
            styles.append(SourceStyle(name, *[getattr(_PRESETS[i], f) for f in ("background", "absorbance", "gradient", "blur", "noise", "scale")]))
            continue
        r = np.random.default_rng([seed, 7919, i])
        styles.append(
            SourceStyle(
                name,
                tuple(float(v) for v in r.uniform(195, 245, 3)),
                tuple(float(v) for v in r.uniform([0.15, 0.8, 0.4], [0.7, 1.35, 1.2])),
                float(r.uniform(0.0, 0.2)),
                float(r.uniform(0.2, 1.4)),
                float(r.uniform(2.0, 9.0)),
                float(r.uniform(0.85, 1.15)),
            )
        )
    return styles


# --------------------------------------------------------------------------- shapes


def _edge(sd: np.ndarray, aa: float = 0.8) -> np.ndarray:
    """Soft inside-mask from a signed distance (negative inside)."""
    return np.clip(0.5 - sd / aa, 0.0, 1.0)


def _cell_density(cls: int, rng: np.random.Generator, radius: float, h: int, w: int, cy: float, cx: float) -> np.ndarray:
    """Optical-density map (h x w, float32) of one cell of class ``cls`` centred at (cy, cx)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    phi = rng.uniform(0, 2 * math.pi)
    dx, dy = x - cx, y - cy
    u = dx * math.cos(phi) + dy * math.sin(phi)
    v = -dx * math.sin(phi) + dy * math.cos(phi)
    rho = np.hypot(u, v)
    theta = np.arctan2(v, u)
    R = radius * rng.uniform(0.92, 1.08)
    dens = rng.uniform(0.5, 0.62)
    name = SYNTH_CLASSES[cls]
    if name == "normal":
        r = R * (1 + rng.uniform(0.0, 0.04) * np.cos(2 * theta))
        mask = _edge(rho - r)
        pallor = rng.uniform(0.6, 0.75)
        prof = 1 - pallor * np.exp(-((rho / (0.45 * R)) ** 2))
    elif name == "spherocyte":
        Rs = R * rng.uniform(0.66, 0.74)
        mask = _edge(rho - Rs)
        prof = 1.55 + 0.25 * np.clip(1 - (rho / Rs) ** 2, 0, 1)
    elif name == "elliptocyte":
        a, b = R * rng.uniform(1.22, 1.35), R * rng.uniform(0.52, 0.62)
        q = np.sqrt((u / a) ** 2 + (v / b) ** 2)
        mask = _edge((q - 1) * b)
        prof = 1 - 0.3 * np.exp(-((u / (0.55 * a)) ** 2 + (v / (0.4 * b)) ** 2))
    elif name == "target":
        mask = _edge(rho - R)
        ring = np.exp(-(((rho - 0.47 * R) / (0.13 * R)) ** 2))
        prof = 1.05 - rng.uniform(0.6, 0.75) * ring
    elif name == "echinocyte":
        k = int(rng.integers(10, 17))
        spikes = (0.5 + 0.5 * np.cos(k * theta)) ** 6
        r = R * 0.9 * (1 + rng.uniform(0.13, 0.2) * spikes)
        mask = _edge(rho - r)
        prof = 1.1 - 0.25 * np.exp(-((rho / (0.4 * R)) ** 2))
    elif name == "sickle":
        vv = v / rng.uniform(1.2, 1.35)
        r1, r2, d = R * 1.0, R * 0.92, R * rng.uniform(0.45, 0.6)
        mask = np.minimum(_edge(np.hypot(u, vv) - r1), 1 - _edge(np.hypot(u - d, vv) - r2))
        prof = np.full_like(rho, 1.35)
    elif name == "schistocyte":
        Rf = R * rng.uniform(0.75, 0.9)
        cut = Rf * rng.uniform(0.1, 0.35)
        bite_c, bite_r = (Rf * rng.uniform(-0.3, 0.1), Rf * rng.uniform(0.85, 1.05)), Rf * rng.uniform(0.4, 0.55)
        mask = np.minimum.reduce([
            _edge(rho - Rf),
            _edge(u - cut),
            1 - _edge(np.hypot(u - bite_c[0], v - bite_c[1]) - bite_r),
        ])
        prof = np.full_like(rho, 1.3)
    elif name == "stomatocyte":
        mask = _edge(rho - R * rng.uniform(0.92, 1.0))
        slit = np.exp(-((u / (0.52 * R)) ** 2 + (v / (0.1 * R)) ** 2))
        prof = 1.1 - rng.uniform(0.75, 0.9) * slit
    elif name == "dacrocyte":
        tail = rng.uniform(0.6, 0.8)
        r = R * 0.85 * (1 + tail * np.exp(-((theta / 0.32) ** 2)))
        mask = _edge(rho - r)
        prof = 1 - 0.3 * np.exp(-((rho / (0.4 * R)) ** 2))
    else:  # pragma: no cover
        raise ValueError(f"unknown synthetic class {cls}")
    return (mask * prof * dens).astype(np.float32)


def _render(od: np.ndarray, style: SourceStyle, rng: np.random.Generator, slide_jitter: np.ndarray) -> np.ndarray:
    """Optical density (h x w) → RGB uint8 through the source's stain and optics."""
    h, w = od.shape
    od = cv2.GaussianBlur(od, (0, 0), 0.7)
    absorb = np.asarray(style.absorbance, np.float32) * slide_jitter[:3]
    bg = np.asarray(style.background, np.float32) * slide_jitter[3:]
    ang = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ramp = ((xx / max(w - 1, 1) - 0.5) * math.cos(ang) + (yy / max(h - 1, 1) - 0.5) * math.sin(ang))
    illum = 1 + style.gradient * ramp * rng.uniform(0.6, 1.4)
    img = bg[None, None, :] * illum[:, :, None] * np.exp(-od[:, :, None] * absorb[None, None, :])
    if style.blur > 0:
        img = cv2.GaussianBlur(img, (0, 0), style.blur)
    img = img + rng.normal(0, style.noise, img.shape).astype(np.float32)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def _slide_jitter(seed: int, src_idx: int, slide: int) -> np.ndarray:
    r = np.random.default_rng([seed, 104729, src_idx, slide])
    return np.concatenate([r.uniform(0.92, 1.08, 3), r.uniform(0.96, 1.03, 3)]).astype(np.float32)


def render_cell(cls: int, style: SourceStyle, rng: np.random.Generator, size: int = 64,
                slide_jitter: np.ndarray | None = None) -> np.ndarray:
    """One ``size`` x ``size`` RGB uint8 image of a single cell of class ``cls``."""
    radius = 0.3 * size * style.scale
    c = (size - 1) / 2
    cy, cx = c + rng.uniform(-0.04, 0.04) * size, c + rng.uniform(-0.04, 0.04) * size
    od = _cell_density(cls, rng, radius, size, size, cy, cx)
    jit = slide_jitter if slide_jitter is not None else np.ones(6, np.float32)
    return _render(od, style, rng, jit)


def render_patch(style: SourceStyle, rng: np.random.Generator, size: int = 224, cell_size: int = 64,
                 n_cells: tuple[int, int] = (6, 15), slide_jitter: np.ndarray | None = None) -> tuple[np.ndarray, list[int]]:
    """A smear-like ``size`` x ``size`` tile with several cells of mixed classes; returns (RGB, classes)."""
    radius = 0.3 * cell_size * style.scale
    od = np.zeros((size, size), np.float32)
    n = int(rng.integers(n_cells[0], n_cells[1] + 1))
    classes = [int(c) for c in rng.integers(0, len(SYNTH_CLASSES), n)]
    win = int(math.ceil(radius * 3.6)) | 1
    half = win // 2
    for cls in classes:
        cy, cx = rng.uniform(-0.3 * radius, size + 0.3 * radius, 2)
        iy, ix = int(round(cy)), int(round(cx))
        local = _cell_density(cls, rng, radius, win, win, half + (cy - iy), half + (cx - ix))
        y0, x0 = iy - half, ix - half
        ys, xs = max(y0, 0), max(x0, 0)
        ye, xe = min(y0 + win, size), min(x0 + win, size)
        if ye > ys and xe > xs:
            od[ys:ye, xs:xe] += local[ys - y0 : ye - y0, xs - x0 : xe - x0]
    jit = slide_jitter if slide_jitter is not None else np.ones(6, np.float32)
    return _render(od, style, rng, jit), classes


def render_smear(style: SourceStyle, rng: np.random.Generator, height: int = 480, width: int = 640, cell_size: int = 64,
                 n_cells: int = 40, touching: int = 6, classes: Sequence[int] | None = None,
                 slide_jitter: np.ndarray | None = None) -> tuple[np.ndarray, list[dict]]:
    """A whole smear photo with ``n_cells`` single cells and ``touching`` touching pairs: ``(RGB, cells)``.

    Cells (``{"x", "y", "r", "cls", "pair"}``, centre in pixels, nominal radius) are placed without overlap, except
    ``touching`` pairs drawn with their rims touching (centres 1.9-2.0 radii apart; ``pair`` = the pair's index,
    -1 for single cells). Classes cycle through ``classes`` (default: the round-ish ones, so every cell is one
    connected blob of about a cell's area)."""
    radius = 0.3 * cell_size * style.scale
    cls_ids = list(classes) if classes is not None else [0, 1, 3, 4, 7]  # normal, sphero, target, echino, stomato
    od = np.zeros((height, width), np.float32)
    placed: list[dict] = []
    win = int(math.ceil(radius * 3.6)) | 1
    half = win // 2

    def free(x: float, y: float, ignore: int = -1) -> bool:
        return all(math.hypot(x - c["x"], y - c["y"]) > 2.25 * radius for i, c in enumerate(placed) if i != ignore)

    tries = 0
    while len(placed) < n_cells + 2 * touching and tries < 20000:
        tries += 1
        x, y = rng.uniform(radius, width - radius), rng.uniform(radius, height - radius)
        if not free(x, y):
            continue
        n_pairs = sum(c["pair"] >= 0 for c in placed) // 2
        pair = n_pairs if n_pairs < touching else -1
        if pair >= 0:
            ang = rng.uniform(0, 2 * math.pi)
            d = radius * rng.uniform(1.9, 2.0)
            x2, y2 = x + d * math.cos(ang), y + d * math.sin(ang)
            if not (radius <= x2 < width - radius and radius <= y2 < height - radius) or not free(x2, y2):
                continue
            placed.append({"x": x, "y": y, "pair": pair})
            placed.append({"x": x2, "y": y2, "pair": pair})
        else:
            placed.append({"x": x, "y": y, "pair": -1})
    for i, c in enumerate(placed):
        c["cls"] = int(cls_ids[i % len(cls_ids)])
        iy, ix = int(round(c["y"])), int(round(c["x"]))
        # a pair's cells are drawn round and full-size so that their rims really touch
        local = _cell_density(0 if c["pair"] >= 0 else c["cls"], rng, radius, win, win, half + (c["y"] - iy), half + (c["x"] - ix))
        if c["pair"] >= 0:
            c["cls"] = 0
        y0, x0 = iy - half, ix - half
        ys, xs = max(y0, 0), max(x0, 0)
        ye, xe = min(y0 + win, height), min(x0 + win, width)
        od[ys:ye, xs:xe] = np.maximum(od[ys:ye, xs:xe], local[ys - y0 : ye - y0, xs - x0 : xe - x0])
        c["r"] = radius
    jit = slide_jitter if slide_jitter is not None else np.ones(6, np.float32)
    return _render(od, style, rng, jit), placed


# --------------------------------------------------------------------------- rows / dataset


def synth_rows(n_per_class: int = 50, sources: int | Sequence[str] = 3, unit: str = "cell", seed: int = 0,
               size: int = 64, patch_size: int = 224, n_patches: int | None = None,
               classes: Sequence[int] | None = None) -> Iterator[dict]:
    """Yield schema rows: cells (``n_per_class`` per class per source) and/or patches (``n_patches`` per source)."""
    if unit not in ("cell", "patch", "both"):
        raise ValueError(f"unknown unit {unit!r} (expected cell, patch or both)")
    styles = source_styles(sources, seed)
    cls_ids = list(classes) if classes is not None else list(SYNTH_CLASSES)
    jitters = {(s, j): _slide_jitter(seed, s, j) for s in range(len(styles)) for j in range(SLIDES_PER_SOURCE)}
    if unit in ("cell", "both"):
        for s, style in enumerate(styles):
            for cls in cls_ids:
                for i in range(n_per_class):
                    slide = i % SLIDES_PER_SOURCE
                    rng = np.random.default_rng([seed, s, 0, cls, i])
                    img = render_cell(cls, style, rng, size, jitters[s, slide])
                    yield make_row(encode_image(img, "png", png_compression=1), height=size, width=size,
                                   source=style.name, group=f"{style.name}-slide{slide}", unit="cell",
                                   image_id=f"synth/{style.name}/{SYNTH_CLASSES[cls]}/{i:05d}",
                                   label=cls, label_name=SYNTH_CLASSES[cls])
    if unit in ("patch", "both"):
        n_p = n_patches if n_patches is not None else max(1, n_per_class)
        for s, style in enumerate(styles):
            for i in range(n_p):
                slide = i % SLIDES_PER_SOURCE
                rng = np.random.default_rng([seed, s, 1, i])
                img, _ = render_patch(style, rng, patch_size, size, slide_jitter=jitters[s, slide])
                yield make_row(encode_image(img, "png", png_compression=1), height=patch_size, width=patch_size,
                               source=style.name, group=f"{style.name}-slide{slide}", unit="patch",
                               image_id=f"synth/{style.name}/patch/{i:05d}")


def generate_synthetic(
    out_dir: str | os.PathLike,
    n_per_class: int = 50,
    sources: int | Sequence[str] = 3,
    unit: str = "cell",
    seed: int = 0,
    size: int = 64,
    *,
    patch_size: int = 224,
    n_patches: int | None = None,
    overwrite: bool = False,
    command: str | None = None,
) -> Manifest:
    """Write a synthetic RBC dataset into ``out_dir`` and return its manifest.

    ``unit``: ``"cell"`` → ``n_per_class`` labelled cells per class (:data:`SYNTH_CLASSES`) per source;
    ``"patch"`` → ``n_patches`` (default ``n_per_class``) unlabelled ``patch_size`` smear tiles per
    source; ``"both"`` → both. ``sources``: a count (names ``synth-a``, ``synth-b``, …) or names.
    Groups are ``<source>-slide<k>`` (4 slides per source, each with its own stain jitter).
    """
    config = {"generator": "reddino.synth", "version": SYNTH_VERSION, "n_per_class": n_per_class,
              "sources": sources if isinstance(sources, int) else list(sources), "unit": unit, "seed": seed,
              "size": size, "patch_size": patch_size if unit != "cell" else None, "n_patches": n_patches}
    meta = {"command": command or "reddino.data.generate_synthetic", "config": config}
    check_output_dir(out_dir, meta, overwrite)
    rows = synth_rows(n_per_class, sources, unit, seed, size, patch_size, n_patches)
    return write_dataset(rows, out_dir, meta, classes=SYNTH_CLASSES, overwrite=overwrite)


__all__ = ["generate_synthetic", "synth_rows", "render_cell", "render_patch", "render_smear", "source_styles", "SYNTH_CLASSES", "SourceStyle"]
