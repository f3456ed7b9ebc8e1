"""reddino: DINOv2 self-supervised pretraining for red-blood-cell microscopy on Ray."""

__version__ = "0.1.0"


def load_backbone(ref: str, device: str = "cpu"):
    """A ready timm backbone from `models:/name@alias`, a registry ref or a local export file."""
    from reddino.registry import load_backbone as _load

    return _load(ref, device=device)
