"""Image helpers: format sniffing, strict decoding for ingest, fast decoding, encoding; square resizing and
ImageNet normalisation (numpy on CPU, torch on the training device)."""

from __future__ import annotations

import io
import struct
from typing import Any

import cv2
import numpy as np

_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
)


class ImageDecodeError(ValueError):
    """Bytes that are not a complete, decodable image."""


def sniff_format(data: bytes) -> str | None:
    """The image format from the leading bytes (not the file name): png, jpeg, gif, bmp, tiff, webp or None."""
    for magic, fmt in _MAGIC:
        if data.startswith(magic):
            return fmt
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def _to_rgb_uint8(arr: np.ndarray, bgr: bool) -> np.ndarray:
    if arr.dtype != np.uint8:
        if arr.dtype == np.uint16:
            arr = (arr >> 8).astype(np.uint8)
        elif np.issubdtype(arr.dtype, np.floating):
            arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        else:
            arr = np.clip(arr, 0, 255).astype(np.uint8)
    if arr.ndim == 2:
        return np.ascontiguousarray(np.repeat(arr[:, :, None], 3, axis=2))
    ch = arr.shape[2]
    if ch == 1:
        return np.ascontiguousarray(np.repeat(arr, 3, axis=2))
    if ch == 4:
        return cv2.cvtColor(arr, cv2.COLOR_BGRA2RGB if bgr else cv2.COLOR_RGBA2RGB)
    if ch == 3:
        return cv2.cvtColor(arr, cv2.COLOR_BGR2RGB) if bgr else np.ascontiguousarray(arr)
    raise ImageDecodeError(f"unsupported channel count {ch}")


def decode_image(data: bytes) -> np.ndarray:
    """Decode encoded image bytes to an ``HxWx3`` uint8 RGB array.

    Fast path ``cv2.imdecode`` (+ BGR→RGB; grayscale and RGBA/BGRA are converted, 16-bit is
    scaled down); formats cv2 cannot read fall back to PIL. Raises :class:`ImageDecodeError`.
    """
    if data is None or len(data) == 0:
        raise ImageDecodeError("empty image bytes")
    arr = decode_tiff_zstd(data)  # before cv2, whose libtiff has no zstd (and says so on stderr)
    if arr is not None:
        return arr
    buf = np.frombuffer(data, dtype=np.uint8)
    arr = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if arr is not None:
        return _to_rgb_uint8(arr, bgr=True)
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as exc:  # noqa: BLE001 - any PIL failure means undecodable
        raise ImageDecodeError(f"cannot decode image bytes ({exc})") from exc


def decode_image_strict(data: bytes) -> np.ndarray:
    """Decode fully with PIL, raising :class:`ImageDecodeError` on unknown formats, corrupt or truncated data.

    (cv2 silently returns a partial image for a truncated JPEG; PIL's ``load()`` does not.)
    """
    from PIL import Image, UnidentifiedImageError

    if len(data) == 0:
        raise ImageDecodeError("empty file")
    fmt = sniff_format(data)
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode in ("RGB",):
                arr = np.asarray(im)
            elif im.mode in ("I;16", "I;16B", "I;16L", "I"):
                a = np.asarray(im).astype(np.float64)
                arr = _to_rgb_uint8((a / max(a.max(), 1) * 255).astype(np.uint8), bgr=False)
            else:
                arr = np.asarray(im.convert("RGB"))
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(f"not a recognised image format (leading bytes {data[:8]!r})") from exc
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        kind = "truncated" if "truncated" in str(exc).lower() else "corrupt"
        raise ImageDecodeError(f"{kind} {fmt or 'image'} data ({exc})") from exc
    return np.ascontiguousarray(arr)


ENCODINGS = ("png", "jpeg", "tiff-zstd")


