"""Application builders for ``serve run`` / ``serve deploy`` / ``tnlbt serve``, and ``cli_serve``.

Two Serve applications, both built from one ``args`` dict (the same keys in ``serve/config.yaml``):

* ``api`` at ``/`` -- :func:`build_app`: ``SearchAPI`` over ``TextEncoder``, ``ImageEncoder``, ``SearchIndex``
* ``ui``  at ``/ui`` -- :func:`build_ui_app`: ``GradioUI``, which looks the API deployment up by name

The UI is its own application (not a route of the API) so the API ingress can autoscale while the UI stays at
one replica, as Gradio's queue needs.

``args`` is :class:`tnlbt.config.ServeConfig` as plain data (``ServeConfig.from_args``: typed, validated, one-line
errors; its fields are the keys, with the store's named flat: ``qdrant_url``, ``qdrant_path``, ``store`` (the
kind), ``index_settings``). ``run`` is required: a run directory with an index.

``run`` may be a URI (``s3://bucket/runs/demo``). The builders pass the *URI* of the checkpoint to the encoder
deployments, never a local path of the machine that builds the app: each replica, on whatever node it lands,
fetches the model files into its own cache (:func:`tnlbt.runs.resolve_checkpoint`). Every deployment gets
the driver's ``TNLBT_STORAGE_ROUTES`` / ``TNLBT_CACHE_DIR`` in its ``runtime_env``
(:func:`tnlbt.storage.ray_runtime_env`). The UI's example photos and training-curve PNG must be local
files for Gradio: for a remote run they are written under the run's local cache folder
(:func:`tnlbt.runs.local_run_dir`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from tnlbt.config import SERVE_PROXIES, ServeConfig

log = logging.getLogger(__name__)

API_APP, UI_APP = "api", "ui"


def _serve_config(args: dict[str, Any] | ServeConfig) -> ServeConfig:
    cfg = args if isinstance(args, ServeConfig) else ServeConfig.from_args(args)
    if not cfg.run:
        raise ValueError("serve: args.run (the run directory) is required")
    return cfg


# For the replicas that decode photos: glibc serves allocations above this from mmap, so a decoded photo's memory
# (PIL allocates it in 16 MiB blocks) goes back to the OS when freed. Without it glibc's dynamic threshold keeps
# such blocks on the heap after the first big free, and a burst leaves the replica that much bigger for good
# (bench/serve_memory.py: 124 MB still resident after a burst, 2 MB with it). Read at process start, so set
# through runtime_env, which starts the replica's worker process with it.
DECODER_ENV = {"MALLOC_MMAP_THRESHOLD_": str(8 * 1024 * 1024)}


def _actor_options(num_cpus: float, num_gpus: float = 0.0, env: dict[str, str] | None = None) -> dict[str, Any]:
    """``ray_actor_options`` with the driver's storage environment forwarded (nothing extra when unset) and
    ``env`` added to the replica's environment."""
    from tnlbt import storage

    opts: dict[str, Any] = {"num_cpus": num_cpus}
    if num_gpus > 0:
        opts["num_gpus"] = num_gpus
    renv = storage.ray_runtime_env()
    if env:
        renv = {**renv, "env_vars": {**renv.get("env_vars", {}), **env}}
    if renv:
        opts["runtime_env"] = renv
    return opts


