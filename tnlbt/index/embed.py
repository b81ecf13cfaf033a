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

Remote runs and data (``s3://``, ``gs://``, any :mod:`tnlbt.storage` URI)
-------------------------------------------------------------------------
``--run`` and ``data.processed_dir`` may be URIs. What lives where:

* **Checkpoint** -- read where it is. :func:`checkpoint_location` finds it without downloading anything (the
  driver of ``tnlbt index`` and the Serve app builder only pass the *URI* on); each process that builds an
  :class:`Encoder` (a Ray Data actor, a Serve replica, possibly on another node) calls
  :func:`fetch_checkpoint`, which copies the four model files into a per-machine cache
  ``<cache>/checkpoints/<name>-<hash(uri)>/<hash(size+mtime of each file)>/``. Why a persistent cache and not
  a temp dir: several actors or replicas on one node, and every replica restart, would each download the
  weights again; keyed by size and mtime, a new ``best`` checkpoint written to the same URI gets a new folder
  instead of silently serving stale weights. A file lock makes one process per machine download while the
  others wait; the folder appears by an atomic rename, so a crash never leaves a half-copied checkpoint that
  looks complete. Only ``model.safetensors, config.json, vocab.json, ingredients.json`` are copied:
  ``train_state.pt`` (optimiser and GAN state, 2-3x the weights) is useless for inference. The newest two
  versions per URI are kept.
* **Index metadata and embeddings** -- ``RUN/index/index.json`` and ``RUN/index/<version>/embeddings.parquet``
  are written through :mod:`tnlbt.storage` next to the run (one object PUT each: visible whole or not at all).
* **Embedded vector store** -- qdrant-client local mode and qdrant-edge are folders with file locks, mmaps and
  renames: they cannot live on an object store. For a remote run the default store folder is therefore local,
  ``<cache>/runs/<name>-<hash(run uri)>/{edge,qdrant}`` (:func:`local_run_dir`), a pure function of the run URI,
  so ``tnlbt index --run s3://b/r`` followed by ``tnlbt serve --run s3://b/r`` on the same machine meet in the
  same folder (``index.json`` also records it as ``store_path``, with ``store_host``). On another machine
  there is no such folder and the reader says so (:class:`~tnlbt.index.store.IndexNotFound` naming the host
  that built it); use ``--qdrant-url`` (a Qdrant server) for multi-machine serving. ``--qdrant-path`` must be
  a local folder.
* ``<cache>`` is ``$TNLBT_CACHE_DIR``, else ``$XDG_CACHE_HOME/tnlbt``, else ``~/.cache/tnlbt``
  (:func:`cache_dir`).

Local paths behave exactly as before: nothing is copied, the store defaults to ``RUN/edge`` / ``RUN/qdrant``,
and the functions that returned a :class:`~pathlib.Path` still do (a remote location is returned as the URI
``str``).

Ray workers and Serve replicas get ``TNLBT_STORAGE_ROUTES`` and ``TNLBT_CACHE_DIR`` from the driver through
their ``runtime_env`` (:func:`worker_runtime_env`): a process inherits the environment of whoever started Ray,
which is not the driver when Ray was started earlier (``ray start``, a test session, a notebook).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import os
import posixpath
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tnlbt import storage

log = logging.getLogger(__name__)

INSTRUCTIONS_EXCERPT_CHARS = 300
MAX_IMAGE_PIXELS = 40_000_000  # decompression-bomb guard for uploads and stored photos
# What inference needs from a checkpoint (tnlbt.models.io); train_state.pt is deliberately not fetched.
CHECKPOINT_FILES = ("model.safetensors", "config.json", "vocab.json", "ingredients.json")
WEIGHTS = CHECKPOINT_FILES[0]
CHECKPOINT_VERSIONS_KEPT = 2


# -- run layout -----------------------------------------------------------------------------------------
def _is_remote(p: str | Path) -> bool:
    return storage.is_remote(os.fspath(p))


def _uri(p: str | Path) -> str:
    """A remote location as a normalised URI string (no trailing slash)."""
    s = os.fspath(p)
    return s.rstrip("/") if not s.endswith("://") else s


cache_dir = storage.cache_dir  # per-machine cache for the local side of remote runs


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def _cache_name(uri: str) -> str:
    """``<last path part>-<hash of the URI>``: readable in ``ls`` and unique per URI."""
    name = posixpath.basename(uri.rstrip("/")) or "root"
    return f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)[:48]}-{_digest(uri)}"


