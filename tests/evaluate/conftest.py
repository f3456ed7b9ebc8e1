"""Shared fixtures: one tiny synthetic labelled RBC dataset (3 sources x 9 classes x 8 cells, 32 px)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def synth_cells(tmp_path_factory):
    from reddino.data import generate_synthetic

    out = tmp_path_factory.mktemp("evaldata") / "cells"
    generate_synthetic(out, n_per_class=8, sources=3, unit="cell", seed=0, size=32)
    return out


@pytest.fixture(scope="session")
def synth_table(synth_cells):
    from reddino.data import load_table

    return load_table(synth_cells)


@pytest.fixture(scope="session")
def tiny_vit():
    """A random-init tiny ViT at 28 px (2x2 patches): fast enough for CPU tests."""
    from reddino.evaluate import resolve_model

    return resolve_model("random:vit_tiny_patch14_reddino", img_size=28, seed=0)


@pytest.fixture(scope="session")
def _eval_mlflow_db(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('evalmlflow') / 'mlflow.db'}"


@pytest.fixture()
def eval_mlflow_uri(_eval_mlflow_db, use_mlflow_store):
    """One sqlite MLflow store for all evaluation tests (creating a store costs seconds)."""
    return use_mlflow_store(_eval_mlflow_db)
