"""Per-optimizer-step schedules: learning rate, weight decay, teacher momentum, teacher temperature.

As DINOv2's ``CosineScheduler``: a warm-up ``np.linspace(start, base, warmup)`` (both ends included, so
``base`` is reached at step ``warmup − 1``), then a half-cosine from ``base`` toward ``final``; from
``total`` on, ``final``. Steps are optimizer steps; ``total = epochs × iters_per_epoch``.
"""

from __future__ import annotations

import math

from reddino.config import RunConfig


class CosineSchedule:
    """``start_warmup → base`` linearly over steps ``0 … warmup_steps − 1``, then cosine ``base → final``.

    Callable by step: ``sched(step) -> float``; steps < 0 are treated as 0. Steps ≥ ``total_steps`` give
    ``final``, unless the warm-up is longer than the run: then the run ends inside the warm-up (RedDino warms
    the teacher temperature over 30 epochs and trains 10) and later steps keep the warm-up's value.
    """

    def __init__(
        self,
        base: float,
        final: float,
        total_steps: int,
        warmup_steps: int = 0,
        start_warmup: float = 0.0,
    ) -> None:
        self.base = float(base)
        self.final = float(final)
        self.total_steps = max(int(total_steps), 0)
        self.warmup_steps = max(int(warmup_steps), 0)
        self.start_warmup = float(start_warmup)

    def __call__(self, step: int) -> float:
        step = max(int(step), 0)
        if self.warmup_steps > self.total_steps:
            step = min(step, self.total_steps)
        elif step >= self.total_steps:
            return self.final
        if step < self.warmup_steps:
            if self.warmup_steps == 1:
                return self.start_warmup
            return self.start_warmup + (self.base - self.start_warmup) * step / (self.warmup_steps - 1)
        span = self.total_steps - self.warmup_steps
        if span <= 0:
            return self.final
        t = (step - self.warmup_steps) / span
        return self.final + 0.5 * (self.base - self.final) * (1.0 + math.cos(math.pi * t))

    def __repr__(self) -> str:
        return (
            f"CosineSchedule(base={self.base}, final={self.final}, total_steps={self.total_steps}, "
            f"warmup_steps={self.warmup_steps}, start_warmup={self.start_warmup})"
        )


def build_schedules(cfg: RunConfig, global_batch: int) -> dict[str, CosineSchedule | int]:
    """The run's schedules: ``lr``, ``wd``, ``momentum``, ``teacher_temp`` (CosineSchedule) and
    ``last_layer_lr_zero_until`` (an int: the head's last layer gets lr 0 for steps < this).

    lr: ``base_lr · sqrt(global_batch / lr_reference_batch)``, warm-up from 0 over ``warmup_epochs``, cosine to
    ``min_lr``. Teacher temperature: linear ``warmup_teacher_temp → teacher_temp`` over
    ``warmup_teacher_temp_epochs`` then constant (RedDino warms over 30 epochs but trains 10, so it ends at
    ~0.05).
    """
    ipe = int(cfg.train.iters_per_epoch)
    total = int(cfg.total_steps)
    oc, lc = cfg.optim, cfg.loss
    warm_tt = round(lc.warmup_teacher_temp_epochs * ipe)
    lr = oc.base_lr * math.sqrt(max(int(global_batch), 1) / oc.lr_reference_batch)
    return {
        "lr": CosineSchedule(lr, oc.min_lr, total, warmup_steps=round(oc.warmup_epochs * ipe), start_warmup=0.0),
        "wd": CosineSchedule(oc.weight_decay, oc.weight_decay_end, total),
        "momentum": CosineSchedule(oc.momentum_teacher, oc.final_momentum_teacher, total),
        # as DINOv2's train.py: a schedule of its own, warm-up only, then constant
        "teacher_temp": CosineSchedule(
            lc.teacher_temp, lc.teacher_temp, warm_tt, warmup_steps=warm_tt, start_warmup=lc.warmup_teacher_temp
        ),
        "last_layer_lr_zero_until": int(round(oc.freeze_last_layer_epochs * ipe)),
    }
