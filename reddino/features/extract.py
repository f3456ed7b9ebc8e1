"""In-process frozen features of a model for a list of images: preprocessing, token pooling and
precision probing, shared by evaluation, the trainer's kNN hook, ``reddino embed`` and the Ray actors.

Images are decoded as RGB, resized to the model's square input size (area interpolation when
shrinking, bicubic when enlarging) and ImageNet-normalised; the feature is the final-norm CLS token
(``pooling="cls"``), the mean patch token (``"mean"``) or both concatenated (``"cls+mean"``).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from reddino.data.images import normalize_chw, resize_square, to_rgb_list
from reddino.model import family
from reddino.model.backbone import model_img_size

POOLINGS = ("cls", "cls+mean", "mean")
PRECISIONS = ("auto", "fp32", "bf16")


def is_extractor(model: Any) -> bool:
    """A non-network feature extractor (``extract`` method) rather than a torch module."""
    return callable(getattr(model, "extract", None)) and not hasattr(model, "forward_features")


def preprocess(images: Sequence[np.ndarray], img_size: int) -> np.ndarray:
    """RGB uint8 crops -> ``[B, 3, S, S]`` float32, ImageNet-normalised (the training normalisation)."""
    batch = np.stack([resize_square(np.ascontiguousarray(im[..., :3]), img_size) for im in images])
    return normalize_chw(batch)


def unwrap_ddp(model):
    return model.module if isinstance(model, DistributedDataParallel) else model


def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def pool_tokens(model, tokens, pooling: str = "cls"):
    """CLS / mean patch / CLS+mean from ``forward_features`` tokens ``[B, prefix+N, D]``."""
    if tokens.ndim == 2:  # the model already pooled
        return tokens
    n_prefix = int(getattr(model, "num_prefix_tokens", 1 if getattr(model, "cls_token", None) is not None else 0))
    cls = tokens[:, 0]
    patches = tokens[:, n_prefix:] if tokens.shape[1] > n_prefix else tokens
    if pooling == "cls":
        return cls
    if pooling == "mean":
        return patches.mean(1)
    if pooling == "cls+mean":
        return torch.cat([cls, patches.mean(1)], dim=1)
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


def resolve_precision(precision: str, device: Any) -> str:
    """``auto`` → ``bf16`` where the device computes bfloat16 natively (CUDA with bf16, CPUs with
    AVX512-BF16/AMX through oneDNN), else ``fp32``. Emulated bf16 on older CPUs is slower than fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    kind = torch.device(device).type if device is not None else "cpu"
    if kind == "cuda":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    if kind == "cpu":
        try:
            return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
        except (AttributeError, RuntimeError):
            return "fp32"
    return "fp32"


def extract_features(
    model,
    table_or_images: Any,
    img_size: int | None = None,
    batch_size: int = 64,
    device: Any = None,
    *,
    pooling: str = "cls",
    precision: str = "fp32",
    on_batch: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Frozen features ``[N, D]`` (float32) of ``model`` for a table / list of images, in input order.

    ``model`` is a timm ViT (``forward_features``) or an extractor (``.extract``, e.g. the handcrafted
    baseline of :func:`~reddino.features.models.resolve_model`). ``img_size`` defaults to the
    model's own input size; ``device`` to where the model's parameters live. The model's train/eval
    mode and device are restored afterwards, so a training loop can call this on its teacher.
    ``precision``: ``fp32``, ``bf16`` (autocast, as DINOv2's evaluations use reduced precision) or
    ``auto`` (:func:`resolve_precision`). ``on_batch(n)`` is called after each batch of ``n`` images.
    """
    images = to_rgb_list(table_or_images)
    if is_extractor(model):
        return model.extract(images, img_size=img_size, batch_size=batch_size, on_batch=on_batch)

    net = unwrap_ddp(model)
    img_size = int(img_size or model_img_size(net))
    orig_device = model_device(net)
    device = torch.device(device) if device is not None else orig_device
    use_bf16 = resolve_precision(precision, device) == "bf16"
    was_training = net.training
    net.eval()
    if device != orig_device:
        net.to(device)
    feats = []
    try:
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            for i in range(0, len(images), batch_size):
                x = torch.from_numpy(preprocess(images[i : i + batch_size], img_size)).to(device)
                if family.is_backbone(net):  # the backbone contract: CLS / pooled map, mean patch
                    f = family.features(net, x, pooling)
                else:
                    f = pool_tokens(net, net.forward_features(x), pooling)
                feats.append(f.float().cpu().numpy())
                if on_batch:
                    on_batch(x.shape[0])
    finally:
        if device != orig_device:
            net.to(orig_device)
        net.train(was_training)
    if not feats:
        dim = int(getattr(net, "num_features", getattr(net, "embed_dim", 0)))
        return np.zeros((0, dim * (2 if pooling == "cls+mean" else 1)), dtype=np.float32)
    return np.concatenate(feats).astype(np.float32, copy=False)
