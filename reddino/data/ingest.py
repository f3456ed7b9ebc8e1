"""Ingest raw RBC microscopy into the reddino Parquet format (see :mod:`reddino.data.shards`).

Formats (``ingest(format, src, out, ...)`` / ``reddino ingest FORMAT SRC --out DIR``):

- ``folder``: ``SRC/<class_name>/*`` single-cell crops (ImageFolder layout; label ids = sorted class
  names unless ``classes`` is given) or a flat folder of images (unlabelled). ``group`` = the file's
  path relative to SRC without extension (ImageFolder has no slide ids). ``encode="keep"`` (default)
  stores the file bytes untouched.
- ``chula``: Chula RBC-12 (``SRC/Dataset/<n>.jpg`` + ``SRC/Label/<n>.txt`` lines ``x y class_id``):
  one ``crop_size`` square (default 80) centred on each annotated cell; near the border the smear is
  padded (``pad="reflect"``: mirrored, ``"constant"``: the smear's median colour). ``group`` = image id
  (byte-identical smear files share the group of the first copy; they are listed in
  ``manifest["meta"]["identical_smears"]``).
- ``voc``: Pascal VOC (``SRC/Annotations/*.xml`` + ``SRC/JPEGImages``): one crop per box at the box's
  own size (VOC 1-based inclusive coords); degenerate or out-of-range boxes are skipped with a warning.
  Label ids = sorted object names unless ``classes`` is given.

``unit="patch"`` instead tiles every smear (for chula all images, labelled or not; for voc every
image in JPEGImages; for folder every image) into non-overlapping ``patch_size`` squares on a grid
**centred** in the image: ``floor(H/p) x floor(W/p)`` tiles, the remainder split evenly between the
borders and dropped (a 640x480 smear gives 2x2 tiles of 224 px). Tiles are unlabelled.

Crops and tiles are new images and are encoded (``encode="png"`` default, ``"tiff-zstd"``: lossless too, ~12 %
larger on smear patches and ~1/3 of PNG's decode CPU, for training where the data workers set the speed; or
``"jpeg"``).
Everything is deterministic: re-running into the same ``out`` reproduces the same shards and keeps
the existing manifest. Images are decoded from their bytes (format sniffed, not taken from the
extension); corrupt/truncated images, unknown classes, empty class folders, unparsable annotation
lines and annotation points outside the image are skipped and listed in ``manifest["skipped"]``.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import xml.etree.ElementTree as ET
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from reddino.data.images import ENCODINGS, ImageDecodeError, decode_image_strict, encode_image
from reddino.data.schema import make_row
from reddino.data.shards import (
    DEFAULT_MAX_BYTES_PER_SHARD,
    DEFAULT_MAX_ROWS_PER_SHARD,
    Manifest,
    check_output_dir,
    write_dataset,
)

log = logging.getLogger(__name__)

CHULA_CLASSES: dict[int, str] = {
    0: "Normal cell",
    1: "Macrocyte",
    2: "Microcyte",
    3: "Spherocyte",
    4: "Target cell",
    5: "Stomatocyte",
    6: "Ovalocyte",
    7: "Teardrop",
    8: "Burr cell",
    9: "Schistocyte",
    10: "Uncategorised",
    11: "Hypochromia",
    12: "Elliptocyte",
}

FORMATS = ("folder", "chula", "voc")
DEFAULT_SOURCES = {"chula": "chula-rbc-12", "voc": "bccd"}
DEFAULT_CROP_SIZE = 80
DEFAULT_PATCH_SIZE = 224
FOLDER_CHUNK = 64
SKIP_REPORT_N = 20
# Edge-case decisions, recorded in every manifest (meta.input_rules) and each skip named in its `skipped` list:
MIN_CELL_SIDE = 8  # px: a smaller "cell" (a 1x1 image) is no cell
MAX_CELL_SIDE = 1024  # px: a larger image is a smear or slide, not one cell (ingest it with --unit patch)
MAX_IMAGE_PIXELS = 64_000_000  # one image decoded at most (~190 MB RGB): bounds an ingest worker's memory
INPUT_RULES = {
    "hidden": "names starting with '.' are skipped and listed",
    "symlinks": "followed inside the source folder; a link pointing outside it is skipped and listed",
    "min_cell_side": MIN_CELL_SIDE, "max_cell_side": MAX_CELL_SIDE, "max_image_pixels": MAX_IMAGE_PIXELS,
}


class IngestError(ValueError):
    """Input that cannot be ingested at all (missing layout, no images, bad options)."""


@dataclass(frozen=True)
class _Opts:
    unit: str
    crop_size: int
    patch_size: int
    source: str
    encode: str  # keep | png | jpeg | tiff-zstd
    pad: str  # reflect | constant


# --------------------------------------------------------------------------- pixel helpers


def tile_grid(height: int, width: int, patch: int) -> list[tuple[int, int]]:
    """Top-left corners ``(y, x)`` of the non-overlapping ``patch`` tiles of a centred grid (row-major)."""
    ny, nx = height // patch, width // patch
    oy, ox = (height - ny * patch) // 2, (width - nx * patch) // 2
    return [(oy + r * patch, ox + c * patch) for r in range(ny) for c in range(nx)]


def crop_centered(img: np.ndarray, cx: int, cy: int, size: int, pad: str = "reflect", padded: np.ndarray | None = None) -> np.ndarray:
    """``size`` x ``size`` crop centred on (cx, cy), padding past the border (reflect or constant median colour)."""
    padded = padded if padded is not None else pad_image(img, size, pad)
    m = size // 2 + 1
    x0, y0 = cx - size // 2 + m, cy - size // 2 + m
    return np.ascontiguousarray(padded[y0 : y0 + size, x0 : x0 + size])


def pad_image(img: np.ndarray, size: int, pad: str) -> np.ndarray:
    import cv2

    m = size // 2 + 1
    if pad == "reflect":
        # reflect_101 needs the image to be bigger than the margin; fall back to replicate otherwise.
        mode = cv2.BORDER_REFLECT_101 if min(img.shape[:2]) > m else cv2.BORDER_REPLICATE
        return cv2.copyMakeBorder(img, m, m, m, m, mode)
    if pad == "constant":
        colour = [int(v) for v in np.median(img.reshape(-1, 3), axis=0)]
        return cv2.copyMakeBorder(img, m, m, m, m, cv2.BORDER_CONSTANT, value=colour)
    raise IngestError(f"unknown pad mode {pad!r} (expected reflect or constant)")


def _encode(rgb: np.ndarray, encode: str) -> bytes:
    return encode_image(rgb, "png" if encode == "keep" else encode)


def _read(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _skip(file: str, reason: str) -> dict[str, str]:
    return {"file": file, "reason": reason}


def _tile_rows(rgb: np.ndarray, rel: str, group: str, opts: _Opts) -> list[dict]:
    rows = []
    p = opts.patch_size
    h, w = rgb.shape[:2]
    for y, x in tile_grid(h, w, p):
        data = _encode(rgb[y : y + p, x : x + p], opts.encode)
        rows.append(
            make_row(data, height=p, width=p, source=opts.source, group=group, unit="patch",
                     image_id=f"{rel}#x={x},y={y},w={p},h={p}")
        )
    return rows


def _image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the image header alone (no pixels decoded), None when PIL cannot tell."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is checked below instead
            with Image.open(io.BytesIO(data)) as im:
                return im.size
    except Exception:  # noqa: BLE001 - undecodable: the strict decode says why
        return None


def _load(path: Path, rel: str) -> tuple[bytes | None, np.ndarray | None, dict | None]:
    try:
        data = _read(path)
    except OSError as exc:
        return None, None, _skip(rel, f"unreadable file ({exc})")
    size = _image_size(data)
    if size is not None and size[0] * size[1] > MAX_IMAGE_PIXELS:
        return data, None, _skip(rel, f"image {size[0]}x{size[1]} ({size[0] * size[1] / 1e6:.0f} MP) exceeds the "
                                      f"{MAX_IMAGE_PIXELS / 1e6:.0f} MP limit of one image (memory bound); split it first")
    try:
        return data, decode_image_strict(data), None
    except ImageDecodeError as exc:
        return data, None, _skip(rel, str(exc))


# --------------------------------------------------------------------------- worker tasks
# Each task is a picklable tuple; `_run_task` returns (rows, skips). Run in-process or in a pool.


def _task_folder_files(files: list[tuple[str, str, int | None, str | None]], opts: _Opts):
    rows, skips = [], []
    for path, rel, label, name in files:
        data, rgb, err = _load(Path(path), rel)
        if err:
            skips.append(err)
            continue
        group = os.path.splitext(rel)[0]
        if opts.unit == "patch":
            tiles = _tile_rows(rgb, rel, group, opts)
            if not tiles:
                skips.append(_skip(rel, f"image {rgb.shape[1]}x{rgb.shape[0]} is smaller than one {opts.patch_size}px patch"))
            rows.extend(tiles)
            continue
        h, w = rgb.shape[:2]
        if min(h, w) < MIN_CELL_SIDE:
            skips.append(_skip(rel, f"image {w}x{h} is smaller than the {MIN_CELL_SIDE} px minimum side of a cell"))
            continue
        if max(h, w) > MAX_CELL_SIDE:
            skips.append(_skip(rel, f"image {w}x{h} is larger than the {MAX_CELL_SIDE} px maximum side of a cell (a "
                                    "smear? ingest it with --unit patch)"))
            continue
        if opts.encode != "keep":
            data = _encode(rgb, opts.encode)
        rows.append(make_row(data, height=h, width=w, source=opts.source, group=group, unit="cell",
                             image_id=rel, label=label, label_name=name))
    return rows, skips


def _load_or_tile(img_path: str, rel: str, stem: str, opts: _Opts, lost: str):
    """A smear image, decoded: ``(rgb, None)`` for cell cropping, or ``(None, (rows, skips))`` when the image is
    unreadable (``lost`` says what its annotations lose) or is tiled into patches instead."""
    _, rgb, err = _load(Path(img_path), rel)
    if err:
        if lost:
            err["reason"] += f"; {lost}"
        return None, ([], [err])
    if opts.unit == "patch":
        tiles = _tile_rows(rgb, rel, stem, opts)
        small = [] if tiles else [_skip(rel, f"image {rgb.shape[1]}x{rgb.shape[0]} is smaller than one {opts.patch_size}px patch")]
        return None, (tiles, small)
    return rgb, None


def _task_chula_image(img_path: str, rel: str, stem: str, points: list[tuple[str, int, int, int, str]], opts: _Opts):
    rows, skips = [], []
    rgb, done = _load_or_tile(img_path, rel, stem, opts, f"its {len(points)} annotated cell(s) were dropped" if points else "")
    if done is not None:
        return done
    h, w = rgb.shape[:2]
    c = opts.crop_size
    padded = pad_image(rgb, c, opts.pad)
    for where, x, y, label, name in points:
        if not (0 <= x < w and 0 <= y < h):
            skips.append(_skip(where, f"annotation point ({x}, {y}) is outside the {w}x{h} image {rel}"))
            continue
        crop = crop_centered(rgb, x, y, c, opts.pad, padded=padded)
        x0, y0 = x - c // 2, y - c // 2
        rows.append(make_row(_encode(crop, opts.encode), height=c, width=c, source=opts.source, group=stem,
                             unit="cell", image_id=f"{rel}#x={x0},y={y0},w={c},h={c}", label=label, label_name=name))
    return rows, skips


def _task_voc_image(img_path: str, rel: str, stem: str, xml_rel: str, boxes: list, opts: _Opts):
    rows, skips = [], []
    rgb, done = _load_or_tile(img_path, rel, stem, opts, f"its {len(boxes)} box(es) were dropped" if boxes else "")
    if done is not None:
        return done
    h, w = rgb.shape[:2]
    for idx, (x0, y0, x1, y1, label, name) in enumerate(boxes):
        box = f"{xml_rel} object #{idx} ({name}: xmin={x0} ymin={y0} xmax={x1} ymax={y1})"
        if x1 <= x0 or y1 <= y0:
            skips.append(_skip(box, "degenerate box (zero or negative width/height)"))
            continue
        if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
            skips.append(_skip(box, f"box out of range of the {w}x{h} image {rel}"))
            continue
        xs, ys = max(x0 - 1, 0), max(y0 - 1, 0)  # VOC: 1-based inclusive
        crop = np.ascontiguousarray(rgb[ys:y1, xs:x1])
        rows.append(make_row(_encode(crop, opts.encode), height=crop.shape[0], width=crop.shape[1],
                             source=opts.source, group=stem, unit="cell",
                             image_id=f"{rel}#x={xs},y={ys},w={crop.shape[1]},h={crop.shape[0]}",
                             label=label, label_name=name))
    return rows, skips


def _task_detect(*args):  # --detect: cells found by a detector (reddino.data.detect_ingest)
    from reddino.data.detect_ingest import task_detect

    return task_detect(*args)


_TASKS: dict[str, Callable] = {
    "folder": _task_folder_files,
    "chula": _task_chula_image,
    "voc": _task_voc_image,
    "detect": _task_detect,
}


def _run_task(task: tuple) -> tuple[list[dict], list[dict]]:
    kind, args = task
    return _TASKS[kind](*args)


def _worker_init() -> None:
    try:
        import cv2

        cv2.setNumThreads(1)
    except Exception:  # noqa: BLE001
        pass


# --------------------------------------------------------------------------- planning (main process)


def _is_hidden(p: Path) -> bool:
    return p.name.startswith(".")


def _files(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_file() and not _is_hidden(p))


def _outside(p: Path, root: Path) -> bool:
    """A symlink (or a path through one) that leads out of the source tree."""
    try:
        p.resolve().relative_to(root)
        return False
    except ValueError:
        return True


def _walk(d: Path, src: Path, root: Path, skips: list) -> list[Path]:
    """Files under class folder ``d``: hidden names and links out of the source tree skipped, each listed."""
    out: list[Path] = []
    for p in sorted(d.iterdir()):
        rel = str(p.relative_to(src)) + ("/" if p.is_dir() else "")
        if _is_hidden(p):
            skips.append(_skip(rel, "hidden (name starts with '.')"))
        elif p.is_symlink() and _outside(p, root):
            skips.append(_skip(rel, f"symbolic link to {p.resolve()}, outside the source folder"))
        elif p.is_dir():
            out.extend(_walk(p, src, root, skips))
        elif p.is_file():
            out.append(p)
    return out


def _plan_folder(src: Path, opts: _Opts, classes: Sequence[str] | None, skips: list):
    root = src.resolve()
    for p in sorted(src.iterdir()):
        if _is_hidden(p):
            skips.append(_skip(p.name + ("/" if p.is_dir() else ""), "hidden (name starts with '.')"))
        elif p.is_symlink() and _outside(p, root):
            skips.append(_skip(p.name + ("/" if p.is_dir() else ""),
                               f"symbolic link to {p.resolve()}, outside the source folder"))
    subdirs = sorted(p for p in src.iterdir() if p.is_dir() and not _is_hidden(p)
                     and not (p.is_symlink() and _outside(p, root)))
    top_files = [p for p in _files(src) if not (p.is_symlink() and _outside(p, root))]
    entries: list[tuple[str, str, int | None, str | None]] = []
    class_table: dict[int, str] = {}
    if subdirs:
        names = list(classes) if classes else [d.name for d in subdirs]
        if len(set(names)) != len(names):
            raise IngestError(f"duplicate class names in {names}")
        if not classes:
            names = sorted(names)
        class_table = dict(enumerate(names))
        ids = {n: i for i, n in class_table.items()}
        for f in top_files:
            skips.append(_skip(f.name, "file outside the class folders (ImageFolder layout expects SRC/<class>/<image>)"))
        for d in subdirs:
            if d.name not in ids:
                files = _walk(d, src, root, [])
                skips.append(_skip(d.name + "/", f"unknown class: folder {d.name!r} is not in the class list {names} ({len(files)} file(s) skipped)"))
                continue
            files = _walk(d, src, root, skips)
            if not files:
                skips.append(_skip(d.name + "/", "empty class folder"))
                continue
            for p in files:
                entries.append((str(p), str(p.relative_to(src)), ids[d.name], d.name))
        if classes:
            present = {d.name for d in subdirs}
            for n in names:
                if n not in present:
                    log.warning("class %r from the class list has no folder in %s", n, src)
    else:
        if classes:
            raise IngestError(f"--classes given but {src} has no class sub-folders (flat folder = unlabelled)")
        entries = [(str(p), p.name, None, None) for p in top_files]
    if not entries:
        raise IngestError(f"no image files found in {src}" + (f" (skipped: {[s['file'] for s in skips]})" if skips else ""))
    step = 1 if opts.unit == "patch" else FOLDER_CHUNK
    tasks = [("folder", (entries[i : i + step], opts)) for i in range(0, len(entries), step)]
    return tasks, class_table, {}


def _parse_chula_labels(path: Path, rel: str, class_table: dict[int, str], skips: list) -> list[tuple[str, int, int, int, str]]:
    points = []
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        skips.append(_skip(rel, f"unreadable label file ({exc})"))
        return points
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{rel}:{lineno}"
        parts = line.replace(",", " ").split()
        try:
            if len(parts) != 3:
                raise ValueError
            x, y = (int(round(float(v))) for v in parts[:2])
            cls_f = float(parts[2])
            if cls_f != int(cls_f):
                raise ValueError
            cls = int(cls_f)
        except ValueError:
            skips.append(_skip(where, f"unparsable annotation line {line.strip()!r} (expected 'x y class_id')"))
            continue
        if cls not in class_table:
            skips.append(_skip(where, f"unknown class id {cls} (not in the class table {sorted(class_table)})"))
            continue
        points.append((where, x, y, cls, class_table[cls]))
    return points


def _plan_chula(src: Path, opts: _Opts, classes: Sequence[str] | None, skips: list):
    ddir, ldir = src / "Dataset", src / "Label"
    if not ddir.is_dir():
        raise IngestError(f"{src} is not a Chula RBC-12 tree: missing {ddir}")
    class_table = dict(enumerate(classes)) if classes else dict(CHULA_CLASSES)
    images = {p.stem: p for p in _files(ddir)}
    labels = {p.stem: p for p in _files(ldir) if p.suffix.lower() == ".txt"} if ldir.is_dir() else {}
    if opts.unit == "cell" and not labels:
        raise IngestError(f"no label files in {ldir}: cannot make labelled cell crops (use --unit patch to tile the smears)")
    for stem in sorted(set(labels) - set(images), key=_natural):
        skips.append(_skip(f"Label/{labels[stem].name}", f"label file has no image Dataset/{stem}.* "))
    tasks = []
    n_unlabelled = 0
    order = sorted(images, key=_natural)
    groups = _canonical_groups(images, order)
    for stem in order:
        img = images[stem]
        rel = f"Dataset/{img.name}"
        if opts.unit == "patch":
            tasks.append(("chula", (str(img), rel, groups[stem], [], opts)))
            continue
        if stem not in labels:
            n_unlabelled += 1
            continue
        points = _parse_chula_labels(labels[stem], f"Label/{labels[stem].name}", class_table, skips)
        if points:
            tasks.append(("chula", (str(img), rel, groups[stem], points, opts)))
    if n_unlabelled:
        log.info("%d image(s) in %s have no label file (unlabelled; not cropped, use --unit patch to include them)", n_unlabelled, ddir)
    if not tasks:
        raise IngestError(f"no images to ingest in {ddir}")
    return tasks, class_table, groups


def _canonical_groups(images: dict[str, Path], order: list[str]) -> dict[str, str]:
    """Map each smear stem to the first stem (in ``order``) whose file has identical bytes.

    Byte-identical smear files are the same smear: giving them one ``group`` keeps grouped
    train/test splits from leaking the same pixels (Chula RBC-12 ships 22 such pairs).
    """
    from reddino.data.shards import file_sha256

    first: dict[str, str] = {}
    out: dict[str, str] = {}
    for stem in order:
        try:
            h = file_sha256(images[stem])
        except OSError:
            out[stem] = stem
            continue
        out[stem] = first.setdefault(h, stem)
    return out


def _natural(s: str):
    return (0, int(s), s) if s.isdigit() else (1, 0, s)


def _voc_num(el: ET.Element | None, tag: str) -> int:
    node = el.find(tag) if el is not None else None
    if node is None or node.text is None:
        raise ValueError(f"missing <{tag}>")
    return int(round(float(node.text.strip())))


def _plan_voc(src: Path, opts: _Opts, classes: Sequence[str] | None, skips: list):
    adir, jdir = src / "Annotations", src / "JPEGImages"
    if not jdir.is_dir():
        raise IngestError(f"{src} is not a Pascal VOC tree: missing {jdir}")
    images = {p.stem: p for p in _files(jdir)}
    if not images:
        raise IngestError(f"no images in {jdir}")
    groups = _canonical_groups(images, sorted(images))
    if opts.unit == "patch":
        tasks = [("voc", (str(p), f"JPEGImages/{p.name}", groups[stem], "", [], opts)) for stem, p in sorted(images.items())]
        return tasks, {}, groups
    if not adir.is_dir():
        raise IngestError(f"{src} is not a Pascal VOC tree: missing {adir}")
    parsed = []
    for xml in _files(adir):
        if xml.suffix.lower() != ".xml":
            continue
        xml_rel = f"Annotations/{xml.name}"
        try:
            root = ET.parse(xml).getroot()
        except (ET.ParseError, OSError) as exc:
            skips.append(_skip(xml_rel, f"unparsable annotation file ({exc})"))
            continue
        fname = (root.findtext("filename") or "").strip()
        stem = Path(fname).stem if fname else xml.stem
        img = images.get(stem) or images.get(xml.stem)
        if img is None:
            skips.append(_skip(xml_rel, f"no image for it in JPEGImages (filename {fname!r})"))
            continue
        boxes = []
        for idx, obj in enumerate(root.iter("object")):
            name = (obj.findtext("name") or "").strip()
            try:
                bb = obj.find("bndbox")
                box = tuple(_voc_num(bb, t) for t in ("xmin", "ymin", "xmax", "ymax"))
            except ValueError as exc:
                skips.append(_skip(f"{xml_rel} object #{idx} ({name})", f"unparsable bndbox ({exc})"))
                continue
            if not name:
                skips.append(_skip(f"{xml_rel} object #{idx}", "object without a <name>"))
                continue
            boxes.append((idx, *box, name))
        parsed.append((img, xml_rel, boxes))
    names = list(classes) if classes else sorted({b[-1] for _, _, bs in parsed for b in bs})
    class_table = dict(enumerate(names))
    ids = {n: i for i, n in class_table.items()}
    tasks = []
    for img, xml_rel, boxes in parsed:
        kept = []
        for idx, x0, y0, x1, y1, name in boxes:
            if name not in ids:
                skips.append(_skip(f"{xml_rel} object #{idx} ({name})", f"unknown class {name!r} (not in the class list {names})"))
                continue
            kept.append((x0, y0, x1, y1, ids[name], name))
        if kept:
            tasks.append(("voc", (str(img), f"JPEGImages/{img.name}", groups[img.stem], xml_rel, kept, opts)))
    if not tasks:
        raise IngestError(f"no usable boxes in {adir}")
    return tasks, class_table, groups


_PLANNERS = {"folder": _plan_folder, "chula": _plan_chula, "voc": _plan_voc}


# --------------------------------------------------------------------------- driver


def _execute(tasks: list[tuple], workers: int, progress: bool, desc: str,
             use_ray: bool = False) -> Iterator[tuple[list, list]]:
    """Run tasks in order (in-process for workers<=1, else a process pool, or Ray tasks on the cluster with
    ``use_ray``: each reads its photo from the shared path and returns its rows), with a progress bar."""
    bar = None
    if progress:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                       TimeRemainingColumn(), console=Console(stderr=True), transient=False)
    tid = bar.add_task(desc, total=len(tasks)) if bar else None
    pool = None
    try:
        if bar:
            bar.start()
        if use_ray:
            from ray.util.multiprocessing import Pool as RayPool

            from reddino.runtime import init_ray

            init_ray()  # RAY_ADDRESS's cluster, else a local Ray
            pool = RayPool(initializer=_worker_init)  # one process per cluster CPU, as multiprocessing does
            results = pool.imap(_run_task, tasks, chunksize=max(1, min(16, len(tasks) // 64)))  # in order
        elif workers <= 1 or len(tasks) <= 1:
            results: Iterable = map(_run_task, tasks)
        else:
            import multiprocessing as mp

            ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
            pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init)
            chunk = max(1, min(16, len(tasks) // (workers * 8)))
            results = pool.map(_run_task, tasks, chunksize=chunk)
        for res in results:
            yield res
            if bar:
                bar.advance(tid)
    finally:
        if pool is not None and use_ray:
            pool.terminate()
        elif pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if bar:
            bar.stop()


def _parse_classes(classes: str | Sequence[str] | None) -> list[str] | None:
    if classes is None:
        return None
    if isinstance(classes, str):
        p = Path(classes)
        if p.is_file():
            items = [ln.strip() for ln in p.read_text().splitlines()]
        else:
            items = classes.split(",")
        classes = [c.strip() for c in items if c.strip()]
    out = [str(c) for c in classes]
    if not out:
        raise IngestError("empty class list")
    return out


def ingest(
    format: str,
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    unit: str = "cell",
    crop_size: int = DEFAULT_CROP_SIZE,
    patch_size: int = DEFAULT_PATCH_SIZE,
    source: str | None = None,
    workers: int | None = None,
    encode: str | None = None,
    classes: str | Sequence[str] | None = None,
    pad: str = "reflect",
    overwrite: bool = False,
    progress: bool = True,
    command: str | None = None,
    max_rows_per_shard: int = DEFAULT_MAX_ROWS_PER_SHARD,
    max_bytes_per_shard: int = DEFAULT_MAX_BYTES_PER_SHARD,
    report: Callable[[str], None] | None = None,
    detect: bool = False,
    detector: str | None = None,
    detector_params: dict | None = None,
    detect_crop_size: int | None = None,
    use_ray: bool = False,
) -> Manifest:
    """Ingest ``src`` (layout ``format``: folder | chula | voc) into the dataset dir ``out``.

    ``unit``: ``"cell"`` (crops / single-cell files, labelled) or ``"patch"`` (unlabelled smear tiles).
    ``encode``: ``"keep"`` (store file bytes untouched; folder cells only, the default there),
    ``"png"`` (default for crops/tiles), ``"tiff-zstd"`` (lossless, cheapest to decode) or ``"jpeg"``.
    ``classes``: explicit class names in id order (list, comma-separated string or a file with one name per line).
    ``workers``: processes (default ``os.cpu_count()``, 1 = in-process). Returns the written (or unchanged) manifest.
    Skipped inputs are reported through ``report`` (default: logging) and recorded in the manifest.
    ``detect``: one row per cell found by ``detector`` (see :mod:`reddino.data.detect_ingest`) in every smear
    image, labelled where the source's labels match a detected cell; ``detect_crop_size`` fixes the crop side
    (default: 3.2 cell radii of each smear). ``use_ray``: the per-image tasks (decode, crop or tile, detect) run on
    Ray (the cluster of RAY_ADDRESS, else a local Ray) instead of ``workers`` processes; ``src`` must be readable
    by every node (shared storage). The same rows in the same order either way.
    """
    src_p = Path(src).expanduser()
    encode = _checked_args(format, unit, src_p, encode, pad, crop_size, patch_size)
    class_list = _parse_classes(classes)
    spec = _detect_spec(unit, detector, detector_params, detect_crop_size) if detect else None
    source = source or DEFAULT_SOURCES.get(format) or src_p.resolve().name
    opts = _Opts(unit=unit, crop_size=int(crop_size), patch_size=int(patch_size), source=source, encode=encode, pad=pad)
    config = {
        "format": format,
        "src": str(src_p.resolve()),
        "unit": unit,
        "crop_size": opts.crop_size if (format == "chula" and unit == "cell") else None,
        "patch_size": opts.patch_size if unit == "patch" else None,
        "source": source,
        "encode": encode,
        "pad": pad if (format == "chula" and unit == "cell") else None,
        "classes": class_list,
    }
    if spec is not None:
        config.update(crop_size=None, pad=pad, detect=spec.config())
    meta = {"command": command or _default_command(), "config": config, "input_rules": INPUT_RULES}
    check_output_dir(out, meta, overwrite)  # fail before the work, not after

    report = report or (lambda msg: log.warning("%s", msg))
    skips: list[dict[str, str]] = []
    if spec is not None:
        from reddino.data.detect_ingest import plan, summarise

        tasks, class_table, groups = plan(format, src_p, opts, class_list, skips, spec)
    else:
        tasks, class_table, groups = _PLANNERS[format](src_p, opts, class_list, skips)
    if unit == "patch":
        class_table = {}  # tiles are unlabelled
    same = {k: v for k, v in groups.items() if k != v}
    if same:
        meta["identical_smears"] = same  # stem -> stem of the byte-identical smear whose group it shares
        report(f"{len(same)} smear file(s) are byte-identical to an earlier one and share its group: "
               + ", ".join(f"{k}={v}" for k, v in list(same.items())[:10]) + (" …" if len(same) > 10 else ""))
    workers = (os.cpu_count() or 1) if workers is None else int(workers)

    per_smear: dict[str, dict] = {}

    def rows() -> Iterator[dict]:
        desc = f"ingest {format} → {unit} rows" + (f" (detect: {spec.name})" if spec else "")
        for res in _execute(tasks, workers, progress, desc, use_ray=use_ray):
            skips.extend(res[1])
            if len(res) > 2:  # --detect: per-smear detection summaries
                per_smear.update(res[2])
            yield from res[0]
        if spec is not None:
            meta["detection"] = summarise(per_smear, spec)

    manifest = write_dataset(
        rows(), out, meta, classes=class_table, skipped=skips, overwrite=overwrite,
        max_rows_per_shard=max_rows_per_shard, max_bytes_per_shard=max_bytes_per_shard,
    )
    if manifest.num_rows == 0:
        raise IngestError(f"nothing ingested from {src_p}: all inputs were skipped ({len(skips)} skip(s))")
    _report_skips(manifest, src_p, Path(out), report)
    return manifest


def _checked_args(format: str, unit: str, src_p: Path, encode: str | None, pad: str, crop_size: int,
                  patch_size: int) -> str:
    """One clear error for a bad argument, before any work; the encoding to use."""
    if format not in FORMATS:
        raise IngestError(f"unknown format {format!r} (expected one of {FORMATS})")
    if unit not in ("cell", "patch"):
        raise IngestError(f"unknown unit {unit!r} (expected cell or patch)")
    if not src_p.is_dir():
        raise IngestError(f"source {src_p} does not exist or is not a directory")
    if encode is None:
        encode = "keep" if (format == "folder" and unit == "cell") else "png"
    if encode not in ("keep", *ENCODINGS):
        raise IngestError(f"unknown encoding {encode!r} (expected keep, {', '.join(ENCODINGS)})")
    if encode == "keep" and not (format == "folder" and unit == "cell"):
        raise IngestError("--encode keep only applies to folder cell ingest (crops and tiles are new images: use "
                          f"{', '.join(ENCODINGS)})")
    if pad not in ("reflect", "constant"):
        raise IngestError(f"unknown pad mode {pad!r} (expected reflect or constant)")
    if crop_size < 2 or patch_size < 2:
        raise IngestError("crop and patch sizes must be >= 2 px")
    return encode


def _detect_spec(unit: str, detector: str | None, detector_params: dict | None, detect_crop_size: int | None):
    from reddino.data.detect import DetectError
    from reddino.data.detect_ingest import DetectSpec

    if unit != "cell":
        raise IngestError("--detect makes one row per detected cell: use it with --unit cell")
    try:
        return DetectSpec.make(detector, detector_params, detect_crop_size)
    except (DetectError, TypeError) as exc:
        raise IngestError(str(exc)) from exc


def _report_skips(manifest: Manifest, src_p: Path, out: Path, report: Callable[[str], None]) -> None:
    recorded = manifest.get("skipped", [])
    if recorded:
        lines = [f"skipped {len(recorded)} input(s) from {src_p}:"]
        lines += [f"  {s['file']}: {s['reason']}" for s in recorded[:SKIP_REPORT_N]]
        if len(recorded) > SKIP_REPORT_N:
            lines.append(f"  … and {len(recorded) - SKIP_REPORT_N} more (see {out / '_manifest.json'} 'skipped')")
        report("\n".join(lines))
    dups = manifest.get("duplicates", {}).get("count", 0)
    if dups:
        report(f"dropped {dups} duplicate image(s) (identical bytes), e.g. {manifest['duplicates']['examples'][:3]}")


def _default_command() -> str:
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else "python"


__all__ = ["ingest", "CHULA_CLASSES", "IngestError", "tile_grid", "crop_centered", "FORMATS"]
