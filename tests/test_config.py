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
    with pytest.raises(ConfigError, match=r"bad.yaml.*\n.*train.epochz"):
        load_config(bad)
    with pytest.raises(ConfigError, match="loss.centering"):
        load_config("tiny_cpu", ["loss.centering=softmax"])
    with pytest.raises(ConfigError, match="not found"):
        load_config("no_such_preset")
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config("tiny_cpu", ["train.epochs"])


def test_custom_resource_knobs_validate():
    cfg = load_config("tiny_cpu", ["data.map_resources={data: 0.01}", "train.worker_resources={train: 1}"])
    assert cfg.data.map_resources == {"data": 0.01} and cfg.train.worker_resources == {"train": 1.0}
    with pytest.raises(ConfigError, match="has its own knob"):
        load_config("tiny_cpu", ["train.worker_resources={GPU: 1}"])
    with pytest.raises(ConfigError, match="must be > 0"):
        load_config("tiny_cpu", ["data.map_resources={data: 0}"])
