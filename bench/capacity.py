"""Capacity table for Recipe1M at paper scale, computed from the measured costs in bench/results/*.json.

    .venv/bin/python bench/capacity.py                         # markdown table with the arithmetic shown
    .venv/bin/python bench/capacity.py --gpus 16 --qps 200     # another cluster size / load target
    .venv/bin/python bench/capacity.py --json                  # machine-readable rows

Nothing here is typed in by hand except the *workload* (how much work there is: counts from the
Recipe1M papers and issue 6) and the *prices* (public on-demand list prices: inputs, override them with
yours). Every rate comes from a JSON file in bench/results/ written by a benchmark; each row names the file
and the key it used. A rate that has not been measured is reported as MISSING with what would measure it;
it is never replaced by a guess. Rates are from the machine the benchmark ran on (``machine`` in each
JSON): on a shared 2-core CPU box the table says so, and the numbers are an upper bound on time.

Extrapolation rules (stated in each row): preprocessing and embedding are embarrassingly parallel, so time
scales as work / (rate per core x cores); training time is steps x seconds per step with the global batch
fixed; serving replicas = target QPS / QPS per replica, rounded up.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
DOC = Path(__file__).resolve().parent.parent / "docs" / "capacity.md"

# -- workload: how much work Recipe1M at paper scale is (not a measurement, a definition) -------------------
WORKLOAD = {
    "recipes": 1_029_720,  # Recipe1M, all partitions (Marin et al. 2019); issue 6 rounds to "1M"
    "photos": 887_706,  # Recipe1M photos; issue 6 rounds to "900k"
    "paired_train": 238_408,  # H-T paired training ids (counted in the H-T code's data/train.txt)
    "recipe_only_train": 720_639 - 238_408,  # train-partition recipes without a photo (H-T self-supervision)
    "epochs": 100,
    "global_batch": 768,
    "index_vectors": 1_029_720 + 887_706,  # one recipe vector per recipe + one image vector per photo
}

# -- prices: inputs, not measurements. AWS on-demand list prices (us-east-1, USD/instance-hour); override --
PRICES = {
    "m6i.8xlarge": 1.536,  # 32 vCPU: preprocessing / indexing node
    "g5.12xlarge": 5.672,  # 4x A10G: training node
    "p4d.24xlarge": 32.7726,  # 8x A100 40GB: training node
    "g5.xlarge": 1.006,  # 1x A10G: serving node
}


@dataclass
class Row:
    stage: str
    what: str
    status: str  # "ok" | "CPU" (computed, from CPU measurements only) | "partial" | "MISSING"
    arithmetic: list[str] = field(default_factory=list)
    hours: float | None = None
    cost_usd: float | None = None
    sources: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


def load(results: Path, name: str) -> dict[str, Any] | None:
    path = results / f"{name}.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        print(f"warning: {path}: not valid JSON ({e})", file=sys.stderr)
        return None


def find(obj: Any, keys: tuple[str, ...], path: str = "") -> tuple[Any, str] | None:
    """First value under any of ``keys`` (depth first) and its JSON path, so each row can cite its source."""
    if isinstance(obj, dict):
        for k in keys:
            if k in obj and isinstance(obj[k], int | float) and not isinstance(obj[k], bool):
                return obj[k], f"{path}.{k}" if path else k
        for k, v in obj.items():
            hit = find(v, keys, f"{path}.{k}" if path else k)
            if hit is not None:
                return hit
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            hit = find(v, keys, f"{path}[{i}]")
            if hit is not None:
                return hit
    return None


def machine_note(d: dict[str, Any] | None) -> str:
    m = (d or {}).get("machine") or {}
    cpus = m.get("cpus")
    gpu = m.get("gpu") or m.get("device")
    if gpu:
        return f"measured on {gpu}"
    return f"measured on CPU ({cpus} cores, shared)" if cpus else "machine not recorded"


def fmt_h(h: float | None) -> str:
    if h is None:
        return "-"
    return f"{h * 60:.1f} min" if h < 1 else f"{h:.1f} h"


def fmt_usd(x: float | None) -> str:
    return "-" if x is None else f"${x:,.0f}" if x >= 10 else f"${x:,.2f}"


# -- stages -------------------------------------------------------------------------------------------------
def _preprocess_rates(d: dict[str, Any]) -> tuple[float, float, str, list[str]] | None:
    """(recipes/s/core, photos/s/core, source, notes) from preprocess.json.

    bench/preprocess.py writes ``throughput: {"<cpus>": {recipes_per_s, images_per_s, runs: [...]}}``; the
    1-CPU run gives the per-core rate directly, and the ratio to the largest run is the measured scaling.
    Other layouts: ``*_per_s_per_core`` keys, or ``recipes_per_s`` + ``images_per_s`` + ``cpus`` anywhere.
    """
    notes: list[str] = []
    tp = d.get("throughput")
    if isinstance(tp, dict) and tp:
        by_cpus = {int(k): v for k, v in tp.items() if str(k).isdigit() and isinstance(v, dict)
                   and v.get("recipes_per_s") and v.get("images_per_s")}
        if by_cpus:
            c = min(by_cpus)
            r, i = by_cpus[c]["recipes_per_s"] / c, by_cpus[c]["images_per_s"] / c
            top = max(by_cpus)
            if top > c:
                eff = by_cpus[top]["recipes_per_s"] / (by_cpus[c]["recipes_per_s"] * top / c)
                notes.append(f"measured scaling {c} -> {top} CPUs: {eff:.2f} of linear (throughput.{top}"
                             f".recipes_per_s / ({top} x throughput.{c}.recipes_per_s / {c})); the table "
                             "assumes linear scaling over all cores")
            return r, i, f"throughput.{c}.{{recipes_per_s,images_per_s}} / {c} CPU", notes
    rc = find(d, ("recipes_per_s_per_core",))
    ic = find(d, ("images_per_s_per_core", "photos_per_s_per_core"))
    if rc and ic:
        return rc[0], ic[0], f"{rc[1]}, {ic[1]}", notes
    rt, it, ncpu = find(d, ("recipes_per_s",)), find(d, ("images_per_s", "photos_per_s")), find(d, ("cpus",))
    if rt and it and ncpu and ncpu[0]:
        return rt[0] / ncpu[0], it[0] / ncpu[0], f"{rt[1]}, {it[1]} / {ncpu[1]}", notes
    return None


def _photo_size_extra_s(d: dict[str, Any], photo_px: int) -> tuple[float, str] | None:
    """Extra CPU seconds per photo at ``photo_px`` source size over the throughput corpus's 128 px photos.

    From ``decode.by_source_px`` (bench/preprocess.py --only decode): the same decode/resize/re-encode work
    timed on one core for generator photos rendered at several sizes. None when not measured.
    """
    by = (d.get("decode") or {}).get("by_source_px") or {}
    base, at = by.get("128"), by.get(str(photo_px))
    if not base or not at:
        return None
    extra = (at["cpu_ms_per_photo"] - base["cpu_ms_per_photo"]) / 1000
    return extra, (f"decode.by_source_px.{{128,{photo_px}}}.cpu_ms_per_photo = {base['cpu_ms_per_photo']} -> "
                   f"{at['cpu_ms_per_photo']} ms")


def _stage_costs(d: dict[str, Any]) -> tuple[float, float, float, str] | None:
    """(serial s/recipe, vocab s/recipe, CPU s/photo of the shard tasks, source) from the 1-CPU runs' timings."""
    runs = ((d.get("throughput") or {}).get("1") or {}).get("runs") or []
    good = [r for r in runs if r.get("timings") and r.get("recipes") and r.get("photos_ok")]
    if not good:
        return None

    def med(f) -> float:
        vals = sorted(f(r) for r in good)
        return vals[len(vals) // 2]

    return (med(lambda r: r["timings"]["read_s"] / r["recipes"]),
            med(lambda r: r["timings"]["vocab_s"] / r["recipes"]),
            med(lambda r: r["timings"]["process_cpu_s"] / r["photos_ok"]),
            f"throughput.1.runs[].timings.{{read_s,vocab_s,process_cpu_s}} (median of {len(good)} runs)")


def preprocess_row(results: Path, nodes: int, cores: int, node_type: str, prices: dict[str, float],
                   photo_px: int = 512) -> Row:
    d = load(results, "preprocess")
    row = Row("preprocess", f"{WORKLOAD['recipes']:,} recipes + {WORKLOAD['photos']:,} photos on {nodes} x "
              f"{node_type} ({cores} cores each)", "MISSING")
    if d is None:
        row.missing.append("bench/results/preprocess.json (bench/preprocess.py)")
        return row
    rates = _preprocess_rates(d)
    if rates is None:
        row.missing.append("recipes/s and photos/s per core (throughput.<cpus> or *_per_s_per_core keys)")
        return row
    r, i, src, notes = rates
    where = machine_note(d) if d.get("machine") else "shared 2-core box"
    row.sources.append(f"preprocess.json:{src} ({where})")
    total = nodes * cores
    size = _photo_size_extra_s(d, photo_px)
    if size is not None:
        extra, size_src = size
        i_bench = i
        i = 1 / (1 / i + max(0.0, extra))
        row.sources.append(f"preprocess.json:{size_src}")
        row.arithmetic.append(
            f"photo size: the throughput corpus has 128 px photos; at {photo_px} px (--photo-px, an assumption "
            f"about Recipe1M's photos) each costs {extra * 1000:+.2f} CPU ms more: 1 / (1 / {i_bench:,.1f} + "
            f"{extra:.5f}) = {i:,.1f} photos/s/core")
    else:
        row.missing.append("per-photo cost by source size (bench/preprocess.py --only decode): the photo rate "
                           "below is for the generator's 128 px photos")
    stages = _stage_costs(d)
    if stages is not None:
        # Amdahl: stage 1 (the driver streams layer1.json into shards) is serial; vocabulary counting and the
        # per-shard work (tokenise + photos + Parquet) run on every core. Per-shard CPU cost is per photo
        # (tokenising its recipe included), from the tasks' own CPU time: robust to other jobs on the box.
        read_per_rec, vocab_per_rec, cpu_per_photo, n_src = stages
        cpu_per_photo += max(0.0, extra) if size is not None else 0.0
        h_read = WORKLOAD["recipes"] * read_per_rec / 3600
        h_vocab = WORKLOAD["recipes"] * vocab_per_rec / total / 3600
        h_proc = WORKLOAD["photos"] * cpu_per_photo / total / 3600
        row.hours = h_read + h_vocab + h_proc
        row.sources.append(f"preprocess.json:{n_src}")
        row.arithmetic.append(f"stage 1, serial (driver streams layer1 -> shards): {WORKLOAD['recipes']:,} x "
                              f"{read_per_rec * 1e6:.1f} us = {fmt_h(h_read)}")
        row.arithmetic.append("stage 1's rate is for the generator's records (~870 bytes of JSON each); Recipe1M's "
                              "layer1.json averages ~1.3 KB a record, so expect about 1.5x that stage")
        row.arithmetic.append(f"stage 2, parallel (word counts): {WORKLOAD['recipes']:,} x {vocab_per_rec * 1e6:.1f}"
                              f" us / {total} cores = {fmt_h(h_vocab)}")
        row.arithmetic.append(f"stage 3, parallel (tokenise + photos + Parquet): {WORKLOAD['photos']:,} photos x "
                              f"{cpu_per_photo * 1000:.2f} CPU ms / {total} cores = {fmt_h(h_proc)}")
        row.arithmetic.append(f"total {fmt_h(row.hours)}; cost {fmt_h(row.hours)} x {nodes} x "
                              f"${prices[node_type]}/h")
    else:
        h_r = WORKLOAD["recipes"] / (r * total) / 3600
        h_i = WORKLOAD["photos"] / (i * total) / 3600
        # Both rates come from the same runs, so the true time lies between the larger of the two and their
        # sum; the sum is used for the table (an upper bound).
        row.arithmetic.append(f"recipes: {WORKLOAD['recipes']:,} / ({r:,.1f}/s/core x {total} cores) "
                              f"= {fmt_h(h_r)}")
        row.arithmetic.append(f"photos: {WORKLOAD['photos']:,} / ({i:,.1f}/s/core x {total} cores) "
                              f"= {fmt_h(h_i)}")
        row.hours = h_r + h_i
        row.arithmetic.append(f"time between max = {fmt_h(max(h_r, h_i))} and sum = {fmt_h(row.hours)} "
                              f"(table: sum); cost {fmt_h(row.hours)} x {nodes} x ${prices[node_type]}/h")
    row.cost_usd = row.hours * nodes * prices[node_type]
    row.arithmetic.extend(notes)
    row.arithmetic.append("not in the rates: reading the raw data and photos from S3 (I/O not measured here; "
                          "887k small objects: keep the photos in a few tar/Parquet files or on node-local "
                          "disk if S3 request rates limit)")
    row.status = "ok"
    return row


def train_row(results: Path, gpus: int, node_type: str, gpus_per_node: int, prices: dict[str, float]) -> Row:
    wl = WORKLOAD
    steps = wl["paired_train"] // wl["global_batch"]
    row = Row(
        "train",
        f"{wl['epochs']} epochs, global batch {wl['global_batch']} on {gpus} GPUs "
        f"({gpus // gpus_per_node} x {node_type})",
        "MISSING",
    )
    row.arithmetic.append(
        f"steps/epoch = {wl['paired_train']:,} paired // {wl['global_batch']} = {steps} "
        f"(+ {steps} recipe-only steps of 2x batch, H-T schedule)"
    )
    t = load(results, "train")
    gpu_rate = find(t, ("gpu_samples_per_s_per_worker", "gpu_samples_per_s")) if t else None
    if gpu_rate is not None:
        per_gpu, src = gpu_rate
        row.sources.append(f"train.json:{src} ({machine_note(t)})")
        sec_per_step = wl["global_batch"] / (per_gpu * gpus)
        row.hours = wl["epochs"] * steps * sec_per_step / 3600
        row.cost_usd = row.hours * (gpus / gpus_per_node) * prices[node_type]
        row.arithmetic.append(
            f"{wl['epochs']} x {steps} steps x {wl['global_batch']} / ({per_gpu:.1f} "
            f"samples/s/GPU x {gpus}) = {fmt_h(row.hours)}"
        )
        measured_on = ((t or {}).get("gpu_machine") or {}).get("gpu", "an unrecorded GPU")
        row.arithmetic.append(
            f"the rate was measured on {measured_on}, the nodes priced are {node_type}: if those GPUs differ, "
            "the time scales with the ratio of their speeds (not applied here); linear in GPUs (data parallel, "
            "the per-step gather is only D x global batch floats)")
        row.status = "ok"
        return row
    row.missing.append(
        "GPU throughput: no GPU measurement exists yet (no GPU machine has been lent); "
        "bench/gpu_check.py on a GPU writes train.json gpu_samples_per_s_per_worker"
    )
    # CPU figures are still useful as a floor on how slow it would be without GPUs, and as the scaling check.
    m = load(results, "model")
    cpu = None
    if m:
        for s in m.get("settings", []):
            if s.get("setting") in ("paper", "recipe1m_vit_b16"):
                res = s.get("results", {})
                for k in ("full/bf16", "full/fp32"):
                    if k in res and res[k].get("samples_per_s"):
                        cpu = (res[k]["samples_per_s"], f"model.json settings[{s['setting']}].results[{k}]")
                        break
            if cpu:
                break
    if cpu:
        rate, src = cpu
        row.sources.append(f"{src} ({machine_note(m)})")
        h_cpu = wl["epochs"] * wl["paired_train"] / rate / 3600
        row.arithmetic.append(
            f"CPU reference only: {wl['epochs']} x {wl['paired_train']:,} / {rate:.2f} "
            f"samples/s (paired fwd+bwd, 1 CPU machine) = {h_cpu:,.0f} h"
        )
        row.status = "partial"
    else:
        row.missing.append("model.json paper-setting fwd+bwd samples/s (bench/model.py --only paper)")
    if t:
        eff = find(t, ("scaling_efficiency", "efficiency_2w"))
        if eff:
            row.sources.append(f"train.json:{eff[1]}")
            row.arithmetic.append(f"measured 2-worker scaling efficiency (CPU): {eff[0]:.2f}")
    return row


def _embed_rates(results: Path) -> tuple[dict[str, tuple[float, str, float]], dict[str, Any]] | None:
    """Per-core inference rates of the paper model from model.json ``embed`` (bench/model.py --only embed).

    Returns ``{part: (vectors/s/core at the largest batch, precision, ms per vector at batch 1)}`` using the
    faster precision for each part, and the JSON (for its machine note).
    """
    m = load(results, "model")
    rows = ((m or {}).get("embed") or {}).get("results") or []
    if not rows:
        return None
    out: dict[str, tuple[float, str, float]] = {}
    for part in ("image", "recipe"):
        mine = [r for r in rows if r["part"] == part and r.get("torch_threads") == 1]
        if not mine:
            continue
        big = max(r["batch"] for r in mine)
        best = max((r for r in mine if r["batch"] == big), key=lambda r: r["vectors_per_cpu_s"])
        one = min((r for r in mine if r["batch"] == 1), key=lambda r: r["ms_per_vector"], default=None)
        out[part] = (best["vectors_per_cpu_s"], f"{best['precision']} batch {big}",
                     one["ms_per_vector"] if one else float("nan"))
    return (out, m) if len(out) == 2 else None


def _tradeoff_default(d: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None, int] | None:
    """(build, search row, n) of the store's *default* settings in ``index.json:tradeoff`` (bench/index.py
    tradeoff), the build whose settings equal the recorded defaults and its row at the default search settings."""
    runs = ((d.get("tradeoff") or {}).get("runs")) or []
    for run in reversed(runs):
        defaults = run.get("defaults") or {}
        for name, b in (run.get("builds") or {}).items():
            if all(defaults.get(k) == v for k, v in (b.get("settings") or {}).items()):
                row = next((r for r in run.get("rows", []) if r.get("variant") == name
                            and r.get("hnsw_ef") == defaults.get("hnsw_ef")
                            and r.get("rescore", defaults.get("rescore")) == defaults.get("rescore")
                            and r.get("oversampling", defaults.get("oversampling")) == defaults.get("oversampling")
                            and not r.get("ignore_quantization") and not r.get("exact")), None)
                return b, row, int(run["n"])
    return None


def index_row(results: Path, nodes: int, gpus_per_node: int, cpu_nodes: int = 4, cores: int = 32) -> Row:
    n = WORKLOAD["index_vectors"]
    row = Row("index", f"embed + load {n:,} vectors", "MISSING")
    d = load(results, "index")
    if d is None:
        row.missing.append("bench/results/index.json (bench/index.py)")
        return row
    row.sources.append(f"index.json ({machine_note(d)})")
    entries = [e for e in d.get("results", []) if e.get("n") and e.get("build_s") and e.get("store")]
    by_store: dict[str, list[dict[str, Any]]] = {}
    for e in entries:
        by_store.setdefault(e["store"], []).append(e)
    for store, es in sorted(by_store.items()):
        es.sort(key=lambda e: e["n"])
        e = es[-1]  # the largest measured size is the closest to the target
        rate = e["n"] / e["build_s"]
        h = n / rate / 3600
        row.arithmetic.append(
            f"{store}: load {e['n']:,} in {e['build_s']} s = {rate:,.0f} vec/s -> {n:,} / {rate:,.0f} "
            f"= {fmt_h(h)} (linear: a lower bound); query p50 {e.get('query_ms_p50')} ms at {e['n']:,}, "
            f"recall@10 {e.get('recall_at_10')}"
        )
        if len(es) > 1:
            trend = ", ".join(f"{x['n'] / x['build_s']:,.0f} vec/s at {x['n']:,}" for x in es)
            row.arithmetic.append(f"{store}: load rate by size: {trend} (falls with size: superlinear build)")
    if entries:
        row.status = "partial"
    load_h, load_what = _load_hours(d, by_store, n, row)
    gpus = nodes * gpus_per_node
    embed = find(d, ("embed_vectors_per_s_per_gpu", "embed_per_s_per_gpu"))
    img_g, rec_g = d.get("embed_image_per_s_per_gpu"), d.get("embed_recipe_per_s_per_gpu")
    embed_h = None
    if img_g and rec_g:  # bench/gpu_check.py: the two encoders separately
        embed_h = WORKLOAD["photos"] / (img_g * gpus) / 3600 + WORKLOAD["recipes"] / (rec_g * gpus) / 3600
        row.sources.append(f"index.json:embed_{{image,recipe}}_per_s_per_gpu ({d.get('embed_machine', {}).get('gpu')})")
        row.arithmetic.append(
            f"embed on {gpus} GPUs: photos {WORKLOAD['photos']:,} / ({img_g:,.0f}/s/GPU x {gpus}) + recipes "
            f"{WORKLOAD['recipes']:,} / ({rec_g:,.0f}/s/GPU x {gpus}) = {fmt_h(embed_h)}")
    elif embed:
        embed_h = n / (embed[0] * gpus) / 3600
        row.sources.append(f"index.json:{embed[1]}")
        row.arithmetic.append(f"embed {n:,} / ({embed[0]:,.0f}/s/GPU x {gpus} GPUs) = {fmt_h(embed_h)}")
    if embed_h is not None:
        row.hours = embed_h + (load_h or 0.0)
        row.cost_usd = embed_h * nodes * PRICES["g5.xlarge"] + (load_h or 0.0) * PRICES["m6i.8xlarge"]
        row.arithmetic.append(
            f"table time = GPU embed {fmt_h(embed_h)} + {load_what} {fmt_h(load_h)} = {fmt_h(row.hours)}; cost = "
            f"{fmt_h(embed_h)} x {nodes} x g5.xlarge + the load on one m6i.8xlarge")
        row.status = "ok" if load_h is not None else "partial"
        return row
    row.missing.append("encoder inference throughput on GPU (bench/gpu_check.py on a GPU); none measured yet")
    er = _embed_rates(results)
    if er is None:
        return row
    rates, m = er
    (ri, pi, _), (rr, pr, _) = rates["image"], rates["recipe"]
    total = cpu_nodes * cores
    h_img = WORKLOAD["photos"] / (ri * total) / 3600
    h_rec = WORKLOAD["recipes"] / (rr * total) / 3600
    row.sources.append(f"model.json:embed.results[torch_threads=1] ({machine_note(m)})")
    row.arithmetic.append(
        f"embed on CPU instead ({cpu_nodes} x m6i.8xlarge, {total} cores, linear): photos "
        f"{WORKLOAD['photos']:,} / ({ri:.2f}/s/core {pi} x {total}) = {fmt_h(h_img)}; recipes "
        f"{WORKLOAD['recipes']:,} / ({rr:.2f}/s/core {pr} x {total}) = {fmt_h(h_rec)}")
    row.hours = h_img + h_rec + (load_h or 0.0)
    row.arithmetic.append(
        f"table time = CPU embed {fmt_h(h_img + h_rec)} + {load_what} {fmt_h(load_h)} = {fmt_h(row.hours)}; "
        f"cost = {fmt_h(h_img + h_rec)} x {cpu_nodes} x m6i.8xlarge (the load runs on one node)")
    row.cost_usd = (h_img + h_rec) * cpu_nodes * PRICES["m6i.8xlarge"] + (load_h or 0.0) * PRICES["m6i.8xlarge"]
    row.status = "CPU"
    return row


def _load_hours(d: dict[str, Any], by_store: dict[str, list[dict[str, Any]]], n: int, row: Row
                ) -> tuple[float | None, str]:
    """Hours to load ``n`` vectors into the embedded store: the default-settings build of the trade-off sweep
    when there is one, else the largest plain edge build (both linear, a lower bound)."""
    load_h, load_what = None, "edge load"
    edge = sorted(by_store.get("edge", []), key=lambda e: e["n"])
    if edge:
        load_h = n / (edge[-1]["n"] / edge[-1]["build_s"]) / 3600
    default = _tradeoff_default(d)
    if default is not None:
        b, r, bn = default
        rate = bn / b["build_s"]
        load_h = n / rate / 3600
        load_what = f"edge load with the default index settings ({b['variant']})"
        q = f"; recall@10 {r['recall_at_10']}, p50 {r['p50_ms']} ms ({r['setting']})" if r else ""
        row.sources.append("index.json:tradeoff.runs[-1].builds / rows (the default settings)")
        row.arithmetic.append(
            f"default index settings ({b['variant']}): build {bn:,} in {b['build_s']} s = {rate:,.0f} vec/s "
            f"-> {n:,} / {rate:,.0f} = {fmt_h(load_h)} (linear: a lower bound){q}")
    return load_h, load_what


def serve_row(results: Path, qps: float, prices: dict[str, float]) -> Row:
    row = Row("serve", f"{qps:g} queries/s (text or photo -> top-10)", "MISSING")
    d = load(results, "serve")
    if d is None:
        row.missing.append("bench/results/serve.json (serving benchmark: QPS per encoder replica)")
        return row
    row.sources.append(f"serve.json ({machine_note(d)})")
    per = find(d, ("gpu_qps_per_replica",))
    cpu = find(d, ("qps_per_replica", "qps", "requests_per_s"))
    lat = find(d, ("p50_ms", "latency_ms_p50", "query_ms_p50"))
    if per:
        replicas = math.ceil(qps / per[0])
        row.sources.append(per[1])
        row.arithmetic.append(f"replicas = ceil({qps:g} / {per[0]:.1f} QPS/replica) = {replicas} x g5.xlarge")
        row.cost_usd = replicas * prices["g5.xlarge"] * 24 * 30
        row.arithmetic.append(f"cost per 30 days = {replicas} x ${prices['g5.xlarge']}/h x 720 h")
        row.status = "ok"
    else:
        row.missing.append("GPU QPS per replica (gpu_qps_per_replica): no GPU measurement yet")
        er = _embed_rates(results)
        # the default deployment (Serve's Python proxy), searches only: what a user of `tnlbt serve` gets
        default_rows = (r for r in d.get("results", []) if r.get("rps") and r.get("errors", 1) == 0
                        and r.get("proxy", "python") == "python" and not r.get("write_share"))
        best = max(default_rows, key=lambda r: r["rps"], default=None)
        if er is not None and best is not None:
            rates, _ = er
            cores = int((d.get("machine") or {}).get("cpus") or 2)
            overhead = cores / best["rps"]  # CPU s per request of everything but the paper encoders (bound)
            worst = max(rates["image"][2], rates["recipe"][2]) / 1000  # a photo query at batch 1 (slowest)
            per_node = 32 / (worst + overhead)
            nodes_needed = math.ceil(qps / per_node)
            row.arithmetic.append(
                f"CPU serving estimate: service overhead <= {cores} cores / {best['rps']} req/s "
                f"({best['endpoint']}, c={best['concurrency']}, tiny model) = {overhead * 1000:.0f} CPU ms/request; "
                f"paper encoders at batch 1 on one core: photo {rates['image'][2]} ms, text {rates['recipe'][2]} "
                f"ms; worst case (all photo queries) one 32-core m6i.8xlarge = 32 / ({worst:.3f} + "
                f"{overhead:.3f}) = {per_node:,.0f} QPS -> ceil({qps:g} / {per_node:,.0f}) = {nodes_needed} node(s)")
            row.arithmetic.append(
                f"latency floor per query on CPU: photo {rates['image'][2]} ms, text {rates['recipe'][2]} ms of "
                "encoding (one core, no batching) plus search and HTTP")
            row.cost_usd = nodes_needed * prices["m6i.8xlarge"] * 24 * 30
            row.arithmetic.append(f"cost per 30 days = {nodes_needed} x ${prices['m6i.8xlarge']}/h x 720 h")
            row.sources.append("model.json:embed.results[batch=1]")
            row.status = "CPU"
        elif cpu:
            replicas = math.ceil(qps / cpu[0]) if cpu[0] > 0 else None
            row.sources.append(cpu[1])
            row.arithmetic.append(
                f"CPU reference: {cpu[0]:.1f} QPS measured -> {replicas} CPU replicas "
                f"of the measured size for {qps:g} QPS"
            )
            row.status = "partial"
    if lat:
        row.sources.append(lat[1])
        row.arithmetic.append(f"measured latency p50 {lat[0]} ms")
    return row


def build(args: argparse.Namespace, prices: dict[str, float]) -> list[Row]:
    results = Path(args.results)
    return [
        preprocess_row(results, args.cpu_nodes, args.cores_per_node, "m6i.8xlarge", prices, args.photo_px),
        train_row(results, args.gpus, args.train_node, 8 if args.train_node.startswith("p4d") else 4, prices),
        index_row(results, args.index_gpu_nodes, 1, args.cpu_nodes, args.cores_per_node),
        serve_row(results, args.qps, prices),
    ]


def render(rows: list[Row], prices: dict[str, float]) -> str:
    lines = ["| stage | workload | time | cost | status |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.stage} | {r.what} | {fmt_h(r.hours)} | {fmt_usd(r.cost_usd)} | {r.status} |")
    lines.append("")
    for r in rows:
        lines.append(f"**{r.stage}** ({r.status})")
        for a in r.arithmetic:
            lines.append(f"- {a}")
        for s in r.sources:
            lines.append(f"- source: {s}")
        for m in r.missing:
            lines.append(f"- MISSING: {m}")
        lines.append("")
    lines.append(
        "Prices (USD/h, inputs, override with --price NAME=USD): "
        + ", ".join(f"{k} {v}" for k, v in prices.items())
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default=str(RESULTS), help="folder with the benchmark JSONs")
    p.add_argument("--gpus", type=int, default=8, help="training GPUs (default 8 = 2 x g5.12xlarge)")
    p.add_argument("--train-node", default="g5.12xlarge", choices=["g5.12xlarge", "p4d.24xlarge"])
    p.add_argument("--cpu-nodes", type=int, default=4, help="preprocessing nodes (m6i.8xlarge)")
    p.add_argument("--cores-per-node", type=int, default=32)
    p.add_argument("--index-gpu-nodes", type=int, default=2, help="g5.xlarge nodes embedding for the index")
    p.add_argument("--qps", type=float, default=100.0, help="target serving load")
    p.add_argument("--photo-px", type=int, default=512, choices=[128, 256, 384, 512, 768],
                   help="source photo size assumed for Recipe1M (rates from preprocess.json decode)")
    p.add_argument(
        "--price",
        action="append",
        default=[],
        metavar="NAME=USD",
        help="override an instance price per hour, e.g. --price g5.12xlarge=4.1",
    )
    p.add_argument("--json", action="store_true", help="print rows as JSON")
    p.add_argument(
        "--write-doc",
        metavar="MD",
        nargs="?",
        const=str(DOC),
        default=None,
        help="also replace the table between the capacity-table markers in MD (default docs/capacity.md)",
    )
    args = p.parse_args(argv)
    prices = dict(PRICES)
    for item in args.price:
        name, _, usd = item.partition("=")
        try:
            prices[name] = float(usd)
        except ValueError:
            p.error(f"--price {item!r}: expected NAME=USD")
    rows = build(args, prices)
    text = render(rows, prices)
    print(json.dumps([asdict(r) for r in rows], indent=2) if args.json else text)
    if args.write_doc:
        write_doc(Path(args.write_doc), text)
    return 0


def write_doc(path: Path, table: str) -> None:
    """Put the generated table between the markers in the doc, so the doc never holds hand-typed numbers."""
    doc = path.read_text()
    begin, end = "<!-- capacity-table:begin -->", "<!-- capacity-table:end -->"
    if begin not in doc or end not in doc:
        raise SystemExit(f"{path}: markers {begin} / {end} not found")
    head, rest = doc.split(begin, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{begin}\n{table}\n{end}{tail}")


if __name__ == "__main__":
    sys.exit(main())
