"""Sweeps on a real local Ray: Optuna + ASHA on in-training kNN, MLflow parent/child, resume."""

from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from reddino.data import generate_synthetic
from reddino.tune import sweep

TINY_CONFIG = str(Path(__file__).parents[1] / "tiny.yaml")  # the tests' own tiny recipe

TINY = [
    "data.resize=56", "crops.global_crops_size=56", "crops.local_crops_size=28", "model.img_size=56",
    "model.head_prototypes=128", "model.head_hidden_dim=64", "model.head_bottleneck_dim=32",
    "train.epochs=1", "train.iters_per_epoch=6", "train.batch_size_per_worker=8", "train.log_every=2",
    "train.checkpoint_every=6", "train.monitor_every=0", "eval.every=2", "eval.max_images=120",
    "optim.momentum_teacher=0.5",  # the teacher follows the student fast, so trials differ within 6 steps
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweepdata")
    generate_synthetic(root / "patches", n_per_class=2, sources=2, unit="patch", seed=0, n_patches=32)
    generate_synthetic(root / "cells", n_per_class=8, sources=2, unit="cell", seed=1)
    return root


@pytest.fixture()
def space_file(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({
        "base": TINY_CONFIG, "metric": "eval_knn20_balanced_accuracy", "mode": "max", "overrides": TINY,
        "space": {"optim.base_lr": {"loguniform": [1e-6, 1e-1]}, "loss.centering": {"choice": ["ema", "sinkhorn_knopp"]}},
        "scheduler": {"grace_period": 1, "reduction_factor": 3},
    }))
    return path


def test_two_trial_sweep_writes_results_study_and_mlflow_children(ray_fresh, data, space_file, tmp_path, mlflow_uri,
                                                                 capfd):
    result = sweep(space_file, data=[data / "patches"], eval_data=data / "cells", trials=2, out=tmp_path,
                   name="s")
    table = result.table
    # The console: a line per trial start, per scored report and per finish; not Tune's status tables.
    out = capfd.readouterr().out
    assert out.count("] trial ") >= 6 and out.count(" started: ") == 2 and "base_lr=" in out
    assert out.count("finished at step") == 2
    assert "step 2: eval_knn20_balanced_accuracy" in out and "(best so far)" in out
    assert "Trial status:" not in out and "Trial name" not in out
    assert len(table) == 2 and (table["error"] == "").all()
    best = yaml.safe_load(result.best_config_path.read_text())
    assert best["optim"]["base_lr"] == pytest.approx(result.best_params["optim.base_lr"])
    assert (result.sweep_dir / "trials.csv").exists() and (result.sweep_dir / "optimization_history.png").exists()
    client = MlflowClient(tracking_uri=mlflow_uri)
    children = client.search_runs(
        [client.get_run(result.parent_run_id).info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'",
    )
    assert len(children) == 2
    # The Optuna study persisted in the sweep dir: what optuna-dashboard shows, every trial with its value.
    import optuna

    study = optuna.load_study(study_name="s", storage=f"sqlite:///{result.sweep_dir / 'optuna.db'}")
    assert len(study.trials) == 2 and all(t.value is not None for t in study.trials)
    assert {round(t.value, 6) for t in study.trials} <= {round(v, 6) for v in table["eval_knn20_balanced_accuracy"]}


@pytest.mark.slow
def test_sweep_asha_stops_early(ray_fresh, data, space_file, tmp_path, mlflow_uri):
    result = sweep(space_file, data=[data / "patches"], eval_data=data / "cells", trials=4, out=tmp_path,
                   name="s")
    table = result.table
    assert len(table) == 4 and (table["error"] == "").all()
    assert table["steps"].min() < 6, "ASHA should stop at least one trial before the last step"
    assert (table["steps"] == 6).any()


@pytest.mark.slow
def test_interrupted_sweep_resumes_without_rerunning_finished_trials(ray_fresh, data, space_file, tmp_path,
                                                                       mlflow_uri):
    args = dict(data=[data / "patches"], eval_data=data / "cells", trials=4, out=tmp_path, name="r")
    # Interrupted after two trials, the way Ctrl+C interrupts Tune.
    first = sweep(space_file, **args, stop_after_trials=2)
    done_first = first.table.dropna(subset=["mlflow_run_id"])
    done_first = done_first[done_first["mlflow_run_id"] != ""]
    assert 2 <= len(done_first) < 4
    resumed = sweep(space_file, resume=first.sweep_dir)
    table = resumed.table
    assert len(table) == 4 and (table["error"] == "").all()
    assert table["steps"].notna().all()
    # The trials finished before the interruption were not run again: same MLflow runs, and the sweep's
    # parent run has exactly one child per trial.
    assert set(done_first["mlflow_run_id"]) <= set(table["mlflow_run_id"])
    client = MlflowClient(tracking_uri=mlflow_uri)
    parent = client.get_run(resumed.parent_run_id)
    assert resumed.parent_run_id == first.parent_run_id
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{resumed.parent_run_id}'",
    )
    assert len(children) == len(table)


@pytest.mark.slow
def test_three_arm_ablation_writes_its_table_and_resumes_only_missing_arms(ray_fresh, data, tmp_path, mlflow_uri):
    """`--mode ablation` around a recipe: the recipe + one arm per other value of each axis, interrupted after
    two arms and resumed; the table (markdown + CSV) has one row per arm with that arm's settings."""
    space = tmp_path / "ablation.yaml"
    space.write_text(yaml.safe_dump({
        "base": TINY_CONFIG, "metric": "eval_knn20_balanced_accuracy", "mode": "max", "overrides": TINY,
        "recipe": {"loss.koleo_weight": 0.1, "loss.centering": "ema"},
        "space": {"loss.koleo_weight": {"choice": [0.1, 0.0]},
                  "loss.centering": {"choice": ["ema", "sinkhorn_knopp"]}},
        "scheduler": {"grace_period": 100, "reduction_factor": 2},  # no early stop: same budget for every arm
    }))
    args = dict(data=[data / "patches"], eval_data=data / "cells", out=tmp_path, name="abl", mode="ablation")
    first = sweep(space, **args, stop_after_trials=2)
    done_first = set(first.table.dropna(subset=["mlflow_run_id"])["mlflow_run_id"]) - {""}
    assert 2 <= len(done_first) < 3
    result = sweep(resume=first.sweep_dir)
    table = result.table
    assert sorted(table["variant"]) == ["loss.centering=sinkhorn_knopp", "loss.koleo_weight=0.0", "recipe"]
    assert (table["error"] == "").all() and (table["steps"] == 6).all()  # every arm the same budget
    assert done_first <= set(table["mlflow_run_id"])  # finished arms were not run again
    client = MlflowClient(tracking_uri=mlflow_uri)
    by_variant = {row["variant"]: client.get_run(row["mlflow_run_id"]).data.params for _, row in table.iterrows()}
    assert by_variant["recipe"]["loss.koleo_weight"] == "0.1" and by_variant["recipe"]["loss.centering"] == "ema"
    assert by_variant["loss.koleo_weight=0.0"]["loss.koleo_weight"] == "0.0"
    assert by_variant["loss.koleo_weight=0.0"]["loss.centering"] == "ema"
    assert by_variant["loss.centering=sinkhorn_knopp"]["loss.centering"] == "sinkhorn_knopp"
    assert by_variant["loss.centering=sinkhorn_knopp"]["loss.koleo_weight"] == "0.1"
    md = (result.sweep_dir / "ablation.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| axis")]
    axes = [r.split("|")[1].strip() for r in rows]
    assert axes[0] == "recipe" and sorted(axes[1:]) == ["loss.centering", "loss.koleo_weight"]
    assert result.ablation_markdown == md and (result.sweep_dir / "trials.csv").exists()
    children = client.search_runs([client.get_run(result.parent_run_id).info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'")
    assert len(children) == 3
