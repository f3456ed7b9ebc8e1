"""Sinkhorn-Knopp and the EMA centre give the global-batch result across 2 gloo workers."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from reddino.model.losses import EMACenter, sinkhorn_knopp


def _worker(rank, world, init_file, logits, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        # uneven shards (like masked patch counts): rank 0 gets 5 rows, rank 1 gets 7
        shard = logits[:5] if rank == 0 else logits[5:]
        q = sinkhorn_knopp(shard, 0.3, 3)
        c = EMACenter(logits.shape[1], 0.9)
        c.update(shard)
        torch.save({"q": q, "center": c.center}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_sinkhorn_and_center_match_global_batch(tmp_path):
    torch.manual_seed(0)
    logits = torch.randn(12, 6)
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), logits, str(tmp_path)), nprocs=2, join=True)
    parts = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    q = torch.cat([p["q"] for p in parts])
    assert torch.allclose(q, sinkhorn_knopp(logits, 0.3, 3), atol=1e-6)
    ref = EMACenter(6, 0.9)
    ref.update(logits)
    for p in parts:
        assert torch.allclose(p["center"], ref.center, atol=1e-6)
