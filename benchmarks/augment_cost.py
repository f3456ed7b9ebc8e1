"""CPU cost per image of the multi-crop augmentation, stage by stage, against the official DINOv2 augmentation.

Milliseconds of CPU per image (thread CPU time, ``time.thread_time_ns``, so the numbers do not depend on the
machine's load; one thread: cv2, torch and BLAS are pinned to 1) for each stage — read, decode, crop + resize,
flips / rotations, colour, blur, solarize, normalise, masks, collation, transfer — of the crops of a preset
(default ``reddino_vits14``: 2 × 224 + 1 × 98, iBOT masks on the globals) on the same images (real Chula smear
patches from a reddino Parquet dataset) with fixed seeds, for:

* **official**: DINOv2's ``DataAugmentationDINO`` recipe, torchvision transforms on PIL images with the same crop
  sizes and scales (RandomResizedCrop bicubic, flip, ColorJitter p 0.8 + RandomGrayscale 0.2, GaussianBlur 9 with
  p 1.0 / 0.1 / 0.5, RandomSolarize 0.2 on global crop 2, ToTensor + Normalize per crop), images read as files
  and decoded by PIL, float crops collated by ``torch.stack`` and moved to the trainer.
* **reddino dinov2**: ``crops.policy=dinov2``, the same recipe (equal in distribution:
  ``tests/test_fastaug.py``) as :mod:`reddino.data.fastaug` applies it: cv2 on uint8, decoded by cv2, uint8
  crops shipped, normalised on the training device.
* **reddino dinov2 (albumentations)**: the recipe as albumentations ops (reddino's ``dinov2`` policy before
  fastaug), for the per-op choice.
* **reddino rbc**: the preset's own ``rbc`` policy (RedDino: crop → 4 of 33 albumentations pixel transforms → flips
  / 90° rotations; its costliest ops as :mod:`reddino.data.rbcfast`'s equals, each transform called through
  ``rbcfast.run`` as ``MultiCropTransform`` calls it); a different distribution from the official recipe, printed
  for what the shipped recipe costs.
* **rbc (albumentations)**: the same policy with all 33 transforms albumentations' own (before rbcfast), for the
  per-op choice.
* **reddino on_device (worker side)**: ``crops.on_device=true``: the data worker reads, decodes, draws the crop
  parameters and masks and ships the decoded image; the crops are made on the training device
  (``fastaug.augment_on_device``), whose CPU cost *if run on a CPU* is printed as the work that left the workers.
* **on_device, tiff-zstd**: the same, the images stored as ``reddino ingest --encode tiff-zstd`` stores them (the
  same pixels, re-encoded here and checked equal; read = a Parquet file of them written as shards are).

Each column first runs on 8 images untimed, and every rbc pixel op once (first calls: lazy imports and set-up,
once per data worker). Then the columns take turns on ``--rounds`` chunks of the images (default 4, the order
reversed every other round), so a load change during the run reaches every column alike. Per stage
the same op runs on the same image: read = the encoded bytes (a file for official, the Parquet column
for reddino); transfer = serialising the collated batch and reading it back (one copy each way: the worker →
trainer hop of a DataLoader's shared memory or Ray's object store); masks = reddino's block masks for every side
(the official MaskingGenerator is the same algorithm). RATIOs: official / reddino dinov2 and official / reddino rbc
CPU ms per image (goal >= 3, i.e. <= 1/3 of the official cost); on_device worker side goal <= 2 ms per image (with
the images as stored and as tiff-zstd).

    python benchmarks/augment_cost.py --data data/chula-patches            # 256 images, ~1 min
    python benchmarks/augment_cost.py --quick                              # 16 synthetic images, tiny_cpu crops
    python benchmarks/augment_cost.py --data data/chula-patches --per-op   # + each rbcfast op vs albumentations,
                                                                           #   and all 33 pick ops as run
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
import sys
import time
from collections import defaultdict
from pathlib import Path

for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import WORK_DIR, header, log, ratio_line, reencoded, synthetic_patches  # noqa: E402

STAGES = ("read", "decode", "crop+resize", "flip/rotate", "colour", "rbc pixel pick", "blur", "solarize",
          "normalise", "params", "masks", "collation", "transfer")
GOAL_RATIO = 3.0
GOAL_DEVICE_MS = 2.0
WARM_UP = 8  # images each column runs untimed first
PER_OP_IMAGES = 32


class Clock:
    """Accumulates thread CPU ns per stage."""

    def __init__(self) -> None:
        self.ns: dict[str, int] = defaultdict(int)

    def __call__(self, stage: str, fn, *args):
        t0 = time.thread_time_ns()
        out = fn(*args)
        self.ns[stage] += time.thread_time_ns() - t0
        return out

    def ms_per_image(self, n: int) -> dict[str, float]:
        return {k: v / 1e6 / n for k, v in self.ns.items()}


def _transfer(batch) -> None:
    pickle.loads(pickle.dumps(batch, protocol=5))


# --------------------------------------------------------------------------------------------------------------
# official DINOv2 (torchvision on PIL)
# --------------------------------------------------------------------------------------------------------------


def official(files: list[str], crops, masks_fn, batch: int, seed: int) -> dict[str, float]:
    import torch
    from PIL import Image
    from torchvision import transforms as T

    torch.manual_seed(seed)
    gs, ls = crops.global_crops_size, crops.local_crops_size
    rrc_g = T.RandomResizedCrop(gs, scale=tuple(crops.global_crops_scale), interpolation=T.InterpolationMode.BICUBIC)
    rrc_l = T.RandomResizedCrop(ls, scale=tuple(crops.local_crops_scale), interpolation=T.InterpolationMode.BICUBIC)
    flip = T.RandomHorizontalFlip(p=0.5)
    colour = T.Compose([T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), T.RandomGrayscale(p=0.2)])
    blur = {p: T.RandomApply([T.GaussianBlur(9, sigma=(0.1, 2.0))], p=p) for p in (1.0, 0.1, 0.5)}
    solar = T.RandomSolarize(threshold=128, p=0.2)
    norm = T.Compose([T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    clock, rows = Clock(), []
    for i, f in enumerate(files):
        def read(f=f):
            with open(f, "rb") as fh:
                return fh.read()
        data = clock("read", read)
        img = clock("decode", lambda: Image.open(io.BytesIO(data)).convert("RGB"))
        out_g, out_l = [], []
        for k in range(crops.global_crops_number + crops.local_crops_number):
            is_g = k < crops.global_crops_number
            c = clock("crop+resize", rrc_g if is_g else rrc_l, img)
            c = clock("flip/rotate", flip, c)
            c = clock("colour", colour, c)
            c = clock("blur", blur[(1.0 if k % 2 == 0 else 0.1) if is_g else 0.5], c)
            if is_g and k % 2 == 1:
                c = clock("solarize", solar, c)
            (out_g if is_g else out_l).append(clock("normalise", norm, c))
        m = clock("masks", masks_fn, i)
        rows.append((out_g, out_l, m))
        if len(rows) == batch or i == len(files) - 1:
            def collate(rows=rows):
                g = torch.stack([torch.stack(r[0]) for r in rows])
                loc = torch.stack([torch.stack(r[1]) for r in rows]) if rows[0][1] else None
                return {"global_crops": g, "local_crops": loc, "masks": torch.from_numpy(__import__("numpy").stack(
                    [r[2] for r in rows]))}
            b = clock("collation", collate)
            clock("transfer", _transfer, b)
            rows = []
    return clock.ms_per_image(len(files))


# --------------------------------------------------------------------------------------------------------------
# reddino
# --------------------------------------------------------------------------------------------------------------


def _albumentations_dinov2(crops):
    """reddino's dinov2 policy before fastaug (albumentations), kept here for the per-op comparison."""
    import albumentations as A
    import cv2

    def pipe(size, scale, blur_p, solar_p):
        ts = [A.RandomResizedCrop(size=(size, size), scale=tuple(scale), interpolation=cv2.INTER_CUBIC, p=1.0),
              A.HorizontalFlip(p=0.5),
              A.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, p=0.8),
              A.ToGray(num_output_channels=3, p=0.2),
              A.GaussianBlur(blur_limit=(9, 9), sigma_limit=(0.1, 2.0), p=blur_p)]
        if solar_p:
            ts.append(A.Solarize(threshold_range=(0.5, 0.5), p=solar_p))
        return A.Compose(ts, p=1.0, is_check_shapes=False, seed=0)

    G = crops.global_crops_number
    return ([pipe(crops.global_crops_size, crops.global_crops_scale, 1.0 if i % 2 == 0 else 0.1,
                  0.0 if i % 2 == 0 else 0.2) for i in range(G)]
            + [pipe(crops.local_crops_size, crops.local_crops_scale, 0.5, 0.0)] * crops.local_crops_number)


