"""Safe photo decoding for preprocessing: any PIL-readable file -> RGB -> shorter side S -> JPEG bytes.

Every failure is a named reason, never an exception escaping to the pipeline:

* ``missing_file``, ``empty_file`` (zero bytes), ``unreadable_file`` (I/O error);
* ``outside_root``: a local photo whose path, symlinks followed, leads out of the image root (a link to
  ``/etc/...`` or to another user's files must not end up as pixels in Parquet);
* ``corrupt`` (not an image PIL can identify, or a decoder error), ``truncated`` (data ends early);
* ``too_large`` (more pixels than ``max_image_pixels``: the decompression-bomb limit, checked from the header
  before any pixel is decoded), ``too_small`` (shorter side under ``min_image_side``), ``extreme_aspect``.

Valid but unusual files are decoded, not rejected: PNG, WebP, GIF or BMP content named ``.jpg``; CMYK,
grayscale, 16-bit, palette and alpha images (alpha is composited on white, as a photo would look on a page);
EXIF rotation.
"""

from __future__ import annotations

import io
import math
import os
import stat
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:
    import pyarrow.fs as pafs


@dataclass(frozen=True)
class ImageResult:
    """Outcome of one photo: ``data`` (JPEG bytes) or a ``reason``; ``fmt``/``mode`` describe the source."""

    data: bytes | None
    reason: str | None = None
    fmt: str | None = None
    mode: str | None = None
    detail: str = ""


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Alpha is composited on white; 16/32-bit grey is scaled, not clipped."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # No copy of an RGBA image, and the background freed before the RGB copy: a 16-MP photo costs 3 full
        # RGBA planes at the peak, not 5 (the query path's memory bound counts on it).
        rgba = img if mode == "RGBA" else img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        out = Image.alpha_composite(background, rgba)
        del background
        return out.convert("RGB")
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = float(arr.max()) if arr.size else 0.0
        scale = 255.0 / hi if hi > 255.0 else 1.0
        grey = np.clip(arr * scale, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def resize_short_side(img: Image.Image, short_side: int) -> Image.Image:
    """Resize so the shorter side is exactly ``short_side`` (up or down), keeping the aspect ratio."""
    w, h = img.size
    scale = short_side / min(w, h)
    size = (max(short_side, round(w * scale)), max(short_side, round(h * scale)))
    if size == (w, h):
        return img
    return img.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0 if scale < 0.5 else None)


# What PIL raises on bad data while parsing or decoding (besides UnidentifiedImageError / DecompressionBombError).
_DECODER_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error)


def _failure_reason(e: BaseException) -> str:
    return "truncated" if ("truncated" in str(e).lower() or isinstance(e, EOFError)) else "corrupt"


def _draft_jpeg(img: Image.Image, short_side: int) -> None:
    """Ask libjpeg to decode a big JPEG at a reduced DCT scale (1/2 .. 1/8) that still leaves the shorter side
    >= ``short_side``: much faster and smaller for big photos, same look after the resize. Header only."""
    w, h = img.size
    if img.format in ("JPEG", "MPO") and img.mode in ("RGB", "L") and min(w, h) > 2 * short_side:
        scale = short_side / min(w, h)
        img.draft("RGB", (math.ceil(w * scale), math.ceil(h * scale)))


def _load_rgb(img: Image.Image) -> Image.Image:
    """Decode the pixels of an opened photo, rotate it upright by its EXIF orientation, and make it RGB."""
    img.load()
    ImageOps.exif_transpose(img, in_place=True)  # in place: an upright photo is not copied for nothing
    return _to_rgb(img)


def decode_image(
    data: bytes,
    *,
    short_side: int = 256,
    quality: int = 90,
    max_pixels: int = 64_000_000,
    min_side: int = 16,
    max_aspect: float = 10.0,
) -> ImageResult:
    """Decode image bytes of any PIL format, convert to RGB, resize the shorter side, encode as JPEG."""
    if not data:
        return ImageResult(None, "empty_file")
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must fail, not decode grey (global default)
    fmt = mode = None
    try:
        with warnings.catch_warnings():
            # PIL warns above MAX_IMAGE_PIXELS and raises above twice that; we apply our own limit below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            fmt, mode = img.format, img.mode
            w, h = img.size
            if w <= 0 or h <= 0:
                return ImageResult(None, "corrupt", fmt, mode, "zero size")
            if w * h > max_pixels:
                return ImageResult(None, "too_large", fmt, mode, f"{w}x{h}")
            if min(w, h) < min_side:
                return ImageResult(None, "too_small", fmt, mode, f"{w}x{h}")
            if max(w, h) / min(w, h) > max_aspect:
                return ImageResult(None, "extreme_aspect", fmt, mode, f"{w}x{h}")
            _draft_jpeg(img, short_side)
            img = resize_short_side(_load_rgb(img), short_side)
            out = io.BytesIO()
            img.save(out, format="JPEG", quality=quality)
    except Image.DecompressionBombError as e:
        return ImageResult(None, "too_large", fmt, mode, str(e)[:200])
    except UnidentifiedImageError as e:
        return ImageResult(None, "corrupt", fmt, mode, str(e)[:200])
    except _DECODER_ERRORS as e:
        return ImageResult(None, _failure_reason(e), fmt, mode, str(e)[:200])
    except MemoryError:
        return ImageResult(None, "too_large", fmt, mode, "out of memory while decoding")
    return ImageResult(out.getvalue(), None, fmt, mode)


