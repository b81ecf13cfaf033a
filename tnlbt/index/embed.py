"""``tnlbt index``: embed a processed split with Ray Data and load it into the vector store.

Pipeline (Ray Data batch inference, one model per actor, loaded once):

    read_parquet(processed/{split}) ──▶ map_batches(RecipeEmbedder, actor pool) ──▶ recipe vectors + payloads
                                    └─▶ map_batches(PhotoEmbedder,  actor pool) ──▶ one row per photo

Both outputs are also written to ``RUN/index/<version>/embeddings.parquet`` (``id, modality, vector`` plus
``recipe_id``), so other tools (eval, a future server re-load) can reuse them without the model. Then the
vectors go into the store as versioned collections (``recipes__<v>``, ``photos__<v>``), the aliases are
switched, and old versions pruned (see :mod:`tnlbt.index.store`).

The encoders are :class:`tnlbt.inference.Encoder` (one per actor, loaded once), the run layout (where the
checkpoint, ``index.json`` and the embedded store live, local or remote) is :mod:`tnlbt.runs`.

Remote runs and data (``--run`` and ``data.processed_dir`` as ``s3://...``): the checkpoint is only located
here and each actor fetches it into its node's cache; ``index.json`` and the embeddings Parquet are written
through :mod:`tnlbt.storage` next to the run; an embedded store goes to the run's local folder
(:func:`tnlbt.runs.local_run_dir`). Actors get the driver's ``TNLBT_STORAGE_ROUTES`` / ``TNLBT_CACHE_DIR``
through their ``runtime_env`` (:func:`tnlbt.storage.ray_runtime_env`): a process inherits the environment of
whoever started Ray, which is not the driver when Ray was started earlier.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tnlbt import storage
from tnlbt.config import IndexConfig
from tnlbt.data.ingredients import recipe_terms
from tnlbt.inference import Encoder, decode_image
from tnlbt.runs import (
    checkpoint_location,
    default_store_path,
    index_dir,
    read_index_meta,
    record_path,
    run_dir_of,
    write_index_meta,
    write_lineage,
)

log = logging.getLogger(__name__)

INSTRUCTIONS_EXCERPT_CHARS = 300
# Filter payload fields of every recipe and photo point (tnlbt.index.filters), written by every indexer.
_TERMS = ("ingredients_norm", "title_terms")


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
        terms = [recipe_terms(r.get("title") or "", r.get("ingredients") or []) for r in rows]
        return pa.table(
            {
                "id": [r["id"] for r in rows],
                "vector": pa.array(list(vecs), type=pa.list_(pa.float32())),
                "title": [r.get("title") or "" for r in rows],
                "ingredients": [list(r.get("ingredients") or []) for r in rows],
                "instructions": [_excerpt(r.get("instructions") or []) for r in rows],
                "image_ids": [list(r.get("image_ids") or []) for r in rows],
                "split": [r.get("partition") or "" for r in rows],
                **_terms_columns(terms),
            }
        )


def _terms_columns(terms: list[dict[str, list[str]]]) -> dict[str, Any]:
    """The filter fields (:func:`tnlbt.data.ingredients.recipe_terms`) as list<string> columns."""
    import pyarrow as pa

    return {k: pa.array([t[k] for t in terms], pa.list_(pa.string())) for k in _TERMS}


class PhotoEmbedder:
    """Ray Data UDF: processed rows -> one row per photo (``id`` = image id, ``recipe_id``, ``vector``).

    Photos that fail to decode are skipped and counted in the ``skipped`` column of the row's first photo, so
    the driver can report them without a side channel.
    """

    def __init__(self, checkpoint_dir: str, num_threads: int = 1) -> None:
        self.enc = Encoder(checkpoint_dir, num_threads=num_threads)

    def __call__(self, batch):
        import pyarrow as pa

        ids, rids, titles, splits, imgs, terms = [], [], [], [], [], []
        skipped = 0
        for r in batch.to_pylist():
            rterms = recipe_terms(r.get("title") or "", r.get("ingredients") or [])  # photo search filters by recipe
            for iid, data in zip(r.get("image_ids") or [], r.get("images") or [], strict=False):
                try:
                    imgs.append(decode_image(data, self.enc.photo_limits))  # never drafts a stored photo
                except ValueError:
                    skipped += 1
                    continue
                ids.append(iid)
                rids.append(r["id"])
                titles.append(r.get("title") or "")
                splits.append(r.get("partition") or "")
                terms.append(rterms)
        vecs = self.enc.encode_images(imgs)
        return pa.table(
            {
                "id": pa.array(ids, pa.string()),
                "recipe_id": pa.array(rids, pa.string()),
                "vector": pa.array(list(vecs), type=pa.list_(pa.float32())),
                "title": pa.array(titles, pa.string()),
                "split": pa.array(splits, pa.string()),
                **_terms_columns(terms),
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
                "id": pa.concat_arrays([r["id"].combine_chunks().cast(pa.string()), p["id"].combine_chunks()]),
                "modality": pa.array(["recipe"] * n_r + ["image"] * n_p, pa.string()),
                "recipe_id": pa.concat_arrays(
                    [r["id"].combine_chunks().cast(pa.string()), p["recipe_id"].combine_chunks()]
                ),
                "vector": pa.concat_arrays([r["vector"].combine_chunks(), p["vector"].combine_chunks()]),
                "title": pa.concat_arrays([r["title"].combine_chunks().cast(pa.string()), p["title"].combine_chunks()]),
                "ingredients": pa.concat_arrays(
                    [r["ingredients"].combine_chunks().cast(pa.list_(pa.string())), empty_lists]
                ),
                "instructions": pa.concat_arrays(
                    [r["instructions"].combine_chunks().cast(pa.string()), pa.array([""] * n_p, pa.string())]
                ),
                "image_ids": pa.concat_arrays(
                    [r["image_ids"].combine_chunks().cast(pa.list_(pa.string())), empty_lists]
                ),
                "split": pa.concat_arrays([r["split"].combine_chunks().cast(pa.string()), p["split"].combine_chunks()]),
                "skipped": pa.concat_arrays([pa.array([0] * n_r, pa.int64()), p["skipped"].combine_chunks()]),
                **{k: pa.concat_arrays([r[k].combine_chunks(), p[k].combine_chunks()]) for k in _TERMS},
            }
        )


class CatalogEmbedder:
    """Ray Data UDF over clean catalog rows (:func:`tnlbt.data.catalog.read_catalog`): one output row per recipe
    (``modality="recipe"``), per photo that decoded (``"image"``) and per photo that did not (``"skip"``, with
    its ``reason``), so the driver counts every photo without a side channel. Photos are read with the one
    reader (:func:`tnlbt.data.images.read_image_bytes`: inside ``photos_root`` only, links followed, at most
    ``max_photo_bytes``) and decoded by the one decoder at the query path's limits
    (:meth:`tnlbt.inference.Encoder.photo_tensor`)."""

    def __init__(self, checkpoint_dir: str, photos_root: str | None, max_photo_bytes: int, num_threads: int = 1,
                 device: str = "cpu") -> None:
        self.enc = Encoder(checkpoint_dir, device=device, num_threads=num_threads)
        self.root = photos_root
        self.remote = bool(photos_root) and storage.is_remote(photos_root)
        self.real_root = None if not photos_root or self.remote else os.path.realpath(photos_root)
        self.max_bytes = max_photo_bytes

    def _tensor(self, rel: str) -> tuple[Any, str | None]:
        from tnlbt.data.images import ImageResult, read_image_bytes

        if self.root is None:
            return None, "missing_file"
        path = storage.join(self.root, rel) if self.remote else os.path.join(self.real_root or "", rel)
        data = read_image_bytes(path, root=self.real_root, max_bytes=self.max_bytes)
        if isinstance(data, ImageResult):
            return None, data.reason or "unreadable_file"
        try:
            return self.enc.photo_tensor(data), None
        except ValueError as e:  # PhotoError: corrupt, truncated, too_large, unsupported_format
            return None, getattr(e, "reason", "corrupt")

    def __call__(self, batch):
        import pyarrow as pa

        from tnlbt.inference import RecipeText

        rows = batch.to_pylist()
        out: list[dict[str, Any]] = []
        tensors: list[Any] = []
        texts: list[RecipeText] = []
        for r in rows:
            ok: list[str] = []
            for pid, rel in zip(r["photo_ids"], r["photo_paths"], strict=True):
                t, reason = self._tensor(rel)
                row = {"id": pid, "recipe_id": r["id"], "title": r["title"], "path": rel,
                       **{k: r[k] for k in _TERMS}, "metadata": r["metadata"]}
                if t is None:
                    out.append({**row, "modality": "skip", "reason": reason})
                    continue
                tensors.append(t)
                ok.append(pid)
                out.append({**row, "modality": "image", "vec": ("image", len(tensors) - 1)})
            if r["kind"] == "recipe":
                texts.append(RecipeText(r["title"], r["ingredients"], r["instructions"]))
                out.append({"id": r["id"], "recipe_id": r["id"], "modality": "recipe", "title": r["title"],
                            "ingredients": r["ingredients"], "instructions": _excerpt(r["instructions"]),
                            "image_ids": ok, **{k: r[k] for k in _TERMS}, "metadata": r["metadata"],
                            "vec": ("recipe", len(texts) - 1)})
        vecs = {"image": self.enc.encode_tensors(tensors), "recipe": self.enc.encode_texts(texts)}
        strs = pa.list_(pa.string())

        def col(name: str, default: Any = "") -> list[Any]:
            return [o.get(name, default) for o in out]

        return pa.table({
            "id": pa.array(col("id"), pa.string()),
            "modality": pa.array(col("modality"), pa.string()),
            "recipe_id": pa.array(col("recipe_id"), pa.string()),
            "vector": pa.array([vecs[o["vec"][0]][o["vec"][1]].tolist() if "vec" in o else [] for o in out],
                               pa.list_(pa.float32())),
            "title": pa.array(col("title"), pa.string()),
            "ingredients": pa.array(col("ingredients", []), strs),
            "instructions": pa.array(col("instructions"), pa.string()),
            "image_ids": pa.array(col("image_ids", []), strs),
            **{k: pa.array(col(k, []), strs) for k in _TERMS},
            "metadata": pa.array(col("metadata", "{}"), pa.string()),
            "path": pa.array(col("path"), pa.string()),
            "reason": pa.array(col("reason"), pa.string()),
            "split": pa.array(["catalog"] * len(out), pa.string()),
        })


def split_catalog_output(t: Any) -> tuple[Any, Any, Any]:
    """The UDF's table -> ``(recipes, photos, skipped photos)``."""
    import pyarrow.compute as pc

    def rows(m: str) -> Any:
        return t.filter(pc.equal(t["modality"], m))

    recipes = rows("recipe").select(["id", "vector", "title", "ingredients", "instructions", "image_ids", "split",
                                     *_TERMS, "metadata"])
    photos = rows("image").select(["id", "recipe_id", "vector", "title", "split", "path", *_TERMS, "metadata"])
    return recipes, photos, rows("skip").select(["id", "recipe_id", "path", "reason"])


