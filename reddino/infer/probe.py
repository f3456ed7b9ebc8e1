"""`reddino probe fit`: a classifier on a backbone's frozen features, scored by grouped k-fold, saved, registered.

The classifier is one of the evaluation protocol's (:func:`reddino.evaluate.classifiers.make_classifier`): the
RedDino-rule logistic probe by default, or ``knn<k>`` / ``cosknn<k>``. It is scored exactly as ``reddino
evaluate`` scores it (same features, same folds), then refitted on every labelled row and saved as
``probe.pkl`` + ``probe.json`` (classes, the backbone's identity, pooling, image size, scores). The backbone's
content hash travels with the probe, so ``classify`` can refuse a probe meant for another backbone.
"""

from __future__ import annotations

import json
import pickle
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from reddino.paths import atomic_path

from reddino.features.models import resolve
from reddino.features.store import EmbedError

PROBE_FORMAT = "reddino-probe"
PROBE_FILE = "probe.pkl"
META_FILE = "probe.json"


@dataclass
class Probe:
    estimator: Any
    meta: dict[str, Any]

    @property
    def classes(self) -> dict[int, str]:
        return {int(k): v for k, v in self.meta["classes"].items()}

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """``[N, C]`` probabilities in the order of :attr:`classes` (kNN votes for the kNN classifiers)."""
        proba = self.estimator.predict_proba(np.asarray(X, dtype=np.float32))
        fitted = [int(c) for c in self.estimator.classes_]
        order = [fitted.index(c) for c in self.classes]
        return proba[:, order]


def backbone_link(info: dict[str, Any]) -> str:
    """How a probe names its backbone: ``name/version`` for a registered one, else the reference itself."""
    if info.get("model_name") and info.get("model_version"):
        return f"{info['model_name']}/{info['model_version']}"
    return str(info.get("ref"))


def fit_probe(
    model: str,
    data: str | Path,
    *,
    classifier: str = "probe",
    out: str | Path | None = None,
    exclude_labels: Iterable[int] | None = None,
    folds: int = 5,
    use_groups: bool = True,
    pooling: str = "cls",
    img_size: int | None = None,
    precision: str = "auto",
    seed: int = 0,
    batch_size: int = 64,
    register: str | None = None,
    alias: str = "candidate",
    cache_dir: str | Path | None = None,
    tracking_uri: str | None = None,
) -> Probe:
    """Score ``classifier`` by k-fold on ``model``'s features of ``data``, refit it on all rows, save it under
    ``out`` (when given) and register it as ``register`` (when given). The features come from the embedding store
    under ``cache_dir`` (default ``$REDDINO_HOME/cache/features``): a ``reddino embed`` or ``reddino evaluate`` of
    the same model and data is read, not recomputed."""
    from reddino.evaluate.classifiers import make_classifier  # noqa: PLC0415
    from reddino.evaluate.compute import compute_features  # noqa: PLC0415
    from reddino.evaluate.protocols import run_kfold  # noqa: PLC0415

    from reddino.data.shards import ManifestError  # noqa: PLC0415
    from reddino.features.embedding import DEFAULT_ROOT  # noqa: PLC0415

    net, info = resolve(model, img_size, tracking_uri=tracking_uri)
    try:
        make_classifier(classifier)
    except ValueError as exc:
        raise EmbedError(str(exc)) from None
    try:
        fs = compute_features(net, info, data, pooling=pooling, img_size=img_size, batch_size=batch_size,
                              exclude_labels=exclude_labels, precision=precision, seed=seed,
                              cache_dir=DEFAULT_ROOT if cache_dir is None else cache_dir)
    except ManifestError as exc:
        raise EmbedError(str(exc)) from None
    standardize = bool(info.get("standardize"))
    scores = run_kfold(fs, [classifier], folds=folds, seed=seed, use_groups=use_groups, standardize=standardize,
                       keep_predictions=False)
    cls_scores = scores["classifiers"][classifier]
    estimator = make_classifier(classifier, standardize=standardize, seed=seed, n_train=len(fs))
    estimator.fit(fs.features, fs.labels)
    meta = {
        "format": PROBE_FORMAT,
        "classifier": classifier,
        "classes": {str(k): v for k, v in fs.class_names.items()},
        "excluded_labels": sorted(int(x) for x in (exclude_labels or [])),
        "backbone": backbone_link(info),
        "backbone_hash": info["hash"],
        "backbone_ref": str(info.get("ref")),
        "pooling": pooling,
        "img_size": info.get("img_size"),
        "precision": fs.meta.get("precision", "fp32"),
        "feature_dim": int(fs.features.shape[1]),
        "data": {"path": str(Path(data).expanduser().resolve()), "content_hash": fs.meta["data_hash"],
                 "rows": len(fs)},
        "kfold": {
            "folds": scores["folds"], "grouped": scores["grouped"], "seed": seed,
            **{f"{k}_mean": cls_scores[k]["mean"] for k in ("balanced_accuracy", "accuracy", "f1_weighted")},
            **{f"{k}_std": cls_scores[k]["std"] for k in ("balanced_accuracy", "accuracy", "f1_weighted")},
        },
    }
    probe = Probe(estimator, meta)
    if out is not None:
        save_probe(probe, out)
    if register:
        mv = register_probe(probe, register, alias=alias)
        meta["registered"] = {"name": mv.name, "version": str(mv.version), "alias": alias}
        if out is not None:
            save_probe(probe, out)
    return probe


