"""Does reddino get faster with more Ray nodes? Measured on a local multi-node cluster (several raylets, one host).

Two ratios, on ``reddino.cluster_local.LocalCluster`` (a ``data`` head and two ``train`` raylets on 127.0.0.1):

* **train step**: seconds per step of the real ``pretrain`` (tiny test model, DDP over gloo) with 1 Train worker
  at global batch B against 2 workers (one per ``train`` raylet) at B/2 each; the step time is B / the loop's own
  img/s (median of the logged steps after the first ``--warmup``). Goal: t(2) / t(1) <= 0.55.
* **data pipeline**: img/s of the real training dataset (``build_train_dataset``: read → repartition → Augment with
  multi-crop + masks), its augmentation tasks pinned to the ``data`` node, with 1 against 2 map tasks (1 CPU
  each); the second of two passes is timed. Goal: img/s(2) / img/s(1) >= 1.8.

On this 2-core machine both goals are out of reach by construction (2 workers, their data tasks and Ray's own
processes share 2 cores); the script prints the core count next to each ratio so that is visible. On a real
cluster the same script measures the same two things across machines.

    python benchmarks/scaling.py                  # 40 steps per side, 192 synthetic 56 px patches
    python benchmarks/scaling.py --quick          # smoke test (8 steps, 1 pass of 48 images)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import env_setup, flush_exit, header, log, median, ratio_line  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "tests" / "tiny.yaml")


def _overrides(data: Path, tmp: Path, steps: int, workers: int, global_batch: int) -> list[str]:
    return [
        f"data.paths=[{data}]", "data.resize=56", "crops.global_crops_size=56", "crops.local_crops_size=28",
        "crops.local_crops_number=2", "model.img_size=56", "model.head_prototypes=1024", "data.map_batch_size=16",
        "train.epochs=1", f"train.iters_per_epoch={steps}", f"train.batch_size_per_worker={global_batch // workers}",
        f"train.num_workers={workers}", "train.torch_threads=1", f"train.checkpoint_every={steps}",
        "train.log_every=1", "train.monitor_every=0", f"train.storage_path={tmp / 'runs'}",
        f"mlflow.tracking_uri=sqlite:///{tmp / 'mlflow.db'}", "data.map_resources={data: 0.01}",
        "train.worker_resources={train: 1}",
    ]


def train_step_time(data: Path, tmp: Path, steps: int, workers: int, global_batch: int, warmup: int) -> float:
    from mlflow.tracking import MlflowClient

    from reddino.config import load_config
    from reddino.train import pretrain

    cfg = load_config(TINY, _overrides(data, tmp, steps, workers, global_batch))
    result = pretrain(cfg, run_name=f"scaling-{workers}w-{time.strftime('%H%M%S')}")
    history = MlflowClient(cfg.mlflow.tracking_uri).get_metric_history(result.mlflow_run_id, "images_per_s")
    ips = [m.value for m in sorted(history, key=lambda m: m.step) if m.step > warmup]
    t = global_batch / median(ips)
    log(f"train: {workers} worker(s) x {global_batch // workers} = {global_batch} per step: median "
        f"{median(ips):.1f} img/s over {len(ips)} steps = {t:.3f} s/step")
    return t


def data_rate(data: Path, map_tasks: int, passes: int) -> float:
    from reddino.config import load_config
    from reddino.train.data import build_train_dataset

    cfg = load_config(TINY, _overrides(data, Path(tempfile.gettempdir()), 1, 1, 16)
                      + [f"data.map_concurrency={map_tasks}", "data.cpus_per_map_task=1"])
    ds = build_train_dataset(cfg, patch_size=8, run_state_name=None)
    rate = float("nan")
    for p in range(passes):
        t0, n = time.perf_counter(), 0
        for batch in ds.iter_batches(batch_size=16, batch_format="numpy"):
            n += len(batch["key"])
        rate = n / (time.perf_counter() - t0)
        log(f"data: {map_tasks} map task(s), pass {p + 1}: {n} images, {rate:.1f} img/s")
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=8, help="steps not counted (worker start-up, first pass plan)")
    ap.add_argument("--global-batch", type=int, default=16)
    ap.add_argument("--images", type=int, default=192, help="synthetic patches per source (2 sources)")
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.warmup, args.images, args.passes = 8, 2, 24, 1
    env_setup()
    header("scaling (local multi-node cluster)")

    import ray

    from reddino.cluster_local import LocalCluster, Node
    from reddino.data import generate_synthetic

    tmp = Path(tempfile.mkdtemp(prefix="reddino-scaling-"))
    data = tmp / "data"
    generate_synthetic(data, n_per_class=1, sources=2, unit="patch", seed=0, n_patches=args.images, patch_size=64)
    nodes = [Node("head", 3, {"data": 2}), Node("train1", 2, {"train": 1}), Node("train2", 2, {"train": 1})]
    cluster = LocalCluster(nodes, state_dir=tmp / "cluster").start()
    try:
        cluster.connect(log_to_driver=False)
        log(f"cluster up: {cluster.address} ({', '.join(n.name for n in nodes)})")
        t1 = train_step_time(data, tmp, args.steps, 1, args.global_batch, args.warmup)
        t2 = train_step_time(data, tmp, args.steps, 2, args.global_batch, args.warmup)
        d1 = data_rate(data, 1, args.passes)
        d2 = data_rate(data, 2, args.passes)
    finally:
        ray.shutdown()
        cluster.stop()
    cores = os.cpu_count() or 0
    bound = f"{cores} cores shared by every raylet" if cores < 8 else ""
    print(f"train step: 1 worker {t1:.3f} s, 2 workers {t2:.3f} s; data: 1 task {d1:.1f} img/s, 2 tasks "
          f"{d2:.1f} img/s", flush=True)
    ratio_line("data_2_over_1", d2 / d1, ">= 1.8", d2 / d1 >= 1.8, bound)
    ratio_line("step_2_over_1", t2 / t1, "<= 0.55", t2 / t1 <= 0.55, bound)
    flush_exit(0)


if __name__ == "__main__":
    main()
