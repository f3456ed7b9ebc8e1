"""Ray Tune + Optuna sweeps over reddino configs, early-stopped by ASHA on the in-training kNN score.

Each trial is a Tune function trainable that runs a whole Ray Train `TorchTrainer` (Train V2 style:
`trainer.fit()` inside the trial); the loop's reports reach Tune through `TuneReportCallback`.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from reddino.config import ConfigError, SweepConfig, load_section
from reddino.errors import PreflightError
from reddino.preflight import check_run
from reddino.paths import atomic_path, write_text_atomic

from reddino.tune.space import SweepSpace, load_space, params_to_overrides, seeded_arms

CONFIG_FILE = "sweep.yaml"  # the SweepConfig; --resume reads it back
SWEEP_DIR_TAG = "reddino.sweep_dir"  # on the parent run: how a resume finds it


@dataclass
class SweepResult:
    sweep_dir: Path
    table: pd.DataFrame
    best_params: dict[str, Any]
    best_config_path: Path | None
    parent_run_id: str | None
    ablation_markdown: str | None = None
    ablation: pd.DataFrame | None = None  # one row per arm (ablation.csv)


def _scored_reports(metric: str):
    """A TuneReportCallback that passes on only the reports carrying the sweep metric: Optuna and ASHA read
    it from every result, and the loop's step logs before the first kNN do not have it."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class _ScoredReports(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metrics and metric in metrics[0]:
                super().after_report(run_context, metrics, checkpoint)

    return _ScoredReports()


