"""The per-worker DINOv2 training loop (runs inside each Ray Train worker).

Read top to bottom: build model + optimizer → restore the latest checkpoint → stream batches →
step (`reddino.train.step.TrainStep`: schedules, forward, backward, clip, AdamW, teacher EMA) → log → hooks
(`reddino.train.hooks`: health monitors + collapse guard, kNN eval) →
checkpoint → export the teacher backbone at the end.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from reddino.config import RunConfig
from reddino.train import checkpoint as ckpt
from reddino.train.data import BatchStream, dataset_slots, run_state_actor
from reddino.train.hooks import HealthMonitor, KnnEval
from reddino.train.step import TrainStep, any_rank


def _all_gather_keys(keys: np.ndarray) -> np.ndarray:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return keys
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, keys)
    return np.concatenate(gathered)


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class _MLflowLogger:
    """Rank-0 metric logging into the run the driver created (no-op without a run id).

    The tracking server may go away mid-run: training never waits on it. Metrics that fail to send stay
    buffered (up to ``max_pending``) and are retried at the next flush; what could not be sent by the end is
    reported as lost. Requests fail fast (no long HTTP retry loop) because the buffer is the retry.
    """

    max_pending = 200_000
    send_every_s = 2.0  # one request per 2 s at most: at GPU speed a log step comes every few tenths of a second

    def __init__(self, tracking_uri: str | None, run_id: str | None) -> None:
        self.client = None
        self.run_id = run_id
        self.lost = 0
        self._down_since: float | None = None
        self._next_try = 0.0
        self._sent_at = 0.0
        if run_id:
            from mlflow.tracking import MlflowClient

            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
            self.client = MlflowClient(tracking_uri=tracking_uri)
            self.uri = tracking_uri
        self._pending: list = []

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending += [Metric(k, float(v), now, step) for k, v in metrics.items() if np.isfinite(v)]
        if len(self._pending) > self.max_pending:  # keep the newest; say how many were dropped
            self.lost += len(self._pending) - self.max_pending
            self._pending = self._pending[-self.max_pending:]

    def _down(self, err: Exception) -> None:
        self._next_try = time.time() + 10.0
        if self._down_since is None:
            self._down_since = time.time()
            print(f"[reddino] WARNING MLflow at {self.uri} unreachable ({type(err).__name__}); training goes on, "
                  "metrics are buffered and retried", flush=True)

    def flush(self, force: bool = False) -> bool:
        """Send what is buffered, at most every ``send_every_s`` unless ``force``d (each send is a synchronous
        request the training step waits for); False (and keep it) while the server is unreachable (retried every
        10 s)."""
        if self._down_since is not None and not force and time.time() < self._next_try:
            return False
        if not force and self._down_since is None and time.time() - self._sent_at < self.send_every_s:
            return True  # kept for the next send
        self._sent_at = time.time()
        while self.client is not None and self._pending:
            chunk = self._pending[:1000]  # MLflow's log_batch limit
            try:
                self.client.log_batch(self.run_id, metrics=chunk)
            except Exception as err:  # noqa: BLE001 - any transport or server error: retry later
                self._down(err)
                return False
            del self._pending[: len(chunk)]
        if self._down_since is not None:
            print(f"[reddino] MLflow reachable again after {time.time() - self._down_since:.0f} s; buffered "
                  "metrics sent", flush=True)
            self._down_since = None
        return True

    def tag(self, key: str, value: str) -> None:
        if self.client is None:
            return
        try:
            self.client.set_tag(self.run_id, key, value)
        except Exception as err:  # noqa: BLE001
            self._down(err)

    def close(self) -> int:
        """Last flush; returns how many metrics were lost (unsent or dropped)."""
        if not self.flush(force=True):
            self.lost += len(self._pending)
            print(f"[reddino] WARNING MLflow still unreachable at the end: {self.lost} metric values not logged",
                  flush=True)
            self._pending = []
        return self.lost


def _restore(latest, model, optimizer, scaler):
    """Load the checkpoint Ray Train hands back; if it is damaged (a truncated or missing file), fall back to
    the newest older checkpoint of the run that loads. Returns (state, checkpoint used, damaged descriptions)."""
    import pyarrow.fs as pafs
    import ray.train

    damaged: list[str] = []
    candidates = [latest]
    while candidates:
        cand = candidates.pop(0)
        try:
            with cand.as_directory() as d:
                return ckpt.load(Path(d), model=model, optimizer=optimizer, scaler=scaler), cand, damaged
        except Exception as err:  # noqa: BLE001 - any unreadable file means this checkpoint cannot be used
            damaged.append(f"{Path(cand.path).name} ({type(err).__name__}: {str(err)[:160]})")
        if cand is latest:  # the run's older checkpoints, newest first
            parent, name = str(Path(latest.path).parent), Path(latest.path).name
            infos = latest.filesystem.get_file_info(pafs.FileSelector(parent))
            older = sorted((i.path for i in infos if i.type == pafs.FileType.Directory
                            and Path(i.path).name.startswith("checkpoint_") and Path(i.path).name < name),
                           reverse=True)
            candidates = [ray.train.Checkpoint(p, filesystem=latest.filesystem) for p in older]
    raise RuntimeError(f"no loadable checkpoint in {Path(latest.path).parent}: {'; '.join(damaged)}")


def _quiet_train_reports() -> None:
    """Ray Train logs every report (all ~40 metrics) at INFO to the console, from a logger named after its
    source file; the loop prints what a user reads. REDDINO_VERBOSE=1 keeps Train's lines."""
    import logging

    from reddino.runtime import verbose

    if verbose():
        return
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # another Ray layout: nothing to quiet
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def _restore_latest(cfg: RunConfig, model, optimizer, scaler, rank: int):
    """The run's latest loadable checkpoint, if Ray Train hands one back (a restarted worker group or a resumed
    run): (state, checkpoint used or None, damaged checkpoints skipped). Says on rank 0 where it resumed."""
    import ray.train

    restored = ray.train.get_checkpoint()
    if restored is None:
        return ckpt.TrainState(), None, []
    state, restored, damaged = _restore(restored, model, optimizer, scaler)
    # RNG: ranks differ in data order anyway; keep the per-rank stream distinct.
    torch.manual_seed(cfg.train.seed * 1000 + state.step + rank)
    if rank == 0 and damaged:
        print(f"[reddino] WARNING damaged checkpoint(s) skipped: {'; '.join(damaged)}. Resumed from "
              f"{Path(restored.path).name} instead.", flush=True)
    if rank == 0:
        print(f"[reddino] resumed at step {state.step} (data pass {state.data_pass}, "
              f"{state.consumed.size} rows of this pass already consumed)", flush=True)
    return state, restored, damaged


