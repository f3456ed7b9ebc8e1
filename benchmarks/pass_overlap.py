"""Does starting each data pass early (``data.overlap_passes``) speed up a whole pretraining run? Goal: ratio >= 1.1.

The real ``reddino pretrain`` (Ray Train, 1 worker, Ray Data augmentation) of the ``tiny_cpu`` recipe runs over
several passes of a small dataset twice: with ``data.overlap_passes=false`` (each pass's Ray Data execution starts
when the previous one has ended: shard reads, the first augmentation batch and the local shuffle buffer's fill
are waited for at every pass boundary) and with ``true`` (two datasets take turns; the next pass starts while the
current one's last rows, already in the shuffle buffer, are trained on). A step hook stamps the wall time of every step; whole-run img/s counts every step after the
first ``--warmup`` (worker start-up). The RATIO is img/s(overlap) / img/s(no overlap).

    python benchmarks/pass_overlap.py --data data/chula-patches --unit patch   # 3 passes of 2,864 patches
    python benchmarks/pass_overlap.py --quick                                  # smoke test (synthetic)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import env_setup, flush_exit, header, log, ratio_line  # noqa: E402


def run_side(data: Path, unit: str, tmp: Path, overlap: bool, steps: int, batch: int, warmup: int,
             extra: list[str]) -> tuple[float, int]:
    """Whole-run img/s after ``warmup`` steps and the number of data passes the run went through."""
    from reddino.config import load_config
    from reddino.train import pretrain

    stamps = tmp / f"stamps-{int(overlap)}.txt"
    stamps.unlink(missing_ok=True)

    def stamp(step, path=str(stamps)):  # cloudpickled to the worker by value
        import time as _t

        with open(path, "a") as f:
            f.write(f"{step} {_t.perf_counter()}\n")

    cfg = load_config("tiny_cpu", [
        f"data.paths=[{data}]", f"data.unit={unit}", f"data.overlap_passes={str(overlap).lower()}",
        "train.epochs=1", f"train.iters_per_epoch={steps}", f"train.batch_size_per_worker={batch}",
        f"train.checkpoint_every={steps}", "eval.every=0", f"train.storage_path={tmp / 'runs'}",
        f"mlflow.tracking_uri=sqlite:///{tmp / 'mlflow.db'}", *extra,
    ])
    result = pretrain(cfg, run_name=f"overlap-{int(overlap)}-{time.strftime('%H%M%S')}", step_hooks=[stamp])
    t = {int(s): float(v) for s, v in (line.split() for line in stamps.read_text().splitlines())}
    last = max(t)
    ips = (last - warmup) * batch / (t[last] - t[warmup])
    passes = int(result.metrics.get("data_pass", -1)) + 1
    log(f"overlap_passes={overlap}: {ips:.1f} img/s over steps {warmup}..{last} ({passes} data passes)")
    return ips, passes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", help="reddino dataset dir (default: synthetic patches)")
    ap.add_argument("--unit", default="patch")
    ap.add_argument("--passes", type=float, default=3.0, help="data passes per side")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="smoke test: 48 synthetic patches, ~2 passes")
    ap.add_argument("overrides", nargs="*", help="key=value run-config overrides (both sides)")
    args = ap.parse_args()
    env_setup()
    header("pass_overlap")
    import ray

    from reddino.data import generate_synthetic, load_table

    tmp = Path(tempfile.mkdtemp(prefix="reddino-overlap-"))
    extra = list(args.overrides)
    if args.quick or not args.data:
        data = tmp / "data"
        generate_synthetic(data, n_per_class=1, sources=2, unit="patch", seed=0, n_patches=24 if args.quick else 400,
                           patch_size=64)
        args.unit = "patch"
        if args.quick:
            args.batch, args.warmup, args.passes = 8, 1, 2.0
            extra += ["model.head_prototypes=64", "crops.local_crops_number=1", "data.shuffle_buffer=16"]
    else:
        data = Path(args.data)
    rows = load_table(data, units=[args.unit], columns=["sha256"]).num_rows
    steps = max(args.warmup + 2, int(args.passes * rows // args.batch))
    log(f"{rows} {args.unit} rows, batch {args.batch}: {steps} steps per side (~{args.passes:g} passes)")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        off, _ = run_side(data, args.unit, tmp, False, steps, args.batch, args.warmup, extra)
        on, passes = run_side(data, args.unit, tmp, True, steps, args.batch, args.warmup, extra)
    finally:
        ray.shutdown()
    print(f"whole-run img/s: overlap off {off:.1f}, on {on:.1f} ({passes} passes)", flush=True)
    ratio_line("overlap_over_sequential_passes", on / off, ">= 1.1", on / off >= 1.1)
    flush_exit(0)


if __name__ == "__main__":
    main()
