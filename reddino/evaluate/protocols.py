"""Evaluation protocols over a :class:`~reddino.evaluate.featureset.FeatureSet`.

* ``kfold`` - stratified k-fold CV with a fixed seed, mean +- std over folds (the RedDino protocol).
  When the rows carry a ``group`` (smear / slide / image id) the folds are ``StratifiedGroupKFold``,
  so cells of one smear never sit on both sides of a split (``use_groups=False`` to disable).
* ``fixed`` - one train/test split: a split column (``test`` rows vs the rest) or a grouped,
  stratified holdout fraction.
* ``cross-source`` - leave-one-source-out (train on every other source, test on the held-out one) and
  the source x source matrix: off-diagonal (i, j) = train on all of source i, test on all of source j;
  diagonal (i, i) = within-source k-fold CV (grouped as above), mean over folds - the in-domain
  reference the off-diagonal transfer scores are read against.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from .classifiers import make_classifier
from .featureset import FeatureSet
from .metrics import SCALAR_METRICS, aggregate, compute_metrics

PROTOCOLS = ("kfold", "fixed", "cross-source")
DIAGONAL_MEANING = (
    "diagonal (i, i): within-source stratified k-fold CV on source i (grouped by `group` when available), "
    "mean over folds; off-diagonal (i, j): classifier fitted on all of source i, scored on all of source j"
)


def make_folds(
    y: np.ndarray, groups: np.ndarray | None, n_splits: int = 5, seed: int = 0, use_groups: bool = True
) -> tuple[list[tuple[np.ndarray, np.ndarray]], bool]:
    """Stratified (group) k-fold splits ``[(train_idx, test_idx)]`` and whether they are grouped."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold  # noqa: PLC0415

    y = np.asarray(y)
    if len(y) < n_splits:
        raise ValueError(f"{len(y)} samples cannot make {n_splits} folds")
    grouped = use_groups and groups is not None and len(np.unique(groups)) >= n_splits
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*least populated class.*")
        if grouped:
            cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
            splits = list(cv.split(np.zeros(len(y)), y, groups))
        else:
            cv = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
            splits = list(cv.split(np.zeros(len(y)), y))
    return [(tr, te) for tr, te in splits if len(tr) and len(te)], grouped


def holdout_split(
    y: np.ndarray, groups: np.ndarray | None, test_fraction: float = 0.2, seed: int = 0, use_groups: bool = True
) -> tuple[np.ndarray, np.ndarray, bool]:
    """One stratified (and grouped, when groups exist) train/test split."""
    from sklearn.model_selection import train_test_split  # noqa: PLC0415

    if not 0 < test_fraction < 1:
        raise ValueError("test_fraction must be in (0, 1)")
    n_splits = max(2, int(round(1 / test_fraction)))
    if use_groups and groups is not None and len(np.unique(groups)) >= n_splits:
        splits, _ = make_folds(y, groups, n_splits, seed, True)
        tr, te = splits[0]
        return tr, te, True
    idx = np.arange(len(y))
    counts = np.unique(y, return_counts=True)[1]
    tr, te = train_test_split(
        idx, test_size=test_fraction, random_state=seed, stratify=y if counts.min() >= 2 else None
    )
    return np.sort(tr), np.sort(te), False


def fit_predict(name: str, X_train, y_train, X_test, *, standardize=False, probe_sweep=False, seed=0) -> np.ndarray:
    if len(np.unique(y_train)) == 1:  # a one-class training set: every classifier predicts that class
        return np.full(len(X_test), y_train[0])
    from threadpoolctl import threadpool_limits  # noqa: PLC0415

    est = make_classifier(name, standardize=standardize, probe_sweep=probe_sweep, seed=seed, n_train=len(y_train))
    # Single-threaded BLAS: multi-threaded OpenBLAS next to torch's OpenMP pool was measured 300x
    # slower on the lbfgs probe (66 s vs 0.2 s for 100 iterations on 432x192) on a busy 2-core box.
    with threadpool_limits(limits=1, user_api="blas"):
        est.fit(X_train, y_train)
        return est.predict(X_test)


