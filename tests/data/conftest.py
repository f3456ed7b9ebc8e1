"""Tiny chula-like / voc-like / ImageFolder trees built from reddino's own synthetic images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from reddino.data.images import encode_image
from reddino.data.synth import render_cell, render_patch, source_styles


def smear(seed: int, h: int = 260, w: int = 300) -> np.ndarray:
    style = source_styles(3)[seed % 3]
    img, _ = render_patch(style, np.random.default_rng([99, seed]), size=max(h, w), n_cells=(10, 14))
    return img[:h, :w]


def cell(cls: int, seed: int, size: int = 48) -> np.ndarray:
    return render_cell(cls, source_styles(1)[0], np.random.default_rng([7, cls, seed]), size)


@pytest.fixture()
def chula_tree(tmp_path: Path) -> Path:
    """Dataset/1.jpg (JPEG), 2.jpg (PNG bytes), 3.jpg (unlabelled), 4.jpg (corrupt, labelled); bad label lines in 1.txt."""
    root = tmp_path / "chula"
    (root / "Dataset").mkdir(parents=True)
    (root / "Label").mkdir()
    (root / "Dataset" / "1.jpg").write_bytes(encode_image(smear(1), "jpeg"))
    (root / "Dataset" / "2.jpg").write_bytes(encode_image(smear(2), "png"))
    (root / "Dataset" / "3.jpg").write_bytes(encode_image(smear(3), "jpeg"))
    (root / "Dataset" / "4.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg" * 10)
    (root / "Label" / "1.txt").write_text(
        "100 100 0\n"
        "2 3 4\n"  # near the corner: padded crop
        "500 50 1\n"  # outside the 300x260 image
        "abc def 2\n"  # unparsable
        "150 120 99\n"  # unknown class id
        "200 200 12\n"
    )
    (root / "Label" / "2.txt").write_text("50 60 3\n120 130 5\n250 200 6\n")
    (root / "Label" / "4.txt").write_text("10 10 0\n")
    return root


@pytest.fixture()
def voc_tree(tmp_path: Path) -> Path:
    root = tmp_path / "voc"
    (root / "JPEGImages").mkdir(parents=True)
    (root / "Annotations").mkdir()
    for i in range(2):
        (root / "JPEGImages" / f"img_{i}.jpg").write_bytes(encode_image(smear(10 + i, 240, 320), "jpeg"))
    objs0 = [("RBC", 11, 21, 60, 70), ("WBC", 100, 100, 180, 170), ("RBC", 50, 50, 50, 50)]  # last: degenerate
    objs1 = [("Platelets", 5, 5, 25, 25), ("RBC", 300, 200, 340, 239), ("RBC", 1, 1, 320, 240)]  # #1: out of range
    for i, objs in enumerate([objs0, objs1]):
        xml = [f"<annotation><filename>img_{i}.jpg</filename><size><width>320</width><height>240</height><depth>3</depth></size>"]
        for name, x0, y0, x1, y1 in objs:
            xml.append(f"<object><name>{name}</name><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>")
        xml.append("</annotation>")
        (root / "Annotations" / f"img_{i}.xml").write_text("".join(xml))
    return root


@pytest.fixture()
def folder_tree(tmp_path: Path) -> Path:
    """ImageFolder: a/ (3 PNG), b/ (2 JPEG, one a duplicate of the other's bytes)."""
    root = tmp_path / "folder"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    for i in range(3):
        (root / "a" / f"c{i}.png").write_bytes(encode_image(cell(0, i), "png"))
    jb = encode_image(cell(1, 0), "jpeg")
    (root / "b" / "x.jpg").write_bytes(jb)
    (root / "b" / "x_copy.jpg").write_bytes(jb)
    return root
