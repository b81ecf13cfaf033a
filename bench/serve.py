"""Serve benchmark: latency percentiles and requests/s for text->photos and photo->recipes at several
concurrencies, with the error count.

    .venv/bin/python bench/serve.py --url http://127.0.0.1:8000            # an API that is already running
    .venv/bin/python bench/serve.py --index-size 10000 --preset tiny_test   # build a bench index and serve it
    .venv/bin/python bench/serve.py --index-size 100000 --index-setting quantization=none  # a float32 index

Without ``--url`` the script builds a throw-away run: a randomly initialised model of ``--preset``, a few real
recipes embedded with it, and the photo / recipe collections padded with random unit vectors up to
``--index-size`` points each (the search cost depends on the number of vectors, not on their meaning), then
starts Serve in-process on a free port. Results go to ``bench/results/serve.json`` (merged by setting).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_quiet.py: the quiet-box rule

import _quiet

from tnlbt.config import SERVE_PROXIES, SERVE_TOPOLOGIES

RESULTS = Path(__file__).resolve().parent / "results" / "serve.json"
WORDS = [
    *[
        "tomato",
        "basil",
        "soup",
        "chocolate",
        "cake",
        "flour",
        "sugar",
        "butter",
        "egg",
        "milk",
        "salt",
        "pepper",
        "garlic",
        "onion",
        "chicken",
    ],
    *[
        "rice",
        "beans",
        "lemon",
        "pasta",
        "cheese",
        "bake",
        "boil",
        "stir",
        "mix",
        "chop",
        "serve",
        "oven",
        "pan",
        "minutes",
        "cream",
    ],
]


def _jpeg(rng: np.random.Generator, size: int = 256) -> bytes:
    from PIL import Image

    base = rng.integers(0, 255, 3)
    arr = np.clip(base[None, None, :] + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def build_bench_run(root: Path, preset: str, index_size: int, store: str, n_real: int = 64,
                    settings: Any = None) -> Path:
    """Random-init model, ``n_real`` embedded recipes, random padding up to ``index_size`` per collection."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from tnlbt.config import Config
    from tnlbt.data.schema import rows_to_table
    from tnlbt.data.vocab import Vocab, encode_recipe_text
    from tnlbt.index.embed import IndexEmbedder, load_into_store
    from tnlbt.index.store import open_store
    from tnlbt.models import create_model, save_model
    from tnlbt.runs import default_store_path, write_index_meta

    processed = root / "processed"
    cfg = Config.load(preset, [f"data.processed_dir={processed}"])
    tokens = ["<pad>", "<start>", "<end>", *WORDS, "<unk>"]
    torch.manual_seed(0)
    model = create_model(cfg, len(tokens), 12)
    run = root / "runs" / "bench"
    ckpt = run / "checkpoints" / "best"
    save_model(ckpt, model, cfg, tokens, WORDS[:12])
    vocab = Vocab.load(ckpt / "vocab.json")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n_real):
        w = rng.choice(WORDS, 6, replace=False)
        title, ingr, instr = " ".join(w[:3]), [f"1 cup {w[3]}", w[4]], [f"{w[5]} well"]
        rows.append(
            {
                "id": f"real{i}",
                "partition": "test",
                "has_image": True,
                **encode_recipe_text(vocab, cfg.data, title, ingr, instr),
                "ingredient_labels": [1],
                "image_ids": [f"{i:06x}real.jpg"],
                "images": [_jpeg(rng, cfg.data.image_short_side)],
                "title": title,
                "ingredients": ingr,
                "instructions": instr,
            }
        )
    (processed / "test").mkdir(parents=True, exist_ok=True)
    table = rows_to_table(rows)
    pq.write_table(table, processed / "test" / "part-00000.parquet")
    t = IndexEmbedder(str(ckpt))(table)
    rec = t.filter(pa.compute.equal(t["modality"], "recipe"))
    pho = t.filter(pa.compute.equal(t["modality"], "image"))
    d = int(cfg.model.embed_dim)

    def pad(tab: pa.Table, n: int, prefix: str, cols: dict) -> pa.Table:
        extra = max(0, n - len(tab))
        v = rng.standard_normal((extra, d)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        ids = [f"{prefix}{i:07d}" + (".jpg" if prefix == "p" else "") for i in range(extra)]
        add = {"id": ids, "vector": pa.array(list(v), pa.list_(pa.float32()))}
        for c, fn in cols.items():
            add[c] = [fn(i) for i in range(extra)]
        add_t = pa.table(add)
        base = tab.select(add_t.column_names)
        return pa.concat_tables([base, add_t.cast(base.schema)])

    rec = pad(
        rec,
        index_size,
        "r",
        {
            "title": lambda i: f"padding recipe {i}",
            "ingredients": lambda i: ["salt"],
            "instructions": lambda i: "mix",
            "image_ids": lambda i: [],
            "split": lambda i: "test",
        },
    )
    pho = pad(
        pho,
        index_size,
        "p",
        {"recipe_id": lambda i: f"r{i:07d}", "title": lambda i: f"padding {i}", "split": lambda i: "test"},
    )
    path = default_store_path(run, store)
    st = open_store(store, path=path, settings=settings)
    try:
        info = load_into_store(st, rec, pho, "v1", keep=1)
        applied = st.settings.to_dict()
    finally:
        st.close()
    write_index_meta(
        run,
        {
            **info,
            "store": store,
            "qdrant_url": None,
            "store_path": path,
            "split": "test",
            "data_dir": str(processed),
            "checkpoint": str(ckpt),
            "dim": d,
            "image_root": "",
            "index_settings": applied,
        },
    )
    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


WRITE_KEY = "bench-serve-write-key-0123456789abcdef"  # the bench run's own key (TNLBT_API_KEY), writes only


async def _load(url: str, kind: str, concurrency: int, duration: float, payloads: list, k: int,
                write_share: float) -> tuple[dict[str, list[float]], dict[str, int], float]:
    """``concurrency`` asyncio clients on one aiohttp session (a cheap generator: one thread, no per-client
    Python threads competing with the server for the two cores). Every ``1/write_share``-th request of a client
    is a ``PUT /v1/recipes/bench-w-N`` (embed + upsert + changes log), the rest are searches of ``kind``."""
    import aiohttp

    lat: dict[str, list[float]] = {"read": [], "write": []}
    codes: dict[str, int] = {}
    every = round(1 / write_share) if write_share > 0 else 0
    auth = {"Authorization": f"Bearer {WRITE_KEY}"}
    stop_at = time.perf_counter() + duration

    async def one(session: aiohttp.ClientSession, n: int, p: Any) -> tuple[str, str]:
        if every and n % every == every - 1:
            w = n % 200
            body = {"title": f"bench write {w}", "ingredients": ["1 cup flour", "salt"], "instructions": ["mix"]}
            async with session.put(f"{url}/v1/recipes/bench-w-{w}", json=body, headers=auth) as r:
                await r.read()
                return "write", str(r.status)
        if kind == "text":
            async with session.post(f"{url}/v1/search/text", json={"title": p, "k": k}) as r:
                await r.read()
                return "read", str(r.status)
        form = aiohttp.FormData()
        form.add_field("file", p, filename="q.jpg", content_type="image/jpeg")
        form.add_field("k", str(k))
        async with session.post(f"{url}/v1/search/image", data=form) as r:
            await r.read()
            return "read", str(r.status)

    async def client(session: aiohttp.ClientSession, wid: int) -> None:
        n = wid
        while time.perf_counter() < stop_at:
            t = time.perf_counter()
            try:
                what, code = await one(session, n, payloads[n % len(payloads)])
            except Exception as e:  # a timeout / reset counts as an error, the run goes on
                what, code = "read", type(e).__name__
            n += concurrency
            codes[code] = codes.get(code, 0) + 1
            if code == "200":
                lat[what].append((time.perf_counter() - t) * 1e3)

    timeout = aiohttp.ClientTimeout(total=30)
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(timeout=timeout, connector=conn) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(session, w) for w in range(concurrency)))
        wall = time.perf_counter() - t0
    return lat, codes, wall


