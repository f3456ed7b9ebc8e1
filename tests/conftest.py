import os
import tempfile

# Tests never write into the user's ~/.reddino (runs, the shared embedding store, the default registry).
os.environ.setdefault("REDDINO_HOME", tempfile.mkdtemp(prefix="reddino-tests-home-"))
# Before anything imports ray: keep every listener on loopback, no telemetry.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
# Ray Train gives a worker group 60 s to start; a loaded 2-core machine can need more (a failed start would
# look like the crash a fault-injection test expects).
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")

import pytest


_SHARED: dict = {}  # the local Ray the module fixtures share: its session name


def _session_name(ray) -> str:
    return ray._private.worker.global_worker.node.session_name


def _local_ray(num_cpus: int, shared: bool = True):
    """A local Ray with ``num_cpus`` logical CPUs. ``shared``: the one the previous module used, when it is still
    the live session and has as many CPUs (each start and stop costs ~10 s on 2 cores); stopped at the end of the
    test session (or by whichever test stops or replaces it)."""
    import ray

    from reddino.runtime import init_ray

    live = ray.is_initialized() and _SHARED.get("session") == _session_name(ray)
    if shared and live and ray.cluster_resources().get("CPU") == num_cpus:
        yield ray
        return
    if ray.is_initialized():
        ray.shutdown()
    init_ray(num_cpus=num_cpus, log_to_driver=False)
    _SHARED.clear()
    if shared:
        _SHARED["session"] = _session_name(ray)
    yield ray
    if not shared:
        ray.shutdown()


@pytest.fixture(scope="session", autouse=True)
def _stop_shared_ray():
    yield
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray for the module, shared with the modules before and after it (see ``_local_ray``). Six logical
    CPUs on the 2 cores, as ``ray_train``, so both share one session."""
    yield from _local_ray(6)


@pytest.fixture(scope="module")
def ray_train():
    """Local Ray with 6 logical CPUs on the 2 cores: Train workers + Ray Data tasks + Tune trials each
    reserve CPUs, and a stopped trial's placement group may still be in cleanup when the next starts."""
    yield from _local_ray(6)


@pytest.fixture()
def use_mlflow_store(monkeypatch):
    """``use(uri)``: MLFLOW_TRACKING_URI for one test, and MLflow's process-wide URIs unset for it, so the
    variable is what `models:/` refs resolve against (an earlier mlflow.set_tracking_uri would win over it)."""
    from mlflow.tracking._model_registry import utils as reg
    from mlflow.tracking._tracking_service import utils as trk

    def use(uri: str) -> str:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        monkeypatch.setattr(trk, "_tracking_uri", None)
        monkeypatch.setattr(reg, "_registry_uri", None)
        return uri

    return use


@pytest.fixture()
def mlflow_uri(tmp_path, use_mlflow_store):
    """A throwaway sqlite MLflow store for one test."""
    return use_mlflow_store(f"sqlite:///{tmp_path / 'mlflow.db'}")


@pytest.fixture()
def ray_fresh():
    """A Ray session of its own for one test: a trial stopped by ASHA can hold its CPUs until Ray Train's
    placement-group cleaner releases it, which must not starve the next test's trials."""
    yield from _local_ray(6, shared=False)