def encode_image(rgb: np.ndarray, fmt: str = "png", *, jpeg_quality: int = 95, png_compression: int = 3) -> bytes:
    """Encode an ``HxWx3`` uint8 RGB array as PNG, JPEG or zstd TIFF bytes (deterministic for the same input)."""
    if fmt == "tiff-zstd":
        return encode_tiff_zstd(rgb)
    bgr = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR)
    if fmt == "png":
        ok, buf = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, int(png_compression)])
    elif fmt in ("jpeg", "jpg"):
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)])
    else:
        raise ValueError(f"unknown encoding {fmt!r} (expected one of {', '.join(ENCODINGS)})")
    if not ok:
        raise RuntimeError(f"cv2 failed to encode a {rgb.shape} image as {fmt}")
    return buf.tobytes()


# ----------------------------------------------------------------------------------------------------------
# zstd TIFF: lossless like PNG, ~1/3 of its decode CPU (no Paeth unfilter, zstd instead of inflate) for ~12 %
# more bytes on smear patches (benchmarks/augment_cost.py). A baseline TIFF (one strip, 8-bit RGB, compression
# 50000 = zstd as libtiff defines it): Pillow, tifffile and GDAL read it; written and read here with pyarrow's
# zstd, so it needs no new package.
# ----------------------------------------------------------------------------------------------------------

TIFF_ZSTD = 50000
ZSTD_LEVEL = 9  # decode cost is about flat across levels; 19 is ~9 % smaller but far slower to write
_SHORT, _LONG = 3, 4


def encode_tiff_zstd(rgb: np.ndarray, level: int = ZSTD_LEVEL) -> bytes:
    """An ``HxWx3`` uint8 RGB array as a little-endian baseline TIFF with one zstd-compressed strip."""
    import pyarrow as pa

    rgb = np.ascontiguousarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"tiff-zstd encodes HxWx3 uint8 images, got {rgb.dtype} {rgb.shape}")
    h, w = rgb.shape[:2]
    strip = pa.Codec("zstd", compression_level=level).compress(rgb.tobytes(), asbytes=True)
    n_tags = 10
    bits_at = 8 + 2 + 12 * n_tags + 4  # BitsPerSample's three values follow the IFD
    strip_at = bits_at + 6
    tags = [(256, _LONG, 1, w), (257, _LONG, 1, h), (258, _SHORT, 3, bits_at), (259, _SHORT, 1, TIFF_ZSTD),
            (262, _SHORT, 1, 2), (273, _LONG, 1, strip_at), (277, _SHORT, 1, 3), (278, _LONG, 1, h),
            (279, _LONG, 1, len(strip)), (284, _SHORT, 1, 1)]
    def entry(tag: int, typ: int, cnt: int, val: int) -> bytes:
        lone_short = typ == _SHORT and cnt == 1  # left-justified in the 4-byte value field
        value = struct.pack("<HH", val, 0) if lone_short else struct.pack("<I", val)
        return struct.pack("<HHI", tag, typ, cnt) + value

    ifd = struct.pack("<H", n_tags) + b"".join(entry(*t) for t in tags) + struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<3H", 8, 8, 8) + strip


def _tiff_values(data: bytes, endian: str, typ: int, cnt: int, field: int, at: int) -> tuple[int, ...]:
    size = {_SHORT: 2, _LONG: 4}.get(typ)
    if size is None:
        raise ValueError(f"tag type {typ}")
    fmt = endian + ("H" if typ == _SHORT else "I") * cnt
    return struct.unpack_from(fmt, data, at + 8 if size * cnt <= 4 else field)


