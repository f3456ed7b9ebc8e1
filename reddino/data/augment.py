"""Multi-crop augmentation and iBOT block masks, on CPU inside Ray Data ``map_batches`` (numpy in, numpy out).

Policies (``crops.policy``), each a builder ``CropConfig → CropPipelines`` (albumentations) or ``→ list[CropRecipe]``
(explicit parameters, :mod:`reddino.data.fastaug`) in :data:`POLICIES`:

* ``dinov2``: the DINOv2 recipe (Oquab et al. 2024, after BYOL/DINO): RandomResizedCrop (bicubic),
  HorizontalFlip 0.5, ColorJitter(0.4, 0.4, 0.2, 0.1) p=0.8, ToGray p=0.2, GaussianBlur (p=1.0 on global
  crop 1; 0.1 + Solarize 0.2 on global crop 2; 0.5 on local crops). Explicit parameters drawn as torchvision
  draws them, applied with cv2 (:mod:`reddino.data.fastaug`), or on the training device (``crops.on_device``).
* ``rbc``: RedDino (Zedda et al., MICCAI 2025): RandomResizedCrop → ``rbc_pick`` of 33 pixel-level
  albumentations transforms (each with p=``rbc_p``) → HorizontalFlip, VerticalFlip, RandomRotate90 (each
  p=``flip_rotate_p``). The costliest (RandomFog, GlassBlur, RandomSunFlare, FancyPCA, RandomRotate90, GaussNoise,
  RandomShadow, ISONoise, MotionBlur, RingingOvershoot, and the crop) run as :mod:`reddino.data.rbcfast`'s cheaper
  equals: same draws, same pixels (ISONoise: equal in distribution), called through :func:`reddino.data.rbcfast.run`
  (which runs the flips and rotation as one step).
* ``cell``: ours, for single-cell crops: the cues that name an RBC class (size, outline, aspect ratio,
  central pallor, colour) survive, the ones that do not (orientation, position, focus, noise, stain
  drift) vary. Square crops (aspect 1) at ``*_crops_scale`` → any-angle rotation (reflect border) → flips →
  mild blur / noise → mild brightness-contrast / hue-saturation, or with ``cell_colour=strong`` DINO's colour
  jitter + grayscale.
* ``none``: crops only (also fastaug, so ``crops.on_device`` runs it too).

All end with ImageNet mean/std normalisation (done once per batch, vectorised) and stay RGB throughout.
Randomness is a pure function of (seed, epoch, row sha256), so a resumed run sees the same augmentations.

Gram-teacher crops (DINOv3's higher-resolution Gram teacher, ``gram_crops_size``): each global crop is cut at that
size with the policy's geometric transforms (crop, flips, rotations), which is the Gram teacher's view (no
distortions); the student's global crop is that view resized bicubically (antialiased) to the global size, then
given the policy's pixel transforms. So both see the same region, the teacher at more pixels. The geometric
transforms then run before the pixel ones (which commute with them up to direction-symmetric noise).
"""

from __future__ import annotations

import hashlib
import random
import warnings
from dataclasses import dataclass
from typing import Any, Callable

from reddino.data._albumentations import A
import cv2
import numpy as np
from PIL import Image

from reddino.config import POLICY_VERSIONS, CropConfig, MaskConfig  # noqa: F401 (POLICY_VERSIONS: re-exported)
from reddino.data.fastaug import (
    N_PARAMS, CropRecipe, apply_cpu, blur_cpu, colour_cpu, crop_resize_cpu, dinov2_recipes, draw_params, none_recipes,
    solarize_cpu,
)
from reddino.data.images import decode_for_size, normalize_chw, resize_square
from reddino.data import rbcfast
from reddino.data.rbcfast import FAST


#: Policies made of explicit per-crop parameters (:mod:`reddino.data.fastaug`), which ``crops.on_device`` can run on
#: the training device; the others are albumentations pipelines and run on the CPU.
PARAM_POLICIES = ("dinov2", "none")

