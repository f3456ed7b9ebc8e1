"""DINOv2's augmentation recipe as explicit per-crop parameters: drawn once (numpy, seeded per row, on the CPU
worker), then applied either with cv2 on uint8 (CPU path) or in batches with torch on the training device.

The recipe is the official one (``dinov2/data/augmentations.py``: torchvision on PIL): RandomResizedCrop
(bicubic, aspect 3/4-4/3) → HorizontalFlip 0.5 → ColorJitter(0.4, 0.4, 0.2, 0.1) p=0.8 in a random order →
RandomGrayscale 0.2 → GaussianBlur (kernel 9, sigma U(0.1, 2)) with p 1.0 on global crop 1, 0.1 on global
crop 2 (+ Solarize 0.2, threshold 128), 0.5 on local crops. The parameters follow torchvision's own draws
(``RandomResizedCrop.get_params``, ``ColorJitter.get_params``), so both paths equal the official recipe in
distribution (``tests/test_fastaug.py`` checks per-op statistics against torchvision on fixed seeds); the two
paths equal each other per pixel up to uint8 rounding. Resizing is cv2's bicubic, or area where the box shrinks
on both sides (closer to PIL's antialiased bicubic than an aliasing cubic).

Why: torchvision's ops on PIL cost 5-20x these cv2 ones per op (``benchmarks/augment_cost.py``; albumentations'
cv2-based ops cost about the same as these), and with the parameters drawn on the CPU the device path needs only
the decoded image from the data workers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

# Columns of one crop's parameter row (float32). Box in source pixels; factors as torchvision draws them.
Y0, X0, BOX_H, BOX_W, FLIP, JITTER, BRIGHT, CONTRAST, SAT, HUE, ORDER, GRAY, BLUR, SIGMA, SOLAR = (
    0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 14, 15, 16, 17)
N_PARAMS = 18
RATIO = (3 / 4, 4 / 3)
BLUR_KERNEL = 9
SIGMA_RANGE = (0.1, 2.0)
JITTER_P, GRAY_P, SOLAR_P, FLIP_P = 0.8, 0.2, 0.2, 0.5
BRIGHTNESS, CONTRAST_J, SATURATION, HUE_J = 0.4, 0.4, 0.2, 0.1
# torchvision's rgb_to_grayscale weights (ITU-R 601-2), used by contrast, saturation and grayscale
GRAY_W = (0.2989, 0.587, 0.114)


@dataclass(frozen=True)
class CropRecipe:
    """One crop's output size, crop scale and op probabilities."""

    size: int
    scale: tuple[float, float]
    flip_p: float = FLIP_P
    jitter_p: float = JITTER_P
    gray_p: float = GRAY_P
    blur_p: float = 0.0
    solar_p: float = 0.0


def dinov2_recipes(crops) -> list[CropRecipe]:
    """The official recipe for a :class:`~reddino.config.CropConfig`: globals then locals; odd globals are crop 1
    (blur 1.0), even ones crop 2 (blur 0.1, solarize 0.2)."""
    gs, gscale = crops.global_crops_size, tuple(crops.global_crops_scale)
    g = [CropRecipe(gs, gscale, blur_p=1.0) if i % 2 == 0 else CropRecipe(gs, gscale, blur_p=0.1, solar_p=SOLAR_P)
         for i in range(crops.global_crops_number)]
    local = CropRecipe(crops.local_crops_size, tuple(crops.local_crops_scale), blur_p=0.5)
    return g + [local] * crops.local_crops_number


def none_recipes(crops) -> list[CropRecipe]:
    """Random-resized crops only."""
    off = dict(flip_p=0.0, jitter_p=0.0, gray_p=0.0)
    return ([CropRecipe(crops.global_crops_size, tuple(crops.global_crops_scale), **off)] * crops.global_crops_number
            + [CropRecipe(crops.local_crops_size, tuple(crops.local_crops_scale), **off)] * crops.local_crops_number)


