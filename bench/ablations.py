"""Ablations on a processed dataset -> bench/results/ablations.json (entries merge into the file).

For a fair comparison every preset trains with the SAME reduced budget (``train.epochs=E``, default 4), one run
at a time, then ``tnlbt eval --split test`` on its best checkpoint (selected on val). Each entry records the
test 1k-bag image->recipe and recipe->image medR/R@1/R@5/R@10 (mean over the bags), the wall time of training
and of eval, the load average before and after (the machine may be shared), the run directory and the exact
commands that were run.

Usage:
  python bench/ablations.py --data PROCESSED [--runs-dir /tmp/h/runs] [--epochs 4]
                            [--presets demo_cpu,ablation_no_gan,...] [--suffix _e4] [extra key=value ...]
Extra ``key=value`` overrides apply to every preset (e.g. ``loss.triplet=valid`` to compare under it).
A preset whose run already has ``metrics_test.json`` is not retrained unless --force.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_quiet.py: the quiet-box rule
import _quiet

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "ablations.json"
PRESETS = ["demo_cpu", "ablation_no_dynamic_margin", "ablation_no_cross_decoder", "ablation_no_gan",
           "ablation_no_recipe_ssl", "ablation_small_batch"]
METRICS = ("medR", "R@1", "R@5", "R@10")
METHOD = ("each preset trained one run at a time with the same train.epochs (cosine schedule over that budget), "
          "best checkpoint by val R@1, then `tnlbt eval --split test`: 1k bags x eval.n_bags, mean over bags; "
          "one seed per preset unless a *_seed* entry repeats one; the machine was shared (load averages)")


def _tnlbt() -> list[str]:
    exe = Path(sys.executable).parent / "tnlbt"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "tnlbt"]


def _load() -> dict[str, Any]:
    return json.loads(OUT.read_text()) if OUT.exists() else {}


def _save_entry(key: str, entry: dict[str, Any]) -> None:
    allres = _load()
    allres["method"] = METHOD
    allres.setdefault("runs", {})[key] = entry
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(allres, indent=2, sort_keys=True) + "\n")


def _summarise(metrics: dict[str, Any]) -> dict[str, Any]:
    setting = "1k" if "1k" in metrics else next(k for k, v in metrics.items() if isinstance(v, dict)
                                                 and "image_to_recipe" in v)
    out: dict[str, Any] = {"setting": setting}
    for d in ("image_to_recipe", "recipe_to_image"):
        res = metrics[setting][d]
        out[d] = {m: (res[m]["mean"] if isinstance(res[m], dict) else res[m]) for m in METRICS}
        out[d + "_std"] = {m: res[m].get("std") for m in METRICS if isinstance(res[m], dict)}
    return out


def _last_val(run: Path) -> dict[str, Any]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    vals = [r for r in recs if r.get("kind") == "val"]
    return {"val_curve_medR": [r.get("val/medR") for r in vals],
            "val_curve_R@1": [r.get("val/R@1") for r in vals],
            "final_step": max((r.get("step", 0) for r in recs), default=None)}


def run_one(preset: str, data: str, runs_dir: str, epochs: int, suffix: str, extra: list[str],
            force: bool, quiet: dict[str, Any]) -> dict[str, Any]:
    name = f"{preset}{suffix}"
    run = Path(runs_dir) / name
    train_cmd = [*_tnlbt(), "train", "--config", preset, "--data", data, "--name", name,
                 f"train.runs_dir={runs_dir}", f"train.epochs={epochs}", *extra]
    eval_cmd = [*_tnlbt(), "eval", "--run", str(run), "--split", "test", "--data", data]
    entry: dict[str, Any] = {"preset": preset, "epochs": epochs, "overrides": extra, "run_dir": str(run),
                             "commands": [shlex.join(train_cmd), shlex.join(eval_cmd)]}
    if force or not (run / "metrics_test.json").exists():
        entry["load_average_before"] = list(os.getloadavg())
        t = time.perf_counter()
        subprocess.run(train_cmd, check=True, cwd=ROOT)
        entry["train_wall_s"] = time.perf_counter() - t
        entry["load_average_after_train"] = list(os.getloadavg())
        t = time.perf_counter()
        subprocess.run(eval_cmd, check=True, cwd=ROOT)
        entry["eval_wall_s"] = time.perf_counter() - t
        entry["quiet"] = _quiet.finish(quiet)
    else:
        prev = _load().get("runs", {}).get(name, {})
        entry.update({k: v for k, v in prev.items() if k not in entry})
    entry["test"] = _summarise(json.loads((run / "metrics_test.json").read_text()))
    entry.update(_last_val(run))
    entry["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    _save_entry(name, entry)
    i2r = entry["test"]["image_to_recipe"]
    print(f"[{name}] i2r medR {i2r['medR']:.1f} R@1 {i2r['R@1']:.3f} R@10 {i2r['R@10']:.3f} "
          f"train {entry.get('train_wall_s', float('nan')):.0f}s", flush=True)
    return entry


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="processed folder")
    ap.add_argument("--runs-dir", default=str(ROOT / "runs" / "ablations"))
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--suffix", default=None, help="run-name suffix (default _e{epochs})")
    ap.add_argument("--force", action="store_true", help="retrain even if metrics_test.json exists")
    ap.add_argument("overrides", nargs="*", help="key=value applied to every preset")
    _quiet.add_arguments(ap)
    a = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    quiet = _quiet.from_args(a, "bench/ablations.py")
    suffix = a.suffix if a.suffix is not None else f"_e{a.epochs}"
    for p in a.presets.split(","):
        run_one(p.strip(), a.data, a.runs_dir, a.epochs, suffix, list(a.overrides), a.force, quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
