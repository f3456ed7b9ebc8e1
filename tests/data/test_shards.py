import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from reddino.data import (
    RBC_SCHEMA,
    SCHEMA_VERSION,
    DatasetExistsError,
    ManifestError,
    SchemaError,
    load_table,
    manifest_hash,
    read_manifest,
    validate_table,
    write_dataset,
)
from reddino.data import shards as shards_mod
from reddino.data.images import encode_image
from reddino.data.schema import make_row, sha256_hex
from reddino.data.shards import content_hash_of
from reddino.data.synth import render_cell, source_styles


def cell(cls: int, seed: int, size: int = 48) -> np.ndarray:
    """A synthetic single-cell RGB image (same helper as conftest; not imported to keep module names unique)."""
    return render_cell(cls, source_styles(1)[0], np.random.default_rng([7, cls, seed]), size)


def _rows(n=10, source="s1", label=True, offset=0):
    out = []
    for i in range(offset, offset + n):
        img = encode_image(cell(i % 9, i, 32), "png" if i % 2 else "jpeg")
        out.append(make_row(img, height=32, width=32, source=source, group=f"g{i % 3}", unit="cell",
                            image_id=f"img{i}.png", label=(i % 4) if label else None,
                            label_name=f"class{i % 4}" if label else None))
    return out


def test_round_trip_bytes_and_types(tmp_path):
    rows = _rows(12)
    m = write_dataset(rows, tmp_path / "ds", {"command": "test", "config": {"a": 1}}, max_rows_per_shard=5)
    assert m.num_rows == 12 and len(m["shards"]) == 3
    assert [s["rows"] for s in m["shards"]] == [5, 5, 2]
    assert [s["file"] for s in m["shards"]] == ["shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"]
    schema = pq.read_schema(tmp_path / "ds" / "shard-00000.parquet")
    assert schema.remove_metadata().equals(RBC_SCHEMA.remove_metadata())
    t = load_table(tmp_path / "ds")
    assert t.schema.equals(RBC_SCHEMA)
    assert t.column("image").to_pylist() == [r["image"] for r in rows]  # bytes identical, order kept
    assert t.column("sha256").to_pylist() == [sha256_hex(r["image"]) for r in rows]
    assert t.schema.field("height").type == pa.int32() and t.schema.field("label").type == pa.int32()
    validate_table(t, "round trip", check_hashes=True)
    assert m["labels"]["0"] == {"name": "class0", "count": 3}
    assert m["sources"] == {"s1": 12} and m["units"] == {"cell": 12} and m["unlabelled"] == 0
    assert m["schema_version"] == SCHEMA_VERSION
    assert manifest_hash(tmp_path / "ds") == content_hash_of(r["sha256"] for r in rows)
    for s in m["shards"]:
        assert shards_mod.file_sha256(tmp_path / "ds" / s["file"]) == s["sha256"]
    read_manifest(tmp_path / "ds", verify=True)


def test_bytes_bound_and_tables_as_input(tmp_path):
    rows = _rows(8)
    table = pa.Table.from_pylist(rows[4:], schema=RBC_SCHEMA)
    bound = 2 * max(len(r["image"]) for r in rows) + 600
    m = write_dataset([*rows[:4], table], tmp_path / "ds", max_bytes_per_shard=bound)
    assert m.num_rows == 8 and len(m["shards"]) >= 3
    t = load_table(tmp_path / "ds")
    assert t.column("image").to_pylist() == [r["image"] for r in rows]
    start = 0
    for s in m["shards"]:
        assert sum(len(b) + 256 for b in t.column("image").to_pylist()[start : start + s["rows"]]) <= bound
        start += s["rows"]


def test_dedup_and_unlabelled(tmp_path):
    rows = _rows(4, label=False)
    dup = dict(rows[1], image_id="again.png", source="s2")
    m = write_dataset([*rows, dup], tmp_path / "ds")
    assert m.num_rows == 4 and m["duplicates"]["count"] == 1
    assert m["duplicates"]["examples"] == [{"image_id": "again.png", "duplicate_of": "img1.png"}]
    assert m["unlabelled"] == 4 and m["labels"] == {} and m["sources"] == {"s1": 4}


