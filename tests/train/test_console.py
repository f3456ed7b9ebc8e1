"""What a user sees: `reddino pretrain` in a log file (stdout not a terminal) is short and says each thing once."""

import os
import subprocess
import sys
from pathlib import Path

from reddino.data import generate_synthetic

ROOT = Path(__file__).parents[2]


def test_pretrain_console_has_no_ray_chatter_and_no_repeats(tmp_path):
    generate_synthetic(tmp_path / "data", n_per_class=2, sources=2, unit="patch", seed=0, n_patches=24)
    cmd = [str(Path(sys.executable).parent / "reddino"), "pretrain", "--config", str(ROOT / "tests" / "tiny.yaml"),
           "--data", str(tmp_path / "data"), "--run-name", "console",
           "data.resize=56", "crops.global_crops_size=56", "crops.local_crops_size=28", "model.img_size=56",
           "model.head_prototypes=64", "model.head_hidden_dim=32", "model.head_bottleneck_dim=16",
           "train.epochs=1", "train.iters_per_epoch=6", "train.batch_size_per_worker=8", "train.log_every=2",
           "train.checkpoint_every=6", f"train.storage_path={tmp_path / 'runs'}",
           f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    env = {k: v for k, v in os.environ.items() if k not in ("REDDINO_VERBOSE", "RAY_DATA_LOGGING_CONFIG")}
    env.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "TrainingReport(" not in out and "Reporting training result" not in out
    assert "Execution plan" not in out and "Starting execution of Dataset" not in out
    steps = [line for line in out.splitlines() if "[reddino] step " in line]
    assert len(steps) == 3 and len(set(steps)) == 3, steps  # steps 2, 4, 6, each once
    assert len(out.splitlines()) < 60, out
