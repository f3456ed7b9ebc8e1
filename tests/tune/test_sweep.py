"""Sweeps on a real local Ray: Optuna + ASHA on in-training kNN, MLflow parent/child, resume."""

import os
import signal
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient
from ray.tune import Callback

from reddino.data import generate_synthetic
from reddino.tune import sweep

TINY_CONFIG = str(Path(__file__).parents[1] / "tiny.yaml")  # the tests' own tiny recipe

TINY = [
    "data.resize=56", "crops.global_crops_size=56", "crops.local_crops_size=28", "model.img_size=56",
    "model.head_prototypes=128", "model.head_hidden_dim=64", "model.head_bottleneck_dim=32",
    "train.epochs=1", "train.iters_per_epoch=6", "train.batch_size_per_worker=8", "train.log_every=1",
    "train.checkpoint_every=6", "train.monitor_every=0", "eval.every=2", "eval.max_images=120",
    "optim.momentum_teacher=0.5",  # the teacher follows the student fast, so trials differ within 6 steps
]


class InterruptAfter(Callback):
    """Interrupts the sweep once `limit` trials have completed, exactly as Ctrl+C does: SIGUSR1 to this process,
    which Tune handles like SIGINT (state saved, the search not marked finished, so a resume generates the rest).
    Tune pickles callbacks with the sweep's state; a restored one is disarmed."""

    def __init__(self, limit: int | None) -> None:
        self.limit, self.completed, self.sent = limit, set(), False

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.completed.add(trial.trial_id)
        if self.limit is not None and len(self.completed) >= self.limit and not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGUSR1)

    def __getstate__(self):
        return {"limit": None, "completed": set(), "sent": True}


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
    assert out.count("finished at step") == 2 and "(2 of 2 done)" in out
    assert "step 2: eval_knn20_balanced_accuracy" in out and "(best so far)" in out
    # Reports come every step (log_every=1) and repeat the latest kNN; each evaluation (every 2 steps) prints once.
    scored = [line for line in out.splitlines() if "eval_knn20_balanced_accuracy" in line]
    assert scored and all(int(line.split(" step ")[1].split(":")[0]) % 2 == 0 for line in scored), scored
    assert "Trial status:" not in out and "Trial name" not in out
    assert "Configuration for experiment" not in out and "View detailed results" not in out
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
    # Every trial's kNN curve in one picture, beside the Optuna plots and on the parent run.
    assert (result.sweep_dir / "learning_curves.png").stat().st_size > 0
    assert "learning_curves.png" in {a.path for a in client.list_artifacts(result.parent_run_id)}
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
    first = sweep(space_file, **args, callbacks=[InterruptAfter(2)])
    done_first = first.table.dropna(subset=["mlflow_run_id"])
    done_first = done_first[done_first["mlflow_run_id"] != ""]
    assert 2 <= len(done_first) < 6
    resumed = sweep(space_file, resume=first.sweep_dir)
    table = resumed.table
    assert len(table) == 4 and (table["error"] == "").all()
    assert table["steps"].notna().all()
    # The trials finished before the interruption were not run again: same MLflow runs, and the sweep's
    # parent run has exactly one child per trial.
    assert set(done_first["mlflow_run_id"]) <= set(table["mlflow_run_id"])
    client = MlflowClient(tracking_uri=mlflow_uri)
    parent = client.get_run(resumed.parent_run_id)
    assert resumed.parent_run_id == first.parent_run_id  # found again by its sweep-dir tag, no state file
    assert not (first.sweep_dir / "reddino_sweep.json").exists()
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{resumed.parent_run_id}'",
    )
    assert len(children) == len(table)


