"""Vector stores behind one small interface: qdrant-client (local / ``:memory:`` / server) and qdrant-edge.

Index layout (chosen because a recipe has several photos and the two query directions need different targets):

* ``recipes`` -- one point per recipe, the recipe embedding, payload ``recipe_id, title, ingredients,
  instructions`` (a short excerpt), ``image_ids, split``. Photo -> recipes queries this collection.
* ``photos`` -- one point per photo, the image embedding, payload ``image_id, recipe_id, title, split``.
  Recipe text -> photos queries this collection; every photo is findable on its own (averaging the photos of a
  recipe would blur them, and named vectors on one recipe point would keep only one photo).

Point ids are ``uuid5`` of the source id (``recipe:<id>`` / ``photo:<image_id>``), so re-indexing the same
data overwrites points instead of duplicating them. A build writes *physical* collections
``<name>__<version>``; the *alias* ``<name>`` is switched to them only when every collection of the build is
complete (:func:`publish`),
and :func:`prune` drops all but the newest ``keep`` versions. Readers always go through the alias, so a query
during a rebuild sees the previous complete version.

Two implementations:

* :class:`QdrantStore` -- qdrant-client. ``url=`` talks to a Qdrant server (aliases are atomic server-side);
  ``path=`` / ``":memory:"`` is the pure-Python local mode (exact brute force; one process per path).
* :class:`EdgeStore` -- qdrant-edge-py, Qdrant's embedded Rust engine with HNSW: one ``EdgeShard`` directory
  per physical collection, aliases in ``aliases.json`` replaced atomically with ``os.replace``. Another
  process may build a new version while a server reads the old one (each shard directory has its own lock);
  readers notice the new alias file by its mtime.

How collections are indexed and searched (HNSW ``m`` / ``ef_construct`` / ``hnsw_ef``, full-scan threshold,
int8 scalar quantisation with rescoring and oversampling) is one :class:`IndexSettings`, given to a store or
read from ``TNLBT_INDEX_*`` environment variables by :func:`open_store`. qdrant-edge and a Qdrant server apply
it; qdrant-client's local mode is exact brute force and ignores it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tnlbt.config import IndexSettings

log = logging.getLogger(__name__)

RECIPES = "recipes"
PHOTOS = "photos"
# Fixed namespace so ids are stable across machines and releases (changing it would duplicate every point).
ID_NAMESPACE = uuid.UUID("6f1c3a52-7f0e-4c57-9d55-2b1b8f1b7a01")
_VERSION_SEP = "__"
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")


class StoreUnavailable(RuntimeError):
    """The vector store cannot be reached or opened (server down, folder locked by another process)."""


class IndexNotFound(LookupError):
    """No published index under this name (run ``tnlbt index`` first)."""


def point_id(kind: str, source_id: str) -> str:
    """Deterministic point id: ``uuid5(namespace, "<kind>:<source id>")`` as a string."""
    return str(uuid.uuid5(ID_NAMESPACE, f"{kind}:{source_id}"))


def recipe_point_id(recipe_id: str) -> str:
    return point_id("recipe", recipe_id)


def photo_point_id(image_id: str) -> str:
    return point_id("photo", image_id)


def new_version() -> str:
    """A sortable version tag: UTC time to the microsecond (``vYYYYmmddHHMMSSffffff``)."""
    t = time.time()  # one reading: two could straddle a second and sort an older version after a newer one
    return time.strftime("v%Y%m%d%H%M%S", time.gmtime(t)) + f"{int(t * 1e6) % 1_000_000:06d}"


def versioned(name: str, version: str) -> str:
    return f"{name}{_VERSION_SEP}{version}"


# -- HNSW / quantisation settings ------------------------------------------------------------------------------
#: Below this many points the edge store builds no HNSW graph and scans (what it always did).
EDGE_FULL_SCAN_POINTS = 20_000


@dataclass
class Hit:
    """One search result: the source id (recipe or image id), cosine score and payload."""

    id: str
    score: float
    payload: dict[str, Any] = field(default_factory=dict)


class VectorStore(ABC):
    """What the index, the CLI and the API need; reads accept a physical collection name or an alias."""

    kind: str = "abstract"

    @abstractmethod
    def create(self, collection: str, dim: int) -> None:
        """Create an empty physical collection of ``dim``-d cosine vectors (replacing a leftover of that
        name)."""

    @abstractmethod
    def _upsert_batch(
        self, collection: str, ids: list[str], vectors: np.ndarray, payloads: list[dict[str, Any]]
    ) -> None: ...

    @abstractmethod
    def finalize(self, collection: str) -> None:
        """Called once a collection is fully written (flush, build the ANN index)."""

    @abstractmethod
    def collections(self) -> list[str]:
        """Physical collection names."""

    @abstractmethod
    def drop(self, collection: str) -> None: ...

    @abstractmethod
    def aliases(self) -> dict[str, str]:
        """alias -> physical collection."""

    @abstractmethod
    def switch_aliases(self, mapping: dict[str, str]) -> None:
        """Point every alias in ``mapping`` at its collection in one step."""

    @abstractmethod
    def _search(self, collection: str, vector: np.ndarray, k: int, filter: dict[str, Any] | None) -> list[Hit]: ...

    @abstractmethod
    def _retrieve(self, collection: str, point_ids: list[str]) -> list[dict[str, Any] | None]: ...

    @abstractmethod
    def count(self, name: str) -> int: ...

    # live changes (tnlbt.index.changes): point-level writes into a finished collection
    @abstractmethod
    def _delete(self, collection: str, point_ids: list[str]) -> None: ...

    @abstractmethod
    def _set_payload(self, collection: str, point_ids: list[str], payload: dict[str, Any]) -> None:
        """Merge ``payload``'s fields into the points' payloads (other fields stay)."""

    @abstractmethod
    def _scroll(self, collection: str, filter: dict[str, Any], limit: int) -> list[tuple[str, dict[str, Any]]]:
        """``(point id, payload)`` of up to ``limit`` points matching ``filter`` (:mod:`tnlbt.index.filters`)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release files and connections."""

    def describe(self, name: str) -> dict[str, Any]:
        """What the engine reports about the collection ``name`` resolves to: points, HNSW and quantisation
        config as stored by the engine (not as asked for), and the search-time settings this store uses."""
        return {"collection": self.resolve(name), "points": self.count(name)}

    # -- shared logic ----------------------------------------------------------------------------------
    def resolve(self, name: str) -> str:
        """Alias or physical name -> physical name; :class:`IndexNotFound` when neither exists."""
        al = self.aliases()
        if name in al:
            return al[name]
        if name in self.collections():
            return name
        raise IndexNotFound(f"no index named {name!r} (run `tnlbt index` first)")

    def upsert(
        self,
        collection: str,
        ids: Sequence[str],
        vectors: np.ndarray,
        payloads: Sequence[dict[str, Any]],
        batch_size: int = 256,
        retries: int = 3,
        backoff_s: float = 0.5,
    ) -> int:
        """Write points in batches; each batch is retried with exponential backoff (idempotent: same ids)."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if not (len(ids) == len(vectors) == len(payloads)):
            raise ValueError(f"ids/vectors/payloads lengths differ: {len(ids)}/{len(vectors)}/{len(payloads)}")
        for start in range(0, len(ids), batch_size):
            sl = slice(start, start + batch_size)
            for attempt in range(retries + 1):
                try:
                    self._upsert_batch(collection, list(ids[sl]), vectors[sl], list(payloads[sl]))
                    break
                except (StoreUnavailable, ConnectionError, TimeoutError, OSError) as e:
                    if attempt == retries:
                        raise
                    wait = backoff_s * 2**attempt
                    log.warning("upsert batch at %d failed (%s); retry %d in %.1fs", start, e, attempt + 1, wait)
                    time.sleep(wait)
        return len(ids)

    def search(
        self,
        name: str,
        vector: np.ndarray | Sequence[float],
        k: int = 10,
        filter: dict[str, Any] | None = None,
    ) -> list[Hit]:
        """Top-k by cosine similarity in the collection that ``name`` resolves to (best first)."""
        v = np.asarray(vector, dtype=np.float32).reshape(-1)
        return self._search(self.resolve(name), v, int(k), filter)

    def retrieve(self, name: str, source_ids: Sequence[str], kind: str) -> list[dict[str, Any] | None]:
        """Payloads for source ids (``kind`` is ``"recipe"`` or ``"photo"``); None where an id is unknown."""
        pids = [point_id(kind, s) for s in source_ids]
        return self._retrieve(self.resolve(name), pids)

    def delete(self, name: str, source_ids: Sequence[str], kind: str) -> None:
        """Remove points by source id (unknown ids are no-ops: deleting twice is deleting once)."""
        if source_ids:
            self._delete(self.resolve(name), [point_id(kind, s) for s in source_ids])

    def set_payload(self, name: str, point_ids: Sequence[str], payload: dict[str, Any]) -> None:
        """Merge fields into the payloads of points given by *point* id (as :meth:`find` returns them)."""
        if point_ids:
            self._set_payload(self.resolve(name), list(point_ids), payload)

    def find(self, name: str, filter: dict[str, Any], limit: int = 10_000) -> list[tuple[str, dict[str, Any]]]:
        """``(point id, payload)`` of the points matching ``filter`` (at most ``limit``)."""
        return self._scroll(self.resolve(name), filter, int(limit))

    def versions(self, name: str) -> list[str]:
        """Physical collections of ``name``, oldest first."""
        prefix = name + _VERSION_SEP
        return sorted(c for c in self.collections() if c.startswith(prefix))


