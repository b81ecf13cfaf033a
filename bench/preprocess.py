"""Benchmark ``tnlbt preprocess``: throughput with 1 and 2 CPUs, and peak memory at two corpus sizes.

    .venv/bin/python bench/preprocess.py            # full: 20k recipes x {1, 2} CPUs, memory at 10k vs 50k
    .venv/bin/python bench/preprocess.py --quick    # small sizes, one repeat
    .venv/bin/python bench/preprocess.py --only decode   # per-photo cost by source photo size (capacity)

Corpora come from the offline generator (``tnlbt.data.synthetic.generate_dataset``). With ``--base N`` only N
distinct recipes are generated and the corpus is tiled to the wanted size: every layer1/layer2/det_ingrs entry
is repeated with a new recipe id (``{id}-{k}``) and the same photo ids, so each tiled recipe is fully
re-processed (its photos decoded, resized and encoded again) but the photo files come from the page cache.
Generating 50k distinct recipes takes ~15 min on 2 cores, tiling takes seconds; the JSON records which was
used.

Each measurement runs in a fresh child process that starts its own local Ray with ``num_cpus`` = the CPU count
under test, pinned (``sched_setaffinity``, inherited by Ray's processes) to that many cores: an "N CPU" run has N
cores for everything, the driver's read and Ray's own processes included (``--no-pin``, the earlier method,
limits only Ray's task slots, so a 1-CPU run still had a second core for the rest). Ray start-up is excluded from
the rates and reported apart. Peak memory is the largest summed RSS
of the child's whole process tree (driver, raylet, GCS, workers), sampled every 0.2 s, plus the driver's own
peak.

With 2 CPUs the speed-up over 1 is set against this box's own ceiling, measured in the same minute between the
throughput runs (``parallel_ceiling``): 1 and then 2 independent processes decoding the same photos, started
together. No preprocess can scale better than two processes that share nothing; a 2-vCPU VM whose vCPUs are
one core's two hyperthreads, or a throttled host, shows a ceiling well under 2.

``--only decode`` times the per-photo work of a preprocess task alone (``decode_image``: decode, convert,
resize to ``image_short_side`` 256, JPEG re-encode) on generator photos rendered at several source sizes, in
this process with one thread. The throughput corpus uses 128 px photos; Recipe1M's are larger, and the
capacity table (docs/capacity.md) takes the photo rate at the source size it assumes from this part.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_quiet.py: the quiet-box rule
import _quiet

ROOT = Path(__file__).resolve().parent.parent


# -- process-tree memory sampler (Linux /proc, no psutil) ----------------------------------------------------
def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(d))
    return kids


def tree_rss_bytes(pid: int) -> int:
    kids, total, todo = _children_map(), 0, [pid]
    page = os.sysconf("SC_PAGE_SIZE")
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/statm") as fh:
                total += int(fh.read().split()[1]) * page
        except (OSError, IndexError, ValueError):
            pass
        todo.extend(kids.get(p, []))
    return total


class PeakSampler(threading.Thread):
    def __init__(self, pid: int, every: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.every, self.peak, self._stop_event = pid, every, 0, threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, tree_rss_bytes(self.pid))
            self._stop_event.wait(self.every)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return self.peak


# -- corpora -------------------------------------------------------------------------------------------------
def make_base(path: Path, n: int, workers: int) -> dict[str, Any]:
    from tnlbt.data.synthetic import generate_dataset

    if (path / "layer1.json").is_file():
        return json.loads((path / "_bench_gen.json").read_text())
    t0 = time.perf_counter()
    summary = generate_dataset(path, n, seed=0, workers=workers, overwrite=True)
    info = {
        "recipes": n,
        "photos": summary.get("n_photos"),
        "gen_seconds": round(time.perf_counter() - t0, 1),
    }
    (path / "_bench_gen.json").write_text(json.dumps(info))
    return info


def tile_corpus(base: Path, out: Path, n: int) -> Path:
    """A corpus of ``n`` recipes built by repeating ``base``'s entries under new ids (photos shared)."""
    if (out / "layer1.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    layer1 = json.loads((base / "layer1.json").read_text())
    layer2 = {e["id"]: e for e in json.loads((base / "layer2.json").read_text())}
    det = {e["id"]: e for e in json.loads((base / "det_ingrs.json").read_text())}
    with (
        (out / "layer1.json").open("w") as f1,
        (out / "layer2.json").open("w") as f2,
        (out / "det_ingrs.json").open("w") as f3,
    ):
        for f in (f1, f2, f3):
            f.write("[")
        first2 = first3 = True
        for i in range(n):
            rec = layer1[i % len(layer1)]
            k = i // len(layer1)
            rid = f"{rec['id']}-{k}"
            f1.write(("," if i else "") + json.dumps({**rec, "id": rid}))
            if rec["id"] in layer2:
                f2.write(("" if first2 else ",") + json.dumps({**layer2[rec["id"]], "id": rid}))
                first2 = False
            if rec["id"] in det:
                f3.write(("" if first3 else ",") + json.dumps({**det[rec["id"]], "id": rid}))
                first3 = False
        for f in (f1, f2, f3):
            f.write("]")
    (out / "images").symlink_to((base / "images").resolve())
    return out


# -- one measurement (child process) -------------------------------------------------------------------------
def child(data: str, out: str, cpus: int, pin: bool) -> dict[str, Any]:
    if pin:  # before Ray starts: the raylet, the GCS and every worker inherit the driver's CPU set
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cpus])
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    sampler = PeakSampler(os.getpid())
    sampler.start()
    import ray

    from tnlbt.config import DataConfig
    from tnlbt.data.preprocess import preprocess

    t0 = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    t_ray = time.perf_counter() - t0
    t0 = time.perf_counter()
    stats = preprocess(data, out, DataConfig(), overwrite=True, num_cpus=cpus)
    wall = time.perf_counter() - t0
    ray.shutdown()
    peak = sampler.stop()
    return {
        "cpus": cpus,
        "pinned_to": sorted(os.sched_getaffinity(0)) if pin else None,
        "recipes": stats["records"]["input"],
        "photos_ok": stats["photos"]["ok"],
        "seconds": round(wall, 2),
        "ray_start_s": round(t_ray, 2),
        "timings": stats["timings"],
        "recipes_per_s": round(stats["records"]["input"] / wall, 1),
        "images_per_s": round(stats["photos"]["ok"] / wall, 1),
        # CPU time of the shard tasks: what one CPU costs per image, whatever else runs on the machine
        "images_per_task_cpu_s": round(
            stats["photos"]["ok"] / max(stats["timings"]["process_cpu_s"], 1e-9), 1
        ),
        "peak_tree_rss_mb": round(peak / 2**20, 1),
        "peak_driver_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "balanced": stats["records"]["balanced"] and stats["photos"]["balanced"],
    }


