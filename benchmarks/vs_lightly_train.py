"""images/s of a DINOv2 training step: reddino against lightly-train's DINOv2 method, same ViT/crops/batch, CPU.

lightly-train is AGPL and is never a dependency of reddino: this script installs it into a separate benchmark
venv (``--lt-venv``, default /tmp/lt-venv, ``pip install lightly-train``) and runs it there in a subprocess,
through its public ``lightly_train.train()`` entry point. No lightly-train code is imported into reddino or
copied. If it cannot be installed or its DINOv2 method cannot run on this machine, the script says why and
exits 0. ``--quick`` never installs anything: it times the reddino side only and skips the peer (unless the
venv already exists and ``--peer-in-quick`` is given).

What is timed, both sides, on CPU with the same ``torch.set_num_threads``:

* **reddino**: :func:`train_overhead.run_steps` (bare loop: ``DINOv2SSL`` forward, backward, clip, AdamW,
  teacher EMA) on pre-made batches, ViT ``--arch``.
* **lightly-train**: ``lightly_train.train(method="dinov2", model="dinov2/vits14-noreg-notpretrained", ...,
  accelerator="cpu")`` on a folder of the same synthetic patches; its own per-batch timer
  (``profiling/batch_time``: Lightning's batch start → end, i.e. forward + backward + optimizer step + EMA,
  excluding data loading) is collected. Heads, prototypes, loss weights, centering and crops are set to match.

The first ``--warmup`` steps of each side are dropped; the ratio is median reddino img/s over median
lightly-train img/s. Sides run one after the other in this one run (reddino, lightly-train, reddino).

    python benchmarks/vs_lightly_train.py                 # ViT-S/14, 2x224 + 1x98, batch 8, 131072 prototypes
    python benchmarks/vs_lightly_train.py --quick         # smoke test, reddino side only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import WORK_DIR, env_setup, flush_exit, header, log, median, ratio_line  # noqa: E402

LT_MODEL = "dinov2/vits14-noreg-notpretrained"  # DINOv2 ViT-S/14 without registers == timm vit_small_patch14_dinov2

PEER = textwrap.dedent(
    """
    import json, sys, time
    import torch
    args = json.loads(sys.argv[1])
    torch.set_num_threads(args["threads"])
    import lightly_train
    from lightly_train._methods import method as _m  # only to read its per-batch timer
    times = []
    _orig = _m.Method._log_timing_metrics
    def _spy(self, metrics):
        if "batch_time" in metrics:
            times.append(float(metrics["batch_time"]))
        return _orig(self, metrics)
    _m.Method._log_timing_metrics = _spy
    lightly_train.train(
        out=args["out"], data=args["data"], model=args["model"], method="dinov2",
        method_args=args["method_args"], transform_args=args["transform_args"],
        epochs=1, batch_size=args["batch_size"], num_workers=args["num_workers"], accelerator="cpu",
        devices=1, precision="32-true", seed=0, overwrite=True, loggers={"jsonl": None},
    )
    print("LT_TIMES " + json.dumps({"times": times, "threads": torch.get_num_threads(),
                                   "version": lightly_train.__version__}), flush=True)
    """
)


def ensure_peer(venv: Path, allow_install: bool) -> tuple[Path | None, str]:
    py = venv / "bin" / "python"
    if py.exists():
        ok = subprocess.run([str(py), "-c", "import lightly_train"], capture_output=True, text=True)
        if ok.returncode == 0:
            return py, "found"
        if not allow_install:
            return None, f"{venv} exists but `import lightly_train` fails: {ok.stderr.strip()[-300:]}"
    if not allow_install:
        return None, f"quick mode never installs lightly-train (no usable venv at {venv})"
    log(f"installing lightly-train into {venv} (pip install lightly-train) ...")
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True)
    if r.returncode != 0:
        return None, f"python -m venv failed: {r.stderr.strip()[-300:]}"
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "lightly-train"], capture_output=True, text=True)
    if r.returncode != 0:
        return None, f"pip install lightly-train failed: {(r.stderr or r.stdout).strip()[-600:]}"
    log(f"installed in {time.perf_counter() - t:.0f} s")
    return py, "installed"


def write_folder(n: int, size: int) -> Path:
    """``n`` synthetic smear patches as PNG files (lightly-train reads image folders)."""
    import pyarrow.dataset as pds

    from _common import synthetic_patches
    from reddino.data.stream import dataset_files

    data = synthetic_patches(n, size)
    folder = WORK_DIR / f"lt_folder_{n}_{size}"
    if folder.is_dir() and len(list(folder.glob("*.png"))) >= n:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    table = pds.dataset(dataset_files([data]), format="parquet").to_table(columns=["image", "sha256"]).slice(0, n)
    for blob, sha in zip(table.column("image").to_pylist(), table.column("sha256").to_pylist()):
        (folder / f"{sha}.png").write_bytes(blob)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per side (default 4)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--global-size", type=int, default=224)
    ap.add_argument("--local-size", type=int, default=98)
    ap.add_argument("--local-crops", type=int, default=1)
    ap.add_argument("--prototypes", type=int, default=131072)
    ap.add_argument("--lt-venv", type=Path, default=Path("/tmp/lt-venv"))
    ap.add_argument("--quick", action="store_true", help="smoke test: tiny sizes, reddino side only, no install")
    ap.add_argument("--peer-in-quick", action="store_true", help="in --quick, run the peer if its venv exists")
    args = ap.parse_args()
    if args.quick:
        args.batch_size, args.steps, args.warmup, args.threads = 2, 1, 1, 1
        args.global_size, args.local_size, args.prototypes = 56, 28, 1024
    env_setup()
    header("vs_lightly_train")
    from train_overhead import run_steps

    from reddino.config import load_config

    arch = "vit_tiny_patch14_reddino" if args.quick else "vit_small_patch14_dinov2"
    G, L = 2, args.local_crops
    cfg = load_config("reddino_vits14", [
        f"model.arch={arch}", f"model.img_size={args.global_size}", f"model.head_prototypes={args.prototypes}",
        f"crops.global_crops_size={args.global_size}", f"crops.local_crops_size={args.local_size}",
        f"crops.local_crops_number={L}",
    ])
    desc = (f"{'ViT-Ti/14' if args.quick else 'ViT-S/14'} ({arch}), batch {args.batch_size} x ({G}x{args.global_size} + {L}x{args.local_size}), "
            f"{args.prototypes} prototypes, shared DINO/iBOT head, SK centering, KoLeo 0, {args.threads} threads")
    log(desc)

    def reddino_side(tag: str) -> list[float]:
        t = time.perf_counter()
        times = run_steps(cfg.to_dict(), args.batch_size, args.warmup, args.steps, args.threads)
        log(f"reddino {tag}: median {median(times):.3f} s/step = {args.batch_size / median(times):.2f} img/s "
            f"({len(times)} steps, run {time.perf_counter() - t:.0f} s)")
        return times

    r_times = reddino_side("run 1")

    if args.quick and not args.peer_in_quick:
        py, why = None, "quick mode: peer skipped (never installs, never runs lightly-train)"
    else:
        py, why = ensure_peer(args.lt_venv, allow_install=not args.quick)
    lt_times: list[float] = []
    if py is not None:
        n_img = (args.warmup + args.steps) * args.batch_size
        folder = write_folder(n_img, max(args.global_size, 224))
        peer_args = {
            "out": str(WORK_DIR / "lt_out"), "data": str(folder), "model": LT_MODEL,
            "batch_size": args.batch_size, "num_workers": 1, "threads": args.threads,
            "method_args": {
                "output_dim": args.prototypes, "hidden_dim": 2048, "dino_bottleneck_dim": 256,
                "ibot_bottleneck_dim": 256, "ibot_separate_head": False, "koleo_loss_weight": 0.0,
                "center_method": "sinkhorn_knopp", "layerwise_decay": 1.0, "patch_embed_lr_multiplier": 0.2,
                "mask_probability": 0.5, "mask_ratio_min": 0.1, "mask_ratio_max": 0.5,
            },
            "transform_args": {
                "image_size": [args.global_size, args.global_size],
                "local_view": {"num_views": L, "view_size": [args.local_size, args.local_size]},
            },
        }
        log(f"lightly-train ({why}) in {py}: {LT_MODEL}, {n_img} images, epochs=1 ...")
        t = time.perf_counter()
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        proc = subprocess.run([str(py), "-c", PEER, json.dumps(peer_args)], capture_output=True, text=True, env=env)
        out = proc.stdout + proc.stderr
        line = [x for x in proc.stdout.splitlines() if x.startswith("LT_TIMES ")]
        if proc.returncode != 0 or not line:
            why = f"lightly-train's DINOv2 run failed (rc {proc.returncode}): ...{out.strip()[-1500:]}"
        else:
            info = json.loads(line[-1][len("LT_TIMES "):])
            lt_times = info["times"][args.warmup:]
            log(f"lightly-train {info['version']}: median {median(lt_times):.3f} s/step = "
                f"{args.batch_size / median(lt_times):.2f} img/s ({len(lt_times)} steps, {info['threads']} threads, "
                f"run incl. start-up {time.perf_counter() - t:.0f} s)")
            if not lt_times:
                why = "lightly-train ran but reported no batch timings"
        r_times += reddino_side("run 2")

    r_ips = args.batch_size / median(r_times)
    if not lt_times:
        print(f"PEER SKIPPED: {why}")
        ratio_line("vs_lightly_train reddino/lightly-train img/s", float("nan"), ">= 1.0", None,
                   f"[peer not run; reddino {r_ips:.2f} img/s]")
        return
    lt_ips = args.batch_size / median(lt_times)
    ratio = r_ips / lt_ips
    ratio_line("vs_lightly_train reddino/lightly-train img/s", ratio, ">= 1.0", ratio >= 1.0,
               f"[reddino {r_ips:.2f} vs lightly-train {lt_ips:.2f} img/s; {desc}]")


if __name__ == "__main__":
    main()
    flush_exit(0)
