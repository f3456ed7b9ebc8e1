import math

import pytest

from reddino.config import RunConfig
from reddino.train.schedules import CosineSchedule, build_schedules


def test_cosine_schedule_known_steps():
    s = CosineSchedule(base=1.0, final=0.0, total_steps=110, warmup_steps=10, start_warmup=0.5)
    assert s(0) == pytest.approx(0.5)
    assert s(5) == pytest.approx(0.5 + 0.5 * 5 / 9)  # DINOv2's np.linspace: both ends included ...
    assert s(9) == pytest.approx(1.0)  # ... so the warm-up reaches base at step warmup − 1
    assert s(10) == pytest.approx(1.0)  # start of the cosine
    assert s(60) == pytest.approx(0.5)  # middle of the cosine
    assert s(110) == pytest.approx(0.0)
    assert s(10_000) == pytest.approx(0.0) and s(-3) == pytest.approx(0.5)
    assert CosineSchedule(2.0, 2.0, 10)(7) == 2.0


def test_build_schedules_reddino_values():
    cfg = RunConfig()  # ViT-S recipe: 10 epochs × 3200 it, warm-up 0.1 epoch
    sch = build_schedules(cfg, global_batch=256)
    total = 32_000
    lr = 2e-4 * math.sqrt(256 / 1024)
    assert sch["lr"](0) == 0.0
    assert sch["lr"](320) == pytest.approx(lr)
    assert sch["lr"](320 + (total - 320) // 2) == pytest.approx((lr + 1e-6) / 2, rel=1e-3)
    assert sch["lr"](total) == pytest.approx(1e-6)
    assert sch["wd"](0) == pytest.approx(0.04) and sch["wd"](total) == pytest.approx(0.2)
    assert sch["wd"](total // 2) == pytest.approx(0.12)
    assert sch["momentum"](0) == pytest.approx(0.994) and sch["momentum"](total) == pytest.approx(1.0)
    # teacher temperature: 0.04 → 0.07 over 30 epochs (linspace of 96,000 steps), but the run ends after 10
    assert sch["teacher_temp"](0) == pytest.approx(0.04)
    assert sch["teacher_temp"](total) == pytest.approx(0.04 + 0.03 * total / (96_000 - 1))
    assert sch["last_layer_lr_zero_until"] == 0


def test_teacher_temp_constant_after_warmup():
    cfg = RunConfig.model_validate(
        {"train": {"epochs": 4, "iters_per_epoch": 10}, "loss": {"warmup_teacher_temp_epochs": 1},
         "optim": {"freeze_last_layer_epochs": 1.5}}
    )
    sch = build_schedules(cfg, 32)
    assert sch["teacher_temp"](5) == pytest.approx(0.04 + 0.03 * 5 / 9)
    assert sch["teacher_temp"](9) == pytest.approx(0.07) and sch["teacher_temp"](10) == pytest.approx(0.07) and sch["teacher_temp"](39) == pytest.approx(0.07)
    assert sch["last_layer_lr_zero_until"] == 15