def test_ablation_space_has_one_arm_per_other_value_around_tiny_cpu():
    """The shipped ablation space: its recipe is tiny_cpu, each arm changes one factor (iBOT on, rbc pick 4, ...),
    and ``seeds`` runs every arm once per seed, seed-major."""
    from reddino.tune.space import load_space, params_to_overrides, seeded_arms

    space = load_space("ablation")
    base = space.base_config().flat()
    assert {k: base[k] for k in space.recipe} == space.recipe, "the ablation recipe must be tiny_cpu's values"
    variants = space.ablation_variants()
    arms = {v["name"]: v for v in variants}
    recipe = arms["recipe"]["params"]
    assert recipe["loss.ibot_weight"] == 0.0 and recipe["crops.rbc_pick"] == 2
    assert arms["loss.ibot_weight=1.0"]["params"] == {**recipe, "loss.ibot_weight": 1.0}
    assert arms["crops.rbc_pick=4"]["params"] == {**recipe, "crops.rbc_pick": 4}
    # Gram anchoring on/off: the arm flips loss.gram_weight; its schedule and refreshes are fixed overrides
    gram = space.base_config(params_to_overrides(arms["loss.gram_weight=1.0"]["params"])).loss
    assert gram.gram_enabled and gram.gram_first_refresh == 100 and gram.gram_teacher_crops_size == 112
    assert not space.base_config(params_to_overrides(recipe)).loss.gram_enabled
    for name in ("loss.koleo_weight=0.0", "loss.centering=sinkhorn_knopp", "crops.policy=dinov2", "data.unit=patch",
                 "crops.local_crops_number=0", "crops.local_crops_number=1"):
        assert name in arms
    for v in variants[1:]:  # one factor at a time
        assert [k for k in recipe if v["params"][k] != recipe[k]] == [v["axis"]]
    seeded = seeded_arms(variants, 3, 2)
    assert len(seeded) == 2 * len(variants)
    assert [a["seed"] for a in seeded] == [3] * len(variants) + [4] * len(variants)  # all arms of seed 3 first
    assert all(a["params"]["train.seed"] == a["seed"] for a in seeded)
    assert seeded[len(variants) + 1]["params"] == {**variants[1]["params"], "train.seed": 4}


def test_ablation_summary_says_which_differences_are_within_noise():
    import pandas as pd

    from reddino.tune.report import ablation_summary, ablation_table
    from reddino.tune.space import load_space

    def rows(name, values):
        return [{"variant": name, "seed": s, "eval_knn20_balanced_accuracy": 0.3,
                 "final_knn20_balanced_accuracy": v, "final_knn20_balanced_accuracy_std": 0.02,
                 "final_probe_balanced_accuracy": v + 0.1, "final_probe_balanced_accuracy_std": 0.03}
                for s, v in enumerate(values)]

    table = pd.DataFrame(rows("recipe", [0.50, 0.52]) + rows("a=1", [0.515, 0.525]) + rows("b=2", [0.60, 0.62]))
    summary = ablation_summary(table, load_space("ablation")).set_index("variant")
    assert list(summary.index) == ["recipe", "a=1", "b=2"] and (summary["seeds"] == 2).all()
    assert summary.loc["recipe", "final_knn20_balanced_accuracy_mean"] == pytest.approx(0.51)
    assert summary.loc["recipe", "final_knn20_balanced_accuracy_std"] == pytest.approx(0.02 ** 0.5 / 10)  # ddof 1
    assert summary.loc["recipe", "final_knn20_balanced_accuracy_fold_std"] == pytest.approx(0.02)
    assert summary.loc["a=1", "final_knn20_balanced_accuracy_delta"] == pytest.approx(0.01)
    assert summary.loc["a=1", "final_knn20_balanced_accuracy_noise"] == "within noise"  # 0.01 <= 0.0141
    assert summary.loc["b=2", "final_probe_balanced_accuracy_noise"] == "beyond noise"
    md = ablation_table(summary.reset_index(), eval_data="cells")
    assert "0.510 ± 0.014" in md and "+0.010 (within noise)" in md and "std over seeds" in md
    one = ablation_summary(table[table["seed"] == 0], load_space("ablation"))
    assert (one["final_knn20_balanced_accuracy_noise"].iloc[1:] == "n/a").all()
    md = ablation_table(one)
    assert "0.500 ± 0.020" in md and "+0.015 (n/a)" in md and "std over folds" in md  # one seed: the folds' std


