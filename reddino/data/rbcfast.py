"""Cheaper implementations of the costliest of RedDino's ``rbc`` transforms, and a cheaper way to call a pipeline.

Each class subclasses the albumentations transform it replaces, keeps its arguments and its random draws (same
generators, same order, same number of values) and changes only how the pixels are computed, so a seeded
pipeline gives the same crops as with albumentations (``tests/test_rbcfast.py`` checks every op against its
albumentations original on fixed seeds). All but one give the same pixels; ISONoise (:data:`IN_DISTRIBUTION`)
gives pixels equal in distribution, from the same parameter draws:

* ``RandomFog``: one blend per fog particle over the whole image becomes one count of the particles covering
  each pixel and a table of the blend iterated that many times. Its particle positions (thousands of
  ``random.randint`` calls) are drawn at once from CPython's own Mersenne Twister words (``getrandbits``).
* ``RandomSunFlare``: 40 whole-image blends of concentric discs become, per pixel, the index of the first disc
  that covers it (a crop of one map per ``src_radius``) and a table of the blends from there; the small flare
  circles are blended on their pixels only.
* ``GlassBlur``: the pixel swaps run on RGB packed into one uint32 per pixel with flat indices; its ~190k bounded
  draws are the top bits of the generator's raw 32-bit words (:func:`pcg64_words`: numpy's own values).
* ``RandomRotate90`` (after the pixel transforms): ``cv2.rotate`` instead of a contiguous copy of ``np.rot90``.
* ``FancyPCA``: the per-pixel colour noise is an affine map of RGB (one ``cv2.transform``), and the 3×3
  covariance is one ``cv2.mulTransposed`` instead of ``np.cov``'s float64 copies. Its mean colour is exact where
  albumentations' is a float32 running sum: a value may round 1 grey level the other way (none seen on Chula
  patches at the default alpha).
* ``GaussNoise``: the float32 noise written by ``cv2.randn`` directly, summed, clipped and cast in one buffer.
* ``RandomShadow``: each polygon's darkening as a 256-entry table (``cv2.LUT``) copied onto its pixels.
* ``RandomRain``: the brightness scaling as a cached 256-entry table of ``cv2.multiply``'s own values.
* ``Equalize``: ``cv2.equalizeHist`` on channels split and merged by cv2 (no strided copies).
* ``ISONoise`` (equal in distribution): the same parameters, arithmetic and per-pixel noise distributions, the
  Poisson counts drawn by inverting their CDF and the normals by ``cv2.randn``, both seeded from albumentations'
  own per-call seed (so the same seed still gives the same pixels).

* ``MotionBlur``, ``RingingOvershoot``, ``Defocus``: the same kernels, built with less numpy overhead
  (RingingOvershoot's grid of distances made once per size, Defocus's disc once per radius), convolved by
  albumentations' ``cv2.filter2D`` call without its wrappers.
* ``RandomResizedCrop`` (the ``rbc`` policy's crop, not in :data:`FAST`): one ``cv2.resize`` of the crop's view.

:func:`run` and :func:`set_random_state` call a ``Compose`` / ``SomeOf`` tree as albumentations does (same draws,
same pixels) without its per-call plumbing; a HorizontalFlip, VerticalFlip, RandomRotate90 triple runs as one
:class:`FlipsRotate` step (each draws as alone, then one ``cv2`` call moves the image).
"""

from __future__ import annotations

import functools
import random
import sys
from typing import Any

import cv2
import numpy as np

from reddino.data._albumentations import A  # before any albumentations module: see there
from albumentations.augmentations.blur.functional import sample_odd_from_range  # noqa: E402

# --------------------------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------------------------


def _py_words(py: random.Random, count: int) -> np.ndarray:
    """uint32 [count]: the next ``count`` 32-bit words of CPython's Mersenne Twister (``getrandbits`` fills its
    integer with them, least significant first)."""
    return np.frombuffer(py.getrandbits(32 * count).to_bytes(4 * count, "little"), "<u4") if count else \
        np.zeros(0, np.uint32)


def py_randints(py: random.Random, draws: list[tuple[int, int, int]]) -> list[np.ndarray]:
    """For each ``(lo, hi, count)`` in order, ``count`` values of ``py.randint(lo, hi)``, as CPython draws them
    (``_randbelow``: the top ``k = n.bit_length()`` bits of a 32-bit word, rejected while ≥ n), all at once from
    ``py``'s own words (``getrandbits``); ``py`` is left as if the calls had been made."""
    state = py.getstate()
    words = _py_words(py, 2 * sum(c for _, _, c in draws) + 64)  # acceptance > 1/2 per word
    out, used = [], 0
    for lo, hi, count in draws:
        n = hi - lo + 1
        while True:
            cand = words[used:] >> (32 - n.bit_length())
            ok = np.flatnonzero(cand < n)[:count]
            if len(ok) == count:
                break
            words = np.concatenate([words, _py_words(py, len(words))])
        out.append(lo + cand[ok].astype(np.int64))
        used += int(ok[-1]) + 1 if count else 0
    py.setstate(state)
    _py_words(py, used)
    return out


