"""The colocated topology: the two encoders and the embedded index inside the API replica's own process.

Why it exists. On one node with an embedded store, the graph topology (``serve/deployments.py``'s diagram) buys
nothing: the index is exactly one replica anyway and the encoders share the node's cores. What it costs is three
actor hops per search, each paying Serve's routing, serialisation and metrics (issue 13 measured ~17 ms of CPU a
request of which ~3.3 ms was the work). Here the parts are plain objects called on the API replica's threads,
and one model serves both modalities (one copy in memory, not two).

The parts look like deployment handles to :class:`~tnlbt.serve.deployments.SearchService`
(``part.method.remote(...)`` is an awaitable), so the validation, limits, timeouts and error mapping are one code
path for both topologies.

:class:`Batcher` replaces ``@serve.batch`` here: the model runs one batch at a time on its own thread and whatever
arrived while it ran is the next batch. There is no timer, so at low load a request runs at once
(``batch_wait_timeout_s`` is pure latency there) and under load batches fill by themselves.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any


class Batcher:
    """``await submit(item)`` -> ``fn([items...])[i]``: at most one ``fn`` call at a time, on ``executor``, over
    everything queued (up to ``max_batch``) when the previous call returned. A failing call fails every request
    of its batch; a request cancelled while waiting is dropped from the next batch."""

    def __init__(self, fn: Callable[[list[Any]], Sequence[Any]], max_batch: int, executor: Executor) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.fn, self.max_batch, self.executor = fn, int(max_batch), executor
        self._queue: deque[tuple[Any, asyncio.Future]] = deque()
        self._draining = False
        self.batches = 0  # calls of fn so far (tests and the bench read the mean batch size from these)
        self.items = 0

    async def submit(self, item: Any) -> Any:
        fut = asyncio.get_running_loop().create_future()
        self._queue.append((item, fut))
        if not self._draining:
            self._draining = True
            asyncio.get_running_loop().create_task(self._drain())
        return await fut

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._queue:
                batch: list[tuple[Any, asyncio.Future]] = []
                while self._queue and len(batch) < self.max_batch:
                    item, fut = self._queue.popleft()
                    if not fut.done():  # cancelled (its request timed out or the client left)
                        batch.append((item, fut))
                if not batch:
                    continue
                self.batches += 1
                self.items += len(batch)
                try:
                    out = await loop.run_in_executor(self.executor, self.fn, [i for i, _ in batch])
                    if len(out) != len(batch):
                        raise RuntimeError(f"batch function returned {len(out)} results for {len(batch)} items")
                except Exception as e:  # handed to every caller of this batch
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(e)
                else:
                    for (_, fut), r in zip(batch, out, strict=True):
                        if not fut.done():
                            fut.set_result(r)
        finally:
            self._draining = False


def as_handle(obj: Any) -> Any:
    """``obj`` behind the deployment-handle call syntax: ``h.name.remote(*a)`` is ``obj.name(*a)`` (a coroutine
    function's call, awaitable as a ``DeploymentResponse`` is)."""

    class _Handle:
        def __getattr__(self, name: str) -> Any:
            return SimpleNamespace(remote=getattr(obj, name))

    return _Handle()


class _TextPart:
    def __init__(self, enc: Any, batch: Batcher) -> None:
        self.enc, self.batch = enc, batch

    async def encode(self, query: dict[str, Any]) -> list[float]:
        return await self.batch.submit(query)

    async def dim(self) -> int:
        return self.enc.dim


class _ImagePart:
    def __init__(self, enc: Any, batch: Batcher, decode_slots: int, decode_wait_s: float) -> None:
        from tnlbt.serve.guards import DecodePool

        self.enc, self.batch = enc, batch
        self.decoder = DecodePool(decode_slots, decode_wait_s)  # the same bound as the ImageEncoder replica's

    async def encode_photo(self, data: bytes) -> list[float]:
        x = await self.decoder.run(self.enc.photo_tensor, data)
        return await self.batch.submit(x)

    async def dim(self) -> int:
        return self.enc.dim


class _IndexPart:
    """The :class:`~tnlbt.serve.deployments.SearchIndex` class itself (not a deployment), its calls on one thread
    of their own: one at a time, as on its replica, and never on the event loop."""

    def __init__(self, index: Any) -> None:
        self.index = index
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="index")

    def __getattr__(self, name: str) -> Any:
        fn = getattr(self.index, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            return await asyncio.get_running_loop().run_in_executor(self._thread, lambda: fn(*args, **kwargs))

        return call


def colocated_parts(
    checkpoint_dir: str,
    run: str,
    store: dict[str, Any] | None,
    text_batch: int = 16,
    image_batch: int = 8,
    num_threads: int = 0,
    device: str = "cpu",
    decode_slots: int = 2,
    decode_wait_s: float = 2.0,
) -> tuple[Any, Any, Any]:
    """(text encoder, image encoder, index) as handle-like parts of this process: one :class:`Encoder` (one
    model thread for both modalities, so a text and a photo batch never fight over the cores) and the
    ``SearchIndex`` class. Call from inside a running replica (the event loop is the replica's)."""
    from tnlbt.serve.deployments import SearchIndex

    from tnlbt.inference import Encoder, RecipeText

    enc = Encoder(checkpoint_dir, device=device, num_threads=num_threads)
    model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")

    def texts(queries: list[dict[str, Any]]) -> list[list[float]]:
        return [v.tolist() for v in enc.encode_texts([RecipeText(**q) for q in queries])]

    def tensors(xs: list[Any]) -> list[list[float]]:
        return [v.tolist() for v in enc.encode_tensors(xs)]

    text = _TextPart(enc, Batcher(texts, text_batch, model_thread))
    image = _ImagePart(enc, Batcher(tensors, image_batch, model_thread), decode_slots, decode_wait_s)
    index = _IndexPart(SearchIndex.func_or_class(run, store=store))
    return as_handle(text), as_handle(image), as_handle(index)
