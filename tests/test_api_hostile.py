"""Hostile input against the API and the UI apps, in process (no Ray): the FastAPI app of ``SearchService`` over
stand-in handles, the mounted Gradio app, and raw ASGI calls where the framing matters (chunked bodies).

Every request here is bounded in count and size, and only reaches in-process apps.
"""

from __future__ import annotations

import asyncio
import io
import json
import struct
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

UPLOAD_LIMIT = 400_000  # an 81-MP pixel-bomb PNG is ~240 kB


# -- stand-ins -------------------------------------------------------------------------------------------------
class _Method:
    """``handle.method.remote(...)``: a coroutine calling ``fn`` (what awaiting a DeploymentResponse gives)."""

    def __init__(self, fn: Any, calls: list) -> None:
        self.fn, self.calls = fn, calls

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append(args)

        async def call() -> Any:
            out = self.fn(*args, **kwargs)
            return await out if asyncio.iscoroutine(out) else out

        return call()


class _Handle:
    def __init__(self, **fns: Any) -> None:
        self.calls: dict[str, list] = {}
        for name, fn in fns.items():
            self.calls[name] = []
            setattr(self, name, _Method(fn, self.calls[name]))


def _photo(vec: list[float]) -> Any:
    return lambda data: vec


def _service(encode_photo: Any = None) -> Any:
    from tnlbt.serve.deployments import SearchService

    text = _Handle(encode=lambda q: [1.0, 0.0, 0.0, 0.0], dim=lambda: 4)
    image = _Handle(encode_photo=encode_photo or _photo([0.0, 1.0, 0.0, 0.0]), dim=lambda: 4)
    index = _Handle(
        search_photos=lambda v, k, f, terms=None: [],
        search_recipes=lambda v, k, f, terms=None: [],
        ready=lambda: {"recipes": 1, "photos": 1},
        get_image=lambda i: None,
        get_recipe=lambda i: None,
    )
    return SearchService(text, image, index, max_upload_bytes=UPLOAD_LIMIT, request_timeout_s=5.0)


@pytest.fixture
def service() -> Any:
    return _service()


@pytest.fixture
def client(service: Any) -> Any:
    from fastapi.testclient import TestClient
    from tnlbt.serve.deployments import build_api_app

    return TestClient(build_api_app(service), raise_server_exceptions=False)


