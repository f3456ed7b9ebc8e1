"""The learning curve of a pretraining run as a picture: in-training kNN, RankMe and the loss parts by step.

Read back from the run's MLflow metric history (what the loop logged), written next to the run's other files
and logged to the run as ``learning_curve.png``.
"""

from __future__ import annotations

from pathlib import Path

def panels(k: int = 20) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The panels and their metrics; the kNN panel shows the run's own ``eval.k``."""
    return (
        ("kNN balanced accuracy (in-training)", tuple(dict.fromkeys((
            f"eval_knn{k}_balanced_accuracy", "eval_knn1_balanced_accuracy", "eval_probe_balanced_accuracy")))),
        ("RankMe (teacher CLS)", ("rankme",)),
        ("loss", ("loss_dino", "loss_ibot", "loss_koleo")),
    )


def metric_histories(client, run_id: str, k: int = 20) -> dict[str, list[tuple[int, float]]]:
    out = {}
    for _, keys in panels(k):
        for key in keys:
            hist = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
            if hist:
                out[key] = hist
    return out


def plot_learning_curve(histories: dict[str, list[tuple[int, float]]], out: Path, title: str = "",
                        k: int = 20) -> Path | None:
    """One row of panels (kNN, RankMe, loss parts) → PNG (temp name, then rename). None when nothing was logged."""
    shown = [(name, [key for key in keys if key in histories]) for name, keys in panels(k)]
    shown = [(name, keys) for name, keys in shown if keys]
    if not shown:
        return None
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 3.2), squeeze=False)
    for ax, (name, keys) in zip(axes[0], shown):
        for key in keys:
            steps, values = zip(*histories[key])
            label = key.removeprefix("eval_").removeprefix("loss_").replace("_balanced_accuracy", "")
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, ms=3, label=label)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    from reddino.paths import save_figure

    save_figure(fig, out)
    plt.close(fig)
    return Path(out)
