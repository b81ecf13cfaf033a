"""Safe photo decoding: unusual-but-valid files decode to RGB, every broken one gets its named reason."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
from hostile_corpus import _photo_bytes
from PIL import Image

from tnlbt.data.images import decode_image, decode_rgb, load_image_file, resize_short_side


@pytest.mark.parametrize(
    ("kind", "fmt", "mode"),
    [
        ("jpeg_ok", "JPEG", "RGB"),
        ("png_named_jpg_ok", "PNG", "RGB"),
        ("webp_named_jpg_ok", "WEBP", "RGB"),
        ("cmyk_ok", "JPEG", "CMYK"),
        ("grey_ok", "JPEG", "L"),
        ("palette_alpha_ok", "PNG", "P"),
        ("rgba_ok", "PNG", "RGBA"),
        ("grey16_ok", "PNG", "I;16"),
    ],
)
def test_valid_unusual_photos_decode_to_rgb(kind: str, fmt: str, mode: str) -> None:
    res = decode_image(_photo_bytes(kind, random.Random(1)) or b"", short_side=32)
    assert res.reason is None and res.fmt == fmt and res.mode == mode
    img = decode_rgb(res.data or b"")
    assert img.mode == "RGB" and min(img.size) == 32 and img.size == (43, 32)  # 64x48 source keeps aspect


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("empty_file", "empty_file"),
        ("truncated", "truncated"),
        ("corrupt", "corrupt"),
        ("too_large", "too_large"),
        ("too_small", "too_small"),
        ("extreme_aspect", "extreme_aspect"),
    ],
)
def test_broken_photos_have_reasons(kind: str, reason: str) -> None:
    res = decode_image(_photo_bytes(kind, random.Random(2)) or b"", short_side=32)
    assert res.data is None and res.reason == reason


def test_pixel_limit_is_configurable() -> None:
    data = _photo_bytes("jpeg_ok", random.Random(3)) or b""  # 64x48 = 3072 pixels
    assert decode_image(data, max_pixels=3072).reason is None
    assert decode_image(data, max_pixels=3071).reason == "too_large"


def test_truncated_large_jpeg() -> None:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    data = buf.getvalue()
    assert decode_image(data).reason is None
    assert decode_image(data[: len(data) * 2 // 3]).reason == "truncated"


def test_missing_and_empty_files(tmp_path) -> None:
    assert load_image_file(tmp_path / "nope.jpg").reason == "missing_file"
    (tmp_path / "zero.jpg").write_bytes(b"")
    assert load_image_file(tmp_path / "zero.jpg").reason == "empty_file"


def test_alpha_is_composited_on_white() -> None:
    img = Image.new("RGBA", (40, 40), (255, 0, 0, 0))  # fully transparent red
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    out = np.asarray(decode_rgb(decode_image(buf.getvalue(), short_side=40).data or b""))
    assert out.min() > 240  # white, not red or black


def test_draft_decode_matches_full_decode() -> None:
    """The DCT-scaled fast path for big JPEGs vs the brute-force full decode + resize."""
    y, x = np.mgrid[0:1200, 0:1600]
    arr = np.stack([(x / 7) % 255, (y / 5) % 255, ((x + y) / 9) % 255], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    fast = np.asarray(decode_rgb(decode_image(buf.getvalue(), short_side=256, quality=95).data or b""))
    full = Image.open(io.BytesIO(buf.getvalue()))
    full.load()
    ref = np.asarray(resize_short_side(full.convert("RGB"), 256))
    assert fast.shape == ref.shape == (256, 341, 3)
    assert np.abs(fast.astype(int) - ref.astype(int)).mean() < 4.0


def test_resize_short_side_up_and_down() -> None:
    assert resize_short_side(Image.new("RGB", (100, 50)), 256).size == (512, 256)
    assert resize_short_side(Image.new("RGB", (600, 900)), 256).size == (256, 384)
