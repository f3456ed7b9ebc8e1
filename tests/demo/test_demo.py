"""The one-command demo, end to end at a reduced size, on a real local Ray + sqlite MLflow."""

import mlflow
import pytest
import ray


@pytest.fixture()
def fresh_ray():
    if ray.is_initialized():
        ray.shutdown()
    yield
    ray.shutdown()


def test_demo_quick_runs_the_whole_flow(fresh_ray, tmp_path, monkeypatch):
    from reddino.demo import run_demo

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = run_demo(tmp_path / "demo", quick=True)
    assert result.backbone_path is not None and result.backbone_path.exists()
    labels = [row["model"] for row in result.table]
    assert labels == ["pretrained", "random init", "handcrafted"]
    assert any("balanced" in key for key in result.table[0])
    assert any(key.startswith("xsrc_") for key in result.table[0])
    client = mlflow.MlflowClient(tracking_uri=result.tracking_uri)
    version = client.get_model_version("reddino-demo-backbone", result.model_version)
    assert "candidate" in version.aliases
    assert (tmp_path / "demo" / "eval" / "kfold").exists() and (tmp_path / "demo" / "mlflow.db").exists()
    # The results table fits 80 columns (short headers), and the same table is in summary.md.
    from reddino.demo import summary_table

    headers, rows = summary_table(result)
    assert "kNN-20" in headers and "LOSO kNN-20" in headers
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    assert sum(widths) + 3 * len(widths) + 1 <= 80
    summary = (tmp_path / "demo" / "summary.md").read_text()
    assert "| pretrained |" in summary and "kNN-20" in summary
