"""Registry commands fail fast and say why: an unreachable server within seconds, a missing model or alias in one
line, nothing left behind; `promote` never crowns a candidate when it cannot read the current champion."""

import json
import time

import pytest
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from reddino.cli import app
from reddino.model import create_backbone, export_backbone
from reddino.registry import promote, register_backbone

DEAD = "http://127.0.0.1:9"  # nothing listens on the discard port


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """One registered backbone `bb` v1 @candidate in a store of this module (registering takes seconds)."""
    tmp = tmp_path_factory.mktemp("registry")
    with pytest.MonkeyPatch.context() as mp:
        uri = f"sqlite:///{tmp / 'mlflow.db'}"
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        torch.manual_seed(0)
        export = export_backbone(create_backbone("vit_tiny_patch14_reddino", img_size=28),
                                 tmp / "run" / "backbone.safetensors")
        register_backbone(str(export), name="bb", metrics={"knn20_balanced_accuracy": 0.6},
                          baselines={"knn20_balanced_accuracy": 0.3})
        yield uri


@pytest.fixture()
def mlflow_uri(registered, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered)
    return registered


@pytest.mark.parametrize("args", [
    ["models", "list"], ["models", "promote", "bb"], ["models", "pull", "bb@champion", "--out", "OUT"],
    ["models", "register", "RUNID"], ["evaluate", "--model", "models:/bb@champion", "--data", "DATA"],
])
def test_an_unreachable_server_is_one_line_naming_it_within_seconds(args, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", DEAD)
    args = [str(tmp_path / "out") if a == "OUT" else "0123abcd" if a == "RUNID" else str(tmp_path) if a == "DATA"
            else a for a in args]
    start = time.monotonic()
    result = CliRunner().invoke(app, args)
    # MLflow's own retries took ~250 s; bounded ones take seconds (60: the imports alone on a loaded 2-core box).
    assert time.monotonic() - start < 60
    assert result.exit_code == 1, (result.output, result.exception)
    lines = [ln for ln in result.output.strip().splitlines() if not ln.startswith("[reddino]")]
    assert lines == [f"error: MLflow tracking server {DEAD} is unreachable: ConnectionRefusedError: "
                     "[Errno 111] Connection refused"], result.output
    assert not (tmp_path / "out").exists()


def test_missing_model_or_alias_is_one_line_and_pull_leaves_no_folder(mlflow_uri, tmp_path):
    runner = CliRunner()
    out = tmp_path / "pulled"
    result = runner.invoke(app, ["models", "pull", "reddino-backbone@champion", "--out", str(out)])
    assert result.exit_code == 2 and not out.exists(), result.output
    assert "error: reddino-backbone@champion: no registered model named 'reddino-backbone' in sqlite:" \
           in result.output and "(registered: bb;" in result.output
    result = runner.invoke(app, ["models", "pull", "bb@champion", "--out", str(out)])
    assert result.exit_code == 2 and not out.exists(), result.output
    assert "error: bb@champion: Registered model alias champion not found. (bb has @candidate (v1);" \
           in result.output
    assert "Traceback" not in result.output
    result = runner.invoke(app, ["models", "pull", "bb@candidate", "--out", str(out)])
    assert result.exit_code == 0 and (out / "backbone.safetensors").exists(), result.output
    assert "Downloading artifacts" not in result.output


def test_models_list_is_short_names_its_store_and_has_json_and_details(mlflow_uri):
    runner = CliRunner()
    result = runner.invoke(app, ["models", "list"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == f"registry: {mlflow_uri}"
    table = result.output.splitlines()[1:]
    assert table[0].split() == ["name", "version", "aliases", "kind", "arch", "knn20_bacc"]
    assert table[1].split() == ["bb", "1", "@candidate", "backbone", "vit_tiny_patch14_reddino", "0.600"]
    assert all(len(ln) <= 80 for ln in table[:-1]) and "…" not in result.output
    details = runner.invoke(app, ["models", "list", "--details"]).output
    assert "knn20_balanced_accuracy = 0.6000" in details
    rows = json.loads(runner.invoke(app, ["models", "list", "--json"]).stdout)
    assert rows[0]["name"] == "bb" and rows[0]["aliases"] == ["candidate"]


def test_promote_refuses_when_the_champion_cannot_be_read(monkeypatch, mlflow_uri):
    real = MlflowClient.get_model_version_by_alias

    def flaky(self, name, alias):
        if alias == "champion":
            raise MlflowException("API request to endpoint failed with error code 503 != 200")
        return real(self, name, alias)

    monkeypatch.setattr(MlflowClient, "get_model_version_by_alias", flaky)
    with pytest.raises(MlflowException, match="503"):
        promote("bb")
    monkeypatch.setattr(MlflowClient, "get_model_version_by_alias", real)
    assert "champion" not in MlflowClient(tracking_uri=mlflow_uri).get_registered_model("bb").aliases
    moved, reason = promote("bb")  # readable again: no champion yet, so the candidate becomes the first
    assert moved and "first champion" in reason
