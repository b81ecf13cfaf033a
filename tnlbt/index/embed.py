"""``tnlbt index``: embed a processed split with Ray Data and load it into the vector store.

Pipeline (Ray Data batch inference, one model per actor, loaded once):

    read_parquet(processed/{split}) ──▶ map_batches(RecipeEmbedder, actor pool) ──▶ recipe vectors + payloads
                                    └─▶ map_batches(PhotoEmbedder,  actor pool) ──▶ one row per photo

Both outputs are also written to ``RUN/index/<version>/embeddings.parquet`` (``id, modality, vector`` plus
``recipe_id``), so other tools (eval, a future server re-load) can reuse them without the model. Then the
vectors go into the store as versioned collections (``recipes__<v>``, ``photos__<v>``), the aliases are
switched, and old versions pruned (see :mod:`tnlbt.index.store`).

:class:`Encoder` wraps a checkpoint for inference (recipe text -> vector, PIL image -> vector); the Ray Data
UDFs, the Serve encoder deployments and :class:`tnlbt.index.search.Searcher` all use it, so a query vector is
computed exactly the way the indexed vectors were.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

INSTRUCTIONS_EXCERPT_CHARS = 300
MAX_IMAGE_PIXELS = 40_000_000  # decompression-bomb guard for uploads and stored photos


# -- run layout -----------------------------------------------------------------------------------------
def resolve_checkpoint(run: str | Path) -> Path:
    """A run dir (``RUN/checkpoints/{best,last}``) or a checkpoint dir itself -> the checkpoint dir."""
    run = Path(run)
    if (run / "model.safetensors").exists():
        return run
    for name in ("best", "last"):
        c = run / "checkpoints" / name
        if (c / "model.safetensors").exists():
            return c
    raise FileNotFoundError(f"no checkpoint in {run} (expected {run}/checkpoints/best/model.safetensors)")


def run_dir_of(run: str | Path) -> Path:
    """The run directory for a run or checkpoint path (checkpoint dirs live at RUN/checkpoints/NAME)."""
    run = Path(run)
    if (run / "model.safetensors").exists() and run.parent.name == "checkpoints":
        return run.parent.parent
    return run


def default_store_path(run: str | Path, kind: str) -> str:
    return str(run_dir_of(run) / ("qdrant" if kind == "qdrant" else "edge"))


def write_index_meta(run: str | Path, meta: dict[str, Any]) -> Path:
    p = run_dir_of(run) / "index" / "index.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
    os.replace(tmp, p)
    return p


def read_index_meta(run: str | Path) -> dict[str, Any]:
    p = run_dir_of(run) / "index" / "index.json"
    return json.loads(p.read_text()) if p.exists() else {}


# -- inference wrapper --------------------------------------------------------------------------------------
@dataclass
class RecipeText:
    """A recipe as a person writes it: a title and lines of ingredients and instructions (any may be
    empty)."""

    title: str = ""
    ingredients: Sequence[str] = ()
    instructions: Sequence[str] = ()

    @classmethod
    def from_free_text(cls, text: str) -> RecipeText:
        """One box of text: first line is the title, later lines (or comma parts of a one-liner)
        ingredients."""
        lines = [ln.strip(" -*\t") for ln in text.strip().splitlines() if ln.strip(" -*\t")]
        if not lines:
            return cls()
        if len(lines) == 1:
            parts = [p.strip() for p in lines[0].split(",") if p.strip()]
            return cls(title=lines[0], ingredients=parts if len(parts) > 1 else [lines[0]])
        return cls(title=lines[0], ingredients=lines[1:])

    def is_empty(self) -> bool:
        return not (
            self.title.strip()
            or any(s.strip() for s in self.ingredients)
            or any(s.strip() for s in self.instructions)
        )


def decode_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS):
    """JPEG/PNG/... bytes -> RGB PIL image; ``ValueError`` for anything that is not a decodable image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise ValueError(f"image too large: {w}x{h} pixels (limit {max_pixels})")
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError) as e:
        raise ValueError(f"not a decodable image: {e}") from e


