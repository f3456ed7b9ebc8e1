"""img/s of `reddino embed` (Ray Data batch inference: read Parquet → decode → forward → Parquet shards) against a
plain in-process torch loop over the same images, already decoded, with the same model, batch and threads.
Goal: ratio >= 0.9 on one machine. Also prints the wall time for the whole dataset (20k cells by default).

The reddino side is timed twice: the whole call (Ray start excluded, Ray Data start-up and the output writes
included), and steady state (from its first finished shard on, so the actor start and the first shard are
out). The baseline gets its images decoded in advance (not timed) and only runs preprocessing + forward.

    python benchmarks/embed_speed.py                   # 20k synthetic cells, tiny ViT/14 at 56 px
    python benchmarks/embed_speed.py --quick           # 540 cells, smoke test
    python benchmarks/embed_speed.py --data /work/data/chula-cells --img-size 112

On a cluster the same command scales out with actors (one GPU each when there are GPUs):
    ray job submit --address $RAY_ADDRESS -- reddino embed -m models:/reddino-backbone@champion -d DATA --out OUT --concurrency 8
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import WORK_DIR, env_setup, flush_exit, header, log, ratio_line  # noqa: E402

GOAL = 0.9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, help="reddino dataset dir (default: synthetic cells)")
    ap.add_argument("--cells", type=int, default=20000)
    ap.add_argument("--quick", action="store_true", help="smoke test: 540 synthetic cells")
    ap.add_argument("--arch", default="vit_tiny_patch14_reddino")
    ap.add_argument("--img-size", type=int, default=56)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--precision", default="fp32", choices=["auto", "fp32", "bf16"])
    args = ap.parse_args()
    env_setup()
    header("embed speed")

    import numpy as np
    import torch

    from reddino.data import decode_image, generate_synthetic, load_table
    from reddino.features.extract import extract_features, resolve_precision
    from reddino.features.models import resolve_model
    from reddino.features import embed
    from reddino.runtime import init_ray

    n = 540 if args.quick else args.cells
    data = args.data
    if data is None:
        per = max(1, -(-n // (9 * 3)))
        data = WORK_DIR / f"synth_cells_{per}x9x3"
        if not (data / "_manifest.json").is_file():
            generate_synthetic(data, n_per_class=per, sources=3, unit="cell", seed=0, overwrite=True)
    model, info = resolve_model(f"random:{args.arch}", img_size=args.img_size)
    precision = resolve_precision(args.precision, "cpu")
    threads = os.cpu_count() or 1

    init_ray(num_cpus=threads, log_to_driver=False)
    out = WORK_DIR / "embed-out"
    shutil.rmtree(out, ignore_errors=True)
    first: list[float] = []
    t0 = time.perf_counter()
    res = embed((model, info), data, out, batch_size=args.batch_size, precision=precision, progress=False,
                on_shard=lambda name: first.append(time.perf_counter()))
    wall = time.perf_counter() - t0
    rows = res.num_rows
    shard_rows = [s["rows"] for s in res.manifest["shards"]]
    steady = (rows - shard_rows[0]) / (first[-1] - first[0]) if len(first) > 1 else float("nan")
    log(f"reddino embed: {rows:,} rows in {wall:.1f} s = {rows / wall:.1f} img/s whole call; "
        f"{steady:.1f} img/s after the first of {len(shard_rows)} shards")

    images = [decode_image(b) for b in load_table([data], columns=["image"]).column("image").to_pylist()]
    torch.set_num_threads(threads)
    extract_features(model, images[: args.batch_size], args.img_size, args.batch_size, "cpu", precision=precision)
    t0 = time.perf_counter()
    feats = extract_features(model, images, args.img_size, args.batch_size, "cpu", precision=precision)
    base = time.perf_counter() - t0
    log(f"plain torch loop (decoded in advance, warm): {len(images):,} rows in {base:.1f} s = "
        f"{len(images) / base:.1f} img/s")

    from reddino.features import read_embeddings

    table, X, _ = read_embeddings(out)
    same = np.allclose(X, feats, atol=1e-4) if X.shape == feats.shape else False
    log(f"embeddings equal the loop's: {same}")
    whole = (rows / wall) / (len(images) / base)
    ratio_line("embed_vs_torch_loop_whole_call", whole, f">= {GOAL}", whole >= GOAL,
               f"| {rows:,} cells in {wall:.1f} s")
    if len(first) > 1:
        r = steady / (len(images) / base)
        ratio_line("embed_vs_torch_loop_steady", r, f">= {GOAL}", r >= GOAL)
    flush_exit(0 if same else 1)


if __name__ == "__main__":
    main()