def decode_tiff_zstd(data: bytes) -> np.ndarray | None:
    """The pixels of a zstd TIFF as :func:`encode_tiff_zstd` (or libtiff) writes it: 8-bit RGB, chunky, no
    predictor, in strips; None for any other TIFF (cv2 / PIL decode those). Raises :class:`ImageDecodeError` when
    the strips do not decompress to the image's size."""
    if len(data) < 8 or sniff_format(data) != "tiff":
        return None
    e = "<" if data[0] == 0x49 else ">"
    try:
        ifd = struct.unpack_from(e + "I", data, 4)[0]
        tags: dict[int, tuple[int, ...]] = {}
        for i in range(struct.unpack_from(e + "H", data, ifd)[0]):
            at = ifd + 2 + 12 * i
            tag, typ, cnt, field = struct.unpack_from(e + "HHII", data, at)
            if tag in (256, 257, 258, 259, 262, 273, 277, 278, 279, 284, 317):
                tags[tag] = _tiff_values(data, e, typ, cnt, field, at)
    except struct.error as exc:
        raise ImageDecodeError(f"truncated TIFF (its first directory runs past byte {len(data)})") from exc
    except ValueError:
        return None  # a tag type this reader does not know: the general decoders read it
    if (tags.get(259, (0,))[0] != TIFF_ZSTD or tags.get(277, (1,))[0] != 3 or tags.get(258, (1,)) != (8, 8, 8)
            or tags.get(262, (2,))[0] != 2 or tags.get(284, (1,))[0] != 1 or tags.get(317, (1,))[0] != 1
            or not {256, 257, 273, 279} <= tags.keys()):
        return None
    import pyarrow as pa

    w, h = tags[256][0], tags[257][0]
    if not w or not h:
        raise ImageDecodeError(f"zstd TIFF of {w}x{h} pixels")
    rows = min(tags.get(278, (h,))[0] or h, h)
    offsets, counts = tags[273], tags[279]
    if len(offsets) != len(counts) or len(offsets) != -(-h // rows):
        raise ImageDecodeError(f"zstd TIFF with {len(offsets)} strips for {h} rows of {rows}")
    out = np.empty((h, w, 3), dtype=np.uint8)
    flat = out.reshape(-1)
    codec, row_bytes = pa.Codec("zstd"), w * 3
    for k, (o, c) in enumerate(zip(offsets, counts)):
        n = (min(rows * (k + 1), h) - rows * k) * row_bytes
        if o + c > len(data):
            raise ImageDecodeError(f"truncated zstd TIFF (strip {k} ends at byte {o + c} of {len(data)})")
        try:
            part = codec.decompress(memoryview(data)[o : o + c], decompressed_size=n, asbytes=False)
        except (OSError, ValueError) as exc:
            raise ImageDecodeError(f"corrupt zstd TIFF data in strip {k} ({exc})") from exc
        flat[rows * k * row_bytes : rows * k * row_bytes + n] = np.frombuffer(part, dtype=np.uint8)
    return out


# ----------------------------------------------------------------------------------------------------------
# Resizing and normalisation shared by training (augment) and evaluation (features); numpy + cv2 only, so
# evaluation and the training loop do not import albumentations.
# ----------------------------------------------------------------------------------------------------------

def to_rgb_image(item: Any) -> np.ndarray:
    """Encoded bytes (PNG/JPEG/...) or an already decoded uint8 array → HxWx3 uint8 RGB."""
    if isinstance(item, np.ndarray) and item.ndim >= 2:  # already decoded (HxW or HxWxC)
        img = item if item.dtype == np.uint8 else np.clip(item, 0, 255).astype(np.uint8)
        if img.ndim == 2:
            img = img[:, :, None]
        if img.shape[2] == 1:
            return np.ascontiguousarray(np.repeat(img, 3, axis=2))
        return img if img.shape[2] == 3 else np.ascontiguousarray(img[:, :, :3])
    if isinstance(item, np.ndarray):
        item = item.tobytes()
    return decode_image(bytes(item))


def _spng():
    try:
        import pyspng

        return pyspng
    except ImportError:  # optional: cv2 decodes the same pixels, ~1.4x the CPU
        return None


_PYSPNG = _spng()


def decode_for_size(item: Any, size: int | None) -> np.ndarray:
    """:func:`to_rgb_image`, but the cheapest decode of the pixels the training crops need: zstd TIFFs through
    :func:`decode_tiff_zstd`; 8-bit RGB PNGs (smear patches) through libspng (same pixels as cv2, ~30 % less
    CPU); a JPEG at least twice ``size`` on its short side is decoded at 1/2, 1/4 or 1/8
    scale inside the decoder (PIL ``draft``: DCT scaling), never below ``size``: the pixels the resize to ``size``
    would throw away are not made. Other formats decode at full size (PNG has no reduced decode)."""
    if isinstance(item, np.ndarray) and item.ndim >= 2:
        return to_rgb_image(item)
    data = item.tobytes() if isinstance(item, np.ndarray) else bytes(item)
    fmt = sniff_format(data)
    if fmt == "png" and _PYSPNG is not None:
        try:
            arr = _PYSPNG.load(data)
        except Exception:  # noqa: BLE001 - cv2 / PIL decide what is wrong with it
            return to_rgb_image(data)
        if arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3:
            return arr
        return to_rgb_image(data)
    if fmt != "jpeg":
        return to_rgb_image(data)
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            if not size or min(im.size) < 2 * size or im.mode not in ("RGB", "L"):
                return to_rgb_image(data)
            w, h = im.size
            short = min(w, h)
            im.draft("RGB", (max(size * w // short, 1), max(size * h // short, 1)))
            return np.ascontiguousarray(np.asarray(im.convert("RGB")))
    except Exception:  # noqa: BLE001 - anything PIL cannot do here, the strict path reports
        return to_rgb_image(data)


def to_rgb_list(data: Any) -> list[np.ndarray]:
    """A pyarrow table (its ``image`` column), encoded images, decoded arrays or one ``[N,H,W,C]`` array → a list
    of HxWx3 uint8 RGB images (the one conversion every consumer shares)."""
    if hasattr(data, "column") and hasattr(data, "num_rows"):
        data = data.column("image").to_pylist()
    if isinstance(data, np.ndarray) and data.ndim == 4:
        return [to_rgb_image(data[i]) for i in range(len(data))]
    return [to_rgb_image(bytes(x) if isinstance(x, (bytearray, memoryview)) else x) for x in data]


IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def resize_square(img: np.ndarray, size: int | None) -> np.ndarray:
    """Resize to ``size``×``size``: area interpolation when either side shrinks (no aliasing), bicubic when
    both grow; None: unchanged. Training and evaluation both resize with this."""
    if not size or img.shape[:2] == (size, size):
        return img
    shrink = img.shape[0] > size or img.shape[1] > size
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)


_SCALE = (1.0 / (255.0 * IMAGENET_STD)).astype(np.float32)
_SHIFT = (-IMAGENET_MEAN / IMAGENET_STD).astype(np.float32)


def normalize_chw(x: np.ndarray) -> np.ndarray:
    """uint8 [..., H, W, 3] → float32 [..., 3, H, W], ImageNet mean/std normalised."""
    out = np.empty(x.shape[:-3] + (3,) + x.shape[-3:-1], dtype=np.float32)
    for c in range(3):
        np.multiply(x[..., c], _SCALE[c], out=out[..., c, :, :], casting="unsafe")
        out[..., c, :, :] += _SHIFT[c]
    return out


def normalize_on_device(x, device=None):
    """uint8 torch tensor [..., H, W, 3] (as :class:`MultiCropTransform` gives with ``normalize=False``) →
    float32 [..., 3, H, W], ImageNet mean/std normalised, computed on ``device`` (default: where ``x`` is).
    Same arithmetic as :func:`normalize_chw` (x · 1/(255·std) − mean/std)."""
    import torch

    x = x.to(device, non_blocking=True) if device is not None else x
    scale = torch.as_tensor(_SCALE, device=x.device)
    shift = torch.as_tensor(_SHIFT, device=x.device)
    out = x.to(torch.float32) * scale + shift  # broadcast over the trailing channel dim
    return out.movedim(-1, -3).contiguous()
