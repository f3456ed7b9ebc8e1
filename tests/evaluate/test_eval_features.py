import json

import numpy as np
import pyarrow as pa
import pytest

import reddino.features.embedding as E
from reddino.evaluate import extract_features, handcrafted_features, knn_score, resolve_model
from reddino.evaluate.compute import compute_features
from reddino.features.extract import resolve_precision
from reddino.evaluate.featureset import select_rows


def test_extract_features_cls_and_mean(tiny_vit, synth_table):
    model, info = tiny_vit
    assert info["kind"] == "random" and info["img_size"] == 28 and info["embed_dim"] == 192
    table = synth_table.slice(0, 10)
    cls = extract_features(model, table, 28, batch_size=4)
    both = extract_features(model, table.column("image").to_pylist(), 28, batch_size=64, pooling="cls+mean")
    assert cls.shape == (10, 192) and both.shape == (10, 384) and cls.dtype == np.float32
    np.testing.assert_allclose(both[:, :192], cls, atol=1e-5)  # batching does not change features
    model.train()
    extract_features(model, table, 28)
    assert model.training  # mode restored for the trainer
    model.eval()


def test_select_rows_is_deterministic_and_order_free(synth_table):
    a = select_rows(synth_table, max_images=50, seed=3)
    perm = np.random.default_rng(0).permutation(synth_table.num_rows)
    shuffled = synth_table.take(pa.array(perm))
    b = select_rows(shuffled, max_images=50, seed=3)
    assert len(a) == 50
    ids_a = set(synth_table.column("image_id").take(pa.array(a)).to_pylist())
    ids_b = set(shuffled.column("image_id").take(pa.array(b)).to_pylist())
    assert ids_a == ids_b
    assert set(select_rows(synth_table, exclude_labels=[2])) == set(
        np.nonzero(np.array(synth_table.column("label").to_pylist()) != 2)[0]
    )


def test_knn_score_in_process(tiny_vit, synth_table, synth_cells):
    model, _ = tiny_vit
    s1 = knn_score(model, synth_cells, img_size=28, k=20, max_images=120, seed=0)
    s2 = knn_score(model, synth_table, img_size=28, k=20, max_images=120, seed=0)
    assert s1["knn20_balanced_accuracy"] == pytest.approx(s2["knn20_balanced_accuracy"])
    assert {"knn20_balanced_accuracy", "knn1_balanced_accuracy", "knn20_accuracy", "knn20_f1_weighted"} <= set(s1)
    assert s1["n_images"] == 120
    held = knn_score(model, synth_table, img_size=28, max_images=120, folds=0.25, exclude_labels=[0, 1])
    assert held["n_classes"] == 7


def test_handcrafted_features_separate_synthetic_classes(synth_table):
    feats = handcrafted_features(synth_table.column("image").to_pylist()[:5])
    assert feats.shape[0] == 5 and np.isfinite(feats).all()
    score = knn_score("handcrafted", synth_table, k=20, max_images=None)
    chance = 1 / 9
    assert score["knn1_balanced_accuracy"] > 3 * chance
    assert score["knn20_balanced_accuracy"] > 3 * chance


