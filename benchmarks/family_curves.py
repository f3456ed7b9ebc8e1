"""Learning curves of several pretraining runs side by side (e.g. ViT vs ConvNeXt), by step and by wall-clock minute.

Reads each run's in-training kNN and RankMe back from MLflow (the run dir's ``mlflow_run_id``) and draws one PNG:
kNN-k balanced accuracy against images seen and against minutes since the run started (the budget a 2-core machine
has), and RankMe against images seen. Prints the points as a table.

    python benchmarks/family_curves.py --run "ViT-Mini/8=~/.reddino/runs/chula-mini" \\
        --run "ConvNeXt-Atto/16=~/.reddino/runs/chula-convatto16" --out docs/family_curves_chula.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from _common import header  # noqa: E402


def _history(client, run_dir: Path, k: int) -> dict[str, list[tuple[int, float, float]]]:
    """metric → [(step, minutes since the run started, value)]."""
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    start = client.get_run(run_id).info.start_time
    out = {}
    for key in (f"eval_knn{k}_balanced_accuracy", "rankme"):
        hist = sorted((m.step, (m.timestamp - start) / 60000, m.value) for m in client.get_metric_history(run_id, key))
        if hist:
            out[key] = hist
    return out


def _batch(run_dir: Path) -> int:
    cfg = yaml.safe_load((run_dir / "run_config.yaml").read_text())
    return int(cfg["train"]["batch_size_per_worker"]) * int(cfg["train"]["num_workers"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", action="append", required=True, help="LABEL=RUN_DIR (repeatable)")
    ap.add_argument("--out", type=Path, required=True, help="PNG to write")
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--tracking-uri", default=None, help="default: the runs' store ($REDDINO_HOME/mlflow.db)")
    args = ap.parse_args()

    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from mlflow import MlflowClient

    from reddino.paths import save_figure
    from reddino.runtime import default_tracking_uri

    header("family curves")
    client = MlflowClient(args.tracking_uri or default_tracking_uri())
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    knn = f"eval_knn{args.k}_balanced_accuracy"
    for spec in args.run:
        label, _, path = spec.partition("=")
        run_dir = Path(path).expanduser()
        if not (run_dir / "mlflow_run_id").is_file():
            raise SystemExit(f"--run {spec}: {run_dir} is not a run dir (no mlflow_run_id)")
        hist, batch = _history(client, run_dir, args.k), _batch(run_dir)
        if knn not in hist:
            raise SystemExit(f"--run {spec}: the run logged no {knn}")
        for ax, key, x in ((axes[0], knn, "images"), (axes[1], knn, "minutes"), (axes[2], "rankme", "images")):
            points = hist.get(key, [])
            xs = [s * batch for s, _, _ in points] if x == "images" else [m for _, m, _ in points]
            ax.plot(xs, [v for _, _, v in points], marker="o", ms=3, label=label)
        for step, minute, value in hist[knn]:
            print(f"{label:24s} step {step:5d}  images {step * batch:7d}  minute {minute:6.1f}  kNN-{args.k} {value:.3f}")
    for ax, title, xlabel in zip(axes, (f"kNN-{args.k} balanced accuracy (in-training)", f"kNN-{args.k} by wall clock",
                                        "RankMe"), ("images seen", "minutes since start", "images seen")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, args.out)
    plt.close(fig)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
