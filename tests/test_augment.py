import cv2
import numpy as np
import pytest

from reddino.config import CropConfig, MaskConfig
from reddino.data.images import IMAGENET_MEAN, IMAGENET_STD
from reddino.data.augment import (
    POLICIES, POLICY_VERSIONS, RBC_TRANSFORMS, MultiCropTransform, block_mask,
    build_policy, sample_masks,
)


def _png_batch(n=3, size=64, seed=0):
    rng = np.random.default_rng(seed)
    imgs = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]
    enc = [cv2.imencode(".png", im)[1].tobytes() for im in imgs]
    return {"image": np.array(enc, dtype=object), "sha256": np.array([f"sha{i}" for i in range(n)])}


def _crops(**kw):
    base = dict(global_crops_size=28, local_crops_size=14, local_crops_number=2, rbc_pick=2)
    return CropConfig(**{**base, **kw})


def test_policies_registry():
    assert set(POLICIES) == set(POLICY_VERSIONS) == {"dinov2", "rbc", "cell", "none"}
    assert len(RBC_TRANSFORMS) == 33
    with pytest.raises(ValueError, match="cell, dinov2, none, rbc"):
        build_policy(CropConfig.model_construct(**{**CropConfig().model_dump(), "policy": "fancy"}))


@pytest.mark.parametrize("policy", ["rbc", "dinov2", "cell", "none"])
@pytest.mark.parametrize("n_local", [0, 1, 2])
def test_shapes_and_dtypes(policy, n_local):
    t = MultiCropTransform(_crops(policy=policy, local_crops_number=n_local), MaskConfig(), 14, resize=56)
    out = t(_png_batch())
    assert out["global_crops"].shape == (3, 2, 3, 28, 28) and out["global_crops"].dtype == np.float32
    assert out["masks"].shape == (3, 2, 4) and out["masks"].dtype == bool
    assert list(out["sha256"]) == ["sha0", "sha1", "sha2"]
    if n_local == 0:
        assert "local_crops" not in out
    else:
        assert out["local_crops"].shape == (3, n_local, 3, 14, 14) and out["local_crops"].dtype == np.float32
    assert np.isfinite(out["global_crops"]).all()


def test_normalisation_and_rgb_order():
    red = np.zeros((56, 56, 3), np.uint8)
    red[..., 0] = 255  # RGB red
    batch = {"image": np.array([cv2.imencode(".png", red[..., ::-1])[1].tobytes()], dtype=object)}
    out = MultiCropTransform(_crops(policy="none", local_crops_number=0), MaskConfig(), 14, resize=56)(batch)
    g = out["global_crops"][0, 0]
    expected = (np.array([1.0, 0.0, 0.0]) - IMAGENET_MEAN) / IMAGENET_STD
    assert np.allclose(g.mean(axis=(1, 2)), expected, atol=1e-4)
    assert "sha256" not in out


def test_deterministic_per_seed_epoch_sha():
    batch = _png_batch()
    make = lambda seed: MultiCropTransform(_crops(policy="rbc"), MaskConfig(), 14, resize=56, seed=seed)  # noqa: E731
    a, b = make(0)(batch), make(0)(batch)
    for k in ("global_crops", "local_crops", "masks"):
        assert np.array_equal(a[k], b[k])
    # a row's augmentation depends on its sha, not on its position in the batch
    rev = {k: v[::-1] for k, v in batch.items()}
    c = make(0)(rev)
    assert np.array_equal(c["global_crops"][::-1], a["global_crops"])
    assert not np.array_equal(make(1)(batch)["global_crops"], a["global_crops"])
    assert not np.array_equal(make(0)(batch, epoch=1)["global_crops"], a["global_crops"])
    with_col = make(0)({**batch, "epoch": np.ones(3, dtype=np.int64)})
    assert np.array_equal(with_col["global_crops"], make(0)(batch, epoch=1)["global_crops"])


def test_block_mask_exact_count():
    rng = np.random.default_rng(0)
    for n in (0, 1, 5, 32, 64):
        m = block_mask(rng, (8, 8), n)
        assert m.shape == (8, 8) and m.sum() == n


def test_mask_ratio_and_probability():
    rng = np.random.default_rng(0)
    cfg = MaskConfig(sample_probability=0.5, ratio_min=0.1, ratio_max=0.5)
    m = sample_masks(rng, 2000, (16, 16), cfg)
    masked = m.any(axis=1)
    assert 0.45 < masked.mean() < 0.55
    frac = m[masked].mean(axis=1)
    assert frac.min() >= 0.1 - 1 / 256 and frac.max() <= 0.5 + 1 / 256
    assert 0.27 < frac.mean() < 0.33
    assert not sample_masks(rng, 10, (4, 4), MaskConfig(sample_probability=0.0)).any()


def test_masks_are_blocky():
    """Block masks cluster: masked cells have more masked 4-neighbours than random masks would."""
    rng = np.random.default_rng(1)
    m = block_mask(rng, (16, 16), 77)
    pad = np.pad(m, 1)
    neigh = pad[:-2, 1:-1].astype(int) + pad[2:, 1:-1] + pad[1:-1, :-2] + pad[1:-1, 2:]
    assert neigh[m].mean() > 2.0  # random 30% masks give ~1.2


