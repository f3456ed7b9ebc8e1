"""Cell detection on real smears: how many labelled cells the detector finds, how many of its cells are real, and
how fast it is (issue #32). Prints every number the README's "From smear photos to a morphology report" table
holds, then RATIO lines against the goals.

Chula RBC-12 (labelled centres, 623 images):
  * recall: labelled centres matched one to one to detected cells (centre inside the cell's mask or within half
    the median cell radius of its centroid; Hungarian assignment), over all labelled images, and per class;
  * "fully labelled" images: Chula labels every cell in some images and only the cells of interest in others
    (image 200: the burr cells). Rule: counting only cells whose centre lies at least one cell radius inside the
    image (labellers mark cut cells inconsistently), an image is fully labelled when it has at least
    ``--full-ratio`` (0.8) labelled centres per detected cell. The ratio is bimodal (the script prints its
    histogram), so the cut is not delicate;
  * on those: precision (matched / detected, interior cells), count error |detected - labelled| / labelled per
    image (interior cells), and touching pairs (labelled centres closer than 1.1 cell diameters) split into
    two cells vs merged into one.
BCCD (VOC boxes; not every RBC is boxed): RBC box recall at IoU >= 0.5 (one to one), and how often a white cell
  (IoU >= 0.5 with a detected cell) or a platelet (a detected cell's centre inside its box) is reported as an RBC.
Speed: seconds per smear in one process (decode + detect), smears/s/core, the wall time for all 738 Chula images
  with ``--workers`` processes, and the per-smear cost at two sizes (linear scaling).

    python benchmarks/detect_quality.py                     # everything (~10 min on 2 quiet cores)
    python benchmarks/detect_quality.py --quick             # 30 Chula + 20 BCCD images, smoke test
    python benchmarks/detect_quality.py --data /path/to/shared/data --workers 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import loadavg, log, ratio_line  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _init() -> None:
    import cv2

    cv2.setNumThreads(1)


def _chula_one(args) -> dict:
    from reddino.data.detect import BORDER_CUT, get_detector
    from reddino.data.detect_eval import chula_points, match_centres, touching_pairs
    from reddino.data.images import decode_image_strict

    img_path, label_path, detector, params = args
    t0 = time.perf_counter()
    rgb = decode_image_strict(Path(img_path).read_bytes())
    t1 = time.perf_counter()
    det = get_detector(detector, **params).detect(rgb, keep_labels=label_path is not None)
    t2 = time.perf_counter()
    out = {"image": Path(img_path).stem, "n_cells": det.n, "decode_s": t1 - t0, "detect_s": t2 - t1,
           "radius": det.radius, "dropped": det.dropped}
    if label_path is None:
        return out
    pts, cls = chula_points(label_path)
    m = match_centres(det, pts)
    h, w = rgb.shape[:2]
    r = det.radius or 25.0
    ctr = np.array([[c.cx, c.cy] for c in det.cells]).reshape(-1, 2)
    inner_det = (ctr[:, 0] >= r) & (ctr[:, 0] < w - r) & (ctr[:, 1] >= r) & (ctr[:, 1] < h - r)
    inner_lab = (pts[:, 0] >= r) & (pts[:, 0] < w - r) & (pts[:, 1] >= r) & (pts[:, 1] < h - r)
    matched_cell = np.zeros(det.n, bool)
    matched_cell[m.label_to_cell[m.label_to_cell >= 0]] = True
    pairs, split, merged = touching_pairs(pts, m, 2 * r)
    out.update(
        n_labels=len(pts), matched=m.matched, classes=cls.tolist(), class_matched=(m.label_to_cell >= 0).tolist(),
        inner_labels=int(inner_lab.sum()), inner_cells=int(inner_det.sum()),
        inner_cells_matched=int((inner_det & matched_cell).sum()),
        border_cells=int(sum(BORDER_CUT in c.flags for c in det.cells)), pairs=pairs, split=split, merged=merged,
    )
    return out


def _bccd_one(args) -> dict:
    from reddino.data.detect import get_detector
    from reddino.data.detect_eval import cell_boxes, iou_matrix, match_boxes, voc_boxes
    from reddino.data.images import decode_image_strict

    img_path, xml_path, detector, params = args
    rgb = decode_image_strict(Path(img_path).read_bytes())
    det = get_detector(detector, **params).detect(rgb)
    boxes = voc_boxes(xml_path)
    cb = cell_boxes(det)
    ctr = np.array([[c.cx, c.cy] for c in det.cells]).reshape(-1, 2)
    out = {"image": Path(img_path).stem, "n_cells": det.n}
    rbc = np.array([b for n, b in boxes if n == "RBC"]).reshape(-1, 4)
    out["rbc"], out["rbc_hit"] = len(rbc), int((match_boxes(rbc, cb) >= 0).sum())
    wbc = np.array([b for n, b in boxes if n == "WBC"]).reshape(-1, 4)
    out["wbc"] = len(wbc)
    out["wbc_reported"] = int((iou_matrix(wbc, cb) >= 0.5).any(axis=1).sum()) if len(cb) else 0
    pl = np.array([b for n, b in boxes if n == "Platelets"]).reshape(-1, 4)
    out["platelets"] = len(pl)
    out["platelets_reported"] = int(sum(
        bool(((ctr[:, 0] >= b[0]) & (ctr[:, 0] < b[2]) & (ctr[:, 1] >= b[1]) & (ctr[:, 1] < b[3])).any()) for b in pl))
    return out


def _run(fn, tasks, workers):
    if workers <= 1:
        _init()
        return [fn(t) for t in tasks]
    with ProcessPoolExecutor(workers, initializer=_init) as pool:
        return list(pool.map(fn, tasks, chunksize=4))


def chula(root: Path, args) -> dict:
    from reddino.data.ingest import CHULA_CLASSES

    labels = sorted((root / "Label").glob("*.txt"), key=lambda p: int(p.stem))
    if args.quick:
        labels = labels[:: max(1, len(labels) // 30)][:30]
    if args.images:
        want = set(args.images.split(","))
        labels = [p for p in labels if p.stem in want]
    tasks = [(str(root / "Dataset" / f"{p.stem}.jpg"), str(p), args.detector, args.params) for p in labels]
    if not (args.quick or args.images):  # the unlabelled photos too: this pass is also the wall time for all of them
        have = {p.stem for p in labels}
        tasks += [(str(p), None, args.detector, args.params) for p in sorted((root / "Dataset").glob("*.jpg"))
                  if p.stem not in have]
    t = time.perf_counter()
    res = _run(_chula_one, tasks, args.workers)
    wall = time.perf_counter() - t
    print(f"all {len(res)} Chula photos (decode + detect + scoring), {args.workers} worker(s): {wall:.1f} s wall, "
          f"{sum(r['n_cells'] for r in res):,} cells | {loadavg()}")
    res = [r for r in res if "n_labels" in r]
    n_lab = sum(r["n_labels"] for r in res)
    n_hit = sum(r["matched"] for r in res)
    recall = n_hit / n_lab
    no12 = [r for r in res if 12 not in r["classes"]]
    print(f"Chula recall (all {len(res)} labelled images): {recall:.4f} = {n_hit}/{n_lab} labelled centres matched "
          f"one to one ({n_lab - n_hit} missed)")
    print(f"  without the images holding class 12 (elliptocyte source): "
          f"{sum(r['matched'] for r in no12) / max(1, sum(r['n_labels'] for r in no12)):.4f}")
    per = {}
    for r in res:
        for c, ok in zip(r["classes"], r["class_matched"]):
            a = per.setdefault(c, [0, 0])
            a[0] += 1
            a[1] += ok
    print("  per class: " + ", ".join(f"{CHULA_CLASSES.get(c, c)} {a[1] / a[0]:.3f} ({a[0] - a[1]} missed of {a[0]})"
                                      for c, a in sorted(per.items())))
    ratio = np.array([r["inner_labels"] / max(1, r["inner_cells"]) for r in res])
    hist, edges = np.histogram(np.clip(ratio, 0, 1.99), bins=[0, .2, .4, .6, .7, .8, .9, 1.0, 1.1, 1.3, 2.0])
    print("  labelled/detected interior cells per image, histogram: "
          + ", ".join(f"[{a:.1f},{b:.1f}): {n}" for a, b, n in zip(edges[:-1], edges[1:], hist)))
    for cut in (0.7, 0.8, 0.9, 0.95):  # precision at stricter cuts: how much of the gap is unlabelled cells
        sel = [r for r, q in zip(res, ratio) if q >= cut]
        p = sum(r["inner_cells_matched"] for r in sel) / max(1, sum(r["inner_cells"] for r in sel))
        print(f"  images with ratio >= {cut}: {len(sel)}, precision there {p:.4f}")
    full = [r for r, q in zip(res, ratio) if q >= args.full_ratio]
    prec_img = np.array([r["inner_cells_matched"] / max(1, r["inner_cells"]) for r in full])
    prec = sum(r["inner_cells_matched"] for r in full) / max(1, sum(r["inner_cells"] for r in full))
    cerr = np.array([abs(r["inner_cells"] - r["inner_labels"]) / max(1, r["inner_labels"]) for r in full])
    rec_full = sum(r["matched"] for r in full) / max(1, sum(r["n_labels"] for r in full))
    pairs, split, merged = (sum(r[k] for r in full) for k in ("pairs", "split", "merged"))
    print(f"Fully labelled images (ratio >= {args.full_ratio}): {len(full)} of {len(res)}, "
          f"{sum(r['n_labels'] for r in full)} labelled cells")
    print(f"  precision (interior cells): {prec:.4f} pooled, per-image median {np.median(prec_img):.4f}")
    print(f"  recall there: {rec_full:.4f}")
    print(f"  count error per image (interior cells): median {np.median(cerr):.4f}, mean {cerr.mean():.4f}, "
          f"90th pct {np.percentile(cerr, 90):.4f}")
    print(f"  touching pairs (centres < 1.1 diameters apart): {pairs}: split {split} ({split / max(1, pairs):.3f}), "
          f"merged {merged} ({merged / max(1, pairs):.3f}), rest: a centre unmatched")
    det_s = [r["detect_s"] for r in res]
    return {"wall_all": wall, "photos": len(tasks), "recall": recall, "full": len(full), "precision": prec, "count_err_median": float(np.median(cerr)),
            "pairs": pairs, "split": split, "merged": merged, "detect_s_median": float(np.median(det_s))}


def bccd(root: Path, args) -> dict:
    xmls = sorted((root / "Annotations").glob("*.xml"))
    if args.quick:
        xmls = xmls[:: max(1, len(xmls) // 20)][:20]
    tasks = [(str(root / "JPEGImages" / f"{x.stem}.jpg"), str(x), args.detector, args.params) for x in xmls
             if (root / "JPEGImages" / f"{x.stem}.jpg").is_file()]
    res = _run(_bccd_one, tasks, args.workers)
    tot = {k: sum(r[k] for r in res) for k in ("rbc", "rbc_hit", "wbc", "wbc_reported", "platelets", "platelets_reported")}
    recall = tot["rbc_hit"] / max(1, tot["rbc"])
    print(f"BCCD ({len(res)} images): RBC box recall at IoU >= 0.5: {recall:.4f} = {tot['rbc_hit']}/{tot['rbc']}")
    print(f"  white cells reported as an RBC (IoU >= 0.5): {tot['wbc_reported']}/{tot['wbc']} "
          f"({tot['wbc_reported'] / max(1, tot['wbc']):.3f}); platelets (a cell centre in the box): "
          f"{tot['platelets_reported']}/{tot['platelets']} ({tot['platelets_reported'] / max(1, tot['platelets']):.3f})")
    return {"recall": recall, **tot}


def speed(root: Path, args) -> dict:
    imgs = sorted((root / "Dataset").glob("*.jpg"), key=lambda p: int(p.stem))
    small, large = (10, 40) if args.quick else args.speed_sizes
    per = {}
    for n in (small, large):
        tasks = [(str(p), None, args.detector, args.params) for p in imgs[:n]]
        t, c = time.perf_counter(), time.process_time()
        _run(_chula_one, tasks, 1)
        wall = (time.perf_counter() - t) / n
        per[n] = (time.process_time() - c) / n  # CPU time: what a core spends, whatever else runs on the machine
        print(f"speed: {n} smears in one process: {per[n] * n:.1f} CPU s = {per[n]:.3f} CPU s/smear = "
              f"{1 / per[n]:.2f} smears/s/core (wall {wall * n:.1f} s) | {loadavg()}")
    lin = per[large] / per[small]
    print(f"  per-smear cost at {large} vs {small} smears: x{lin:.3f} (1.0 = linear)")
    wall = None
    return {"s_per_smear": per[large], "smears_per_s_core": 1 / per[large], "linear": lin, "wall_all": wall}


def _big_child(root: str, side: int, detector: str, params: dict, q) -> None:
    import resource

    import cv2

    from reddino.data.detect import ClassicalParams, get_detector
    from reddino.data.images import decode_image_strict

    cv2.setNumThreads(1)
    imgs = [decode_image_strict((Path(root) / "Dataset" / f"{n}.jpg").read_bytes()) for n in range(1, 41)]
    h, w = imgs[0].shape[:2]
    big = np.empty((side, side, 3), np.uint8)  # a mosaic of Chula smears, side x side
    k = 0
    for y in range(0, side, h):
        for x in range(0, side, w):
            tile = imgs[k % len(imgs)]
            k += 1
            big[y:y + h, x:x + w] = tile[: side - y, : side - x]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    det = get_detector(detector, **params).detect(big)
    q.put({"side": side, "cells": det.n, "seconds": time.perf_counter() - t, "rss_before_mb": base,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "image_mb": big.nbytes / 2**20,
           "tiles": params.get("tile", ClassicalParams.tile), "mosaic_smears": k})


def big_image(root: Path, args) -> dict:
    """One side x side image (a mosaic of Chula smears) in a fresh process: time, cells, peak memory."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_big_child, args=(str(root), args.big, args.detector, args.params, q))
    p.start()
    res = q.get()
    p.join()
    print(f"big image {res['side']}x{res['side']} ({res['mosaic_smears']} Chula smears as a mosaic, "
          f"{res['image_mb']:.0f} MB of pixels): {res['cells']} cells in {res['seconds']:.1f} s "
          f"({res['cells'] / res['seconds']:.0f} cells/s); peak RSS {res['peak_rss_mb']:.0f} MB "
          f"(decode + mosaic before detection: {res['rss_before_mb']:.0f} MB) | {loadavg()}")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder holding chula-rbc-12/ and bccd/")
    ap.add_argument("--detector", default="classical")
    ap.add_argument("--params", type=json.loads, default={}, help="detector parameters as JSON")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--full-ratio", type=float, default=0.8)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--images", help="Chula only these image ids (comma-separated)")
    ap.add_argument("--chula-only", action="store_true", help="skip BCCD and speed")
    ap.add_argument("--speed-only", action="store_true", help="only the speed measurement")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--speed-sizes", type=lambda t: tuple(int(v) for v in t.split(",")), default=(100, 400),
                    help="the two numbers of smears timed in one process")
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    ap.add_argument("--big", type=int, default=0, help="also detect on one BIG x BIG mosaic (e.g. 10000): memory, time")
    ap.add_argument("--big-only", action="store_true", help="only the --big measurement")
    args = ap.parse_args()
    ch, bc = args.data / "chula-rbc-12", args.data / "bccd" / "BCCD"
    if not ch.is_dir() or not bc.is_dir():
        print(f"data not found under {args.data} (need chula-rbc-12/ and bccd/BCCD/): pass --data", file=sys.stderr)
        sys.exit(2)
    print(f"== detect_quality | detector {args.detector} {args.params or ''} | {os.cpu_count()} cores | {loadavg()}")
    if args.big_only:
        big_image(ch, args)
        return
    if args.speed_only:
        speed(ch, args)
        return
    res = {"chula": chula(ch, args)}
    if args.chula_only:
        return
    res["bccd"] = bccd(bc, args)
    if args.big:
        res["big"] = big_image(ch, args)
    if not args.skip_speed:
        res["speed"] = speed(ch, args)
    c, b = res["chula"], res["bccd"]
    ratio_line("chula_recall", c["recall"], ">= 0.97", c["recall"] >= 0.97)
    ratio_line("chula_precision_full", c["precision"], ">= 0.95", c["precision"] >= 0.95, f"({c['full']} fully labelled images)")
    ratio_line("chula_count_error_median", c["count_err_median"], "<= 0.05", c["count_err_median"] <= 0.05)
    ratio_line("bccd_rbc_recall_iou50", b["recall"], ">= 0.90", b["recall"] >= 0.90)
    if "speed" in res:
        s = res["speed"]
        ratio_line("per_smear_cost_large_vs_small", s["linear"], "~1 (linear)", None)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
