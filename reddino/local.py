"""Embedded local mode: a loopback-only Ray session and a sqlite MLflow store under one folder."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_HOME = Path(os.environ.get("REDDINO_HOME", "~/.reddino")).expanduser()


def loopback_env() -> None:
    """Keep every listener of a *local* Ray on 127.0.0.1 (Ray binds the routable IP unless this is
    set before it starts). Only for Ray sessions we start ourselves, never for a cluster we join."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def default_tracking_uri(home: Path | None = None) -> str:
    """`MLFLOW_TRACKING_URI` if set, else a sqlite file in the reddino home folder."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    home = Path(home or DEFAULT_HOME)
    home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(home / 'mlflow.db').resolve()}"


def init_ray(num_cpus: int | None = None, address: str | None = None, **kwargs):
    """Connect to `address` (or RAY_ADDRESS) if given, else start a loopback-only local Ray."""
    import ray

    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
    else:
        loopback_env()
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            **kwargs,
        )
    return ray
