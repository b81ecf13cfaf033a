"""The seeded, equal-budget study of TNLBT's terms -> bench/results/study.json and study.png.

A grid of settings x seeds on one processed dataset. Every run trains with the same ``train.epochs`` (cosine over
that budget), the best checkpoint is chosen on val (``best`` = highest val R@1), then ``tnlbt eval --split test``
(1k bags x ``eval.n_bags``). Settings (``--settings``, default all):

  full                 demo_cpu: every TNLBT term on, global batch 64 (the first grid, bench/results/study.json: 192)
  ht_baseline          H-T's loss, fixed margin, recipe SSL, no extras, global batch 10 (configs/ht_baseline.yaml)
  no_dynamic_margin    constant margin 0.3         no_cross_decoder   Cross Decoder (ITM) off
  itm_1                full with the Cross Decoder's ITM weight at 1.0, the paper preset's (full: 0.2; in
                       study_10ep_terms.json, run before demo_cpu took 0.2, `full` is 1.0 and `low_itm` 0.2)
  no_translation       generator + image critic off
  no_critic            modality critic off         no_recipe_ssl      recipe self-supervision off
  no_recipe_only       recipe SSL on the paired batches only: no recipe-only batches (splits no_recipe_ssl)
  recipe_ssl_1         recipe SSL at H-T's weight 1.0 (full: 0.3; in the grids before study_10ep_ssl.json `full` is
                       1.0, and there `recipe_ssl_0.3` is today's full)
  recipe_ssl_0.1       recipe SSL at weight 0.1 (paired and recipe-only batches)
  ht_baseline_ssl_0.3  ht_baseline with full's recipe SSL weight 0.3: H-T against TNLBT at equal tuning
  small_batch_epochs   global batch 10, equal epochs (6x the optimiser steps)
  small_batch_steps    global batch 10, equal optimiser steps (train.max_steps_per_epoch = full's steps)
  partial_aug          full + partial-recipe augmentation (train.partial_recipes = 0.5)
  partial_aug_0.2      the same with a smaller share of cut rows (0.2)

Why in one process (``tnlbt train --no-ray``): the same training loop as under Ray Train, but its data order is a
seeded permutation, so a seed names one run exactly and the differences between settings on the same seed are
paired (same init, same order); a preset's global batch (``train.batch_size x scaling.num_workers``) becomes one
process's batch, so the loss sees the same negatives. What differs from the Ray run: BatchNorm statistics over the
global batch instead of per worker.

Statistics: per setting, mean and a 95% t-interval over seeds; per setting, the paired difference against ``full``
on the same seeds (mean and 95% t-interval of the per-seed differences). Both directions, medR and R@1/5/10.

Resumes: a run whose ``metrics_test.json`` exists, whose recorded commands match and whose recorded config is what
its preset resolves to today is reused; a half-trained run, or one trained with an older preset, is trained again
from scratch (deterministic, so the result is the same). ``--report`` only rewrites the JSON and the PNG from the
runs on disk. Wall times carry the load average they were taken at (the results do not depend on the load: same
seed, same numbers).

Usage:
  python bench/study.py --data PROCESSED [--runs-dir runs/study] [--epochs 4] [--seeds 1,2,3]
                        [--settings full,ht_baseline,...] [--report] [extra key=value ...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "study.json"
PNG = ROOT / "bench" / "results" / "study.png"
DIRECTIONS = ("image_to_recipe", "recipe_to_image")
METRICS = ("medR", "R@1", "R@5", "R@10")
BASE = "full"
# name -> (preset, extra overrides); "{full_steps}" is filled with full's paired steps per epoch.
SETTINGS: dict[str, tuple[str, list[str]]] = {
    "full": ("demo_cpu", []),
    "ht_baseline": ("ht_baseline", []),
    "no_dynamic_margin": ("ablation_no_dynamic_margin", []),
    "no_cross_decoder": ("ablation_no_cross_decoder", []),
    "itm_1": ("demo_cpu", ["loss.w_itm=1.0"]),
    "no_translation": ("ablation_no_translation", []),
    "no_critic": ("ablation_no_critic", []),
    "no_recipe_ssl": ("ablation_no_recipe_ssl", []),
    "no_recipe_only": ("demo_cpu", ["train.recipe_only_every=0"]),
    "recipe_ssl_1": ("demo_cpu", ["loss.w_recipe_ssl=1.0"]),
    "recipe_ssl_0.1": ("demo_cpu", ["loss.w_recipe_ssl=0.1"]),
    "ht_baseline_ssl_0.3": ("ht_baseline", ["loss.w_recipe_ssl=0.3"]),
    "small_batch_epochs": ("ablation_small_batch", []),
    "small_batch_steps": ("ablation_small_batch", ["train.max_steps_per_epoch={full_steps}"]),
    "partial_aug": ("demo_cpu", ["train.partial_recipes=0.5"]),
    "partial_aug_0.2": ("demo_cpu", ["train.partial_recipes=0.2"]),
}
METHOD = ("each run: tnlbt train --no-ray (seeded order and init) for the same train.epochs, best checkpoint by val "
          "R@1, tnlbt eval --split test (1k bags); per setting mean and 95% t-interval over seeds; per setting the "
          "paired difference against full on the same seeds (mean and 95% t-interval)")
# Two-sided 95% Student-t quantiles t_{0.975, df}; beyond 30 the normal 1.96 is within 4%.
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def t975(df: int) -> float:
    """The 95% two-sided t quantile for ``df`` degrees of freedom (the table's next smaller df: conservative)."""
    return T975[max(k for k in T975 if k <= df)] if df <= 30 else 1.96


def interval(values: list[float]) -> dict[str, Any]:
    """Mean and the half-width of a 95% t-interval (None for one value)."""
    n = len(values)
    mean = statistics.fmean(values)
    half = t975(n - 1) * statistics.stdev(values) / math.sqrt(n) if n > 1 else None
    return {"mean": mean, "ci95": half, "n": n, "values": values}


def _tnlbt() -> list[str]:
    exe = Path(sys.executable).parent / "tnlbt"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "tnlbt"]


