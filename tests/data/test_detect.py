"""Cell detection on smear photos: synthetic smears with known cells, real Chula / BCCD smears, bad input, tiles,
ingest with detection."""

from __future__ import annotations

import io
import json
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest

from reddino.data.detect import (
    BORDER_CUT,
    ClassicalDetector,
    DetectError,
    check_rgb,
    detectors,
    get_detector,
    register_detector,
)
from reddino.data.detect_eval import (
    cell_boxes,
    chula_points,
    match_boxes,
    match_centres,
    touching_pairs,
    voc_boxes,
)
from reddino.data.detect_ingest import parse_cell_id, parse_params
from reddino.data.ingest import IngestError, ingest
from reddino.data.synth import render_smear, source_styles

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
if not SHARED.is_dir():
    SHARED = Path("/work/shared/data")
CHULA = SHARED / "chula-rbc-12"
BCCD = SHARED / "bccd" / "BCCD"


def _smear(i: int, **kw):
    style = source_styles(3)[i % 3]
    return render_smear(style, np.random.default_rng([7, i]), **kw)


def _png(rgb: np.ndarray) -> bytes:
    return cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()


# --------------------------------------------------------------------------- synthetic smears


@pytest.mark.parametrize("i", [0, 1, 2])
def test_synthetic_smears_recall_precision_and_touching_pairs_split(i):
    img, cells = _smear(i, n_cells=30, touching=6)
    pts = np.array([[c["x"], c["y"]] for c in cells])
    det = get_detector().detect(img, keep_labels=True)
    m = match_centres(det, pts)
    assert m.recall >= 0.97, (m.recall, det.dropped)
    assert m.precision >= 0.95, (m.precision, det.n, len(cells))
    # every touching pair's two cells are two detections
    pair_ids = {c["pair"] for c in cells if c["pair"] >= 0}
    split = sum(len({m.label_to_cell[j] for j, c in enumerate(cells) if c["pair"] == p} - {-1}) == 2 for p in pair_ids)
    assert split >= len(pair_ids) - 1, f"{split} of {len(pair_ids)} touching pairs split"
    # the radius is estimated, not given
    assert abs(det.radius - cells[0]["r"]) < 0.25 * cells[0]["r"]
    assert all(c.detector if hasattr(c, "detector") else True for c in det.cells)
    assert det.detector == "classical" and det.version


def test_border_cut_cells_are_flagged_and_boxes_hold_their_centres():
    img, cells = _smear(0, n_cells=25, touching=2)
    cut = img[40:, 30:]  # cells now cut by the top and left edges
    det = get_detector().detect(np.ascontiguousarray(cut))
    assert any(BORDER_CUT in c.flags for c in det.cells)
    for c in det.cells:
        assert c.x0 <= c.cx < c.x1 and c.y0 <= c.cy < c.y1 and c.area > 0
        inner = c.x0 > 2 and c.y0 > 2 and c.x1 < cut.shape[1] - 2 and c.y1 < cut.shape[0] - 2
        if inner:
            assert BORDER_CUT not in c.flags


def test_grey_dust_of_cell_size_is_dropped_not_reported():
    # a neutral-density blob (a fibre, dust, a pointer shadow): as dark as a cell but as dense in red as in green
    img, cells = _smear(0, n_cells=15, touching=2)
    r = cells[0]["r"]
    yy, xx = np.mgrid[:img.shape[0], :img.shape[1]]
    far = [(x, y) for y in range(60, img.shape[0] - 60, 10) for x in range(60, img.shape[1] - 60, 10)
           if min(np.hypot(x - c["x"], y - c["y"]) for c in cells) > 3 * r]
    x, y = far[0]
    img = img.copy()
    blob = np.hypot(xx - x, yy - y) < r
    img[blob] = (img[blob] * 0.6).astype(np.uint8)

    def near(det):
        return [c for c in det.cells if np.hypot(c.cx - x, c.cy - y) < r]

    det = get_detector().detect(img)
    assert not near(det) and det.dropped.get("grey", 0) >= 1, det.dropped
    assert near(get_detector(grey_frac=1.01).detect(img)), "without the grey filter the blob is a cell"
    assert len(det.cells) >= len(cells) - 1


# --------------------------------------------------------------------------- bad input


def test_blank_and_cell_free_images_give_no_cells_with_a_reason():
    det = get_detector()
    for img in (np.full((300, 400, 3), 255, np.uint8), np.full((300, 400, 3), 180, np.uint8),
                np.random.default_rng(0).normal(230, 2, (300, 400, 3)).clip(0, 255).astype(np.uint8)):
        d = det.detect(img)
        assert d.n == 0 and d.note, d


