"""The per-worker training loop, plain PyTorch (no Ray import here).

:func:`run_training` is the body every data-parallel worker runs: build the model, resume, then train and
close each epoch (validate, checkpoint, report). Everything that differs between a Ray Train worker and a single
process (``tnlbt train --no-ray``) sits behind a small :class:`~tnlbt.train.backend.Backend`: rank and world
size, the device, where batches of Parquet rows come from, where a checkpoint to resume from is, and how an
epoch's metrics and checkpoint are reported (:mod:`tnlbt.train.backend` holds the one-process backend, the Ray
one lives in ``ray_trainer.py``).

One epoch = ``steps_per_epoch`` paired optimiser steps, the same number on every rank (collectives must
match). Each paired step takes ``scaling.cache_steps`` micro-batches of ``train.batch_size`` rows; H-T's
alternation puts one recipe-only step (``batch_size x recipe_only_batch_mult`` rows, recipe SSL only) before
every ``train.recipe_only_every``-th paired step. The global step counts paired steps: it drives the learning
rate, the margin's progress (``epoch + epoch_step / steps_per_epoch``), logging, step checkpoints and the
fault injection.

Remote storage (``data.processed_dir`` / ``train.runs_dir`` as ``s3://...`` etc., see :mod:`tnlbt.storage`): the
Parquet splits and the JSON files are read through pyarrow filesystems; the run directory is handled by
:class:`~tnlbt.train.run_files.RunFiles` (rank 0 writes into a local staging folder and publishes whole files to
the remote run directory, because object stores have no appends and no renames).

Gradients are averaged over ranks by one coalesced all-reduce after each step's backward (not DDP): the
gathered local-loss form makes the sum over ranks of each rank's gradients equal to the global-batch gradient
times the world size, GradCache does two backward passes per step (DDP would have to be silenced with
``no_sync`` on all but one), and the discriminators / generator / recipe-only steps leave different parameter
sets unused on different steps, which DDP reports as errors unless ``find_unused_parameters`` (slower).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from tnlbt import storage
from tnlbt.config import Config
from tnlbt.distributed import any_rank, broadcast_model
from tnlbt.losses import margin_at
from tnlbt.train import checkpoint as ckpt_mod
from tnlbt.train.backend import Backend, Rows, count_rows
from tnlbt.train.lr import lr_factor, set_lr
from tnlbt.train.precision import resolve_precision
from tnlbt.train.run_files import MetricsWriter, RunFiles
from tnlbt.train.validation import validate

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]


@dataclass
class LoopState:
    """The loop's counters: saved in every checkpoint's ``train_state.pt``, restored on resume."""

    epoch: int = 0  # current epoch (0-based); == epochs when training is finished
    epoch_step: int = 0  # paired steps done in the current epoch
    step: int = 0  # global paired optimiser steps
    recipe_steps: int = 0
    skipped_steps: int = 0  # non-finite loss or gradients: step skipped
    best_val_r1: float = -1.0
    best_epoch: int = -1
    active_fraction: float | None = None  # adaptive margin: fraction of active hinge terms last step
    samples_seen: int = 0


def steps_per_epoch_for(cfg: Config, n_paired: int, world_size: int) -> int:
    """Whole global batches in ``n_paired`` rows, at most ``train.max_steps_per_epoch`` (when set)."""
    per_step = cfg.train.batch_size * world_size * cfg.scaling.cache_steps
    steps = n_paired // per_step
    if cfg.train.max_steps_per_epoch:
        steps = min(steps, cfg.train.max_steps_per_epoch)
    return steps


def run_training(
    cfg: Config, backend: Backend, data_dir: str | Path, run_dir: str | Path, n_paired: int | None = None
) -> dict[str, Any]:
    """Train ``cfg.train.epochs`` epochs (resuming where a checkpoint says) and return the final summary.

    ``data_dir`` and ``run_dir`` are local paths or URIs (:mod:`tnlbt.storage`); see
    :class:`~tnlbt.train.run_files.RunFiles` for what a remote run directory gets. ``n_paired`` is the number of
    paired train rows (to size epochs identically on every rank); counted from the Parquet files when not given.
    """
    data_uri = os.fspath(data_dir)
    parts = _build(cfg, backend, data_uri)
    if n_paired is None:
        n_paired = count_rows(storage.join(data_uri, "train"))[0]
    steps_per_epoch = _checked_steps_per_epoch(cfg, n_paired, backend.world_size)
    state = _resume(cfg, parts, backend, run_dir)
    _sync_replicas(parts.model, cfg, backend, state.step)

    is_main = backend.rank == 0
    run = RunFiles(run_dir, is_main)
    writer = MetricsWriter(run.local, is_main)
    summary: dict[str, Any] = {}
    try:
        training = _Training(cfg, backend, parts, state, steps_per_epoch, run, writer)
        while state.epoch < cfg.train.epochs:
            training.train_epoch()
            summary = training.end_epoch()
    finally:
        try:
            writer.close()
        finally:
            run.close()
    summary.update(
        {
            "final_step": state.step,
            "final_epoch": state.epoch,
            "steps_per_epoch": steps_per_epoch,
            "loop_state": asdict(state),
        }
    )
    return summary


# -- set-up and resume ---------------------------------------------------------------------------------------
@dataclass
class _Parts:
    """What a worker trains and saves: the model, its optimisers and step, and the vocabularies of a checkpoint."""

    model: Any  # tnlbt.models.TNLBT (imported lazily, like the step)
    optimizers: dict[str, torch.optim.Optimizer]
    step_fn: Any  # tnlbt.train.step.TrainStep
    amp_dtype: torch.dtype | None
    vocab_tokens: list[str]
    ingredient_names: list[str]


def _build(cfg: Config, backend: Backend, data_uri: str) -> _Parts:
    from tnlbt.models import create_model
    from tnlbt.train.step import TrainStep, build_optimizers, prepare_model

    vocab_tokens = _load_json(storage.join(data_uri, "vocab.json"))["tokens"]
    ingredient_names = _load_json(storage.join(data_uri, "ingredients.json"))["names"]
    torch.manual_seed(cfg.train.seed)  # same init on every rank (and broadcast below anyway)
    model = create_model(cfg, len(vocab_tokens), len(ingredient_names)).to(backend.device)
    model.train()
    prepare_model(model, cfg, backend.device)
    optimizers = build_optimizers(model, cfg)
    amp_dtype = resolve_precision(cfg.train.precision, backend.device)
    step_fn = TrainStep(
        model, cfg, rank=backend.rank, world_size=backend.world_size, device=backend.device, amp_dtype=amp_dtype
    )
    return _Parts(model, optimizers, step_fn, amp_dtype, vocab_tokens, ingredient_names)


def _load_json(path: str | Path) -> Any:
    return json.loads(storage.read_text(path))


def _checked_steps_per_epoch(cfg: Config, n_paired: int, world: int) -> int:
    steps = steps_per_epoch_for(cfg, n_paired, world)
    if steps < 1:
        raise ValueError(
            f"{n_paired} paired train rows are fewer than one global batch "
            f"({cfg.train.batch_size} x {world} workers x {cfg.scaling.cache_steps} cache steps)"
        )
    return steps


def _resume(cfg: Config, parts: _Parts, backend: Backend, run_dir: str | Path) -> LoopState:
    """Weights, optimiser states, loop state and RNG states from the checkpoint to resume from, if there is one."""
    from tnlbt.train.step import load_optimizer_state

    state = LoopState()
    with contextlib.ExitStack() as stack:
        rdir = _checkpoint_to_resume(stack, backend, run_dir)
        if rdir is None:
            return state
        ckpt_mod.load_weights_into(parts.model, rdir)
        ts = ckpt_mod.load_train_state(rdir)
        if ts is not None:
            for name, opt in parts.optimizers.items():
                if name in ts.get("optimizers", {}):
                    load_optimizer_state(opt, ts["optimizers"][name], cfg)
            saved = ts.get("loop", {})
            state = LoopState(**{k: v for k, v in saved.items() if k in LoopState.__annotations__})
            ckpt_mod.set_rng_state(ts.get("rng"))
        if backend.rank == 0:
            log.info("resumed from %s at epoch %d step %d", rdir, state.epoch, state.step)
    return state


def _checkpoint_to_resume(stack: contextlib.ExitStack, backend: Backend, run_dir: str | Path) -> Path | str | None:
    """The backend's checkpoint, else the run's latest (a rerun with the same name continues the run); None
    unless complete. A remote one is downloaded into a folder ``stack`` deletes."""
    rdir = stack.enter_context(backend.resume_dir())
    if rdir is None:
        rdir = ckpt_mod.latest_checkpoint(run_dir)
    if rdir is not None and storage.is_remote(rdir):
        # every rank downloads its own copy (ranks may sit on different nodes); deleted after loading
        rdir = (
            stack.enter_context(ckpt_mod.local_checkpoint(rdir))
            if ckpt_mod.is_complete(rdir, need_train_state=False)
            else None
        )
    if rdir is not None and ckpt_mod.is_complete(rdir, need_train_state=False):
        return rdir
    return None


def _sync_replicas(model: torch.nn.Module, cfg: Config, backend: Backend, step: int) -> None:
    broadcast_model(model, backend.world_size)
    if backend.world_size > 1:
        # dropout / noise streams differ per rank (after the shared init and a possible RNG restore)
        torch.manual_seed(cfg.train.seed * 1000 + backend.rank + 7919 * step)


def _next_synced(it: Iterator[Rows] | None, backend: Backend) -> Rows | None:
    """The next batch, or None on every rank as soon as any rank has run out (ranks must stay in step)."""
    rows = None
    if it is not None:
        try:
            rows = next(it)
        except StopIteration:
            rows = None
    if any_rank(rows is None, backend.world_size, backend.device):
        return None
    return rows


def eta_seconds(elapsed_s: float, steps_done: int, steps_left: int) -> float:
    """Seconds until the last step at this process's mean pace so far (NaN before its first step)."""
    return steps_left * elapsed_s / steps_done if steps_done > 0 else float("nan")


