"""One DINOv2 training step: what the loop runs every iteration and what the benchmarks time.

schedules (lr, weight decay, teacher momentum and temperature; the last layer frozen for its first epochs) →
micro-batches (forward under autocast, backward; DDP syncs gradients on the last one only) → one check that the
loss is finite on every rank → unscale + clip → optimizer (through the grad scaler in fp16) → zero grad →
teacher EMA → Gram-teacher refresh when due. A non-finite loss leaves the weights untouched and says so in the
result.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist

from reddino.train.data import crops_from_batch, crops_to_device
from reddino.train.schedules import gram_refresh_due


def any_rank(flag: bool, device) -> bool:
    """True on every rank when ``flag`` is True on any (one all-reduce; plain ``flag`` outside DDP)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


@dataclass
class StepResult:
    loss: float
    parts: dict[str, float]
    lr: float
    wd: float
    momentum: float
    teacher_temp: float
    images: int  # crops' images consumed by this step over all ranks
    grad_norm: float | None = None
    finite: bool = True
    gram_weight: float | None = None  # Gram anchoring on: this step's weight and the refreshes done after it
    gram_refreshes: int | None = None

    def metrics(self) -> dict[str, float]:
        out = {"loss": self.loss, "lr": self.lr, "wd": self.wd, "momentum": self.momentum,
               "teacher_temp": self.teacher_temp, **{f"loss_{k}": v for k, v in self.parts.items()}}
        if self.grad_norm is not None:
            out["grad_norm"] = self.grad_norm
        if self.gram_weight is not None:
            out["gram_weight"] = self.gram_weight
        if self.gram_refreshes is not None:
            out["gram_refreshes"] = self.gram_refreshes
        return out


@dataclass
class TrainStep:
    """``step(i, next_batch) -> StepResult``: the training step of a :class:`~reddino.model.DINOv2SSL`.

    ``model`` is the bare module (its teacher EMA and parameter groups); ``forward`` what runs the batch (the DDP
    wrapper, a compiled module, or ``model`` itself). ``loss_hook(step, loss, parts) -> (loss, parts)`` sees
    every micro-batch's loss before it counts (tests inject a NaN there).
    """

    model: Any
    optimizer: torch.optim.Optimizer
    sched: dict[str, Any]
    cfg: Any
    forward: Any = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    world: int = 1
    scaler: Any = None
    autocast: bool = False
    amp_dtype: torch.dtype = torch.bfloat16
    loss_hook: Callable | None = None

    def __post_init__(self) -> None:
        self.forward = self.model if self.forward is None else self.forward  # (a compiled module has no bool)
        self.accum = int(self.cfg.optim.grad_accum_steps)
        self.freeze_until = int(self.cfg.optim.freeze_last_layer_epochs * self.cfg.train.iters_per_epoch)

    def apply_schedules(self, step: int) -> tuple[float, float, float, float]:
        s = self.sched
        lr, wd, mom, tt = s["lr"](step), s["wd"](step), s["momentum"](step), s["teacher_temp"](step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
            group["weight_decay"] = wd * group.get("wd_mult", 1.0)
            if group.get("is_last_layer") and step < self.freeze_until:
                group["lr"] = 0.0
        return lr, wd, mom, tt

    def __call__(self, step: int, next_batch: Callable[[], dict[str, Any]]) -> StepResult:
        lr, wd, mom, teacher_temp = self.apply_schedules(step)
        gram_sched = self.sched.get("gram_weight")
        gram_weight = gram_sched(step) if gram_sched is not None else None
        parts_sum: dict[str, float] = {}
        loss_value, images = 0.0, 0
        for micro in range(self.accum):
            batch = next_batch()
            g, lc = crops_from_batch(batch, self.device, self.cfg.crops)  # crops.on_device: made here
            masks = batch["masks"].to(self.device, non_blocking=True)
            gram = {}
            if gram_weight is not None:
                gc = batch.get("gram_crops")
                gram = {"gram_weight": gram_weight,
                        "gram_crops": crops_to_device(gc, self.device) if gc is not None else None}
            last = micro == self.accum - 1
            sync = nullcontext() if (last or self.world == 1) else self.forward.no_sync()
            with sync:
                with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.autocast):
                    loss, parts = self.forward(g, lc, masks, teacher_temp, **gram)
                scaled = loss / self.accum
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            if self.loss_hook is not None:
                loss, parts = self.loss_hook(step, loss, parts)
            loss_value += float(loss.detach()) / self.accum
            for name, v in parts.items():
                parts_sum[name] = parts_sum.get(name, 0.0) + float(v) / self.accum
            images += g.shape[0] * self.world
        result = StepResult(loss_value, parts_sum, lr, wd, mom, teacher_temp, images, gram_weight=gram_weight)

        # Every rank agrees before anything is stepped, so all stop together.
        if any_rank(not math.isfinite(loss_value), self.device):
            self.optimizer.zero_grad(set_to_none=True)
            result.finite = False
            return result
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.cfg.optim.clip_grad:
            result.grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.student.parameters(),
                                                                    self.cfg.optim.clip_grad))
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.update_teacher(mom)
        if gram_weight is not None:
            if gram_refresh_due(self.cfg, step + 1):
                self.model.refresh_gram_teacher()
            result.gram_refreshes = int(self.model.gram_refreshes)
        return result
