"""A user's own catalog for ``tnlbt index --catalog``: JSON Lines of recipes, plus a folder of photos.

One recipe per line::

    {"id": "r1", "title": "Tomato soup", "ingredients": ["4 tomatoes", "1 onion"],
     "instructions": ["Chop.", "Simmer 20 min."],            # or one text: "Chop. Simmer."
     "photos": ["soup/r1.jpg"],                              # optional, relative to --photos
     "metadata": {"cuisine": "italian", "price": 4.5}}       # optional, free; kept as payload

Decisions (also in the README):

* **Photos without a recipe** are the files under ``--photos`` that no row names (a folder of dish photos with
  an empty or missing catalog is a photo-only index). A row must have text: one with neither title,
  ingredients nor instructions is ``empty_recipe``, even if it lists photos.
* ``--photos`` defaults to the catalog file's folder. A photo reference must be a relative path inside it:
  absolute paths, ``..`` and NUL are ``outside_photos`` before any file is touched; a path whose file, links
  followed, lies outside is ``outside_root`` when it is read (:func:`tnlbt.data.images.read_image_bytes`).
* A photo's id is ``sha256(relative path)[:20]`` plus its lowercase extension: stable across re-indexes (so
  its point id is), path-safe, and the form :class:`tnlbt.index.search.ImageSource` serves; the relative path
  travels in the payload (``path``). A file named by two rows belongs to the first (``duplicate_photo``).
* Bad rows are skipped and counted by reason, with up to five examples (line number and id when known):
  ``invalid_json``, ``invalid_utf8``, ``too_deep`` (nesting over ``data.max_json_depth``, checked by the
  preprocessing guard before parsing), ``row_too_long`` (over ``index.catalog_max_row_bytes``; the line is
  skipped without being held in memory), ``not_object``, ``missing_id``, ``bad_id``, ``bad_type``,
  ``duplicate_id`` (first row wins), ``empty_recipe``. Blank lines are not rows. ``rows == indexed + skipped``.
* Text is cut to ``data.max_title_chars`` / ``max_line_chars`` / ``max_lines`` as preprocessing does
  (:func:`tnlbt.data.recipe1m.cap_text`); such a row is kept and counted under ``truncated``.
* ``ingredients_norm`` and ``title_terms`` (payload, for filters): the ingredient words and phrases and the
  title words, normalised by the one rule of the filters (:func:`tnlbt.data.ingredients.recipe_terms`:
  "2 cups chopped Tomatoes" -> "tomato").

Reading is streaming: the file is read in 1 MiB chunks, clean rows leave in Arrow tables of ``chunk_rows``
rows, and what stays in memory is one id per row (duplicates) and one path per photo (loose photos). No Ray here.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from tnlbt.data.ingredients import recipe_terms
from tnlbt.data.recipe1m import (
    JsonDepthGuard,
    cap_text,
    clean_id,
    clean_layer1,
    clean_layer2,
    has_bad_text,
    image_relpath,
    iter_json_array,
    open_binary,
)
from tnlbt.inference import split_lines

MAX_EXAMPLES = 5
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class CatalogLimits:
    """What one catalog row may cost: bytes of a line, JSON nesting, text sizes, photos per recipe."""

    max_row_bytes: int = 1 << 20
    max_json_depth: int = 64
    max_title_chars: int = 300
    max_line_chars: int = 500
    max_lines: int = 50
    max_photos: int = 5

    @classmethod
    def from_configs(cls, data: Any, index: Any) -> CatalogLimits:
        """The run's :class:`~tnlbt.config.DataConfig` text caps and the :class:`~tnlbt.config.IndexConfig`
        row size: the same limits as preprocessing and the search API."""
        return cls(
            max_row_bytes=int(index.catalog_max_row_bytes),
            max_json_depth=int(data.max_json_depth),
            max_title_chars=int(data.max_title_chars),
            max_line_chars=int(data.max_line_chars),
            max_lines=int(data.max_lines),
            max_photos=int(data.max_images_per_recipe),
        )


class Tally:
    """Counts per reason, up to :data:`MAX_EXAMPLES` examples each (plain data for ``index.json``)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.examples: dict[str, list[str]] = {}

    def add(self, reason: str, example: str | None = None, n: int = 1) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + n
        if example is not None:
            ex = self.examples.setdefault(reason, [])
            if len(ex) < MAX_EXAMPLES:
                ex.append(example[:200])

    def total(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict[str, Any]:
        return {"counts": dict(sorted(self.counts.items())), "examples": dict(sorted(self.examples.items()))}


@dataclass
class CatalogReport:
    """What reading a catalog found; the photo side is completed by the embedding (decode failures)."""

    rows: int = 0  # non-blank lines
    recipes: int = 0  # rows kept
    skipped: Tally = field(default_factory=Tally)
    truncated: Tally = field(default_factory=Tally)
    photos_listed: int = 0  # photo references in kept rows
    photos_refused: Tally = field(default_factory=Tally)  # refused before reading (path, duplicate, over limit)
    loose_photos: int = 0  # files under the photos folder no row names

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "recipes": self.recipes,
            "skipped": self.skipped.to_dict(),
            "truncated": self.truncated.to_dict(),
            "photos_listed": self.photos_listed,
            "photos_refused": self.photos_refused.to_dict(),
            "loose_photos": self.loose_photos,
        }


