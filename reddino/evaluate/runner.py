"""The two entry points: :func:`evaluate` (CLI / sweeps: full report) and :func:`knn_score` (in training)."""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import time
import uuid
from pathlib import Path
from typing import Any, Iterable, Sequence

from reddino.config import EvalConfig, load_section
from reddino.paths import write_text_atomic

from .html import html_report

import numpy as np
import pyarrow as pa

from .classifiers import classifier_names
from .compute import compute_features
from reddino.features.extract import extract_features
from .featureset import FeatureSet, select_rows
from .metrics import Scores
from .protocols import run_fixed, run_kfold, run_protocol

log = logging.getLogger(__name__)


def _progress(enabled: bool):
    if not enabled:
        return contextlib.nullcontext(None)
    from rich.console import Console  # noqa: PLC0415
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: PLC0415

    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=False,
    )


def _data_names(paths: Sequence[str]) -> list[str]:
    names = [Path(p).expanduser().resolve().name or str(p) for p in paths]
    return [n if names.count(n) == 1 else f"{n}#{i}" for i, n in enumerate(names)]


def _variant_name(base: str, excluded: Sequence[int]) -> str:
    return base if not excluded else f"{base} (excl. {','.join(map(str, excluded))})"


def _variant_key(base: str, excluded: Sequence[int]) -> str:
    """MLflow-safe metric prefix, e.g. ``chula`` / ``chula.excl12``."""
    from .report import slug  # noqa: PLC0415

    return slug(base) + (f".excl{'-'.join(map(str, excluded))}" if excluded else "")


def evaluate(
    models: Any,
    data: str | Sequence[str],
    config: EvalConfig | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """Evaluate frozen features of one or more models on labelled RBC data; write and log a report.

    ``config`` (:class:`reddino.config.EvalConfig`, defaults if None) holds every setting; keyword ``settings``
    override its fields (``evaluate(refs, data, folds=3)``), an unknown name is a :class:`ConfigError`.

    ``models``: one reference or a list (see :func:`reddino.evaluate.resolve_model`; ``nn.Module``
    objects work too). ``data``: Parquet dataset dir(s). ``protocol``: ``kfold`` (every dir on its
    own), ``fixed`` (every dir on its own) or ``cross-source`` (all dirs together, split by
    ``source``). ``exclude_classes`` drops labels everywhere; ``report_both_excluded`` additionally
    reports each dataset without those labels. ``use_ray``: Ray Data batch inference (True), in
    process (False), or by dataset size (None, see ``compute.RAY_MIN_ROWS``). ``precision``: ``auto``
    (bf16 where the device has native bf16, else fp32), ``fp32`` or ``bf16``. Returns the results dict (also ``results.json``)
    with ``out_dir``, ``files`` and ``mlflow_run_ids``.
    """
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in settings.items()}
    c = load_section(EvalConfig, None, {**(config or EvalConfig()).model_dump(), **settings})
    from reddino.runtime import default_tracking_uri  # noqa: PLC0415

    t0 = time.perf_counter()
    # One MLflow store for the whole call: the registry refs are read from it and the evaluation is logged to it.
    tracking_uri = c.tracking_uri or default_tracking_uri()
    if isinstance(models, (str, bytes)) or not isinstance(models, (list, tuple)):
        models = [models]
    paths = [data] if isinstance(data, (str, Path)) else list(data)
    paths = [str(Path(p).expanduser()) for p in paths]
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(c.out_dir) if c.out_dir else Path("eval") / stamp
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "eval_id": f"{stamp}-{uuid.uuid4().hex[:6]}",
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "settings": _settings(c, paths, models),
        "models": [],
    }
    ray_was_up = _ray_up()
    try:
        with _progress(c.progress) as prog:
            for ref in models:
                results["models"].append(_evaluate_model(ref, c, results["settings"], out, prog, tracking_uri))
    finally:
        if not ray_was_up and _ray_up():  # this call started a local Ray: stop it again
            import ray  # noqa: PLC0415

            ray.shutdown()
    results["wall_seconds"] = time.perf_counter() - t0
    return _write_results(results, out, c, tracking_uri)


def _settings(c: EvalConfig, paths: list[str], models: Sequence[Any]) -> dict[str, Any]:
    """What the evaluation ran with (``results.json`` / the MLflow params); ``variants``: the label sets excluded."""
    excl = sorted({int(x) for x in (c.exclude_classes or [])})
    both = sorted({int(x) for x in (c.report_both_excluded or [])} - set(excl))
    return {
        "protocol": c.protocol,
        "folds": c.folds,
        "classifiers": classifier_names(c.ks, cosine=c.cosine_knn, probe=c.probe),
        "pooling": c.pooling,
        "img_size": c.img_size,
        "precision": c.precision,
        "exclude_classes": excl,
        "report_both_excluded": both,
        "max_images": c.max_images,
        "grouped": c.use_groups,
        "split_column": c.split_column,
        "test_fraction": c.test_fraction,
        "seed": c.seed,
        "data": paths,
        "models": [str(m) if isinstance(m, (str, Path)) else type(m).__name__ for m in models],
    }


