"""`eval.k` is honoured by everything that shows the in-training kNN: the console line, the live bar, the learning
curve, the sweep metric and the sweep report (eval.k=10 here; 20 is the default)."""

import numpy as np
import pandas as pd
import pytest

from reddino.config import ConfigError, load_config
from reddino.train.curves import metric_histories, plot_learning_curve
from reddino.train.progress import step_text
from reddino.tune.report import ablation_summary, ablation_table
from reddino.tune.space import load_space


def _cfg(k: int):
    return load_config("tiny_cpu", [f"eval.k={k}"])


def test_knn_eval_line_names_the_configured_k(tmp_path, capsys):
    import torch

    from reddino.data import generate_synthetic
    from reddino.model import create_backbone
    from reddino.train.hooks import KnnEval

    generate_synthetic(tmp_path / "cells", n_per_class=4, sources=2, unit="cell", seed=0, size=32)
    cfg = load_config("tiny_cpu", ["eval.k=10", f"eval.data={tmp_path / 'cells'}", "model.img_size=32",
                                   "eval.max_images=200"])

    class Model(torch.nn.Module):  # the SSL wrapper's shape: a teacher dict holding the backbone
        def __init__(self):
            super().__init__()
            self.teacher = torch.nn.ModuleDict({"backbone": create_backbone("vit_mini_patch8_reddino", img_size=32)})

    out = KnnEval(cfg, "cpu")(Model(), step=4, is_last=False)
    assert cfg.eval.metric == "eval_knn10_balanced_accuracy" in out
    assert "kNN-10 " in capsys.readouterr().out


def test_live_bar_text_and_learning_curve_follow_k(tmp_path):
    assert "kNN-10 0.512" in step_text({"loss": 1.0, "lr": 1e-3, "ips": 5.0, "knn_k": 10, "knn": 0.512})
    assert "kNN" not in step_text({"loss": 1.0, "lr": 1e-3, "ips": 5.0, "knn_k": 10, "knn": None})

    class Client:  # MLflow's metric history of a run that evaluated at k=10
        def get_metric_history(self, run_id, key):
            from types import SimpleNamespace

            hist = {"eval_knn10_balanced_accuracy": [(2, 0.3), (4, 0.4)], "loss_dino": [(2, 5.0), (4, 4.0)]}
            return [SimpleNamespace(step=s, value=v) for s, v in hist.get(key, [])]

    hist = metric_histories(Client(), "run", k=10)
    assert set(hist) == {"eval_knn10_balanced_accuracy", "loss_dino"}
    assert metric_histories(Client(), "run", k=20).keys() == {"loss_dino"}  # what the fixed kNN-20 curve lost
    png = plot_learning_curve(hist, tmp_path / "curve.png", k=10)
    assert png is not None and png.read_bytes()[:4] == b"\x89PNG"


def test_sweep_metric_and_report_follow_k():
    space = load_space("ablation")
    assert space.metric == "eval_knn20_balanced_accuracy" and not space.metric_named
    ten = space.for_config(_cfg(10))
    assert ten.metric == "eval_knn10_balanced_accuracy" and ten.k == 10

    named = type(space)(**{**space.__dict__, "metric": "eval_knn20_balanced_accuracy", "metric_named": True})
    with pytest.raises(ConfigError, match="eval.k=10"):
        named.for_config(_cfg(10))
    assert named.for_config(_cfg(20)) is named

    rng = np.random.default_rng(0)
    table = pd.DataFrame({"variant": ["recipe", "recipe", "loss.koleo_weight=0.0", "loss.koleo_weight=0.0"],
                          "axis": ["-", "-", "loss.koleo_weight", "loss.koleo_weight"],
                          "value": ["-", "-", 0.0, 0.0], "seed": [0, 1, 0, 1],
                          "eval_knn10_balanced_accuracy": rng.uniform(0.3, 0.5, 4),
                          "eval_knn1_balanced_accuracy": rng.uniform(0.3, 0.5, 4)})
    summary = ablation_summary(table, ten)
    assert "eval_knn10_balanced_accuracy_delta" in summary.columns
    assert "| kNN-10 (in-training) |" in ablation_table(summary)