def worker_runtime_env() -> dict[str, Any] | None:
    """:func:`tnlbt.storage.ray_runtime_env` for Ray actors and Serve replicas, ``None`` when empty (a local run
    schedules exactly as before). Ray merges ``env_vars`` with the job's and the Serve application's own
    runtime_env. Cloud credentials are never forwarded: each node uses its own."""
    return storage.ray_runtime_env() or None


def _local_checkpoint(run: str | Path) -> Path:
    run = storage.as_local(run)
    if (run / WEIGHTS).exists():
        return run
    for name in ("best", "last"):
        c = run / "checkpoints" / name
        if (c / WEIGHTS).exists():
            return c
    raise FileNotFoundError(f"no checkpoint in {run} (expected {run}/checkpoints/best/model.safetensors)")


def checkpoint_location(run: str | Path) -> Path | str:
    """Where the checkpoint of a run (``RUN/checkpoints/{best,last}``) or checkpoint dir is, without
    downloading it: a local Path, or the checkpoint's URI for a remote run."""
    if not _is_remote(run):
        return _local_checkpoint(run)
    uri = _uri(run)
    candidates = [uri] + [storage.join(uri, "checkpoints", n) for n in ("best", "last")]
    for c in candidates:
        if storage.exists(storage.join(c, WEIGHTS)):
            return c
    raise FileNotFoundError(
        f"no checkpoint in {uri} (expected {uri}/checkpoints/best/model.safetensors, .../last/..., or "
        f"{uri}/model.safetensors; train first, or check the URI and the credentials)"
    )


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes of one machine (flock); a no-op where fcntl does not exist."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: the atomic rename alone keeps the cache consistent
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def fetch_checkpoint(uri: str) -> Path:
    """A remote checkpoint dir -> a local copy of its model files in :func:`cache_dir` (see module doc).

    Cheap when cached: one metadata request for the four files, no download.
    """
    import pyarrow.fs as pafs

    uri = _uri(uri)
    fs, base = storage.resolve(uri)
    paths = [posixpath.join(base, n) for n in CHECKPOINT_FILES]
    infos = fs.get_file_info(paths)
    missing = [n for n, i in zip(CHECKPOINT_FILES, infos, strict=True) if i.type != pafs.FileType.File]
    if missing:
        raise FileNotFoundError(f"{uri} is not a model checkpoint: missing {', '.join(missing)}")
    home = cache_dir() / "checkpoints" / _cache_name(uri)
    target = home / _digest(*(f"{n}:{i.size}:{i.mtime_ns}" for n, i in zip(CHECKPOINT_FILES, infos, strict=True)))
    if target.is_dir():
        return target
    home.mkdir(parents=True, exist_ok=True)
    with _file_lock(home / ".lock"):
        if target.is_dir():  # another process of this machine fetched it while we waited
            return target
        # Under the lock any other partial folder is left over from a crashed download.
        for stale in home.glob(".partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
        partial = home / f".partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        partial.mkdir()
        t0 = time.perf_counter()
        try:
            for name, path in zip(CHECKPOINT_FILES, paths, strict=True):
                with fs.open_input_stream(path) as src, open(partial / name, "wb") as dst:
                    shutil.copyfileobj(src, dst, 8 * 1024 * 1024)
            os.rename(partial, target)  # atomic: the folder exists only complete
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        log.info("fetched checkpoint %s -> %s in %.1fs", uri, target, time.perf_counter() - t0)
        versions = sorted(
            (p for p in home.iterdir() if p.is_dir() and not p.name.startswith(".") and p != target),
            key=lambda p: p.stat().st_mtime,
        )
        for old in versions[: max(0, len(versions) - (CHECKPOINT_VERSIONS_KEPT - 1))]:
            shutil.rmtree(old, ignore_errors=True)
    return target


def resolve_checkpoint(run: str | Path) -> Path:
    """A run dir (``RUN/checkpoints/{best,last}``) or a checkpoint dir itself -> the *local* checkpoint dir;
    a remote one is fetched into the cache first (:func:`fetch_checkpoint`)."""
    loc = checkpoint_location(run)
    return loc if isinstance(loc, Path) else fetch_checkpoint(loc)


def run_dir_of(run: str | Path) -> Path | str:
    """The run directory for a run or checkpoint path (checkpoint dirs live at RUN/checkpoints/NAME): a Path
    for a local run, the URI for a remote one."""
    if _is_remote(run):
        uri = _uri(run)
        parent = posixpath.dirname(uri)
        if posixpath.basename(parent) == "checkpoints" and storage.exists(storage.join(uri, WEIGHTS)):
            return posixpath.dirname(parent)
        return uri
    run = storage.as_local(run)
    if (run / WEIGHTS).exists() and run.parent.name == "checkpoints":
        return run.parent.parent
    return run


def local_run_dir(run: str | Path) -> Path:
    """The local folder that holds a run's machine-local state (embedded store, UI examples): the run dir
    itself for a local run, ``<cache>/runs/<name>-<hash(uri)>`` for a remote one."""
    rd = run_dir_of(run)
    return rd if isinstance(rd, Path) else cache_dir() / "runs" / _cache_name(rd)


def default_store_path(run: str | Path, kind: str) -> str:
    """``RUN/qdrant`` or ``RUN/edge`` for a local run; the same names under :func:`local_run_dir` for a remote
    one (an embedded store is a local folder; see the module doc)."""
    return str(local_run_dir(run) / ("qdrant" if kind == "qdrant" else "edge"))


def index_dir(run: str | Path) -> Path | str:
    rd = run_dir_of(run)
    return rd / "index" if isinstance(rd, Path) else storage.join(rd, "index")


def write_index_meta(run: str | Path, meta: dict[str, Any]) -> Path | str:
    d = index_dir(run)
    text = json.dumps(meta, indent=2, sort_keys=True)
    if not isinstance(d, Path):
        uri = storage.join(d, "index.json")
        storage.write_text(uri, text)  # one PUT: readers see the old or the new object, never a mix
        return uri
    p = d / "index.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, p)
    return p


def read_index_meta(run: str | Path) -> dict[str, Any]:
    d = index_dir(run)
    if not isinstance(d, Path):
        try:
            return json.loads(storage.read_text(storage.join(d, "index.json")))
        except FileNotFoundError:
            return {}
    p = d / "index.json"
    return json.loads(p.read_text()) if p.exists() else {}


def index_checkpoint(run: str | Path, meta: dict[str, Any]) -> Path | str:
    """The checkpoint an index was built with (``meta["checkpoint"]``), located with
    :func:`checkpoint_location`; the run's own checkpoint when that one is not reachable here (an index built
    from a local copy of a run that was then uploaded, or a path relative to another working directory)."""
    recorded = meta.get("checkpoint")
    if recorded:
        try:
            return checkpoint_location(recorded)
        except FileNotFoundError:
            log.warning("checkpoint %s recorded in index.json is not reachable; using %s's", recorded, run)
    return checkpoint_location(run)


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
            self.title.strip() or any(s.strip() for s in self.ingredients) or any(s.strip() for s in self.instructions)
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
            }
        )