def _feature_groups(model, info: dict, c: EvalConfig, paths: list[str], variant: list[int], prog):
    """``(name, metric key, FeatureSet)`` to score for one excluded-label variant: one per dataset, or all of them
    pooled for cross-source."""
    names = _data_names(paths)
    sets = []
    for path, dname in zip(paths, names):
        fs = compute_features(
            model, info, path, pooling=c.pooling, img_size=c.img_size or info.get("img_size"),
            batch_size=c.batch_size, exclude_labels=variant, max_images=c.max_images, seed=c.seed,
            cache_dir=c.cache_dir, use_ray=c.use_ray, num_cpus=c.num_cpus, progress=prog, precision=c.precision,
            extra_columns=[c.split_column] if c.split_column else (),
        )
        fs.meta["name"] = _variant_name(dname, variant)
        sets.append(fs)
    if c.protocol != "cross-source":
        return [(fs.meta["name"], _variant_key(n, variant), fs) for n, fs in zip(names, sets)]
    _check_label_names(sets)
    joined = "+".join(names)
    pooled = FeatureSet.concat(sets)
    pooled.meta["name"] = _variant_name(joined, variant)
    return [(pooled.meta["name"], _variant_key(joined, variant), pooled)]


def _evaluate_model(ref, c: EvalConfig, settings: dict, out: Path, prog, tracking_uri: str) -> dict[str, Any]:
    """One model through every variant and dataset: its results entry (evaluations, figures)."""
    from reddino.features.models import resolve_model  # noqa: PLC0415

    from .report import figures_for, slug  # noqa: PLC0415

    model, info = resolve_model(ref, img_size=c.img_size, seed=c.seed, tracking_uri=tracking_uri)
    entry: dict[str, Any] = {"ref": info["ref"], "info": info, "evals": [], "figures": []}
    stem_model = slug(Path(str(info["ref"])).name or str(info["ref"]), 40)
    standardize = bool(info.get("standardize"))
    proto_kw = dict(seed=c.seed, use_groups=c.use_groups, probe_sweep=c.probe_sweep, folds=c.folds,
                    test_value=c.test_value, test_fraction=c.test_fraction)
    excl, both = settings["exclude_classes"], settings["report_both_excluded"]
    for variant in [excl] + ([sorted(set(excl) | set(both))] if both else []):
        for gname, gkey, fs in _feature_groups(model, info, c, settings["data"], variant, prog):
            split = fs.extras.get(c.split_column) if c.split_column else None
            res = run_protocol(c.protocol, fs, settings["classifiers"], standardize=standardize, progress=prog,
                               split=split, **proto_kw)
            res["cached_features"] = bool(fs.meta.get("cached")) if "cached" in fs.meta else None
            entry["evals"].append({"name": gname, "key": gkey, "exclude_classes": variant, "result": res})
            if c.figures:
                entry["figures"] += [str(p) for p in figures_for(
                    fs, res, out / "figures", f"{stem_model}__{slug(gname, 50)}", embedding=c.embedding,
                    embedding_max=c.embedding_max, seed=c.seed, standardize=standardize)]
    return entry


def _write_results(results: dict[str, Any], out: Path, c: EvalConfig, tracking_uri: str) -> dict[str, Any]:
    """Headlines, then results.json / report.md / report.html / metrics.json, then the MLflow runs."""
    from .report import log_mlflow, markdown_report, write_json  # noqa: PLC0415

    for entry in results["models"]:
        entry["headline"] = _headline(entry)
    # The first model's first evaluation, flat (`reddino models register --eval-json` reads this).
    results["headline"] = results["models"][0]["headline"] if results["models"] else {}
    files = {"json": str(out / "results.json"), "markdown": str(out / "report.md"),
             "html": str(out / "report.html"), "metrics": str(out / "metrics.json")}
    results["out_dir"] = str(out)
    results["files"] = files
    write_text_atomic(out / "report.md", markdown_report(results))
    html_report(results, out)
    write_json(results, out / "results.json")
    write_json(results["headline"], out / "metrics.json")
    if c.mlflow:
        results["mlflow_run_ids"] = log_mlflow(results, out, tracking_uri=tracking_uri, experiment=c.experiment)
        write_json(results, out / "results.json")
    return results


