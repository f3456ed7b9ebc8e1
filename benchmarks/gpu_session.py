"""One GPU session in one script: everything reddino needs to know from the few minutes a GPU is lent, in <= 8 min.

    python benchmarks/gpu_session.py OUTDIR                 # on a CUDA machine
    python benchmarks/gpu_session.py OUTDIR --dry-run       # same code paths on the CPU, a few steps (in the tests)

Prints the GPU and library versions, then writes to OUTDIR (``summary.md`` + ``summary.json`` at the end, each
phase's JSON as soon as it finishes, so a session cut short keeps what it measured):

1. ``mfu.json``: FLOPs per image, img/s and MFU of the ``reddino_vits14`` training step (bf16 autocast), without and
   with ``torch.compile`` (``benchmarks/gpu_efficiency.measure_step``), on pre-made normalised crops.
2. ``feed.json``: the data pipeline with device augmentation (``crops.policy=dinov2 crops.on_device=true``) feeding
   that step. The step on pre-made (decoded images + crop parameters) batches, crops made on the GPU inside it; the
   data workers' CPU ms per image (thread CPU time, one core); so the CPU workers one GPU needs; then the real Ray
   Data stream (``build_train_dataset``) with W map tasks feeding the real step for a fixed time: img/s delivered
   against the step's own, i.e. whether the GPU is data-bound at W workers.
3. ``pretrain/``: a ~2-minute ``tiny_cpu``-sized pretraining on Chula cells at GPU speed (``reddino.train.pretrain``,
   device augmentation, in-training kNN on the labelled cells), its exported backbone and ``learning_curve.png``.
4. ``embed.json``: ``reddino embed`` (Ray Data batch inference) img/s with that backbone over the Chula cells.

Data: ``--patches`` (default ``data/chula-patches``) and ``--cells`` (default ``data/chula-cells``); synthetic
stand-ins when absent (dry run: always synthetic and tiny).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import WORK_DIR, env_setup, log, reencoded  # noqa: E402

DRY = False


def write(out: Path, name: str, obj) -> None:
    tmp = out / f".{name}.tmp"
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    tmp.replace(out / name)


def versions(device) -> dict:
    import importlib.metadata as md

    import torch

    v = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
         "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
         "host": platform.node(), "cpus": os.cpu_count()}
    for pkg in ("torchvision", "timm", "ray", "mlflow", "numpy", "opencv-python-headless", "pyspng", "triton"):
        try:
            v[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            v[pkg] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        v.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}",
                 gpus=torch.cuda.device_count(), driver=_driver())
    else:
        v["gpu"] = None
    return v


def _driver() -> str | None:
    import subprocess

    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# --------------------------------------------------------------------------------------------------------------
# 1. MFU
# --------------------------------------------------------------------------------------------------------------


def phase_mfu(device, batch: int, steps: int, warmup: int) -> dict:
    from gpu_efficiency import measure_step, peak_tflops

    import torch

    cfg = _vits14_cfg([])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak = peak_tflops(name) if device.type == "cuda" else None
    res = {"device": name, "peak_tflops": peak}
    # a dry run checks the compile path with the cheap eager backend (inductor on a CPU takes minutes)
    for compiled in (False, True):
        key = "compiled" if compiled else "eager"
        t = time.perf_counter()
        r = measure_step(cfg, device, batch, steps, warmup, compile=compiled,
                         compile_backend="eager" if DRY else "inductor")
        r["mfu"] = r["gflop_s"] * 1e9 / (peak * 1e12) if peak else None
        r["wall_s"] = round(time.perf_counter() - t, 1)
        res[key] = r
        mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
        log(f"MFU {key}: {r['img_s']:.1f} img/s, {r['gflop_per_image']:.1f} GFLOP/img, MFU {mfu} ({r['wall_s']} s)")
    return res


def _vits14_cfg(extra: list[str]):
    from reddino.config import load_config

    over = ["crops.policy=dinov2", *extra]
    if DRY:  # the same recipe at toy size: the tiny test model's shapes
        over += ["model.arch=vit_mini_patch8_reddino", "model.img_size=56", "crops.global_crops_size=56",
                 "crops.local_crops_size=24", "model.head_prototypes=256", "model.head_hidden_dim=64",
                 "model.head_bottleneck_dim=32", "data.resize=64"]
    return load_config("reddino_vits14", over)


# --------------------------------------------------------------------------------------------------------------
# 2. The device-augmentation pipeline feeding the step
# --------------------------------------------------------------------------------------------------------------


def _patches(path: Path | None, n: int) -> Path:
    if path is not None and (path / "_manifest.json").is_file() and not DRY:
        return path
    from _common import synthetic_patches

    return synthetic_patches(n, 112 if DRY else 224)


def _on_device_batches(cfg, data: Path, batch: int, n: int = 2):
    """Pre-made (decoded images + crop parameters + masks) batches of real rows, as the stream delivers them."""
    import numpy as np
    import torch

    from reddino.data import load_table
    from reddino.data.augment import MultiCropTransform

    table = load_table([data], columns=["image", "sha256"])
    rows = min(table.num_rows, batch * n)
    t = MultiCropTransform(cfg.crops, cfg.mask, 14 if not DRY else 8, resize=cfg.data.resize, seed=0)
    out = t({"image": np.array(table.column("image").to_pylist()[:rows], dtype=object),
             "sha256": np.array(table.column("sha256").to_pylist()[:rows])})
    idx = [np.arange(i * batch, (i + 1) * batch) % rows for i in range(n)]
    return [{k: torch.from_numpy(out[k][ix]) for k in ("images", "crop_params", "masks")} for ix in idx]


def worker_cpu_ms(cfg, data: Path, n: int, encode: str | None = None) -> float:
    """CPU ms per image of the data workers' side (decode + crop parameters + masks), thread CPU time, 1 thread;
    ``encode``: the same pixels re-encoded so (``reddino ingest --encode``) instead of as stored."""
    import cv2
    import numpy as np

    from reddino.data import load_table
    from reddino.data.augment import MultiCropTransform

    cv2.setNumThreads(1)
    table = load_table([data], columns=["image", "sha256"]).slice(0, n)
    images = table.column("image").to_pylist()
    if encode:
        images = reencoded(images, encode)
    t = MultiCropTransform(cfg.crops, cfg.mask, 14 if not DRY else 8, resize=cfg.data.resize, seed=0)
    t({"image": np.array(images[:2], dtype=object), "sha256": np.array(["warm", "up"])})  # first-call set-up
    batch = {"image": np.array(images, dtype=object),
             "sha256": np.array(table.column("sha256").to_pylist())}
    best = float("inf")
    for _ in range(2):  # the faster of two passes: the first also warms caches
        t0 = time.thread_time_ns()
        t(batch)
        best = min(best, (time.thread_time_ns() - t0) / 1e6 / table.num_rows)
    return best


def phase_feed(device, data: Path, batch: int, steps: int, warmup: int, workers: int, seconds: float) -> dict:
    from gpu_efficiency import measure_step

    cfg = _vits14_cfg(["crops.on_device=true"])
    step_alone = measure_step(cfg, device, batch, steps, warmup, batches=_on_device_batches(cfg, data, batch))
    ms = worker_cpu_ms(cfg, data, 16 if DRY else 256)
    ms_tz = worker_cpu_ms(cfg, data, 16 if DRY else 256, encode="tiff-zstd")
    need, need_tz = (step_alone["img_s"] * x / 1000.0 for x in (ms, ms_tz))
    log(f"feed: step with device augmentation {step_alone['img_s']:.1f} img/s; workers {ms:.2f} CPU ms/img → "
        f"{need:.1f} CPU workers keep one such step fed (images as tiff-zstd: {ms_tz:.2f} ms, {need_tz:.1f} workers)")
    fed = _fed_rate(cfg, device, data, batch, workers, seconds)
    res = {"step_img_s_with_device_aug": step_alone["img_s"], "worker_cpu_ms_per_image": ms,
           "workers_needed": need, "worker_cpu_ms_per_image_tiff_zstd": ms_tz, "workers_needed_tiff_zstd": need_tz,
           "map_tasks": workers, **fed,
           "data_bound": fed["fed_img_s"] < 0.9 * step_alone["img_s"]}
    log(f"feed: {workers} map tasks fed {fed['fed_img_s']:.1f} img/s over {fed['steps']} steps "
        f"({'DATA-BOUND' if res['data_bound'] else 'GPU-bound'}; step alone {step_alone['img_s']:.1f} img/s)")
    return res


def _fed_rate(cfg, device, data: Path, batch: int, workers: int, seconds: float) -> dict:
    """The real stream (build_train_dataset, on_device) feeding the real step for ``seconds``."""
    import ray
    import torch

    from reddino.model import DINOv2SSL
    from reddino.runtime import init_ray
    from reddino.train.data import build_train_dataset
    from reddino.train.schedules import build_schedules
    from reddino.train.step import TrainStep

    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={
        "paths": [str(data)], "map_concurrency": workers, "cpus_per_map_task": 1.0, "shuffle_buffer": 0,
        "map_batch_size": min(cfg.data.map_batch_size, batch)})})
    init_ray()  # main() started it; the phases share one Ray
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = ctx.enable_operator_progress_bars = False
    on_gpu = device.type == "cuda"
    model = DINOv2SSL.from_config(cfg.model, cfg.loss).to(device)
    model.train()
    opt = torch.optim.AdamW(model.param_groups(cfg.optim), lr=0.0, **({"fused": True} if on_gpu else {}))
    step = TrainStep(model, opt, build_schedules(cfg, batch), cfg, device=device, autocast=on_gpu)
    ps = model.patch_size
    images, n_steps, t_first, t_end = 0, 0, None, None
    deadline = time.perf_counter() + seconds
    more = (lambda: n_steps < 3) if DRY else (lambda: time.perf_counter() < deadline)  # noqa: E731
    while more():  # passes over the dataset until the time is up
        ds = build_train_dataset(cfg, ps, run_state_name=None)
        for b in ds.iter_torch_batches(batch_size=batch, drop_last=True, prefetch_batches=4):
            step(n_steps, lambda: b)
            n_steps += 1
            if on_gpu:
                torch.cuda.synchronize(device)
            now = time.perf_counter()
            if t_first is None:
                t_first = now  # after the first step: Ray Data start-up excluded
            else:
                images += batch
            t_end = now
            if not more():
                break
    rate = images / (t_end - t_first) if t_first and t_end and t_end > t_first else 0.0
    return {"fed_img_s": rate, "steps": n_steps}


# --------------------------------------------------------------------------------------------------------------
# 3. A short pretraining at GPU speed, 4. reddino embed
# --------------------------------------------------------------------------------------------------------------


def _cells(path: Path | None) -> Path:
    if path is not None and (path / "_manifest.json").is_file() and not DRY:
        return path
    from reddino.data import generate_synthetic

    out = WORK_DIR / "gpu_session_cells"
    if not (out / "_manifest.json").is_file():
        generate_synthetic(out, n_per_class=4, sources=2, unit="cell", seed=0, size=48, overwrite=True)
    return out


def phase_pretrain(out: Path, cells: Path, device, fed_img_s: float | None, seconds: float) -> dict:
    from reddino.config import load_config
    from reddino.train import pretrain

    on_gpu = device.type == "cuda"
    batch = 256 if on_gpu else 8
    # as many steps as ~`seconds` at the rate the device-augmentation stream fed the big step (small cells decode
    # faster and the tiny model steps faster, so this undershoots rather than overruns), at most 2000
    rate = max(fed_img_s or 0.0, 1.0)
    steps = 3 if DRY else int(min(2000, max(100, seconds * rate / batch)))
    every = max(steps // 4, 1)
    over = [f"data.paths=[{str(cells)!r}]", "crops.policy=dinov2", "crops.on_device=true",
            f"train.batch_size_per_worker={batch}", "train.epochs=1", f"train.iters_per_epoch={steps}",
            f"train.use_gpu={'true' if on_gpu else 'false'}", f"train.precision={'bf16' if on_gpu else 'fp32'}",
            f"train.checkpoint_every={steps}", f"train.log_every={max(every // 4, 1)}", f"train.monitor_every={every}",
            f"train.storage_path={out / 'runs'}", f"mlflow.tracking_uri=sqlite:///{out / 'mlflow.db'}",
            f"data.map_concurrency={max(1, (os.cpu_count() or 2) - 2)}", "data.shuffle_buffer=1024",
            f"eval.data={str(cells)!r}" if not DRY else "eval.data=null", f"eval.every={every}",
            "eval.max_images=2000"]
    if on_gpu:
        over.append("train.cpus_per_worker=1")
    if DRY:
        over += ["data.map_concurrency=1", "data.shuffle_buffer=0", "model.head_prototypes=64",
                 "model.head_hidden_dim=32", "model.head_bottleneck_dim=16", "train.torch_threads=1",
                 "data.map_batch_size=8"]
    cfg = load_config("tiny_cpu", over)
    t = time.perf_counter()
    res = pretrain(cfg, run_name="gpu-session")
    wall = time.perf_counter() - t
    dest = out / "pretrain"
    dest.mkdir(exist_ok=True)
    curve = None
    if res.backbone_path is not None:
        folder = Path(res.backbone_path).parent
        for f in folder.glob("learning_curve*.png"):
            shutil.copy2(f, dest / f.name)
            curve = str(dest / f.name)
    m = {k: v for k, v in res.metrics.items() if isinstance(v, (int, float, str)) or v is None}
    r = {"steps": steps, "batch": batch, "wall_s": round(wall, 1), "img_s": steps * batch / wall,
         "backbone": str(res.backbone_path) if res.backbone_path else None, "learning_curve": curve,
         "stopped": res.stopped, "final_metrics": m}
    log(f"pretrain: {steps} steps x {batch} in {wall:.0f} s, backbone {r['backbone']}, curve {curve}")
    return r


def phase_embed(out: Path, backbone: str, cells: Path, device) -> dict:
    from reddino.features import embed

    on_gpu = device.type == "cuda"
    dest = out / "embed"
    res = embed(backbone, cells, dest, batch_size=512 if on_gpu else 32, precision="auto",
                num_cpus=None if on_gpu else 2, overwrite=True)
    r = {"rows": res.num_rows, "seconds": round(res.seconds, 2), "img_s": res.num_rows / max(res.seconds, 1e-9)}
    log(f"embed: {r['rows']} cells in {r['seconds']} s = {r['img_s']:.0f} img/s (Ray start-up included)")
    shutil.rmtree(dest, ignore_errors=True)  # the embeddings themselves are not the result
    return r


# --------------------------------------------------------------------------------------------------------------


def summary(out: Path, s: dict) -> str:
    v, m, f, p, e = s.get("versions", {}), s.get("mfu", {}), s.get("feed", {}), s.get("pretrain", {}), s.get("embed", {})

    def mfu(r):
        if not r:
            return "not run"
        x = r.get("mfu")
        return f"{r['img_s']:.1f} img/s, MFU {'n/a' if x is None else f'{x:.1%}'}"

    rows = [
        ("device", f"{v.get('gpu') or 'CPU (dry run)'}; torch {v.get('torch')}, CUDA {v.get('cuda')}"),
        ("reddino_vits14 step, bf16", mfu(m.get("eager"))),
        ("reddino_vits14 step, bf16 + torch.compile", mfu(m.get("compiled"))),
        ("step with device augmentation", f"{f['step_img_s_with_device_aug']:.1f} img/s" if f else "not run"),
        ("data workers' CPU per image", f"{f['worker_cpu_ms_per_image']:.2f} ms → {f['workers_needed']:.1f} workers "
                                        "per GPU" if f else "not run"),
        ("the same, images stored as tiff-zstd", f"{f['worker_cpu_ms_per_image_tiff_zstd']:.2f} ms → "
                                                 f"{f['workers_needed_tiff_zstd']:.1f} workers per GPU" if f else "not run"),
        ("stream feeding the step", f"{f['fed_img_s']:.1f} img/s at {f['map_tasks']} map tasks: "
                                    f"{'data-bound' if f['data_bound'] else 'not data-bound'}" if f else "not run"),
        ("tiny_cpu pretraining (Chula cells)", f"{p['steps']} steps x {p['batch']} in {p['wall_s']} s = "
                                               f"{p['img_s']:.0f} img/s" if p else "not run"),
        ("reddino embed", f"{e['img_s']:.0f} img/s ({e['rows']} cells)" if e else "not run"),
    ]
    md = "| measure | result |\n| --- | --- |\n" + "\n".join(f"| {a} | {b} |" for a, b in rows) + "\n"
    (out / "summary.md").write_text(md)
    write(out, "summary.json", s)
    return md


def main() -> None:
    global DRY
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outdir", type=Path)
    ap.add_argument("--dry-run", action="store_true", help="CPU, toy sizes, a few steps: checks every code path")
    ap.add_argument("--patches", type=Path, default=ROOT / "data" / "chula-patches")
    ap.add_argument("--cells", type=Path, default=ROOT / "data" / "chula-cells")
    ap.add_argument("--batch-size", type=int, default=128, help="reddino_vits14 batch per step (GPU)")
    ap.add_argument("--workers", type=int, default=None, help="map tasks feeding the step (default: CPUs - 2)")
    ap.add_argument("--feed-seconds", type=float, default=45.0)
    ap.add_argument("--pretrain-seconds", type=float, default=120.0)
    ap.add_argument("--skip", action="append", default=[], choices=["mfu", "feed", "pretrain", "embed"])
    args = ap.parse_args()
    DRY = args.dry_run
    env_setup()
    os.environ.setdefault("REDDINO_HOME", str(args.outdir / "home"))
    import torch

    if not DRY and not torch.cuda.is_available():
        sys.exit("gpu_session: no CUDA device here (use --dry-run to check the code paths on a CPU)")
    device = torch.device("cuda" if not DRY else "cpu")
    if DRY:
        torch.set_num_threads(1)
    out = args.outdir
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    s: dict = {"dry_run": DRY, "versions": versions(device)}
    print(json.dumps(s["versions"], indent=1), flush=True)
    write(out, "versions.json", s["versions"])
    batch = 2 if DRY else args.batch_size
    steps, warmup = (1, 1) if DRY else (20, 5)
    workers = args.workers or (1 if DRY else max(1, (os.cpu_count() or 2) - 2))
    from reddino.runtime import init_ray

    # one Ray for every phase (its start-up costs seconds); a dry run gets logical CPUs for trainer + map tasks
    init_ray(num_cpus=4 if DRY else None)
    if "mfu" not in args.skip:
        s["mfu"] = phase_mfu(device, batch, steps, warmup)
        write(out, "mfu.json", s["mfu"])
    if "feed" not in args.skip:
        s["feed"] = phase_feed(device, _patches(args.patches, 16 if DRY else 512), batch, steps, warmup, workers,
                               5.0 if DRY else args.feed_seconds)
        write(out, "feed.json", s["feed"])
    cells = _cells(args.cells)
    if "pretrain" not in args.skip:
        s["pretrain"] = phase_pretrain(out, cells, device, s.get("feed", {}).get("fed_img_s"), args.pretrain_seconds)
        write(out, "pretrain.json", s["pretrain"])
        if "embed" not in args.skip and s["pretrain"]["backbone"]:
            s["embed"] = phase_embed(out, s["pretrain"]["backbone"], cells, device)
            write(out, "embed.json", s["embed"])
    s["wall_s"] = round(time.perf_counter() - t0, 1)
    print(summary(out, s), flush=True)
    print(f"gpu_session: done in {s['wall_s']} s → {out}", flush=True)


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)  # Ray / MLflow threads would otherwise hold the exit