def test_grey_rgba_and_16bit_smears_detect_like_rgb():
    img, cells = _smear(1, n_cells=20, touching=3)
    ref = get_detector().detect(img).n
    grey = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    rgba = np.concatenate([img, np.full(img.shape[:2] + (1,), 255, np.uint8)], axis=2)
    deep = img.astype(np.uint16) * 257
    for variant in (grey, rgba, deep):
        n = get_detector().detect(variant).n
        assert abs(n - ref) <= max(2, 0.1 * ref), (variant.shape, variant.dtype, n, ref)


def test_bad_arrays_detector_names_and_params_give_clear_errors():
    with pytest.raises(DetectError, match="shape"):
        check_rgb(np.zeros((4, 4, 4, 4), np.uint8))
    with pytest.raises(DetectError, match="channels"):
        check_rgb(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(DetectError, match="float"):
        check_rgb(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(DetectError, match="unknown detector 'nope'"):
        get_detector("nope")
    with pytest.raises(DetectError, match="unknown parameter"):
        get_detector("classical", radius=3)
    assert parse_params("cell_radius=48,min_od=0.05") == {"cell_radius": 48, "min_od": 0.05}
    assert parse_params('{"tile": 512}') == {"tile": 512}


def test_tiled_detection_matches_whole_image_detection():
    # a 4x3 mosaic of synthetic smears, detected whole and in 512 px tiles (forced with a small tile size)
    tiles = [_smear(i, height=300, width=300, n_cells=10, touching=2)[0] for i in range(12)]
    big = np.concatenate([np.concatenate(tiles[r * 4:(r + 1) * 4], axis=1) for r in range(3)], axis=0)
    whole = ClassicalDetector(cell_radius=19.0, tile=4096).detect(big)
    tiled = ClassicalDetector(cell_radius=19.0, tile=512).detect(big)
    assert abs(tiled.n - whole.n) <= max(3, 0.03 * whole.n), (tiled.n, whole.n)
    ctr = np.array([[c.cx, c.cy] for c in tiled.cells])
    d = np.hypot(ctr[:, None, 0] - ctr[None, :, 0], ctr[:, None, 1] - ctr[None, :, 1]) + np.eye(len(ctr)) * 1e9
    assert d.min() > 5, "a cell was reported by two tiles"


def test_registered_detector_is_used_by_name():
    class OneCell:
        name, version = "one", "0"

        def params(self):
            return {}

        def detect(self, rgb, keep_labels=False):
            from reddino.data.detect import Cell, Detection

            h, w = rgb.shape[:2]
            lab = np.zeros((h, w), np.int32)
            lab[h // 2 - 5:h // 2 + 5, w // 2 - 5:w // 2 + 5] = 1
            return Detection([Cell(w / 2, h / 2, w // 2 - 5, h // 2 - 5, w // 2 + 5, h // 2 + 5, 100)], "one", "0", 5.0,
                             labels=lab if keep_labels else None)

    register_detector("one", lambda **kw: OneCell())
    assert "one" in detectors()
    assert get_detector("one").detect(np.zeros((40, 40, 3), np.uint8)).n == 1


# --------------------------------------------------------------------------- real smears


@pytest.mark.skipif(not CHULA.is_dir(), reason=f"Chula RBC-12 not found at {CHULA} (shared data absent)")
@pytest.mark.parametrize("n, min_recall", [(1, 0.92), (250, 0.95), (27, 0.85), (707, 0.95)])
def test_chula_smears_recall_of_labelled_centres(n, min_recall):
    from reddino.data.images import decode_image_strict

    img = decode_image_strict((CHULA / "Dataset" / f"{n}.jpg").read_bytes())
    pts, _ = chula_points(CHULA / "Label" / f"{n}.txt")
    det = get_detector().detect(img, keep_labels=True)
    m = match_centres(det, pts)
    assert m.recall >= min_recall, (n, m.recall, m.n_labels, det.n)
    if n in (1, 250):  # fully labelled images: few detections without a label
        pairs, split, merged = touching_pairs(pts, m, 2 * det.radius)
        assert merged <= 0.15 * max(pairs, 1)
        whole = [i for i, c in enumerate(det.cells) if BORDER_CUT not in c.flags]
        hit = set(m.label_to_cell[m.label_to_cell >= 0].tolist())
        assert sum(i in hit for i in whole) / len(whole) >= 0.9


@pytest.mark.skipif(not CHULA.is_dir(), reason=f"Chula RBC-12 not found at {CHULA} (shared data absent)")
def test_dense_chula_fields_clumps_are_cut_into_as_many_cells_as_their_area_holds():
    # photos 251 and 263: clumps of overlapping cells; clump_cell_area 1.1 matched 0.868 of their centres, 1.05 0.892
    from reddino.data.images import decode_image_strict

    hit = tot = 0
    for n in (251, 263):
        img = decode_image_strict((CHULA / "Dataset" / f"{n}.jpg").read_bytes())
        pts, _ = chula_points(CHULA / "Label" / f"{n}.txt")
        m = match_centres(get_detector().detect(img, keep_labels=True), pts)
        hit, tot = hit + m.matched, tot + m.n_labels
    assert hit / tot >= 0.88, (hit, tot)


@pytest.mark.skipif(not BCCD.is_dir(), reason=f"BCCD not found at {BCCD} (shared data absent)")
def test_bccd_smears_rbc_boxes_found_and_white_cells_not_reported():
    from reddino.data.images import decode_image_strict

    hit = tot = wbc_rep = 0
    for n in ("00001", "00030", "00050", "00100"):
        img = decode_image_strict((BCCD / "JPEGImages" / f"BloodImage_{n}.jpg").read_bytes())
        boxes = voc_boxes(BCCD / "Annotations" / f"BloodImage_{n}.xml")
        det = get_detector().detect(img)
        rbc = np.array([b for name, b in boxes if name == "RBC"])
        hit += int((match_boxes(rbc, cell_boxes(det)) >= 0).sum())
        tot += len(rbc)
        wbc = np.array([b for name, b in boxes if name == "WBC"]).reshape(-1, 4)
        wbc_rep += int((match_boxes(wbc, cell_boxes(det)) >= 0).sum())
    assert hit / tot >= 0.5, (hit, tot)  # 35/64 measured: BCCD cells overlap (see the README for the gap)
    assert wbc_rep == 0


@pytest.mark.skipif(not BCCD.is_dir(), reason=f"BCCD not found at {BCCD} (shared data absent)")
def test_bccd_cell_size_is_not_fooled_by_platelets_and_overlapping_cells_are_split():
    # detector 1.1 estimated radii of 11-29 px on these photos (platelets and debris outnumber the cells'
    # distance maxima; the cells are ~50 px in radius) and cut every cell into pieces: 26/93 boxes found.
    # 1.2 (debris-robust scale, circle-Hough split of overlapping cells) measured 74/93.
    from reddino.data.images import decode_image_strict

    hit = tot = 0
    for n in ("00030", "00050", "00100", "00124", "00229", "00365", "00407"):
        img = decode_image_strict((BCCD / "JPEGImages" / f"BloodImage_{n}.jpg").read_bytes())
        rbc = np.array([b for name, b in voc_boxes(BCCD / "Annotations" / f"BloodImage_{n}.xml") if name == "RBC"])
        det = get_detector().detect(img)
        half = float(np.median(np.sqrt((rbc[:, 2] - rbc[:, 0]) * (rbc[:, 3] - rbc[:, 1])))) / 2
        assert 0.7 * half <= det.radius <= 1.25 * half, (n, det.radius, half)
        hit += int((match_boxes(rbc, cell_boxes(det)) >= 0).sum())
        tot += len(rbc)
    assert hit / tot >= 0.7, (hit, tot)


# --------------------------------------------------------------------------- ingest with detection


@pytest.fixture(scope="module")
def smear_folder(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("smears")
    src = root / "lab"
    (src / "day1").mkdir(parents=True)
    truth = {}
    for i in range(3):
        img, cells = _smear(i, n_cells=12, touching=2)
        (src / "day1" / f"s{i}.png").write_bytes(_png(img))
        truth[f"day1/s{i}.png"] = cells
    img, _ = _smear(3, n_cells=8, touching=1)
    Image.fromarray(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)).save(src / "grey.png")
    Image.fromarray(np.concatenate([img, np.full(img.shape[:2] + (1,), 255, np.uint8)], 2)).save(src / "rgba.png")
    buf = io.BytesIO()
    Image.fromarray((cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).astype(np.uint16) * 257)).save(buf, format="PNG")
    (src / "deep16.png").write_bytes(buf.getvalue())
    (src / "white.png").write_bytes(_png(np.full((200, 300, 3), 255, np.uint8)))
    (src / "notes.txt").write_text("not an image")
    return src, truth


def test_ingest_folder_with_detection_rows_skips_manifest_and_rerun(smear_folder, tmp_path):
    src, truth = smear_folder
    out = tmp_path / "cells"
    m = ingest("folder", src, out, detect=True, workers=1, progress=False)
    table = pq.read_table(sorted(out.glob("*.parquet"))[0]).to_pandas()
    for f in sorted(out.glob("*.parquet"))[1:]:
        table = table._append(pq.read_table(f).to_pandas())
    skipped = {s["file"]: s["reason"] for s in m["skipped"]}
    assert "notes.txt" in skipped and "not a recognised image" in skipped["notes.txt"]
    assert "white.png" in skipped and skipped["white.png"].startswith("no cells detected")
    groups = set(table["group"])
    assert {"day1/s0", "day1/s1", "day1/s2", "grey", "rgba", "deep16"} <= groups
    cfg = m["meta"]["config"]["detect"]
    assert cfg["name"] == "classical" and cfg["version"] and "min_od" in cfg["params"]
    assert m["meta"]["detection"]["cells"] == len(table)
    # every synthetic cell of the colour smears is a row, with its centre in the image_id
    for rel, cells in truth.items():
        rows = table[table["group"] == rel[:-4]]
        info = [parse_cell_id(i) for i in rows["image_id"]]
        assert all(d is not None and d["smear"] == rel for d in info)
        got = np.array([[d["cx"], d["cy"]] for d in info])
        near = [np.hypot(*(got - [c["x"], c["y"]]).T).min() < 0.5 * c["r"] for c in cells]
        assert np.mean(near) >= 0.9, (rel, np.mean(near))
        side = info[0]["crop"][2]
        assert all(d["crop"][2] == side for d in info) and rows["height"].eq(side).all()
    assert table["label"].isna().all() and table["unit"].eq("cell").all()
    again = ingest("folder", src, out, detect=True, workers=2, progress=False)  # same settings: same dataset
    assert again["content_hash"] == m["content_hash"]
    with pytest.raises(IngestError, match="--unit cell"):
        ingest("folder", src, tmp_path / "x", unit="patch", detect=True, progress=False)
    with pytest.raises(IngestError, match="unknown parameter"):
        ingest("folder", src, tmp_path / "y", detect=True, detector_params={"bogus": 1}, progress=False)


@pytest.mark.skipif(not CHULA.is_dir(), reason=f"Chula RBC-12 not found at {CHULA} (shared data absent)")
def test_ingest_chula_with_detection_attaches_matched_labels(tmp_path):
    src = tmp_path / "chula"
    (src / "Dataset").mkdir(parents=True)
    (src / "Label").mkdir()
    for n in (1, 250):
        (src / "Dataset" / f"{n}.jpg").write_bytes((CHULA / "Dataset" / f"{n}.jpg").read_bytes())
        (src / "Label" / f"{n}.txt").write_text((CHULA / "Label" / f"{n}.txt").read_text())
    (src / "Dataset" / "5.jpg").write_bytes((CHULA / "Dataset" / "5.jpg").read_bytes())  # its labels not copied
    m = ingest("chula", src, tmp_path / "out", detect=True, detect_crop_size=80, workers=1, progress=False)
    n_labels = sum(len(chula_points(src / "Label" / f"{n}.txt")[0]) for n in (1, 250))
    det = m["meta"]["detection"]
    assert det["smears"] == 3 and m["num_rows"] == det["cells"]
    labelled = m["num_rows"] - m["unlabelled"]
    assert labelled == n_labels - det["labels_unmatched"] and labelled >= 0.93 * n_labels
    assert json.loads(json.dumps(m["meta"]["config"]))["detect"]["crop_size"] == 80


def test_ingest_with_detection_on_ray_writes_the_same_dataset(smear_folder, tmp_path, ray_local):
    """`--ray`: the per-smear work runs as Ray tasks; the rows, their order and the manifest are the same."""
    src, _ = smear_folder
    local = ingest("folder", src, tmp_path / "local", detect=True, workers=1, progress=False)
    on_ray = ingest("folder", src, tmp_path / "ray", detect=True, use_ray=True, progress=False)
    assert on_ray["content_hash"] == local["content_hash"] and on_ray["num_rows"] == local["num_rows"]
    assert on_ray["meta"]["detection"] == local["meta"]["detection"]
    assert {s["file"] for s in on_ray["skipped"]} == {s["file"] for s in local["skipped"]}
    first = lambda d: pq.read_table(sorted(d.glob("*.parquet"))[0]).column("image_id").to_pylist()  # noqa: E731
    assert first(tmp_path / "ray") == first(tmp_path / "local")
