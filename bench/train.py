"""Training benchmarks -> bench/results/train.json (sections merge into the file; rerun one with --only).

Every section follows bench/_quiet.py: it refuses to run when the 1-minute load average is >= 1.5 at the start
(``--wait-quiet S`` waits for a quiet box, ``--allow-loaded`` runs anyway and marks the result invalid; invalid
results are printed, never written into bench/results/).

Sections:
  peak     matmul peak of this machine, fp32 and bf16 (2048^3 GEMMs, best of a few, smaller for a dtype the CPU
           emulates: bf16 without bf16 units), GFLOP/s
  step     the real training step (TrainStep + the loop's update: finite checks, clipping, optimisers) of a
           preset at one worker's rows, on tnlbt synth recipes: paired and recipe-only step times, each timed in
           a child process that also measures the matmul peak between its steps (same process, same minute);
           with --baseline DIR a second child per precision runs an older tree on the same rows, the children
           taking turns (interleaved rounds, medians, never two at once). FLOPs per step (FlopCounterMode's
           formulas, the whole step including the WGAN-GP critic) -> achieved GFLOP/s against both peaks;
           new/old and bf16/fp32 ratios; a torch.profiler breakdown by category and the top ops.
  memory   largest global batch whose training step fits a fixed memory budget, without and with the feature
           cache. Method: one subprocess per mode runs steps of increasing size and reads its peak RSS
           (getrusage ru_maxrss, monotone); budget = peak RSS after a warm-up step of 8 rows + BUDGET MiB.
           Without the cache the batch is one micro-batch; with it the micro-batch stays at --micro and K
           grows.
  decode   JPEG decode + train augmentation per image (needs --data)
  validate the epoch-end validation of the preset's model (needs --data): packed against padded recipe lines
           in eval, interleaved rounds, medians; collate seconds; the two paths' embedding difference
  workers  samples/s of Ray Train with 1 worker x 2 threads and 2 workers x 1 thread (equal cores) on the same
           data and preset (rank-0 log records, first record dropped as warm-up); the 2 workers with the
           preset's rows each (twice the global batch) and with the global batch split in two
  demo     demo_cpu end to end on a processed folder: wall time of `fit`, then test-split 1k-bag metrics of the
           best checkpoint (image->recipe and recipe->image)

Usage: python bench/train.py [--only step,peak,memory,decode,validate,workers,demo] [--preset demo_cpu]
       [--baseline OLD_TREE] [--data PROCESSED] [--wait-quiet 600]
e.g. the step against today's main:  mkdir /tmp/base && git archive main | tar -x -C /tmp/base &&
       python bench/train.py --only step --baseline /tmp/base
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_quiet.py: the quiet-box rule
import _quiet

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "train.json"


def _load(out: Path) -> dict[str, Any]:
    return json.loads(out.read_text()) if out.exists() else {}


def _save(section: str, data: dict[str, Any], quiet: dict[str, Any], out: Path = OUT) -> None:
    """Merge one section into ``out``. A section measured on a busy box (``quiet.valid`` false) is printed but
    never written into bench/results/ (pass ``--out`` elsewhere to keep it)."""
    data.setdefault("quiet", _quiet.finish(quiet))
    data["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    print(f"[{section}] {json.dumps(data)[:600]}", flush=True)
    if not data["quiet"]["valid"] and out.resolve().parent == OUT.parent.resolve():
        print(f"[{section}] not written: measured on a busy box (quiet.valid=false); use --out elsewhere",
              flush=True)
        return
    allres = _load(out)
    allres[section] = data
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(allres, indent=2, sort_keys=True) + "\n")


# -- peak ----------------------------------------------------------------------------------------------------
def matmul_peak(n: int = 2048, reps: int = 5, max_s: float = 0.5) -> dict[str, float]:
    """Best-of-``reps`` square GEMM GFLOP/s in fp32 and bf16 at size ``n``, or smaller for a dtype this CPU runs
    slowly: a CPU without bf16 units emulates bf16 GEMMs at ~0.3 GFLOP/s (Zen 2, against fp32's 88), where one
    2048^3 product takes a minute. A 512^3 probe estimates the time at ``n``; the size halves until one product
    fits in ``max_s``. The size used is recorded per dtype."""
    import torch

    out: dict[str, float] = {}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        probe = torch.randn(512, 512, dtype=dt)
        t = time.perf_counter()
        probe @ probe
        per_flop = (time.perf_counter() - t) / (2 * 512**3)
        m = n
        while m > 256 and 2 * m**3 * per_flop > max_s:
            m //= 2
        a, b = torch.randn(m, m, dtype=dt), torch.randn(m, m, dtype=dt)
        a @ b  # warm-up
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t)
        out[f"{name}_gflops"] = 2 * m**3 / best / 1e9
        out[f"{name}_n"] = m
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


# -- step: the real training step against the matmul peak and the previous code, interleaved -----------------
# Every timed figure here is a ratio against something measured in the same process and the same minute: the
# matmul peak of the child process that times the step, and the other code path (a second child process running
# an older tree, e.g. today's main), the children taking turns so that they never run at once.
STEP_REPLY = "@@step "


def _synth_rows(cfg, n_rows: int, seed: int = 0, n_recipes: int = 2000) -> tuple[list[dict[str, Any]], int, int]:
    """Processed-Parquet-like rows from ``tnlbt synth``'s recipes (H-T tokenisation, the preset's limits, no
    photos), so that padding, line counts and lengths (what the recipe encoder's cost depends on) are the
    demo's. Returns (rows, vocabulary size, number of ingredient labels)."""
    from collections import Counter

    from tnlbt.data.synthetic import make_recipe
    from tnlbt.data.vocab import build_vocab, count_words, encode_recipe_text

    recipes = [make_recipe(seed, i) for i in range(max(n_recipes, n_rows))]

    def texts(r) -> tuple[str, list[str], list[str]]:
        return r.title, [it.line for it in r.items] + [x for x, _ in r.extra_lines], list(r.instructions)

    counts: Counter[str] = Counter()
    for r in recipes:
        t, g, s = texts(r)
        count_words([t, *g, *s], counts)
    vocab = build_vocab(counts, cfg.data.min_word_count)
    names = sorted({it.det for r in recipes for it in r.items if it.valid})
    index = {n: i for i, n in enumerate(names)}
    rows = []
    for r in recipes[:n_rows]:
        row = encode_recipe_text(vocab, cfg.data, *texts(r))
        row["ingredient_labels"] = sorted({index[it.det] for it in r.items if it.valid})
        row["has_image"] = True
        rows.append(row)
    return rows, len(vocab), len(names)


def _preset_path(code_root: Path, preset: str) -> Path:
    """A preset read from ``code_root``'s own configs/ (an editable install maps tnlbt.presets to one tree)."""
    return code_root / "configs" / f"{preset}.yaml"


def _flop_counter():
    """A dispatch mode summing FlopCounterMode's per-op formulas (mm, conv, attention, ...) without its module
    tracker, which cannot follow the WGAN-GP's ``autograd.grad``; so the whole step is counted."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode

    class Flops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.total = 0
            self.registry = FlopCounterMode(display=False).flop_registry

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            f = self.registry.get(func._overloadpacket)
            if f is not None:
                self.total += int(f(*args, **kwargs, out_val=out))
            return out

    return Flops()


# profile categories, first match wins; names are aten ops without the "aten::" prefix
_RNG = ("bernoulli", "bernoulli_", "native_dropout", "uniform_", "random_", "normal_", "rand", "randn",
        "rand_like", "randn_like", "multinomial", "randint", "fused_dropout_mask")
_CASTS = ("_to_copy", "copy_", "to", "clone", "contiguous", "_copy_from", "_copy_from_and_resize",
          "_to_dtype_layout")
_GEMM = ("mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "_addmm_activation", "mkldnn_linear",
         "_mkldnn_linear_backward", "addbmm", "mv", "dot")
_ATTN = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward",
         "_scaled_dot_product_attention_math", "scaled_dot_product_attention",
         "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention")
_OPT = ("_fused_adam_", "_fused_adamw_", "_foreach_", "_amp_foreach_non_finite_check_and_unscale_")


def _category(name: str) -> str:
    if not name.startswith("aten::"):
        return "framework (autograd engine, optimizer and profiler records)"
    op = name[len("aten::"):]
    if op in _RNG:
        return "RNG (dropout masks, noise)"
    if op in _CASTS:
        return "casts and copies"
    if "conv" in op:
        return "conv"
    if op in _GEMM:
        return "GEMM"
    if op in _ATTN:
        return "attention kernels"
    if "pool" in op:
        return "pooling"
    if op.startswith(_OPT):
        return "optimizer (foreach / fused)"
    return "other elementwise, reductions, indexing"


def summarize_profile(events, wall_s: float, steps: int, top: int = 20) -> dict[str, Any]:
    """Self CPU time per category and per op (per step), the op count, and "Python glue": the wall time no
    recorded op accounts for (interpreter, dispatcher entry, module hooks)."""
    cats: dict[str, dict[str, float]] = {}
    ops = []
    total_self = 0.0
    calls = 0
    for e in events:
        s = e.self_cpu_time_total / 1e6
        total_self += s
        calls += e.count if e.key.startswith("aten::") else 0
        c = cats.setdefault(_category(e.key), {"s": 0.0, "calls": 0, "flops": 0.0})
        c["s"] += s
        c["calls"] += e.count
        c["flops"] += float(getattr(e, "flops", 0) or 0)
        ops.append((s, e.key, e.count))
    glue = max(0.0, wall_s - total_self)
    cats["Python glue (wall not in any op)"] = {"s": glue, "calls": 0, "flops": 0.0}
    out_cats = {}
    for k, v in sorted(cats.items(), key=lambda kv: -kv[1]["s"]):
        row = {"ms_per_step": round(1000 * v["s"] / steps, 2), "share": round(v["s"] / wall_s, 4),
               "calls_per_step": round(v["calls"] / steps, 1)}
        if v["flops"] and v["s"]:
            row["gflops_within"] = round(v["flops"] / v["s"] / 1e9, 1)
        out_cats[k] = row
    ops.sort(reverse=True)
    return {"profiled_wall_s_per_step": round(wall_s / steps, 4), "aten_calls_per_step": round(calls / steps),
            "categories": out_cats,
            "top_ops": [{"op": k, "ms_per_step": round(1000 * s / steps, 2), "share": round(s / wall_s, 4),
                         "calls_per_step": round(n / steps, 1)} for s, k, n in ops[:top]]}


def gemm_shapes(events, top: int = 12) -> list[dict[str, Any]]:
    """The matrix products (mm, addmm, bmm) by input shapes, slowest first, with the GFLOP/s each reached in
    the step (one profiled step with shapes recorded), to compare with the same shapes run alone."""
    rows = []
    for e in events:
        op = e.key.removeprefix("aten::")
        shapes = [list(x) for x in (e.input_shapes or [])]
        try:
            if op == "mm":
                (m, k), (_, n) = shapes[0], shapes[1]
                flops = 2 * m * k * n
            elif op == "addmm":
                (m, k), (_, n) = shapes[1], shapes[2]
                flops = 2 * m * k * n
            elif op == "bmm":
                (b, m, k), (_, _, n) = shapes[0], shapes[1]
                flops = 2 * b * m * k * n
            else:
                continue
        except (ValueError, IndexError):
            continue
        s = e.self_cpu_time_total / 1e6
        rows.append({"op": op, "shapes": shapes[:3], "calls": e.count, "ms": round(1000 * s, 3),
                     "gflops": round(flops * e.count / s / 1e9, 1) if s else None})
    rows.sort(key=lambda r: -r["ms"])
    return rows[:top]


class _StepChild:
    """One code tree's training step, built once and timed on request (runs in its own process)."""

    def __init__(self, code_root: Path, data_path: str, preset: str, precision: str,
                 overrides: list[str]) -> None:
        import torch

        from tnlbt.config import Config
        from tnlbt.data.collate import collate
        from tnlbt.models import create_model
        from tnlbt.train import step as step_mod

        d = torch.load(data_path, weights_only=False)
        cfg = Config.load(str(_preset_path(code_root, preset)), [f"train.precision={precision}", *overrides])
        self.cfg, self.S = cfg, step_mod
        torch.manual_seed(0)
        self.model = create_model(cfg, d["vocab_size"], d["n_ingredients"]).train()
        prepare = getattr(step_mod, "prepare_model", None)  # newer trees: memory format etc. before the optimisers
        if prepare is not None:
            prepare(self.model, cfg, torch.device("cpu"))
        self.opts = step_mod.build_optimizers(self.model, cfg)
        amp = torch.bfloat16 if precision == "bf16" else None
        self.step = step_mod.TrainStep(self.model, cfg, amp_dtype=amp)
        bs, k = cfg.train.batch_size, cfg.scaling.cache_steps
        paired, images = d["paired_rows"], d["images"]
        if bs * k != len(paired):
            raise SystemExit(f"{code_root}: {preset} takes {k} x {bs} paired rows per worker, the data has "
                             f"{len(paired)}: compare trees at the same rows per worker")
        n_ing = d["n_ingredients"]
        self.mbs = []
        for i in range(k):
            b = collate(paired[i * bs:(i + 1) * bs], n_ingredients=n_ing, with_images=False)
            b["image"] = images[i * bs:(i + 1) * bs].clone()
            self.mbs.append(b)
        ro = d["recipe_rows"][: bs * cfg.train.recipe_only_batch_mult]
        if len(ro) != bs * cfg.train.recipe_only_batch_mult:
            raise SystemExit(f"{code_root}: recipe-only batch of {bs * cfg.train.recipe_only_batch_mult} rows "
                             f"wanted, the data has {len(d['recipe_rows'])}")
        self.recipe = collate(ro, n_ingredients=n_ing, with_images=False)
        self.rows = {"paired_rows": bs * k, "micro_batches": k, "recipe_rows": len(ro)}

    def _update(self, terms: dict[str, float]) -> None:
        """What the loop does after the backward: finite checks, clipping, the optimisers' steps."""
        update = getattr(self.S, "apply_update", None)
        if update is not None:
            update(self.opts, terms, self.cfg)
            return
        import torch

        from tnlbt.losses import check_finite, grads_finite  # the loop's _finish_step before apply_update

        all_params = [p for o in self.opts.values() for g in o.param_groups for p in g["params"]]
        main_params = [p for g in self.opts["main"].param_groups for p in g["params"]]
        if check_finite(terms) or not grads_finite(all_params):
            raise RuntimeError("non-finite step in the benchmark")
        if self.cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(main_params, self.cfg.optim.grad_clip)
        for o in self.opts.values():
            o.step()

    def paired(self) -> None:
        for o in self.opts.values():
            o.zero_grad(set_to_none=True)
        self._update(self.step.paired_step(self.mbs, 0.1))

    def recipe_only(self) -> None:
        for o in self.opts.values():
            o.zero_grad(set_to_none=True)
        self._update(self.step.recipe_only_step(self.recipe, 0.1))

    def timed(self, fn) -> float:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    def flops(self) -> dict[str, int]:
        out = {}
        for name, fn in (("paired", self.paired), ("recipe_only", self.recipe_only)):
            fc = _flop_counter()
            with fc:
                fn()
            out[name] = fc.total
        return out

    def profile(self, steps: int) -> dict[str, Any]:
        from torch.profiler import ProfilerActivity, profile

        res = {}
        for name, fn in (("paired", self.paired), ("recipe_only", self.recipe_only)):
            fn()
            with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
                t = time.perf_counter()
                for _ in range(steps):
                    fn()
                wall = time.perf_counter() - t
            res[name] = summarize_profile(prof.key_averages(), wall, steps)
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                fn()
            res[name]["gemm_shapes"] = gemm_shapes(prof.key_averages(group_by_input_shape=True))
        return res

    def serve(self) -> None:
        """Answer JSON requests on stdin, one a line: peak | paired | recipe_only | flops | profile."""
        print(STEP_REPLY + json.dumps({"ready": True, **self.rows}), flush=True)
        for line in sys.stdin:
            req = json.loads(line)
            op = req["op"]
            if op == "peak":
                out: Any = matmul_peak(req.get("n", 2048), req.get("reps", 3))
            elif op == "paired":
                out = self.timed(self.paired)
            elif op == "recipe_only":
                out = self.timed(self.recipe_only)
            elif op == "flops":
                out = self.flops()
            elif op == "profile":
                out = self.profile(req.get("steps", 2))
            elif op == "quit":
                return
            else:
                raise SystemExit(f"unknown op {op!r}")
            print(STEP_REPLY + json.dumps(out), flush=True)


class _Kid:
    """The parent's handle on one :class:`_StepChild` process."""

    def __init__(self, code_root: Path, data: str, preset: str, precision: str, threads: int,
                 overrides: list[str]) -> None:
        env = {**os.environ, "PYTHONPATH": str(code_root), "OMP_NUM_THREADS": str(threads)}
        cmd = [sys.executable, str(Path(__file__).resolve()), "--step-child", "--code-root", str(code_root),
               "--step-data", data, "--preset", preset, "--precision", precision, "--threads", str(threads),
               *overrides]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                     cwd=str(code_root))
        self.info = self._read()

    def _read(self) -> Any:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(STEP_REPLY):
                return json.loads(line[len(STEP_REPLY):])
        raise RuntimeError(f"step child exited with {self.proc.wait()}")

    def ask(self, op: str, **kw: Any) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, BrokenPipeError, ValueError):
            self.ask("quit")
        self.proc.wait(timeout=60)


