"""The search API through real HTTP on a running Serve instance (tiny model, tiny index), every bad-input
class with its status code, the 503 / timeout paths, the Gradio UI through the Serve proxy, and
serve/config.yaml."""

from __future__ import annotations

import io
import os
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import requests
import yaml
from conftest import free_port
from test_api_hostile import _encoded, _png_bomb
from test_search import COLOURS, _jpeg, build_tiny_index, make_tiny_run
from tnlbt.serve.app import serve_env

# Set at collection, before the session's ray.init (the proxy reads them when it starts): on a busy 2-core box the
# HTTP proxy can take longer than Serve's 5 s readiness check to start, and Serve then kills and restarts it in a
# loop; and the proxy middleware that answers 503 for a replica that died under a request.
serve_env()

REPO = Path(__file__).resolve().parent.parent
UPLOAD_LIMIT = 200_000
TIMEOUT_S = 6.0
WRITE_KEY = "serve-test-write-key-0123456789"


def test_config_yaml_matches_ray_schema_and_builders():
    import tnlbt.serve.app
    from ray.serve.schema import ServeDeploySchema

    doc = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    schema = ServeDeploySchema(**doc)
    apps = {a.name: a for a in schema.applications}
    assert set(apps) == {"api", "ui"}
    assert apps["api"].route_prefix == "/" and apps["ui"].route_prefix == "/ui"
    for a in apps.values():
        mod, fn = a.import_path.split(":")
        assert mod == "tnlbt.serve.app" and callable(getattr(tnlbt.serve.app, fn))
        assert a.args.get("run")
    assert apps["ui"].args["api_app"] == "api"
    with pytest.raises(ValueError, match="run"):
        tnlbt.serve.app.build_app({})


