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
    assert len(labels) == 3 and labels[0].startswith("reddino")
    assert any("balanced" in key for key in result.table[0])
    assert any(key.startswith("xsrc_") for key in result.table[0])
    client = mlflow.MlflowClient(tracking_uri=result.tracking_uri)
    version = client.get_model_version("reddino-demo-backbone", result.model_version)
    assert "candidate" in version.aliases
    assert (tmp_path / "demo" / "eval" / "kfold").exists() and (tmp_path / "demo" / "mlflow.db").exists()
