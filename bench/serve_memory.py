"""Peak memory of the serving path under hostile bursts, in process: the API's FastAPI app (ingress) and the
image encoder's decode step, called through raw ASGI exactly as the replicas run them, without the model.

    .venv/bin/python bench/serve_memory.py                     # every scenario -> bench/results/serve_memory.json
    .venv/bin/python bench/serve_memory.py --scenario bombs    # one, printed

Each scenario runs in a fresh subprocess and reports the rise of its peak RSS (``VmHWM``) over the idle process,
and how much of it is still resident afterwards (``VmRSS``):

* ``bombs``: 4 concurrent uploads of a 36-MP all-black PNG (~100 kB each, 108 MB of pixels);
* ``json``: 4 concurrent 50 MB JSON bodies (chunked, so no Content-Length to refuse them by);
* ``worst``: 8 concurrent uploads of the largest photo the limits admit (a 15.9-MP RGBA PNG, 4608 x 3456).

The ImageEncoder stand-in decodes what it receives with the code of the checkout it runs (the old code decoded
at the ingress and sent pixels; the new code sends bytes and decodes in a bounded pool), and keeps the
transform's input size. Run it with ``PYTHONPATH`` pointing at an older install for a before / after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results" / "serve_memory.json"
SCENARIOS = ("bombs", "json", "worst")


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _png(w: int, h: int, channels: int) -> bytes:
    """A valid all-zero PNG (colour type 2 = RGB, 6 = RGBA), compressed row by row."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    z = zlib.compressobj(9)
    row = b"\x00" * (1 + channels * w)
    idat = b"".join(z.compress(row) for _ in range(h)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2 if channels == 3 else 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _multipart(data: bytes) -> tuple[bytes, str]:
    b = "XbenchX"
    head = (f'--{b}\r\nContent-Disposition: form-data; name="file"; filename="p.png"\r\n'
            "Content-Type: image/png\r\n\r\n").encode()
    return head + data + f"\r\n--{b}--\r\n".encode(), f"multipart/form-data; boundary={b}"


async def _request(app: Any, path: str, chunks: Any, ctype: str, length: int | None) -> int:
    sent: list[dict] = []
    it = iter(chunks)

    async def receive() -> dict:
        c = next(it, None)
        if c is None:
            return {"type": "http.request", "body": b"", "more_body": False}
        return {"type": "http.request", "body": c, "more_body": True}

    async def send(msg: dict) -> None:
        sent.append(msg)

    headers = [(b"content-type", ctype.encode())]
    framing = (b"content-length", str(length).encode()) if length is not None else (b"transfer-encoding", b"chunked")
    headers.append(framing)
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"", "headers": headers,
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    await app(scope, receive, send)
    return next(m["status"] for m in sent if m["type"] == "http.response.start")


def _app() -> Any:
    """The API app over stand-in handles; the image encoder stand-in runs the checkout's decode step."""
    import pickle

    import tnlbt.serve.deployments as D

    from tnlbt.inference import decode_image

    def tensorish(img: Any) -> Any:
        w, h = img.size
        s = 256 / min(w, h)
        return img.resize((max(1, round(w * s)), max(1, round(h * s))))  # what the transform keeps of it

    pool = None
    if hasattr(D, "DecodePool"):  # this checkout decodes in the encoder replica, in a bounded pool
        pool = D.DecodePool(2, 2.0)

    class Method:
        def __init__(self, fn: Any) -> None:
            self.fn = fn

        def remote(self, *a: Any) -> Any:
            return self.fn(*a)

    class Handle:
        def __init__(self, **fns: Any) -> None:
            for k, f in fns.items():
                setattr(self, k, Method(f))

    async def encode_photo(data: bytes) -> list[float]:
        assert pool is not None
        await pool.run(lambda: tensorish(decode_image(data)))
        return [0.0] * 4

    async def encode(img: Any) -> list[float]:  # the old path: a decoded image, pickled across Ray
        blob = pickle.dumps(img)
        tensorish(pickle.loads(blob))
        return [0.0] * 4

    async def vec(*a: Any) -> list[float]:
        return [0.0] * 4

    async def nothing(*a: Any) -> list:
        return []

    image = Handle(encode_photo=encode_photo, encode=encode)
    cls = getattr(D, "SearchService", None) or D.SearchAPI.func_or_class.__bases__[0]
    svc = cls(Handle(encode=vec), image, Handle(search_photos=nothing, search_recipes=nothing),
              max_upload_bytes=8 * 1024 * 1024, request_timeout_s=120.0)
    return D.build_api_app(svc)


def run_scenario(name: str) -> dict[str, Any]:
    """In this process: build the app, measure the idle peak, fire the burst, measure again."""
    app = _app()
    if name == "json":
        piece = b"a" * (1024 * 1024)

        def body() -> Any:
            yield b'{"title": "cake", "ingredients": ["'
            for _ in range(50):
                yield piece
            yield b'"]}'

        reqs = [("/v1/search/text", body(), "application/json", None) for _ in range(4)]
    else:
        data = _png(6000, 6000, 3) if name == "bombs" else _png(4608, 3456, 4)
        n = 4 if name == "bombs" else 8
        payload, ctype = _multipart(data)
        reqs = [("/v1/search/image", [payload], ctype, len(payload)) for _ in range(n)]
    base_hwm, base_rss = _status_kb("VmHWM"), _status_kb("VmRSS")
    t = time.perf_counter()

    async def burst() -> list[int]:
        return list(await asyncio.gather(*[_request(app, *r) for r in reqs]))

    statuses = asyncio.run(burst())
    took = time.perf_counter() - t
    time.sleep(0.5)
    return {
        "requests": len(reqs),
        "statuses": sorted(set(statuses)),
        "peak_rise_mb": round((_status_kb("VmHWM") - base_hwm) / 1024, 1),
        "resident_after_mb": round((_status_kb("VmRSS") - base_rss) / 1024, 1),
        "seconds": round(took, 2),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenario", choices=SCENARIOS)
    ap.add_argument("--label", default="", help="results key (default: 'current')")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(run_scenario(a.scenario)))
        return 0
    out: dict[str, Any] = {"loadavg_at_start": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count()}
    for name in [a.scenario] if a.scenario else SCENARIOS:
        # a fresh process per scenario: peak RSS only ever grows, and glibc keeps what it once took
        r = subprocess.run([sys.executable, "-P", __file__, "--child", "--scenario", name], capture_output=True,
                           text=True, timeout=600, env=os.environ)
        if r.returncode != 0:
            print(r.stderr[-2000:], file=sys.stderr)
            return 1
        out[name] = json.loads(r.stdout.strip().splitlines()[-1])
        print(name, out[name], flush=True)
    out["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    if not a.scenario:
        results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        results[a.label or "current"] = out
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