def test_ablation_table_checks_each_published_claim_against_the_noise(tmp_path):
    """The shipped space names RedDino's finding per axis; an arm beyond noise in the claimed direction confirms
    it, against it contradicts it, and a within-noise Δ is said to be so."""
    import pandas as pd

    from reddino.config import ConfigError
    from reddino.tune.report import ablation_effects_plot, ablation_summary, ablation_table, check_claims
    from reddino.tune.space import load_space

    def rows(name, values):
        return [{"variant": name, "seed": s, "final_knn20_balanced_accuracy": v,
                 "final_probe_balanced_accuracy": v} for s, v in enumerate(values)]

    table = pd.DataFrame(rows("recipe", [0.50, 0.52]) + rows("loss.koleo_weight=0.0", [0.60, 0.62])
                         + rows("loss.centering=sinkhorn_knopp", [0.40, 0.42]) + rows("crops.policy=dinov2", [0.60, 0.62])
                         + rows("data.unit=patch", [0.515, 0.525]) + rows("crops.local_crops_number=0", [0.6, 0.62]))
    space = load_space("ablation")
    summary = check_claims(ablation_summary(table, space), space).set_index("variant")
    verdict = summary["final_knn20_balanced_accuracy_verdict"]
    assert verdict["loss.koleo_weight=0.0"] == "confirmed"  # KoLeo off is better: RedDino's claim
    assert verdict["loss.centering=sinkhorn_knopp"] == "contradicted"
    assert verdict["crops.policy=dinov2"] == "contradicted"  # the claim favours the recipe's rbc policy
    assert verdict["data.unit=patch"] == "within noise"
    assert verdict["crops.local_crops_number=0"].startswith("beyond noise")  # no claimed direction
    assert summary.loc["data.unit=patch", "claim"] == "smear patches beat single cells"
    md = ablation_table(summary.reset_index())
    assert "| loss.koleo_weight | 0.0 | KoLeo hurts" in md and "+0.100, confirmed" in md
    png = ablation_effects_plot(summary.reset_index(), tmp_path / "effects.png")
    assert png.stat().st_size > 10_000
    # A claim must name an axis and one of its values.
    bad = yaml.safe_load(Path(load_space("ablation").path).read_text())
    bad["claims"]["loss.centering"]["better"] = "sinkhorn"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match="claims.loss.centering.better"):
        load_space(tmp_path / "bad.yaml")
    with pytest.raises(ValueError, match="report_only needs the sweep dir"):
        sweep("ablation", report_only=True)


