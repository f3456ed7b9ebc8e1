"""`ray job submit` end to end: a real local Ray head from cluster/local/start.sh (loopback, token auth), jobs
submitted through the Job Submission API and the `ray job` CLI, stopped by cluster/local/stop.sh.

The head-start / submit / stop / auth mechanics run always. The pretraining and sweep submissions activate
once reddino.model, reddino.data.generate_synthetic and reddino.tune are importable.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from reddino.runtime import free_port

REPO = Path(__file__).resolve().parents[2]
START = REPO / "cluster" / "local" / "start.sh"
STOP = REPO / "cluster" / "local" / "stop.sh"

# Tiny pretraining: a few steps of the tiny ViT on 56 px crops.
TINY = [
    "data.resize=56", "crops.global_crops_size=56", "crops.local_crops_size=28", "crops.local_crops_number=1",
    "model.img_size=56", "model.head_prototypes=256", "model.head_hidden_dim=64", "model.head_bottleneck_dim=32",
    "train.epochs=1", "train.iters_per_epoch=4", "train.batch_size_per_worker=8", "train.checkpoint_every=4",
    "train.log_every=1", "train.monitor_every=4",
]


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    if addr.version == 6 and addr.ipv4_mapped is not None:  # ::ffff:127.0.0.1
        addr = addr.ipv4_mapped
    return addr.is_loopback


def _session_pids(sid: int) -> list[int]:
    """Live (not zombie) processes of session `sid`; start.sh runs each server as a session leader."""
    out = subprocess.run(["ps", "-eo", "pid=,sid=,stat="], capture_output=True, text=True, check=True).stdout
    return [int(p) for p, s, stat in (line.split() for line in out.splitlines())
            if int(s) == sid and not stat.startswith("Z")]


class LocalCluster:
    def __init__(self, state: Path, env: dict[str, str]):
        self.state, self.env = state, env
        # what a user's shell gets from `source <state>/env`
        self.exports = dict(line[len("export "):].split("=", 1) for line in (state / "env").read_text().splitlines())
        self.address = self.exports["RAY_ADDRESS"]
        self.mlflow_uri = self.exports["MLFLOW_TRACKING_URI"]
        self.token = (state / "token").read_text().strip()
        self.sessions = {name: int((state / f"{name}.pid").read_text()) for name in ("ray", "mlflow")}

    def client(self):
        from ray.job_submission import JobSubmissionClient

        # An explicit Authorization header: this test process may already hold another token in Ray's
        # process-wide token cache (e.g. from an earlier ray.init in the same pytest run).
        return JobSubmissionClient(self.address, headers={"Authorization": f"Bearer {self.token}"})

    def cli_env(self) -> dict[str, str]:
        """A shell with the project's `ray` on PATH after `source <state>/env`."""
        return {**self.env, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", **self.exports}


@pytest.fixture(scope="module")
def cluster():
    # Short state dir: Ray's unix sockets live under it (paths must stay < 108 chars).
    state = Path(tempfile.mkdtemp(prefix="rdops-", dir="/tmp"))
    env = {
        **os.environ,
        "REDDINO_CLUSTER_DIR": str(state),
        "RAY_AUTH_TOKEN_PATH": str(state / "token"),  # never touch the user's ~/.ray/auth_token
        "REDDINO_DASHBOARD_PORT": str(free_port()),
        "REDDINO_MLFLOW_PORT": str(free_port()),
        # logical CPUs (the machine may have 2 cores): a sweep trial holds 0.1 CPU for its driver, its Train
        # worker 1 and its Ray Data map task 1, so 2 would deadlock the sweep
        "REDDINO_NUM_CPUS": "4",
        "REDDINO_PYTHON": sys.executable,
    }
    for key in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_MODE"):
        env.pop(key, None)
    t0 = time.time()
    proc = subprocess.run(["bash", str(START)], env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        logs = "\n".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in (state / "logs").glob("*.log"))
        subprocess.run(["bash", str(STOP)], env=env, timeout=120)
        pytest.fail(f"start.sh failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}\n{logs}")
    print(f"local cluster up in {time.time() - t0:.1f}s:\n{proc.stdout}")
    lc = LocalCluster(state, env)
    try:
        yield lc
    finally:
        t0 = time.time()
        stop = subprocess.run(["bash", str(STOP)], env=env, capture_output=True, text=True, timeout=180)
        print(f"stop.sh in {time.time() - t0:.1f}s:\n{stop.stdout}{stop.stderr}")
        leftovers = {name: _session_pids(sid) for name, sid in lc.sessions.items()}
        shutil.rmtree(state, ignore_errors=True)
        assert stop.returncode == 0, stop.stderr
        assert not any(leftovers.values()), f"processes survived stop.sh: {leftovers}"


def _runtime_env(**env_vars) -> dict:
    """jobs/runtime_env.yaml as `ray job submit --runtime-env` reads it, with test-specific env vars."""
    spec = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
    spec["working_dir"] = str(REPO / spec["working_dir"])
    spec["env_vars"] = {**spec.get("env_vars", {}), **env_vars}
    return spec


def _wait(client, job_id: str, timeout: float, until=None):
    until = until or (lambda s: s.is_terminal())
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = client.get_job_status(job_id)
        if until(status):
            return status
        time.sleep(1)
    client.stop_job(job_id)
    pytest.fail(f"job {job_id} still {status} after {timeout}s; logs:\n{client.get_job_logs(job_id)[-5000:]}")


def _submit_and_wait(client, entrypoint: str, runtime_env: dict, timeout: float) -> str:
    from ray.job_submission import JobStatus

    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
    status = _wait(client, job_id, timeout)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, f"{entrypoint}: {status}\n{logs[-8000:]}"
    return logs


# --------------------------------------------------------------------------------------------- mechanics


def test_job_api_requires_token(cluster):
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{cluster.address}/api/jobs/", timeout=10)
    assert err.value.code == 401
    bad = urllib.request.Request(f"{cluster.address}/api/jobs/", headers={"Authorization": "Bearer wrong"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(bad, timeout=10)
    assert err.value.code == 403
    good = urllib.request.Request(f"{cluster.address}/api/jobs/", headers={"Authorization": f"Bearer {cluster.token}"})
    assert json.loads(urllib.request.urlopen(good, timeout=10).read()) is not None
    assert urllib.request.urlopen(f"{cluster.mlflow_uri}/health", timeout=10).status == 200


def test_submit_job_entrypoint_runs_with_runtime_env(cluster):
    client = cluster.client()
    probe = ("import os, reddino; print('reddino-from', reddino.__file__); "
             "print('mlflow-uri', os.environ['MLFLOW_TRACKING_URI']); print('auth', os.environ.get('RAY_AUTH_MODE')); "
             "print('working-dir-first-on-pythonpath', os.environ['PYTHONPATH'].split(os.pathsep)[0] == os.getcwd())")
    logs = _submit_and_wait(
        client, f'python jobs/pretrain.py --help && python -c "{probe}"',
        _runtime_env(MLFLOW_TRACKING_URI=cluster.mlflow_uri), timeout=180)
    assert "Usage: python jobs/pretrain.py" in logs
    assert f"mlflow-uri {cluster.mlflow_uri}" in logs
    assert "auth token" in logs  # the job's own Ray processes run with token auth
    # the job (and its workers, `python jobs/x.py` included) imports the uploaded working_dir, not the checkout
    assert "working-dir-first-on-pythonpath True" in logs
    assert "reddino-from " in logs and f"reddino-from {REPO}/" not in logs


def test_every_listener_of_the_head_is_loopback(cluster):
    import ray  # noqa: F401 - puts Ray's vendored psutil (ray/thirdparty_files) on sys.path
    import psutil

    pids = set(_session_pids(cluster.sessions["ray"])) | set(_session_pids(cluster.sessions["mlflow"]))
    listening = [(c.pid, c.laddr) for c in psutil.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.pid in pids]
    assert listening, "found no listening sockets of the started processes"
    exposed = [(pid, addr) for pid, addr in listening if not _is_loopback(addr.ip)]
    assert not exposed, f"listeners outside loopback: {exposed}"


def test_stop_job(cluster):
    from ray.job_submission import JobStatus

    client = cluster.client()
    job_id = client.submit_job(entrypoint="python -c \"import time; print('sleeping', flush=True); time.sleep(600)\"")
    _wait(client, job_id, 120, until=lambda s: s == JobStatus.RUNNING)
    assert client.stop_job(job_id)
    assert _wait(client, job_id, 60) == JobStatus.STOPPED


def test_ray_job_cli_as_documented(cluster):
    """The README's command line: `ray job submit --runtime-env jobs/runtime_env.yaml -- python jobs/...`."""
    env = cluster.cli_env()
    proc = subprocess.run(
        ["ray", "job", "submit", "--address", cluster.address, "--runtime-env", "jobs/runtime_env.yaml",
         "--", "python", "jobs/register.py", "--help"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "succeeded" in proc.stdout.lower(), proc.stdout
    assert "Usage: python jobs/register.py" in proc.stdout
    # without the token the same command is refused
    env_no_token = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
    env_no_token["HOME"] = str(cluster.state)  # no ~/.ray/auth_token to fall back on
    refused = subprocess.run(["ray", "job", "list", "--address", cluster.address],
                             cwd=REPO, env=env_no_token, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0


# --------------------------------------------------------------------------------------------- workflows


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from reddino.data import generate_synthetic

    out = tmp_path_factory.mktemp("ops-synth") / "data"
    generate_synthetic(out, n_per_class=4, sources=2, unit="both", seed=0, n_patches=16)
    return out


@pytest.mark.slow
def test_pretrain_job(cluster, synth, tmp_path):
    from mlflow.tracking import MlflowClient

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runs = tmp_path / "runs"
    cmd = " ".join(["python jobs/pretrain.py --config tests/tiny.yaml --run-name ops-tiny", f"--data {synth}",
                    *TINY, f"train.storage_path={runs}"])
    t0 = time.time()
    logs = _submit_and_wait(cluster.client(), cmd, _runtime_env(MLFLOW_TRACKING_URI=tracking), timeout=420)
    print(f"pretrain job: {time.time() - t0:.1f}s")
    assert "teacher backbone:" in logs
    backbone = runs / "ops-tiny" / "backbone.safetensors"
    assert backbone.exists()

    client = MlflowClient(tracking_uri=tracking)
    exp = client.get_experiment_by_name("reddino-tiny")
    found = client.search_runs([exp.experiment_id], filter_string="tags.`reddino.run_name` = 'ops-tiny'")
    assert len(found) == 1
    run = found[0]
    assert run.data.tags["reddino.status"] == "finished"
    assert any(a.path.endswith(".safetensors") for a in client.list_artifacts(run.info.run_id, "backbone"))


@pytest.mark.slow
def test_sweep_job(cluster, synth, tmp_path):
    from mlflow.tracking import MlflowClient

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "sweeps"
    cmd = " ".join(["python jobs/sweep.py --space hparams --trials 2 --concurrency 1 --name ops-sweep",
                    f"--data {synth} --eval-data {synth} --out {out}", *TINY,
                    # every report Tune sees must carry the sweep metric: log exactly at the kNN evals
                    "eval.every=2", "train.log_every=2", "eval.max_images=64"])
    t0 = time.time()
    _submit_and_wait(cluster.client(), cmd, _runtime_env(MLFLOW_TRACKING_URI=tracking), timeout=600)
    print(f"sweep job: {time.time() - t0:.1f}s")
    assert (out / "ops-sweep" / "trials.csv").exists()
    client = MlflowClient(tracking_uri=tracking)
    exp = client.get_experiment_by_name("reddino-tiny-sweeps")
    assert exp is not None and client.search_runs([exp.experiment_id])
