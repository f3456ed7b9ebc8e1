"""Model side of reddino: timm backbones (ViT, DINOv3 Eva, ConvNeXt; one contract in ``family``), DINO/iBOT heads, losses, the DINOv2 SSL wrapper, monitors.

Importing this package registers the tiny CPU architectures ``vit_mini_patch8_reddino``, ``vit_micro_patch8_reddino``, ``vit_tiny_patch8_reddino`` and ``vit_tiny_patch14_reddino`` with timm.
"""

from reddino.model.backbone import (
    backbone_info,
    backbone_tokens,
    create_backbone,
    export_backbone,
    load_backbone,
    load_pretrained,
    model_img_size,
    vit_micro_patch8_reddino,
    vit_mini_patch8_reddino,
    vit_tiny_patch8_reddino,
    vit_tiny_patch14_reddino,
)
from reddino.model import family
from reddino.model.family import SUPPORT, family_of
from reddino.model.heads import DINOHead
from reddino.model.losses import CENTERING, DINOLoss, IBOTPatchLoss, KoLeoLoss, sinkhorn_knopp
from reddino.model.monitors import marginal_entropy, rankme, teacher_entropy
from reddino.model.ssl import DINOv2SSL

__all__ = [
    "CENTERING",
    "DINOHead",
    "SUPPORT",
    "DINOLoss",
    "DINOv2SSL",
    "IBOTPatchLoss",
    "KoLeoLoss",
    "backbone_info",
    "backbone_tokens",
    "create_backbone",
    "export_backbone",
    "family",
    "family_of",
    "load_backbone",
    "load_pretrained",
    "model_img_size",
    "marginal_entropy",
    "rankme",
    "sinkhorn_knopp",
    "teacher_entropy",
    "vit_micro_patch8_reddino",
    "vit_mini_patch8_reddino",
    "vit_tiny_patch8_reddino",
    "vit_tiny_patch14_reddino",
]