def _trial_lines(metric: str, mode: str, total: int | None = None):
    """A Tune callback printing one line per scored report, per finished trial and per error: what a user
    watching a sweep needs (Tune's 30-second status table says only RUNNING; REDDINO_VERBOSE=1 brings it back)."""
    from ray.tune import Callback

    class _TrialLines(Callback):
        def __init__(self) -> None:
            self.best: float | None = None
            self.done = 0
            self.shown: dict[str, object] = {}  # trial id -> the evaluation last printed

        def _params(self, trial) -> str:
            params = trial_params(trial.config or {})
            if "arm" in (trial.config or {}):
                arm = trial.config["arm"]
                return arm["name"] + (f" (seed {arm['seed']})" if "seed" in arm else "")
            return " ".join(f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
                            for k, v in params.items())

        def on_trial_start(self, iteration, trials, trial, **info):
            print(f"[reddino] trial {trial.trial_id} started: {self._params(trial)}", flush=True)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if metric not in result:
                return
            # Every report repeats the latest kNN (for ASHA): print each evaluation once.
            seen = result.get("eval_step", result.get("step"))
            if self.shown.get(trial.trial_id) == seen:
                return
            self.shown[trial.trial_id] = seen
            value = float(result[metric])
            better = self.best is None or (value > self.best if mode == "max" else value < self.best)
            self.best = value if better else self.best
            print(f"[reddino] trial {trial.trial_id} step {seen}: {metric} {value:.3f}"
                  f"{'  (best so far)' if better else f'  (best {self.best:.3f})'}", flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.done += 1
            last = (trial.last_result or {}).get("step")
            print(f"[reddino] trial {trial.trial_id} finished at step {last} ({self.done} of {total or len(trials)} done)",
                  flush=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            print(f"[reddino] trial {trial.trial_id} FAILED: see {trial.local_path or trial.path}", flush=True)

    return _TrialLines()


@dataclass(frozen=True)
class TrialSettings:
    """What every trial of a sweep shares (handed to the trainable by ``tune.with_parameters``); the trial's own
    config holds only its sampled parameters, or its ablation ``arm``."""

    base: str
    overrides: tuple[str, ...]
    storage: str
    experiment: str
    parent_run_id: str | None
    metric: str


def trial_params(config: dict[str, Any]) -> dict[str, Any]:
    """The parameters a trial runs with: its ablation arm's, or the ones the searcher sampled."""
    return dict(config["arm"]["params"]) if "arm" in config else dict(config)


def _trial(config: dict[str, Any], settings: TrialSettings) -> None:
    """One trial: pretrain with this trial's overrides; its reports (kNN every `eval.every`) go to Tune."""
    import ray.tune

    from reddino.config import load_config
    from reddino.train import pretrain

    ctx = ray.tune.get_context()
    overrides = list(settings.overrides) + params_to_overrides(trial_params(config)) + [
        f"train.storage_path={settings.storage}",
        f"mlflow.experiment={settings.experiment}",
    ]
    cfg = load_config(settings.base, overrides)
    trial_name = f"trial-{ctx.get_trial_id()}"
    pretrain(
        cfg, run_name=trial_name, callbacks=[_scored_reports(settings.metric)],
        mlflow_tags={"mlflow.parentRunId": settings.parent_run_id} if settings.parent_run_id else None,
    )
    # The final kNN-1/kNN-20/probe scores reach Tune with the last training report.


def trial_backbone(base_cfg, sweep_dir: Path, run_name: str) -> Path:
    """Where trial ``run_name`` exported its backbone: the trainer's rule (``train.export_path`` when set)."""
    from reddino.train.checkpoint import export_target

    return export_target(base_cfg.train.export_path, sweep_dir / "trials" / run_name, run_name)


def check_export_path(base_cfg, runs: int) -> None:
    """A fixed ``train.export_path`` would have every trial overwrite one file: it must name ``{run_name}``."""
    path = base_cfg.train.export_path
    if path and runs > 1 and "{run_name}" not in path:
        raise ConfigError(f"train.export_path={path}: every trial of the sweep would write this one file; put "
                          f"{{run_name}} in it (e.g. {Path(path).parent / '{run_name}.safetensors'}) or leave it "
                          "unset (each trial's own dir)")


def _scheduler(space: SweepSpace, cfg) -> Any:
    from ray.tune.schedulers import ASHAScheduler

    every = cfg.eval.every or cfg.total_steps
    grace = int(space.scheduler.get("grace_period", 1)) * every
    return ASHAScheduler(
        time_attr="step", max_t=cfg.total_steps, grace_period=min(grace, cfg.total_steps),
        reduction_factor=float(space.scheduler.get("reduction_factor", 2)),
    )


def sweep(
    space: str | Path | None = None,
    *,
    config: SweepConfig | None = None,
    out: str | Path | None = None,
    name: str | None = None,
    resume: str | Path | None = None,
    callbacks: list[Any] | None = None,
    report_only: bool = False,
    **settings: Any,
) -> SweepResult:
    """Run (or resume) a sweep. ``config`` (:class:`reddino.config.SweepConfig`) holds the settings, keyword
    ``settings`` override its fields (``sweep("ablation", data=[...], trials=4)``). ``mode="search"``: Optuna TPE +
    ASHA; ``mode="ablation"``: one factor at a time. ``resume``: a sweep dir; its ``sweep.yaml`` is the config.
    ``callbacks``: extra Ray Tune callbacks (they see every trial event). ``report_only`` (with ``resume``): no
    new trials; the report (table, claims, plots) rewritten from the trials finished so far (``trials.parquet``),
    e.g. after a sweep was stopped or its space's claims edited."""
    if report_only and resume is None:
        raise ValueError("report_only needs the sweep dir to report on (resume=...)")
    from reddino.runtime import quiet_ray_logs

    quiet_ray_logs()  # before `ray.tune` imports Ray Data, which reads its logging config once, at import
    from reddino.runtime import cpus_with_driver_headroom, default_tracking_uri, init_ray, mlflow_at

    cfg = _sweep_config(space, config, resume, settings)
    space, base_cfg, extra = _trial_base(cfg)
    check_run(base_cfg, units=space.units(base_cfg))  # every arm's data, before Ray starts or a folder is made
    init_ray(num_cpus=cpus_with_driver_headroom())  # a local Ray; ignored when connecting to a cluster
    if resume is None:
        name = name or f"sweep-{Path(space.path).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
        from reddino import paths

        sweep_dir = (Path(out).expanduser() if out else paths.sweeps_dir()).resolve() / name
        sweep_dir.mkdir(parents=True, exist_ok=True)
    else:
        sweep_dir = Path(resume).expanduser().resolve()
    experiment = f"{base_cfg.mlflow.experiment}-sweeps"
    tracking_uri = base_cfg.mlflow.tracking_uri or default_tracking_uri()  # the one MLflow store of the sweep
    parent_run_id = _parent_run(cfg, space, base_cfg, sweep_dir, experiment, tracking_uri, resumed=resume is not None)
    if report_only:
        trials = sweep_dir / "trials.parquet"
        if not trials.is_file():
            raise FileNotFoundError(f"{trials} is missing: no trial of this sweep has been summarised yet")
        with mlflow_at(tracking_uri):
            return _report(pd.read_parquet(trials), space, sweep_dir, cfg.mode, parent_run_id, base_cfg, cfg)
    # The Optuna study lives in an RDB (sqlite in the sweep dir by default): `optuna-dashboard <url>` watches it
    # live, `optuna.load_study(study_name=<sweep name>, storage=<url>)` reads it, and a resume continues it.
    optuna_storage = cfg.optuna_storage or f"sqlite:///{sweep_dir / 'optuna.db'}"
    if resume is None:
        cfg.optuna_storage = optuna_storage
        cfg.space = str(space.path)
        cfg.to_yaml(sweep_dir / CONFIG_FILE)

    # Trials run in other processes (maybe other nodes): hand them the resolved tracking URI.
    settings = TrialSettings(base=str(space.base), overrides=tuple(space.overrides + extra + [
                                 f"mlflow.tracking_uri={tracking_uri}"]), storage=str(sweep_dir / "trials"),
                             experiment=experiment, parent_run_id=parent_run_id, metric=space.metric)
    tuner = _tuner(cfg, space, base_cfg, settings, sweep_dir, optuna_storage, list(callbacks or []),
                   resumed=resume is not None)
    with mlflow_at(tracking_uri):  # the trials' final reports, read back by _summarise
        grid = tuner.fit()
        return _summarise(grid, space, sweep_dir, cfg.mode, parent_run_id, base_cfg, cfg)


def _sweep_config(space, config: SweepConfig | None, resume, settings: dict[str, Any]) -> SweepConfig:
    """The sweep's settings: a resumed sweep's own ``sweep.yaml``, else ``config`` with ``settings`` over it."""
    if resume is not None:
        sweep_dir = Path(resume).expanduser().resolve()
        if not (sweep_dir / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{sweep_dir} is not a reddino sweep dir ({CONFIG_FILE} is missing)")
        return load_section(SweepConfig, sweep_dir / CONFIG_FILE)
    updates = {k: ([str(x) for x in v] if isinstance(v, (list, tuple)) else str(v) if isinstance(v, Path) else v)
               for k, v in settings.items()}
    if space is not None:
        updates["space"] = str(space)
    cfg = load_section(SweepConfig, None, {**(config or SweepConfig()).model_dump(), **updates})
    # absolute paths in sweep.yaml: a resume may start from another directory
    cfg.data = [str(Path(p).expanduser().resolve()) for p in cfg.data] if cfg.data else cfg.data
    cfg.eval_data = str(Path(cfg.eval_data).expanduser().resolve()) if cfg.eval_data else None
    return cfg


def _trial_base(cfg: SweepConfig) -> tuple[SweepSpace, Any, list[str]]:
    """The space (its metric at the trials' ``eval.k``), the trials' shared run config and its overrides."""
    space = load_space(cfg.space)
    extra = list(cfg.overrides)
    if cfg.data:
        extra.append("data.paths=[" + ",".join(str(Path(p).resolve()) for p in cfg.data) + "]")
    if cfg.eval_data:
        extra.append(f"eval.data={Path(cfg.eval_data).resolve()}")
    extra.append(f"train.seed={cfg.seed}")
    base_cfg = space.base_config(extra)
    space = space.for_config(base_cfg)  # the metric follows eval.k
    check_export_path(base_cfg, cfg.trials if cfg.mode == "search" else 2)  # an ablation has at least two arms
    if base_cfg.eval.data is None:
        raise PreflightError("a sweep needs a labelled eval set (--eval-data): trials are ranked on kNN, not on the loss")
    return space, base_cfg, extra


def _parent_run(cfg: SweepConfig, space: SweepSpace, base_cfg, sweep_dir: Path, experiment: str, tracking_uri: str,
                resumed: bool) -> str | None:
    """The sweep's MLflow parent run (found again by its tag on a resume); each trial's run is its child."""
    if not base_cfg.mlflow.enabled:
        return None
    import mlflow

    from reddino.runtime import mlflow_at

    with mlflow_at(tracking_uri):
        mlflow.set_experiment(experiment)
        parent_run_id = _find_parent_run(experiment, sweep_dir) if resumed else None
        if parent_run_id is None:
            with mlflow.start_run(run_name=sweep_dir.name, tags={SWEEP_DIR_TAG: str(sweep_dir)}) as parent:
                parent_run_id = parent.info.run_id
                mlflow.log_params({"space": space.path, "mode": cfg.mode, "trials": cfg.trials, "seed": cfg.seed,
                                   "concurrency": cfg.concurrency, "metric": space.metric,
                                   **({"seeds": cfg.seeds, "final_eval": cfg.final_eval}
                                      if cfg.mode == "ablation" else {})})
    return parent_run_id


def _search(cfg: SweepConfig, space: SweepSpace, base_cfg, sweep_dir: Path, optuna_storage: str):
    """``(param_space, search_alg, scheduler, num_samples, trials)`` of the sweep's mode."""
    from ray import tune

    if cfg.mode == "ablation":
        # every arm once per seed (its train.seed), seed-major; Tune runs a grid in order and a resume
        # generates only the (arm, seed) trials not yet started
        variants = seeded_arms(space.ablation_variants(), cfg.seed, cfg.seeds)
        return {"arm": tune.grid_search(variants)}, None, None, 1, len(variants)  # equal budget: no early stop
    if cfg.mode != "search":
        raise ValueError(f"unknown sweep mode {cfg.mode!r}; valid: search, ablation")
    import optuna
    from optuna.samplers import TPESampler
    from ray.tune.search.optuna import OptunaSearch

    search_alg = OptunaSearch(space=space.optuna_space(), metric=space.metric, mode=space.mode,
                              sampler=TPESampler(seed=cfg.seed), study_name=sweep_dir.name,
                              storage=optuna.storages.RDBStorage(optuna_storage))
    print(f"[reddino] Optuna study '{sweep_dir.name}': optuna-dashboard {optuna_storage}", flush=True)
    return {}, search_alg, _scheduler(space, base_cfg), cfg.trials, cfg.trials


def _quiet_tune() -> None:
    from reddino.runtime import hide_worker_lines

    # Tune's new output engine prints its experiment box and result paths even at verbose=0; the legacy
    # one at verbosity 0 prints nothing, and our own trial lines say what a user needs.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # "The `process_trial_result` operation took 0.6 s": Tune timing its own driver, nothing a user can act on.
    import logging

    logging.getLogger("ray.tune.utils.util").setLevel(logging.ERROR)
    # The trials' own step and evaluation lines (interleaved, without a trial id) stay in their workers' logs
    # and MLflow runs; the console gets one line per trial event from _trial_lines.
    hide_worker_lines("[reddino] step ")


def _tuner(cfg: SweepConfig, space: SweepSpace, base_cfg, settings: TrialSettings, sweep_dir: Path,
           optuna_storage: str, callbacks: list[Any], resumed: bool):
    from ray import tune

    from reddino.runtime import verbose

    param_space, search_alg, scheduler, num_samples, n_trials = _search(cfg, space, base_cfg, sweep_dir,
                                                                        optuna_storage)
    # Each trial's driver is light; its Train workers and Ray Data tasks ask for their own CPUs.
    trial_cpus = cfg.cpus_per_trial if cfg.cpus_per_trial is not None else 0.01  # Tune needs a non-empty request
    trainable = tune.with_resources(tune.with_parameters(_trial, settings=settings),
                                    {"cpu": trial_cpus, "gpu": cfg.gpus_per_trial})
    lines = _trial_lines(space.metric, space.mode, n_trials)
    if not verbose():
        _quiet_tune()
    run_config = tune.RunConfig(name="tune", storage_path=str(sweep_dir),
                                failure_config=tune.FailureConfig(max_failures=1),
                                callbacks=[lines] + callbacks,
                                verbose=None if verbose() else 0)
    if resumed and tune.Tuner.can_restore(str(sweep_dir / "tune")):
        return tune.Tuner.restore(str(sweep_dir / "tune"), trainable, resume_unfinished=True,
                                  resume_errored=True, param_space=param_space)
    return tune.Tuner(
        trainable, param_space=param_space,
        tune_config=tune.TuneConfig(metric=space.metric, mode=space.mode, search_alg=search_alg,
                                    scheduler=scheduler, num_samples=num_samples,
                                    max_concurrent_trials=cfg.concurrency),
        run_config=run_config,
    )


FINAL_EVAL_DIR = "final_eval"  # <sweep dir>/final_eval/<trial run>/results.json + features/ (the feature cache)
FINAL_CLASSIFIERS = ("knn1", "knn20", "probe")
FINAL_METRICS = ("balanced_accuracy", "f1_weighted")


def final_evaluation(table: pd.DataFrame, sweep_dir: Path, base_cfg, seed: int = 0) -> pd.DataFrame:
    """Every trial's exported backbone (``backbone_path``) through the full protocol of ``reddino evaluate``
    on the sweep's eval data: kfold, 5 folds grouped by smear, kNN-1, kNN-20 and the probe; the run config's
    ``eval.exclude_labels`` dropped, the same folds (``seed``) for every trial. Adds ``final_<clf>_<metric>``
    (mean over folds) and ``..._std`` (std over folds) columns. Each trial's report is kept in
    ``<sweep dir>/final_eval/<run>/`` and its features in ``final_eval/features``: a resumed sweep evaluates only
    the trials not evaluated yet."""
    from reddino.evaluate import evaluate

    root = sweep_dir / FINAL_EVAL_DIR
    table = table.copy()
    for clf in FINAL_CLASSIFIERS:
        for m in FINAL_METRICS:
            for suffix in ("", "_std"):
                table[f"final_{clf}_{m}{suffix}"] = float("nan")
    for i, row in table.iterrows():
        backbone = row.get("backbone_path") or ""
        if not backbone or not Path(backbone).is_file():
            continue
        out = root / Path(backbone).parent.name
        if (out / "results.json").is_file():
            res = json.loads((out / "results.json").read_text())
        else:
            label = row.get("variant") or row.get("trial")
            if pd.notna(row.get("seed")):
                label = f"{label} (seed {int(row['seed'])})"
            print(f"[reddino] final evaluation of {label}: {backbone}", flush=True)
            t0 = time.perf_counter()
            res = evaluate(
                [backbone], [base_cfg.eval.data], protocol="kfold", folds=5, ks=[1, 20], cosine_knn=False,
                probe=True, use_groups=True, exclude_classes=base_cfg.eval.exclude_labels, seed=seed,
                cache_dir=str(root / "features"), out_dir=str(out), mlflow=False, figures=False, progress=False,
            )
            print(f"[reddino] final evaluation done in {time.perf_counter() - t0:.0f} s: {out / 'report.md'}",
                  flush=True)
        headline = res.get("headline") or {}
        for clf in FINAL_CLASSIFIERS:
            for m in FINAL_METRICS:
                for suffix in ("", "_std"):
                    value = headline.get(f"{clf}_{m}{suffix}")
                    if value is not None:
                        table.loc[i, f"final_{clf}_{m}{suffix}"] = float(value)
    return table


def _find_parent_run(experiment: str, sweep_dir: Path) -> str | None:
    """The sweep's MLflow parent run (tagged with its sweep dir), so a resume logs into the same parent."""
    import mlflow

    runs = mlflow.search_runs(experiment_names=[experiment], output_format="list", order_by=["start_time ASC"],
                              filter_string=f"tags.`{SWEEP_DIR_TAG}` = '{sweep_dir}'")
    return runs[0].info.run_id if runs else None


def _summarise(grid, space: SweepSpace, sweep_dir: Path, mode: str, parent_run_id: str | None, base_cfg,
               cfg: SweepConfig | None = None) -> SweepResult:
    cfg = cfg or SweepConfig()

    rows = []
    for res in grid:
        params = trial_params(res.config or {})
        metrics = res.metrics or {}
        arm = (res.config or {}).get("arm", {})
        row = {"trial": Path(res.path).name if res.path else "", "variant": arm.get("name", ""),
               "seed": arm.get("seed", cfg.seed) if mode == "ablation" else None,
               **{f"param.{k}": v for k, v in params.items()},
               "steps": metrics.get("step"), space.metric: metrics.get(space.metric),
               "error": str(res.error) if res.error else ""}
        for key, value in metrics.items():
            if key.startswith("eval_") and key.endswith("balanced_accuracy"):
                row[key] = value
        run_name = metrics.get("run_name") or ""
        backbone = trial_backbone(base_cfg, sweep_dir, run_name) if run_name else None
        row["backbone_path"] = str(backbone) if backbone is not None and backbone.exists() else ""
        row["mlflow_run_id"] = metrics.get("mlflow_run_id", "")
        row["error_file"] = str(Path(res.path) / "error.txt") if res.error and res.path else ""
        rows.append(row)
    table = pd.DataFrame(rows)
    if rows and all(r["error"] for r in rows):  # nothing to report on: the table only, and the CLI says why
        table.to_csv(sweep_dir / "trials.csv", index=False)
        return SweepResult(sweep_dir=sweep_dir, table=table, best_params={}, best_config_path=None,
                           parent_run_id=parent_run_id)
    return _report(table, space, sweep_dir, mode, parent_run_id, base_cfg, cfg)


def failed_trials(result: SweepResult) -> tuple[int, int, list[str]]:
    """(failed, total, error files) of a sweep's trials."""
    table = result.table
    if table is None or table.empty or "error" not in table:
        return 0, 0 if table is None else len(table), []
    failed = table[table["error"].fillna("").astype(str) != ""]
    files = [f for f in failed.get("error_file", pd.Series(dtype=str)).fillna("").tolist() if f]
    return len(failed), len(table), files


def _report(table: pd.DataFrame, space: SweepSpace, sweep_dir: Path, mode: str, parent_run_id: str | None, base_cfg,
            cfg: SweepConfig) -> SweepResult:
    """The trial table → final evaluations (ablation), trials.csv/parquet, best config, ablation table and
    claims, plots, and all of it on the MLflow parent run."""
    from reddino.tune.report import (ablation_effects_plot, ablation_summary, ablation_table, check_claims,
                                     sweep_plots, trial_curves, write_best_config)

    if mode == "ablation":
        total = len(seeded_arms(space.ablation_variants(), cfg.seed, cfg.seeds))
        done = int((table["backbone_path"].fillna("") != "").sum()) if "backbone_path" in table else 0
        if done < total:
            print(f"[reddino] {done} of {total} ablation trials finished: the report covers those; "
                  f"`reddino sweep --resume {sweep_dir}` runs the rest", flush=True)
    if mode == "ablation" and cfg.final_eval and len(table):
        table = final_evaluation(table, sweep_dir, base_cfg, seed=cfg.seed)
    with atomic_path(sweep_dir / "trials.csv") as tmp:
        table.to_csv(tmp, index=False)
    with atomic_path(sweep_dir / "trials.parquet") as tmp:
        table.to_parquet(tmp, index=False)

    scored = table.dropna(subset=[space.metric]) if space.metric in table else table.iloc[0:0]
    best_params: dict[str, Any] = {}
    best_path = None
    if len(scored):
        best = scored.sort_values(space.metric, ascending=(space.mode == "min")).iloc[0]
        best_params = {k[len("param."):]: v for k, v in best.items() if k.startswith("param.") and pd.notna(v)}
        best_path = write_best_config(space, best_params, sweep_dir / "best_config.yaml")
    markdown, summary = None, None
    if mode == "ablation" and len(table):
        summary = check_claims(ablation_summary(table, space), space)
        markdown = ablation_table(summary, eval_data=base_cfg.eval.data)
        write_text_atomic(sweep_dir / "ablation.md", markdown)
        with atomic_path(sweep_dir / "ablation.csv") as tmp:
            summary.to_csv(tmp, index=False)
    pngs = sweep_plots(table, space, sweep_dir) if len(scored) else []
    if summary is not None:
        effects = ablation_effects_plot(summary, sweep_dir / "ablation_effects.png")
        pngs += [effects] if effects is not None else []
    if parent_run_id and len(scored):  # the trials' runs are in MLflow
        curves = trial_curves(table, space, sweep_dir / "learning_curves.png")
        pngs += [curves] if curves is not None else []

    if parent_run_id:
        import mlflow

        with mlflow.start_run(run_id=parent_run_id):
            if len(scored):
                mlflow.log_metric(f"best_{space.metric}", float(scored[space.metric].max() if space.mode == "max" else scored[space.metric].min()))
            if summary is not None:
                mlflow.log_metrics(_arm_metrics(summary))
            for f in [sweep_dir / "trials.csv", best_path, sweep_dir / "ablation.md", sweep_dir / "ablation.csv",
                      *pngs]:
                if f is not None and Path(f).exists():
                    mlflow.log_artifact(str(f))
    return SweepResult(sweep_dir, table, best_params, best_path, parent_run_id, markdown, summary)


def _arm_metrics(summary: pd.DataFrame) -> dict[str, float]:
    """The ablation table as MLflow metrics of the parent run: ``ablation.<arm>.<score>_mean`` / ``_std`` / ..."""
    import re

    out: dict[str, float] = {}
    for _, row in summary.iterrows():
        arm = re.sub(r"[^\w.\-/ ]", "_", str(row["variant"]))
        for key, value in row.items():
            if key in ("axis", "value", "variant") or isinstance(value, str) or value is None or pd.isna(value):
                continue
            out[f"ablation.{arm}.{key}"] = float(value)
    return out