def _open_stream(cfg: RunConfig, state_name: str | None, state, restored: bool, rank: int, world: int,
                 rows_per_pass: int | None):
    """This worker's batches from its Ray Data shard, resuming mid-pass: the run-state actor hands the rows
    already consumed in the interrupted pass to the augmentation tasks, which drop them. Returns (stream, actor)."""
    import ray
    import ray.train

    run_state = run_state_actor(state_name) if state_name else None
    slots = dataset_slots(cfg)
    n = len(slots)
    if rank == 0 and run_state is not None:  # slot (p + i) % n serves pass p + i; only pass p skips rows
        for i in range(n):
            keys = state.consumed if i == 0 else np.empty(0, dtype=np.int64)
            ray.get(run_state.set.remote(keys, state.data_pass + i, (state.data_pass + i) % n))
    _barrier()
    stream = BatchStream([ray.train.get_dataset_shard(name) for name in slots], cfg.train.batch_size_per_worker,
                         state.data_pass, cfg.data.prefetch_batches, cfg.data.shuffle_buffer,
                         resuming=bool(restored), rows_per_pass=rows_per_pass // world if rows_per_pass else None)
    if rank == 0 and state.consumed.size:
        stream.consumed.append(state.consumed)  # the union over workers lives on rank 0 only
    if restored and run_state is None and state.consumed.size:
        raise RuntimeError("resuming mid-pass needs the run-state actor")

    def pass_ended(new_pass: int) -> None:
        # The slot of the pass that ended serves pass new_pass + n - 1 next, with nothing to skip.
        if rank == 0 and run_state is not None:
            nxt = new_pass + n - 1
            ray.get(run_state.set.remote(np.empty(0, dtype=np.int64), nxt, nxt % n))
        _barrier()

    stream.on_pass_end = pass_ended
    return stream, run_state


class _StepLog:
    """Every ``train.log_every`` steps: throughput and eta, then the live bar's file (driver on a tty) or one
    concise line (rank 0)."""

    def __init__(self, total: int, first_step: int, images_seen: int, progress_file: str | None, rank: int) -> None:
        self.total, self.first_step, self.progress_file, self.rank = total, first_step, progress_file, rank
        self.t_start = self.t_last = time.perf_counter()
        self.imgs_last = images_seen

    def __call__(self, step: int, res, images_seen: int, data_pass: int, knn: tuple[int, float | None]) -> dict[str, Any]:
        now = time.perf_counter()
        ips = (images_seen - self.imgs_last) / max(now - self.t_last, 1e-9)
        self.t_last, self.imgs_last = now, images_seen
        eta = (now - self.t_start) / max(step - self.first_step, 1) * (self.total - step)
        if self.progress_file:
            from reddino.train.progress import write_progress

            write_progress(self.progress_file, {"step": step, "total": self.total, "loss": res.loss,
                                                "parts": res.parts, "lr": res.lr, "ips": ips, "eta_s": eta,
                                                "knn_k": knn[0], "knn": knn[1]})
        elif self.rank == 0:
            print(f"[reddino] step {step}/{self.total} loss {res.loss:.4f} "
                  + " ".join(f"{k} {v:.3f}" for k, v in res.parts.items())
                  + f" lr {res.lr:.2e} {ips:.1f} img/s eta {eta/60:.1f} min", flush=True)
        return {"step": step, **res.metrics(), "images_per_s": ips, "data_pass": data_pass,
                "images_seen": images_seen}


@dataclass
class WorkerPlan:
    """What the driver hands every Train worker (``train_loop_config={"plan": WorkerPlan(...)}``): the run's config,
    its identity, where its metrics and run state live, and the caller's hooks (cloudpickled to the workers)."""

    cfg: dict[str, Any]  # RunConfig.to_dict()
    config_yaml: str  # saved in every checkpoint
    run_name: str
    run_state: str | None  # the named Ray actor holding the data position for exact resume
    tracking_uri: str | None
    mlflow_run_id: str | None
    data_hash: str | None
    rows_per_pass: int | None = None  # data.overlap_passes: rows of one pass (the next one starts before it ends)
    progress_file: str | None = None  # the driver draws a live bar from it (on a terminal)
    step_hooks: list[Callable[[int], Any]] = field(default_factory=list)  # hook(step) after every finished step
    loss_hook: Callable | None = None  # (step, loss, parts) -> (loss, parts), see TrainStep
    export_meta: dict[str, Any] = field(default_factory=dict)  # joins the export's metadata (distillation lineage)

    def run_config(self) -> RunConfig:
        return RunConfig.model_validate(self.cfg)


class _Reporter:
    """Reports to Ray Train: metrics (every report names the run, for Tune), and with a checkpoint the full
    training state (rank 0 writes it; the consumed-row keys are gathered from every rank) plus, at the end,
    the exported teacher backbone."""

    def __init__(self, cfg: RunConfig, plan: WorkerPlan, model, optimizer, scaler, state, stream,
                 rank: int, resumed_from: int) -> None:
        self.cfg, self.model, self.optimizer, self.scaler = cfg, model, optimizer, scaler
        self.state, self.stream, self.rank = state, stream, rank
        self.run_name = plan.run_name
        self.ids = {"run_name": self.run_name, "mlflow_run_id": plan.mlflow_run_id or "",
                    "resumed_from_step": resumed_from}
        self.config_yaml = plan.config_yaml
        self.data_hash = plan.data_hash
        self.export_meta = dict(plan.export_meta)  # e.g. a distilled model's teacher lineage

    def step_done(self, step: int, metrics: dict[str, Any], last_metrics: dict[str, Any], is_last: bool,
                  scored: bool) -> None:
        """A checkpoint every ``train.checkpoint_every`` steps and at the end (with the export); else the metrics
        of a step with a new kNN score (``scored``: what Tune's schedulers read). Step logs go to MLflow and the
        console, not to Ray Train: its ``report`` blocks until the controller's next poll (every 2 s) has taken the
        previous one, which held a run to one logged step per 2 s (fast steps: a GPU, a small model)."""
        every = self.cfg.train.checkpoint_every
        if (every and step % every == 0) or is_last:
            self({**last_metrics, **metrics, "step": step}, with_checkpoint=True, export=is_last)
        elif metrics and scored:
            self({**metrics, "step": step}, with_checkpoint=False)

    def __call__(self, metrics: dict[str, Any], with_checkpoint: bool, export: bool = False) -> None:
        import ray.train

        metrics = {**metrics, **self.ids}
        if not with_checkpoint:
            ray.train.report(metrics)
            return
        state = self.state
        state.consumed = _all_gather_keys(self.stream.consumed_keys())
        state.data_pass = self.stream.data_pass
        with tempfile.TemporaryDirectory() as tmp:
            if self.rank != 0:
                ray.train.report(metrics)
                return
            ckpt.save(Path(tmp), model=self.model, optimizer=self.optimizer, scaler=self.scaler, state=state,
                      config_yaml=self.config_yaml)
            if export:
                from reddino.model import export_backbone

                export_backbone(self.model.teacher["backbone"], Path(tmp) / ckpt.BACKBONE_FILE,
                                meta={"run_name": self.run_name, "step": state.step,
                                      "config_hash": self.cfg.hash(), "data_hash": self.data_hash,
                                      **self.export_meta})
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"checkpoint_{state.step:07d}")


