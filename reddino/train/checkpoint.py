"""What a checkpoint holds and how it is written and read back.

A checkpoint directory holds `state.pt` (student, teacher, heads, centres, optimizer, grad scaler,
step, data pass, RNG states), `data_state.npz` (keys of the rows trained on in the current pass, all
workers together) and `run_config.yaml`. The final one also holds the exported teacher backbone.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE = "state.pt"
DATA_STATE_FILE = "data_state.npz"
CONFIG_FILE = "run_config.yaml"
BACKBONE_FILE = "teacher_backbone.safetensors"
EXPORT_FILE = "backbone.safetensors"


def export_target(export_path: str | None, run_dir: Path | None, run_name: str) -> Path:
    """The one rule for where a finished run's teacher backbone is exported (the trainer writes it there, a sweep
    reads it there): ``train.export_path`` with ``{run_name}`` filled in when set, else ``<run dir>/backbone.safetensors``,
    else (remote storage) ``$REDDINO_HOME/exports/<run>/backbone.safetensors``."""
    if export_path:
        return Path(export_path.replace("{run_name}", run_name)).expanduser()
    if run_dir is not None:
        return Path(run_dir) / EXPORT_FILE
    from reddino import paths  # noqa: PLC0415

    return paths.exports_dir() / run_name / EXPORT_FILE


@dataclass
class TrainState:
    step: int = 0
    data_pass: int = 0
    consumed: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    images_seen: int = 0


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save(
    directory: Path, *, model, optimizer, scaler, state: TrainState, config_yaml: str, extra: dict | None = None
) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    payload = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "step": state.step,
        "data_pass": state.data_pass,
        "images_seen": state.images_seen,
        "rng": rng_state(),
        "extra": extra or {},
    }
    torch.save(payload, directory / STATE_FILE)
    np.savez(directory / DATA_STATE_FILE, consumed=state.consumed, data_pass=np.int64(state.data_pass))
    (directory / CONFIG_FILE).write_text(config_yaml)
    return directory


def load(directory: Path, *, model, optimizer=None, scaler=None) -> TrainState:
    directory = Path(directory)
    path = directory / STATE_FILE
    if not path.exists():
        raise FileNotFoundError(f"{directory} is not a reddino checkpoint: {STATE_FILE} is missing")
    payload = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(payload["model"])
    if optimizer is not None:
        optimizer.load_state_dict(payload["optimizer"])
    if scaler is not None and payload.get("scaler") is not None:
        scaler.load_state_dict(payload["scaler"])
    set_rng_state(payload["rng"])
    data = np.load(directory / DATA_STATE_FILE)
    return TrainState(
        step=int(payload["step"]),
        data_pass=int(payload["data_pass"]),
        consumed=data["consumed"].astype(np.int64),
        images_seen=int(payload.get("images_seen", 0)),
    )


def find_checkpoint(path: str | Path, step: int | None = None) -> Path:
    """A checkpoint directory: ``path`` itself when it holds ``state.pt``, else the run dir's checkpoint of
    ``step`` (the latest when None). One error naming the folder and the steps it has otherwise."""
    from reddino.errors import PreflightError  # noqa: PLC0415

    path = Path(path).expanduser()
    if (path / STATE_FILE).is_file():
        if step is not None and not path.name.endswith(f"_{step:07d}"):
            raise PreflightError(f"{path} is the checkpoint of another step than --step {step}")
        return path
    found = {int(d.name.rsplit("_", 1)[1]): d for d in path.glob("checkpoint_*")
             if d.name.rsplit("_", 1)[1].isdigit() and (d / STATE_FILE).is_file()}
    if not found:
        raise PreflightError(f"{path}: no reddino checkpoint here (a folder with {STATE_FILE}, or a run dir with "
                             "checkpoint_NNNNNNN folders)")
    if step is None:
        return found[max(found)]
    if step not in found:
        raise PreflightError(f"{path}: no checkpoint of step {step}; it has steps {sorted(found)}")
    return found[step]


def export_checkpoint(path: str | Path, *, step: int | None = None, out: str | Path | None = None) -> Path:
    """The EMA teacher backbone of a checkpoint as a backbone export (what every reddino command reads), for a
    run stopped before its end or an intermediate step. Default ``out``: ``<checkpoint>/backbone.safetensors``."""
    from reddino.config import load_config  # noqa: PLC0415
    from reddino.errors import PreflightError  # noqa: PLC0415
    from reddino.model.backbone import create_backbone, export_backbone  # noqa: PLC0415

    ckpt = find_checkpoint(path, step)
    cfg = load_config(ckpt / CONFIG_FILE)  # the run's own config, as the checkpoint recorded it
    try:
        payload = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=False)
    except Exception as exc:  # a truncated or foreign file: say which
        raise PreflightError(f"{ckpt / STATE_FILE} cannot be read ({type(exc).__name__}: {exc})") from None
    prefix = "teacher.backbone."
    weights = {k[len(prefix):]: v for k, v in payload["model"].items() if k.startswith(prefix)}
    m = cfg.model
    backbone = create_backbone(m.arch, m.img_size, m.patch_size, timm_kwargs=m.timm_kwargs)
    try:
        backbone.load_state_dict(weights)  # strict: every tensor of the architecture, nothing left over
    except RuntimeError as exc:  # written by another version of the code: say which file and which config
        raise PreflightError(f"{ckpt / STATE_FILE}: its teacher backbone does not fit {m.arch} as {ckpt / CONFIG_FILE} "
                             f"describes it ({exc})") from None
    meta: dict[str, Any] = {"run_name": cfg.train.run_name or ckpt.parent.name, "step": int(payload["step"]),
                            "config_hash": cfg.hash(), "checkpoint": str(ckpt)}
    if cfg.distill.enabled:
        meta.update({"method": "distill", "teacher": {"ref": cfg.distill.teacher}})
    return export_backbone(backbone, Path(out).expanduser() if out else ckpt / EXPORT_FILE, meta=meta)
