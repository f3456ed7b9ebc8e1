"""Seconds per DINOv2 step inside a Ray ``TorchTrainer`` (1 worker) against a bare PyTorch loop. Goal: ratio <= 1.05.

Both loops run the same code (:class:`Stepper`): the same model (``DINOv2SSL.from_config`` of the
preset), optimizer (AdamW over ``param_groups``), schedules, the same pre-made batches (seeded random crops +
iBOT masks, made inside the loop, so no data pipeline is measured), the same ``torch.set_num_threads``, and
the training loop's own step, ``reddino.train.step.TrainStep`` (lr/wd per group, forward, backward, grad clip, AdamW, teacher EMA,
``float(loss)``). The Ray side also calls ``ray.train.report`` every ``--report-every`` steps inside the timed
region, as the real loop does. Warm-up steps and start-up (Ray, worker, model build) are excluded.

Both sides are built and warmed up, then take turns in blocks of ``--block-steps`` steps (bare here, then the
Ray worker, which waits on a file handshake while the other side runs), so both see the same machine load; the
ratio is the median Ray step over the median bare step.

    python benchmarks/train_overhead.py                  # tiny_cpu model, batch 32, 20 steps per side
    python benchmarks/train_overhead.py --quick          # smoke test
    python benchmarks/train_overhead.py --preset reddino_vits14 --batch-size 8 --steps 5
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import WORK_DIR, env_setup, flush_exit, header, log, median, ratio_line  # noqa: E402

GOAL = 1.05


def make_batches(cfg, batch_size: int, patch_size: int, n: int = 4, seed: int = 0):
    """``n`` deterministic batches shaped like the Ray Data output (normalised crops + bool iBOT masks)."""
    import numpy as np
    import torch

    from reddino.data.augment import sample_masks

    c = cfg.crops
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    side = c.global_crops_size // patch_size
    out = []
    for _ in range(n):
        b = {"global_crops": torch.randn(batch_size, c.global_crops_number, 3, c.global_crops_size,
                                         c.global_crops_size, generator=g)}
        if c.local_crops_number:
            b["local_crops"] = torch.randn(batch_size, c.local_crops_number, 3, c.local_crops_size,
                                           c.local_crops_size, generator=g)
        b["masks"] = torch.from_numpy(np.stack([sample_masks(rng, c.global_crops_number, (side, side), cfg.mask)
                                                for _ in range(batch_size)]))
        out.append(b)
    return out


class Stepper:
    """Model + optimizer + schedules + pre-made batches; :meth:`run` times training steps (the loop's TrainStep)."""

    def __init__(self, cfg_dict: dict, batch_size: int, threads: int, in_ray: bool = False) -> None:
        import torch

        from reddino.config import RunConfig
        from reddino.model import DINOv2SSL
        from reddino.train.schedules import build_schedules
        from reddino.train.step import TrainStep

        torch.set_num_threads(threads)
        torch.manual_seed(0)
        self.cfg = cfg = RunConfig.model_validate(cfg_dict)
        self.model = DINOv2SSL.from_config(cfg.model, cfg.loss)
        self.optimizer = torch.optim.AdamW(self.model.param_groups(cfg.optim), lr=0.0, betas=tuple(cfg.optim.betas))
        self.sched = build_schedules(cfg, batch_size)
        self.batches = make_batches(cfg, batch_size, self.model.patch_size)
        self.train_step = TrainStep(self.model, self.optimizer, self.sched, cfg)  # the loop's own step
        self.model.train()
        self.step = 0
        self.report = None
        if in_ray:
            import ray.train

            self.report = ray.train.report

    def run(self, n: int, report_every: int = 0) -> list[float]:
        times: list[float] = []
        for _ in range(n):
            step = self.step
            b = self.batches[step % len(self.batches)]
            t0 = time.perf_counter()
            res = self.train_step(step, lambda: b)
            self.step += 1
            if self.report is not None and report_every and self.step % report_every == 0:
                self.report({"step": self.step, "loss": res.loss})
            times.append(time.perf_counter() - t0)
        return times


def run_steps(cfg_dict: dict, batch_size: int, warmup: int, steps: int, threads: int) -> list[float]:
    """Build, run ``warmup`` untimed steps, return the times of ``steps`` more (bare PyTorch, this process)."""
    s = Stepper(cfg_dict, batch_size, threads)
    s.run(warmup)
    return s.run(steps)


def _wait_for(path: Path, alive=lambda: True, timeout: float = 1800.0) -> None:
    t0 = time.perf_counter()
    while not path.exists():
        if not alive():
            raise RuntimeError(f"gave up waiting for {path}: the other side stopped")
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError(f"waited {timeout:.0f} s for {path}")
        time.sleep(0.01)


def _ray_loop(config: dict) -> None:
    """Ray Train worker: warm up, then run one block of steps each time the driver says go (file handshake)."""
    import torch

    sync = Path(config["sync"])
    s = Stepper(config["cfg"], config["batch_size"], config["threads"], in_ray=True)
    s.run(config["warmup"], config["report_every"])
    (sync / "ready").write_text(str(torch.get_num_threads()))
    for blk in range(config["blocks"]):
        _wait_for(sync / f"go_{blk}")
        times = s.run(config["block_steps"], config["report_every"])
        (sync / f"done_{blk}.tmp").write_text(json.dumps(times))
        (sync / f"done_{blk}.tmp").replace(sync / f"done_{blk}.json")


def run_interleaved(cfg_dict: dict, args) -> dict[str, list[float]]:
    """Bare loop here and the Ray TorchTrainer worker take turns, block by block, so both see the same load."""
    import shutil
    import threading

    from ray.train import RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    sync = WORK_DIR / f"train_overhead_{os.getpid()}"
    shutil.rmtree(sync, ignore_errors=True)
    sync.mkdir(parents=True)
    blocks = max(1, -(-args.steps // args.block_steps))
    trainer = TorchTrainer(
        _ray_loop,
        train_loop_config={"sync": str(sync), "cfg": cfg_dict, "batch_size": args.batch_size, "warmup": args.warmup,
                           "blocks": blocks, "block_steps": args.block_steps, "threads": args.threads,
                           "report_every": args.report_every},
        scaling_config=ScalingConfig(num_workers=1, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=RayRunConfig(name=f"train-overhead-{int(time.time())}",
                                storage_path=str(WORK_DIR / "ray_results")),
    )
    errors: list[BaseException] = []

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - reported by the driver
            errors.append(exc)

    t = time.perf_counter()
    bare = Stepper(cfg_dict, args.batch_size, args.threads)
    bare.run(args.warmup)
    th = threading.Thread(target=fit, daemon=True)
    th.start()
    _wait_for(sync / "ready", th.is_alive)
    ray_threads = int((sync / "ready").read_text())
    if ray_threads != args.threads:
        raise RuntimeError(f"Ray worker runs {ray_threads} torch threads, not {args.threads}")
    log(f"both sides built and warmed up ({args.warmup} steps) in {time.perf_counter() - t:.1f} s (not timed)")
    res: dict[str, list[float]] = {"bare": [], "ray": []}
    for blk in range(blocks):
        b = bare.run(args.block_steps)
        (sync / f"go_{blk}").touch()
        _wait_for(sync / f"done_{blk}.json", th.is_alive)
        r = json.loads((sync / f"done_{blk}.json").read_text())
        res["bare"] += b
        res["ray"] += r
        log(f"block {blk + 1}/{blocks}: bare {median(b):.3f} s/step, ray {median(r):.3f} s/step")
    th.join(timeout=600)
    if errors:
        raise errors[0]
    shutil.rmtree(sync, ignore_errors=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny_cpu", help="model / crops / loss preset (default tiny_cpu)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per run (default 20)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on both sides (default 2)")
    ap.add_argument("--block-steps", type=int, default=4, help="steps per turn; sides alternate (default 4)")
    ap.add_argument("--report-every", type=int, default=10, help="ray.train.report period on the Ray side")
    ap.add_argument("--quick", action="store_true", help="smoke test: tiny model at 56 px, batch 2, 2 steps, 1 thread")
    ap.add_argument("-o", "--override", action="append", default=[], help="extra config override key=value")
    args = ap.parse_args()
    if args.quick:
        args.batch_size, args.steps, args.warmup, args.report_every, args.threads, args.block_steps = 2, 2, 1, 2, 1, 1
        # tiny_cpu's own sizes (56 px globals, 24 px locals: multiples of its patch 8)
    env_setup()
    header("train_overhead")
    from reddino.config import load_config
    from reddino.runtime import init_ray

    cfg = load_config(args.preset, args.override)
    c = cfg.crops
    log(f"{cfg.model.arch} @ {cfg.model.img_size}, {cfg.model.head_prototypes} prototypes; batch {args.batch_size} x "
        f"({c.global_crops_number}x{c.global_crops_size} + {c.local_crops_number}x{c.local_crops_size}); "
        f"{args.threads} torch threads; {args.warmup} warm-up + {args.steps} timed steps per run")
    t = time.perf_counter()
    init_ray(num_cpus=max(2, args.threads), log_to_driver=False)
    log(f"ray start {time.perf_counter() - t:.1f} s (not timed)")

    runs = run_interleaved(cfg.to_dict(), args)
    for name, times in runs.items():
        log(f"{name:4s}: median {median(times):.3f} s/step, mean {sum(times) / len(times):.3f}, "
            f"min {min(times):.3f}, max {max(times):.3f} ({len(times)} steps)")
    if args.report_every:
        rep = [t for i, t in enumerate(runs["ray"]) if (args.warmup + i + 1) % args.report_every == 0]
        plain = [t for i, t in enumerate(runs["ray"]) if (args.warmup + i + 1) % args.report_every != 0]
        if rep and plain:
            print(f"ray steps without report: median {median(plain):.3f} s; with ray.train.report: median "
                  f"{median(rep):.3f} s ({len(rep)} of {len(runs['ray'])} steps)")
    bare = median(runs["bare"])
    ray_s = median(runs["ray"])
    ratio = ray_s / bare
    mean_ratio = (sum(runs["ray"]) / len(runs["ray"])) / (sum(runs["bare"]) / len(runs["bare"]))
    print(f"bare PyTorch: {bare:.3f} s/step ({args.batch_size / bare:.1f} img/s); Ray TorchTrainer: {ray_s:.3f} "
          f"s/step ({args.batch_size / ray_s:.1f} img/s); ratio of means {mean_ratio:.3f}")
    ratio_line("train_overhead ray/bare s/step", ratio, f"<= {GOAL}", ratio <= GOAL,
               f"[median step {ray_s:.3f} vs {bare:.3f} s, {args.preset}, batch {args.batch_size}, "
               f"{args.threads} threads]")
    import ray

    ray.shutdown()


if __name__ == "__main__":
    main()
    flush_exit(0)