def available_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _parallel_fits(jobs: Iterable[tuple], kwargs: dict[str, Any], n_jobs: int | None, tick) -> list[np.ndarray]:
    """``fit_predict(name, X_train, y_train, X_test, **kwargs)`` for every job, in order, on a thread pool.

    Threads, not processes: sklearn's solvers and BLAS release the GIL, and the features are not copied
    to workers. Each fit gets one BLAS thread (see :func:`fit_predict`); the limit is set once around
    the pool because threadpoolctl's limits are process-wide."""
    from joblib import Parallel, delayed  # noqa: PLC0415
    from threadpoolctl import threadpool_limits  # noqa: PLC0415

    jobs = list(jobs)
    n_jobs = max(1, min(len(jobs), n_jobs or available_cpus()))
    out = []
    # warnings.catch_warnings (used inside the probe) is not thread-safe: one outer context restores the
    # filters once all threads are done, and silences the probe's convergence warnings for all of them.
    with threadpool_limits(limits=1, user_api="blas"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*lbfgs failed to converge.*")
        results = Parallel(n_jobs=n_jobs, prefer="threads", return_as="generator")(
            delayed(fit_predict)(*job, **kwargs) for job in jobs
        )
        for pred in results:
            out.append(pred)
            tick(1)
    return out


class _Ticker:
    def __init__(self, progress, description: str, total: int):
        self.progress = progress
        self.task = progress.add_task(description, total=total) if progress is not None else None

    def __call__(self, n: int = 1) -> None:
        if self.task is not None:
            self.progress.advance(self.task, n)


def _summary(fs: FeatureSet) -> dict[str, Any]:
    labels, counts = np.unique(fs.labels, return_counts=True)
    names = fs.class_names
    return {
        "n": int(len(fs)),
        "dim": int(fs.features.shape[1]) if fs.features.ndim == 2 else 0,
        "n_classes": int(len(labels)),
        "classes": {str(int(k)): names.get(int(k), str(k)) for k in labels},
        "class_counts": {str(int(k)): int(c) for k, c in zip(labels, counts)},
        "sources": sorted(set(fs.sources.tolist())),
        "n_groups": int(len(np.unique(fs.groups))) if fs.groups is not None else None,
    }


def run_kfold(
    fs: FeatureSet,
    classifiers: Sequence[str],
    *,
    folds: int = 5,
    seed: int = 0,
    use_groups: bool = True,
    standardize: bool = False,
    probe_sweep: bool = False,
    progress=None,
    tick: Callable[[int], None] | None = None,
    keep_predictions: bool = True,
    n_jobs: int | None = None,
) -> dict[str, Any]:
    """Stratified (group) k-fold CV: per classifier mean/std/folds of each metric + pooled OOF metrics.

    The classifier x fold fits run ``n_jobs`` at a time (default: the CPUs this process may use)."""
    X, y = fs.features, fs.labels
    splits, grouped = make_folds(y, fs.groups, folds, seed, use_groups)
    if fs.groups is not None and grouped:
        for tr, te in splits:  # the guarantee the grouped protocol gives, checked rather than assumed
            assert not set(fs.groups[tr]) & set(fs.groups[te]), "a group leaked across a fold"
    labels = sorted(int(v) for v in np.unique(y))
    tick = tick or _Ticker(progress, f"{fs.meta.get('name', 'kfold')}: {folds}-fold", len(splits) * len(classifiers))
    out: dict[str, Any] = {
        "protocol": "kfold",
        "folds": len(splits),
        "grouped": grouped,
        "seed": seed,
        **_summary(fs),
        "classifiers": {},
    }
    jobs = [(name, tr, te) for name in classifiers for tr, te in splits]
    preds = iter(_parallel_fits(
        ((name, X[tr], y[tr], X[te]) for name, tr, te in jobs),
        dict(standardize=standardize, probe_sweep=probe_sweep, seed=seed), n_jobs, tick,
    ))
    for name in classifiers:
        oof = np.empty_like(y)
        per_fold = []
        for tr, te in splits:
            pred = next(preds)
            oof[te] = pred
            per_fold.append(compute_metrics(y[te], pred, labels))
        res = aggregate(per_fold)
        res["pooled"] = compute_metrics(y, oof, labels)
        if keep_predictions:
            res["_oof"] = oof
        out["classifiers"][name] = res
    return out


def run_fixed(
    fs: FeatureSet,
    classifiers: Sequence[str],
    *,
    split: np.ndarray | None = None,
    test_value: str = "test",
    test_fraction: float = 0.2,
    seed: int = 0,
    use_groups: bool = True,
    standardize: bool = False,
    probe_sweep: bool = False,
    progress=None,
) -> dict[str, Any]:
    """One train/test split: ``split == test_value`` rows are the test set, else a grouped holdout."""
    X, y = fs.features, fs.labels
    if split is not None:
        split = np.asarray(split).astype(str)
        te = np.nonzero(split == test_value)[0]
        tr = np.nonzero(split != test_value)[0]
        grouped, how = None, f"split column == {test_value!r}"
    else:
        tr, te, grouped = holdout_split(y, fs.groups, test_fraction, seed, use_groups)
        how = f"holdout {test_fraction:g}" + (" grouped" if grouped else "")
    if len(tr) == 0 or len(te) == 0:
        raise ValueError(f"fixed split is empty on one side (train {len(tr)}, test {len(te)})")
    labels = sorted(int(v) for v in np.unique(y))
    tick = _Ticker(progress, "fixed split", len(classifiers))
    out: dict[str, Any] = {
        "protocol": "fixed",
        "split": how,
        "n_train": int(len(tr)),
        "n_test": int(len(te)),
        "grouped": grouped,
        "seed": seed,
        **_summary(fs),
        "classifiers": {},
    }
    for name in classifiers:
        pred = fit_predict(name, X[tr], y[tr], X[te], standardize=standardize, probe_sweep=probe_sweep, seed=seed)
        m = compute_metrics(y[te], pred, labels)
        res = aggregate([m])
        res["pooled"] = m
        out["classifiers"][name] = res
        tick(1)
    return out


def run_cross_source(
    fs: FeatureSet,
    classifiers: Sequence[str],
    *,
    folds: int = 5,
    seed: int = 0,
    use_groups: bool = True,
    standardize: bool = False,
    probe_sweep: bool = False,
    progress=None,
) -> dict[str, Any]:
    """Leave-one-source-out + the source x source matrix (diagonal = within-source CV)."""
    sources = sorted(set(fs.sources.tolist()))
    if len(sources) < 2:
        raise ValueError(f"cross-source needs at least 2 sources, found {sources}")
    X, y = fs.features, fs.labels
    labels = sorted(int(v) for v in np.unique(y))
    S = len(sources)
    tick = _Ticker(progress, "cross-source", len(classifiers) * (S + S * S))
    out: dict[str, Any] = {
        "protocol": "cross-source",
        "seed": seed,
        **_summary(fs),
        "source_counts": {s: int((fs.sources == s).sum()) for s in sources},
        "matrix_sources": sources,
        "matrix_rows": "train source",
        "matrix_cols": "test source",
        "diagonal": DIAGONAL_MEANING,
        "classifiers": {},
    }
    for name in classifiers:
        loso: dict[str, Any] = {}
        for s in sources:
            te = fs.sources == s
            pred = fit_predict(name, X[~te], y[~te], X[te], standardize=standardize, probe_sweep=probe_sweep, seed=seed)
            loso[s] = compute_metrics(y[te], pred, labels)
            tick(1)
        matrix = {k: np.full((S, S), np.nan) for k in SCALAR_METRICS}
        diag_std = {k: np.full(S, np.nan) for k in SCALAR_METRICS}
        diag_missing: dict[str, str] = {}
        for i, si in enumerate(sources):
            tr = fs.sources == si
            for j, sj in enumerate(sources):
                if i == j:
                    sub = fs.subset(tr)
                    n_f = min(folds, int(np.unique(sub.labels, return_counts=True)[1].max()), len(sub))
                    try:
                        if n_f < 2 or len(np.unique(sub.labels)) < 2:
                            raise ValueError("too few samples / classes for within-source CV")
                        r = run_kfold(
                            sub, [name], folds=n_f, seed=seed, use_groups=use_groups, standardize=standardize,
                            probe_sweep=probe_sweep, tick=lambda n: None, keep_predictions=False,
                        )
                        for k in SCALAR_METRICS:
                            matrix[k][i, i] = r["classifiers"][name][k]["mean"]
                            diag_std[k][i] = r["classifiers"][name][k]["std"]
                    except ValueError as exc:  # the cell stays empty, and the report says why
                        diag_missing[si] = str(exc)
                else:
                    te = fs.sources == sj
                    pred = fit_predict(name, X[tr], y[tr], X[te], standardize=standardize, probe_sweep=probe_sweep, seed=seed)
                    m = compute_metrics(y[te], pred, labels)
                    for k in SCALAR_METRICS:
                        matrix[k][i, j] = m[k]
                tick(1)
        res = {
            "loso": loso,
            "loso_mean": {k: float(np.mean([loso[s][k] for s in sources])) for k in SCALAR_METRICS},
            "matrix": {k: _nan_to_none(v) for k, v in matrix.items()},
            "diagonal_std": {k: _nan_to_none(v) for k, v in diag_std.items()},
            "diagonal_missing": diag_missing,
        }
        for s, why in diag_missing.items():
            note = f"{name}: no within-source score for {s} ({why})"
            out.setdefault("notes", []).append(note)
            print(f"[reddino] WARNING cross-source {note}", file=sys.stderr, flush=True)
        # Summary metrics in the kfold shape (mean/std over held-out sources) so tables can share code.
        for k in SCALAR_METRICS:
            vals = [loso[s][k] for s in sources]
            res[k] = {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "folds": vals}
        out["classifiers"][name] = res
    return out


def _nan_to_none(a: np.ndarray):
    return [(_nan_to_none(x) if isinstance(x, np.ndarray) else (None if np.isnan(x) else float(x))) for x in a]


def run_protocol(protocol: str, fs: FeatureSet, classifiers: Sequence[str], **kwargs) -> dict[str, Any]:
    if protocol == "kfold":
        kwargs.pop("split", None), kwargs.pop("test_fraction", None), kwargs.pop("test_value", None)
        return run_kfold(fs, classifiers, **kwargs)
    if protocol == "fixed":
        kwargs.pop("folds", None)
        return run_fixed(fs, classifiers, **kwargs)
    if protocol in ("cross-source", "cross_source", "loso"):
        kwargs.pop("split", None), kwargs.pop("test_fraction", None), kwargs.pop("test_value", None)
        return run_cross_source(fs, classifiers, **kwargs)
    raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
