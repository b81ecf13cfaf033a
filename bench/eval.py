"""Benchmark of the bagged Recipe1M evaluation (10k setting, 10 bags, both directions, D = 1024).

Measures, interleaved in the same run (the machine is shared, so the two are timed side by side):
* ``eval``: :func:`tnlbt.metrics.bagged_metrics` end to end (normalising, drawing bags, blocked products,
  counting ranks in both directions, aggregating);
* ``matmul``: only the fp32 similarity products that evaluation needs: one ``(bag, D) x (D, bag)`` product
  per bag on already normalised, already gathered bag embeddings.
Reports the median of each over the repetitions and the median of the per-repetition ratios (goal: <= 1.5).

    .venv/bin/python bench/eval.py              # writes bench/results/eval.json
    .venv/bin/python bench/eval.py --pool 3000 --bag 1000 --reps 2 --out /tmp/e.json   # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tnlbt.metrics import bag_indices, bagged_metrics

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_quiet.py: the quiet-box rule
import _quiet


def make_embeddings(n: int, dim: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Correlated pairs: recipe = image + noise (cos of a pair ~ 1/sqrt(1 + noise²), so ranks are not 1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    y = x + noise * torch.randn(n, dim, generator=g)
    return x.numpy(), y.numpy()


def time_matmuls(x: np.ndarray, y: np.ndarray, bags: list[np.ndarray]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of the products alone."""
    xs = [F.normalize(torch.from_numpy(x[b]), dim=1) for b in bags]
    ys = [F.normalize(torch.from_numpy(y[b]), dim=1).T.contiguous() for b in bags]
    t0, c0 = time.perf_counter(), time.process_time()
    for a, bt in zip(xs, ys, strict=True):
        torch.mm(a, bt)
    return time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pool", type=int, default=20000, help="paired rows to draw bags from")
    p.add_argument("--bag", type=int, default=10000)
    p.add_argument("--bags", type=int, default=10)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--noise", type=float, default=10.0)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "eval.json"))
    _quiet.add_arguments(p)
    args = p.parse_args()
    quiet = _quiet.from_args(args, "bench/eval.py")

    load_start = [round(v, 2) for v in os.getloadavg()]
    x, y = make_embeddings(args.pool, args.dim, args.noise, seed=0)
    eval_s, mm_s, eval_cpu, mm_cpu, result = [], [], [], [], None
    for rep in range(args.reps):
        # Same bags for both timings in a repetition.
        bags = bag_indices(args.pool, args.bag, args.bags, np.random.default_rng(rep))
        t0, c0 = time.perf_counter(), time.process_time()
        result = bagged_metrics(
            x, y, args.bag, args.bags, np.random.default_rng(rep), "random", args.chunk_size
        )
        eval_s.append(time.perf_counter() - t0)
        eval_cpu.append(time.process_time() - c0)
        wall, cpu = time_matmuls(x, y, bags)
        mm_s.append(wall)
        mm_cpu.append(cpu)
        print(
            f"rep {rep}: eval {eval_s[-1]:.2f} s, matmuls {mm_s[-1]:.2f} s, "
            f"ratio {eval_s[-1] / mm_s[-1]:.2f}",
            flush=True,
        )
    med_eval, med_mm = statistics.median(eval_s), statistics.median(mm_s)
    out = {
        "setting": {
            "pool": args.pool,
            "bag_size": args.bag,
            "n_bags": args.bags,
            "dim": args.dim,
            "directions": 2,
            "noise": args.noise,
            "chunk_size": args.chunk_size,
            "reps": args.reps,
        },
        "eval_seconds_median": round(med_eval, 3),
        "matmul_seconds_median": round(med_mm, 3),
        # Headline: median of the per-repetition ratios (each pair timed back to back, so a change in the
        # machine's load between repetitions cancels); the ratio of the medians is kept for reference.
        "ratio": round(statistics.median(e / m for e, m in zip(eval_s, mm_s, strict=True)), 3),
        "ratio_of_medians": round(med_eval / med_mm, 3),
        "ratio_goal": 1.5,
        # CPU seconds of this process: less sensitive to other jobs than wall time (threads that spin while
        # waiting still count, so it is a cross-check, not the goal's measure).
        "eval_cpu_seconds_median": round(statistics.median(eval_cpu), 3),
        "matmul_cpu_seconds_median": round(statistics.median(mm_cpu), 3),
        "cpu_ratio": round(statistics.median(eval_cpu) / statistics.median(mm_cpu), 3),
        "per_rep": [
            {"eval_s": round(e, 3), "matmul_s": round(m, 3), "ratio": round(e / m, 3),
             "eval_cpu_s": round(ec, 3), "matmul_cpu_s": round(mc, 3)}
            for e, m, ec, mc in zip(eval_s, mm_s, eval_cpu, mm_cpu, strict=True)
        ],
        "metrics_last_rep": result,
        "quiet": _quiet.finish(quiet),
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "loadavg_at_start": load_start,
            "loadavg_at_end": [round(v, 2) for v in os.getloadavg()],
            "note": "shared machine: other jobs ran at the same time; timings interleaved",
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    keys = ("eval_seconds_median", "matmul_seconds_median", "ratio", "cpu_ratio")
    print(json.dumps({k: out[k] for k in keys}))


if __name__ == "__main__":
    main()