def _headline(entry: dict[str, Any]) -> dict[str, float]:
    """``{<classifier>_<metric>: mean}`` (+ ``_std``) of a model's first evaluation."""
    return Scores.of(entry["evals"][0]["result"]).flat() if entry.get("evals") else {}


def _ray_up() -> bool:
    import sys  # noqa: PLC0415

    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


def _check_label_names(sets: Sequence[FeatureSet]) -> None:
    seen: dict[int, str] = {}
    for fs in sets:
        for lab, name in fs.class_names.items():
            if lab in seen and seen[lab] != name:
                log.warning("label %d is %r in one dataset and %r in another: cross-source needs one label space",
                            lab, seen[lab], name)
            seen.setdefault(lab, name)


def knn_score(
    model,
    data: str | pa.Table,
    *,
    img_size: int | None = None,
    k: int = 20,
    max_images: int = 2000,
    exclude_labels: Iterable[int] | None = None,
    folds: int | float = 5,
    seed: int = 0,
    device: Any = None,
    batch_size: int = 64,
    use_groups: bool = True,
    pooling: str = "cls",
    probe: bool = False,
    precision: str = "auto",
) -> dict[str, float]:
    """Fast in-process kNN score of a (training) backbone - no Ray, no cache, no files.

    Takes a deterministic subset of at most ``max_images`` labelled rows (hash-ranked, see
    :func:`reddino.evaluate.featureset.select_rows`), embeds them with :func:`extract_features`, and
    scores kNN k = ``k`` and k = 1 (Euclidean, uniform) by stratified (group) k-fold CV when ``folds``
    is an int >= 2, or on one grouped holdout when it is a fraction in (0, 1). Returns e.g.
    ``knn20_balanced_accuracy``, ``knn20_accuracy``, ``knn20_f1_weighted`` (+ ``_std``), the same for
    ``knn1``, and ``n_images``, ``n_classes``, ``seconds``. ``probe=True`` adds the RedDino
    logistic-regression probe (``probe_balanced_accuracy``, ...) on the same folds.
    """
    from reddino.data import load_table  # noqa: PLC0415

    if isinstance(model, str):  # a reference (e.g. "handcrafted") rather than a module
        from reddino.features.models import resolve_model  # noqa: PLC0415

        model, _ = resolve_model(model, img_size=img_size)
    t0 = time.perf_counter()
    if isinstance(data, pa.Table):
        meta_cols = [c for c in data.column_names if c != "image"]
        meta = data.select(meta_cols)
        idx = select_rows(meta, exclude_labels=exclude_labels, max_images=max_images, seed=seed)
        images = data.column("image").take(pa.array(idx)).to_pylist()
    else:
        data = str(Path(data).expanduser())
        meta = load_table([data], columns=["label", "label_name", "source", "group", "image_id", "sha256"])
        idx = select_rows(meta, exclude_labels=exclude_labels, max_images=max_images, seed=seed)
        images = load_table([data], columns=["image"]).column("image").take(pa.array(idx)).to_pylist()
    if len(idx) < 2:
        raise ValueError("knn_score needs at least 2 labelled images")
    sub = meta.take(pa.array(idx))
    feats = extract_features(model, images, img_size, batch_size, device, pooling=pooling, precision=precision)
    groups = sub.column("group").to_pylist() if "group" in sub.column_names else None
    fs = FeatureSet(
        features=feats,
        labels=np.array(sub.column("label").to_pylist(), dtype=np.int64),
        groups=None if groups is None else np.array([str(g) for g in groups]),
        sources=np.array([""] * len(idx)),
        label_names=np.array([""] * len(idx)),
        image_ids=np.arange(len(idx)).astype(str),
    )
    clfs = [f"knn{k}"] + (["knn1"] if k != 1 else []) + (["probe"] if probe else [])
    standardize = bool(getattr(model, "standardize", False))
    if isinstance(folds, float) and 0 < folds < 1:
        res = run_fixed(fs, clfs, test_fraction=folds, seed=seed, use_groups=use_groups, standardize=standardize)
    else:
        counts = np.unique(fs.labels, return_counts=True)[1]
        n_f = int(max(2, min(int(folds), int(counts.max()), len(fs))))
        res = run_kfold(fs, clfs, folds=n_f, seed=seed, use_groups=use_groups, standardize=standardize,
                        keep_predictions=False)
    out = Scores.of(res).flat()
    out.update(n_images=float(len(fs)), n_classes=float(res["n_classes"]), seconds=time.perf_counter() - t0)
    return out
