"""Red-cell detection on whole smear photos: the step from a lab's slides to the per-cell rows reddino trains on.

The default detector (``classical``) needs no weights and runs anywhere:

1. **Stain-robust foreground.** Every pixel becomes an optical density per channel (Beer-Lambert, ``log(bg / I)``)
   against the *local* background (the empty-field pixels, normal-convolved at ``bg_sigma`` px, so uneven
   illumination does not matter), projected on the stain's own colour direction (the mean density vector of the
   dense pixels): a pink, purple or grey stain on a white, grey or blue field all give "dense = cell". Threshold:
   above the empty-field peak by ``noise_k`` noise sigmas, ``min_od`` and ``thr_frac`` of the way to a clipped
   Otsu cut (pale, hypochromic cells stay in); an empty or all-white field has no cells, not noise cells.
2. **Scale.** The typical cell radius is estimated per image (distance-transform maxima, the low ones of
   platelets and debris left out below ``scale_debris`` x their 60th percentile, then the compact whole
   components' equivalent radius), or fixed with ``cell_radius``; every size rule below is relative to it, so
   40 px (Chula) and 100 px (BCCD) cells need no retuning.
3. **Clean-up.** Holes smaller than ``hole_frac`` cells are filled (central pallor, target cells); an opening with
   a disc of ``open_frac`` x radius removes thin structures: text, scale bars, the glue between crenation spikes.
4. **Splitting touching cells.** Components bigger than ``split_area`` cells or less convex than
   ``split_solidity`` are split by a marker watershed on the distance transform (markers: its maxima at least
   ``peak_min_dist`` radii apart and ``peak_min_height`` radii deep). Cells lying over each other (BCCD) have
   fewer distance maxima than cells, but each shows an arc of its outline (on the clump's edge, or where it
   overlaps a neighbour: two layers are denser): the edges of the stain density vote along their gradient for a
   centre one radius inside (circle Hough), and when a clump has more vote maxima (at least ``arc_min`` of a
   whole outline, ``arc_min_dist`` radii apart, at most one per ``arc_cell_area`` cell areas) than distance
   maxima, it is cut into nearest-centre regions around them. A tight clump of round cells can have fewer
   maxima than cells still: when its area holds more cells (area / ``clump_cell_area`` cell areas) it is cut
   into that many nearest-centre regions around k-means centres of its pixels (seeded at the maxima).
5. **Filters.** Pieces smaller than ``min_area`` cell areas (platelets, debris), thinner than ``min_thickness``
   radii (lines, text), or nucleated (white cells: more than ``nucleus_frac`` of the piece, or half of it near a
   nucleus, is dense purple stain - blue passes where red cells absorb it; a grey pointer shadow does not count),
   or grey (more than ``grey_frac`` of its dense pixels absorb red about as much as green, unlike haemoglobin:
   fibres, dust, shadows) are dropped and counted by reason.
6. **Flags.** ``border_cut`` (the mask touches the image edge), ``clump`` (a piece still bigger than
   ``clump_area`` cells after splitting: possibly merged cells).

Very large images are processed in overlapping tiles (``tile`` px, ``tile_overlap`` radii margin), keeping each
cell in the one tile whose core holds its centre; memory grows with the tile, not with the image.

Other detectors plug in with :func:`register_detector` (a factory taking keyword params that returns an object with
``name``, ``version``, ``params()`` and ``detect(rgb) -> Detection``), and ``--detector NAME`` picks one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Protocol

import cv2
import numpy as np

CLASSICAL_VERSION = "1.2"
BORDER_CUT = "border_cut"
CLUMP = "clump"


class DetectError(ValueError):
    """An image the detector cannot work on (wrong shape, unknown detector, bad parameters)."""


@dataclass(frozen=True)
class Cell:
    """One detected cell: centroid (x, y), box ``[x0, x1) x [y0, y1)`` in image pixels, mask area, flags."""

    cx: float
    cy: float
    x0: int
    y0: int
    x1: int
    y1: int
    area: int
    flags: tuple[str, ...] = ()

    @property
    def w(self) -> int:
        return self.x1 - self.x0

    @property
    def h(self) -> int:
        return self.y1 - self.y0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["flags"] = list(self.flags)
        return d


@dataclass
class Detection:
    """The cells of one image, plus what the detector dropped (counts by reason) and the scale it used.

    ``labels`` (int32, 0 = background, cell ``i`` = ``i + 1``) is kept only when asked for (benchmarks, overlays).
    """

    cells: list[Cell]
    detector: str
    version: str
    radius: float
    dropped: dict[str, int] = field(default_factory=dict)
    labels: np.ndarray | None = None
    note: str = ""

    @property
    def n(self) -> int:
        return len(self.cells)


class Detector(Protocol):
    name: str
    version: str

    def params(self) -> dict[str, Any]: ...

    def detect(self, rgb: np.ndarray, *, keep_labels: bool = False) -> Detection: ...


# --------------------------------------------------------------------------- the classical detector


@dataclass(frozen=True)
class ClassicalParams:
    cell_radius: float | None = None  # px; None = estimated per image
    scale_fill: float = 0.02  # radius estimate: holes up to this fraction of the image are filled (pallor)
    scale_debris: float = 0.5  # radius estimate: ignore distance maxima under this x their 60th percentile (debris)
    min_od: float = 0.04  # lowest optical-density step above the empty field (empty fields stay empty)
    noise_k: float = 5.0  # ... and at least this many noise sigmas above the peak
    thr_frac: float = 0.3  # threshold = empty-field peak + this x (Otsu cut - peak)
    smooth: float = 1.5  # px, gaussian smoothing of the score
    bg_sigma: float = 40.0  # px, scale of the illumination field (0 = one background colour)
    bg_level: float = 0.04  # score below which a pixel counts as empty field for the illumination estimate
    open_frac: float = 0.22  # opening disc radius, in cell radii
    hole_frac: float = 0.6  # fill holes up to this many cell areas
    split_area: float = 1.45  # split components above this many cell areas ...
    split_solidity: float = 0.9  # ... or less convex than this
    peak_min_dist: float = 0.7  # watershed markers at least this many radii apart ...
    peak_min_height: float = 0.45  # ... and at least this many radii from the background
    min_area: float = 0.15  # drop pieces under this many cell areas (platelets, debris)
    min_thickness: float = 0.35  # drop pieces whose inscribed radius is under this many cell radii (text, lines)
    nucleus_rel: float = 1.1  # a pixel is nuclear-stained when its score is this x the median cell pixel's ...
    nucleus_hue: float = 0.3  # ... and its OD_blue / OD_green is this much below the cells' median (purple)
    nucleus_min_area: float = 0.04  # nuclear blobs of at least this many cell areas are nuclei (white cells)
    nucleus_frac: float = 0.15  # drop pieces with more nuclear pixels than this fraction ...
    nucleus_near: float = 0.5  # ... or more than half inside a nucleus grown by this many radii
    clump_cell_area: float = 1.05  # a clump with fewer distance maxima than area / (this x cell area) is k-means split
    # (1.05, not 1.1: overlapping cells take less than a cell area each; 1.1 left 13 % of dense Chula fields merged)
    grey_rel: float = 0.3  # a dense pixel is grey when its OD_red / OD_green is this much above the cells' median ...
    grey_frac: float = 0.8  # ... and pieces with more grey dense pixels than this are dropped (fibres, dust, shadows)
    clump_area: float = 2.2  # flag pieces still bigger than this many cell areas
    arc_min: float = 0.18  # split clumps at outline-vote maxima holding at least this fraction of a cell's outline
    arc_min_dist: float = 0.6  # ... at least this many radii apart (overlapping cells' centres can be closer than 0.7)
    arc_cell_area: float = 0.7  # ... and at most one per this many cell areas of the clump (an odd single cell stays whole)
    tile: int = 1024  # process images larger than this (either side) in tiles (memory grows with the tile)
    tile_overlap: float = 3.0  # tile margin, in cell radii


def _disk(r: float) -> np.ndarray:
    k = max(1, int(round(r)))
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * k + 1, 2 * k + 1))


def optical_density(rgb: np.ndarray, bg: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel optical density ``log(bg / I)`` (HxWx3 float32, >= 0) and the background colour used."""
    f = rgb.astype(np.float32) + 1.0
    if bg is None:
        bg = background_colour(rgb)
    od = np.log(np.asarray(bg, np.float32)[None, None, :] + 1.0) - np.log(f)
    np.maximum(od, 0, out=od)
    return od, bg


