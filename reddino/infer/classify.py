"""`reddino classify`: morphology predictions per cell and the per-smear / per-source fractions a reader wants.

Embeds the dataset once (in the shared embedding store, where a store ``reddino embed`` made is read instead; see
:mod:`reddino.features.embedding`), applies the probe, and
writes ``predictions.parquet`` / ``.csv`` (class id, class name, one probability column per class),
``summary_by_smear.csv``, ``summary_by_source.csv``, ``summary.md`` and ``morphology.png``; with labelled rows
also ``metrics.json`` (balanced accuracy etc. of the probe on them). A probe fitted on another backbone is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from reddino.paths import atomic_path, save_figure

from reddino.features.embedding import DEFAULT_ROOT, embed
from reddino.features.models import resolve
from reddino.features.store import EmbedError, read_embeddings

from .probe import Probe, backbone_link, load_probe


@dataclass
class ClassifyResult:
    out: Path
    predictions: pd.DataFrame
    by_smear: pd.DataFrame
    by_source: pd.DataFrame
    metrics: dict[str, Any] | None
    files: dict[str, str]


def check_backbone(probe: Probe, info: dict[str, Any], model_ref: str, probe_ref: str) -> None:
    """The probe's features must come from the very backbone it was fitted on (same weights, bit for bit)."""
    want, got = probe.meta.get("backbone_hash"), info.get("hash")
    if want != got:
        raise EmbedError(
            f"probe {probe_ref} was fitted on backbone {probe.meta.get('backbone')} (weights {str(want)[:12]}), "
            f"but --model {model_ref} is {backbone_link(info)} (weights {str(got)[:12]}); use that backbone, or "
            f"fit a probe for this one: reddino probe fit --model {model_ref} --data <labelled dir>")


def _atomic(path: Path, write) -> None:
    with atomic_path(path) as tmp:
        write(tmp)


def fractions(pred: pd.DataFrame, by: str, classes: list[str]) -> pd.DataFrame:
    """Per ``by`` value: cell count, then count and fraction of each class (fractions sum to 1 per row)."""
    counts = pd.crosstab(pred[by], pred["class_name"]).reindex(columns=classes, fill_value=0)
    n = counts.sum(axis=1)
    out = pd.DataFrame({"cells": n})
    for c in classes:
        out[f"n_{c}"] = counts[c]
    for c in classes:
        out[f"frac_{c}"] = counts[c] / n
    return out.reset_index().sort_values(by)


def _plot(by_source: pd.DataFrame, by_smear: pd.DataFrame, classes: list[str], path: Path, max_smears: int = 40):
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    smears = by_smear.sort_values("cells", ascending=False).head(max_smears).sort_values("group")
    fig, axes = plt.subplots(2, 1, figsize=(11, 3 + 0.22 * (len(smears) + len(by_source))),
                             gridspec_kw={"height_ratios": [max(len(by_source), 1), max(len(smears), 1)]})
    cmap = plt.get_cmap("tab20")
    for ax, table, key, title in ((axes[0], by_source, "source", "per source"),
                                  (axes[1], smears, "group", f"per smear ({len(smears)} largest)")):
        left, rows = np.zeros(len(table)), np.arange(len(table))
        for i, c in enumerate(classes):
            vals = table[f"frac_{c}"].to_numpy()
            # numeric positions, names as tick labels: smear names like "28" made matplotlib log a notice per bar
            ax.barh(rows, vals, left=left, color=cmap(i % 20), label=c)
            left += vals
        ax.set_yticks(rows, table[key].astype(str).tolist())
        ax.set_xlim(0, 1)
        ax.set_title(f"predicted morphology, {title}", fontsize=10)
        ax.tick_params(axis="y", labelsize=7)
        ax.invert_yaxis()
    axes[0].legend(ncol=min(len(classes), 5), fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.15))
    axes[1].set_xlabel("fraction of cells")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def _markdown(by_source: pd.DataFrame, classes: list[str], metrics: dict | None, meta: dict) -> str:
    kind = meta.get("classifier") or "probe"
    kind = "linear probe" if kind == "probe" else f"{kind} classifier"  # never "probe probe"
    reg = meta.get("registered") or {}
    name = f" {reg['name']} v{reg['version']}" if reg.get("name") else ""
    lines = [f"# Morphology by source (backbone {meta['backbone']}; {kind}{name})", ""]
    head = "| source | cells | " + " | ".join(classes) + " |"
    lines += [head, "|" + "---|" * (len(classes) + 2)]
    for _, row in by_source.iterrows():
        fr = " | ".join(f"{row[f'frac_{c}']:.1%}" for c in classes)
        lines.append(f"| {row['source']} | {int(row['cells'])} | {fr} |")
    if metrics:
        lines += ["", f"Against the {metrics['n']} labelled cells: balanced accuracy "
                  f"{metrics['balanced_accuracy']:.3f}, accuracy {metrics['accuracy']:.3f}, weighted F1 "
                  f"{metrics['f1_weighted']:.3f}."]
    return "\n".join(lines) + "\n"