_ALB_STAGE = {"RandomResizedCrop": "crop+resize", "HorizontalFlip": "flip/rotate", "VerticalFlip": "flip/rotate",
              "RandomRotate90": "flip/rotate", "ColorJitter": "colour", "ToGray": "colour",
              "GaussianBlur": "blur", "Solarize": "solarize", "SomeOf": "rbc pixel pick", "FlipsRotate": "flip/rotate"}


def reddino(blobs: list[bytes], shas: list[str], cfg, mode: str, masks_fn, batch: int) -> dict[str, float]:
    """mode: dinov2 (fastaug on CPU) | albumentations (dinov2 recipe) | rbc | rbc_albumentations | on_device
    (worker side; on_device_tiff: the same on tiff-zstd bytes)."""
    import random

    import cv2
    import numpy as np

    from reddino.data import fastaug as fa
    from reddino.data import rbcfast
    from reddino.data.augment import MultiCropTransform, build_rbc
    from reddino.data.images import decode_for_size, resize_square

    c = cfg.crops
    if mode == "on_device_tiff":
        mode = "on_device"  # the same work; only the bytes differ
    policy = {"dinov2": "dinov2", "albumentations": "rbc", "rbc": "rbc", "rbc_albumentations": "rbc",
              "on_device": "dinov2"}[mode]
    t = MultiCropTransform(c.model_copy(update={"policy": policy}), cfg.mask, 14, resize=cfg.data.resize,
                           seed=cfg.train.seed, normalize=False)
    if mode == "rbc_albumentations":
        t.pipelines = build_rbc(c.model_copy(update={"policy": "rbc"}), fast=False)
    pipes = _albumentations_dinov2(c) if mode == "albumentations" else (
        t.pipelines.global_crops + [t.pipelines.local_crops] * c.local_crops_number if policy == "rbc" else None)
    recipes = fa.dinov2_recipes(c)
    clock, rows = Clock(), []
    for i, blob in enumerate(blobs):
        seed = t.row_seed(shas[i], 0)
        rng = np.random.default_rng(seed)
        img = clock("decode", lambda: resize_square(decode_for_size(blob, cfg.data.resize), cfg.data.resize))
        if mode in ("dinov2", "on_device"):
            p = clock("params", fa.draw_params, rng, img.shape[0], img.shape[1], recipes)
        out = []
        if mode == "dinov2":
            for k, r in enumerate(recipes):
                x = clock("crop+resize", fa.crop_resize_cpu, img, np.where(np.arange(fa.N_PARAMS) == fa.FLIP, 0,
                                                                           p[k]), r.size)
                if p[k, fa.FLIP]:
                    x = clock("flip/rotate", cv2.flip, x, 1)
                x = clock("colour", fa.colour_cpu, x, p[k])
                x = clock("blur", fa.blur_cpu, x, p[k])
                out.append(clock("solarize", fa.solarize_cpu, x, p[k]))
        elif mode in ("albumentations", "rbc_albumentations"):  # albumentations' own calls
            py = random.Random(seed)
            for pipe in pipes:
                pipe.set_random_state(rng, py)
                x = img
                for tr in pipe.transforms:
                    x = clock(_ALB_STAGE[type(tr).__name__], lambda tr=tr, x=x: tr(image=x)["image"])
                out.append(x)
        elif mode == "rbc":  # as MultiCropTransform runs it: rbcfast.run (same draws and pixels, less plumbing)
            py = random.Random(seed)
            for pipe in pipes:
                clock("rbc pixel pick", rbcfast.set_random_state, pipe, rng, py)
                pipe.py_random.random()  # Compose's own draw, which rbcfast.run(pipe) would make
                x = img
                for tr in rbcfast.compose_steps(pipe):  # the steps rbcfast.run(pipe) runs (flips + rotation as one)
                    x = clock(_ALB_STAGE[type(tr).__name__], rbcfast.run, tr, x)
                out.append(x)
        m = clock("masks", masks_fn, i)
        rows.append((out, m) if mode != "on_device" else ((img, p), m))
        if len(rows) == batch or i == len(blobs) - 1:
            def collate(rows=rows):
                G = c.global_crops_number
                if mode == "on_device":
                    return {"images": np.stack([r[0][0] for r in rows]), "crop_params": np.stack([r[0][1] for r in rows]),
                            "masks": np.stack([r[1] for r in rows])}
                b = {"global_crops": np.stack([np.stack(r[0][:G]) for r in rows]), "masks": np.stack([r[1] for r in rows])}
                if c.local_crops_number:
                    b["local_crops"] = np.stack([np.stack(r[0][G:]) for r in rows])
                return b
            b = clock("collation", collate)
            clock("transfer", _transfer, b)
            rows = []
    # read: the Parquet image column, per image (the whole table's read / rows)
    return clock.ms_per_image(len(blobs))


