import json
import os
from pathlib import Path

import numpy as np
import pytest

from reddino.data import CHULA_CLASSES, DatasetExistsError, IngestError, decode_image, ingest, load_table, read_manifest
from reddino.data.images import encode_image, sniff_format
from reddino.data.ingest import tile_grid
from reddino.data.synth import render_cell, source_styles


def cell(cls: int, seed: int, size: int = 48) -> np.ndarray:
    """A synthetic single-cell RGB image (same helper as conftest; not imported to keep module names unique)."""
    return render_cell(cls, source_styles(1)[0], np.random.default_rng([7, cls, seed]), size)


def _skips(m):
    return {s["file"]: s["reason"] for s in m["skipped"]}


def test_chula_cells(chula_tree, tmp_path):
    m = ingest("chula", chula_tree, tmp_path / "out", workers=1, progress=False, crop_size=64)
    assert m.num_rows == 6
    t = load_table(tmp_path / "out")
    assert set(t.column("source").to_pylist()) == {"chula-rbc-12"}
    assert set(t.column("unit").to_pylist()) == {"cell"}
    assert sorted(t.column("label").to_pylist()) == [0, 3, 4, 5, 6, 12]
    for lid, name in zip(t.column("label").to_pylist(), t.column("label_name").to_pylist()):
        assert CHULA_CLASSES[lid] == name
    assert set(t.column("group").to_pylist()) == {"1", "2"}
    for img, h, w in zip(t.column("image").to_pylist(), t.column("height").to_pylist(), t.column("width").to_pylist()):
        assert sniff_format(img) == "png" and decode_image(img).shape == (64, 64, 3) and (h, w) == (64, 64)
    ids = t.column("image_id").to_pylist()
    assert "Dataset/1.jpg#x=-30,y=-29,w=64,h=64" in ids  # corner cell: padded, not dropped
    assert any(i.startswith("Dataset/2.jpg#") for i in ids)  # PNG bytes named .jpg decoded fine
    sk = _skips(m)
    assert "outside" in sk["Label/1.txt:3"] and "Dataset/1.jpg" in sk["Label/1.txt:3"]
    assert "unparsable" in sk["Label/1.txt:4"]
    assert "unknown class id 99" in sk["Label/1.txt:5"]
    assert "Dataset/4.jpg" in sk and ("corrupt" in sk["Dataset/4.jpg"] or "truncated" in sk["Dataset/4.jpg"])
    assert m["labels"]["0"] == {"name": "Normal cell", "count": 1}
    assert m["labels"]["1"]["count"] == 0  # full class table kept
    assert m["meta"]["config"]["format"] == "chula"


def test_chula_crop_matches_source_pixels(chula_tree, tmp_path):
    ingest("chula", chula_tree, tmp_path / "out", workers=1, progress=False, crop_size=40)
    t = load_table(tmp_path / "out", labels=[0])
    crop = decode_image(t.column("image")[0].as_py())
    full = decode_image((chula_tree / "Dataset" / "1.jpg").read_bytes())
    assert np.array_equal(crop, full[80:120, 80:120])


def test_patch_tiling_count(chula_tree, tmp_path):
    m = ingest("chula", chula_tree, tmp_path / "p", unit="patch", patch_size=64, workers=1, progress=False)
    per_image = len(tile_grid(260, 300, 64))
    assert per_image == 16
    assert m.num_rows == 3 * per_image  # 1, 2 and the unlabelled 3; 4 is corrupt
    assert m["units"] == {"patch": 48} and m["unlabelled"] == 48 and m["labels"] == {}
    t = load_table(tmp_path / "p")
    assert set(t.column("height").to_pylist()) == {64} and t.column("label").null_count == 48
    assert "Dataset/1.jpg#x=22,y=2,w=64,h=64" in t.column("image_id").to_pylist()  # centred grid
    assert "Dataset/4.jpg" in _skips(m)


def test_tile_grid_centred():
    assert tile_grid(480, 640, 224) == [(16, 96), (16, 320), (240, 96), (240, 320)]
    assert tile_grid(100, 100, 224) == []


