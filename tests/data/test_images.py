"""Stored image formats: zstd TIFF (lossless, cheapest to decode) next to PNG."""

import io

import numpy as np
import pytest
from PIL import Image

from reddino.config import CropConfig, MaskConfig
from reddino.data.augment import MultiCropTransform
from reddino.data.images import (
    ImageDecodeError, decode_for_size, decode_image, decode_tiff_zstd, encode_image, sniff_format,
)
from reddino.data.synth import render_patch, source_styles


def patch(seed: int, size: int = 96) -> np.ndarray:
    return render_patch(source_styles(1)[0], np.random.default_rng(seed), size, cell_size=32)[0]


def test_tiff_zstd_is_lossless_and_a_standard_tiff():
    rgb = patch(0)
    data = encode_image(rgb, "tiff-zstd")
    assert sniff_format(data) == "tiff"
    assert np.array_equal(decode_image(data), rgb) and np.array_equal(decode_for_size(data, 64), rgb)
    with Image.open(io.BytesIO(data)) as im:  # libtiff (Pillow's) reads what we write: the same pixels
        assert im.info["compression"] == "zstd" and np.array_equal(np.asarray(im), rgb)
    assert encode_image(rgb, "tiff-zstd") == data  # deterministic: the sha256 of a re-ingest is the same


@pytest.mark.parametrize("rows_per_strip", [None, 7])
def test_zstd_tiffs_written_by_libtiff_take_the_fast_path(rows_per_strip):
    rgb = patch(1, 50)
    buf = io.BytesIO()
    extra = {"tiffinfo": {278: rows_per_strip}} if rows_per_strip else {}
    Image.fromarray(rgb).save(buf, format="TIFF", compression="zstd", **extra)
    assert np.array_equal(decode_tiff_zstd(buf.getvalue()), rgb)


def test_other_tiffs_go_to_the_general_decoders():
    rgb = patch(2, 40)
    for compression in ("raw", "tiff_lzw"):
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="TIFF", compression=compression)
        assert decode_tiff_zstd(buf.getvalue()) is None
        assert np.array_equal(decode_image(buf.getvalue()), rgb)


def test_damaged_zstd_tiff_is_one_clear_error():
    data = encode_image(patch(3), "tiff-zstd")
    with pytest.raises(ImageDecodeError, match="truncated zstd TIFF"):
        decode_image(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError, match="truncated TIFF"):
        decode_image(data[:40])
    empty = data[:18] + (0).to_bytes(4, "little") + data[22:]  # ImageWidth (the first tag's value) set to 0
    with pytest.raises(ImageDecodeError, match="zstd TIFF of 0x96 pixels"):
        decode_image(empty)
    with pytest.raises(ValueError, match="tiff-zstd encodes HxWx3 uint8"):
        encode_image(np.zeros((4, 4), np.uint8), "tiff-zstd")
    with pytest.raises(ValueError, match="expected one of png, jpeg, tiff-zstd"):
        encode_image(patch(3), "webp")


def test_training_crops_do_not_depend_on_the_stored_format():
    imgs = [patch(10 + i, 64) for i in range(3)]
    shas = np.array([f"sha{i}" for i in range(3)])  # the row seed: the same rows, so the same draws
    t = MultiCropTransform(CropConfig(global_crops_size=28, local_crops_size=14, local_crops_number=2, rbc_pick=2,
                                      policy="rbc"), MaskConfig(), 14, resize=56, seed=0)
    outs = [t({"image": np.array([encode_image(im, fmt) for im in imgs], dtype=object), "sha256": shas})
            for fmt in ("png", "tiff-zstd")]
    for k in ("global_crops", "local_crops", "masks"):
        assert np.array_equal(outs[0][k], outs[1][k])