# -- lines -----------------------------------------------------------------------------------------------
def iter_lines(raw: BinaryIO, max_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """``(line number, bytes)`` of each line without its newline; ``None`` for a line over ``max_bytes``, whose
    bytes are skipped as they stream past (never held)."""
    buf = b""
    lineno = 0
    too_long = False
    while True:
        chunk = raw.read(_CHUNK)
        if not chunk:
            break
        buf += chunk
        start = 0
        while True:
            nl = buf.find(b"\n", start)
            if nl < 0:
                break
            lineno += 1
            yield lineno, None if too_long or nl - start > max_bytes else buf[start:nl]
            too_long = False
            start = nl + 1
        buf = buf[start:]
        if len(buf) > max_bytes:  # the current line is already too long: drop what we have, remember it
            too_long, buf = True, b""
    if buf or too_long:
        lineno += 1
        yield lineno, None if too_long or len(buf) > max_bytes else buf


def _too_deep(line: bytes, max_depth: int) -> bool:
    """The preprocessing depth guard over one line (as the one item of an array)."""
    guard = JsonDepthGuard(io.BytesIO(b"[" + line + b"]"), max_depth)
    while guard.read(_CHUNK):
        pass
    return bool(guard.too_deep)


def parse_line(line: bytes, max_depth: int) -> tuple[Any, str | None]:
    """One line -> ``(object, None)`` or ``(None, reason)``: ``invalid_utf8``, ``too_deep``, ``invalid_json``."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return None, "invalid_utf8"
    if _too_deep(line, max_depth):
        return None, "too_deep"
    try:
        return json.loads(text), None
    except (json.JSONDecodeError, RecursionError):
        return None, "invalid_json"


# -- rows ------------------------------------------------------------------------------------------------
def _lines(value: Any) -> list[str] | None:
    """A list of strings, or one text (split into lines by the UI's rule); ``None`` for anything else."""
    if value is None:
        return []
    if isinstance(value, str):
        return split_lines(value)
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return [s.strip() for s in value if s.strip()]
    return None


def clean_row(obj: Any, limits: CatalogLimits) -> tuple[dict[str, Any] | None, str | None, list[str]]:
    """One parsed line -> ``(row, None, cuts)`` or ``(None, reason, [])`` (reasons in the module doc).

    ``row``: ``id, title, ingredients, instructions, photos (raw references), metadata``; ``cuts`` names the
    text limits that shortened it."""
    if not isinstance(obj, dict):
        return None, "not_object", []
    rid = obj.get("id")
    if rid is None or rid == "":
        return None, "missing_id", []
    if isinstance(rid, int) and not isinstance(rid, bool):
        rid = str(rid)
    if not isinstance(rid, str):
        return None, "bad_id", []
    if has_bad_text(rid):
        return None, "invalid_utf8", []
    rid = clean_id(rid)
    if rid is None:
        return None, "bad_id", []
    title = obj.get("title")
    if title is None:
        title = ""
    ingredients, instructions = _lines(obj.get("ingredients")), _lines(obj.get("instructions"))
    photos = obj.get("photos")
    photos = [] if photos is None else ([photos] if isinstance(photos, str) else photos)
    metadata = obj.get("metadata")
    if (
        not isinstance(title, str)
        or ingredients is None
        or instructions is None
        or not isinstance(photos, list)
        or not all(isinstance(p, str) for p in photos)
        or not (metadata is None or isinstance(metadata, dict))
    ):
        return None, "bad_type", []
    if any(has_bad_text(s) for s in (title, *ingredients, *instructions, *photos)):
        return None, "invalid_utf8", []
    if metadata and has_bad_text(json.dumps(metadata, ensure_ascii=False)):
        return None, "invalid_utf8", []  # a lone surrogate cannot be stored as payload text
    rec = {"id": rid, "title": title.strip(), "ingredients": ingredients, "instructions": instructions}
    if not (rec["title"] or ingredients or instructions):
        return None, "empty_recipe", []
    cuts = cap_text(rec, limits.max_title_chars, limits.max_line_chars, limits.max_lines)
    rec["photos"] = photos
    rec["metadata"] = metadata or {}
    return rec, None, cuts


def photo_relpath(ref: str) -> str | None:
    """A photo reference -> a normalised relative POSIX path inside the photos folder, or ``None`` when it
    could leave it (absolute, a drive, ``..`` anywhere, NUL, empty)."""
    if not ref or "\x00" in ref or "\\" in ref:
        return None
    if ref.startswith("/") or (len(ref) > 1 and ref[1] == ":"):
        return None
    parts = [p for p in ref.split("/") if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts):
        return None
    return "/".join(parts)


def photo_id(relpath: str) -> str:
    """Stable, path-safe id of a catalog photo (see the module doc)."""
    ext = posixpath.splitext(relpath)[1].lower()
    ext = ext if len(ext) <= 6 and ext[1:].isalnum() else ""
    return hashlib.sha256(relpath.encode()).hexdigest()[:20] + ext


# -- the whole file --------------------------------------------------------------------------------------
def _table(rows: list[dict[str, Any]]) -> Any:
    import pyarrow as pa

    strs = pa.list_(pa.string())
    return pa.table(
        {
            "kind": pa.array([r["kind"] for r in rows], pa.string()),
            "id": pa.array([r["id"] for r in rows], pa.string()),
            "title": pa.array([r["title"] for r in rows], pa.string()),
            "ingredients": pa.array([r["ingredients"] for r in rows], strs),
            "instructions": pa.array([r["instructions"] for r in rows], strs),
            "ingredients_norm": pa.array([r["ingredients_norm"] for r in rows], strs),
            "title_terms": pa.array([r["title_terms"] for r in rows], strs),
            # free-form JSON per row: one string column, not a schema Arrow would have to unify across rows
            "metadata": pa.array([r["metadata"] for r in rows], pa.string()),
            "photo_ids": pa.array([r["photo_ids"] for r in rows], strs),
            "photo_paths": pa.array([r["photo_paths"] for r in rows], strs),
        }
    )


def _loose(relpath: str) -> dict[str, Any]:
    return {"kind": "photo", "id": "", "title": "", "ingredients": [], "instructions": [], "ingredients_norm": [],
            "title_terms": [], "metadata": "{}", "photo_ids": [photo_id(relpath)], "photo_paths": [relpath]}


def iter_photo_files(root: str | os.PathLike[str]) -> Iterator[str]:
    """Relative POSIX paths of the photo files under ``root`` (by suffix), sorted per folder; folders linked
    from inside are not followed (a link could loop or lead out), linked files are listed and checked when
    read."""
    root = os.fspath(root)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        for name in sorted(filenames):
            if name.lower().endswith(PHOTO_SUFFIXES) and not name.startswith("."):
                yield name if rel == "." else f"{Path(rel).as_posix()}/{name}"


def read_catalog(
    path: str | os.PathLike[str],
    limits: CatalogLimits,
    photos_root: str | os.PathLike[str] | None = None,
    loose_photos: bool = True,
    chunk_rows: int = 512,
) -> Iterator[Any]:
    """Stream a catalog: yields Arrow tables of clean rows (``kind`` ``"recipe"`` or ``"photo"``, a loose
    photo), and finally the :class:`CatalogReport` (the last item). ``photos_root`` (a local folder) is walked
    for loose photos after the catalog, when ``loose_photos``."""
    report = CatalogReport()
    seen: set[str] = set()
    photo_owner: set[str] = set()
    rows: list[dict[str, Any]] = []
    with open_binary(path) as raw:
        for lineno, line in iter_lines(raw, limits.max_row_bytes):
            if line is not None and not line.strip():
                continue
            report.rows += 1
            where = f"line {lineno}"
            if line is None:
                report.skipped.add("row_too_long", where)
                continue
            obj, reason = parse_line(line, limits.max_json_depth)
            rec, cuts = None, []
            if reason is None:
                rec, reason, cuts = clean_row(obj, limits)
            if reason is not None or rec is None:
                rid = obj.get("id") if isinstance(obj, dict) else None
                example = where + (f" (id {str(rid)[:40]!r})" if isinstance(rid, str | int) else "")
                report.skipped.add(reason or "bad_type", example)
                continue
            rid = rec["id"]
            if rid in seen:
                report.skipped.add("duplicate_id", f"{where} (id {rid[:40]!r})")
                continue
            seen.add(rid)
            for cut in cuts:
                report.truncated.add(cut, rid)
            ids, paths = [], []
            for ref in rec["photos"]:
                report.photos_listed += 1
                rel = photo_relpath(ref)
                if rel is None:
                    report.photos_refused.add("outside_photos", f"{rid}: {ref[:80]!r}")
                elif rel in photo_owner:
                    report.photos_refused.add("duplicate_photo", f"{rid}: {rel[:80]}")
                elif len(ids) >= limits.max_photos:
                    report.photos_refused.add("unused_over_limit", f"{rid}: {rel[:80]}")
                else:
                    photo_owner.add(rel)
                    ids.append(photo_id(rel))
                    paths.append(rel)
            rows.append(
                {
                    "kind": "recipe",
                    "id": rid,
                    "title": rec["title"],
                    "ingredients": rec["ingredients"],
                    "instructions": rec["instructions"],
                    **recipe_terms(rec["title"], rec["ingredients"]),
                    "metadata": json.dumps(rec["metadata"], ensure_ascii=False),
                    "photo_ids": ids,
                    "photo_paths": paths,
                }
            )
            report.recipes += 1
            if len(rows) >= chunk_rows:
                yield _table(rows)
                rows = []
    if photos_root is not None and loose_photos:
        for rel in iter_photo_files(photos_root):
            if rel not in photo_owner:
                report.loose_photos += 1
                try:
                    rel.encode("utf-8")
                except UnicodeEncodeError:  # a file name that is not UTF-8 cannot be an id, a payload or a URL
                    report.photos_refused.add("bad_file_name", ascii(rel)[:80])
                    continue
                rows.append(_loose(rel))
                if len(rows) >= chunk_rows:
                    yield _table(rows)
                    rows = []
    if rows:
        yield _table(rows)
    yield report


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a local file or a URI, streamed."""
    h = hashlib.sha256()
    with open_binary(path) as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


# -- writing a catalog (the offline generator, tests, demos) -------------------------------------------------
def write_catalog(path: str | os.PathLike[str], rows: list[dict[str, Any]]) -> Path:
    """Catalog rows (dicts as in the module doc) -> a JSON Lines file (tmp file + rename)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, p)
    return p


def catalog_from_layout(
    raw_dir: str | os.PathLike[str], splits: tuple[str, ...] = ("test",), limit: int | None = None
) -> Iterator[dict[str, Any]]:
    """Recipe1M-layout records (layer1 + layer2, e.g. ``tnlbt synth``'s output) as catalog rows whose photos are
    relative to the layout's ``images/`` folder; ``metadata`` holds the split."""
    raw = Path(raw_dir)
    photos: dict[str, list[str]] = {}
    for obj in iter_json_array(raw / "layer2.json"):
        rid, ids = clean_layer2(obj)
        if rid is not None:
            photos[rid] = [i for i in ids or [] if i]
    n = 0
    for obj in iter_json_array(raw / "layer1.json"):
        rec, _ = clean_layer1(obj)
        if rec is None or rec["partition"] not in splits:
            continue
        yield {
            "id": rec["id"],
            "title": rec["title"],
            "ingredients": rec["ingredients"],
            "instructions": rec["instructions"],
            "photos": [image_relpath(rec["partition"], i) for i in photos.get(rec["id"], [])],
            "metadata": {"split": rec["partition"]},
        }
        n += 1
        if limit is not None and n >= limit:
            return