def classify(
    model: str,
    probe: str,
    data: str | Path,
    out: str | Path,
    *,
    batch_size: int = 64,
    concurrency: int = 1,
    num_cpus: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    cache_dir: str | Path = DEFAULT_ROOT,
) -> ClassifyResult:
    from reddino.evaluate.metrics import compute_metrics  # noqa: PLC0415

    out = Path(out).expanduser()
    p = load_probe(probe)
    net, info = resolve(model, p.meta.get("img_size"))
    check_backbone(p, info, model, str(probe))
    # The shared embedding store: a store `reddino embed` (or evaluate / probe fit) made of this model and data is
    # read, not recomputed; a new one is listed there for the next consumer.
    emb = embed((net, info), data, pooling=p.meta["pooling"], batch_size=batch_size, concurrency=concurrency,
                precision=p.meta.get("precision", "fp32"), num_cpus=num_cpus, overwrite=overwrite,
                progress=progress, root=cache_dir)
    table, X, manifest = read_embeddings(emb.out)
    if X.shape[1] != int(p.meta["feature_dim"]):
        raise EmbedError(f"{emb.out}: {X.shape[1]}-d embeddings, the probe takes {p.meta['feature_dim']}-d")
    ids = list(p.classes)
    names = [p.classes[i] for i in ids]
    proba = p.predict_proba(X) if len(X) else np.zeros((0, len(ids)))
    top = proba.argmax(1) if len(X) else np.zeros(0, dtype=int)
    pred = table.to_pandas()
    pred["class_id"] = np.asarray(ids, dtype=np.int64)[top]
    pred["class_name"] = np.asarray(names, dtype=object)[top]
    pred["confidence"] = proba.max(1) if len(X) else np.zeros(0)
    for j, name in enumerate(names):
        pred[f"p_{name}"] = proba[:, j].astype(np.float32)

    files = {k: str(out / v) for k, v in {
        "parquet": "predictions.parquet", "csv": "predictions.csv", "by_smear": "summary_by_smear.csv",
        "by_source": "summary_by_source.csv", "markdown": "summary.md", "plot": "morphology.png"}.items()}
    files["embeddings"] = str(emb.out)
    out.mkdir(parents=True, exist_ok=True)
    _atomic(Path(files["parquet"]), lambda t: pred.to_parquet(t, index=False))
    _atomic(Path(files["csv"]), lambda t: pred.to_csv(t, index=False))
    by_smear = fractions(pred, "group", names)
    by_source = fractions(pred, "source", names)
    _atomic(Path(files["by_smear"]), lambda t: by_smear.to_csv(t, index=False, float_format="%.4f"))
    _atomic(Path(files["by_source"]), lambda t: by_source.to_csv(t, index=False, float_format="%.4f"))

    metrics = None
    labelled = pred["label"].notna() & pred["label"].isin(ids)
    if labelled.any():
        y = pred.loc[labelled, "label"].astype(int).to_numpy()
        metrics = compute_metrics(y, pred.loc[labelled, "class_id"].to_numpy(), labels=ids)
        metrics["unscored_labelled"] = int((pred["label"].notna() & ~labelled).sum())  # classes the probe lacks
        _atomic(out / "metrics.json", lambda t: Path(t).write_text(json.dumps(metrics, indent=2) + "\n"))
        files["metrics"] = str(out / "metrics.json")
    _atomic(Path(files["markdown"]), lambda t: Path(t).write_text(_markdown(by_source, names, metrics, p.meta)))
    _plot(by_source, by_smear, names, Path(files["plot"]))
    return ClassifyResult(out, pred, by_smear, by_source, metrics, files)