def save_probe(probe: Probe, out: str | Path) -> Path:
    """``probe.pkl`` + ``probe.json`` into ``out`` (each written under a temporary name, then renamed)."""
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    for name, data in ((PROBE_FILE, pickle.dumps(probe.estimator)),
                       (META_FILE, (json.dumps(probe.meta, indent=2) + "\n").encode())):
        with atomic_path(out / name) as tmp:
            tmp.write_bytes(data)
    return out


def register_probe(probe: Probe, name: str, *, alias: str = "candidate"):
    """The probe as an MLflow sklearn model version (serves predictions from embeddings), its metadata as tags."""
    from reddino.registry.core import register_probe as _register  # noqa: PLC0415

    meta = probe.meta
    metrics = {f"kfold_{k}": v for k, v in meta["kfold"].items() if k.endswith(("_mean", "_std"))}
    extra = {"reddino.backbone_hash": meta["backbone_hash"], "reddino.classifier": meta["classifier"],
             "reddino.pooling": meta["pooling"], "reddino.img_size": str(meta["img_size"]),
             "reddino.precision": meta["precision"], "reddino.feature_dim": str(meta["feature_dim"])}
    with tempfile.TemporaryDirectory() as tmp:
        side = Path(tmp) / META_FILE
        side.write_text(json.dumps(meta, indent=2))
        return _register(probe.estimator, backbone=meta["backbone"], name=name, metrics=metrics,
                         classes=[meta["classes"][k] for k in sorted(meta["classes"], key=int)],
                         class_ids=[int(k) for k in sorted(meta["classes"], key=int)],
                         alias=alias, tags=extra, artifacts=[side])


def load_probe(ref: str | Path) -> Probe:
    """A probe from a ``probe fit --out`` folder, or from the registry (``models:/name@alias``, ``name@alias``,
    ``name/version``)."""
    path = Path(str(ref)).expanduser()
    if path.is_dir() or path.name in (PROBE_FILE, META_FILE):
        folder = path if path.is_dir() else path.parent
        if not (folder / PROBE_FILE).is_file() or not (folder / META_FILE).is_file():
            raise EmbedError(f"{folder}: no {PROBE_FILE} + {META_FILE} (not a `reddino probe fit --out` folder)")
        meta = json.loads((folder / META_FILE).read_text())
        with open(folder / PROBE_FILE, "rb") as f:
            return Probe(pickle.load(f), meta)
    if path.exists():
        raise EmbedError(f"{path}: not a probe folder")
    from reddino.registry.core import load_probe_version  # noqa: PLC0415

    try:
        estimator, meta = load_probe_version(str(ref))
    except Exception as exc:  # noqa: BLE001 - MLflow's own error types for a missing name / alias
        if type(exc).__name__ in ("MlflowException", "RestException", "ValueError"):
            raise EmbedError(f"probe {ref!r}: {str(exc).splitlines()[0]}") from None
        raise
    return Probe(estimator, meta)
