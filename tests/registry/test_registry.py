"""Registry round trips on a real sqlite MLflow store."""

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.linear_model import LogisticRegression

import reddino
from reddino.data import decode_image, generate_synthetic, load_table
from reddino.evaluate import extract_features
from reddino.model import create_backbone, export_backbone
from reddino.registry import list_models, promote, pull, register_backbone, register_probe


@pytest.fixture()
def export(tmp_path):
    torch.manual_seed(0)
    model = create_backbone("vit_tiny_patch14_reddino", img_size=56)
    return export_backbone(model, tmp_path / "run" / "backbone.safetensors", meta={"config_hash": "abc"})


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    root = tmp_path_factory.mktemp("regcells")
    generate_synthetic(root / "cells", n_per_class=3, sources=1, unit="cell", seed=0)
    table = load_table([root / "cells"])
    return [decode_image(b) for b in table.column("image").to_pylist()], table.column("label").to_numpy()


def test_register_alias_pull_round_trip_gives_identical_embeddings(export, cells, tmp_path, mlflow_uri):
    images, _ = cells
    mv = register_backbone(str(export), name="bb", metrics={"knn20_balanced_accuracy": 0.5})
    assert str(mv.version) == "1" and mv.tags["reddino.arch"] == "vit_tiny_patch14_reddino"
    client = mlflow.MlflowClient(tracking_uri=mlflow_uri)
    assert client.get_model_version_by_alias("bb", "candidate").version in (1, "1")

    original = extract_features(reddino.model.load_backbone(export), images, img_size=56, batch_size=16)
    pulled = reddino.load_backbone("models:/bb@candidate")
    assert np.allclose(extract_features(pulled, images, img_size=56, batch_size=16), original, atol=1e-6)
    path = pull("bb@candidate", tmp_path / "pulled")
    assert path.exists() and path.with_name(path.name + ".json").exists()

    # pyfunc: encoded images in, embeddings out.
    pyfunc = mlflow.pyfunc.load_model("models:/bb@candidate")
    import cv2

    encoded = [cv2.imencode(".png", img[:, :, ::-1])[1].tobytes() for img in images[:4]]
    emb = pyfunc.predict(pd.DataFrame({"image": encoded}))
    assert np.asarray(emb).shape == (4, 192)
    assert np.allclose(np.asarray(emb), original[:4], atol=1e-4)


def test_promotion_refuses_a_worse_candidate_and_versions_accumulate(export, mlflow_uri):
    base = {"knn20_balanced_accuracy": 0.3}
    register_backbone(str(export), name="bb2", metrics={"knn20_balanced_accuracy": 0.6}, baselines=base)
    moved, reason = promote("bb2")
    assert moved and "first champion" in reason
    mv2 = register_backbone(str(export), name="bb2", metrics={"knn20_balanced_accuracy": 0.4}, baselines=base)
    assert str(mv2.version) == "2"  # registering again makes a new version, never overwrites
    moved, reason = promote("bb2")
    assert not moved and "does not beat" in reason
    client = mlflow.MlflowClient(tracking_uri=mlflow_uri)
    assert client.get_model_version_by_alias("bb2", "champion").version in (1, "1")
    moved, _ = promote("bb2", force=True)
    assert moved and client.get_model_version_by_alias("bb2", "champion").version in (2, "2")
    rows = [r for r in list_models() if r["name"] == "bb2"]
    assert [r["version"] for r in rows] == [1, 2] and "champion" in rows[1]["aliases"]


def test_champion_needs_to_beat_random_init_of_its_architecture(export, mlflow_uri):
    client = mlflow.MlflowClient(tracking_uri=mlflow_uri, registry_uri=mlflow_uri)
    # No baseline recorded: refused, and the reason says what to do.
    register_backbone(str(export), name="bb4", metrics={"knn20_balanced_accuracy": 0.5})
    moved, reason = promote("bb4")
    assert not moved and "random-init baseline" in reason and "random:vit_tiny_patch14_reddino" in reason
    # Below its own random init (today's collapsed demo): stays @candidate even with no champion yet.
    register_backbone(str(export), name="bb4", metrics={"knn20_balanced_accuracy": 0.27},
                      baselines={"knn20_balanced_accuracy": 0.37})
    moved, reason = promote("bb4")
    assert not moved and "does not beat its random-init" in reason and "stays @candidate" in reason
    with pytest.raises(Exception):
        client.get_model_version_by_alias("bb4", "champion")
    register_backbone(str(export), name="bb4", metrics={"knn20_balanced_accuracy": 0.48},
                      baselines={"knn20_balanced_accuracy": 0.37})
    moved, reason = promote("bb4")
    assert moved and client.get_model_version_by_alias("bb4", "champion").version in (3, "3")