def _ssl_model(cfg: RunConfig, device):
    """The training method: DINOv2 pretraining, or distillation from a frozen teacher when ``distill.teacher`` is
    set (:class:`reddino.model.distill.DistillSSL`, a DINOv2SSL: the rest of the loop is the same)."""
    from reddino.model import DINOv2SSL

    if not cfg.distill.enabled:
        return DINOv2SSL.from_config(cfg.model, cfg.loss)
    from reddino.features.extract import resolve_precision
    from reddino.model.distill import DistillSSL

    model = DistillSSL.from_config(cfg)
    if resolve_precision(cfg.distill.teacher_precision, device) == "bf16":
        model.teacher_dtype = torch.bfloat16
    return model


def _seed_and_threads(cfg: RunConfig, rank: int, on_gpu: bool) -> None:
    torch.manual_seed(cfg.train.seed)
    np.random.seed(cfg.train.seed + rank)
    if not on_gpu:
        torch.set_num_threads(max(1, int(cfg.train.torch_threads or cfg.train.cpus_per_worker)))


def _build_model(cfg: RunConfig, device, world: int):
    """The SSL model on ``device``, its DDP wrapper (itself on one worker), AdamW and the fp16 grad scaler."""
    import ray.train.torch

    on_gpu = device.type == "cuda"
    model = _ssl_model(cfg, device)
    if cfg.model.head_use_bn and on_gpu and world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # head BN over the global batch
    model.to(device)
    optimizer = torch.optim.AdamW(model.param_groups(cfg.optim), lr=0.0, betas=tuple(cfg.optim.betas))
    scaler = torch.amp.GradScaler("cuda") if (on_gpu and cfg.train.precision == "fp16") else None
    ddp_model = model
    if world > 1:  # DDP only: RedDino's ViT-S/B/L with a teacher fit one GPU; FSDP would need sharded
        # checkpoints, evaluation and export (a rank-0-only full state dict hangs the other ranks)
        ddp_model = ray.train.torch.prepare_model(
            model, move_to_device=False, parallel_strategy="ddp",
            parallel_strategy_kwargs={"broadcast_buffers": False},
        )
    return model, ddp_model, optimizer, scaler


