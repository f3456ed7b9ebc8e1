import time

import pytest
import torch

from reddino.config import LossConfig, ModelConfig, OptimConfig
from reddino.model import DINOHead, DINOv2SSL, KoLeoLoss, backbone_tokens, marginal_entropy, rankme, teacher_entropy

TINY = dict(arch="vit_tiny_patch14_reddino", img_size=28, head_prototypes=64, head_hidden_dim=32,
            head_bottleneck_dim=16, head_nlayers=3)


def _model(**loss):
    torch.manual_seed(0)
    return DINOv2SSL.from_config(ModelConfig(**TINY), LossConfig(**loss))


def _batch(B=4, G=2, L=2):
    g = torch.randn(B, G, 3, 28, 28)
    l = torch.randn(B, L, 3, 14, 14) if L else None
    masks = torch.zeros(B, G, 4, dtype=torch.bool)
    masks[0, 0, :2] = True
    masks[2, 1, 3] = True
    return g, l, masks


def test_forward_backward_update_teacher_fast():
    model = _model(koleo_weight=0.1)
    model.train()
    g, l, masks = _batch()
    t0 = time.perf_counter()
    loss, parts = model(g, l, masks, teacher_temp=0.04)
    loss.backward()
    model.update_teacher(0.99)
    elapsed = time.perf_counter() - t0
    assert torch.isfinite(loss)
    assert set(parts) >= {"dino", "ibot", "koleo"}
    assert all(not v.requires_grad and v.dtype == torch.float32 for v in parts.values())
    assert parts["ibot"] > 0 and parts["koleo"] != 0
    x, m = g.transpose(0, 1).flatten(0, 1), masks.transpose(0, 1).flatten(0, 1)
    cls = backbone_tokens(model.student["backbone"], x, m, model.mask_token)["cls"]
    koleo = KoLeoLoss()
    assert parts["koleo"].item() == pytest.approx((koleo(cls[:4]) + koleo(cls[4:])).item(), rel=1e-4)
    expected = parts["dino"] + parts["ibot"] + 0.1 * parts["koleo"]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    for n, p in model.student.named_parameters():
        if n.endswith("last_layer.parametrizations.weight.original0"):
            assert not p.requires_grad, n  # prototype norms stay frozen at 1 (DINO's norm_last_layer)
            continue
        assert p.grad is not None, n
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    assert model.last_teacher_cls.shape == (8, 192) and model.last_teacher_probs.shape == (8, 64)
    assert elapsed < 30.0  # ~0.15 s on an idle core; only catches gross regressions on a loaded machine


def test_no_local_no_masks_and_koleo_skipped():
    model = _model(koleo_weight=0.0)
    g, _, _ = _batch(L=0)
    loss, parts = model(g, None, None, teacher_temp=0.07)
    loss.backward()
    assert parts["ibot"] == 0 and parts["koleo"] == 0 and torch.isfinite(loss)
    for n, p in model.student.named_parameters():  # all trainable student params in the graph (DDP-safe)
        assert p.grad is not None or not p.requires_grad, n
    assert model.mask_token.grad is not None


def test_separate_ibot_head_ema_centering():
    cfg = ModelConfig(**{**TINY, "ibot_separate_head": True, "ibot_head_prototypes": 32})
    model = DINOv2SSL.from_config(cfg, LossConfig(centering="ema"))
    assert model.student["ibot_head"].out_dim == 32 and "ibot_head" in model.teacher
    g, l, masks = _batch(L=1)
    loss, parts = model(g, l, masks, 0.05)
    loss.backward()
    assert parts["ibot"] > 0
    assert model.dino_loss.center.abs().sum() > 0 and model.ibot_loss.center.abs().sum() > 0
    loss, _ = model(g, l, torch.zeros_like(masks), 0.05)  # nothing masked: head still gets (zero) grads
    model.zero_grad()
    loss.backward()
    assert all(p.grad is not None for p in model.student["ibot_head"].parameters() if p.requires_grad)


def test_teacher_starts_as_copy_and_ema_exact():
    model = _model()
    for s, t in zip(model.student.parameters(), model.teacher.parameters()):
        assert torch.equal(s, t) and s.data_ptr() != t.data_ptr()
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(1.0)
    before = [t.clone() for t in model.teacher.parameters()]
    model.update_teacher(0.9)
    for s, t, t0 in zip(model.student.parameters(), model.teacher.parameters(), before):
        assert torch.allclose(t, 0.9 * t0 + 0.1 * s, atol=1e-6)
    model.update_teacher(1.0)
    for t, t0, s in zip(model.teacher.parameters(), before, model.student.parameters()):
        assert torch.allclose(t, 0.9 * t0 + 0.1 * s, atol=1e-6)


def test_teacher_stays_eval():
    model = _model()
    model.train()
    assert model.student.training and not model.teacher.training