def per_op(blobs: list[bytes], cfg) -> None:
    """ms of CPU per call of each op :mod:`reddino.data.rbcfast` replaces, albumentations' and rbcfast's, at the
    global and local crop sizes, same images and seeds; and whether their outputs are the same."""
    import random

    import albumentations as A
    import cv2
    import numpy as np

    from reddino.data.images import decode_for_size, resize_square
    from reddino.data.rbcfast import FAST, IN_DISTRIBUTION

    c = cfg.crops
    imgs = [resize_square(decode_for_size(b, cfg.data.resize), cfg.data.resize) for b in blobs[:PER_OP_IMAGES]]
    print(f"\nper op, ms of CPU per call (p=1, {len(imgs)} images, same seeds): albumentations -> rbcfast")
    for name, fast in FAST.items():
        row, same = [], True
        for size in (c.global_crops_size, c.local_crops_size):
            sized = [cv2.resize(im, (size, size), interpolation=cv2.INTER_AREA) for im in imgs]
            outs = {}
            for label, cls in (("alb", getattr(A, name)), ("fast", fast)):
                t, ns, outs[label] = cls(p=1.0), 0, []
                for k, im in enumerate(sized):
                    t.set_random_state(np.random.default_rng(k), random.Random(k))
                    t0 = time.thread_time_ns()
                    outs[label].append(t(image=im)["image"])
                    ns += time.thread_time_ns() - t0
                row.append(ns / 1e6 / len(sized))
            same &= all(np.array_equal(a, b) for a, b in zip(outs["alb"], outs["fast"]))
        verdict = "yes" if same else ("no (equal in distribution)" if name in IN_DISTRIBUTION else "no")
        print(f"  {name:16s} {c.global_crops_size} px {row[0]:7.3f} -> {row[1]:6.3f}   {c.local_crops_size} px "
              f"{row[2]:7.3f} -> {row[3]:6.3f}   same pixels: {verdict}")
    pick_profile(imgs, cfg)


