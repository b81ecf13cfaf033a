"""Streaming reader for Recipe1M's layout (layer1.json, layer2.json, det_ingrs.json) with per-record
validation.


The real ``layer1.json`` is one JSON array of about 1.3 GB, so nothing here loads a file whole: ``ijson`` (the
yajl2 C backend when present) yields one array item at a time.

Invalid UTF-8: yajl stops the whole parse at the first bad byte, which would lose every later record. The file
is therefore read through :class:`Utf8Sanitizer`, which replaces each invalid byte sequence with the Unicode
noncharacter U+FDD0 (reserved by Unicode for exactly this kind of internal use, so real text never carries
it). A record whose used text (id, title, ingredient or instruction lines) contains that marker, or a lone
surrogate from a ``\\udXXX`` escape, is rejected as ``invalid_utf8``; the other records of the file are read
normally. A JSON syntax error (a truncated or garbled file) ends that file: the records before it are kept and
the error is reported in ``errors``.
"""

from __future__ import annotations

import codecs
import contextlib
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from tnlbt.data.vocab import clean_ingredient_name

log = logging.getLogger(__name__)

PARTITIONS = ("train", "val", "test")
RECORD_REASONS = (
    "not_object", "missing_field", "bad_type", "invalid_utf8", "bad_id", "bad_partition", "empty_ingredients",
    "empty_instructions", "duplicate_id",
)
_MARK = "\ufdd0"
_ERROR_HANDLER = "tnlbt_mark_invalid_utf8"
_BAD_TEXT = re.compile("[\ufdd0\ud800-\udfff]")
# Image ids become paths {c0}/{c1}/{c2}/{c3}/{id}: the first four characters must be plain and path-safe.
_IMAGE_ID = re.compile(r"^[A-Za-z0-9]{4}[A-Za-z0-9._-]{0,200}$")


# A lone UTF-16 surrogate escape ("\udc80") is valid JSON but not Unicode; yajl emits bytes that ijson cannot
# decode and the whole parse dies. Such escapes are rewritten to "\ufdd0" (the marker) before parsing; an
# escape is live only after an odd run of backslashes, and a high+low pair is a real character and stays.
# A run is matched only from its first backslash ((?<!\\)) and possessively (\\++): otherwise a long run of
# backslashes not followed by "u" is retried from every position inside it, quadratic (64 KiB: 36 s).
_SURROGATE_ESCAPE = re.compile(
    r"(?<!\\)(?:(\\++)u([dD][89abAB][0-9a-fA-F]{2})(\\u[dD][c-fC-F][0-9a-fA-F]{2})?"
    r"|(\\++)u[dD][c-fC-F][0-9a-fA-F]{2})"
)

_H = "[0-9a-fA-F]"
_ESCAPE_TAIL = 11  # the longest escape after its backslash run: u d83d \ u de00
# The start of a surrogate escape that more text could complete or extend, at the very end of a chunk: a
# backslash run, then a prefix of "udXXX" (high: any prefix, up to a whole high + a prefix of its low part;
# low: a prefix missing a digit).
_PARTIAL_ESCAPE = re.compile(
    rf"(?<!\\)(\\++)(?:u(?:[dD](?:[89abAB](?:{_H}(?:{_H}(?:\\(?:u(?:[dD](?:[c-fC-F]{_H}?)?)?)?)?)?)?"
    rf"|[c-fC-F]{_H}?)?)?)?\Z"
)


def _split_escape_tail(text: str) -> tuple[str, str]:
    """``text`` -> (part to convert now, tail for the next chunk) so that no surrogate escape is cut in two.

    The tail is an escape the next chunk may complete (at most 11 characters after its backslash run). Of
    that run only the parity matters (an odd run makes the escape live), so an even number of its backslashes
    is converted now (a run without its "u" stays as it is) and at most one is carried. The old rule (carry
    everything after the last character that cannot be part of an escape) carried 20 MiB of "a" in a title and
    re-scanned it with every chunk: quadratic.
    """
    # The escape's backslash run ends within the last 11 characters: search from there (or from the start of
    # that run), not through a long run of escape-like text.
    start = max(0, len(text) - _ESCAPE_TAIL)
    if start and text[start] == "\\":
        start = len(text[:start].rstrip("\\"))
    m = _PARTIAL_ESCAPE.search(text, start)
    if m is None:
        return text, ""
    cut = m.end(1) - len(m.group(1)) % 2
    return text[:cut], text[cut:]


