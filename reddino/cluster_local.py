"""A multi-node Ray cluster on one machine: a head plus worker raylets on 127.0.0.1, each with its own ports
and custom resources (e.g. a `data` node and `train` nodes), for testing the cross-node paths before paying
for a cluster.

    with LocalCluster([Node("head", 3, {"data": 1}), Node("t1", 2, {"train": 1})]) as c:
        ray.init(address=c.address)          # or RAY_ADDRESS=c.address for `reddino pretrain`

Each raylet is a `ray start --block` in a session of its own (setsid); stopping a node SIGTERMs that session
leader and SIGKILLs what is left of exactly that session: nothing else on the machine (never `ray stop`,
which stops every Ray instance of the user). Token auth is on (a token file of its own under the state dir).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import reddino
from reddino.runtime import free_port

# The checkout whose `reddino` this process imports: every raylet's workers must import the same one.
PACKAGE_ROOT = Path(reddino.__file__).resolve().parents[1]


_JOIN_AS_GIVEN = (
    "import sys; import ray._private.services as s; s.resolve_ip_for_localhost = lambda host: host; "
    "from ray.scripts.scripts import main; sys.argv[0] = 'ray'; sys.exit(main())"
)


@dataclass
class Node:
    name: str
    num_cpus: float
    resources: dict[str, float] = field(default_factory=dict)


def _session_pids(sid: int) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid=,sid=,stat="], capture_output=True, text=True, check=True).stdout
    return [int(p) for p, s, stat in (line.split() for line in out.splitlines())
            if int(s) == sid and not stat.startswith("Z")]


def _ray_bin() -> str:
    candidate = Path(sys.executable).parent / "ray"
    return str(candidate) if candidate.exists() else (shutil.which("ray") or "ray")


def reload_ray_auth() -> None:
    """Ray caches the auth mode and token per process on first use (an earlier local Ray may have had none):
    re-read them from the environment, as Ray's own tests do (ray._private.authentication_test_utils)."""
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


