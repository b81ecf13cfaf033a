"""Training checkpoints: the model directory of ``tnlbt.models.save_model`` plus ``train_state.pt``.

Layout under the run directory::

    RUN/checkpoints/last/   model.safetensors, config.json, vocab.json, ingredients.json, train_state.pt
    RUN/checkpoints/best/   same files, the epoch with the best validation R@1 (val split, never test)

A checkpoint is written into a temporary sibling folder and renamed into place, so a crash mid-write never
leaves a half-written ``last`` (the previous one survives until the new one is complete).
``train_state.pt`` holds optimiser states, the step counters, the epoch, the RNG states and what the margin
schedule needs, so a resumed run continues on the same schedule as an uninterrupted one.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

TRAIN_STATE = "train_state.pt"


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any] | None) -> None:
    if not state:
        return
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    ckpt_dir: str | Path,
    model: nn.Module,
    cfg: Any,
    vocab_tokens: list[str],
    ingredient_names: list[str],
    train_state: dict[str, Any] | None,
) -> Path:
    """Write a complete checkpoint directory atomically (temp folder + rename). Returns the final path."""
    from tnlbt.models import save_model

    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_dir.parent / f".{ckpt_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    save_model(tmp, model, cfg, vocab_tokens, ingredient_names)
    if train_state is not None:
        torch.save(train_state, tmp / TRAIN_STATE)
    old = None
    if ckpt_dir.exists():
        old = ckpt_dir.parent / f".{ckpt_dir.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(ckpt_dir, old)
    os.replace(tmp, ckpt_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return ckpt_dir


def copy_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """Copy a checkpoint folder (e.g. ``last`` -> ``best``) atomically."""
    src, dst = Path(src), Path(dst)
    tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}"
    shutil.copytree(src, tmp)
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(tmp, dst)
    return dst


def is_complete(ckpt_dir: str | Path, need_train_state: bool = True) -> bool:
    d = Path(ckpt_dir)
    need = ["model.safetensors", "config.json", "vocab.json"]
    if need_train_state:
        need.append(TRAIN_STATE)
    return d.is_dir() and all((d / n).exists() for n in need)


def load_weights_into(model: nn.Module, ckpt_dir: str | Path) -> None:
    """Load ``model.safetensors`` of a checkpoint into an already built model (strict: same architecture)."""
    from safetensors.torch import load_file

    state = load_file(str(Path(ckpt_dir) / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {ckpt_dir} does not match the model: missing {list(missing)[:5]}, "
            f"unexpected {list(unexpected)[:5]}"
        )


def load_train_state(ckpt_dir: str | Path) -> dict[str, Any] | None:
    p = Path(ckpt_dir) / TRAIN_STATE
    if not p.exists():
        return None
    # our own file (optimiser tensors, RNG tuples, python ints): full unpickling is needed for numpy RNG state
    return torch.load(p, map_location="cpu", weights_only=False)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """``RUN/checkpoints/last`` if it is complete, else None."""
    last = Path(run_dir) / "checkpoints" / "last"
    return last if is_complete(last) else None