def pcg64_words(gen: np.random.Generator, count: int) -> np.ndarray | None:
    """uint32 [count]: the next ``count`` 32-bit words ``gen`` gives its bounded-integer draws (numpy's ``next_uint32``:
    the low, then the high half of each 64-bit output, the high one kept for the next call), drawn at once with
    ``random_raw``; ``gen`` is left exactly as after ``count`` such draws. None (nothing drawn) unless ``gen`` runs
    on PCG64 on a little-endian machine. ``gen.integers(lo, lo + 2**k, ...)`` (32-bit ranges) takes one word per
    value, ``lo + (word >> (32 - k))``: Lemire's method never rejects a power-of-two range."""
    bg = gen.bit_generator
    if type(bg) is not np.random.PCG64 or sys.byteorder != "little":
        return None
    head = np.zeros(0, np.uint32)
    if count and bg.state["has_uint32"]:  # one word left over from an earlier odd count: it comes first
        state = bg.state
        head = np.array([state["uinteger"]], np.uint32)
        state["has_uint32"] = 0
        bg.state = state
        count -= 1
    words = bg.random_raw((count + 1) // 2).view(np.uint32)
    if count:  # numpy keeps the last output's high half: buffered for the next 32-bit draw (odd count) or used
        state = bg.state
        state["has_uint32"], state["uinteger"] = count % 2, int(words[-1])
        bg.state = state
        words = words[:count]
    return np.concatenate([head, words]) if len(head) else words


@functools.lru_cache(maxsize=None)
def _disc_rows(r: int) -> tuple[np.ndarray, np.ndarray]:
    """First and last column offsets of each row (dy = -r..r) of ``cv2.circle``'s filled disc of radius r."""
    canvas = np.zeros((2 * r + 1, 2 * r + 1), np.uint8)
    cv2.circle(canvas, (r, r), r, 1, -1)
    first = canvas.argmax(1) - r
    last = r - canvas[:, ::-1].argmax(1)
    empty = ~canvas.any(1)
    first[empty], last[empty] = 1, -1
    return first, last


def _disc_spans(rs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int32 [len(rs), 2·max(rs) + 1] twice: per disc, :func:`_disc_rows` of its radius with rows centred on the
    middle one; rows a disc does not reach are empty (first > last)."""
    first, last = _span_table(int(rs.max()))
    return first[rs], last[rs]


@functools.lru_cache(maxsize=64)
def _span_table(rmax: int) -> tuple[np.ndarray, np.ndarray]:
    """int32 [rmax + 1, 2·rmax + 1] twice: row r is :func:`_disc_rows` of radius r, centred, empty rows first > last."""
    first = np.ones((rmax + 1, 2 * rmax + 1), np.int32)
    last = -first
    for r in range(rmax + 1):
        first[r, rmax - r : rmax + r + 1], last[r, rmax - r : rmax + r + 1] = _disc_rows(r)
    first.flags.writeable = last.flags.writeable = False
    return first, last


def disc_cover_counts(shape: tuple[int, int], xs: np.ndarray, ys: np.ndarray, rs: np.ndarray) -> np.ndarray:
    """int [H, W]: how many of the filled discs (centres ``xs, ys``, radii ``rs``, as ``cv2.circle`` draws them)
    cover each pixel; one +1/-1 pair per disc row, summed along the rows (rows off the image go to a scratch row,
    spans off it become empty: their +1 and -1 fall on one place)."""
    h, w = shape
    first, last = _disc_spans(rs)
    rmax = first.shape[1] // 2
    rows = np.asarray(ys, np.int32)[:, None] + np.arange(-rmax, rmax + 1, dtype=np.int32)
    rows[(rows < 0) | (rows >= h)] = h
    x = np.asarray(xs, np.int32)[:, None]
    lo = np.minimum(np.maximum(x + first, 0), w)
    hi = np.minimum(x + last + 1, w)
    np.maximum(hi, lo, out=hi)
    rows *= w + 1
    n = (h + 1) * (w + 1)
    diff = np.bincount((rows + lo).ravel(), minlength=n) - np.bincount((rows + hi).ravel(), minlength=n)
    return diff.reshape(h + 1, w + 1)[:h].cumsum(1)[:, :w]


def _iterated(table: np.ndarray, times: int) -> np.ndarray:
    """uint8 [times + 1, 256]: row n is the 256-entry lookup ``table`` applied n times (rows k..2k-2 from rows 1..k-1
    and row k-1: table^(k-1+j) = table^(k-1) ∘ table^j, so ~log2(times) steps)."""
    out = np.empty((times + 1, 256), np.uint8)
    out[0] = np.arange(256)
    if times:
        out[1] = table
    k = 2
    while k <= times:
        new = min(k - 1, times + 1 - k)
        out[k : k + new] = out[k - 1].take(out[1 : 1 + new])
        k += new
    return out


def _lookup(tables: np.ndarray, index: np.ndarray, img: np.ndarray) -> np.ndarray:
    """uint8 [H, W, C]: ``tables[index[y, x], c, img[y, x, c]]`` for every pixel and channel; ``tables`` is
    [K, C, 256], or [K, 1, 256] for one table per K shared by all channels."""
    dtype = np.uint16 if len(tables) <= 256 else np.intp  # uint16 indices: a third of int64's time
    row = index.astype(dtype) << 8
    out = np.empty_like(img)
    for c in range(img.shape[2]):  # per channel: numpy is slow on a trailing axis of 3
        out[..., c] = np.take(tables[:, min(c, tables.shape[1] - 1)].ravel(), row | img[..., c])
    return out


def _blends(values: tuple[int, ...], alphas: np.ndarray) -> np.ndarray:
    """uint8 [len(alphas), len(values), 256]: ``v → round(alpha * value + (1 - alpha) * v)`` per alpha and
    channel value, in float32 as albumentations' ``add_weighted`` and ``cv2.addWeighted`` compute it."""
    a = np.asarray(alphas, np.float64)[:, None, None]
    value = np.asarray(values, np.float32)[None, :, None]
    mixed = a.astype(np.float32) * value + (1 - a).astype(np.float32) * np.arange(256, dtype=np.float32)
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def _rgb_uint8(img: np.ndarray) -> bool:
    return img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3


# --------------------------------------------------------------------------------------------------------------
# Running a pipeline without albumentations' per-call plumbing
# --------------------------------------------------------------------------------------------------------------


def run(t: Any, img: np.ndarray) -> np.ndarray:
    """``t(image=img)["image"]`` for an image-only call of a ``Compose`` / ``SomeOf`` / transform tree, with the same
    draws in the same order and the same pixels, minus albumentations' per-call plumbing (argument and shape
    checks, the data dict, parameter tracking: ~10-60 µs a call, ~9 calls a crop). Anything else (replay, processors,
    other compositions) goes through albumentations' own call."""
    cls = type(t)
    if cls is A.Compose and not (t.replay_mode or t.processors or t.save_applied_params or t.check_each_transform):
        if t.py_random.random() < t.p:  # drawn even at p=1 (force_apply is False)
            for x in compose_steps(t):
                img = run(x, img)
        return img
    if cls is FlipsRotate:
        return t.run(img)
    if cls is A.SomeOf and not (t.replay_mode or t.check_each_transform):
        if t.py_random.random() < t.p:
            for i in t._get_idx():
                img = run(t.transforms[i], img)
        return img
    if isinstance(t, A.BasicTransform) and not (t.replay_mode or t.deterministic) and "image" in t._key2func:
        t.params = {}
        if not t.should_apply():
            return img
        data = {"image": img}
        params = t.update_transform_params(t.get_params(), data)
        params.update(t.get_params_dependent_on_data(params, data))
        t.params = params
        return np.ascontiguousarray(t._key2func["image"](np.ascontiguousarray(img), **params))
    return t(image=img)["image"]


class FlipsRotate:
    """``HorizontalFlip``, ``VerticalFlip``, ``RandomRotate90`` in a row, as one step of :func:`run`: each makes its
    draws as when run alone (same order, same generators), then the image moves once, by the one flip, rotation or
    transpose they compose to (one ``cv2`` call; albumentations: one full-image copy per transform applied)."""

    __slots__ = ("transforms",)

    def __init__(self, transforms: tuple[Any, Any, Any]) -> None:
        self.transforms = transforms

    def run(self, img: np.ndarray) -> np.ndarray:
        if not _rgb_uint8(img):
            for x in self.transforms:
                img = run(x, img)
            return img
        applied = []
        for x in self.transforms:
            x.params = {}
            if not x.should_apply():
                applied.append(False)
                continue
            data = {"image": img}  # the shape is all they read: flips keep it
            params = x.update_transform_params(x.get_params(), data)
            params.update(x.get_params_dependent_on_data(params, data))
            x.params = params
            applied.append(True)
        h, v, r = applied
        factor = int(self.transforms[2].params["factor"]) % 4 if r else 0
        return _DIHEDRAL[h, v, factor](img)

    @staticmethod
    def matches(ts: list[Any]) -> bool:
        """Whether ``ts`` is HorizontalFlip, VerticalFlip, RandomRotate90 (albumentations' or ours), all image-only
        calls :func:`run` makes without albumentations' own call."""
        return (len(ts) == 3 and type(ts[0]) is A.HorizontalFlip and type(ts[1]) is A.VerticalFlip
                and type(ts[2]) in (A.RandomRotate90, RandomRotate90)
                and not any(x.replay_mode or x.deterministic for x in ts))


def compose_steps(t: A.Compose) -> list[Any]:
    """A ``Compose``'s transforms as :func:`run` runs them: each flips + rotation triple as one :class:`FlipsRotate`.
    Cached on the ``Compose`` (for its current list of transforms)."""
    ts = t.transforms
    cached = t.__dict__.get("_reddino_steps")
    if cached is not None and cached[0] is ts and cached[1] == len(ts):
        return cached[2]
    steps, i = [], 0
    while i < len(ts):
        if FlipsRotate.matches(ts[i : i + 3]):
            steps.append(FlipsRotate(tuple(ts[i : i + 3])))
            i += 3
        else:
            steps.append(ts[i])
            i += 1
    t._reddino_steps = (ts, len(ts), steps)
    return steps


def _dihedral_table() -> dict[tuple[bool, bool, int], Any]:
    """(horizontal flip, vertical flip, 90° turns) → the one ``cv2`` call that gives ``np.rot90(vflip(hflip(x)), k)``,
    found by trying each candidate on a non-square image with distinct values."""
    candidates = (
        lambda x: x,
        lambda x: cv2.flip(x, 1), lambda x: cv2.flip(x, 0), lambda x: cv2.flip(x, -1),
        lambda x: cv2.rotate(x, cv2.ROTATE_90_CLOCKWISE), lambda x: cv2.rotate(x, cv2.ROTATE_90_COUNTERCLOCKWISE),
        cv2.transpose, lambda x: cv2.flip(cv2.transpose(x), -1),
    )
    probe = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    table = {}
    for h in (False, True):
        for v in (False, True):
            for k in range(4):
                x = probe[:, ::-1] if h else probe
                x = np.rot90(x[::-1] if v else x, k)
                table[h, v, k] = next(f for f in candidates if np.array_equal(f(probe), x))
    return table


def set_random_state(pipe: Any, random_generator: np.random.Generator, py_random: random.Random) -> None:
    """``pipe.set_random_state(...)``: every transform in the tree draws from these generators; the tree is walked
    once per pipeline and cached (albumentations walks it with ``isinstance`` checks on every call)."""
    nodes = pipe.__dict__.get("_reddino_nodes")
    if nodes is None:
        nodes = []
        stack = [pipe]
        while stack:
            x = stack.pop()
            nodes.append(x)
            if isinstance(x, A.BaseCompose):
                stack.extend(y for y in x.transforms if isinstance(y, (A.BasicTransform, A.BaseCompose)))
        pipe._reddino_nodes = nodes
    for x in nodes:
        x.random_generator = random_generator
        x.py_random = py_random


# --------------------------------------------------------------------------------------------------------------
# The transforms
# --------------------------------------------------------------------------------------------------------------


class RandomFog(A.RandomFog):
    """albumentations' RandomFog: fog particles (discs) blended one by one toward white, then a Gaussian blur."""

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        h, w = params["shape"][:2]
        if h != w:  # x and y then alternate between two ranges: albumentations' draws, one by one
            return super().get_params_dependent_on_data(params, data)
        intensity = self.py_random.uniform(*self.fog_coef_range)
        size = max(1, int(w // 3 * intensity))
        centre = int(w / 2 - 0.5)
        side, draws = w, []
        for _ in range(10):  # albumentations' regions, shrinking by 10 % around the centre
            if side <= size:
                break
            n = int(side * side / (size * size) * intensity * 10)
            draws.append((centre - side // 2, centre + side // 2, 2 * n))  # x, y, x, y, ...
            side = int(side * (1 - 0.1))
        xy = np.zeros((0, 2), np.int64)
        if draws:  # none on images of a few pixels
            xy = np.concatenate(py_randints(self.py_random, draws)).reshape(-1, 2)
        r_max = max(2, int(w * 0.1 * intensity))
        radii = self.random_generator.integers(max(1, r_max // 2), r_max, size=len(xy))
        return {"particle_positions": xy, "intensity": intensity, "radiuses": radii}

    def apply(self, img: np.ndarray, particle_positions: Any, radiuses: Any, intensity: float,
              **params: Any) -> np.ndarray:
        if not _rgb_uint8(img):
            return super().apply(img, particle_positions, radiuses, intensity, **params)
        xy, radii = np.asarray(particle_positions, np.int64).reshape(-1, 2), np.asarray(radiuses, np.int64)
        alpha = self.alpha_coef * intensity
        out = img.copy()
        if len(radii):
            counts = disc_cover_counts(img.shape[:2], xy[:, 0], xy[:, 1], radii)
            step = _blends((255,), np.array([alpha]))[0, 0]
            out = _lookup(_iterated(step, int(counts.max()))[:, None], counts, img)
        k = max(3, min(img.shape[:2]) // 30)
        k += 1 - k % 2
        return cv2.GaussianBlur(out, (k, k), 0)


class RandomSunFlare(A.RandomSunFlare):
    """albumentations' RandomSunFlare (``method="overlay"``): small flare circles, then ``src_radius // 10``
    concentric discs around the flare centre, each blended over the whole image."""

    def apply(self, img: np.ndarray, flare_center: tuple[float, float], circles: list[Any],
              **params: Any) -> np.ndarray:
        if self.method != "overlay" or not _rgb_uint8(img):
            return super().apply(img, flare_center, circles, **params)
        out = self._circles(img, circles)
        return self._sun(out, tuple(int(v) for v in flare_center), circles)

    @staticmethod
    def _circles(img: np.ndarray, circles: list[Any]) -> np.ndarray:
        """Each circle is drawn onto a running overlay, then the overlay is blended with its alpha: only pixels
        under some circle change, so the blends run on those pixels alone."""
        h, w = img.shape[:2]
        under = np.zeros((h, w), np.uint8)
        for _, centre, radius, _ in circles:
            cv2.circle(under, centre, radius, 1, -1)
        idx = np.flatnonzero(under)
        inside = _in_discs(np.divmod(idx, w), circles)
        flat = img.reshape(-1, 3)
        overlay, out = flat[idx].astype(np.float32), flat[idx].astype(np.float32)
        for k, (alpha, _, _, colour) in enumerate(circles):
            overlay[inside[k]] = colour
            out *= np.float32(1 - alpha)
            out += np.float32(alpha) * overlay
            np.rint(out, out=out)  # albumentations rounds to uint8 after every blend
        res = img.copy()
        res.reshape(-1, 3)[idx] = out
        return res

    def _sun(self, img: np.ndarray, centre: tuple[int, int], circles: list[Any]) -> np.ndarray:
        """Disc i (growing radii) is blended toward ``src_color`` with alpha a[n - 1 - i]³: a pixel first covered
        by disc j gets blends j..n-1 (the discs nest), one table per j."""
        n = self.src_radius // 10
        if n == 0:
            return img
        radii = sum(c[2] for c in circles)
        a_max = min(sum(c[0] * c[2] for c in circles) / radii * 5, 1.0)
        a = np.linspace(0.0, a_max, num=n)[::-1]
        alphas = a * a * a  # albumentations' product, to the last bit
        discs = np.linspace(1, self.src_radius, num=n).astype(int)
        h, w = img.shape[:2]
        (cx, cy), whole_map = centre, _sun_first(self.src_radius) if n < 255 else None
        r = discs[-1]
        if whole_map is not None and h - r - 1 <= cy <= r and w - r - 1 <= cx <= r:  # the image lies inside the map
            first = whole_map[r - cy : r - cy + h, r - cx : r - cx + w]
        else:
            corner = max(np.hypot(x - centre[0], y - centre[1]) for x in (0, w - 1) for y in (0, h - 1))
            whole = min(int(np.searchsorted(discs, corner + 2)), n)  # discs from here on cover every pixel
            first = _smallest_disc((h, w), centre, discs, whole, np.uint16)
        steps = _blends(tuple(self.src_color[:3]), alphas) + np.arange(0, 768, 256, dtype=np.intp)[:, None]
        tables = np.empty((n + 1, 3, 256), np.uint8)
        tables[n] = np.arange(256)
        for j in range(n - 1, -1, -1):
            tables[j + 1].take(steps[j], out=tables[j], mode="clip")  # in range: "clip" skips a buffered copy
        return _lookup(tables, first, img)


@functools.lru_cache(maxsize=4)
def _sun_first(src_radius: int) -> np.ndarray:
    """uint8 [2R + 1, 2R + 1] (R: the largest disc's radius): the index of RandomSunFlare's smallest disc
    (``cv2.circle``'s filled discs, radii ``linspace(1, src_radius, src_radius // 10)``) over each pixel around a
    centre at [R, R], that count where none is; a crop of it, placed by the flare's centre, is that image's map
    (the discs are drawn the same wherever their centre is). Made once per ``src_radius``."""
    n = src_radius // 10
    discs = np.linspace(1, src_radius, num=n).astype(int)
    r = int(discs[-1])
    first = _smallest_disc((2 * r + 1, 2 * r + 1), (r, r), discs, n, np.uint8)
    first.flags.writeable = False
    return first


def _smallest_disc(shape: tuple[int, int], centre: tuple[int, int], discs: np.ndarray, count: int,
                   dtype: Any) -> np.ndarray:
    """[H, W] ``dtype``: per pixel the index of the smallest of the first ``count`` filled discs (``cv2.circle``,
    radii ``discs``, around ``centre``) over it, ``count`` where none is."""
    first = np.full(shape, count, dtype)
    for i in range(count - 1, -1, -1):  # larger first: each pixel keeps the smallest disc over it
        cv2.circle(first, centre, int(discs[i]), i, -1)
    return first


def _in_discs(yx: tuple[np.ndarray, np.ndarray], circles: list[Any]) -> np.ndarray:
    """bool [len(circles), len(pixels)]: which of the pixels at rows, columns ``yx`` each circle (``cv2.circle``'s
    filled disc) covers."""
    ys, xs = yx
    cx, cy, rs = (np.array([c[1][0] for c in circles]), np.array([c[1][1] for c in circles]),
                  np.array([c[2] for c in circles]))
    first, last = _disc_spans(rs)
    rmax = first.shape[1] // 2
    dy = ys[None] - cy[:, None]
    row = np.clip(dy + rmax, 0, 2 * rmax)
    dx = xs[None] - cx[:, None]
    lo, hi = np.take_along_axis(first, row, 1), np.take_along_axis(last, row, 1)
    return (np.abs(dy) <= rmax) & (dx >= lo) & (dx <= hi)


class GlassBlur(A.GlassBlur):
    """albumentations' GlassBlur (``mode="fast"``): Gaussian blur, then each inner pixel swapped with a random
    neighbour, ``iterations`` times, then blurred again."""

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, np.ndarray]:
        h, w = params["shape"][:2]
        n = (h - 2 * self.max_delta) * (w - 2 * self.max_delta)
        span = 2 * self.max_delta
        if n > 0 and span & (span - 1) == 0:  # a power of two: Lemire's method takes each value's top bits
            words = pcg64_words(self.random_generator, n * self.iterations * 2)
            if words is not None:  # in place: each ~0.75 MB temporary costs ~180 page faults where memory was trimmed
                words >>= 32 - (span.bit_length() - 1)
                dxy = words.view(np.int32)
                dxy -= self.max_delta
                return {"dxy": dxy.reshape(n, self.iterations, 2)}
        # int32: the same values as albumentations' int64 draw (both take one 32-bit word per value), half the bytes
        dxy = self.random_generator.integers(-self.max_delta, self.max_delta, size=(n, self.iterations, 2),
                                             dtype=np.int32)
        return {"dxy": dxy}

    def apply(self, img: np.ndarray, *args: Any, dxy: np.ndarray, **params: Any) -> np.ndarray:
        if self.mode != "fast" or not _rgb_uint8(img):
            return super().apply(img, *args, dxy=dxy, **params)
        h, w = img.shape[:2]
        x = cv2.GaussianBlur(img, sigmaX=self.sigma, ksize=(0, 0))
        px = np.ascontiguousarray(cv2.cvtColor(x, cv2.COLOR_RGB2RGBA)).view(np.uint32).reshape(-1)
        d = self.max_delta
        p = _glass_pixels(h, w, d)
        inner = px.reshape(h, w)[d + 1 : h - d + 1, d + 1 : w - d + 1][::-1, ::-1].T  # px[p], as a view
        off = dxy[:, :, 0] * np.int32(w)  # each swap's flat offset, all iterations at once (int32: |off| < 2³¹)
        off += dxy[:, :, 1]
        off = np.ascontiguousarray(off.T)
        for i in range(self.iterations):
            q = p + off[i]
            moved, kept = px[q], inner.ravel()
            inner[...] = moved.reshape(inner.shape)
            px[q] = kept  # in this order, as albumentations: later duplicates of q win
        swapped = cv2.cvtColor(px.view(np.uint8).reshape(h, w, 4), cv2.COLOR_RGBA2RGB)
        return cv2.GaussianBlur(swapped, sigmaX=self.sigma, ksize=(0, 0))


@functools.lru_cache(maxsize=8)
def _glass_pixels(h: int, w: int, d: int) -> np.ndarray:
    """Flat indices of GlassBlur's inner pixels, in albumentations' order (rows fastest, both descending)."""
    rows, cols = np.arange(h - d, d, -1), np.arange(w - d, d, -1)
    return np.tile(rows, len(cols)) * w + np.repeat(cols, len(rows))


class FancyPCA(A.FancyPCA):
    """albumentations' FancyPCA: RGB in [0, 1] plus ``(x - mean) · (V · diag(alpha · eigenvalues))ᵀ`` with the
    eigenvectors V (descending eigenvalues) of the image's colour covariance."""

    def apply(self, img: np.ndarray, alpha_vector: np.ndarray, **params: Any) -> np.ndarray:
        if not _rgb_uint8(img):
            return super().apply(img, alpha_vector, **params)
        x = cv2.LUT(img, _UNIT)
        mean = np.array(cv2.mean(x)[:3])
        cov = cv2.mulTransposed(x.reshape(-1, 3), True, delta=mean[None].astype(np.float32), dtype=cv2.CV_64F)
        cov /= img.shape[0] * img.shape[1] - 1
        vals, vecs = np.linalg.eigh(cov)
        order = vals[::-1].argsort()
        a = vecs[:, order] * (alpha_vector * vals[order])
        y = cv2.transform(x, np.hstack([np.eye(3) + a, (-a @ mean)[:, None]]))
        return np.rint(np.clip(y, 0, 1, out=y) * np.float32(255), out=y).astype(np.uint8)


_UNIT = np.arange(256, dtype=np.float32) / 255  # albumentations' uint8 → float32 [0, 1]


class GaussNoise(A.GaussNoise):
    """albumentations' GaussNoise (per channel, zero mean): ``cv2.randn`` noise × 255, truncated toward 0, added to
    the image, clipped to uint8. Same pixels: ``cv2.randn`` writes the float32 noise directly (albumentations fills
    a float64 array and casts it: each value is a float32 normal times the float32 sigma, exact in float64, so the
    cast rounds it as the float32 product does); truncation, sum, clip and cast run in one float32 buffer."""

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        image = data["image"] if "image" in data else data["images"][0]
        if (not _rgb_uint8(image) or not self.per_channel or self.noise_scale_factor != 1
                or tuple(self.mean_range) != (0.0, 0.0)):
            return super().get_params_dependent_on_data(params, data)
        sigma = self.py_random.uniform(*self.std_range)
        self.py_random.uniform(*self.mean_range)  # albumentations draws the mean (here always 0) after sigma
        cv2.setRNGSeed(int(self.random_generator.integers(0, 2**16)))
        noise = np.empty(image.shape, np.float32)
        cv2.randn(noise, np.zeros(3, np.float32), np.full(3, sigma, np.float32))
        noise *= np.float32(255)
        return {"noise_map": noise}

    def apply(self, img: np.ndarray, noise_map: np.ndarray, **params: Any) -> np.ndarray:
        if not _rgb_uint8(img) or noise_map.dtype != np.float32 or noise_map.shape != img.shape:
            return super().apply(img, noise_map, **params)
        out = np.trunc(noise_map)  # albucore adds the noise truncated toward 0 to the image in float32
        out += img
        return np.clip(out, 0, 255, out=out).astype(np.uint8)


class ISONoise(A.ISONoise):
    """albumentations' ISONoise: in float32 HLS, Poisson(λ = std(L) · intensity) luminance noise
    ``L += n · intensity · (1 - L)`` and normal(0, color_shift · intensity) hue noise, both per pixel from
    ``default_rng(random_seed)``; back to RGB, clipped to [0, 1], rounded to uint8.

    **Equal in distribution, not pixel-exact**: the same parameters from the same draws (color_shift, intensity,
    random_seed: the policy's generators advance exactly as albumentations'), the same arithmetic, and per pixel the
    same noise distributions, drawn more cheaply from the same seeded generator: the Poisson counts by inverting
    their CDF on float32 uniforms (numpy's ``poisson`` multiplies float64 uniforms one count at a time, ~20 ns per
    pixel) and the normals as float32 by ``cv2.randn`` (a ziggurat like numpy's), seeded from that generator. The same seed gives
    the same pixels (a resumed run sees the same augmentations); ``tests/test_rbcfast.py`` compares per-draw
    statistics with albumentations' on fixed seeds."""

    def apply(self, img: np.ndarray, color_shift: float, intensity: float, random_seed: int,
              **params: Any) -> np.ndarray:
        if not _rgb_uint8(img):
            return super().apply(img, color_shift, intensity, random_seed, **params)
        g = np.random.default_rng(random_seed)
        hls = cv2.cvtColor(cv2.LUT(img, _UNIT), cv2.COLOR_RGB2HLS)
        _, std = cv2.meanStdDev(hls)
        flat = hls.reshape(-1, 3)
        counts, idx = poisson_counts(g.random(len(flat), dtype=np.float32), float(std[1, 0]) * intensity)
        lum = flat[idx, 1]
        flat[idx, 1] = lum + (counts * intensity * (1.0 - lum)).astype(np.float32)
        hue = np.empty(len(flat), np.float32)
        cv2.setRNGSeed(int(g.integers(0, 2**31)))  # cv2's normals: ~2.5x cheaper than numpy's float32 ones
        cv2.randn(hue, 0.0, color_shift * intensity)
        flat[:, 0] += hue
        rgb = cv2.cvtColor(hls, cv2.COLOR_HLS2RGB)
        np.clip(rgb, 0, 1, out=rgb)
        return _to_uint8(rgb)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    """float32 in [0, 1] → uint8 as albumentations' ``from_float``: round(x · 255)."""
    x *= np.float32(255)
    return np.rint(x, out=x).astype(np.uint8)


def poisson_counts(u: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """Poisson(``lam``) counts from uniforms ``u`` in [0, 1) by inverting the CDF: (the nonzero counts, their
    indices in ``u``); every other count is 0. Exact in distribution up to ``u``'s resolution (2⁻²⁴ for float32)."""
    if lam <= 0:
        return np.zeros(0, np.int64), np.zeros(0, np.intp)
    k = np.arange(int(lam + 12 * np.sqrt(lam) + 20))
    pmf = np.exp(k * np.log(lam) - lam - np.cumsum(np.log(np.maximum(k, 1))))
    cdf = np.cumsum(pmf)
    idx = np.flatnonzero(u >= cdf[0])
    return np.searchsorted(cdf, u[idx], side="right"), idx


class RandomShadow(A.RandomShadow):
    """albumentations' RandomShadow: each shadow polygon (``cv2.fillPoly``) darkens the pixels under it,
    ``v → clip(v · (1 - intensity))`` in float64 truncated to uint8, one polygon after the other. Same pixels: the
    map is a 256-entry table (``cv2.LUT``) copied onto the polygon's pixels, instead of a float64 product of
    boolean-indexed pixels."""

    def apply(self, img: np.ndarray, vertices_list: list[np.ndarray], intensities: np.ndarray,
              **params: Any) -> np.ndarray:
        if not _rgb_uint8(img):
            return super().apply(img, vertices_list, intensities, **params)
        out = img.copy()
        mask = np.empty(img.shape[:2], np.uint8)
        for vertices, intensity in zip(vertices_list, intensities):
            mask[:] = 0
            cv2.fillPoly(mask, [vertices], (255,))
            table = np.clip(_LEVELS * (1 - intensity), 0, 255).astype(np.uint8)
            cv2.copyTo(cv2.LUT(out, table), mask, out)
        return out


_LEVELS = np.arange(256, dtype=np.float64)


class RandomRotate90(A.RandomRotate90):
    """albumentations' RandomRotate90 with its image rotated by ``cv2.rotate``: albumentations makes ``np.rot90``'s
    view contiguous, a strided copy ~15x slower on RGB."""

    def apply(self, img: np.ndarray, factor: int, **params: Any) -> np.ndarray:
        if not _rgb_uint8(img):
            return super().apply(img, factor, **params)
        return cv2.rotate(img, _ROTATIONS[factor]) if factor else img


_ROTATIONS = {1: cv2.ROTATE_90_COUNTERCLOCKWISE, 2: cv2.ROTATE_180, 3: cv2.ROTATE_90_CLOCKWISE}  # np.rot90's k
_DIHEDRAL = _dihedral_table()

class RandomResizedCrop(A.RandomResizedCrop):
    """albumentations' RandomResizedCrop with its image cut and resized by one ``cv2.resize`` of the crop's view (the
    call albumentations makes, without its wrappers). Not in :data:`FAST` (it has no default size): the ``rbc`` policy
    builds it (:func:`reddino.data.augment.build_rbc`)."""

    def apply(self, img: np.ndarray, crop_coords: tuple[int, int, int, int], **params: Any) -> np.ndarray:
        if img.ndim != 3 or not 1 <= img.shape[2] <= 4:
            return super().apply(img, crop_coords, **params)
        x_min, y_min, x_max, y_max = crop_coords
        if not (0 <= x_min < x_max <= img.shape[1] and 0 <= y_min < y_max <= img.shape[0]):
            return super().apply(img, crop_coords, **params)  # albumentations raises
        crop = img[y_min:y_max, x_min:x_max]
        if tuple(self.size) == crop.shape[:2]:
            return crop  # albumentations' resize returns it as is
        interpolation = self._get_interpolation_for_resize(crop.shape[:2], "image")
        return cv2.resize(crop, (self.size[1], self.size[0]), interpolation=interpolation)


class MotionBlur(A.MotionBlur):
    """albumentations' MotionBlur: a line kernel at a random angle, direction bias and shift. The same draws and
    kernel, built without ``np.unique`` of its points (setting a point twice is setting it once) and numpy's scalar
    ``clip``; the convolution is albumentations' ``cv2.filter2D`` call without its wrappers."""

    def get_params(self) -> dict[str, Any]:
        ksize = sample_odd_from_range(self.py_random, self.blur_limit[0], self.blur_limit[1])
        angle = self.py_random.uniform(*self.angle_range)
        direction = self.py_random.uniform(*self.direction_range)
        kernel = motion_kernel(ksize, angle, direction, self.allow_shifted, self.py_random)
        return {"kernel": kernel.astype(np.float32) / np.sum(kernel)}

    def apply(self, img: np.ndarray, kernel: np.ndarray, **params: Any) -> np.ndarray:
        return _filter(img, kernel) if _rgb_uint8(img) else super().apply(img, kernel, **params)


def motion_kernel(kernel_size: int, angle: float, direction: float, allow_shifted: bool,
                  random_state: random.Random) -> np.ndarray:
    """albumentations' ``create_motion_kernel``, the same float64 arithmetic and draws, less numpy overhead."""
    direction = min(max(direction, -1.0), 1.0)
    kernel = np.zeros((kernel_size, kernel_size), dtype=np.float32)
    center = kernel_size // 2
    angle_rad = np.deg2rad(angle)
    dx, dy = np.cos(angle_rad), np.sin(angle_rad)
    line_length = kernel_size // 2
    if direction < 0:
        t_start, t_end = float(-line_length), line_length * (1 - abs(direction))
    elif direction > 0:
        t_start, t_end = -line_length * (1 - direction), float(line_length)
    else:
        t_start, t_end = float(-line_length), float(line_length)
    t = np.linspace(t_start, t_end, kernel_size)
    x = center + dx * t
    y = center + dy * t
    if allow_shifted:
        x += random_state.uniform(-1, 1) * line_length / 2
        y += random_state.uniform(-1, 1) * line_length / 2
    top = kernel_size - 1
    xi = np.minimum(np.maximum(np.round(x), 0), top).astype(int)
    yi = np.minimum(np.maximum(np.round(y), 0), top).astype(int)
    kernel[yi, xi] = 1
    if not kernel.any():
        kernel[center, center] = 1
    return kernel


def _filter(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """albumentations' ``convolve`` on uint8 RGB: its ``cv2.filter2D`` call (its wrappers change nothing there)."""
    return cv2.filter2D(img, ddepth=-1, kernel=kernel)


class RingingOvershoot(A.RingingOvershoot):
    """albumentations' RingingOvershoot: a 2-D sinc-like low-pass kernel (``cutoff · J1(cutoff · r) / (2π r)``) of a
    random odd size and cutoff. The same draws and kernel, with each size's grid of distances ``r`` made once."""

    def get_params(self) -> dict[str, np.ndarray]:
        ksize = self.py_random.randrange(self.blur_limit[0], self.blur_limit[1] + 1, 2)
        if ksize % 2 == 0:
            ksize += 1
        cutoff = self.py_random.uniform(*self.cutoff)
        r = _ringing_radii(ksize)
        with np.errstate(divide="ignore", invalid="ignore"):
            kernel = cutoff * _special().j1(cutoff * r) / (2 * np.pi * r)
        kernel[(ksize - 1) // 2, (ksize - 1) // 2] = cutoff**2 / (4 * np.pi)
        return {"kernel": kernel.astype(np.float32) / np.sum(kernel)}

    def apply(self, img: np.ndarray, kernel: np.ndarray, **params: Any) -> np.ndarray:
        return _filter(img, kernel) if _rgb_uint8(img) else super().apply(img, kernel, **params)


@functools.lru_cache(maxsize=None)
def _ringing_radii(ksize: int) -> np.ndarray:
    """float64 [ksize, ksize]: each cell's distance to the centre, as albumentations' ``np.fromfunction`` computes it."""
    x, y = np.indices((ksize, ksize), dtype=float)
    r = np.sqrt((x - (ksize - 1) / 2) ** 2 + (y - (ksize - 1) / 2) ** 2)
    r.flags.writeable = False
    return r


def _special() -> Any:
    from scipy import special  # as albumentations (imported there already)

    return special


class RandomRain(A.RandomRain):
    """albumentations' RandomRain: drops drawn as lines on a black layer, blurred, added to the image, then the image
    scaled by ``brightness_coefficient`` (``cv2.multiply`` by a scalar, ~5 ns per value). Same pixels: the scaling is
    a 256-entry table (``cv2.LUT``) made once per coefficient by that same ``cv2.multiply`` call on every value (the
    op is per value), and the sum is written to a new array instead of a copy of the image."""

    def apply(self, img: np.ndarray, slant: float, drop_length: int, rain_drops: np.ndarray,
              **params: Any) -> np.ndarray:
        if not _rgb_uint8(img) or not rain_drops.size:
            return super().apply(img, slant, drop_length, rain_drops, **params)
        rain = np.zeros_like(img)
        ends = rain_drops + np.array([[slant, drop_length]])
        lines = np.stack((rain_drops, ends), axis=1).astype(np.int32)
        cv2.polylines(rain, lines, False, self.drop_color, self.drop_width, lineType=cv2.LINE_4)
        if self.blur_value > 1:
            cv2.blur(rain, (self.blur_value, self.blur_value), dst=rain)
        out = cv2.add(img, rain)
        if self.brightness_coefficient != 1.0:
            cv2.LUT(out, _scale_table(float(self.brightness_coefficient)), dst=out)
        return out


@functools.lru_cache(maxsize=16)
def _scale_table(coefficient: float) -> np.ndarray:
    """uint8 [1, 256, 3]: ``cv2.multiply(v, coefficient, dtype=CV_8U)`` for every value v of each RGB channel."""
    levels = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)
    table = cv2.multiply(levels, coefficient, dtype=cv2.CV_8U)
    table.flags.writeable = False
    return table


class Defocus(A.Defocus):
    """albumentations' Defocus: a disc kernel (radius 3-10 in a 17-21 px square), blurred by a small Gaussian (the
    alias blur, a continuous draw), then ``cv2.filter2D``. Same pixels: each radius's normalised disc made once,
    the Gaussian and ``cv2.filter2D`` calls albumentations makes, without its wrappers."""

    def apply(self, img: np.ndarray, radius: int, alias_blur: float, **params: Any) -> np.ndarray:
        if not _rgb_uint8(img):
            return super().apply(img, radius, alias_blur, **params)
        ksize = 3 if radius <= 8 else 5  # albumentations' EIGHT
        return _filter(img, cv2.GaussianBlur(_defocus_disc(radius), (ksize, ksize), sigmaX=alias_blur))


@functools.lru_cache(maxsize=None)
def _defocus_disc(radius: int) -> np.ndarray:
    """albumentations' ``defocus`` disc: float32 [2m + 1, 2m + 1] (m = max(8, radius)), 1 where x² + y² ≤ radius²,
    divided by its sum (the same float32 operations)."""
    length = np.arange(-max(8, radius), max(8, radius) + 1)
    x, y = np.meshgrid(length, length)
    disc = np.array((x**2 + y**2) <= radius**2, dtype=np.float32)
    disc /= np.sum(disc)
    disc.flags.writeable = False
    return disc


class Equalize(A.Equalize):
    """albumentations' Equalize (``mode="cv"``, by channel, no mask): ``cv2.equalizeHist`` on each channel. Same
    pixels: the channels split and merged by cv2 (albumentations hands cv2 a strided view of each channel, which
    it copies, and writes each result back through a strided view)."""

    def apply(self, img: np.ndarray, mask: np.ndarray | None = None, **params: Any) -> np.ndarray:
        if self.mode != "cv" or not self.by_channels or mask is not None or not _rgb_uint8(img):
            return super().apply(img, mask, **params)
        return cv2.merge([cv2.equalizeHist(c) for c in cv2.split(img)])


#: The ops of :data:`FAST` that are equal to albumentations' in distribution, not pixel for pixel (same parameter draws,
#: same seeded generators advanced the same way, per-pixel noise drawn more cheaply: see each class).
IN_DISTRIBUTION = frozenset({"ISONoise"})

#: albumentations class name → its cheaper equal (the ``rbc`` policy, :func:`reddino.data.augment.build_rbc`).
FAST: dict[str, type[A.BasicTransform]] = {
    "RandomFog": RandomFog, "RandomSunFlare": RandomSunFlare, "GlassBlur": GlassBlur, "FancyPCA": FancyPCA,
    "RandomRotate90": RandomRotate90, "GaussNoise": GaussNoise, "ISONoise": ISONoise,
    "RandomShadow": RandomShadow, "MotionBlur": MotionBlur, "RingingOvershoot": RingingOvershoot,
    "RandomRain": RandomRain, "Defocus": Defocus, "Equalize": Equalize,
}
