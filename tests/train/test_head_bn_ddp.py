"""Head BatchNorm with 2 DDP workers on CPU (gloo), wrapped as the loop wraps it: each worker normalises its own
batch (SyncBatchNorm is GPU-only), gradients are all-reduced, so the ranks' weights stay identical while their
BN running statistics (never used: the teacher normalises with batch statistics) are their own."""

import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from reddino.config import load_config
from reddino.data.augment import sample_masks
from reddino.model import DINOv2SSL
from reddino.runtime import free_port
from reddino.train.schedules import build_schedules
from reddino.train.step import TrainStep

TINY = Path(__file__).parents[1] / "tiny.yaml"
OVERRIDES = ["model.img_size=28", "crops.global_crops_size=28", "crops.local_crops_size=14",
             "model.head_prototypes=32", "model.head_hidden_dim=32", "model.head_bottleneck_dim=16",
             "model.head_use_bn=true", "train.iters_per_epoch=10", "optim.warmup_epochs=0"]


def _batch(cfg, seed, n=4):
    g = torch.Generator().manual_seed(seed)
    c, side = cfg.crops, cfg.crops.global_crops_size // 14
    rng = np.random.default_rng(seed)
    return {"global_crops": torch.randn(n, 2, 3, c.global_crops_size, c.global_crops_size, generator=g),
            "local_crops": torch.randn(n, c.local_crops_number, 3, c.local_crops_size, c.local_crops_size, generator=g),
            "masks": torch.from_numpy(np.stack([sample_masks(rng, 2, (side, side), cfg.mask) for _ in range(n)]))}


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    cfg = load_config(str(TINY), OVERRIDES)
    torch.manual_seed(0)  # same init on both ranks, as the loop seeds it
    model = DINOv2SSL.from_config(cfg.model, cfg.loss)
    model.train()
    ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)  # as reddino.train.loop
    opt = torch.optim.AdamW(model.param_groups(cfg.optim), lr=0.0, betas=tuple(cfg.optim.betas))
    step = TrainStep(model, opt, build_schedules(cfg, 3), cfg, forward=ddp, world=2)
    for i in range(3):
        res = step(i, lambda: _batch(cfg, seed=100 * rank + i))  # each rank its own images
        assert res.finite
    state = {k: v.detach() for k, v in model.state_dict().items()}
    torch.save(state, Path(out) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def test_two_workers_keep_identical_weights_with_per_worker_head_bn(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    bn_stats = [k for k in r0 if "dino_head" in k and k.endswith("running_mean")]
    assert bn_stats, "the head has no BatchNorm"
    weights = [k for k in r0 if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert all(torch.equal(r0[k], r1[k]) for k in weights)  # all-reduced gradients, same AdamW state
    assert any(not torch.equal(r0[k], r1[k]) for k in bn_stats)  # each rank normalised its own batch
    cfg = load_config(str(TINY), OVERRIDES)
    torch.manual_seed(0)
    init = DINOv2SSL.from_config(cfg.model, cfg.loss).state_dict()
    assert any(not torch.equal(r0[k], init[k]) for k in weights if k.startswith("student"))  # it trained