class Encoder:
    """A checkpoint ready for inference: ``encode_texts``, ``encode_rows`` (tokenised Parquet rows) and
    ``encode_images``; all return L2-normalised float32 ``(B, D)`` arrays."""

    def __init__(self, checkpoint_dir: str | Path, device: str = "cpu", num_threads: int = 0) -> None:
        import torch

        from tnlbt.models import load_model

        if num_threads > 0:
            torch.set_num_threads(num_threads)
        self.checkpoint_dir = resolve_checkpoint(checkpoint_dir)
        out = load_model(str(self.checkpoint_dir))
        self.model, self.cfg = out[0], out[1]
        self.device = torch.device(device)
        self.model.to(self.device).eval()
        ingr_path = self.checkpoint_dir / "ingredients.json"
        if len(out) > 3:
            self.n_ingredients = len(out[3])
        else:
            self.n_ingredients = len(json.loads(ingr_path.read_text())["names"]) if ingr_path.exists() else 0
        from tnlbt.data.vocab import Vocab

        self.vocab = Vocab.load(str(self.checkpoint_dir / "vocab.json"))
        self.transform = self.model.image_transform(train=False)
        self.dim = int(self.cfg.model.embed_dim)

    def _rows_from_texts(self, texts: Sequence[RecipeText]) -> list[dict[str, Any]]:
        from tnlbt.data.preprocess import encode_recipe_text

        rows = []
        for t in texts:
            ing = [s for s in t.ingredients if s.strip()]
            ins = [s for s in t.instructions if s.strip()]
            enc = encode_recipe_text(self.vocab, self.cfg.data, t.title, ing, ins)
            rows.append({**enc, "ingredient_labels": [], "has_image": False, "image_ids": [], "images": []})
        return rows

    def encode_rows(self, rows: Sequence[dict[str, Any]]) -> np.ndarray:
        """Tokenised rows (Parquet columns ``title_ids, ingredient_ids, instruction_ids``) -> (B, D)."""
        import torch

        from tnlbt.data.collate import collate

        if not rows:
            return np.zeros((0, self.dim), np.float32)
        clean = [
            {
                **r,
                "has_image": False,
                "images": [],
                "image_ids": [],
                "ingredient_labels": list(r.get("ingredient_labels") or []),
            }
            for r in rows
        ]
        batch = collate(clean, n_ingredients=self.n_ingredients, image_transform=None, with_images=False)
        batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        with torch.inference_mode():
            out = self.model.encode_recipe(batch, normalize=True)
        return out.float().cpu().numpy()

    def encode_texts(self, texts: Sequence[RecipeText]) -> np.ndarray:
        return self.encode_rows(self._rows_from_texts(texts))

    def encode_images(self, images: Sequence[Any]) -> np.ndarray:
        """PIL images (RGB) -> (B, D)."""
        import torch

        if not images:
            return np.zeros((0, self.dim), np.float32)
        x = torch.stack([self.transform(im) for im in images]).to(self.device)
        with torch.inference_mode():
            out = self.model.encode_image(x, normalize=True)
        return out.float().cpu().numpy()


# -- Ray Data UDFs (callable classes: the model loads once per actor)
# -----------------------------------------
def _excerpt(lines: Sequence[str], n: int = INSTRUCTIONS_EXCERPT_CHARS) -> str:
    text = " ".join(s.strip() for s in lines if s and s.strip())
    return text if len(text) <= n else text[: n - 1].rsplit(" ", 1)[0] + "…"


class RecipeEmbedder:
    """Ray Data UDF: processed rows -> ``id, vector`` plus display payload columns."""

    def __init__(self, checkpoint_dir: str, num_threads: int = 1) -> None:
        self.enc = Encoder(checkpoint_dir, num_threads=num_threads)

    def __call__(self, batch):
        import pyarrow as pa

        rows = batch.to_pylist()
        vecs = self.enc.encode_rows(rows)
        return pa.table(
            {
                "id": [r["id"] for r in rows],
                "vector": pa.array(list(vecs), type=pa.list_(pa.float32())),
                "title": [r.get("title") or "" for r in rows],
                "ingredients": [list(r.get("ingredients") or []) for r in rows],
                "instructions": [_excerpt(r.get("instructions") or []) for r in rows],
                "image_ids": [list(r.get("image_ids") or []) for r in rows],
                "split": [r.get("partition") or "" for r in rows],
            }
        )


