"""The GPU check, prepared for the first session that is lent a GPU: one command, a few minutes.

    .venv/bin/python bench/gpu_check.py                      # on a CUDA machine: fills the capacity table's GPU rows
    .venv/bin/python bench/gpu_check.py --device cpu --quick  # smoke run anywhere (tests do this; writes --out only)

What it measures, on one device, with the real training code (``tnlbt.train.step.TrainStep`` and the optimisers
of ``build_optimizers``, prepared and stepped as the loop does (``prepare_model``, ``apply_update``), not a
stand-in step):

1. **matmul peak**: the best of a few large GEMMs in bf16 and fp32 (TF32 off) on this device, the yardstick
   for MFU (spec sheets differ from what a device sustains; both are recorded when the device is known).
2. **training step** of the paper preset (``recipe1m_vit_b16``: ViT-B/16 at 224 px, D 1024, every TNLBT term)
   under bf16 autocast at the preset's per-GPU batch (96), halving on out-of-memory: median samples/s over
   the timed steps, peak memory. This is ``gpu_samples_per_s_per_worker`` for ``bench/capacity.py``.
3. **MFU**: FLOPs of one step counted with ``torch.utils.flop_counter.FlopCounterMode`` on the same model
   without the modality critic (its WGAN-GP ``autograd.grad`` is invisible to the counter; it is a small MLP on
   embeddings), timed the same way; achieved FLOP/s over the measured bf16 peak (and the spec peak if known).
4. **inference** (``tnlbt index`` and the serving encoders): image and recipe encoder vectors/s at batch 256
   and latency at batch 1 and 8 (one ``@serve.batch`` of photo queries), bf16.

Results go to ``--out`` (default ``bench/results/gpu.json``). On a CUDA device the capacity keys are also merged
into ``train.json`` (``gpu_samples_per_s_per_worker``), ``index.json`` (``embed_*_per_s_per_gpu``) and
``serve.json`` (``gpu_qps_per_replica``: one replica's photo-query rate at batch 8, an upper bound that leaves
out HTTP and search, labelled so), after which ``bench/capacity.py --write-doc README.md`` gives GPU rows.
Timing uses ``torch.cuda.synchronize`` around every timed step; medians are reported.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_quiet.py: the quiet-box rule

import _quiet

RESULTS = Path(__file__).resolve().parent / "results"
# Dense (no sparsity) peak TFLOP/s from the vendors' spec sheets, for the "MFU vs spec" figure only.
SPEC_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "A10G": 125.0, "L4": 121.0, "L40S": 362.0}


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(steps):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t)
    return out


def matmul_peak(device, n: int, reps: int = 5) -> dict[str, float]:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    out: dict[str, float] = {"n": n}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(n, n, dtype=dt, device=device)
        b = torch.randn(n, n, dtype=dt, device=device)
        best = min(_timed(lambda a=a, b=b: a @ b, device, 1, reps))
        out[f"{name}_tflops"] = round(2 * n**3 / best / 1e12, 3)
    return out


def _batch(cfg, n: int, vocab: int, n_ing: int, device, seed: int = 0) -> dict[str, Any]:
    """A collate-shaped batch like Recipe1M's (title <= 15 tokens, 20 lines x 15 tokens), on ``device``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    s = cfg.model.image_size
    b = {"title": torch.randint(3, vocab, (n, 15), generator=g),
         "ingredients": torch.randint(3, vocab, (n, 20, 15), generator=g),
         "instructions": torch.randint(3, vocab, (n, 20, 15), generator=g),
         "ingredient_labels": (torch.rand(n, n_ing, generator=g) < 0.01).float(),
         "has_image": torch.ones(n, dtype=torch.bool),
         "image": torch.randn(n, 3, s, s, generator=g)}
    return {k: v.to(device) for k, v in b.items()}


def _model(cfg, vocab: int, n_ing: int, device):
    import torch

    from tnlbt.models import create_model

    torch.manual_seed(0)
    return create_model(cfg, vocab, n_ing).to(device).train()


def train_step(cfg, vocab: int, n_ing: int, device, batch: int, warmup: int, steps: int,
               count_flops: bool) -> dict[str, Any]:
    """Samples/s of the real paired training step (all optimisers stepping) at ``batch`` rows, bf16 autocast."""
    import torch

    from tnlbt.train.step import TrainStep, apply_update, build_optimizers, prepare_model

    model = _model(cfg, vocab, n_ing, device)
    prepare_model(model, cfg, device)  # what the loop does: channels-last, dropout (nn.Dropout on CUDA)
    opts = build_optimizers(model, cfg)
    st = TrainStep(model, cfg, device=device, amp_dtype=torch.bfloat16)
    b = _batch(cfg, batch, vocab, n_ing, device)

    def one() -> None:
        for o in opts.values():
            o.zero_grad(set_to_none=True)
        apply_update(opts, st.paired_step([b], 0.1), cfg, 1, device)  # the loop's checks, clipping, steps

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = _timed(one, device, warmup, steps)
    med = statistics.median(times)
    res: dict[str, Any] = {"batch": batch, "step_s_median": round(med, 4), "step_s_all": [round(t, 4) for t in times],
                           "samples_per_s": round(batch / med, 2)}
    if device.type == "cuda":
        res["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    if count_flops:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as fc:
            one()
        res["flops_per_step"] = int(fc.get_total_flops())
    return res  # the model and optimisers go with this frame; callers empty the CUDA cache


def _fits(fn, device) -> Any:
    """``fn()``, or None when the device runs out of memory (then the caller halves the batch)."""
    import torch

    try:
        return fn()
    except torch.OutOfMemoryError:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return None


def inference(cfg, vocab: int, n_ing: int, device, big: int, warmup: int, steps: int) -> dict[str, Any]:
    import torch

    model = _model(cfg, vocab, n_ing, device).eval()
    out: dict[str, Any] = {}
    for bs in (1, 8, big):
        b = _batch(cfg, bs, vocab, n_ing, device, seed=bs)
        for part in ("image", "recipe"):
            def fwd(b=b, part=part) -> None:
                with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
                    if part == "image":
                        model.encode_image(b["image"], normalize=True)
                    else:
                        model.encode_recipe(b, normalize=True)

            med = statistics.median(_timed(fwd, device, warmup, steps))
            out[f"{part}_b{bs}"] = {"batch": bs, "ms": round(1000 * med, 3), "vectors_per_s": round(bs / med, 1)}
    return out


def _merge(path: Path, updates: dict[str, Any]) -> None:
    doc = json.loads(path.read_text()) if path.exists() else {}
    doc.update(updates)
    path.write_text(json.dumps(doc, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    import torch

    from tnlbt.config import Config

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default="recipe1m_vit_b16")
    p.add_argument("--batch", type=int, default=0, help="per-device training batch (default: the preset's)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="tiny_test preset, batch 8, 2 steps (smoke run)")
    p.add_argument("--out", default=str(RESULTS / "gpu.json"))
    _quiet.add_arguments(p)
    a = p.parse_args(argv)
    # a smoke run (--quick, e.g. in the test suite) is no measurement: it runs on a busy box too
    quiet = _quiet.from_args(a, "bench/gpu_check.py", allow_loaded=a.quick)
    device = torch.device(a.device)
    preset, steps, warmup = ("tiny_test", 2, 1) if a.quick else (a.preset, a.steps, a.warmup)
    cfg = Config.load(preset)
    cfg = cfg.replace(model=dataclasses.replace(cfg.model, image_pretrained=""))  # random init: speed only
    vocab, n_ing = (500, 50) if a.quick else (16303, 4102)  # H-T's vocabulary, ACME's ingredient labels
    batch = 8 if a.quick else (a.batch or cfg.train.batch_size)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    t0 = time.time()
    res: dict[str, Any] = {
        "machine": {"device": name, "cpus": os.cpu_count(), "torch": torch.__version__,
                    "load_avg_1m_at_start": round(os.getloadavg()[0], 2)},
        "preset": preset, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    res["peak"] = matmul_peak(device, 512 if a.quick else (8192 if device.type == "cuda" else 2048))
    print(f"[gpu_check] {name}: matmul peak {res['peak']}", flush=True)

    full = None
    while batch >= 1:
        full = _fits(lambda b=batch: train_step(cfg, vocab, n_ing, device, b, warmup, steps, False), device)
        if full is not None:
            break
        print(f"[gpu_check] batch {batch} does not fit: halving", flush=True)
        batch //= 2
    if full is None:
        raise SystemExit("not even batch 1 fits on this device")
    res["train_full"] = full
    if device.type == "cuda":
        torch.cuda.empty_cache()
    print(f"[gpu_check] full TNLBT step, batch {batch}: {full['samples_per_s']} samples/s", flush=True)

    no_adv = cfg.replace(model=dataclasses.replace(cfg.model, adversarial=False))
    counted = train_step(no_adv, vocab, n_ing, device, batch, warmup, steps, True)
    achieved = counted["flops_per_step"] / counted["step_s_median"] / 1e12
    counted["achieved_tflops"] = round(achieved, 3)
    counted["mfu_vs_measured_bf16_peak"] = round(achieved / res["peak"]["bf16_tflops"], 4)
    spec = next((v for k, v in SPEC_BF16_TFLOPS.items() if k in name), None)
    if spec:
        counted["mfu_vs_spec_bf16_peak"] = round(achieved / spec, 4)
        counted["spec_bf16_tflops"] = spec
    counted["note"] = "modality critic off (FlopCounterMode cannot follow the WGAN-GP autograd.grad)"
    res["train_counted"] = counted
    print(f"[gpu_check] MFU {counted['mfu_vs_measured_bf16_peak']:.1%} of the measured bf16 peak "
          f"({achieved:.1f} TFLOP/s)", flush=True)

    res["inference"] = inference(cfg, vocab, n_ing, device, 8 if a.quick else 256, warmup, steps)
    print(f"[gpu_check] inference {json.dumps(res['inference'])}", flush=True)
    res["seconds"] = round(time.time() - t0, 1)
    res["quiet"] = _quiet.finish(quiet)

    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    if device.type == "cuda" and not a.quick:
        # The keys bench/capacity.py reads; only real GPU measurements of the paper preset go there.
        where = {"gpu": name, "source": "bench/gpu_check.py", "when": res["when"]}
        inf = res["inference"]
        big = max(v["batch"] for v in inf.values())
        _merge(RESULTS / "train.json", {"gpu_samples_per_s_per_worker": full["samples_per_s"],
                                        "gpu_batch_per_worker": batch, "gpu_machine": where})
        _merge(RESULTS / "index.json", {"embed_image_per_s_per_gpu": inf[f"image_b{big}"]["vectors_per_s"],
                                        "embed_recipe_per_s_per_gpu": inf[f"recipe_b{big}"]["vectors_per_s"],
                                        "embed_machine": where})
        _merge(RESULTS / "serve.json", {"gpu_qps_per_replica": inf["image_b8"]["vectors_per_s"],
                                        "gpu_qps_note": "one image-encoder replica at batch 8, encoding only "
                                        "(no HTTP, no search): an upper bound until bench/serve.py --gpus runs",
                                        "gpu_machine": where})
    print(f"[gpu_check] wrote {out} in {res['seconds']} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
