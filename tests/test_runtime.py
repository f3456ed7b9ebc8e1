"""The embedded local Ray: loopback only, its own dashboard (State API), even when ray was imported first."""

import json
import os
import subprocess
import sys

PROBE = r"""
import json, ray, psutil                     # ray imported before reddino, as user code often does
from reddino.runtime import init_ray
init_ray(num_cpus=1, log_to_driver=False)
from ray.util.state import list_actors

@ray.remote(num_cpus=0)
class Marker:
    def ping(self):
        return 1

marker = Marker.options(name="reddino-probe-marker").remote()
ray.get(marker.ping.remote())
# A Parquet read on the local Ray: Ray Data's footer readers are actors (a process each), few on a small machine.
import tempfile, pyarrow as pa, pyarrow.parquet as pq
shards = tempfile.mkdtemp()
pq.write_table(pa.table({"x": [1, 2, 3]}), shards + "/a.parquet")
assert len(ray.data.read_parquet(shards).take_all()) == 3
info = ray._private.worker.global_worker.node.address_info
procs = [psutil.Process()] + psutil.Process().children(recursive=True)
pids = {p.pid for p in procs}
listen = [f"{c.laddr.ip}:{c.laddr.port}" for c in psutil.net_connections(kind="inet")
          if c.status == psutil.CONN_LISTEN and c.pid in pids]
print("RESULT", json.dumps({"gcs": info["gcs_address"], "webui": info["webui_url"], "listen": listen,
                            "actors": [a.name for a in list_actors(address=info["gcs_address"])],
                            "footer_readers": sum(a.class_name == "FooterReader"
                                                  for a in list_actors(address=info["gcs_address"], limit=1000))}))
ray.shutdown()
"""


def _is_loopback(ip: str) -> bool:
    return ip.startswith("127.") or ip in ("::1", "::ffff:127.0.0.1")


def test_local_ray_is_loopback_only_with_its_own_state_api():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
    assert line, out.stdout[-2000:] + out.stderr[-4000:]
    res = json.loads(line[len("RESULT "):])
    assert res["gcs"].startswith("127.0.0.1:")
    assert res["webui"].startswith("127.0.0.1:")
    assert res["listen"], "no listening sockets found"
    exposed = [a for a in res["listen"] if not _is_loopback(a.rsplit(":", 1)[0])]
    assert not exposed, f"listeners outside loopback: {exposed}"
    # The State API answered with this session's actors (it raises without this session's own dashboard).
    assert "reddino-probe-marker" in res["actors"]
    # Ray's default is 32 footer-reader processes per read: tens of seconds of start-up on 2 cores, per dataset.
    assert res["footer_readers"] == 1, res["footer_readers"]


NOTICE_PROBE = r"""
import ray
from reddino.runtime import init_ray
init_ray(num_cpus=1)
w = ray._private.worker
notice = "WARNING: 8 PYTHON worker processes have been started on node: abc with address: 127.0.0.1"
# what the driver's error listener does with a raylet warning
w.print_to_stdstream({"lines": [notice], "pid": "raylet", "is_err": False}, ignore_prefix=False)
w.print_to_stdstream({"lines": ["a line the user needs"], "pid": "raylet", "is_err": False}, ignore_prefix=False)
ray.shutdown()
"""


def test_raylet_notices_that_need_no_action_stay_off_the_console():
    env = {k: v for k, v in os.environ.items() if k != "REDDINO_VERBOSE"}
    out = subprocess.run([sys.executable, "-c", NOTICE_PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "a line the user needs" in out.stdout + out.stderr
    assert "PYTHON worker processes have been started" not in out.stdout + out.stderr


WORKER_PROBE = r"""
import time, ray
from reddino.runtime import hide_worker_lines, init_ray
init_ray(num_cpus=1)
hide_worker_lines("[reddino] step ")  # what a sweep does with its trials' step lines

@ray.remote(num_cpus=0)
def work():
    for line in ("[reddino] step 2/6 loss 6.1", "[reddino] WARNING collapse: kept", "", "a user print"):
        print(line, flush=True)

ray.get(work.remote())
time.sleep(3)  # the log monitor forwards worker output about once a second
ray.shutdown()
"""


def test_worker_lines_on_the_console_are_reddinos_own_minus_hidden_ones_and_ray_start_is_one_line():
    env = {k: v for k, v in os.environ.items() if k != "REDDINO_VERBOSE"}
    out = subprocess.run([sys.executable, "-c", WORKER_PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout + out.stderr
    assert "[reddino] WARNING collapse: kept" in out.stdout and "a user print" in text
    assert "[reddino] step 2/6" not in text
    assert text.count("(work pid=") == 1, text  # the user's print; the blank line printed nothing
    assert "Started a local Ray instance" not in text and text.count("[reddino] Ray dashboard") == 1, text
