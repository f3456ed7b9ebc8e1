"""The distillation objective and method (no Ray): loss values, patch resampling, learning, bad pairs, NaN teacher."""

import pytest
import torch

from reddino.config import load_config
from reddino.model import create_backbone
from reddino.model.distill import DistillLoss, DistillSSL, check_pair, check_teacher_output


def test_loss_is_zero_at_the_teacher_and_resamples_the_student_grid_to_the_teachers():
    torch.manual_seed(0)
    loss = DistillLoss(8, 8, "mse")
    for proj in (loss.cls_proj, loss.patch_proj):
        proj.weight.data.copy_(torch.eye(8))
        proj.bias.data.zero_()
    t_cls = torch.randn(3, 8)
    # a student map constant over its 2x2 grid resamples to the same constant on the teacher's 4x4 grid
    vec = torch.randn(3, 1, 8)
    total, parts = loss(t_cls, t_cls, vec.expand(3, 4, 8), (2, 2), vec.expand(3, 16, 8), (4, 4))
    assert float(total.detach()) == pytest.approx(0.0, abs=1e-10)
    assert float(parts["distill_cos"]) == pytest.approx(1.0, abs=1e-6)
    assert float(parts["distill_patch"]) == pytest.approx(0.0, abs=1e-10)
    # MSE sees a scaled teacher, cosine does not (why the choice is a knob: see the module doc)
    _, mse = loss(t_cls, 2 * t_cls)
    cos = DistillLoss(8, 8, "cosine", patch_weight=0)
    cos.cls_proj.load_state_dict(loss.cls_proj.state_dict())
    c_total, c_parts = cos(t_cls, 2 * t_cls)
    assert float(mse["distill_cls"]) == pytest.approx(float((t_cls ** 2).mean()), rel=1e-5)
    assert float(c_total) == pytest.approx(0.0, abs=1e-6) and "distill_patch" not in c_parts


def _cfg(**extra):
    overrides = ["model.img_size=32", "crops.global_crops_size=32", "distill.teacher=unused"]
    return load_config("distill_cpu", overrides + [f"{k}={v}" for k, v in extra.items()])


def _teacher(arch="vit_mini_patch8_reddino", **kw):
    torch.manual_seed(1)
    return create_backbone(arch, 32, timm_kwargs=kw or None).eval()


@pytest.mark.parametrize("student_arch,kwargs", [("vit_mini_patch8_reddino", {"embed_dim": 32, "depth": 1}),
                                                 ("convnext_atto", {"dims": [8, 16, 24, 32], "depths": [1, 1, 1, 1]})])
def test_a_few_steps_raise_the_students_cosine_to_the_frozen_teacher(student_arch, kwargs):
    teacher = _teacher()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    cfg = _cfg(**{"model.arch": student_arch})
    cfg.model.timm_kwargs = kwargs
    torch.manual_seed(0)
    model = DistillSSL.from_config(cfg, teacher=teacher)
    assert not any(k.startswith("distill_teacher") for k in model.state_dict())  # never in a checkpoint
    trainable = [n for g in model.param_groups(cfg.optim) for n in g["names"]]
    assert trainable and all(n.startswith(("student.backbone", "student.distill_head")) for n in trainable)
    opt = torch.optim.AdamW([p for g in model.param_groups(cfg.optim) for p in g["params"]], lr=3e-3)
    x = torch.rand(8, 2, 3, 32, 32)
    model.train()
    cos = []
    for _ in range(25):
        loss, parts = model(x)
        loss.backward()
        opt.step()
        opt.zero_grad()
        model.update_teacher(0.9)
        cos.append(float(parts["distill_cos"]))
    assert cos[-1] > cos[0] + 0.2, cos
    assert "distill_patch" in parts and model.last_teacher_cls.shape[0] == 16  # RankMe watches the student
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())  # the teacher stays frozen
    assert not teacher.training


def test_pairs_that_cannot_match_and_a_nan_teacher_are_refused_by_name():
    teacher16 = create_backbone("vit_small_patch16_dinov3", 32, timm_kwargs={"depth": 1, "embed_dim": 64,
                                                                              "num_heads": 2})
    student = create_backbone("vit_mini_patch8_reddino", 56)
    with pytest.raises(ValueError, match=r"teacher 'L'.*56-px views do not tile into whole 16-px patches.*"
                                         r"distill.teacher_img_size"):
        check_pair(teacher16, student, 56, None, "teacher 'L'", "student")
    check_pair(teacher16, student, 56, 64, "teacher 'L'", "student")  # resized to 64 for the teacher: fine
    with pytest.raises(ValueError, match="student 's'.*60-px views.*8-px"):
        check_pair(teacher16, student, 60, 64, "teacher", "student 's'")
    conv = create_backbone("convnext_atto", 56)
    with pytest.raises(ValueError, match="teacher 'c'.*16-px view is smaller than this ConvNeXt's total stride 32"):
        check_pair(conv, student, 56, 16, "teacher 'c'", "student")

    bad = _teacher()
    with torch.no_grad():
        bad.blocks[0].mlp.fc1.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="teacher 'x'.*not finite.*refusing to distil"):
        check_teacher_output(bad, 32, "teacher 'x'")
    check_teacher_output(_teacher(), 32, "teacher")
