"""``tnlbt eval``: embed a processed split with a run's checkpoint and report the Recipe1M table.

As H-T's evaluation (method-research.md §5.1): every paired recipe of the split with its *first* photo (eval
transform), rows sorted by recipe id so the bags do not depend on how the split was sharded; bagged medR and
R@1/5/10 in both directions (:func:`tnlbt.metrics.evaluate_embeddings`), with how many queries tie exactly
(Recipe1M has duplicate recipes and shared photos; the tie rule is ``eval.ties``). Rows that cannot be
collated (e.g. a photo that no longer decodes) are skipped and counted. No Ray here: evaluation of a test
split fits one process; ``tnlbt index`` is the Ray Data path for big corpora.

Remote runs and data (``--run s3://bucket/runs/RUN``, ``data.processed_dir=s3://...``; see :mod:`tnlbt.storage`):
the checkpoint is downloaded to a temporary folder and loaded from there (safetensors and the model loader read
local files), the split is streamed one Parquet row group at a time (no local copy of the split: a Recipe1M
test split with its photos is gigabytes), and ``metrics_{split}.json`` is written through storage.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from tnlbt import storage
from tnlbt.data.schema import EVAL_COLUMNS

log = logging.getLogger(__name__)



def _to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def embed_pairs(
    model: Any,
    split_dir: str | Path,
    *,
    batch_size: int = 64,
    image_pick: Literal["first", "random"] = "first",
    device: str | torch.device = "cpu",
    forms: Sequence[str] = (),
) -> dict[str, Any]:
    """Embed the paired rows of one processed split.

    Returns ``{"ids": list[str], "image_emb": (N, D) float32, "recipe_emb": (N, D) float32, "skipped": int,
    "skipped_ids": list[str] (first 20)}``, rows sorted by recipe id, and, when ``forms`` names query forms
    (:data:`tnlbt.data.collate.QUERY_FORMS`), ``"recipe_emb_forms": {form: (N, D)}``: the same recipes cut to
    that form (title only, ingredients only, ...). ``model`` needs ``encode_image``, ``encode_recipe`` and
    ``image_transform(train=False)`` (docs/contracts.md §4); it is put in eval mode. A batch that fails to
    collate is retried row by row so one bad photo costs one row, not the batch.
    """
    from tnlbt.data.collate import collate

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    dev = torch.device(device)
    batches = _row_batches(split_dir, batch_size)
    if hasattr(model, "eval"):
        model.eval()
    transform = model.image_transform(train=False)

    def make(rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        # n_ingredients=1: the "ingredient_labels" column is not read, so no label can be out of range.
        batch = collate(rows, n_ingredients=1, image_transform=transform, image_pick=image_pick)
        if "image" not in batch:
            raise ValueError("a row has no decodable photo")
        return batch

    ids: list[str] = []
    img_parts: list[np.ndarray] = []
    rec_parts: list[np.ndarray] = []
    form_parts: dict[str, list[np.ndarray]] = {f: [] for f in forms}
    skipped: list[str] = []

    def encode(rows: Sequence[Mapping[str, Any]], batch: dict[str, torch.Tensor]) -> None:
        b = _to_device(batch, dev)
        img = model.encode_image(b["image"], normalize=True)
        rec = model.encode_recipe(b, normalize=True)
        cut = {f: model.encode_recipe(_to_device(collate(rows, n_ingredients=1, with_images=False, form=f), dev),
                                      normalize=True) for f in forms}
        img_parts.append(img.float().cpu().numpy())
        rec_parts.append(rec.float().cpu().numpy())
        for f, e in cut.items():
            form_parts[f].append(e.float().cpu().numpy())
        ids.extend(str(r["id"]) for r in rows)

    n_read = 0
    for rows in batches:
        start, n_read = n_read, n_read + len(rows)
        try:
            batch = make(rows)
        except Exception as e:  # bad input: isolate the offending rows, skip and count them
            log.debug("batch at %d failed to collate (%s); retrying row by row", start, e)
            for r in rows:
                try:
                    encode([r], make([r]))
                except Exception as e1:
                    log.warning("row %s skipped: %s: %s", r.get("id"), type(e1).__name__, e1)
                    skipped.append(str(r.get("id")))
            continue
        encode(rows, batch)
    if not ids:
        raise ValueError(f"no usable paired rows in {split_dir} ({len(skipped)} skipped)")
    image_emb = np.concatenate(img_parts).astype(np.float32, copy=False)
    recipe_emb = np.concatenate(rec_parts).astype(np.float32, copy=False)
    order = np.argsort(np.asarray(ids), kind="stable")
    out: dict[str, Any] = {
        "ids": [ids[i] for i in order],
        "image_emb": np.ascontiguousarray(image_emb[order]),
        "recipe_emb": np.ascontiguousarray(recipe_emb[order]),
        "skipped": len(skipped),
        "skipped_ids": skipped[:20],
    }
    if forms:
        out["recipe_emb_forms"] = {f: np.ascontiguousarray(np.concatenate(v).astype(np.float32)[order])
                                   for f, v in form_parts.items()}
    return out


def _row_batches(split_dir: str | Path, batch_size: int) -> Iterator[list[dict[str, Any]]]:
    """Paired rows of a split (local folder or URI) in batches, through
    :class:`~tnlbt.data.dataset.RecipeDataset` (row groups read lazily and cached; raises ``FileNotFoundError``
    at once when the split has no part files)."""
    from tnlbt.data.dataset import paired_row_batches

    return paired_row_batches(split_dir, batch_size, EVAL_COLUMNS)


def cli_eval(args: argparse.Namespace) -> int:
    """``tnlbt eval --run RUN [--split test] [--data DIR] [--bags N] [--mode random|fixed]``.

    ``args.ties`` ("optimistic" | "pessimistic"), where the parser provides it, overrides the run's
    ``eval.ties``. ``metrics_{split}.json`` holds, per setting, the metrics under that rule (``meta.ties``)
    and ``exact_ties``: per direction, how many of the evaluated queries (summed over the bags) tie exactly
    with another candidate, and how many of those with an exact duplicate of their true item, so a reader
    sees whether the rule matters on this split.
    """
    from tnlbt.metrics import TIE_RULES, evaluate_embeddings, format_table
    from tnlbt.models import load_model
    from tnlbt.runs import checkpoint_location
    from tnlbt.train.checkpoint import local_checkpoint

    ties = getattr(args, "ties", None)
    if ties is not None and ties not in TIE_RULES:  # before loading anything
        raise ValueError(f"--ties must be one of {', '.join(TIE_RULES)}; got {ties!r}")
    remote_run = storage.scheme(args.run) != ""
    run: Path | str = os.fspath(args.run).rstrip("/") if remote_run else Path(args.run)
    ckpt = checkpoint_location(run)
    with local_checkpoint(ckpt) as local_ckpt:
        model, cfg, _vocab, _ingredients = load_model(local_ckpt)
    data = args.data or cfg.data.processed_dir
    if storage.scheme(data) != "":
        data_dir: Path | str = os.fspath(data).rstrip("/")
        split_dir: Path | str = storage.join(data_dir, args.split)
        found = storage.isdir(split_dir)
    else:
        data_dir = Path(data)
        split_dir = data_dir / args.split
        found = split_dir.is_dir()
    if not found:
        raise FileNotFoundError(f"no processed split at {split_dir} (pass --data or run `tnlbt preprocess`)")
    ecfg = cfg.eval
    if getattr(args, "bags", None) is not None:
        if args.bags < 1:
            raise ValueError(f"--bags must be >= 1; got {args.bags}")
        ecfg = dataclasses.replace(ecfg, n_bags=args.bags)
    if getattr(args, "mode", None):
        ecfg = dataclasses.replace(ecfg, mode=args.mode)
    if ties is not None:
        ecfg = dataclasses.replace(ecfg, ties=ties)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    forms = _query_forms(getattr(args, "query_forms", "all"))
    t0 = time.perf_counter()
    emb = embed_pairs(model, split_dir, batch_size=max(1, min(cfg.train.batch_size, 256)), device=device,
                      forms=[f for f in forms if f != "full"])
    t_embed = time.perf_counter() - t0
    t0 = time.perf_counter()
    metrics = evaluate_embeddings(emb["image_emb"], emb["recipe_emb"], ecfg)
    by_form = {f: evaluate_embeddings(emb["image_emb"], e, ecfg) for f, e in emb.get("recipe_emb_forms", {}).items()}
    t_metrics = time.perf_counter() - t0
    out = dict(metrics)
    if by_form:
        # the recipe side cut to each form, the photos whole: a title-only query against the photos
        # (recipe->image) and a photo against a catalog of title-only recipes (image->recipe)
        out["query_forms"] = {"full": metrics} | by_form
    out["meta"] = {
        "checkpoint": str(ckpt),
        "split": args.split,
        "data": str(data_dir),
        "n_pairs": len(emb["ids"]),
        "skipped_rows": emb["skipped"],
        "skipped_ids": emb["skipped_ids"],
        "mode": ecfg.mode,
        "ties": ecfg.ties,
        "n_bags": ecfg.n_bags,
        "seed": ecfg.seed,
        "embed_seconds": round(t_embed, 2),
        "metrics_seconds": round(t_metrics, 2),
    }
    if remote_run:
        path: Path | str = storage.join(run, f"metrics_{args.split}.json")
        storage.write_text(path, json.dumps(out, indent=2) + "\n")
    else:
        path = run / f"metrics_{args.split}.json"
        path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"{args.split}: {len(emb['ids'])} pairs ({emb['skipped']} skipped), checkpoint {ckpt}")
    print(format_table(metrics))
    if by_form:
        print(format_forms(out["query_forms"]))
    print(f"wrote {path}")
    return 0


def _query_forms(spec: str | None) -> list[str]:
    """``--query-forms``: "all" (default), "full" (only the whole recipe), or a comma list of forms."""
    from tnlbt.data.collate import QUERY_FORMS

    if spec in (None, "", "all"):
        return list(QUERY_FORMS)
    forms = [f.strip() for f in spec.split(",") if f.strip()]
    bad = [f for f in forms if f not in QUERY_FORMS]
    if bad:
        raise ValueError(f"--query-forms: unknown {bad}; choose from all, {', '.join(QUERY_FORMS)}")
    return forms


def format_forms(by_form: Mapping[str, Mapping[str, Any]]) -> str:
    """One line per query form: medR, R@1 and R@10 both directions at the first bag size."""
    lines = ["query form          | i2r medR  R@1   R@10 | r2i medR  R@1   R@10"]
    for form, m in by_form.items():
        setting = next(k for k, v in m.items() if isinstance(v, Mapping) and "image_to_recipe" in v)
        cells = []
        for d in ("image_to_recipe", "recipe_to_image"):
            r = m[setting][d]
            cells.append(f"{r['medR']['mean']:8.1f} {r['R@1']['mean']:5.3f} {r['R@10']['mean']:6.3f}")
        lines.append(f"{form:<19} | {cells[0]} | {cells[1]}")
    return "\n".join(lines)
