"""Driver side of pretraining: a Ray Train `TorchTrainer` around the per-worker loop, plus MLflow."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from reddino.config import RunConfig


@dataclass
class PretrainResult:
    run_name: str
    run_dir: Path
    checkpoint_dir: Path | None
    backbone_path: Path | None
    metrics: dict[str, Any]
    mlflow_run_id: str | None
    stopped: str | None = None


# Runs this process has driven: a failed run's actor outlives fit() in its driver, and the same driver may resume.
_DRIVEN_HERE: set[str] = set()


def _refuse_second_driver(run_name: str, state_name: str) -> None:
    """Two drivers on one run would interleave checkpoints and MLflow metrics: the second one stops here."""
    from reddino.train.data import live_run_state

    if run_name not in _DRIVEN_HERE and live_run_state(state_name) is not None:
        raise RuntimeError(f"run {run_name!r} is being trained by another driver on this cluster (its actor "
                           f"{state_name!r} is alive): wait for it, stop it (`ray job stop`, Ctrl-C), or pick another "
                           "--run-name")
    _DRIVEN_HERE.add(run_name)


def _latest_checkpoint(result):
    """The checkpoint with the highest step (checkpoint dirs are named by step)."""
    candidates = [c for c, _ in (result.best_checkpoints or [])]
    if result.checkpoint is not None:
        candidates.append(result.checkpoint)
    return max(candidates, key=lambda c: Path(c.path).name) if candidates else None


def _quiet_train_console() -> None:
    # Ray Train patches print() in its workers to go through its logger, which (with a wrapped stdout) prints
    # every loop line twice; the loop writes plain stdout instead. Propagated to the workers by Ray Train.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")


RAY_LOG = "ray.log"  # Ray's driver-side INFO lines (Train, Data, Tune) of this run
RAY_SESSION_LOGS = "ray-session-logs"  # link to the Ray session's log folder (workers, actors, raylet)


def _ray_logs_in_run_dir(run_dir: Path) -> None:
    """What Ray says that the console does not show lands beside the run: its driver-side loggers write INFO to
    ``ray.log`` in the run dir, and ``ray-session-logs`` links to the session's own log folder (worker and
    actor output, Ray Data's ray-data.log), where the rest already goes."""
    import logging

    path = (run_dir / RAY_LOG).resolve()
    for name in ("ray.train", "ray.data", "ray.tune", "ray.util"):
        logger = logging.getLogger(name)
        # One run log per process: a later run in the same process (a sweep trial, a test) replaces the earlier
        # run's handler instead of writing into every run dir it has seen (and keeping their files open).
        for old in [h for h in logger.handlers if getattr(h, "_reddino_run_log", False)]:
            logger.removeHandler(old)
            old.close()
        handler = logging.FileHandler(path)
        handler._reddino_run_log = True
        handler.setLevel(logging.INFO)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s -- %(message)s"))
        logger.addHandler(handler)
    try:
        import ray

        session = Path(ray._private.worker.global_worker.node.get_session_dir_path()) / "logs"
    except Exception:  # noqa: BLE001 - a cluster client without a local session dir: nothing to link
        return
    link = run_dir / RAY_SESSION_LOGS
    if session.is_dir():
        link.unlink(missing_ok=True)
        link.symlink_to(session, target_is_directory=True)


def _learning_curve(run_id: str, tracking_uri: str, run_dir: Path | None, run_name: str, k: int = 20) -> Path | None:
    """learning_curve.png of the run (kNN, RankMe, losses by step) in its run dir, or a temp dir for remote
    storage; a plotting failure never fails a finished run."""
    import tempfile

    from mlflow.tracking import MlflowClient

    from reddino.train.curves import metric_histories, plot_learning_curve

    folder = run_dir if run_dir is not None else Path(tempfile.mkdtemp(prefix="reddino-curve-"))
    try:
        return plot_learning_curve(metric_histories(MlflowClient(tracking_uri), run_id, k), folder / "learning_curve.png",
                                   title=run_name, k=k)
    except Exception as exc:  # noqa: BLE001
        print(f"[reddino] learning curve not drawn: {exc}", flush=True)
        return None


def _use_gpu(cfg: RunConfig) -> bool:
    if cfg.train.use_gpu == "auto":
        import ray

        return ray.cluster_resources().get("GPU", 0) >= 1
    return bool(cfg.train.use_gpu)


def _warn_missing_resources(wanted: dict[str, float]) -> None:
    """Ray waits forever for a resource no node has; an autoscaler may still add one, so a warning."""
    import ray

    have = ray.cluster_resources()
    missing = sorted(name for name in wanted if have.get(name, 0) <= 0)
    if missing:
        print(f"[reddino] WARNING: no node of this cluster advertises {', '.join(missing)} "
              "(train.worker_resources / data.map_resources): the run waits until one joins "
              "(`ray start --resources`)", flush=True)