# -- build / publish / prune ------------------------------------------------------------------------------
def publish(store: VectorStore, built: dict[str, str]) -> None:
    """Switch aliases (logical name -> new physical collection) once the whole build is complete."""
    store.switch_aliases(built)
    log.info("published %s", ", ".join(f"{a} -> {c}" for a, c in built.items()))


def prune(store: VectorStore, names: Iterable[str], keep: int) -> list[str]:
    """Drop all but the newest ``keep`` versions of each name; never the one an alias points at."""
    keep = max(1, int(keep))
    live = set(store.aliases().values())
    dropped = []
    for name in names:
        vers = store.versions(name)
        for c in vers[: max(0, len(vers) - keep)]:
            if c not in live:
                store.drop(c)
                dropped.append(c)
    if dropped:
        log.info("pruned %s", ", ".join(dropped))
    return dropped


def build_collection(
    store: VectorStore,
    name: str,
    version: str,
    ids: Sequence[str],
    vectors: np.ndarray,
    payloads: Sequence[dict[str, Any]],
    batch_size: int = 256,
    progress: Callable[[int, int], None] | None = None,
    dim: int | None = None,
) -> str:
    """Create ``name__version``, upsert everything, finalize; returns the physical name (not yet
    published). With ``dim``, no vectors make an empty collection of that width (a photo-only catalog)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if dim and vectors.size == 0:
        vectors = np.zeros((0, dim), np.float32)
    elif vectors.ndim != 2 or len(vectors) == 0:
        raise ValueError(f"{name}: need a non-empty (N, D) array of vectors, got shape {vectors.shape}")
    coll = versioned(name, version)
    store.create(coll, int(vectors.shape[1]))
    step = max(batch_size, 8192)  # progress granularity; upsert batches stay at batch_size
    for start in range(0, len(ids), step):
        sl = slice(start, start + step)
        store.upsert(coll, ids[sl], vectors[sl], payloads[sl], batch_size=batch_size)
        if progress:
            progress(min(start + step, len(ids)), len(ids))
    store.finalize(coll)
    return coll


# -- qdrant-client -------------------------------------------------------------------------------------------
def _qdrant_filter(filter: dict[str, Any] | None):
    """A plain filter (:mod:`tnlbt.index.filters`) as qdrant-client's ``Filter``."""
    from tnlbt.index.filters import conditions

    must_pairs, not_pairs = conditions(filter)
    if not (must_pairs or not_pairs):
        return None
    from qdrant_client import models

    def cond(key: str, value: Any) -> Any:
        if isinstance(value, list | tuple):
            return models.FieldCondition(key=key, match=models.MatchAny(any=list(value)))
        return models.FieldCondition(key=key, match=models.MatchValue(value=value))

    return models.Filter(
        must=[cond(k, v) for k, v in must_pairs] or None, must_not=[cond(k, v) for k, v in not_pairs] or None
    )