def _png_bomb(w: int, h: int) -> bytes:
    """A valid all-black RGB PNG of w x h, compressed row by row (a 36-MP one is ~100 kB, 108 MB decoded)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    z = zlib.compressobj(9)
    row = b"\x00" * (1 + 3 * w)
    idat = b"".join(z.compress(row) for _ in range(h)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _encoded(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _upload(data: bytes, name: str = "dish.jpg", ctype: str = "image/jpeg") -> dict:
    return {"file": (name, io.BytesIO(data), ctype)}


class _LoadSpy:
    """Records the size of every image PIL decodes (``ImageFile.load``) while active."""

    def __init__(self, monkeypatch: Any) -> None:
        from PIL import ImageFile

        self.sizes: list[tuple[int, int]] = []
        real = ImageFile.ImageFile.load

        def load(im: Any) -> Any:
            self.sizes.append(im.size)
            return real(im)

        monkeypatch.setattr(ImageFile.ImageFile, "load", load)

    def largest(self) -> int:
        return max((w * h for w, h in self.sizes), default=0)


async def _asgi(
    app: Any, method: str, path: str, chunks: list[bytes], headers: dict[str, str]
) -> tuple[int, bytes, int]:
    """One raw ASGI request whose body arrives in ``chunks`` (no Content-Length: chunked framing); returns the
    status, the response body and how many body bytes the app pulled."""
    pulled, queue = 0, list(chunks)
    sent: list[dict] = []

    async def receive() -> dict:
        nonlocal pulled
        if not queue:
            return {"type": "http.request", "body": b"", "more_body": False}
        c = queue.pop(0)
        pulled += len(c)
        return {"type": "http.request", "body": c, "more_body": True}

    async def send(msg: dict) -> None:
        sent.append(msg)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
        "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 80),
    }
    await asyncio.wait_for(app(scope, receive, send), 30)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, body, pulled


# -- §1 the API ----------------------------------------------------------------------------------------------
HOSTILE_JSON = [
    '{"title": "cake", "k": NaN}',
    '{"title": "cake", "k": Infinity}',
    '{"title": "cake", "k": -Infinity}',
    '{"title": "cake", "k": 1e309}',
    '{"title": "\\ud800"}',
    '{"title": "cake", "ingredients": ["\\udfff x"]}',
    '{"title": "cake", "\\ud800": 1}',
    '{"text": NaN}',
]


@pytest.mark.parametrize("path", ["/v1/search/text", "/v1/embed/text"])
@pytest.mark.parametrize("body", HOSTILE_JSON)
def test_non_finite_numbers_and_lone_surrogates_are_422(client, service, path, body):
    r = client.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, (body, r.status_code, r.text[:200])
    out = r.json()
    assert isinstance(out["detail"], str) and out["detail"]
    assert all(set(e) == {"loc", "msg"} for e in out["errors"])
    assert service.text_encoder.calls["encode"] == []


def test_422_says_where_and_what_bounded_without_the_input(client):
    secret = "SECRET-PAYLOAD-"
    body = {
        "title": secret * 60_000,  # 900 kB title: over the 300-character limit, under the JSON body limit
        "ingredients": [secret * 40] * 60,  # 60 lines of 600 characters
        "k": "many",
        "unknown": {"deep": [secret] * 100},
    }
    raw = json.dumps(body)
    assert 900_000 < len(raw) < 1024 * 1024
    r = client.post("/v1/search/text", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert len(r.content) < 4096, len(r.content)  # FastAPI's default echoed all ~1 MB back
    assert secret not in r.text and "0x" not in r.text and "<" not in r.text
    out = r.json()
    locs = {tuple(e["loc"]) for e in out["errors"]}
    assert ("body", "title") in locs and ("body", "k") in locs and ("body", "unknown") in locs
    assert out["n_errors"] >= len(out["errors"]) and len(out["errors"]) <= 8
    assert out["detail"].startswith("title: String should have at most 300 characters")
    bad = client.post("/v1/search/text", content=b'{"title": "cake",', headers={"content-type": "application/json"})
    assert bad.status_code == 422 and "JSON decode error" in bad.json()["detail"]


def test_json_bodies_have_a_limit(client, service):
    from tnlbt.serve.schemas import MAX_JSON_BYTES

    big = json.dumps({"title": "cake", "ingredients": ["x" * 400] * 5_000})  # 2 MB
    r = client.post("/v1/embed/text", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and str(MAX_JSON_BYTES) in r.json()["detail"]
    assert service.text_encoder.calls["encode"] == []


@pytest.mark.parametrize("path", ["/v1/search/image", "/v1/search/text"])
def test_chunked_body_stops_at_the_limit(service, path):
    """No Content-Length (chunked): the app stops pulling the body as soon as it passes the limit."""
    from tnlbt.serve.deployments import build_api_app
    from tnlbt.serve.schemas import MAX_JSON_BYTES, MULTIPART_OVERHEAD

    app = build_api_app(service)
    piece = 64 * 1024
    if path.endswith("image"):
        limit = UPLOAD_LIMIT + MULTIPART_OVERHEAD
        head = (b'--B\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n'
                b"Content-Type: image/jpeg\r\n\r\n")
        chunks = [head] + [b"\xff" * piece] * 80  # 5 MB upload
        ctype = "multipart/form-data; boundary=B"
    else:
        limit = MAX_JSON_BYTES
        chunks = [b'{"title": "'] + [b"a" * piece] * 80
        ctype = "application/json"
    status, body, pulled = asyncio.run(_asgi(app, "POST", path, chunks, {"content-type": ctype,
                                                                        "transfer-encoding": "chunked"}))
    assert status == 413, body[:200]
    assert pulled <= limit + piece + len(chunks[0]), (pulled, limit)


def test_head_on_health_and_readiness(client):
    for path in ("/healthz", "/readyz"):
        r = client.head(path)
        assert r.status_code == 200 and r.content == b"", path
        assert client.get(path).status_code == 200


def test_pixel_bomb_is_refused_from_its_header(client, service, monkeypatch):
    spy = _LoadSpy(monkeypatch)
    bomb = _png_bomb(6000, 6000)  # 36 MP, ~100 kB: under the upload limit and the 40-MP header limit
    assert len(bomb) < UPLOAD_LIMIT
    t = time.perf_counter()
    r = client.post("/v1/search/image", files=_upload(bomb, "bomb.png", "image/png"))
    assert r.status_code == 413 and "decodes to 36000000 pixels" in r.json()["detail"], r.text
    assert time.perf_counter() - t < 5
    assert spy.largest() == 0  # nothing decoded anywhere (before: 108 MB of pixels at the ingress)
    assert service.image_encoder.calls["encode_photo"] == []


def test_photo_crosses_as_its_bytes_and_big_jpegs_are_drafted(client, service, monkeypatch):
    """A 12-MP JPEG is accepted (it decodes at 1/8 scale), reaches the encoder as the uploaded bytes, and the
    ingress decodes none of its pixels."""
    spy = _LoadSpy(monkeypatch)
    jpeg = _encoded(Image.new("RGB", (4000, 3000), (180, 90, 40)), "JPEG", quality=70)
    r = client.post("/v1/embed/image", files=_upload(jpeg))
    assert r.status_code == 200, r.text
    assert spy.largest() == 0
    (args,) = service.image_encoder.calls["encode_photo"]
    assert args == (jpeg,)


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (_encoded(Image.new("RGB", (64, 48)), "TIFF"), 415),  # PIL reads it; not a format we take from strangers
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", 415),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, 415),
        (_png_bomb(9000, 9000), 413),  # 81 MP: over the header limit too
    ],
)
def test_unsupported_or_oversized_photos(client, service, data, status):
    r = client.post("/v1/search/image", files=_upload(data, "x.bin", "application/octet-stream"))
    assert r.status_code == status, r.text
    assert service.image_encoder.calls["encode_photo"] == []


def test_photo_refused_by_the_encoder_replica_keeps_its_status():
    """The encoder decodes with the model's own draft size; if it refuses a photo there, the status is the same
    as the ingress check's (413 / 415), not a 422 or a 500."""
    from fastapi.testclient import TestClient
    from tnlbt.serve.deployments import build_api_app

    from tnlbt.data.images import PhotoError

    for reason, status in (("too_large", 413), ("truncated", 415)):
        def refuse(data: bytes, reason: str = reason) -> Any:
            raise PhotoError(reason, "seen by the encoder")

        c = TestClient(build_api_app(_service(refuse)), raise_server_exceptions=False)
        ok = _encoded(Image.new("RGB", (64, 48), "red"), "JPEG")
        assert c.post("/v1/search/image", files=_upload(ok)).status_code == status


