"""`reddino export`: a checkpoint's EMA teacher as a backbone export (a run stopped before its end), no Ray."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from reddino.config import load_config
from reddino.errors import PreflightError
from reddino.features.models import find_backbone_file
from reddino.model import DINOv2SSL, load_backbone
from reddino.train import checkpoint as ckpt

TINY_CONFIG = str(Path(__file__).parents[1] / "tiny.yaml")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run dir with the checkpoints of steps 2 and 4 (teachers that differ) and no export."""
    cfg = load_config(TINY_CONFIG, ["model.img_size=56", "model.head_prototypes=64", "model.head_hidden_dim=32",
                                    "model.head_bottleneck_dim=16"])
    torch.manual_seed(0)
    model = DINOv2SSL.from_config(cfg.model, cfg.loss)
    optimizer = torch.optim.AdamW(model.parameters())
    run = tmp_path_factory.mktemp("runs") / "stopped"
    for step in (2, 4):
        with torch.no_grad():
            for p in model.teacher["backbone"].parameters():
                p.add_(0.01 * step)
        ckpt.save(run / f"checkpoint_{step:07d}", model=model, optimizer=optimizer, scaler=None,
                  state=ckpt.TrainState(step=step), config_yaml=yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return run, {k: v.clone() for k, v in model.teacher["backbone"].state_dict().items()}


def test_export_writes_the_latest_teacher_and_every_command_finds_it(run_dir):
    run, teacher = run_dir
    with pytest.raises(FileNotFoundError, match="reddino export"):  # the error says what to run
        find_backbone_file(run)
    path = ckpt.export_checkpoint(run)
    assert path == run / "checkpoint_0000004" / "backbone.safetensors"
    assert find_backbone_file(run) == path  # evaluate / embed / register read the run dir now
    loaded = load_backbone(path).state_dict()
    assert set(loaded) == set(teacher) and all(torch.equal(loaded[k], teacher[k]) for k in teacher)
    import json

    meta = json.loads(path.with_name(path.name + ".json").read_text())
    assert meta["step"] == 4 and meta["run_name"] == "stopped" and meta["arch"] == "vit_tiny_patch14_reddino"


def test_export_of_a_named_step_from_the_command_line(run_dir, tmp_path):
    run, teacher = run_dir
    out = tmp_path / "step2.safetensors"
    proc = subprocess.run([str(Path(sys.executable).parent / "reddino"), "export", str(run), "--step", "2",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"backbone: {out}"
    two = load_backbone(out).state_dict()
    key = next(iter(teacher))
    np.testing.assert_allclose(two[key].numpy(), teacher[key].numpy() - 0.04, atol=1e-6)  # step 4 added 0.04 more


def test_export_refuses_a_missing_step_or_a_folder_without_checkpoints(run_dir, tmp_path):
    run, _ = run_dir
    with pytest.raises(PreflightError, match=r"no checkpoint of step 3; it has steps \[2, 4\]"):
        ckpt.export_checkpoint(run, step=3)
    with pytest.raises(PreflightError, match="no reddino checkpoint here"):
        ckpt.export_checkpoint(tmp_path)
    import shutil  # a checkpoint whose run_config.yaml names another architecture than its weights

    other = tmp_path / "other" / "checkpoint_0000002"
    shutil.copytree(run / "checkpoint_0000002", other)
    cfg = yaml.safe_load((other / "run_config.yaml").read_text())
    cfg["model"]["arch"] = "vit_tiny_patch8_reddino"
    (other / "run_config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(PreflightError, match=r"state\.pt: its teacher backbone does not fit vit_tiny_patch8_reddino"):
        ckpt.export_checkpoint(other)
