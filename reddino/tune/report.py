"""Sweep results for people: the best config as a ready YAML, the ablation table, and plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from reddino.paths import save_figure

from reddino.tune.space import SweepSpace, params_to_overrides

_SCORES = [("kNN-1", "eval_knn1_balanced_accuracy"), ("kNN-20", "eval_knn20_balanced_accuracy"),
           ("probe", "eval_probe_balanced_accuracy")]


def write_best_config(space: SweepSpace, params: dict[str, Any], path: Path) -> Path:
    cfg = space.base_config(params_to_overrides(_plain(params)))
    cfg.name = f"{cfg.name}-best"
    return cfg.to_yaml(path)


def _plain(params: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in params.items():
        out[k] = v.item() if hasattr(v, "item") else v
    return out


def ablation_table(table: pd.DataFrame, space: SweepSpace) -> str:
    """Markdown: axis, value, kNN-1 / kNN-20 / probe balanced accuracy and Δ vs the recipe."""
    cols = [(label, col) for label, col in _SCORES if col in table]
    if not cols:
        cols = [("kNN-20 (in-training)", space.metric)]
    recipe = table[table["variant"] == "recipe"]
    ref = {col: float(recipe[col].iloc[0]) if len(recipe) and pd.notna(recipe[col].iloc[0]) else None for _, col in cols}
    head = "| axis | value | " + " | ".join(f"{label} bal. acc." for label, _ in cols) + " | Δ " + cols[-1][0] + " |"
    lines = [head, "|" + "---|" * (len(cols) + 3)]
    ordered = pd.concat([recipe, table[table["variant"] != "recipe"]])
    for _, row in ordered.iterrows():
        name = str(row["variant"])
        axis, value = ("recipe", "—") if name == "recipe" else name.split("=", 1)
        cells = []
        for _, col in cols:
            v = row.get(col)
            cells.append("n/a" if v is None or pd.isna(v) else f"{float(v):.3f}")
        last = row.get(cols[-1][1])
        base = ref[cols[-1][1]]
        delta = "—" if name == "recipe" or base is None or last is None or pd.isna(last) else f"{float(last) - base:+.3f}"
        lines.append(f"| {axis} | {value} | " + " | ".join(cells) + f" | {delta} |")
    return "\n".join(lines) + "\n"


def sweep_plots(table: pd.DataFrame, space: SweepSpace, out_dir: Path) -> list[Path]:
    """Optuna's own plots (history, importances, parallel coordinates) from the finished trials."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    distributions = space.optuna_space()
    study = optuna.create_study(direction="maximize" if space.mode == "max" else "minimize")
    for _, row in table.iterrows():
        value = row.get(space.metric)
        if value is None or pd.isna(value):
            continue
        params = {}
        for key, dist in distributions.items():
            v = row.get(f"param.{key}")
            if v is None or (not isinstance(v, str) and pd.isna(v)):
                break
            params[key] = v.item() if hasattr(v, "item") else v
        else:
            study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions, value=float(value)))
    paths = []
    plots = {"optimization_history": ovm.plot_optimization_history,
             "parallel_coordinate": ovm.plot_parallel_coordinate,
             "param_importances": ovm.plot_param_importances}
    import warnings

    for name, fn in plots.items():
        try:
            with warnings.catch_warnings():  # "experimental (supported from v2.2.0)": a notice for Optuna's users
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                fn(study)
        except Exception as exc:  # e.g. importances need ≥2 trials with varying params
            print(f"[reddino] skipped {name} plot: {exc}")
            plt.close("all")
            continue
        path = out_dir / f"{name}.png"
        plt.gcf().set_size_inches(8, 5)
        plt.tight_layout()
        save_figure(plt.gcf(), path, dpi=100)
        plt.close("all")
        paths.append(path)
    return paths
