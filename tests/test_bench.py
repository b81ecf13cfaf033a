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


def _bench_module(name: str, monkeypatch):
    import importlib.util

    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location(f"tnlbt_bench_{name}", ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, f"tnlbt_bench_{name}", mod)
    spec.loader.exec_module(mod)
    return mod


def test_quiet_gate_refuses_a_busy_box_or_marks_the_result(monkeypatch, capsys):
    """bench/_quiet.py: load >= the limit refuses (exit 3) or, allowed, returns valid=false; quiet is valid."""
    import pytest

    quiet = _bench_module("_quiet", monkeypatch)
    monkeypatch.setattr(quiet.os, "getloadavg", lambda: (3.2, 2.0, 1.0))
    with pytest.raises(SystemExit) as e:
        quiet.gate("bench/x.py")
    assert e.value.code == quiet.REFUSED and "Refusing" in capsys.readouterr().err
    info = quiet.gate("bench/x.py", allow_loaded=True)
    assert info["valid"] is False and info["load_average_at_start"] == [3.2, 2.0, 1.0]
    monkeypatch.setattr(quiet.os, "getloadavg", lambda: (0.4, 0.5, 0.6))
    info = quiet.gate("bench/x.py")
    assert info["valid"] is True and info["max_load_1m"] == quiet.MAX_LOAD_1M
    assert quiet.finish(info, max_end_load=0.3)["valid"] is False  # the load rose during the run
    assert quiet.finish(info, max_end_load=2.0)["valid"] is True


def test_train_bench_counts_the_whole_step_and_sorts_the_profile(monkeypatch):
    """bench/train.py: its FLOP counter equals FlopCounterMode where that works, and also counts through the
    WGAN-GP's autograd.grad; profile categories cover every op and the shares add up to the wall time."""
    import torch
    from torch.profiler import profile
    from torch.utils.flop_counter import FlopCounterMode

    bt = _bench_module("train", monkeypatch)
    lin = torch.nn.Linear(16, 8)
    conv = torch.nn.Conv2d(3, 4, 3)
    x, im = torch.randn(5, 16), torch.randn(2, 3, 8, 8)

    def work() -> None:
        (lin(x).sum() + conv(im).sum()).backward()

    with FlopCounterMode(display=False) as ref:
        work()
    mine = bt._flop_counter()
    with mine:
        work()
    assert mine.total == ref.get_total_flops() > 0
    z = torch.randn(4, 16, requires_grad=True)
    mine = bt._flop_counter()
    with mine:
        (g,) = torch.autograd.grad(lin(z).sum(), z, create_graph=True)
        g.pow(2).sum().backward()
    assert mine.total > 0
    assert bt._category("aten::bernoulli_") == "RNG (dropout masks, noise)"
    assert bt._category("aten::_to_copy") == "casts and copies"
    assert bt._category("aten::mkldnn_convolution") == "conv"
    assert bt._category("aten::addmm") == "GEMM"
    assert bt._category("aten::max_pool2d_with_indices") == "pooling"
    with profile() as prof:
        work()
    summary = bt.summarize_profile(prof.key_averages(), wall_s=1.0, steps=1)
    assert abs(sum(c["share"] for c in summary["categories"].values()) - 1.0) < 1e-3
    assert summary["aten_calls_per_step"] > 0 and summary["top_ops"]


