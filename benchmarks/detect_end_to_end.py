"""What detection costs the morphology report: per-smear class fractions from detect → classify against the
fractions of the labels, on the fully labelled Chula smears, next to the same from classifying the labelled crops.

1. Chula RBC-12 is ingested twice: the labelled 80 px crops (``reddino ingest chula``), and the detected cells
   (``reddino ingest chula --unit cell --detect --crop-size 80``: all 738 smears, labels attached where a
   labelled centre matches a detected cell);
2. features for both (``--model handcrafted`` by default: the morphology baseline, no network, so the script runs
   anywhere; ``--model`` takes anything ``reddino evaluate`` takes);
3. grouped 5-fold by smear: a logistic probe is fitted on the labelled crops of the other smears' folds and
   predicts (a) every detected whole cell (not cut by the border) and (b) every labelled crop of the held-out
   smears;
4. on the held-out fully labelled smears (the rule of ``detect_quality.py``: at least 0.8 labelled centres per
   detected interior cell), per class: mean over smears of |predicted fraction - labelled fraction|, for (a) and
   (b). The gap between the two is what the detector costs.

    python benchmarks/detect_end_to_end.py --data /work/shared/data/chula-rbc-12 --workers 2
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import WORK_DIR, log  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "chula-rbc-12"


def _feats_chunk(images: list[bytes]) -> np.ndarray:
    from reddino.features.handcrafted import handcrafted_features

    return handcrafted_features(images)


def features(table: pd.DataFrame, model: str, workers: int, cache: Path) -> np.ndarray:
    if cache.is_file():
        return np.load(cache)
    t = time.perf_counter()
    imgs = table["image"].tolist()
    if model == "handcrafted":
        from concurrent.futures import ProcessPoolExecutor

        chunks = [imgs[i:i + 500] for i in range(0, len(imgs), 500)]
        with ProcessPoolExecutor(max(1, workers)) as pool:
            X = np.concatenate(list(pool.map(_feats_chunk, chunks)))
    else:  # anything `reddino evaluate` takes (an export, a run dir, models:/..., random:<arch>)
        from reddino.features.extract import extract_features
        from reddino.features.models import resolve_model

        net, _ = resolve_model(model)
        X = extract_features(net, imgs)  # at the model's own input size
    log(f"features {X.shape} in {time.perf_counter() - t:.0f} s -> {cache}")
    np.save(cache, X)
    return X


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the chula-rbc-12 folder")
    ap.add_argument("--work", type=Path, default=WORK_DIR / "detect_e2e")
    ap.add_argument("--model", default="handcrafted")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--full-ratio", type=float, default=0.8)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--crops", type=Path, help="an existing `reddino ingest chula` dataset of the labelled crops")
    ap.add_argument("--every", type=int, default=1, help="detect on every k-th labelled smear only (faster)")
    ap.add_argument("--max-train", type=int, default=0, help="at most this many training crops per fold (0: all)")
    args = ap.parse_args()
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from reddino.data import load_table
    from reddino.data.detect_eval import chula_points
    from reddino.data.detect_ingest import parse_cell_id
    from reddino.data.ingest import CHULA_CLASSES, ingest

    args.work.mkdir(parents=True, exist_ok=True)
    crops_dir, det_dir = args.crops or args.work / "crops", args.work / f"detected_every{args.every}"
    t = time.perf_counter()
    if args.crops is None:
        ingest("chula", args.data, crops_dir, workers=args.workers, progress=False)
    src = args.data
    if args.every > 1:  # a Chula-layout folder holding every k-th labelled smear (copies, in the work dir)
        import shutil

        src = args.work / f"chula_every{args.every}"
        stems = sorted((p.stem for p in (args.data / "Label").glob("*.txt")), key=int)[:: args.every]
        for sub in ("Dataset", "Label"):
            (src / sub).mkdir(parents=True, exist_ok=True)
        for st in stems:
            for a, b in ((f"Dataset/{st}.jpg", f"Dataset/{st}.jpg"), (f"Label/{st}.txt", f"Label/{st}.txt")):
                if not (src / b).exists():
                    shutil.copyfile(args.data / a, src / b)
    ingest("chula", src, det_dir, detect=True, detect_crop_size=80, workers=args.workers, progress=False)
    log(f"ingested (or reused) both datasets in {time.perf_counter() - t:.0f} s")
    crops = load_table([crops_dir]).to_pandas()
    det = load_table([det_dir]).to_pandas()
    info = [parse_cell_id(i) for i in det["image_id"]]
    det["cx"] = [d["cx"] for d in info]
    det["cy"] = [d["cy"] for d in info]
    det["border"] = ["border_cut" in d["flags"] for d in info]

    # fully labelled smears (interior cells, as in detect_quality.py)
    full = set()
    for g, rows in det.groupby("group"):
        lab = args.data / "Label" / f"{g}.txt"
        if not lab.is_file():
            continue
        pts, _ = chula_points(lab)
        r = math.sqrt(np.median([parse_cell_id(i)["area"] for i in rows["image_id"]]) / math.pi)
        inner = lambda x, y: (x >= r) & (x < 640 - r) & (y >= r) & (y < 480 - r)  # noqa: E731
        n_lab = int(inner(pts[:, 0], pts[:, 1]).sum())
        n_det = int(inner(rows["cx"].to_numpy(), rows["cy"].to_numpy()).sum())
        if n_det and n_lab >= args.full_ratio * n_det:
            full.add(g)
    log(f"{len(full)} fully labelled smears")
    # features only where they are needed: detected cells of the fully labelled smears, and the crops (all, or a
    # per-fold training subsample plus the fully labelled smears' own crops)
    det = det[det["group"].isin(full)].reset_index(drop=True)
    if args.max_train:
        rng = np.random.default_rng(0)
        keep = crops["group"].isin(full).to_numpy() | (rng.random(len(crops)) < args.max_train * args.folds / max(
            1, (args.folds - 1) * len(crops)))
        crops = crops[keep].reset_index(drop=True)
    import hashlib

    model_tag = args.model if args.model == "handcrafted" else hashlib.sha256(args.model.encode()).hexdigest()[:12]
    tag = f"{model_tag}_every{args.every}_max{args.max_train}"
    Xc = features(crops, args.model, args.workers, args.work / f"X_crops_{tag}.npy")
    Xd = features(det, args.model, args.workers, args.work / f"X_detected_{tag}.npy")

    classes = sorted(CHULA_CLASSES)
    names = [CHULA_CLASSES[c] for c in classes]
    err_det, err_crop, n_smears = [], [], 0
    groups = crops["group"].to_numpy()
    gkf = GroupKFold(n_splits=args.folds)
    for k, (tr, te) in enumerate(gkf.split(Xc, crops["label"], groups)):
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0))
        clf.fit(Xc[tr], crops["label"].to_numpy()[tr])
        test_groups = set(groups[te]) & full
        for g in sorted(test_groups):
            truth = crops.loc[crops["group"] == g, "label"].to_numpy()
            f_true = np.array([(truth == c).mean() for c in classes])
            dm = (det["group"] == g).to_numpy() & ~det["border"].to_numpy()
            cm = (crops["group"] == g).to_numpy()
            if not dm.any():
                continue
            pd_ = clf.predict(Xd[dm])
            pc = clf.predict(Xc[cm])
            err_det.append(np.abs(np.array([(pd_ == c).mean() for c in classes]) - f_true))
            err_crop.append(np.abs(np.array([(pc == c).mean() for c in classes]) - f_true))
            n_smears += 1
        log(f"fold {k + 1}/{args.folds}: {len(test_groups)} fully labelled held-out smears")
    ed, ec = np.mean(err_det, axis=0), np.mean(err_crop, axis=0)
    print(f"\nPer-smear class fractions vs the labels, {n_smears} fully labelled held-out smears, model {args.model}, "
          f"probe on the labelled crops of the other folds' smears ({args.folds} grouped folds)")
    print("| class | MAE detect → classify | MAE classify labelled crops | detector's cost |")
    print("|---|---|---|---|")
    for n, a, b in zip(names, ed, ec):
        print(f"| {n} | {a:.3f} | {b:.3f} | {a - b:+.3f} |")
    print(f"| mean over classes | {ed.mean():.3f} | {ec.mean():.3f} | {ed.mean() - ec.mean():+.3f} |")


if __name__ == "__main__":
    main()
