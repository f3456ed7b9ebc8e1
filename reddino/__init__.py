"""reddino: DINOv2 self-supervised pretraining for red-blood-cell microscopy on Ray."""
__version__ = "0.1.0"
