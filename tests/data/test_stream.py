from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from reddino.data import ManifestError, decode_image, generate_synthetic, load_table, read_rbc_dataset
from reddino.data.images import ImageDecodeError, encode_image

TINY_CONFIG = str(Path(__file__).parents[1] / "tiny.yaml")  # the tests' own tiny recipe


@pytest.fixture(scope="module")
def two_dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("stream")
    generate_synthetic(base / "cells", n_per_class=6, sources=2, unit="cell", seed=0, size=32)  # 108 rows
    generate_synthetic(base / "more", n_per_class=2, sources=["lab-z"], unit="both", seed=1, size=32,
                       patch_size=64, n_patches=4)  # 18 cells + 4 patches
    return base / "cells", base / "more"


def _count(rows, key):
    return Counter(r[key] for r in rows)


# Each Ray Data execution costs seconds on a 2-core box: keep them few, check the rest offline.


def test_filters_on_ray(ray_local, two_dirs):
    cells, more = two_dirs
    rows = read_rbc_dataset(
        [cells, more], sources=["synth-b", "lab-z"], exclude_labels=[0, 1, 2, 3, 4, 5, 6, 7],
        columns=["image", "label", "source", "unit"],
    ).take_all()
    assert set(rows[0]) == {"image", "label", "source", "unit"}
    assert _count(rows, "label") == {8: 6 + 2, None: 4}  # unlabelled patches are kept by exclude_labels
    assert _count(rows, "source") == {"synth-b": 6, "lab-z": 6}
    assert decode_image(rows[0]["image"]).shape in {(32, 32, 3), (64, 64, 3)}


def test_source_weights_on_ray(ray_local, two_dirs):
    cells, more = two_dirs
    w = {"synth-a": 2.0, "synth-b": 0.5, "lab-z": 0.0}
    ds = read_rbc_dataset([cells, more], source_weights=w, columns=["sha256", "source"],
                          override_num_blocks=4)
    rows = ds.take_all()
    got = _count(rows, "source")
    assert got["synth-a"] == 108  # 2 x 54
    assert 10 <= got["synth-b"] <= 44 and "lab-z" not in got
    ref = load_table([cells, more], source_weights=w, columns=["sha256", "source"])
    assert Counter(ref.column("source").to_pylist()) == got  # same deterministic coins in both readers
    assert sorted(r["sha256"] for r in rows) == sorted(ref.column("sha256").to_pylist())


def test_train_stream_splits_a_shard_into_parallel_uint8_augmentation_blocks(ray_local, two_dirs):
    """One shard is one read block: the stream re-blocks it so several augmentation tasks can run at once,
    and ships uint8 crops that normalise on the device to exactly the float crops of the transform."""
    import torch

    from reddino.config import load_config
    from reddino.data.augment import MultiCropTransform
    from reddino.train.data import build_train_dataset, crops_to_device

    cells, _ = two_dirs
    cfg = load_config(TINY_CONFIG, [f"data.paths=[{str(cells)!r}]", "data.unit=cell", "data.map_batch_size=16",
                                   "data.resize=56", "crops.global_crops_size=28", "crops.local_crops_size=14"])
    ds = build_train_dataset(cfg, patch_size=14, run_state_name=None).materialize()
    import re

    tasks = int(re.search(r"MapBatches\(Augment\)\S*: (\d+) tasks executed", ds.stats()).group(1))
    assert tasks >= 108 // 16  # one task per 16 rows (a single task would walk all 108 rows alone)
    batch = ds.take_batch(4)
    g = batch["global_crops"]
    assert g.dtype == np.uint8 and g.shape == (4, 2, 28, 28, 3) and batch["local_crops"].shape == (4, 2, 14, 14, 3)
    table = load_table(cells, columns=["image", "sha256"])
    by_key = {int(h[:16], 16): i for i, h in enumerate(table.column("sha256").to_pylist())}
    rows = [by_key[int(k) % (1 << 64)] for k in batch["key"]]
    ref = MultiCropTransform(cfg.crops, cfg.mask, 14, resize=56, seed=cfg.train.seed)(
        {"image": np.array([table.column("image")[i].as_py() for i in rows], dtype=object),
         "sha256": np.array([table.column("sha256")[i].as_py() for i in rows]), "epoch": np.zeros(4, np.int64)})
    np.testing.assert_allclose(crops_to_device(torch.from_numpy(g.copy()), "cpu").numpy(), ref["global_crops"], atol=1e-6)
    assert np.array_equal(batch["masks"], ref["masks"])


def test_ray_filter_expressions_match_pyarrow(two_dirs):
    """The Ray predicate expressions select exactly what load_table's pyarrow filters select."""
    from reddino.data.stream import _ray_filter

    cells, more = two_dirs
    full = load_table([cells, more])
    cases = [
        dict(sources=["synth-a"]),
        dict(units=["patch"]),
        dict(labels=[1, 3]),
        dict(exclude_labels=[0, 5]),
        dict(sources=["lab-z"], units=["cell"], labels=[2, 4], exclude_labels=[4]),
    ]
    for case in cases:
        expr = _ray_filter(**case).to_pyarrow()
        via_ray_expr = full.filter(expr).column("sha256").to_pylist()
        assert via_ray_expr == load_table([cells, more], **case).column("sha256").to_pylist(), case
    assert load_table([cells, more], units=["patch"]).num_rows == 4
    assert Counter(load_table([cells, more], labels=[1, 3]).column("label").to_pylist()) == {1: 14, 3: 14}