def rrc_box(u: np.ndarray, height: int, width: int, scale: tuple[float, float],
            ratio: tuple[float, float] = RATIO) -> tuple[int, int, int, int]:
    """torchvision ``RandomResizedCrop.get_params`` from uniforms ``u`` [10, 4] (area, log-ratio, top, left of
    each of the 10 tries): (top, left, h, w); a centre crop when no try fits."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    target = area * (scale[0] + u[:, 0] * (scale[1] - scale[0]))
    ar = np.exp(log_lo + u[:, 1] * (log_hi - log_lo))
    ws = np.rint(np.sqrt(target * ar)).astype(np.int64)  # round half to even, as Python's round()
    hs = np.rint(np.sqrt(target / ar)).astype(np.int64)
    ok = np.flatnonzero((ws > 0) & (ws <= width) & (hs > 0) & (hs <= height))
    if ok.size:
        t = ok[0]
        h, w = int(hs[t]), int(ws[t])
        return int(u[t, 2] * (height - h + 1)), int(u[t, 3] * (width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _rrc_boxes(u: np.ndarray, height: int, width: int, scales: np.ndarray,
               ratio: tuple[float, float] = RATIO) -> np.ndarray:
    """:func:`rrc_box` for K crops at once: uniforms u [K, 10, 4], scales [K, 2] → int [K, 4]."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    target = area * (scales[:, :1] + u[..., 0] * (scales[:, 1:] - scales[:, :1]))
    ar = np.exp(log_lo + u[..., 1] * (log_hi - log_lo))
    ws = np.rint(np.sqrt(target * ar)).astype(np.int64)
    hs = np.rint(np.sqrt(target / ar)).astype(np.int64)
    ok = (ws > 0) & (ws <= width) & (hs > 0) & (hs <= height)
    first = ok.argmax(1)
    k = np.arange(len(u))
    h, w = hs[k, first], ws[k, first]
    out = np.stack([(u[k, first, 2] * (height - h + 1)).astype(np.int64),
                    (u[k, first, 3] * (width - w + 1)).astype(np.int64), h, w], 1)
    for i in np.flatnonzero(~ok.any(1)):  # no try fitted: torchvision's centre crop
        out[i] = rrc_box(np.full((10, 4), 2.0), height, width, tuple(scales[i]), ratio)
    return out


def draw_params(rng: np.random.Generator, height: int, width: int, recipes: list[CropRecipe]) -> np.ndarray:
    """float32 [len(recipes), N_PARAMS]: every random choice of one row's crops (see the column names), from one
    draw of uniforms (the per-row cost is what the data workers pay with ``crops.on_device``)."""
    K = len(recipes)
    u = rng.random((K, 54))
    out = np.zeros((K, N_PARAMS), dtype=np.float32)
    scales = np.array([c.scale for c in recipes], dtype=np.float64)
    out[:, :4] = _rrc_boxes(u[:, :40].reshape(K, 10, 4), height, width, scales)
    v = u[:, 40:50]
    prob = np.array([[c.flip_p, c.jitter_p, c.gray_p, c.blur_p, c.solar_p] for c in recipes])
    out[:, FLIP] = v[:, 0] < prob[:, 0]
    out[:, JITTER] = v[:, 1] < prob[:, 1]
    out[:, BRIGHT] = 1 - BRIGHTNESS + v[:, 2] * 2 * BRIGHTNESS
    out[:, CONTRAST] = 1 - CONTRAST_J + v[:, 3] * 2 * CONTRAST_J
    out[:, SAT] = 1 - SATURATION + v[:, 4] * 2 * SATURATION
    out[:, HUE] = -HUE_J + v[:, 5] * 2 * HUE_J
    out[:, ORDER:ORDER + 4] = np.argsort(u[:, 50:54], axis=1)  # a uniform random permutation per crop
    out[:, GRAY] = v[:, 6] < prob[:, 2]
    out[:, BLUR] = v[:, 7] < prob[:, 3]
    out[:, SIGMA] = SIGMA_RANGE[0] + v[:, 8] * (SIGMA_RANGE[1] - SIGMA_RANGE[0])
    out[:, SOLAR] = v[:, 9] < prob[:, 4]
    return out