def test_eval_preprocessing_resizes_and_normalises_like_training():
    from reddino.data.images import resize_square
    from reddino.data.images import to_rgb_list
    from reddino.features.extract import preprocess

    out = preprocess([np.full((50, 40, 3), 255, np.uint8)], 28)
    assert out.shape == (1, 3, 28, 28) and out.dtype == np.float32
    assert np.allclose(out[0, :, 0, 0], (1 - IMAGENET_MEAN) / IMAGENET_STD, atol=1e-5)
    assert preprocess(to_rgb_list([np.zeros((30, 30), np.uint8)]), 28).shape == (1, 3, 28, 28)
    # one side shrinks, the other grows: area interpolation (no aliasing), as in training
    img = np.random.default_rng(0).integers(0, 256, (60, 20, 3), dtype=np.uint8)
    assert np.array_equal(resize_square(img, 28), cv2.resize(img, (28, 28), interpolation=cv2.INTER_AREA))


def test_every_rbc_transform_is_seeded():
    """All 33 pixel transforms at once: any use of global RNG state would break reproducibility."""
    crops = _crops(policy="rbc", rbc_pick=33, rbc_p=1.0, local_crops_number=0)
    batch = _png_batch(n=2)
    a = MultiCropTransform(crops, MaskConfig(), 14, resize=56)(batch)
    np.random.seed(123)
    b = MultiCropTransform(crops, MaskConfig(), 14, resize=56)(batch)
    assert np.array_equal(a["global_crops"], b["global_crops"])


def test_uint8_output_normalised_on_device_equals_float_output():
    import torch

    from reddino.data.images import normalize_on_device

    crops = _crops(policy="rbc", local_crops_number=2)
    batch = _png_batch()
    ref = MultiCropTransform(crops, MaskConfig(), 14, resize=56)(batch)
    raw = MultiCropTransform(crops, MaskConfig(), 14, resize=56, normalize=False)(batch)
    assert raw["global_crops"].dtype == np.uint8 and raw["global_crops"].shape == (3, 2, 28, 28, 3)
    assert raw["local_crops"].shape == (3, 2, 14, 14, 3)
    assert np.array_equal(raw["masks"], ref["masks"])
    for k in ("global_crops", "local_crops"):
        got = normalize_on_device(torch.from_numpy(raw[k]))
        assert got.dtype == torch.float32 and tuple(got.shape) == ref[k].shape
        np.testing.assert_allclose(got.numpy(), ref[k], rtol=0, atol=1e-6)


def _elongation(img: np.ndarray) -> float:
    """Ratio of the principal axes of the dark blob (the 'cell')."""
    ys, xs = np.nonzero(img[..., 0] < 128)
    ev = np.linalg.eigvalsh(np.cov(np.stack([xs, ys]).astype(float)))
    return float(np.sqrt(ev[1] / ev[0]))


@pytest.mark.parametrize("policy, round_", [("cell", True), ("none", False)])
def test_cell_policy_keeps_a_round_cell_round(policy, round_):
    # An ovalocyte and a normal cell differ by aspect ratio: the cell policy must not make one from the other,
    # while RandomResizedCrop's default aspect jitter does.
    img = np.full((80, 80, 3), 220, np.uint8)
    cv2.circle(img, (40, 40), 20, (60, 60, 60), -1)
    t = MultiCropTransform(CropConfig(policy=policy, global_crops_size=56, global_crops_scale=(0.7, 0.7),
                                      global_crops_number=1, local_crops_number=0), MaskConfig(), 14, resize=80,
                           normalize=False)
    crops = t({"image": [img] * 30, "sha256": np.array([f"s{i}" for i in range(30)])})["global_crops"][:, 0]
    worst = max(_elongation(c) for c in crops)
    assert (worst < 1.08) if round_ else (worst > 1.15)


@pytest.mark.parametrize("colour, grey_expected", [("mild", False), ("strong", True)])
def test_cell_policy_strong_colour_turns_some_crops_grey(colour, grey_expected):
    # Strong colour jitter hides a stain's colour from the other views (20 % grayscale); mild never greys a crop.
    t = MultiCropTransform(_crops(policy="cell", cell_colour=colour, local_crops_number=0), MaskConfig(), 14,
                           resize=56, normalize=False)
    crops = t(_png_batch(n=40))["global_crops"].astype(np.int16)  # (n, 2, H, W, 3) uint8, channels-last
    grey = (np.abs(crops[..., 0] - crops[..., 1]).max(axis=(2, 3)) <= 1) & (
        np.abs(crops[..., 1] - crops[..., 2]).max(axis=(2, 3)) <= 1)
    assert grey.any() == grey_expected


def test_importing_the_augmentations_asks_no_server_and_loads_no_torch():
    # A Ray Data worker imports this module: albumentations' own import would ask PyPI for its latest version
    # (a network call at run time) and import torch (~2 s per worker process, for no tensor).
    import os
    import subprocess
    import sys

    code = ("import sys, urllib.request\n"
            "calls = []\n"
            "real = urllib.request.build_opener\n"
            "urllib.request.build_opener = lambda *a, **k: calls.append(a) or real(*a, **k)\n"
            "from reddino.data.augment import MultiCropTransform\n"
            "import albumentations.pytorch\n"  # still importable on purpose
            "print(len(calls), sorted(m for m in ('torch', 'albumentations.pytorch') if m in sys.modules))\n")
    env = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    out = subprocess.run([sys.executable, "-c", code.replace("import albumentations.pytorch\n", "")], env=env,
                         capture_output=True, text=True, check=True).stdout.split("\n")[0]
    assert out == "0 []"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.startswith("0 ['albumentations.pytorch', 'torch']")
