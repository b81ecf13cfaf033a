"""Ray Serve deployments: recipe/image encoders, the index, the HTTP API ingress and the Gradio UI.

Everything a deployment needs comes in through its constructor (checkpoint dir, store location, limits);
nothing runs at import. The checkpoint and the run may be URIs (``s3://...``): an encoder replica fetches the
model files into its node's cache when it starts (:func:`tnlbt.runs.resolve_checkpoint`, once per node
and checkpoint version), and ``SearchIndex`` reads ``index.json`` and photo bytes through :mod:`tnlbt.storage`.

The FastAPI apps are built per replica by ``__serve_build_asgi_app__`` (Serve 2.60's
late-bound ingress), so routes close over the replica's handles and the Gradio Blocks object is created inside
the replica (Gradio objects do not pickle, and Ray's own ``GradioServer`` is broken with Gradio 6).

Topologies (``serve/app.py`` binds one; ``ServeConfig.topology``)::

    graph:      HTTP ─▶ SearchAPI (FastAPI, autoscaled) ─┬─▶ TextEncoder   (@serve.batch, autoscaled)
                                                         ├─▶ ImageEncoder  (@serve.batch, autoscaled)
                                                         └─▶ SearchIndex   (1 replica with an embedded store)
    colocated:  HTTP ─▶ SearchAPI (FastAPI + one Encoder + the embedded index in its process: serve/local.py)
    both:       HTTP ─▶ GradioUI (1 replica: Gradio's queue is per process) ─▶ SearchAPI's search methods

Photos cross Ray as the uploaded bytes: the ingress reads only the header (format and size: 413 / 415 come
from the API), the ImageEncoder replica decodes next to the model, a bounded number at a time
(:class:`tnlbt.serve.guards.DecodePool`). Every request body is counted as it arrives
(:class:`tnlbt.serve.guards.BodyLimit`); limits are in ``serve/schemas.py`` and the README's error table.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, File, Form, HTTPException, UploadFile
from fastapi.responses import Response
from ray import serve
from ray.serve.handle import DeploymentHandle
from tnlbt.serve import schemas as S
from tnlbt.serve.guards import RETRY_AFTER_S, BodyLimit, DecodePool, ReplicaBusy, install_error_handlers

# Module level (not inside the app builder): FastAPI resolves the string annotations of the route functions
# (``from __future__ import annotations``) in this module's globals.
from tnlbt.config import HYBRID_DEFAULT, MAX_UPLOAD_BYTES

log = logging.getLogger("ray.serve")


def _unavailable_types() -> tuple[type[BaseException], ...]:
    """Exceptions meaning "not there right now" (store, index, a replica, a full decoder): 503 + Retry-After,
    never 500."""
    import ray.exceptions as rex

    from tnlbt.index.store import IndexNotFound, StoreUnavailable

    names = ("RayActorError", "ActorDiedError", "ActorUnavailableError")
    extra = tuple(getattr(rex, n) for n in names if hasattr(rex, n))
    try:
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        extra += (BackPressureError, DeploymentUnavailableError)
    except ImportError:  # pragma: no cover - older Serve
        pass
    return (StoreUnavailable, IndexNotFound, ReplicaBusy, *extra)


def _setup_encoder(replica: Any, checkpoint_dir: str, max_batch_size: int, batch_wait_timeout_s: float,
                   num_threads: int, device: str) -> None:
    """Load the checkpoint (a URI is fetched into this node's cache) and size the replica's ``@serve.batch``."""
    from tnlbt.inference import Encoder

    replica.enc = Encoder(checkpoint_dir, device=device, num_threads=num_threads)
    replica.encode.set_max_batch_size(max_batch_size)
    replica.encode.set_batch_wait_timeout_s(batch_wait_timeout_s)


@serve.deployment(
    max_ongoing_requests=32,
    ray_actor_options={"num_cpus": 1},
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 8},
)
class TextEncoder:
    """Recipe text -> embedding; requests are batched (one model forward per batch). ``checkpoint_dir``: a
    local path or a URI (fetched into this node's cache)."""

    def __init__(
        self,
        checkpoint_dir: str,
        max_batch_size: int = 16,
        batch_wait_timeout_s: float = 0.005,
        num_threads: int = 0,
        device: str = "cpu",
    ) -> None:
        _setup_encoder(self, checkpoint_dir, max_batch_size, batch_wait_timeout_s, num_threads, device)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def encode(self, queries: list[dict[str, Any]]) -> list[list[float]]:
        from tnlbt.inference import RecipeText

        vecs = self.enc.encode_texts([RecipeText(**q) for q in queries])
        return [v.tolist() for v in vecs]

    def dim(self) -> int:
        return self.enc.dim


@serve.deployment(
    max_ongoing_requests=16,
    ray_actor_options={"num_cpus": 1},
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 4},
)
class ImageEncoder:
    """Photo bytes -> embedding (``checkpoint_dir`` as for :class:`TextEncoder`).

    :meth:`encode_photo` decodes here, next to the model, at most ``decode_slots`` photos at once (a request
    waits ``decode_wait_s`` for a slot, then gets :class:`~tnlbt.serve.guards.ReplicaBusy`: 503); only the
    small model input tensor outlives the decode, and :meth:`encode` batches those."""

    def __init__(
        self,
        checkpoint_dir: str,
        max_batch_size: int = 8,
        batch_wait_timeout_s: float = 0.01,
        num_threads: int = 0,
        device: str = "cpu",
        decode_slots: int = 2,
        decode_wait_s: float = 2.0,
    ) -> None:
        _setup_encoder(self, checkpoint_dir, max_batch_size, batch_wait_timeout_s, num_threads, device)
        self.decoder = DecodePool(decode_slots, decode_wait_s)

    async def encode_photo(self, data: bytes) -> list[float]:
        x = await self.decoder.run(self.enc.photo_tensor, data)
        return await self.encode(x)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def encode(self, tensors: list[Any]) -> list[list[float]]:
        vecs = self.enc.encode_tensors(tensors)
        return [v.tolist() for v in vecs]

    def dim(self) -> int:
        return self.enc.dim


@serve.deployment(num_replicas=1, max_ongoing_requests=64, ray_actor_options={"num_cpus": 0.5})
class SearchIndex:
    """The vector store behind the API. An embedded store (local path, edge) allows exactly one replica;
    with a Qdrant server (``qdrant_url``) the deployment may be scaled out. For a remote ``run`` an embedded
    store is the local folder named in its ``index.json``: on a node without it the replica starts anyway and
    ``/readyz`` answers 503 with the reason (index built on another host)."""

    def __init__(self, run: str, store: dict[str, Any] | None = None) -> None:
        from tnlbt.config import StoreConfig, load_section

        self.run = run
        # plain data across Ray, the typed value here: url / path / kind / settings travel together
        self.store = load_section(StoreConfig, store or {}, [], "store")
        self.reader: Any = None
        self.error = ""
        # every live change of this replica, whatever the id: one at a time (tnlbt.index.changes)
        import threading

        self._write_lock = threading.Lock()
        self._open()

    def _open(self) -> None:
        from tnlbt.index.search import IndexReader
        from tnlbt.index.store import IndexNotFound, StoreUnavailable

        try:
            self.reader = IndexReader.from_run(self.run, self.store)
            self.error = ""
        except (StoreUnavailable, IndexNotFound, OSError) as e:
            # Start anyway: /readyz reports the problem and requests get 503 until the store comes back.
            self.reader, self.error = None, str(e)
            log.warning("index not available: %s", e)

    def _r(self) -> Any:
        from tnlbt.index.store import StoreUnavailable

        if getattr(self, "_delay_s", 0.0):
            time.sleep(self._delay_s)
        if getattr(self, "_down", False):
            raise StoreUnavailable("store marked down")
        if self.reader is None:
            self._open()
        if self.reader is None:
            raise StoreUnavailable(self.error or "index not available")
        return self.reader

    def ready(self) -> dict[str, int]:
        return self._r().ready()

    def search_photos(self, vector: list[float], k: int, filter: dict[str, Any] | None = None,
                      terms: list[str] | None = None) -> list[dict]:
        # hybrid re-ranking runs here, next to the candidates' payloads (tnlbt.index.hybrid)
        return self._r().search_photos(vector, k, filter, terms=terms)

    def search_recipes(self, vector: list[float], k: int, filter: dict[str, Any] | None = None,
                       terms: list[str] | None = None) -> list[dict]:
        return self._r().search_recipes(vector, k, filter, terms=terms)

    def get_recipe(self, recipe_id: str) -> dict | None:
        return self._r().get_recipe(recipe_id)

    def get_image(self, image_id: str) -> bytes | None:
        return self._r().get_image(image_id)

    # -- live changes (the vectors were computed by the encoder deployments) ---------------------------------
    def _live(self) -> Any:
        from tnlbt.index.changes import ChangeLog, LiveIndex, changes_dir

        return LiveIndex(self._r().store, ChangeLog(changes_dir(self.run)), self._write_lock)

    def put_recipe(self, recipe_id: str, vector: list[float], recipe: dict[str, Any]) -> bool:
        return self._live().put_recipe(recipe_id, vector, recipe)

    def delete_recipe(self, recipe_id: str) -> bool:
        return self._live().delete_recipe(recipe_id)

    def put_photo(self, image_id: str, vector: list[float], data: bytes, recipe_id: str | None = None) -> bool:
        return self._live().put_photo(image_id, vector, data, recipe_id)

    def delete_photo(self, image_id: str) -> bool:
        return self._live().delete_photo(image_id)

    def info(self) -> dict[str, Any]:
        """The live version's lineage, read from ``index.json`` on each call (a new version published while
        serving shows at once; the file is small)."""
        from tnlbt.runs import live_lineage

        return live_lineage(self.run)

    def set_fault(self, down: bool = False, delay_s: float = 0.0) -> None:
        """Test/ops drill hook: behave as if the store were unreachable (``down``: the 503 path) or slow
        (``delay_s`` per call: the timeout path); ``set_fault()`` restores normal service."""
        self._down, self._delay_s = bool(down), float(delay_s)


def _sniff_media_type(data: bytes) -> str:
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"


class SearchService:
    """The API's plain methods over the three handles: validation, limits, timeouts, error mapping. The HTTP
    routes (:func:`build_api_app`) and the UI (through a handle to :class:`SearchAPI`) both call these, so both
    get the same checks; tests build it over stand-in handles, without Ray."""

    def __init__(
        self,
        text_encoder: DeploymentHandle,
        image_encoder: DeploymentHandle,
        index: DeploymentHandle,
        max_upload_bytes: int = MAX_UPLOAD_BYTES,
        request_timeout_s: float = 20.0,
        image_url_prefix: str = "/v1/images/",
        api_keys: dict[str, list[str]] | None = None,
        hybrid: bool = HYBRID_DEFAULT,
    ) -> None:
        from tnlbt.serve.auth import Keys

        self.hybrid = bool(hybrid)  # a text search's ranking when the request does not say
        self.text_encoder, self.image_encoder, self.index = text_encoder, image_encoder, index
        self.keys = Keys.from_dict(api_keys)  # digests only (tnlbt.serve.auth)
        self.max_upload_bytes = int(max_upload_bytes)
        self.timeout_s = float(request_timeout_s)
        self.image_url_prefix = image_url_prefix
        self._unavailable = _unavailable_types()
        from tnlbt.data.images import PhotoError
        from tnlbt.index.changes import UnknownItem

        self._photo_error = PhotoError
        self._unknown_item = UnknownItem

    # -- plain methods: the HTTP routes and the UI both call these -------------------------------------------
    async def _await(self, resp: Any) -> Any:
        async def _get() -> Any:
            return await resp

        try:
            return await asyncio.wait_for(_get(), self.timeout_s)
        except TimeoutError as e:
            with_cancel = getattr(resp, "cancel", None)
            if with_cancel:
                with_cancel()
            raise HTTPException(504, f"timed out after {self.timeout_s:.0f}s") from e
        except self._unavailable as e:
            raise HTTPException(
                503,
                f"search backend unavailable: {_reason(e)}",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            ) from e
        except self._photo_error as e:  # the encoder replica refused the photo while decoding it
            raise _photo_http_error(e) from e
        except ValueError as e:
            raise HTTPException(422, _first_line(e)) from e
        except self._unknown_item as e:  # a write names a recipe that is not in the index
            raise HTTPException(404, _first_line(e)) from e

    async def embed_text(self, query: dict[str, Any]) -> list[float]:
        return await self._embed_query(_valid(S.RecipeQuery, query))

    async def _embed_query(self, q: S.RecipeQuery) -> list[float]:
        return await self._await(self.text_encoder.encode.remote(_query_text(q).as_dict()))

    async def embed_image(self, data: bytes) -> list[float]:
        from tnlbt.inference import check_image

        if len(data) > self.max_upload_bytes:  # the UI's path has no multipart limit in front of it
            raise HTTPException(413, f"upload larger than {self.max_upload_bytes} bytes")
        try:
            check_image(data)  # the header only: format and size, so 413 / 415 come from here, before any decode
        except self._photo_error as e:
            raise _photo_http_error(e) from e
        # The bytes cross Ray (a 2.6 MB JPEG, not its 36 MB of pixels); the encoder replica decodes them.
        return await self._await(self.image_encoder.encode_photo.remote(data))

    async def search_text_hits(
        self, query: dict[str, Any], k: int = 10, filter: dict[str, Any] | None = None, hybrid: bool | None = None
    ) -> list[dict[str, Any]]:
        from tnlbt.index.search import text_terms

        req = _valid(S.TextSearchRequest, {**query, "k": k, "filter": filter, "hybrid": hybrid})
        vec = await self._embed_query(req)
        use = self.hybrid if req.hybrid is None else req.hybrid
        terms = text_terms(_query_text(req)) if use else None
        return await self._await(self.index.search_photos.remote(vec, req.k, _filter(req), terms))

    async def search_image_hits(
        self, data: bytes, k: int = 10, filter: dict[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        req = _valid(S.ImageSearchParams, {"k": k, "filter": filter})
        vec = await self.embed_image(data)
        return await self._await(self.index.search_recipes.remote(vec, req.k, _filter(req)))

    # -- live changes: embed first (a failed embed changes nothing), then one call to the index replica ------------
    async def put_recipe(self, recipe_id: str, recipe: dict[str, Any]) -> bool:
        from tnlbt.inference import RecipeText

        _check_id(recipe_id)
        r = _valid(S.RecipeIn, recipe)
        text = RecipeText(r.title, r.ingredients, r.instructions)
        vec = await self._await(self.text_encoder.encode.remote(text.as_dict()))
        return await self._await(self.index.put_recipe.remote(recipe_id, vec, r.model_dump()))

    async def delete_recipe(self, recipe_id: str) -> bool:
        _check_id(recipe_id)
        return await self._await(self.index.delete_recipe.remote(recipe_id))

    async def put_photo(self, image_id: str, data: bytes, recipe_id: str | None = None) -> bool:
        _check_id(image_id)
        if recipe_id is not None:
            _check_id(recipe_id)
        vec = await self.embed_image(data)  # size / format / decode checks: 413 / 415 before anything is written
        return await self._await(self.index.put_photo.remote(image_id, vec, data, recipe_id))

    async def delete_photo(self, image_id: str) -> bool:
        _check_id(image_id)
        return await self._await(self.index.delete_photo.remote(image_id))

    async def image_bytes(self, image_id: str) -> bytes | None:
        return await self._await(self.index.get_image.remote(image_id))

    async def info(self) -> dict[str, Any]:
        lineage = await self._await(self.index.info.remote())
        return {"version": lineage.get("version"), "lineage": lineage}

    async def ready(self) -> dict[str, Any]:
        counts = await self._await(self.index.ready.remote())
        await self._await(self.text_encoder.dim.remote())
        await self._await(self.image_encoder.dim.remote())
        return counts


@serve.deployment(
    max_ongoing_requests=64,
    ray_actor_options={"num_cpus": 0.5},
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 16},
)
@serve.ingress()
class SearchAPI(SearchService):
    """FastAPI ingress over :class:`SearchService` (the app is built per replica).

    Bound over three deployment handles (the graph topology), or with ``colocated`` (the keyword arguments of
    :func:`tnlbt.serve.local.colocated_parts`) and ``None`` for the three: then the encoders and the embedded
    index live in this replica's process (:mod:`tnlbt.serve.local`, and ``serve/app.py``'s ``topology``)."""

    def __init__(self, text_encoder: Any, image_encoder: Any, index: Any, *,
                 colocated: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if colocated is not None:
            from tnlbt.serve.local import colocated_parts

            text_encoder, image_encoder, index = colocated_parts(**colocated)
        self.colocated = colocated is not None
        super().__init__(text_encoder, image_encoder, index, **kwargs)

    async def set_fault(self, down: bool = False, delay_s: float = 0.0) -> None:
        """:meth:`SearchIndex.set_fault` of a colocated index (the ops drill / test hook; handles only, no route)."""
        if not self.colocated:
            raise RuntimeError("set_fault: the index is its own deployment here (SearchIndex)")
        await self.index.set_fault.remote(down=down, delay_s=delay_s)

    def __serve_build_asgi_app__(self) -> Any:
        return build_api_app(self)


def _valid(model: Any, data: Any) -> Any:
    """``data`` validated by one of the routes' own request models (422 with their message): the plain methods
    are an entry point too (the UI calls them through a handle), so they check what the routes check."""
    try:
        return S.validated(model, data)
    except ValueError as e:
        raise HTTPException(422, str(e)) from e


def _query_text(q: S.RecipeQuery) -> Any:
    """The query as :class:`tnlbt.inference.RecipeText` (the one rule for a text box, or the parts)."""
    from tnlbt.inference import RecipeText

    return RecipeText.from_query(q.model_dump(include={"text", "title", "ingredients", "instructions"}))


def _filter(req: Any) -> dict[str, Any] | None:
    return (req.filter.as_dict() or None) if req.filter else None


def _check_id(item_id: str) -> None:
    """A recipe / photo id a write may use (:func:`tnlbt.index.changes.valid_id`): 422 otherwise, said without
    echoing the id (it may be anything, of any length)."""
    from tnlbt.index.changes import valid_id

    if not valid_id(item_id):
        raise HTTPException(422, "bad id: 1-128 characters of A-Z a-z 0-9 _ . - starting with a letter or digit")


def _first_line(e: BaseException) -> str:
    s = str(getattr(e, "cause", None) or e).strip().splitlines()
    # A RayTaskError's own string is a traceback; its cause's message (or the last line) is what to show.
    return (s[-1] if s else type(e).__name__)[:300]


def _reason(e: BaseException) -> str:
    """Why a backend is unavailable, in words for a client: our own errors say it; Ray's name actor ids,
    nodes and addresses, which are nobody's business outside."""
    from tnlbt.index.store import IndexNotFound, StoreUnavailable

    cause = getattr(e, "cause", None) or e
    if isinstance(cause, StoreUnavailable | IndexNotFound | ReplicaBusy):
        return _first_line(cause)
    return "a backend replica is not available"


def _photo_http_error(e: Any) -> HTTPException:
    """A refused photo: too many pixels is 413 (too large, like an oversized upload), anything else 415."""
    if e.reason == "too_large":
        return HTTPException(413, f"image too large: {e.detail}")
    return HTTPException(415, f"unsupported or corrupt image: {_first_line(e)}")


def _form_filter(text: str | None, split: str | None) -> dict[str, Any] | None:
    """The photo search's ``filter`` form field (JSON) merged with its ``split`` field; 422 for bad JSON."""
    import json

    flt: Any = {}
    if text:
        try:
            flt = json.loads(text)
        except ValueError:
            raise HTTPException(422, "filter: not valid JSON") from None
        if not isinstance(flt, dict):
            raise HTTPException(422, "filter: a JSON object is required")
    if split:
        flt = {**flt, "split": split}
    return flt or None


async def _read_upload(api: SearchService, file: Any) -> bytes:
    data = await file.read(api.max_upload_bytes + 1)
    if len(data) > api.max_upload_bytes:
        raise HTTPException(413, f"upload larger than {api.max_upload_bytes} bytes")
    if not data:
        raise HTTPException(422, "empty upload")
    return data


def build_api_app(api: SearchService) -> Any:
    """The FastAPI app of one API replica (routes close over ``api``)."""
    from tnlbt.index.search import ImageSource

    app = FastAPI(
        title="tnlbt recipe search",
        version="1",
        description="Cross-modal recipe retrieval (TNLBT): recipe text -> dish photos, photo -> recipes.",
    )
    # Every body is counted as it arrives, whatever its framing: uploads up to the upload limit (plus the
    # multipart framing), everything else up to the JSON limit. Outermost, so nothing reads past it.
    upload = api.max_upload_bytes + S.MULTIPART_OVERHEAD
    app.add_middleware(BodyLimit, rules=[("/v1/search/image", upload), ("/v1/embed/image", upload),
                                         ("/v1/photos/", upload)], default=S.MAX_JSON_BYTES)
    # Added last, so outermost: a request without the right key is refused before any of its body is read.
    from tnlbt.serve.auth import KeyGuard

    app.add_middleware(KeyGuard, keys=api.keys)
    install_error_handlers(app)
    # Load balancers probe with HEAD as often as with GET.
    ops = {"methods": ["GET", "HEAD"], "tags": ["ops"]}

    @app.api_route("/healthz", response_model=S.Health, **ops)
    async def healthz() -> S.Health:
        return S.Health()

    @app.api_route(
        "/readyz",
        **ops,
        response_model=S.Ready,
        responses={503: {"model": S.ErrorBody, "description": "index or models not loaded"}},
    )
    async def readyz() -> S.Ready:
        c = await api.ready()
        return S.Ready(recipes=c.get("recipes", 0), photos=c.get("photos", 0))

    @app.get("/v1/info", response_model=S.Info, tags=["ops"], responses={503: {"model": S.ErrorBody}})
    async def info() -> S.Info:
        """The live index version and its lineage: checkpoint (path, sha256, metrics), source and counts, index
        settings, publish gate, time."""
        return S.Info(**await api.info())

    @app.post(
        "/v1/search/text",
        response_model=S.PhotoSearchResponse,
        tags=["search"],
        responses={
            413: {"model": S.ErrorBody, "description": f"body over {S.MAX_JSON_BYTES} bytes"},
            422: {"model": S.ErrorBody, "description": "empty/oversized text, k outside 1..100"},
            503: {"model": S.ErrorBody},
            504: {"model": S.ErrorBody},
        },
    )
    async def search_text(req: S.TextSearchRequest) -> S.PhotoSearchResponse:
        """Recipe text -> photos of dishes (best first)."""
        t = time.perf_counter()
        hits = await api.search_text_hits(
            req.model_dump(include={"text", "title", "ingredients", "instructions"}),
            req.k,
            req.filter.model_dump(exclude_defaults=True) if req.filter else None,
            req.hybrid,
        )
        return S.PhotoSearchResponse(hits=hits, took_ms=round((time.perf_counter() - t) * 1e3, 2))

    @app.post(
        "/v1/search/image",
        response_model=S.RecipeSearchResponse,
        tags=["search"],
        responses={
            413: {"model": S.ErrorBody},
            415: {"model": S.ErrorBody},
            422: {"model": S.ErrorBody},
            503: {"model": S.ErrorBody},
            504: {"model": S.ErrorBody},
        },
    )
    async def search_image(
        file: UploadFile = File(..., description="a food photo (JPEG/PNG/WebP)"),
        k: int = Form(10, ge=1, le=S.MAX_K),
        split: str | None = Form(None, pattern="^(train|val|test)$"),
        filter: str | None = Form(None, max_length=S.MAX_FILTER_JSON, description="a search filter as JSON"),
    ) -> S.RecipeSearchResponse:
        """Photo (multipart upload) -> recipes (best first); ``filter`` as in a text search, as a JSON string."""
        t = time.perf_counter()
        flt = _form_filter(filter, split)
        data = await _read_upload(api, file)
        hits = await api.search_image_hits(data, k, flt)
        return S.RecipeSearchResponse(hits=hits, took_ms=round((time.perf_counter() - t) * 1e3, 2))

    @app.post(
        "/v1/embed/text",
        response_model=S.EmbedResponse,
        tags=["embed"],
        responses={413: {"model": S.ErrorBody}, 422: {"model": S.ErrorBody}},
    )
    async def embed_text(req: S.RecipeQuery) -> S.EmbedResponse:
        vec = await api.embed_text(req.model_dump())
        return S.EmbedResponse(vector=vec, dim=len(vec))

    @app.post(
        "/v1/embed/image",
        response_model=S.EmbedResponse,
        tags=["embed"],
        responses={413: {"model": S.ErrorBody}, 415: {"model": S.ErrorBody}, 503: {"model": S.ErrorBody}},
    )
    async def embed_image(file: UploadFile = File(...)) -> S.EmbedResponse:
        vec = await api.embed_image(await _read_upload(api, file))
        return S.EmbedResponse(vector=vec, dim=len(vec))

    @app.get(
        "/v1/recipes/{recipe_id}",
        response_model=S.RecipeHit,
        tags=["lookup"],
        responses={404: {"model": S.ErrorBody}},
    )
    async def get_recipe(recipe_id: str) -> S.RecipeHit:
        if len(recipe_id) > 128:
            raise HTTPException(404, "unknown recipe id")
        r = await api._await(api.index.get_recipe.remote(recipe_id))
        if r is None:
            raise HTTPException(404, f"unknown recipe id {recipe_id!r}")
        return S.RecipeHit(**r)

    write_errors = {
        401: {"model": S.ErrorBody, "description": "no API key"},
        403: {"model": S.ErrorBody, "description": "wrong API key, or writes disabled (no key configured)"},
        404: {"model": S.ErrorBody, "description": "a photo's recipe is not in the index"},
        413: {"model": S.ErrorBody},
        422: {"model": S.ErrorBody, "description": "bad id or body"},
        503: {"model": S.ErrorBody},
        504: {"model": S.ErrorBody},
    }

    def _written(item_id: str, kind: str, op: str, existed: bool, t: float) -> S.WriteResult:
        return S.WriteResult(id=item_id, kind=kind, op=op, existed=bool(existed),
                             took_ms=round((time.perf_counter() - t) * 1e3, 2))

    @app.put("/v1/recipes/{recipe_id}", response_model=S.WriteResult, tags=["write"], responses=write_errors)
    async def put_recipe(recipe_id: str, recipe: S.RecipeIn) -> S.WriteResult:
        """Create or replace a recipe (needs a write key): embedded now, searchable by the next query, kept by
        the next re-index (the changes log)."""
        t = time.perf_counter()
        existed = await api.put_recipe(recipe_id, recipe.model_dump())
        return _written(recipe_id, "recipe", "put", existed, t)

    @app.delete("/v1/recipes/{recipe_id}", response_model=S.WriteResult, tags=["write"], responses=write_errors)
    async def delete_recipe(recipe_id: str) -> S.WriteResult:
        """Delete a recipe and its photos (needs a write key); deleting an unknown id is not an error."""
        t = time.perf_counter()
        return _written(recipe_id, "recipe", "delete", await api.delete_recipe(recipe_id), t)

    @app.put("/v1/photos/{image_id}", response_model=S.WriteResult, tags=["write"], responses=write_errors)
    async def put_photo(
        image_id: str,
        file: UploadFile = File(..., description="a food photo (JPEG/PNG/WebP)"),
        recipe_id: str | None = Form(None, max_length=S.MAX_ID, description="the recipe it shows (must exist)"),
    ) -> S.WriteResult:
        """Create or replace a photo (needs a write key), optionally of an indexed recipe."""
        t = time.perf_counter()
        data = await _read_upload(api, file)
        existed = await api.put_photo(image_id, data, recipe_id or None)
        return _written(image_id, "photo", "put", existed, t)

    @app.delete("/v1/photos/{image_id}", response_model=S.WriteResult, tags=["write"], responses=write_errors)
    async def delete_photo(image_id: str) -> S.WriteResult:
        """Delete a photo (needs a write key)."""
        t = time.perf_counter()
        return _written(image_id, "photo", "delete", await api.delete_photo(image_id), t)

    @app.get(
        "/v1/images/{image_id}",
        tags=["lookup"],
        responses={200: {"content": {"image/jpeg": {}}}, 404: {"model": S.ErrorBody}},
    )
    async def get_image(image_id: str) -> Response:
        """Photo bytes by id (only indexed photos; from the image root or the processed data)."""
        if not ImageSource.valid_id(image_id):
            raise HTTPException(404, "unknown image id")
        data = await api.image_bytes(image_id)
        if data is None:
            raise HTTPException(404, f"unknown image id {image_id!r}")
        return Response(data, media_type=_sniff_media_type(data), headers={"Cache-Control": "public, max-age=86400"})

    return app


@serve.deployment(num_replicas=1, max_ongoing_requests=32, ray_actor_options={"num_cpus": 0.5})
@serve.ingress()
class GradioUI:
    """The Gradio demo, mounted with ``gr.mount_gradio_app``; calls the API deployment's search methods."""

    def __init__(
        self,
        api_app: str = "api",
        api_deployment: str = "SearchAPI",
        model_card: dict | None = None,
        examples: dict | None = None,
        api: DeploymentHandle | None = None,
        max_upload_bytes: int = MAX_UPLOAD_BYTES,
    ) -> None:
        self.api = api or serve.get_deployment_handle(api_deployment, app_name=api_app)
        self.model_card = local_files(model_card or {})
        self.examples = local_files(examples or {})
        self.max_upload_bytes = int(max_upload_bytes)

    def __serve_build_asgi_app__(self) -> Any:
        from tnlbt.ui.app import build_demo

        text_fn, image_fn = ui_fns(self.api)
        demo = build_demo(text_fn, image_fn, self.examples, self.model_card, max_upload_bytes=self.max_upload_bytes)
        return ui_app(demo, self.max_upload_bytes)


def ui_app(demo: Any, max_upload_bytes: int = MAX_UPLOAD_BYTES) -> FastAPI:
    """The UI replica's ASGI app: ``demo`` mounted at the root, its uploads limited to ``max_upload_bytes``
    (Gradio's own ``max_file_size``, per file) and every body counted (:class:`~tnlbt.serve.guards.BodyLimit`:
    the upload route up to the upload limit, the queue's JSON calls up to the JSON limit)."""
    import gradio as gr

    app = FastAPI()
    app.add_middleware(BodyLimit, rules=[("/gradio_api/upload", max_upload_bytes + S.MULTIPART_OVERHEAD)],
                       default=S.MAX_JSON_BYTES)

    @app.api_route("/healthz", methods=["GET", "HEAD"])
    def healthz() -> dict:
        return {"status": "ok"}

    return gr.mount_gradio_app(app, demo, path="", max_file_size=max_upload_bytes)


def ui_fns(api: Any) -> tuple[Any, Any]:
    """The UI's two callables over a handle to the API deployment (anything with its methods' ``.remote``).

    Queries go to the API's plain methods, which validate them exactly as its HTTP routes do (text limits, k);
    a photo goes on as the uploaded file's bytes, never decoded here.
    """
    import gradio as gr

    from tnlbt.index.filters import split_terms
    from tnlbt.inference import RecipeText

    async def text_fn(title: str, ingredients: str, instructions: str, k: float, include: str = "",
                      exclude: str = "") -> list:
        query = RecipeText.from_boxes(title, ingredients, instructions)
        if query.is_empty():
            raise gr.Error("Type a title, ingredients or instructions first.")
        # the API validates the filter as it does a request's (a term of quantities only, too many terms: 422)
        flt = {"must_include": split_terms(include), "must_exclude": split_terms(exclude)}
        try:
            hits = await api.search_text_hits.remote(query.as_dict(), k, flt if any(flt.values()) else None)
        except Exception as e:  # typed API errors arrive wrapped; show their message, not a traceback
            raise gr.Error(_user_message(e)) from e
        return await _gallery(api, hits)

    async def image_fn(path: str | None, k: float) -> list[list[Any]]:
        if not path:
            raise gr.Error("Upload a photo first.")
        # Bounded: the upload route refuses files over the limit, and the input checked the header.
        data = await asyncio.to_thread(Path(path).read_bytes)
        try:
            hits = await api.search_image_hits.remote(data, k)
        except Exception as e:
            raise gr.Error(_user_message(e)) from e
        return [[h["title"], ", ".join(h["ingredients"][:12]), round(h["score"], 4)] for h in hits]

    return text_fn, image_fn


def _user_message(e: BaseException) -> str:
    """An API error as the UI shows it: the HTTP error's detail (what the API would have answered)."""
    cause = getattr(e, "cause", None) or e
    if isinstance(cause, HTTPException):
        return str(cause.detail)
    log.warning("UI search failed: %s", _first_line(e))
    return "Search failed; try again in a moment."


async def _gallery(api: Any, hits: list[dict[str, Any]]) -> list[tuple[Any, str]]:
    from PIL import Image

    out = []
    datas = await asyncio.gather(*[api.image_bytes.remote(h["image_id"]) for h in hits], return_exceptions=True)
    for h, data in zip(hits, datas, strict=True):
        if isinstance(data, bytes | bytearray):
            img = Image.open(io.BytesIO(data)).convert("RGB")  # indexed photos: stored, small JPEGs
        else:
            img = Image.new("RGB", (64, 64), (200, 200, 200))  # photo file missing: keep the hit visible
        out.append((img, f"{h['title']}  ({h['score']:.3f})"))
    return out


def local_files(d: dict[str, Any]) -> dict[str, Any]:
    """Write the ``{"name", "data"}`` file fields of ``tnlbt.serve.app.portable_files`` to a folder on this node and
    put their paths back (Gradio serves example images and the curves from local files). Paths pass through."""
    import tempfile

    folder: str | None = None

    def write(f: Any) -> Any:
        nonlocal folder
        if not isinstance(f, dict) or "data" not in f:
            return f
        folder = folder or tempfile.mkdtemp(prefix="tnlbt-ui-")
        path = os.path.join(folder, os.path.basename(str(f.get("name") or "file")))
        with open(path, "wb") as fh:
            fh.write(f["data"])
        return path

    out = dict(d)
    if out.get("images"):
        out["images"] = [write(f) for f in out["images"]]
    if out.get("curves"):
        out["curves"] = write(out["curves"])
    return out

