"""Smoke test: every benchmark script runs in --quick mode, exits 0 and prints its RATIO line.

The two Ray scripts run one after the other (each starts its own local Ray); the two Ray-free scripts run
beside them. The full benchmark runs are not part of the test suite (see benchmarks/README.md).
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
pytestmark = pytest.mark.slow  # each script's --quick run: minutes in all

SCRIPTS = ["data_pipeline.py", "train_overhead.py", "gpu_efficiency.py", "vs_lightly_train.py", "embed_speed.py",
           "recipe_probe.py", "pass_overlap.py", "augment_cost.py", "distill_cost.py"]


def _run(script: str) -> tuple[str, int, str]:
    env = dict(os.environ)
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0", TQDM_DISABLE="1",
               PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(BENCH / script), "--quick"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=800)
    return script, proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def quick_runs() -> dict[str, tuple[int, str]]:
    def chain(scripts: list[str]) -> list[tuple[str, int, str]]:
        return [_run(s) for s in scripts]

    with ThreadPoolExecutor(2) as pool:
        with_ray = pool.submit(chain, ["data_pipeline.py", "train_overhead.py", "pass_overlap.py"])
        without_ray = pool.submit(chain, ["gpu_efficiency.py", "vs_lightly_train.py", "embed_speed.py",
                                              "recipe_probe.py", "augment_cost.py", "distill_cost.py"])
        results = with_ray.result() + without_ray.result()
    return {name: (rc, out) for name, rc, out in results}


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_quick(quick_runs, script):
    rc, out = quick_runs[script]
    assert rc == 0, f"{script} --quick exited {rc}:\n{out[-4000:]}"
    ratio = [line for line in out.splitlines() if line.startswith("RATIO ")]
    assert ratio, f"{script} --quick printed no RATIO line:\n{out[-4000:]}"
    if ": n/a)" not in ratio[0]:  # a goal that applies here: a measured ratio, not a placeholder or NaN
        value = float(ratio[0].split("=")[1].split()[0])
        assert value > 0, ratio[0]


# What each script claims beyond its ratio, checked in its own output (a broken comparison fails here, not only a
# crash): the two sides of a comparison ran the same thing, and the measured numbers are plausible.
CLAIMS = {
    "data_pipeline.py": ["same augmentation on both sides (row", "): yes"],
    "distill_cost.py": ["MFLOPs/image", "FLOPs x0.43"],
    "embed_speed.py": ["embeddings equal the loop's: True"],
    "gpu_efficiency.py": ["model FLOPs per image (forward+backward, teacher+student)"],
    "recipe_probe.py": ["step 0 kNN-20", "RankMe"],
    "pass_overlap.py": ["overlap_passes=False:", "overlap_passes=True:", "whole-run img/s"],
    "augment_cost.py": ["official DINOv2", "reddino dinov2", "rbc (albument.)", "official/reddino rbc", "on_device worker",
                        "TOTAL"],
}


@pytest.mark.parametrize("script", sorted(CLAIMS))
def test_benchmark_output_says_what_it_compared(quick_runs, script):
    rc, out = quick_runs[script]
    for claim in CLAIMS[script]:
        assert claim in out, f"{script} --quick: {claim!r} missing:\n{out[-3000:]}"


def test_train_overhead_quick_times_the_same_step_on_both_sides(quick_runs):
    """The Ray side runs the same TrainStep on the same batches: within a few x of the bare loop even on a busy
    2-core box (a different step or a pipeline inside the timed region would show as a large factor)."""
    rc, out = quick_runs["train_overhead.py"]
    ratio = float(next(l for l in out.splitlines() if l.startswith("RATIO ")).split("=")[1].split()[0])
    assert 0.2 < ratio < 5.0, out[-3000:]


def test_vs_lightly_train_quick_never_installs(quick_runs):
    rc, out = quick_runs["vs_lightly_train.py"]
    assert "PEER SKIPPED" in out and "installing lightly-train" not in out
