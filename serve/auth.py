"""API keys: writes need one, reads only when the operator sets a read key.

Keys come from the environment of the process that builds the app (``TNLBT_API_KEY``: write keys, comma
separated; ``TNLBT_READ_KEY``: read keys) and from ``serve.api_keys_file`` (one write key a line, ``#``
comments). The replicas get only SHA-256 digests (:class:`Keys`), so no key is stored in Serve's deployment
config, and a presented key is compared by digest with :func:`hmac.compare_digest` against every configured one
(constant time, no early exit).

:class:`KeyGuard` is ASGI middleware in front of the API routes, so a refused request is answered before its
body is read:

* write routes (``PUT`` / ``DELETE`` under ``/v1/recipes/`` and ``/v1/photos/``): no write key configured ->
  403 "writes are disabled"; no key presented -> 401 (``WWW-Authenticate: Bearer``); a wrong key -> 403;
* the other ``/v1/`` routes when a read key is configured: the same 401 / 403 (a write key reads too);
* ``/healthz``, ``/readyz``, ``/docs`` and ``/openapi.json`` stay open (probes and the schema carry no data).

A key travels as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tnlbt.serve.guards import ASGIApp, Receive, Scope, Send, _json_response

WRITE_ENV, READ_ENV = "TNLBT_API_KEY", "TNLBT_READ_KEY"
MIN_KEY_CHARS = 16
MAX_KEY_CHARS = 256
WRITE_PREFIXES = ("/v1/recipes/", "/v1/photos/")
WRITE_METHODS = frozenset({"PUT", "DELETE", "POST", "PATCH"})


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class Keys:
    """SHA-256 digests of the write keys and the read keys (plain data: it crosses Ray to the API replicas)."""

    write: tuple[str, ...] = ()
    read: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, list[str]]:
        return {"write": list(self.write), "read": list(self.read)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Sequence[str]] | None) -> Keys:
        d = d or {}
        return cls(tuple(d.get("write") or ()), tuple(d.get("read") or ()))


def _split(value: str | None) -> list[str]:
    return [k.strip() for k in (value or "").split(",") if k.strip()]


def load_keys(keys_file: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None) -> Keys:
    """The configured keys as digests; ``ValueError`` for a key shorter than :data:`MIN_KEY_CHARS` (a short key
    is guessable) or longer than :data:`MAX_KEY_CHARS`, or a keys file that cannot be read."""
    env = os.environ if env is None else env
    write = _split(env.get(WRITE_ENV))
    if keys_file:
        try:
            lines = Path(keys_file).read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise ValueError(f"serve.api_keys_file: cannot read {keys_file}: {e.strerror}") from None
        write += [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    read = _split(env.get(READ_ENV))
    for k in (*write, *read):
        if not MIN_KEY_CHARS <= len(k) <= MAX_KEY_CHARS:
            raise ValueError(f"API keys must be {MIN_KEY_CHARS}-{MAX_KEY_CHARS} characters (one has {len(k)})")
    return Keys(tuple(digest(k) for k in write), tuple(digest(k) for k in read))


def presented_key(headers: Sequence[tuple[bytes, bytes]]) -> str | None:
    """The key of a request (``Authorization: Bearer`` first, then ``X-API-Key``); ``""`` for a header that is
    there but says nothing usable, ``None`` for no key header at all."""
    found: str | None = None
    for k, v in headers:
        if k == b"authorization":
            scheme, _, rest = v.decode("latin-1").partition(" ")
            return rest.strip() if scheme.lower() == "bearer" else ""
        if k == b"x-api-key":
            found = v.decode("latin-1").strip()
    return found


def matches(key: str, digests: Sequence[str]) -> bool:
    """Constant-time membership: every digest is compared, whatever the first comparison says."""
    if not key or len(key) > MAX_KEY_CHARS:
        return False
    d = digest(key)
    ok = False
    for known in digests:
        ok |= hmac.compare_digest(d, known)
    return ok


def api_path(path: str) -> str:
    """The path from ``/v1/`` on (the app may be mounted under a route prefix), or ``path`` without one."""
    i = path.find("/v1/")
    return path[i:] if i >= 0 else path


def is_write(method: str, path: str) -> bool:
    return method in WRITE_METHODS and any(api_path(path).startswith(p) for p in WRITE_PREFIXES)


class KeyGuard:
    """ASGI middleware enforcing :class:`Keys` (module doc)."""

    def __init__(self, app: ASGIApp, keys: Keys) -> None:
        self.app, self.keys = app, keys

    def refusal(self, method: str, path: str, headers: Sequence[tuple[bytes, bytes]]) -> tuple[int, str] | None:
        """``(status, detail)`` for a request to refuse, ``None`` to let through."""
        if is_write(method, path):
            if not self.keys.write:
                return 403, f"writes are disabled on this server (no API key configured: set {WRITE_ENV})"
            allowed = self.keys.write
        elif api_path(path).startswith("/v1/") and self.keys.read:
            allowed = self.keys.write + self.keys.read
        else:
            return None
        key = presented_key(headers)
        if key is None:
            return 401, "an API key is required (Authorization: Bearer <key> or X-API-Key)"
        if not matches(key, allowed):
            return 403, "API key not accepted"
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            no = self.refusal(scope.get("method", "GET"), scope.get("path", ""), scope.get("headers") or ())
            if no is not None:
                headers: dict[str, Any] = {"WWW-Authenticate": "Bearer"} if no[0] == 401 else {}
                for m in _json_response(no[0], no[1], headers):
                    await send(m)
                return
        await self.app(scope, receive, send)
