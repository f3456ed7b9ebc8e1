"""benchmarks/gpu_session.py --dry-run: the GPU session's every phase (MFU eager + compiled, the device-augmentation
stream feeding the step, a short pretraining with export and learning curve, reddino embed) on the CPU at toy
sizes, so the script that gets the few GPU minutes cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_session_dry_run_writes_every_result(tmp_path):
    env = dict(os.environ)
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0", TQDM_DISABLE="1",
               REDDINO_HOME=str(tmp_path / "home"), PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    env.pop("RAY_ADDRESS", None)
    out = tmp_path / "session"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_session.py"), str(out), "--dry-run"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["dry_run"] and s["versions"]["torch"]
    for key in ("eager", "compiled"):
        assert s["mfu"][key]["img_s"] > 0 and s["mfu"][key]["gflop_per_image"] > 0
    assert s["mfu"]["compiled"]["compile"] is True
    f = s["feed"]
    assert f["steps"] >= 3 and f["fed_img_s"] > 0 and 0 < f["worker_cpu_ms_per_image"] < 50
    assert 0 < f["worker_cpu_ms_per_image_tiff_zstd"] < 50
    p = s["pretrain"]
    assert p["steps"] == 3 and Path(p["backbone"]).is_file() and Path(p["learning_curve"]).is_file()
    assert s["embed"]["rows"] > 0 and s["embed"]["img_s"] > 0
    table = (out / "summary.md").read_text()
    assert "torch.compile" in table and "not run" not in table
