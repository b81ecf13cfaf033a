"""``tnlbt demo``: stage markers (reuse, redo on change) and the whole chain (``--no-serve``, tiny_test)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tnlbt.demo import Stage, plan, run_stages

REPO = Path(__file__).resolve().parent.parent


def _stages(tmp_path: Path, preset: str = "tiny_test") -> list[Stage]:
    # `tnlbt config` is a cheap real subcommand; the output file exists so only the marker decides.
    out = tmp_path / "exists"
    out.write_text("x")
    return [
        Stage("a", ["config", "--config", preset], out),
        Stage("b", ["config", "--config", "tiny_test"], out),
    ]


def test_stages_are_reused_and_redone_after_a_change(tmp_path, capfd):
    run_stages(_stages(tmp_path), tmp_path)
    first = capfd.readouterr().out
    assert first.count(": ok in") == 2
    assert json.loads((tmp_path / ".stages" / "a.json").read_text())["argv"] == [
        "config",
        "--config",
        "tiny_test",
    ]
    run_stages(_stages(tmp_path), tmp_path)
    second = capfd.readouterr().out
    assert second.count("done earlier, reused") == 2 and ": ok in" not in second
    # a changed command redoes that stage and every later one (b's own command did not change)
    changed = _stages(tmp_path, preset=str(REPO / "configs" / "tiny_test.yaml"))
    run_stages(changed, tmp_path)
    third = capfd.readouterr().out
    assert third.count(": ok in") == 2 and "reused" not in third


def test_failed_stage_stops_with_a_clear_error(tmp_path, capfd):
    bad = [Stage("broken", ["config", "--config", "no_such_preset"], tmp_path)]
    with pytest.raises(RuntimeError, match="broken"):
        run_stages(bad, tmp_path)
    assert not (tmp_path / ".stages" / "broken.json").exists()


def test_plan_wires_the_outputs_of_each_stage_into_the_next(tmp_path):
    st = {s.name: s for s in plan("tiny_test", tmp_path, 50, ["train.epochs=1"])}
    assert list(st) == ["synth", "preprocess", "train", "eval", "plot", "index"]
    assert st["preprocess"].argv[st["preprocess"].argv.index("--data") + 1] == str(tmp_path / "raw")
    assert f"train.runs_dir={tmp_path / 'runs'}" in st["train"].argv and "train.epochs=1" in st["train"].argv
    assert st["index"].argv[:3] == ["index", "--run", str(tmp_path / "runs" / "demo")]


@pytest.mark.slow
def test_demo_no_serve_end_to_end(tmp_path):
    """synth -> preprocess -> train -> eval -> plot -> index (tiny_test), `tnlbt search`, then a rerun."""
    cmd = [
        sys.executable,
        "-m",
        "tnlbt",
        "demo",
        "--config",
        "tiny_test",
        "--workdir",
        str(tmp_path),
        "--recipes",
        "80",
        "--no-serve",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, cwd=REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run = tmp_path / "runs" / "demo"
    meta = json.loads((run / "index" / "index.json").read_text())
    assert meta["recipes"] > 0 and meta["photos"] > 0
    assert (run / "metrics_test.json").exists()
    s = subprocess.run(
        [sys.executable, "-m", "tnlbt", "search", "--run", str(run), "--text", "tomato soup", "-k", "3"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert s.returncode == 0 and s.stdout.count("recipe ") == 3, s.stdout + s.stderr
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert again.returncode == 0 and again.stdout.count("done earlier, reused") == 6, again.stdout