def embed_catalog(
    checkpoint_dir: str | Path,
    tables: Iterable[Any],
    photos_root: str | None,
    index: IndexConfig,
    num_cpus_per_actor: float = 1.0,
) -> tuple[Any, Any, Any]:
    """Embed clean catalog tables on a Ray Data actor pool; returns ``(recipes, photos, skipped)`` (pyarrow).

    The tables go into the object store one by one as they are read (``from_arrow_refs``), so the driver does
    not hold the catalog's text, and actors on any node read them."""
    import pyarrow as pa
    import ray

    refs = [ray.put(t) for t in tables if len(t)]
    if not refs:
        raise ValueError("the catalog has no row to index (see the skipped counts)")
    actors, gpus, map_kw = _pool(index.actors, num_cpus_per_actor, index.device)
    ds = ray.data.from_arrow_refs(refs).map_batches(
        CatalogEmbedder,
        fn_constructor_kwargs={"checkpoint_dir": str(checkpoint_location(checkpoint_dir)), "photos_root": photos_root,
                               "max_photo_bytes": index.max_photo_bytes, "device": "cuda" if gpus else "cpu"},
        num_gpus=1 if gpus else 0,
        compute=ray.data.ActorPoolStrategy(size=actors),
        batch_size=index.batch_size,
        batch_format="pyarrow",
        num_cpus=num_cpus_per_actor,
        **map_kw,
    )
    parts = list(ds.iter_batches(batch_format="pyarrow", batch_size=None))
    return split_catalog_output(pa.concat_tables(parts))


