"""One rule for which file is the backbone: the trainer exports there, a sweep reads trials there (also with
`train.export_path`), and evaluation / registry pick the same file in a run folder."""

import pytest

from reddino.config import ConfigError, load_config
from reddino.features.models import find_backbone_file
from reddino.model import create_backbone, export_backbone
from reddino.registry.core import _find_export
from reddino.train.checkpoint import BACKBONE_FILE, export_target
from reddino.tune.sweep import check_export_path, trial_backbone


def test_the_run_export_wins_then_the_latest_checkpoint(tmp_path):
    run = tmp_path / "run"
    net = create_backbone("vit_tiny_patch14_reddino", img_size=28)
    for i in (3, 7, 5):
        export_backbone(net, run / f"checkpoint_00000{i}" / BACKBONE_FILE)
    assert find_backbone_file(run) == run / "checkpoint_000007" / BACKBONE_FILE  # the latest, not the first
    export_backbone(net, export_target(None, run, "run"))
    assert find_backbone_file(run) == run / "backbone.safetensors" == export_target(None, run, "run")
    assert _find_export(run) == find_backbone_file(run)  # the registry registers the same file
    assert find_backbone_file(run / "backbone.safetensors") == run / "backbone.safetensors"


def test_a_sweep_reads_each_trial_backbone_where_export_path_put_it(tmp_path):
    templated = load_config("tiny_cpu", [f"train.export_path={tmp_path}/exports/{{run_name}}.safetensors"])
    assert trial_backbone(templated, tmp_path / "sweep", "trial-1") == tmp_path / "exports" / "trial-1.safetensors"
    assert export_target(templated.train.export_path, None, "trial-1") == tmp_path / "exports" / "trial-1.safetensors"
    default = load_config("tiny_cpu")
    assert trial_backbone(default, tmp_path / "sweep", "t2") == tmp_path / "sweep" / "trials" / "t2" / "backbone.safetensors"

    fixed = load_config("tiny_cpu", [f"train.export_path={tmp_path}/one.safetensors"])
    with pytest.raises(ConfigError, match="every trial of the sweep would write this one file"):
        check_export_path(fixed, 4)
    check_export_path(fixed, 1)
    check_export_path(templated, 4)