@pytest.fixture(scope="module")
def serve_port(ray_session):
    """One HTTP port for the module: Serve keeps the proxy's options of its first ``serve.start``."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 60})
    return port


@pytest.fixture(scope="module", params=["colocated", "graph"])
def api(request, serve_port, tmp_path_factory):
    """The API (and the UI) in each topology (serve/local.py): every test below runs against both."""
    from ray import serve
    from tnlbt.serve.app import build_app, build_ui_app, wait_ready

    topology = request.param
    root = tmp_path_factory.mktemp(f"serve-{topology}")
    run = make_tiny_run(root)
    meta = build_tiny_index(run)
    port = serve_port
    keys = root / "api-keys"
    keys.write_text(f"# write keys\n{WRITE_KEY}\n")
    args = {
        "run": str(run),
        "api_keys_file": str(keys),
        "cpus": 0.25,
        "max_replicas": 1,
        "max_upload_bytes": UPLOAD_LIMIT,
        "request_timeout_s": TIMEOUT_S,
        "text_batch": 4,
        "image_batch": 4,
        "topology": topology,
    }
    serve.run(build_app(args), name="api", route_prefix="/", blocking=False)
    serve.run(
        build_ui_app({**args, "api_app": "api", "examples": 2}), name="ui", route_prefix="/ui", blocking=False
    )
    base = f"http://127.0.0.1:{port}"
    assert wait_ready(base, timeout_s=240), "API never became ready"
    yield base, run, meta
    serve.delete("ui")
    serve.delete("api")


def _post(base: str, path: str, **kw):
    return requests.post(base + path, timeout=60, **kw)


def _upload(data: bytes, name: str = "dish.jpg", ctype: str = "image/jpeg") -> dict:
    return {"file": (name, io.BytesIO(data), ctype)}


def _embeddings(meta: dict, modality: str) -> tuple[list[str], np.ndarray]:
    rows = [r for r in pq.read_table(meta["embeddings"]).to_pylist() if r["modality"] == modality]
    return [r["id"] for r in rows], np.array([r["vector"] for r in rows], np.float32)


pytestmark = pytest.mark.ray


def test_health_ready_docs(api):
    base, _, _ = api
    assert requests.get(base + "/healthz", timeout=10).json() == {"status": "ok"}
    r = requests.get(base + "/readyz", timeout=30)
    assert r.status_code == 200 and r.json() == {"status": "ready", "recipes": 24, "photos": 36}
    assert requests.get(base + "/docs", timeout=10).status_code == 200
    paths = requests.get(base + "/openapi.json", timeout=10).json()["paths"]
    for p in (
        "/v1/search/text",
        "/v1/search/image",
        "/v1/embed/text",
        "/v1/embed/image",
        "/v1/recipes/{recipe_id}",
        "/v1/images/{image_id}",
        "/v1/info",
        "/healthz",
        "/readyz",
    ):
        assert p in paths, p


def test_search_text_equals_brute_force(api):
    from tnlbt.index.search import brute_force_topk
    from tnlbt.inference import Encoder, RecipeText

    base, run, meta = api
    r = _post(
        base, "/v1/search/text", json={"title": "tomato basil soup", "ingredients": ["1 cup flour"], "k": 5,
                                       "hybrid": False}  # dense: cosine scores (hybrid: tests/test_hybrid.py)
    )
    assert r.status_code == 200, r.text
    hits = r.json()["hits"]
    q = Encoder(run).encode_texts([RecipeText("tomato basil soup", ["1 cup flour"])])[0]
    ids, vec = _embeddings(meta, "image")
    idx, scores = brute_force_topk(vec, q, 5)
    assert [h["image_id"] for h in hits] == [ids[i] for i in idx]
    np.testing.assert_allclose([h["score"] for h in hits], scores, atol=1e-4)
    assert set(hits[0]) == {"image_id", "image_url", "recipe_id", "title", "score"}
    # free text and a filter
    r = _post(
        base, "/v1/search/text", json={"text": "chocolate cake\nsugar", "k": 3, "filter": {"split": "test"}}
    )
    assert r.status_code == 200 and len(r.json()["hits"]) == 3
    r = _post(base, "/v1/search/text", json={"text": "chocolate cake", "k": 3, "filter": {"split": "val"}})
    assert r.status_code == 200 and r.json()["hits"] == []


def test_search_image_and_embeddings(api):
    from tnlbt.index.search import brute_force_topk
    from tnlbt.inference import Encoder, decode_image

    base, run, meta = api
    photo = _jpeg(COLOURS[1], seed=5)
    r = _post(base, "/v1/search/image", files=_upload(photo), data={"k": "4"})
    assert r.status_code == 200, r.text
    hits = r.json()["hits"]
    q = Encoder(run).encode_images([decode_image(photo)])[0]
    ids, vec = _embeddings(meta, "recipe")
    idx, _ = brute_force_topk(vec, q, 4)
    assert [h["id"] for h in hits] == [ids[i] for i in idx]
    assert hits[0]["title"] and hits[0]["ingredients"]
    e = _post(base, "/v1/embed/image", files=_upload(photo)).json()
    assert e["dim"] == 32
    np.testing.assert_allclose(e["vector"], q, atol=1e-5)
    t = _post(base, "/v1/embed/text", json={"title": "cake"}).json()
    assert t["dim"] == 32 and abs(np.linalg.norm(t["vector"]) - 1) < 1e-4


def test_lookups(api):
    base, _, meta = api
    r = requests.get(base + "/v1/recipes/rec003", timeout=30)
    assert r.status_code == 200 and r.json()["id"] == "rec003" and len(r.json()["image_ids"]) == 2
    assert requests.get(base + "/v1/recipes/nope", timeout=30).status_code == 404
    t = pq.read_table(Path(meta["data_dir"]) / "test").to_pylist()
    iid = t[3]["image_ids"][1]
    r = requests.get(base + f"/v1/images/{iid}", timeout=30)
    assert (
        r.status_code == 200 and r.headers["content-type"] == "image/jpeg" and r.content == t[3]["images"][1]
    )
    for bad in ("ffff0abcdef.jpg", "..%2F..%2Fetc%2Fpasswd", "%2e%2e", "x" * 300):
        assert requests.get(base + f"/v1/images/{bad}", timeout=30).status_code == 404, bad


@pytest.mark.parametrize(
    "body",
    [
        {},  # nothing to search for
        {"title": "   "},
        {"text": ""},
        {"text": "x" * 2001},  # oversized free text
        {"title": "y" * 301},
        {"title": "cake", "ingredients": ["z" * 501]},
        {"title": "cake", "ingredients": ["a"] * 51},
        {"title": "cake", "k": 0},
        {"title": "cake", "k": 101},
        {"title": "cake", "k": "many"},
        {"title": "cake", "unknown": 1},
        {"title": "cake", "filter": {"split": "nope"}},
    ],
)
def test_bad_text_requests_are_422(api, body):
    base, _, _ = api
    r = _post(base, "/v1/search/text", json=body)
    assert r.status_code == 422, (body, r.status_code, r.text[:200])


def test_bad_uploads(api):
    base, _, _ = api
    ok = _jpeg(COLOURS[0])
    assert (
        _post(
            base, "/v1/search/image", data=b"{not json", headers={"content-type": "application/json"}
        ).status_code
        == 422
    )
    assert (
        _post(
            base, "/v1/search/text", data=b"{not json", headers={"content-type": "application/json"}
        ).status_code
        == 422
    )
    # over the limit: by header (rejected before the body is parsed) ...
    r = _post(base, "/v1/search/image", files=_upload(b"\xff\xd8\xff" + b"0" * (UPLOAD_LIMIT + 100_000)))
    assert r.status_code == 413, r.text
    # ... and just over it (within the multipart allowance: caught when the file is read)
    r = _post(base, "/v1/search/image", files=_upload(b"\xff\xd8\xff" + b"0" * (UPLOAD_LIMIT + 10)))
    assert r.status_code == 413, r.text
    assert _post(base, "/v1/embed/image", files=_upload(b"0" * (UPLOAD_LIMIT + 100_000))).status_code == 413
    r = _post(base, "/v1/search/image", files=_upload(b"GIF89a but not really", "x.gif", "image/gif"))
    assert r.status_code == 415, r.text
    assert _post(base, "/v1/search/image", files=_upload(ok[: len(ok) // 3])).status_code == 415  # truncated
    assert _post(base, "/v1/embed/image", files=_upload(b"hello", "a.txt", "text/plain")).status_code == 415
    assert _post(base, "/v1/search/image", files=_upload(b"")).status_code == 422
    assert _post(base, "/v1/search/image", data={"k": "3"}).status_code == 422  # no file part
    assert _post(base, "/v1/search/image", files=_upload(ok), data={"k": "0"}).status_code == 422
    assert _post(base, "/v1/search/image", files=_upload(ok), data={"k": "101"}).status_code == 422


def test_hostile_requests_through_the_proxy(api):
    """The guards behind Serve's real proxy and replicas: bounded 422s, the JSON limit on a chunked body, HEAD
    probes, a pixel bomb refused at the ingress, a big JPEG decoded (drafted) in the encoder replica, and the
    UI's upload limit."""
    from PIL import Image

    base, _, _ = api
    assert requests.head(base + "/healthz", timeout=30).status_code == 200
    assert requests.head(base + "/readyz", timeout=30).status_code == 200
    # NaN, and a lone surrogate inside a list (pydantic lets that one through; Ray's serialiser would not)
    for body in ('{"title": "cake", "k": NaN}', '{"title": "cake", "ingredients": ["\\ud800"]}'):
        r = _post(base, "/v1/search/text", data=body, headers={"content-type": "application/json"})
        assert r.status_code == 422 and isinstance(r.json()["detail"], str), (body, r.status_code, r.text[:200])

    def chunked_json():  # 1.2 MiB, chunked: no Content-Length to refuse it by
        yield b'{"title": "'
        for _ in range(20):
            yield b"a" * 65536
        yield b'"}'

    r = _post(base, "/v1/embed/text", data=chunked_json(), headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text[:200]
    r = _post(base, "/v1/search/image", files=_upload(_png_bomb(6000, 6000), "bomb.png", "image/png"))
    assert r.status_code == 413 and "36000000" in r.json()["detail"], r.text[:200]
    photo = _encoded(Image.new("RGB", (2400, 1800), COLOURS[2]), "JPEG", quality=80)
    assert len(photo) < UPLOAD_LIMIT
    r = _post(base, "/v1/embed/image", files=_upload(photo))
    assert r.status_code == 200 and r.json()["dim"] == 32, r.text[:200]
    r = _post(base, "/ui/gradio_api/upload", files={"files": ("a.jpg", io.BytesIO(b"\xff" * (UPLOAD_LIMIT + 1000)))})
    assert r.status_code == 413, r.text[:200]


def test_live_writes_through_serve(api):
    """A recipe and its photo written with the key are found by the next query, filters see them, a wrong key
    and a bad id are refused, and after the delete they are gone."""
    base, _, _ = api
    key = {"Authorization": f"Bearer {WRITE_KEY}"}
    recipe = {"title": "Peanut satay noodles", "ingredients": ["200 g noodles", "3 tbsp peanut butter"],
              "metadata": {"cuisine": "thai"}}
    assert requests.put(base + "/v1/recipes/serve-live-1", json=recipe, timeout=60).status_code == 401
    r = requests.put(base + "/v1/recipes/serve-live-1", json=recipe, headers={"X-API-Key": "x" * 20}, timeout=60)
    assert r.status_code == 403
    assert requests.put(base + "/v1/recipes/..%2Fx", json=recipe, headers=key, timeout=60).status_code in (404, 422)
    r = requests.put(base + "/v1/recipes/serve-live-1", json=recipe, headers=key, timeout=60)
    assert r.status_code == 200 and r.json()["existed"] is False, r.text
    photo = _jpeg(COLOURS[5], seed=11)
    r = requests.put(base + "/v1/photos/serve-live-1.jpg", files=_upload(photo), data={"recipe_id": "serve-live-1"},
                     headers=key, timeout=60)
    assert r.status_code == 200, r.text
    r = requests.put(base + "/v1/photos/x.jpg", files=_upload(photo), data={"recipe_id": "nope"}, headers=key,
                     timeout=60)
    assert r.status_code == 404, r.text  # UnknownItem crosses Ray as itself
    assert requests.get(base + "/v1/recipes/serve-live-1", timeout=30).json()["image_ids"] == ["serve-live-1.jpg"]
    assert requests.get(base + "/v1/images/serve-live-1.jpg", timeout=30).content == photo
    q = {"title": "noodles", "k": 100}
    hits = _post(base, "/v1/search/text", json=q).json()["hits"]
    assert "serve-live-1.jpg" in {h["image_id"] for h in hits}  # the next query sees it
    hits = _post(base, "/v1/search/text", json={**q, "filter": {"must_include": ["peanuts"]}}).json()["hits"]
    assert [h["image_id"] for h in hits] == ["serve-live-1.jpg"]
    hits = _post(base, "/v1/search/text", json={**q, "filter": {"must_exclude": ["Peanut"]}}).json()["hits"]
    assert len(hits) == 36 and "serve-live-1" not in {h["recipe_id"] for h in hits}
    thai = '{"metadata": {"cuisine": "thai"}}'
    r = _post(base, "/v1/search/image", files=_upload(photo), data={"k": "5", "filter": thai})
    assert [h["id"] for h in r.json()["hits"]] == ["serve-live-1"], r.text
    assert requests.get(base + "/readyz", timeout=30).json()["photos"] == 37
    r = requests.delete(base + "/v1/recipes/serve-live-1", headers=key, timeout=60)
    assert r.status_code == 200 and r.json()["existed"] is True
    assert requests.get(base + "/v1/recipes/serve-live-1", timeout=30).status_code == 404
    hits = _post(base, "/v1/search/text", json=q).json()["hits"]
    assert "serve-live-1.jpg" not in {h["image_id"] for h in hits} and len(hits) == 36
    assert requests.get(base + "/readyz", timeout=30).json() == {"status": "ready", "recipes": 24, "photos": 36}


def test_a_replica_that_dies_under_a_request_is_503(api):
    """Serve's proxy answers an empty 500 when the replica dies under the request; the proxy middleware
    (``serve_env``) makes it 503 with Retry-After."""
    from ray import serve

    base, _, _ = api

    @serve.deployment(num_replicas=1, max_ongoing_requests=2, ray_actor_options={"num_cpus": 0})
    class Doomed:
        async def __call__(self, request) -> str:
            if request.url.path.endswith("/die"):
                os._exit(1)
            return "alive"

    serve.run(Doomed.bind(), name="doomed", route_prefix="/doomed", blocking=False)
    try:
        deadline = time.time() + 180
        while requests.get(base + "/doomed/", timeout=30).status_code != 200:
            assert time.time() < deadline, "doomed app never answered"
            time.sleep(1)
        r = requests.get(base + "/doomed/die", timeout=60)
        assert r.status_code == 503 and int(r.headers["Retry-After"]) > 0, (r.status_code, r.text[:200])
        assert "retry" in r.json()["detail"]
    finally:
        serve.delete("doomed")


def _set_fault(**fault) -> None:
    """``set_fault`` of the index: on its own deployment (graph) or on the API replica that holds it (colocated;
    the deployments running say which). Inside an event loop: with RAY_SERVE_THROUGHPUT_OPTIMIZED (serve_env) a
    handle's router runs on the caller's loop, so a plain ``.result()`` from this thread is refused."""
    import asyncio

    from ray import serve

    global _FAULT_LOOP
    colocated = set(serve.status().applications["api"].deployments) == {"SearchAPI"}

    async def call() -> None:
        h = serve.get_deployment_handle("SearchAPI" if colocated else "SearchIndex", app_name="api")
        await asyncio.wait_for(h.set_fault.remote(**fault), 60)

    if _FAULT_LOOP is None:  # one loop for the module: a handle stays bound to the loop it was first used on
        _FAULT_LOOP = asyncio.new_event_loop()
        threading.Thread(target=_FAULT_LOOP.run_forever, daemon=True).start()
    asyncio.run_coroutine_threadsafe(call(), _FAULT_LOOP).result(90)


_FAULT_LOOP = None


def test_store_down_is_503_with_retry_after_then_recovers(api):
    base, _, _ = api
    _set_fault(down=True)
    try:
        r = _post(base, "/v1/search/text", json={"title": "cake", "k": 3})
        assert r.status_code == 503 and int(r.headers["Retry-After"]) > 0, r.text
        assert requests.get(base + "/readyz", timeout=30).status_code == 503
        assert requests.get(base + "/v1/recipes/rec001", timeout=30).status_code == 503
        assert requests.get(base + "/healthz", timeout=30).status_code == 200  # alive, not ready
    finally:
        _set_fault()
    assert _post(base, "/v1/search/text", json={"title": "cake", "k": 3}).status_code == 200


def test_slow_backend_times_out_instead_of_hanging(api):
    base, _, _ = api
    _set_fault(delay_s=TIMEOUT_S + 4)
    try:
        t = time.perf_counter()
        r = _post(base, "/v1/search/text", json={"title": "cake", "k": 3})
        took = time.perf_counter() - t
        assert r.status_code == 504, r.text
        assert took < TIMEOUT_S + 3
    finally:
        _set_fault()
    time.sleep(TIMEOUT_S + 4)  # let the delayed call drain before the next test


def test_ui_through_serve_with_gradio_client(api):
    from gradio_client import Client, handle_file

    base, run, _ = api
    assert requests.get(base + "/ui/", timeout=30).status_code == 200
    c = Client(base + "/ui/", verbose=False)
    names = set(c.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/search_text", "/search_image"} <= names
    gal = c.predict("tomato soup", "1 cup flour", "", 3, api_name="/search_text")
    assert len(gal) == 3 and all("(" in g["caption"] for g in gal)
    p = run.parent / "q.jpg"
    p.write_bytes(_jpeg(COLOURS[3]))
    tab = c.predict(handle_file(str(p)), 2, api_name="/search_image")
    assert len(tab["data"]) == 2 and tab["headers"] == ["title", "ingredients", "score"]


@pytest.mark.parametrize(("gpus", "device"), [(0, "cpu"), (0.5, "cuda")])
def test_encoder_replicas_ask_for_gpus_when_told(monkeypatch, gpus, device):
    """``gpus`` puts the two encoder deployments on GPUs (num_gpus + device); the rest stays on CPUs."""
    from tnlbt.serve.app import build_app

    import tnlbt.runs as runs

    monkeypatch.setattr(runs, "read_index_meta", lambda run: {})
    monkeypatch.setattr(runs, "index_checkpoint", lambda run, meta: "/ckpt")
    app = build_app({"run": "/some/run", "gpus": gpus, "topology": "graph"})
    api = app._bound_deployment
    bound = [a._bound_deployment for a in (*api.init_args, *api.init_kwargs.values())
             if hasattr(a, "_bound_deployment")]
    by_name = {b.name: b for b in bound}
    for name in ("TextEncoder", "ImageEncoder"):
        assert by_name[name].init_kwargs["device"] == device
        assert by_name[name].ray_actor_options.get("num_gpus", 0) == gpus
    assert "num_gpus" not in by_name["SearchIndex"].ray_actor_options
    assert "num_gpus" not in api.ray_actor_options


@pytest.mark.parametrize(("args", "colocated"), [
    ({}, True),  # auto + an embedded store: one process holds it all
    ({"qdrant_url": "http://qdrant:6333"}, False),  # auto + a server: every part its own deployment
    ({"qdrant_url": "http://qdrant:6333", "topology": "colocated"}, True),
    ({"topology": "graph"}, False),
])
def test_topology_auto_follows_the_store(monkeypatch, args, colocated):
    """``topology: auto`` is colocated with an embedded store and a graph with a Qdrant server; colocated binds
    the API alone (no handles), with the model's GPU share and one replica unless the store is a server."""
    from tnlbt.serve.app import build_app

    import tnlbt.runs as runs

    monkeypatch.setattr(runs, "read_index_meta", lambda run: {})
    monkeypatch.setattr(runs, "index_checkpoint", lambda run, meta: "/ckpt")
    api = build_app({"run": "/some/run", "gpus": 0.5, **args})._bound_deployment
    handles = [a for a in (*api.init_args, *api.init_kwargs.values()) if hasattr(a, "_bound_deployment")]
    assert api.name == "SearchAPI"
    if not colocated:
        assert len(handles) == 3 and "colocated" not in api.init_kwargs
        return
    assert handles == [] and api.init_args == (None, None, None)
    parts = api.init_kwargs["colocated"]
    assert parts["checkpoint_dir"] == "/ckpt" and parts["device"] == "cuda" and parts["run"] == "/some/run"
    assert api.ray_actor_options["num_gpus"] == 0.5
    embedded = "qdrant_url" not in args
    assert (api._deployment_config.autoscaling_config is None) == embedded  # an embedded store: exactly 1
    assert api.num_replicas == 1 or not embedded
