"""The loop's health hook on its own (no Ray): monitors, the two-in-a-row rule, warn once, stop when asked."""

from types import SimpleNamespace

import torch

from reddino.config import RunConfig
from reddino.train.hooks import HealthMonitor


def _collapsed_model(rows=64, dim=32, prototypes=128):
    cls = torch.randn(rows, 1) * torch.ones(1, dim)  # rank 1: every feature on one direction
    probs = torch.full((rows, prototypes), 1.0 / prototypes)  # uniform targets
    return SimpleNamespace(last_teacher_cls=cls, last_teacher_probs=probs)


def _cfg(**train):
    return RunConfig.model_validate({"model": {"head_prototypes": 128}, "train": {"monitor_every": 10, **train}})


def test_collapse_is_confirmed_on_the_second_monitor_step_and_warns_once(capsys):
    tags = []
    health = HealthMonitor(_cfg(), guard_from=20, tag=lambda k, v: tags.append((k, v)))
    model = _collapsed_model()
    assert "collapse" not in health(model, 10)  # before the guard starts: monitors only
    first = health(model, 20)
    assert first["rankme"] < 2 and "collapse" not in first  # one sign is not yet a collapse
    assert health(model, 30)["collapse"] == 1.0 and health(model, 40)["collapse"] == 1.0
    out = capsys.readouterr().out
    assert out.count("WARNING collapse: step 30:") == 1 and "step 40" not in out
    assert [k for k, _ in tags] == ["reddino.collapse_warning"] and "uniform teacher targets" in tags[0][1]
    assert health.stop_reason is None


def test_collapse_stop_gives_the_stop_reason_and_a_healthy_model_none():
    health = HealthMonitor(_cfg(collapse_stop=True), guard_from=0)
    model = _collapsed_model()
    health(model, 10)
    health(model, 20)
    assert health.stop_reason.startswith("representation collapse at step 20:")
    healthy = HealthMonitor(_cfg(collapse_stop=True), guard_from=0)
    torch.manual_seed(0)
    logits = torch.randn(64, 128) * 3
    model = SimpleNamespace(last_teacher_cls=torch.randn(64, 32), last_teacher_probs=logits.softmax(-1))
    for step in (10, 20, 30):
        assert "collapse" not in healthy(model, step)
    assert healthy.stop_reason is None
    assert HealthMonitor(_cfg(monitor_every=0), 0).due(10, True) is False
