"""The frozen-feature classifiers of the RedDino and DINOv2 protocols (sklearn estimators).

* ``knn{k}`` - k-nearest neighbours, Euclidean, uniform votes, raw features (RedDino: k = 1 and 20).
* ``cosknn{k}`` - DINOv2's weighted kNN: cosine similarity on L2-normalised features, each of the k
  neighbours votes ``exp(sim / T)`` with T = 0.07.
* ``probe`` - logistic regression (lbfgs, multinomial, 1000 iterations, no standardisation) with L2
  strength lambda = 100 / (M * C) for M feature dims and C classes, i.e. sklearn ``C = 1 / lambda``.
  ``probe_sweep=True`` picks C from a small grid around that on an inner stratified split.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

PROBE_SWEEP_FACTORS = (0.01, 0.1, 1.0, 10.0, 100.0)


class CosineKNN(ClassifierMixin, BaseEstimator):
    """DINOv2 weighted kNN: top-k cosine neighbours vote ``exp(sim / temperature)``."""

    def __init__(self, n_neighbors: int = 20, temperature: float = 0.07, chunk_size: int = 4096):
        self.n_neighbors = n_neighbors
        self.temperature = temperature
        self.chunk_size = chunk_size

    @staticmethod
    def _normalize(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    def fit(self, X, y):
        y = np.asarray(y)
        self.classes_, self._y_idx = np.unique(y, return_inverse=True)
        self._X = self._normalize(X)
        self.n_features_in_ = self._X.shape[1]
        return self

    def predict_proba(self, X) -> np.ndarray:
        Xn = self._normalize(X)
        k = min(self.n_neighbors, len(self._X))
        n_cls = len(self.classes_)
        out = np.zeros((len(Xn), n_cls), dtype=np.float64)
        for s in range(0, len(Xn), self.chunk_size):
            sims = Xn[s : s + self.chunk_size] @ self._X.T
            top = np.argpartition(-sims, k - 1, axis=1)[:, :k] if k < sims.shape[1] else np.tile(
                np.arange(sims.shape[1]), (len(sims), 1)
            )
            top_sims = np.take_along_axis(sims, top, axis=1).astype(np.float64)
            w = np.exp((top_sims - 1.0) / self.temperature)  # shifted by the max possible sim: same argmax
            votes = np.zeros((len(sims), n_cls))
            np.add.at(votes, (np.repeat(np.arange(len(sims)), k), self._y_idx[top].ravel()), w.ravel())
            out[s : s + len(sims)] = votes
        return out / np.maximum(out.sum(1, keepdims=True), 1e-300)

    def predict(self, X) -> np.ndarray:
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]


def probe_c(n_features: int, n_classes: int) -> float:
    """sklearn ``C`` of the RedDino probe: ``1 / lambda``, ``lambda = 100 / (M * C)``."""
    lam = 100.0 / (max(n_features, 1) * max(n_classes, 2))
    return 1.0 / lam


class LinearProbe(ClassifierMixin, BaseEstimator):
    """RedDino logistic-regression probe; C follows from the data unless given; optional C sweep."""

    def __init__(self, C: float | None = None, max_iter: int = 1000, sweep: bool = False, random_state: int = 0):
        self.C = C
        self.max_iter = max_iter
        self.sweep = sweep
        self.random_state = random_state

    def _lr(self, C: float) -> LogisticRegression:
        # lbfgs on >2 classes is the multinomial (softmax) loss; `multi_class` is gone from sklearn.
        return LogisticRegression(C=C, solver="lbfgs", max_iter=self.max_iter)

    def fit(self, X, y):
        X = np.asarray(X, dtype=np.float32)
        y = np.asarray(y)
        self.classes_ = np.unique(y)
        base_c = self.C if self.C is not None else probe_c(X.shape[1], len(self.classes_))
        self.C_ = base_c
        if self.sweep and len(self.classes_) > 1:
            self.C_ = self._sweep(X, y, base_c)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=UserWarning)
            warnings.filterwarnings("ignore", message=".*lbfgs failed to converge.*")
            self.model_ = self._lr(self.C_).fit(X, y)
        self.n_features_in_ = X.shape[1]
        return self

    def _sweep(self, X, y, base_c: float) -> float:
        from sklearn.metrics import balanced_accuracy_score  # noqa: PLC0415
        from sklearn.model_selection import train_test_split  # noqa: PLC0415

        counts = np.unique(y, return_counts=True)[1]
        strat = y if counts.min() >= 2 else None
        try:
            Xa, Xb, ya, yb = train_test_split(X, y, test_size=0.2, stratify=strat, random_state=self.random_state)
        except ValueError:
            return base_c
        scores = {}
        for f in PROBE_SWEEP_FACTORS:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                m = self._lr(base_c * f).fit(Xa, ya)
            scores[base_c * f] = balanced_accuracy_score(yb, m.predict(Xb))
        return max(scores, key=lambda c: (scores[c], -abs(np.log(c / base_c))))

    def predict(self, X):
        return self.model_.predict(np.asarray(X, dtype=np.float32))

    def predict_proba(self, X):
        return self.model_.predict_proba(np.asarray(X, dtype=np.float32))


def classifier_names(ks: Sequence[int] = (1, 20), *, cosine: bool = True, probe: bool = True) -> list[str]:
    names = [f"knn{k}" for k in ks]
    if cosine:
        names += [f"cosknn{max(ks) if ks else 20}"]
    if probe:
        names += ["probe"]
    return names


def make_classifier(name: str, *, standardize: bool = False, probe_sweep: bool = False, seed: int = 0, n_train=None):
    """An unfitted estimator for a classifier name (``knn<k>``, ``cosknn<k>``, ``probe``)."""
    if name.startswith("knn"):
        k = int(name[3:])
        if n_train is not None:
            k = max(1, min(k, n_train))
        est: Any = KNeighborsClassifier(n_neighbors=k, metric="euclidean", weights="uniform", algorithm="brute")
    elif name.startswith("cosknn"):
        est = CosineKNN(n_neighbors=int(name[6:]), temperature=0.07)
    elif name == "probe":
        est = LinearProbe(sweep=probe_sweep, random_state=seed)
    else:
        raise ValueError(f"unknown classifier {name!r} (knn<k>, cosknn<k>, probe)")
    return make_pipeline(StandardScaler(), est) if standardize else clone(est)
