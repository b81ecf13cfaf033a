"""Model benchmark: forward+backward samples/s on CPU, fp32 and bf16 autocast, with parameter counts.

    .venv/bin/python bench/model.py                       # tiny + demo + paper, tiny image-model survey
    .venv/bin/python bench/model.py --only paper --batch 4 --steps 3
    .venv/bin/python bench/model.py --only embed --threads 1   # inference cost per vector (index, serve)
    -> bench/results/model.json (merged: one entry per setting; newer runs replace older ones)

Two step kinds per setting:
* ``retrieval``: encode_image + encode_recipe, H-T bidirectional triplet (mean over negatives), backward;
* ``full``: the retrieval step plus everything a TNLBT training step computes with the encoders' graph:
  recipe self-supervision over the six projectors, the Cross Decoder on B positives + 2B re-indexed negatives
  with the ITM head, the modality critic and ingredient head on the embeddings, and the generator + image
  discriminator on the fused embedding (the separate discriminator updates are not included).
``embed`` (separate, ``--only embed``): inference only (eval mode, no grad) of the image encoder and of the
recipe encoder of the paper model, per vector: what ``tnlbt index`` pays per photo / recipe and what one
search request pays to encode its query. Run it with ``--threads 1`` to get a per-core cost.
Batches are synthetic but shaped like Recipe1M after collate (title <= 15 tokens, <= 20 lines x <= 15 tokens,
about half the lines real). Timing: ``warmup`` untimed steps, then the median of ``steps`` timed ones.
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

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_quiet.py: the quiet-box rule

import _quiet

from tnlbt.config import Config, list_presets
from tnlbt.models import TNLBT, create_model
from tnlbt.models.image_encoder import ImageEncoder

RESULTS = Path(__file__).resolve().parent / "results" / "model.json"
# Candidates for the demo/test presets: small timm models that run at 32-64 px.
SURVEY = [
    ("test_vit", 32),
    ("test_vit", 64),
    ("vit_tiny_patch16_224", 32),
    ("vit_tiny_patch16_224", 64),
    ("resnet10t", 32),
    ("resnet10t", 64),
    ("resnet18", 64),
    ("test_resnet", 64),
    ("test_convnext", 64),
    ("test_efficientnet", 64),
    ("mobilenetv3_small_050", 64),
]


def recipe_batch(B: int, vocab: int, n_ing: int, seed: int = 0, T: int = 15, N: int = 20) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)

    def seq(shape: tuple[int, ...]) -> torch.Tensor:
        x = torch.randint(3, vocab, (*shape, T), generator=g)
        lengths = torch.randint(4, T + 1, shape, generator=g)
        x[torch.arange(T) >= lengths.unsqueeze(-1)] = 0
        x[..., 0] = 1
        return x

    def lines() -> torch.Tensor:
        x = seq((B, N))
        n_real = torch.randint(3, N + 1, (B,), generator=g)
        x[torch.arange(N)[None, :] >= n_real[:, None]] = 0
        return x

    return {
        "title": seq((B,)),
        "ingredients": lines(),
        "instructions": lines(),
        "ingredient_labels": (torch.rand(B, n_ing, generator=g) > 0.99).float(),
    }


def triplet(img: torch.Tensor, rec: torch.Tensor, margin: float = 0.3) -> torch.Tensor:
    """H-T bidirectional triplet, mean over all B^2 entries (diagonal zeroed)."""
    d = 1 - F.normalize(img, dim=-1) @ F.normalize(rec, dim=-1).T
    pos = d.diag()
    off = 1 - torch.eye(len(d), device=d.device)
    img_anchor = (margin + pos[:, None] - d).clamp(min=0)
    rec_anchor = (margin + pos[None, :] - d).clamp(min=0)
    return ((img_anchor + rec_anchor) * off).mean()


def step(model: TNLBT, batch: dict[str, torch.Tensor], images: torch.Tensor, kind: str) -> torch.Tensor:
    i = model.image_features(images)
    r = model.recipe_features(batch)
    loss = triplet(i["emb"], r["emb"])
    if kind == "full":
        comps = ("title", "ingredients", "instructions")
        for a in comps:
            for b in comps:
                if a != b:
                    loss = loss + triplet(r[a], model.ssl_project(b, a, r[b])) / 6
        fused = r["emb"]
        if model.cross_decoder is not None:
            B = images.shape[0]
            neg_r = torch.roll(torch.arange(B), 1)  # stand-ins for sampled hard negatives
            img_tok = torch.cat([i["tokens"], i["tokens"], i["tokens"][neg_r]])
            idx = torch.cat([torch.arange(B), neg_r, torch.arange(B)])
            out = model.cross_decode(img_tok, r["tokens"][idx], r["token_mask"][idx])
            target = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long()
            loss = loss + F.cross_entropy(out["itm_logits"].float(), target)
            fused = out["fused"][:B]
        if model.modality_disc is not None:
            loss = loss - 0.005 * model.modality_disc(r["emb"]).mean()
        if model.ingredient_head is not None:
            loss = loss + 0.002 * F.binary_cross_entropy_with_logits(
                model.ingredient_head(i["emb"]).float(), batch["ingredient_labels"]
            )
        if model.generator is not None and model.image_disc is not None:
            g = model.generate(fused)
            d = model.image_disc(g["image"], g["mu"])
            loss = loss + 0.002 * (
                F.softplus(-d["logits"].float()).mean()
                + F.binary_cross_entropy_with_logits(
                    d["ingredient_logits"].float(), batch["ingredient_labels"]
                )
            )
    loss.backward()
    return loss.detach()


def time_steps(
    model: TNLBT, B: int, kind: str, precision: str, warmup: int, steps: int, vocab: int, n_ing: int
) -> dict[str, Any]:
    S = model.mcfg.image_size
    batch = recipe_batch(B, vocab, n_ing)
    images = torch.randn(B, 3, S, S)
    times, cpu_times = [], []
    for k in range(warmup + steps):
        model.zero_grad(set_to_none=True)
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = step(model, batch, images, kind)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        if not torch.isfinite(loss):
            raise RuntimeError(f"non-finite loss in benchmark ({kind}, {precision})")
        if k >= warmup:
            times.append(dt)
            cpu_times.append(dc)
    med, cpu_med = statistics.median(times), statistics.median(cpu_times)
    # CPU seconds per step are far less sensitive to other jobs on a shared box than wall time (with one
    # torch thread they are the single-core cost); samples_per_cpu_s is the load-robust figure.
    return {
        "batch": B,
        "step_s_median": round(med, 4),
        "samples_per_s": round(B / med, 2),
        "cpu_s_median": round(cpu_med, 4),
        "samples_per_cpu_s": round(B / cpu_med, 2),
        "step_s_all": [round(t, 4) for t in times],
    }


def bench_setting(
    name: str,
    cfg: Config,
    B: int,
    warmup: int,
    steps: int,
    vocab: int,
    n_ing: int,
    kinds: list[str],
    precisions: list[str],
) -> dict[str, Any]:
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = create_model(cfg, vocab, n_ing).train()
    build_s = time.perf_counter() - t0
    m = cfg.model
    entry: dict[str, Any] = {
        "setting": name,
        "image_model": m.image_model,
        "image_size": m.image_size,
        "embed_dim": m.embed_dim,
        "text_width": m.text_width,
        "text_layers": m.text_layers,
        "vocab_size": vocab,
        "n_ingredients": n_ing,
        "parts": {k: getattr(m, k) for k in ("cross_decoder", "adversarial", "ingredient_head", "generator")},
        "gen_image_size": m.gen_image_size,
        "gen_channels": m.gen_channels,
        "params": model.parameter_counts(),
        "params_total": sum(p.numel() for p in model.parameters()),
        "build_s": round(build_s, 2),
        "results": {},
    }
    for kind in kinds:
        for prec in precisions:
            r = time_steps(model, B, kind, prec, warmup, steps, vocab, n_ing)
            r["load_avg_1m"] = round(os.getloadavg()[0], 1)
            entry["results"][f"{kind}/{prec}"] = r
            print(
                f"{name:8s} {kind:9s} {prec:4s} B={B:3d}: {r['samples_per_s']:8.2f} samples/s "
                f"({r['step_s_median']:.3f} s/step wall, {r['cpu_s_median']:.3f} CPU s/step)",
                flush=True,
            )
    return entry


def survey(B: int, warmup: int, steps: int) -> list[dict[str, Any]]:
    out = []
    for name, S in SURVEY:
        torch.manual_seed(0)
        enc = ImageEncoder(name, S, 256).train()
        x = torch.randn(B, 3, S, S)
        times = []
        for k in range(warmup + steps):
            enc.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            c0 = time.process_time()
            feats = enc(x)
            feats["emb"].sum().backward()
            if k >= warmup:
                times.append((time.perf_counter() - t0, time.process_time() - c0))
        med = statistics.median(t for t, _ in times)
        cpu_med = statistics.median(c for _, c in times)
        row = {
            "image_model": name,
            "image_size": S,
            "batch": B,
            "params": sum(p.numel() for p in enc.backbone.parameters()),
            "tokens": feats["tokens"].shape[1],
            "token_width": enc.token_width,
            "fwd_bwd_samples_per_s": round(B / med, 1),
            "fwd_bwd_samples_per_cpu_s": round(B / cpu_med, 1),
            "mean": list(enc.data_config["mean"]),
        }
        out.append(row)
        print(
            f"survey {name:24s} {S:3d}px {row['params'] / 1e6:6.2f}M params: "
            f"{row['fwd_bwd_samples_per_s']:8.1f} samples/s, "
            f"{row['fwd_bwd_samples_per_cpu_s']:8.1f} per CPU s",
            flush=True,
        )
    return out


def bench_embed(cfg: Config, vocab: int, n_ing: int, batches: list[int], warmup: int, steps: int
                ) -> list[dict[str, Any]]:
    """Inference vectors/s of the paper model's two encoders, fp32 and bf16, at each batch size."""
    torch.manual_seed(0)
    model = create_model(cfg, vocab, n_ing).eval()
    S = model.mcfg.image_size
    rows = []
    for B in batches:
        batch = recipe_batch(B, vocab, n_ing)
        images = torch.randn(B, 3, S, S)
        for part in ("image", "recipe"):
            for prec in ("fp32", "bf16"):
                times, cpu_times = [], []
                for k in range(warmup + steps):
                    t0, c0 = time.perf_counter(), time.process_time()
                    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16,
                                                                enabled=prec == "bf16"):
                        out = model.image_features(images) if part == "image" else model.recipe_features(batch)
                    dt, dc = time.perf_counter() - t0, time.process_time() - c0
                    if not torch.isfinite(out["emb"].float()).all():
                        raise RuntimeError(f"non-finite embedding ({part}, {prec})")
                    if k >= warmup:
                        times.append(dt)
                        cpu_times.append(dc)
                med, cpu_med = statistics.median(times), statistics.median(cpu_times)
                row = {"part": part, "precision": prec, "batch": B, "image_size": S,
                       "vectors_per_s": round(B / med, 2), "vectors_per_cpu_s": round(B / cpu_med, 2),
                       "ms_per_vector": round(1000 * med / B, 2), "step_s_all": [round(t, 4) for t in times],
                       "torch_threads": torch.get_num_threads(), "load_avg_1m": round(os.getloadavg()[0], 1)}
                rows.append(row)
                print(f"embed {part:6s} {prec:4s} B={B:3d}: {row['vectors_per_s']:8.2f} vectors/s "
                      f"({row['ms_per_vector']:.1f} ms/vector wall, {row['vectors_per_cpu_s']:.2f} per CPU s)",
                      flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", default=None,
                    help="settings: tiny demo paper survey embed (default all but embed)")
    ap.add_argument("--batch", type=int, default=0, help="batch for every setting (default: 32, paper 4)")
    ap.add_argument("--steps", type=int, default=0, help="timed steps (default: 5 tiny/demo, 3 paper)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    _quiet.add_arguments(ap)
    args = ap.parse_args()
    quiet = _quiet.from_args(args, "bench/model.py")
    if args.threads:
        torch.set_num_threads(args.threads)
    only = set(args.only or ["tiny", "demo", "paper", "survey"])
    settings: list[tuple[str, Config, int, int, int, int]] = []  # name, cfg, B, steps, vocab, n_ing
    presets = list_presets()
    if "tiny" in only and "tiny_test" in presets:
        settings.append(("tiny", Config.load("tiny_test"), 32, 5, 500, 50))
    if "demo" in only and "demo_cpu" in presets:
        settings.append(("demo", Config.load("demo_cpu"), 32, 5, 2000, 300))
    if "paper" in only:
        # H-T / TNLBT sizes: ViT-B/16 at 224, width 512, 2 layers, 4 heads, D 1024; H-T's vocabulary (16,303)
        # and ACME's ingredient vocabulary (4,102); the recipe1m_vit_b16 preset when present, else defaults.
        paper = Config.load("recipe1m_vit_b16") if "recipe1m_vit_b16" in presets else Config.load(None)
        settings.append(("paper", paper, 4, 3, 16303, 4102))
    prev: dict[str, Any] = json.loads(args.out.read_text()) if args.out.exists() else {}
    entries = {e["setting"]: e for e in prev.get("settings", [])}
    result: dict[str, Any] = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "load_avg_1m_at_start": round(os.getloadavg()[0], 1),
        },
        "note": "CPU shared with other jobs (see load_avg_1m_at_start): wall-clock samples/s is noisy; "
        "samples_per_cpu_s (batch / median CPU seconds per step) is the load-robust figure",
        "settings": list(entries.values()),
        "survey": prev.get("survey", []),
        "embed": prev.get("embed", {}),
    }

    def write() -> None:  # after every setting, so an interrupted run keeps what it measured
        result["settings"] = list(entries.values())
        result["quiet"] = _quiet.finish(quiet)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")

    for name, cfg, B, steps, vocab, n_ing in settings:
        # Random init: speed does not depend on the weights.
        cfg = cfg.replace(model=dataclasses.replace(cfg.model, image_pretrained=""))
        entries[name] = bench_setting(
            name,
            cfg,
            args.batch or B,
            args.warmup,
            args.steps or steps,
            vocab,
            n_ing,
            ["retrieval", "full"],
            ["fp32", "bf16"],
        )
        write()
    if "survey" in only:
        result["survey"] = survey(args.batch or 16, args.warmup, args.steps or 3)
    if "embed" in (args.only or []):
        paper = Config.load("recipe1m_vit_b16") if "recipe1m_vit_b16" in presets else Config.load(None)
        paper = paper.replace(model=dataclasses.replace(paper.model, image_pretrained=""))
        result["embed"] = {
            "setting": "paper",
            "note": "inference only (eval, inference_mode) of the paper model's encoders on this CPU; batch 1 is "
            "one search request's query, larger batches are what `tnlbt index` feeds",
            "machine_threads": torch.get_num_threads(),
            "results": bench_embed(paper, 16303, 4102, [1, args.batch or 16], args.warmup, args.steps or 5),
        }
    write()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