def _global_batch(preset: str) -> tuple[int, int]:
    """``(global paired batch, recipe-only multiplier)`` of a preset as its Ray run would have it."""
    from tnlbt.config import Config

    c = Config.load(preset)
    return c.train.batch_size * c.scaling.num_workers * c.scaling.cache_steps, c.train.recipe_only_batch_mult


def _n_paired(data: Path) -> int:
    return int(json.loads((data / "stats.json").read_text())["splits"]["train"]["paired"])


def setting_overrides(setting: str, full_steps: int) -> list[str]:
    """A setting's own ``key=value`` overrides, with ``{full_steps}`` (full's paired steps per epoch) filled in."""
    return [m.format(full_steps=full_steps) for m in SETTINGS[setting][1]]


def train_overrides(setting: str, seed: int, data: Path, runs_dir: Path, epochs: int, extra: list[str]) -> list[str]:
    """Every ``key=value`` a run's ``tnlbt train`` gets on top of its setting's preset."""
    more = setting_overrides(setting, _n_paired(data) // _global_batch(SETTINGS[BASE][0])[0])
    batch, _ = _global_batch(SETTINGS[setting][0])
    return [f"train.runs_dir={runs_dir}", f"train.epochs={epochs}", f"train.seed={seed}",
            "scaling.num_workers=1", f"train.batch_size={batch}", *more, *extra]


def commands(setting: str, run: Path, data: Path, overrides: list[str]) -> list[list[str]]:
    """The ``tnlbt train --no-ray`` and ``tnlbt eval`` command lines of one run (``overrides``: train_overrides)."""
    train = [*_tnlbt(), "train", "--no-ray", "--config", SETTINGS[setting][0], "--data", str(data),
             "--name", run.name, *overrides]
    evaluate = [*_tnlbt(), "eval", "--run", str(run), "--split", "test", "--data", str(data)]
    return [train, evaluate]


def trained_as_now(run: Path, preset: str, overrides: list[str]) -> bool:
    """Whether the run's recorded config (``config.json``) is what its preset and overrides resolve to today.

    The command lines alone name a preset, not its values: when a preset changes (``demo_cpu`` took ITM weight
    0.2, then recipe SSL weight 0.3), a run trained before must not be reused as ``full``. The data directory and
    the run name are set by the command, not the preset, so they are left out of the comparison."""
    from tnlbt.config import Config

    path = run / "config.json"
    if not path.exists():
        return False
    want, have = Config.load(preset, overrides).to_dict(), json.loads(path.read_text())
    for d in (want, have):
        d.get("data", {}).pop("processed_dir", None)
        d.get("train", {}).pop("run_name", None)
    return want == have


def _val_curve(run: Path) -> list[dict[str, Any]]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [{"epoch": r["epoch"], "step": r.get("step"), "R@1": r.get("val/R@1"), "medR": r.get("val/medR")}
            for r in recs if r.get("kind") == "val"]


def _test_summary(run: Path) -> dict[str, Any]:
    doc = json.loads((run / "metrics_test.json").read_text())
    m = doc["1k"]
    out = {d: {k: m[d][k]["mean"] for k in METRICS} for d in DIRECTIONS} | {
        "bag_std": {d: {k: m[d][k]["std"] for k in METRICS} for d in DIRECTIONS}}
    if doc.get("query_forms"):  # tnlbt eval's per-query-form metrics (title only, ingredients only, ...), 1k bags
        out["query_forms"] = {f: {d: {k: fm["1k"][d][k]["mean"] for k in METRICS} for d in DIRECTIONS}
                              for f, fm in doc["query_forms"].items()}
    return out


def run_one(setting: str, seed: int, data: Path, runs_dir: Path, epochs: int, extra: list[str]) -> dict[str, Any]:
    """Train and evaluate one (setting, seed) unless a finished run with the same commands is on disk."""
    run = runs_dir / f"{setting}_s{seed}"
    overrides = train_overrides(setting, seed, data, runs_dir, epochs, extra)
    cmds = commands(setting, run, data, overrides)
    record = run / "study_run.json"
    if record.exists() and (run / "metrics_test.json").exists():
        done = json.loads(record.read_text())
        same = done.get("commands") == [shlex.join(c) for c in cmds]
        if same and trained_as_now(run, SETTINGS[setting][0], overrides):
            return done | {"reused": True}
    if run.exists():
        shutil.rmtree(run)  # half-trained or trained with other commands: start clean (deterministic)
    entry: dict[str, Any] = {"setting": setting, "seed": seed, "run_dir": str(run),
                             "commands": [shlex.join(c) for c in cmds], "load_before": os.getloadavg()[0]}
    t = time.perf_counter()
    subprocess.run(cmds[0], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    entry["train_wall_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    subprocess.run(cmds[1], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    entry["eval_wall_s"] = round(time.perf_counter() - t, 1)
    entry["load_after"] = os.getloadavg()[0]
    entry["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    record.write_text(json.dumps(entry, indent=2) + "\n")
    return entry


def collect(runs_dir: Path, settings: list[str], seeds: list[int]) -> dict[str, Any]:
    """Per-run results, per-setting intervals and paired differences against ``full``, from the runs on disk."""
    runs: dict[str, Any] = {}
    for s in settings:
        for seed in seeds:
            run = runs_dir / f"{s}_s{seed}"
            if not (run / "metrics_test.json").exists() or not (run / "study_run.json").exists():
                continue
            rec = json.loads((run / "study_run.json").read_text())
            curve = _val_curve(run)
            best = max(curve, key=lambda r: r["R@1"]) if curve else None
            runs[f"{s}/s{seed}"] = {
                "setting": s, "seed": seed, "test": _test_summary(run), "val_curve": curve,
                "best_val_epoch": best["epoch"] if best else None,
                **{k: rec.get(k) for k in ("train_wall_s", "eval_wall_s", "load_before", "load_after", "commands")},
            }
    by: dict[str, dict[int, Any]] = {}
    for r in runs.values():
        by.setdefault(r["setting"], {})[r["seed"]] = r
    summary = {s: {d: {k: interval([by[s][x]["test"][d][k] for x in sorted(by[s])]) for k in METRICS}
                   for d in DIRECTIONS} for s in by}
    paired: dict[str, Any] = {}
    for s in by:
        common = sorted(set(by[s]) & set(by.get(BASE, {})))
        if s == BASE or not common:
            continue
        paired[s] = {"seeds": common} | {
            d: {k: interval([by[s][x]["test"][d][k] - by[BASE][x]["test"][d][k] for x in common])
                for k in METRICS} for d in DIRECTIONS}
    forms: dict[str, Any] = {}  # per setting and query form: intervals over seeds, and paired against full's form
    for s in by:
        seeds = [x for x in sorted(by[s]) if "query_forms" in by[s][x]["test"]]
        if not seeds:
            continue
        names = by[s][seeds[0]]["test"]["query_forms"]
        base = [x for x in seeds if "query_forms" in by.get(BASE, {}).get(x, {}).get("test", {})]
        forms[s] = {f: {d: {k: interval([by[s][x]["test"]["query_forms"][f][d][k] for x in seeds])
                            for k in METRICS} for d in DIRECTIONS} for f in names}
        if s != BASE and base:
            for f in names:
                forms[s][f]["paired_vs_full"] = {d: {k: interval(
                    [by[s][x]["test"]["query_forms"][f][d][k] - by[BASE][x]["test"]["query_forms"][f][d][k]
                     for x in base]) for k in METRICS} for d in DIRECTIONS}
    return {"runs": runs, "summary": summary, "paired_vs_full": paired, "query_forms": forms,
            "val_tail": {s: val_tail([by[s][x]["val_curve"] for x in sorted(by[s])]) for s in by}}


def val_tail(curves: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """Has the val curve flattened? Over seeds: val R@1 gained in the last fifth of the epochs (at least one),
    and that gain as a share of the whole run's gain (first to last epoch). Near 0: flat; near 1: still rising."""
    curves = [c for c in curves if len(c) >= 2]
    if not curves:
        return {}
    n = min(len(c) for c in curves)
    k = max(1, n // 5)
    late = [c[n - 1]["R@1"] - c[n - 1 - k]["R@1"] for c in curves]
    total = [c[n - 1]["R@1"] - c[0]["R@1"] for c in curves]
    shares = [a / b for a, b in zip(late, total, strict=True) if b > 0]
    return {"last_epochs": k, "late_gain_R@1": interval(late), "late_share": interval(shares) if shares else None}


def plot(res: dict[str, Any], path: Path) -> None:
    """Three panels: test R@1 per setting (mean, 95% interval), paired medR differences, val R@1 curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = [s for s in SETTINGS if s in res["summary"]]
    fig, ax = plt.subplots(1, 3, figsize=(17, 5.2))
    y = range(len(order))
    for j, (d, col) in enumerate(zip(DIRECTIONS, ("tab:blue", "tab:orange"), strict=True)):
        m = [res["summary"][s][d]["R@1"]["mean"] * 100 for s in order]
        e = [(res["summary"][s][d]["R@1"]["ci95"] or 0) * 100 for s in order]
        ax[0].barh([i + 0.2 * (1 - 2 * j) for i in y], m, height=0.4, xerr=e, color=col, label=d, capsize=3)
        p = [s for s in order if s in res["paired_vs_full"]]
        dm = [res["paired_vs_full"][s][d]["medR"]["mean"] for s in p]
        de = [res["paired_vs_full"][s][d]["medR"]["ci95"] or 0 for s in p]
        ax[1].errorbar(dm, [order.index(s) + 0.15 * (1 - 2 * j) for s in p], xerr=de, fmt="o", color=col,
                       capsize=3, label=d)
    ax[0].set(yticks=list(y), yticklabels=order, xlabel="test R@1 (%), 1k bags; mean and 95% interval over seeds")
    ax[0].invert_yaxis()
    ax[0].legend(fontsize=8)
    ax[1].axvline(0, color="k", lw=0.8)
    ax[1].set(yticks=list(y), yticklabels=order, xlabel="test medR minus full's, same seed (lower = better)")
    ax[1].invert_yaxis()
    ax[1].legend(fontsize=8)
    for s in order:
        curves = [r["val_curve"] for r in res["runs"].values() if r["setting"] == s and r["val_curve"]]
        n = min(len(c) for c in curves)
        ax[2].plot(range(1, n + 1), [statistics.fmean(c[i]["R@1"] for c in curves) * 100 for i in range(n)],
                   marker=".", label=s, lw=2.2 if s == BASE else 1.2)
    ax[2].set(xlabel="epoch", ylabel="val R@1 (%), mean over seeds", title="validation (model selection)")
    ax[2].legend(fontsize=7)
    b = res["budget"]
    fig.suptitle(f"TNLBT study on {b['dataset']}: {b['epochs']} epochs each, seeds {b['seeds']}", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, type=Path, help="processed folder")
    ap.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "study")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--report", action="store_true", help="only rewrite the JSON and PNG from the runs on disk")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--png", type=Path, default=PNG)
    ap.add_argument("overrides", nargs="*", help="key=value applied to every run")
    a = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    data, runs_dir = a.data.resolve(), a.runs_dir.resolve()
    seeds = [int(x) for x in a.seeds.split(",")]
    settings = [s.strip() for s in a.settings.split(",")]
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        ap.error(f"unknown settings {unknown}; known: {', '.join(SETTINGS)}")
    grid = [(seed, s) for seed in seeds for s in settings]  # seed-major: every setting gets seed 1 first
    t0, took = time.perf_counter(), []
    if not a.report:
        for i, (seed, s) in enumerate(grid, 1):
            t = time.perf_counter()
            e = run_one(s, seed, data, runs_dir, a.epochs, list(a.overrides))
            if not e.get("reused"):
                took.append(time.perf_counter() - t)
            eta = statistics.fmean(took) * (len(grid) - i) if took else float("nan")
            r = _test_summary(runs_dir / f"{s}_s{seed}")["image_to_recipe"]
            how = "reused" if e.get("reused") else f"{e['train_wall_s']:.0f}s train"
            print(f"[{i}/{len(grid)}] {s} seed {seed}: test i2r medR {r['medR']:.1f} R@1 {r['R@1']:.3f} "
                  f"R@10 {r['R@10']:.3f} ({how}; "
                  f"elapsed {time.perf_counter() - t0:.0f}s, ETA {eta:.0f}s)", flush=True)
    res = collect(runs_dir, settings, seeds)
    walls = [r["train_wall_s"] for r in res["runs"].values() if r.get("train_wall_s")]
    res["budget"] = {
        "dataset": data.name, "data_dir": str(data), "train_paired": _n_paired(data), "epochs": a.epochs,
        "seeds": seeds, "overrides": list(a.overrides), "selection": "best val R@1 checkpoint (val split)",
        "test": "tnlbt eval --split test: 1k bags x eval.n_bags, mean over bags",
        "trainer": "tnlbt train --no-ray: one process, the preset's global batch, torch's default threads",
        "train_wall_s_total": round(sum(walls), 1), "cpu": os.cpu_count(),
    }
    res["method"] = METHOD
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1, sort_keys=True) + "\n")
    if res["summary"]:
        plot(res, a.png)
    print(table(res))
    print(forms_table(res))
    print(f"wrote {a.out} and {a.png}")
    return 0


def cell(x: dict[str, Any], pct: bool = False) -> str:
    """An :func:`interval` as ``mean ± half-width`` (one decimal; ``pct``: in percent)."""
    f = 100 if pct else 1
    ci = "" if x["ci95"] is None else f" ± {x['ci95'] * f:.1f}"
    return f"{x['mean'] * f:.1f}{ci}"


def table(res: dict[str, Any]) -> str:
    """Markdown: per setting, test medR and R@1/R@10 both directions (mean ± 95%), and the paired medR change."""
    rows = ["| setting | i2r medR | i2r R@1 % | i2r R@10 % | r2i medR | r2i R@10 % | Δ i2r medR vs full | Δ r2i medR |",
            "|---|---|---|---|---|---|---|---|"]
    for s in (s for s in SETTINGS if s in res["summary"]):
        m, p = res["summary"][s], res["paired_vs_full"].get(s)
        delta = [cell(p[d]["medR"], False) for d in DIRECTIONS] if p else ["—", "—"]
        rows.append(f"| {s} | {cell(m['image_to_recipe']['medR'], False)} | {cell(m['image_to_recipe']['R@1'], True)} "
                    f"| {cell(m['image_to_recipe']['R@10'], True)} | {cell(m['recipe_to_image']['medR'], False)} "
                    f"| {cell(m['recipe_to_image']['R@10'], True)} | {delta[0]} | {delta[1]} |")
    return "\n".join(rows)


def forms_table(res: dict[str, Any], direction: str = "recipe_to_image") -> str:
    """Markdown: per setting, test medR per query form (mean ± 95% over seeds), and its paired change against
    full's same form on the same seeds."""
    forms = res.get("query_forms") or {}
    order = [s for s in SETTINGS if s in forms]
    if not order:
        return ""
    names = list(forms[order[0]])
    rows = ["| setting | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for s in order:
        cells = []
        for f in names:
            p = forms[s][f].get("paired_vs_full", {}).get(direction, {}).get("medR")
            cells.append(cell(forms[s][f][direction]["medR"]) + (f" (Δ {p['mean']:+.1f})" if p else ""))
        rows.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