def _fix_surrogate_escape(m: re.Match[str]) -> str:
    if m.group(1) is not None:
        run, low = m.group(1), m.group(3)
        if len(run) % 2 == 1:
            return m.group(0) if low else run[:-1] + "\\ufdd0"
        # escaped backslash: "u d8xx" is literal text, but a following "\udcxx" is a live lone low surrogate
        return run + "u" + m.group(2) + ("\\ufdd0" if low else "")
    run = m.group(4)
    return run[:-1] + "\\ufdd0" if len(run) % 2 == 1 else m.group(0)


def _mark_invalid(err: UnicodeError) -> tuple[str, int]:
    return _MARK, err.end  # type: ignore[attr-defined]


class Utf8Sanitizer:
    """Binary file wrapper yielding valid UTF-8: invalid sequences become U+FDD0, a leading BOM is dropped."""

    def __init__(self, raw: BinaryIO, chunk_size: int = 1 << 20):
        try:
            codecs.lookup_error(_ERROR_HANDLER)
        except LookupError:
            codecs.register_error(_ERROR_HANDLER, _mark_invalid)
        self._raw = raw
        self._chunk = chunk_size
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors=_ERROR_HANDLER)
        self._pending = b""
        self._carry = ""
        self._first = True
        self._eof = False

    def _fill(self) -> None:
        # Loop: a chunk can end inside a multi-byte character, decode to "" and must not look like EOF.
        while not self._pending and not self._eof:
            data = self._raw.read(self._chunk)
            if not data:
                self._eof = True
            text = self._carry + self._decoder.decode(data, final=self._eof)
            self._carry = ""
            if self._first and text:
                text = text.removeprefix("\ufeff")
                self._first = False
            if not self._eof:
                text, self._carry = _split_escape_tail(text)  # no escape straddles two chunks
            if "\\u" in text:
                text = _SURROGATE_ESCAPE.sub(_fix_surrogate_escape, text)
            self._pending = text.encode("utf-8")

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            parts = []
            while True:
                self._fill()
                if not self._pending:
                    return b"".join(parts)
                parts.append(self._pending)
                self._pending = b""
        self._fill()
        out, self._pending = self._pending[:size], self._pending[size:]
        return out

    def peek_first_byte(self) -> bytes:
        """The first non-whitespace byte, without consuming it ('' for an empty file)."""
        while True:
            self._fill()
            if not self._pending:
                return b""
            stripped = self._pending.lstrip()
            if stripped:
                self._pending = stripped
                return stripped[:1]
            self._pending = b""


def open_binary(path: str | os.PathLike[str]) -> BinaryIO:
    """A sequential binary stream for a local path or a URI (``s3://``, ``gs://``, ... via :mod:`tnlbt.storage`).

    Remote files are opened with ``open_input_stream`` (one streaming GET for the whole 1.3 GB layer1), not as
    random-access files (one ranged request per read). Raises ``FileNotFoundError`` when nothing is there.
    """
    s = os.fspath(path)
    from tnlbt import storage

    if not storage.is_remote(s):
        return open(storage.local_path(s) or s, "rb")  # the caller closes it
    fs, inner = storage.resolve(s)
    import pyarrow.fs as pafs

    if fs.get_file_info(inner).type != pafs.FileType.File:
        raise FileNotFoundError(f"{s}: no such file")
    return fs.open_input_stream(inner, compression=None)  # type: ignore[return-value]


def iter_json_array(source: str | os.PathLike[str] | BinaryIO, errors: list[str] | None = None) -> Iterator[Any]:
    """Yield the items of a JSON array one by one (bounded memory).

    ``source`` is a local path, a URI (``s3://bucket/layer1.json``, read as one stream through
    :mod:`tnlbt.storage`), or an open binary stream (read from its current position and left open).
    A source that is not a JSON array raises ``ValueError``; a syntax error part-way ends the iteration and is
    appended to ``errors`` (or logged) instead of raising, so the records read so far are kept.
    """
    import ijson

    if hasattr(source, "read"):
        label = str(getattr(source, "name", "") or "<stream>")
        raw_cm: Any = contextlib.nullcontext(source)
    else:
        label = os.fspath(source)  # type: ignore[arg-type]
        raw_cm = open_binary(label)
    name = label.rstrip("/").rsplit("/", 1)[-1]
    with raw_cm as raw:
        f = Utf8Sanitizer(raw)
        first = f.peek_first_byte()
        if first != b"[":
            raise ValueError(f"{label}: expected a JSON array (Recipe1M layout), file starts with {first!r}")
        n = 0
        try:
            for item in ijson.items(f, "item", use_float=True):
                n += 1
                yield item
        except (ijson.JSONError, UnicodeDecodeError) as e:  # IncompleteJSONError is a JSONError
            msg = f"{name}: JSON error after {n} items, rest of file skipped: {str(e)[:200]}"
            log.warning(msg)
            if errors is not None:
                errors.append(msg)


