"""Index benchmark: build time, query latency and recall@10 (vs exact numpy search) per store and size.

    .venv/bin/python bench/index.py --sizes 10000 100000 --dim 1024 --stores qdrant-memory edge
    -> bench/results/index.json (merged: one entry per store x size, newer runs replace older ones)

Vectors are synthetic embeddings shaped like trained ones: unit vectors around 500 cluster centres (real
recipe embeddings cluster by dish type); queries are database vectors with noise, as a photo of an indexed
dish would be. Stores: ``qdrant-memory`` (qdrant-client ``:memory:``), ``qdrant-path`` (qdrant-client local
folder, SQLite-backed), ``edge`` (qdrant-edge-py, HNSW built after the bulk load).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tnlbt.index.search import brute_force_topk
from tnlbt.index.store import (
    PHOTOS,
    EdgeStore,
    build_collection,
    open_store,
    photo_point_id,
    publish,
)

RESULTS = Path(__file__).resolve().parent / "results" / "index.json"


def synth(n: int, d: int, seed: int = 0, clusters: int = 500) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + 0.6 * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def bench_one(store_name: str, n: int, d: int, n_queries: int, k: int, workdir: Path) -> dict:
    x = synth(n, d)
    ids = [f"{i:08d}.jpg" for i in range(n)]
    payloads = [{"image_id": s, "recipe_id": f"r{i}", "split": "test"} for i, s in enumerate(ids)]
    path = workdir / store_name
    if store_name == "qdrant-memory":
        store = open_store("qdrant")
    elif store_name == "qdrant-path":
        store = open_store("qdrant", path=str(path))
    else:
        store = EdgeStore(str(path))
    t0 = time.perf_counter()
    coll = build_collection(
        store, PHOTOS, "v1", [photo_point_id(i) for i in ids], x, payloads, batch_size=256
    )
    publish(store, {PHOTOS: coll})
    build_s = time.perf_counter() - t0
    rng = np.random.default_rng(7)
    qi = rng.integers(0, n, n_queries)
    queries = x[qi] + 0.3 * rng.standard_normal((n_queries, d)).astype(np.float32) / np.sqrt(d) * 4
    lat, recalls = [], []
    store.search(PHOTOS, queries[0], k)  # warm-up (first query loads files / caches)
    for q in queries:
        t = time.perf_counter()
        hits = store.search(PHOTOS, q, k)
        lat.append((time.perf_counter() - t) * 1e3)
        want = {ids[i] for i in brute_force_topk(x, q, k)[0]}
        recalls.append(len(want & {h.id for h in hits}) / k)
    store.close()
    size_mb = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20 if path.exists() else 0.0
    shutil.rmtree(path, ignore_errors=True)
    lat = np.array(lat)
    return {
        "store": store_name,
        "n": n,
        "dim": d,
        "build_s": round(build_s, 2),
        "query_ms_p50": round(float(np.percentile(lat, 50)), 2),
        "query_ms_p95": round(float(np.percentile(lat, 95)), 2),
        "query_ms_p99": round(float(np.percentile(lat, 99)), 2),
        "recall_at_10": round(float(np.mean(recalls)), 4),
        "queries": n_queries,
        "disk_mb": round(size_mb, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000, 100_000])
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument(
        "--stores",
        nargs="+",
        default=["qdrant-memory", "qdrant-path", "edge"],
        choices=["qdrant-memory", "qdrant-path", "edge"],
    )
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--note", default="", help="free text stored with the results (e.g. machine load)")
    a = p.parse_args(argv)
    out = Path(a.out)
    doc = json.loads(out.read_text()) if out.exists() else {"results": []}
    workdir = Path(tempfile.mkdtemp(prefix="bench_index_"))
    try:
        for n in a.sizes:
            for s in a.stores:
                r = bench_one(s, n, a.dim, a.queries, a.k, workdir)
                r["note"] = a.note
                print(json.dumps(r), flush=True)
                doc["results"] = [
                    x for x in doc["results"] if not (x["store"] == s and x["n"] == n and x["dim"] == a.dim)
                ] + [r]
                doc["machine"] = {
                    "cpus": __import__("os").cpu_count(),
                    "python": platform.python_version(),
                    "platform": platform.platform(),
                }
                doc["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(doc, indent=1) + "\n")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