def _data_hash(paths: list[str]) -> str:
    from reddino.data import manifest_hash

    return ",".join(manifest_hash(p) for p in paths)


def _patch_size(cfg: RunConfig) -> int:
    """The backbone's token stride: the grid the data stream draws iBOT masks on. Checks here, before any worker
    starts, that the backbone family supports what the config asks of it (iBOT needs maskable patch tokens)."""
    from reddino.model import create_backbone, family

    import torch

    with torch.device("meta"):  # the architecture only: no memory, no init cost (ViT-g is 1.1B params)
        backbone = create_backbone(cfg.model.arch, img_size=cfg.model.img_size, patch_size=cfg.model.patch_size,
                                   timm_kwargs=cfg.model.timm_kwargs)
    if cfg.loss.ibot_weight > 0:
        family.require_ibot(backbone)
    return family.token_stride(backbone)


def _rows_per_pass(cfg: RunConfig) -> int | None:
    """Rows in one pass over the training data (one column read), so each worker knows when to start the next
    pass; None where it cannot be read cheaply (remote storage): the next pass then starts after the first batch."""
    from reddino.data import load_table

    try:
        return load_table(cfg.data.paths, sources=cfg.data.sources, units=[cfg.data.unit] if cfg.data.unit else None,
                          source_weights=cfg.data.source_weights, columns=["sha256"]).num_rows
    except Exception:  # noqa: BLE001 - an estimate only
        return None


def _absolute_local_paths(cfg: RunConfig) -> RunConfig:
    """A copy of ``cfg`` whose local relative paths are absolute: Train workers and Ray Data tasks run in their
    own working dirs, where ``data/chula-cells`` names nothing. URIs (``s3://...``) are left as they are."""

    def absolute(p: str | None) -> str | None:
        return p if not p or "://" in p else str(Path(p).expanduser().absolute())

    cfg = cfg.model_copy(deep=True)
    cfg.data.paths = [absolute(p) for p in cfg.data.paths]
    cfg.eval.data = absolute(cfg.eval.data)
    cfg.model.pretrained = absolute(cfg.model.pretrained)
    cfg.distill.teacher = absolute(cfg.distill.teacher)
    cfg.loss.gram_teacher_path = absolute(cfg.loss.gram_teacher_path)
    cfg.train.export_path = absolute(cfg.train.export_path)
    return cfg


def pretrain(
    cfg: RunConfig,
    *,
    run_name: str | None = None,
    resume: bool = False,
    callbacks: list | None = None,
    mlflow_tags: dict[str, str] | None = None,
    step_hooks: list[Callable[[int], None]] | None = None,
    loss_hook: Callable[..., Any] | None = None,
    export_meta: dict[str, Any] | None = None,
) -> PretrainResult:
    """Run (or resume) DINOv2 pretraining as described by `cfg`.

    Rerunning with the same `run_name` and storage path resumes from its latest checkpoint (Ray
    Train restores the run's checkpoint manager; the loop restores model, optimizer and data position).
    ``step_hooks`` run on every worker as ``hook(step)`` after each finished step and ``loss_hook(step, loss,
    parts) -> (loss, parts)`` sees each micro-batch's loss after backward, before it is logged and checked (what it
    returns reaches the log and the NaN guard, not the gradients); both are cloudpickled to the workers
    (closures travel by value). The tests inject crashes and NaNs with them. ``export_meta`` joins the exported
    backbone's metadata (a distilled model's teacher lineage, which `models register` turns into tags).
    """
    import ray

    from reddino.preflight import check_run
    from reddino.runtime import default_tracking_uri, init_ray, quiet_data_progress
    from reddino.train.data import build_train_dataset, dataset_slots, run_state_actor
    from reddino.train.failure import failure_recorded
    from reddino.train.progress import PROGRESS_FILE, LiveProgress, live_wanted

    check_run(cfg)  # data, eval data, weights, MLflow: one clear error before Ray or any folder starts
    patch = _patch_size(cfg)  # also refuses a config the backbone family cannot train, before Ray starts
    init_ray()
    quiet_data_progress()
    _quiet_train_console()
    cfg = _absolute_local_paths(cfg)
    where = _RunPlace.of(cfg, run_name, resume)
    data_hash = _data_hash(cfg.data.paths) if cfg.data.paths else None
    tracking_uri = cfg.mlflow.tracking_uri or default_tracking_uri()  # the one MLflow store of this run
    mlflow_run_id = _open_mlflow_run(cfg, where, data_hash, mlflow_tags, tracking_uri) if cfg.mlflow.enabled else None

    # --- data: Ray Data does decode + multi-crop + masks on CPU tasks ---
    run_state = run_state_actor(where.state_name)  # keep the handle: the actor lives while the driver holds it
    datasets = {name: build_train_dataset(cfg, patch, where.state_name, slot)
                for slot, name in enumerate(dataset_slots(cfg))}
    live = live_wanted() and where.run_dir is not None
    plan = _worker_plan(cfg, where, tracking_uri, mlflow_run_id, data_hash, step_hooks, loss_hook, export_meta,
                        progress_file=str(where.run_dir / PROGRESS_FILE) if live else None)
    trainer = _trainer(cfg, plan, where, datasets, callbacks)
    with failure_recorded(where.run_dir, tracking_uri, mlflow_run_id):  # FAILED in MLflow + error.txt, then raise
        if live:
            with LiveProgress(where.run_dir / PROGRESS_FILE, cfg.total_steps, f"pretrain {where.run_name}"):
                result = trainer.fit()
        else:
            result = trainer.fit()
    metrics = dict(result.metrics or {})
    latest = _latest_checkpoint(result)
    stopped = ray.get(run_state.stop_reason.remote())
    ckpt_dir = Path(latest.path) if latest is not None and "://" not in latest.path else None
    backbone = _export(latest, cfg, where) if latest is not None and not stopped else None
    if mlflow_run_id is not None:
        _close_mlflow_run(mlflow_run_id, tracking_uri, metrics, backbone, stopped, ckpt_dir, where, cfg.eval.k)
    ray.kill(run_state)
    return PretrainResult(run_name=where.run_name, run_dir=where.run_dir, checkpoint_dir=ckpt_dir,
                          backbone_path=backbone, metrics=metrics, mlflow_run_id=mlflow_run_id, stopped=stopped)


