"""What the driver records of a run in MLflow before Ray starts (no Ray here): the augmentation policy's version,
and a warning when a resume crosses a change of it."""

from pathlib import Path

from mlflow.tracking import MlflowClient

from reddino.config import POLICY_VERSIONS, load_config
from reddino.train.trainer import _open_mlflow_run, _RunPlace

TINY_CONFIG = str(Path(__file__).parents[1] / "tiny.yaml")


def test_the_policy_version_is_recorded_and_a_resume_across_a_bump_says_so(tmp_path, monkeypatch, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(TINY_CONFIG)
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    (run_dir / "run_config.yaml").write_text("name: r\n")
    place = _RunPlace(tmp_path / "runs", "r", run_dir, "reddino-run-r")
    run_id = _open_mlflow_run(cfg, place, "d", None, uri)
    version = POLICY_VERSIONS["rbc"]
    assert MlflowClient(uri).get_run(run_id).data.tags["reddino.crops_policy"] == f"rbc v{version}"
    assert "WARNING" not in capsys.readouterr().out

    assert _open_mlflow_run(cfg, place, "d", None, uri) == run_id  # a resume, same policy: nothing to say
    assert "WARNING" not in capsys.readouterr().out
    monkeypatch.setitem(POLICY_VERSIONS, "rbc", version + 1)
    assert _open_mlflow_run(cfg, place, "d", None, uri) == run_id
    out = capsys.readouterr().out
    assert f"resumed with augmentation policy rbc v{version + 1}; the run started with rbc v{version}" in out
    tags = MlflowClient(uri).get_run(run_id).data.tags
    assert tags["reddino.crops_policy"] == f"rbc v{version}" and tags["reddino.crops_policy_resumed"] == f"rbc v{version + 1}"
