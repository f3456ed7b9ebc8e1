"""Model FLOPs per image, images/s and MFU of the RedDino ViT-S/14 DINOv2 step. Goal on a GPU: MFU >= 45%.

* FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` over one forward (teacher + student, heads, losses) and
  backward of ``DINOv2SSL`` on a batch of the recipe (2x224 global + 1x98 local crops, iBOT masks, 131072
  prototypes, shared head), divided by the batch size. Matmul/conv/attention FLOPs only (2 per MAC), the usual
  MFU convention; the optimizer and the teacher EMA are not counted (they are timed).
* images/s: the training loop's own step (`reddino.train.step.TrainStep`: forward, backward, grad clip, AdamW,
  teacher EMA), pre-made batches,
  after warm-up. CUDA: bf16 autocast (``train.precision``), synchronised timing. CPU: fp32.
* MFU = FLOPs/image x images/s / peak. Peak dense bf16 FLOP/s comes from a table keyed by the CUDA device
  name (A100, H100, H200, L4, ...) or ``--peak-tflops``. On CPU the achieved GFLOP/s is printed and MFU is
  n/a unless ``--peak-tflops`` is given.

    python benchmarks/gpu_efficiency.py                        # RedDino recipe; batch 128 on CUDA, 4 on CPU
    python benchmarks/gpu_efficiency.py --quick                # smoke test (tiny_cpu model, CPU)
    python benchmarks/gpu_efficiency.py --batch-size 256 --compile
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import env_setup, flush_exit, header, log, median, ratio_line  # noqa: E402

GOAL = 0.45

#: Peak dense (no sparsity) bf16 tensor-core TFLOP/s, by a substring of ``torch.cuda.get_device_name()``;
#: the first match wins, so more specific names come first.
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("GB200", 2500.0),
    ("B200", 2250.0),
    ("B100", 1750.0),
    ("H200", 989.0),
    ("GH200", 989.0),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM
    ("H800", 989.0),
    ("H20", 148.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("A30", 165.0),
    ("RTX 6000 Ada", 364.0),
    ("A6000", 155.0),
    ("RTX 4090", 165.0),
    ("RTX 3090", 71.0),
    ("V100", 125.0),  # fp16 (no bf16)
    ("T4", 65.0),  # fp16 (no bf16)
    ("MI300X", 1307.0),
    ("MI250X", 383.0),
]


def peak_tflops(device_name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return value
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="reddino_vits14")
    ap.add_argument("--batch-size", type=int, default=None, help="default 128 on CUDA, 4 on CPU")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 20 on CUDA, 3 on CPU)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps (default 5 on CUDA, 1 on CPU)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak dense FLOP/s of the device, in TFLOP/s")
    ap.add_argument("--threads", type=int, default=None, help="CPU: torch.set_num_threads")
    ap.add_argument("--compile", action="store_true", help="torch.compile the SSL module")
    ap.add_argument("--quick", action="store_true", help="smoke test: tiny model at 56 px, batch 2, 1 step, CPU, 1 thread")
    ap.add_argument("-o", "--override", action="append", default=[], help="extra config override key=value")
    args = ap.parse_args()
    env_setup()
    header("gpu_efficiency")
    import torch

    from reddino.config import load_config

    if args.quick:
        args.preset, args.device, args.threads = "tiny_cpu", "cpu", 1
        args.batch_size, args.steps, args.warmup = args.batch_size or 2, args.steps or 1, args.warmup or 1
        # tiny_cpu's own sizes (56 px globals, 24 px locals: multiples of its patch 8)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    B = args.batch_size or (128 if on_gpu else 4)
    steps = args.steps or (20 if on_gpu else 3)
    warmup = args.warmup if args.warmup is not None else (5 if on_gpu else 1)
    if args.threads and not on_gpu:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.preset, args.override)
    name = torch.cuda.get_device_name(device) if on_gpu else f"CPU ({torch.get_num_threads()} threads)"
    peak = args.peak_tflops or (peak_tflops(name) if on_gpu else None)
    use_amp = on_gpu and cfg.train.precision in ("bf16", "fp16")
    c = cfg.crops
    log(f"{cfg.model.arch} @ {cfg.model.img_size}, {cfg.model.head_prototypes} prototypes, batch {B} x "
        f"({c.global_crops_number}x{c.global_crops_size} + {c.local_crops_number}x{c.local_crops_size}) on {name}, "
        f"{'autocast ' + cfg.train.precision if use_amp else 'fp32'}; peak "
        f"{f'{peak:.0f} TFLOP/s' if peak else 'unknown'}")

    r = measure_step(cfg, device, B, steps, warmup, compile=args.compile)
    flops_per_image, ips, t, achieved = r["gflop_per_image"] * 1e9, r["img_s"], r["step_s"], r["gflop_s"] * 1e9
    mem = f", peak memory {r['peak_mem_gib']:.1f} GiB" if on_gpu else ""
    print(f"step {t:.3f} s (median of {steps}) = {ips:.1f} img/s; achieved {achieved / 1e9:.1f} GFLOP/s "
          f"({flops_per_image / 1e9:.1f} GFLOP/img){mem}")
    if peak:
        mfu = achieved / (peak * 1e12)
        ratio_line("gpu_efficiency MFU", mfu, f">= {GOAL:.2f}" + ("" if on_gpu else " (on a GPU)"),
                   (mfu >= GOAL) if on_gpu else None,
                   f"[{ips:.1f} img/s x {flops_per_image / 1e9:.1f} GFLOP / {peak:.0f} TFLOP/s, {name}, batch {B}]")
    else:
        ratio_line("gpu_efficiency MFU", float("nan"), f">= {GOAL:.2f} on a GPU", None,
                   f"[n/a: no peak for {name}; give --peak-tflops; achieved {achieved / 1e9:.1f} GFLOP/s, "
                   f"{ips:.2f} img/s, batch {B}]")


def measure_step(cfg, device, batch_size: int, steps: int, warmup: int, compile: bool = False,
                 compile_backend: str = "inductor", batches=None) -> dict:
    """FLOPs per image and the timed training step (``TrainStep``) of ``cfg``'s model on ``device``; ``batches``:
    pre-made batches (default: random normalised crops), e.g. decoded images + crop parameters for
    ``crops.on_device``, whose crops the step then makes on the device (timed with the step)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from reddino.model import DINOv2SSL
    from reddino.train.data import crops_from_batch
    from reddino.train.schedules import build_schedules
    from reddino.train.step import TrainStep
    from train_overhead import make_batches

    on_gpu = device.type == "cuda"
    B = batch_size
    use_amp = on_gpu and cfg.train.precision in ("bf16", "fp16")
    amp_dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float16
    torch.manual_seed(0)
    model = DINOv2SSL.from_config(cfg.model, cfg.loss).to(device)
    model.keep_monitor_outputs = False
    optimizer = torch.optim.AdamW(model.param_groups(cfg.optim), lr=0.0, betas=tuple(cfg.optim.betas),
                                  **({"fused": True} if on_gpu else {}))
    sched = build_schedules(cfg, B)
    batches = batches if batches is not None else make_batches(cfg, B, model.patch_size, n=2)
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    fwd = torch.compile(model, backend=compile_backend) if compile else model
    model.train()

    # --- FLOPs of forward + backward (one batch) ---
    # Count attention as explicit matmuls: FlopCounterMode has no formula for the CPU fused SDPA kernel, so the
    # count would depend on the device; with fused_attn off it is the same (exact) number everywhere.
    fused = [m for m in model.modules() if getattr(m, "fused_attn", None) is True]
    for m in fused:
        m.fused_attn = False
    b = batches[0]
    g, lc = crops_from_batch(b, device, cfg.crops)
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
            loss, _ = model(g, lc, b["masks"], cfg.loss.teacher_temp)
        loss.backward()
    flops_per_image = counter.get_total_flops() / B
    for m in fused:
        m.fused_attn = True
    optimizer.zero_grad(set_to_none=True)
    log(f"model FLOPs per image (forward+backward, teacher+student): {flops_per_image / 1e9:.1f} GFLOP")

    def sync() -> None:
        if on_gpu:
            torch.cuda.synchronize(device)

    # The training loop's own step (reddino/train/step.py), so the time is the time of what trains.
    train_step = TrainStep(model, optimizer, sched, cfg, forward=fwd, device=device, autocast=use_amp,
                           amp_dtype=amp_dtype)
    times = []
    for step in range(warmup + steps):
        b = batches[step % len(batches)]
        sync()
        t0 = time.perf_counter()
        train_step(step, lambda: b)
        sync()
        times.append(time.perf_counter() - t0)
    t = median(times[warmup:])
    ips = B / t
    return {"gflop_per_image": flops_per_image / 1e9, "step_s": t, "img_s": ips,
            "gflop_s": flops_per_image * ips / 1e9, "batch": B, "compile": bool(compile),
            "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if on_gpu else None}


if __name__ == "__main__":
    main()
    flush_exit(0)
