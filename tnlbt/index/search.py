"""Query side of the index: :class:`IndexReader` (store + photo bytes), :class:`Searcher` (encoder + reader)
and ``tnlbt search``.

The HTTP API (``serve/``), the Gradio UI (``ui/``) and the CLI all go through the functions here, so a hit
looks the same everywhere:

* photo hit (recipe text -> photos): ``image_id, image_url, recipe_id, title, score``
* recipe hit (photo -> recipes): ``id, title, ingredients, instructions, image_ids, score``

Photo bytes for ``/v1/images/{id}`` come from the raw image tree (``data.image_root``, the Recipe1M layout
``{split}/{c0}/{c1}/{c2}/{c3}/{image_id}``) when it exists, else from the processed Parquet (the 256-px JPEGs
that were embedded), found through a lazily built ``image_id -> (file, row, position)`` map. The tree is
preferred because it is an O(1) path lookup with full-size photos; the Parquet fallback keeps a deployment
that shipped only the processed data (no raw tree) working. Ids are checked against a strict pattern and the
resolved path must stay under the root, so a request can never read another file.

Remote runs and data (``s3://...``): the image root and the processed Parquet may be URIs; both are read
through :mod:`tnlbt.storage` (a photo request reads one Parquet row group, not the whole file). The embedded
store of a remote run is a local folder (see :mod:`tnlbt.runs`); when it is not on this machine
:meth:`IndexReader.from_run` raises :class:`~tnlbt.index.store.IndexNotFound` naming the host that built it.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import socket
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tnlbt import storage
from tnlbt.config import HYBRID_DEFAULT, StoreConfig
from tnlbt.index import hybrid
from tnlbt.index.store import PHOTOS, RECIPES, Hit, IndexNotFound, VectorStore, open_store
from tnlbt.inference import Encoder, RecipeText
from tnlbt.runs import (
    checkpoint_drift,
    default_store_path,
    index_checkpoint,
    read_index_meta,
    recorded_path,
    run_dir_of,
)

log = logging.getLogger(__name__)

IMAGE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
MAX_K = 100


def photo_hit(h: Hit, image_url_prefix: str = "/v1/images/") -> dict[str, Any]:
    p = h.payload
    iid = str(p.get("image_id", h.id))
    return {
        "image_id": iid,
        "image_url": f"{image_url_prefix}{iid}",
        "recipe_id": str(p.get("recipe_id", "")),
        "title": str(p.get("title", "")),
        "score": round(float(h.score), 6),
    }


def recipe_hit(h: Hit) -> dict[str, Any]:
    p = h.payload
    return {
        "id": str(p.get("recipe_id", h.id)),
        "title": str(p.get("title", "")),
        "ingredients": list(p.get("ingredients") or []),
        "instructions": str(p.get("instructions") or ""),
        "image_ids": list(p.get("image_ids") or []),
        "score": round(float(h.score), 6),
    }


class ImageSource:
    """Photo bytes by image id: the raw tree first, the processed Parquet second (see module docstring).

    ``image_root`` and ``parquet_dirs`` may be local paths or URIs (read through :mod:`tnlbt.storage`).
    """

    def __init__(
        self, image_root: str | None = None, parquet_dirs: Sequence[str] = (), photos_root: str | None = None
    ) -> None:
        # a user catalog's photo folder (tnlbt/data/catalog.py): photos found by the ``path`` in their payload
        self.photos_root = photos_root
        self.remote_root = image_root.rstrip("/") if image_root and storage.is_remote(image_root) else None
        self.root = Path(image_root).resolve() if image_root and not self.remote_root else None
        self._remote_root_ok: bool | None = None  # checked once (a LIST request), not per photo
        self.parquet_dirs = [d for d in parquet_dirs if _isdir(d)]
        # image_id -> (parquet file, row group, row in the group, position in the row's photo list)
        self._map: dict[str, tuple[str, int, int, int]] | None = None
        self._lock = threading.Lock()

    @staticmethod
    def valid_id(image_id: str) -> bool:
        return bool(IMAGE_ID_RE.match(image_id)) and ".." not in image_id

    def _tree_parts(self, image_id: str, split: str | None) -> list[tuple[str, ...]]:
        splits = [split] if split else ["test", "val", "train"]
        return [
            (s, image_id[0], image_id[1], image_id[2], image_id[3], image_id)
            for s in splits
            if s in ("train", "val", "test")
        ]

    def _tree_path(self, image_id: str, split: str | None) -> Path | None:
        if self.root is None or not self.root.is_dir():
            return None
        for parts in self._tree_parts(image_id, split):
            p = self.root.joinpath(*parts).resolve()
            if p.is_relative_to(self.root) and p.is_file():
                return p
        return None

    def _remote_tree_bytes(self, image_id: str, split: str | None) -> bytes | None:
        # valid_id() (no "/", no "..") keeps the key under the root: nothing to resolve on an object store
        if self.remote_root is None:
            return None
        if self._remote_root_ok is None:
            self._remote_root_ok = storage.isdir(self.remote_root)
        if not self._remote_root_ok:
            return None
        for parts in self._tree_parts(image_id, split):
            try:
                return storage.read_bytes(storage.join(self.remote_root, *parts))
            except FileNotFoundError:
                continue
        return None

    def _parquet_map(self) -> dict[str, tuple[str, int, int, int]]:
        with self._lock:
            if self._map is None:
                m: dict[str, tuple[str, int, int, int]] = {}
                for d in self.parquet_dirs:
                    for f in parquet_files(d):
                        pf = storage.open_parquet(f)
                        for rg in range(pf.num_row_groups):
                            ids = pf.read_row_group(rg, columns=["image_ids"])["image_ids"].to_pylist()
                            for row, lst in enumerate(ids):
                                for pos, iid in enumerate(lst or []):
                                    m[iid] = (f, rg, row, pos)
                self._map = m
            return self._map

    def get_catalog_photo(self, relpath: str) -> bytes | None:
        """A catalog photo by its recorded relative path, read only inside the photos folder (links followed
        must stay inside too: :func:`tnlbt.data.images.read_image_bytes`)."""
        import os

        from tnlbt.data.catalog import photo_relpath
        from tnlbt.data.images import read_image_bytes

        rel = photo_relpath(relpath)
        if self.photos_root is None or rel is None:
            return None
        if storage.is_remote(self.photos_root):
            data = read_image_bytes(storage.join(self.photos_root, rel))
        else:
            root = os.path.realpath(self.photos_root)
            data = read_image_bytes(os.path.join(root, rel), root=root)
        return data if isinstance(data, bytes) else None

    def get(self, image_id: str, split: str | None = None) -> bytes | None:
        """JPEG bytes, or None when the id is malformed or unknown."""
        if not self.valid_id(image_id) or len(image_id) < 5:
            return None
        p = self._tree_path(image_id, split)
        if p is not None:
            return p.read_bytes()
        data = self._remote_tree_bytes(image_id, split)
        if data is not None:
            return data
        loc = self._parquet_map().get(image_id) if self.parquet_dirs else None
        if loc is None:
            return None
        f, rg, row, pos = loc
        table = storage.open_parquet(f).read_row_group(rg, columns=["images"])
        return table["images"][row].as_py()[pos]


def _isdir(d: str) -> bool:
    return storage.isdir(d) if storage.is_remote(d) else Path(d).is_dir()


def parquet_files(d: str) -> list[str]:
    """Sorted ``*.parquet`` files of a local folder or a remote prefix (as paths / URIs)."""
    return [storage.join(d, n) for n in storage.list_files(d, "*.parquet")]


def join_under(base: str, part: str) -> str:
    return storage.join(base, part) if storage.is_remote(base) else str(Path(base) / part)


def _check_local_store(run: str | Path, meta: dict[str, Any], path: str) -> None:
    """A remote run's embedded store is a folder on the machine that indexed it: say so when it is not here
    (instead of opening an empty store and failing later with a vaguer message)."""
    if Path(path).is_dir():
        return
    run_s = str(run_dir_of(run))
    if not meta:
        raise IndexNotFound(f"no index for {run_s} (no index/index.json): run `tnlbt index --run {run_s}` first")
    host = meta.get("store_host") or "the machine that ran `tnlbt index`"
    raise IndexNotFound(
        f"the embedded {meta.get('store', 'qdrant')} store of {run_s} is a local folder on {host} "
        f"({path}), not on this machine ({socket.gethostname()}): run `tnlbt index --run {run_s}` here, or "
        "index into a Qdrant server (--qdrant-url) to serve from several machines"
    )


class IndexReader:
    """Store queries by vector plus recipe / photo lookups; no model (the Serve ``SearchIndex`` wraps it)."""

    def __init__(self, store: VectorStore, images: ImageSource | None = None, blobs: Any = None) -> None:
        self.store = store
        self.images = images or ImageSource()
        self.blobs = blobs  # a tnlbt.index.changes.ChangeLog: photos written through the API

    @classmethod
    def from_run(cls, run: str | Path, store: StoreConfig | None = None) -> IndexReader:
        """Open the run's index where ``index.json`` says it is, unless ``store`` names another place;
        ``store.kind`` auto means the recorded kind, and ``store.settings`` are layered over the recorded
        settings and ``TNLBT_INDEX_*`` (:meth:`IndexSettings.layered`)."""
        sc = store or StoreConfig()
        meta = read_index_meta(run)
        settings = sc.resolved_settings(meta.get("index_settings"))
        kind = sc.kind if sc.kind != "auto" else (meta.get("store") or "qdrant")
        url = sc.url or (meta.get("qdrant_url") if not sc.path else None)
        recorded = recorded_path(run, meta.get("store_path"))
        path = None if url else (sc.path or recorded or default_store_path(run, kind))
        if path is not None and not sc.path and storage.is_remote(str(run_dir_of(run))):
            _check_local_store(run, meta, path)
        if path is not None and path != ":memory:" and not Path(path).is_dir():
            # opening would create an empty store folder (and then answer "no collection"): say what is missing
            run_s = str(run_dir_of(run))
            raise IndexNotFound(f"no index at {path} for {run_s}: run `tnlbt index --run {run_s}` first")
        vectors = open_store(kind, url=url, path=path, settings=settings)
        data_dir = recorded_path(run, meta.get("data_dir"))
        split = meta.get("split", "test")
        splits = ["train", "val", "test"] if split == "all" else [split]
        dirs = [join_under(data_dir, s) for s in splits] if data_dir else []
        from tnlbt.index.changes import ChangeLog, changes_dir

        images = ImageSource(recorded_path(run, meta.get("image_root")), dirs,
                             photos_root=recorded_path(run, meta.get("photos_root")))
        return cls(vectors, images, ChangeLog(changes_dir(run)))

    def ready(self) -> dict[str, Any]:
        """Counts per collection; raises if the index is missing or the store is unavailable."""
        return {RECIPES: self.store.count(RECIPES), PHOTOS: self.store.count(PHOTOS)}

    def search_photos(
        self,
        vector: Sequence[float],
        k: int = 10,
        filter: dict[str, Any] | None = None,
        image_url_prefix: str = "/v1/images/",
        terms: Sequence[str] | None = None,
    ) -> list[dict[str, Any]]:
        """Photos nearest to ``vector``; with a text query's ``terms`` (:func:`tnlbt.index.hybrid.query_terms`)
        ranked hybrid, the score then being the fused score."""
        hits = hybrid.search(self.store, PHOTOS, vector, k, filter, terms)
        return [photo_hit(h, image_url_prefix) for h in hits]

    def search_recipes(
        self,
        vector: Sequence[float],
        k: int = 10,
        filter: dict[str, Any] | None = None,
        terms: Sequence[str] | None = None,
    ) -> list[dict[str, Any]]:
        """Recipes nearest to ``vector`` (a photo's, or a text query's: then ``terms`` rank it hybrid)."""
        return [recipe_hit(h) for h in hybrid.search(self.store, RECIPES, vector, k, filter, terms)]

    def get_recipe(self, recipe_id: str) -> dict[str, Any] | None:
        p = self.store.retrieve(RECIPES, [recipe_id], "recipe")[0]
        return None if p is None else recipe_hit(Hit(id=recipe_id, score=1.0, payload=p)) | {"score": None}

    def get_image(self, image_id: str) -> bytes | None:
        """Photo bytes for an indexed photo id (unknown to the index -> None, even if a file exists)."""
        if not ImageSource.valid_id(image_id):
            return None
        p = self.store.retrieve(PHOTOS, [image_id], "photo")[0]
        if p is None:
            return None
        if p.get("blob") and self.blobs is not None:  # written through the API: stored by content hash
            return self.blobs.read_blob(p["blob"])
        if p.get("path"):  # a catalog photo: its file under the catalog's photo folder
            return self.images.get_catalog_photo(str(p["path"]))
        return self.images.get(image_id, p.get("split") or None)

    def close(self) -> None:
        self.store.close()


class Searcher:
    """Encoder + index: what the CLI and the in-process UI call (the API does the same in two deployments)."""

    def __init__(self, encoder: Encoder, reader: IndexReader) -> None:
        self.encoder = encoder
        self.reader = reader

    @classmethod
    def from_run(cls, run: str | Path, store: StoreConfig | None = None) -> Searcher:
        meta = read_index_meta(run)
        ckpt = index_checkpoint(run, meta)  # located, not loaded: a missing checkpoint fails here, cheaply
        drift = checkpoint_drift(run)
        if drift:
            log.warning("%s", drift)
        # The index before the model: a missing index fails before a remote checkpoint is downloaded.
        reader = IndexReader.from_run(run, store)
        try:
            return cls(Encoder(ckpt), reader)
        except BaseException:
            reader.close()
            raise

    def search_text(
        self,
        query: RecipeText | str,
        k: int = 10,
        filter: dict[str, Any] | None = None,
        hybrid: bool = HYBRID_DEFAULT,
    ) -> list[dict[str, Any]]:
        """Photos for recipe text, ranked hybrid (:mod:`tnlbt.index.hybrid`) or, with ``hybrid=False``, dense."""
        q = RecipeText.from_free_text(query) if isinstance(query, str) else query
        if q.is_empty():
            raise ValueError("empty query: give a title, ingredients or instructions")
        vec = self.encoder.encode_texts([q])[0]
        return self.reader.search_photos(vec, _check_k(k), filter, terms=text_terms(q) if hybrid else None)

    def search_image(self, image: Any, k: int = 10, filter: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """``image``: bytes, a path (decoded as the API decodes an upload), or a PIL image."""
        if isinstance(image, str | Path):
            image = Path(image).read_bytes()
        if isinstance(image, bytes | bytearray):
            vec = self.encoder.encode_tensors([self.encoder.photo_tensor(bytes(image))])[0]
        else:
            vec = self.encoder.encode_images([image.convert("RGB")])[0]
        return self.reader.search_recipes(vec, _check_k(k), filter)

    def close(self) -> None:
        self.reader.close()


def text_terms(query: RecipeText) -> list[str]:
    """A text query's lexical terms for hybrid ranking (its title and ingredients; instructions have none)."""
    return hybrid.query_terms(query.title, list(query.ingredients))


