"""A 3-raylet Ray cluster on 127.0.0.1 for the cross-node tests: a `data` head and two `train` nodes."""

from __future__ import annotations

import os

import pytest

from reddino.cluster_local import LocalCluster, Node, reload_ray_auth

# Logical CPUs beyond the 2 cores: the head runs the Ray Data tasks (1 CPU each) and Train's controller, each
# train node one Train worker (1 CPU) plus room for a read task.
NODES = [Node("head", 3, {"data": 1}), Node("train1", 2, {"train": 1}), Node("train2", 2, {"train": 1})]


@pytest.fixture(scope="module")
def multinode():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    cluster = LocalCluster(NODES).start()
    saved = {k: os.environ.get(k) for k in (*cluster.env, "RAY_ADDRESS")}
    os.environ["RAY_ADDRESS"] = cluster.address  # what `reddino pretrain` on a cluster node reads
    try:
        cluster.connect(log_to_driver=False)  # sets cluster.env, re-reads the auth token
        yield cluster
    finally:
        ray.shutdown()
        cluster.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        reload_ray_auth()
        left = cluster.leftovers()
        assert not left, f"processes of the cluster survived stop(): {left}"