# --------------------------------------------------------------------------------------------------------------
# CPU: cv2 on uint8 HxWx3 RGB (each op the cheapest we measured that equals torchvision's in distribution)
# --------------------------------------------------------------------------------------------------------------

_IDENT = np.arange(256, dtype=np.float32)
SOLAR_LUT = np.where(np.arange(256) >= 128, 255 - np.arange(256), np.arange(256)).astype(np.uint8)


def _lut(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _gray(img: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)


def _brightness(img: np.ndarray, f: float) -> np.ndarray:
    return cv2.LUT(img, _lut(_IDENT * f))


def _contrast(img: np.ndarray, f: float) -> np.ndarray:
    mean = float(_gray(img).mean())
    return cv2.LUT(img, _lut(_IDENT * f + (1 - f) * mean))


def _saturation(img: np.ndarray, f: float) -> np.ndarray:
    g = cv2.cvtColor(_gray(img), cv2.COLOR_GRAY2RGB)
    return cv2.addWeighted(img, f, g, 1 - f, 0)


def _hue(img: np.ndarray, f: float) -> np.ndarray:
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV_FULL)  # uint8 hue in 0..255, as PIL's HSV (torchvision on PIL)
    lut = np.empty((1, 256, 3), np.uint8)
    lut[0, :, 0] = (np.arange(256) + int(round(f * 256))) % 256  # cv2 FULL: 256 units = 360°
    lut[0, :, 1] = lut[0, :, 2] = np.arange(256)
    return cv2.cvtColor(cv2.LUT(hsv, lut), cv2.COLOR_HSV2RGB_FULL)


_COLOUR_OPS = (_brightness, _contrast, _saturation, _hue)  # ORDER indexes these (torchvision's fn_idx)


def shrinks(h: float, w: float, size: int) -> bool:
    """Area resampling when the box shrinks on both sides (PIL's antialiased bicubic, which the official recipe
    gets, is close to it: cv2's cubic would alias there), else bicubic."""
    return min(h, w) > size


def crop_resize_cpu(img: np.ndarray, p: np.ndarray, size: int) -> np.ndarray:
    y0, x0, h, w = (int(v) for v in p[:4])
    mode = cv2.INTER_AREA if shrinks(h, w, size) else cv2.INTER_CUBIC
    out = cv2.resize(img[y0:y0 + h, x0:x0 + w], (size, size), interpolation=mode)
    return cv2.flip(out, 1) if p[FLIP] else out


def colour_cpu(out: np.ndarray, p: np.ndarray) -> np.ndarray:
    if p[JITTER]:
        for op in p[ORDER:ORDER + 4].astype(int):
            out = _COLOUR_OPS[op](out, float(p[BRIGHT + op]))
    if p[GRAY]:
        out = cv2.cvtColor(_gray(out), cv2.COLOR_GRAY2RGB)
    return out


def blur_cpu(out: np.ndarray, p: np.ndarray) -> np.ndarray:
    if not p[BLUR]:
        return out
    s = float(p[SIGMA])
    return cv2.GaussianBlur(out, (BLUR_KERNEL, BLUR_KERNEL), s, sigmaY=s, borderType=cv2.BORDER_REFLECT_101)


def solarize_cpu(out: np.ndarray, p: np.ndarray) -> np.ndarray:
    return cv2.LUT(out, SOLAR_LUT) if p[SOLAR] else out


def apply_cpu(img: np.ndarray, p: np.ndarray, size: int) -> np.ndarray:
    """One crop (uint8 size×size×3) of ``img`` from its parameter row ``p``."""
    return solarize_cpu(blur_cpu(colour_cpu(crop_resize_cpu(img, p, size), p), p), p)