def run_child(data: Path, out: Path, cpus: int, tmp: Path, pin: bool = True) -> dict[str, Any]:
    env = {**os.environ, "RAY_TMPDIR": str(tmp), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, __file__, "--child", "--data", str(data), "--out", str(out), "--cpus", str(cpus),
           *(["--no-pin"] if not pin else [])]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    shutil.rmtree(out, ignore_errors=True)
    print(json.dumps(result), file=sys.stderr)
    return result


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return round(statistics.median(r[key] for r in runs), 1)


def _photo_blobs(n: int, size: int) -> list[bytes]:
    import io

    from tnlbt.data.synthetic import make_recipe, render_photo

    blobs = []
    for i in range(n):
        buf = io.BytesIO()
        render_photo(make_recipe(7, i), 0, size, 1.0, 7).save(buf, "JPEG", quality=90)
        blobs.append(buf.getvalue())
    return blobs


def decode_cost(sizes: list[int], n: int, repeats: int, short_side: int = 256) -> dict[str, Any]:
    """Median CPU ms per photo of ``decode_image`` for JPEGs rendered at each source size (one core)."""
    from tnlbt.data.images import decode_image

    out: dict[str, Any] = {}
    for size in sizes:
        blobs = _photo_blobs(n, size)
        per_pass = []
        for _ in range(repeats):
            c0 = time.process_time()
            for b in blobs:
                res = decode_image(b, short_side=short_side, quality=90)
                if res.data is None:
                    raise RuntimeError(f"generator photo failed to decode: {res.reason}")
            per_pass.append((time.process_time() - c0) / n)
        ms = statistics.median(per_pass) * 1000
        out[str(size)] = {"source_px": size, "mean_jpeg_kb": round(sum(map(len, blobs)) / n / 1024, 1),
                          "cpu_ms_per_photo": round(ms, 3), "photos_per_cpu_s": round(1000 / ms, 1),
                          "passes_ms": [round(x * 1000, 3) for x in per_pass]}
        print(f"decode {size:4d} px source -> short side {short_side}: {ms:.2f} CPU ms/photo", flush=True)
    return {"short_side": short_side, "photos": n, "repeats": repeats, "by_source_px": out,
            "note": "decode + RGB convert + resize + JPEG q90 re-encode, one core, CPU time (load-robust)"}


