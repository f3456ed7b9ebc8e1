"""Ingest edge cases: each decided, each skip named in the manifest, one image's memory bounded."""

import os
import resource
import subprocess
import sys

import numpy as np

from reddino.data import ingest, read_manifest
from reddino.data.images import encode_image
from reddino.data.ingest import MAX_IMAGE_PIXELS


def _cell(seed: int, size: int = 40) -> bytes:
    return encode_image(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8), "png")


def test_hidden_folders_outside_links_and_odd_sizes_are_skipped_and_listed(tmp_path):
    src, outside = tmp_path / "src", tmp_path / "elsewhere"
    for i, cls in enumerate(["normal", "target", ".cache"]):
        (src / cls).mkdir(parents=True)
        (src / cls / f"c{i}.png").write_bytes(_cell(i))
    (src / "normal" / ".hidden.png").write_bytes(_cell(10))
    (src / "normal" / "dot1x1.png").write_bytes(encode_image(np.zeros((1, 1, 3), np.uint8), "png"))
    (src / "normal" / "smear.png").write_bytes(encode_image(np.zeros((1100, 1200, 3), np.uint8), "png"))
    outside.mkdir()
    (outside / "x.png").write_bytes(_cell(20))
    (src / "linked").symlink_to(outside, target_is_directory=True)  # a class folder pointing out of the tree
    (src / "target" / "inside.png").symlink_to(src / "normal" / "c0.png")  # inside the tree: followed

    manifest = ingest("folder", src, tmp_path / "out", unit="cell", workers=1, progress=False)
    reasons = {s["file"]: s["reason"] for s in manifest["skipped"]}
    assert reasons[".cache/"] == "hidden (name starts with '.')"
    assert reasons["normal/.hidden.png"] == "hidden (name starts with '.')"
    assert reasons["linked/"] == f"symbolic link to {outside.resolve()}, outside the source folder"
    assert reasons["normal/dot1x1.png"] == "image 1x1 is smaller than the 8 px minimum side of a cell"
    assert reasons["normal/smear.png"].startswith("image 1200x1100 is larger than the 1024 px maximum side of a cell")
    assert manifest["num_rows"] == 2  # c0 and c1 (inside.png is c0's bytes: deduplicated)
    assert set(manifest["classes"].values()) == {"normal", "target"}
    rules = read_manifest(tmp_path / "out")["meta"]["input_rules"]
    assert rules["min_cell_side"] == 8 and rules["max_image_pixels"] == MAX_IMAGE_PIXELS


def test_a_huge_image_is_refused_from_its_header_without_decoding(tmp_path):
    # 144 MP: a PNG of one colour compresses to ~140 kB; decoding it would take 430 MB (and Pillow would warn)
    src = tmp_path / "src" / "normal"
    src.mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (12000, 12000), (200, 50, 50)).save(src / "huge.png", compress_level=1)
    (src / "ok.png").write_bytes(_cell(0, size=256))  # one 224 px patch
    code = (  # peak RSS (VmHWM) of the ingest alone: reset after start-up (a forked child inherits the parent's)
        "import re, sys, warnings\n"
        "from reddino.data import ingest\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "warnings.simplefilter('error')\n"  # Pillow's DecompressionBombWarning would fail this
        f"m = ingest('folder', {str(tmp_path / 'src')!r}, {str(tmp_path / 'out')!r}, unit='patch', workers=1, "
        "progress=False)\n"
        "print(m['skipped'][0]['reason'])\n"
        "print(int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) // 1024)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    reason, peak_mb = proc.stdout.strip().splitlines()[-2:]  # huge.png is the only skip
    assert reason.startswith("image 12000x12000 (144 MP) exceeds the 64 MP limit of one image"), reason
    assert int(peak_mb) < 1200, peak_mb  # never decoded (1.6 GB peak before)
    assert "DecompressionBomb" not in proc.stderr