def _edge_filter(filter: dict[str, Any] | None):
    """The same plain filter as qdrant-edge's ``Filter`` (the same conditions as :func:`_qdrant_filter`)."""
    from tnlbt.index.filters import conditions

    must_pairs, not_pairs = conditions(filter)
    if not (must_pairs or not_pairs):
        return None
    from qdrant_edge import FieldCondition, Filter, MatchAny, MatchValue

    def cond(key: str, value: Any) -> Any:
        match = MatchAny(list(value)) if isinstance(value, list | tuple) else MatchValue(value)
        return FieldCondition(key=key, match=match)

    return Filter(
        must=[cond(k, v) for k, v in must_pairs] or None, must_not=[cond(k, v) for k, v in not_pairs] or None
    )


class QdrantStore(VectorStore):
    """qdrant-client: ``url`` (server, API key from ``QDRANT_API_KEY``), ``path`` (local folder) or
    ``:memory:``."""

    kind = "qdrant"

    def __init__(
        self,
        url: str | None = None,
        path: str | None = None,
        api_key: str | None = None,
        timeout: int = 30,
        settings: IndexSettings | None = None,
    ) -> None:
        from qdrant_client import QdrantClient

        self.url, self.path = url, path
        self.settings = settings or IndexSettings()
        try:
            if url:
                self.client = QdrantClient(
                    url=url, api_key=api_key or os.environ.get("QDRANT_API_KEY"), timeout=timeout
                )
            elif path and path != ":memory:":
                Path(path).mkdir(parents=True, exist_ok=True)
                self.client = QdrantClient(path=path)
            else:
                self.client = QdrantClient(":memory:")
        except RuntimeError as e:  # local mode: folder locked by another process
            raise StoreUnavailable(str(e)) from e
        # Local mode is not thread-safe; Serve may call us from several threads of one replica.
        self._lock = threading.RLock() if not url else contextlib.nullcontext()
        if url:
            self._guard(self.client.get_collections)

    def _guard(self, fn: Callable, *a: Any, **kw: Any) -> Any:
        try:
            with self._lock:
                return fn(*a, **kw)
        except (IndexNotFound, ValueError, KeyError):
            raise
        except Exception as e:
            # Connection refused / timeouts surface as several httpx / grpc / qdrant exception types.
            name = type(e).__name__
            if any(s in name for s in ("Connect", "Timeout", "ResponseHandling", "Unexpected", "RpcError")):
                raise StoreUnavailable(f"Qdrant unavailable: {e}") from e
            raise

    def create(self, collection: str, dim: int) -> None:
        def _do() -> None:
            if self.client.collection_exists(collection):
                self.client.delete_collection(collection)
            self.client.create_collection(collection, **self._collection_config(dim))

        self._guard(_do)

    def _collection_config(self, dim: int) -> dict[str, Any]:
        """``create_collection`` keyword arguments from the settings (a server applies them; local mode
        silently drops ``hnsw_config`` and ``quantization_config``)."""
        from qdrant_client import models

        st = self.settings
        hnsw = models.HnswConfigDiff(
            m=st.hnsw_m, ef_construct=st.ef_construct, full_scan_threshold=st.full_scan_kb(dim, None)
        )
        quant = None
        if st.quantization == "int8":
            quant = models.ScalarQuantization(
                scalar=models.ScalarQuantizationConfig(
                    type=models.ScalarType.INT8, quantile=st.quantile, always_ram=True
                )
            )
        vectors = models.VectorParams(
            size=dim, distance=models.Distance.COSINE, on_disk=True if st.on_disk_vectors else None
        )
        return {"vectors_config": vectors, "hnsw_config": hnsw, "quantization_config": quant}

    def _search_params(self, k: int):
        """``SearchParams`` for a server; ``None`` in local mode, which is exact brute force anyway and warns
        on every query that ``search_params`` has no effect."""
        if not self.url:
            return None
        from qdrant_client import models

        st = self.settings
        return models.SearchParams(
            hnsw_ef=max(st.hnsw_ef, k),
            exact=st.exact,
            quantization=models.QuantizationSearchParams(rescore=st.rescore, oversampling=st.oversampling),
        )

    def _upsert_batch(
        self, collection: str, ids: list[str], vectors: np.ndarray, payloads: list[dict[str, Any]]
    ) -> None:
        from qdrant_client import models

        self._guard(
            self.client.upsert,
            collection,
            wait=True,
            points=models.Batch(ids=ids, vectors=vectors.tolist(), payloads=payloads),
        )

    def finalize(self, collection: str) -> None:
        pass  # server: HNSW is built by Qdrant's optimizer; local mode: exact search, nothing to build

    def collections(self) -> list[str]:
        return [c.name for c in self._guard(self.client.get_collections).collections]

    def drop(self, collection: str) -> None:
        self._guard(self.client.delete_collection, collection)

    def aliases(self) -> dict[str, str]:
        return {a.alias_name: a.collection_name for a in self._guard(self.client.get_aliases).aliases}

    def switch_aliases(self, mapping: dict[str, str]) -> None:
        from qdrant_client import models

        ops: list[Any] = []
        current = self.aliases()
        for alias, coll in mapping.items():
            if alias in current:
                ops.append(models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=alias)))
            ops.append(
                models.CreateAliasOperation(create_alias=models.CreateAlias(collection_name=coll, alias_name=alias))
            )
        # One request: the server applies all operations atomically, so no reader sees a missing alias.
        self._guard(self.client.update_collection_aliases, change_aliases_operations=ops)

    def _search(self, collection: str, vector: np.ndarray, k: int, filter: dict[str, Any] | None) -> list[Hit]:
        res = self._guard(
            self.client.query_points,
            collection,
            query=vector.tolist(),
            limit=k,
            query_filter=_qdrant_filter(filter),
            search_params=self._search_params(k),
            with_payload=True,
        )
        return [_hit(p.payload or {}, p.score) for p in res.points]

    def _retrieve(self, collection: str, point_ids: list[str]) -> list[dict[str, Any] | None]:
        recs = self._guard(self.client.retrieve, collection, ids=point_ids, with_payload=True)
        by_id = {str(r.id): r.payload or {} for r in recs}
        return [by_id.get(p) for p in point_ids]

    def _delete(self, collection: str, point_ids: list[str]) -> None:
        from qdrant_client import models

        self._guard(self.client.delete, collection, points_selector=models.PointIdsList(points=point_ids), wait=True)

    def _set_payload(self, collection: str, point_ids: list[str], payload: dict[str, Any]) -> None:
        self._guard(self.client.set_payload, collection, payload=payload, points=point_ids, wait=True)

    def _scroll(self, collection: str, filter: dict[str, Any], limit: int) -> list[tuple[str, dict[str, Any]]]:
        recs, _ = self._guard(
            self.client.scroll, collection, scroll_filter=_qdrant_filter(filter), limit=limit, with_payload=True
        )
        return [(str(r.id), dict(r.payload or {})) for r in recs]

    def count(self, name: str) -> int:
        return int(self._guard(self.client.count, self.resolve(name), exact=True).count)

    def describe(self, name: str) -> dict[str, Any]:
        coll = self.resolve(name)
        cfg = self._guard(self.client.get_collection, coll).config
        quant = cfg.quantization_config
        scalar = getattr(quant, "scalar", None)
        return {
            "collection": coll,
            "points": self.count(coll),
            "mode": "server" if self.url else "local (exact brute force; HNSW and quantisation ignored)",
            "hnsw": {
                "m": cfg.hnsw_config.m,
                "ef_construct": cfg.hnsw_config.ef_construct,
                "full_scan_threshold_kb": cfg.hnsw_config.full_scan_threshold,
            },
            "quantization": None
            if scalar is None
            else {"type": str(getattr(scalar.type, "value", scalar.type)), "quantile": scalar.quantile},
            "search": _search_dict(self.settings) if self.url else {"exact": True},
        }

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()