def build_app(args: dict[str, Any] | ServeConfig) -> Any:
    """The API application (``serve run tnlbt.serve.app:build_app run=runs/demo``; ``run`` may be a URI)."""
    from tnlbt.serve.deployments import ImageEncoder, SearchAPI, SearchIndex, TextEncoder

    from tnlbt.runs import checkpoint_drift, index_checkpoint, read_index_meta

    cfg = _serve_config(args)
    meta = read_index_meta(cfg.run)
    # Located here (a missing checkpoint fails now, in one line), loaded in the replicas: a URI stays a URI.
    ckpt = str(index_checkpoint(cfg.run, meta))
    drift = checkpoint_drift(cfg.run)  # weights replaced since the index was built: say so, loudly
    if drift:
        log.warning("%s", drift)
    cpus = cfg.cpus or default_replica_cpus()
    # GPU share per encoder replica (0 = CPU); the index, the API and the UI stay on CPUs.
    device = "cuda" if cfg.gpus > 0 else "cpu"

    def auto(target: int) -> dict[str, Any]:
        return {"min_replicas": 1, "max_replicas": cfg.max_replicas, "target_ongoing_requests": target}

    def encoder(cls: Any, batch: int, env: dict[str, str] | None = None, **extra: Any) -> Any:
        return cls.options(
            ray_actor_options=_actor_options(cpus, cfg.gpus, env),
            autoscaling_config=auto(max(2, batch // 2)),
            max_ongoing_requests=max(2 * batch, 8),  # >= batch size, or a batch never fills
        ).bind(ckpt, max_batch_size=batch, num_threads=cfg.num_threads, device=device, **extra)

    api_kwargs = {"max_upload_bytes": cfg.max_upload_bytes, "request_timeout_s": cfg.request_timeout_s,
                  "api_keys": _keys(cfg), "hybrid": cfg.hybrid}
    store = dataclasses.asdict(cfg.store)
    if cfg.colocated:
        # One deployment holding the model and the index (serve/local.py). With an embedded store (a folder one
        # process locks) it is exactly one replica; with a server it autoscales like the graph's ingress.
        scale: dict[str, Any] = ({"autoscaling_config": auto(32)} if cfg.store.url
                                 else {"num_replicas": 1, "autoscaling_config": None})
        return SearchAPI.options(
            ray_actor_options=_actor_options(cpus, cfg.gpus, DECODER_ENV),
            max_ongoing_requests=max(64, 4 * cfg.text_batch),
            **scale,
        ).bind(None, None, None, colocated={
            "checkpoint_dir": ckpt, "run": str(cfg.run), "store": store, "text_batch": cfg.text_batch,
            "image_batch": cfg.image_batch, "num_threads": cfg.num_threads, "device": device,
            "decode_slots": cfg.decode_slots, "decode_wait_s": cfg.decode_wait_s,
        }, **api_kwargs)
    index = SearchIndex.options(
        # An embedded store (a folder) is locked by one process: exactly one replica. A server scales out.
        num_replicas=cfg.index_replicas if cfg.store.url else 1,
        ray_actor_options=_actor_options(min(cpus, 0.5)),
    ).bind(str(cfg.run), store=store)
    return SearchAPI.options(
        ray_actor_options=_actor_options(min(cpus, 0.5)),
        autoscaling_config=auto(16),
    ).bind(
        encoder(TextEncoder, cfg.text_batch),
        encoder(ImageEncoder, cfg.image_batch, DECODER_ENV, decode_slots=cfg.decode_slots,
                decode_wait_s=cfg.decode_wait_s),
        index,
        **api_kwargs,
    )


def _keys(cfg: ServeConfig) -> dict[str, list[str]]:
    """Digests of the write / read keys (``TNLBT_API_KEY``, ``serve.api_keys_file``, ``TNLBT_READ_KEY``) of this
    process, for the API replicas (:mod:`tnlbt.serve.auth`); the keys themselves stay here."""
    from tnlbt.serve.auth import load_keys

    keys = load_keys(cfg.api_keys_file or None)
    if keys.write and cfg.store.url and cfg.index_replicas > 1:
        log.warning("writes are serialised per SearchIndex replica: with %d replicas on one Qdrant server, "
                    "concurrent writes to one id may interleave (index_replicas=1 avoids it)", cfg.index_replicas)
    log.info("API writes %s; reads %s", "need a key" if keys.write else "are disabled",
             "need a key" if keys.read else "are open")
    return keys.to_dict()


def default_replica_cpus() -> float:
    """CPUs per encoder replica so that the whole app (2 encoders at ``c``, 3 small deployments at
    ``min(c, 0.5)``) fits the cluster: 1 on a big box, down to 0.25 on a 2-core laptop (where Ray would
    otherwise leave replicas pending forever)."""
    try:
        import ray

        total = float(ray.cluster_resources().get("CPU", 2.0)) if ray.is_initialized() else 2.0
    except Exception:
        total = 2.0
    return max(0.25, min(1.0, (total - 1.5) / 2))


def load_examples(run: str | Path, n: int = 4) -> dict[str, Any]:
    """A few test-split recipes (text fields) and photos (written as JPEG under RUN/index/examples, or under
    the local cache folder of a remote run) for the UI. The processed data may be remote."""
    import pyarrow.parquet as pq

    from tnlbt import storage
    from tnlbt.index.search import join_under, parquet_files
    from tnlbt.runs import local_run_dir, read_index_meta, recorded_path

    meta = read_index_meta(run)
    data_dir = recorded_path(run, meta.get("data_dir"))
    out: dict[str, Any] = {"text": [], "images": []}
    if not data_dir or n <= 0:
        return out
    split = meta.get("split", "test")
    split_dir = join_under(data_dir, "test" if split == "all" else split)
    files = parquet_files(split_dir)
    if not files:
        return out
    cols = ["title", "ingredients", "instructions", "image_ids", "images"]
    if storage.is_remote(files[0]):
        t = storage.open_parquet(files[0]).read_row_group(0, columns=cols)  # one row group, not the whole shard
    else:
        t = pq.read_table(files[0], columns=cols)
    t = t.slice(0, min(len(t), 64))
    ex_dir = local_run_dir(run) / "index" / "examples"
    ex_dir.mkdir(parents=True, exist_ok=True)
    for r in t.to_pylist():
        if len(out["text"]) < n:
            out["text"].append([r["title"], "\n".join(r["ingredients"][:10]), "\n".join(r["instructions"][:5])])
        if len(out["images"]) < n and r["images"]:
            p = ex_dir / Path(r["image_ids"][0]).name
            if not p.exists():
                p.write_bytes(r["images"][0])
            out["images"].append(str(p))
    return out


def load_model_card(run: str | Path) -> dict[str, Any]:
    """Run name, test metrics, the curves PNG (a local copy for a remote run) and index notes for the UI."""
    import posixpath

    from tnlbt import storage
    from tnlbt.runs import live_lineage, local_run_dir, read_index_meta, run_dir_of

    rd = run_dir_of(run)
    remote = isinstance(rd, str)
    metrics: Any = {}
    for name in ("metrics_test.json", "metrics.json"):
        p = storage.join(rd, name) if remote else rd / name
        if storage.exists(p) if remote else p.exists():
            try:
                metrics = json.loads(storage.read_text(p) if remote else p.read_text())
            except json.JSONDecodeError:
                metrics = {}
            break
    meta = read_index_meta(rd)
    notes = (
        f"Index version `{meta.get('version', '?')}`: {meta.get('recipes', 0)} recipes, "
        f"{meta.get('photos', 0)} photos ({meta.get('split', '?')} split), store `{meta.get('store', '?')}`."
    )
    notes += lineage_notes(live_lineage(rd))
    curves: Path | None = None
    if remote:
        try:
            data = storage.read_bytes(storage.join(rd, "curves.png"))
        except FileNotFoundError:
            data = None
        if data is not None:
            curves = local_run_dir(rd) / "curves.png"
            curves.parent.mkdir(parents=True, exist_ok=True)
            curves.write_bytes(data)
    elif (rd / "curves.png").exists():
        curves = rd / "curves.png"
    return {
        "run": posixpath.basename(rd) if remote else rd.name,
        "metrics": metrics,
        "curves": str(curves) if curves is not None else None,
        "notes": notes,
    }


def lineage_notes(lineage: dict[str, Any]) -> str:
    """The lineage record (``GET /v1/info``) as a few markdown lines for the UI's model card."""
    if not lineage or "checkpoint" not in lineage:
        return ""
    ck, src, gate = lineage.get("checkpoint") or {}, lineage.get("source") or {}, lineage.get("gate") or {}
    where = src.get("catalog") if src.get("kind") == "catalog" else f"{src.get('split')} split of {src.get('data_dir')}"
    lines = [
        f"\n\nPublished {lineage.get('published_at', '?')} from checkpoint `{ck.get('path')}` "
        f"(sha256 `{str(ck.get('sha256') or '?')[:12]}`), built from {src.get('kind', '?')} `{where}`"
        + (f" (sha256 `{src['sha256'][:12]}`)" if src.get("sha256") else "") + "."
    ]
    if gate:
        verdict = "forced past the gate" if gate.get("forced") else ("passed" if gate.get("passed") else "?")
        lines.append(f"Publish gate: {verdict}; recall@{gate.get('k')} {gate.get('new_recall')} on "
                     f"{gate.get('compared_pairs', 0)} canary pairs (live before: {gate.get('live_recall')}).")
    return "\n".join(lines)


def build_ui_app(args: dict[str, Any] | ServeConfig) -> Any:
    """The Gradio UI application (route prefix ``/ui``); needs the API application running as ``api_app``."""
    from tnlbt.serve.deployments import GradioUI

    cfg = _serve_config(args)
    # Example photos and the curves PNG travel as bytes: the replica may run on another node than this
    # builder (which Serve may place on the head), so paths into this machine's cache would not exist there.
    examples = portable_files(load_examples(cfg.run, cfg.examples))
    card = portable_files(load_model_card(cfg.run))
    cpus = cfg.cpus or default_replica_cpus()
    return GradioUI.options(ray_actor_options=_actor_options(min(cpus, 0.5))).bind(
        api_app=cfg.api_app, model_card=card, examples=examples, max_upload_bytes=cfg.max_upload_bytes
    )


def portable_files(d: dict[str, Any]) -> dict[str, Any]:
    """Replace the local file paths in a UI examples / model-card dict with ``{"name", "data"}`` (bytes).

    ``examples["images"]`` (a list of paths) and ``card["curves"]`` (a path or None) are the file fields; the
    deployment turns them back into files on its own node with :func:`tnlbt.serve.deployments.local_files`.
    """
    out = dict(d)
    if out.get("images"):
        out["images"] = [{"name": Path(p).name, "data": Path(p).read_bytes()} for p in out["images"]
                         if Path(p).is_file()]
    if out.get("curves"):
        p = Path(out["curves"])
        out["curves"] = {"name": p.name, "data": p.read_bytes()} if p.is_file() else None
    return out


def run_local(
    args: dict[str, Any] | ServeConfig, host: str = "127.0.0.1", port: int = 8000, ui: bool = True
) -> dict[str, str]:
    """Start Serve on ``host:port`` in the current Ray cluster and run both applications; returns the URLs."""
    from ray import serve

    cfg = dataclasses.replace(_serve_config(args), api_app=API_APP)
    serve.start(http_options={"host": host, "port": port, "request_timeout_s": cfg.request_timeout_s + 10})
    serve.run(build_app(cfg), name=API_APP, route_prefix="/", blocking=False)
    if ui:
        serve.run(build_ui_app(cfg), name=UI_APP, route_prefix="/ui", blocking=False)
    base = f"http://{host}:{port}"
    urls = {"api": f"{base}/v1/", "docs": f"{base}/docs", "ready": f"{base}/readyz"}
    if ui:
        urls["ui"] = f"{base}/ui/"
    return urls


def wait_ready(base_url: str, timeout_s: float = 120.0, stop: threading.Event | None = None,
               paths: tuple[str, ...] = ("/readyz",)) -> bool:
    """Poll each of ``paths`` in turn until it answers 200 (True), the time is up or ``stop`` is set (False)."""
    import urllib.request

    deadline = time.time() + timeout_s
    todo = list(paths)
    while todo and time.time() < deadline and not (stop and stop.is_set()):
        try:
            with urllib.request.urlopen(f"{base_url.rstrip('/')}{todo[0]}", timeout=5) as r:
                if r.status == 200:
                    todo.pop(0)
                    continue
        except Exception:
            pass
        time.sleep(1.0)
    return not todo


def stop_on_signals() -> threading.Event:
    """SIGTERM (what ``docker stop``, Kubernetes and systemd send) and SIGINT (Ctrl-C) set the returned event
    instead of killing the process mid-request (or letting Ray's handler dump its stacks): the caller then shuts
    Serve down gracefully (replicas finish their in-flight requests) and exits 0. Main thread only."""
    stop = threading.Event()

    def handler(signum: int, _frame: Any) -> None:
        stop.signum = signum  # type: ignore[attr-defined]  # which one, for the closing line
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)
    return stop


def serve_env(proxy: str | None = None) -> None:
    """Environment Serve's processes read when they start, so set before ``ray.init`` (a cluster started with
    ``ray start`` needs the same variables in ``ray start``'s environment; ``cluster/`` sets them). Each is a
    default: a variable already set wins.

    * the proxy readiness check (5 s) is too short for a loaded laptop: 60 s;
    * ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``: the proxy answers 503 + Retry-After, not an empty 500,
      when a replica dies under a request (:class:`tnlbt.serve.guards.NoResponseIs503`);
    * ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``: Serve's own fast settings (buffered request logs, gRPC between
      replicas, GC frozen after start). Measured with the colocated topology: c=1 p50 28 -> ~10 ms, c=32 105 ->
      ~190 req/s (README "Capacity");
    * ``proxy`` (default ``TNLBT_SERVE_PROXY``, else ``python``): ``haproxy`` replaces Serve's Python proxy by
      the bundled HAProxy, which forwards to the ingress replicas' own HTTP ports (direct ingress): ~2.5x the
      throughput again, but a replica that dies under a request then answers a bare 500 (Ray's HAProxy
      config), not our 503 + Retry-After, and HAProxy takes fixed ports 8404 / 9101 on each node.
    """
    from tnlbt.serve.guards import PROXY_CALLBACK, PROXY_CALLBACK_ENV

    proxy = proxy or os.environ.get("TNLBT_SERVE_PROXY") or "python"
    if proxy not in SERVE_PROXIES:
        raise ValueError(f"serve proxy {proxy!r}: choose one of {', '.join(SERVE_PROXIES)}")
    haproxy = "1" if proxy == "haproxy" else "0"
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
    os.environ.setdefault("RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S", "60")
    os.environ.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK)
    os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
    os.environ.setdefault("RAY_SERVE_ENABLE_HA_PROXY", haproxy)
    # Throughput mode opens every ingress replica's own HTTP port; only HAProxy uses them.
    os.environ.setdefault("RAY_SERVE_ENABLE_DIRECT_INGRESS", haproxy)


