import pytest

from reddino.config import ConfigError, load_config, parse_overrides


def test_presets_load_and_reproduce_the_recipe():
    cfg = load_config("reddino_vits14")
    assert cfg.model.arch == "vit_small_patch14_dinov2"
    assert cfg.crops.global_crops_number == 2 and cfg.crops.global_crops_size == 224
    assert cfg.crops.local_crops_number == 1 and cfg.crops.local_crops_size == 98
    assert cfg.loss.koleo_weight == 0.0 and cfg.loss.centering == "sinkhorn_knopp"
    assert cfg.model.head_prototypes == 131072 and not cfg.model.ibot_separate_head
    assert cfg.optim.base_lr == pytest.approx(2e-4) and cfg.optim.momentum_teacher == pytest.approx(0.994)
    assert cfg.train.batch_size_per_worker == 280
    assert cfg.total_steps == 32000
    tiny = load_config("tiny_cpu")
    assert tiny.train.use_gpu is False


def test_overrides_are_typed_and_nested():
    cfg = load_config("tiny_cpu", ["train.epochs=2", "crops.global_crops_scale=[0.5, 1.0]", "loss.centering=ema"])
    assert cfg.train.epochs == 2
    assert cfg.crops.global_crops_scale == (0.5, 1.0)
    assert cfg.loss.centering == "ema"
    assert parse_overrides(["a.b.c=1"]) == {"a": {"b": {"c": 1}}}


def test_bad_config_names_file_and_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match=r"train.epochz=3 \(.*bad.yaml\): unknown key"):
        load_config(bad)
    with pytest.raises(ConfigError, match="loss.centering"):
        load_config("tiny_cpu", ["loss.centering=softmax"])
    with pytest.raises(ConfigError, match="not found"):
        load_config("no_such_preset")
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config("tiny_cpu", ["train.epochs"])


def test_eval_and_sweep_configs_name_the_file_and_field(tmp_path):
    from reddino.config import EvalConfig, SweepConfig, load_section

    bad = tmp_path / "eval.yaml"
    bad.write_text("protocl: kfold\nfolds: 1\n")
    with pytest.raises(ConfigError) as exc:
        load_section(EvalConfig, bad)
    assert str(bad) in str(exc.value) and "protocl" in str(exc.value) and "folds" in str(exc.value)
    good = tmp_path / "good.yaml"
    good.write_text("folds: 3\nks: [5]\n")
    cfg = load_section(EvalConfig, good, {"folds": 4})  # explicit updates beat the file
    assert (cfg.folds, cfg.ks, cfg.protocol) == (4, [5], "kfold")
    path = SweepConfig(space="hparams", trials=3).to_yaml(tmp_path / "sweep.yaml")
    assert load_section(SweepConfig, path) == SweepConfig(space="hparams", trials=3)


def test_evaluate_cli_options_come_from_eval_config(tmp_path):
    from typer.testing import CliRunner

    from reddino.cli import app
    from reddino.config import EvalConfig

    runner = CliRunner()
    help_text = runner.invoke(app, ["evaluate", "--help"], env={"COLUMNS": "200"}).output
    for field in EvalConfig.model_fields:
        if field not in ("figures", "progress", "ks", "use_groups", "use_ray", "out_dir"):
            assert "--" + field.replace("_", "-") in help_text, field
    bad = tmp_path / "eval.yaml"
    bad.write_text("pooling: avg\n")
    res = runner.invoke(app, ["evaluate", "-m", "handcrafted", "-d", str(tmp_path), "--config", str(bad)])
    assert res.exit_code == 2 and "pooling" in res.output and "eval.yaml" in res.output
    # an option given on the command line overrides the file (and is validated the same way)
    res = runner.invoke(app, ["evaluate", "-m", "handcrafted", "-d", str(tmp_path), "--config", str(bad),
                              "--pooling", "cls", "--folds", "1"])
    assert res.exit_code == 2 and "folds" in res.output and "pooling" not in res.output


def test_custom_resource_knobs_validate():
    cfg = load_config("tiny_cpu", ["data.map_resources={data: 0.01}", "train.worker_resources={train: 1}"])
    assert cfg.data.map_resources == {"data": 0.01} and cfg.train.worker_resources == {"train": 1.0}
    with pytest.raises(ConfigError, match="has its own knob"):
        load_config("tiny_cpu", ["train.worker_resources={GPU: 1}"])
    with pytest.raises(ConfigError, match="must be > 0"):
        load_config("tiny_cpu", ["data.map_resources={data: 0}"])


def test_pretrain_makes_local_relative_paths_absolute_for_the_workers(tmp_path, monkeypatch):
    from reddino.train.trainer import _absolute_local_paths

    monkeypatch.chdir(tmp_path)
    cfg = load_config("tiny_cpu", ["data.paths=[data/cells,s3://bucket/patches]", "eval.data=data/cells"])
    out = _absolute_local_paths(cfg)
    assert out.data.paths == [str(tmp_path / "data" / "cells"), "s3://bucket/patches"]
    assert out.eval.data == str(tmp_path / "data" / "cells")
    assert cfg.eval.data == "data/cells"  # the caller's config is left as it was


@pytest.mark.parametrize("override, message", [
    ("train.epoch=3", "train.epoch=3 (command line): unknown key; did you mean train.epochs? valid keys of train: "),
    ("loss.teacher_temp=abc", "loss.teacher_temp=abc (command line): Input should be a valid number"),
    ("train.epochs=-1", "train.epochs=-1 (command line): Input should be greater than or equal to 1"),
    ("train.batch_size_per_worker=0", "train.batch_size_per_worker=0 (command line): Input should be greater than"),
    ("crops.global_crops_size=7", "crops.global_crops_size (command line): must be a multiple of the patch size 8 "
                                  "(model.arch vit_mini_patch8_reddino), got 7"),
    ("crops.local_crops_size=64", "crops.local_crops_size (command line): must be smaller than "
                                  "crops.global_crops_size (56), got 64"),
    ("model.arch=convnext_atto", "crops.local_crops_size (command line): must be at least the total stride 32 of "
                                 "convnext_atto (model.timm_kwargs output_stride), got 24"),
    ("optim.warmup_epochs=9", "optim.warmup_epochs (command line): must be <= train.epochs (4)"),
    ("crops.global_crops_scale=[0.5,0.2]", "crops.global_crops_scale (command line): must be [min, max]"),
    ("mask.ratio_min=0.9", "mask.ratio_min (command line): must be <= mask.ratio_max"),
    ("loss.student_temp=0", "loss.student_temp=0 (command line): Input should be greater than 0"),
])
def test_bad_values_are_one_line_naming_key_value_and_origin(override, message):
    with pytest.raises(ConfigError) as exc:
        load_config("tiny_cpu", [override])
    text = str(exc.value)
    assert "\n" not in text and message in text, text


def test_a_bad_value_in_a_file_names_the_file(tmp_path):
    bad = tmp_path / "run.yaml"
    bad.write_text("model:\n  arch: vit_mini_patch8_reddino\n  img_size: 60\n")
    with pytest.raises(ConfigError, match=r"model.img_size \(.*run.yaml\): must be a multiple of the patch size 8"):
        load_config(bad)


def test_cli_config_errors_exit_2_with_one_line_and_no_traceback():
    from typer.testing import CliRunner

    from reddino.cli import app

    for args in (["pretrain", "train.epoch=3"], ["pretrain", "loss.teacher_temp=abc"], ["sweep", "--trials", "0"]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: invalid "), result.output
        assert "Traceback" not in result.output