def _median(xs: list[float]) -> float:
    import statistics

    return statistics.median(xs)


def step_bench(preset: str, baseline: str | None, rounds: int, precisions: list[str], threads: int,
               profile_steps: int, quiet: dict[str, Any], variants: dict[str, list[str]] | None = None
               ) -> dict[str, Any]:
    """Paired and recipe-only steps of ``preset`` (this tree, and ``baseline``'s when given) against the matmul
    peak of the same process, interleaved over ``rounds`` rounds; medians, ratios, FLOPs, profile.
    ``variants``: more children of this tree, name -> config overrides (one lever off, say), each at the precision
    ``train.precision: auto`` takes on this machine (bf16 with bf16 units, else fp32), which is also the one
    profiled: that is the step users of this machine get."""
    import tempfile

    import torch

    from tnlbt.config import Config
    from tnlbt.train.precision import resolve_precision

    primary = "bf16" if resolve_precision("auto", torch.device("cpu")) is torch.bfloat16 else "fp32"

    cfg = Config.load(str(_preset_path(ROOT, preset)))
    per_worker = cfg.train.batch_size * cfg.scaling.cache_steps
    n_ro = cfg.train.batch_size * cfg.train.recipe_only_batch_mult
    rows, vocab, n_ing = _synth_rows(cfg, per_worker + n_ro)
    g = torch.Generator().manual_seed(0)
    s = cfg.model.image_size
    fd, data = tempfile.mkstemp(prefix="tnlbt_step_", suffix=".pt")
    os.close(fd)
    torch.save({"paired_rows": rows[:per_worker], "recipe_rows": rows[per_worker:], "vocab_size": vocab,
                "n_ingredients": n_ing, "images": torch.randn(per_worker, 3, s, s, generator=g)}, data)
    trees = {"new": ROOT} | ({"old": Path(baseline).resolve()} if baseline else {})
    kids: dict[str, _Kid] = {}
    res: dict[str, Any] = {"preset": preset, "threads": threads, "rounds": rounds,
                           "trees": {k: str(v) for k, v in trees.items()}, "vocab_size": vocab,
                           "n_ingredients": n_ing, "data": "tnlbt synth recipes, tokenised; random 64 px images",
                           "auto_precision": primary}  # the CPU is in the "quiet" record
    try:
        for tree, root in trees.items():
            for prec in precisions:
                kids[f"{tree}_{prec}"] = _Kid(root, data, preset, prec, threads, [])
        for name, overrides in (variants or {}).items():
            kids[f"{name}_{primary}"] = _Kid(ROOT, data, preset, primary, threads, overrides)
            res.setdefault("variants", {})[name] = overrides
        for name, kid in kids.items():  # warm-up, one child at a time
            for _ in range(2):
                kid.ask("paired")
                kid.ask("recipe_only")
            res[name] = {"layout": kid.info, "flops": kid.ask("flops")}
        times: dict[str, dict[str, list[float]]] = {n: {"paired": [], "recipe_only": [], "fp32_gflops": [],
                                                       "bf16_gflops": []} for n in kids}
        loads = []
        names = list(kids)
        for r in range(rounds):
            loads.append(os.getloadavg()[0])
            order = names[r % len(names):] + names[: r % len(names)]
            for name in order:
                kid = kids[name]
                pk = kid.ask("peak")
                times[name]["fp32_gflops"].append(pk["fp32_gflops"])
                times[name]["bf16_gflops"].append(pk["bf16_gflops"])
                times[name]["paired"].append(kid.ask("paired"))
                times[name]["recipe_only"].append(kid.ask("recipe_only"))
        res["load_1m_per_round"] = [round(x, 2) for x in loads]
        for name in names:
            t, out = times[name], res[name]
            peak = {"fp32_gflops": round(_median(t["fp32_gflops"]), 1),
                    "bf16_gflops": round(_median(t["bf16_gflops"]), 1)}
            out["peak_same_process"] = peak
            for kind in ("paired", "recipe_only"):
                med = _median(t[kind])
                gflops = out["flops"][kind] / med / 1e9
                rows_ = out["layout"]["paired_rows" if kind == "paired" else "recipe_rows"]
                out[kind] = {"median_s": round(med, 4), "all_s": [round(x, 4) for x in t[kind]],
                             "samples_per_s": round(rows_ / med, 1), "achieved_gflops": round(gflops, 1),
                             "fraction_of_fp32_peak": round(gflops / peak["fp32_gflops"], 4),
                             "fraction_of_bf16_peak": round(gflops / peak["bf16_gflops"], 4)}
        ratios: dict[str, float] = {}

        def per_round(a: str, b: str, kind: str) -> float:
            """Median over rounds of a's time over b's in the same round (drift between rounds cancels)."""
            return round(_median([x / y for x, y in zip(times[a][kind], times[b][kind], strict=True)]), 4)

        for prec in precisions:
            if "old" in trees:
                for kind in ("paired", "recipe_only"):
                    ratios[f"{kind}_{prec}_new_over_old"] = round(
                        res[f"new_{prec}"][kind]["median_s"] / res[f"old_{prec}"][kind]["median_s"], 4)
                    ratios[f"{kind}_{prec}_new_over_old_per_round"] = per_round(f"new_{prec}", f"old_{prec}", kind)
        for name in variants or {}:
            for kind in ("paired", "recipe_only"):
                ratios[f"{kind}_{primary}_{name}_over_new"] = round(
                    res[f"{name}_{primary}"][kind]["median_s"] / res[f"new_{primary}"][kind]["median_s"], 4)
                ratios[f"{kind}_{primary}_{name}_over_new_per_round"] = per_round(
                    f"{name}_{primary}", f"new_{primary}", kind)
        if {"fp32", "bf16"} <= set(precisions):
            for tree in trees:
                for kind in ("paired", "recipe_only"):
                    ratios[f"{kind}_{tree}_bf16_speedup_over_fp32"] = round(
                        res[f"{tree}_fp32"][kind]["median_s"] / res[f"{tree}_bf16"][kind]["median_s"], 4)
                    ratios[f"{kind}_{tree}_bf16_speedup_over_fp32_per_round"] = per_round(
                        f"{tree}_fp32", f"{tree}_bf16", kind)
        res["ratios"] = ratios
        if profile_steps:  # each tree's step at auto's precision (profiling every variant would double the run)
            for name in [n for n in (f"{t}_{primary}" for t in trees) if n in kids]:
                res[name]["profile"] = kids[name].ask("profile", steps=profile_steps)
    finally:
        for kid in kids.values():
            kid.close()
        os.unlink(data)
    res["quiet"] = _quiet.finish(quiet, max_end_load=max(2 * quiet["max_load_1m"], 2.5))
    return res


