"""Per-optimizer-step schedules: learning rate, weight decay, teacher momentum, teacher temperature, and the Gram
anchoring weight and Gram-teacher refreshes.

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


class WarmupCosineDecay:
    """DINOv3's ``linear_warmup_cosine_decay`` (the Gram loss-weight schedule), as a function of the step.

    ``start → peak`` linearly over ``warmup_steps`` steps (``linspace(start, peak, warmup, endpoint=False)``), then
    ``peak → end`` along a half cosine over ``cosine_steps`` steps (``linspace(0, π, cosine)``: ``end`` is reached
    at its last step), then ``end``. ``cosine_steps`` None: the steps left after the warm-up until ``total_steps``.
    Unlike the official array, steps past the end give ``end`` instead of an index error.
    """

    def __init__(self, start: float, peak: float, end: float, warmup_steps: int, total_steps: int,
                 cosine_steps: int | None = None) -> None:
        self.start, self.peak, self.end = float(start), float(peak), float(end)
        self.warmup_steps = max(int(warmup_steps), 0)
        self.total_steps = max(int(total_steps), 0)
        self.cosine_steps = max(int(self.total_steps - self.warmup_steps if cosine_steps is None else cosine_steps), 0)

    def __call__(self, step: int) -> float:
        step = max(int(step), 0)
        if step < self.warmup_steps:
            return self.start + (self.peak - self.start) * step / self.warmup_steps
        k = step - self.warmup_steps
        if k < self.cosine_steps:
            theta = math.pi * k / (self.cosine_steps - 1) if self.cosine_steps > 1 else 0.0
            return self.end + 0.5 * (self.peak - self.end) * (1.0 + math.cos(theta))
        return self.end

    def __repr__(self) -> str:
        return (f"WarmupCosineDecay(start={self.start}, peak={self.peak}, end={self.end}, "
                f"warmup_steps={self.warmup_steps}, cosine_steps={self.cosine_steps})")


def gram_weight_schedule(cfg: RunConfig) -> WarmupCosineDecay | None:
    """The Gram term's weight per step: ``loss.gram_weight`` × ``loss.gram_weight_schedule`` (epochs ×
    ``iters_per_epoch``, as DINOv3's epochs × its epoch length), or the constant ``gram_weight`` without a
    schedule; None when Gram anchoring is off."""
    lc = cfg.loss
    if not lc.gram_enabled:
        return None
    total = int(cfg.total_steps)
    w, ws = lc.gram_weight, lc.gram_weight_schedule
    if ws is None:
        return WarmupCosineDecay(w, w, w, 0, total)
    ipe = int(cfg.train.iters_per_epoch)
    cosine = None if ws.cosine_epochs is None else round(ws.cosine_epochs * ipe)
    return WarmupCosineDecay(w * ws.start, w * ws.peak, w * ws.end, round(ws.warmup_epochs * ipe), total, cosine)


def gram_refresh_due(cfg: RunConfig, steps_done: int) -> bool:
    """Whether the frozen Gram teacher becomes a copy of the EMA teacher once ``steps_done`` steps have finished
    (teacher EMA included): at ``gram_first_refresh + k · gram_refresh_every`` for k < ``gram_max_refreshes``, as
    DINOv3 refreshes after iteration ``it_first_update − 1 + k · update_frequency``. A pure function of the step,
    so a resumed run refreshes where an uninterrupted one does."""
    lc = cfg.loss
    if not lc.gram_enabled or lc.gram_teacher != "frozen" or lc.gram_first_refresh is None:
        return False
    if steps_done < lc.gram_first_refresh:
        return False
    k, rest = divmod(steps_done - lc.gram_first_refresh, lc.gram_refresh_every)
    return rest == 0 and (lc.gram_max_refreshes is None or k < lc.gram_max_refreshes)


def build_schedules(cfg: RunConfig, global_batch: int) -> dict[str, CosineSchedule | WarmupCosineDecay | int]:
    """The run's schedules: ``lr``, ``wd``, ``momentum``, ``teacher_temp`` (CosineSchedule) and
    ``last_layer_lr_zero_until`` (an int: the head's last layer gets lr 0 for steps < this); with Gram anchoring
    on, also ``gram_weight`` (:func:`gram_weight_schedule`).

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
    out = {
        "lr": CosineSchedule(lr, oc.min_lr, total, warmup_steps=round(oc.warmup_epochs * ipe), start_warmup=0.0),
        "wd": CosineSchedule(oc.weight_decay, oc.weight_decay_end, total),
        "momentum": CosineSchedule(oc.momentum_teacher, oc.final_momentum_teacher, total),
        # as DINOv2's train.py: a schedule of its own, warm-up only, then constant
        "teacher_temp": CosineSchedule(
            lc.teacher_temp, lc.teacher_temp, warm_tt, warmup_steps=warm_tt, start_warmup=lc.warmup_teacher_temp
        ),
        "last_layer_lr_zero_until": int(round(oc.freeze_last_layer_epochs * ipe)),
    }
    gram = gram_weight_schedule(cfg)
    if gram is not None:
        out["gram_weight"] = gram
    return out