# --------------------------------------------------------------------------------------------------------------
# Device: torch, a batch at a time, float in [0, 1]
# --------------------------------------------------------------------------------------------------------------


def _cubic(t, a: float = -0.75):
    t = t.abs()
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return (t <= 1) * near + ((t > 1) & (t < 2)) * far


def _resample_matrix(start, length, n_in: int, n_out: int, area):
    """[B, n_out, n_in]: the linear map of ``cv2.resize`` of the box [start, start + length) of a row of n_in
    pixels to n_out pixels, per sample: INTER_AREA (fractional pixel coverage) where ``area``, else INTER_CUBIC
    (a = -0.75, half-pixel centres, taps clamped to the box as cv2 sees only the crop)."""
    import torch

    dev, dt = start.device, start.dtype
    scale = (length / n_out).view(-1, 1)
    j = torch.arange(n_out, device=dev, dtype=dt).view(1, -1)
    # cubic: taps floor(fx) - 1 .. + 2 around fx = (j + 0.5) * scale - 0.5 (box coordinates)
    fx = (j + 0.5) * scale - 0.5
    base = torch.floor(fx)
    taps = base.unsqueeze(-1) + torch.arange(-1, 3, device=dev, dtype=dt)  # [B, n_out, 4]
    w = _cubic(fx.unsqueeze(-1) - taps)
    idx = taps.clamp(min=0).minimum((length - 1).view(-1, 1, 1)) + start.view(-1, 1, 1)
    cubic = torch.zeros(start.shape[0], n_out, n_in, device=dev, dtype=dt)
    cubic.scatter_add_(2, idx.long().clamp(0, n_in - 1), w)
    # area: coverage of input pixel [i, i + 1) by output pixel [lo, lo + scale), over scale
    lo = start.view(-1, 1) + j * scale
    i = torch.arange(n_in, device=dev, dtype=dt).view(1, 1, -1)
    cover = (torch.minimum(lo.unsqueeze(-1) + scale.unsqueeze(-1), i + 1) - torch.maximum(lo.unsqueeze(-1), i))
    area_m = cover.clamp(min=0) / scale.unsqueeze(-1)
    return torch.where(area.view(-1, 1, 1), area_m, cubic)


def crop_resize_torch(x, p, size: int):
    """x float [B, 3, H, W], p [B, N_PARAMS] → [B, 3, size, size]: each box resampled exactly as
    :func:`crop_resize_cpu` does (cv2's cubic or area weights, as two batched matrix products), flips folded in."""
    import torch

    _, _, H, W = x.shape
    y0, x0, h, w = p[:, Y0], p[:, X0], p[:, BOX_H], p[:, BOX_W]
    area = torch.minimum(h, w) > size
    my = _resample_matrix(y0, h, H, size, area)
    mx = _resample_matrix(x0, w, W, size, area)
    mx = torch.where((p[:, FLIP] > 0).view(-1, 1, 1), mx.flip(1), mx)
    out = torch.matmul(torch.matmul(my.unsqueeze(1), x), mx.transpose(1, 2).unsqueeze(1))
    return out.clamp_(0, 1)


def _gray_t(x):
    return (GRAY_W[0] * x[:, 0] + GRAY_W[1] * x[:, 1] + GRAY_W[2] * x[:, 2]).unsqueeze(1)


def _rgb2hsv(x):  # torchvision's _rgb2hsv, batched
    import torch

    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    crd = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / crd, (maxc - g) / crd, (maxc - b) / crd
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return h, s, maxc


def _hsv2rgb(h, s, v):
    """HSV → RGB (torchvision's _hsv2rgb in closed form: channel n of (5, 3, 1) is v - v·s·clamp(min(k, 4 - k), 0, 1)
    with k = (n + 6h) mod 6), without the [B, 3, 6, H, W] select tensor."""
    import torch

    h6, vs = h * 6.0, v * s
    out = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(h6 + n, 6.0)
        out.append(v - vs * torch.minimum(k, 4.0 - k).clamp(0, 1))
    return torch.stack(out, 1)


