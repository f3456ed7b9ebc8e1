import math

import pytest
import torch
import torch.nn.functional as F

from reddino.model.losses import (
    CENTERING, DINOLoss, EMACenter, IBOTPatchLoss, KoLeoLoss, check_centering, sinkhorn_knopp,
)


def test_sinkhorn_rows_and_columns():
    torch.manual_seed(0)
    B, K = 16, 8
    logits = torch.randn(B, K)
    q = sinkhorn_knopp(logits, 0.5, n_iterations=3)
    assert q.shape == (B, K)
    assert torch.allclose(q.sum(1), torch.ones(B), atol=1e-5)
    assert torch.allclose(q.sum(0), torch.full((K,), B / K), rtol=0.3)
    q = sinkhorn_knopp(logits, 0.5, n_iterations=300)
    assert torch.allclose(q.sum(1), torch.ones(B), atol=1e-5)
    assert torch.allclose(q.sum(0), torch.full((K,), B / K), atol=1e-3)


def test_sinkhorn_extreme_logits_finite():
    # exp(4 / 0.04) overflows float32: the one global shift keeps it finite
    logits = torch.tensor([[4.0, -4.0, 0.0], [-4.0, 4.0, 1.0]])
    assert not torch.isfinite(torch.exp(logits / 0.04)).all()
    q = sinkhorn_knopp(logits, 0.04, 3)
    assert torch.isfinite(q).all()
    assert torch.allclose(q.sum(1), torch.ones(2), atol=1e-5)


def test_ema_center_update_value():
    c = EMACenter(3, momentum=0.9)
    t = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    probs = c(t, 0.5)
    assert torch.allclose(probs, F.softmax(t / 0.5, dim=-1))  # centre was 0 when used
    assert torch.allclose(c.center, torch.full((1, 3), 0.2))  # 0.9·0 + 0.1·mean=2
    c(t, 0.5)
    assert torch.allclose(c.center, torch.full((1, 3), 0.38))  # 0.9·0.2 + 0.1·2


def test_centering_names():
    assert set(CENTERING) == {"ema", "sinkhorn_knopp"}
    with pytest.raises(ValueError, match="ema, sinkhorn_knopp"):
        check_centering("softmax")
    with pytest.raises(ValueError, match="valid values"):
        DINOLoss(4).teacher_probs(torch.zeros(2, 4), 0.1, centering="nope")


def _ce(t, s, temp):
    return -(t * F.log_softmax(s / temp, dim=-1)).sum(-1).mean()


def test_dino_loss_two_global_crops_hand_computed():
    loss = DINOLoss(3, student_temp=0.1)
    s1 = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    s2 = torch.tensor([[0.0, 0.0, 1.0], [0.5, 0.5, 0.0]])
    t1 = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    t2 = torch.tensor([[0.3, 0.3, 0.4], [0.9, 0.05, 0.05]])
    got = loss([s1, s2], [t1, t2])
    # pairs (teacher 1, student 2) and (teacher 2, student 1); same-crop pairs skipped
    manual = 0.0
    for t, s in ((t1, s2), (t2, s1)):
        for b in range(2):
            ls = [x / 0.1 for x in s[b].tolist()]
            lse = math.log(sum(math.exp(v) for v in ls))
            manual += -sum(tk * (v - lse) for tk, v in zip(t[b].tolist(), ls)) / 2
    # no local crop: DINOv2 divides the 2 global pairs by 2 + max(0, 1) = 3
    assert got.item() == pytest.approx(manual / 3, rel=1e-5)
    all_pairs = loss([s1, s2], [t1, t2], ignore_same_crop=False)
    expected = (_ce(t1, s1, 0.1) + _ce(t2, s1, 0.1) + _ce(t1, s2, 0.1) + _ce(t2, s2, 0.1)) / 4
    assert all_pairs.item() == pytest.approx(expected.item(), rel=1e-5)


def test_dino_loss_single_local_crop_counts():
    torch.manual_seed(0)
    loss = DINOLoss(5)
    g = [torch.randn(4, 5), torch.randn(4, 5)]
    t = [F.softmax(torch.randn(4, 5), -1) for _ in range(2)]
    local_a = torch.randn(4, 5, requires_grad=True)
    la = loss(g + [local_a], t)
    lb = loss(g + [torch.randn(4, 5) * 5], t)
    assert la.item() != pytest.approx(lb.item())
    expected = (_ce(t[0], g[1], 0.1) + _ce(t[1], g[0], 0.1) + _ce(t[0], local_a, 0.1) + _ce(t[1], local_a, 0.1)) / 4
    assert la.item() == pytest.approx(expected.item(), rel=1e-5)
    la.backward()
    assert local_a.grad is not None and local_a.grad.abs().sum() > 0
    # no local crops: global pairs only, divided by DINOv2's 2 + max(0, 1) = 3
    assert loss(g, t).item() == pytest.approx(((_ce(t[0], g[1], 0.1) + _ce(t[1], g[0], 0.1)) / 3).item(), rel=1e-5)


def test_ibot_loss_masked_only_and_per_image_weights():
    torch.manual_seed(0)
    loss = IBOTPatchLoss(6, student_temp=0.1, average_over="masked")
    masks = torch.tensor([[True, True, False, False], [False, False, False, False], [False, True, False, False]])
    s = torch.randn(3, 6, requires_grad=True)  # 3 masked tokens in row-major order: img0, img0, img2
    t = F.softmax(torch.randn(3, 6), -1)
    got = loss(s, t, masks)
    ce = -(t * F.log_softmax(s / 0.1, -1)).sum(-1)
    expected = ((ce[0] + ce[1]) / 2 + ce[2]) / 2  # two images with masks, each counted once
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    dinov2_style = IBOTPatchLoss(6)(s, t, masks)  # the default: DINOv2 divides by all images
    assert dinov2_style.item() == pytest.approx(expected.item() * 2 / 3, rel=1e-5)


def test_ibot_loss_zero_without_masks_keeps_graph():
    loss = IBOTPatchLoss(6)
    s = torch.randn(0, 6, requires_grad=True)
    out = loss(s, torch.zeros(0, 6), torch.zeros(2, 4, dtype=torch.bool))
    assert out.item() == 0.0 and out.requires_grad
    out.backward()


def test_ibot_teacher_probs_sinkhorn_over_masked_tokens():
    loss = IBOTPatchLoss(4)
    p = loss.teacher_probs(torch.randn(10, 4), 0.07, "sinkhorn_knopp", 3)
    assert torch.allclose(p.sum(1), torch.ones(10), atol=1e-5)
    p = loss.teacher_probs(torch.randn(10, 4), 0.07, "ema")
    assert torch.allclose(p.sum(1), torch.ones(10), atol=1e-5) and loss.center.abs().sum() > 0


def test_koleo_finite_edge_cases():
    k = KoLeoLoss()
    one = torch.randn(1, 8, requires_grad=True)
    out = k(one)
    assert out.item() == 0.0
    out.backward()
    dup = torch.ones(4, 8, requires_grad=True)
    out = k(dup)
    assert torch.isfinite(out)
    out.backward()
    assert torch.isfinite(dup.grad).all()
    zeros = torch.zeros(3, 8, requires_grad=True)
    out = k(zeros)
    assert torch.isfinite(out)
    out.backward()
    assert torch.isfinite(zeros.grad).all()
    # spread-out points have lower loss than clustered ones
    spread = torch.eye(8)
    clustered = torch.eye(8) * 0.01 + 1.0
    assert k(spread) < k(clustered)