class PhotoEmbedder:
    """Ray Data UDF: processed rows -> one row per photo (``id`` = image id, ``recipe_id``, ``vector``).

    Photos that fail to decode are skipped and counted in the ``skipped`` column of the row's first photo, so
    the driver can report them without a side channel.
    """

    def __init__(self, checkpoint_dir: str, num_threads: int = 1) -> None:
        self.enc = Encoder(checkpoint_dir, num_threads=num_threads)

    def __call__(self, batch):
        import pyarrow as pa

        ids, rids, titles, splits, imgs = [], [], [], [], []
        skipped = 0
        for r in batch.to_pylist():
            for iid, data in zip(r.get("image_ids") or [], r.get("images") or [], strict=False):
                try:
                    imgs.append(decode_image(data))
                except ValueError:
                    skipped += 1
                    continue
                ids.append(iid)
                rids.append(r["id"])
                titles.append(r.get("title") or "")
                splits.append(r.get("partition") or "")
        vecs = self.enc.encode_images(imgs)
        return pa.table(
            {
                "id": pa.array(ids, pa.string()),
                "recipe_id": pa.array(rids, pa.string()),
                "vector": pa.array(list(vecs), type=pa.list_(pa.float32())),
                "title": pa.array(titles, pa.string()),
                "split": pa.array(splits, pa.string()),
                # the batch's skip count rides on its first photo (0 elsewhere); lost only if no photo decoded
                "skipped": pa.array([skipped] + [0] * (len(ids) - 1) if ids else [], pa.int64()),
            }
        )


class IndexEmbedder:
    """Ray Data UDF doing both passes over one batch with one model per actor: the output has one row per
    recipe (``modality="recipe"``) and one per photo (``modality="image"``) in a single schema, so the split
    is read once and each actor loads the checkpoint once."""

    def __init__(self, checkpoint_dir: str, num_threads: int = 1, device: str = "cpu") -> None:
        self.recipes = RecipeEmbedder.__new__(RecipeEmbedder)
        self.photos = PhotoEmbedder.__new__(PhotoEmbedder)
        self.recipes.enc = self.photos.enc = Encoder(checkpoint_dir, device=device, num_threads=num_threads)

    def __call__(self, batch):
        import pyarrow as pa

        r = self.recipes(batch.drop_columns(["images"]))
        p = self.photos(batch)
        n_r, n_p = len(r), len(p)
        empty_lists = pa.array([[]] * n_p, pa.list_(pa.string()))
        return pa.table(
            {
                "id": pa.concat_arrays(
                    [r["id"].combine_chunks().cast(pa.string()), p["id"].combine_chunks()]
                ),
                "modality": pa.array(["recipe"] * n_r + ["image"] * n_p, pa.string()),
                "recipe_id": pa.concat_arrays(
                    [r["id"].combine_chunks().cast(pa.string()), p["recipe_id"].combine_chunks()]
                ),
                "vector": pa.concat_arrays([r["vector"].combine_chunks(), p["vector"].combine_chunks()]),
                "title": pa.concat_arrays(
                    [r["title"].combine_chunks().cast(pa.string()), p["title"].combine_chunks()]
                ),
                "ingredients": pa.concat_arrays(
                    [r["ingredients"].combine_chunks().cast(pa.list_(pa.string())), empty_lists]
                ),
                "instructions": pa.concat_arrays(
                    [r["instructions"].combine_chunks().cast(pa.string()), pa.array([""] * n_p, pa.string())]
                ),
                "image_ids": pa.concat_arrays(
                    [r["image_ids"].combine_chunks().cast(pa.list_(pa.string())), empty_lists]
                ),
                "split": pa.concat_arrays(
                    [r["split"].combine_chunks().cast(pa.string()), p["split"].combine_chunks()]
                ),
                "skipped": pa.concat_arrays([pa.array([0] * n_r, pa.int64()), p["skipped"].combine_chunks()]),
            }
        )


def split_dirs(data_dir: str | Path, split: str) -> list[str]:
    splits = ["train", "val", "test"] if split == "all" else [split]
    out = []
    for s in splits:
        d = Path(data_dir) / s
        if d.is_dir() and any(d.glob("*.parquet")):
            out.append(str(d))
    if not out:
        raise FileNotFoundError(
            f"no Parquet files for split {split!r} under {data_dir} (run `tnlbt preprocess`)"
        )
    return out


