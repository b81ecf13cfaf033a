"""What stands between a hostile request and a replica's memory: body limits, bounded error bodies, a bounded
decode pool, and the proxy-side answer for a replica that died mid-request.

* :class:`BodyLimit` -- ASGI middleware that counts request body bytes as they arrive (``Content-Length`` or
  chunked, any framing) and answers 413 as soon as the count passes the route's limit: the rest of the body is
  never read. Used by the API (uploads, JSON) and the UI (Gradio's upload and queue routes).
* :func:`install_error_handlers` -- a 422 that says where and what (bounded, never the rejected input) and a
  500 that says nothing about internals; both keep the ``{"detail": str}`` shape of every other error.
* :class:`DecodePool` -- at most N photo decodes at once per replica; a burst waits a short bounded time, then
  gets :class:`ReplicaBusy` (the API's 503 with ``Retry-After``), so memory stays bounded instead of growing.
* :func:`proxy_middlewares` -- Serve's HTTP proxy answers 500 with an empty body when the ingress replica dies
  under a request; this middleware (installed in the proxy through ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``)
  turns "no response at all" into 503 with ``Retry-After``.

Light on purpose: the proxy imports this module, so no torch / PIL / Ray imports at module level.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from starlette.exceptions import HTTPException
from tnlbt.serve import schemas as S

log = logging.getLogger("ray.serve")

RETRY_AFTER_S = 5
# The env var Serve 2.60's proxy reads (at import) for a function returning Starlette middlewares.
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "tnlbt.serve.guards:proxy_middlewares"

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
T = TypeVar("T")


def _json_response(status: int, detail: str, headers: dict[str, str] | None = None) -> tuple[Message, Message]:
    body = json.dumps({"detail": detail}).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    hdrs += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return {"type": "http.response.start", "status": status, "headers": hdrs}, {
        "type": "http.response.body",
        "body": body,
    }


class _Tracked:
    """An ASGI ``send`` that remembers whether the response has started (after that, no other answer)."""

    def __init__(self, send: Send) -> None:
        self.send, self.started = send, False

    async def __call__(self, msg: Message) -> None:
        self.started = self.started or msg["type"] == "http.response.start"
        await self.send(msg)


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` the moment a body passes its limit. An ``HTTPException``: FastAPI re-raises
    those out of its body parsing (JSON and multipart), so the handler answers 413 and reading stops."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body larger than {limit} bytes")


class BodyLimit:
    """ASGI middleware: a byte budget per request body, whatever its framing.

    ``rules`` are ``(path suffix, limit)`` pairs, first match wins (a suffix, so a route prefix such as
    ``/ui`` does not matter); other paths get ``default``. A ``Content-Length`` over the limit is answered
    before anything is read; otherwise ``receive`` is wrapped and counts, and raises :class:`BodyTooLarge`
    when the count passes the limit, so nothing past it is ever read (nor buffered, nor parsed).
    """

    def __init__(self, app: ASGIApp, rules: Sequence[tuple[str, int]] = (), default: int = S.MAX_JSON_BYTES) -> None:
        self.app, self.rules, self.default = app, tuple(rules), int(default)

    def limit_for(self, path: str) -> int:
        """A rule ending in ``/`` is a folder (``/v1/photos/`` covers ``/v1/photos/{id}``); others suffixes."""
        p = path.rstrip("/")
        return next((n for rule, n in self.rules if (rule in p + "/" if rule.endswith("/") else p.endswith(rule))),
                    self.default)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope.get("path", ""))
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            for m in _json_response(413, f"request body larger than {limit} bytes"):
                await send(m)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            if seen > limit:  # the app caught the first raise and asked again: still no
                raise BodyTooLarge(limit)
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return msg

        tracked = _Tracked(send)
        try:
            await self.app(scope, counted, tracked)
        except BodyTooLarge as e:  # an app without an HTTPException handler let it through
            if tracked.started:
                raise
            for m in _json_response(413, e.detail):
                await send(m)


def _content_length(scope: Scope) -> int | None:
    for k, v in scope.get("headers") or ():
        if k == b"content-length":
            try:
                return int(v)
            except ValueError:
                return None
    return None


def install_error_handlers(app: Any) -> None:
    """422 bodies that say where and what (:func:`tnlbt.serve.schemas.validation_error_body`), never the
    rejected input (FastAPI's default echoes it back: a 20 MB body came back as 20 MB, and a NaN or a lone
    surrogate in it made the echo itself fail with a 500); a 500 that names no internals."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    async def on_validation(request: Any, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(S.validation_error_body(exc.errors()), 422)

    async def on_error(request: Any, exc: Exception) -> JSONResponse:
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "internal error"}, 500)

    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(Exception, on_error)


class ReplicaBusy(RuntimeError):
    """Every decode slot of this replica stayed taken for the whole wait: the API's 503 with Retry-After."""


class DecodePool:
    """At most ``slots`` photo decodes at once, on ``slots`` threads of their own.

    The bound is what makes a replica's memory a number: each decode may materialise up to
    :data:`tnlbt.inference.MAX_DECODED_PIXELS`, so the worst case is ``slots`` of those, whatever arrives. A
    request waits at most ``wait_s`` for a slot, then :class:`ReplicaBusy`. Own threads (not the default
    executor): a fixed, small number of threads is also a fixed number of malloc arenas.
    """

    def __init__(self, slots: int = 2, wait_s: float = 2.0) -> None:
        self.slots, self.wait_s = int(slots), float(wait_s)
        self._sem = asyncio.Semaphore(self.slots)
        self._pool = ThreadPoolExecutor(max_workers=self.slots, thread_name_prefix="photo-decode")

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            await asyncio.wait_for(self._sem.acquire(), self.wait_s)
        except TimeoutError:
            raise ReplicaBusy(f"all {self.slots} photo decoders busy for {self.wait_s:g}s; retry") from None
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        finally:
            self._sem.release()


class NoResponseIs503:
    """Proxy-side ASGI middleware: when the inner app (Serve's proxy) returns or fails without having
    started a response -- Serve 2.60 does that when the replica died under the request (``RayActorError`` ->
    500 with no body, written by uvicorn) -- answer 503 with ``Retry-After`` instead: the request may be
    retried; a new replica is on its way. A response already started is left alone."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        tracked = _Tracked(send)
        try:
            await self.app(scope, receive, tracked)
        except Exception:
            if tracked.started:
                raise
            log.warning("proxy: request failed before a response started; answering 503", exc_info=True)
        if not tracked.started:
            headers = {"Retry-After": str(RETRY_AFTER_S)}
            for m in _json_response(503, "the service replica handling this request went away; retry", headers):
                await send(m)


def proxy_middlewares() -> list[Any]:
    """For ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=tnlbt.serve.guards:proxy_middlewares``."""
    from starlette.middleware import Middleware

    return [Middleware(NoResponseIs503)]