def _search_dict(st: IndexSettings) -> dict[str, Any]:
    return {k: getattr(st, k) for k in ("hnsw_ef", "exact", "rescore", "oversampling")}


def _hit(payload: dict[str, Any], score: float) -> Hit:
    sid = payload.get("image_id") or payload.get("recipe_id") or ""
    return Hit(id=str(sid), score=float(score), payload=dict(payload))


# -- qdrant-edge
# ----------------------------------------------------------------------------------------------
class EdgeStore(VectorStore):
    """qdrant-edge-py: one ``EdgeShard`` per physical collection under ``root``; HNSW (and the int8 copy,
    with ``quantization="int8"``) built in :meth:`finalize`.

    ``settings`` (:class:`IndexSettings`); the keyword arguments ``hnsw_m``, ``ef_construct``, ``hnsw_ef``
    and ``hnsw_min_points`` (= ``full_scan_points``) override single fields. Collections smaller than
    ``full_scan_points`` (default 20,000) keep the plain index and are searched exactly, since a full scan of
    a few thousand vectors is faster than building a graph; they are not quantised either.
    """

    kind = "edge"
    _ALIASES = "aliases.json"

    def __init__(
        self,
        root: str,
        hnsw_m: int | None = None,
        ef_construct: int | None = None,
        hnsw_ef: int | None = None,
        hnsw_min_points: int | None = None,
        settings: IndexSettings | None = None,
    ) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        given = {"hnsw_m": hnsw_m, "ef_construct": ef_construct, "hnsw_ef": hnsw_ef}
        given["full_scan_points"] = hnsw_min_points
        self.settings = dataclasses.replace(
            settings or IndexSettings(), **{k: v for k, v in given.items() if v is not None}
        )
        self._shards: dict[str, Any] = {}
        self._aliases: dict[str, str] = {}
        self._aliases_mtime = -1.0
        self._lock = threading.RLock()

    @property
    def hnsw_min_points(self) -> int:
        """Collections with fewer points get no HNSW graph (exact full scan)."""
        fsp = self.settings.full_scan_points
        return EDGE_FULL_SCAN_POINTS if fsp is None else fsp

    # shards -------------------------------------------------------------------------------------------------
    def _config(self, dim: int, indexing_threshold_kb: int = 2**31 - 1):
        from qdrant_edge import (
            Distance,
            EdgeConfig,
            EdgeOptimizersConfig,
            EdgeVectorParams,
            HnswIndexConfig,
            Memory,
            ScalarQuantizationConfig,
            ScalarType,
        )

        st = self.settings
        quant = None
        if st.quantization == "int8":
            quant = ScalarQuantizationConfig(type=ScalarType.Int8, quantile=st.quantile, memory=Memory.Pinned)
        return EdgeConfig(
            vectors=EdgeVectorParams(
                size=dim, distance=Distance.Cosine, memory=Memory.Cold if st.on_disk_vectors else None
            ),
            hnsw_config=HnswIndexConfig(
                m=st.hnsw_m,
                ef_construct=st.ef_construct,
                full_scan_threshold=st.full_scan_kb(dim, EDGE_FULL_SCAN_POINTS),
            ),
            quantization_config=quant,
            # indexing_threshold is in KB of vectors; a huge value means "never index on its own": we decide
            # in finalize() whether to build HNSW at all.
            optimizers=EdgeOptimizersConfig(indexing_threshold=indexing_threshold_kb),
        )

    def _shard(self, collection: str):
        with self._lock:
            sh = self._shards.get(collection)
            if sh is None:
                from qdrant_edge import EdgeShard

                d = self.root / collection
                if not (d / "edge.json").exists():
                    raise IndexNotFound(f"no collection {collection!r} under {self.root}")
                try:
                    sh = EdgeShard.load(str(d / "shard"))
                except Exception as e:  # locked by another process (WAL WouldBlock) or damaged
                    raise StoreUnavailable(f"cannot open {d}: {e}") from e
                self._shards[collection] = sh
            return sh

    def create(self, collection: str, dim: int) -> None:
        from qdrant_edge import EdgeShard

        if not _NAME_RE.match(collection):
            raise ValueError(f"bad collection name {collection!r}")
        self.drop(collection)
        d = self.root / collection
        d.mkdir(parents=True)
        with self._lock:
            self._shards[collection] = EdgeShard.create(str(d / "shard"), self._config(dim))
        # Written last by finalize(); until then the collection is "being built" and not listed.
        (d / "building").write_text(json.dumps({"dim": dim, "settings": self.settings.build_dict()}))

    def _upsert_batch(
        self, collection: str, ids: list[str], vectors: np.ndarray, payloads: list[dict[str, Any]]
    ) -> None:
        from qdrant_edge import Point, UpdateOperation

        # a collection being built is open already; a finished one (a live change) is opened like a reader does
        sh = self._shards.get(collection) or self._shard(collection)
        pts = [Point(i, v, p) for i, v, p in zip(ids, vectors.tolist(), payloads, strict=True)]
        with self._lock:
            sh.update(UpdateOperation.upsert_points(pts))

    def _write(self, collection: str, op: Any) -> None:
        """One update of a finished collection. Not flushed: the shard's WAL already keeps it through a process
        crash (checked: upsert, set_payload, ``os._exit``, reload), and a flush costs ~40 ms a write; against a
        machine crash the fsynced changes log (:mod:`tnlbt.index.changes`) is the record the next index replays."""
        sh = self._shard(collection)
        with self._lock:
            sh.update(op)

    def _delete(self, collection: str, point_ids: list[str]) -> None:
        from qdrant_edge import UpdateOperation

        self._write(collection, UpdateOperation.delete_points(point_ids))

    def _set_payload(self, collection: str, point_ids: list[str], payload: dict[str, Any]) -> None:
        from qdrant_edge import UpdateOperation

        self._write(collection, UpdateOperation.set_payload(point_ids, payload))

    def _scroll(self, collection: str, filter: dict[str, Any], limit: int) -> list[tuple[str, dict[str, Any]]]:
        from qdrant_edge import ScrollRequest

        sh = self._shard(collection)
        with self._lock:
            recs, _ = sh.scroll(ScrollRequest(limit=limit, filter=_edge_filter(filter), with_payload=True))
        return [(str(r.id), dict(r.payload or {})) for r in recs]

    def finalize(self, collection: str) -> None:
        d = self.root / collection
        with self._lock:
            sh = self._shards[collection]
            n = self._count_shard(sh)
            meta = json.loads((d / "building").read_text())
            meta["hnsw"] = n >= self.hnsw_min_points
            if meta["hnsw"]:
                from qdrant_edge import EdgeShard

                t = time.perf_counter()
                # Ask for indexing now that all points are in: reload with a low threshold, then optimize.
                sh.flush()
                sh.close()
                sh = EdgeShard.load(str(d / "shard"), self._config(int(meta["dim"]), indexing_threshold_kb=1))
                sh.optimize()
                self._shards[collection] = sh
                meta["index_s"] = round(time.perf_counter() - t, 3)
                log.info(
                    "%s: HNSW (m=%d, ef_construct=%d, quantization=%s) over %d points in %.1fs",
                    collection,
                    self.settings.hnsw_m,
                    self.settings.ef_construct,
                    self.settings.quantization,
                    n,
                    meta["index_s"],
                )
            sh.flush()
        (d / "building").write_text(json.dumps(meta))
        (d / "building").replace(d / "edge.json")

    @staticmethod
    def _count_shard(sh: Any) -> int:
        from qdrant_edge import CountRequest

        return int(sh.count(CountRequest(exact=True)))

    def collections(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if (p / "edge.json").exists())

    def drop(self, collection: str) -> None:
        with self._lock:
            sh = self._shards.pop(collection, None)
            if sh is not None:
                with contextlib.suppress(Exception):
                    sh.close()
        d = self.root / collection
        if d.exists():
            shutil.rmtree(d)

    def aliases(self) -> dict[str, str]:
        p = self.root / self._ALIASES
        try:
            mtime = p.stat().st_mtime_ns
        except FileNotFoundError:
            return {}
        if mtime != self._aliases_mtime:
            self._aliases = json.loads(p.read_text())
            self._aliases_mtime = mtime
        return dict(self._aliases)

    def switch_aliases(self, mapping: dict[str, str]) -> None:
        for coll in mapping.values():
            if coll not in self.collections():
                raise IndexNotFound(f"cannot publish unfinished collection {coll!r}")
        with self._lock:
            new = {**self.aliases(), **mapping}
            tmp = self.root / f".{self._ALIASES}.{os.getpid()}.tmp"
            tmp.write_text(json.dumps(new, indent=1, sort_keys=True))
            os.replace(tmp, self.root / self._ALIASES)  # atomic on POSIX: readers see old or new, never half

    def _search(self, collection: str, vector: np.ndarray, k: int, filter: dict[str, Any] | None) -> list[Hit]:
        from qdrant_edge import (
            QuantizationSearchParams,
            Query,
            QueryRequest,
            SearchParams,
        )

        flt = _edge_filter(filter)
        st = self.settings
        # rescore/oversampling act only on a quantised collection; without rescore the scores are the int8
        # approximations (qdrant-edge's own default is not to rescore when the vectors are in RAM).
        params = SearchParams(
            hnsw_ef=max(st.hnsw_ef, k),
            exact=st.exact,
            quantization=QuantizationSearchParams(rescore=st.rescore, oversampling=st.oversampling),
        )
        sh = self._shard(collection)
        with self._lock:
            pts = sh.query(
                QueryRequest(
                    limit=k, query=Query.Nearest(vector.tolist()), with_payload=True, filter=flt, params=params
                )
            )
        return [_hit(dict(p.payload or {}), p.score) for p in pts]

    def _retrieve(self, collection: str, point_ids: list[str]) -> list[dict[str, Any] | None]:
        sh = self._shard(collection)
        with self._lock:
            recs = sh.retrieve(point_ids, with_payload=True, with_vector=False)
        by_id = {str(r.id): dict(r.payload or {}) for r in recs}
        return [by_id.get(p) for p in point_ids]

    def count(self, name: str) -> int:
        return self._count_shard(self._shard(self.resolve(name)))

    def describe(self, name: str) -> dict[str, Any]:
        coll = self.resolve(name)
        d = self.root / coll
        sh = self._shard(coll)
        with self._lock:
            info = sh.info()
        meta = json.loads((d / "edge.json").read_text())
        engine: dict[str, Any] = {}
        # the shard's own record of its config (qdrant-edge writes it; a beta file layout, hence optional)
        with contextlib.suppress(OSError, ValueError):
            engine = json.loads((d / "shard" / "edge_config.json").read_text())
        return {
            "collection": coll,
            "points": int(info.points_count),
            "indexed_vectors": int(info.indexed_vectors_count),
            "segments": int(info.segments_count),
            "hnsw_built": bool(meta.get("hnsw", False)),
            "hnsw": engine.get("hnsw_config"),
            "quantization": engine.get("quantization_config"),
            "quantized_segments": len(list((d / "shard").glob("segments/*/vector_storage/quantized.data"))),
            "built_with": meta.get("settings"),
            "index_s": meta.get("index_s"),
            "search": _search_dict(self.settings),
        }

    def close(self) -> None:
        with self._lock:
            for sh in self._shards.values():
                with contextlib.suppress(Exception):
                    sh.close()
            self._shards.clear()