@pytest.mark.slow
def test_two_seed_ablation_evaluates_every_arm_writes_its_table_and_resumes_only_missing_trials(
        ray_fresh, data, tmp_path, mlflow_uri, capfd):
    """`--mode ablation --seeds 2` around a recipe: the recipe + one arm per other value of two axes (3 arms),
    each run with seeds 0 and 1, interrupted after two trials and resumed. Every trial's backbone gets the full
    evaluation; the table (markdown + CSV + MLflow parent run) has one row per arm with mean ± std over seeds, and
    the space's claim is checked against it."""
    space = tmp_path / "ablation.yaml"
    space.write_text(yaml.safe_dump({
        "base": TINY_CONFIG, "metric": "eval_knn20_balanced_accuracy", "mode": "max", "overrides": TINY,
        "recipe": {"loss.koleo_weight": 0.1, "loss.centering": "ema"},
        "space": {"loss.koleo_weight": {"choice": [0.1, 0.0]}, "loss.centering": {"choice": ["ema", "sinkhorn_knopp"]}},
        "claims": {"loss.koleo_weight": {"claim": "KoLeo hurts", "better": 0.0}},
    }))
    args = dict(data=[data / "patches"], eval_data=data / "cells", out=tmp_path, name="abl", mode="ablation",
                seeds=2)
    first = sweep(space, **args, callbacks=[InterruptAfter(2)])
    done_first = set(first.table.dropna(subset=["mlflow_run_id"])["mlflow_run_id"]) - {""}
    assert 2 <= len(done_first) < 6
    assert f"of 6 ablation trials finished: the report covers those; `reddino sweep --resume" in capfd.readouterr().out
    result = sweep(resume=first.sweep_dir)
    captured = capfd.readouterr()
    out = captured.out
    for noise in ("Execution plan", "Starting execution", "Registered dataset logger"):  # final evals: no Ray Data
        assert noise not in out + captured.err, noise
    table = result.table
    assert sorted(zip(table["variant"], table["seed"])) == [
        ("loss.centering=sinkhorn_knopp", 0), ("loss.centering=sinkhorn_knopp", 1),
        ("loss.koleo_weight=0.0", 0), ("loss.koleo_weight=0.0", 1), ("recipe", 0), ("recipe", 1)]
    assert (table["error"] == "").all() and (table["steps"] == 6).all()  # every trial the same budget
    assert done_first <= set(table["mlflow_run_id"])  # finished trials were not run again ...
    assert out.count("[reddino] final evaluation of ") == 6 - len(done_first)  # ... nor evaluated again
    client = MlflowClient(tracking_uri=mlflow_uri)
    for _, row in table.iterrows():
        params = client.get_run(row["mlflow_run_id"]).data.params
        assert params["train.seed"] == str(row["seed"])
        assert params["loss.koleo_weight"] == ("0.0" if row["variant"] == "loss.koleo_weight=0.0" else "0.1")
        assert params["loss.centering"] == ("sinkhorn_knopp" if row["variant"].startswith("loss.centering") else "ema")
    # The full evaluation of every trial's backbone (5 grouped folds), not only the in-training kNN.
    assert table["final_knn20_balanced_accuracy"].notna().all() and table["final_probe_f1_weighted_std"].notna().all()
    assert len(list((result.sweep_dir / "final_eval").glob("*/results.json"))) == 6
    summary = result.ablation
    assert list(summary["variant"]) == ["recipe", "loss.centering=sinkhorn_knopp", "loss.koleo_weight=0.0"]  # file order
    assert (summary["seeds"] == 2).all()
    for col in ("final_knn20_balanced_accuracy", "final_probe_balanced_accuracy", "final_knn20_f1_weighted",
                "final_probe_f1_weighted"):
        assert summary[f"{col}_mean"].notna().all() and summary[f"{col}_std"].notna().all()
    assert summary["final_knn20_balanced_accuracy_noise"].iloc[1] in ("within noise", "beyond noise")
    csv = pd.read_csv(result.sweep_dir / "ablation.csv")
    assert list(csv["variant"]) == list(summary["variant"])
    md = (result.sweep_dir / "ablation.md").read_text()
    assert result.ablation_markdown == md and "kNN-20 bal. acc." in md and "probe F1w" in md
    scores_md, claims_md = md.split("The claims on each axis")
    rows = [line for line in scores_md.splitlines() if line.startswith("| ") and not line.startswith("| axis")]
    assert [r.split("|")[1].strip() for r in rows] == ["recipe", "loss.centering", "loss.koleo_weight"]
    assert all(r.count(" ± ") >= 6 for r in rows)
    verdict = summary["final_knn20_balanced_accuracy_verdict"].iloc[2]
    assert verdict in ("confirmed", "contradicted", "within noise") and "| KoLeo hurts | " in claims_md
    parent = client.get_run(result.parent_run_id)
    assert "ablation.recipe.final_knn20_balanced_accuracy_mean" in parent.data.metrics
    assert "ablation.loss.koleo_weight_0.0.final_probe_balanced_accuracy_std" in parent.data.metrics
    assert {"ablation.md", "ablation.csv", "ablation_effects.png"} <= {
        a.path for a in client.list_artifacts(result.parent_run_id)}
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'")
    assert len(children) == 6
    # --report-only: the report rewritten from the finished trials, nothing trained or evaluated again.
    capfd.readouterr()
    again = sweep(resume=result.sweep_dir, report_only=True)
    out = capfd.readouterr().out
    assert again.ablation_markdown == md and len(again.table) == 6
    assert "final evaluation of" not in out and " started: " not in out


def test_full_scale_ablation_space_is_around_reddino_vits14():
    from reddino.tune.space import load_space

    space = load_space("ablation_vits14")
    assert space.base == "reddino_vits14"
    base = space.base_config().flat()
    assert {k: base[k] for k in space.recipe} == space.recipe, "the recipe must be reddino_vits14's values"
    arms = {v["name"] for v in space.ablation_variants()}
    assert {"loss.koleo_weight=0.1", "loss.centering=ema", "loss.ibot_weight=0.0", "data.unit=cell",
            "crops.policy=dinov2", "crops.rbc_pick=2", "crops.local_crops_number=0"} <= arms
    # the backbone family axis: each arm carries its family's weights and what the family needs (tied values)
    by_name = {v["name"]: v["params"] for v in space.ablation_variants()}
    recipe = by_name["recipe"]
    assert recipe["model.arch"] == "vit_small_patch14_dinov2" and recipe["model.pretrained"].endswith("dinov2_vits14_pretrain.pth")
    v3 = by_name["model.arch=vit_small_patch16_dinov3_qkvb"]
    assert "dinov3_vits16" in v3["model.pretrained"] and v3["loss.ibot_weight"] == 1.0
    conv = by_name["model.arch=convnext_tiny"]
    assert "convnext_tiny" in conv["model.pretrained"] and conv["loss.ibot_weight"] == 0.0  # iBOT refused there
    assert by_name["loss.ibot_weight=0.0"]["model.arch"] == "vit_small_patch14_dinov2"
    with pytest.raises(Exception, match="tied.*--mode ablation"):
        space.optuna_space()
