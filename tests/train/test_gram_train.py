"""Gram anchoring in training: the Gram teacher's crops, the step (scheduled weight, refreshes on schedule) and
exact resume from a checkpoint taken between two refreshes."""

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from reddino.config import load_config
from reddino.data.augment import MultiCropTransform, sample_masks
from reddino.data.synth import render_patch, source_styles
from reddino.model import DINOv2SSL
from reddino.train import checkpoint as ckpt
from reddino.train.schedules import build_schedules
from reddino.train.step import TrainStep

TINY = Path(__file__).parents[1] / "tiny.yaml"
# 28 px global crops (2×2 tokens of 14 px), Gram teacher at 56 px (4×4 tokens, resized to 2×2)
GRAM = ["model.img_size=28", "crops.global_crops_size=28", "crops.local_crops_size=14", "model.head_prototypes=32",
        "model.head_hidden_dim=32", "model.head_bottleneck_dim=16", "train.iters_per_epoch=10", "train.epochs=1",
        "loss.gram_teacher_crops_size=56", "loss.gram_weight=1", "loss.gram_weight_schedule.start=0", "loss.gram_weight_schedule.peak=1",
        "loss.gram_weight_schedule.end=2", "loss.gram_weight_schedule.warmup_epochs=0.2",
        "loss.gram_first_refresh=2", "loss.gram_refresh_every=2", "loss.gram_max_refreshes=2"]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread is fastest, and two spin badly on a loaded 2-core machine (10x slower, measured)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _images(n=3, size=96):
    style = source_styles(1, seed=0)[0]
    rng = np.random.default_rng(0)
    return np.array([cv2.imencode(".png", render_patch(style, rng, size=size)[0])[1].tobytes() for _ in range(n)],
                    dtype=object)


def test_gram_crops_see_the_student_crops_region_at_twice_the_pixels():
    cfg = load_config(str(TINY), GRAM)
    images = _images()
    for policy in ("none", "cell"):
        crops = cfg.crops.model_copy(update={"policy": policy})
        out = MultiCropTransform(crops, cfg.mask, 14, 96, normalize=False, gram_crops_size=56)({"image": images})
        g, t = out["global_crops"], out["gram_crops"]
        assert g.shape == (3, 2, 28, 28, 3) and t.shape == (3, 2, 56, 56, 3)
        down = np.stack([[np.asarray(Image.fromarray(x).resize((28, 28), Image.BICUBIC)) for x in row] for row in t])
        if policy == "none":  # geometry only: the student crop is the teacher crop, resized
            assert np.array_equal(down, g)
        else:  # pixel transforms (blur, noise, colour) on top, same region and orientation
            for a, b in zip(down.reshape(6, -1).astype(float), g.reshape(6, -1).astype(float)):
                assert np.corrcoef(a, b)[0, 1] > 0.8
    # without a Gram size nothing changes: same crops as before, no gram_crops
    plain = MultiCropTransform(cfg.crops, cfg.mask, 14, 96, normalize=False)({"image": images})
    assert "gram_crops" not in plain


# Each backbone family (small members, as tests/train/test_families.py): its crop sizes, Gram crops at twice them
FAMILIES = {
    "vit": [],
    "eva": ["model.arch=vit_small_patch16_dinov3_qkvb", "model.patch_size=8", "loss.ibot_weight=1.0",
            "model.timm_kwargs={depth: 2, embed_dim: 64, num_heads: 2, rope_rescale_coords: 2.0}",
            "model.img_size=32", "crops.global_crops_size=32", "crops.local_crops_size=16",
            "loss.gram_teacher_crops_size=64"],
    "convnext": ["model.arch=convnext_atto", "model.timm_kwargs={depths: [1, 1, 1, 1], dims: [16, 32, 64, 128]}",
                 "loss.ibot_weight=0.0", "model.img_size=64", "crops.global_crops_size=64",
                 "crops.local_crops_size=32", "loss.gram_teacher_crops_size=128"],
}


def _setup(seed=0, fam="vit"):
    cfg = load_config(str(TINY), GRAM + FAMILIES[fam])
    torch.manual_seed(seed)
    model = DINOv2SSL.from_config(cfg.model, cfg.loss)
    model.train()
    opt = torch.optim.AdamW(model.param_groups(cfg.optim), lr=0.0, betas=tuple(cfg.optim.betas))
    return cfg, model, opt, TrainStep(model, opt, build_schedules(cfg, 4), cfg)