def pick_profile(imgs, cfg) -> None:
    """ms of CPU per call of each of the rbc policy's 33 pixel ops as the policy runs them (rbcfast's where it has
    one, through ``rbcfast.run``), at both crop sizes, and its share of the pick's cost per image: ms per call at
    each crop size x crops of that size x rbc_pick x rbc_p / 33."""
    import random

    import cv2
    import numpy as np

    from reddino.data.augment import RBC_TRANSFORMS, rbc_pixel_transforms
    from reddino.data.rbcfast import run

    c = cfg.crops
    sizes = (c.global_crops_size, c.local_crops_size)
    ms: dict[str, list[float]] = {name: [] for name in RBC_TRANSFORMS}
    for size in sizes:
        sized = [cv2.resize(im, (size, size), interpolation=cv2.INTER_AREA) for im in imgs]
        for name, t in zip(RBC_TRANSFORMS, rbc_pixel_transforms(1.0)):
            ns = 0
            for k, im in enumerate(sized):
                t.set_random_state(np.random.default_rng(k), random.Random(k))
                t0 = time.thread_time_ns()
                run(t, im)
                ns += time.thread_time_ns() - t0
            ms[name].append(ns / 1e6 / len(sized))
    weight = min(c.rbc_pick, len(RBC_TRANSFORMS)) * c.rbc_p / len(RBC_TRANSFORMS)
    share = {n: weight * (v[0] * c.global_crops_number + v[1] * c.local_crops_number) for n, v in ms.items()}
    print(f"\nthe pick's 33 ops as the policy runs them, ms of CPU per call (p=1, {len(imgs)} images) and ms per image "
          f"of the pick (sum {sum(share.values()):.3f}):")
    for n in sorted(share, key=share.get, reverse=True):
        print(f"  {n:24s} {sizes[0]} px {ms[n][0]:7.3f}   {sizes[1]} px {ms[n][1]:7.3f}   per image {share[n]:6.3f}")


