"""Validation during training: embed the val split's paired rows and score image->recipe retrieval on bags.

:func:`validate` runs on rank 0 at every epoch end; its ``val/...`` numbers go to ``metrics.jsonl`` and pick the
``best`` checkpoint (``val/R@1``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from tnlbt.config import Config
from tnlbt.train.backend import Backend, Rows
from tnlbt.train.precision import maybe_autocast

log = logging.getLogger(__name__)

# ``collate_fn(rows, train=False)``: a batch of tensors, or None for a batch to skip
CollateFn = Callable[..., dict[str, torch.Tensor] | None]


@torch.no_grad()
def embed_rows(
    model: torch.nn.Module,
    batches: Iterator[Rows],
    collate_fn: CollateFn,
    device: torch.device,
    max_rows: int = 0,
    amp_dtype: torch.dtype | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Image and recipe embeddings (L2-normalised, float32 numpy) of paired rows, eval mode."""
    was = model.training
    model.eval()
    imgs, recs = [], []
    n = 0
    try:
        for rows in batches:
            if max_rows and n >= max_rows:
                break
            if max_rows:
                rows = rows[: max_rows - n]
            batch = collate_fn(rows, train=False)
            if batch is None or "image" not in batch:
                continue
            batch = {k: v.to(device) for k, v in batch.items()}
            with maybe_autocast(device, amp_dtype):
                imgs.append(model.encode_image(batch["image"], normalize=True).float().cpu())
                recs.append(model.encode_recipe(batch, normalize=True).float().cpu())
            n += len(rows)
    finally:
        model.train(was)
    if not imgs:
        return np.zeros((0, 1), np.float32), np.zeros((0, 1), np.float32)
    return torch.cat(imgs).numpy(), torch.cat(recs).numpy()


def validate(
    model: torch.nn.Module, backend: Backend, cfg: Config, collate_fn: CollateFn, amp_dtype: torch.dtype | None
) -> dict[str, float]:
    """Image->recipe medR / R@K on bags of the VAL split (same bags every epoch: a fixed seed)."""
    from tnlbt.metrics import bagged_metrics

    img, rec = embed_rows(
        model,
        backend.val_batches(max(cfg.train.batch_size, 64)),
        collate_fn,
        backend.device,
        cfg.train.val_max_rows,
        amp_dtype,
    )
    n = img.shape[0]
    if n < 2:
        log.warning("validation split has %d paired rows: no metrics", n)
        return {}
    bag = min(cfg.train.val_bag_size, n)
    rng = np.random.default_rng(cfg.train.seed)
    m = bagged_metrics(img, rec, bag, cfg.train.val_bags, rng, "random")
    out = {"val/n": float(n), "val/bag_size": float(bag)}
    out.update(_flatten_metrics(m))
    return out


def _flatten_metrics(m: Any) -> dict[str, float]:
    """bagged_metrics' {"image_to_recipe": {metric: {"mean", "std"}}, ...} -> flat "val/..." means."""
    out: dict[str, float] = {}
    if not isinstance(m, dict):
        return out
    for k, v in m.items():
        if isinstance(v, dict):
            for k2, v2 in v.items():
                if isinstance(v2, int | float | np.floating | np.integer):
                    out[f"val/{k}/{k2}"] = float(v2)
                elif isinstance(v2, dict) and "mean" in v2:
                    out[f"val/{k}/{k2}"] = float(v2["mean"])
        elif isinstance(v, int | float | np.floating | np.integer):
            out[f"val/{k}"] = float(v)
    # headline numbers: image->recipe
    for name in ("R@1", "R@5", "R@10", "medR"):
        for k in (f"val/image_to_recipe/{name}", f"val/{name}"):
            if k in out:
                out[f"val/{name}"] = out[k]
                break
    return out