def format_eta(seconds: float) -> str:
    """``1h02m``, ``9m05s``, ``42s``; ``?`` while unknown."""
    if not math.isfinite(seconds):
        return "?"
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


# -- the epochs ----------------------------------------------------------------------------------------------
class _Training:
    """The epoch loop of one worker after set-up: its steps, logging, checkpoints and the counters between them."""

    def __init__(
        self,
        cfg: Config,
        backend: Backend,
        parts: _Parts,
        state: LoopState,
        steps_per_epoch: int,
        run: RunFiles,
        writer: MetricsWriter,
    ) -> None:
        from tnlbt.data.collate import PartialRecipes, collate
        from tnlbt.train.step import apply_update

        self._apply_update = apply_update
        self.cfg, self.backend, self.parts, self.state = cfg, backend, parts, state
        self.model, self.optimizers, self.step_fn = parts.model, parts.optimizers, parts.step_fn
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = steps_per_epoch * cfg.train.epochs
        self.run, self.writer = run, writer
        self.is_main, self.world, self.device = backend.rank == 0, backend.world_size, backend.device
        self._collate_rows = collate
        self.image_tf_train = self.model.image_transform(True)
        self.image_tf_eval = self.model.image_transform(False)
        # photo pick + augmentation
        self.data_rng = random.Random(cfg.train.seed * 7919 + backend.rank * 104729 + state.step)
        tc = cfg.train
        self.partial = PartialRecipes(tc.partial_recipes, tc.partial_line_keep) if tc.partial_recipes > 0 else None
        self.bs, self.k_steps = cfg.train.batch_size, cfg.scaling.cache_steps
        self.recipe_bs = self.bs * cfg.train.recipe_only_batch_mult
        self.use_recipe_only = cfg.train.recipe_only_every > 0 and cfg.loss.w_recipe_ssl > 0
        self.recipe_it: Iterator[Rows] | None = None
        self.t_log, self.samples_log = time.perf_counter(), 0  # throughput since the last log line
        # the ETA's clock: this process's steps so far (a resumed run starts at its checkpoint's step), with the
        # validations and checkpoints between them, so the estimate covers what the remaining epochs will cost
        self.t_start, self.step_start = time.perf_counter(), state.step
        self.last_terms: dict[str, float] = {}
        self.ro_terms: dict[str, float] = {}  # the last recipe-only step's terms (logged with the next paired step)
        self.bad_batches = 0

    def collate(self, rows: Rows, train: bool = True, with_images: bool = True) -> Batch | None:
        """Tensors of a batch of rows; None (logged) when a row is broken. Partial recipes (when on) only in
        paired training batches: recipe-only batches exist for the self-supervision, which needs whole recipes."""
        try:
            return self._collate_rows(
                rows,
                n_ingredients=len(self.parts.ingredient_names),
                image_transform=self.image_tf_train if train else self.image_tf_eval,
                image_pick=self.cfg.train.image_pick if train else "first",
                rng=self.data_rng,
                with_images=with_images,
                partial=self.partial if train and with_images else None,
            )
        except Exception as e:  # a broken row must not kill a multi-day run: skip the batch, count it
            log.warning("collate failed (%s: %s); batch skipped", type(e).__name__, e)
            return None

    # -- one epoch ---------------------------------------------------------------------------------------------
    def train_epoch(self) -> None:
        """Paired steps (a recipe-only step first when one is due) until ``steps_per_epoch`` or the data runs out."""
        state, epoch = self.state, self.state.epoch
        if hasattr(self.model, "freeze_backbone"):
            self.model.freeze_backbone(epoch < self.cfg.optim.freeze_backbone_epochs)
        paired_it = self.backend.paired_batches(epoch, self.bs)
        self.recipe_it = self.backend.recipe_batches(epoch, self.recipe_bs) if self.use_recipe_only else None
        while state.epoch_step < self.steps_per_epoch:
            self._maybe_inject_fault()
            margin, factor = self._schedule()
            # H-T alternation: a recipe-only batch (SSL only) before every recipe_only_every-th paired step
            if self.use_recipe_only and state.epoch_step % self.cfg.train.recipe_only_every == 0:
                self._recipe_only_step(margin)
            mbs_rows = self._next_paired_rows(paired_it)
            if mbs_rows is None:
                if self.is_main:
                    log.warning(
                        "epoch %d: data ran out after %d of %d steps", epoch, state.epoch_step, self.steps_per_epoch
                    )
                break
            mbs = self._collate_paired(mbs_rows)
            if mbs is None:  # a broken batch on some rank: every rank skips the step, and counts it
                self.bad_batches += 1
                state.epoch_step += 1
                state.step += 1
                continue
            terms = self._paired_step(mbs, margin)
            self._log_step(terms, margin, factor)
            self._maybe_step_checkpoint(margin)

    def _maybe_inject_fault(self) -> None:
        """Fault injection (tests): rank 0 dies once, at the start of global step ``train.fail_at_step``."""
        t, step = self.cfg.train, self.state.step
        if self.is_main and t.fail_at_step >= 0 and step == t.fail_at_step and not self.run.fail_marker_exists():
            self.run.write_fail_marker(f"failed at step {step}\n")
            raise RuntimeError(f"injected failure at step {step} (train.fail_at_step)")

    def _schedule(self) -> tuple[float, float]:
        """This step's margin and learning-rate factor (set on every optimiser)."""
        state, epoch = self.state, self.state.epoch
        progress = epoch + state.epoch_step / self.steps_per_epoch
        at = progress if self.cfg.loss.margin_per_step else float(epoch)
        margin = float(margin_at(self.cfg.loss, at, state.active_fraction))
        factor = lr_factor(self.cfg.optim, state.step, self.steps_per_epoch, self.total_steps)
        for opt in self.optimizers.values():
            set_lr(opt, factor)
        return margin, factor

    def _recipe_only_step(self, margin: float) -> None:
        state = self.state
        rows = _next_synced(self.recipe_it, self.backend)
        if rows is None:  # recipe-only rows exhausted: start another pass over them
            self.recipe_it = self.backend.recipe_batches(state.epoch * 1000 + state.epoch_step, self.recipe_bs)
            rows = _next_synced(self.recipe_it, self.backend)
        batch = self.collate(rows, train=True, with_images=False) if rows is not None else None
        if any_rank(batch is None, self.world, self.device):
            return
        batch = self._to_device(batch)
        self._zero_grad()
        self.ro_terms = self.step_fn.recipe_only_step(batch, margin)
        self._finish_step(self.ro_terms)
        state.recipe_steps += 1

    def _next_paired_rows(self, paired_it: Iterator[Rows]) -> list[Rows] | None:
        """The rows of the step's ``cache_steps`` micro-batches; None when any rank has run out of them."""
        mbs_rows = []
        for _ in range(self.k_steps):
            rows = _next_synced(paired_it, self.backend)
            if rows is None:
                return None
            mbs_rows.append(rows)
        return mbs_rows

    def _collate_paired(self, mbs_rows: list[Rows]) -> list[Batch] | None:
        """The micro-batches on the device; None on every rank when any rank has a broken one (or no images)."""
        mbs = [self.collate(r, train=True) for r in mbs_rows]
        if any_rank(any(b is None or "image" not in b for b in mbs), self.world, self.device):
            return None
        return [self._to_device(b) for b in mbs]

    def _paired_step(self, mbs: list[Batch], margin: float) -> dict[str, float]:
        state = self.state
        self._zero_grad()
        terms = self.step_fn.paired_step(mbs, margin)
        if self._finish_step(terms) and "active_fraction" in terms:
            state.active_fraction = float(terms["active_fraction"])
        self.last_terms = terms
        n_global = self.bs * self.k_steps * self.world
        state.samples_seen += n_global
        self.samples_log += n_global
        state.step += 1
        state.epoch_step += 1
        return terms

    def _finish_step(self, terms: dict[str, float]) -> bool:
        """All-reduce gradients, skip non-finite steps on every rank together, clip, step. True if stepped."""
        if self._apply_update(self.optimizers, terms, self.cfg, self.world, self.device):
            return True
        self.state.skipped_steps += 1
        log.warning(
            "non-finite loss or gradient at step %d: step skipped (%d so far)",
            self.state.step,
            self.state.skipped_steps,
        )
        return False

    def _zero_grad(self) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)

    def _to_device(self, batch: Batch) -> Batch:
        return {k: v.to(self.device) for k, v in batch.items()}

    def _log_step(self, terms: dict[str, float], margin: float, factor: float) -> None:
        """Rank 0, every ``train.log_every`` steps and at the epoch's last: a ``train`` record and a log line."""
        state, epoch, spe = self.state, self.state.epoch, self.steps_per_epoch
        if not (self.is_main and (state.step % self.cfg.train.log_every == 0 or state.epoch_step == spe)):
            return
        dt = time.perf_counter() - self.t_log
        rec = {
            "kind": "train",
            "epoch": epoch,
            "step": state.step,
            "progress": round(epoch + state.epoch_step / spe, 4),
            "samples_per_s": self.samples_log / max(dt, 1e-9),
            "lr": self.cfg.optim.lr * factor,
            "margin": margin,
            "skipped_steps": state.skipped_steps,
            "bad_batches": self.bad_batches,
            "eta_s": round(eta_seconds(time.perf_counter() - self.t_start, state.step - self.step_start,
                                       self.total_steps - state.step), 1),
        }
        rec.update({f"loss/{k}": float(v) for k, v in {**terms, **self.ro_terms}.items() if k != "active_fraction"})
        rec["active_fraction"] = float(terms.get("active_fraction", float("nan")))
        self.writer.write(rec)
        self.run.publish_metrics(force=False)
        log.info(
            "epoch %d step %d (%d/%d) %.1f samples/s eta %s lr %.2e margin %.3f | %s",
            epoch,
            state.step,
            state.epoch_step,
            spe,
            rec["samples_per_s"],
            format_eta(rec["eta_s"]),
            rec["lr"],
            margin,
            " ".join(f"{k} {float(v):.4f}" for k, v in terms.items()),
        )
        self.t_log, self.samples_log = time.perf_counter(), 0

    def _maybe_step_checkpoint(self, margin: float) -> None:
        """Every ``train.ckpt_every_steps`` steps, except at an epoch's end (which checkpoints anyway)."""
        state, every = self.state, self.cfg.train.ckpt_every_steps
        if not (every and state.step % every == 0 and state.epoch_step < self.steps_per_epoch):
            return
        d = self._save()
        if d is not None:
            self.run.publish_metrics()
            self.run.publish_checkpoint(d, "last")
        self.backend.report({"epoch": state.epoch, "step": state.step, "margin": margin}, d)

    # -- epoch end ---------------------------------------------------------------------------------------------
    def end_epoch(self) -> dict[str, Any]:
        """Validate (rank 0), checkpoint ``last`` (and ``best``), report; the epoch's summary."""
        state, epoch = self.state, self.state.epoch
        state.epoch += 1
        state.epoch_step = 0
        val = self._validate(epoch) if self.is_main else {}
        d = self._save()
        if d is not None:
            self.run.publish_epoch()  # before the checkpoints: a crash in between duplicates records, loses none
            self.run.publish_checkpoint(d, "last")
            if state.best_epoch == epoch:
                self.run.publish_checkpoint(d, "best")
        summary = {
            "epoch": epoch,
            "step": state.step,
            "margin": float(margin_at(self.cfg.loss, float(state.epoch), state.active_fraction)),
            "skipped_steps": state.skipped_steps,
            "best_val_R@1": state.best_val_r1,
            **{f"loss/{k}": float(v) for k, v in self.last_terms.items()},
            **val,
        }
        self.backend.report(summary, d)
        return summary

    def _validate(self, epoch: int) -> dict[str, float]:
        """Validation metrics of the finished ``epoch``, a ``val`` record, and the best epoch so far."""
        state = self.state
        val = validate(self.model, self.backend, self.cfg, self.collate, self.parts.amp_dtype)
        r1 = val.get("val/R@1", -1.0)
        if r1 > state.best_val_r1:
            state.best_val_r1, state.best_epoch = r1, epoch
        self.writer.write({"kind": "val", "epoch": epoch, "step": state.step, **val, "best_val_R@1": state.best_val_r1})
        log.info("epoch %d done: %s", epoch, " ".join(f"{k} {v:.4g}" for k, v in val.items()))
        return val

    def _save(self) -> Path | None:
        """Rank 0: write ``checkpoints/last`` in the local run folder (the run dir or a remote run's staging)."""
        if not self.is_main or self.run.local is None:
            return None
        ts = {
            "loop": asdict(self.state),
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "rng": ckpt_mod.rng_state(),
            "config": self.cfg.to_dict(),
            "saved_at": time.time(),
        }
        p = self.parts
        return ckpt_mod.save_checkpoint(
            self.run.local / "checkpoints" / "last", self.model, self.cfg, p.vocab_tokens, p.ingredient_names, ts
        )