def test_features_are_cached(tiny_vit, synth_cells, tmp_path, monkeypatch):
    model, info = tiny_vit
    calls = []
    real = E.run_local

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(E, "run_local", spy)
    fs1 = compute_features(model, info, synth_cells, img_size=28, cache_dir=tmp_path, use_ray=False)
    assert len(calls) == 1 and not fs1.meta["cached"]
    files = list(tmp_path.glob("*/_manifest.json"))  # one embedding store
    assert len(files) == 1 and json.loads(files[0].read_text())["job"]["model_hash"] == info["hash"]
    fs2 = compute_features(model, info, synth_cells, img_size=28, cache_dir=tmp_path, use_ray=False)
    assert len(calls) == 1 and fs2.meta["cached"]  # second call did not run the model
    np.testing.assert_array_equal(fs1.features, fs2.features)
    np.testing.assert_array_equal(fs1.labels, fs2.labels)
    # excluding a class re-uses the same cache file
    fs3 = compute_features(model, info, synth_cells, img_size=28, cache_dir=tmp_path, use_ray=False, exclude_labels=[4])
    assert len(calls) == 1 and 4 not in set(fs3.labels) and len(fs3) == len(fs1) - (fs1.labels == 4).sum()
    # a different pooling or image size is a different entry
    compute_features(model, info, synth_cells, img_size=28, pooling="cls+mean", cache_dir=tmp_path, use_ray=False)
    assert len(calls) == 2 and len(list(tmp_path.glob("*/_manifest.json"))) == 2
    assert not list(tmp_path.glob("*.tmp"))  # atomic write leaves no temp files


def test_resolve_model_refs(tmp_path, synth_table, eval_mlflow_uri):
    import mlflow

    from reddino.model import create_backbone, export_backbone

    hc, hinfo = resolve_model("handcrafted")
    assert hc.name == "handcrafted" and hc.standardize and hinfo["standardize"]

    net = create_backbone("vit_tiny_patch14_reddino", img_size=28)
    path = export_backbone(net, tmp_path / "ckpt" / "teacher_backbone.safetensors")
    m_file, i_file = resolve_model(str(path))
    assert i_file["kind"] == "file" and i_file["img_size"] == 28 and i_file["arch"] == "vit_tiny_patch14_reddino"
    m_dir, i_dir = resolve_model(str(tmp_path / "ckpt"))  # a run checkpoint dir
    assert i_dir["kind"] == "checkpoint" and i_dir["hash"] == i_file["hash"]
    imgs = synth_table.column("image").to_pylist()[:4]
    np.testing.assert_allclose(extract_features(m_dir, imgs), extract_features(net.eval(), imgs, 28), atol=1e-5)

    # MLflow: a run with the export logged as the `backbone/` artifact dir
    exp = mlflow.create_experiment("models-resolve", artifact_location=(tmp_path / "art").as_uri())
    with mlflow.start_run(experiment_id=exp) as run:  # the store of MLFLOW_TRACKING_URI (the fixture's)
        mlflow.log_artifacts(str(tmp_path / "ckpt"), artifact_path="backbone")
    m_ml, i_ml = resolve_model(f"runs:/{run.info.run_id}/backbone", cache_dir=tmp_path / "dl")
    assert i_ml["kind"] == "mlflow" and i_ml["model_run_id"] == run.info.run_id and i_ml["hash"] == i_file["hash"]

    r1, a = resolve_model("random:vit_tiny_patch14_reddino", img_size=28, seed=1)
    r2, b = resolve_model("vit_tiny_patch14_reddino", img_size=28, seed=1)
    assert a["hash"] == b["hash"]  # fixed seed -> same weights
    with pytest.raises(ValueError, match="unknown"):
        resolve_model("no_such_arch_xyz")


def test_bf16_features_agree_with_fp32_and_cache_apart(tiny_vit, synth_cells, tmp_path):
    import torch

    model, info = tiny_vit
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert resolve_precision("auto", "cpu") == ("bf16" if native else "fp32")
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp8", "cpu")
    kw = dict(img_size=28, cache_dir=tmp_path, use_ray=False)
    fp32 = compute_features(model, info, synth_cells, precision="fp32", **kw)
    bf16 = compute_features(model, info, synth_cells, precision="bf16", **kw)
    assert (fp32.meta["precision"], bf16.meta["precision"]) == ("fp32", "bf16")
    assert len(list(tmp_path.glob("*/_manifest.json"))) == 2  # one store per precision
    assert not np.array_equal(fp32.features, bf16.features)  # autocast really ran in bf16
    a, b = fp32.features, bf16.features
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() > 0.99