def warm_rbc_ops(blob: bytes, cfg) -> None:
    """Every rbc pixel op, rbcfast's and albumentations', once at each crop size: the warm-up images draw only
    some, and an op's first call (lazy imports, set-up) would land in whichever column draws it first."""
    import cv2

    from reddino.data.augment import rbc_pixel_transforms
    from reddino.data.images import decode_for_size, resize_square

    img = resize_square(decode_for_size(blob, cfg.data.resize), cfg.data.resize)
    for size in (cfg.crops.global_crops_size, cfg.crops.local_crops_size):
        crop = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
        for fast in (True, False):
            for t in rbc_pixel_transforms(1.0, fast):
                t(image=crop)


def tiff_zstd_copy(blobs: list[bytes]) -> tuple[list[bytes], Path]:
    """The images re-encoded as tiff-zstd (pixels checked equal) and a Parquet file of them written as shards are."""
    import hashlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    out = reencoded(blobs, "tiff-zstd")
    path = WORK_DIR / f"augcost_tiff_zstd_{len(out)}.parquet"
    pq.write_table(pa.table({"image": out, "sha256": [hashlib.sha256(t).hexdigest() for t in out]}), path,
                   compression="zstd")
    return out, path


def parquet_read_ms(files: list[str], n: int) -> float:
    import pyarrow.parquet as pq

    t0 = time.thread_time_ns()
    rows = 0
    for f in files:
        rows += pq.read_table(f, columns=["image", "sha256"]).num_rows
        if rows >= n:
            break
    return (time.thread_time_ns() - t0) / 1e6 / rows


def device_side_ms(blobs, shas, cfg, batch: int) -> float:
    """CPU ms per image of fastaug.augment_on_device run on this CPU (1 thread): the work that left the workers."""
    import torch

    from reddino.data import fastaug as fa
    from reddino.data.augment import MultiCropTransform

    c = cfg.crops.model_copy(update={"policy": "dinov2", "on_device": True})
    t = MultiCropTransform(c, cfg.mask, 14, resize=cfg.data.resize, seed=cfg.train.seed)
    out = t({"image": blobs[:batch], "sha256": shas[:batch]})
    imgs, params = torch.from_numpy(out["images"]), torch.from_numpy(out["crop_params"])
    t0 = time.thread_time_ns()
    fa.augment_on_device(imgs, params, fa.dinov2_recipes(c), c.global_crops_number, "cpu")
    return (time.thread_time_ns() - t0) / 1e6 / len(imgs)


