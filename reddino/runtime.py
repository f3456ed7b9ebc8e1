"""Embedded local mode: a loopback-only Ray session and a sqlite MLflow store under one folder."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path



def loopback_env() -> None:
    """Keep every listener of a *local* Ray on 127.0.0.1 (Ray binds the routable IP unless this is
    set before it starts). Only for Ray sessions we start ourselves, never for a cluster we join."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def small_machine_env(num_cpus: int | None) -> None:
    """Ray Data's Parquet reader starts 32 footer-reader actors (a Python process each) per read; a local Ray
    on a few cores spends tens of seconds starting them for a handful of shards. Local Ray sessions get one per
    two CPUs (at most 4); a cluster keeps Ray's default. Set before Ray starts: its workers inherit it."""
    cores = os.cpu_count() or 1
    cpus = min(num_cpus or cores, cores)  # logical Ray CPUs beyond the cores start no faster
    os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", str(max(1, min(4, cpus // 2))))


def verbose() -> bool:
    """REDDINO_VERBOSE=1: Ray's own INFO output (Train reports, Ray Data plans and progress bars) on the console."""
    return os.environ.get("REDDINO_VERBOSE", "") not in ("", "0")


def quiet_ray_logs() -> None:
    """Ray Data's per-pass INFO lines ("Starting execution", "Execution plan") go to its log file, not the
    console, in every Ray process started after this (set before ray.init). REDDINO_VERBOSE=1 keeps them."""
    if not verbose():
        config = Path(__file__).parent / "configs" / "ray_data_logging.yaml"
        os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", str(config))
        # Ray's own deprecation notices (inside its Data actors) are for Ray's developers, not for our users.
        os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
        # MLflow sets its own logger level when it is imported ("Creating initial MLflow database tables...").
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")


def quiet_data_progress() -> None:
    """Ray Data's progress bars off in this process (the command prints its own progress; in a log file every
    redraw would become a new line). REDDINO_VERBOSE=1 brings them back."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_operator_progress_bars = False
    if not verbose():
        ctx.enable_progress_bars = False


def default_tracking_uri(home: Path | None = None) -> str:
    """`MLFLOW_TRACKING_URI` if set, else a sqlite file in the reddino home folder."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    from reddino import paths

    db = Path(home) / "mlflow.db" if home else paths.mlflow_db()
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db.resolve()}"


@contextlib.contextmanager
def mlflow_at(uri: str):
    """MLflow's process-wide tracking and registry URIs pointed at ``uri`` for the block, then put back.

    For the MLflow calls that read only the globals (``models:/`` resolution inside ``download_artifacts``,
    ``mlflow.start_run``); everything else takes the URI explicitly."""
    import mlflow  # noqa: PLC0415
    from mlflow.tracking._model_registry import utils as reg  # noqa: PLC0415
    from mlflow.tracking._tracking_service import utils as trk  # noqa: PLC0415

    before = (trk._tracking_uri, reg._registry_uri)
    # set_tracking_uri also exports MLFLOW_TRACKING_URI (for subprocesses): put the variables back too.
    env_before = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield uri
    finally:
        trk._tracking_uri, reg._registry_uri = before
        for key, value in env_before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


PROBE_TIMEOUT_S = 5.0  # an http(s) MLflow server must answer within this


def check_tracking(uri: str | None) -> None:
    """An http(s) MLflow tracking server answers within a few seconds, else one error naming it and the cause
    (MLflow's own client would retry for minutes first). Other stores (sqlite, files) are not probed."""
    if not uri or not uri.startswith(("http://", "https://")):
        return
    import requests

    from reddino.errors import ServiceUnreachable

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=PROBE_TIMEOUT_S)
    except requests.RequestException as exc:
        raise ServiceUnreachable(f"MLflow tracking server {uri} is unreachable: {_reason(exc)}") from None


def _reason(exc: BaseException) -> str:
    """The innermost cause of a requests/urllib3 error, e.g. '[Errno 111] Connection refused'."""
    seen = exc
    while True:
        nxt = getattr(seen, "reason", None) or seen.__cause__ or seen.__context__
        if nxt is None or nxt is seen or not isinstance(nxt, BaseException):
            break
        seen = nxt
    text = str(seen)
    if ": " in text and text.startswith("<"):  # urllib3's "<HTTPConnection object at 0x..>: Failed to ..."
        text = text.split(": ", 1)[1]
    return f"{type(seen).__name__}: {text}" if text else type(seen).__name__