def embed_split(
    checkpoint_dir: str | Path,
    data_dir: str | Path,
    split: str = "test",
    actors: int = 0,
    batch_size: int = 32,
    num_cpus_per_actor: float = 1.0,
) -> tuple[Any, Any, int]:
    """Embed a split on a Ray Data actor pool; returns ``(recipes, photos, skipped_photos)`` (pyarrow
    tables)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import ray

    ckpt = str(resolve_checkpoint(checkpoint_dir))
    paths = split_dirs(data_dir, split)
    res = ray.available_resources()
    gpus = int(res.get("GPU", 0))
    if actors <= 0:
        # On CPU keep one CPU free for the Parquet read tasks: actors holding every CPU starve the reads and
        # the pipeline stalls (the same trap as Train + Data on a 2-core box).
        cpu_actors = int(max(0.0, res.get("CPU", 1) - 1) // max(num_cpus_per_actor, 0.25))
        actors = max(1, min(gpus, 8)) if gpus else max(1, min(4, cpu_actors))
    cols = [
        "id",
        "partition",
        "title_ids",
        "ingredient_ids",
        "instruction_ids",
        "ingredient_labels",
        "title",
        "ingredients",
        "instructions",
        "image_ids",
        "images",
    ]
    ds = ray.data.read_parquet(paths, columns=cols).map_batches(
        IndexEmbedder,
        fn_constructor_kwargs={"checkpoint_dir": ckpt, "device": "cuda" if gpus else "cpu"},
        num_gpus=1 if gpus else 0,
        compute=ray.data.ActorPoolStrategy(size=actors),
        batch_size=batch_size,
        batch_format="pyarrow",
        num_cpus=num_cpus_per_actor,
    )
    parts = list(ds.iter_batches(batch_format="pyarrow", batch_size=None))
    if not parts:
        raise ValueError(f"split {split!r} under {data_dir} has no rows")
    t = pa.concat_tables(parts)
    skipped = int(pc.sum(t["skipped"]).as_py() or 0)
    is_recipe = pc.equal(t["modality"], "recipe")
    recipes = t.filter(is_recipe).drop_columns(["modality", "recipe_id", "skipped"])
    photos = t.filter(pc.invert(is_recipe)).select(["id", "recipe_id", "vector", "title", "split"])
    return recipes, photos, skipped


def write_embeddings(out_dir: Path, recipes: Any, photos: Any) -> Path:
    """``embeddings.parquet``: ``id, modality ("recipe"|"image"), recipe_id, vector``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = [
        pa.table(
            {
                "id": recipes["id"],
                "modality": pa.array(["recipe"] * len(recipes)),
                "recipe_id": recipes["id"],
                "vector": recipes["vector"],
            }
        )
    ]
    if photos is not None and len(photos):
        parts.append(
            pa.table(
                {
                    "id": photos["id"],
                    "modality": pa.array(["image"] * len(photos)),
                    "recipe_id": photos["recipe_id"],
                    "vector": photos["vector"],
                }
            )
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    p = out_dir / "embeddings.parquet"
    pq.write_table(pa.concat_tables(parts), p)
    return p


def _vectors(col: Any) -> np.ndarray:
    """list<float32> column -> (N, D) float32 without a Python loop."""
    import pyarrow as pa

    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if len(col) == 0:
        return np.zeros((0, 0), np.float32)
    flat = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return flat.reshape(len(col), -1)


def load_into_store(store: Any, recipes: Any, photos: Any, version: str, keep: int = 2) -> dict[str, Any]:
    """Build both collections under ``version``, publish them together, prune old versions."""
    from tnlbt.index.store import (
        PHOTOS,
        RECIPES,
        build_collection,
        photo_point_id,
        prune,
        publish,
        recipe_point_id,
    )

    t0 = time.perf_counter()
    built = {}
    rid = recipes["id"].to_pylist()
    rpay = pa_payloads(recipes, ["title", "ingredients", "instructions", "image_ids", "split"], "recipe_id")
    built[RECIPES] = build_collection(
        store, RECIPES, version, [recipe_point_id(i) for i in rid], _vectors(recipes["vector"]), rpay
    )
    n_photos = 0
    if photos is not None and len(photos):
        pid = photos["id"].to_pylist()
        ppay = pa_payloads(photos, ["recipe_id", "title", "split"], "image_id")
        built[PHOTOS] = build_collection(
            store, PHOTOS, version, [photo_point_id(i) for i in pid], _vectors(photos["vector"]), ppay
        )
        n_photos = len(pid)
    publish(store, built)
    dropped = prune(store, [RECIPES, PHOTOS], keep)
    return {
        "version": version,
        "collections": built,
        "recipes": len(rid),
        "photos": n_photos,
        "dropped": dropped,
        "load_s": round(time.perf_counter() - t0, 3),
    }


def pa_payloads(table: Any, cols: list[str], id_key: str) -> list[dict[str, Any]]:
    data = {c: table[c].to_pylist() for c in cols if c in table.column_names}
    ids = table["id"].to_pylist()
    return [{id_key: ids[i], **{c: v[i] for c, v in data.items()}} for i in range(len(ids))]


def index_run(
    run: str | Path,
    data_dir: str | Path | None = None,
    split: str = "test",
    store_kind: str = "auto",
    qdrant_url: str | None = None,
    qdrant_path: str | None = None,
    keep: int = 2,
    actors: int = 0,
) -> dict[str, Any]:
    """Embed ``split`` with the run's checkpoint and publish a new index version. Needs Ray initialised."""
    from tnlbt.config import Config
    from tnlbt.index.store import choose_kind, new_version, open_store

    store_kind = choose_kind(store_kind, qdrant_url)
    ckpt = resolve_checkpoint(run)
    cfg = Config.from_dict(json.loads((ckpt / "config.json").read_text()))
    data_dir = data_dir or cfg.data.processed_dir
    path = None if qdrant_url else (qdrant_path or default_store_path(run, store_kind))
    # Open the store first: a server that is down or a local folder locked by a running API fails in
    # seconds, not after the whole split has been embedded.
    store = open_store(store_kind, url=qdrant_url, path=path)
    try:
        t0 = time.perf_counter()
        recipes, photos, skipped = embed_split(ckpt, data_dir, split, actors=actors)
        t_embed = time.perf_counter() - t0
        version = new_version()
        emb_path = write_embeddings(run_dir_of(run) / "index" / version, recipes, photos)
        info = load_into_store(store, recipes, photos, version, keep=keep)
    finally:
        store.close()
    # the embeddings Parquet of versions the store no longer keeps goes too (same keep-N rule)
    old = sorted(p for p in (run_dir_of(run) / "index").glob("v*") if p.is_dir())[: -max(1, keep)]
    for p in old:
        shutil.rmtree(p, ignore_errors=True)
    meta = {
        **info,
        "store": store_kind,
        "qdrant_url": qdrant_url,
        "store_path": path,
        "split": split,
        "data_dir": str(data_dir),
        "checkpoint": str(ckpt),
        "embeddings": str(emb_path),
        "skipped_photos": skipped,
        "embed_s": round(t_embed, 3),
        "dim": int(cfg.model.embed_dim),
        "image_root": cfg.data.images_dir,
    }
    write_index_meta(run, meta)
    return meta


def cli_index(args: argparse.Namespace) -> int:
    import sys

    import ray

    from tnlbt.index.store import StoreUnavailable

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    try:
        meta = index_run(
            args.run,
            data_dir=args.data,
            split=args.split,
            store_kind=args.store,
            qdrant_url=args.qdrant_url,
            qdrant_path=args.qdrant_path,
            keep=args.keep,
        )
    except StoreUnavailable as e:
        # e.g. the local folder is held by a running `tnlbt serve` (qdrant-client local mode: one process)
        print(f"tnlbt index: {e}", file=sys.stderr)
        return 2
    print(
        f"indexed {meta['recipes']} recipes and {meta['photos']} photos ({meta['skipped_photos']} photos "
        f"skipped) as version {meta['version']} in {meta['store']} "
        f"({meta['qdrant_url'] or meta['store_path']}); embed {meta['embed_s']}s, load {meta['load_s']}s"
    )
    print(f"embeddings: {meta['embeddings']}")
    return 0