def test_busy_decoders_answer_503_with_retry_after():
    from fastapi.testclient import TestClient
    from tnlbt.serve.deployments import build_api_app
    from tnlbt.serve.guards import DecodePool, ReplicaBusy

    async def scenario() -> float:
        pool = DecodePool(slots=1, wait_s=0.05)
        first = asyncio.ensure_future(pool.run(time.sleep, 0.3))
        await asyncio.sleep(0.02)
        t = time.perf_counter()
        with pytest.raises(ReplicaBusy):
            await pool.run(time.sleep, 0)
        waited = time.perf_counter() - t
        await first
        await pool.run(time.sleep, 0)  # a slot is free again
        return waited

    assert 0.04 <= asyncio.run(scenario()) < 1.0  # waited the bounded time, not for the slot

    def busy(data: bytes) -> Any:
        raise ReplicaBusy("all 2 photo decoders busy for 2s; retry")

    c = TestClient(build_api_app(_service(busy)), raise_server_exceptions=False)
    r = c.post("/v1/search/image", files=_upload(_encoded(Image.new("RGB", (64, 48), "red"), "JPEG")))
    assert r.status_code == 503 and int(r.headers["Retry-After"]) > 0 and "decoders busy" in r.json()["detail"]


def test_decode_pool_bounds_concurrency():
    from tnlbt.serve.guards import DecodePool

    running = peak = 0

    def work() -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        time.sleep(0.05)
        running -= 1

    async def burst() -> None:
        pool = DecodePool(slots=2, wait_s=5.0)
        await asyncio.gather(*[pool.run(work) for _ in range(8)])

    asyncio.run(burst())
    assert peak == 2


