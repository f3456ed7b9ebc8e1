"""Sweep results for people: the best config as a ready YAML, the ablation table, and plots."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pandas as pd

from reddino.paths import save_figure

from reddino.tune.space import SweepSpace, params_to_overrides

def _in_training(space: SweepSpace) -> list[tuple[str, str]]:
    """The in-training scores (label, trial-table column): kNN-1, kNN at the trials' ``eval.k``, the probe."""
    k = space.k or 20
    return list(dict.fromkeys([("kNN-1", "eval_knn1_balanced_accuracy"), (f"kNN-{k}", f"eval_knn{k}_balanced_accuracy"),
                               ("probe", "eval_probe_balanced_accuracy")]))


def write_best_config(space: SweepSpace, params: dict[str, Any], path: Path) -> Path:
    cfg = space.base_config(params_to_overrides(_plain(params)))
    cfg.name = f"{cfg.name}-best"
    return cfg.to_yaml(path)


def _plain(params: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in params.items():
        out[k] = v.item() if hasattr(v, "item") else v
    return out


_FINAL = [("kNN-1", "final_knn1"), ("kNN-20", "final_knn20"), ("probe", "final_probe")]
_METRICS = [("bal. acc.", "balanced_accuracy"), ("F1w", "f1_weighted")]


def _arm_scores(table: pd.DataFrame, space: SweepSpace) -> tuple[list[tuple[str, str]], list[str]]:
    """The scores of the ablation table (label, trial-table column) and the ones that get a Δ vs the recipe:
    the final evaluation's when it ran, else the in-training kNN."""
    final = [(f"{label} {mlabel}", f"{col}_{metric}") for mlabel, metric in _METRICS for label, col in _FINAL
             if f"{col}_{metric}" in table and table[f"{col}_{metric}"].notna().any()]
    if final:
        scores = final + ([(f"in-training {_metric_label(space)}", space.metric)] if space.metric in table else [])
        have = {col for _, col in final}
        return scores, [c for c in ("final_knn20_balanced_accuracy", "final_probe_balanced_accuracy") if c in have]
    scores = [(f"{label} bal. acc. (in-training)", col) for label, col in _in_training(space) if col in table]
    scores = scores or [(f"{_metric_label(space)} (in-training)", space.metric)]
    return scores, [scores[-1][1]]


def _in_training_label(col: str) -> str:
    """``eval_knn10_balanced_accuracy`` → ``kNN-10``, ``eval_probe_balanced_accuracy`` → ``probe``."""
    m = re.fullmatch(r"eval_knn(\d+)_balanced_accuracy", col)
    return f"kNN-{m.group(1)}" if m else col.removeprefix("eval_").removesuffix("_balanced_accuracy")


def _metric_label(space: SweepSpace) -> str:
    return f"kNN-{space.k}" if space.k is not None else space.metric.removeprefix("eval_")


def ablation_summary(table: pd.DataFrame, space: SweepSpace) -> pd.DataFrame:
    """One row per ablation arm (the recipe first): ``seeds`` (trials with a score) and for every score
    ``<score>_mean`` and ``<score>_std`` over the arm's seeds (NaN with one seed), ``<score>_fold_std`` (the
    final evaluation's std over folds, averaged over seeds), and for the headline scores ``<score>_delta`` (arm −
    recipe) and ``<score>_noise``: "within noise" when |Δ| ≤ the larger of the two arms' std over seeds,
    "beyond noise" otherwise, "n/a" when either arm has a single seed."""
    scores, headline = _arm_scores(table, space)
    order = ["recipe"] + [v for v in dict.fromkeys(table["variant"]) if v != "recipe"]
    rows = []
    for name in order:
        arm = table[table["variant"] == name]
        if not len(arm) and name == "recipe":
            continue
        axis, value = ("recipe", "—") if name == "recipe" else str(name).split("=", 1)
        row: dict[str, Any] = {"axis": axis, "value": value, "variant": name,
                               "seeds": int(arm[headline[0]].notna().sum()) if headline[0] in arm else 0}
        for _, col in scores:
            vals = pd.to_numeric(arm[col], errors="coerce").dropna() if col in arm else pd.Series(dtype=float)
            row[f"{col}_mean"] = float(vals.mean()) if len(vals) else float("nan")
            row[f"{col}_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else float("nan")
            if f"{col}_std" in arm:
                row[f"{col}_fold_std"] = float(pd.to_numeric(arm[f"{col}_std"], errors="coerce").mean())
        rows.append(row)
    summary = pd.DataFrame(rows)
    ref = summary[summary["variant"] == "recipe"]
    for col in headline:
        deltas, verdicts = [], []
        for _, row in summary.iterrows():
            base = ref.iloc[0] if len(ref) else None
            if row["variant"] == "recipe" or base is None or pd.isna(row[f"{col}_mean"]) or pd.isna(base[f"{col}_mean"]):
                deltas.append(float("nan"))
                verdicts.append("")
                continue
            delta = float(row[f"{col}_mean"] - base[f"{col}_mean"])
            deltas.append(delta)
            spread = [row[f"{col}_std"], base[f"{col}_std"]]
            if any(pd.isna(x) for x in spread):
                verdicts.append("n/a")
            else:
                verdicts.append("within noise" if abs(delta) <= max(spread) else "beyond noise")
        summary[f"{col}_delta"] = deltas
        summary[f"{col}_noise"] = verdicts
    return summary


def _headline(summary: pd.DataFrame) -> list[str]:
    """The scores :func:`ablation_summary` gave a Δ vs the recipe."""
    return [c[: -len("_delta")] for c in summary.columns if str(c).endswith("_delta")]


def check_claims(summary: pd.DataFrame, space: SweepSpace) -> pd.DataFrame:
    """The space's ``claims`` against :func:`ablation_summary`: a ``claim`` column and per headline score a
    ``<score>_verdict`` (see :func:`_verdict`); the summary unchanged when the space states no claims."""
    if not space.claims:
        return summary
    summary = summary.copy()
    summary["claim"] = [space.claims.get(a, {}).get("claim", "") for a in summary["axis"]]
    for col in _headline(summary):
        summary[f"{col}_verdict"] = [_verdict(row, col, space.claims.get(row["axis"]), space.recipe.get(row["axis"]))
                                     for _, row in summary.iterrows()]
    return summary


def _verdict(row, col: str, claim: dict[str, Any] | None, recipe_value: Any) -> str:
    """Does this arm's Δ vs the recipe bear out the claim on its axis? "confirmed" / "contradicted" when the Δ is
    beyond noise in / against the claimed direction; "within noise"; "n/a" with one seed or no claimed direction."""
    if claim is None or row["variant"] == "recipe":
        return ""
    noise, delta = row.get(f"{col}_noise"), row.get(f"{col}_delta")
    if noise != "beyond noise" or delta is None or pd.isna(delta):
        return noise or "n/a"
    better = str(claim["better"]) if "better" in claim else None
    if better == str(row["value"]):
        return "confirmed" if delta > 0 else "contradicted"
    if better == str(recipe_value):
        return "confirmed" if delta < 0 else "contradicted"
    return "beyond noise (no claimed direction)"


def ablation_table(summary: pd.DataFrame, eval_data: str | None = None) -> str:
    """Markdown of :func:`ablation_summary`: axis, value, seeds, every score as mean ± std, Δ vs the recipe."""
    final = any(str(c).startswith("final_") for c in summary.columns)
    scores = [c[: -len("_mean")] for c in summary.columns if str(c).endswith("_mean")]
    headline = _headline(summary)
    many = bool(len(summary)) and int(summary["seeds"].max()) > 1
    labels = {f"{col}_{metric}": f"{label} {mlabel}" for mlabel, metric in _METRICS for label, col in _FINAL}
    labels.update({col: f"{_in_training_label(col)} (in-training)" for col in scores if col.startswith("eval_")})

    def cell(row, col: str) -> str:
        mean = row.get(f"{col}_mean")
        if mean is None or pd.isna(mean):
            return "n/a"
        std = row.get(f"{col}_std") if many else row.get(f"{col}_fold_std")
        return f"{mean:.3f}" + ("" if std is None or pd.isna(std) else f" ± {std:.3f}")

    what = (f"full protocol (kfold, 5 folds grouped by smear) on {eval_data}" if final and eval_data
            else "full protocol (kfold, 5 folds grouped by smear)" if final else "in-training kNN")
    if many:
        spread = ("Mean ± std over seeds" + (" (the folds' std is in ablation.csv)" if final else "")
                  + "; Δ = arm mean − recipe mean, "
                  "'within noise' when |Δ| ≤ the larger of the two arms' std over seeds.")
    else:
        spread = ("One seed: " + ("± is the std over folds; " if final else "")
                  + "the run-to-run spread is not measured, so 'within noise' is n/a.")
    head = ["axis", "value", "seeds"] + [labels.get(c, c) for c in scores] + \
        [f"Δ {labels.get(c, c)}" for c in headline]
    lines = [f"Ablation scores: {what}. {spread}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, row in summary.iterrows():
        cells = [str(row["axis"]), str(row["value"]), str(int(row["seeds"]))] + [cell(row, c) for c in scores]
        for c in headline:
            d = row.get(f"{c}_delta")
            cells.append("—" if row["variant"] == "recipe" or d is None or pd.isna(d)
                         else f"{d:+.3f} ({row.get(f'{c}_noise') or 'n/a'})")
        lines.append("| " + " | ".join(cells) + " |")
    if "claim" in summary:
        lines += ["", "The claims on each axis against this table ('confirmed' / 'contradicted': the Δ is beyond "
                  "noise, in / against the claimed direction):", ""]
        head = ["axis", "arm", "claim"] + [f"{labels.get(c, c)}: Δ, verdict" for c in headline]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for _, row in summary.iterrows():
            if row["variant"] == "recipe" or not row["claim"]:
                continue
            cells = [str(row["axis"]), str(row["value"]), str(row["claim"])]
            for c in headline:
                d = row.get(f"{c}_delta")
                cells.append("n/a" if d is None or pd.isna(d) else f"{d:+.3f}, {row.get(f'{c}_verdict') or 'n/a'}")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


_VERDICT_COLOURS = {"confirmed": "tab:green", "contradicted": "tab:red", "beyond noise": "tab:blue"}


def ablation_effects_plot(summary: pd.DataFrame, out: Path) -> Path | None:
    """``ablation_effects.png``: every arm's Δ vs the recipe per headline score, the bar the noise the verdict
    used (the larger of the two arms' std over seeds), coloured by the claim's verdict (grey: within noise)."""
    headline = _headline(summary)
    arms = summary[summary["variant"] != "recipe"]
    if not headline or not len(arms):
        return None
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    ref = summary[summary["variant"] == "recipe"]
    labels = {f"{col}_balanced_accuracy": f"{label} balanced accuracy" for label, col in _FINAL}
    fig, axes = plt.subplots(1, len(headline), figsize=(4.5 * len(headline), 0.45 * len(arms) + 1.6), sharey=True,
                             squeeze=False)
    ys = list(range(len(arms)))[::-1]
    for ax, col in zip(axes[0], headline):
        base_std = float(ref.iloc[0][f"{col}_std"]) if len(ref) and f"{col}_std" in ref else float("nan")
        for y, (_, row) in zip(ys, arms.iterrows()):
            noise = max(float(row.get(f"{col}_std", float("nan"))), base_std)
            verdict = str(row.get(f"{col}_verdict") or row.get(f"{col}_noise") or "")
            colour = next((c for k, c in _VERDICT_COLOURS.items() if verdict.startswith(k)), "grey")
            ax.errorbar(row[f"{col}_delta"], y, xerr=None if pd.isna(noise) else noise, fmt="o", color=colour,
                        capsize=3)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_xlabel(f"Δ {labels.get(col, col)} vs recipe")
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(ys, [f"{r['axis']}={r['value']}" for _, r in arms.iterrows()], fontsize=8)
    fig.suptitle("ablation: arm − recipe (bar: noise; green/red: claim confirmed/contradicted)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, out, dpi=100)
    plt.close(fig)
    return Path(out)


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


_STYLE_NAMES = {"-": "solid", "--": "dashed", ":": "dotted", "-.": "dash-dot"}


def trial_curves(table: pd.DataFrame, space: SweepSpace, out: Path, client=None) -> Path | None:
    """``learning_curves.png``: every trial's in-training score (the sweep metric) by step, one line per trial
    (ablation: labelled by arm), read back from the trials' MLflow runs. None when no trial logged it."""
    from mlflow.tracking import MlflowClient

    client = client or MlflowClient()
    curves = []
    for _, row in table.iterrows():
        run_id = row.get("mlflow_run_id")
        if not isinstance(run_id, str) or not run_id:
            continue
        hist = sorted((m.step, m.value) for m in client.get_metric_history(run_id, space.metric))
        if hist:
            seed = int(row["seed"]) if "seed" in row and pd.notna(row.get("seed")) else None
            curves.append((str(row.get("variant") or row.get("trial")), seed, hist))
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    # One colour per arm (ablation) or trial; the seeds of an arm differ by line style, its name is shown once.
    names = list(dict.fromkeys(c[0] for c in curves))
    cmap = plt.cm.tab10 if len(names) <= 10 else plt.cm.tab20
    colours = {name: cmap(i % cmap.N) for i, name in enumerate(names)}
    seeds = sorted({c[1] for c in curves if c[1] is not None})
    styles = ["-", "--", ":", "-."]
    fig, ax = plt.subplots(figsize=(8, 5))
    named = set()
    for name, seed, hist in curves:
        steps, values = zip(*hist)
        style = styles[seeds.index(seed) % len(styles)] if seed is not None and len(seeds) > 1 else "-"
        ax.plot(steps, values, marker="o", ms=3, color=colours[name], ls=style,
                # matplotlib hides labels starting with "_" (Tune names trials after our `_trial` function)
                label=None if name in named else name.lstrip("_"), lw=2.2 if name == "recipe" else 1.2)
        named.add(name)
    ax.set_xlabel("step")
    ax.set_ylabel(space.metric.removeprefix("eval_").replace("_", " "))
    ax.set_title("in-training score of every trial"
                 + (" (" + ", ".join(f"seed {s} {_STYLE_NAMES[styles[i % len(styles)]]}" for i, s in enumerate(seeds))
                    + ")" if len(seeds) > 1 else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    save_figure(fig, out, dpi=100)
    plt.close(fig)
    return Path(out)

