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


def test_demo_quick_runs_the_whole_flow(fresh_ray, tmp_path, monkeypatch, capfd):
    from reddino.demo import run_demo

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = run_demo(tmp_path / "demo", quick=True)
    # What the user saw (stdout not a terminal, Ray's forwarded worker output included): short, each line once.
    seen = capfd.readouterr()
    console = seen.out + seen.err
    for noise in ("TrainingReport(", "Execution plan", "Starting execution", "Requesting resources",
                  "Progress bars disabled", "DeprecationWarning"):
        assert noise not in console, (noise, console[-3000:])
    tables = tuple("|#─━┏┃┡│└┗╭╰┣┠╇┩┳┻")  # table rows and rulers repeat by design
    prose = [line for line in console.splitlines()
             if line.strip() and not line.lstrip().startswith(tables) and "━" not in line]  # (and progress bars)
    assert len(prose) == len(set(prose)), console
    assert len(prose) < 80, console
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
    from rich.console import Console

    from reddino.demo import show, summary_tables

    tables = summary_tables(result)
    assert [t[0] for t in tables] == ["grouped 5-fold", "leave one source out (LOSO)"]
    assert "kNN-20" in tables[0][1] and "probe" in tables[0][1]
    import reddino.demo as demo_mod

    narrow = Console(width=80, record=True, force_terminal=False)
    demo_mod.console, saved = narrow, demo_mod.console
    try:
        show(result)
    finally:
        demo_mod.console = saved
    text = narrow.export_text()
    assert "…" not in text.split("summary:")[0]  # no header or model name truncated at 80 columns
    summary = (tmp_path / "demo" / "summary.md").read_text()
    assert "| pretrained |" in summary and "kNN-20" in summary