def test_unhandled_errors_name_no_internals(monkeypatch):
    from fastapi.testclient import TestClient
    from tnlbt.serve.deployments import build_api_app

    class Boom:
        def __repr__(self) -> str:
            return f"<Boom object at {hex(id(self))}>"

    svc = _service()
    monkeypatch.setattr(svc.index, "ready", _Method(lambda: (_ for _ in ()).throw(KeyError(Boom())), []))
    r = TestClient(build_api_app(svc), raise_server_exceptions=False).get("/readyz")
    assert r.status_code == 500 and r.json() == {"detail": "internal error"}


def test_proxy_middleware_turns_no_response_into_503():
    from tnlbt.serve.guards import NoResponseIs503

    async def silent(scope: Any, receive: Any, send: Any) -> None:
        return None  # what Serve's proxy does when the replica died under the request

    async def failing(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("replica died")

    async def fine(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    for inner, status in ((silent, 503), (failing, 503), (fine, 201)):
        st, body, _ = asyncio.run(_asgi(NoResponseIs503(inner), "GET", "/x", [], {}))
        assert st == status, inner
    st, body, _ = asyncio.run(_asgi(NoResponseIs503(silent), "GET", "/x", [], {}))
    assert json.loads(body)["detail"].endswith("retry")


# -- §2 the UI -----------------------------------------------------------------------------------------------
def _ui_handle(svc: Any) -> Any:
    """A handle to the API deployment, as the UI replica has: its methods are the service's."""
    return _Handle(search_text_hits=svc.search_text_hits, search_image_hits=svc.search_image_hits,
                   image_bytes=svc.image_bytes)


@pytest.mark.parametrize(
    ("title", "ingredients", "k", "words"),
    [
        ("cake", "\n".join(f"{i} g flour" for i in range(100_000)), 5, "ingredients"),
        ("t" * 5_000_000, "", 5, "title"),
        ("cake", "flour", 10**6, "k"),
        ("cake", "x" * 501, 5, "ingredients"),
    ],
)
def test_ui_text_goes_through_the_api_validation(title, ingredients, k, words):
    """The UI calls the API's methods through a handle: the same limits as the HTTP routes apply."""
    import gradio as gr
    from tnlbt.serve.deployments import ui_fns

    svc = _service()
    text_fn, _ = ui_fns(_ui_handle(svc))
    with pytest.raises(gr.Error, match=words):
        asyncio.run(text_fn(title, ingredients, "", k))
    assert svc.text_encoder.calls["encode"] == []
    assert asyncio.run(text_fn("cake", "flour\nsugar", "", 3)) == []  # a valid query still works


def test_ui_hands_the_uploaded_bytes_on(tmp_path):
    from tnlbt.serve.deployments import ui_fns

    svc = _service()
    _, image_fn = ui_fns(_ui_handle(svc))
    data = _encoded(Image.new("RGBA", (64, 48), (10, 200, 30, 128)), "PNG")
    p = tmp_path / "dish.png"
    p.write_bytes(data)
    assert asyncio.run(image_fn(str(p), 3)) == []
    assert svc.image_encoder.calls["encode_photo"] == [(data,)]  # not a re-encoded JPEG of a decoded copy


@pytest.fixture(scope="module")
def ui_client():
    from fastapi.testclient import TestClient
    from tnlbt.serve.deployments import ui_app
    from tnlbt.ui.app import build_demo

    seen: dict[str, Any] = {}

    def text_fn(title: str, ingredients: str, instructions: str, k: float) -> list:
        seen["text"] = len(title)
        return []

    def image_fn(path: Any, k: float) -> list:
        seen["image"] = path
        return [["a dish", "salt", 0.5]]

    demo = build_demo(text_fn, image_fn, {}, {}, max_upload_bytes=UPLOAD_LIMIT)
    with TestClient(ui_app(demo, UPLOAD_LIMIT)) as c:
        yield c, demo, seen


def _gradio_call(c: Any, name: str, data: list) -> tuple[str, Any]:
    """Gradio's HTTP API: POST /gradio_api/call/NAME, then read the event stream; ('complete'|'error', data)."""
    r = c.post(f"/gradio_api/call/{name}", json={"data": data})
    assert r.status_code == 200, r.text[:300]
    text = c.get(f"/gradio_api/call/{name}/{r.json()['event_id']}").text
    event = next(ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("event:"))
    payload = next(ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("data:"))
    return event, json.loads(payload) if payload not in ("", "null") else None


def _gradio_upload(c: Any, data: bytes, name: str) -> Any:
    return c.post("/gradio_api/upload", files={"files": (name, data, "application/octet-stream")})


def test_ui_upload_route_has_a_size_limit(ui_client):
    c, _, _ = ui_client
    assert _gradio_upload(c, b"\xff" * (UPLOAD_LIMIT + 1000), "a.jpg").status_code == 413  # Gradio's per-file limit
    assert _gradio_upload(c, b"\xff" * (3 * UPLOAD_LIMIT), "a.jpg").status_code == 413  # ours, from the header
    r = _gradio_upload(c, b"\xff" * 1000, "a.jpg")
    assert r.status_code == 200 and len(r.json()) == 1
    from tnlbt.ui.app import DELETE_CACHE

    _, demo, _ = ui_client
    assert demo.delete_cache == DELETE_CACHE
    assert r.json()[0] in demo.upload_file_set  # tracked: the scheduled clean-up deletes it


def test_ui_json_calls_have_a_body_limit(ui_client):
    c, _, seen = ui_client
    seen.clear()
    r = c.post("/gradio_api/call/search_text", json={"data": ["t" * 5_000_000, "", "", 3]})
    assert r.status_code == 413
    assert "text" not in seen


def test_ui_photo_input_checks_the_header_and_never_decodes(ui_client, monkeypatch):
    c, _, seen = ui_client
    spy = _LoadSpy(monkeypatch)
    for data, name in ((_png_bomb(9000, 9000), "bomb.png"), (b"%PDF-1.4 not a photo", "doc.jpg")):
        seen.clear()
        r = _gradio_upload(c, data, name)
        assert r.status_code == 200, r.text
        event, _ = _gradio_call(c, "search_image", [{"path": r.json()[0], "meta": {"_type": "gradio.FileData"}}, 2])
        assert event == "error" and "image" not in seen, name
    assert spy.largest() == 0  # before: Gradio decoded the 81-MP PNG (243 MB of pixels) for type="pil"
    ok = _encoded(Image.new("RGB", (64, 48), "red"), "JPEG")
    path = _gradio_upload(c, ok, "ok.jpg").json()[0]
    event, out = _gradio_call(c, "search_image", [{"path": path, "meta": {"_type": "gradio.FileData"}}, 2])
    assert event == "complete" and out[0]["data"] == [["a dish", "salt", 0.5]]
    assert Path(seen["image"]).read_bytes() == ok  # the file as uploaded, not a re-encoded copy
