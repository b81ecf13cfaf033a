"""Benchmarks that must not rot before the hardware they are for shows up."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_smoke_on_cpu_writes_only_its_output(tmp_path, monkeypatch):
    """bench/gpu_check.py runs end to end on the CPU (tiny preset) and leaves the shared results alone."""
    import importlib.util

    before = {p.name: p.read_bytes() for p in (ROOT / "bench" / "results").glob("*.json")}
    spec = importlib.util.spec_from_file_location("tnlbt_bench_gpu_check", ROOT / "bench" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "tnlbt_bench_gpu_check", mod)
    spec.loader.exec_module(mod)
    out = tmp_path / "gpu.json"
    assert mod.main(["--device", "cpu", "--quick", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["preset"] == "tiny_test" and res["train_full"]["samples_per_s"] > 0
    counted = res["train_counted"]
    assert counted["flops_per_step"] > 0 and counted["mfu_vs_measured_bf16_peak"] > 0
    assert {"image_b1", "image_b8", "recipe_b1", "recipe_b8"} <= set(res["inference"])
    after = {p.name: p.read_bytes() for p in (ROOT / "bench" / "results").glob("*.json")}
    assert after == before  # capacity keys are merged only from a real GPU run of the paper preset
