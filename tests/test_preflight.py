"""Bad inputs fail before anything starts: one line naming the input, no Ray, no folder left behind."""

import time
from pathlib import Path

import pytest

from reddino.config import load_config
from reddino.data import generate_synthetic
from reddino.errors import PreflightError, ServiceUnreachable
from reddino.preflight import check_run, check_tracking

DEAD_MLFLOW = "http://127.0.0.1:9"  # the discard port: nothing listens there


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("preflight")
    generate_synthetic(root / "patches", n_per_class=2, sources=1, unit="patch", seed=0, n_patches=8)
    generate_synthetic(root / "cells", n_per_class=4, sources=1, unit="cell", seed=0, size=32)
    return root


def _cfg(*overrides):
    return load_config("tiny_cpu", ["mlflow.enabled=false", *overrides])


def test_missing_or_unusable_data_is_named(datasets, tmp_path):
    with pytest.raises(PreflightError, match=r"^data.paths: dataset dir /nonexistent does not exist$"):
        check_run(_cfg("data.paths=[/nonexistent]"))
    with pytest.raises(PreflightError, match=r"data.paths: .*not a reddino dataset"):
        check_run(_cfg(f"data.paths=[{tmp_path}]"))
    # tiny_cpu trains on cells: a patch-only dataset is refused before any trial or worker starts
    with pytest.raises(PreflightError, match=r"hold no cell rows \(the recipe trains on data.unit=cell; they hold "
                                             r"patch 8\); ingest cells .* or train on patches \(data.unit=patch\)"):
        check_run(_cfg(f"data.paths=[{datasets / 'patches'}]", "data.unit=cell"))
    with pytest.raises(PreflightError, match=r"hold 8 patch rows, fewer than one global batch \(64 ="):
        check_run(_cfg(f"data.paths=[{datasets / 'patches'}]", "data.unit=patch", "train.batch_size_per_worker=32",
                       "train.num_workers=2"))
    with pytest.raises(PreflightError, match=r"^eval.data: dataset dir /no/eval does not exist$"):
        check_run(_cfg(f"data.paths=[{datasets / 'cells'}]", "eval.data=/no/eval"))
    with pytest.raises(PreflightError, match=r"eval.data: .* holds no labelled rows"):
        check_run(_cfg(f"data.paths=[{datasets / 'cells'}]", f"eval.data={datasets / 'patches'}"))
    with pytest.raises(PreflightError, match=r"^model.pretrained: /no/weights.safetensors does not exist$"):
        check_run(_cfg(f"data.paths=[{datasets / 'cells'}]", "model.pretrained=/no/weights.safetensors"))
    check_run(_cfg(f"data.paths=[{datasets / 'cells'}]", f"eval.data={datasets / 'cells'}"))  # all good


def test_an_unreachable_mlflow_server_is_named_within_seconds():
    start = time.monotonic()
    with pytest.raises(ServiceUnreachable, match=r"^MLflow tracking server http://127.0.0.1:9 is unreachable: "
                                                 r".*(Connection refused|Errno)"):
        check_tracking(DEAD_MLFLOW)
    assert time.monotonic() - start < 10


def test_pretrain_and_sweep_refuse_bad_data_before_ray_starts_and_leave_nothing(datasets, tmp_path, monkeypatch):
    import ray

    ray.shutdown()  # an earlier module's shared local Ray (tests/conftest.py): "nothing started" must be checkable
    from typer.testing import CliRunner

    from reddino.cli import app

    home = tmp_path / "home"
    monkeypatch.setenv("REDDINO_HOME", str(home))
    cases = [
        (["pretrain", "--data", "/nonexistent"], 2, "error: data.paths: dataset dir /nonexistent does not exist"),
        (["pretrain", "--data", str(datasets / "patches")], 2, "hold no cell rows"),
        (["sweep", "--space", "ablation", "--data", str(datasets / "patches"), "--eval-data", str(datasets / "cells")],
         2, "hold no cell rows"),
        (["pretrain", "--data", str(datasets / "cells")], 1,
         "error: MLflow tracking server http://127.0.0.1:9 is unreachable"),
        (["sweep", "--space", "hparams", "--data", str(datasets / "cells"), "--eval-data", str(datasets / "cells")], 1,
         "error: MLflow tracking server http://127.0.0.1:9 is unreachable"),
    ]
    for args, code, message in cases:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", DEAD_MLFLOW if code == 1 else f"sqlite:///{home}/mlflow.db")
        start = time.monotonic()
        result = CliRunner().invoke(app, args)
        out = result.output.strip()
        assert result.exit_code == code, (args, result.output, result.exception)
        assert len(out.splitlines()) == 1 and message in out, out
        assert not ray.is_initialized()  # nothing started
        assert time.monotonic() - start < 30
    leftovers = [p for p in home.rglob("*") if p.name != "mlflow.db"] if home.exists() else []
    assert not leftovers, leftovers  # no run dir, no sweep dir


def test_a_sweep_whose_trials_all_failed_exits_1_and_says_where_the_errors_are(tmp_path, monkeypatch):
    import pandas as pd
    from typer.testing import CliRunner

    import reddino.tune
    from reddino.cli import app
    from reddino.tune.sweep import SweepResult

    errors = [tmp_path / "tune" / f"trial_{i}" / "error.txt" for i in range(2)]
    table = pd.DataFrame({"trial": ["trial_0", "trial_1"], "error": ["RuntimeError: boom", "RuntimeError: boom"],
                          "error_file": [str(e) for e in errors]})
    result = SweepResult(sweep_dir=tmp_path, table=table, best_params={}, best_config_path=None, parent_run_id=None)
    monkeypatch.setattr(reddino.tune, "sweep", lambda **kw: result)
    out = CliRunner().invoke(app, ["sweep", "--resume", str(tmp_path)])
    assert out.exit_code == 1, out.output
    assert out.output.strip() == f"error: all 2 trials of sweep {tmp_path} failed; their errors: " \
                                 f"{tmp_path}/tune/*/error.txt"
    # one of two failed: the sweep succeeded, with a warning naming the failed trial's error file
    table.loc[1, ["error", "error_file"]] = ""
    out = CliRunner().invoke(app, ["sweep", "--resume", str(tmp_path)])
    assert out.exit_code == 0 and f"warning: 1 of 2 trials failed; their errors: {errors[0]}" in out.output


def test_evaluate_names_a_missing_model_file_and_makes_no_output_folder(datasets, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from reddino.cli import app

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    cases = [
        (["--model", "/nonexistent.safetensors", "--data", str(datasets / "cells")],
         "error: --model /nonexistent.safetensors: no such file or directory"),
        (["--model", "vit_no_such_arch", "--data", str(datasets / "cells")],
         "error: --model vit_no_such_arch: not a file, a models:/ or runs:/ URI, 'handcrafted' or a timm architecture"),
        (["--model", "handcrafted", "--data", str(tmp_path / "nodata")],
         f"error: --data: dataset dir {tmp_path / 'nodata'} does not exist"),
        (["--model", "handcrafted", "--data", str(datasets / "patches")], "holds no labelled rows"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(app, ["evaluate", *args])
        assert result.exit_code == 2 and message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "eval").exists()  # no empty ./eval/<timestamp>/