def split_dirs(data_dir: str | Path, split: str) -> list[str]:
    """The split folders holding Parquet files (local paths, or URIs under a remote ``data_dir``)."""
    splits = ["train", "val", "test"] if split == "all" else [split]
    out = []
    for s in splits:
        d = storage.join(data_dir, s) if storage.is_remote(data_dir) else str(storage.as_local(data_dir) / s)
        if storage.list_files(d, "*.parquet"):
            out.append(d)
    if not out:
        raise FileNotFoundError(f"no Parquet files for split {split!r} under {data_dir} (run `tnlbt preprocess`)")
    return out


def _check_device(device: str) -> None:
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device {device!r}: choose auto, cpu or cuda")


def _pool(actors: int, num_cpus_per_actor: float, device: str) -> tuple[int, int, dict[str, Any]]:
    """``(actors, gpus, map_batches kwargs)`` for an embedding actor pool on the cluster as it is now."""
    import ray

    _check_device(device)
    map_kw: dict[str, Any] = {}
    renv = storage.ray_runtime_env()
    if renv:
        map_kw["runtime_env"] = renv
    res = ray.available_resources()
    gpus = int(res.get("GPU", 0))
    if device == "cpu":
        gpus = 0
    elif device == "cuda":
        gpus = max(gpus, 1)
    if actors <= 0:
        # On CPU keep one CPU free for the read tasks: actors holding every CPU starve the reads and the
        # pipeline stalls (the same trap as Train + Data on a 2-core box).
        cpu_actors = int(max(0.0, res.get("CPU", 1) - 1) // max(num_cpus_per_actor, 0.25))
        actors = max(1, min(gpus, 8)) if gpus else max(1, min(4, cpu_actors))
    return actors, gpus, map_kw


def embed_for_index(
    checkpoint_dir: str | Path,
    data_dir: str | Path,
    split: str = "test",
    actors: int = 0,
    batch_size: int = 32,
    num_cpus_per_actor: float = 1.0,
    device: str = "auto",
) -> tuple[Any, Any, int]:
    """Embed a split on a Ray Data actor pool; returns ``(recipes, photos, skipped_photos)`` (pyarrow
    tables).

    A remote checkpoint goes to the actors as its URI (each fetches it into its node's cache); a remote
    ``data_dir`` is read with the :mod:`tnlbt.storage` filesystem (``read_parquet(..., filesystem=)``), which
    pickles into the read tasks.

    ``device``: ``auto`` embeds on GPUs when the cluster has some *now*, ``cuda`` / ``cpu`` decide. On an
    autoscaling cluster that has no GPU node yet, ``cuda`` with ``actors`` > 0 queues GPU actors: demand the
    autoscaler answers by adding GPU nodes (``auto`` would settle for CPUs).
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import ray

    _check_device(device)  # a bad argument fails before anything is looked up
    ckpt = str(checkpoint_location(checkpoint_dir))
    paths = split_dirs(data_dir, split)
    read_kw: dict[str, Any] = {}
    if storage.is_remote(data_dir):
        fs, _ = storage.resolve(data_dir)
        paths = [storage.resolve(p)[1] for p in paths]
        read_kw["filesystem"] = fs
    actors, gpus, map_kw = _pool(actors, num_cpus_per_actor, device)
    from tnlbt.data.schema import COLUMNS

    cols = [c for c in COLUMNS if c != "has_image"]  # everything a payload or an encoder reads
    ds = ray.data.read_parquet(paths, columns=cols, **read_kw).map_batches(
        IndexEmbedder,
        fn_constructor_kwargs={"checkpoint_dir": ckpt, "device": "cuda" if gpus else "cpu"},
        num_gpus=1 if gpus else 0,
        compute=ray.data.ActorPoolStrategy(size=actors),
        batch_size=batch_size,
        batch_format="pyarrow",
        num_cpus=num_cpus_per_actor,
        **map_kw,
    )
    parts = list(ds.iter_batches(batch_format="pyarrow", batch_size=None))
    if not parts:
        raise ValueError(f"split {split!r} under {data_dir} has no rows")
    t = pa.concat_tables(parts)
    skipped = int(pc.sum(t["skipped"]).as_py() or 0)
    is_recipe = pc.equal(t["modality"], "recipe")
    recipes = t.filter(is_recipe).drop_columns(["modality", "recipe_id", "skipped"])
    photos = t.filter(pc.invert(is_recipe)).select(["id", "recipe_id", "vector", "title", "split", *_TERMS])
    return recipes, photos, skipped


def write_embeddings(out_dir: Path | str, recipes: Any, photos: Any) -> Path | str:
    """``embeddings.parquet``: ``id, modality ("recipe"|"image"), recipe_id, vector`` (``out_dir`` may be a
    URI; the file is then one object, visible when complete)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = [
        pa.table(
            {
                "id": recipes["id"],
                "modality": pa.array(["recipe"] * len(recipes), pa.string()),
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
                    "modality": pa.array(["image"] * len(photos), pa.string()),
                    "recipe_id": photos["recipe_id"],
                    "vector": photos["vector"],
                }
            )
        )
    if storage.is_remote(out_dir):
        uri = storage.join(out_dir, "embeddings.parquet")
        fs, inner = storage.resolve(uri)
        pq.write_table(pa.concat_tables(parts), inner, filesystem=fs)
        return uri
    out_dir = storage.as_local(out_dir)
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


# Payload fields, where the table has them (a catalog adds metadata and a photo's path).
RECIPE_PAYLOAD = ["title", "ingredients", "instructions", "image_ids", "split", *_TERMS, "metadata"]
PHOTO_PAYLOAD = ["recipe_id", "title", "split", "path", *_TERMS, "metadata"]


def build_version(store: Any, recipes: Any, photos: Any, version: str, dim: int | None = None) -> dict[str, str]:
    """Build the collections of ``version`` (not published): ``{"recipes": coll, "photos": coll}``. ``dim``
    lets a side without items (a photo-only catalog has no recipes) be an empty collection."""
    from tnlbt.index.store import PHOTOS, RECIPES, build_collection, photo_point_id, recipe_point_id

    built = {}
    rid = recipes["id"].to_pylist()
    rpay = pa_payloads(recipes, RECIPE_PAYLOAD, "recipe_id")
    built[RECIPES] = build_collection(
        store, RECIPES, version, [recipe_point_id(i) for i in rid], _vectors(recipes["vector"]), rpay, dim=dim
    )
    if photos is not None and (len(photos) or dim):
        pid = photos["id"].to_pylist()
        ppay = pa_payloads(photos, PHOTO_PAYLOAD, "image_id")
        built[PHOTOS] = build_collection(
            store, PHOTOS, version, [photo_point_id(i) for i in pid], _vectors(photos["vector"]), ppay, dim=dim
        )
    return built


def load_into_store(
    store: Any, recipes: Any, photos: Any, version: str, keep: int = 2, before_publish: Any = None
) -> dict[str, Any]:
    """Build both collections under ``version``, publish them together, prune old versions (no gate: see
    :func:`index_run` for the gated path). ``before_publish(store, built)``, when given, runs on the complete,
    unpublished collections (the changes log replay, :func:`tnlbt.index.changes.replay_with_encoder`); what it
    returns is ``info["changes"]``."""
    from tnlbt.index.store import PHOTOS, RECIPES, prune, publish

    t0 = time.perf_counter()
    built = build_version(store, recipes, photos, version)
    changes = before_publish(store, built) if before_publish else None
    publish(store, built)
    dropped = prune(store, [RECIPES, PHOTOS], keep)
    return {
        "version": version,
        "collections": built,
        "recipes": len(recipes),
        "photos": len(photos) if PHOTOS in built else 0,
        "dropped": dropped,
        "load_s": round(time.perf_counter() - t0, 3),
        **({"changes": changes} if changes else {}),
    }


def pa_payloads(table: Any, cols: list[str], id_key: str) -> list[dict[str, Any]]:
    data = {c: table[c].to_pylist() for c in cols if c in table.column_names}
    if "metadata" in data:  # a catalog's free metadata travels as JSON text (one Arrow type for any shape)
        data["metadata"] = [json.loads(m) if m else {} for m in data["metadata"]]
    ids = table["id"].to_pylist()
    return [{id_key: ids[i], **{c: v[i] for c, v in data.items()}} for i in range(len(ids))]


def _embedding_versions(run: str | Path) -> list[str]:
    """The ``RUN/index/v*`` folders (one per index version), oldest first."""
    d = index_dir(run)
    if isinstance(d, Path):
        return sorted(p.name for p in d.glob("v*") if p.is_dir())
    return sorted(n for n in storage.listdir(d) if n.startswith("v") and storage.isdir(storage.join(d, n)))


def _remove_embeddings(run: str | Path, versions: Sequence[str]) -> None:
    d = index_dir(run)
    for v in versions:
        if isinstance(d, Path):
            shutil.rmtree(d / v, ignore_errors=True)
            continue
        try:
            storage.remove(storage.join(d, v))
        except OSError as e:  # a left-over prefix costs storage, not correctness
            log.warning("could not remove old embeddings %s: %s", storage.join(d, v), e)


def _prune_embeddings(run: str | Path, keep: int) -> None:
    """Keep the published version's embeddings and the ``keep - 1`` newest older ones (the store's keep-N rule);
    never the live version's, whatever else lies around."""
    live = read_index_meta(run).get("version")
    older = [v for v in _embedding_versions(run) if live is None or v < live]
    _remove_embeddings(run, older[: max(0, len(older) - (max(1, keep) - 1))])


def clean_incomplete(store: Any, run: str | Path) -> list[str]:
    """What a killed ``tnlbt index`` left: collections that no alias points at and embeddings, both newer than
    the version ``index.json`` says is published (all of them when nothing is published yet). A build
    publishes as soon as it is complete, so such a version never was; one ``tnlbt index`` per run at a time."""
    from tnlbt.index.store import PHOTOS, RECIPES

    aliased = set(store.aliases().values())
    # killed between the alias switch and index.json: the aliased version is the published one
    published = [read_index_meta(run).get("version"), *(c.rsplit("__", 1)[-1] for c in aliased)]
    live = max((v for v in published if v), default=None)
    dropped = []
    for name in (RECIPES, PHOTOS):
        for c in store.versions(name):
            if c not in aliased and (live is None or c.rsplit("__", 1)[-1] > live):
                store.drop(c)
                dropped.append(c)
    stale = [v for v in _embedding_versions(run) if live is None or v > live]
    _remove_embeddings(run, stale)
    if dropped or stale:
        log.info("removed an unpublished build: collections %s, embeddings %s", dropped, stale)
    return dropped


def index_run(
    run: str | Path,
    data_dir: str | Path | None = None,
    index: IndexConfig | None = None,
    catalog: str | Path | None = None,
    photos: str | Path | None = None,
    canary: str | Path | None = None,
    force: bool = False,
    loose_photos: bool = True,
) -> dict[str, Any]:
    """Embed ``index.split`` (or a user ``catalog`` with its ``photos`` folder) with the run's checkpoint, gate
    the new version against the live one, publish it and record its lineage. Needs Ray initialised.

    The gate (:mod:`tnlbt.index.gate`): recall on the canary (``canary`` file, else a sample of the new
    version's own pairs) and point counts; a refused version stays unpublished, the live aliases untouched, and
    :class:`~tnlbt.index.gate.GateRefused` carries the comparison (``force`` publishes anyway, noted in the
    lineage).

    The index settings (HNSW, int8) are ``index.store.settings`` over ``TNLBT_INDEX_*`` and the defaults;
    recorded in ``index.json`` so that readers search the index the way it was built for.

    ``run`` and ``data_dir`` may be URIs (module doc): the checkpoint is only located here (the actors fetch
    it), ``config.json`` is read through storage, and an embedded store goes to a local folder.
    """
    from tnlbt.config import Config
    from tnlbt.index import gate
    from tnlbt.index.changes import replay_with_encoder
    from tnlbt.index.store import PHOTOS, RECIPES, choose_kind, new_version, open_store, prune, publish

    index = index or IndexConfig()
    sc = index.store
    store_kind = choose_kind(sc.kind, sc.url)
    ckpt = checkpoint_location(run)
    cfg = Config.from_dict(json.loads(storage.read_text(storage.join(str(ckpt), "config.json"))))
    source = _catalog_source(catalog, photos) if catalog is not None else None
    if canary is not None:
        pairs_file = gate.read_canary(canary)  # a bad canary file fails before anything is embedded
    data_dir = None if source else (data_dir or cfg.data.processed_dir)
    path = None if sc.url else (sc.path or default_store_path(run, store_kind))
    # Open the store first: a server that is down or a local folder locked by a running API fails in
    # seconds, not after the whole split has been embedded.
    store = open_store(store_kind, url=sc.url, path=path, settings=sc.resolved_settings())
    try:
        clean_incomplete(store, run)
        t0 = time.perf_counter()
        counts: dict[str, Any]
        if source is None:
            recipes, photo_t, skipped = embed_for_index(
                ckpt, data_dir, index.split, actors=index.actors, batch_size=index.batch_size, device=index.device
            )
            counts = {"recipes": len(recipes), "photos": len(photo_t), "skipped_photos": skipped}
        else:
            recipes, photo_t, counts = _embed_catalog_source(ckpt, source, cfg, index, loose_photos)
            skipped = counts["photos_skipped"]
        t_embed = time.perf_counter() - t0
        version = new_version()
        vdir = index_dir(run)
        vdir = vdir / version if isinstance(vdir, Path) else storage.join(vdir, version)
        emb_path = write_embeddings(vdir, recipes, photo_t)
        t1 = time.perf_counter()
        built = build_version(store, recipes, photo_t, version, dim=int(cfg.model.embed_dim))
        if canary is not None:
            pairs, canary_src = pairs_file, f"file {canary}"
        else:
            pairs = gate.sample_pairs(recipes["id"].to_pylist(), photo_t["recipe_id"].to_pylist(),
                                      photo_t["id"].to_pylist(), index.gate_canary)
            canary_src = "sample of the indexed pairs"
        expected = {RECIPES: len(recipes), PHOTOS: len(photo_t)}
        counts_check = {n: {"stored": store.count(c), "embedded": expected[n]} for n, c in built.items()}
        # the API's changes since the last build, replayed onto the new version (after the count check: they
        # add and remove points; the gate compares the embedded tables, which they do not touch)
        changes = replay_with_encoder(store, built, run, ckpt)
        live_version, live_emb, live_error = _live_embeddings(store, run)
        verdict = gate.check(gate.Embeddings.from_tables(recipes, photo_t), live_emb, counts_check, pairs,
                             k=index.gate_k, margin=index.gate_margin, min_recall=index.gate_min_recall,
                             canary_source=canary_src, live_version=live_version, live_error=live_error)
        verdict["forced"] = bool(force and not verdict["passed"])
        if not verdict["passed"] and not force:
            _write_json(vdir, "gate.json", verdict)  # why it was refused, next to what was built
            raise gate.GateRefused(verdict)
        publish(store, built)
        dropped = prune(store, [RECIPES, PHOTOS], index.keep)
        load_s = round(time.perf_counter() - t1, 3)
    finally:
        store.close()
    meta = {
        "version": version,
        "collections": built,
        "recipes": len(recipes),
        "photos": len(photo_t) if PHOTOS in built else 0,
        "dropped": dropped,
        "load_s": load_s,
        "store": store_kind,
        "qdrant_url": sc.url,
        "store_path": path,
        "split": "catalog" if source else index.split,
        "data_dir": str(data_dir) if data_dir else None,
        "checkpoint": str(ckpt),
        "embeddings": str(emb_path),
        "skipped_photos": skipped,
        "embed_s": round(t_embed, 3),
        "dim": int(cfg.model.embed_dim),
        "image_root": _image_root(data_dir, cfg) if data_dir else None,
        "photos_root": source["photos"] if source else None,
        "index_settings": store.settings.to_dict(),
        "gate": verdict,
        **({"changes": changes} if changes else {}),
    }
    if source:
        meta["catalog"] = counts
    if path is not None and storage.is_remote(run_dir_of(run)):
        # the store is on this machine only: say which one, for the reader's error message elsewhere
        meta["store_host"] = socket.gethostname()
    meta["lineage"] = _lineage(run, ckpt, meta, source, counts, index)
    write_lineage(run, meta["lineage"])
    # index.json gets the paths in a form any reader can use (runs.record_path); the caller gets them as here
    write_index_meta(run, {**meta, **{k: record_path(run, meta[k]) for k in _RECORDED_PATHS}})
    _prune_embeddings(run, index.keep)
    return meta


def _live_embeddings(store: Any, run: str | Path) -> tuple[str | None, Any, str | None]:
    """``(live version, its embeddings or None, why they could not be read)``: the version the aliases point
    at (read without opening its shards, which a running server may hold) and its ``embeddings.parquet``."""
    from tnlbt.index.gate import Embeddings
    from tnlbt.index.store import RECIPES

    coll = store.aliases().get(RECIPES)
    if coll is None:
        return None, None, None
    version = coll.rsplit("__", 1)[-1]
    d = index_dir(run)
    path = d / version / "embeddings.parquet" if isinstance(d, Path) else storage.join(d, version, "embeddings.parquet")
    try:
        return version, Embeddings.from_parquet(path), None
    except (FileNotFoundError, OSError, ValueError, KeyError) as e:
        return version, None, f"{path}: {e}"


def _write_json(folder: Path | str, name: str, data: dict[str, Any]) -> None:
    text = json.dumps(data, indent=2, sort_keys=True)
    if isinstance(folder, Path):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    else:
        storage.write_text(storage.join(folder, name), text)


def _catalog_source(catalog: str | Path, photos: str | Path | None) -> dict[str, Any]:
    """The catalog file and its photo folder, checked before Ray or a model is touched."""
    from tnlbt.data.catalog import file_sha256

    cat = str(catalog)
    if not (storage.isfile(cat) if storage.is_remote(cat) else Path(cat).is_file()):
        raise FileNotFoundError(f"catalog {cat}: no such file (JSON Lines, one recipe per line)")
    if photos is None:  # photo references are relative to the catalog's own folder
        photos = cat.rsplit("/", 1)[0] if storage.is_remote(cat) else str(Path(cat).resolve().parent)
    ph = str(photos)
    if not storage.is_remote(ph):
        if not Path(ph).is_dir():
            raise FileNotFoundError(f"photos folder {ph}: no such folder")
        ph = str(Path(ph).resolve())
    return {"catalog": cat if storage.is_remote(cat) else str(Path(cat).resolve()), "photos": ph,
            "sha256": file_sha256(cat)}


def _embed_catalog_source(
    ckpt: Path | str, source: dict[str, Any], cfg: Any, index: IndexConfig, loose_photos: bool
) -> tuple[Any, Any, dict[str, Any]]:
    """Read, clean and embed a catalog; the counts add up (``rows == recipes + skipped rows``; every photo
    listed or found is indexed or counted under a reason)."""
    from tnlbt.data.catalog import CatalogLimits, Tally, read_catalog

    limits = CatalogLimits.from_configs(cfg.data, index)
    local_photos = None if storage.is_remote(source["photos"]) else source["photos"]
    stream = _TablesThenReport(read_catalog(source["catalog"], limits, local_photos, loose_photos))
    recipes, photos, skips = embed_catalog(ckpt, stream, source["photos"], index)
    report = stream.report
    if report is None:  # the stream was not read to its end
        raise RuntimeError("catalog: the reader stopped before its report")
    photo_skips = Tally()
    for r in skips.to_pylist():
        photo_skips.add(r["reason"] or "unreadable_file", f"{r['recipe_id'] or '(no recipe)'}: {r['path']}")
    rep = report.to_dict()
    refused = report.photos_refused
    counts = {
        **rep,
        "rows_skipped": report.skipped.total(),
        "photos_indexed": len(photos),
        "photos_recipe": int(sum(1 for r in photos["recipe_id"].to_pylist() if r)),
        "photos_loose": int(sum(1 for r in photos["recipe_id"].to_pylist() if not r)),
        "photos_skipped": photo_skips.total() + refused.total(),
        "photos_unreadable": photo_skips.to_dict(),
    }
    if len(recipes) != report.recipes:  # the pool lost or invented rows: never publish that
        raise RuntimeError(f"catalog: {report.recipes} recipes read but {len(recipes)} embedded")
    return recipes, photos, counts


class _TablesThenReport:
    """Iterates :func:`~tnlbt.data.catalog.read_catalog`'s tables (each goes to the object store as it comes,
    so the driver never holds the catalog) and keeps the report that ends the stream."""

    def __init__(self, it: Any) -> None:
        self.it, self.report = it, None

    def __iter__(self) -> Any:
        from tnlbt.data.catalog import CatalogReport

        for item in self.it:
            if isinstance(item, CatalogReport):
                self.report = item
            else:
                yield item


def _lineage(run: str | Path, ckpt: Path | str, meta: dict[str, Any], source: dict[str, Any] | None,
             counts: dict[str, Any], index: IndexConfig) -> dict[str, Any]:
    """One record of what the new version is: checkpoint (path, sha256 of its weights, the run's metrics),
    source (split or catalog with its sha256) and counts, index settings, gate result, time."""
    from tnlbt.runs import WEIGHTS, content_sha256, run_metrics

    weights = storage.join(str(ckpt), WEIGHTS) if isinstance(ckpt, str) else Path(ckpt) / WEIGHTS
    src: dict[str, Any]
    if source:
        src = {"kind": "catalog", "catalog": source["catalog"], "sha256": source["sha256"], "photos": source["photos"]}
    else:
        src = {"kind": "split", "split": index.split, "data_dir": meta["data_dir"]}
    return {
        "version": meta["version"],
        "published_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        # absolute: the record is read by other processes, from other working directories
        "checkpoint": {"path": str(ckpt) if isinstance(ckpt, str) else str(Path(ckpt).resolve()),
                       "sha256": content_sha256(weights), "metrics": run_metrics(ckpt)},
        "source": src,
        "counts": {"recipes": meta["recipes"], "photos": meta["photos"], "skipped_photos": meta["skipped_photos"],
                   **({"catalog": counts} if source else {})},
        "index_settings": meta["index_settings"],
        "store": meta["store"],
        "gate": meta["gate"],
    }


_RECORDED_PATHS = ("store_path", "data_dir", "checkpoint", "embeddings", "image_root", "photos_root")


def _image_root(data_dir: str | Path, cfg: Any) -> str:
    """The photo tree preprocessing read (``processed/config.json``), else the run config's: photos are served
    from the tree the index was built from, not from wherever the training config pointed."""
    try:
        recorded = json.loads(storage.read_text(storage.join(data_dir, "config.json"))).get("images_dir")
    except (FileNotFoundError, ValueError):
        recorded = None
    return recorded or cfg.data.images_dir


def index_config_from_args(args: argparse.Namespace) -> IndexConfig:
    """``tnlbt index``'s flags as an :class:`IndexConfig` (``--index-setting`` items become store settings)."""
    from tnlbt.config import load_section

    store = {"kind": args.store, "url": args.qdrant_url, "path": args.qdrant_path,
             "settings": list(getattr(args, "index_setting", None) or [])}
    data = {"split": args.split, "keep": args.keep, "actors": getattr(args, "actors", 0) or 0,
            "device": getattr(args, "device", "auto") or "auto", "store": store}
    if getattr(args, "gate_margin", None) is not None:
        data["gate_margin"] = args.gate_margin
    return load_section(IndexConfig, data, [], "index")


def cli_index(args: argparse.Namespace) -> int:
    import sys

    from tnlbt.index.gate import GateRefused, format_report
    from tnlbt.index.store import StoreUnavailable
    from tnlbt.ray_init import ensure_ray

    index = index_config_from_args(args)  # a bad flag fails in one line before Ray starts
    catalog = getattr(args, "catalog", None)
    if catalog is None and getattr(args, "photos", None):
        raise ValueError("--photos goes with --catalog (the folder its photo paths are relative to)")
    ensure_ray()
    try:
        meta = index_run(args.run, data_dir=args.data, index=index, catalog=catalog,
                         photos=getattr(args, "photos", None), canary=getattr(args, "canary", None),
                         force=bool(getattr(args, "force", False)),
                         loose_photos=not getattr(args, "no_loose_photos", False))
    except StoreUnavailable as e:
        # e.g. the local folder is held by a running `tnlbt serve` (qdrant-client local mode: one process)
        print(f"tnlbt index: {e}", file=sys.stderr)
        return 2
    except GateRefused as e:
        print(format_report(e.report), file=sys.stderr)
        print("tnlbt index: the new version is not published; the live index is unchanged (--force publishes "
              "anyway)", file=sys.stderr)
        return 3
    if meta.get("catalog"):
        print(format_catalog_counts(meta["catalog"]))
    print(
        f"indexed {meta['recipes']} recipes and {meta['photos']} photos ({meta['skipped_photos']} photos "
        f"skipped) as version {meta['version']} in {meta['store']} "
        f"({meta['qdrant_url'] or meta['store_path']}); embed {meta['embed_s']}s, load {meta['load_s']}s"
    )
    if meta.get("gate"):
        print(format_report(meta["gate"]) + ("  (forced)" if meta["gate"].get("forced") else ""))
    print(f"embeddings: {meta['embeddings']}")
    if meta.get("store_host"):
        print(
            f"the run is remote but its embedded store is local to this machine ({meta['store_host']}): "
            f"`tnlbt serve --run {args.run}` here finds it; elsewhere index into a Qdrant server (--qdrant-url)"
        )
    return 0


def format_catalog_counts(c: dict[str, Any]) -> str:
    """The catalog's accounting in a few lines: rows read = indexed + skipped (by reason, with examples), and
    where every photo went."""

    def reasons(t: dict[str, Any]) -> str:
        return "; ".join(f"{k} {n} (e.g. {', '.join(t['examples'].get(k, [])[:2]) or '-'})"
                         for k, n in t["counts"].items()) or "none"

    return "\n".join([
        f"catalog: {c['rows']} rows read = {c['recipes']} recipes indexed + {c['rows_skipped']} skipped",
        f"  rows skipped: {reasons(c['skipped'])}",
        f"  rows kept with text cut to the limits: {reasons(c['truncated'])}",
        f"  photos: {c['photos_listed']} named by recipes + {c['loose_photos']} loose in the folder = "
        f"{c['photos_indexed']} indexed ({c['photos_recipe']} with a recipe, {c['photos_loose']} without) + "
        f"{c['photos_skipped']} skipped",
        f"  photos refused by path: {reasons(c['photos_refused'])}",
        f"  photos unreadable: {reasons(c['photos_unreadable'])}",
    ])
