"""Sweeps: Ray Tune + Optuna over config keys, ASHA on the in-training kNN score, ablation tables."""

from reddino.tune.space import SweepSpace, load_space
from reddino.tune.sweep import SweepResult, sweep

__all__ = ["sweep", "SweepResult", "load_space", "SweepSpace"]
