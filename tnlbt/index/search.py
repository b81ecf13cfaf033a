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
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tnlbt.index.embed import (
    Encoder,
    RecipeText,
    decode_image,
    default_store_path,
    read_index_meta,
    run_dir_of,
)
from tnlbt.index.store import PHOTOS, RECIPES, Hit, VectorStore, open_store

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
    """Photo bytes by image id: the raw tree first, the processed Parquet second (see module docstring)."""

    def __init__(self, image_root: str | None = None, parquet_dirs: Sequence[str] = ()) -> None:
        self.root = Path(image_root).resolve() if image_root else None
        self.parquet_dirs = [d for d in parquet_dirs if Path(d).is_dir()]
        self._map: dict[str, tuple[str, int, int]] | None = None
        self._lock = threading.Lock()

    @staticmethod
    def valid_id(image_id: str) -> bool:
        return bool(IMAGE_ID_RE.match(image_id)) and ".." not in image_id

    def _tree_path(self, image_id: str, split: str | None) -> Path | None:
        if self.root is None or not self.root.is_dir():
            return None
        splits = [split] if split else ["test", "val", "train"]
        for s in splits:
            if s not in ("train", "val", "test"):
                continue
            p = (self.root / s / image_id[0] / image_id[1] / image_id[2] / image_id[3] / image_id).resolve()
            if p.is_relative_to(self.root) and p.is_file():
                return p
        return None

    def _parquet_map(self) -> dict[str, tuple[str, int, int]]:
        with self._lock:
            if self._map is None:
                import pyarrow.parquet as pq

                m: dict[str, tuple[str, int, int]] = {}
                for d in self.parquet_dirs:
                    for f in sorted(Path(d).glob("*.parquet")):
                        ids = pq.read_table(f, columns=["image_ids"])["image_ids"].to_pylist()
                        for row, lst in enumerate(ids):
                            for pos, iid in enumerate(lst or []):
                                m[iid] = (str(f), row, pos)
                self._map = m
            return self._map

    def get(self, image_id: str, split: str | None = None) -> bytes | None:
        """JPEG bytes, or None when the id is malformed or unknown."""
        if not self.valid_id(image_id) or len(image_id) < 5:
            return None
        p = self._tree_path(image_id, split)
        if p is not None:
            return p.read_bytes()
        loc = self._parquet_map().get(image_id) if self.parquet_dirs else None
        if loc is None:
            return None
        import pyarrow.parquet as pq

        f, row, pos = loc
        table = pq.read_table(f, columns=["images"])
        return table["images"][row].as_py()[pos]


class IndexReader:
    """Store queries by vector plus recipe / photo lookups; no model (the Serve ``SearchIndex`` wraps it)."""

    def __init__(self, store: VectorStore, images: ImageSource | None = None) -> None:
        self.store = store
        self.images = images or ImageSource()

    @classmethod
    def from_run(
        cls,
        run: str | Path,
        qdrant_url: str | None = None,
        qdrant_path: str | None = None,
        store_kind: str | None = None,
    ) -> IndexReader:
        meta = read_index_meta(run)
        kind = store_kind or meta.get("store") or "qdrant"
        url = qdrant_url or (meta.get("qdrant_url") if not qdrant_path else None)
        path = None if url else (qdrant_path or meta.get("store_path") or default_store_path(run, kind))
        store = open_store(kind, url=url, path=path)
        data_dir = meta.get("data_dir")
        split = meta.get("split", "test")
        dirs = (
            [str(Path(data_dir) / s) for s in (["train", "val", "test"] if split == "all" else [split])]
            if data_dir
            else []
        )
        return cls(store, ImageSource(meta.get("image_root"), dirs))

    def ready(self) -> dict[str, Any]:
        """Counts per collection; raises if the index is missing or the store is unavailable."""
        return {RECIPES: self.store.count(RECIPES), PHOTOS: self.store.count(PHOTOS)}

    def search_photos(
        self,
        vector: Sequence[float],
        k: int = 10,
        filter: dict[str, Any] | None = None,
        image_url_prefix: str = "/v1/images/",
    ) -> list[dict[str, Any]]:
        return [photo_hit(h, image_url_prefix) for h in self.store.search(PHOTOS, vector, k, filter)]

    def search_recipes(
        self, vector: Sequence[float], k: int = 10, filter: dict[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        return [recipe_hit(h) for h in self.store.search(RECIPES, vector, k, filter)]

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
        return self.images.get(image_id, p.get("split") or None)

    def close(self) -> None:
        self.store.close()


class Searcher:
    """Encoder + index: what the CLI and the in-process UI call (the API does the same in two deployments)."""

    def __init__(self, encoder: Encoder, reader: IndexReader) -> None:
        self.encoder = encoder
        self.reader = reader

    @classmethod
    def from_run(
        cls,
        run: str | Path,
        qdrant_url: str | None = None,
        qdrant_path: str | None = None,
        store_kind: str | None = None,
    ) -> Searcher:
        meta = read_index_meta(run)
        ckpt = meta.get("checkpoint") or run
        return cls(Encoder(ckpt), IndexReader.from_run(run, qdrant_url, qdrant_path, store_kind))

    def search_text(
        self, query: RecipeText | str, k: int = 10, filter: dict[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        q = RecipeText.from_free_text(query) if isinstance(query, str) else query
        if q.is_empty():
            raise ValueError("empty query: give a title, ingredients or instructions")
        vec = self.encoder.encode_texts([q])[0]
        return self.reader.search_photos(vec, _check_k(k), filter)

    def search_image(
        self, image: Any, k: int = 10, filter: dict[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        """``image``: bytes, a path, or a PIL image."""
        if isinstance(image, bytes | bytearray):
            image = decode_image(bytes(image))
        elif isinstance(image, str | Path):
            image = decode_image(Path(image).read_bytes())
        else:
            image = image.convert("RGB")
        vec = self.encoder.encode_images([image])[0]
        return self.reader.search_recipes(vec, _check_k(k), filter)

    def close(self) -> None:
        self.reader.close()


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
    if not run.exists():
        raise FileNotFoundError(f"run directory not found: {run}")
    if args.image is not None and not Path(args.image).is_file():
        raise FileNotFoundError(f"no such image: {args.image}")
    try:
        searcher = Searcher.from_run(run, qdrant_url=args.qdrant_url, qdrant_path=args.qdrant_path)
    except (StoreUnavailable, IndexNotFound) as e:
        # e.g. the embedded store is open in a running `tnlbt serve` (one process per folder)
        print(f"tnlbt search: {e}", file=sys.stderr)
        return 2
    try:
        if args.text is not None:
            hits = searcher.search_text(args.text, k=args.k)
            print(format_hits(hits, "photos"))
        else:
            hits = searcher.search_image(Path(args.image), k=args.k)
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
