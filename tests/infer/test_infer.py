"""embed / probe fit / classify / serving on real parts: Ray Data, Parquet, sqlite MLflow, the MLflow scoring server."""

import base64
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score

from reddino.data import generate_synthetic, load_table, write_dataset
from reddino.evaluate.compute import compute_features
from reddino.features.extract import extract_features
from reddino.features.models import resolve_model
from reddino.infer.classify import classify
from reddino.features import EmbedError, embed, read_embeddings
from reddino.infer.probe import fit_probe, load_probe
from reddino.model import create_backbone, export_backbone
from reddino.registry import list_models, register_backbone
from reddino.runtime import free_port


def _export(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    return export_backbone(create_backbone("vit_tiny_patch14_reddino", img_size=56), path / "backbone.safetensors")


def _reshard(src: Path, dst: Path, rows: int) -> Path:
    write_dataset([load_table([src])], dst, max_rows_per_shard=rows)
    return dst


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("infer")
    generate_synthetic(root / "a0", n_per_class=6, sources=2, unit="cell", seed=0)
    generate_synthetic(root / "b0", n_per_class=4, sources=2, unit="cell", seed=1)
    return {
        "root": root,
        "train": _reshard(root / "a0", root / "train", 40),  # 108 cells in 3 shards
        "test": root / "b0",
        "bb1": _export(root / "bb1", 0),
        "bb2": _export(root / "bb2", 1),
    }


def test_embed_equals_evaluate_features_and_resumes_without_recomputing(world, ray_local, tmp_path):
    out = tmp_path / "emb"
    stop = {"after": 1}

    def interrupt(name):
        stop["after"] -= 1
        if stop["after"] < 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        embed(str(world["bb1"]), world["train"], out, batch_size=16, progress=False, on_shard=interrupt)
    assert not out.exists()  # nothing half-written where the user looks
    partial = tmp_path / ".emb.partial"
    finished = sorted(p.name for p in partial.glob("emb-*.parquet"))
    assert len(finished) == 2
    mtimes = {n: (partial / n).stat().st_mtime_ns for n in finished}

    res = embed(str(world["bb1"]), world["train"], out, batch_size=16, progress=False)
    assert (res.written, res.reused) == (1, 2)
    assert {n: (out / n).stat().st_mtime_ns for n in finished} == mtimes  # the finished shards were kept as is
    assert not partial.exists()

    table, X, manifest = read_embeddings(out)
    assert manifest["num_rows"] == X.shape[0] == 108 and X.shape[1] == 192 and manifest["dim"] == 192
    assert manifest["input"]["content_hash"] and manifest["model"]["hash"] and manifest["img_size"] == 56
    assert pq.read_schema(out / "emb-00000.parquet").field("embedding").type.list_size == 192
    # Other tools read the folder as is.
    assert len(pd.read_parquet(out)) == 108

    model, info = resolve_model(str(world["bb1"]))
    fs = compute_features(model, info, world["train"], cache_dir=None, use_ray=False, precision=manifest["precision"])
    ids = table.column("image_id").to_pylist()
    ref = dict(zip(fs.image_ids.tolist(), fs.features))
    np.testing.assert_allclose(X, np.stack([ref[i] for i in ids]), rtol=1e-5, atol=1e-5)

    again = embed(str(world["bb1"]), world["train"], out, progress=False)  # complete: nothing to do
    assert again.written == 0
    with pytest.raises(EmbedError, match="another model"):
        embed(str(world["bb2"]), world["train"], out, progress=False)


def test_embed_bad_input_gives_one_clear_error_and_skips_undecodable_images(world, ray_local, tmp_path):
    (tmp_path / "notdata").mkdir()
    (tmp_path / "notdata" / "x.parquet").write_bytes(b"PAR1")
    with pytest.raises(EmbedError, match="notdata.*no _manifest.json"):
        embed(str(world["bb1"]), tmp_path / "notdata", tmp_path / "o1", progress=False)
    with pytest.raises(EmbedError, match="model 'models:/nope@champion'"):
        embed("models:/nope@champion", world["test"], tmp_path / "o2", progress=False)
    with pytest.raises(EmbedError, match="does-not-exist"):
        embed(str(tmp_path / "does-not-exist"), world["test"], tmp_path / "o3", progress=False)
    assert not any((tmp_path / n).exists() for n in ("o1", "o2", "o3"))

    rows = load_table([world["test"]]).slice(0, 5).to_pylist()
    rows[2]["image"] = b"\x89PNG\r\n\x1a\nnot really a png"
    rows[2]["sha256"] = None
    write_dataset(rows, tmp_path / "broken")
    res = embed(str(world["bb1"]), tmp_path / "broken", tmp_path / "o4", progress=False)
    assert res.manifest["num_rows"] == 4
    assert res.manifest["skipped"]["count"] == 1
    assert res.manifest["skipped"]["examples"][0]["image_id"] == rows[2]["image_id"]


def test_probe_fit_register_classify_reproduces_held_out_accuracy(world, ray_local, mlflow_uri, tmp_path):
    mv = register_backbone(str(world["bb1"]), name="bbx")
    ref = f"models:/bbx/{mv.version}"
    probe = fit_probe(ref, world["train"], register="bbx-probe", out=tmp_path / "probe", cache_dir=tmp_path / "c")
    assert probe.meta["backbone"] == f"bbx/{mv.version}" and probe.meta["kfold"]["folds"] == 5
    assert 0 < probe.meta["kfold"]["balanced_accuracy_mean"] <= 1
    rows = {r["name"]: r for r in list_models()}
    assert rows["bbx-probe"]["kind"] == "probe" and rows["bbx-probe"]["backbone"] == f"bbx/{mv.version}"

    res = classify("models:/bbx@candidate", "models:/bbx-probe@candidate", world["test"], tmp_path / "cls",
                   progress=False)
    # The same number as fitting on train features and scoring held-out test features directly.
    model, info = resolve_model(ref)
    test_fs = compute_features(model, info, world["test"], cache_dir=None, use_ray=False)
    local = load_probe(tmp_path / "probe")
    order = {i: k for k, i in enumerate(test_fs.image_ids.tolist())}
    direct = local.estimator.predict(test_fs.features)
    assert res.metrics["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(test_fs.labels, direct))
    got = res.predictions.set_index("image_id")["class_id"]
    assert all(got[i] == direct[order[i]] for i in order)

    by_smear = pd.read_csv(res.files["by_smear"])
    fracs = by_smear[[c for c in by_smear.columns if c.startswith("frac_")]].sum(axis=1)
    np.testing.assert_allclose(fracs, 1.0, atol=1e-3)
    assert by_smear["cells"].sum() == len(res.predictions) == len(test_fs)
    assert set(pd.read_csv(res.files["by_source"])["source"]) == set(test_fs.sources)
    assert Path(res.files["plot"]).read_bytes()[:4] == b"\x89PNG"
    assert {"class_name", "confidence"} <= set(pd.read_csv(res.files["csv"]).columns)


def test_classify_refuses_a_probe_of_another_backbone(world, ray_local, mlflow_uri, tmp_path):
    v1 = register_backbone(str(world["bb1"]), name="bby")
    v2 = register_backbone(str(world["bb2"]), name="bby")
    fit_probe(f"models:/bby/{v1.version}", world["train"], out=tmp_path / "p", cache_dir=tmp_path / "c")
    with pytest.raises(EmbedError, match=f"fitted on backbone bby/{v1.version}.*bby/{v2.version}"):
        classify(f"models:/bby/{v2.version}", str(tmp_path / "p"), world["test"], tmp_path / "cls", progress=False)
    assert not (tmp_path / "cls").exists()



def test_embed_then_evaluate_and_probe_fit_read_the_store(world, ray_local, tmp_path, monkeypatch):
    """`reddino embed`, then `reddino evaluate`, `reddino probe fit` and `reddino classify` on the same model and
    data: the model runs once; a change of setting (pooling) or a deleted embed folder runs it again."""
    import reddino.features.embedding as E
    from typer.testing import CliRunner

    from reddino.cli import app

    monkeypatch.setenv("REDDINO_HOME", str(tmp_path / "home"))  # the default store root and its index
    bb, emb = str(world["bb1"]), tmp_path / "emb"
    res = CliRunner().invoke(app, ["embed", "--model", bb, "--data", str(world["train"]), "--out", str(emb)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    table, X, _ = read_embeddings(emb)

    ran = []
    for name in ("run_local", "run_ray"):
        real = getattr(E, name)
        monkeypatch.setattr(E, name, lambda *a, _real=real, **k: (ran.append(1), _real(*a, **k))[1])
    out = tmp_path / "eval"
    res = CliRunner().invoke(app, ["evaluate", "--model", bb, "--data", str(world["train"]), "--out", str(out),
                                   "--folds", "3", "--no-probe", "--no-mlflow", "--embedding", "none", "--no-ray"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    result = json.loads((out / "results.json").read_text())["models"][0]["evals"][0]["result"]
    assert result["cached_features"] and not ran
    probe = fit_probe(bb, world["train"], folds=3, out=tmp_path / "probe")
    assert not ran and probe.meta["data"]["rows"] == 108
    cls = classify(bb, str(tmp_path / "probe"), world["train"], tmp_path / "cls", progress=False)
    assert not ran and len(cls.predictions) == 108 and cls.files["embeddings"] == str(emb.resolve())
    fs = compute_features(*resolve_model(bb), world["train"], use_ray=False)  # the default root, as the CLI
    ids = table.column("image_id").to_pylist()
    np.testing.assert_array_equal(np.stack([dict(zip(fs.image_ids.tolist(), fs.features))[i] for i in ids]), X)
    assert fs.meta["cached"] and not ran

    compute_features(*resolve_model(bb), world["train"], use_ray=False, pooling="cls+mean")
    assert len(ran) == 1  # another job: the model ran
    import shutil

    shutil.rmtree(emb)
    again = compute_features(*resolve_model(bb), world["train"], use_ray=False)
    assert len(ran) == 2 and not again.meta["cached"]  # the listed folder is gone: computed, not read from nothing
    np.testing.assert_allclose(again.features, fs.features, atol=1e-5)


def _serve(model_uri: str, tmp_path: Path, tag: str):
    return _ready(*_start_server(model_uri, tmp_path, tag), tmp_path, tag)


def _start_server(model_uri: str, tmp_path: Path, tag: str):
    port = free_port()
    log = open(tmp_path / f"serve-{tag}.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        # mlflow execs `uvicorn` by name: the venv's bin dir must be on PATH, as in an activated venv.
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"})
    return proc, f"http://127.0.0.1:{port}"


def _ready(proc, url: str, tmp_path: Path, tag: str):
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError((tmp_path / f"serve-{tag}.log").read_text()[-3000:])
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise TimeoutError(f"mlflow models serve did not answer on {url}")


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(f"{url}/invocations", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def _stop(proc) -> None:
    import signal

    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def test_mlflow_scoring_server_answers_embeddings_and_probe_predictions(world, mlflow_uri, tmp_path):
    from reddino.data import decode_image
    from reddino.infer.probe import register_probe

    register_backbone(str(world["bb1"]), name="bbs")
    blobs = load_table([world["test"]], columns=["image"]).column("image").to_pylist()[:2]
    model, _ = resolve_model(str(world["bb1"]))
    local = extract_features(model, [decode_image(b) for b in blobs])

    probe = fit_probe(str(world["bb1"]), world["train"], cache_dir=tmp_path / "c")
    register_probe(probe, "bbs-probe")
    # Both servers start side by side (each spends its start-up importing MLflow and torch).
    servers = {tag: _start_server(uri, tmp_path, tag)
               for tag, uri in (("bb", "models:/bbs@candidate"), ("probe", "models:/bbs-probe@candidate"))}
    try:
        (_, url), (_, probe_url) = (_ready(*servers[tag], tmp_path, tag) for tag in ("bb", "probe"))
        body = {"dataframe_split": {"columns": ["image"],
                                    "data": [[base64.b64encode(b).decode()] for b in blobs]}}
        emb = np.asarray(_post(url, body)["predictions"], dtype=np.float32)
        preds = _post(probe_url, {"inputs": emb.tolist()})["predictions"]
    finally:
        for proc, _ in servers.values():
            _stop(proc)
    assert emb.shape == (2, 192)
    np.testing.assert_allclose(emb, local, rtol=1e-4, atol=1e-4)
    assert preds == probe.estimator.predict(local).tolist()


# Small members of the DINOv3-era families (the backbone contract, reddino.model.family)
_FAMILY_ARCHS = {
    "eva": ("vit_small_patch16_dinov3_qkvb", {"patch_size": 8}, {"depth": 1, "embed_dim": 64, "num_heads": 2}),
    "convnext": ("convnext_atto", {}, {"depths": (1, 1, 1, 1), "dims": (16, 32, 64, 128)}),
}


@pytest.mark.slow
@pytest.mark.parametrize("fam", list(_FAMILY_ARCHS))
def test_family_backbone_export_register_embed_serve(fam, world, ray_local, mlflow_uri, tmp_path):
    from reddino.data import decode_image
    from reddino.model import family, load_backbone

    arch, kw, timm_kwargs = _FAMILY_ARCHS[fam]
    torch.manual_seed(0)
    bb = create_backbone(arch, 56, kw.get("patch_size"), timm_kwargs=timm_kwargs)
    path = export_backbone(bb, tmp_path / fam / "backbone.safetensors")
    back = load_backbone(path)
    assert family.family_of(back).name == fam
    assert all(torch.equal(v, bb.state_dict()[k]) for k, v in back.state_dict().items())

    register_backbone(str(path), name=f"bb-{fam}")
    out = tmp_path / "emb"
    embed(f"models:/bb-{fam}@candidate", world["test"], out, batch_size=16, progress=False, precision="fp32")
    table, X, manifest = read_embeddings(out)
    dim = family.embed_dim(bb)
    assert X.shape == (table.num_rows, dim) and manifest["dim"] == dim
    src = load_table([world["test"]], columns=["image_id", "image"])
    blobs = src.column("image").to_pylist()
    local = extract_features(back, [decode_image(b) for b in blobs])
    ref = dict(zip(src.column("image_id").to_pylist(), local))
    ids = table.column("image_id").to_pylist()
    np.testing.assert_allclose(X, np.stack([ref[i] for i in ids]), rtol=1e-4, atol=1e-4)  # the contract's features

    proc, url = _serve(f"models:/bb-{fam}@candidate", tmp_path, fam)
    try:
        body = {"dataframe_split": {"columns": ["image"],
                                    "data": [[base64.b64encode(b).decode()] for b in blobs[:2]]}}
        emb = np.asarray(_post(url, body)["predictions"], dtype=np.float32)
    finally:
        _stop(proc)
    np.testing.assert_allclose(emb, local[:2], rtol=1e-4, atol=1e-4)