def _step_child_main(a: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(a.threads)
    code_root = Path(a.code_root).resolve()
    sys.path.insert(0, str(code_root))
    _StepChild(code_root, a.step_data, a.preset, a.precision, a.overrides).serve()
    return 0


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


# -- validate ------------------------------------------------------------------------------------------------
def validate_bench(data: str, preset: str, rounds: int = 3) -> dict[str, Any]:
    """The epoch-end validation (``tnlbt.train.validation.validate``: embed the val split, score bags) of the
    preset's model at its training precision, with the recipe encoder packing its lines in eval (the default
    since issue 10) against the padded path, interleaved rounds in this process, medians; also the seconds
    spent collating (decode + eval transform), and how far the two paths' embeddings are apart."""
    import numpy as np
    import torch

    from tnlbt.config import Config
    from tnlbt.data.collate import collate
    from tnlbt.models import create_model
    from tnlbt.train.backend import LocalBackend
    from tnlbt.train.precision import resolve_precision
    from tnlbt.train.step import prepare_model
    from tnlbt.train.validation import embed_rows, validate

    cfg = Config.load(preset)
    vocab = json.loads((Path(data) / "vocab.json").read_text())["tokens"]
    n_ing = len(json.loads((Path(data) / "ingredients.json").read_text())["names"])
    torch.manual_seed(0)
    model = create_model(cfg, len(vocab), n_ing).train()
    prepare_model(model, cfg, torch.device("cpu"))
    amp = resolve_precision(cfg.train.precision, torch.device("cpu"))
    backend = LocalBackend(data, cfg.train.seed)
    tf = model.image_transform(False)

    def collate_fn(rows, train=False):  # the loop's collate in eval (train=False) mode
        return collate(rows, n_ingredients=n_ing, image_transform=tf)

    def run(name: str) -> float:
        model.recipe_encoder.pack_lines = name == "packed"
        t = time.perf_counter()
        validate(model, backend, cfg, collate_fn, amp)
        return time.perf_counter() - t

    bs = max(cfg.train.batch_size, 64)
    t = time.perf_counter()
    n_val = sum(len(collate_fn(r)["title"]) for r in backend.val_batches(bs))
    collate_s = time.perf_counter() - t
    times: dict[str, list[float]] = {"packed": [], "padded": []}
    for name in times:  # warm-up, untimed: the first pass of each path allocates and picks kernels
        run(name)
    for _ in range(rounds):
        for name in times:
            times[name].append(run(name))
    embs = {}
    for name in times:  # run() left pack_lines at the last path; set it for each embedding explicitly
        model.recipe_encoder.pack_lines = name == "packed"
        embs[name] = embed_rows(model, backend.val_batches(bs), collate_fn, torch.device("cpu"), 0, amp)[1]
    med = {k: _median(v) for k, v in times.items()}
    return {"preset": preset, "precision": str(amp), "val_rows": n_val, "rounds": rounds,
            "validate_s": times, "median_s": med, "padded_over_packed": med["padded"] / med["packed"],
            "collate_s_once": round(collate_s, 3),
            "recipe_emb_max_abs_diff": float(np.abs(embs["packed"] - embs["padded"]).max())}


# -- workers / demo ------------------------------------------------------------------------------------------
def _records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def workers(data: str, preset: str, steps: int) -> dict[str, Any]:
    import tempfile

    from tnlbt.config import Config
    from tnlbt.train.ray_trainer import fit

    out: dict[str, Any] = {"preset": preset, "steps": steps}
    tmp = Path(tempfile.mkdtemp(prefix="tnlbt_bench_"))
    per_worker = Config.load(preset).train.batch_size
    # workers_2: each worker keeps the preset's rows (twice the global batch); workers_2_equal_global: the same
    # global batch split in two (what a user switching a preset from 1 worker to 2 would run)
    for name, n, rows in (("workers_1", 1, per_worker), ("workers_2", 2, per_worker),
                          ("workers_2_equal_global", 2, per_worker // 2)):
        cfg = Config.load(preset, [f"train.runs_dir={tmp}", f"train.run_name={name}",
                                   f"scaling.num_workers={n}", f"train.batch_size={rows}", "train.epochs=1",
                                   f"train.max_steps_per_epoch={steps}", "train.log_every=2",
                                   "train.val_max_rows=64", "train.val_bag_size=64", "train.val_bags=1",
                                   # equal cores: one worker gets both threads (threads = its CPU share)
                                   f"scaling.cpus_per_worker={2 // n}", "scaling.ray_num_cpus=4"])
        t = time.perf_counter()
        fit(cfg, data)
        wall = time.perf_counter() - t
        recs = [r for r in _records(tmp / name) if r["kind"] == "train"][1:]
        sps = [r["samples_per_s"] for r in recs]
        out[name] = {"samples_per_s": sum(sps) / len(sps) if sps else None, "fit_wall_s": wall,
                     "global_batch": cfg.train.batch_size * n * cfg.scaling.cache_steps}
    a = out["workers_1"]["samples_per_s"]
    for name in ("workers_2", "workers_2_equal_global"):
        b = out[name]["samples_per_s"]
        out[f"speedup_{name}_over_1"] = b / a if a and b else None
    return out


def demo(data: str, preset: str, overrides: list[str]) -> dict[str, Any]:
    import numpy as np
    import torch

    from tnlbt.config import Config
    from tnlbt.evaluate import embed_pairs
    from tnlbt.metrics import bagged_metrics
    from tnlbt.models import load_model
    from tnlbt.train.ray_trainer import fit, run_dir_for

    cfg = Config.load(preset, overrides)
    t = time.perf_counter()
    summary = fit(cfg, data)
    wall = time.perf_counter() - t
    run = run_dir_for(cfg)
    model, *_ = load_model(run / "checkpoints" / "best")
    with torch.no_grad():  # the TEST split (final report only; selection used val), as `tnlbt eval` embeds it
        emb = embed_pairs(model, Path(data) / "test", batch_size=128)
    img, rec = emb["image_emb"], emb["recipe_emb"]
    n = img.shape[0]
    bag = min(1000, n)
    m = bagged_metrics(img, rec, bag, 10, np.random.default_rng(0), "random")
    return {"preset": preset, "overrides": overrides, "train_wall_s": wall, "test_rows": n, "bag_size": bag,
            "test_metrics": m, "best_val_R@1": summary.get("best_val_R@1"), "final_step":
            summary.get("final_step"),
            "run_dir": str(run)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="processed folder (decode, workers, demo)")
    ap.add_argument("--only", default="step", help="comma list of sections")
    ap.add_argument("--preset", default="demo_cpu")
    ap.add_argument("--baseline", default=None,
                    help="step: a source tree of the previous code (e.g. `git archive main | tar -x -C DIR`), "
                    "timed interleaved with this one")
    ap.add_argument("--rounds", type=int, default=7, help="step: interleaved rounds (medians)")
    ap.add_argument("--precisions", default="bf16,fp32", help="step: comma list of fp32, bf16")
    ap.add_argument("--threads", type=int, default=2, help="step: torch threads of each step process")
    ap.add_argument("--profile-steps", type=int, default=2, help="step: profiled steps per kind (0 = none)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                    help="step: another child of this tree with these overrides (one lever off), at auto's precision")
    ap.add_argument("--micro", type=int, default=16, help="memory: micro-batch with the cache")
    ap.add_argument("--budget-mib", type=float, default=256.0)
    ap.add_argument("--max-global", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=12, help="workers: steps per run")
    ap.add_argument("--name", default="demo_section", help="demo: JSON section name")
    ap.add_argument("--out", type=Path, default=OUT, help=f"results file (default {OUT.relative_to(ROOT)})")
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--step-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--code-root", default=str(ROOT), help=argparse.SUPPRESS)
    ap.add_argument("--step-data", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--precision", default="bf16", help=argparse.SUPPRESS)
    _quiet.add_arguments(ap)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if a.step_child:
        return _step_child_main(a)
    sys.path.insert(0, str(ROOT))
    if a.memory_child:
        _memory_child(a.preset, a.memory_child, a.micro, a.budget_mib, a.max_global)
        return 0
    quiet = _quiet.from_args(a, "bench/train.py")
    # a terminated run still closes its step children (the finally blocks run on SystemExit)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    only = set(a.only.split(","))
    if "peak" in only:
        _save("peak", matmul_peak(), quiet, a.out)
    if "step" in only:
        variants = {v.split(":", 1)[0]: v.split(":", 1)[1].split(",") for v in a.variant}
        _save("step", step_bench(a.preset, a.baseline, a.rounds, a.precisions.split(","), a.threads,
                                 a.profile_steps, quiet, variants), quiet, a.out)
    if "memory" in only:
        _save("memory", memory(a.preset, a.micro, a.budget_mib, a.max_global), quiet, a.out)
    if "decode" in only:
        _save("decode", decode(a.data, a.preset), quiet, a.out)
    if "validate" in only:
        _save("validate", validate_bench(a.data, a.preset, a.rounds), quiet, a.out)
    if "workers" in only:
        _save("workers", workers(a.data, a.preset, a.steps), quiet, a.out)
    if "demo" in only:
        _save(a.name, demo(a.data, a.preset, a.overrides), quiet, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
