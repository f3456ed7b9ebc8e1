"""DINOv2 pretraining on Ray Train: data stream, per-worker loop, checkpoints, driver."""

from reddino.train.trainer import PretrainResult, pretrain

__all__ = ["pretrain", "PretrainResult"]
