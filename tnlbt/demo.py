"""``tnlbt demo``: the whole chain on a laptop, resumable stage by stage.

    synth (small offline dataset) -> preprocess -> train -> eval (prints the table) -> plot -> index -> serve

Each stage runs as its own ``python -m tnlbt <command>`` process (so every stage gets a fresh Ray and its
memory back, and exactly what a user would type is what runs; the commands are printed). A finished stage
leaves ``WORKDIR/.stages/<stage>.json`` with its command line; a rerun skips stages whose marker matches,
and redoes a stage and everything after it when its command changed (other preset, size, overrides).
``--no-serve`` stops after indexing; otherwise the API and the UI start on Serve in this process and the
URLs are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

RUN_NAME = "demo"
# 8000 recipes give ~1200 test pairs, enough for the papers' 1k-bag setting; demo_cpu was tuned on this size.
DEFAULT_RECIPES = 8000
# Photos are stored at demo_cpu's 80-px short side after preprocessing, so 128-px synthetic photos lose
# nothing and are drawn about twice as fast as 256-px ones.
DEMO_IMAGE_SIZE = 128


@dataclass
class Stage:
    name: str
    argv: list[str]
    output: Path  # must exist after the stage, or the stage counts as not done

    def marker(self, workdir: Path) -> Path:
        return workdir / ".stages" / f"{self.name}.json"


def plan(config: str, workdir: Path, recipes: int, overrides: list[str]) -> list[Stage]:
    raw, processed, runs = workdir / "raw", workdir / "processed", workdir / "runs"
    run = runs / RUN_NAME
    ov = [*overrides, f"train.runs_dir={runs}"]
    return [
        Stage(
            "synth",
            ["synth", "--out", str(raw), "--recipes", str(recipes),
             "--image-size", str(DEMO_IMAGE_SIZE), "--overwrite"],
            raw / "layer1.json",
        ),
        Stage(
            "preprocess",
            ["preprocess", "--data", str(raw), "--out", str(processed), "--config", config, *overrides],
            processed / "vocab.json",
        ),
        Stage(
            "train",
            ["train", "--config", config, "--data", str(processed), "--name", RUN_NAME, *ov],
            run / "checkpoints",
        ),
        Stage("eval", ["eval", "--run", str(run), "--data", str(processed)], run),
        Stage("plot", ["plot", str(run)], run),
        Stage(
            "index",
            ["index", "--run", str(run), "--data", str(processed), "--split", "test"],
            run / "index" / "index.json",
        ),
    ]


def _done(stage: Stage, workdir: Path) -> bool:
    m = stage.marker(workdir)
    if not (m.exists() and stage.output.exists()):
        return False
    try:
        return json.loads(m.read_text()).get("argv") == stage.argv
    except json.JSONDecodeError:
        return False


def run_stages(stages: list[Stage], workdir: Path, optional: frozenset[str] = frozenset({"plot"})) -> None:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "GRADIO_ANALYTICS_ENABLED": "False",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    redo = False
    t_all = time.perf_counter()
    for i, st in enumerate(stages, 1):
        head = f"[{i}/{len(stages)}] {st.name}"
        if not redo and _done(st, workdir):
            print(f"{head}: done earlier, reused ({st.marker(workdir)})", flush=True)
            continue
        redo = True  # a redone stage invalidates everything after it
        cmd = [sys.executable, "-m", "tnlbt", *st.argv]
        print(f"{head}: tnlbt {shlex.join(st.argv)}", flush=True)
        t = time.perf_counter()
        rc = subprocess.call(cmd, env=env)
        took = time.perf_counter() - t
        if rc != 0:
            if st.name in optional:
                print(f"{head}: failed (exit {rc}) after {took:.0f}s; optional, continuing", flush=True)
                continue
            raise RuntimeError(
                f"demo stage {st.name!r} failed with exit code {rc}: tnlbt {shlex.join(st.argv)}"
            )
        st.marker(workdir).parent.mkdir(parents=True, exist_ok=True)
        st.marker(workdir).write_text(
            json.dumps(
                {"argv": st.argv, "seconds": round(took, 1), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
            )
        )
        print(f"{head}: ok in {took:.0f}s (total {time.perf_counter() - t_all:.0f}s)", flush=True)


def cli_demo(args: argparse.Namespace) -> int:
    from tnlbt.config import Config

    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    Config.load(args.config, list(args.overrides or []))  # fail fast on a bad preset / override
    recipes = args.recipes or DEFAULT_RECIPES
    if recipes < 20:
        raise ValueError("--recipes must be at least 20 (train/val/test splits need a few recipes each)")
    stages = plan(args.config, workdir, recipes, list(args.overrides or []))
    print(f"tnlbt demo: preset {args.config}, {recipes} recipes, workdir {workdir}", flush=True)
    run_stages(stages, workdir)
    run = workdir / "runs" / RUN_NAME
    if args.no_serve:
        print(
            f"indexed; stopping before serve (--no-serve). Try: tnlbt search --run {run} --text 'tomato soup'"
        )
        return 0
    from tnlbt.serve.app import serve_until_interrupted

    return serve_until_interrupted({"run": str(run)}, port=args.port, ready_timeout_s=300)
