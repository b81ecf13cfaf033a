"""Index benchmark: build time, query latency and recall@10 (vs exact numpy search) per store and size.

    .venv/bin/python bench/index.py --sizes 10000 100000 --dim 1024 --stores qdrant-memory edge
    -> bench/results/index.json (merged: one entry per store x size, newer runs replace older ones)

    .venv/bin/python bench/index.py tradeoff --n 100000 --dim 1024 --queries 300
    -> bench/results/index.json["tradeoff"] + bench/results/index_tradeoff.png: HNSW ef / int8 rescore /
       oversampling sweep on qdrant-edge (recall@10 vs numpy, p50/p99, build time, resident memory); about
       2-4 minutes on 2 cores at n=100k (see "HNSW / int8 trade-off sweep" below)

Vectors are synthetic embeddings shaped like trained ones: unit vectors around 500 cluster centres (real
recipe embeddings cluster by dish type); queries are database vectors with noise, as a photo of an indexed
dish would be. Stores: ``qdrant-memory`` (qdrant-client ``:memory:``), ``qdrant-path`` (qdrant-client local
folder, SQLite-backed), ``edge`` (qdrant-edge-py, HNSW built after the bulk load).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_quiet.py: the quiet-box rule

import _quiet

from tnlbt.index.search import brute_force_topk
from tnlbt.index.store import (
    PHOTOS,
    EdgeStore,
    IndexSettings,
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
    coll = build_collection(store, PHOTOS, "v1", [photo_point_id(i) for i in ids], x, payloads, batch_size=256)
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


# -- HNSW / int8 trade-off sweep (qdrant-edge) ------------------------------------------------------------------
#
#     .venv/bin/python bench/index.py tradeoff --n 100000 --dim 1024 --queries 300
#     -> bench/results/index.json["tradeoff"] (one run per n x dim, replaced by a newer one) + index_tradeoff.png
#
# One build per variant (float32 HNSW; HNSW + int8), each in its own process so that its RSS is its own; the
# search-time settings (exact, hnsw_ef, rescore, oversampling) are swept on the same build, interleaved in rounds
# so that load from other jobs hits every setting alike; medians reported.

TRADEOFF_PLOT = RESULTS.with_name("index_tradeoff.png")
EF_SWEEP = (16, 32, 64, 128, 256)
INT8_EF = EF_SWEEP
# variant -> build-time settings (the rest are IndexSettings defaults)
VARIANTS: dict[str, dict] = {
    "float32": {"quantization": "none", "on_disk_vectors": False},  # the store's behaviour before the settings
    "int8": {"quantization": "int8", "on_disk_vectors": False},
    "int8-disk": {"quantization": "int8", "on_disk_vectors": True},  # the default now
}


def synth_embeddings(
    n: int,
    d: int,
    n_queries: int = 0,
    seed: int = 0,
    types: int = 50,
    dishes: int = 5000,
    photos_per_recipe: int = 3,
    alpha: float = 0.6,
    zipf: float = 1.0,
    parts: tuple[float, ...] = (0.2, 0.2, 0.25, 0.2, 0.15),
) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors shaped like trained photo embeddings, plus held-out queries from the same distribution.

    A mixture of Gaussians at several scales, normalised to the unit sphere: a shared mean direction (real
    embeddings are not centred: random pairs have cosine ~0.2, not 0), 50 dish types, 5,000 dishes with
    Zipf-distributed popularity, recipes (n/3, so ~3 photos each, like Recipe1M's 1-5) and photos; the
    squared-norm shares of the five levels are ``parts``. Every Gaussian has the same anisotropic covariance
    (power-law spectrum ``(1+j)^-alpha`` under a random rotation: effective dimension ~330 of 1024), as
    trained embeddings concentrate their variance in a few hundred directions. Queries are *new* photos of
    indexed recipes (not database vectors), so a query's nearest neighbours are the other photos of its recipe
    (cosine ~0.85), then its dish (~0.7), type, and the rest (~0.2).

    Uniform random vectors would be a poor stand-in: in 1024-d they are all nearly orthogonal (nearest
    neighbour ~0.12, the 10th ~0.10), a regime where k-NN is barely defined, graphs navigate badly and int8
    noise swamps the differences; the old single-level generator (500 isotropic clusters, no mean) is the
    opposite, too easy and without any shared direction for the int8 quantiles to exploit.
    """
    rng = np.random.default_rng(seed)
    m2, a2, b2, r2, c2 = parts
    s = (1.0 + np.arange(d)) ** (-alpha / 2)
    s = (s / np.linalg.norm(s)).astype(np.float32)
    rot, _ = np.linalg.qr(rng.standard_normal((d, d)).astype(np.float32))

    def g(m: int, share: float, r: np.random.Generator = rng) -> np.ndarray:
        return r.standard_normal((m, d), dtype=np.float32) * (s * np.float32(np.sqrt(share)))

    mu = rng.standard_normal(d).astype(np.float32)
    mu *= np.sqrt(m2) / np.linalg.norm(mu)
    centres_type = g(types, a2)
    centres_dish = centres_type[rng.integers(0, types, dishes)] + g(dishes, b2)
    p = (1.0 + np.arange(dishes)) ** (-zipf)
    n_recipes = max(1, n // photos_per_recipe)
    centres_recipe = centres_dish[rng.choice(dishes, n_recipes, p=p / p.sum())] + g(n_recipes, r2)

    def draw(m: int, r: np.random.Generator) -> np.ndarray:
        out = np.empty((m, d), dtype=np.float32)
        for a in range(0, m, 8192):  # in chunks: the float temporaries of 100k x 1024 would double the RAM
            b = min(m, a + 8192)
            x = (centres_recipe[r.integers(0, n_recipes, b - a)] + g(b - a, c2, r)) @ rot.T + mu
            out[a:b] = x / np.linalg.norm(x, axis=1, keepdims=True)
        return out

    return draw(n, rng), draw(n_queries, np.random.default_rng(seed + 1))


def exact_topk(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    """Brute-force top-k ids (numpy float32 dot products of unit vectors = cosine), best first."""
    s = q @ x.T
    part = np.argpartition(-s, k, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(s, part, 1), axis=1, kind="stable")
    return np.take_along_axis(part, order, 1)


def data_stats(x: np.ndarray, q: np.ndarray, k: int) -> dict:
    s = q[:200] @ x.T
    top = -np.sort(-s, axis=1)[:, : k + 1]
    pairs = np.random.default_rng(3).integers(0, len(x), (4000, 2))
    rc = np.einsum("ij,ij->i", x[pairs[:, 0]], x[pairs[:, 1]])
    return {
        "random_pair_cosine_mean": round(float(rc.mean()), 3),
        "random_pair_cosine_std": round(float(rc.std()), 3),
        "query_nn1_cosine_median": round(float(np.median(top[:, 0])), 3),
        "query_nn10_cosine_median": round(float(np.median(top[:, k - 1])), 3),
        "query_gap_10th_11th_median": round(float(np.median(top[:, k - 1] - top[:, k])), 5),
    }


def _rss_mb() -> dict:
    """Resident memory of this process from /proc (anonymous vs file-backed, i.e. mmapped index files)."""
    out = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, val = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[key] = round(int(val.split()[0]) / 1024, 1)
    return out


def _worker_build(workdir: Path, variant: str) -> dict:
    x = np.load(workdir / "x.npy")
    rss0 = _rss_mb()
    root = workdir / variant
    # TNLBT_INDEX_* variables apply under the variant's own settings (e.g. TNLBT_INDEX_FULL_SCAN_POINTS=1000
    # to get a graph for a quick run with n below the store's 20,000-point threshold)
    store = EdgeStore(str(root), settings=IndexSettings.parse(VARIANTS[variant], base=IndexSettings.from_env()))
    ids = [f"{i:08d}" for i in range(len(x))]
    payloads = [{"image_id": s, "recipe_id": f"r{i // 3}", "split": "test"} for i, s in enumerate(ids)]
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    coll = build_collection(store, PHOTOS, "v1", [photo_point_id(i) for i in ids], x, payloads, batch_size=256)
    build_s = time.perf_counter() - t0
    publish(store, {PHOTOS: coll})
    info = store.describe(PHOTOS)
    rss1 = _rss_mb()
    store.close()
    disk = sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) / 2**20
    quantized = sum(f.stat().st_size for f in root.rglob("quantized.data")) / 2**20
    return {
        "variant": variant,
        "settings": info["built_with"],
        "build_s": round(build_s, 2),
        "index_s": info["index_s"],
        "upsert_s": round(build_s - (info["index_s"] or 0.0), 2),
        "indexed_vectors": info["indexed_vectors"],
        "quantized_segments": info["quantized_segments"],
        "disk_mb": round(disk, 1),
        "quantized_mb": round(quantized, 1),
        "build_peak_rss_mb": rss1.get("VmHWM"),
        "build_rss_before_mb": rss0.get("VmRSS"),
        "loadavg_1m_build": [round(load0, 2), round(os.getloadavg()[0], 2)],
    }


def search_settings(variant: str) -> list[dict]:
    rows = [{"setting": "exact", "exact": True}]
    if variant == "float32":
        rows += [{"setting": f"hnsw ef={ef}", "hnsw_ef": ef} for ef in EF_SWEEP]
    else:
        rows += [
            {
                "setting": f"ef={ef} rescore={'on' if rs else 'off'} os={os_}",
                "hnsw_ef": ef,
                "rescore": rs,
                "oversampling": os_,
            }
            for ef in INT8_EF
            for rs in (False, True)
            for os_ in (1.0, 2.0)
        ]
        rows += [
            {"setting": f"graph check ef={ef} (int8 ignored)", "hnsw_ef": ef, "ignore_quantization": True}
            for ef in (64, 128, 256)
        ]
    return rows


def _evict_page_cache(root: Path) -> int:
    """Drop the files under ``root`` from the OS page cache (``POSIX_FADV_DONTNEED``; no root needed), as
    after a reboot; returns the bytes advised."""
    total = 0
    for f in root.rglob("*"):
        if f.is_file():
            with contextlib.suppress(OSError), open(f, "rb") as fh:
                os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                total += f.stat().st_size
    return total


def _worker_memory(workdir: Path, variant: str, k: int) -> dict:
    """A fresh process serving ``variant`` from a cold page cache: time to open, latency of the first
    queries, and resident memory after opening, after queries that touch only the graph and the int8 copy
    (rescore off), after rescored queries (which read the originals of the candidates) and after exact scans
    (which page in every original vector)."""
    q = np.load(workdir / "q.npy")[:100]
    evicted = _evict_page_cache(workdir / variant)
    rss = {"before_open": _rss_mb()}
    t = time.perf_counter()
    store = EdgeStore(str(workdir / variant))
    store.count(PHOTOS)  # opens the shard
    open_s = time.perf_counter() - t
    rss["after_open"] = _rss_mb()
    cold: dict[str, dict] = {}
    for key, change in [
        ("after_queries_rescore_off", {"hnsw_ef": 64, "rescore": False}),
        ("after_queries_rescore_on", {"hnsw_ef": 128, "rescore": True, "oversampling": 2.0}),
        ("after_exact_scans", {"exact": True}),
    ]:
        store.settings = IndexSettings.parse(change)
        lat = []
        for v in q[: 20 if "exact" in change else 100]:
            t = time.perf_counter()
            store.search(PHOTOS, v, k)
            lat.append((time.perf_counter() - t) * 1e3)
        rss[key] = _rss_mb()
        cold[key.replace("after_", "")] = {
            "p50_ms": round(float(np.percentile(lat, 50)), 3),
            "p99_ms": round(float(np.percentile(lat, 99)), 3),
            "queries": len(lat),
        }
    store.close()
    base = rss["before_open"].get("VmRSS", 0.0)
    return {
        "page_cache_evicted_mb": round(evicted / 2**20, 1),
        "open_s_cold": round(open_s, 3),
        "first_queries_after_cold_open": cold,
        "rss_mb": rss,
        "rss_delta_mb": {a: round(b.get("VmRSS", 0.0) - base, 1) for a, b in rss.items()},
    }


def _worker_serve(workdir: Path, variants: list[str], k: int, rounds: int) -> dict:
    """Open every built variant in one process and sweep all (variant, search setting) pairs interleaved in
    ``rounds`` rounds, so that load from other jobs falls on all of them alike; exact scans run last.

    For int8 builds, ``graph check`` rows search the same graph with the int8 copy ignored (float32 scores
    all the way; qdrant-edge's ``QuantizationSearchParams(ignore=True)``, not an :class:`IndexSettings`
    option): it separates the effect of the int8 scores from that of the graph (each build makes its own).
    """
    from qdrant_edge import QuantizationSearchParams, Query, QueryRequest, SearchParams

    q = np.load(workdir / "q.npy")
    truth = np.load(workdir / "truth.npy")
    stores = {v: EdgeStore(str(workdir / v)) for v in variants}
    plan = [(v, s) for v in variants for s in search_settings(v)]
    lat: dict[tuple[str, str], list[float]] = {(v, s["setting"]): [] for v, s in plan}
    recall: dict[tuple[str, str], list[float]] = {(v, s["setting"]): [] for v, s in plan}

    def run(v: str, s: dict, idx: Iterable[int]) -> None:
        store = stores[v]
        change = {a: b for a, b in s.items() if a not in ("setting", "ignore_quantization")}
        store.settings = dataclasses.replace(IndexSettings(), **change)
        shard = store._shard(store.resolve(PHOTOS)) if s.get("ignore_quantization") else None
        for i in idx:
            t = time.perf_counter()
            if shard is None:
                got = {h.id for h in store.search(PHOTOS, q[i], k)}
            else:  # the same request store.search() makes, with the quantised vectors ignored
                params = SearchParams(hnsw_ef=s["hnsw_ef"], quantization=QuantizationSearchParams(ignore=True))
                req = QueryRequest(limit=k, query=Query.Nearest(q[i].tolist()), with_payload=True, params=params)
                got = {str(p.payload["image_id"]) for p in shard.query(req)}
            lat.setdefault((v, s["setting"]), []).append((time.perf_counter() - t) * 1e3)
            recall.setdefault((v, s["setting"]), []).append(len({f"{j:08d}" for j in truth[i, :k]} & got) / k)

    # warm-up (untimed): every query once with the widest search, so that the pages of the memory-mapped
    # graph and vectors the sweep touches are mapped before timing (otherwise whichever setting comes first
    # pays the page faults: 2x its latency)
    for v in variants:
        run(v, {"setting": "warm-up", "hnsw_ef": max(EF_SWEEP), "rescore": True}, range(len(q)))
    load = [os.getloadavg()[0]]
    graph = [(v, s) for v, s in plan if not s.get("exact")]
    for chunk in np.array_split(np.arange(len(q)), rounds):
        for v, s in graph:
            # untimed: the first queries after switching shard or setting are slower (CPU caches)
            run(v, {**s, "setting": "warm-up"}, chunk[:10])
            run(v, s, chunk)
        load.append(os.getloadavg()[0])
    for v, s in plan:
        if s.get("exact"):
            run(v, s, range(len(q)))
    load.append(os.getloadavg()[0])
    for st in stores.values():
        st.close()
    rows = []
    for v, s in plan:
        a = np.array(lat[(v, s["setting"])])
        rows.append(
            {
                "variant": v,
                **s,
                "recall_at_10": round(float(np.mean(recall[(v, s["setting"])])), 4),
                "p50_ms": round(float(np.percentile(a, 50)), 3),
                "p95_ms": round(float(np.percentile(a, 95)), 3),
                "p99_ms": round(float(np.percentile(a, 99)), 3),
                "queries": len(a),
            }
        )
    return {"rows": rows, "loadavg_1m_during_queries": [round(v, 2) for v in load]}


def _run_worker(*args: str) -> dict:
    r = subprocess.run([sys.executable, __file__, "_worker", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def machine_info() -> dict:
    cpu = _quiet.cpu_model()
    mem_gb = None
    with contextlib.suppress(OSError, ValueError, StopIteration):
        lines = Path("/proc/meminfo").read_text().splitlines()
        mem_gb = round(int(next(ln for ln in lines if ln.startswith("MemTotal")).split()[1]) / 2**20)
    from importlib.metadata import version

    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "mem_gb": mem_gb,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "qdrant_edge_py": version("qdrant-edge-py"),
        "numpy": np.__version__,
    }


def tradeoff(
    n: int, d: int, n_queries: int, k: int, rounds: int, variants: list[str], workdir: Path, log=print
) -> dict:
    load_start = [round(v, 2) for v in os.getloadavg()]
    t = time.perf_counter()
    x, q = synth_embeddings(n, d, n_queries)
    truth = exact_topk(x, q, k)
    np.save(workdir / "x.npy", x)
    np.save(workdir / "q.npy", q)
    np.save(workdir / "truth.npy", truth)
    stats = data_stats(x, q, k)
    del x
    log(f"data n={n} d={d} queries={n_queries}: {time.perf_counter() - t:.1f}s {stats}")
    builds, memory = {}, {}
    for v in variants:
        builds[v] = _run_worker("build", str(workdir), v)
        log(f"build {v}: {builds[v]}")
        memory[v] = _run_worker("memory", str(workdir), v, str(k))
        log(
            f"  memory {v}: open {memory[v]['open_s_cold']}s cold; rss delta {memory[v]['rss_delta_mb']}; "
            f"first queries {memory[v]['first_queries_after_cold_open']}"
        )
    serve = _run_worker("serve", str(workdir), ",".join(variants), str(k), str(rounds))
    rows = serve.pop("rows")
    for r in rows:
        r["build_s"] = builds[r["variant"]]["build_s"]
        log(
            f"  {r['variant']:9s} {r['setting']:34s} recall@10 {r['recall_at_10']:.4f}  p50 {r['p50_ms']:7.2f} ms  "
            f"p99 {r['p99_ms']:7.2f} ms"
        )
    log(f"  load during queries {serve['loadavg_1m_during_queries']}")
    for v in variants:
        shutil.rmtree(workdir / v, ignore_errors=True)
    return {
        "n": n,
        "dim": d,
        "k": k,
        "queries_per_setting": n_queries,
        "rounds": rounds,
        "store": "edge (qdrant-edge-py, one shard, HNSW built by optimize())",
        "defaults": IndexSettings().to_dict(),
        "data": {
            "generator": "synth_embeddings: 5-level Gaussian mixture on the unit sphere (see bench/index.py)",
            "queries": "held-out photos of indexed recipes",
            "ground_truth": "numpy float32 brute force",
            **stats,
        },
        "builds": builds,
        "memory": memory,
        "serve": serve,
        "rows": rows,
        "loadavg_start": load_start,
        "loadavg_end": [round(v, 2) for v in os.getloadavg()],
        "machine": machine_info(),
        "seconds": round(time.perf_counter() - t, 1),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def plot_tradeoff(runs: list[dict], path: Path) -> None:
    """recall@10 against p50 latency, one panel per run; a line per (variant, rescore, oversampling) over ef."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    series = [  # (variant, rescore, oversampling, colour, marker, filled); the other combinations are in the JSON
        ("float32", None, None, "C0", "o", True),
        ("int8", True, 2.0, "C3", "s", True),
        ("int8", False, 1.0, "C3", "s", False),
        ("int8-disk", True, 2.0, "C2", "^", True),
        ("int8-disk", False, 1.0, "C2", "^", False),
    ]
    fig, axes = plt.subplots(1, len(runs), figsize=(6.4 * len(runs), 4.8), squeeze=False)
    for ax, run in zip(axes[0], runs, strict=True):
        for v, rescore, os_, colour, marker, filled in series:
            pts = [
                r
                for r in run["rows"]
                if r["variant"] == v
                and not r.get("exact")
                and r.get("rescore") == rescore
                and r.get("oversampling") == os_
            ]
            if not pts:
                continue
            pts.sort(key=lambda r: r["hnsw_ef"])
            label = v if rescore is None else f"{v}, rescore {'on' if rescore else 'off'}, oversampling {os_:g}"
            ax.plot(
                [r["p50_ms"] for r in pts],
                [r["recall_at_10"] for r in pts],
                color=colour,
                marker=marker,
                markerfacecolor=colour if filled else "white",
                linestyle="-" if filled else ":",
                label=label,
            )
            if v in ("float32", "int8") and filled:
                for r in pts:
                    ax.annotate(
                        f"ef {r['hnsw_ef']}",
                        (r["p50_ms"], r["recall_at_10"]),
                        fontsize=7,
                        color=colour,
                        xytext=(4, -9 if v == "int8" else 3),
                        textcoords="offset points",
                    )
        ex = [r for r in run["rows"] if r.get("exact") and r["variant"] == "float32"]
        if ex:
            ax.scatter([ex[0]["p50_ms"]], [ex[0]["recall_at_10"]], color="k", marker="*", s=90, label="exact scan")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.1g}"[0] in "25" else ""))
        ax.set_xlabel("p50 latency of store.search(), ms (log scale)")
        ax.set_ylabel("recall@10 vs numpy brute force")
        loads = run.get("loadavg_start", [0.0])[0], run.get("loadavg_end", [0.0])[0]
        ax.set_title(
            f"qdrant-edge HNSW (m 16, ef_construct 100), n={run['n']:,}, d={run['dim']}\n"
            f"{run['queries_per_setting']} queries per setting; load {loads[0]:.1f}-{loads[1]:.1f} on "
            f"{run['machine']['cpus']} cores",
            fontsize=9,
        )
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_summary(run: dict) -> dict:
    """A few numbers of a run, kept in the ``history`` of the run that replaces it (graphs differ from build
    to build, so earlier builds say how much of a difference is noise)."""
    keep = {"exact", "hnsw ef=128", "hnsw ef=256", "ef=128 rescore=on os=2.0", "ef=256 rescore=on os=2.0"}
    keep |= {f"graph check ef={ef} (int8 ignored)" for ef in (128, 256)}
    return {
        "when": run.get("when"),
        "loadavg_start": run.get("loadavg_start"),
        "build_s": {v: b.get("build_s") for v, b in run.get("builds", {}).items()},
        "recall_at_10": {
            f"{r['variant']} {r['setting']}": r["recall_at_10"] for r in run["rows"] if r["setting"] in keep
        },
        "p50_ms": {f"{r['variant']} {r['setting']}": r["p50_ms"] for r in run["rows"] if r["setting"] in keep},
    }


def merge_run(runs: list[dict], new: dict) -> list[dict]:
    """Replace the variants ``new`` measured in the run of the same n x dim x k; keep the other variants (a
    long sweep can run one variant at a time) and a summary of the replaced run in ``history``."""
    same = [r for r in runs if (r["n"], r["dim"], r["k"]) == (new["n"], new["dim"], new["k"])]
    rest = [r for r in runs if r not in same]
    if same:
        old = same[-1]
        new["history"] = [*old.get("history", []), run_summary(old)]
        keep = [v for v in old["builds"] if v not in new["builds"]]
        if keep:
            new["builds"] = {**{v: old["builds"][v] for v in keep}, **new["builds"]}
            new["memory"] = {**{v: old.get("memory", {}).get(v) for v in keep}, **new["memory"]}
            new["rows"] = [r for r in old["rows"] if r["variant"] in keep] + new["rows"]
            new["earlier_variants"] = {  # measured in an earlier run, not interleaved with this one
                v: {"when": old.get("when"), "loadavg_start": old.get("loadavg_start")} for v in keep
            }
    return sorted([*rest, new], key=lambda r: (r["dim"], r["n"]))


def main_tradeoff(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="bench/index.py tradeoff", description="HNSW / int8 recall-latency sweep")
    p.add_argument("--n", type=int, nargs="+", default=[100_000])
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the settings")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--plot", default=str(TRADEOFF_PLOT))
    _quiet.add_arguments(p)
    a = p.parse_args(argv)
    quiet = _quiet.from_args(a, "bench/index.py tradeoff")
    out = Path(a.out)
    workdir = Path(tempfile.mkdtemp(prefix="bench_tradeoff_"))
    try:
        for n in a.n:
            run = tradeoff(n, a.dim, a.queries, a.k, a.rounds, a.variants, workdir)
            doc = json.loads(out.read_text()) if out.exists() else {"results": []}
            section = doc.setdefault("tradeoff", {"runs": []})
            section["about"] = (
                "qdrant-edge recall@10 / latency per search setting on one build per variant; "
                "latency = store.search() incl. payload, median over queries interleaved across settings"
            )
            run["quiet"] = _quiet.finish(quiet)
            section["runs"] = merge_run(section["runs"], run)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(doc, indent=1) + "\n")
            if a.plot:
                plot_tradeoff([r for r in section["runs"] if r["dim"] == a.dim], Path(a.plot))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["tradeoff"]:
        return main_tradeoff(argv[1:])
    if argv[:1] == ["_worker"]:  # a child of the trade-off sweep; prints one JSON line
        kind, workdir, variant, *rest = argv[1:]
        if kind == "build":
            r = _worker_build(Path(workdir), variant)
        elif kind == "memory":
            r = _worker_memory(Path(workdir), variant, int(rest[0]))
        else:
            r = _worker_serve(Path(workdir), variant.split(","), int(rest[0]), int(rest[1]))
        print(json.dumps(r), flush=True)
        return 0
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
    _quiet.add_arguments(p)
    a = p.parse_args(argv)
    quiet = _quiet.from_args(a, "bench/index.py")
    out = Path(a.out)
    doc = json.loads(out.read_text()) if out.exists() else {"results": []}
    workdir = Path(tempfile.mkdtemp(prefix="bench_index_"))
    try:
        for n in a.sizes:
            for s in a.stores:
                r = bench_one(s, n, a.dim, a.queries, a.k, workdir)
                r["note"] = a.note
                r["quiet"] = _quiet.finish(quiet)
                print(json.dumps(r), flush=True)
                doc["results"] = [
                    x for x in doc["results"] if not (x["store"] == s and x["n"] == n and x["dim"] == a.dim)
                ] + [r]
                doc["machine"] = {
                    "cpus": os.cpu_count(),
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
