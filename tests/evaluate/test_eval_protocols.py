import numpy as np
import pytest

from reddino.evaluate.featureset import FeatureSet
from reddino.evaluate.protocols import (
    DIAGONAL_MEANING,
    fit_predict,
    holdout_split,
    make_folds,
    run_cross_source,
    run_fixed,
    run_kfold,
)


def _blobs(n_per=12, classes=4, sources=("a", "b", "c"), groups_per_source=6, shift=0.0, seed=0):
    """Gaussian class blobs; each source adds its own offset (a 'batch effect')."""
    rng = np.random.default_rng(seed)
    feats, labels, groups, srcs = [], [], [], []
    centres = rng.normal(0, 4, (classes, 16))
    for s_i, s in enumerate(sources):
        offset = rng.normal(0, shift, 16)
        for c in range(classes):
            for i in range(n_per):
                feats.append(centres[c] + offset + rng.normal(0, 1, 16))
                labels.append(c)
                groups.append(f"{s}-g{i % groups_per_source}")
                srcs.append(s)
    n = len(labels)
    return FeatureSet(
        features=np.array(feats, dtype=np.float32),
        labels=np.array(labels),
        groups=np.array(groups),
        sources=np.array(srcs),
        label_names=np.array([f"c{c}" for c in labels]),
        image_ids=np.arange(n).astype(str),
        meta={"name": "blobs"},
    )


def test_grouped_folds_never_leak_a_group():
    fs = _blobs()
    splits, grouped = make_folds(fs.labels, fs.groups, 5, seed=0)
    assert grouped and len(splits) == 5
    covered = np.zeros(len(fs), int)
    for tr, te in splits:
        assert not set(fs.groups[tr]) & set(fs.groups[te])
        covered[te] += 1
    assert (covered == 1).all()  # every row tested exactly once
    # same seed -> same folds
    again, _ = make_folds(fs.labels, fs.groups, 5, seed=0)
    assert all((a[1] == b[1]).all() for a, b in zip(splits, again))
    # --no-groups: plain stratified folds do mix groups
    plain, grouped = make_folds(fs.labels, fs.groups, 5, seed=0, use_groups=False)
    assert not grouped
    assert any(set(fs.groups[tr]) & set(fs.groups[te]) for tr, te in plain)
    # too few groups for the folds: falls back to ungrouped
    _, grouped = make_folds(fs.labels, np.array(["g0", "g1"] * (len(fs) // 2)), 5)
    assert not grouped


def test_kfold_result_shape():
    fs = _blobs()
    res = run_kfold(fs, ["knn1", "knn20", "cosknn20", "probe"], folds=5, seed=0)
    assert res["grouped"] and res["folds"] == 5 and res["n"] == len(fs) and res["n_classes"] == 4
    for name, cr in res["classifiers"].items():
        assert len(cr["balanced_accuracy"]["folds"]) == 5
        assert cr["balanced_accuracy"]["mean"] > 0.9, name
        assert np.array(cr["pooled"]["confusion_matrix"]).sum() == len(fs)


def test_holdout_split_is_grouped_and_stratified():
    fs = _blobs()
    tr, te, grouped = holdout_split(fs.labels, fs.groups, 0.2, seed=1)
    assert grouped and not set(fs.groups[tr]) & set(fs.groups[te])
    assert set(fs.labels[te]) == set(fs.labels)
    res = run_fixed(fs, ["knn1"], test_fraction=0.2, seed=1)
    assert res["n_test"] == len(te) and res["n_train"] == len(tr)
    split = np.where(fs.sources == "c", "test", "train")
    res = run_fixed(fs, ["knn1"], split=split)
    assert res["n_test"] == (fs.sources == "c").sum()


def test_cross_source_matrix_shape_and_diagonal_meaning():
    fs = _blobs(shift=3.0)
    res = run_cross_source(fs, ["knn1", "cosknn20"], folds=3, seed=0)
    srcs = res["matrix_sources"]
    assert srcs == ["a", "b", "c"]
    assert res["diagonal"] == DIAGONAL_MEANING and "within-source" in res["diagonal"]
    for name in ("knn1", "cosknn20"):
        cr = res["classifiers"][name]
        mat = np.array(cr["matrix"]["balanced_accuracy"], dtype=float)
        assert mat.shape == (3, 3) and not np.isnan(mat).any()
        assert set(cr["loso"]) == set(srcs)
        for i, s in enumerate(srcs):
            # diagonal = within-source k-fold CV score
            sub = fs.subset(fs.sources == s)
            within = run_kfold(sub, [name], folds=3, seed=0)["classifiers"][name]["balanced_accuracy"]["mean"]
            assert mat[i, i] == pytest.approx(within)
            # off-diagonal = fit on all of source i, score on all of source j
            for j, t in enumerate(srcs):
                if i != j:
                    tr, te = fs.sources == s, fs.sources == t
                    pred = fit_predict(name, fs.features[tr], fs.labels[tr], fs.features[te])
                    assert mat[i, j] == pytest.approx((pred == fs.labels[te]).mean())  # balanced classes
        # leave-one-source-out: trained on the two others
        te = fs.sources == "a"
        pred = fit_predict(name, fs.features[~te], fs.labels[~te], fs.features[te])
        assert cr["loso"]["a"]["accuracy"] == pytest.approx((pred == fs.labels[te]).mean())
    with pytest.raises(ValueError, match="2 sources"):
        run_cross_source(fs.subset(fs.sources == "a"), ["knn1"])


def test_exclude_classes_removes_the_class():
    fs = _blobs()
    sub = fs.exclude([2])
    assert 2 not in set(sub.labels) and len(sub) == len(fs) - (fs.labels == 2).sum()
    res = run_kfold(sub, ["knn1"], folds=3)
    assert "2" not in res["classes"] and res["n_classes"] == 3
    assert "2" not in res["classifiers"]["knn1"]["pooled"]["per_class"]


def test_parallel_fold_fits_equal_serial_ones():
    fs = _blobs(shift=0.5)
    names = ["knn1", "knn20", "probe"]
    serial = run_kfold(fs, names, folds=5, seed=0, n_jobs=1)
    parallel = run_kfold(fs, names, folds=5, seed=0, n_jobs=2)
    for name in names:
        np.testing.assert_array_equal(serial["classifiers"][name]["_oof"], parallel["classifiers"][name]["_oof"])
        assert serial["classifiers"][name]["balanced_accuracy"] == parallel["classifiers"][name]["balanced_accuracy"]


def test_an_empty_cross_source_diagonal_cell_is_reported_with_its_reason(capsys):
    from reddino.evaluate.report import markdown_report

    fs = _blobs(shift=3.0)
    one_class_c = ~((fs.sources == "c") & (fs.labels != 0))  # source c keeps one class: no within-source CV
    res = run_cross_source(fs.subset(one_class_c), ["knn1"], folds=3, seed=0)
    cr = res["classifiers"]["knn1"]
    assert cr["matrix"]["balanced_accuracy"][2][2] is None
    assert "too few samples / classes" in cr["diagonal_missing"]["c"] and set(cr["diagonal_missing"]) == {"c"}
    assert any("no within-source score for c" in n for n in res["notes"])
    assert "no within-source score for c" in capsys.readouterr().err
    md = markdown_report({"settings": {}, "models": [{"ref": "m", "evals": [{"name": "blobs", "result": res}]}]})
    assert "## Notes" in md and "no within-source score for c" in md