_LOG = np.log(np.arange(256, dtype=np.float32) + 1.0)


def background_colour(rgb: np.ndarray) -> np.ndarray:
    """Median colour of the bright Otsu class of the grey image (the empty field between cells)."""
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    step = max(1, int(math.sqrt(grey.size / 250_000)))  # a sub-sample is plenty for a colour
    g = grey[::step, ::step]
    t, _ = cv2.threshold(g, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    sub = rgb[::step, ::step]
    bright = sub[g > t]
    if bright.size == 0:
        bright = sub.reshape(-1, 3)
    return np.median(bright.reshape(-1, 3), axis=0).astype(np.float32)


def _otsu(values: np.ndarray) -> float:
    hist, edges = np.histogram(values, bins=256, range=(0.0, float(max(values.max(), 1e-6))))
    w = hist.astype(np.float64)
    mids = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(w)
    w1 = w0[-1] - w0
    m0 = np.cumsum(w * mids)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(mids[int(np.argmax(between))])


class ClassicalDetector:
    """Threshold + watershed + shape/stain filters (see the module docstring)."""

    name = "classical"
    version = CLASSICAL_VERSION

    def __init__(self, **params: Any):
        known = set(ClassicalParams.__dataclass_fields__)
        bad = sorted(set(params) - known)
        if bad:
            raise DetectError(f"unknown parameter(s) {bad} for the classical detector (known: {sorted(known)})")
        self.p = ClassicalParams(**params)
        if self.p.cell_radius is not None and self.p.cell_radius <= 1:
            raise DetectError(f"cell_radius must be > 1 px, got {self.p.cell_radius}")

    def params(self) -> dict[str, Any]:
        return asdict(self.p)

    # -- public --------------------------------------------------------------------------------------------

    def detect(self, rgb: np.ndarray, *, keep_labels: bool = False) -> Detection:
        rgb = check_rgb(rgb)
        h, w = rgb.shape[:2]
        p = self.p
        if max(h, w) <= p.tile:
            return self._detect_one(rgb, keep_labels=keep_labels)
        return self._detect_tiled(rgb, keep_labels=keep_labels)

    # -- steps ---------------------------------------------------------------------------------------------

    def _score(self, rgb: np.ndarray, bg: np.ndarray | None, u: np.ndarray | None = None):
        """Cell score: optical density against the local background, projected on the stain's colour direction.

        Returns ``(score, stain)``; ``stain`` holds what :meth:`_measure` needs for the per-channel densities."""
        p = self.p
        if bg is None:
            bg = background_colour(rgb)
        logf = _LOG[rgb]  # log(I + 1), a table lookup
        logbg = np.log(np.asarray(bg, np.float32) + 1.0)
        if u is None:
            od = (logbg - logf[::2, ::2]).reshape(-1, 3)
            dense = od.max(axis=1)
            fg = dense > _otsu(dense)
            u = od[fg].mean(axis=0) if fg.any() else np.ones(3, np.float32)
            u = (np.maximum(u, 0) / max(float(np.linalg.norm(u)), 1e-6)).astype(np.float32)
        lfu = logf @ u
        score = cv2.GaussianBlur(float(logbg @ u) - lfu, (0, 0), p.smooth)
        lfield = None
        if p.bg_sigma > 0:
            # illumination: the background field is the normalised convolution of the empty-field pixels
            k = max(1, int(p.bg_sigma // 8))
            size = (max(1, rgb.shape[1] // k), max(1, rgb.shape[0] // k))
            small = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA).astype(np.float32) + 1.0
            for _ in range(2):
                sm = cv2.resize(score, size, interpolation=cv2.INTER_AREA)
                m = (sm < p.bg_level).astype(np.float32)
                num = cv2.GaussianBlur(small * m[..., None], (0, 0), p.bg_sigma / k)
                den = cv2.GaussianBlur(m, (0, 0), p.bg_sigma / k)[..., None]
                field = np.where(den > 1e-3, num / np.maximum(den, 1e-3), np.asarray(bg, np.float32) + 1.0)
                lfield = np.log(field).astype(np.float32)
                full = cv2.resize(np.ascontiguousarray(lfield @ u), (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_LINEAR)
                score = cv2.GaussianBlur(full - lfu, (0, 0), p.smooth)
        return score, (logf, logbg, lfield, bg, u)

    @staticmethod
    def _channel_od(stain, c: int) -> np.ndarray:
        logf, logbg, lfield, _, _ = stain
        if lfield is None:
            return logbg[c] - logf[..., c]
        h, w = logf.shape[:2]
        return cv2.resize(np.ascontiguousarray(lfield[..., c]), (w, h), interpolation=cv2.INTER_LINEAR) - logf[..., c]

    def _threshold(self, score: np.ndarray) -> float:
        """Between the empty-field peak and Otsu's cut, never below ``min_od``; inf when nothing is stained."""
        p = self.p
        step = max(1, int(math.sqrt(score.size / 250_000)))
        s = score[::step, ::step].ravel()
        hist, edges = np.histogram(s, bins=200, range=(-0.2, 1.0))
        mode = float(edges[int(np.argmax(hist))] + (edges[1] - edges[0]) / 2)
        hi, lo = s[s > mode], s[s < mode]
        if hi.size == 0 or np.percentile(s, 99.5) < mode + p.min_od:
            return float("inf")
        noise = 1.4826 * float(np.median(mode - lo)) if lo.size else 0.0
        t = _otsu(np.minimum(hi, np.percentile(hi, 95)))  # clipped: a dark pointer or stain blob must not set the cut
        return mode + max(p.min_od, p.noise_k * noise, p.thr_frac * (t - mode))

    def _estimate_radius(self, fg: np.ndarray) -> float | None:
        """Typical cell radius of a hole-filled foreground.

        First guess: the height of the distance transform's maxima (a single cell's or a touching pair's
        inscribed radius; robust when everything is clumped, as in BCCD). Then, when at least 5 whole compact
        components (solidity >= 0.9, not smaller than a disc of 0.6 x that guess) exist, the median of their
        equivalent radii, which is right for oval cells too."""
        from skimage.feature import peak_local_max

        dist = cv2.distanceTransform(fg.astype(np.uint8), cv2.DIST_L2, 5)
        pk = peak_local_max(dist, min_distance=7, threshold_abs=5, exclude_border=False)
        if len(pk) < 3:
            return None
        heights = dist[pk[:, 0], pk[:, 1]]
        # platelets, debris and stain dots make many low maxima (BCCD: often more than there are cells, which
        # dragged the estimate to a third of the cell size): drop those under ``scale_debris`` x the 60th percentile
        heights = heights[heights >= self.p.scale_debris * np.percentile(heights, 60)]
        # filled gaps between clumped cells make a few huge maxima: the typical one is among the lower 60 %
        r0 = float(np.median(heights[heights <= np.percentile(heights, 60)]))
        n, lab, stats, _ = cv2.connectedComponentsWithStats(fg.astype(np.uint8), connectivity=8)
        keep = []
        floor = math.pi * (0.6 * r0) ** 2
        for i in np.argsort(-stats[1:, cv2.CC_STAT_AREA])[:400]:
            x, y, ww, hh, a = stats[i + 1]
            if a < floor:
                break
            if x == 0 or y == 0 or x + ww >= fg.shape[1] or y + hh >= fg.shape[0]:
                continue  # cut by the border: not a whole cell
            if _solidity(lab[y:y + hh, x:x + ww] == i + 1) >= 0.9:
                keep.append(a)
        if len(keep) < 5:  # clumped field: the upper quartile (overlaps and dents pull the median down)
            return float(np.percentile(heights[heights <= 1.5 * r0], 70))
        keep = np.asarray(keep, np.float64)
        med = np.median(keep)
        core = keep[(keep > 0.4 * med) & (keep < 2.5 * med)]
        return float(math.sqrt(np.median(core) / math.pi))

    def _detect_one(self, rgb: np.ndarray, *, keep_labels: bool, bg: np.ndarray | None = None,
                    radius: float | None = None, thr: float | None = None, u: np.ndarray | None = None) -> Detection:
        from scipy import ndimage as ndi
        from skimage.feature import peak_local_max
        from skimage.segmentation import watershed

        p = self.p
        h, w = rgb.shape[:2]
        score, stain = self._score(rgb, bg, u)
        thr = self._threshold(score) if thr is None else thr
        dropped: dict[str, int] = {}
        empty = Detection([], self.name, self.version, float(radius or p.cell_radius or 0), dropped,
                          np.zeros((h, w), np.int32) if keep_labels else None)
        if not math.isfinite(thr):
            empty.note = "no stained pixels above the background (empty or blank image)"
            return empty
        fg = score > thr
        fg = cv2.morphologyEx(fg.astype(np.uint8), cv2.MORPH_OPEN, _disk(1)).astype(bool)
        r = radius or p.cell_radius
        if r is None:
            filled = _fill_holes(fg, p.scale_fill * fg.size)
            r = self._estimate_radius(cv2.morphologyEx(filled.astype(np.uint8), cv2.MORPH_OPEN, _disk(3)).astype(bool))
            if r is None:
                empty.note = "no cell-like objects found (cannot estimate the cell size)"
                return empty
        empty.radius = float(r)
        area1 = math.pi * r * r
        fg = _fill_holes(fg, p.hole_frac * area1)
        fg = cv2.morphologyEx(fg.astype(np.uint8), cv2.MORPH_OPEN, _disk(p.open_frac * r))
        ncomp, comp = cv2.connectedComponents(fg, connectivity=8)
        if ncomp <= 1:
            empty.note = "no cells"
            return empty
        dist = cv2.distanceTransform(fg, cv2.DIST_L2, 5)
        acc = None  # outline votes for cell centres, computed at the first clump
        labels = np.zeros((h, w), np.int32)
        objs = ndi.find_objects(comp)
        nxt = 1
        min_dist = max(1, int(round(p.peak_min_dist * r)))
        arc_dist = max(1, int(round(p.arc_min_dist * r)))
        for ci, sl in enumerate(objs, start=1):
            if sl is None:
                continue
            m = comp[sl] == ci
            a = int(m.sum())
            if a < p.min_area * area1:
                dropped["small"] = dropped.get("small", 0) + 1
                continue
            split = a > p.split_area * area1 or _solidity(m) < p.split_solidity
            if split:
                d = dist[sl] * m
                d = cv2.GaussianBlur(d, (0, 0), max(0.5, 0.08 * r)) * m
                pk = peak_local_max(d, min_distance=min_dist, threshold_abs=p.peak_min_height * r, labels=m.astype(np.int32),
                                    exclude_border=False)
                # a tight clump of round cells can have one distance maximum for several cells: then split it
                # into k nearest-centre regions of k-means centres of its pixels, k = its area in cell areas
                k_area = int(round(a / (p.clump_cell_area * area1)))
                seg = None
                # overlapping cells: each one's visible arc of outline votes for its centre
                hk = np.zeros((0, 2), np.int64)
                if p.arc_min > 0:
                    if acc is None:
                        acc = _arc_votes(fg, r, score)
                    hk = peak_local_max(acc[sl] * m, min_distance=arc_dist, threshold_abs=p.arc_min,
                                        labels=m.astype(np.int32), exclude_border=False)
                    hk = hk[:max(1, int(round(a / (p.arc_cell_area * area1))))]  # the strongest, as many as fit
                if len(hk) >= 2 and len(hk) > len(pk) and len(hk) >= k_area:
                    seg = _nearest_centre(m, hk.astype(np.float32))
                    pk = hk
                elif k_area >= 2 and k_area > len(pk):
                    centres = _kmeans_seeds(m, k_area, pk)
                    seg = _nearest_centre(m, centres)
                    pk = centres
                elif len(pk) >= 2:
                    markers = np.zeros(m.shape, np.int32)
                    markers[pk[:, 0], pk[:, 1]] = np.arange(1, len(pk) + 1)
                    seg = watershed(-d, markers, mask=m)
                if seg is not None:
                    view = labels[sl]
                    for k in range(1, len(pk) + 1):
                        piece = seg == k
                        if piece.any():
                            view[piece] = nxt
                            nxt += 1
                    continue
            labels[sl][m] = nxt
            nxt += 1
        return self._measure(labels, stain, score, r, dropped, keep_labels)

    def _measure(self, labels: np.ndarray, stain, score: np.ndarray, r: float, dropped: dict[str, int],
                 keep_labels: bool) -> Detection:
        from scipy import ndimage as ndi

        p = self.p
        h, w = labels.shape
        area1 = math.pi * r * r
        n = int(labels.max())
        if n == 0:
            return Detection([], self.name, self.version, float(r), dropped, labels if keep_labels else None)
        odg = self._channel_od(stain, 1)
        inside = labels > 0
        sub = max(1, int(inside.sum()) // 100_000)
        med_score = float(np.median(score[inside][::sub]))
        # nuclei (white cells) are purple: they let blue through where red cells absorb it, so their blue/green
        # density ratio sits well below the cells' median; a grey pointer shadow or dirt sits above it
        blue = self._channel_od(stain, 2) / np.maximum(odg, 1e-3)
        med_blue = float(np.median(blue[inside][::sub]))
        nuclear = (score >= p.nucleus_rel * med_score) & (blue <= med_blue - p.nucleus_hue)
        nuclear = cv2.morphologyEx(nuclear.astype(np.uint8), cv2.MORPH_OPEN, _disk(max(1.0, 0.06 * r)))
        nn, nlab, nst, _ = cv2.connectedComponentsWithStats(nuclear, connectivity=8)
        big = np.zeros(nn, np.uint8)
        big[1:] = nst[1:, cv2.CC_STAT_AREA] >= p.nucleus_min_area * area1
        near = cv2.dilate(big[nlab], _disk(p.nucleus_near * r)) if big.any() else np.zeros_like(nuclear)
        nuclear = nuclear.astype(bool)
        idx = labels.ravel()
        close = np.bincount(idx, weights=near.ravel().astype(np.float64), minlength=n + 1)
        area = np.bincount(idx, minlength=n + 1).astype(np.float64)
        com = np.asarray(ndi.center_of_mass(labels > 0, labels, np.arange(1, n + 1)), np.float64).reshape(-1, 2)
        nuc = np.bincount(idx, weights=nuclear.ravel().astype(np.float64), minlength=n + 1)
        grey = self._grey_fraction(labels, stain, score, med_score, sub)
        # each piece's thickness (inscribed radius): distance to the background or to a neighbouring piece
        inner = labels > 0
        inner[:, 1:] &= labels[:, 1:] == labels[:, :-1]
        inner[1:, :] &= labels[1:, :] == labels[:-1, :]
        thick = ndi.maximum(cv2.distanceTransform(inner.astype(np.uint8), cv2.DIST_L2, 5), labels, np.arange(1, n + 1))
        cells: list[Cell] = []
        remap = np.zeros(n + 1, np.int32)
        for li, sl in enumerate(ndi.find_objects(labels), start=1):
            if sl is None:
                continue
            a = area[li]
            if a < p.min_area * area1:
                reason = "small"
            elif nuc[li] / a > p.nucleus_frac or close[li] / a > 0.5:
                reason = "nucleated"
            elif thick[li - 1] + 1 < p.min_thickness * r:
                reason = "thin"
            elif grey[li] > p.grey_frac:
                reason = "grey"
            else:
                reason = None
            if reason:
                dropped[reason] = dropped.get(reason, 0) + 1
                continue
            flags = []
            if sl[0].start <= 1 or sl[1].start <= 1 or sl[0].stop >= h - 1 or sl[1].stop >= w - 1:  # opening can
                flags.append(BORDER_CUT)  # leave a 1 px gap between a cut cell and the edge
            if a > p.clump_area * area1:
                flags.append(CLUMP)
            cells.append(Cell(float(com[li - 1, 1]), float(com[li - 1, 0]), int(sl[1].start), int(sl[0].start), int(sl[1].stop),
                              int(sl[0].stop), int(a), tuple(flags)))
            remap[li] = len(cells)
        return Detection(cells, self.name, self.version, float(r), dropped, remap[labels] if keep_labels else None)

    def _grey_fraction(self, labels: np.ndarray, stain, score: np.ndarray, med_score: float, sub: int) -> np.ndarray:
        """Per piece, the fraction of its dense pixels that are grey: haemoglobin absorbs green far more than red,
        a fibre, dust or a pointer shadow about as much (relative to this photo's cells, so a grey photo has none)."""
        dense = (labels > 0) & (score >= 0.5 * med_score)
        ratio = self._channel_od(stain, 0) / np.maximum(self._channel_od(stain, 1), 1e-3)
        med = float(np.median(ratio[dense][::sub])) if dense.any() else 0.0
        grey = dense & (ratio > med + self.p.grey_rel)
        idx = labels.ravel()
        n = int(labels.max()) + 1
        return np.bincount(idx, weights=grey.ravel().astype(np.float64), minlength=n) / np.maximum(
            np.bincount(idx, weights=dense.ravel().astype(np.float64), minlength=n), 1.0)

    def _detect_tiled(self, rgb: np.ndarray, *, keep_labels: bool) -> Detection:
        """Overlapping tiles; each cell is kept by the tile whose core (the tile minus the margin) holds its centre."""
        p = self.p
        h, w = rgb.shape[:2]
        # colour, threshold and scale from a centred sample window, then fixed for every tile
        s = min(p.tile, h), min(p.tile, w)
        y0, x0 = (h - s[0]) // 2, (w - s[1]) // 2
        sample = rgb[y0:y0 + s[0], x0:x0 + s[1]]
        bg = background_colour(sample)
        score, (_, _, _, _, u) = self._score(sample, bg)
        thr = self._threshold(score)
        probe = self._detect_one(sample, keep_labels=False, bg=bg, thr=thr, u=u)
        r = p.cell_radius or (probe.radius if probe.radius > 0 else None)
        if r is None or not math.isfinite(thr):
            return Detection([], self.name, self.version, 0.0, {}, np.zeros((h, w), np.int32) if keep_labels else None,
                             note=probe.note or "no cells")
        margin = int(math.ceil(p.tile_overlap * r))
        core = max(p.tile - 2 * margin, margin)
        cells: list[Cell] = []
        dropped: dict[str, int] = {}
        labels = np.zeros((h, w), np.int32) if keep_labels else None
        for ty in range(0, h, core):
            for tx in range(0, w, core):
                ya, xa = max(ty - margin, 0), max(tx - margin, 0)
                yb, xb = min(ty + core + margin, h), min(tx + core + margin, w)
                det = self._detect_one(rgb[ya:yb, xa:xb], keep_labels=keep_labels, bg=bg, radius=r, thr=thr, u=u)
                for k, v in det.dropped.items():
                    dropped[k] = dropped.get(k, 0) + v
                for i, c in enumerate(det.cells):
                    gx, gy = c.cx + xa, c.cy + ya
                    if not (tx <= gx < tx + core and ty <= gy < ty + core):
                        continue
                    flags = [f for f in c.flags if f != BORDER_CUT]
                    bx0, by0, bx1, by1 = c.x0 + xa, c.y0 + ya, c.x1 + xa, c.y1 + ya
                    if bx0 <= 1 or by0 <= 1 or bx1 >= w - 1 or by1 >= h - 1:
                        flags.insert(0, BORDER_CUT)
                    cells.append(Cell(gx, gy, bx0, by0, bx1, by1, c.area, tuple(flags)))
                    if labels is not None:
                        m = det.labels[c.y0:c.y1, c.x0:c.x1] == i + 1
                        labels[by0:by1, bx0:bx1][m] = len(cells)
        return Detection(cells, self.name, self.version, float(r), dropped, labels)


def _nearest_centre(m: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Label each pixel of mask ``m`` with its nearest centre (1-based), in chunks: bounded memory for huge clumps."""
    yy, xx = np.nonzero(m)
    seg = np.zeros(m.shape, np.int32)
    cy, cx = centres[None, :, 0], centres[None, :, 1]
    step = max(256, (1 << 19) // max(1, len(centres)))  # pixels x centres per chunk: 4 MB a temporary, whatever k
    for j in range(0, len(yy), step):
        y_, x_ = yy[j:j + step], xx[j:j + step]
        d2 = (y_[:, None] - cy) ** 2 + (x_[:, None] - cx) ** 2
        seg[y_, x_] = d2.argmin(1) + 1
    return seg


_ARC_RHO = np.linspace(0.75, 1.25, 6)  # outline pixels vote at these multiples of the cell radius


def _vote(ys: np.ndarray, xs: np.ndarray, gy: np.ndarray, gx: np.ndarray, r: float, shape: tuple[int, int]) -> np.ndarray:
    """Each edge pixel (ys, xs) votes for a centre along its gradient (pointing into the cell) at ``_ARC_RHO`` radii."""
    h, w = shape
    g = np.hypot(gy, gx)
    ok = g > 1e-4
    ys, xs, ny, nx = ys[ok], xs[ok], gy[ok] / g[ok], gx[ok] / g[ok]
    acc = np.zeros(h * w, np.float32)
    for rho in _ARC_RHO * r:
        vy = np.round(ys + ny * rho).astype(np.int64)
        vx = np.round(xs + nx * rho).astype(np.int64)
        k = (vy >= 0) & (vy < h) & (vx >= 0) & (vx < w)
        acc += np.bincount(vy[k] * w + vx[k], minlength=h * w).astype(np.float32)
    return cv2.GaussianBlur(acc.reshape(h, w), (0, 0), max(1.0, 0.12 * r))


def _outline(mask: np.ndarray) -> np.ndarray:
    return mask.astype(bool) & ~cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)


def _arc_votes(fg: np.ndarray, r: float, score: np.ndarray) -> np.ndarray:
    """Circle-Hough votes for cell centres, as the fraction of a whole cell's outline voting: about 1 at a round
    isolated cell's centre, 0.2-0.5 at the centre of a cell half hidden under its neighbours.

    The edges are those of the stain density (Canny, relative to the contrast of the foreground's outline): the
    outline of a clump, and inside it the arcs where one cell lies over another (two layers: denser). Each edge
    pixel votes along its density gradient, so a pale centre's rim votes away from the cell, not for a centre."""
    h, w = fg.shape
    ref = float(np.percentile(score[fg.astype(bool)], 95)) if fg.any() else 1.0
    s8 = np.clip(score / max(ref, 1e-3) * 200, 0, 255).astype(np.uint8)
    s8 = cv2.GaussianBlur(s8, (0, 0), max(1.0, 0.06 * r))
    gx = cv2.Sobel(s8, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(s8, cv2.CV_32F, 0, 1, ksize=3)
    fe = _outline(fg)
    gref = float(np.median(np.hypot(gx[fe], gy[fe]))) if fe.any() else 50.0
    edge = (cv2.Canny(s8, 0.25 * gref, 0.5 * gref, L2gradient=True) > 0) & cv2.dilate(fg.astype(np.uint8), _disk(2)).astype(bool)
    edge[[0, -1], :] = False  # the image edge is not a cell outline
    edge[:, [0, -1]] = False
    ys, xs = np.nonzero(edge)
    acc = _vote(ys, xs, gy[ys, xs], gx[ys, xs], r, (h, w))
    # normalisation: the votes of a disc of radius r's one-pixel outline at its centre
    side = int(math.ceil(3 * r)) | 1
    disc = np.zeros((side, side), np.uint8)
    cv2.circle(disc, (side // 2, side // 2), int(round(r)), 1, -1)
    soft = cv2.GaussianBlur(disc.astype(np.float32), (0, 0), max(1.0, 0.06 * r))
    dy, dx = np.nonzero(_outline(disc))
    full = _vote(dy, dx, cv2.Sobel(soft, cv2.CV_32F, 0, 1, ksize=3)[dy, dx], cv2.Sobel(soft, cv2.CV_32F, 1, 0, ksize=3)[dy, dx],
                 r, disc.shape).max()
    return acc / max(float(full), 1e-6)


def _kmeans_seeds(m: np.ndarray, k: int, init: np.ndarray | None = None, iters: int = 15) -> np.ndarray:
    """``k`` centres (row, col) of mask ``m``'s pixels: start from ``init`` (the distance maxima) topped up with
    farthest points, then Lloyd iterations (deterministic)."""
    ys, xs = np.nonzero(m)
    step = max(1, len(ys) // 600)
    pts = np.stack([ys[::step], xs[::step]], 1).astype(np.float32)
    if init is not None and len(init):
        c = [np.asarray(q, np.float32) for q in init[:k]]
    else:
        c = [pts[np.argmax(((pts - pts.mean(0)) ** 2).sum(1))]]
    d = np.min([((pts - q) ** 2).sum(1) for q in c], axis=0)
    for _ in range(len(c), k):
        c.append(pts[np.argmax(d)])
        d = np.minimum(d, ((pts - c[-1]) ** 2).sum(1))
    c = np.stack(c)
    for _ in range(iters):
        lab = ((pts[:, None, :] - c[None]) ** 2).sum(2).argmin(1)
        cnt = np.bincount(lab, minlength=k)[:, None]
        tot = np.stack([np.bincount(lab, weights=pts[:, 0], minlength=k), np.bincount(lab, weights=pts[:, 1], minlength=k)], 1)
        new = np.where(cnt > 0, tot / np.maximum(cnt, 1), c).astype(np.float32)
        if np.allclose(new, c, atol=0.25):
            break
        c = new
    return c


def _fill_holes(mask: np.ndarray, max_area: float) -> np.ndarray:
    """Fill background components smaller than ``max_area`` px (pallor, target centres), border-touching included."""
    inv = (~mask).astype(np.uint8)
    n, lab, stats, _ = cv2.connectedComponentsWithStats(inv, connectivity=4)
    small = np.zeros(n, bool)
    small[1:] = stats[1:, cv2.CC_STAT_AREA] < max_area
    return mask | small[lab]


def _solidity(m: np.ndarray) -> float:
    cnts, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not cnts:
        return 1.0
    hull = cv2.contourArea(cv2.convexHull(np.concatenate(cnts)))
    return float(m.sum() / hull) if hull > 0 else 1.0


def check_rgb(rgb: np.ndarray) -> np.ndarray:
    """An HxWx3 uint8 image (grey, RGBA and 16-bit are converted); a clear error for anything else."""
    a = np.asarray(rgb)
    if a.ndim not in (2, 3) or a.size == 0:
        raise DetectError(f"expected an HxW or HxWxC image, got shape {a.shape}")
    if a.dtype == np.uint16:
        a = (a >> 8).astype(np.uint8)
    elif a.dtype != np.uint8:
        raise DetectError(f"expected a uint8 or uint16 image, got {a.dtype}")
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    elif a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    elif a.shape[2] == 4:
        a = a[:, :, :3]
    elif a.shape[2] != 3:
        raise DetectError(f"expected 1, 3 or 4 channels, got {a.shape[2]}")
    return np.ascontiguousarray(a)


# --------------------------------------------------------------------------- registry

_REGISTRY: dict[str, Callable[..., Detector]] = {"classical": ClassicalDetector}
DEFAULT_DETECTOR = "classical"


def register_detector(name: str, factory: Callable[..., Detector]) -> None:
    """Make ``--detector NAME`` build ``factory(**params)`` (e.g. a learned detector loading a local model file)."""
    _REGISTRY[name] = factory


def detectors() -> list[str]:
    return sorted(_REGISTRY)


def get_detector(name: str = DEFAULT_DETECTOR, **params: Any) -> Detector:
    if name not in _REGISTRY:
        raise DetectError(f"unknown detector {name!r} (available: {detectors()})")
    return _REGISTRY[name](**params)


def describe(det: Detector) -> dict[str, Any]:
    """What a manifest records about the detector: name, version, every parameter."""
    return {"name": det.name, "version": det.version, "params": det.params()}


__all__ = ["Cell", "Detection", "Detector", "ClassicalDetector", "ClassicalParams", "DetectError", "get_detector",
           "register_detector", "detectors", "describe", "check_rgb", "optical_density", "BORDER_CUT", "CLUMP",
           "DEFAULT_DETECTOR"]
