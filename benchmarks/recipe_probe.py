"""Does a pretraining recipe learn? A minutes-scale check on labelled cells, without Ray. Goal: ratio >= 1.

Runs the recipe's own pieces in one process: the model (``DINOv2SSL.from_config``), the training step
(``reddino.train.step.TrainStep``: schedules, forward, backward, clip, AdamW, teacher EMA) and the augmentation
(``MultiCropTransform`` of the config's policy) on rows of a reddino cell dataset (labels never reach training),
and every ``--eval-every`` steps scores the teacher's frozen CLS on a fixed random subset of the labelled cells
with the README protocol's folds and classifiers (5-fold grouped by smear, kNN-20 balanced accuracy, RankMe).
The RATIO is the last kNN-20 over the random-init kNN-20 of the same model: above 1 the recipe learns something
a kNN can use. A sweep trial answers the same question through Ray in 3-5x the wall time; this is for deciding
what is worth a sweep.

    python benchmarks/recipe_probe.py --data data/chula-cells                       # tiny_cpu, 600 steps
    python benchmarks/recipe_probe.py --data data/chula-cells --steps 400 loss.koleo_weight=0 \\
        crops.local_crops_number=0                                                   # any run-config override
    python benchmarks/recipe_probe.py --quick                                        # smoke test (synthetic)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import WORK_DIR, flush_exit, header, log, ratio_line  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="tiny_cpu", help="run config name or YAML")
    ap.add_argument("--data", help="labelled reddino cell dataset dir (e.g. data/chula-cells)")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--eval-n", type=int, default=6000, help="labelled cells scored (fixed random subset)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (CPUs with native bf16: ~15%% faster)")
    ap.add_argument("--quick", action="store_true", help="smoke test: synthetic cells, 6 steps")
    ap.add_argument("overrides", nargs="*", help="key=value run-config overrides")
    args = ap.parse_args()

    import numpy as np
    import pandas as pd
    import torch
    from sklearn.metrics import balanced_accuracy_score

    from reddino.config import load_config
    from reddino.data.augment import MultiCropTransform
    from reddino.data.images import normalize_chw, resize_square, to_rgb_image
    from reddino.evaluate.protocols import fit_predict, make_folds
    from reddino.model import DINOv2SSL, rankme
    from reddino.model.backbone import backbone_tokens
    from reddino.train.schedules import build_schedules
    from reddino.train.step import TrainStep

    header("recipe_probe")
    overrides = list(args.overrides)
    if args.quick:
        from reddino.data import generate_synthetic

        data = WORK_DIR / "recipe_probe_cells"
        if not (data / "_manifest.json").is_file():
            generate_synthetic(data, n_per_class=12, sources=3, unit="cell", seed=0, overwrite=True)
        args.steps, args.eval_every, args.eval_n = 6, 3, 300
        overrides += ["model.head_prototypes=64", "train.batch_size_per_worker=8"]
    elif not args.data:
        ap.error("--data is required (a labelled cell dataset), or --quick")
    else:
        data = Path(args.data)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ipe = 100
    cfg = load_config(args.config, [f"train.epochs={max(1, -(-args.steps // ipe))}", f"train.iters_per_epoch={ipe}",
                                    *overrides])
    steps = min(args.steps, cfg.total_steps)
    df = pd.read_parquet(data, columns=["image", "sha256", "label", "group"])
    rng = np.random.default_rng(0)
    ev = np.sort(rng.choice(len(df), size=min(args.eval_n, len(df)), replace=False))
    size = cfg.model.img_size
    x_eval = normalize_chw(np.stack([resize_square(to_rgb_image(df.image.iloc[i]), size) for i in ev]))
    y, groups = df.label.values[ev], df.group.values[ev]
    folds, _ = make_folds(y, groups, 5, 0, True)

    model = DINOv2SSL.from_config(cfg.model, cfg.loss)
    batch = cfg.train.batch_size_per_worker
    optimizer = torch.optim.AdamW(model.param_groups(cfg.optim), lr=0.0, betas=tuple(cfg.optim.betas))
    step = TrainStep(model, optimizer, build_schedules(cfg, batch), cfg, autocast=args.bf16)
    transform = MultiCropTransform(cfg.crops, cfg.mask, model.patch_size, cfg.data.resize, seed=cfg.train.seed)
    images, shas = df.image.values, df.sha256.values
    order = rng.permutation(len(df))

    @torch.no_grad()
    def score() -> tuple[float, float]:
        backbone = model.teacher["backbone"]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            feats = torch.cat([backbone_tokens(backbone, torch.from_numpy(x_eval[i:i + 256]))["cls"].float()
                               for i in range(0, len(x_eval), 256)]).numpy()
        knn = np.mean([balanced_accuracy_score(y[te], fit_predict("knn20", feats[tr], y[tr], feats[te]))
                       for tr, te in folds])
        return float(knn), float(rankme(torch.from_numpy(feats)))

    pos = 0

    def next_batch() -> dict:
        nonlocal pos
        idx = order[np.arange(pos, pos + batch) % len(order)]
        out = transform({"image": images[idx], "sha256": shas[idx]}, epoch=pos // len(order))
        pos += batch
        return {k: torch.from_numpy(v) for k, v in out.items() if k != "sha256"}

    knn0, rank0 = score()
    log(f"{cfg.name} {' '.join(args.overrides)}: step 0 kNN-20 {knn0:.3f} RankMe {rank0:.1f} "
        f"({len(ev)} cells, 5-fold grouped)")
    t0, knn = time.perf_counter(), knn0
    model.train()
    for i in range(steps):
        res = step(i, next_batch)
        if not res.finite:
            log(f"non-finite loss at step {i}: {res.parts}")
            flush_exit(1)
        if (i + 1) % args.eval_every == 0 or i + 1 == steps:
            knn, rank = score()
            model.train()
            ips = (i + 1) * batch / (time.perf_counter() - t0)
            log(f"step {i + 1}: loss {res.loss:.3f} kNN-20 {knn:.3f} RankMe {rank:.1f} ({ips:.1f} img/s with evals)")
    ratio_line("recipe_probe kNN-20 trained/random init", knn / knn0, ">= 1", knn >= knn0,
               f"[{knn:.3f} vs {knn0:.3f} after {steps} steps x {batch}, {(time.perf_counter() - t0) / 60:.1f} min]")
    flush_exit(0)


if __name__ == "__main__":
    main()