def bound_mlflow_retries() -> None:
    """MLflow's HTTP client retries an unreachable server for minutes by default; a command gives up after a
    few seconds (``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` / ``MLFLOW_HTTP_REQUEST_TIMEOUT`` set by the user win)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for a loopback listener: dashboard, MLflow server)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpus_with_driver_headroom() -> int:
    """Logical CPUs for a local Ray that runs Train/Tune drivers beside their workers: the cores + 1.

    A trial's (or the demo's) driver holds a sliver of a CPU; with exactly the core count, the Train
    worker + the Ray Data read/augment tasks end up one CPU short and the data stream waits forever
    (measured on 2 cores). The extra logical CPU is headroom for those drivers, not more compute."""
    return (os.cpu_count() or 1) + 1


def init_ray(num_cpus: int | None = None, address: str | None = None, announce: bool = True, **kwargs):
    """Connect to `address` (or RAY_ADDRESS) if given, else start a loopback-only local Ray; `announce` prints
    its dashboard address once (Ray's own INFO line for it stays off the console)."""
    import ray

    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS")
    quiet_ray_logs()
    if address:
        ray.init(address=address, **kwargs)
    else:
        loopback_env()
        small_machine_env(num_cpus)
        if not verbose():
            # "Token authentication is enabled for this Ray cluster": the default, and loopback-only here.
            import logging

            logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        # Ray read that variable when it was imported (maybe before this call): set its constant too.
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
        # The dashboard serves Ray's State API, which Train's placement-group cleaner polls: without it the
        # cleaner logs a warning every second and cannot free the resources of a killed run (an ASHA-stopped
        # trial). Loopback only; REDDINO_RAY_DASHBOARD=0 turns it off.
        dashboard = os.environ.get("REDDINO_RAY_DASHBOARD", "1") != "0"
        kwargs.setdefault("include_dashboard", dashboard)
        if kwargs["include_dashboard"]:
            # Its own free port: a second local Ray must never answer the first one's State API queries
            # (its placement-group cleaner would then see the controller as gone and kill the run).
            kwargs.setdefault("dashboard_host", "127.0.0.1")
            kwargs.setdefault("dashboard_port", free_port())
        if not verbose():
            import logging

            # "Started a local Ray instance": the callers print the dashboard address themselves.
            kwargs.setdefault("logging_level", logging.WARNING)
        ray.init(num_cpus=num_cpus, _node_ip_address="127.0.0.1", **kwargs)
    if not verbose():
        import logging

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # "Creating initial MLflow database tables..."
        _filter_worker_output()
        url = dashboard_url() if announce else None
        if url:
            print(f"[reddino] Ray dashboard (Train, Data, Tune and Jobs views): {url}", flush=True)
    return ray


# Lines Ray forwards from its own processes that need no action from a user (they stay in Ray's log files under
# the session dir, /tmp/ray/session_latest/logs).
_RAY_NOTICES = (
    "has constructor arguments in the object store and max_restarts > 0",  # Train's actors, ray issue 53727
    "PYTHON worker processes have been started on node",  # start-up concurrency notice on small machines
    "Detected that the Ray Train controller actor",  # Train's placement-group cleaner after a stopped trial
    "KillActor RPC failed",  # the GCS killing an actor whose process had already exited (a finished data pass)
)


# Ray Data's own tasks (file listing, reads): at the end of an execution their pool threads can print a traceback of
# an interrupted queue (ray/data/_internal/dynamic_work_queue.py) although the data pass completed.
_RAY_DATA_INTERNAL_TASKS = ("ListFiles", "ReadFiles")


# reddino's own worker lines kept off the console by the command that runs them (a sweep: its trials' step lines).
_HIDDEN_WORKER_LINES: set[str] = set()


def hide_worker_lines(*prefixes: str) -> None:
    """Worker lines starting with one of `prefixes` stay in the workers' log files, off this driver's console."""
    _HIDDEN_WORKER_LINES.update(prefixes)


def _filter_worker_output() -> None:
    """Worker output on the driver's console: reddino's own lines as printed (no `(RayTrainWorker pid=...)`
    prefix), Ray's notices above dropped, everything else (errors, tracebacks, user prints) as Ray prints it."""
    import sys

    try:
        from ray._private import worker as ray_worker
    except ImportError:  # another Ray layout: leave Ray's printing alone
        return
    dispatcher = getattr(ray_worker, "global_worker_stdstream_dispatcher", None)
    found = [h for name, h in getattr(dispatcher, "handlers", []) if name == "ray_print_logs"]
    if not found or getattr(found[0], "_reddino", False):  # log_to_driver off, or already filtered
        return
    original = found[0]

    def handler(data):
        lines = data.get("lines", [])
        if str(data.get("task_name") or "").startswith(_RAY_DATA_INTERNAL_TASKS):
            return  # their errors reach the training loop as exceptions; their threads' shutdown races are noise
        rest = []
        for line in lines:
            if "[reddino]" in line:
                own = line[line.index("[reddino]"):]
                if not own.startswith(tuple(_HIDDEN_WORKER_LINES)):
                    (sys.stderr if data.get("is_err") else sys.stdout).write(own + "\n")
            elif line.strip() and not any(n in line for n in _RAY_NOTICES):  # a blank line gets no prefix line
                rest.append(line)
        if rest:
            original({**data, "lines": rest})
        sys.stdout.flush()

    handler._reddino = True
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", handler)

    # Raylet warnings pushed to the driver as errors (the start-up concurrency notice) bypass the dispatcher:
    # the error listener calls the module's print_to_stdstream, looked up at call time.
    printer = getattr(ray_worker, "print_to_stdstream", None)
    if printer is not None and not getattr(printer, "_reddino", False):
        def print_filtered(data, *args, **kwargs):
            lines = [ln for ln in data.get("lines", []) if not any(n in ln for n in _RAY_NOTICES)]
            if lines:
                printer({**data, "lines": lines}, *args, **kwargs)

        print_filtered._reddino = True
        ray_worker.print_to_stdstream = print_filtered


def dashboard_url() -> str | None:
    """The connected Ray cluster's dashboard address (Train / Data / Jobs views), or None without one."""
    import ray

    try:
        url = ray._private.worker.get_dashboard_url()
    except Exception:  # noqa: BLE001 - no dashboard (include_dashboard=False) or not connected
        return None
    if not url:
        return None
    return url if url.startswith("http") else f"http://{url}"