def _colour_op_t(op: int, x, f):
    f4 = f.view(-1, 1, 1, 1)
    if op == 0:
        return (x * f4).clamp(0, 1)
    if op == 1:
        mean = _gray_t(x).mean(dim=(1, 2, 3), keepdim=True)
        return (f4 * x + (1 - f4) * mean).clamp(0, 1)
    if op == 2:
        return (f4 * x + (1 - f4) * _gray_t(x)).clamp(0, 1)
    h, s, v = _rgb2hsv(x)
    import torch

    h = torch.remainder(h + f.view(-1, 1, 1), 1.0)
    return _hsv2rgb(h, s, v)


def colour_torch(x, p):
    """ColorJitter (per-sample factors and order) then grayscale, on float [B, 3, S, S]."""
    import torch

    jit = p[:, JITTER] > 0
    order = p[:, ORDER:ORDER + 4].long()
    for pos in range(4):
        for op in range(4):
            idx = torch.nonzero(jit & (order[:, pos] == op)).flatten()
            if idx.numel():
                x[idx] = _colour_op_t(op, x[idx], p[idx, BRIGHT + op])
    return torch.where((p[:, GRAY] > 0).view(-1, 1, 1, 1), _gray_t(x).expand_as(x), x)


def blur_torch(x, p):
    """GaussianBlur (kernel 9, per-sample sigma, reflect-101 border) where BLUR is set; one grouped conv pair."""
    import torch
    import torch.nn.functional as F

    B, C, S, _ = x.shape
    r = BLUR_KERNEL // 2
    t = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-(t.view(1, -1) ** 2) / (2 * p[:, SIGMA].view(-1, 1) ** 2))
    k = k / k.sum(1, keepdim=True)
    delta = (t == 0).to(x.dtype).expand_as(k)
    k = torch.where((p[:, BLUR] > 0).view(-1, 1), k, delta).repeat_interleave(C, 0)  # [B*C, 9]
    y = F.pad(x.reshape(1, B * C, S, S), (r, r, r, r), mode="reflect")
    y = F.conv2d(y, k.view(B * C, 1, 1, -1), groups=B * C)
    y = F.conv2d(y, k.view(B * C, 1, -1, 1), groups=B * C)
    return y.view(B, C, S, S)


def solarize_torch(x, p):
    import torch

    on = (p[:, SOLAR] > 0).view(-1, 1, 1, 1) & (x >= (128 - 0.5) / 255)
    return torch.where(on, 1 - x, x)


def apply_torch(x, p, size: int):
    """Crops of a batch: x float [B, 3, H, W] in [0, 1], p [B, N_PARAMS] → float [B, 3, size, size] in [0, 1]."""
    return solarize_torch(blur_torch(colour_torch(crop_resize_torch(x, p, size), p), p), p)


def augment_on_device(images, params, recipes: list[CropRecipe], n_global: int, device=None):
    """The training device's half of ``crops.on_device``: uint8 images [B, H, W, 3] (decoded by the data workers)
    and their parameter rows [B, K, N_PARAMS] → (global crops [B, G, 3, S, S], local crops [B, L, 3, s, s] or
    None), float32, ImageNet-normalised, on ``device``."""
    import torch

    from reddino.data.images import IMAGENET_MEAN, IMAGENET_STD

    device = device if device is not None else images.device
    x = images.to(device, non_blocking=True).permute(0, 3, 1, 2).to(torch.float32).div_(255)
    p = params.to(device, non_blocking=True).to(torch.float32)
    mean = torch.as_tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.as_tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    crops = [(apply_torch(x, p[:, k], r.size) - mean) / std for k, r in enumerate(recipes)]
    local = torch.stack(crops[n_global:], 1) if len(crops) > n_global else None
    return torch.stack(crops[:n_global], 1), local