def has_bad_text(s: str) -> bool:
    """True when a string carries the invalid-UTF-8 marker or a lone surrogate."""
    return _BAD_TEXT.search(s) is not None


def _text_lines(value: Any) -> list[str] | None:
    """``[{"text": str}, ...]`` -> list of str; ``None`` when the structure or a type is wrong."""
    if not isinstance(value, list):
        return None
    out = []
    for item in value:
        if not isinstance(item, dict) or not isinstance(item.get("text"), str):
            return None
        out.append(item["text"])
    return out


def clean_layer1(obj: Any) -> tuple[dict[str, Any] | None, str | None]:
    """One layer1 item -> (clean record, None) or (None, reason). Empty lines are dropped, text stripped."""
    if not isinstance(obj, dict):
        return None, "not_object"
    for key in ("id", "title", "ingredients", "instructions", "partition"):
        if obj.get(key) is None:
            return None, "missing_field"
    rid, title, partition = obj["id"], obj["title"], obj["partition"]
    ingredients = _text_lines(obj["ingredients"])
    instructions = _text_lines(obj["instructions"])
    if not (isinstance(rid, str) and isinstance(title, str) and isinstance(partition, str)) \
            or ingredients is None or instructions is None:
        return None, "bad_type"
    if any(has_bad_text(s) for s in (rid, title, *ingredients, *instructions)):
        return None, "invalid_utf8"
    rid = rid.strip()
    if not rid or len(rid) > 256 or any(ord(c) < 32 for c in rid):
        return None, "bad_id"
    partition = partition.strip().lower()
    if partition not in PARTITIONS:
        return None, "bad_partition"
    ingredients = [s.strip() for s in ingredients if s.strip()]
    instructions = [s.strip() for s in instructions if s.strip()]
    if not ingredients:
        return None, "empty_ingredients"
    if not instructions:
        return None, "empty_instructions"
    return {"id": rid, "title": title.strip(), "ingredients": ingredients, "instructions": instructions,
            "partition": partition}, None


def valid_image_id(value: Any) -> bool:
    return isinstance(value, str) and _IMAGE_ID.match(value) is not None and ".." not in value


def clean_layer2(obj: Any) -> tuple[str | None, list[str] | None]:
    """One layer2 item -> (recipe id, image ids). An unusable image entry becomes "" (counted per photo)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("id"), str) \
            or not isinstance(obj.get("images"), list):
        return None, None
    rid = obj["id"].strip()
    if not rid or has_bad_text(rid):
        return None, None
    ids = []
    for img in obj["images"]:
        iid = img.get("id") if isinstance(img, dict) else None
        ids.append(iid if valid_image_id(iid) else "")
    return rid, ids


def clean_det_ingrs(obj: Any) -> tuple[str | None, list[str] | None]:
    """One det_ingrs item -> (recipe id, cleaned names flagged valid). ``(None, None)`` if malformed."""
    if not isinstance(obj, dict) or not isinstance(obj.get("id"), str):
        return None, None
    lines, valid = _text_lines(obj.get("ingredients")), obj.get("valid")
    if lines is None or not isinstance(valid, list):
        return None, None
    names = []
    for text, ok in zip(lines, valid, strict=False):
        if ok is True and not has_bad_text(text):
            name = clean_ingredient_name(text)
            if name and name not in names:
                names.append(name)
    return obj["id"].strip(), names


def image_relpath(partition: str, image_id: str) -> str:
    """``{partition}/{c0}/{c1}/{c2}/{c3}/{image_id}``: a photo's place under the image root ('/' separated)."""
    return "/".join((partition, *image_id[:4], image_id))


def image_path(images_dir: str | os.PathLike[str], partition: str, image_id: str) -> Path | str:
    """``{images_dir}/{partition}/{c0}/{c1}/{c2}/{c3}/{image_id}`` (Recipe1M's four-level tree).

    A local folder gives a :class:`~pathlib.Path`; a URI (``s3://bucket/images``) gives a URI string with the
    same scheme. Code reading many photos from a remote root should resolve the root once
    (:func:`tnlbt.storage.resolve`) and join :func:`image_relpath` onto its inner path instead.
    """
    s = os.fspath(images_dir)
    if "://" in s:
        from tnlbt import storage

        if storage.scheme(s):
            return storage.join(s, image_relpath(partition, image_id))
    return Path(s, partition, *image_id[:4], image_id)
