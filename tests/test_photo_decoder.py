"""One photo decoder for training, indexing and queries (``tnlbt.data.images.decode_photo``): the twin of the
training path and the query path, and the query limits (header-only checks, the decoded-pixel budget)."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from test_search import make_tiny_run


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    from tnlbt.inference import Encoder

    return Encoder(make_tiny_run(tmp_path_factory.mktemp("twin"), n_recipes=2))


def _halves(w: int, h: int) -> Image.Image:
    """Red left half, blue right half: a 90-degree rotation moves the colours to top / bottom."""
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 2] = (220, 30, 30)
    arr[:, w // 2 :] = (30, 30, 220)
    return Image.fromarray(arr)


def _exif_rotated_jpeg() -> bytes:
    """A camera JPEG stored sideways: pixels 96x64, EXIF orientation 6 (display rotated 90 degrees clockwise)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    _halves(96, 64).save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def _rgba_png() -> bytes:
    """A cut-out dish: an opaque red disc on a fully transparent (black) background."""
    yy, xx = np.mgrid[0:64, 0:96]
    inside = (xx - 48) ** 2 + (yy - 32) ** 2 < 20**2
    arr = np.zeros((64, 96, 4), np.uint8)
    arr[inside] = (200, 40, 40, 255)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGBA").save(buf, format="PNG")
    return buf.getvalue()


def _train_tensor(encoder, stored: bytes) -> torch.Tensor:
    """What a training / evaluation batch makes of stored photo bytes (collate's decode + the model's
    transform)."""
    from tnlbt.data.collate import collate

    row = {"title_ids": [1], "ingredient_ids": [[1]], "instruction_ids": [[1]], "ingredient_labels": [],
           "has_image": True, "images": [stored]}
    return collate([row], n_ingredients=encoder.n_ingredients, image_transform=encoder.transform)["image"][0]


@pytest.mark.parametrize("make", [_exif_rotated_jpeg, _rgba_png])
def test_training_and_query_paths_give_the_same_model_input(encoder, make):
    from tnlbt.data.images import decode_image
    from tnlbt.inference import decode_image as decode_query

    raw = make()
    query = encoder.photo_tensor(raw)  # the ImageEncoder replica's path: upload bytes -> model input
    # The same bytes through a training batch: the very same tensor (one decoder, one transform).
    assert torch.equal(_train_tensor(encoder, raw), query)
    assert torch.equal(encoder.transform(decode_query(raw)), query)
    # The photo as preprocessing stores it (upright, on white, resized, JPEG), then batched for training: the
    # query sees what training saw, up to the stored copy's resize and JPEG rounding. Before, the query path
    # ignored the EXIF rotation and put transparency on black: a different picture.
    stored = decode_image(raw, short_side=encoder.photo_short_side).data
    assert stored is not None
    diff = (_train_tensor(encoder, stored) - query).abs().mean().item()
    assert diff < 0.1, diff  # measured 0.009 (JPEG) / 0.018 (PNG); before: 0.50 / 1.36


def test_query_decode_is_upright_and_on_white():
    from tnlbt.inference import decode_image

    img = decode_image(_exif_rotated_jpeg())
    assert img.size == (64, 96)  # rotated upright
    top, bottom = np.asarray(img)[10, 32], np.asarray(img)[85, 32]
    assert top[0] > 150 > top[2] and bottom[2] > 150 > bottom[0]  # red above blue, as the camera saw it
    corner = np.asarray(decode_image(_rgba_png()))[2, 2]
    assert corner.min() > 240  # transparent -> white, as in training


def test_header_check_and_decoded_pixel_budget():
    from dataclasses import replace

    from tnlbt.data.images import PhotoError
    from tnlbt.inference import QUERY_FORMATS, QUERY_LIMITS, check_image, decode_image

    small = replace(QUERY_LIMITS, max_decoded_pixels=1_000_000)

    big_jpeg = io.BytesIO()
    Image.new("RGB", (4000, 3000), (90, 120, 30)).save(big_jpeg, format="JPEG", quality=60)
    fmt, size = check_image(big_jpeg.getvalue(), small)
    assert fmt == "JPEG" and size[0] * size[1] <= 1_000_000  # drafted: 1/8 scale, 500x375
    img = decode_image(big_jpeg.getvalue())
    assert min(img.size) >= 256 and img.size[0] * img.size[1] < 1_000_000
    png = io.BytesIO()
    Image.new("RGB", (1200, 1000)).save(png, format="PNG")
    with pytest.raises(PhotoError) as e:
        check_image(png.getvalue(), small)
    assert e.value.reason == "too_large" and "1200x1000" in str(e.value)
    with pytest.raises(PhotoError) as e:
        decode_image(png.getvalue(), small)
    assert e.value.reason == "too_large"
    tiff = io.BytesIO()
    Image.new("RGB", (8, 8)).save(tiff, format="TIFF")
    with pytest.raises(PhotoError) as e:
        check_image(tiff.getvalue())
    assert e.value.reason == "unsupported_format" and "TIFF" not in QUERY_FORMATS
    for bad, reason in ((b"", "empty_file"), (b"not an image", "corrupt")):
        with pytest.raises(PhotoError) as e:
            decode_image(bad)
        assert e.value.reason == reason


def test_photo_error_pickles_with_its_reason():
    """It crosses Ray from the encoder replica to the API, which maps the reason to 413 / 415."""
    from tnlbt.data.images import PhotoError

    e = pickle.loads(pickle.dumps(PhotoError("too_large", "9000x9000")))
    assert isinstance(e, ValueError) and e.reason == "too_large" and str(e) == "too_large: 9000x9000"