def load(url: str, kind: str, concurrency: int, duration: float, payloads: list, k: int = 10,
         write_share: float = 0.0) -> dict:
    lat, codes, wall = asyncio.run(_load(url, kind, concurrency, duration, payloads, k, write_share))

    def pct(xs: list[float], q: float) -> float:
        return round(float(np.percentile(xs, q)), 1) if xs else float("nan")

    n_ok = codes.get("200", 0)
    out = {
        "endpoint": "text->photos" if kind == "text" else "photo->recipes",
        "concurrency": concurrency,
        "write_share": write_share,
        "duration_s": round(wall, 1),
        "requests": sum(codes.values()),
        "ok": n_ok,
        "errors": sum(codes.values()) - n_ok,
        "status_counts": codes,
        "rps": round(n_ok / wall, 2),
        "p50_ms": pct(lat["read"], 50),
        "p95_ms": pct(lat["read"], 95),
        "p99_ms": pct(lat["read"], 99),
    }
    if write_share:
        out.update({"writes_ok": len(lat["write"]), "write_p50_ms": pct(lat["write"], 50),
                    "write_p99_ms": pct(lat["write"], 99)})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None, help="benchmark a running API instead of starting one")
    p.add_argument("--preset", default="tiny_test", help="model preset for the bench run (random init)")
    p.add_argument("--index-size", type=int, default=10_000, help="points per collection")
    p.add_argument("--store", default="edge", choices=["qdrant", "edge"])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--duration", type=float, default=60.0, help="seconds per (endpoint, concurrency)")
    p.add_argument("--endpoints", nargs="+", default=["text", "image"], choices=["text", "image"])
    p.add_argument("--cpus", type=float, default=0.0, help="CPUs per encoder replica (0 = fit the box)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--note", default="")
    p.add_argument("--index-setting", action="append", default=[], metavar="KEY=VALUE",
                   help="index settings of the bench index (tnlbt/index/store.py IndexSettings); repeatable")
    p.add_argument("--topology", default="auto", choices=SERVE_TOPOLOGIES,
                   help="serve.topology of the bench app (serve/local.py)")
    p.add_argument("--write-shares", type=float, nargs="+", default=[0.0, 0.1],
                   help="share of requests that are writes (PUT /v1/recipes/ID), one row each (text endpoint)")
    p.add_argument("--serve-mode", default="throughput", choices=["default", "throughput"],
                   help="RAY_SERVE_THROUGHPUT_OPTIMIZED=1 (throughput, what tnlbt serve sets) or 0 for this Ray")
    p.add_argument("--proxy", default="python", choices=SERVE_PROXIES, help="serve_env's proxy")
    _quiet.add_arguments(p)
    a = p.parse_args(argv)
    quiet = _quiet.from_args(a, "bench/serve.py")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["TNLBT_API_KEY"] = WRITE_KEY  # read by the app builder in this process: writes are on
    url = a.url
    setting = ({"index_size": a.index_size, "preset": a.preset, "store": a.store, "topology": a.topology,
                "serve_mode": a.serve_mode, "proxy": a.proxy} if not url else {"url": url})
    settings = None
    if not url:
        from tnlbt.index.store import IndexSettings

        settings = IndexSettings.parse(a.index_setting)
        # Keyed by every setting that differs from the defaults, so float32 and int8 runs are kept side by side.
        changed = {k: v for k, v in settings.to_dict().items() if v != getattr(IndexSettings(), k)}
        setting["index_settings"] = changed or "defaults"
    if not url:
        import ray
        from tnlbt.serve.app import run_local, serve_env, wait_ready

        root = Path(tempfile.mkdtemp(prefix="bench_serve_"))
        t = time.perf_counter()
        run = build_bench_run(root, a.preset, a.index_size, a.store, settings=settings)
        print(
            f"bench run with {a.index_size} points per collection built in {time.perf_counter() - t:.0f}s",
            flush=True,
        )
        os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1" if a.serve_mode == "throughput" else "0"
        serve_env(a.proxy)
        ray.init(
            num_cpus=max(4, os.cpu_count() or 1),
            include_dashboard=False,
            log_to_driver=False,
            _temp_dir=tempfile.mkdtemp(prefix="rb", dir="/tmp"),
        )
        port = free_port()
        run_local({"run": str(run), "cpus": a.cpus, "max_replicas": 1, "topology": a.topology}, port=port, ui=False)
        url = f"http://127.0.0.1:{port}"
        if not wait_ready(url, 600):
            print("API did not become ready", file=sys.stderr)
            return 1
    rng = np.random.default_rng(1)
    texts = [" ".join(rng.choice(WORDS, 4)) for _ in range(200)]
    images = [_jpeg(rng) for _ in range(16)]
    out = Path(a.out)
    doc = json.loads(out.read_text()) if out.exists() else {"results": []}
    rows = [(kind, c, w) for kind in a.endpoints for w in (a.write_shares if kind == "text" else [0.0])
            for c in a.concurrency]
    warm: set[str] = set()
    for kind, c, w in rows:
        if kind not in warm:
            load(url, kind, 1, min(3.0, a.duration), texts if kind == "text" else images)  # warm-up
            warm.add(kind)
        r = load(url, kind, c, a.duration, texts if kind == "text" else images, write_share=w)
        r.update(setting)
        r["note"] = a.note
        r["quiet"] = _quiet.finish(quiet)
        print(json.dumps(r), flush=True)
        doc["results"] = [
            x
            for x in doc["results"]
            if not (
                x.get("endpoint") == r["endpoint"]
                and x.get("concurrency") == c
                and x.get("write_share", 0.0) == w
                and all(x.get(kk) == vv for kk, vv in setting.items())
            )
        ] + [r]
        doc["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version()}
        doc["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1) + "\n")
    if not a.url:
        from ray import serve

        serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
