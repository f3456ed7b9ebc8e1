"""reddino's Gram anchoring against numbers computed by the official facebookresearch/dinov3 code (commit 6876159;
see ``data/README.md``): the loss with every option, the term as training adds it (teacher tokens resized from the
Gram teacher's grid, tokens used, the scheduled weight) and the weight schedules. Every case drives reddino's own
code; the tolerance is 1e-5 relative (max |got − ref| / max |ref|), values and gradients."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from reddino.config import ConfigError, LossConfig, load_config
from reddino.model.gram import GramAnchoringLoss, GramLoss, resize_patch_tokens
from reddino.train.schedules import WarmupCosineDecay, build_schedules

REF = torch.load(Path(__file__).parent / "data" / "dinov3_gram_6876159.pt", weights_only=True)["gram"]
TOL = 1e-5


def rel_err(got, ref) -> float:
    ref = torch.as_tensor(ref, dtype=torch.float64)
    got = torch.as_tensor(got, dtype=torch.float64).reshape(ref.shape)
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("case", sorted(REF["cases"]))  # "<options>/img_level_<bool>"
def test_gram_loss_and_gradient_match_the_official_code(case):
    ref = REF["cases"][case]
    student = REF["inputs"]["student"].clone().requires_grad_(True)
    loss = GramLoss(**ref["options"])(student, REF["inputs"]["teacher"])
    loss.backward()
    assert rel_err(loss.detach(), ref["loss"]) <= TOL
    assert rel_err(student.grad, ref["grad_student"]) <= TOL


def test_remove_neg_with_remove_only_teacher_neg_is_refused_as_officially():
    opts = REF["rejected"]["norm_removeneg_teacherneg"]["options"]
    with pytest.raises(ValueError, match="exclude each other"):
        GramLoss(**opts)
    with pytest.raises(ConfigError, match="gram_remove_neg"):
        load_config(None, ["loss.gram_weight=1", "loss.gram_remove_neg=true", "loss.gram_remove_only_teacher_neg=true"])


def _loss_cfg(ref) -> LossConfig:
    o = ref["options"]
    return LossConfig(
        gram_weight=1.0, gram_teacher="ema" if ref["ema_teacher"] else "frozen", gram_normalized=o["apply_norm"],
        gram_img_level=o["img_level"], gram_remove_neg=o["remove_neg"],
        gram_remove_only_teacher_neg=o["remove_only_teacher_neg"], gram_tokens_used=ref["tokens_used"],
        gram_resize_method=ref["resize_method"], gram_resize_antialias=ref["resize_antialias"])


def _weight(ref) -> float:
    p = ref["schedule_params"]
    if p is None:  # the official constant loss_weight (1.0 in the default config)
        return 1.0
    return WarmupCosineDecay(p["start"], p["peak"], p["end"], p["warmup_iterations"], p["total_iterations"],
                             p["cosine_iterations"])(ref["iteration"])


@pytest.mark.parametrize("case", sorted(REF["combined"]))
def test_the_training_term_matches_the_official_meta_architecture(case):
    ref = REF["combined"][case]
    gram = GramAnchoringLoss(_loss_cfg(ref))
    sp = ref["student_patches"]  # [crops, B, P, D] → crop-major rows, as the model feeds them
    student = sp.flatten(0, 1).clone().requires_grad_(True)
    teacher = ref["teacher_patches"]
    assert teacher.shape[1] == ref["teacher_grid"] ** 2 and student.shape[1] == ref["student_grid"] ** 2
    assert rel_err(gram.teacher_tokens(teacher, student.shape[1]), ref["teacher_patches_used"]) <= TOL
    weight = _weight(ref)
    assert abs(weight - ref["weight"]) <= 1e-12 * max(1.0, abs(ref["weight"]))
    loss = gram(student, teacher, ref["masks"])
    total = weight * loss
    total.backward()
    assert rel_err(loss.detach(), ref["gram_loss"]) <= TOL
    assert rel_err(total.detach(), ref["total"]) <= TOL
    assert rel_err(student.grad.reshape(sp.shape), ref["grad_student_patches"]) <= TOL


@pytest.mark.parametrize("name", sorted(REF["weight_schedules"]))
def test_weight_schedule_matches_the_official_values(name):
    ref = REF["weight_schedules"][name]
    p = ref["params"]
    sched = WarmupCosineDecay(p["start"], p["peak"], p["end"], p["warmup_iterations"], p["total_iterations"],
                              p["cosine_iterations"])
    got = torch.tensor([sched(int(i)) for i in ref["iterations"]], dtype=torch.float64)
    assert torch.allclose(got, ref["values"], rtol=1e-12, atol=1e-12), (got, ref["values"])


def test_gram_weight_schedule_from_the_config_counts_epochs_of_iters_per_epoch():
    # The official gram-anchor recipe's schedule at 1000 iterations per epoch, 1200 epochs: reddino's config
    # gives the same weights (start 0, peak 0, end 2, warm-up 1000 epochs, cosine 1 epoch).
    ref = REF["weight_schedules"]["dinov3_vit7b16_gram_anchor"]
    recipe = ["train.epochs=1200", "train.iters_per_epoch=1000", "loss.gram_weight_schedule.start=0",
              "loss.gram_weight_schedule.peak=0", "loss.gram_weight_schedule.end=2.0",
              "loss.gram_weight_schedule.warmup_epochs=1000", "loss.gram_weight_schedule.cosine_epochs=1"]
    sched = build_schedules(load_config(None, recipe + ["loss.gram_weight=1"]), 1024)["gram_weight"]
    got = torch.tensor([sched(int(i)) for i in ref["iterations"]], dtype=torch.float64)
    assert torch.allclose(got, ref["values"], rtol=1e-12, atol=1e-12)
    assert "gram_weight" not in build_schedules(load_config(None, []), 1024)  # off: no schedule
    # gram_weight scales the schedule (0.5 × the official 2.0 at the end)
    half = build_schedules(load_config(None, recipe + ["loss.gram_weight=0.5"]), 1024)["gram_weight"]
    assert half(1_100_000) == 1.0 and half(1_000_500) == 0.5 * sched(1_000_500)
    assert "gram_weight" not in build_schedules(load_config(None, recipe), 1024)  # a schedule alone: still off


def test_tokens_used_masked_keeps_only_the_masked_rows_over_the_batch():
    torch.manual_seed(0)
    s, t = torch.randn(4, 9, 8), torch.randn(4, 9, 8)
    masks = torch.rand(4, 9) < 0.4
    cfg = LossConfig(gram_weight=1.0, gram_img_level=False, gram_tokens_used="masked")
    got = GramAnchoringLoss(cfg)(s, t, masks)
    assert torch.allclose(got, GramLoss(img_level=False)(s[masks], t[masks]))
    assert GramAnchoringLoss(cfg)(s, t, torch.zeros(4, 9, dtype=torch.bool)) == 0  # nothing masked
    with pytest.raises(ConfigError, match="gram_img_level"):
        load_config(None, ["loss.gram_weight=1", "loss.gram_tokens_used=masked"])


def test_resize_needs_square_grids_and_config_errors_name_the_field():
    with pytest.raises(ValueError, match="square"):
        resize_patch_tokens(torch.zeros(1, 10, 4), 4)
    for bad, field in ((["loss.gram_weight=1", "loss.gram_weight_schedule.end=-2"], "gram_weight_schedule"),
                       (["loss.gram_weight=1", "loss.gram_teacher=ema", "loss.gram_teacher_crops_size=64"],
                        "gram_teacher_crops_size"),
                       (["loss.gram_weight=-1"], "gram_weight"),
                       (["loss.gram_first_refresh=0"], "gram_first_refresh")):
        with pytest.raises(ConfigError, match=field):
            load_config(None, bad)
