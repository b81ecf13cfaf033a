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

Nesting depth: ijson's memory grows with the square of the depth, so :class:`JsonDepthGuard` sits between
the sanitiser and the parser and cuts every value nested deeper than ``max_depth`` out of the byte stream; the
record it belonged to is yielded as :class:`TooDeep` and rejected as ``too_deep``.
"""

from __future__ import annotations

import codecs
import contextlib
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from tnlbt.data.vocab import clean_ingredient_name

log = logging.getLogger(__name__)

PARTITIONS = ("train", "val", "test")
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
        self.bytes_read = 0  # from the raw source: where a parse error happened, at most a chunk or two on

    def _fill(self) -> None:
        # Loop: a chunk can end inside a multi-byte character, decode to "" and must not look like EOF.
        while not self._pending and not self._eof:
            data = self._raw.read(self._chunk)
            self.bytes_read += len(data)
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

    @property
    def at_eof(self) -> bool:
        """The raw source has been read to its end."""
        return self._eof

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


@dataclass(frozen=True)
class TooDeep:
    """An array item that nested deeper than the limit; ``item`` is the rest of it (too-deep values: ``None``)."""

    item: Any


# The token walk (slow path): one JSON string, closed (group 1: its closing quote) or running to the end of the
# chunk (group 2: a trailing lone backslash); possessive, so a string that does not close is scanned once.
_BODY = rb'[^"\\]*+(?:\\.[^"\\]*+)*+'
_STRING_REST = re.compile(_BODY, re.S)
_TOKENS = re.compile(rb'"' + _BODY + rb'(?:(")|(\\?)\Z)|[\[\]{},]', re.S)
_NOT_QUOTE_OR_STRUCTURE = bytes(sorted(set(range(256)) - set(b'"[]{},')))
_STEP = np.zeros(256, np.int8)
_STEP[list(b"[{")], _STEP[list(b"]}")] = 1, -1


_NONE = np.zeros(0, np.int64)
_PARSER_BUFFER = 1 << 18


def _escaped(a: np.ndarray, first: int) -> np.ndarray:
    """Positions of the bytes escaped by a backslash (``len(a)``: the next chunk's first byte).

    An odd run of backslashes escapes the byte after it, an even run is escaped backslashes only; ``first``:
    the chunk's first byte is escaped already (the last chunk ended in an odd run).
    """
    p = np.flatnonzero(a[first:] == 0x5C) + first
    starts = np.flatnonzero(np.diff(p, prepend=-2) != 1)  # index (into p) of each run's first backslash
    ends = np.append(starts[1:], p.size)
    out = p[ends[(ends - starts) % 2 == 1] - 1] + 1
    return np.concatenate((np.zeros(1, np.int64), out)) if first else out


class JsonDepthGuard:
    """Binary stream filter between the sanitiser and ijson that bounds how deep array items nest.

    ijson keeps one prefix string per open level, each as long as the path to it, so its memory grows with the
    square of the depth (5k levels: 73 MiB; 40k: 3.9 GiB; one 400 KB record of 200k levels: killed at 23 GiB).
    Here every byte is seen before the parser: a value that would open level ``max_depth + 1`` of an item (the
    item itself is level 1) is replaced by ``null`` and its bytes are dropped, and the item's index is put in
    ``too_deep`` for the reader to reject it. The parser never holds more than ``max_depth`` levels.

    Cheap on ordinary data (a chunk is reduced to its quotes and brackets with C-speed bytes methods, and the
    depth comes from a numpy cumulative sum); only a chunk in which the depth crosses the limit, or comes back
    from beyond it, is walked token by token.
    """

    def __init__(self, raw: BinaryIO, max_depth: int, chunk_size: int = 1 << 20):
        self._raw, self._chunk = raw, chunk_size
        self._limit = max_depth + 1  # the top-level array is one more level
        self.too_deep: set[int] = set()
        self._depth = 0
        self._items = 0  # commas at depth 1 seen so far: the index of the current item
        self._in_string = self._escape = False  # at the end of the last chunk: inside a string, after a backslash
        self._skip: int | None = None  # while dropping a too-deep value: the depth at which it ends
        self._pending, self._offset = b"", 0

    def read(self, size: int = -1) -> bytes:
        while self._offset >= len(self._pending):
            data = self._raw.read(self._chunk)
            if not data:
                return b""
            self._pending, self._offset = self._scan(data), 0
        end = len(self._pending) if size is None or size < 0 else self._offset + size
        out = self._pending[self._offset : end]  # an offset, not pending[size:]: no copy of the rest per read
        self._offset += len(out)
        return out

    def _scan(self, b: bytes) -> bytes:
        if self._summed(b):
            return b if self._skip is None else b""
        pos = self._string_rest(b) if self._in_string else 0
        return self._walk(b, pos)

    def _summed(self, b: bytes) -> bool:
        """Fast path: the whole chunk passes (or, while dropping, is dropped) without crossing the limit."""
        a = np.frombuffer(b, np.uint8)
        escaped = _escaped(a, int(self._escape)) if self._escape or b"\\" in b else _NONE
        quotes = escaped[escaped < len(b)]
        quotes = quotes[a[quotes] == 0x22]
        if quotes.size:  # an escaped quote is text: blank it in a copy before keeping only quotes and brackets
            copy = bytearray(b)
            np.frombuffer(copy, np.uint8)[quotes] = 0x20
            t = np.frombuffer(copy.translate(None, _NOT_QUOTE_OR_STRUCTURE), np.uint8)
        else:
            t = np.frombuffer(b.translate(None, _NOT_QUOTE_OR_STRUCTURE), np.uint8)
        depth, items, in_string = self._depth, self._items, self._in_string
        if t.size:
            quote = t == 0x22
            inside = np.logical_xor.accumulate(quote)  # inside a string (relative to the chunk's start)
            if in_string:
                inside = ~inside
            structure = t[~(inside | quote)]
            if structure.size:
                level = np.cumsum(_STEP[structure], dtype=np.int64)
                level += depth
                if self._skip is None:
                    if level.max() > self._limit:
                        return False
                    items += int(np.count_nonzero((level == 1) & (structure == 0x2C)))
                elif level.min() <= self._skip:
                    return False
                depth = int(level[-1])
            in_string = bool(inside[-1])  # after the chunk's last quote
        self._depth, self._items, self._in_string = depth, items, in_string
        self._escape = in_string and escaped.size > 0 and int(escaped[-1]) == len(b)
        return True

    def _string_rest(self, b: bytes) -> int:
        """The chunk starts inside a string: the position after its closing quote (``len(b)``: still inside)."""
        i = 1 if self._escape else 0
        end = _STRING_REST.match(b, i).end()  # type: ignore[union-attr]  # always matches
        closed = end < len(b) and b[end] == 0x22
        self._in_string, self._escape = not closed, (not closed and end < len(b))
        return end + 1 if closed else len(b)

    def _walk(self, b: bytes, pos: int) -> bytes:
        """Slow path: token by token, replacing each too-deep value by ``null``."""
        out: list[bytes] = []
        keep: int | None = 0 if self._skip is None else None  # start of the bytes passed on
        for m in _TOKENS.finditer(b, pos):
            c = b[m.start()]
            if c == 0x22:  # a string
                if m.group(1) is None:  # runs past this chunk
                    self._in_string, self._escape = True, bool(m.group(2))
            elif c in (0x5B, 0x7B):  # [ {
                self._depth += 1
                if self._skip is None and self._depth > self._limit:
                    out += (b[keep : m.start()], b"null")
                    keep, self._skip = None, self._depth - 1
                    self.too_deep.add(self._items)
            elif c in (0x5D, 0x7D):  # ] }
                self._depth -= 1
                if self._skip is not None and self._depth == self._skip:
                    keep, self._skip = m.end(), None
            elif self._depth == 1:  # a comma between items
                self._items += 1
        if keep is not None:
            out.append(b[keep:])
        return b"".join(out)


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


def iter_json_array(
    source: str | os.PathLike[str] | BinaryIO, errors: list[str] | None = None, max_depth: int = 64
) -> Iterator[Any]:
    """Yield the items of a JSON array one by one (bounded memory).

    ``source`` is a local path, a URI (``s3://bucket/layer1.json``, read as one stream through
    :mod:`tnlbt.storage`), or an open binary stream (read from its current position and left open).
    A source that is not a JSON array raises ``ValueError``; a syntax error part-way ends the iteration and is
    appended to ``errors`` (one line: the file name, the items before it, the byte offset, the parser's reason) and
    logged instead of raising, so the records read so far are kept; the caller decides. An item nested
    more than ``max_depth`` levels (itself being level 1) is yielded as :class:`TooDeep`, its deep part never
    having reached the parser (see :class:`JsonDepthGuard`).
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
        guard = JsonDepthGuard(f, max_depth)
        n = 0
        try:
            # yajl re-lexes a token that spans its buffers from the token's start on every buffer: a long string
            # costs length^2 / buf_size (25 MiB title: 3.1 s at ijson's 64 KiB, 0.7 s at 256 KiB). Larger
            # buffers slow ordinary records down (1 MiB: +25% on 204 MB of layer1-like JSON; 256 KiB: no change).
            for item in ijson.items(guard, "item", use_float=True, buf_size=_PARSER_BUFFER):
                if n in guard.too_deep:  # the guard has seen all of item n by the time ijson yields it
                    guard.too_deep.discard(n)
                    item = TooDeep(item)
                n += 1
                yield item
        except (ijson.JSONError, UnicodeDecodeError) as e:  # IncompleteJSONError is a JSONError
            # One line (yajl adds the text around the error on more lines) naming the place: a truncated file
            # (a broken download) ends early; other damage lies within the bytes read so far.
            reason = str(e).strip().split("\n", 1)[0][:200]
            ended = f.at_eof and ("premature EOF" in reason or "Incomplete" in reason)
            where = (f"the file ends early, at byte {f.bytes_read:,}" if ended
                     else f"within its first {f.bytes_read:,} bytes")
            msg = f"{name}: JSON error after {n} items, {where}: {reason}"
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


MAX_ID_CHARS = 256


def clean_id(rid: str) -> str | None:
    """A recipe id as stored: stripped; ``None`` when empty, longer than :data:`MAX_ID_CHARS` or holding a
    control character (ids end up in URLs, logs and payloads). Recipe1M's layer1 and user catalogs share it."""
    rid = rid.strip()
    if not rid or len(rid) > MAX_ID_CHARS or any(ord(c) < 32 for c in rid):
        return None
    return rid


def clean_layer1(obj: Any) -> tuple[dict[str, Any] | None, str | None]:
    """One layer1 item -> (clean record, None) or (None, reason). Empty lines are dropped, text stripped.

    Reasons: ``too_deep``, ``not_object``, ``missing_field``, ``bad_type``, ``invalid_utf8``, ``bad_id``,
    ``bad_partition``, ``empty_ingredients``, ``empty_instructions`` (the reader adds ``duplicate_id``).
    """
    if isinstance(obj, TooDeep):
        return None, "too_deep"
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
    rid = clean_id(rid)
    if rid is None:
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


TEXT_CUTS = ("long_title", "long_line", "many_lines")


def cap_text(rec: dict[str, Any], max_title_chars: int, max_line_chars: int, max_lines: int) -> list[str]:
    """Cut a clean record's text to the storage limits, in place; return which limits cut it (``TEXT_CUTS``).

    The raw text is stored in Parquet and returned with every search hit, so a 50 MiB title or 100,000
    ingredient lines would be carried everywhere. Such a record is kept, shortened: the first ``max_lines``
    lines of each list, each line and the title cut to their character limits (then right-stripped).
    """
    cuts = []
    if len(rec["title"]) > max_title_chars:
        rec["title"] = rec["title"][:max_title_chars].rstrip()
        cuts.append("long_title")
    long_line = many_lines = False
    for key in ("ingredients", "instructions"):
        lines = rec[key]
        if len(lines) > max_lines:
            lines, many_lines = lines[:max_lines], True
        if lines and max(map(len, lines)) > max_line_chars:
            lines, long_line = [line[:max_line_chars].rstrip() for line in lines], True
        rec[key] = lines
    return cuts + ["long_line"] * long_line + ["many_lines"] * many_lines


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