#: RedDino's 33 pixel-level transforms (albumentations class names, default arguments).
RBC_TRANSFORMS = (
    "Blur", "CLAHE", "Defocus", "Downscale", "Emboss", "Equalize", "GaussianBlur", "GlassBlur", "MedianBlur",
    "MotionBlur", "RingingOvershoot", "Sharpen", "ChannelShuffle", "ChannelDropout", "ColorJitter", "FancyPCA",
    "HueSaturationValue", "RandomBrightnessContrast", "RGBShift", "RandomGamma", "RandomToneCurve", "InvertImg",
    "Posterize", "Solarize", "GaussNoise", "ISONoise", "MultiplicativeNoise", "ImageCompression", "RandomRain",
    "RandomShadow", "RandomSnow", "RandomSunFlare", "RandomFog",
)  # fmt: skip


@dataclass
class CropPipelines:
    """One albumentations pipeline per global crop (they may differ, as in DINOv2) and one for local crops.
    Pipelines output uint8 RGB crops; normalisation is applied afterwards."""

    global_crops: list[A.Compose]
    local_crops: A.Compose


# --------------------------------------------------------------------------------------------------------------
# Policies
# --------------------------------------------------------------------------------------------------------------


def _compose(transforms: list[Any]) -> A.Compose:
    return A.Compose(transforms, p=1.0, is_check_shapes=False, seed=0)


def _crop(size: int, scale: tuple[float, float], ratio: tuple[float, float] = (3 / 4, 4 / 3),
          fast: bool = False) -> A.RandomResizedCrop:
    return (rbcfast.RandomResizedCrop if fast else A.RandomResizedCrop)(size=(size, size), scale=tuple(scale), ratio=ratio, interpolation=cv2.INTER_CUBIC, p=1.0)


def build_none(crops: CropConfig) -> list[CropRecipe]:
    """Random-resized crops only."""
    return none_recipes(crops)


def build_dinov2(crops: CropConfig) -> list[CropRecipe]:
    """DINOv2's augmentations as explicit per-crop parameters (:mod:`reddino.data.fastaug`: cv2 on the CPU, or
    torch on the training device). With more than two global crops, odd crops use crop 1's blur and even crops
    crop 2's blur + solarize."""
    return dinov2_recipes(crops)


def rbc_pixel_transforms(p: float, fast: bool = True) -> list[A.BasicTransform]:
    """Fresh instances of RedDino's 33 pixel-level transforms, each with probability ``p``; ``fast=False``: all
    albumentations' own (the reference :mod:`reddino.data.rbcfast` is tested and benchmarked against)."""
    return [_rbc_op(name, fast)(p=p) for name in RBC_TRANSFORMS]


def _rbc_op(name: str, fast: bool) -> type[A.BasicTransform]:
    return (FAST if fast else {}).get(name, getattr(A, name))


def build_rbc(crops: CropConfig, fast: bool = True) -> CropPipelines:
    """RedDino's RBC policy: crop → ``rbc_pick`` of 33 pixel transforms → flips / 90° rotations."""

    def pipeline(size: int, scale: tuple[float, float]) -> A.Compose:
        ts: list[Any] = [_crop(size, scale, fast=fast)]
        if crops.rbc_pick > 0:
            n = min(crops.rbc_pick, len(RBC_TRANSFORMS))
            ts.append(A.SomeOf(rbc_pixel_transforms(crops.rbc_p, fast), n=n, replace=False, p=1.0))
        fr = crops.flip_rotate_p
        ts += [A.HorizontalFlip(p=fr), A.VerticalFlip(p=fr), _rbc_op("RandomRotate90", fast)(p=fr)]
        return _compose(ts)

    globals_ = [pipeline(crops.global_crops_size, crops.global_crops_scale) for _ in range(crops.global_crops_number)]
    return CropPipelines(globals_, pipeline(crops.local_crops_size, crops.local_crops_scale))


