"""A local pretraining run listens on loopback only: every socket any of its processes opens for listening
(Ray's GCS, raylet, dashboard and agents, the Train workers' torch.distributed store and Gloo) is on
127.0.0.0/8 or ::1, never on every interface."""

import ipaddress
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from reddino.config import load_config
from reddino.data import generate_synthetic
from reddino.train import pretrain

TINY_CONFIG = str(Path(__file__).parents[1] / "tiny.yaml")


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = set(), [root]
    while todo:
        pid = todo.pop()
        out.add(pid)
        todo.extend(children.get(pid, []))
    return out


def _listeners(pids: set[int]) -> set[tuple[str, str]]:
    """(local address, process name) of every listening TCP socket owned by one of `pids` (`ss -ltnp`)."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    found = set()
    for line in out.splitlines():
        fields = line.split()
        users = fields[-1] if fields[-1].startswith("users:") else ""
        for part in users.split("),("):
            if "pid=" in part:
                pid = int(part.split("pid=")[1].split(",")[0])
                if pid in pids:
                    found.add((fields[3], part.split('"')[1] if '"' in part else "?"))
    return found


def _is_loopback(local: str) -> bool:
    host = local.rsplit(":", 1)[0].strip("[]").split("%")[0]
    if host == "*":
        return False
    ip = ipaddress.ip_address(host)
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback  # gRPC's dual-stack sockets: ::ffff:127.0.0.1


@pytest.mark.slow  # a 2-worker run: ~60 s idle, minutes on a loaded machine
@pytest.mark.skipif(shutil.which("ss") is None, reason="needs `ss` (iproute2) to list listening sockets")
def test_a_local_run_listens_on_loopback_only(ray_train, tmp_path):
    data = tmp_path / "data"
    generate_synthetic(data, n_per_class=2, sources=1, unit="patch", seed=0, n_patches=16)
    cfg = load_config(TINY_CONFIG, [
        f"data.paths=[{data}]", "data.resize=56", "crops.global_crops_size=56", "crops.local_crops_size=28",
        "crops.local_crops_number=1", "model.img_size=56", "model.head_prototypes=64", "model.head_hidden_dim=32",
        "model.head_bottleneck_dim=16", "train.epochs=1", "train.iters_per_epoch=4", "train.batch_size_per_worker=2",
        "train.num_workers=2", "train.torch_threads=1", "train.checkpoint_every=4", "train.log_every=1",
        "train.monitor_every=100", "eval.every=0", f"train.storage_path={tmp_path / 'runs'}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
    ])
    seen: set[tuple[str, str]] = set()
    done = threading.Event()

    def sample() -> None:  # every process this test started (Ray's daemons, workers) while the run lasts
        while not done.is_set():
            seen.update(_listeners(_descendants(os.getpid())))
            done.wait(0.3)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = pretrain(cfg, run_name="listeners")
    finally:
        done.set()
        sampler.join()
    assert result.metrics["step"] == 4
    names = {name for _, name in seen}
    assert any("RayTrainWorker" in n or "ray::" in n for n in names), f"no Train worker listener sampled: {seen}"
    open_ = sorted((addr, name) for addr, name in seen if not _is_loopback(addr))
    assert not open_, f"listening beyond loopback: {open_}"
