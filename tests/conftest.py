import os

# Before anything imports ray: keep every listener on loopback, no telemetry.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import pytest


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray session per test module (start-up costs seconds), stopped afterwards."""
    import ray

    from reddino.local import init_ray

    if ray.is_initialized():
        ray.shutdown()
    init_ray(num_cpus=2, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture()
def mlflow_uri(tmp_path, monkeypatch):
    """A throwaway sqlite MLflow store for one test."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri
