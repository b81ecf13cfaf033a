"""Training benchmarks -> bench/results/train.json (sections merge into the file; rerun one with --only).

Sections:
  peak     matmul peak of this machine, fp32 and bf16 (square GEMMs, best of a few), GFLOP/s
  flops    FLOPs of one training step (torch.utils.flop_counter.FlopCounterMode) of a preset's model, timed
           -> achieved GFLOP/s and the fraction of the fp32 / bf16 peak measured in the same process; also
           fp32 vs bf16-autocast step time (what train.precision=auto decides on from)
  memory   largest global batch whose training step fits a fixed memory budget, without and with the feature
           cache. Method: one subprocess per mode runs steps of increasing size and reads its peak RSS
           (getrusage ru_maxrss, monotone); budget = peak RSS after a warm-up step of 8 rows + BUDGET MiB.
           Without the cache the batch is one micro-batch; with it the micro-batch stays at --micro and K
           grows.
  workers  samples/s of Ray Train with 1 and 2 CPU workers on the same data and preset (rank-0 log records,
           first record dropped as warm-up)
  demo     demo_cpu end to end on a processed folder: wall time of `fit`, then test-split 1k-bag metrics of
  the
           best checkpoint (image->recipe and recipe->image)

Usage: python bench/train.py --data PROCESSED [--only peak,flops,memory,workers,demo] [--preset demo_cpu]
The machine may be shared: the JSON records the load average next to every section.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "train.json"


def _load() -> dict[str, Any]:
    return json.loads(OUT.read_text()) if OUT.exists() else {}


def _save(section: str, data: dict[str, Any]) -> None:
    allres = _load()
    data["load_average"] = list(os.getloadavg())
    data["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    allres[section] = data
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(allres, indent=2, sort_keys=True) + "\n")
    print(f"[{section}] {json.dumps(data)[:600]}", flush=True)


# -- peak ----------------------------------------------------------------------------------------------------
def matmul_peak(n: int = 2048, reps: int = 5) -> dict[str, float]:
    import torch

    out = {}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
        a @ b  # warm-up
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t)
        out[f"{name}_gflops"] = 2 * n**3 / best / 1e9
    out["n"] = n
    out["threads"] = torch.get_num_threads()
    return out


# -- helpers -------------------------------------------------------------------------------------------------
def _fake_batch(cfg, n: int, vocab: int, n_ing: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    s = cfg.model.image_size
    return {"title": torch.randint(3, vocab, (n, 12), generator=g),
            "ingredients": torch.randint(3, vocab, (n, 10, 8), generator=g),
            "instructions": torch.randint(3, vocab, (n, 8, 12), generator=g),
            "ingredient_labels": (torch.rand(n, n_ing, generator=g) < 0.05).float(),
            "has_image": torch.ones(n, dtype=torch.bool),
            "image": torch.randn(n, 3, s, s, generator=g)}


def _model(preset: str, overrides: list[str] | None = None, vocab: int = 2000, n_ing: int = 300):
    import torch

    from tnlbt.config import Config
    from tnlbt.models import create_model

    cfg = Config.load(preset, overrides or [])
    torch.manual_seed(0)
    return cfg, create_model(cfg, vocab, n_ing).train(), vocab, n_ing


def step_flops(preset: str, batch: int) -> dict[str, Any]:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from tnlbt.train.step import TrainStep, build_optimizers

    # FlopCounterMode cannot follow the WGAN-GP's autograd.grad inside a step: the modality critic (a small
    # MLP on embeddings, a negligible share of the FLOPs) is left out of the counted/timed step.
    cfg, model, v, ni = _model(preset, ["model.adversarial=false"])
    opts = build_optimizers(model, cfg)
    b = _fake_batch(cfg, batch, v, ni)
    peak = matmul_peak()
    res: dict[str, Any] = {"preset": preset, "batch": batch, "peak": peak, "note": "modality critic off",
                           "params": sum(p.numel() for p in model.parameters())}
    for prec, dt in (("fp32", None), ("bf16", torch.bfloat16)):
        st = TrainStep(model, cfg, amp_dtype=dt)

        def one() -> None:
            for o in opts.values():
                o.zero_grad(set_to_none=True)
            st.paired_step([b], 0.1)  # noqa: B023
            for o in opts.values():
                o.step()

        one()  # warm-up
        if prec == "fp32":
            with FlopCounterMode(display=False) as fc:
                one()
            res["flops_per_step"] = int(fc.get_total_flops())
        times = []
        for _ in range(3):
            t = time.perf_counter()
            one()
            times.append(time.perf_counter() - t)
        best = min(times)
        res[f"{prec}_step_s"] = best
        res[f"{prec}_samples_per_s"] = batch / best
        res[f"{prec}_achieved_gflops"] = res["flops_per_step"] / best / 1e9
        res[f"{prec}_fraction_of_{prec}_peak"] = res[f"{prec}_achieved_gflops"] / peak[f"{prec}_gflops"]
    res["bf16_speedup"] = res["fp32_step_s"] / res["bf16_step_s"]
    return res


# -- memory --------------------------------------------------------------------------------------------------
def _memory_child(preset: str, mode: str, micro: int, budget_mib: float, max_global: int) -> None:
    """Runs in a subprocess: ascending sizes until peak RSS exceeds the budget; prints JSON lines."""
    import torch

    from tnlbt.train.step import TrainStep, build_optimizers

    torch.set_num_threads(1)
    cfg, model, v, ni = _model(preset)
    opts = build_optimizers(model, cfg)
    st = TrainStep(model, cfg)

    def step(mbs) -> None:
        for o in opts.values():
            o.zero_grad(set_to_none=True)
        st.paired_step(mbs, 0.1)
        for o in opts.values():
            o.step()

    def rss_mib() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

    step([_fake_batch(cfg, 8, v, ni)])
    base = rss_mib()
    limit = base + budget_mib
    print(json.dumps({"baseline_mib": base, "limit_mib": limit}), flush=True)
    size = micro
    while size <= max_global:
        if mode == "plain":
            mbs = [_fake_batch(cfg, size, v, ni, seed=size)]
        else:
            k = size // micro
            mbs = [_fake_batch(cfg, micro, v, ni, seed=size + i) for i in range(k)]
        t = time.perf_counter()
        step(mbs)
        r = rss_mib()
        print(json.dumps({"global": size, "peak_rss_mib": r, "fits": r <= limit,
                          "step_s": time.perf_counter() - t}), flush=True)
        if r > limit:
            break
        size *= 2


def memory(preset: str, micro: int, budget_mib: float, max_global: int) -> dict[str, Any]:
    out: dict[str, Any] = {"preset": preset, "micro_batch": micro, "budget_mib_above_baseline": budget_mib,
                           "method": "peak RSS (ru_maxrss) of a subprocess running steps of doubling size"}
    for mode in ("plain", "cache"):
        cmd = [sys.executable, __file__, "--memory-child", mode, "--preset", preset, "--micro", str(micro),
               "--budget-mib", str(budget_mib), "--max-global", str(max_global)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=3000)
        lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
        fits = [x["global"] for x in lines if x.get("fits")]
        out[mode] = {"records": lines, "largest_fitting_global_batch": max(fits) if fits else 0,
                     "hit_max_global": bool(fits and max(fits) >= max_global)}
        if proc.returncode:
            out[mode]["stderr_tail"] = proc.stderr[-2000:]
    p, c = out["plain"]["largest_fitting_global_batch"], out["cache"]["largest_fitting_global_batch"]
    out["ratio_cache_over_plain"] = c / p if p else None
    return out


# -- decode --------------------------------------------------------------------------------------------------
def decode(data: str, preset: str, n: int = 300) -> dict[str, Any]:
    """Cost of JPEG decode + train augmentation per image, and the bytes a decoded image would occupy if a
    Ray Data ``map_batches`` stage decoded it (it then crosses the object store instead of the JPEG)."""
    import numpy as np
    import torch

    from tnlbt.config import Config
    from tnlbt.data.images import decode_rgb
    from tnlbt.models.image_encoder import build_image_transform
    from tnlbt.train.backend import read_split_table

    torch.set_num_threads(1)
    cfg = Config.load(preset)
    rows = read_split_table(Path(data) / "train", ["images", "has_image"]).slice(0, n).to_pylist()
    imgs = [r["images"][0] for r in rows if r["images"]]
    stats = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "crop_pct": 0.875}
    tf = build_image_transform(stats, cfg.model.image_size, True)
    t = time.perf_counter()
    out = [tf(decode_rgb(bytes(b))) for b in imgs]
    dt = time.perf_counter() - t
    jpeg = float(np.mean([len(b) for b in imgs]))
    dec = out[0].numel() * 4
    return {"images": len(imgs), "image_size": cfg.model.image_size,
            "decode_augment_ms_per_image": 1000 * dt / len(imgs), "jpeg_bytes_mean": jpeg,
            "decoded_float32_bytes": dec, "bytes_expansion_if_decoded_upstream": dec / jpeg}


# -- workers / demo ------------------------------------------------------------------------------------------
def _records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def workers(data: str, preset: str, steps: int) -> dict[str, Any]:
    import tempfile

    from tnlbt.config import Config
    from tnlbt.train.ray_trainer import fit

    out: dict[str, Any] = {"preset": preset, "steps": steps}
    tmp = Path(tempfile.mkdtemp(prefix="tnlbt_bench_"))
    for n in (1, 2):
        cfg = Config.load(preset, [f"train.runs_dir={tmp}", f"train.run_name=w{n}",
                                   f"scaling.num_workers={n}", "train.epochs=1",
                                   f"train.max_steps_per_epoch={steps}", "train.log_every=2",
                                   "train.val_max_rows=64", "train.val_bag_size=64", "train.val_bags=1",
                                   "scaling.cpus_per_worker=1", "scaling.ray_num_cpus=4"])
        t = time.perf_counter()
        fit(cfg, data)
        wall = time.perf_counter() - t
        recs = [r for r in _records(tmp / f"w{n}") if r["kind"] == "train"][1:]
        sps = [r["samples_per_s"] for r in recs]
        out[f"workers_{n}"] = {"samples_per_s": sum(sps) / len(sps) if sps else None, "fit_wall_s": wall,
                               "global_batch": cfg.train.batch_size * n * cfg.scaling.cache_steps}
    a, b = out["workers_1"]["samples_per_s"], out["workers_2"]["samples_per_s"]
    out["speedup_2_over_1"] = b / a if a and b else None
    return out


def demo(data: str, preset: str, overrides: list[str]) -> dict[str, Any]:
    import numpy as np
    import torch

    from tnlbt.config import Config
    from tnlbt.metrics import bagged_metrics
    from tnlbt.models import load_model
    from tnlbt.train.backend import LocalBackend
    from tnlbt.train.ray_trainer import fit, run_dir_for
    from tnlbt.train.validation import embed_rows

    cfg = Config.load(preset, overrides)
    t = time.perf_counter()
    summary = fit(cfg, data)
    wall = time.perf_counter() - t
    run = run_dir_for(cfg)
    model, _, _, names = load_model(run / "checkpoints" / "best")
    from tnlbt.data.collate import collate

    tf = model.image_transform(False)

    def coll(rows, train=False, with_images=True):
        return collate(rows, n_ingredients=len(names), image_transform=tf, image_pick="first",
                       with_images=with_images)

    be = LocalBackend(data, 0)
    be._val_dir = Path(data) / "test"  # embed the TEST split (final report only; selection used val)
    img, rec = embed_rows(model, be.val_batches(128), coll, torch.device("cpu"))
    n = img.shape[0]
    bag = min(1000, n)
    m = bagged_metrics(img, rec, bag, 10, np.random.default_rng(0), "random")
    return {"preset": preset, "overrides": overrides, "train_wall_s": wall, "test_rows": n, "bag_size": bag,
            "test_metrics": m, "best_val_R@1": summary.get("best_val_R@1"), "final_step":
            summary.get("final_step"),
            "run_dir": str(run)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="processed folder (workers, demo)")
    ap.add_argument("--only", default="peak,flops,memory", help="comma list of sections")
    ap.add_argument("--preset", default="demo_cpu")
    ap.add_argument("--batch", type=int, default=48, help="flops: rows per step")
    ap.add_argument("--micro", type=int, default=16, help="memory: micro-batch with the cache")
    ap.add_argument("--budget-mib", type=float, default=256.0)
    ap.add_argument("--max-global", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=12, help="workers: steps per run")
    ap.add_argument("--name", default="demo_section", help="demo: JSON section name")
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if a.memory_child:
        _memory_child(a.preset, a.memory_child, a.micro, a.budget_mib, a.max_global)
        return 0
    only = set(a.only.split(","))
    if "peak" in only:
        _save("peak", matmul_peak())
    if "flops" in only:
        _save("flops", step_flops(a.preset, a.batch))
    if "memory" in only:
        _save("memory", memory(a.preset, a.micro, a.budget_mib, a.max_global))
    if "decode" in only:
        _save("decode", decode(a.data, a.preset))
    if "workers" in only:
        _save("workers", workers(a.data, a.preset, a.steps))
    if "demo" in only:
        _save(a.name, demo(a.data, a.preset, a.overrides))
    return 0


if __name__ == "__main__":
    sys.exit(main())
