"""Evaluation outputs: results JSON, a markdown report, PNG figures, and the MLflow evaluation run."""

from __future__ import annotations

import functools
import json
import math
import re
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from reddino.paths import save_figure, write_text_atomic

from .metrics import SCALAR_METRICS, Scores

METRIC_TITLES = {"accuracy": "acc", "balanced_accuracy": "bal. acc", "f1_weighted": "F1 (w)"}


def slug(text: str, maxlen: int = 60) -> str:
    s = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text)).strip("_.")
    return (s or "x")[:maxlen]


def to_jsonable(obj: Any) -> Any:
    """Numpy -> python, NaN -> None, private keys (``_oof``) dropped."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return None if math.isnan(v) or math.isinf(v) else v
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(results: dict[str, Any], path: Path) -> Path:
    return write_text_atomic(path, json.dumps(to_jsonable(results), indent=2))


def _pm(m: dict[str, Any] | None, pct: bool = True) -> str:
    if not m or m.get("mean") is None or (isinstance(m["mean"], float) and math.isnan(m["mean"])):
        return "-"
    s = 100.0 if pct else 1.0
    if len(m.get("folds", [])) > 1:
        return f"{m['mean'] * s:.1f} ± {m['std'] * s:.1f}"
    return f"{m['mean'] * s:.1f}"


def markdown_report(results: dict[str, Any]) -> str:
    """One comparison table (model x data x classifier) plus cross-source matrices when present."""
    s = results.get("settings", {})
    lines = [
        "# reddino evaluation",
        "",
        f"- protocol: **{s.get('protocol')}**"
        + (f", {s.get('folds')} folds" if s.get("protocol") in ("kfold", "cross-source") else "")
        + f", seed {s.get('seed')}, pooling `{s.get('pooling')}`",
        f"- data: {', '.join(f'`{d}`' for d in s.get('data', []))}",
        "- numbers: percent, mean ± std over folds (kfold) / over held-out sources (cross-source, LOSO)",
        "- knn<k>: Euclidean, uniform votes; cosknn<k>: cosine, exp(sim/0.07) votes (DINOv2); probe: "
        "logistic regression, C = M·C/100 (RedDino); handcrafted features are z-scored per training fold",
        "",
        "| model | data | n | classes | grouped | classifier | " + " | ".join(METRIC_TITLES[m] for m in SCALAR_METRICS) + " |",
        "|---|---|---:|---:|---|---|" + "---:|" * len(SCALAR_METRICS),
    ]
    for model in results.get("models", []):
        for ev in model.get("evals", []):
            r = ev["result"]
            grouped = r.get("grouped")
            g = "yes" if grouped else ("-" if grouped is None else "no")
            for clf, cr in r["classifiers"].items():
                cells = " | ".join(_pm(cr.get(m)) for m in SCALAR_METRICS)
                lines.append(
                    f"| {model['ref']} | {ev['name']} | {r['n']} | {r['n_classes']} | {g} | {clf} | {cells} |"
                )
    for model in results.get("models", []):
        for ev in model.get("evals", []):
            r = ev["result"]
            if r.get("protocol") != "cross-source":
                continue
            srcs = r["matrix_sources"]
            lines += ["", f"## Cross-source: {model['ref']} on {ev['name']} (balanced accuracy, %)", ""]
            lines.append(f"Rows: train source; columns: test source. {r['diagonal']}.")
            for clf, cr in r["classifiers"].items():
                mat = cr["matrix"]["balanced_accuracy"]
                lines += ["", f"**{clf}** (leave-one-source-out mean: {100 * cr['loso_mean']['balanced_accuracy']:.1f})", ""]
                lines.append("| train \\ test | " + " | ".join(srcs) + " | LOSO (held out) |")
                lines.append("|---|" + "---:|" * (len(srcs) + 1))
                for i, si in enumerate(srcs):
                    row = ["-" if v is None else f"{100 * v:.1f}" for v in mat[i]]
                    row[i] = f"*{row[i]}*"
                    loso = cr["loso"][si]["balanced_accuracy"]
                    lines.append(f"| {si} | " + " | ".join(row) + f" | {100 * loso:.1f} |")
    notes = [f"- {model['ref']} on {ev['name']}: {note}" for model in results.get("models", [])
             for ev in model.get("evals", []) for note in ev["result"].get("notes", [])]
    if notes:
        lines += ["", "## Notes", ""] + notes
    if results.get("wall_seconds") is not None:
        lines += ["", f"Wall time: {results['wall_seconds']:.1f} s."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------


def _plt():
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def plot_confusion(cm: Sequence[Sequence[int]], class_names: Sequence[str], title: str, path: Path) -> Path:
    plt = _plt()
    cm = np.asarray(cm, dtype=float)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(max(4, 0.55 * n + 2), max(3.5, 0.5 * n + 1.5)))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), class_names, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(n), class_names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=6,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_title(title, fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046, label="row-normalised")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


def plot_matrix(matrix, sources: Sequence[str], title: str, path: Path) -> Path:
    """Source x source heatmap (rows: train source, columns: test source; diagonal: within-source CV)."""
    plt = _plt()
    m = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float)
    n = len(sources)
    fig, ax = plt.subplots(figsize=(max(3.5, 0.8 * n + 2), max(3, 0.7 * n + 1.5)))
    im = ax.imshow(m, cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(n), sources, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(n), sources, fontsize=7)
    ax.set_xlabel("test source")
    ax.set_ylabel("train source (diagonal: within-source CV)")
    for i in range(n):
        for j in range(n):
            if not np.isnan(m[i, j]):
                ax.text(j, i, f"{100 * m[i, j]:.0f}", ha="center", va="center", fontsize=7,
                        color="black" if m[i, j] > 0.6 else "white", fontweight="bold" if i == j else None)
    ax.set_title(title, fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046, label="balanced accuracy")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


def embed_2d(features: np.ndarray, method: str = "umap", seed: int = 0,
             notes: list[str] | None = None) -> tuple[np.ndarray, str]:
    """2-D embedding: UMAP (umap-learn), PCA when fewer than 15 samples. When UMAP fails the map is PCA, and the
    failure is printed and appended to ``notes`` (the report shows them), never passed over."""
    x = np.asarray(features, dtype=np.float32)
    if method == "umap" and len(x) >= 15:
        try:
            emb = _umap(x, seed)
            return np.asarray(emb), "UMAP"
        except Exception as exc:  # noqa: BLE001 - umap-learn / numba / pynndescent raise their own types
            note = f"UMAP failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); the feature map is PCA"
            print(f"[reddino] WARNING {note}", file=sys.stderr, flush=True)
            if notes is not None:
                notes.append(note)
    from sklearn.decomposition import PCA  # noqa: PLC0415

    n_comp = min(2, x.shape[0], x.shape[1])
    emb = PCA(n_components=n_comp, random_state=seed).fit_transform(x) if n_comp else np.zeros((len(x), 2))
    if emb.shape[1] < 2:
        emb = np.pad(emb, ((0, 0), (0, 2 - emb.shape[1])))
    return emb, "PCA"


def _umap(x: np.ndarray, seed: int) -> np.ndarray:
    import warnings  # noqa: PLC0415

    import umap  # noqa: PLC0415

    cache_umap_kernels()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return umap.UMAP(n_neighbors=min(15, len(x) - 1), random_state=seed, n_jobs=1).fit_transform(x)


@functools.cache
def cache_umap_kernels() -> int:
    """Numba's on-disk cache for umap-learn's and pynndescent's jitted functions (most are not ``cache=True``):
    without it every process compiles them on its first UMAP, ~35 s on 2 cores; with it that happens once per
    machine (files next to their sources, or numba's user cache dir) and later processes load them in < 1 s.
    Returns how many functions were switched; a function numba cannot cache just keeps compiling."""
    import umap  # noqa: F401, PLC0415
    from numba.core.registry import CPUDispatcher  # noqa: PLC0415

    n = 0
    for name, mod in list(sys.modules.items()):
        if not name.startswith(("umap", "pynndescent")) or mod is None:
            continue
        for fn in list(vars(mod).values()):
            if isinstance(fn, CPUDispatcher) and type(fn._cache).__name__ == "NullCache":
                try:
                    fn.enable_caching()
                    n += 1
                except Exception:  # noqa: BLE001 - e.g. no writable cache location: compile as before
                    pass
    return n


def plot_embedding(emb: np.ndarray, colour_by: np.ndarray, title: str, path: Path, legend_names=None) -> Path:
    plt = _plt()
    values = np.asarray(colour_by).astype(str)
    cats = sorted(set(values.tolist()), key=lambda v: (len(v), v))
    cmap = plt.get_cmap("tab20" if len(cats) > 10 else "tab10")
    fig, ax = plt.subplots(figsize=(6, 5))
    for i, c in enumerate(cats):
        m = values == c
        label = legend_names.get(c, c) if legend_names else c
        ax.scatter(emb[m, 0], emb[m, 1], s=4, alpha=0.7, color=cmap(i % cmap.N), label=f"{label} ({m.sum()})")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=6, markerscale=2, loc="center left", bbox_to_anchor=(1, 0.5), frameon=False)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


def figures_for(fs, result: dict[str, Any], out_dir: Path, stem: str, *, embedding: str = "umap",
                embedding_max: int = 3000, seed: int = 0, standardize: bool = False) -> list[Path]:
    """Confusion matrices (pooled out-of-fold / test predictions) and the 2-D embedding PNGs."""
    paths: list[Path] = []
    names = result.get("classes", {})
    for clf, cr in result["classifiers"].items():
        pooled = cr.get("pooled")
        if not pooled:  # cross-source results carry matrices, not pooled predictions
            if "matrix" in cr:
                paths.append(plot_matrix(cr["matrix"]["balanced_accuracy"], result["matrix_sources"],
                                         f"{stem} - {clf} cross-source", out_dir / f"{stem}__xsource_{clf}.png"))
            continue
        labs = [str(x) for x in pooled["labels"]]
        cls = [f"{lab}:{names.get(lab, lab)}"[:22] for lab in labs]
        title = f"{stem} - {clf} (bal. acc {100 * pooled['balanced_accuracy']:.1f}%)"
        paths.append(plot_confusion(pooled["confusion_matrix"], cls, title, out_dir / f"{stem}__confusion_{clf}.png"))
    if embedding != "none" and len(fs):
        rng = np.random.default_rng(seed)
        idx = np.arange(len(fs))
        if len(idx) > embedding_max:
            idx = np.sort(rng.choice(idx, embedding_max, replace=False))
        x = fs.features[idx]
        if standardize:  # hand-crafted features live on different scales
            x = (x - x.mean(0)) / np.maximum(x.std(0), 1e-8)
        emb, how = embed_2d(x, embedding, seed, notes=result.setdefault("notes", []))
        label_names = {str(k): f"{k}:{v}" for k, v in fs.class_names.items()}
        paths.append(plot_embedding(emb, fs.labels[idx], f"{stem} - {how} by label", out_dir / f"{stem}__{how.lower()}_label.png", label_names))
        paths.append(plot_embedding(emb, fs.sources[idx], f"{stem} - {how} by source", out_dir / f"{stem}__{how.lower()}_source.png"))
    return paths


# --------------------------------------------------------------------------------------------------
# MLflow
# --------------------------------------------------------------------------------------------------


def _metric_key(*parts: str) -> str:
    return "/".join(re.sub(r"[^A-Za-z0-9_.\- ]+", "_", p) for p in parts if p)[:250]


def model_metrics(model_entry: dict[str, Any]) -> dict[str, float]:
    """Flat ``{data/variant/classifier/metric: value}`` (mean, plus ``_std``) for one model."""
    out: dict[str, float] = {}
    for ev in model_entry.get("evals", []):
        flat = Scores.of(ev["result"]).flat(prefix=_metric_key(ev.get("key") or ev["name"]) + "/", sep="/")
        out.update({k[:250]: v for k, v in flat.items()})
    return out


def ensure_experiment(name: str, uri: str) -> str:
    """The id of experiment ``name`` in the store at ``uri``, created if new; in a sqlite store a new experiment keeps
    its artifacts beside the db file (MLflow's default would be ``./mlruns`` under the current directory). A failed
    creation is an error naming the store, unless another process created the experiment meanwhile."""
    from mlflow.tracking import MlflowClient  # noqa: PLC0415

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").resolve().as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception as exc:  # noqa: BLE001 - MLflow's own error types
        exp = client.get_experiment_by_name(name)  # created concurrently by another process: fine
        if exp is not None:
            return exp.experiment_id
        raise RuntimeError(f"MLflow at {uri}: cannot create experiment {name!r}: {str(exc).splitlines()[0]}") from exc


def log_mlflow(results: dict[str, Any], out_dir: Path, *, tracking_uri: str | None = None,
               experiment: str = "reddino-eval") -> list[str]:
    """One MLflow run per evaluated model: params, metrics, tags linking the model, all artifacts."""
    from reddino.runtime import default_tracking_uri, mlflow_at  # noqa: PLC0415

    uri = tracking_uri or default_tracking_uri()
    with mlflow_at(uri):
        return _log_runs(results, out_dir, ensure_experiment(experiment, uri))


def _log_runs(results: dict[str, Any], out_dir: Path, experiment_id: str) -> list[str]:
    import mlflow  # noqa: PLC0415

    settings = results.get("settings", {})
    run_ids = []
    for model in results.get("models", []):
        info = model.get("info", {})
        tags = {
            "reddino.kind": "evaluation",
            "reddino.eval_id": results.get("eval_id", ""),
            "reddino.model_ref": str(model["ref"])[:5000],
            "reddino.model_kind": str(info.get("kind", "")),
            "reddino.model_hash": str(info.get("hash", "")),
            "reddino.protocol": str(settings.get("protocol", "")),
        }
        if info.get("model_run_id"):
            tags["reddino.model_run_id"] = str(info["model_run_id"])
        if info.get("model_version"):
            tags["reddino.model_version"] = str(info["model_version"])
        if info.get("model_name"):
            tags["reddino.model_name"] = str(info["model_name"])
        name = f"eval {slug(Path(str(model['ref'])).name or str(model['ref']), 40)} {settings.get('protocol')}"
        with mlflow.start_run(experiment_id=experiment_id, run_name=name, tags=tags) as run:
            params = {k: (",".join(map(str, v)) if isinstance(v, (list, tuple)) else v) for k, v in settings.items()}
            params.update({f"model.{k}": v for k, v in info.items() if k in ("arch", "img_size", "embed_dim", "kind", "patch_size")})
            mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
            metrics = model_metrics(model)
            metrics.update({k: v for k, v in (model.get("headline") or {}).items() if v is not None})
            if metrics:
                mlflow.log_metrics(metrics)
            for f in ("results.json", "report.md", "report.html", "metrics.json"):
                if (out_dir / f).is_file():
                    mlflow.log_artifact(str(out_dir / f))
            for p in model.get("figures", []):
                if Path(p).is_file():
                    mlflow.log_artifact(str(p), artifact_path="figures")
            run_ids.append(run.info.run_id)
    return run_ids