def build_cell(crops: CropConfig) -> CropPipelines:
    """Single-cell policy (see the module docstring). RandomResizedCrop's default aspect jitter (3/4-4/3)
    would turn a round cell into an ovalocyte, and colour transforms like ChannelShuffle or InvertImg erase
    hypochromia, so neither is used."""

    def pipeline(size: int, scale: tuple[float, float]) -> A.Compose:
        return _compose([
            A.Rotate(limit=(-180, 180), border_mode=cv2.BORDER_REFLECT_101, interpolation=cv2.INTER_LINEAR, p=1.0),
            _crop(size, scale, ratio=(1.0, 1.0)),
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
            A.GaussianBlur(blur_limit=(3, 3), sigma_limit=(0.1, 1.0), p=0.2),
            A.GaussNoise(std_range=(0.01, 0.04), p=0.2),
            *colour(),
        ])

    def colour() -> list[Any]:
        if crops.cell_colour == "strong":
            return [A.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, p=0.8),
                    A.ToGray(num_output_channels=3, p=0.2)]
        return [A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=0.5),
                A.HueSaturationValue(hue_shift_limit=4, sat_shift_limit=10, val_shift_limit=0, p=0.3)]

    globals_ = [pipeline(crops.global_crops_size, crops.global_crops_scale) for _ in range(crops.global_crops_number)]
    return CropPipelines(globals_, pipeline(crops.local_crops_size, crops.local_crops_scale))


#: ``crops.policy`` name → builder.
POLICIES: dict[str, Callable[[CropConfig], CropPipelines | list[CropRecipe]]] = {
    "dinov2": build_dinov2,
    "rbc": build_rbc,
    "cell": build_cell,
    "none": build_none,
}


