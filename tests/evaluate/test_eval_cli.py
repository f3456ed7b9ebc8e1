import json

import numpy as np
from typer.testing import CliRunner

from reddino.cli import app


def test_ray_batch_inference_matches_in_process_and_caches(ray_local, tiny_vit, synth_cells, tmp_path, monkeypatch):
    """The Ray Data path (actor pool holding the model) gives the in-process features, in table order."""
    import reddino.evaluate.compute as C

    model, info = tiny_vit
    ray_fs = C.compute_features(model, info, synth_cells, img_size=28, cache_dir=tmp_path, use_ray=True, num_cpus=2)
    assert ray_fs.meta["ray"] and not ray_fs.meta["cached"]
    local = C.compute_features(model, info, synth_cells, img_size=28, cache_dir=None, use_ray=False)
    np.testing.assert_allclose(ray_fs.features, local.features, atol=1e-5)
    np.testing.assert_array_equal(ray_fs.image_ids, local.image_ids)

    def boom(*a, **k):
        raise AssertionError("the model ran although the features are cached")

    import reddino.features.embedding as E

    monkeypatch.setattr(E, "run_ray", boom)
    again = C.compute_features(model, info, synth_cells, img_size=28, cache_dir=tmp_path, use_ray=True)
    assert again.meta["cached"]
    np.testing.assert_array_equal(again.features, ray_fs.features)


def test_cli_end_to_end(eval_mlflow_uri, synth_cells, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.chdir(tmp_path)  # nothing may land in the working dir but ./eval
    out = tmp_path / "report"
    cache = tmp_path / "cache"
    args = [
        "evaluate", "--model", "handcrafted", "--model", "random:vit_tiny_patch14_reddino", "--img-size", "28",
        "--data", str(synth_cells), "--protocol", "kfold", "--folds", "3", "--k", "1", "--k", "20",
        "--report-both-excluded", "2", "--out", str(out), "--cache-dir", str(cache), "--num-cpus", "2",
        "--embedding", "pca", "--no-probe",
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "| handcrafted | cells |" in res.output

    results = json.loads((out / "results.json").read_text())
    assert (out / "report.md").is_file()
    assert [m["ref"] for m in results["models"]] == ["handcrafted", "random:vit_tiny_patch14_reddino"]
    for m in results["models"]:
        names = [e["name"] for e in m["evals"]]
        assert names == ["cells", "cells (excl. 2)"]
        full, excl = (e["result"] for e in m["evals"])
        assert full["n_classes"] == 9 and excl["n_classes"] == 8 and "2" not in excl["classes"]
        assert full["grouped"] and full["folds"] == 3
        assert set(full["classifiers"]) == {"knn1", "knn20", "cosknn20"}
        for p in m["figures"]:
            assert p.endswith(".png")
        kinds = " ".join(m["figures"])
        assert "confusion_knn20" in kinds and "pca_label" in kinds and "pca_source" in kinds
    hc = results["models"][0]["evals"][0]["result"]["classifiers"]["knn1"]["balanced_accuracy"]["mean"]
    assert hc > 3 / 9  # handcrafted morphology separates the synthetic classes
    assert len(list(cache.glob("*/_manifest.json"))) == 2  # one store per model; the class-excluded variant re-used it

    # MLflow: one evaluation run per model, with metrics, tags and artifacts
    client = mlflow.tracking.MlflowClient(eval_mlflow_uri)
    exp = client.get_experiment_by_name("reddino-eval")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`reddino.eval_id` = '{results['eval_id']}'")
    assert len(runs) == 2
    refs = {r.data.tags["reddino.model_ref"] for r in runs}
    assert refs == {"handcrafted", "random:vit_tiny_patch14_reddino"}
    for r in runs:
        assert r.data.metrics["cells/knn20/balanced_accuracy"] >= 0
        assert "cells.excl2/knn1/accuracy_std" in r.data.metrics
        arts = {a.path for a in client.list_artifacts(r.info.run_id)}
        assert {"results.json", "report.md", "figures"} <= arts
        assert client.list_artifacts(r.info.run_id, "figures")
    assert not (tmp_path / "mlruns").exists()

    # second run: features come from the cache (no extraction), numbers identical
    out2 = tmp_path / "report2"
    res = CliRunner().invoke(app, [a if a != str(out) else str(out2) for a in args] + ["--no-mlflow"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    again = json.loads((out2 / "results.json").read_text())
    for m1, m2 in zip(results["models"], again["models"]):
        a = m1["evals"][0]["result"]["classifiers"]["knn20"]["balanced_accuracy"]["mean"]
        b = m2["evals"][0]["result"]["classifiers"]["knn20"]["balanced_accuracy"]["mean"]
        assert a == b and m2["evals"][0]["result"]["cached_features"]


def test_cli_cross_source_and_errors(eval_mlflow_uri, synth_cells, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "xs"
    res = CliRunner().invoke(app, [
        "evaluate", "--model", "handcrafted", "--data", str(synth_cells), "--protocol", "cross-source",
        "--folds", "2", "--k", "1", "--no-cosine-knn", "--no-probe", "--out", str(out), "--no-ray",
        "--cache-dir", str(tmp_path / "c"), "--embedding", "pca", "--no-mlflow",
    ])
    assert res.exit_code == 0, res.output + repr(res.exception)
    r = json.loads((out / "results.json").read_text())["models"][0]["evals"][0]["result"]
    assert r["protocol"] == "cross-source" and len(r["matrix_sources"]) == 3
    mat = np.array(r["classifiers"]["knn1"]["matrix"]["balanced_accuracy"], dtype=float)
    assert mat.shape == (3, 3) and "within-source" in r["diagonal"]
    assert "Cross-source" in (out / "report.md").read_text()
    assert json.loads((out / "metrics.json").read_text())["knn1_balanced_accuracy"] >= 0

    bad = CliRunner().invoke(app, ["evaluate", "--model", "no_such_arch_xyz", "--data", str(synth_cells),
                                   "--no-mlflow", "--no-ray", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "no_such_arch_xyz: not a file" in bad.output
    assert list((out / "figures").glob("*xsource_knn1.png"))