def _batch(cfg, seed, n=4, stride=14):
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    S, s, T = cfg.crops.global_crops_size, cfg.crops.local_crops_size, cfg.loss.gram_teacher_crops_size
    side = S // stride
    batch = {"global_crops": torch.randn(n, 2, 3, S, S, generator=g),
             "local_crops": torch.randn(n, 2, 3, s, s, generator=g),
             "masks": torch.from_numpy(np.stack([sample_masks(rng, 2, (side, side), cfg.mask) for _ in range(n)]))}
    if T:
        batch["gram_crops"] = torch.randn(n, 2, 3, T, T, generator=g)
    return batch


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("fam", list(FAMILIES))
def test_resume_from_a_checkpoint_between_refreshes_is_exact(tmp_path, fam):
    cfg, model, opt, step = _setup(fam=fam)
    batches = [_batch(cfg, i, stride=model.patch_size) for i in range(6)]
    gram_keys = [k for k in model.state_dict() if k.startswith("gram_teacher.")]
    results, snapshots = [], {}
    for i in range(6):
        results.append(step(i, lambda: batches[i]))
        snapshots[i + 1] = _state(model)
        if i + 1 == 3:  # between the refreshes after steps 2 and 4
            ckpt.save(tmp_path, model=model, optimizer=opt, scaler=None, state=ckpt.TrainState(step=3),
                      config_yaml="")
    # weight: 0 at step 0 (nothing computed), then the schedule; refreshes after steps 2 and 4, none after 6
    assert "gram" not in results[0].parts and results[0].gram_weight == 0.0
    assert results[1].gram_weight == 0.5 and results[2].gram_weight == 1.0 and results[5].gram_weight > 1.0
    assert all(r.parts.get("gram", 1) > 0 for r in results[1:])
    assert [r.gram_refreshes for r in results] == [0, 1, 1, 2, 2, 2]
    metrics = results[3].metrics()
    assert metrics["gram_refreshes"] == 2 and metrics["gram_weight"] == results[3].gram_weight and "loss_gram" in metrics
    for s in (2, 4):  # a refresh copies the EMA teacher's backbone as it is after that step
        assert all(torch.equal(snapshots[s][k], snapshots[s][k.replace("gram_teacher.", "teacher.backbone.")])
                   for k in gram_keys)
    assert all(torch.equal(snapshots[6][k], snapshots[4][k]) for k in gram_keys)  # max_refreshes: frozen after 4
    assert not all(torch.equal(snapshots[3][k], snapshots[3][k.replace("gram_teacher.", "teacher.backbone.")])
                   for k in gram_keys)

    # A fresh process's model (other init) restored from the step-3 checkpoint continues bit for bit.
    cfg2, model2, opt2, step2 = _setup(seed=1, fam=fam)
    state = ckpt.load(tmp_path, model=model2, optimizer=opt2)
    assert state.step == 3 and int(model2.gram_refreshes) == 1
    for i in range(3, 6):
        res = step2(i, lambda: batches[i])
        assert res.loss == results[i].loss and res.parts == results[i].parts
        assert res.gram_refreshes == results[i].gram_refreshes
    final = _state(model2)
    assert final.keys() == snapshots[6].keys()
    assert all(torch.equal(final[k], snapshots[6][k]) for k in final), \
        [k for k in final if not torch.equal(final[k], snapshots[6][k])][:5]


def test_gram_teacher_from_a_file_and_the_ema_teacher_variant(tmp_path):
    from reddino.model import export_backbone

    cfg, model, _, _ = _setup()
    path = export_backbone(model.student["backbone"], tmp_path / "anchor.safetensors")
    with torch.no_grad():  # make the file differ from the model's own start
        for p in model.student["backbone"].parameters():
            p.add_(0.1)
    export_backbone(model.student["backbone"], path)
    cfg_file = load_config(str(TINY), GRAM + [f"loss.gram_teacher_path={path}"])
    torch.manual_seed(0)
    m = DINOv2SSL.from_config(cfg_file.model, cfg_file.loss)
    assert all(torch.equal(a, b) for a, b in zip(m.gram_teacher.state_dict().values(),
                                                 model.student["backbone"].state_dict().values()))
    assert not any(p.requires_grad for p in m.gram_teacher.parameters())
    # gram_teacher=ema: no separate backbone, no Gram crops; the EMA teacher's own patch tokens
    ema = load_config(str(TINY), GRAM[:8] + ["loss.gram_weight=1", "loss.gram_teacher=ema"])
    m = DINOv2SSL.from_config(ema.model, ema.loss)
    assert m.gram_teacher is None and not any(k.startswith("gram_teacher") for k in m.state_dict())
    b = _batch(ema, 0)
    loss, parts = m(b["global_crops"], b["local_crops"], b["masks"], 0.04, gram_weight=1.0)
    assert parts["gram"] > 0
    with pytest.raises(RuntimeError, match="no frozen Gram teacher"):
        m.refresh_gram_teacher()
    # a frozen teacher at a Gram crop size needs the Gram crops
    _, model, _, _ = _setup()
    with pytest.raises(ValueError, match="gram_crops"):
        model(b["global_crops"], b["local_crops"], b["masks"], 0.04, gram_weight=1.0)


@pytest.mark.parametrize("fam", ["vit", "convnext"])
def test_warm_start_from_a_gram_runs_weights_takes_the_ema_teacher_not_the_gram_teacher(tmp_path, fam):
    from reddino.model import create_backbone, load_pretrained

    cfg, model, opt, step = _setup(fam=fam)
    batches = [_batch(cfg, i, stride=model.patch_size) for i in range(3)]
    for i in range(3):
        step(i, lambda: batches[i])
    torch.save({"model": model.state_dict()}, tmp_path / "weights.pt")  # student, teacher and Gram teacher
    backbone = create_backbone(cfg.model.arch, cfg.model.img_size, cfg.model.patch_size,
                               timm_kwargs=cfg.model.timm_kwargs)
    mask_token = load_pretrained(backbone, tmp_path / "weights.pt")
    if fam == "vit":
        assert torch.equal(mask_token, model.mask_token.detach())
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, model.teacher["backbone"].state_dict()[k]), k
    assert not all(torch.equal(v, model.gram_teacher.state_dict()[k]) for k, v in backbone.state_dict().items())
