"""The training step the loop runs (and the benchmarks time): accumulation, the non-finite guard, freezing."""

from pathlib import Path

import numpy as np
import torch

from reddino.config import load_config
from reddino.data.augment import sample_masks
from reddino.model import DINOv2SSL
from reddino.train.schedules import build_schedules
from reddino.train.step import TrainStep

TINY = Path(__file__).parents[1] / "tiny.yaml"
SMALL = ["model.img_size=28", "crops.global_crops_size=28", "crops.local_crops_size=14", "model.head_prototypes=32",
         "model.head_hidden_dim=32", "model.head_bottleneck_dim=16", "train.iters_per_epoch=10"]


def _setup(*overrides):
    cfg = load_config(str(TINY), SMALL + list(overrides))
    torch.manual_seed(0)
    model = DINOv2SSL.from_config(cfg.model, cfg.loss)
    model.train()
    opt = torch.optim.AdamW(model.param_groups(cfg.optim), lr=0.0, betas=tuple(cfg.optim.betas))
    return cfg, model, opt


def _batch(cfg, seed, n=4):
    g = torch.Generator().manual_seed(seed)
    c = cfg.crops
    side = c.global_crops_size // 14
    rng = np.random.default_rng(seed)
    return {"global_crops": torch.randn(n, 2, 3, c.global_crops_size, c.global_crops_size, generator=g),
            "local_crops": torch.randn(n, c.local_crops_number, 3, c.local_crops_size, c.local_crops_size, generator=g),
            "masks": torch.from_numpy(np.stack([sample_masks(rng, 2, (side, side), cfg.mask) for _ in range(n)]))}


def _params(model):
    return {k: v.detach().clone() for k, v in model.student.named_parameters()}


def test_accumulation_takes_every_micro_batch_and_steps_once():
    cfg, model, opt = _setup("optim.grad_accum_steps=2", "optim.warmup_epochs=0")
    step = TrainStep(model, opt, build_schedules(cfg, 8), cfg)
    batches = iter([_batch(cfg, 1), _batch(cfg, 2), _batch(cfg, 3)])
    before = _params(model)
    res = step(3, lambda: next(batches))
    assert res.finite and res.images == 8 and res.lr > 0
    assert next(batches) is not None  # exactly two of the three batches were used
    assert any(not torch.equal(before[k], v) for k, v in _params(model).items())
    assert all(p.grad is None for p in model.student.parameters())  # zeroed for the next step
    assert set(res.parts) >= {"dino", "ibot"} and np.isfinite(res.loss)


def test_a_non_finite_loss_on_any_micro_batch_changes_nothing():
    cfg, model, opt = _setup("optim.grad_accum_steps=2")
    teacher = {k: v.detach().clone() for k, v in model.teacher.named_parameters()}  # (BN stats move in forward)

    seen = []

    def nan_on_second(step, loss, parts):
        seen.append(step)
        return (loss * float("nan"), parts) if len(seen) == 2 else (loss, parts)

    step = TrainStep(model, opt, build_schedules(cfg, 8), cfg, loss_hook=nan_on_second)
    before = _params(model)
    batches = iter([_batch(cfg, 1), _batch(cfg, 2)])
    res = step(5, lambda: next(batches))
    assert not res.finite and not np.isfinite(res.loss)
    assert all(torch.equal(before[k], v) for k, v in _params(model).items())
    assert all(torch.equal(teacher[k], v) for k, v in model.teacher.named_parameters())


def test_last_layer_is_frozen_for_its_epochs_then_trains():
    cfg, model, opt = _setup("optim.freeze_last_layer_epochs=1", "optim.warmup_epochs=0")
    step = TrainStep(model, opt, build_schedules(cfg, 4), cfg)
    frozen = [g for g in opt.param_groups if g.get("is_last_layer")]
    assert frozen, "the DINO head's last layer has its own parameter group"
    step.apply_schedules(9)  # inside the first epoch (10 iterations)
    assert all(g["lr"] == 0.0 for g in frozen)
    step.apply_schedules(10)
    assert all(g["lr"] > 0.0 for g in frozen)


def test_on_device_batch_is_cropped_by_the_step_as_the_cpu_path_would():
    # crops.on_device: the batch carries decoded images + crop parameters; the step makes the crops on its device.
    import cv2

    from reddino.data.augment import MultiCropTransform

    cfg, model, opt = _setup("crops.policy=dinov2", "crops.on_device=true", "optim.warmup_epochs=0")
    rng = np.random.default_rng(0)
    enc = [cv2.imencode(".png", rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))[1].tobytes() for _ in range(4)]
    raw = {"image": np.array(enc, dtype=object), "sha256": np.array([f"r{i}" for i in range(4)])}
    out = MultiCropTransform(cfg.crops, cfg.mask, 14, resize=40)(raw)
    batch = {k: torch.from_numpy(v) for k, v in out.items() if k != "sha256"}
    seen = []
    step = TrainStep(model, opt, build_schedules(cfg, 8), cfg,
                     forward=lambda g, lc, m, tt: (seen.append((g, lc)), model(g, lc, m, tt))[1])
    res = step(0, lambda: batch)
    assert res.finite and res.images == 4
    g, lc = seen[0]
    cpu = MultiCropTransform(cfg.crops.model_copy(update={"on_device": False}), cfg.mask, 14, resize=40)(raw)
    assert g.shape == (4, 2, 3, 28, 28) and lc.shape == (4, cfg.crops.local_crops_number, 3, 14, 14)
    assert np.abs(g.numpy() - cpu["global_crops"]).mean() < 0.01  # normalised units: uint8 rounding only