def _non_finite(step: int, res) -> str:
    culprits = [k for k, v in res.parts.items() if not math.isfinite(v)] or ["total"]
    terms = ", ".join(f"{k}={v:.4g}" for k, v in res.parts.items())
    return (f"non-finite loss at step {step} in {', '.join(culprits)} (total={res.loss:.4g}; {terms}); "
            "run stopped, last good checkpoint kept")


def _stop(reason: str, rank: int, run_state, logger, metrics: dict[str, Any]) -> None:
    """A stopped run: said once, kept in the run-state actor (the driver reads it) and MLflow, reported to Train."""
    import ray
    import ray.train

    if rank == 0:
        print(f"[reddino] STOP: {reason}", flush=True)
        if run_state is not None:
            ray.get(run_state.set_stop_reason.remote(reason))
        if logger is not None:
            logger.tag("reddino.stop_reason", reason)
    ray.train.report({**metrics, "stopped": reason})


def train_loop_per_worker(loop_config: dict[str, WorkerPlan]) -> None:
    import ray.train
    import ray.train.torch

    _quiet_train_reports()

    from reddino.train.schedules import build_schedules

    plan = loop_config["plan"]
    cfg = plan.run_config()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    _seed_and_threads(cfg, rank, on_gpu)

    # --- model, optimizer, restore ---
    model, ddp_model, optimizer, scaler = _build_model(cfg, device, world)
    use_autocast = on_gpu and cfg.train.precision in ("bf16", "fp16")
    amp_dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float16
    state, restored, damaged = _restore_latest(cfg, model, optimizer, scaler, rank)
    resumed_from = state.step if restored is not None else -1

    # --- data ---
    stream, run_state = _open_stream(cfg, plan.run_state, state, restored is not None, rank, world,
                                     plan.rows_per_pass)
    batches = iter(stream)

    # --- schedules and the step ---
    global_batch = cfg.train.batch_size_per_worker * world * cfg.optim.grad_accum_steps
    sched = build_schedules(cfg, global_batch)
    total = cfg.total_steps

    logger = _MLflowLogger(plan.tracking_uri, plan.mlflow_run_id) if rank == 0 else None
    # --- periodic hooks (rank 0): health monitors + collapse guard from the end of the lr warm-up, kNN eval ---
    health = HealthMonitor(cfg, guard_from=sched["lr"].warmup_steps, tag=logger.tag if logger else None)
    knn_eval = KnnEval(cfg, device) if rank == 0 and cfg.eval.data else None
    if logger is not None and damaged:
        logger.tag("reddino.damaged_checkpoints", "; ".join(damaged))
    progress_file = plan.progress_file if rank == 0 else None  # a live bar on the driver's tty
    # The caller's hooks (tests inject faults this way): step_hooks after every finished step, loss_hook per micro-batch.
    step_hooks = list(plan.step_hooks)
    train_step = TrainStep(model, optimizer, sched, cfg, forward=ddp_model, device=device, world=world, scaler=scaler,
                           autocast=use_autocast, amp_dtype=amp_dtype, loss_hook=plan.loss_hook)

    _report = _Reporter(cfg, plan, model, optimizer, scaler, state, stream, rank, resumed_from)

    model.train()
    step_log = _StepLog(total, state.step, state.images_seen, progress_file, rank)
    last_metrics: dict[str, float] = {}
    stop_reason = None

    while state.step < total:
        step = state.step
        res = train_step(step, lambda: next(batches))
        state.images_seen += res.images
        if not res.finite:
            stop_reason = _non_finite(step, res)
            break
        state.step += 1
        step = state.step

        for hook in step_hooks:
            hook(step)

        metrics: dict[str, Any] = {}
        is_last = step >= total
        if step % cfg.train.log_every == 0 or is_last:
            metrics.update(step_log(step, res, state.images_seen, stream.data_pass,
                                    (cfg.eval.k, last_metrics.get(cfg.eval.metric))))

        if health.due(step, is_last):
            if rank == 0:
                metrics.update(health(model, step))
            if any_rank(health.stop_reason is not None, device):  # every worker stops at the same step
                stop_reason = health.stop_reason or "representation collapse on rank 0; run stopped"

        scored = KnnEval.due(cfg, step, is_last)  # the same on every rank: Ray Train wants every rank's report
        if scored:
            if knn_eval is not None:
                metrics.update(knn_eval(model, step, is_last))
            _barrier()

        if metrics and logger is not None:
            logger.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step)
            logger.flush()
        if metrics:
            last_metrics.update(metrics)
            # Every report carries the latest kNN score, so schedulers (ASHA) always see one.
            metrics.update({k: v for k, v in last_metrics.items() if k.startswith("eval_")})

        if stop_reason:
            break
        _report.step_done(step, metrics, last_metrics, is_last, scored)

    if stop_reason:
        _stop(stop_reason, rank, run_state, logger, {**last_metrics, "step": state.step})
    stream.close()  # the next pass's reader thread, if one started
    if logger is not None and logger.close():
        logger.tag("reddino.mlflow_lost_metrics", str(logger.lost))