def serve_until_interrupted(
    app_args: dict[str, Any] | ServeConfig, host: str = "127.0.0.1", port: int = 8000, ready_timeout_s: float = 120.0,
    proxy: str | None = None,
) -> int:
    """Start Ray (if needed), the API and the UI; print the URLs and serve until SIGTERM or Ctrl-C, then stop
    accepting, let in-flight requests finish, shut Serve and Ray down and return 0."""
    import ray
    from ray import serve

    serve_env(proxy)
    from tnlbt.ray_init import ensure_ray

    # Locally at least 4 logical CPUs: the app's five deployments must all be scheduled on a 2-core laptop.
    started_ray = ensure_ray(max(4, os.cpu_count() or 1))
    stop = stop_on_signals()  # after ray.init: ours must be the handler that runs, not Ray's
    t0 = time.perf_counter()
    try:
        print("[serve] starting the API and the UI on Ray Serve ...", flush=True)
        urls = run_local(app_args, host=host, port=port)
        # the UI application comes up a few seconds after the API: "ready" means both answer (a fresh
        # `make demo` printed its URLs while /ui/ was still a 404)
        ok = wait_ready(f"http://{host}:{port}", timeout_s=ready_timeout_s, stop=stop, paths=("/readyz", "/ui/"))
        if not stop.is_set():
            print("ready:" if ok else "started, but /readyz is not 200 yet (see `serve status`):", flush=True)
            for name, url in urls.items():
                print(f"  {name:6s} {url}")
            print("Ctrl-C to stop.", flush=True)
        stop.wait()
    finally:
        t1 = time.perf_counter()
        serve.shutdown()  # proxies stop accepting; replicas drain their in-flight requests, then exit
        if started_ray:
            ray.shutdown()
    name = signal.Signals(getattr(stop, "signum", signal.SIGINT)).name
    print(f"[serve] {name}: stopped after {t1 - t0:.0f} s (shut down in {time.perf_counter() - t1:.1f} s)",
          flush=True)
    return 0


def cli_serve(args: argparse.Namespace) -> int:
    from tnlbt import storage

    if not storage.exists(args.run):  # a local path or a URI (s3://bucket/runs/NAME)
        raise FileNotFoundError(f"run directory not found: {args.run}")
    cfg = ServeConfig.from_args({"run": str(args.run), "qdrant_url": args.qdrant_url, "qdrant_path": args.qdrant_path,
                                 "gpus": args.gpus, "index_settings": list(args.index_setting or []),
                                 "hybrid": getattr(args, "hybrid", None),  # None: the measured default
                                 "topology": getattr(args, "topology", None)})
    return serve_until_interrupted(cfg, host=args.host, port=args.port, proxy=getattr(args, "proxy", None))
