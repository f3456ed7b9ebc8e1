import time

import numpy as np

from reddino.data import SYNTH_CLASSES, decode_image, generate_synthetic, load_table, read_manifest
from reddino.data.synth import synth_rows


def test_deterministic_for_seed(tmp_path):
    a = [r["sha256"] for r in synth_rows(n_per_class=2, sources=2, unit="both", seed=3, n_patches=2)]
    b = [r["sha256"] for r in synth_rows(n_per_class=2, sources=2, unit="both", seed=3, n_patches=2)]
    c = [r["sha256"] for r in synth_rows(n_per_class=2, sources=2, unit="both", seed=4, n_patches=2)]
    assert a == b and a != c and len(set(a)) == len(a)
    m1 = generate_synthetic(tmp_path / "a", n_per_class=2, sources=2, seed=3)
    m2 = generate_synthetic(tmp_path / "b", n_per_class=2, sources=2, seed=3)
    assert m1.content_hash == m2.content_hash
    assert [s["sha256"] for s in m1["shards"]] == [s["sha256"] for s in m2["shards"]]


def test_all_classes_sources_units(tmp_path):
    t0 = time.perf_counter()
    m = generate_synthetic(tmp_path / "s", n_per_class=5, sources=4, unit="both", seed=0, n_patches=3)
    assert time.perf_counter() - t0 < 30
    assert m["sources"] == {"synth-a": 48, "synth-b": 48, "synth-c": 48, "synth-d": 48}
    assert m["units"] == {"cell": 180, "patch": 12} and m["unlabelled"] == 12
    assert {int(k): v["name"] for k, v in m["labels"].items()} == SYNTH_CLASSES
    assert all(v["count"] == 20 for v in m["labels"].values())
    patches = load_table(tmp_path / "s", units=["patch"])
    assert set(patches.column("height").to_pylist()) == {224}
    assert decode_image(patches.column("image")[0].as_py()).shape == (224, 224, 3)
    cells = load_table(tmp_path / "s", units="cell", sources="synth-b")
    assert cells.num_rows == 45 and len(set(cells.column("group").to_pylist())) == 4
    assert read_manifest(tmp_path / "s")["meta"]["config"]["seed"] == 0


def test_sources_look_different():
    rows = list(synth_rows(n_per_class=4, sources=3, unit="cell", seed=1, classes=[0]))
    means = {}
    for r in rows:
        means.setdefault(r["source"], []).append(decode_image(r["image"]).reshape(-1, 3).mean(0))
    m = {k: np.mean(v, 0) for k, v in means.items()}
    names = sorted(m)
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            assert np.abs(m[names[i]] - m[names[j]]).max() > 8


def _shape_features(rgb: np.ndarray) -> list[float]:
    from skimage.filters import threshold_otsu
    from skimage.measure import label, regionprops

    img = rgb.astype(np.float64) + 1.0
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    bg = np.median(border, axis=0)
    od = np.clip(-np.log(img / bg), 0, None).sum(axis=2)
    mask = od > threshold_otsu(od)
    regions = regionprops(label(mask), intensity_image=od)
    r = max(regions, key=lambda p: p.area)
    cy, cx = r.centroid
    yy, xx = np.mgrid[0 : od.shape[0], 0 : od.shape[1]]
    d = np.hypot(yy - cy, xx - cx) / max(np.sqrt(r.area / np.pi), 1.0)
    vals = od[r.slice][r.image]
    mean = r.intensity_mean
    centre = od[d < 0.25].mean() / mean
    ring = od[(d > 0.35) & (d < 0.6)].mean() / mean
    return [
        r.area / od.size, r.eccentricity, r.solidity, r.extent,
        r.perimeter ** 2 / (4 * np.pi * r.area), r.axis_minor_length / max(r.axis_major_length, 1),
        centre, ring, vals.std() / mean, float(np.percentile(vals, 10) / mean),
    ]


def test_classes_distinguishable_by_shape_features():
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    rows = list(synth_rows(n_per_class=20, sources=3, unit="cell", seed=0))
    X = np.array([_shape_features(decode_image(r["image"])) for r in rows])
    y = np.array([r["label"] for r in rows])
    clf = RandomForestClassifier(n_estimators=100, random_state=0, n_jobs=1)
    scores = cross_val_score(clf, X, y, cv=StratifiedKFold(5, shuffle=True, random_state=0), scoring="balanced_accuracy")
    assert scores.mean() > 0.6, scores  # chance is 1/9