def test_baseline_read_from_an_evaluation_with_random_init(tmp_path):
    import json

    from reddino.registry.core import baseline_metrics

    results = {"models": [
        {"info": {"kind": "file", "arch": "vit_tiny_patch14_reddino"}, "headline": {"knn20_balanced_accuracy": 0.6}},
        {"info": {"kind": "random", "arch": "vit_small_patch14_dinov2"}, "headline": {"knn20_balanced_accuracy": 0.5}},
        {"info": {"kind": "random", "arch": "vit_tiny_patch14_reddino"}, "headline": {"knn20_balanced_accuracy": 0.4}},
    ]}
    (tmp_path / "results.json").write_text(json.dumps(results))
    (tmp_path / "metrics.json").write_text(json.dumps(results["models"][0]["headline"]))
    assert baseline_metrics(tmp_path / "metrics.json") == {"knn20_balanced_accuracy": 0.4}  # same arch only
    results["models"].pop()
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert baseline_metrics(tmp_path / "metrics.json") == {}


def test_probe_registered_and_predicts_with_pulled_backbone(export, cells, mlflow_uri):
    images, labels = cells
    mv = register_backbone(str(export), name="bb3")
    backbone = reddino.load_backbone("models:/bb3@candidate")
    feats = extract_features(backbone, images, img_size=56, batch_size=16)
    probe = LogisticRegression(max_iter=200).fit(feats, labels)
    pm = register_probe(probe, backbone=f"bb3/{mv.version}", name="bb3-probe", metrics={"accuracy": 1.0})
    assert pm.tags["reddino.backbone"] == "bb3/1"
    loaded = mlflow.sklearn.load_model("models:/bb3-probe@candidate")
    again = extract_features(reddino.load_backbone("models:/bb3@candidate"), images, img_size=56, batch_size=16)
    assert (loaded.predict(again) == probe.predict(feats)).all()


def test_an_explicit_store_is_used_for_the_call_only(export, tmp_path, mlflow_uri):
    """tracking_uri= writes and reads that store and leaves MLflow's process-wide URIs where they were."""
    from reddino.registry.core import load_probe_version

    other = f"sqlite:///{tmp_path / 'other.db'}"
    before = (mlflow.get_tracking_uri(), mlflow.get_registry_uri())
    mv = register_backbone(str(export), name="elsewhere", tracking_uri=other)
    probe = LogisticRegression(max_iter=50).fit(np.eye(192, dtype=np.float32)[:4], [0, 1, 0, 1])
    meta = tmp_path / "probe.json"
    meta.write_text('{"classes": ["a", "b"]}')
    register_probe(probe, backbone=f"elsewhere/{mv.version}", name="elsewhere-probe", artifacts=[meta],
                   tracking_uri=other)
    assert (mlflow.get_tracking_uri(), mlflow.get_registry_uri()) == before
    assert pull("elsewhere@candidate", tmp_path / "pulled", tracking_uri=other).exists()
    estimator, meta = load_probe_version("elsewhere-probe@candidate", tracking_uri=other)
    assert meta["registered"]["name"] == "elsewhere-probe" and estimator.predict(np.eye(192)[:1]).shape == (1,)
    assert (mlflow.get_tracking_uri(), mlflow.get_registry_uri()) == before
    assert [m.name for m in mlflow.MlflowClient(tracking_uri=other).search_registered_models()] == [
        "elsewhere", "elsewhere-probe"]
    assert not mlflow.MlflowClient(tracking_uri=mlflow_uri).search_registered_models()
