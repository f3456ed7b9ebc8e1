"""report.html: one self-contained page (tables, per-class recall, figures, the run's learning curve) that a real
browser renders with every image."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from reddino.data import generate_synthetic
from reddino.evaluate import evaluate
from reddino.model import create_backbone, export_backbone
from reddino.train.curves import plot_learning_curve

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("html")
    generate_synthetic(root / "cells", n_per_class=4, sources=2, unit="cell", seed=0)
    torch.manual_seed(0)
    export_backbone(create_backbone("vit_tiny_patch14_reddino", img_size=56), root / "run" / "backbone.safetensors")
    plot_learning_curve({"eval_knn20_balanced_accuracy": [(0, 0.3), (10, 0.4)], "rankme": [(0, 5.0), (10, 9.0)]},
                        root / "run" / "learning_curve.png", title="run")
    res = evaluate([str(root / "run"), "handcrafted"], [str(root / "cells")], folds=3, embedding="pca",
                   out_dir=root / "eval", mlflow=False, use_ray=False, cache_dir=None)
    return root, res


def test_report_html_holds_tables_recall_figures_and_the_learning_curve(report):
    _, res = report
    page = Path(res["files"]["html"]).read_text()
    figures = sum(len(m["figures"]) for m in res["models"])
    assert figures >= 4
    assert page.count('src="data:image/png;base64,') == figures + 1  # + the run's learning curve, once
    assert "Learning curve of its training run" in page and page.count("Per-class recall") == 2
    assert page.count("<table>") >= 3 and "knn20" in page and "probe" in page
    assert "elliptocyte" in page and "schistocyte" in page  # class names in the recall table
    assert "file://" not in page and 'src="figures/' not in page  # nothing outside the file


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_report_renders_every_image_in_headless_chromium(report, tmp_path):
    root, res = report
    url = Path(res["files"]["html"]).resolve().as_uri()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000"]
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    images = re.search(r'data-images="(\d+)"', dom)
    rendered = re.search(r'data-images-rendered="(\d+)"', dom)
    assert images and rendered, dom[-2000:]
    assert int(images.group(1)) >= 5 and rendered.group(1) == images.group(1)
    shot = tmp_path / "report.png"
    subprocess.run([CHROMIUM, *flags, "--window-size=1200,2400", f"--screenshot={shot}", url], capture_output=True,
                   timeout=120)
    assert shot.read_bytes()[:4] == b"\x89PNG" and shot.stat().st_size > 20_000
