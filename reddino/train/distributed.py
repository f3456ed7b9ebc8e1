"""torch.distributed set up on the node's own address only.

Ray Train's default set-up starts rank 0's TCPStore on every interface (``*:<port>``, IPv4 and IPv6): an
unauthenticated key-value store reachable from the network for the whole run. Here rank 0 binds the store's
socket to the address Ray gives the worker's node (127.0.0.1 for a local Ray, the node's cluster address on a
cluster) and hands it to the store, and Gloo / NCCL open their sockets on that address's interface.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
from dataclasses import dataclass
from datetime import timedelta

# Rank 0's bound listening socket between the two set-up calls (one Train worker per process).
_LISTENER: socket.socket | None = None

_SIOCGIFADDR = 0x8915  # Linux ioctl: an interface's IPv4 address


def interface_of(addr: str) -> str | None:
    """The network interface that holds IPv4 ``addr`` (``lo`` for 127.0.0.1), or None when none does."""
    try:
        packed = socket.inet_aton(addr)
    except OSError:
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for _, name in socket.if_nameindex():
            try:
                got = fcntl.ioctl(probe.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:  # no IPv4 address on this interface
                continue
            if got[20:24] == packed:
                return name
    return "lo" if addr.startswith("127.") else None


def _bind_listener() -> tuple[str, int]:
    """On rank 0: a listening socket on this node's Ray address, a port of the kernel's choosing."""
    import ray

    global _LISTENER
    addr = ray.util.get_node_ip_address()
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((addr, 0))
    sock.listen(1024)
    _LISTENER = sock
    return addr, int(sock.getsockname()[1])


def _setup_process_group(backend: str, world_rank: int, world_size: int, addr: str, port: int, timeout_s: int) -> None:
    import torch.distributed as dist

    global _LISTENER
    iface = interface_of(addr)
    if iface:  # Gloo's and NCCL's own listeners: the same interface, unless the user chose one
        os.environ.setdefault("GLOO_SOCKET_IFNAME", iface)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", iface)
    timeout = timedelta(seconds=timeout_s)
    if world_rank == 0:
        assert _LISTENER is not None, "rank 0's listener was not bound"
        fd = _LISTENER.detach()  # the store owns (and closes) the socket from here
        _LISTENER = None
        store = dist.TCPStore(addr, port, world_size, True, timeout=timeout, wait_for_workers=False,
                              master_listen_fd=fd, use_libuv=True)
    else:
        store = dist.TCPStore(addr, port, world_size, False, timeout=timeout)
    if backend == "nccl" or backend.startswith("cuda:nccl"):
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # as Ray Train does
    dist.init_process_group(backend=backend, store=store, rank=world_rank, world_size=world_size, timeout=timeout)


from ray.train.torch import TorchConfig  # noqa: E402 - imported by the driver only, beside TorchTrainer
from ray.train.torch.config import _TorchBackend  # noqa: E402


class BoundTorchBackend(_TorchBackend):
    """Ray Train's torch backend with the process group's sockets on the node's own address."""

    def on_start(self, worker_group, backend_config) -> None:
        import ray
        from ray.train._internal.worker_group import WorkerGroup as V1WorkerGroup
        from ray.train.torch.config import _set_torch_distributed_env_vars

        backend = backend_config.backend
        if backend is None:
            backend = "nccl" if worker_group.get_resources_per_worker().get("GPU", 0) > 0 else "gloo"
        addr, port = worker_group.execute_single(0, _bind_listener)
        if not isinstance(worker_group, V1WorkerGroup):
            worker_group.execute(_set_torch_distributed_env_vars)
        worker_group.execute(_set_master_env, addr=addr, port=port)
        ray.get([worker_group.execute_single_async(i, _setup_process_group, backend=backend, world_rank=i,
                                                   world_size=len(worker_group), addr=addr, port=port,
                                                   timeout_s=backend_config.timeout_s)
                 for i in range(len(worker_group))])


def _set_master_env(addr: str, port: int) -> None:  # for code that reads them (torch.distributed's env://)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, str(port)


@dataclass
class BoundTorchConfig(TorchConfig):
    """``TorchTrainer(torch_config=BoundTorchConfig())``: the process group listens on the node's own address
    only (127.0.0.1 locally)."""

    @property
    def backend_cls(self):
        return BoundTorchBackend