def _check_k(k: int) -> int:
    if not 1 <= int(k) <= MAX_K:
        raise ValueError(f"k must be in 1..{MAX_K}, got {k}")
    return int(k)


def format_hits(hits: list[dict[str, Any]], kind: str) -> str:
    lines = []
    for i, h in enumerate(hits, 1):
        if kind == "photos":
            lines.append(f"{i:>3}. {h['score']:.4f}  {h['image_id']}  recipe {h['recipe_id']}: {h['title']}")
        else:
            ing = ", ".join(h["ingredients"][:6]) + (" ..." if len(h["ingredients"]) > 6 else "")
            lines.append(f"{i:>3}. {h['score']:.4f}  {h['id']}: {h['title']}\n       {ing}")
    return "\n".join(lines) if lines else "(no results)"


def cli_search(args: argparse.Namespace) -> int:
    import sys

    from tnlbt.index.store import IndexNotFound, StoreUnavailable

    run = run_dir_of(args.run)
    if not (storage.exists(run) if isinstance(run, str) else run.exists()):
        raise FileNotFoundError(f"run directory not found: {run}")
    if args.image is not None and not Path(args.image).is_file():
        raise FileNotFoundError(f"no such image: {args.image}")
    store = StoreConfig(url=args.qdrant_url, path=args.qdrant_path, settings=tuple(args.index_setting or ()))
    from tnlbt.index.filters import recipe_filter, split_terms

    try:  # a bad term ("2 cups") is refused before the model and the index are loaded
        flt = recipe_filter(must_include=split_terms(getattr(args, "include", None)),
                            must_exclude=split_terms(getattr(args, "exclude", None)))
    except ValueError as e:
        print(f"tnlbt search: {e}", file=sys.stderr)
        return 2
    try:
        searcher = Searcher.from_run(run, store)
    except (StoreUnavailable, IndexNotFound) as e:
        # e.g. the embedded store is open in a running `tnlbt serve` (one process per folder)
        print(f"tnlbt search: {e}", file=sys.stderr)
        return 2
    try:
        if args.text is not None:
            use = HYBRID_DEFAULT if getattr(args, "hybrid", None) is None else args.hybrid
            hits = searcher.search_text(args.text, k=args.k, filter=flt, hybrid=use)
            print(format_hits(hits, "photos"))
        else:
            hits = searcher.search_image(Path(args.image), k=args.k, filter=flt)
            print(format_hits(hits, "recipes"))
    except (StoreUnavailable, IndexNotFound) as e:
        print(f"tnlbt search: {e}", file=sys.stderr)
        return 2
    finally:
        searcher.close()
    if getattr(args, "json", False):
        print(json.dumps(hits, indent=1))
    return 0


def brute_force_topk(vectors: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine top-k (indices, scores), the reference the stores are tested and benchmarked against."""
    v = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    q = query / max(float(np.linalg.norm(query)), 1e-12)
    s = v @ q
    idx = np.argsort(-s, kind="stable")[:k]
    return idx, s[idx]
