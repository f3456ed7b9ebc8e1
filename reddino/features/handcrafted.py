"""Hand-crafted morphology features: the classical baseline a foundation model must beat.

Per cell crop: an Otsu mask of the cell (scikit-image), the connected component at (or nearest) the
crop centre with its holes filled (the central pallor is lighter than the rim), then

* shape (``regionprops``): area, perimeter, circularity 4piA/P^2, eccentricity, solidity, extent,
  minor/major axis ratio, equivalent diameter - sizes normalised by the crop size;
* pallor: a radial intensity profile from the centre to the rim (Euclidean distance transform inside
  the mask, 4 rings) and the centre-minus-rim contrast;
* colour: mean/std of R, G, B inside the cell, mean saturation and value, background colour and the
  cell/background contrast.

The features have different scales, so the protocols z-score them on each training fold
(``info["standardize"]``); CNN/ViT features are used raw, as in the RedDino protocol.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from reddino.data.images import to_rgb_list

VERSION = 1

FEATURE_NAMES = (
    "found",
    "area_frac",
    "perimeter_norm",
    "circularity",
    "eccentricity",
    "solidity",
    "extent",
    "axis_ratio",
    "equiv_diameter_norm",
    "pallor_contrast",
    "radial_0",
    "radial_1",
    "radial_2",
    "radial_3",
    "gray_mean",
    "gray_std",
    "r_mean",
    "g_mean",
    "b_mean",
    "r_std",
    "g_std",
    "b_std",
    "saturation_mean",
    "value_mean",
    "bg_r",
    "bg_g",
    "bg_b",
    "cell_bg_contrast",
)


def cell_mask(rgb: np.ndarray) -> np.ndarray:
    """Boolean mask of the cell nearest the crop centre (Otsu on smoothed grey, holes filled)."""
    from scipy import ndimage  # noqa: PLC0415
    from skimage.color import rgb2gray  # noqa: PLC0415
    from skimage.filters import gaussian, threshold_otsu  # noqa: PLC0415
    from skimage.measure import label  # noqa: PLC0415

    gray = gaussian(rgb2gray(rgb), sigma=1.0)
    if float(gray.max() - gray.min()) < 1e-6:
        return np.zeros(gray.shape, dtype=bool)
    t = threshold_otsu(gray)
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    # The background is whatever side of the threshold most of the crop border is on.
    mask = gray < t if np.median(border) > t else gray > t
    mask = ndimage.binary_fill_holes(mask)
    lab = label(mask)
    if lab.max() == 0:
        return mask
    h, w = mask.shape
    centre = lab[h // 2, w // 2]
    if centre == 0:
        # No component covers the centre: take the one whose pixels come closest to it.
        yy, xx = np.nonzero(lab)
        d = (yy - h / 2) ** 2 + (xx - w / 2) ** 2
        centre = lab[yy[np.argmin(d)], xx[np.argmin(d)]]
    return lab == centre


def cell_features(rgb: np.ndarray) -> np.ndarray:
    """The :data:`FEATURE_NAMES` vector of one HxWx3 uint8 RGB crop."""
    from scipy import ndimage  # noqa: PLC0415
    from skimage.color import rgb2gray, rgb2hsv  # noqa: PLC0415
    from skimage.measure import regionprops  # noqa: PLC0415

    rgb = np.ascontiguousarray(rgb[..., :3])
    out = np.zeros(len(FEATURE_NAMES), dtype=np.float32)
    img = rgb.astype(np.float32) / 255.0
    gray = rgb2gray(rgb)
    h, w = gray.shape
    side = float(np.sqrt(h * w))
    mask = cell_mask(rgb)
    if mask.sum() < 4:
        out[FEATURE_NAMES.index("gray_mean")] = gray.mean()
        out[FEATURE_NAMES.index("gray_std")] = gray.std()
        return out
    (props,) = regionprops(mask.astype(np.uint8))
    area, perim = float(props.area), float(props.perimeter) or 1.0
    major, minor = float(props.axis_major_length), float(props.axis_minor_length)
    dist = ndimage.distance_transform_edt(mask)
    r = 1.0 - dist / max(float(dist.max()), 1e-6)  # 0 at the cell's centre, 1 on its rim
    inside = gray[mask]
    rr = r[mask]
    rings = [inside[(rr >= lo) & (rr < hi)] for lo, hi in ((0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.01))]
    ring_means = [float(x.mean()) if x.size else float(inside.mean()) for x in rings]
    centre_vals, rim_vals = inside[rr < 0.4], inside[rr > 0.7]
    pallor = (float(centre_vals.mean()) if centre_vals.size else 0.0) - (
        float(rim_vals.mean()) if rim_vals.size else 0.0
    )
    cell_rgb = img[mask]
    hsv = rgb2hsv(rgb)[mask]
    bg = img[~mask] if (~mask).any() else np.zeros((1, 3), np.float32)
    bg_gray = gray[~mask].mean() if (~mask).any() else 0.0
    values = {
        "found": 1.0,
        "area_frac": area / (h * w),
        "perimeter_norm": perim / side,
        "circularity": min(4 * np.pi * area / perim**2, 2.0),
        "eccentricity": float(props.eccentricity),
        "solidity": float(props.solidity),
        "extent": float(props.extent),
        "axis_ratio": minor / major if major > 0 else 1.0,
        "equiv_diameter_norm": float(props.equivalent_diameter_area) / side,
        "pallor_contrast": pallor,
        "radial_0": ring_means[0],
        "radial_1": ring_means[1],
        "radial_2": ring_means[2],
        "radial_3": ring_means[3],
        "gray_mean": float(inside.mean()),
        "gray_std": float(inside.std()),
        "r_mean": float(cell_rgb[:, 0].mean()),
        "g_mean": float(cell_rgb[:, 1].mean()),
        "b_mean": float(cell_rgb[:, 2].mean()),
        "r_std": float(cell_rgb[:, 0].std()),
        "g_std": float(cell_rgb[:, 1].std()),
        "b_std": float(cell_rgb[:, 2].std()),
        "saturation_mean": float(hsv[:, 1].mean()),
        "value_mean": float(hsv[:, 2].mean()),
        "bg_r": float(bg[:, 0].mean()),
        "bg_g": float(bg[:, 1].mean()),
        "bg_b": float(bg[:, 2].mean()),
        "cell_bg_contrast": float(inside.mean() - bg_gray),
    }
    for i, name in enumerate(FEATURE_NAMES):
        out[i] = values[name]
    return out


def handcrafted_features(images: Iterable, *, img_size: int | None = None) -> np.ndarray:
    """Morphology features ``[N, len(FEATURE_NAMES)]`` (float32) for RGB uint8 arrays or encoded bytes.

    ``img_size`` resizes every crop to a square first (default: native resolution).
    """
    rows = []
    for im in to_rgb_list(images):
        if img_size and im.shape[:2] != (img_size, img_size):
            import cv2  # noqa: PLC0415

            im = cv2.resize(im, (img_size, img_size), interpolation=cv2.INTER_AREA)
        rows.append(cell_features(im))
    if not rows:
        return np.zeros((0, len(FEATURE_NAMES)), dtype=np.float32)
    return np.stack(rows).astype(np.float32)


class HandcraftedExtractor:
    """The morphology baseline as a feature extractor (no network): what ``resolve_model("handcrafted")`` gives.

    Extractors other than timm ViTs implement ``extract`` and say whether classifiers should z-score their
    features (``standardize``: these are in mixed units, pixels and ratios)."""

    name = "handcrafted"
    standardize = True
    dim = len(FEATURE_NAMES)

    def extract(self, images, img_size: int | None = None, batch_size: int = 64, on_batch=None) -> np.ndarray:
        out = []
        for i in range(0, len(images), batch_size):
            out.append(handcrafted_features(images[i : i + batch_size], img_size=img_size))
            if on_batch:
                on_batch(len(out[-1]))
        return np.concatenate(out) if out else handcrafted_features([])

    def __repr__(self) -> str:
        return "HandcraftedExtractor()"