def ceiling_worker(n: int, size: int, passes: int) -> dict[str, Any]:
    """One process of ``parallel_ceiling``: build the photos, wait for "go" on stdin, decode, report the span."""
    from tnlbt.data.images import decode_image

    blobs = _photo_blobs(n, size)  # built before the start signal: only the decoding is timed
    decode_image(blobs[0], short_side=256, quality=90)
    print("ready", flush=True)
    sys.stdin.readline()
    t0 = time.perf_counter()  # CLOCK_MONOTONIC: one clock for every process on the machine
    for _ in range(passes):
        for b in blobs:
            decode_image(b, short_side=256, quality=90)
    return {"start": t0, "end": time.perf_counter(), "photos": n * passes}


def parallel_ceiling(procs: int, n: int = 100, size: int = 128, passes: int = 20) -> dict[str, Any]:
    """Photos/s of ``procs`` independent processes decoding ``passes`` x ``n`` photos each, started together.

    The work is a preprocess task's main cost (``decode_image``: decode, resize, re-encode), without Ray, files
    or any shared state, so ``parallel_ceiling(2) / parallel_ceiling(1)`` bounds what 2 CPUs can give on this
    box. Rate = all photos / (last end - first start).
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}  # one CPU a process, as a task gets
    cmd = [sys.executable, __file__, "--ceiling-worker", str(n), str(size), str(passes)]
    workers = [subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
               for _ in range(procs)]
    try:
        for w in workers:
            if w.stdout.readline().strip() != "ready":
                raise RuntimeError("a ceiling worker failed before it was ready")
        for w in workers:  # every worker is waiting: the start signal reaches them within microseconds
            w.stdin.write("go\n")
            w.stdin.flush()
        spans = [json.loads(w.communicate(timeout=600)[0].strip().splitlines()[-1]) for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:  # an error above left it waiting
                w.kill()
    if any(w.returncode for w in workers):
        raise RuntimeError("a ceiling worker failed")
    wall = max(x["end"] for x in spans) - min(x["start"] for x in spans)
    photos = sum(x["photos"] for x in spans)
    # microseconds: a quick run's span is a few ms, and ms rounding would make seconds disagree with the rate
    return {"procs": procs, "photos": photos, "seconds": round(wall, 6), "photos_per_s": round(photos / wall, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes, one repeat")
    p.add_argument("--recipes", type=int, default=None, help="throughput corpus size (default 20000)")
    p.add_argument(
        "--mem-sizes", type=int, nargs=2, default=None, help="memory comparison sizes (10000 50000)"
    )
    p.add_argument("--cpus", type=int, nargs="+", default=[1, 2])
    p.add_argument(
        "--no-pin", dest="pin", action="store_false",
        help="give every run all cores and limit only Ray's CPU count (before: the 1-CPU run's driver, raylet "
             "and GCS used the second core)",
    )
    p.add_argument("--repeats", type=int, default=None, help="runs per setting, median reported (default 3)")
    p.add_argument(
        "--base",
        type=int,
        default=None,
        help="distinct recipes to generate; larger corpora are tiled (0 = all distinct)",
    )
    p.add_argument("--workdir", default=None, help="where corpora go (default a temp folder, kept)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "preprocess.json"))
    p.add_argument(
        "--only",
        choices=["throughput", "memory", "decode"],
        default=None,
        help="run one part and update that part of an existing --out JSON",
    )
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--ceiling-worker", type=int, nargs=3, metavar=("N", "SIZE", "PASSES"), help=argparse.SUPPRESS)
    _quiet.add_arguments(p)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.data, args.out, args.cpus[0], args.pin)))
        return 0
    if args.ceiling_worker:
        print(json.dumps(ceiling_worker(*args.ceiling_worker)))
        return 0
    quiet = _quiet.from_args(args, "bench/preprocess.py")

    quick = args.quick
    load_start = list(os.getloadavg())
    if args.only == "decode":
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        result = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {}
        result["decode"] = decode_cost([128, 256, 384, 512, 768], 40 if quick else 200, args.repeats or 3)
        result["decode"]["machine"] = _machine(load_start)
        result["decode"]["quiet"] = _quiet.finish(quiet)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        return 0
    n_tp = args.recipes or (2000 if quick else 20000)
    mem_sizes = args.mem_sizes or ([1000, 5000] if quick else [10000, 50000])
    repeats = args.repeats or (1 if quick else 3)
    base_n = args.base if args.base is not None else (1000 if quick else 0)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="tnlbt-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    ray_tmp = Path(tempfile.mkdtemp(prefix="rb", dir="/tmp"))

    # only the corpora the chosen part reads (generating the 50k memory corpus alone takes minutes)
    sizes = ({n_tp} if args.only == "throughput" else set(mem_sizes) if args.only == "memory"
             else {n_tp, *mem_sizes})
    corpora: dict[int, Path] = {}
    gen_info = {}
    if base_n:
        gen_info = make_base(work / f"base{base_n}", base_n, workers=2)
        for n in sizes:
            corpora[n] = tile_corpus(work / f"base{base_n}", work / f"tiled{n}", n)
    else:
        for n in sizes:
            gen_info[n] = make_base(work / f"synth{n}", n, workers=2)
            corpora[n] = work / f"synth{n}"

    result: dict[str, Any] = {}
    if args.only and Path(args.out).is_file():
        result = json.loads(Path(args.out).read_text())  # update one part, keep the other
    part = args.only or "all"
    result["command" if part == "all" else f"command_{part}"] = " ".join(
        [Path(sys.executable).name, "bench/preprocess.py", *(argv or sys.argv[1:])]
    )
    result["quick"] = quick
    result["repeats" if part == "all" else f"repeats_{part}"] = repeats
    corpus = result.setdefault("corpus", {})
    corpus.update(base_distinct_recipes=base_n, tiled=bool(base_n), generator=gen_info)
    if args.only in (None, "throughput"):
        # Interleave the CPU settings (1, 2, 1, 2, ...) so that load from other jobs hits both alike.
        # The box's own ceiling is measured between them, in the same minutes (see the module docstring).
        tp_runs: dict[int, list[dict[str, Any]]] = {cpus: [] for cpus in args.cpus}
        ceil_runs: dict[int, list[dict[str, Any]]] = {cpus: [] for cpus in args.cpus}
        for _ in range(repeats):
            for cpus in args.cpus:
                tp_runs[cpus].append(run_child(corpora[n_tp], work / "out", cpus, ray_tmp, args.pin))
                ceil_runs[cpus].append(parallel_ceiling(cpus, passes=4 if quick else 20))
        throughput = {
            str(cpus): {
                "recipes_per_s": _median(runs, "recipes_per_s"),
                "images_per_s": _median(runs, "images_per_s"),
                "images_per_task_cpu_s": _median(runs, "images_per_task_cpu_s"),
                "runs": runs,
            }
            for cpus, runs in tp_runs.items()
        }
        c = [str(x) for x in args.cpus]
        result["throughput"] = throughput
        result["speedup"] = {
            f"{c[-1]}_vs_{c[0]}": round(
                throughput[c[-1]]["recipes_per_s"] / throughput[c[0]]["recipes_per_s"], 2
            )
        }
        ceiling = {str(cpus): {"photos_per_s": _median(runs, "photos_per_s"), "runs": runs}
                   for cpus, runs in ceil_runs.items()}
        ratio = ceiling[c[-1]]["photos_per_s"] / ceiling[c[0]]["photos_per_s"]
        result["ceiling"] = ceiling
        result["ceiling_speedup"] = {f"{c[-1]}_vs_{c[0]}": round(ratio, 2)}
        result["speedup_share_of_ceiling"] = round(result["speedup"][f"{c[-1]}_vs_{c[0]}"] / ratio, 3)
        corpus["throughput_recipes"] = n_tp
        result["pinned"] = args.pin
        result["machine_throughput"] = _machine(load_start)
        result["quiet_throughput"] = _quiet.finish(quiet)  # per part: --only updates one part, keeps the other
    if args.only in (None, "memory"):
        memory: dict[str, Any] = {}
        for n in mem_sizes:
            runs = [run_child(corpora[n], work / "out", max(args.cpus), ray_tmp, args.pin) for _ in range(repeats)]
            memory[str(n)] = {
                "peak_tree_rss_mb": _median(runs, "peak_tree_rss_mb"),
                "peak_driver_rss_mb": _median(runs, "peak_driver_rss_mb"),
                "runs": runs,
            }
        small, large = (memory[str(n)] for n in mem_sizes)
        result["memory"] = memory
        result["memory_ratio_tree"] = round(large["peak_tree_rss_mb"] / small["peak_tree_rss_mb"], 3)
        result["memory_ratio_driver"] = round(large["peak_driver_rss_mb"] / small["peak_driver_rss_mb"], 3)
        result["memory_target"] = "ratio <= 1.2 (streaming)"
        corpus["memory_recipes"] = mem_sizes
        result["machine_memory"] = _machine(load_start)
        result["quiet_memory"] = _quiet.finish(quiet)
    result.pop("quiet", None)  # the record for both parts of earlier runs: one part's rerun made it wrong
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    keys = ("speedup", "ceiling_speedup", "speedup_share_of_ceiling", "memory_ratio_tree", "memory_ratio_driver")
    print(json.dumps({k: result.get(k) for k in keys}))
    return 0


def _machine(load_start: list[float]) -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "loadavg_start": load_start,
        "loadavg_end": list(os.getloadavg()),
    }  # the CPU, and whether the box was quiet, are in each part's "quiet_*" record (bench/_quiet.py)


if __name__ == "__main__":
    sys.exit(main())