def load_images(data: Path, n: int, unit: str | None):
    import pyarrow.compute as pc
    import pyarrow.dataset as pds

    from reddino.data.stream import dataset_files

    files = dataset_files([data])
    table = pds.dataset(files, format="parquet").to_table(columns=["image", "sha256", "unit"])
    if unit:
        table = table.filter(pc.equal(table.column("unit"), unit))
    table = table.slice(0, n)
    blobs, shas = table.column("image").to_pylist(), table.column("sha256").to_pylist()
    folder = WORK_DIR / f"augcost_{data.name}_{len(blobs)}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for blob, sha in zip(blobs, shas):
        p = folder / f"{sha}.img"
        if not p.exists():
            p.write_bytes(blob)
        paths.append(str(p))
    return blobs, shas, paths, files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, help="reddino Parquet dataset dir (default: synthetic 224 px patches)")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--preset", default="reddino_vits14")
    ap.add_argument("--batch-size", type=int, default=64, help="rows per collated batch (default 64)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 16 synthetic images, tiny_cpu crops")
    ap.add_argument("--json", type=Path, help="also write the table as JSON here")
    ap.add_argument("--rounds", type=int, default=4, help="the columns take turns on this many chunks of the images "
                    "(default 4), so load changes during the run reach all of them alike")
    ap.add_argument("--per-op", action="store_true", help="also time each rbcfast op against albumentations', and "
                    "all 33 ops of the rbc pick as the policy runs them")
    args = ap.parse_args()
    if args.quick:
        args.images, args.preset, args.batch_size, args.rounds = 16, "tiny_cpu", 8, 2
    header("augment_cost")

    import cv2
    import numpy as np
    import torch

    from reddino.config import load_config
    from reddino.data.augment import sample_masks

    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    data = args.data or synthetic_patches(args.images, 224 if not args.quick else 112)
    cfg = load_config(args.preset, [*(["data.unit=patch"] if args.data is None else [])])
    blobs, shas, paths, files = load_images(data, args.images, cfg.data.unit)
    n = len(blobs)
    c = cfg.crops
    side = c.global_crops_size // 14
    rngs = [np.random.default_rng([cfg.train.seed, i, 1]) for i in range(n)]
    masks_fn = lambda i: sample_masks(rngs[i], c.global_crops_number, (side, side), cfg.mask)  # noqa: E731
    log(f"{n} images from {data}; crops {c.global_crops_number}x{c.global_crops_size} + {c.local_crops_number}x"
        f"{c.local_crops_size}, resize {cfg.data.resize}, batch {args.batch_size}; 1 thread, thread CPU time")

    modes = ("dinov2", "albumentations", "rbc", "rbc_albumentations", "on_device", "on_device_tiff")
    tiff_blobs, tiff_file = tiff_zstd_copy(blobs)
    source = {mode: (tiff_blobs if mode == "on_device_tiff" else blobs) for mode in modes}
    warm = min(WARM_UP, n)  # first calls set things up (lazy imports, cv2 state): once per worker, not per image
    official(paths[:warm], c, masks_fn, args.batch_size, cfg.train.seed)
    for mode in modes:
        reddino(source[mode][:warm], shas[:warm], cfg, mode, masks_fn, args.batch_size)
    warm_rbc_ops(blobs[0], cfg)
    # The columns take turns on chunks of the images (the order reversed every other round), so a change of the
    # machine's load or clock during the run reaches every column alike instead of the ones that ran then.
    acc: dict[str, dict[str, float]] = {col: defaultdict(float) for col in ("official", *modes)}
    rounds = max(1, min(args.rounds, n))
    bounds = [(n * r // rounds, n * (r + 1) // rounds) for r in range(rounds)]
    for r, (a, b) in enumerate(bounds):
        for col in ("official", *modes)[:: -1 if r % 2 else 1]:
            rngs = [np.random.default_rng([cfg.train.seed, i, 1]) for i in range(n)]
            chunk_masks = lambda i, a=a: masks_fn(a + i)  # noqa: E731
            res = (official(paths[a:b], c, chunk_masks, args.batch_size, cfg.train.seed + r) if col == "official"
                   else reddino(source[col][a:b], shas[a:b], cfg, col, chunk_masks, args.batch_size))
            for stage, ms in res.items():
                acc[col][stage] += ms * (b - a) / n
    read = parquet_read_ms(files, n)
    read_tiff = parquet_read_ms([str(tiff_file)], n)
    cols = {"official": dict(acc["official"])}
    cols.update({mode: {"read": read_tiff if mode == "on_device_tiff" else read, **acc[mode]} for mode in modes})
    dev = device_side_ms(blobs, shas, cfg, min(args.batch_size, n))
    names = {"official": "official DINOv2", "dinov2": "reddino dinov2", "albumentations": "dinov2 (albument.)",
             "rbc": "reddino rbc", "rbc_albumentations": "rbc (albument.)", "on_device": "on_device worker",
             "on_device_tiff": "on_dev. tiff-zstd"}
    print(f"\nms of CPU per image per core ({n} images, {args.preset} crops):")
    print(f"{'stage':16s}" + "".join(f"{names[k]:>20s}" for k in cols))
    totals = {k: sum(v.values()) for k, v in cols.items()}
    for s in STAGES:
        if any(s in v for v in cols.values()):
            print(f"{s:16s}" + "".join(f"{v.get(s, 0.0):20.3f}" for v in cols.values()))
    print(f"{'TOTAL':16s}" + "".join(f"{totals[k]:20.3f}" for k in cols))
    print(f"{'official / this':16s}" + "".join(f"{totals['official'] / totals[k]:20.2f}" for k in cols))
    print(f"on_device: crops made by the training device cost {dev:.3f} ms per image when that device is this CPU "
          f"(1 thread) — the work that left the data workers")
    if args.per_op:
        per_op(blobs, cfg)
    if args.json:
        import json

        args.json.write_text(json.dumps({"images": n, "preset": args.preset, "ms_per_image": cols,
                                         "totals": totals, "device_side_cpu_ms": dev}, indent=1))
    r = totals["official"] / totals["dinov2"]
    ratio_line("augment_cost official/reddino dinov2 CPU ms per image", r, f">= {GOAL_RATIO}", r >= GOAL_RATIO,
               f"[official {totals['official']:.2f} ms vs reddino {totals['dinov2']:.2f} ms]")
    r = totals["official"] / totals["rbc"]
    ratio_line("augment_cost official/reddino rbc CPU ms per image", r, f">= {GOAL_RATIO}", r >= GOAL_RATIO,
               f"[official {totals['official']:.2f} ms vs reddino rbc {totals['rbc']:.2f} ms; with albumentations' "
               f"own ops {totals['rbc_albumentations']:.2f} ms]")
    ratio_line("augment_cost on_device worker-side ms per image", totals["on_device"], f"<= {GOAL_DEVICE_MS}",
               totals["on_device"] <= GOAL_DEVICE_MS, f"[official/on_device {totals['official'] / totals['on_device']:.1f}x]")
    t = totals["on_device_tiff"]
    ratio_line("augment_cost on_device worker-side ms per image, tiff-zstd", t, f"<= {GOAL_DEVICE_MS}",
               t <= GOAL_DEVICE_MS, f"[official/on_device {totals['official'] / t:.1f}x; decode "
               f"{cols['on_device']['decode']:.2f} -> {cols['on_device_tiff']['decode']:.2f} ms; stored bytes "
               f"{sum(map(len, tiff_blobs)) / sum(map(len, blobs)):.2f}x]")


if __name__ == "__main__":
    main()