def _under(real: str, root: str) -> bool:
    return real == root or real.startswith(os.path.join(root, ""))


def _opened_path(fd: int, path: Path) -> str:
    """The real path of the file open as ``fd``: what the kernel opened, every link followed (Linux), so the
    check is on the very file that is read; elsewhere ``os.path.realpath`` (which a swapped link could race)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return os.path.realpath(path)


def _read_local(path: Path, root: str | None, max_bytes: int | None = None) -> bytes | ImageResult:
    try:
        # O_NONBLOCK: a link to a FIFO must not hang the task in open() (it is refused below, not read)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:  # also a dangling link
        return ImageResult(None, "missing_file")
    except OSError as e:
        return ImageResult(None, "unreadable_file", detail=str(e)[:200])
    try:
        if root is not None and not _under(_opened_path(fd, path), root):
            return ImageResult(None, "outside_root")
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # a folder or a device is not a photo either
            return ImageResult(None, "missing_file")
        if st.st_size == 0:
            return ImageResult(None, "empty_file")
        if max_bytes is not None and st.st_size > max_bytes:
            return ImageResult(None, "too_large", detail=f"{st.st_size} bytes (limit {max_bytes})")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    except OSError as e:
        return ImageResult(None, "unreadable_file", detail=str(e)[:200])
    finally:
        os.close(fd)


def read_image_bytes(
    path: str | os.PathLike[str],
    filesystem: pafs.FileSystem | None = None,
    root: str | None = None,
    max_bytes: int | None = None,
) -> bytes | ImageResult:
    """The bytes of one photo, or an :class:`ImageResult` naming why there are none.

    ``filesystem`` given: ``path`` is a path inside it (``bucket/images/train/a/b/c/d/abcd.jpg``), so a task
    that reads thousands of photos resolves the image root once. Otherwise ``path`` is a local path or a URI
    resolved through :mod:`tnlbt.storage`. Any I/O error (a missing object, a lost connection, a permission
    error) becomes a named reason: one bad photo is a counted skip, never the end of a preprocessing task.
    ``root`` (local paths; resolved with ``os.path.realpath`` by the caller, once): a photo whose file, links
    followed, lies outside it is ``outside_root`` and not read; links within the root are fine. Object stores
    have no links, so it does not apply to them. ``max_bytes``: a larger file is ``too_large`` and not read
    (a user catalog may point at anything; training data has no such cap).
    """
    if filesystem is None:
        s = os.fspath(path)
        from tnlbt import storage

        if not storage.is_remote(s):
            return _read_local(Path(storage.local_path(s) or s), root, max_bytes)
        filesystem, path = storage.resolve(s)
    import pyarrow.fs as pafs

    inner = os.fspath(path)
    try:
        info = filesystem.get_file_info(inner)
        if info.type != pafs.FileType.File:  # a "directory" (key prefix) is not a photo either
            return ImageResult(None, "missing_file")
        if info.size == 0:
            return ImageResult(None, "empty_file")
        if max_bytes is not None and info.size > max_bytes:
            return ImageResult(None, "too_large", detail=f"{info.size} bytes (limit {max_bytes})")
        # compression=None: never decompress on the fly because of a name like "x.gz"
        with filesystem.open_input_stream(inner, compression=None) as f:
            return f.read()
    except FileNotFoundError:  # deleted between the two calls
        return ImageResult(None, "missing_file")
    except OSError as e:  # pyarrow raises OSError (or subclasses) for every I/O failure
        return ImageResult(None, "unreadable_file", detail=str(e)[:200])


def load_image_file(
    path: str | os.PathLike[str],
    *,
    filesystem: pafs.FileSystem | None = None,
    root: str | None = None,
    short_side: int = 256,
    quality: int = 90,
    max_pixels: int = 64_000_000,
    min_side: int = 16,
    max_aspect: float = 10.0,
) -> ImageResult:
    """Read and decode one photo; a missing/empty/unreadable file is a reason, not an exception.

    ``path`` is a local path, a URI (``s3://bucket/images/...``), or, with ``filesystem``, a path inside that
    pyarrow filesystem (see :func:`read_image_bytes`, also for ``root``).
    """
    data = read_image_bytes(path, filesystem, root)
    if isinstance(data, ImageResult):
        return data
    return decode_image(data, short_side=short_side, quality=quality, max_pixels=max_pixels,
                        min_side=min_side, max_aspect=max_aspect)


class PhotoError(ValueError):
    """A photo that cannot be decoded, or not within the limits; ``reason`` names why (``too_large``,
    ``corrupt``, ``truncated``, ``empty_file``, ``unsupported_format``), ``detail`` says what was seen."""

    def __init__(self, reason: str, detail: str = "") -> None:
        # Both in ``args``: the error pickles with its reason (it crosses Ray from an encoder replica).
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}" if self.detail else self.reason


@dataclass(frozen=True)
class PhotoLimits:
    """What decoding one photo may cost. ``max_pixels`` bounds what a header may claim; ``max_decoded_pixels``
    what a decode materialises (a big JPEG decodes at 1/2..1/8 scale, every other format at full size);
    ``short_side`` is the draft target for big JPEGs; ``formats`` the PIL formats accepted (None: any)."""

    max_pixels: int = 64_000_000
    max_decoded_pixels: int | None = None
    short_side: int | None = None
    formats: frozenset[str] | None = None


ANY_PHOTO = PhotoLimits()  # training's limits: any PIL format, the decompression-bomb limit only


def open_photo(data: bytes, limits: PhotoLimits = ANY_PHOTO) -> Image.Image:
    """Parse a photo's header, without decoding a pixel: format, size, and the JPEG draft scale for
    ``limits.short_side``. Raises :class:`PhotoError` for data that is not an image, a format outside
    ``limits.formats``, or a photo over a pixel limit (``too_large``)."""
    if not data:
        raise PhotoError("empty_file")
    try:
        with warnings.catch_warnings():
            # PIL warns above its MAX_IMAGE_PIXELS and raises above twice that; our own limits follow.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise PhotoError("too_large", str(e)[:200]) from None
    except UnidentifiedImageError:
        raise PhotoError("corrupt", "not a decodable image") from None
    except _DECODER_ERRORS as e:
        raise PhotoError(_failure_reason(e), str(e)[:200]) from None
    w, h = img.size
    if limits.formats is not None and img.format not in limits.formats:
        raise PhotoError("unsupported_format", f"{img.format} (accepted: {', '.join(sorted(limits.formats))})")
    if w <= 0 or h <= 0:
        raise PhotoError("corrupt", "zero size")
    if w * h > limits.max_pixels:
        raise PhotoError("too_large", f"{w}x{h} pixels (limit {limits.max_pixels})")
    if limits.short_side:
        _draft_jpeg(img, limits.short_side)
    dw, dh = img.size
    if limits.max_decoded_pixels is not None and dw * dh > limits.max_decoded_pixels:
        raise PhotoError("too_large", f"{img.format} {w}x{h} decodes to {dw * dh} pixels "
                                      f"(limit {limits.max_decoded_pixels})")
    return img


def decode_photo(data: bytes, limits: PhotoLimits = ANY_PHOTO) -> Image.Image:
    """Photo bytes -> RGB PIL image, the way preprocessing decodes training photos: EXIF rotation, alpha
    composited on white, 16-bit grey scaled; a big JPEG decoded at the draft scale for ``limits.short_side``.
    The one decoder of training (:func:`decode_rgb`), indexing and queries (:func:`tnlbt.inference.decode_image`).
    Limits as :func:`open_photo`; any failure is a :class:`PhotoError`."""
    img = open_photo(data, limits)
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must fail, not decode grey (as decode_image)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            rgb = _load_rgb(img)
    except MemoryError:
        raise PhotoError("too_large", "out of memory while decoding") from None
    except _DECODER_ERRORS as e:
        raise PhotoError(_failure_reason(e), str(e)[:200]) from None
    if rgb is not img:
        img.close()  # free the decoded original now, not when the GC gets to it: the peak is what we bound
    return rgb


def decode_rgb(data: bytes) -> Image.Image:
    """Stored photo bytes -> RGB PIL image (collate, i.e. every training and evaluation batch): :func:`decode_photo`,
    so stored and query photos are decoded by one function."""
    return decode_photo(data)
