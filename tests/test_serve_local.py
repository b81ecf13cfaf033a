"""The colocated topology without Ray (serve/local.py): the opportunistic batcher, and the in-process parts
against their twins (the Encoder and IndexReader called directly)."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from test_search import COLOURS, _jpeg, build_tiny_index, make_tiny_run
from tnlbt.serve.local import Batcher


def _run(coro):
    return asyncio.run(coro)


def test_batcher_runs_at_once_when_idle_and_batches_what_queued_while_busy():
    calls: list[list[int]] = []
    running = threading.Lock()

    def fn(xs: list[int]) -> list[int]:
        assert running.acquire(blocking=False), "two batches ran at once"
        try:
            calls.append(list(xs))
            time.sleep(0.05)
            return [x * 10 for x in xs]
        finally:
            running.release()

    async def main() -> None:
        b = Batcher(fn, max_batch=4, executor=ThreadPoolExecutor(2))
        t = time.perf_counter()
        assert await b.submit(1) == 10  # alone: one call of one, no timer to wait for
        assert time.perf_counter() - t < 0.045 + 0.05
        out = await asyncio.gather(*(b.submit(x) for x in range(2, 12)))
        assert out == [x * 10 for x in range(2, 12)]
        assert b.items == 11 and b.batches == len(calls)

    _run(main())
    assert calls[0] == [1]
    # the ten arrived together: the first runs as soon as it is queued, the rest fill batches of at most 4
    assert all(len(c) <= 4 for c in calls) and sorted(x for c in calls[1:] for x in c) == list(range(2, 12))
    assert max(len(c) for c in calls) == 4


def test_batcher_failure_reaches_its_whole_batch_and_the_next_batch_still_runs():
    def fn(xs: list[int]) -> list[int]:
        if -1 in xs:
            raise ValueError("bad item in batch")
        return xs

    async def main() -> None:
        b = Batcher(fn, max_batch=8, executor=ThreadPoolExecutor(1))
        first = asyncio.ensure_future(b.submit(0))  # running while the next two queue up together
        await asyncio.sleep(0)
        r = await asyncio.gather(b.submit(-1), b.submit(5), return_exceptions=True)
        assert await first == 0
        assert all(isinstance(e, ValueError) for e in r), r
        assert await b.submit(7) == 7

    _run(main())


def test_batcher_drops_a_request_cancelled_while_waiting_and_checks_lengths():
    seen: list[list[str]] = []
    gate = threading.Event()

    def fn(xs: list[str]) -> list[str]:
        seen.append(list(xs))
        gate.wait(5)
        return xs

    async def main() -> None:
        b = Batcher(fn, max_batch=8, executor=ThreadPoolExecutor(1))
        busy = asyncio.ensure_future(b.submit("busy"))
        await asyncio.sleep(0.01)
        gone = asyncio.ensure_future(b.submit("gone"))
        kept = asyncio.ensure_future(b.submit("kept"))
        await asyncio.sleep(0.01)
        gone.cancel()  # its client left (or the request timed out) while the model was busy
        gate.set()
        assert await busy == "busy" and await kept == "kept"
        bad = Batcher(lambda xs: xs[:-1], max_batch=2, executor=ThreadPoolExecutor(1))
        with pytest.raises(RuntimeError, match="returned 0 results for 1"):
            await bad.submit("x")

    _run(main())
    assert seen == [["busy"], ["kept"]]
    with pytest.raises(ValueError):
        Batcher(lambda xs: xs, max_batch=0, executor=ThreadPoolExecutor(1))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    run = make_tiny_run(tmp_path_factory.mktemp("local"))
    meta = build_tiny_index(run, store_kind="edge")
    return run, meta


def test_colocated_parts_match_the_encoder_and_the_index_called_directly(tiny):
    """The in-process parts give what the Encoder and IndexReader give (the graph's replicas run the same
    two), through the handle call syntax SearchService uses, for a text and a photo search, and the fault hook."""
    from tnlbt.serve.local import colocated_parts

    from tnlbt.index.search import IndexReader
    from tnlbt.index.store import StoreUnavailable
    from tnlbt.inference import Encoder, RecipeText
    from tnlbt.runs import index_checkpoint, read_index_meta

    run, _ = tiny
    ckpt = str(index_checkpoint(run, read_index_meta(run)))
    enc = Encoder(ckpt)
    q = RecipeText("tomato soup", ["1 cup tomato", "salt"], ["boil"])
    photo = _jpeg(COLOURS[2])
    want = enc.encode_texts([q])[0]
    pwant = enc.encode_tensors([enc.photo_tensor(photo)])[0]
    reader = IndexReader.from_run(run)  # closed before the parts open the same embedded store
    try:
        ref_hits = [h["image_id"] for h in reader.search_photos(want.tolist(), 5, None)]
        ref_recs = [h["id"] for h in reader.search_recipes(pwant.tolist(), 3, None)]
    finally:
        reader.close()

    async def main() -> tuple:
        text, image, index = colocated_parts(ckpt, str(run), None, text_batch=4, image_batch=2)
        vecs = await asyncio.gather(*(text.encode.remote(q.as_dict()) for _ in range(5)))
        pvec = await image.encode_photo.remote(photo)
        hits = await index.search_photos.remote(vecs[0], 5, None, None)
        recs = await index.search_recipes.remote(pvec, 3, None)
        ready = await index.ready.remote()
        dim = await text.dim.remote()
        await index.set_fault.remote(down=True)
        with pytest.raises(StoreUnavailable):  # the fault hook reaches the colocated index too
            await index.search_photos.remote(vecs[0], 5, None, None)
        return vecs, pvec, hits, recs, ready, dim

    vecs, pvec, hits, recs, ready, dim = _run(main())
    for v in vecs:  # batched (up to 4 at once) or alone: the same vector
        np.testing.assert_allclose(v, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pvec, pwant, rtol=1e-5, atol=1e-6)
    assert [h["image_id"] for h in hits] == ref_hits and [h["id"] for h in recs] == ref_recs
    assert ready == {"recipes": 24, "photos": 36} and dim == len(want)


def test_wait_ready_waits_for_every_path_in_turn():
    """``tnlbt serve`` says "ready" only when the API and the UI both answer: a path that keeps failing makes
    it False at the deadline, and one that comes up late is waited for."""
    import http.server

    from tnlbt.serve.app import wait_ready

    up_at = [float("inf")]  # /ui/ answers 404 until then, as the UI application does after the API's start

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            ok = self.path == "/readyz" or (self.path == "/ui/" and time.monotonic() > up_at[0])
            self.send_response(200 if ok else 404)
            self.end_headers()

        def log_message(self, *_a) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        assert not wait_ready(base, timeout_s=2.5, paths=("/readyz", "/ui/"))
        up_at[0] = time.monotonic() + 1.5
        t = time.perf_counter()
        assert wait_ready(base, timeout_s=10, paths=("/readyz", "/ui/"))
        assert time.perf_counter() - t >= 0.5  # it did wait for the late one
    finally:
        srv.shutdown()
