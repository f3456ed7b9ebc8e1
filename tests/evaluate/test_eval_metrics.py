import os

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
)

from reddino.evaluate.classifiers import CosineKNN, LinearProbe, make_classifier, probe_c
from reddino.evaluate.metrics import aggregate, compute_metrics


def test_metrics_match_sklearn_on_known_inputs():
    y_true = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])
    y_pred = np.array([0, 1, 0, 1, 1, 2, 0, 2, 1, 2])
    m = compute_metrics(y_true, y_pred)
    assert m["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred)) == pytest.approx(0.6)
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    # by hand: recalls 2/3, 2/2, 2/4, 0/1 -> mean 0.541666...
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 + 0.5 + 0) / 4)
    assert m["f1_weighted"] == pytest.approx(f1_score(y_true, y_pred, average="weighted"))
    assert m["confusion_matrix"] == confusion_matrix(y_true, y_pred).tolist()
    prec = precision_score(y_true, y_pred, average=None, zero_division=0)
    rec = recall_score(y_true, y_pred, average=None, zero_division=0)
    for i, lab in enumerate(m["labels"]):
        assert m["per_class"][str(lab)]["precision"] == pytest.approx(prec[i])
        assert m["per_class"][str(lab)]["recall"] == pytest.approx(rec[i])
    assert sum(v["support"] for v in m["per_class"].values()) == len(y_true)


def test_metrics_fixed_label_order_includes_unseen_classes():
    m = compute_metrics([1, 1, 2], [1, 2, 2], labels=[0, 1, 2])
    assert m["labels"] == [0, 1, 2]
    assert np.array(m["confusion_matrix"]).shape == (3, 3)
    assert m["per_class"]["0"]["support"] == 0


def test_aggregate_mean_std():
    agg = aggregate([{"accuracy": 0.5, "balanced_accuracy": 0.4, "f1_weighted": 0.3},
                     {"accuracy": 0.7, "balanced_accuracy": 0.6, "f1_weighted": 0.5}])
    assert agg["accuracy"]["mean"] == pytest.approx(0.6)
    assert agg["accuracy"]["std"] == pytest.approx(np.std([0.5, 0.7]))
    assert agg["balanced_accuracy"]["folds"] == [0.4, 0.6]


def test_cosine_knn_votes_exp_sim_over_t():
    train = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [0.6, 0.8]])
    y = np.array([0, 0, 1, 1])
    q = np.array([[0.9, 0.5]])
    est = CosineKNN(n_neighbors=3, temperature=0.07).fit(train * 5, y)  # scale-invariant
    qn = q / np.linalg.norm(q)
    sims = (train / np.linalg.norm(train, axis=1, keepdims=True)) @ qn[0]
    top = np.argsort(-sims)[:3]
    votes = np.zeros(2)
    for i in top:
        votes[y[i]] += np.exp(sims[i] / 0.07)
    np.testing.assert_allclose(est.predict_proba(q)[0], votes / votes.sum(), rtol=1e-5)
    assert est.predict(q)[0] == np.argmax(votes)
    assert clone(est).get_params()["temperature"] == 0.07


def test_probe_uses_reddino_lambda():
    # lambda = 100 / (M * C); sklearn C = 1 / lambda
    assert probe_c(384, 12) == pytest.approx(384 * 12 / 100)
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(0, 1, (30, 8)), rng.normal(3, 1, (30, 8)), rng.normal(-3, 1, (30, 8))])
    y = np.repeat([0, 1, 2], 30)
    p = LinearProbe().fit(X, y)
    assert p.C_ == pytest.approx(8 * 3 / 100)
    assert p.model_.solver == "lbfgs" and p.model_.max_iter == 1000
    assert (p.predict(X) == y).mean() > 0.9
    swept = LinearProbe(sweep=True).fit(X, y)
    assert swept.C_ in [probe_c(8, 3) * f for f in (0.01, 0.1, 1.0, 10.0, 100.0)]


def test_knn_classifiers_follow_the_protocol():
    knn = make_classifier("knn20")
    assert knn.n_neighbors == 20 and knn.metric == "euclidean" and knn.weights == "uniform"
    assert make_classifier("knn20", n_train=5).n_neighbors == 5
    assert make_classifier("cosknn20").temperature == 0.07
    scaled = make_classifier("probe", standardize=True)
    assert scaled.steps[0][0] == "standardscaler"
    with pytest.raises(ValueError):
        make_classifier("svm")


def test_embedding_umap_and_pca_fallback(tmp_path):
    from reddino.evaluate.report import embed_2d, plot_embedding

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, (20, 8)), rng.normal(5, 1, (20, 8))])
    emb, how = embed_2d(x, "umap")
    assert how == "UMAP" and emb.shape == (40, 2)
    small, how = embed_2d(x[:10], "umap")  # too few samples for UMAP
    assert how == "PCA" and small.shape == (10, 2)
    p = plot_embedding(emb, np.repeat(["a", "b"], 20), "t", tmp_path / "e.png")
    assert p.stat().st_size > 1000


def test_umap_kernels_are_compiled_once_per_machine_not_per_process():
    """umap-learn's jitted functions go through numba's on-disk cache: after one UMAP the machine code of its
    layout optimiser is on disk, where the next process loads it instead of compiling (~35 s on 2 cores)."""
    import umap.umap_

    from reddino.evaluate.report import cache_umap_kernels, embed_2d

    embed_2d(np.random.default_rng(1).normal(size=(30, 4)), "umap")
    cache_umap_kernels()
    fn = umap.umap_.smooth_knn_dist
    assert type(fn._cache).__name__ == "FunctionCache"
    index = fn._cache._cache_file._index_path
    assert os.path.exists(index), index


def test_a_failed_umap_is_printed_and_recorded_not_silently_pca(monkeypatch, capsys):
    import reddino.evaluate.report as R

    def broken(x, seed):
        raise ImportError("numba is broken here")

    monkeypatch.setattr(R, "_umap", broken)
    x = np.random.default_rng(0).normal(size=(40, 8))
    notes: list[str] = []
    emb, how = R.embed_2d(x, "umap", notes=notes)
    assert how == "PCA" and emb.shape == (40, 2)
    assert notes and "UMAP failed (ImportError: numba is broken here)" in notes[0]
    assert "WARNING UMAP failed" in capsys.readouterr().err


def test_a_failed_create_experiment_is_an_error_naming_the_store(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from reddino.evaluate.report import ensure_experiment

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp_id = ensure_experiment("made", uri)
    assert MlflowClient(uri).get_experiment(exp_id).artifact_location.endswith("mlartifacts")
    assert ensure_experiment("made", uri) == exp_id

    def refuse(self, name, artifact_location=None, tags=None):
        raise PermissionError("read-only store")

    monkeypatch.setattr(MlflowClient, "create_experiment", refuse)
    with pytest.raises(RuntimeError, match=f"MLflow at {uri}: cannot create experiment 'other'"):
        ensure_experiment("other", uri)
    assert not (tmp_path / "mlruns").exists()
