"""The per-worker training loop, plain PyTorch (no Ray import here).

:func:`run_training` is the body every data-parallel worker runs. Everything that differs between a Ray Train
worker and a single process (``tnlbt train --no-ray``) sits behind a small
:class:`~tnlbt.train.backend.Backend`: rank and world size, the device, where batches of Parquet rows come
from, where a checkpoint to resume from is, and how an epoch's metrics and checkpoint are reported
(:mod:`tnlbt.train.backend` holds the one-process backend, the Ray one lives in ``ray_trainer.py``).

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
from tnlbt.distributed import all_reduce_grads, any_rank, broadcast_model
from tnlbt.train import checkpoint as ckpt_mod
from tnlbt.train.backend import Backend, Rows, count_rows
from tnlbt.train.lr import lr_factor, set_lr
from tnlbt.train.precision import resolve_precision
from tnlbt.train.run_files import MetricsWriter, RunFiles
from tnlbt.train.validation import validate

log = logging.getLogger(__name__)


# -- loop state --------------------------------------------------------------------------------------------
@dataclass
class LoopState:
    epoch: int = 0  # current epoch (0-based); == epochs when training is finished
    epoch_step: int = 0  # paired steps done in the current epoch
    step: int = 0  # global paired optimiser steps
    recipe_steps: int = 0
    skipped_steps: int = 0  # non-finite loss or gradients: step skipped
    best_val_r1: float = -1.0
    best_epoch: int = -1
    active_fraction: float | None = None  # adaptive margin: fraction of active hinge terms last step
    samples_seen: int = 0


# -- the loop ------------------------------------------------------------------------------------------------
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


def _load_json(path: str | Path) -> Any:
    return json.loads(storage.read_text(path))


def steps_per_epoch_for(cfg: Config, n_paired: int, world_size: int) -> int:
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
    from tnlbt.data.collate import collate
    from tnlbt.losses import margin_at
    from tnlbt.models import create_model
    from tnlbt.train.step import TrainStep, build_optimizers

    data_uri = os.fspath(data_dir)
    rank, world, device = backend.rank, backend.world_size, backend.device
    is_main = rank == 0
    vocab_tokens = _load_json(storage.join(data_uri, "vocab.json"))["tokens"]
    ingredient_names = _load_json(storage.join(data_uri, "ingredients.json"))["names"]

    torch.manual_seed(cfg.train.seed)  # same init on every rank (and broadcast below anyway)
    model = create_model(cfg, len(vocab_tokens), len(ingredient_names)).to(device)
    model.train()
    optimizers = build_optimizers(model, cfg)
    amp_dtype = resolve_precision(cfg.train.precision, device)
    step_fn = TrainStep(model, cfg, rank=rank, world_size=world, device=device, amp_dtype=amp_dtype)

    if n_paired is None:
        n_paired = count_rows(storage.join(data_uri, "train"))[0]
    steps_per_epoch = steps_per_epoch_for(cfg, n_paired, world)
    if steps_per_epoch < 1:
        raise ValueError(
            f"{n_paired} paired train rows are fewer than one global batch "
            f"({cfg.train.batch_size} x {world} workers x {cfg.scaling.cache_steps} cache steps)"
        )
    total_steps = steps_per_epoch * cfg.train.epochs

    # -- resume ---------------------------------------------------------------------------------------------
    state = LoopState()
    with contextlib.ExitStack() as stack:
        rdir = stack.enter_context(backend.resume_dir())
        if rdir is None:
            rdir = ckpt_mod.latest_checkpoint(run_dir)  # rerun with the same name: continue the run
        if rdir is not None and storage.is_remote(rdir):
            # every rank downloads its own copy (ranks may sit on different nodes); deleted after loading
            rdir = (
                stack.enter_context(ckpt_mod.local_checkpoint(rdir))
                if ckpt_mod.is_complete(rdir, need_train_state=False)
                else None
            )
        if rdir is not None and ckpt_mod.is_complete(rdir, need_train_state=False):
            ckpt_mod.load_weights_into(model, rdir)
            ts = ckpt_mod.load_train_state(rdir)
            if ts is not None:
                for name, opt in optimizers.items():
                    if name in ts.get("optimizers", {}):
                        opt.load_state_dict(ts["optimizers"][name])
                saved = ts.get("loop", {})
                state = LoopState(**{k: v for k, v in saved.items() if k in LoopState.__annotations__})
                ckpt_mod.set_rng_state(ts.get("rng"))
            if is_main:
                log.info("resumed from %s at epoch %d step %d", rdir, state.epoch, state.step)
    broadcast_model(model, world)
    if world > 1:
        # dropout / noise streams differ per rank (after the shared init and a possible RNG restore)
        torch.manual_seed(cfg.train.seed * 1000 + rank + 7919 * state.step)

    run = RunFiles(run_dir, is_main)
    writer = MetricsWriter(run.local, is_main)
    try:
        image_tf_train = model.image_transform(True)
        image_tf_eval = model.image_transform(False)
        n_ing = len(ingredient_names)
        data_rng = random.Random(cfg.train.seed * 7919 + rank * 104729 + state.step)  # photo pick + augmentation

        def collate_fn(rows: Rows, train: bool = True, with_images: bool = True) -> dict[str, torch.Tensor] | None:
            try:
                return collate(
                    rows,
                    n_ingredients=n_ing,
                    image_transform=image_tf_train if train else image_tf_eval,
                    image_pick=cfg.train.image_pick if train else "first",
                    rng=data_rng,
                    with_images=with_images,
                )
            except Exception as e:  # a broken row must not kill a multi-day run: skip the batch, count it
                log.warning("collate failed (%s: %s); batch skipped", type(e).__name__, e)
                return None

        main_params = [p for g in optimizers["main"].param_groups for p in g["params"]]
        all_params = [p for opt in optimizers.values() for g in opt.param_groups for p in g["params"]]
        bs, k_steps = cfg.train.batch_size, cfg.scaling.cache_steps
        recipe_bs = bs * cfg.train.recipe_only_batch_mult
        use_recipe_only = cfg.train.recipe_only_every > 0 and cfg.loss.w_recipe_ssl > 0
        summary: dict[str, Any] = {}
        t_log, samples_log = time.perf_counter(), 0
        last_terms: dict[str, float] = {}
        ro_terms: dict[str, float] = {}  # the last recipe-only step's terms (logged with the next paired step)
        bad_batches = 0

        while state.epoch < cfg.train.epochs:
            epoch = state.epoch
            freeze = epoch < cfg.optim.freeze_backbone_epochs
            if hasattr(model, "freeze_backbone"):
                model.freeze_backbone(freeze)
            paired_it = backend.paired_batches(epoch, bs)
            recipe_it = backend.recipe_batches(epoch, recipe_bs) if use_recipe_only else None
            while state.epoch_step < steps_per_epoch:
                # fault injection (tests): rank 0 dies once, at the start of this global step
                if (
                    is_main
                    and cfg.train.fail_at_step >= 0
                    and state.step == cfg.train.fail_at_step
                    and not run.fail_marker_exists()
                ):
                    run.write_fail_marker(f"failed at step {state.step}\n")
                    raise RuntimeError(f"injected failure at step {state.step} (train.fail_at_step)")
                progress = epoch + state.epoch_step / steps_per_epoch
                margin = float(
                    margin_at(cfg.loss, progress if cfg.loss.margin_per_step else float(epoch), state.active_fraction)
                )
                factor = lr_factor(cfg.optim, state.step, steps_per_epoch, total_steps)
                for opt in optimizers.values():
                    set_lr(opt, factor)

                # H-T alternation: a recipe-only batch (SSL only) before every recipe_only_every-th paired step
                if use_recipe_only and state.epoch_step % cfg.train.recipe_only_every == 0:
                    rows = _next_synced(recipe_it, backend)
                    if rows is None:  # recipe-only rows exhausted: start another pass over them
                        recipe_it = backend.recipe_batches(epoch * 1000 + state.epoch_step, recipe_bs)
                        rows = _next_synced(recipe_it, backend)
                    batch = collate_fn(rows, train=True, with_images=False) if rows is not None else None
                    if not any_rank(batch is None, world, device):
                        batch = {k: v.to(device) for k, v in batch.items()}
                        for opt in optimizers.values():
                            opt.zero_grad(set_to_none=True)
                        ro_terms = step_fn.recipe_only_step(batch, margin)
                        _finish_step(optimizers, main_params, all_params, ro_terms, cfg, world, device, state)
                        state.recipe_steps += 1

                mbs_rows = []
                for _ in range(k_steps):
                    rows = _next_synced(paired_it, backend)
                    if rows is None:
                        break
                    mbs_rows.append(rows)
                if len(mbs_rows) < k_steps:
                    if is_main:
                        log.warning(
                            "epoch %d: data ran out after %d of %d steps", epoch, state.epoch_step, steps_per_epoch
                        )
                    break
                mbs = [collate_fn(r, train=True) for r in mbs_rows]
                if any_rank(any(b is None or "image" not in b for b in mbs), world, device):
                    bad_batches += 1
                    state.epoch_step += 1
                    state.step += 1
                    continue
                mbs = [{k: v.to(device) for k, v in b.items()} for b in mbs]
                for opt in optimizers.values():
                    opt.zero_grad(set_to_none=True)
                terms = step_fn.paired_step(mbs, margin)
                ok = _finish_step(optimizers, main_params, all_params, terms, cfg, world, device, state)
                if ok and "active_fraction" in terms:
                    state.active_fraction = float(terms["active_fraction"])
                last_terms = terms
                n_global = bs * k_steps * world
                state.samples_seen += n_global
                samples_log += n_global
                state.step += 1
                state.epoch_step += 1

                if is_main and (state.step % cfg.train.log_every == 0 or state.epoch_step == steps_per_epoch):
                    dt = time.perf_counter() - t_log
                    rec = {
                        "kind": "train",
                        "epoch": epoch,
                        "step": state.step,
                        "progress": round(epoch + state.epoch_step / steps_per_epoch, 4),
                        "samples_per_s": samples_log / max(dt, 1e-9),
                        "lr": cfg.optim.lr * factor,
                        "margin": margin,
                        "skipped_steps": state.skipped_steps,
                        "bad_batches": bad_batches,
                    }
                    rec.update(
                        {f"loss/{k}": float(v) for k, v in {**terms, **ro_terms}.items() if k != "active_fraction"}
                    )
                    rec["active_fraction"] = float(terms.get("active_fraction", float("nan")))
                    writer.write(rec)
                    run.publish_metrics(force=False)
                    log.info(
                        "epoch %d step %d (%d/%d) %.1f samples/s lr %.2e margin %.3f | %s",
                        epoch,
                        state.step,
                        state.epoch_step,
                        steps_per_epoch,
                        rec["samples_per_s"],
                        rec["lr"],
                        margin,
                        " ".join(f"{k} {float(v):.4f}" for k, v in terms.items()),
                    )
                    t_log, samples_log = time.perf_counter(), 0

                if (
                    cfg.train.ckpt_every_steps
                    and state.step % cfg.train.ckpt_every_steps == 0
                    and state.epoch_step < steps_per_epoch
                ):
                    d = _save(model, cfg, vocab_tokens, ingredient_names, optimizers, state, run.local, is_main)
                    if d is not None:
                        run.publish_metrics()
                        run.publish_checkpoint(d, "last")
                    backend.report({"epoch": epoch, "step": state.step, "margin": margin}, d)

            # -- epoch end: validation, checkpoints ------------------------------------------------------------
            state.epoch += 1
            state.epoch_step = 0
            val: dict[str, float] = {}
            if is_main:
                val = validate(model, backend, cfg, collate_fn, amp_dtype)
                r1 = val.get("val/R@1", -1.0)
                improved = r1 > state.best_val_r1
                if improved:
                    state.best_val_r1, state.best_epoch = r1, epoch
                rec = {"kind": "val", "epoch": epoch, "step": state.step, **val, "best_val_R@1": state.best_val_r1}
                writer.write(rec)
                log.info("epoch %d done: %s", epoch, " ".join(f"{k} {v:.4g}" for k, v in val.items()))
            d = _save(model, cfg, vocab_tokens, ingredient_names, optimizers, state, run.local, is_main)
            if d is not None:
                run.publish_epoch()  # before the checkpoints: a crash in between duplicates records, loses none
                run.publish_checkpoint(d, "last")
                if state.best_epoch == epoch:
                    run.publish_checkpoint(d, "best")
            margin_now = float(margin_at(cfg.loss, float(state.epoch), state.active_fraction))
            summary = {
                "epoch": epoch,
                "step": state.step,
                "margin": margin_now,
                "skipped_steps": state.skipped_steps,
                "best_val_R@1": state.best_val_r1,
                **{f"loss/{k}": float(v) for k, v in last_terms.items()},
                **val,
            }
            backend.report(summary, d)
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


def _finish_step(
    optimizers: dict[str, torch.optim.Optimizer],
    main_params,
    all_params,
    terms: dict[str, float],
    cfg: Config,
    world: int,
    device: torch.device,
    state: LoopState,
) -> bool:
    """All-reduce gradients, skip non-finite steps on every rank together, clip, step. True if stepped."""
    all_reduce_grads(all_params, world)
    bad = not all(math.isfinite(float(v)) for v in terms.values())
    if not bad:
        bad = not all(torch.isfinite(p.grad).all() for p in all_params if p.grad is not None)
    if any_rank(bad, world, device):
        state.skipped_steps += 1
        for opt in optimizers.values():
            opt.zero_grad(set_to_none=True)
        log.warning("non-finite loss or gradient at step %d: step skipped (%d so far)", state.step, state.skipped_steps)
        return False
    if cfg.optim.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(main_params, cfg.optim.grad_clip)
    for opt in optimizers.values():
        opt.step()
    return True


def _save(
    model,
    cfg: Config,
    vocab_tokens,
    ingredient_names,
    optimizers,
    state: LoopState,
    run_dir: Path | None,
    is_main: bool,
) -> Path | None:
    """Rank 0: write ``run_dir/checkpoints/last`` (a local folder: the run dir or a remote run's staging)."""
    if not is_main or run_dir is None:
        return None
    ts = {
        "loop": asdict(state),
        "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
        "rng": ckpt_mod.rng_state(),
        "config": cfg.to_dict(),
        "saved_at": time.time(),
    }
    return ckpt_mod.save_checkpoint(run_dir / "checkpoints" / "last", model, cfg, vocab_tokens, ingredient_names, ts)