@dataclass
class _RunPlace:
    """Where a run lives: its storage (a local dir or a URI), name, local dir (None on remote storage) and the name
    of the actor holding its data position."""

    storage: Path | str
    run_name: str
    run_dir: Path | None
    state_name: str

    @classmethod
    def of(cls, cfg: RunConfig, run_name: str | None, resume: bool) -> "_RunPlace":
        from reddino import paths

        where = cfg.train.storage_path or str(paths.runs_dir())
        storage = where if "://" in where else Path(where).expanduser().resolve()
        run_name = run_name or cfg.train.run_name or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        run_dir = Path(storage) / run_name if not isinstance(storage, str) else None
        place = cls(storage, run_name, run_dir, f"reddino-run-{run_name}")
        _refuse_second_driver(run_name, place.state_name)
        if resume and run_dir is not None and not run_dir.exists():
            raise FileNotFoundError(f"cannot resume: no run named {run_name!r} under {storage}")
        if run_dir is not None:
            run_dir.mkdir(parents=True, exist_ok=True)
            cfg.to_yaml(run_dir / "run_config.yaml")
            _ray_logs_in_run_dir(run_dir)
        return place


def _open_mlflow_run(cfg: RunConfig, where: _RunPlace, data_hash: str | None, mlflow_tags: dict | None,
                     tracking_uri: str) -> str:
    """The driver owns the MLflow run (a resumed run continues its own); rank 0 logs metrics into it by id."""
    import mlflow

    from reddino.runtime import mlflow_at

    run_dir = where.run_dir
    with mlflow_at(tracking_uri):
        mlflow.set_experiment(cfg.mlflow.experiment)
        existing = None
        if run_dir is not None and (run_dir / "mlflow_run_id").exists():
            existing = (run_dir / "mlflow_run_id").read_text().strip()
        run = mlflow.start_run(run_id=existing, run_name=None if existing else where.run_name)
        if run_dir is not None:
            (run_dir / "mlflow_run_id").write_text(run.info.run_id)
        from reddino.config import POLICY_VERSIONS

        # Which version of the augmentation policy made the run's crops: a resume across a change of it is exact
        # in everything but the augmented pixels after the resume point, and says so.
        policy = f"{cfg.crops.policy} v{POLICY_VERSIONS[cfg.crops.policy]}"
        if existing:
            started = mlflow.get_run(existing).data.tags.get("reddino.crops_policy")
            if started and started != policy:
                print(f"[reddino] WARNING resumed with augmentation policy {policy}; the run started with {started}: "
                      "the crops after the resume point differ from an uninterrupted run's", flush=True)
                mlflow.set_tag("reddino.crops_policy_resumed", policy)
        else:
            params = {k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in cfg.flat().items()}
            items = list(params.items())
            for i in range(0, len(items), 90):
                mlflow.log_params(dict(items[i : i + 90]))
            if mlflow_tags:
                mlflow.set_tags(mlflow_tags)
            mlflow.set_tags({"reddino.config_hash": cfg.hash(), "reddino.data_hash": data_hash or "",
                             "reddino.run_name": where.run_name, "reddino.arch": cfg.model.arch,
                             "reddino.crops_policy": policy})
            if run_dir is not None:
                mlflow.log_artifact(str(run_dir / "run_config.yaml"))
        mlflow.end_run(status="RUNNING")  # the workers log into it by id; the end of the run sets its outcome
    return run.info.run_id