def test_study_statistics_pair_seeds_and_draw(tmp_path, monkeypatch):
    """bench/study.py on fake finished runs: intervals over seeds, paired differences, table and PNG."""
    study = _bench_module("study", monkeypatch)
    assert study.t975(2) == 4.303 and study.t975(11) == 2.228 and study.t975(100) == 1.96
    iv = study.interval([1.0, 2.0, 3.0])
    assert iv["mean"] == 2.0 and abs(iv["ci95"] - 4.303 * 1.0 / 3 ** 0.5) < 1e-9
    runs = tmp_path / "runs"
    medr = {("full", 1): 20.0, ("full", 2): 30.0, ("full", 3): 25.0,
            ("no_critic", 1): 22.0, ("no_critic", 2): 33.0, ("no_critic", 3): 26.0}
    for (setting, seed), m in medr.items():
        run = runs / f"{setting}_s{seed}"
        run.mkdir(parents=True)
        res = {d: {k: {"mean": m if k == "medR" else 1 / m, "std": 0.1} for k in study.METRICS}
               for d in study.DIRECTIONS}
        title = {d: {k: {"mean": 2 * m if k == "medR" else 0.5 / m, "std": 0.1} for k in study.METRICS}
                 for d in study.DIRECTIONS}  # a title-only query: twice the medR of the whole recipe
        (run / "metrics_test.json").write_text(json.dumps({"1k": res, "query_forms": {
            "full": {"1k": res}, "title": {"1k": title}}}))
        (run / "study_run.json").write_text(json.dumps({"train_wall_s": 60.0, "commands": ["x"]}))
        (run / "metrics.jsonl").write_text("\n".join(json.dumps({"kind": "val", "epoch": e, "val/R@1": 0.01 * e,
                                                                 "val/medR": 50 - e}) for e in range(3)))
    res = study.collect(runs, ["full", "no_critic", "ht_baseline"], [1, 2, 3])
    assert set(res["summary"]) == {"full", "no_critic"}  # a setting with no finished run is left out
    assert res["summary"]["full"]["image_to_recipe"]["medR"]["mean"] == 25.0
    diff = res["paired_vs_full"]["no_critic"]["recipe_to_image"]["medR"]
    assert diff["values"] == [2.0, 3.0, 1.0] and diff["mean"] == 2.0  # per seed, not of the means' spread
    assert abs(diff["ci95"] - 4.303 * 1.0 / 3 ** 0.5) < 1e-9
    assert res["runs"]["full/s2"]["best_val_epoch"] == 2
    tail = res["val_tail"]["full"]  # 3 epochs: the last one gained 0.01 of the run's 0.02
    assert tail["last_epochs"] == 1 and abs(tail["late_gain_R@1"]["mean"] - 0.01) < 1e-12
    assert abs(tail["late_share"]["mean"] - 0.5) < 1e-12
    forms = res["query_forms"]
    assert forms["full"]["title"]["recipe_to_image"]["medR"]["mean"] == 50.0
    assert "paired_vs_full" not in forms["full"]["title"]
    assert forms["no_critic"]["title"]["paired_vs_full"]["image_to_recipe"]["medR"]["values"] == [4.0, 6.0, 2.0]
    res["budget"] = {"dataset": "toy", "epochs": 3, "seeds": [1, 2, 3]}
    study.plot(res, tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 10_000
    table = study.table(res)
    assert "| no_critic | 27.0 ± " in table and "| 2.0 ± 2.5 |" in table
    ft = study.forms_table(res).splitlines()
    assert ft[0] == "| setting | full | title |"
    assert ft[3].startswith("| no_critic | 27.0 ± 13.8 (Δ +2.0) | 54.0 ± 27.7 (Δ +4.0) |")  # r2i medR per form


def test_study_settings_are_valid_configs(monkeypatch):
    """Every study setting's preset and overrides load as a config, and each differs from full where it says."""
    from tnlbt.config import Config

    study = _bench_module("study", monkeypatch)
    loaded = {name: Config.load(preset, study.setting_overrides(name, 66))
              for name, (preset, _) in study.SETTINGS.items()}
    full = loaded["full"]
    # the ablation presets extend demo_cpu, so they train the decoder at full's ITM weight, not the old 1.0
    assert all(c.loss.w_itm == full.loss.w_itm for n, c in loaded.items() if n != "itm_1")
    assert loaded["itm_1"].loss.w_itm == 1.0 and full.loss.w_itm == 0.2
    assert loaded["itm_1"].model == full.model and loaded["itm_1"].train == full.train
    assert not loaded["no_cross_decoder"].model.cross_decoder and full.model.cross_decoder
    assert loaded["small_batch_steps"].train.max_steps_per_epoch == 66
    assert (loaded["partial_aug"].train.partial_recipes, loaded["partial_aug_0.2"].train.partial_recipes,
            full.train.partial_recipes) == (0.5, 0.2, 0.0)
    assert loaded["no_recipe_only"].train.recipe_only_every == 0 and full.train.recipe_only_every > 0
    assert loaded["no_recipe_only"].loss.w_recipe_ssl == full.loss.w_recipe_ssl > 0
    assert (loaded["recipe_ssl_1"].loss.w_recipe_ssl, full.loss.w_recipe_ssl,
            loaded["recipe_ssl_0.1"].loss.w_recipe_ssl) == (1.0, 0.3, 0.1)
    assert loaded["ht_baseline"].loss.w_recipe_ssl == 1.0  # H-T's weight, although it extends demo_cpu
    assert loaded["ht_baseline_ssl_0.3"].loss.w_recipe_ssl == full.loss.w_recipe_ssl
    assert loaded["ht_baseline_ssl_0.3"].model == loaded["ht_baseline"].model


def test_study_reuses_a_run_only_if_its_preset_still_resolves_to_what_it_trained(tmp_path, monkeypatch):
    """A finished run is reused as a setting only while the preset resolves to the config it trained with: after
    a preset's default changes (demo_cpu's recipe SSL weight did), the same command lines must train again."""
    from tnlbt.config import Config

    study = _bench_module("study", monkeypatch)
    data = tmp_path / "data"
    data.mkdir()
    (data / "stats.json").write_text(json.dumps({"splits": {"train": {"paired": 640}}}))
    overrides = study.train_overrides("no_recipe_only", 2, data, tmp_path / "runs", 10, [])
    assert "train.seed=2" in overrides and "train.recipe_only_every=0" in overrides
    run = tmp_path / "runs" / "no_recipe_only_s2"
    assert not study.trained_as_now(run, "demo_cpu", overrides)  # nothing recorded
    run.mkdir(parents=True)
    cfg = Config.load("demo_cpu", overrides).to_dict()
    cfg["data"]["processed_dir"], cfg["train"]["run_name"] = str(data), run.name  # what the command sets
    (run / "config.json").write_text(json.dumps(cfg))
    assert study.trained_as_now(run, "demo_cpu", overrides)
    cfg["loss"]["w_recipe_ssl"] += 0.5  # trained under an older preset value
    (run / "config.json").write_text(json.dumps(cfg))
    assert not study.trained_as_now(run, "demo_cpu", overrides)


def test_matmul_peak_shrinks_the_product_for_a_slow_dtype(monkeypatch):
    """bench/train.py's peak: a dtype whose probe says one n^3 product would exceed max_s runs at a smaller size
    (a CPU without bf16 units emulates bf16 GEMMs ~300x slower than fp32; 2048^3 took a minute on Zen 2)."""
    train = _bench_module("train", monkeypatch)
    fast = train.matmul_peak(n=256, reps=1, max_s=10.0)
    assert fast["fp32_n"] == fast["bf16_n"] == 256 and fast["fp32_gflops"] > 0
    slow = train.matmul_peak(n=1024, reps=1, max_s=1e-9)  # every product "too slow": the floor, 256
    assert slow["fp32_n"] == slow["bf16_n"] == 256 and slow["bf16_gflops"] > 0 and slow["n"] == 1024


def test_parallel_ceiling_times_independent_decoders_started_together(monkeypatch):
    """bench/preprocess.py's ceiling: k worker processes each decode passes x n photos; the rate counts them all
    over the span from the first start to the last end (the workers' clocks are the machine's one monotonic)."""
    pre = _bench_module("preprocess", monkeypatch)
    one = pre.parallel_ceiling(1, n=3, size=64, passes=2)
    two = pre.parallel_ceiling(2, n=3, size=64, passes=2)
    assert (one["procs"], one["photos"], two["photos"]) == (1, 6, 12)
    assert one["seconds"] > 0 and two["seconds"] > 0
    # seconds is rounded to 1 us and the rate to 0.1 photo/s: both bounds, however short the span
    lo, hi = 12 / (two["seconds"] + 5e-7), 12 / max(two["seconds"] - 5e-7, 1e-9)
    assert lo - 0.05 <= two["photos_per_s"] <= hi + 0.05
