"""How long does a full frozen-feature evaluation take on CPU? Goal: 20k cells in under 60 s.

Times, on one labelled dataset (synthetic RBC cells unless ``--data DIR``), with the tiny CPU backbone
(random-init ``vit_tiny_patch14_reddino``):

1. feature extraction (Ray Data batch inference by default; ``--no-ray`` for in-process),
2. kNN k = 1 and k = 20 (Euclidean, uniform) over stratified grouped 5-fold CV,
3. the 5-fold logistic-regression probe (RedDino lambda),

then re-reads the features from the cache (a repeated evaluation). Dataset generation is not timed.

    python benchmarks/eval_speed.py            # 20k synthetic cells
    python benchmarks/eval_speed.py --quick    # 540 cells, smoke test
    python benchmarks/eval_speed.py --data /tmp/chula_cells
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

GOAL_S = 60.0


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (1 min) {five:.1f} (5 min) on {os.cpu_count()} cores"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, help="labelled Parquet dataset dir (default: synthetic cells)")
    ap.add_argument("--cells", type=int, default=20000, help="synthetic cells (default 20000)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 540 synthetic cells")
    ap.add_argument("--img-size", type=int, default=56)
    ap.add_argument("--arch", default="vit_tiny_patch14_reddino")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--num-cpus", type=int, default=None)
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                    help="feature extraction precision (default auto: bf16 where native)")
    ap.add_argument("--no-ray", action="store_true", help="extract in process instead of Ray Data")
    ap.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "reddino-eval-bench")
    args = ap.parse_args()

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import numpy as np

    from reddino.evaluate import resolve_model
    from reddino.evaluate.compute import compute_features
    from reddino.evaluate.protocols import run_kfold

    n_cells = 540 if args.quick else args.cells
    data = args.data
    if data is None:
        from reddino.data import generate_synthetic

        per_class = max(1, math.ceil(n_cells / (9 * 3)))
        data = args.work_dir / f"synth_{per_class}x9x3"
        if not (data / "_manifest.json").is_file():
            t = time.perf_counter()
            generate_synthetic(data, n_per_class=per_class, sources=3, unit="cell", seed=0, size=64)
            print(f"generated {per_class * 27} synthetic cells in {time.perf_counter() - t:.1f} s (not timed)")
    cache = args.work_dir / "cache"
    use_ray = not args.no_ray

    if use_ray:
        from reddino.runtime import init_ray

        t = time.perf_counter()
        init_ray(num_cpus=args.num_cpus, log_to_driver=False)
        print(f"ray start: {time.perf_counter() - t:.1f} s (not timed)")

    model, info = resolve_model(f"random:{args.arch}", img_size=args.img_size, seed=0)
    import shutil

    print(f"start: {_load()}")
    shutil.rmtree(cache, ignore_errors=True)  # a cold run: extraction + cache write are timed
    t0, c0 = time.perf_counter(), time.process_time()
    fs = compute_features(model, info, data, img_size=args.img_size, batch_size=args.batch_size,
                          cache_dir=cache, use_ray=use_ray, num_cpus=args.num_cpus, precision=args.precision)
    t_feat = time.perf_counter() - t0
    t = time.perf_counter()
    knn = run_kfold(fs, ["knn1", "knn20"], folds=5, seed=0)
    t_knn = time.perf_counter() - t
    t = time.perf_counter()
    probe = run_kfold(fs, ["probe"], folds=5, seed=0)
    t_probe = time.perf_counter() - t
    total = time.perf_counter() - t0
    cpu = time.process_time() - c0  # this process only: excludes Ray actor processes

    # Re-evaluation: the features come from the cache.
    t = time.perf_counter()
    cached = compute_features(model, info, data, img_size=args.img_size, cache_dir=cache, use_ray=False,
                              precision=fs.meta["precision"])
    t_cached = time.perf_counter() - t
    assert cached.meta["cached"] and np.allclose(cached.features, fs.features, atol=1e-4)

    n = len(fs)
    print(f"cells: {n}  dim: {fs.features.shape[1]}  classes: {len(set(fs.labels.tolist()))}  "
          f"arch: {args.arch} @ {args.img_size}px {fs.meta['precision']}  "
          f"extraction: {'ray data' if use_ray else 'in process'}  "
          f"cpus: {os.cpu_count()}")
    print(f"feature extraction : {t_feat:7.1f} s  ({n / t_feat:,.0f} cells/s)")
    print(f"kNN k=1,20 5-fold  : {t_knn:7.1f} s")
    print(f"probe 5-fold       : {t_probe:7.1f} s")
    print(f"total              : {total:7.1f} s  (driver CPU time {cpu:.1f} s"
          + (", Ray actors not included)" if use_ray else ", all threads)"))
    print(f"cached features    : {t_cached:7.2f} s")
    print(f"end: {_load()} (timings scale with machine load)")
    for name, res in (("knn1", knn), ("knn20", knn), ("probe", probe)):
        ba = res["classifiers"][name]["balanced_accuracy"]
        print(f"  {name:6s} balanced accuracy {100 * ba['mean']:.1f} ± {100 * ba['std']:.1f}")
    scaled = total * (20000 / n)
    note = "" if n == 20000 else f" (linear extrapolation to 20k cells: {scaled:.1f} s)"
    print(f"ratio vs {GOAL_S:.0f} s goal: {scaled / GOAL_S:.2f}x{note}  -> {'OK' if scaled <= GOAL_S else 'SLOWER THAN GOAL'}")


if __name__ == "__main__":
    main()