def build_policy(crops: CropConfig) -> CropPipelines | list[CropRecipe]:
    if crops.policy not in POLICIES:
        raise ValueError(f"unknown augmentation policy {crops.policy!r}; valid: {', '.join(sorted(POLICIES))}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # albumentations' advisory warnings about defaults
        return POLICIES[crops.policy](crops)


def split_geometry(pipe: A.Compose) -> tuple[A.Compose, A.Compose]:
    """A policy pipeline → (its geometric transforms, its pixel transforms), each in the original order. Geometric
    ones are albumentations ``DualTransform``s (they move pixels: crops, flips, rotations); a nested group must be
    all pixel-level."""
    geom, pixel = [], []
    for t in pipe.transforms:
        if isinstance(t, A.DualTransform):
            geom.append(t)
        elif isinstance(t, A.BaseCompose) and any(isinstance(x, A.DualTransform) for x in t.transforms):
            raise ValueError(f"{type(t).__name__} mixes geometric and pixel transforms: cannot make Gram-teacher crops")
        else:
            pixel.append(t)
    return _compose(geom), _compose(pixel)


# --------------------------------------------------------------------------------------------------------------
# iBOT block masks
# --------------------------------------------------------------------------------------------------------------


def block_mask(
    rng: np.random.Generator,
    grid: tuple[int, int],
    n_masked: int,
    min_block: int = 4,
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
) -> np.ndarray:
    """A bool [H, W] mask with exactly ``n_masked`` True cells, made of random rectangles (BEiT/iBOT/DINOv2
    block masking: area ≥ ``min_block``, log-uniform aspect ratio in ``aspect``). When rectangles stop fitting,
    the remainder is filled with random single cells so the ratio is exact."""
    h, w = grid
    mask = np.zeros((h, w), dtype=bool)
    n_masked = int(min(max(n_masked, 0), h * w))
    count = 0
    log_lo, log_hi = np.log(aspect[0]), np.log(aspect[1])
    while count < n_masked:
        budget = n_masked - count
        added = 0
        for _ in range(10):
            area = rng.uniform(min(min_block, budget), budget)
            ar = np.exp(rng.uniform(log_lo, log_hi))
            bh = int(round(np.sqrt(area * ar)))
            bw = int(round(np.sqrt(area / ar)))
            if bh < 1 or bw < 1 or bh > h or bw > w:
                continue
            top = int(rng.integers(0, h - bh + 1))
            left = int(rng.integers(0, w - bw + 1))
            region = mask[top : top + bh, left : left + bw]
            new = bh * bw - int(region.sum())
            if 0 < new <= budget:
                region[...] = True
                added = new
                break
        if added == 0:
            break
        count += added
    if count < n_masked:
        free = np.flatnonzero(~mask.ravel())
        mask.ravel()[rng.choice(free, size=n_masked - count, replace=False)] = True
    return mask


def sample_masks(rng: np.random.Generator, n_crops: int, grid: tuple[int, int], cfg: MaskConfig) -> np.ndarray:
    """bool [n_crops, H·W]: each crop is masked with probability ``sample_probability`` at a ratio drawn
    uniformly from [ratio_min, ratio_max]."""
    n = grid[0] * grid[1]
    out = np.zeros((n_crops, n), dtype=bool)
    for i in range(n_crops):
        if cfg.sample_probability > 0 and rng.random() < cfg.sample_probability:
            ratio = rng.uniform(cfg.ratio_min, cfg.ratio_max)
            out[i] = block_mask(rng, grid, int(round(ratio * n))).ravel()
    return out


# --------------------------------------------------------------------------------------------------------------
# The Ray Data batch transform
# --------------------------------------------------------------------------------------------------------------


class MultiCropTransform:
    """Ray Data batch UDF: ``{"image": bytes[B], "sha256": str[B]?, "epoch": int[B]?}`` →

    * ``global_crops`` float32 [B, G, 3, S, S]
    * ``local_crops`` float32 [B, L, 3, s, s] — the key is **omitted** when L = 0
    * ``masks`` bool [B, G, (S // patch_size)²] (iBOT block masks)
    * ``gram_crops`` [B, G, 3, T, T] with ``gram_crops_size`` T: the Gram teacher's views of the global crops
      (see the module docstring), normalised like the others
    * ``sha256`` passed through when given.

    ``normalize=False`` leaves the crops as they come out of the pipelines, uint8 [B, G, S, S, 3] (RGB,
    channels last): a quarter of the bytes to move, and the normalisation happens on the training device
    instead, with :func:`reddino.data.images.normalize_on_device`.

    ``on_device=True`` (``crops.on_device``; policies in :data:`PARAM_POLICIES`) makes no crops: it returns the
    decoded, resized images ``images`` uint8 [B, R, R, 3] and every crop's random parameters ``crop_params``
    float32 [B, G + L, N_PARAMS] (plus ``masks``, ``sha256``); :func:`reddino.data.fastaug.augment_on_device`
    makes the crops on the training device from them, equal in distribution to the CPU path.

    Each row's randomness (crops, pixel transforms, masks) is seeded from (``seed``, epoch, sha256); the epoch
    comes from an ``epoch`` column, else the ``epoch`` argument of the call, else ``self.epoch``
    (:meth:`set_epoch`). Without a ``sha256`` column the hash of the image bytes is used.
    """

    def __init__(
        self,
        crops: CropConfig,
        mask: MaskConfig,
        patch_size: int,
        resize: int | None,
        seed: int = 0,
        epoch: int = 0,
        normalize: bool = True,
        gram_crops_size: int | None = None,
        on_device: bool | None = None,
    ) -> None:
        self.normalize = bool(normalize)
        self.crops = crops
        self.mask = mask
        self.patch_size = int(patch_size)
        self.resize = resize
        self.seed = int(seed)
        self.epoch = int(epoch)
        self.on_device = bool(crops.on_device if on_device is None else on_device)
        self.gram_size = int(gram_crops_size) if gram_crops_size else None
        self.pipelines = build_policy(crops)
        self.recipes = self.pipelines if isinstance(self.pipelines, list) else None
        self.gram_split = None
        if self.on_device and self.recipes is None:
            raise ValueError(f"crops.on_device runs the {' and '.join(PARAM_POLICIES)} policies on the training "
                             f"device; {crops.policy!r} is an albumentations pipeline and runs on the CPU")
        if self.on_device and not resize:
            raise ValueError("crops.on_device needs data.resize (the images of a batch are stacked at one size)")
        if self.on_device and self.gram_size:
            raise ValueError("crops.on_device does not make Gram-teacher crops yet: set crops.on_device=false")
        if self.gram_size and self.recipes is None:
            # global crops cut at the Gram teacher's size, then split into geometry + pixel transforms
            self.pipelines = build_policy(crops.model_copy(update={"global_crops_size": self.gram_size}))
            self.gram_split = [split_geometry(p) for p in self.pipelines.global_crops]
        side = crops.global_crops_size // self.patch_size
        self.grid = (side, side)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def row_seed(self, key: str, epoch: int) -> int:
        digest = hashlib.blake2b(f"{self.seed}|{epoch}|{key}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little")

    def _apply(self, pipe: A.Compose, img: np.ndarray, rng: np.random.Generator, py: random.Random) -> np.ndarray:
        rbcfast.set_random_state(pipe, rng, py)
        return rbcfast.run(pipe, img)  # pipe(image=img)["image"]: same draws and pixels, less plumbing

    def __call__(self, batch: dict[str, np.ndarray], epoch: int | None = None) -> dict[str, np.ndarray]:
        images = batch["image"]
        n = len(images)
        shas = batch.get("sha256")
        epochs = batch.get("epoch")
        c = self.crops
        G, L, S, s = c.global_crops_number, c.local_crops_number, c.global_crops_size, c.local_crops_size
        if self.on_device:
            decoded = np.empty((n, self.resize, self.resize, 3), dtype=np.uint8)
            params = np.empty((n, G + L, N_PARAMS), dtype=np.float32)
        else:
            g_u8 = np.empty((n, G, S, S, 3), dtype=np.uint8)
            l_u8 = np.empty((n, L, s, s, 3), dtype=np.uint8)
        masks = np.zeros((n, G, self.grid[0] * self.grid[1]), dtype=bool)
        T = self.gram_size
        t_u8 = np.empty((n, G, T, T, 3), dtype=np.uint8) if T else None
        default_epoch = self.epoch if epoch is None else int(epoch)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            for r in range(n):
                item = images[r]
                img = resize_square(decode_for_size(item, self.resize), self.resize)
                if shas is not None:
                    key = str(shas[r])
                else:
                    raw = item.tobytes() if isinstance(item, np.ndarray) else bytes(item)
                    key = hashlib.sha256(raw).hexdigest()
                ep = int(epochs[r]) if epochs is not None else default_epoch
                seed = self.row_seed(key, ep)
                rng = np.random.default_rng(seed)
                if self.recipes is not None:
                    p = draw_params(rng, img.shape[0], img.shape[1], self.recipes)
                    if self.on_device:
                        decoded[r], params[r] = img, p
                    else:
                        for k, recipe in enumerate(self.recipes):
                            if k < G and T:  # the Gram teacher's view: the geometry only, at its size
                                t_u8[r, k] = crop_resize_cpu(img, p[k], T)
                                small = np.asarray(Image.fromarray(t_u8[r, k]).resize((S, S), Image.BICUBIC))
                                crop = solarize_cpu(blur_cpu(colour_cpu(small, p[k]), p[k]), p[k])
                            else:
                                crop = apply_cpu(img, p[k], recipe.size)
                            if k < G:
                                g_u8[r, k] = crop
                            else:
                                l_u8[r, k - G] = crop
                else:
                    py = random.Random(seed)
                    if self.gram_split is None:
                        for i, pipe in enumerate(self.pipelines.global_crops):
                            g_u8[r, i] = self._apply(pipe, img, rng, py)
                    else:
                        for i, (geom, pixel) in enumerate(self.gram_split):
                            t_u8[r, i] = self._apply(geom, img, rng, py)
                            small = np.asarray(Image.fromarray(t_u8[r, i]).resize((S, S), Image.BICUBIC))
                            g_u8[r, i] = self._apply(pixel, small, rng, py)
                    for j in range(L):
                        l_u8[r, j] = self._apply(self.pipelines.local_crops, img, rng, py)
                masks[r] = sample_masks(np.random.default_rng([seed, 1]), G, self.grid, self.mask)
        out: dict[str, np.ndarray] = {"masks": masks}
        if self.on_device:
            out.update(images=decoded, crop_params=params)
        else:
            finish = normalize_chw if self.normalize else (lambda x: x)
            out["global_crops"] = finish(g_u8)
            if L > 0:
                out["local_crops"] = finish(l_u8)
            if T:
                out["gram_crops"] = finish(t_u8)
        if shas is not None:
            out["sha256"] = np.asarray(shas)
        return out
