"""Training checkpoints: the model directory of ``tnlbt.models.save_model`` plus ``train_state.pt``.

Layout under the run directory::

    RUN/checkpoints/last/   model.safetensors, config.json, vocab.json, ingredients.json, train_state.pt
    RUN/checkpoints/best/   same files, the epoch with the best validation R@1 (val split, never test)

A checkpoint is written into a temporary sibling folder and renamed into place, so a crash mid-write never
leaves a half-written ``last`` (the previous one survives until the new one is complete).
``train_state.pt`` holds optimiser states, the step counters, the epoch, the RNG states and what the margin
schedule needs, so a resumed run continues on the same schedule as an uninterrupted one.

Remote run directories (``s3://...``, ``gs://...``; see :mod:`tnlbt.storage`). Object stores can neither rename a
prefix nor replace several objects at once, so the temp-folder-and-rename trick does not exist there. Checkpoints
are always *written* locally (rank 0's staging folder) and then published with :func:`upload_checkpoint`, which
uses ``train_state.pt`` as the completion marker: it deletes the remote ``train_state.pt`` first (from then on
the old checkpoint reads as incomplete, never as a mix of old and new files), uploads every other file, and
uploads ``train_state.pt`` last. Each object appears only when its upload completes, so
``is_complete(uri)`` (which requires ``train_state.pt``) is true only for a fully uploaded checkpoint. The price:
a crash in the middle of replacing ``last`` leaves no complete ``last``; :func:`latest_checkpoint` then falls back
to ``best``, which is never newer than ``last`` and is uploaded after it, so the run resumes from an older but
whole checkpoint (and redoes some steps, as after any crash). Reading a remote checkpoint =
:func:`local_checkpoint` (download to a temporary folder, load with the plain local functions).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tnlbt import storage
from tnlbt.runs import TRAIN_STATE, is_complete

log = logging.getLogger(__name__)



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


def clean_stale(ckpt_dir: str | Path) -> None:
    """Remove what a killed writer of ``ckpt_dir`` left next to it: ``.NAME.tmp-*`` (a checkpoint being
    written) and ``.NAME.old-*`` (the previous one, moved aside for the swap). When the kill fell between the
    two renames of the swap, ``NAME`` itself is missing and the ``.old`` folder is the last complete checkpoint:
    it is put back instead."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.parent.is_dir():
        return
    olds = sorted(ckpt_dir.parent.glob(f".{ckpt_dir.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if not ckpt_dir.exists() and olds and is_complete(olds[-1], need_train_state=False):
        os.replace(olds.pop(), ckpt_dir)
        log.warning("restored %s from the previous checkpoint a killed save had moved aside", ckpt_dir)
    for stale in [*ckpt_dir.parent.glob(f".{ckpt_dir.name}.tmp-*"), *olds]:
        shutil.rmtree(stale, ignore_errors=True)


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
    clean_stale(ckpt_dir)
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
    clean_stale(dst)
    tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}"
    shutil.copytree(src, tmp)
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(tmp, dst)
    return dst


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


def latest_checkpoint(run_dir: str | Path) -> Path | str | None:
    """The newest complete checkpoint of a run: ``RUN/checkpoints/last``, else ``RUN/checkpoints/best``, else None.

    ``run_dir`` may be a URI; the result is then a URI too (download it with :func:`local_checkpoint`). ``best``
    only matters when ``last`` is incomplete, which happens on an object store when a crash cut the upload of a
    new ``last`` short (locally ``last`` is replaced by a rename and is never incomplete once it exists); ``best``
    is a copy of an earlier or the same ``last``, so resuming from it only redoes some steps.
    """
    if storage.is_remote(run_dir):
        base = storage.join(os.fspath(run_dir), "checkpoints")
        for name in ("last", "best"):
            uri = storage.join(base, name)
            if is_complete(uri):
                return uri
        return None
    for name in ("last", "best"):
        d = storage.as_local(run_dir) / "checkpoints" / name
        if is_complete(d):
            return d
    return None


def staging_root() -> str | None:
    """Parent folder for local copies of remote runs and checkpoints: ``storage.cache_dir()/staging``
    (``$TNLBT_CACHE_DIR``, else ``~/.cache/tnlbt``), or the temp dir when that cannot be created."""
    root = os.path.join(storage.cache_dir(), "staging")
    try:
        os.makedirs(root, exist_ok=True)
    except OSError:
        return None
    return root


@contextlib.contextmanager
def local_checkpoint(ckpt: str | Path) -> Iterator[Path]:
    """A checkpoint as a local folder: a local path as is, a remote URI downloaded to a temporary folder
    (deleted on exit). Raises ``FileNotFoundError`` when the download is not a complete checkpoint."""
    if not storage.is_remote(ckpt):
        yield storage.as_local(ckpt)
        return
    tmp = tempfile.mkdtemp(prefix="tnlbt-ckpt-", dir=staging_root())
    try:
        local = Path(storage.download_dir(ckpt, os.path.join(tmp, "ckpt")))
        if not is_complete(local, need_train_state=False):
            raise FileNotFoundError(f"{ckpt}: not a complete checkpoint (model files missing)")
        yield local
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _upload_file(src: Path, dst: str) -> None:
    with src.open("rb") as fin, storage.open_output(dst) as fout:
        shutil.copyfileobj(fin, fout, 8 << 20)


def upload_checkpoint(local_dir: str | Path, uri: str | Path) -> str:
    """Publish a local checkpoint folder at ``uri`` (a remote URI or a local path); returns ``uri``.

    Remote: marker-last protocol of the module docstring (delete ``train_state.pt``, drop objects the new
    checkpoint does not have, upload the other files, upload ``train_state.pt``). A local ``uri`` gets
    :func:`copy_checkpoint` (temp folder + rename).
    """
    src = Path(local_dir)
    if not storage.is_remote(uri):
        dst = storage.as_local(uri)
        if dst.resolve() != src.resolve():
            copy_checkpoint(src, dst)
        return os.fspath(uri)
    uri = os.fspath(uri).rstrip("/")
    names = sorted(os.listdir(src))
    storage.remove(storage.join(uri, TRAIN_STATE))  # from now on the old checkpoint reads as incomplete
    for old in storage.listdir(uri):
        if old not in names:
            storage.remove(storage.join(uri, old))
    for name in [n for n in names if n != TRAIN_STATE] + [n for n in names if n == TRAIN_STATE]:
        p = src / name
        if p.is_dir():
            storage.remove(storage.join(uri, name))
            storage.copy_dir(p, storage.join(uri, name))
        else:
            _upload_file(p, storage.join(uri, name))
    return uri