def split_dirs(data_dir: str | Path, split: str) -> list[str]:
    """The split folders holding Parquet files (local paths, or URIs under a remote ``data_dir``)."""
    splits = ["train", "val", "test"] if split == "all" else [split]
    out = []
    for s in splits:
        d = storage.join(_uri(data_dir), s) if _is_remote(data_dir) else str(storage.as_local(data_dir) / s)
        if storage.list_files(d, "*.parquet"):
            out.append(d)
    if not out:
        raise FileNotFoundError(f"no Parquet files for split {split!r} under {data_dir} (run `tnlbt preprocess`)")
    return out


def embed_split(
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

    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device {device!r}: choose auto, cpu or cuda")
    ckpt = str(checkpoint_location(checkpoint_dir))
    paths = split_dirs(data_dir, split)
    read_kw: dict[str, Any] = {}
    if _is_remote(data_dir):
        fs, _ = storage.resolve(_uri(data_dir))
        paths = [storage.resolve(p)[1] for p in paths]
        read_kw["filesystem"] = fs
    map_kw: dict[str, Any] = {}
    renv = worker_runtime_env()
    if renv:
        map_kw["runtime_env"] = renv
    res = ray.available_resources()
    gpus = int(res.get("GPU", 0))
    if device == "cpu":
        gpus = 0
    elif device == "cuda":
        gpus = max(gpus, 1)
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
    photos = t.filter(pc.invert(is_recipe)).select(["id", "recipe_id", "vector", "title", "split"])
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
    if _is_remote(out_dir):
        uri = storage.join(_uri(out_dir), "embeddings.parquet")
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


def _prune_embeddings(run: str | Path, keep: int) -> None:
    """Drop the ``RUN/index/v*`` embeddings of versions the store no longer keeps (same keep-N rule)."""
    d = index_dir(run)
    if isinstance(d, Path):
        old = sorted(p for p in d.glob("v*") if p.is_dir())[: -max(1, keep)]
        for p in old:
            shutil.rmtree(p, ignore_errors=True)
        return
    names = sorted(n for n in storage.listdir(d) if n.startswith("v") and storage.isdir(storage.join(d, n)))
    for n in names[: -max(1, keep)]:
        try:
            storage.remove(storage.join(d, n))
        except OSError as e:  # a left-over prefix costs storage, not correctness
            log.warning("could not remove old embeddings %s: %s", storage.join(d, n), e)


def index_run(
    run: str | Path,
    data_dir: str | Path | None = None,
    split: str = "test",
    store_kind: str = "auto",
    qdrant_url: str | None = None,
    qdrant_path: str | None = None,
    keep: int = 2,
    actors: int = 0,
    settings: Any = None,
    device: str = "auto",
) -> dict[str, Any]:
    """Embed ``split`` with the run's checkpoint and publish a new index version. Needs Ray initialised.

    ``settings``: :class:`tnlbt.index.store.IndexSettings` (HNSW, int8), default ``TNLBT_INDEX_*`` over the
    defaults; recorded in ``index.json`` so that readers search the index the way it was built for.

    ``run`` and ``data_dir`` may be URIs (module doc): the checkpoint is only located here (the actors fetch
    it), ``config.json`` is read through storage, and an embedded store goes to a local folder.
    """
    from tnlbt.config import Config
    from tnlbt.index.store import choose_kind, new_version, open_store

    store_kind = choose_kind(store_kind, qdrant_url)
    if qdrant_path and not qdrant_url and _is_remote(qdrant_path):
        raise ValueError(
            f"--qdrant-path {qdrant_path}: the embedded store is a local folder (file locks, mmaps); give a "
            "local path, or use a Qdrant server with --qdrant-url"
        )
    ckpt = checkpoint_location(run)
    cfg = Config.from_dict(json.loads(storage.read_text(storage.join(str(ckpt), "config.json"))))
    data_dir = data_dir or cfg.data.processed_dir
    path = None if qdrant_url else (qdrant_path or default_store_path(run, store_kind))
    # Open the store first: a server that is down or a local folder locked by a running API fails in
    # seconds, not after the whole split has been embedded.
    store = open_store(store_kind, url=qdrant_url, path=path, settings=settings)
    try:
        t0 = time.perf_counter()
        recipes, photos, skipped = embed_split(ckpt, data_dir, split, actors=actors, device=device)
        t_embed = time.perf_counter() - t0
        version = new_version()
        vdir = index_dir(run)
        vdir = vdir / version if isinstance(vdir, Path) else storage.join(vdir, version)
        emb_path = write_embeddings(vdir, recipes, photos)
        info = load_into_store(store, recipes, photos, version, keep=keep)
    finally:
        store.close()
    _prune_embeddings(run, keep)
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
        "index_settings": store.settings.to_dict(),
    }
    if path is not None and _is_remote(run_dir_of(run)):
        # the store is on this machine only: say which one, for the reader's error message elsewhere
        meta["store_host"] = socket.gethostname()
    write_index_meta(run, meta)
    return meta


def cli_index(args: argparse.Namespace) -> int:
    import sys

    from tnlbt.index.store import IndexSettings, StoreUnavailable
    from tnlbt.ray_init import ensure_ray

    ensure_ray()
    try:
        meta = index_run(
            args.run,
            data_dir=args.data,
            split=args.split,
            store_kind=args.store,
            qdrant_url=args.qdrant_url,
            qdrant_path=args.qdrant_path,
            settings=IndexSettings.layered(None, getattr(args, "index_setting", None) or ()),
            keep=args.keep,
            actors=getattr(args, "actors", 0) or 0,
            device=getattr(args, "device", "auto") or "auto",
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
    if meta.get("store_host"):
        print(
            f"the run is remote but its embedded store is local to this machine ({meta['store_host']}): "
            f"`tnlbt serve --run {args.run}` here finds it; elsewhere index into a Qdrant server (--qdrant-url)"
        )
    return 0