def choose_kind(kind: str, url: str | None) -> str:
    """``auto``: a URL means a Qdrant server (qdrant-client); embedded means qdrant-edge when it is installed.

    Why edge for embedded: qdrant-client's local mode is exact brute force in Python and writes through
    SQLite; at 50k x 1024-d its queries take 10-100x longer than qdrant-edge's (bench/results/index.json),
    so it cannot serve a Recipe1M test split (~100k vectors) within the API's latency goals.
    """
    if kind != "auto":
        return kind
    if url:
        return "qdrant"
    try:
        import qdrant_edge  # noqa: F401
    except ImportError:
        return "qdrant"
    return "edge"


def open_store(
    kind: str = "qdrant",
    url: str | None = None,
    path: str | None = None,
    settings: IndexSettings | None = None,
    **kw: Any,
) -> VectorStore:
    """``kind="qdrant"``: server by ``url`` or local ``path`` (``None``/``":memory:"`` = in memory);
    ``kind="edge"``: qdrant-edge under ``path`` (required). ``settings``: HNSW / quantisation
    (:class:`IndexSettings`); ``None`` reads ``TNLBT_INDEX_*`` from the environment over the defaults."""
    kw["settings"] = settings if settings is not None else IndexSettings.from_env()
    if kind == "edge":
        if url:
            raise ValueError("the edge store is embedded: give a path, not a URL")
        if not path:
            raise ValueError("the edge store needs a folder (path)")
        return EdgeStore(path, **kw)
    if kind != "qdrant":
        raise ValueError(f"unknown store kind {kind!r} (qdrant or edge)")
    return QdrantStore(url=url, path=path, **kw)
