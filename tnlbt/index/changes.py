"""Live changes: recipes and photos written through the API into the published index, and the log that makes
the next full re-index keep them.

Where: ``RUN/index/changes.jsonl`` (one JSON object a line) and ``RUN/index/changes-blobs/<sha256>`` (the
uploaded photo bytes, named by their content hash); for a remote run the same names under the run's local
folder (:func:`tnlbt.runs.local_run_dir`), next to its embedded store. Nothing else is ever written, and no
path is built from a client's id: ids only name points (:func:`valid_id`), blobs are named by their hash.

How (:class:`LiveIndex`, one per index replica, every write under one lock):

1. the caller has embedded the item already (a failed embed never gets here: the index is unchanged);
2. the change is checked (a photo's recipe must exist), then appended to the log as one line, written whole
   with ``O_APPEND`` and fsynced (write-ahead: an acknowledged change is on disk before the index has it);
3. it is applied to the collections the aliases point at (:func:`apply`), so the next search sees it.

A change that fails in step 3 (store down: 503) stays in the log and is applied by the next re-index; PUT and
DELETE are idempotent by id, so the client's retry is safe either way. Writes to one id are serialised by the
lock, so concurrent PUTs end as one of them, whole (recipe point, its photos' copies of its fields, the log).

Replay (:func:`replay`, called by ``tnlbt index`` between building a new version and switching the aliases):
the log is compacted to the last change per item and applied to the new version, re-embedded with the new
version's checkpoint (the log keeps sources, not vectors). Recipes first, then photos; a photo put before the
last delete of its recipe is skipped, as the live delete removed it.

Recipe payloads follow the indexer's (:mod:`tnlbt.index.embed`); photo payloads copy their recipe's
``title``, ``ingredients_norm``, ``title_terms`` and ``metadata``, so photo search filters by recipe
(:mod:`tnlbt.index.filters`). Deleting a recipe deletes its photos.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tnlbt.data.ingredients import recipe_terms
from tnlbt.index.store import PHOTOS, RECIPES, VectorStore, photo_point_id, recipe_point_id

log = logging.getLogger(__name__)

LOG_NAME = "changes.jsonl"
BLOBS_NAME = "changes-blobs"
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
PUT_RECIPE, DELETE_RECIPE, PUT_PHOTO, DELETE_PHOTO = "put_recipe", "delete_recipe", "put_photo", "delete_photo"
OPS = (PUT_RECIPE, DELETE_RECIPE, PUT_PHOTO, DELETE_PHOTO)
# the recipe fields a photo point carries (its title for display, the rest for filters)
PHOTO_COPIES = ("title", "ingredients_norm", "title_terms", "metadata")


class UnknownItem(LookupError):
    """A change names an item that is not in the index (a photo's recipe)."""


def valid_id(item_id: str) -> bool:
    """Recipe and photo ids a client may write: 1-128 of ``A-Z a-z 0-9 _ . -``, starting alphanumeric, no
    ``..`` (the image ids of the index; never a path, but kept path-safe anyway)."""
    return isinstance(item_id, str) and bool(ID_RE.match(item_id)) and ".." not in item_id


def changes_dir(run: str | Path) -> Path:
    """Where the log and the blobs of a run live (module doc)."""
    from tnlbt.runs import local_run_dir

    return local_run_dir(run) / "index"


# -- the log -----------------------------------------------------------------------------------------------------
class ChangeLog:
    """``changes.jsonl`` and the photo blobs of one run (module doc)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOG_NAME
        self.blobs = self.folder / BLOBS_NAME

    def append(self, record: Mapping[str, Any]) -> None:
        """One whole line, appended and fsynced (``O_APPEND``: a line is never interleaved with another)."""
        line = (json.dumps(dict(record), ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":  # a torn line (a crash mid-append) stays alone
                line = b"\n" + line
            view = memoryview(line)
            while view:  # a regular file takes it in one write; loop anyway rather than assume it
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)

    def records(self) -> Iterator[dict[str, Any]]:
        """Every well-formed record, in order; a torn last line (a crash mid-append) is skipped."""
        if not self.path.is_file():
            return
        with self.path.open("rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    rec = json.loads(raw)
                except ValueError:
                    log.warning("%s:%d: unreadable change skipped", self.path, n)
                    continue
                if isinstance(rec, dict) and rec.get("op") in OPS and valid_id(rec.get("id", "")):
                    yield rec

    def write_blob(self, data: bytes) -> str:
        """Store photo bytes under their SHA-256 (written to a temp file, fsynced, renamed); returns the hash."""
        sha = hashlib.sha256(data).hexdigest()
        p = self.blobs / sha
        if not p.is_file():
            self.blobs.mkdir(parents=True, exist_ok=True)
            tmp = self.blobs / f".{sha}.{os.getpid()}.{threading.get_ident()}.tmp"
            with tmp.open("wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, p)
        return sha

    def read_blob(self, sha: str) -> bytes | None:
        if not isinstance(sha, str) or not _SHA_RE.match(sha):
            return None
        p = self.blobs / sha
        return p.read_bytes() if p.is_file() else None


# -- applying one change ---------------------------------------------------------------------------------------
def recipe_payload(recipe_id: str, recipe: Mapping[str, Any], image_ids: Sequence[str]) -> dict[str, Any]:
    """A written recipe's payload: the indexer's fields (:mod:`tnlbt.index.embed`) plus ``metadata``."""
    from tnlbt.index.embed import _excerpt

    title = str(recipe.get("title") or "")
    ingredients = [str(s) for s in recipe.get("ingredients") or []]
    return {
        "recipe_id": recipe_id,
        "title": title,
        "ingredients": ingredients,
        "instructions": _excerpt([str(s) for s in recipe.get("instructions") or []]),
        "image_ids": list(image_ids),
        "metadata": dict(recipe.get("metadata") or {}),
        "source": "live",
        **recipe_terms(title, ingredients),
    }


def _copies(recipe: Mapping[str, Any] | None) -> dict[str, Any]:
    r = recipe or {}
    return {
        "title": r.get("title") or "",
        "ingredients_norm": list(r.get("ingredients_norm") or []),
        "title_terms": list(r.get("title_terms") or []),
        "metadata": dict(r.get("metadata") or {}),
    }


def _photos_of(store: VectorStore, photos: str | None, recipe_id: str) -> list[tuple[str, dict[str, Any]]]:
    return store.find(photos, {"must": [["recipe_id", recipe_id]]}) if photos else []


def _get(store: VectorStore, name: str | None, item_id: str, kind: str) -> dict[str, Any] | None:
    return store.retrieve(name, [item_id], kind)[0] if name else None


def check(store: VectorStore, colls: Mapping[str, str], record: Mapping[str, Any]) -> None:
    """Refuse a change before it is logged: a photo's recipe must be in the index (:class:`UnknownItem`)."""
    if record["op"] == PUT_PHOTO:
        if not colls.get(PHOTOS):
            raise UnknownItem("this index has no photo collection")
        rid = record.get("recipe_id")
        if rid and _get(store, colls.get(RECIPES), rid, "recipe") is None:
            raise UnknownItem(f"unknown recipe id {rid!r}")


def apply(store: VectorStore, colls: Mapping[str, str], record: Mapping[str, Any], vector: Any = None) -> bool:
    """Apply one change to the collections ``colls`` (``{"recipes": name, "photos": name}``, aliases or
    physical names; a missing ``photos`` means a recipe-only index). Puts need the item's ``vector``.
    Returns whether the item existed before (a delete of an unknown id is a no-op)."""
    op, item_id = record["op"], record["id"]
    recipes, photos = colls.get(RECIPES), colls.get(PHOTOS)
    if op in (PUT_RECIPE, DELETE_RECIPE):
        old = _get(store, recipes, item_id, "recipe")
        mine = _photos_of(store, photos, item_id)
        if op == DELETE_RECIPE:
            if mine:  # photos first: a crash in between leaves a recipe without photos, never orphans
                store.delete(photos, [p.get("image_id", "") for _, p in mine], "photo")
            store.delete(recipes, [item_id], "recipe")
            return old is not None
        payload = recipe_payload(item_id, record.get("recipe") or {}, [p.get("image_id", "") for _, p in mine])
        _upsert(store, recipes, recipe_point_id(item_id), vector, payload)
        if mine:
            store.set_payload(photos, [pid for pid, _ in mine], _copies(payload))
        return old is not None
    if photos is None:
        raise UnknownItem("this index has no photo collection")
    old = _get(store, photos, item_id, "photo")
    old_rid = (old or {}).get("recipe_id") or ""
    new_rid = (record.get("recipe_id") or "") if op == PUT_PHOTO else ""
    if op == PUT_PHOTO:
        rec = _get(store, recipes, new_rid, "recipe") if new_rid else None
        if new_rid and rec is None:
            raise UnknownItem(f"unknown recipe id {new_rid!r}")
        payload = {"image_id": item_id, "recipe_id": new_rid, "blob": record["blob"], "source": "live", **_copies(rec)}
        _upsert(store, photos, photo_point_id(item_id), vector, payload)
        if rec is not None and item_id not in (rec.get("image_ids") or []):
            ids = [*(rec.get("image_ids") or []), item_id]
            store.set_payload(recipes, [recipe_point_id(new_rid)], {"image_ids": ids})
    else:
        store.delete(photos, [item_id], "photo")
    if old_rid and old_rid != new_rid:  # the photo left its recipe (deleted, or moved to another)
        prev = _get(store, recipes, old_rid, "recipe")
        if prev is not None:
            ids = [i for i in prev.get("image_ids") or [] if i != item_id]
            store.set_payload(recipes, [recipe_point_id(old_rid)], {"image_ids": ids})
    return old is not None


def _upsert(store: VectorStore, name: str, pid: str, vector: Any, payload: dict[str, Any]) -> None:
    if vector is None:
        raise ValueError("a put needs the item's vector")
    store.upsert(store.resolve(name), [pid], np.asarray([vector], np.float32), [payload])


def live_collections(store: VectorStore) -> dict[str, str]:
    """The aliases a live change writes through (``photos`` only when the index has photos)."""
    al = store.aliases()
    return {n: n for n in (RECIPES, PHOTOS) if n in al}


class LiveIndex:
    """The write side of one index replica: check, log, apply, all under one lock (module doc)."""

    def __init__(self, store: VectorStore, changes: ChangeLog, lock: threading.Lock | None = None) -> None:
        self.store, self.changes = store, changes
        self.lock = lock or threading.Lock()

    def _write(self, record: dict[str, Any], vector: Any = None, data: bytes | None = None) -> bool:
        if not valid_id(record["id"]) or not (record.get("recipe_id") is None or valid_id(record["recipe_id"])):
            raise ValueError("ids are 1-128 characters of A-Z a-z 0-9 _ . - (starting with a letter or digit)")
        with self.lock:
            colls = live_collections(self.store)
            if RECIPES not in colls:
                from tnlbt.index.store import IndexNotFound

                raise IndexNotFound("no published index to change (run `tnlbt index` first)")
            check(self.store, colls, record)
            if data is not None:  # the blob after the check (a refused photo leaves no file), before the log line
                record["blob"] = self.changes.write_blob(data)
            self.changes.append({**record, "at": round(time.time(), 3)})
            return apply(self.store, colls, record, vector)

    def put_recipe(self, recipe_id: str, vector: Sequence[float], recipe: Mapping[str, Any]) -> bool:
        keep = {k: recipe.get(k) for k in ("title", "ingredients", "instructions", "metadata") if recipe.get(k)}
        return self._write({"op": PUT_RECIPE, "id": recipe_id, "recipe": keep}, vector)

    def delete_recipe(self, recipe_id: str) -> bool:
        return self._write({"op": DELETE_RECIPE, "id": recipe_id})

    def put_photo(self, image_id: str, vector: Sequence[float], data: bytes, recipe_id: str | None = None) -> bool:
        return self._write({"op": PUT_PHOTO, "id": image_id, "recipe_id": recipe_id or None}, vector, bytes(data))

    def delete_photo(self, image_id: str) -> bool:
        return self._write({"op": DELETE_PHOTO, "id": image_id})


# -- replay ------------------------------------------------------------------------------------------------------
def compact(records: Sequence[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The last change per recipe and per photo, each list in log order; photo puts older than the last
    delete of their recipe are dropped (that delete removed them)."""
    last: dict[tuple[str, str], tuple[int, dict[str, Any]]] = {}
    recipe_deleted_at: dict[str, int] = {}
    for n, rec in enumerate(records):
        kind = "recipe" if rec["op"] in (PUT_RECIPE, DELETE_RECIPE) else "photo"
        last[(kind, rec["id"])] = (n, dict(rec))
        if rec["op"] == DELETE_RECIPE:
            recipe_deleted_at[rec["id"]] = n
    recipes = [r for (kind, _), (_, r) in sorted(last.items(), key=lambda kv: kv[1][0]) if kind == "recipe"]
    photos = []
    for (kind, _), (n, r) in sorted(last.items(), key=lambda kv: kv[1][0]):
        if kind != "photo":
            continue
        if r["op"] == PUT_PHOTO and r.get("recipe_id") and n < recipe_deleted_at.get(r["recipe_id"], -1):
            continue
        photos.append(r)
    return recipes, photos


def replay(
    store: VectorStore,
    collections: Mapping[str, str],
    changes: ChangeLog,
    embed_texts: Callable[[list[Mapping[str, Any]]], np.ndarray],
    embed_photos: Callable[[list[bytes]], list[Any]],
    batch: int = 64,
) -> dict[str, int]:
    """Apply the compacted log to ``collections`` (a new, unpublished version). ``embed_texts`` maps recipe
    dicts to vectors; ``embed_photos`` maps photo bytes to vectors (None for a photo that does not decode).
    Returns counts: ``recipes`` / ``photos`` put, ``deleted``, ``skipped`` (with the reason in the log)."""
    recipes, photos = compact(list(changes.records()))
    counts = {"recipes": 0, "photos": 0, "deleted": 0, "skipped": 0}
    puts = [r for r in recipes if r["op"] == PUT_RECIPE]
    vecs: dict[str, Any] = {}
    for i in range(0, len(puts), batch):
        chunk = puts[i : i + batch]
        for r, v in zip(chunk, embed_texts([r.get("recipe") or {} for r in chunk]), strict=True):
            vecs[r["id"]] = v
    for r in recipes:
        apply(store, collections, r, vecs.get(r["id"]))
        counts["recipes" if r["op"] == PUT_RECIPE else "deleted"] += 1
    for i in range(0, len(photos), batch):
        chunk = photos[i : i + batch]
        datas = [changes.read_blob(r.get("blob", "")) if r["op"] == PUT_PHOTO else None for r in chunk]
        todo = [d for d in datas if d is not None]
        it = iter(embed_photos(todo) if todo else [])
        pvecs = [next(it) if d is not None else None for d in datas]
        for r, v in zip(chunk, pvecs, strict=True):
            if r["op"] == DELETE_PHOTO:
                apply(store, collections, r)
                counts["deleted"] += 1
                continue
            if v is None:
                log.warning("replay: photo %s skipped (blob missing or not a decodable photo)", r["id"])
                counts["skipped"] += 1
                continue
            try:
                apply(store, collections, r, v)
                counts["photos"] += 1
            except UnknownItem as e:
                log.warning("replay: photo %s skipped: %s", r["id"], e)
                counts["skipped"] += 1
    return counts


def replay_with_encoder(
    store: VectorStore, collections: Mapping[str, str], run: str | Path, checkpoint: Any
) -> dict[str, int]:
    """:func:`replay` of ``run``'s log with the checkpoint's :class:`~tnlbt.inference.Encoder` (the hook
    ``tnlbt index`` calls before the alias switch); ``{}`` without a log, so nothing loads for nothing."""
    changes = ChangeLog(changes_dir(run))
    if not changes.path.is_file():
        return {}
    from tnlbt.inference import Encoder, RecipeText

    enc = Encoder(checkpoint)

    def texts(recs: list[Mapping[str, Any]]) -> np.ndarray:
        return enc.encode_texts([RecipeText(str(r.get("title") or ""), list(r.get("ingredients") or []),
                                            list(r.get("instructions") or [])) for r in recs])

    def photos(datas: list[bytes]) -> list[Any]:
        out: list[Any] = []
        for d in datas:
            try:
                out.append(enc.encode_tensors([enc.photo_tensor(d)])[0])
            except ValueError:  # PhotoError: replay counts it as skipped
                out.append(None)
        return out

    counts = replay(store, collections, changes, texts, photos)
    log.info("replayed the changes log: %s", counts)
    return counts