def test_bad_dirs(two_dirs, tmp_path):
    with pytest.raises(ManifestError, match=str(tmp_path)):
        read_rbc_dataset([two_dirs[0], tmp_path])
    with pytest.raises(ManifestError, match="does not exist"):
        load_table(tmp_path / "missing")
    with pytest.raises(ValueError, match="unknown column"):
        read_rbc_dataset(two_dirs[0], columns=["nope"])


def test_load_table_filters_and_weights(two_dirs):
    cells, more = two_dirs
    t = load_table([cells, more], sources="synth-a", exclude_labels=[0])
    assert t.num_rows == 48 and 0 not in set(t.column("label").to_pylist())
    w = load_table(cells, source_weights={"synth-a": 3, "synth-b": 1})
    assert Counter(w.column("source").to_pylist()) == {"synth-a": 162, "synth-b": 54}
    s1 = load_table(cells, shuffle_seed=1).column("sha256").to_pylist()
    s2 = load_table(cells, shuffle_seed=1).column("sha256").to_pylist()
    s0 = load_table(cells).column("sha256").to_pylist()
    assert s1 == s2 and s1 != s0 and sorted(s1) == sorted(s0)
    with pytest.raises(ValueError, match="finite and >= 0"):
        load_table(cells, source_weights={"synth-a": -1})


def test_decode_image_variants():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)
    assert np.array_equal(decode_image(encode_image(rgb, "png")), rgb)
    assert decode_image(encode_image(rgb, "jpeg")).shape == (20, 30, 3)
    gray = rgb[:, :, 0]
    ok, buf = cv2.imencode(".png", gray)
    out = decode_image(buf.tobytes())
    assert out.shape == (20, 30, 3) and np.array_equal(out[:, :, 1], gray)
    rgba = np.dstack([rgb, np.full((20, 30), 255, np.uint8)])
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
    assert np.array_equal(decode_image(buf.tobytes()), rgb)
    g16 = (gray.astype(np.uint16) << 8)
    ok, buf = cv2.imencode(".png", g16)
    assert np.array_equal(decode_image(buf.tobytes())[:, :, 0], gray)
    with pytest.raises(ImageDecodeError):
        decode_image(b"not an image")


def test_on_device_stream_resumes_at_the_data_position_with_the_same_params_and_masks(ray_local, two_dirs):
    """crops.on_device ships decoded images + crop parameters instead of crops; the exact-resume machinery (keys
    dropped before augmentation by the run-state actor) and the per-row seeds are unchanged: a resumed pass streams
    exactly the rows not yet consumed, with the parameters and iBOT masks the uninterrupted pass would give them."""
    import ray

    from reddino.config import load_config
    from reddino.data.augment import MultiCropTransform
    from reddino.train.data import build_train_dataset, crops_from_batch, run_state_actor, sha_to_keys

    cells, _ = two_dirs
    cfg = load_config(TINY_CONFIG, [f"data.paths=[{str(cells)!r}]", "data.unit=cell", "data.map_batch_size=16",
                                   "data.resize=32", "crops.global_crops_size=28", "crops.local_crops_size=14",
                                   "crops.policy=dinov2", "crops.on_device=true", "mask.sample_probability=1.0"])
    table = load_table(cells, columns=["image", "sha256"])
    shas = table.column("sha256").to_pylist()
    keys = sha_to_keys(shas)
    consumed = keys[::3]  # what the run trained on in pass 2 before it was killed
    actor = run_state_actor("test-on-device-resume")
    ray.get(actor.set.remote(consumed, 2, 0))
    ds = build_train_dataset(cfg, patch_size=14, run_state_name="test-on-device-resume")
    seen, rows = [], []
    for batch in ds.iter_torch_batches(batch_size=16, drop_last=False):
        assert "global_crops" not in batch and batch["images"].dtype.is_floating_point is False
        seen += batch["key"].tolist()
        rows.append(batch)
    assert sorted(seen) == sorted(set(keys.tolist()) - set(consumed.tolist()))  # each remaining row once
    # the same parameters and masks as the uninterrupted pass 2 gives those rows
    b = rows[0]
    idx = [int(np.flatnonzero(keys == k)[0]) for k in b["key"].tolist()]
    ref = MultiCropTransform(cfg.crops, cfg.mask, 14, resize=32, seed=cfg.train.seed)(
        {"image": np.array([table.column("image")[i].as_py() for i in idx], dtype=object),
         "sha256": np.array([shas[i] for i in idx]), "epoch": np.full(len(idx), 2, np.int64)})
    assert np.array_equal(b["crop_params"].numpy(), ref["crop_params"])
    assert np.array_equal(b["masks"].numpy(), ref["masks"]) and ref["masks"].any()
    g, lc = crops_from_batch(b, "cpu", cfg.crops)
    assert g.shape == (len(idx), 2, 3, 28, 28) and lc.shape == (len(idx), 2, 3, 14, 14)
    ray.kill(actor)