def _worker_plan(cfg: RunConfig, where: _RunPlace, tracking_uri: str, mlflow_run_id: str | None,
                 data_hash: str | None, step_hooks, loss_hook, export_meta: dict[str, Any] | None,
                 progress_file: str | None):
    import yaml

    from reddino.train.loop import WorkerPlan

    return WorkerPlan(
        cfg=cfg.to_dict(), config_yaml=yaml.safe_dump(cfg.to_dict(), sort_keys=False), run_name=where.run_name,
        run_state=where.state_name, tracking_uri=tracking_uri, mlflow_run_id=mlflow_run_id, data_hash=data_hash,
        rows_per_pass=_rows_per_pass(cfg) if cfg.data.overlap_passes else None, progress_file=progress_file,
        step_hooks=list(step_hooks or []), loss_hook=loss_hook, export_meta=dict(export_meta or {}),
    )


def _trainer(cfg: RunConfig, plan, where: _RunPlace, datasets: dict, callbacks: list | None):
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from reddino.runtime import verbose
    from reddino.train.distributed import BoundTorchConfig
    from reddino.train.loop import train_loop_per_worker

    use_gpu = _use_gpu(cfg)
    resources = {"CPU": cfg.train.cpus_per_worker, **(cfg.train.worker_resources or {})}
    if use_gpu:
        resources["GPU"] = 1
    _warn_missing_resources({**(cfg.train.worker_resources or {}), **(cfg.data.map_resources or {})})
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"plan": plan},
        torch_config=BoundTorchConfig(),  # the process group's store listens on the node's address, not on *
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=use_gpu,
                                     resources_per_worker=resources),
        run_config=RayRunConfig(
            name=where.run_name,
            storage_path=str(where.storage),
            # Keep the newest N by step: after a resume, report order restarts, steps do not.
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints,
                                               checkpoint_score_attribute="step", checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=callbacks,
            # Ray Train's INFO lines (resources requested, worker group started, ...) go to its log files only.
            logging_config=LoggingConfig(log_level="INFO" if verbose() else "WARNING"),
        ),
        datasets=datasets,
    )


def _export(latest, cfg: RunConfig, where: _RunPlace) -> Path | None:
    """The final checkpoint's teacher backbone (+ sidecar) copied to where the one rule puts it."""
    from reddino.train.checkpoint import BACKBONE_FILE, export_target

    target = export_target(cfg.train.export_path, where.run_dir, where.run_name)
    with latest.as_directory() as d:
        exported = sorted(Path(d).glob(BACKBONE_FILE + "*"))
        if not exported:
            return None
        target.parent.mkdir(parents=True, exist_ok=True)
        for src in exported:
            dst = target.with_name(target.name + src.name[len(BACKBONE_FILE):])
            tmp = dst.with_name(dst.name + ".tmp")
            shutil.copy2(src, tmp)
            tmp.replace(dst)
    return target


def _close_mlflow_run(mlflow_run_id: str, tracking_uri: str, metrics: dict, backbone: Path | None,
                      stopped: str | None, ckpt_dir: Path | None, where: _RunPlace, k: int) -> None:
    """Final metrics, the backbone artifact, the status tag and the learning curve, on the driver's run."""
    import mlflow

    from reddino.runtime import mlflow_at

    try:
        with mlflow_at(tracking_uri), mlflow.start_run(run_id=mlflow_run_id):
            final = {f"final_{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
            if final:
                mlflow.log_metrics(final)
            if backbone is not None:
                for f in backbone.parent.glob(backbone.name + "*"):
                    mlflow.log_artifact(str(f), artifact_path="backbone")
            if stopped:
                mlflow.set_tag("reddino.stop_reason", stopped)
                mlflow.set_tag("reddino.status", "stopped")
            else:
                mlflow.set_tag("reddino.status", "finished")
            if ckpt_dir is not None:
                mlflow.set_tag("reddino.checkpoint", str(ckpt_dir))
            curve = _learning_curve(mlflow_run_id, tracking_uri, where.run_dir, where.run_name, k)
            if curve is not None:
                mlflow.log_artifact(str(curve))
    except Exception as err:  # noqa: BLE001 - the run itself is done and checkpointed; say what is missing
        print(f"[reddino] WARNING MLflow at {tracking_uri} unreachable at the end ({type(err).__name__}): the "
              f"final metrics, status tag and backbone artifact of run {mlflow_run_id} were not logged; the "
              f"run's files are in {where.run_dir}", flush=True)
