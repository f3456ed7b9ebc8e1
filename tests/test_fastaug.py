"""fastaug: the DINOv2 recipe as explicit parameters equals the official torchvision recipe in distribution (per op,
fixed seeds), and the device path (torch, batched) equals the CPU path (cv2) per pixel up to uint8 rounding.

Tolerances (stated once, in uint8 levels of a 0-255 image unless said otherwise):
* parameter draws vs torchvision: frequencies within 4 binomial sigmas; crop area / log-aspect quantiles within 0.03.
* per-op output vs torchvision on the same input and factors: bicubic crop mean |Δ| < 1.5 (cv2's a = -0.75 kernel
  against PIL's -0.5); blur < 0.5; solarize exact; colour jitter (random factors, 600 draws each side) across-draw
  mean of each statistic within 2.0 and its spread within 15 %.
* device vs CPU path on the same parameters: mean |Δ| < 0.6 per op (uint8 rounding of the CPU path).
"""

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from reddino.config import CropConfig, MaskConfig
from reddino.data import fastaug as fa
from reddino.data.augment import MultiCropTransform


def _smear(size=96, seed=0) -> np.ndarray:
    """A smear-like RGB image: pink background, darker cells with pale centres, some noise."""
    rng = np.random.default_rng(seed)
    img = np.empty((size, size, 3), np.uint8)
    img[:] = (226, 196, 206)
    for _ in range(6):
        c = tuple(int(v) for v in rng.integers(10, size - 10, 2))
        r = int(rng.integers(7, 13))
        cv2.circle(img, c, r, (196, 96, 120), -1)
        cv2.circle(img, c, r // 3, (222, 170, 186), -1)
    noise = rng.normal(0, 6, img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


CROPS = CropConfig(policy="dinov2", global_crops_size=64, local_crops_size=32, local_crops_number=2,
                   global_crops_scale=(0.32, 1.0), local_crops_scale=(0.05, 0.32))


def _draws(n=2000, size=96, seed=0):
    rng = np.random.default_rng(seed)
    rec = fa.dinov2_recipes(CROPS)
    return np.stack([fa.draw_params(rng, size, size, rec) for _ in range(n)]), rec


def test_parameter_draws_match_torchvision():
    P, rec = _draws()
    n = len(P)
    # crop boxes: torchvision's own get_params on the same image size
    torch.manual_seed(0)
    img = Image.fromarray(_smear())
    for k, scale in ((0, (0.32, 1.0)), (2, (0.05, 0.32))):
        tv = np.array([T.RandomResizedCrop.get_params(img, list(scale), [3 / 4, 4 / 3]) for _ in range(n)], float)
        ours = P[:, k, :4].astype(float)
        for a in (ours, tv):
            assert ((a[:, 0] + a[:, 2] <= 96) & (a[:, 1] + a[:, 3] <= 96)).all()
        area = lambda a: a[:, 2] * a[:, 3] / 96**2  # noqa: E731
        logar = lambda a: np.log(a[:, 3] / a[:, 2])  # noqa: E731
        for f in (area, logar):
            assert np.abs(np.quantile(f(ours), [0.1, 0.5, 0.9]) - np.quantile(f(tv), [0.1, 0.5, 0.9])).max() < 0.03
        centre = lambda a: (a[:, 1] + a[:, 3] / 2) / 96  # noqa: E731
        assert abs(centre(ours).mean() - centre(tv).mean()) < 0.02
    # op probabilities of each crop kind (global 1, global 2, locals)
    expect = {fa.FLIP: [0.5] * 4, fa.JITTER: [0.8] * 4, fa.GRAY: [0.2] * 4, fa.BLUR: [1.0, 0.1, 0.5, 0.5],
              fa.SOLAR: [0.0, 0.2, 0.0, 0.0]}
    for col, ps in expect.items():
        for k, p in enumerate(ps):
            freq = P[:, k, col].mean()
            assert abs(freq - p) <= 4 * np.sqrt(p * (1 - p) / n) + 1e-9, (col, k, freq, p)
    # factors uniform on torchvision's ranges; the order a uniform permutation
    for col, (lo, hi) in {fa.BRIGHT: (0.6, 1.4), fa.CONTRAST: (0.6, 1.4), fa.SAT: (0.8, 1.2), fa.HUE: (-0.1, 0.1),
                          fa.SIGMA: (0.1, 2.0)}.items():
        v = P[:, :, col].ravel()
        assert v.min() >= lo and v.max() <= hi and abs(v.mean() - (lo + hi) / 2) < 0.02 * (hi - lo)
    order = P[:, :, fa.ORDER:fa.ORDER + 4].astype(int)
    assert (np.sort(order, axis=-1) == np.arange(4)).all()
    first = np.bincount(order[..., 0].ravel(), minlength=4) / order[..., 0].size
    assert np.abs(first - 0.25).max() < 0.02


def test_crop_resize_blur_solarize_equal_torchvision_per_op():
    img = _smear()
    pil = Image.fromarray(img)
    P, _ = _draws(n=40, seed=1)
    for k, size in ((0, 64), (2, 32)):
        diffs = []
        for p in P[:, k]:
            y0, x0, h, w = (int(v) for v in p[:4])
            tv = np.asarray(TF.resized_crop(pil, y0, x0, h, w, [size, size], T.InterpolationMode.BICUBIC))
            p = p.copy()
            p[fa.FLIP] = 0
            diffs.append(np.abs(fa.crop_resize_cpu(img, p, size).astype(float) - tv).mean())
        assert np.mean(diffs) < 1.2, (k, np.mean(diffs))
    for sigma in (0.1, 0.7, 2.0):
        p = np.zeros(fa.N_PARAMS, np.float32)
        p[fa.BLUR], p[fa.SIGMA] = 1, sigma
        tv = np.asarray(TF.gaussian_blur(pil, [9, 9], [sigma, sigma]))
        assert np.abs(fa.blur_cpu(img, p).astype(float) - tv).mean() < 0.5
    p = np.zeros(fa.N_PARAMS, np.float32)
    p[fa.SOLAR] = 1
    assert np.array_equal(fa.solarize_cpu(img, p), np.asarray(TF.solarize(pil, 128)))


def _stats(x: np.ndarray) -> np.ndarray:
    """Per-image statistics that colour jitter moves: channel means, contrast, saturation."""
    x = x.astype(float)
    mx, mn = x.max(-1), x.min(-1)
    return np.array([*x.mean((0, 1)), x.std(), (mx - mn).mean()])


def test_colour_jitter_and_grayscale_equal_torchvision_in_distribution():
    img = _smear(64, seed=2)
    pil = Image.fromarray(img)
    n = 600
    torch.manual_seed(0)
    tv_colour = T.Compose([T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), T.RandomGrayscale(p=0.2)])
    theirs = np.stack([_stats(np.asarray(tv_colour(pil))) for _ in range(n)])
    P, _ = _draws(n=n, seed=3)
    ours = np.stack([_stats(fa.colour_cpu(img, p)) for p in P[:, 0]])
    se = np.sqrt(ours.var(0) / n + theirs.var(0) / n)  # standard error of the difference of the means
    assert (np.abs(ours.mean(0) - theirs.mean(0)) < 4 * se).all(), (ours.mean(0), theirs.mean(0), se)
    ratio = ours.std(0) / theirs.std(0)
    assert (np.abs(ratio - 1) < 0.15).all(), ratio
    # each jitter op alone, at fixed factors, equals torchvision's on PIL to ~1 level
    for op, f, fn in ((0, 1.3, TF.adjust_brightness), (1, 0.7, TF.adjust_contrast), (2, 1.2, TF.adjust_saturation),
                      (3, 0.06, TF.adjust_hue)):
        ref = np.asarray(fn(pil, f)).astype(float)
        assert np.abs(fa._COLOUR_OPS[op](img, f).astype(float) - ref).mean() < 1.2, op


def _chula_or_smears(n=8):
    return [_smear(96, seed=s) for s in range(n)]


def test_device_path_equals_cpu_path_per_op():
    imgs = _chula_or_smears()
    P, rec = _draws(n=len(imgs), seed=4)
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255
    to_u8 = lambda t: (t.permute(0, 2, 3, 1) * 255).numpy()  # noqa: E731
    for k, r in enumerate(rec):
        p = torch.from_numpy(P[:, k])
        cpu = np.stack([fa.crop_resize_cpu(im, P[i, k], r.size) for i, im in enumerate(imgs)])
        assert np.abs(cpu - to_u8(fa.crop_resize_torch(x, p, r.size))).mean() < 0.6
        xc = torch.from_numpy(cpu).permute(0, 3, 1, 2).float() / 255
        for cpu_op, dev_op in ((fa.colour_cpu, fa.colour_torch), (fa.blur_cpu, fa.blur_torch),
                               (fa.solarize_cpu, fa.solarize_torch)):
            ref = np.stack([cpu_op(c, P[i, k]) for i, c in enumerate(cpu)]).astype(float)
            assert np.abs(ref - to_u8(dev_op(xc.clone(), p))).mean() < 0.6, cpu_op.__name__


def _batch(n=6):
    enc = [cv2.imencode(".png", im[..., ::-1])[1].tobytes() for im in _chula_or_smears(n)]
    return {"image": np.array(enc, dtype=object), "sha256": np.array([f"row{i}" for i in range(n)]),
            "epoch": np.array([0, 0, 0, 1, 1, 1])}


def test_on_device_transform_keeps_masks_and_makes_the_cpu_crops():
    crops = CROPS.model_copy(update={"on_device": True})
    mask = MaskConfig(sample_probability=1.0)
    dev = MultiCropTransform(crops, mask, 8, resize=96, seed=7)(_batch())
    cpu = MultiCropTransform(CROPS, mask, 8, resize=96, seed=7)(_batch())
    assert set(dev) == {"images", "crop_params", "masks", "sha256"}
    assert dev["images"].shape == (6, 96, 96, 3) and dev["images"].dtype == np.uint8
    assert dev["crop_params"].shape == (6, 4, fa.N_PARAMS)
    assert np.array_equal(dev["masks"], cpu["masks"]) and dev["masks"].any()  # iBOT masks unchanged
    g, loc = fa.augment_on_device(torch.from_numpy(dev["images"]), torch.from_numpy(dev["crop_params"]),
                                  fa.dinov2_recipes(crops), 2, "cpu")
    assert g.shape == (6, 2, 3, 64, 64) and loc.shape == (6, 2, 3, 32, 32)
    # same parameters as the CPU path (the same row seeds), so the same crops up to uint8 rounding
    assert np.abs(g.numpy() - cpu["global_crops"]).mean() < 0.6 / 255 / 0.224
    assert np.abs(loc.numpy() - cpu["local_crops"]).mean() < 0.6 / 255 / 0.224


def test_on_device_config_errors():
    with pytest.raises(ValueError, match="on_device supports the dinov2 and none"):
        CropConfig(policy="rbc", on_device=True)
    with pytest.raises(ValueError, match="needs data.resize"):
        MultiCropTransform(CROPS.model_copy(update={"on_device": True}), MaskConfig(), 8, resize=None)


def test_decode_for_size_png_same_pixels_and_jpeg_decoded_reduced():
    from reddino.data.images import decode_for_size, decode_image, encode_image, resize_square

    img = _smear(96)
    assert np.array_equal(decode_for_size(encode_image(img, "png"), 96), img)  # libspng or cv2: the same pixels
    big = cv2.resize(_smear(96, seed=5), (400, 400), interpolation=cv2.INTER_CUBIC)
    jpg = encode_image(big, "jpeg")
    small = decode_for_size(jpg, 96)
    assert 96 <= min(small.shape[:2]) < 400  # DCT-scaled (1/4 here), never below the size the crops need
    ref = resize_square(decode_image(jpg), 96)
    assert np.abs(resize_square(small, 96).astype(float) - ref).mean() < 2.0
