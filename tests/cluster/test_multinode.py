"""Pretraining across raylets: 2 Train workers on 2 `train` nodes (DDP over gloo), augmentation pinned to the
`data` node, shared storage; placement checked from Ray's state API. Then a Train worker SIGKILLed mid-run."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from reddino.config import load_config
from reddino.data import generate_synthetic
from reddino.train import pretrain
from reddino.train.checkpoint import DATA_STATE_FILE

TINY_CONFIG = str(Path(__file__).parents[1] / "tiny.yaml")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate_synthetic(root / "data", n_per_class=4, sources=2, unit="both", seed=0, n_patches=48)
    return root / "data"


def _overrides(synth, tmp_path, steps, **extra) -> list[str]:
    return [
        f"data.paths=[{synth}]", "data.resize=56", "crops.global_crops_size=56", "crops.local_crops_size=28",
        "crops.local_crops_number=1", "model.img_size=56", "model.head_prototypes=256",
        "model.head_hidden_dim=64", "model.head_bottleneck_dim=32", "data.map_batch_size=16",
        "train.epochs=1", f"train.iters_per_epoch={steps}", "train.batch_size_per_worker=4",
        "train.num_workers=2", "train.torch_threads=1", "train.checkpoint_every=2", "train.keep_checkpoints=10",
        "train.log_every=1", "train.monitor_every=2", f"train.storage_path={tmp_path / 'shared' / 'runs'}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "data.map_resources={data: 0.01}", "train.worker_resources={train: 1}",
    ] + [f"{k}={v}" for k, v in extra.items()]


def _cfg(synth, tmp_path, steps, **extra):
    return load_config(TINY_CONFIG, _overrides(synth, tmp_path, steps, **extra))


def _nodes_with(resource: str) -> set[str]:
    import ray

    return {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get(resource)}


def _train_workers(state="ALIVE"):
    from ray.util.state import list_actors

    return list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", state)], limit=1000,
                       raise_on_missing_output=False)


def _consumed(ckpt_dir):
    data = np.load(Path(ckpt_dir) / DATA_STATE_FILE)
    return data["consumed"]


def test_two_workers_on_two_nodes_data_on_the_data_node(multinode, synth, tmp_path):
    import ray
    from ray.util.state import list_tasks

    import reddino

    assert reddino.__file__.startswith(str(Path(__file__).parents[2]))
    cfg = _cfg(synth, tmp_path, steps=4)
    t0 = time.time()
    result = pretrain(cfg, run_name="multinode")
    print(f"pretrain on 3 raylets: {time.time() - t0:.1f}s")
    assert result.metrics["step"] == 4 and not result.stopped
    assert result.checkpoint_dir.name == "checkpoint_0000004"
    assert result.backbone_path is not None and result.backbone_path.exists()
    assert len(np.unique(_consumed(result.checkpoint_dir))) == 4 * 8  # both workers' rows, none twice

    # Placement as Ray recorded it, not as configured.
    train_nodes, data_nodes = _nodes_with("train"), _nodes_with("data")
    workers = _train_workers("DEAD")
    assert len(workers) == 2, workers
    assert {w.node_id for w in workers} == train_nodes and len(train_nodes) == 2  # one worker on each
    augment = [t for t in list_tasks(limit=10000, raise_on_missing_output=False) if "Augment" in t.name]
    assert augment, "no augmentation task in Ray's task list"
    assert {t.node_id for t in augment} == data_nodes, {(t.name, t.node_id) for t in augment}
    # The workers imported this checkout's reddino too (PYTHONPATH reaches the raylets).
    where = ray.get(ray.remote(lambda: __import__("reddino").__file__).options(resources={"train": 0.01}).remote())
    assert where == reddino.__file__


def test_sigkilled_train_worker_restarts_group_and_resumes_exactly(multinode, synth, tmp_path):
    cfg = _cfg(synth, tmp_path, steps=10, **{"train.max_failures": 1})
    run_dir = tmp_path / "shared" / "runs" / "killed-worker"
    killed: dict = {}

    def kill_when_checkpointed():
        deadline = time.time() + 600
        while time.time() < deadline and not (run_dir / "checkpoint_0000004").exists():
            time.sleep(0.2)
        alive = _train_workers()
        if alive:
            victim = max(alive, key=lambda a: a.pid)
            os.kill(victim.pid, signal.SIGKILL)
            killed.update(pid=victim.pid, node=victim.node_id)

    killer = threading.Thread(target=kill_when_checkpointed, daemon=True)
    killer.start()
    result = pretrain(cfg, run_name="killed-worker")
    killer.join(5)
    assert killed, "the worker was never killed"
    assert result.metrics["step"] == 10 and not result.stopped
    resumed = result.metrics["resumed_from_step"]
    assert resumed >= 2, f"the group restarted from scratch: {result.metrics}"
    before = _consumed(run_dir / f"checkpoint_{resumed:07d}")
    after = _consumed(result.checkpoint_dir)
    assert set(before.tolist()) <= set(after.tolist())
    assert len(np.unique(after)) == len(after) == 10 * 8  # exactly the rows of 10 steps, none twice
    assert len(_train_workers("DEAD")) >= 2 + 2  # this run's first group and its replacement
    assert result.backbone_path is not None and result.backbone_path.exists()


def test_second_driver_on_a_live_run_is_refused(multinode, synth, tmp_path):
    import subprocess
    import sys

    from reddino.train.data import live_run_state

    holder = ("import sys, time, ray; from reddino.train.data import run_state_actor; ray.init(address=sys.argv[1]); "
              "a = run_state_actor('reddino-run-busy'); ray.get(a.get.remote()); print('READY', flush=True); "
              "time.sleep(600)")
    other = subprocess.Popen([sys.executable, "-c", holder, multinode.address], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, **multinode.env})
    try:
        assert other.stdout.readline().strip() == "READY"
        with pytest.raises(RuntimeError, match="being trained by another driver"):
            pretrain(_cfg(synth, tmp_path, steps=2), run_name="busy")
        assert not (tmp_path / "shared" / "runs" / "busy").exists()  # refused before touching the run
    finally:
        other.kill()
        other.wait(30)
    deadline = time.time() + 60  # the actor dies with its driver: the run is free again
    while live_run_state("reddino-run-busy") is not None and time.time() < deadline:
        time.sleep(1)
    assert live_run_state("reddino-run-busy") is None


def test_ray_job_submit_with_token_to_the_multinode_cluster(multinode, synth, tmp_path):
    import yaml
    from ray.job_submission import JobStatus, JobSubmissionClient

    repo = Path(__file__).parents[2]
    spec = yaml.safe_load((repo / "jobs" / "runtime_env.yaml").read_text())
    spec["working_dir"] = str(repo / spec["working_dir"])
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec["env_vars"] = {**spec.get("env_vars", {}), "MLFLOW_TRACKING_URI": tracking}
    token = multinode.token_path.read_text().strip()
    with pytest.raises(Exception):  # no token, no job API
        JobSubmissionClient(multinode.dashboard_url, headers={"Authorization": "Bearer wrong"}).list_jobs()
    client = JobSubmissionClient(multinode.dashboard_url, headers={"Authorization": f"Bearer {token}"})
    overrides = " ".join(f"'{o}'" for o in _overrides(synth, tmp_path, steps=2) if not o.startswith("mlflow."))
    job = client.submit_job(entrypoint=f"python jobs/pretrain.py --config tests/tiny.yaml --run-name job {overrides}",
                            runtime_env=spec)
    deadline = time.time() + 600
    while not client.get_job_status(job).is_terminal() and time.time() < deadline:
        time.sleep(2)
    logs = client.get_job_logs(job)
    assert client.get_job_status(job) == JobStatus.SUCCEEDED, logs[-5000:]
    assert "teacher backbone:" in logs
    assert (tmp_path / "shared" / "runs" / "job" / "backbone.safetensors").exists()


def _wait_for(path: Path, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.2)


def _assert_exact(result, run_dir, steps=10):
    assert result.metrics["step"] == steps and not result.stopped
    resumed = result.metrics["resumed_from_step"]
    assert resumed >= 2, f"the run restarted from scratch: {result.metrics}"
    before = _consumed(run_dir / f"checkpoint_{resumed:07d}")
    after = _consumed(result.checkpoint_dir)
    assert set(before.tolist()) <= set(after.tolist())
    assert len(np.unique(after)) == len(after) == steps * 8  # exactly the rows of the run, none twice
    assert result.backbone_path is not None and result.backbone_path.exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_killed_driver_then_resume_finishes_exactly(multinode, synth, tmp_path, sig):
    """`reddino pretrain` (its own process, a driver on the cluster) is interrupted after step 4's checkpoint;
    `pretrain(..., resume=True)` from another driver finishes the run with the same data guarantees."""
    import subprocess
    import sys

    from reddino.train.data import live_run_state

    name = f"driver-{sig.name}"
    run_dir = tmp_path / "shared" / "runs" / name
    argv = [sys.executable, "-c", "from reddino.cli import app; app()", "pretrain", "--config", TINY_CONFIG,
            "--run-name", name, *_overrides(synth, tmp_path, steps=10)]
    driver = subprocess.Popen(argv, env={**os.environ, **multinode.env, "RAY_ADDRESS": multinode.address},
                              stdout=open(tmp_path / "driver.log", "w"), stderr=subprocess.STDOUT)
    try:
        _wait_for(run_dir / "checkpoint_0000004")
        driver.send_signal(sig)
        assert driver.wait(120) != 0, "the driver finished before it was interrupted"
    finally:
        if driver.poll() is None:
            driver.kill()
    deadline = time.time() + 120  # the run's actors die with their driver; then the run is free again
    while live_run_state(f"reddino-run-{name}") is not None and time.time() < deadline:
        time.sleep(1)
    result = pretrain(_cfg(synth, tmp_path, steps=10), run_name=name, resume=True)
    _assert_exact(result, run_dir)


def test_killed_train_raylet_run_waits_for_the_node_and_finishes(multinode, synth, tmp_path):
    """The raylet hosting one Train worker is SIGKILLed after step 4's checkpoint and started again: Ray Train
    restarts the worker group once the `train` resources are back and the run resumes exactly."""
    cfg = _cfg(synth, tmp_path, steps=10, **{"train.max_failures": 1})
    run_dir = tmp_path / "shared" / "runs" / "killed-raylet"
    events: dict = {}

    def kill_then_restart():
        _wait_for(run_dir / "checkpoint_0000004")
        multinode.kill_node("train2")
        events["killed"] = time.time()
        time.sleep(10)
        multinode.start_node("train2")
        events["restarted"] = time.time()

    chaos = threading.Thread(target=kill_then_restart, daemon=True)
    chaos.start()
    result = pretrain(cfg, run_name="killed-raylet")
    chaos.join(200)
    assert "killed" in events and "restarted" in events, events
    _assert_exact(result, run_dir)
    assert multinode.running("train2")
