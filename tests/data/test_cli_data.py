from typer.testing import CliRunner

from reddino.cli import app
from reddino.data import read_manifest

runner = CliRunner()


def test_synth_summary_ingest_cli(tmp_path, chula_tree):
    out = tmp_path / "syn"
    r = runner.invoke(app, ["synth", "--out", str(out), "--n-per-class", "2", "--sources", "2", "--unit", "both", "--n-patches", "1"])
    assert r.exit_code == 0, r.output
    m = read_manifest(out)
    assert m.num_rows == 2 * 9 * 2 + 2 and m["meta"]["command"].startswith("reddino")
    r = runner.invoke(app, ["summary", str(out)])
    assert r.exit_code == 0, r.output
    assert "synth-a" in r.output and "dacrocyte" in r.output and m.content_hash[:20] in r.output

    r = runner.invoke(app, ["ingest", "chula", str(chula_tree), "--out", str(tmp_path / "c"), "--workers", "1",
                            "--no-progress", "--crop-size", "48"])
    assert r.exit_code == 0, r.output
    assert read_manifest(tmp_path / "c").num_rows == 6
    r = runner.invoke(app, ["summary", str(tmp_path / "c")])
    assert "Label/1.txt:3" in r.output  # skipped inputs listed

    # different dataset into the same dir -> exit code 2 with a clear message
    r = runner.invoke(app, ["ingest", "chula", str(chula_tree), "--out", str(tmp_path / "c"), "--workers", "1",
                            "--no-progress", "--unit", "patch"])
    assert r.exit_code == 2 and "different dataset" in r.output
    r = runner.invoke(app, ["summary", str(tmp_path / "nothing")])
    assert r.exit_code == 2 and "does not exist" in r.output