def test_voc(voc_tree, tmp_path):
    m = ingest("voc", voc_tree, tmp_path / "v", workers=1, progress=False)
    assert m.num_rows == 4
    assert m["classes"] == {"0": "Platelets", "1": "RBC", "2": "WBC"}
    assert m["sources"] == {"bccd": 4}
    sk = _skips(m)
    deg = [f for f in sk if "img_0.xml" in f]
    assert len(deg) == 1 and "degenerate" in sk[deg[0]] and "xmin=50" in deg[0]
    oor = [f for f in sk if "img_1.xml" in f]
    assert len(oor) == 1 and "out of range" in sk[oor[0]]
    t = load_table(tmp_path / "v", labels=[1])
    sizes = sorted(zip(t.column("width").to_pylist(), t.column("height").to_pylist()))
    assert sizes == [(50, 50), (320, 240)]  # VOC 1-based inclusive boxes


def test_voc_unknown_class_with_classes(voc_tree, tmp_path):
    m = ingest("voc", voc_tree, tmp_path / "v", workers=1, progress=False, classes=["RBC", "WBC"])
    assert m["classes"] == {"0": "RBC", "1": "WBC"}
    assert any("unknown class 'Platelets'" in s["reason"] and "img_1.xml" in s["file"] for s in m["skipped"])


def test_folder_labelled_dedup_keep_bytes(folder_tree, tmp_path):
    m = ingest("folder", folder_tree, tmp_path / "f", workers=1, progress=False)
    assert m.num_rows == 4  # x_copy.jpg has the same bytes as x.jpg
    assert m["duplicates"]["count"] == 1
    assert m["duplicates"]["examples"][0] == {"image_id": "b/x_copy.jpg", "duplicate_of": "b/x.jpg"}
    assert m["classes"] == {"0": "a", "1": "b"} and m["sources"] == {"folder": 4}
    t = load_table(tmp_path / "f")
    by_id = dict(zip(t.column("image_id").to_pylist(), t.column("image").to_pylist()))
    assert by_id["b/x.jpg"] == (folder_tree / "b" / "x.jpg").read_bytes()  # stored as is
    assert by_id["a/c0.png"] == (folder_tree / "a" / "c0.png").read_bytes()


def test_folder_unlabelled_flat(tmp_path):
    src = tmp_path / "flat"
    src.mkdir()
    for i in range(3):
        (src / f"{i}.png").write_bytes(encode_image(cell(2, i), "png"))
    m = ingest("folder", src, tmp_path / "o", workers=1, progress=False, encode="jpeg", source="lab-x")
    t = load_table(tmp_path / "o")
    assert m.num_rows == 3 and t.column("label").null_count == 3 and m["unlabelled"] == 3
    assert all(sniff_format(b) == "jpeg" for b in t.column("image").to_pylist())
    assert m["sources"] == {"lab-x": 3}


