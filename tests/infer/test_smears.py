"""From smear photos to a morphology report, end to end on real parts: ingest with detection → pretrain (real Ray
Train, tiny model) → probe fit → classify --detect (overlays, report.html)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from reddino.config import load_config
from reddino.data import generate_synthetic
from reddino.data.ingest import ingest
from reddino.data.synth import render_smear, source_styles

TINY_CONFIG = str(Path(__file__).parents[1] / "tiny.yaml")


@pytest.mark.slow
def test_ingest_detect_pretrain_classify_detect_end_to_end(ray_train, tmp_path, monkeypatch):
    from reddino.infer.probe import fit_probe
    from reddino.infer.smears import classify_smears
    from reddino.train import pretrain

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    smears = tmp_path / "smears"
    smears.mkdir()
    n_true = {}
    for i in range(6):
        img, cells = render_smear(source_styles(2)[i % 2], np.random.default_rng([3, i]), height=240, width=320,
                                  n_cells=9, touching=2)
        cv2.imwrite(str(smears / f"smear{i}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        n_true[f"smear{i}"] = len(cells)
    (smears / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")

    cells = tmp_path / "cells"
    m = ingest("folder", smears, cells, detect=True, detect_crop_size=56, workers=1, progress=False)
    assert any(s["file"] == "broken.png" for s in m["skipped"])
    assert m["meta"]["detection"]["smears"] == 6
    assert abs(m["num_rows"] - sum(n_true.values())) <= 0.2 * sum(n_true.values())  # small 320 px smears: 90 for 78

    cfg = load_config(TINY_CONFIG, [
        f"data.paths=[{cells}]", "data.unit=cell", "data.resize=56", "crops.global_crops_size=56",
        "crops.local_crops_size=28", "crops.local_crops_number=1", "model.img_size=56", "model.head_prototypes=128",
        "model.head_hidden_dim=64", "model.head_bottleneck_dim=32", "train.epochs=1", "train.iters_per_epoch=4",
        "train.batch_size_per_worker=8", "train.num_workers=1", "train.torch_threads=1", "train.checkpoint_every=4",
        "train.log_every=1", "train.monitor_every=0", f"train.storage_path={tmp_path / 'runs'}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
    ])
    result = pretrain(cfg, run_name="smears")
    assert result.backbone_path is not None and result.backbone_path.exists()

    labelled = tmp_path / "labelled"
    generate_synthetic(labelled, n_per_class=6, sources=2, unit="cell", seed=0, size=56)
    probe_dir = tmp_path / "probe"
    fit_probe(str(result.backbone_path), labelled, out=probe_dir, cache_dir=tmp_path / "cache")

    out = tmp_path / "report"
    res = classify_smears(str(result.backbone_path), str(probe_dir), smears, out, crop_size=56, workers=1, overlays=3,
                          progress=False, num_cpus=2)
    pred = pd.read_csv(out / "predictions.csv")
    assert len(pred) == m["num_rows"]
    assert {"smear", "cell", "cx", "cy", "box", "flags", "class_name"} <= set(pred.columns)
    by_smear = pd.read_csv(out / "summary_by_smear.csv")
    assert sorted(by_smear["group"]) == sorted(n_true)
    fr = by_smear[[c for c in by_smear.columns if c.startswith("frac_")]].sum(axis=1)
    assert np.allclose(fr, 1.0, atol=1e-3)  # the CSV keeps 4 decimals
    assert len(res.files["overlays"]) == 3 and all(Path(f).is_file() for f in res.files["overlays"])
    html = Path(res.files["report"]).read_text()
    assert html.count("<img src='overlays/") == 3 and "morphology.png" in html
    ov = cv2.imread(res.files["overlays"][0])
    assert ov is not None and ov.shape[1] > 320  # the smear plus the legend