def test_validate_table_errors(tmp_path):
    t = pa.Table.from_pylist(_rows(2), schema=RBC_SCHEMA)
    with pytest.raises(SchemaError, match=r"shard-x.parquet: missing field\(s\) \['unit'\]"):
        validate_table(t.drop(["unit"]), "shard-x.parquet")
    bad = t.set_column(t.schema.get_field_index("unit"), "unit", pa.array(["cell", "blob"]))
    with pytest.raises(SchemaError, match="f.parquet: field 'unit' has value 'blob'"):
        validate_table(bad, "f.parquet")
    bad = t.set_column(t.schema.get_field_index("height"), "height", pa.array(["a", "b"]))
    with pytest.raises(SchemaError, match="field 'height' has type string"):
        validate_table(bad, "f.parquet")
    bad = t.set_column(t.schema.get_field_index("source"), "source", pa.array([None, "x"], pa.string()))
    with pytest.raises(SchemaError, match="field 'source' has 1 null"):
        validate_table(bad, "f.parquet")
    bad = t.set_column(t.schema.get_field_index("sha256"), "sha256", pa.array(["abc", "def"]))
    with pytest.raises(SchemaError, match="field 'sha256'"):
        validate_table(bad, "f.parquet")
    cast = t.set_column(t.schema.get_field_index("height"), "height", t.column("height").cast(pa.int64()))
    assert validate_table(cast).schema.field("height").type == pa.int32()
    with pytest.raises(SchemaError, match=r"input row #0 \(\?\): missing field"):
        write_dataset([{"image": b"x"}], tmp_path / "ds")
    with pytest.raises(SchemaError, match="input row #1 \\(img1.png\\): field 'sha256' does not match"):
        write_dataset([*_rows(1), dict(_rows(2)[1], sha256="0" * 64)], tmp_path / "ds")
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_failure_leaves_nothing(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = shards_mod.write_shard

    def flaky(table, path, row_group_size=1024):
        calls["n"] += 1
        if calls["n"] == 2:
            with open(path, "wb") as f:  # half-written shard, then crash
                f.write(b"PAR1 partial")
            raise OSError("disk full (simulated)")
        return real(table, path, row_group_size)

    monkeypatch.setattr(shards_mod, "write_shard", flaky)
    with pytest.raises(OSError, match="simulated"):
        write_dataset(_rows(6), tmp_path / "ds", max_rows_per_shard=2)
    assert list(tmp_path.iterdir()) == []  # no out dir, no temp dir, no manifest, no partial shards

    # with an existing dataset: a failed overwrite keeps the old one intact and readable
    monkeypatch.setattr(shards_mod, "write_shard", real)
    m_old = write_dataset(_rows(3), tmp_path / "ds")
    calls["n"] = 0
    monkeypatch.setattr(shards_mod, "write_shard", flaky)
    with pytest.raises(OSError):
        write_dataset(_rows(6, offset=50), tmp_path / "ds", max_rows_per_shard=2, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
    assert read_manifest(tmp_path / "ds", verify=True).content_hash == m_old.content_hash
    assert load_table(tmp_path / "ds").num_rows == 3


def test_rows_generator_error_cleans_up(tmp_path):
    def gen():
        yield from _rows(2)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        write_dataset(gen(), tmp_path / "ds")
    assert list(tmp_path.iterdir()) == []


def test_existing_dataset_rules(tmp_path):
    meta = {"command": "x", "config": {"k": 1}}
    m1 = write_dataset(_rows(3), tmp_path / "ds", meta)
    text = (tmp_path / "ds" / "_manifest.json").read_text()
    m2 = write_dataset(_rows(3), tmp_path / "ds", {"command": "y", "config": {"k": 1}})
    assert (tmp_path / "ds" / "_manifest.json").read_text() == text and m2.content_hash == m1.content_hash
    with pytest.raises(DatasetExistsError, match="different dataset"):
        write_dataset(_rows(3), tmp_path / "ds", {"config": {"k": 2}})
    with pytest.raises(DatasetExistsError, match="different dataset"):
        write_dataset(_rows(4), tmp_path / "ds", meta)  # same config, different content
    m3 = write_dataset(_rows(4), tmp_path / "ds", meta, overwrite=True)
    assert m3.num_rows == 4 and read_manifest(tmp_path / "ds").num_rows == 4
    (tmp_path / "empty").mkdir()
    assert write_dataset(_rows(1), tmp_path / "empty").num_rows == 1


def test_read_manifest_errors(tmp_path):
    with pytest.raises(ManifestError, match="does not exist"):
        read_manifest(tmp_path / "nope")
    (tmp_path / "d").mkdir()
    with pytest.raises(ManifestError, match=f"{tmp_path / 'd'} has no _manifest.json"):
        read_manifest(tmp_path / "d")
    write_dataset(_rows(2), tmp_path / "ds")
    mp = tmp_path / "ds" / "_manifest.json"
    data = json.loads(mp.read_text())
    data["schema_version"] = 999
    mp.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="schema version 999"):
        read_manifest(tmp_path / "ds")
    with pytest.raises(ManifestError, match="schema version 999"):
        load_table(tmp_path / "ds")


def test_dataset_dir_opens_in_other_parquet_readers(tmp_path):
    import pandas as pd
    import pyarrow.dataset as pads

    from reddino.data import load_table

    m = write_dataset(_rows(5), tmp_path / "ds")
    # Parquet readers skip "_"-prefixed files: the dir reads as is, every row once.
    df = pd.read_parquet(tmp_path / "ds")
    assert len(df) == 5 and {"image", "sha256", "source"} <= set(df.columns)
    assert pads.dataset(tmp_path / "ds", format="parquet").count_rows() == 5
    assert read_manifest(tmp_path / "ds").content_hash == m.content_hash
    assert load_table([tmp_path / "ds"]).num_rows == 5


def test_verify_finds_what_the_manifest_alone_does_not(tmp_path):
    from typer.testing import CliRunner

    from reddino.cli import app
    from reddino.data.shards import verify_dataset

    m = write_dataset(_rows(6), tmp_path / "ds")
    assert verify_dataset(tmp_path / "ds").num_rows == 6
    shard = m.shard_paths[0]
    runner = CliRunner()
    assert runner.invoke(app, ["verify", str(tmp_path / "ds")]).exit_code == 0

    good = shard.read_bytes()
    shard.write_bytes(good[: len(good) // 2])  # truncated: read_manifest still says healthy
    read_manifest(tmp_path / "ds")
    with pytest.raises(ManifestError, match=f"{shard.name}.*truncated"):
        verify_dataset(tmp_path / "ds")
    res = runner.invoke(app, ["verify", str(tmp_path / "ds")])
    assert res.exit_code == 2 and shard.name in res.output

    # A column dropped (size and hash re-recorded as a careless rewrite would): named.
    shard.write_bytes(good)
    pq.write_table(pq.read_table(shard).drop(["group"]), shard)
    data = json.loads((tmp_path / "ds" / "_manifest.json").read_text())
    from reddino.data.shards import file_sha256

    data["shards"][0].update(bytes=shard.stat().st_size, sha256=file_sha256(shard))
    (tmp_path / "ds" / "_manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="column.*group"):
        verify_dataset(tmp_path / "ds")

    # An image that no longer decodes (bytes rewritten, size and hash re-recorded): the file and the row named.
    shard.write_bytes(good)
    table = pq.read_table(shard)
    images = table.column("image").to_pylist()
    images[1] = b"not an image"
    pq.write_table(table.set_column(table.schema.get_field_index("image"), "image",
                                    pa.array(images, type=table.schema.field("image").type)), shard)
    data["shards"][0].update(bytes=shard.stat().st_size, sha256=file_sha256(shard))
    (tmp_path / "ds" / "_manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=f"{shard.name}: row 1 .*does not decode"):
        verify_dataset(tmp_path / "ds")
    verify_dataset(tmp_path / "ds", decode=False)  # the bytes match the manifest: only decoding finds it
