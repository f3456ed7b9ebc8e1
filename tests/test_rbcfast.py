"""reddino.data.rbcfast: each cheaper op gives albumentations' pixels from albumentations' draws."""

import random

import albumentations as A
import cv2
import numpy as np
import pytest

from reddino.config import CropConfig, MaskConfig
from reddino.data import rbcfast
from reddino.data.augment import MultiCropTransform, build_cell, build_rbc


def _smear(size: int, seed: int) -> np.ndarray:
    """A smear-like RGB image: pale background, reddish discs with pale centres, noise."""
    rng = np.random.default_rng(seed)
    img = np.full((size, size, 3), (225, 205, 215), np.uint8)
    for _ in range(size // 12):
        c, r = tuple(int(v) for v in rng.integers(0, size, 2)), int(rng.integers(size // 16, size // 7))
        cv2.circle(img, c, r, tuple(int(v) for v in rng.integers(120, 200, 3)), -1)
        cv2.circle(img, c, r // 3, (200, 170, 185), -1)
    noisy = img.astype(np.int16) + rng.integers(-12, 13, img.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def _run(cls, img: np.ndarray, seed: int, **kw):
    t = cls(p=1.0, **kw)
    t.set_random_state(np.random.default_rng(seed), random.Random(seed))
    out = t(image=img)["image"]
    return out, t.py_random.random(), t.random_generator.random()  # the generators' states after the op


# FancyPCA's default alpha (0.1) moves a smear's pixels by < 0.5 grey level: a larger one tests its colour map.
# Its mean colour is exact here and a float32 running sum there (~1e-4 off), which the large alpha turns into a
# few pixels one grey level apart (none at the default alpha on 24 Chula patches).
_ARGS = {"FancyPCA": {"alpha": 50.0}}
_OFF_BY_ONE = {"FancyPCA": 0.01}  # at most this fraction of values 1 grey level off; all others exact


@pytest.mark.parametrize("name", sorted(set(rbcfast.FAST) - rbcfast.IN_DISTRIBUTION))
@pytest.mark.parametrize("size", [98, 64])
def test_same_pixels_and_draws_as_albumentations(name, size):
    changes = []
    for seed in range(4):
        img = _smear(size, seed)
        fast, fast_py, fast_np = _run(rbcfast.FAST[name], img, seed, **_ARGS.get(name, {}))
        ref, ref_py, ref_np = _run(getattr(A, name), img, seed, **_ARGS.get(name, {}))
        assert fast.dtype == np.uint8 and fast.shape == img.shape
        diff = np.abs(fast.astype(int) - ref)
        assert diff.max() <= (1 if name in _OFF_BY_ONE else 0), f"{name} seed {seed}"
        assert (diff > 0).mean() <= _OFF_BY_ONE.get(name, 0.0), f"{name} seed {seed}"
        assert (fast_py, fast_np) == (ref_py, ref_np)  # the ops after it draw the same values too
        changes.append(np.abs(fast.astype(int) - img).mean())
    assert min(changes) > 0.5 or (name == "RandomRotate90" and max(changes) > 0.5), (name, changes)  # 0° is a draw


def _change_stats(out: np.ndarray, img: np.ndarray) -> np.ndarray:
    """Per draw: mean change per channel, mean |change|, std of the change, fraction of values changed."""
    d = out.astype(np.float64) - img
    return np.array([*d.reshape(-1, 3).mean(0), np.abs(d).mean(), d.std(), (d != 0).mean()])


# Averages over the draws of _change_stats, fast vs albumentations: relative tolerance (of albumentations' value)
# plus an absolute one in grey levels (fractions for the last). Measured gaps at 40 draws: ~0.3 % (ISONoise).
_DIST_RTOL, _DIST_ATOL = 0.05, 0.02


@pytest.mark.parametrize("name", sorted(rbcfast.IN_DISTRIBUTION))
@pytest.mark.parametrize("size", [96, 56])
def test_equal_in_distribution_same_draws_and_deterministic(name, size):
    fast_stats, ref_stats = [], []
    for seed in range(40):
        img = _smear(size, seed % 4)
        fast, *fast_state = _run(rbcfast.FAST[name], img, seed)
        ref, *ref_state = _run(getattr(A, name), img, seed)
        assert fast.dtype == np.uint8 and fast.shape == img.shape
        assert fast_state == ref_state  # the policy's generators advance as with albumentations
        again, *_ = _run(rbcfast.FAST[name], img, seed)
        np.testing.assert_array_equal(again, fast)  # same seed, same pixels: a resumed run sees the same crops
        fast_stats.append(_change_stats(fast, img))
        ref_stats.append(_change_stats(ref, img))
    f, r = np.mean(fast_stats, 0), np.mean(ref_stats, 0)
    assert r[3] > 0.1, (name, r)  # the op does change the image
    np.testing.assert_array_less(np.abs(f - r), _DIST_RTOL * np.abs(r) + _DIST_ATOL * np.array([1, 1, 1, 1, 1, 0.05]))


def test_poisson_counts_follow_the_poisson_pmf():
    rng = np.random.default_rng(0)
    for lam in (0.0, 0.03, 0.5, 4.0):
        n = 200_000
        counts, idx = rbcfast.poisson_counts(rng.random(n, dtype=np.float32), lam)
        assert (counts > 0).all()
        full = np.zeros(n, np.int64)
        full[idx] = counts
        assert abs(full.mean() - lam) < 5 * np.sqrt(max(lam, 1e-3) / n)
        assert abs(full.var() - lam) < 0.03 * lam + 1e-3


def test_rotate90_every_factor_is_np_rot90():
    img = _smear(40, 0)[:, :30]  # not square: the axes must not swap the wrong way
    for k in range(4):
        np.testing.assert_array_equal(rbcfast.RandomRotate90(p=1.0).apply(img, factor=k), np.rot90(img, k))


def test_non_square_images_fall_back_to_albumentations_draws():
    img = _smear(80, 0)[:, :56]
    fast, *fast_state = _run(rbcfast.RandomFog, img, 3)
    ref, *ref_state = _run(A.RandomFog, img, 3)
    np.testing.assert_array_equal(fast, ref)
    assert fast_state == ref_state


def test_py_randints_is_cpythons_randint_stream():
    draws = [(0, 223, 500), (-5, 5, 7), (3, 3, 4), (10, 17, 300), (0, 1, 0), (0, 2**20, 50)]
    a, b = random.Random(11), random.Random(11)
    got = rbcfast.py_randints(a, draws)
    for (lo, hi, count), values in zip(draws, got):
        assert values.tolist() == [b.randint(lo, hi) for _ in range(count)]
    assert a.random() == b.random()


def test_disc_cover_counts_match_cv2_circles():
    rng = np.random.default_rng(0)
    n = 60
    xs, ys, rs = rng.integers(-10, 70, n), rng.integers(-10, 60, n), rng.integers(1, 15, n)
    expected = np.zeros((50, 64), np.int64)
    for x, y, r in zip(xs, ys, rs):
        disc = np.zeros((50, 64), np.uint8)
        cv2.circle(disc, (int(x), int(y)), int(r), 1, -1)
        expected += disc
    np.testing.assert_array_equal(rbcfast.disc_cover_counts((50, 64), xs, ys, rs), expected)


def test_rbc_policy_crops_equal_albumentations_only_policy():
    # every transform applied (33 of 33, p=1), so each fast op runs on every crop
    crops = CropConfig(policy="rbc", global_crops_size=56, local_crops_size=28, local_crops_number=1, rbc_pick=33,
                       rbc_p=1.0)
    imgs = [_smear(64, s) for s in range(2)]
    batch = {"image": [cv2.imencode(".png", im)[1].tobytes() for im in imgs], "sha256": np.array(["a", "b"])}
    fast = MultiCropTransform(crops, MaskConfig(), 14, resize=64, normalize=False)
    ref = MultiCropTransform(crops, MaskConfig(), 14, resize=64, normalize=False)
    ref.pipelines = build_rbc(crops, fast=False)
    for pipe in [*ref.pipelines.global_crops, ref.pipelines.local_crops]:  # the ops equal in distribution only: the
        pick = pipe.transforms[1]  # same in both, so every other op's pixels and the generators' streams must match
        pick.transforms = [rbcfast.FAST[type(t).__name__](p=t.p) if type(t).__name__ in rbcfast.IN_DISTRIBUTION
                           else t for t in pick.transforms]
    assert any(isinstance(t, rbcfast.RandomFog) for t in fast.pipelines.local_crops.transforms[1].transforms)
    a, b = fast(batch), ref(batch)
    for k in ("global_crops", "local_crops", "masks"):
        np.testing.assert_array_equal(a[k], b[k])


def _assert_same_call(ours, theirs, img, seed: int) -> None:
    """rbcfast.run(ours) gives albumentations' own call's pixels and leaves both generators in the same state."""
    rng_a, py_a, rng_b, py_b = (np.random.default_rng(seed), random.Random(seed), np.random.default_rng(seed),
                                random.Random(seed))
    rbcfast.set_random_state(ours, rng_a, py_a)
    theirs.set_random_state(rng_b, py_b)
    np.testing.assert_array_equal(rbcfast.run(ours, img), theirs(image=img)["image"])
    assert (rng_a.random(), py_a.random()) == (rng_b.random(), py_b.random())


@pytest.mark.parametrize("policy", ["rbc", "rbc_albumentations", "cell"])
def test_run_is_the_pipeline_call(policy):
    """rbcfast.run / set_random_state: the same pixels and the same generator states as albumentations' own call."""
    crops = CropConfig(policy="rbc" if policy.startswith("rbc") else policy, global_crops_size=56, local_crops_size=28,
                       rbc_pick=6, rbc_p=0.85)
    build = build_cell if policy == "cell" else (lambda c: build_rbc(c, fast=policy == "rbc"))
    ours, theirs = build(crops), build(crops)
    for seed in range(12):
        img = _smear(64, seed % 3)
        for a, b in zip([*ours.global_crops, ours.local_crops], [*theirs.global_crops, theirs.local_crops]):
            _assert_same_call(a, b, img, seed)


@pytest.mark.parametrize("name,kw", [("MotionBlur", {}), ("MotionBlur", {"blur_limit": (3, 15), "allow_shifted": False}),
                                     ("MotionBlur", {"direction_range": (-1.0, -1.0)}),
                                     ("MotionBlur", {"direction_range": (0.0, 0.0), "blur_limit": 9}),
                                     ("RingingOvershoot", {}), ("RingingOvershoot", {"blur_limit": (3, 21)})])
def test_kernels_are_albumentations_kernels(name, kw):
    """MotionBlur / RingingOvershoot build their kernels more cheaply: the same kernels from the same draws."""
    for seed in range(300):
        ours, theirs = rbcfast.FAST[name](p=1.0, **kw), getattr(A, name)(p=1.0, **kw)
        ours.set_random_state(np.random.default_rng(seed), random.Random(seed))
        theirs.set_random_state(np.random.default_rng(seed), random.Random(seed))
        a, b = ours.get_params()["kernel"], theirs.get_params()["kernel"]
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
        assert ours.py_random.random() == theirs.py_random.random()


def test_random_resized_crop_is_albumentations():
    img = _smear(64, 1)[:, :48]
    for size, scale, ratio in [((40, 40), (0.08, 1.0), (3 / 4, 4 / 3)), ((64, 48), (1.0, 1.0), (0.75, 0.75)),
                               ((20, 30), (0.3, 0.6), (0.5, 2.0))]:
        for seed in range(20):
            a, *sa = _run(rbcfast.RandomResizedCrop, img, seed, size=size, scale=scale, ratio=ratio,
                          interpolation=cv2.INTER_CUBIC)
            b, *sb = _run(A.RandomResizedCrop, img, seed, size=size, scale=scale, ratio=ratio,
                          interpolation=cv2.INTER_CUBIC)
            np.testing.assert_array_equal(a, b)
            assert sa == sb


def test_dihedral_table_is_flips_then_rot90():
    img = _smear(40, 2)[:, :30]  # not square
    for (h, v, k), f in rbcfast._DIHEDRAL.items():
        x = img[:, ::-1] if h else img
        np.testing.assert_array_equal(f(img), np.rot90(x[::-1] if v else x, k))


@pytest.mark.parametrize("rotate", [A.RandomRotate90, rbcfast.RandomRotate90])
def test_flips_rotate_step_is_the_three_transforms(rotate):
    """The fused flips + rotation step: the same pixels, generator states and applied params as the three calls."""
    img = _smear(40, 3)[:, :28]
    seen = set()

    def pipe():
        return A.Compose([A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5), rotate(p=0.7)], p=1.0, seed=0)

    ours, theirs = pipe(), pipe()
    assert any(isinstance(s, rbcfast.FlipsRotate) for s in rbcfast.compose_steps(ours))
    for seed in range(200):
        _assert_same_call(ours, theirs, img, seed)
        h, v, r = (bool(t.params) for t in ours.transforms)
        seen.add((h, v, ours.transforms[2].params["factor"] if r else 0))
    assert len(seen) == 16  # every flip / turn combination ran


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_pcg64_words_are_numpys_bounded_draws(dtype):
    """Power-of-two ranges: numpy's integers are the top bits of rbcfast.pcg64_words, and the generator ends in the
    same state, whatever 32-bit word was left buffered before (odd counts)."""
    for seed in range(20):
        a, b = np.random.default_rng(seed), np.random.default_rng(seed)
        for count, bits in [(7, 3), (10, 3), (1, 1), (0, 2), (33, 5), (1000, 3), (3, 31)]:
            lo = -(2 ** (bits - 1))
            want = a.integers(lo, lo + 2**bits, size=count, dtype=dtype)
            got = lo + (rbcfast.pcg64_words(b, count) >> (32 - bits)).astype(np.int64)
            np.testing.assert_array_equal(got, want)
            assert a.bit_generator.state == b.bit_generator.state
        assert a.random() == b.random()


@pytest.mark.parametrize("size,kw", [(120, {}), (96, {"src_radius": 80}), (64, {"src_radius": 30})])
def test_sun_flare_disc_map_is_albumentations(size, kw):
    """RandomSunFlare's discs as a crop of one map made per src_radius (or drawn per image where the image reaches
    past the map: some centres at src_radius 80 on 96 px, all at 30 on 64 px): albumentations' pixels on many flare centres."""
    for seed in range(30):
        img = _smear(size, seed % 4)
        a, *sa = _run(rbcfast.RandomSunFlare, img, seed, **kw)
        b, *sb = _run(A.RandomSunFlare, img, seed, **kw)
        np.testing.assert_array_equal(a, b)
        assert sa == sb


def test_iterated_tables_are_repeated_lookups():
    rng = np.random.default_rng(0)
    for times in range(40):
        table = rng.integers(0, 256, 256).astype(np.uint8)
        want = [np.arange(256)]
        for _ in range(times):
            want.append(table[want[-1]])
        np.testing.assert_array_equal(rbcfast._iterated(table, times), np.array(want))