class LocalCluster:
    """Head = ``nodes[0]``; the others join it. ``env`` is what a client (driver, `ray job`) needs."""

    def __init__(self, nodes: list[Node], state_dir: str | Path | None = None, start_timeout: float = 180) -> None:
        if not nodes:
            raise ValueError("a cluster needs at least a head node")
        names = [n.name for n in nodes]
        if len(set(names)) != len(names):
            raise ValueError(f"node names must be unique: {names}")
        self.nodes = {n.name: n for n in nodes}
        self.head = nodes[0].name
        # Short: Ray's unix sockets live under it (paths must stay < 108 chars).
        self.state = Path(state_dir or tempfile.mkdtemp(prefix="rmn-", dir="/tmp"))
        (self.state / "logs").mkdir(parents=True, exist_ok=True)
        self.start_timeout = start_timeout
        self.token_path = self.state / "token"
        if not self.token_path.exists():
            fd = os.open(self.token_path, os.O_WRONLY | os.O_CREAT, 0o600)
            os.write(fd, secrets.token_hex(32).encode())
            os.close(fd)
        self._used_ports: set[int] = set()
        self.gcs_port = self._port()
        self.dashboard_port = self._port()
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        self.pids: dict[str, int] = {}
        self._procs: dict[str, subprocess.Popen] = {}
        self._worker_ports = 0

    def _port(self) -> int:
        """A free loopback port not yet handed to another listener of this cluster (bind(0) may repeat one)."""
        while True:
            port = free_port()
            if port not in self._used_ports:
                self._used_ports.add(port)
                return port

    # ------------------------------------------------------------------ environment
    @property
    def env(self) -> dict[str, str]:
        """Variables a client process needs to join (the raylets get them too)."""
        return {
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path),
            "PYTHONPATH": os.pathsep.join([str(PACKAGE_ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(
                os.pathsep) if p and p != str(PACKAGE_ROOT)]),
        }

    def _proc_env(self) -> dict[str, str]:
        env = {**os.environ, **self.env}
        env.pop("RAY_AUTH_TOKEN", None)  # the state dir's token file, not a token of another cluster
        env.pop("RAY_ADDRESS", None)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        # A loaded 2-core machine can need more than Ray's 30 s for a raylet's agents to come up.
        env.setdefault("RAY_agent_register_timeout_ms", "180000")
        return env

    # ------------------------------------------------------------------ nodes
    def _args(self, node: Node) -> list[str]:
        # A worker-port range of its own per raylet, between Ray's default range (10002-19999, other Ray instances of
        # the host) and the kernel's ephemeral ports (32768-, where _port() draws from).
        base = 20000 + (os.getpid() % 60) * 200 + (self._worker_ports % 5) * 40
        self._worker_ports += 1
        args = [_ray_bin(), "start", "--block", "--node-ip-address", "127.0.0.1", "--num-cpus", str(node.num_cpus),
                "--num-gpus", "0", "--disable-usage-stats",
                # Ray picks the other ports at random; these default to fixed ones that a 2nd raylet would clash on.
                "--min-worker-port", str(base), "--max-worker-port", str(base + 29),
                "--dashboard-agent-listen-port", str(self._port()),
                "--object-store-memory", str(300 * 1024**2)]
        if node.resources:
            import json

            args += ["--resources", json.dumps(node.resources)]
        if node.name == self.head:
            args += ["--head", "--port", str(self.gcs_port), "--temp-dir", str(self.state / "ray"),
                     "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
                     "--ray-client-server-port", str(self._port())]
        else:
            # A temp dir per raylet, as on separate machines. Without it every raylet of the host shares the head's
            # session dir, so their runtime-env agents unpack a job's working_dir into the same folder and one agent
            # re-creating it pulls the cwd from under a job driver another started there (os.getcwd() fails).
            args += ["--address", self.address, "--temp-dir", str(self._node_temp(node.name))]
        return args

    def _node_temp(self, name: str) -> Path:
        """A worker raylet's temp dir: short (its unix sockets' paths must stay < 108 chars, whatever the state
        dir), linked from ``<state>/nodes/<name>`` so its session logs are found next to the cluster's own."""
        link = self.state / "nodes" / name
        if not link.is_symlink():
            link.parent.mkdir(exist_ok=True)
            link.symlink_to(tempfile.mkdtemp(prefix="rn-", dir="/tmp"))
        return Path(os.readlink(link))

    def connect(self, **kwargs):
        """``ray.init`` of this process as a client of the cluster (token auth; the env vars of :attr:`env` set)."""
        import ray

        os.environ.update(self.env)
        reload_ray_auth()
        return ray.init(address=self.address, **kwargs)

    def running(self, name: str) -> bool:
        return name in self.pids and bool(_session_pids(self.pids[name]))

    def _spawn(self, name: str) -> None:
        if self.running(name):
            raise RuntimeError(f"node {name!r} is already running (session {self.pids[name]})")
        env = self._proc_env()
        args = self._args(self.nodes[name])
        if name != self.head:
            # `ray start --address` refuses to join while RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, and with 1 it rewrites
            # a 127.0.0.1 address to the machine's routable IP, where the head's loopback-only GCS does not listen.
            # So: 1, and the address kept as given (every raylet still binds --node-ip-address 127.0.0.1).
            env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "1"
            args = [sys.executable, "-c", _JOIN_AS_GIVEN] + args[1:]
        with open(self.state / "logs" / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, cwd=str(self.state),
                                    start_new_session=True)
        self.pids[name], self._procs[name] = proc.pid, proc

    def start_node(self, name: str) -> None:
        """Start (or restart, after kill_node) one node and wait until the GCS lists it alive."""
        self._spawn(name)
        self._wait_alive([name])

    def _alive_nodes(self) -> list[dict]:
        """Alive nodes from the GCS, asked in a subprocess (this process may not be connected to Ray)."""
        import json

        code = ("import json, ray; ray.init(address=%r, log_to_driver=False); "
                "print('NODES', json.dumps([{'id': n['NodeID'], 'resources': n['Resources']} "
                "for n in ray.nodes() if n['Alive']]))" % self.address)
        out = subprocess.run([sys.executable, "-c", code], env=self._proc_env(), capture_output=True, text=True,
                             timeout=120)
        for line in out.stdout.splitlines():
            if line.startswith("NODES "):
                return json.loads(line[6:])
        return []

    def _wait_alive(self, names: list[str]) -> None:
        """Until the GCS lists as many alive nodes of each spec (CPUs + resources) as run here."""
        def spec(resources: dict) -> tuple:
            return tuple(sorted((k, float(v)) for k, v in resources.items()
                                if k == "CPU" or k in {r for n in self.nodes.values() for r in n.resources}))

        deadline = time.time() + self.start_timeout
        while True:
            for name in names:
                if self._procs[name].poll() is not None:
                    raise RuntimeError(f"raylet {name!r} exited ({self._procs[name].returncode}); see "
                                       f"{self.state / 'logs' / (name + '.log')}:\n" + self.log_tail(name))
            want: dict[tuple, int] = {}
            for n in self.nodes.values():
                if self.running(n.name):
                    key = spec({"CPU": n.num_cpus, **n.resources})
                    want[key] = want.get(key, 0) + 1
            try:
                alive = [spec(n["resources"]) for n in self._alive_nodes()]
            except subprocess.TimeoutExpired:
                alive = []
            if all(alive.count(key) >= count for key, count in want.items()):
                return
            if time.time() > deadline:
                raise RuntimeError(f"raylets {names} did not join within {self.start_timeout:.0f}s:\n"
                                   + "\n".join(self.log_tail(n) for n in names))
            time.sleep(1)

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = self.state / "logs" / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def kill_node(self, name: str) -> None:
        """SIGKILL a node's whole session at once (a machine that dies, not one that shuts down)."""
        sid = self.pids[name]
        for pid in _session_pids(sid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._reap(name, 30)

    def stop_node(self, name: str, timeout: float = 60) -> None:
        sid = self.pids.get(name)
        if sid is None or not _session_pids(sid):
            return
        try:
            os.kill(sid, signal.SIGTERM)  # `ray start --block` stops its children (raylet, GCS, agents)
        except ProcessLookupError:
            pass
        try:
            self._procs[name].wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        time.sleep(1)
        for pid in _session_pids(sid):  # whatever of that session outlived its leader
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._reap(name, 30)

    def _reap(self, name: str, timeout: float) -> None:
        sid = self.pids[name]
        deadline = time.time() + timeout
        while _session_pids(sid) and time.time() < deadline:
            time.sleep(0.2)
        try:
            self._procs[name].wait(1)
        except subprocess.TimeoutExpired:
            pass

    def start(self, attempts: int = 2) -> "LocalCluster":
        """All nodes up, or none. A raylet gives its agents ~30 s to start (not configurable) and a loaded 2-core
        machine can miss that (measured at load 20+): one more try, on fresh ports."""
        for attempt in range(attempts):
            try:
                self._spawn(self.head)
                self._wait_alive([self.head])
                workers = [n for n in self.nodes if n != self.head]
                for name in workers:  # in parallel: each raylet takes seconds to come up
                    self._spawn(name)
                self._wait_alive(workers)
                return self
            except RuntimeError:
                self.stop()
                if attempt + 1 == attempts:
                    raise
                self.gcs_port, self.dashboard_port = self._port(), self._port()
                self.address = f"127.0.0.1:{self.gcs_port}"
                self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
            except BaseException:
                self.stop()
                raise
        return self

    def stop(self) -> None:
        """Workers first, then the head; only the sessions this object started."""
        for name in [n for n in self.nodes if n != self.head] + [self.head]:
            self.stop_node(name)

    def leftovers(self) -> dict[str, list[int]]:
        return {name: _session_pids(sid) for name, sid in self.pids.items() if _session_pids(sid)}

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