def test_param_groups():
    model = _model()
    groups = model.param_groups(OptimConfig(patch_embed_lr_mult=0.2, layerwise_decay=0.5))
    by_name = {n: g for g in groups for n in g["names"]}
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in groups) == n_trainable
    assert by_name["student.backbone.patch_embed.proj.weight"]["lr_mult"] == pytest.approx(0.2 * 0.5**7)
    assert by_name["student.backbone.blocks.5.attn.qkv.weight"]["lr_mult"] == pytest.approx(0.5)
    assert by_name["student.backbone.blocks.0.attn.qkv.weight"]["lr_mult"] == pytest.approx(0.5**6)
    assert by_name["student.dino_head.mlp.0.weight"]["lr_mult"] == 1.0
    for name in ("student.backbone.blocks.0.attn.qkv.bias", "student.backbone.norm.weight", "mask_token",
                 "student.backbone.pos_embed", "student.backbone.cls_token", "student.backbone.blocks.1.ls1.gamma"):
        assert by_name[name]["wd_mult"] == 0.0, name
    assert by_name["student.backbone.blocks.0.mlp.fc1.weight"]["wd_mult"] == 1.0
    last = [n for n, g in by_name.items() if g["is_last_layer"]]
    assert last and all("dino_head.last_layer" in n for n in last)
    torch.optim.AdamW(groups, lr=1e-3)  # extra keys are fine for AdamW


def test_head_shapes_and_last_layer():
    head = DINOHead(8, 100, hidden_dim=16, bottleneck_dim=4, nlayers=3)
    out = head(torch.randn(5, 8))
    assert out.shape == (5, 100)
    assert out.abs().max() <= 1.0 + 1e-5  # unit-norm bottleneck · unit-norm prototypes
    out.sum().backward()
    assert head.mlp[0].weight.grad is not None and any(p.grad is not None for p in head.last_layer.parameters())
    assert DINOHead(8, 10, nlayers=1)(torch.randn(2, 8)).shape == (2, 10)


def test_monitors():
    uniform = torch.full((10, 8), 1 / 8)
    onehot = torch.nn.functional.one_hot(torch.zeros(10, dtype=torch.long), 8).float()
    ent, mean_ent = teacher_entropy(uniform)
    assert ent == pytest.approx(torch.log(torch.tensor(8.0)).item(), rel=1e-4) and mean_ent == pytest.approx(ent)
    ent, mean_ent = teacher_entropy(onehot)
    assert ent == pytest.approx(0.0, abs=1e-5) and mean_ent == pytest.approx(0.0, abs=1e-5)
    spread = torch.nn.functional.one_hot(torch.arange(8), 8).float()
    assert teacher_entropy(spread)[0] == pytest.approx(0.0, abs=1e-5)
    assert marginal_entropy(spread) == pytest.approx(torch.log(torch.tensor(8.0)).item(), rel=1e-4)
    assert rankme(torch.eye(16)) == pytest.approx(16, rel=1e-3)
    assert rankme(torch.ones(16, 4)) == pytest.approx(1.0, rel=1e-3)
    assert rankme(torch.zeros(4, 4)) == 0.0
    x = torch.randn(8, 4)
    x[0, 0] = float("nan")
    assert 1.0 <= rankme(x) <= 4.0


def test_collapse_signs_see_both_dino_collapses_and_low_rank():
    from reddino.model.monitors import collapse_signs

    kw = dict(n_rows=64, dim=192, prototypes=1024, rankme_frac=0.1, uniform_frac=0.95, marginal_frac=0.1)
    # The collapsed Chula run of the issue: per-image entropy 6.7 of ln 1024 = 6.93, RankMe 4 of 192.
    signs = collapse_signs(rankme_value=4.0, mean_entropy=6.7, marginal=6.9, **kw)
    assert len(signs) == 2 and "uniform" in signs[0] and "RankMe 4.0" in signs[1]
    # Every image on one prototype.
    signs = collapse_signs(rankme_value=30.0, mean_entropy=0.01, marginal=0.05, **kw)
    assert len(signs) == 1 and "same prototypes" in signs[0]
    # Healthy: sharp, image-specific targets and a spread batch.
    assert collapse_signs(rankme_value=30.0, mean_entropy=2.0, marginal=3.9, **kw) == []


def test_from_config_warm_start(tmp_path):
    from reddino.model import create_backbone

    src = create_backbone("vit_tiny_patch14_reddino", img_size=42)
    sd = {"teacher.backbone." + k: v for k, v in src.state_dict().items()}
    sd["teacher.backbone.mask_token"] = torch.full((1, 192), 0.5)
    torch.save({"model": sd}, tmp_path / "ckpt.pth")
    model = DINOv2SSL.from_config(ModelConfig(**{**TINY, "pretrained": str(tmp_path / "ckpt.pth")}))
    for part in (model.student, model.teacher):
        assert torch.equal(part["backbone"].blocks[3].attn.qkv.weight, src.blocks[3].attn.qkv.weight)
        assert part["backbone"].pos_embed.shape == (1, 5, 192)  # 3×3 grid resized to 2×2
    assert torch.allclose(model.mask_token, torch.full((1, 192), 0.5))


def test_head_batchnorm_teacher_normalises_with_batch_statistics():
    torch.manual_seed(0)
    model = DINOv2SSL.from_config(ModelConfig(**{**TINY, "head_use_bn": True}), LossConfig())
    model.train()
    bns = [m for m in model.teacher.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert len(bns) == 2 and all(m.training for m in bns)
    assert not model.teacher["backbone"].training  # no drop-path in the teacher all the same
    loss, _ = model(*_batch())
    loss.backward()
    assert torch.isfinite(loss)
    # A shared offset (what every image's CLS has in common) is removed before the prototypes.
    head = model.teacher["dino_head"]
    dim = head.mlp[0].in_features
    with torch.no_grad():
        x = torch.randn(16, dim) * 0.01 + 5.0
        hidden = head.mlp[1](head.mlp[0](x))
    assert hidden.mean(0).abs().max() < 1e-4 and hidden.std(0).mean() > 0.5
    model.eval()
    assert not any(m.training for m in bns)
