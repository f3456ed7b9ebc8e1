"""Inference cost of a distillation student against its teacher: FLOPs per image and frozen-feature img/s.

The teacher is `tiny_cpu`'s ViT-Mini/8, the students `distill_cpu`'s ViT-Micro/8 and a timm ConvNeXt-Atto (the ViT →
ConvNeXt pair), all at 56 px, fp32, `torch_threads` threads, no grad: what `reddino embed` runs per cell. Weights do not
change the cost, so random init (or `--teacher FILE --student FILE` for real exports). Timed in alternating blocks
so a load change hits every model alike.

    python benchmarks/distill_cost.py [--quick] [--batch 64] [--blocks 5] [--threads 2]

RATIO = student FLOPs / teacher FLOPs (goal <= 0.5: "at most half the teacher's inference cost").
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import header, log  # noqa: E402


def _model(spec: str):
    from reddino.model import create_backbone, load_backbone

    if Path(spec).expanduser().is_file():
        return load_backbone(spec).eval()
    arch, _, kw = spec.partition(":")
    kwargs = {"ls_init_value": 0.1} if kw == "ls" else None
    return create_backbone(arch, 56, timm_kwargs=kwargs).eval()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", default="vit_mini_patch8_reddino")
    ap.add_argument("--student", action="append", default=None,
                    help="arch or export file (repeatable); default: vit_micro_patch8_reddino and convnext_atto")
    ap.add_argument("--size", type=int, default=56)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--blocks", type=int, default=5)
    ap.add_argument("--iters", type=int, default=5, help="forwards per block")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.batch, args.blocks, args.iters = 8, 1, 1

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from reddino.model import family

    torch.set_num_threads(args.threads)
    header("distill cost")
    specs = [args.teacher] + (args.student or ["vit_micro_patch8_reddino", "convnext_atto:ls"])
    models = {s: _model(s) for s in specs}
    x = torch.rand(args.batch, 3, args.size, args.size)
    flops, params = {}, {}
    for s, m in models.items():
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            family.features(m, x[:1])
        flops[s] = fc.get_total_flops()
        params[s] = sum(p.numel() for p in m.parameters())
    times: dict[str, list[float]] = {s: [] for s in specs}
    with torch.no_grad():
        for s, m in models.items():  # warm-up
            family.features(m, x)
        for _ in range(args.blocks):
            for s, m in models.items():
                t = time.perf_counter()
                for _ in range(args.iters):
                    family.features(m, x)
                times[s].append((time.perf_counter() - t) / (args.iters * args.batch))
    teacher = specs[0]
    for s in specs:
        ips = 1.0 / min(times[s])
        log(f"{'teacher' if s == teacher else 'student'} {s}: {flops[s] / 1e6:.1f} MFLOPs/image, "
            f"{params[s] / 1e6:.3f} M params, {ips:.0f} img/s (best block; batch {args.batch}, {args.threads} threads)"
            + ("" if s == teacher else f" | FLOPs x{flops[s] / flops[teacher]:.2f}, "
               f"img/s x{min(times[teacher]) / min(times[s]):.2f} of the teacher"))
    first = specs[1]
    ratio = flops[first] / flops[teacher]
    print(f"RATIO student/teacher FLOPs ({first} vs {teacher}) = {ratio:.3f} "
          f"(goal <= 0.5: {'MET' if ratio <= 0.5 else 'NOT MET'})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