def test_folder_bad_inputs(folder_tree, tmp_path):
    good = (folder_tree / "a" / "c0.png").read_bytes()
    jpeg = encode_image(cell(3, 0, 64), "jpeg")
    (folder_tree / "a" / "trunc.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder_tree / "a" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    (folder_tree / "a" / "notes.txt").write_text("hello")
    (folder_tree / "empty").mkdir()
    (folder_tree / "c").mkdir()
    (folder_tree / "c" / "z.png").write_bytes(good[::-1][:10] + good)  # garbage prefix
    m = ingest("folder", folder_tree, tmp_path / "f", workers=1, progress=False, classes="a,b,empty")
    sk = _skips(m)
    assert "truncated" in sk["a/trunc.jpg"]
    assert "a/corrupt.png" in sk
    assert "not a recognised image" in sk["a/notes.txt"]
    assert sk["empty/"] == "empty class folder"
    assert "unknown class" in sk["c/"] and "1 file" in sk["c/"]
    assert m.num_rows == 4


def test_folder_empty_source_errors(tmp_path):
    (tmp_path / "src").mkdir()
    with pytest.raises(IngestError, match="no image files"):
        ingest("folder", tmp_path / "src", tmp_path / "o", workers=1, progress=False)
    with pytest.raises(IngestError, match="does not exist"):
        ingest("folder", tmp_path / "nope", tmp_path / "o", workers=1, progress=False)
    with pytest.raises(IngestError, match="missing"):
        ingest("chula", tmp_path / "src", tmp_path / "o", workers=1, progress=False)


def test_idempotent_reingest_and_conflicts(chula_tree, tmp_path):
    out = tmp_path / "out"
    m1 = ingest("chula", chula_tree, out, workers=1, progress=False)
    before = (out / "_manifest.json").read_bytes()
    m2 = ingest("chula", chula_tree, out, workers=2, progress=False)  # the process pool gives the same result
    assert (out / "_manifest.json").read_bytes() == before
    assert m2.content_hash == m1.content_hash and m2.num_rows == m1.num_rows
    assert sorted(p.name for p in out.iterdir()) == ["_manifest.json", "shard-00000.parquet"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp dirs left
    # a different dataset into the same dir: clear error before any work, unless --overwrite
    with pytest.raises(DatasetExistsError, match="different dataset"):
        ingest("chula", chula_tree, out, crop_size=32, workers=1, progress=False)
    m3 = ingest("chula", chula_tree, out, crop_size=32, workers=1, progress=False, overwrite=True)
    assert read_manifest(out)["meta"]["config"]["crop_size"] == 32 and m3.content_hash != m1.content_hash
    # same config, but the inputs changed underneath: detected from the content
    (chula_tree / "Label" / "2.txt").write_text("50 60 3\n")
    with pytest.raises(DatasetExistsError, match="different dataset"):
        ingest("chula", chula_tree, out, crop_size=32, workers=1, progress=False)
    # a non-empty dir that is not a dataset
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.txt").write_text("x")
    with pytest.raises(DatasetExistsError, match="not a reddino dataset"):
        ingest("chula", chula_tree, other, workers=1, progress=False)


def test_identical_smears_share_group(chula_tree, tmp_path):
    (chula_tree / "Dataset" / "9.jpg").write_bytes((chula_tree / "Dataset" / "2.jpg").read_bytes())
    (chula_tree / "Label" / "9.txt").write_text("60 60 0\n")
    m = ingest("chula", chula_tree, tmp_path / "o", workers=1, progress=False)
    t = load_table(tmp_path / "o", labels=[0])
    groups = dict(zip(t.column("image_id").to_pylist(), t.column("group").to_pylist()))
    assert groups["Dataset/9.jpg#x=20,y=20,w=80,h=80"] == "2"
    assert m["meta"]["identical_smears"] == {"9": "2"}


def test_manifest_json_fields(chula_tree, tmp_path):
    ingest("chula", chula_tree, tmp_path / "o", workers=1, progress=False, command="reddino ingest chula x")
    d = json.loads((tmp_path / "o" / "_manifest.json").read_text())
    for key in ("schema_version", "num_rows", "content_hash", "sources", "labels", "units", "shards",
                "skipped", "duplicates", "meta", "created", "classes"):
        assert key in d
    assert d["meta"]["command"] == "reddino ingest chula x"
    assert d["shards"][0]["file"] == "shard-00000.parquet" and len(d["shards"][0]["sha256"]) == 64


REAL = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.mark.skipif(
    not (REAL / "bccd" / "BCCD").is_dir() or os.environ.get("REDDINO_REAL_DATA") != "1",
    reason="real-data check: needs ../shared/data and REDDINO_REAL_DATA=1 (takes ~10 s on 2 cores)",
)
def test_real_bccd_boxes(tmp_path):
    m = ingest("voc", REAL / "bccd" / "BCCD", tmp_path / "b", progress=False, workers=2)
    assert m.num_rows == 4888 - 2
    assert len(m["skipped"]) == 2 and all("degenerate" in s["reason"] for s in m["skipped"])
    assert {v["name"]: v["count"] for v in m["labels"].values()} == {"Platelets": 361, "RBC": 4153, "WBC": 372}


def test_tiff_zstd_ingest_stores_the_same_pixels_as_png(chula_tree, tmp_path):
    kw = dict(unit="patch", patch_size=64, workers=1, progress=False)
    ingest("chula", chula_tree, tmp_path / "png", **kw)
    m = ingest("chula", chula_tree, tmp_path / "tz", encode="tiff-zstd", **kw)
    assert m["meta"]["config"]["encode"] == "tiff-zstd"
    png, tz = load_table(tmp_path / "png"), load_table(tmp_path / "tz")
    assert png.column("image_id").to_pylist() == tz.column("image_id").to_pylist()
    for a, b in zip(png.column("image").to_pylist(), tz.column("image").to_pylist()):
        assert sniff_format(b) == "tiff" and np.array_equal(decode_image(a), decode_image(b))
    with pytest.raises(IngestError, match="expected keep, png, jpeg, tiff-zstd"):
        ingest("chula", chula_tree, tmp_path / "x", encode="qoi", **kw)
