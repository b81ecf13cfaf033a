"""The per-worker training loop, plain PyTorch (no Ray import here).

:func:`run_training` is the body every data-parallel worker runs. Everything that differs between a Ray Train
worker and a single process (``tnlbt train --no-ray``) sits behind a small :class:`Backend`: rank and
world size, the device, where batches of Parquet rows come from, where a checkpoint to resume from is, and
how an epoch's metrics and checkpoint are reported. :class:`LocalBackend` (one process, pyarrow reads, a
seeded shuffle per epoch) lives here; the Ray one lives in ``ray_trainer.py``.

One epoch = ``steps_per_epoch`` paired optimiser steps, the same number on every rank (collectives must
match). Each paired step takes ``scaling.cache_steps`` micro-batches of ``train.batch_size`` rows; H-T's
alternation puts one recipe-only step (``batch_size x recipe_only_batch_mult`` rows, recipe SSL only) before
every ``train.recipe_only_every``-th paired step. The global step counts paired steps: it drives the learning
rate, the margin's progress (``epoch + epoch_step / steps_per_epoch``), logging, step checkpoints and the
fault injection.

Remote storage (``data.processed_dir`` / ``train.runs_dir`` as ``s3://...`` etc., see :mod:`tnlbt.storage`): the
Parquet splits and the JSON files are read through pyarrow filesystems; the run directory is handled by
:class:`RunFiles` (rank 0 writes into a local staging folder and publishes whole files to the remote run
directory, because object stores have no appends and no renames).

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
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist

from tnlbt import storage
from tnlbt.config import Config
from tnlbt.train import checkpoint as ckpt_mod
from tnlbt.train.lr import lr_factor, set_lr

log = logging.getLogger(__name__)

Rows = list[dict[str, Any]]

# Columns the training step reads; the raw strings (title, ingredients, instructions, ids) stay on disk.
TRAIN_COLUMNS = [
    "has_image",
    "title_ids",
    "ingredient_ids",
    "instruction_ids",
    "ingredient_labels",
    "images",
]


# -- backend -------------------------------------------------------------------------------------------------
class Backend(Protocol):
    """What the loop needs from its environment (one process, or a Ray Train worker)."""

    rank: int
    world_size: int
    device: torch.device

    def paired_batches(self, epoch: int, batch_size: int) -> Iterator[Rows]: ...

    def recipe_batches(self, epoch: int, batch_size: int) -> Iterator[Rows]: ...

    def val_batches(self, batch_size: int) -> Iterator[Rows]: ...

    def resume_dir(self) -> contextlib.AbstractContextManager[Path | str | None]:
        """A checkpoint to start from: a local folder, a remote URI (downloaded by the loop), or None."""
        ...

    def report(self, metrics: dict[str, Any], ckpt_dir: Path | None) -> None: ...


def split_parquet_files(split_dir: str | Path):
    """``(pyarrow filesystem, sorted paths inside it)`` of the ``*.parquet`` files directly in a split folder.

    ``split_dir`` is a local path or a URI (``s3://bucket/processed/train``). Raises ``FileNotFoundError`` when
    there are none.
    """
    import posixpath

    fs, base = storage.resolve(split_dir)
    files = [posixpath.join(base, n) for n in storage.list_files(split_dir, "*.parquet")]
    if not files:
        raise FileNotFoundError(f"no Parquet files in {split_dir} (run `tnlbt preprocess` first)")
    return fs, files


def read_split_table(split_dir: str | Path, columns: list[str] | None = None):
    """All Parquet parts of a split (local path or URI) as one pyarrow Table (only ``columns`` that exist)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, files = split_parquet_files(split_dir)
    schema_names = pq.read_schema(files[0], filesystem=fs).names
    cols = [c for c in columns if c in schema_names] if columns else None
    return pa.concat_tables([pq.read_table(f, columns=cols, filesystem=fs) for f in files])


def count_rows(split_dir: str | Path) -> tuple[int, int]:
    """(paired rows, recipe-only rows) of a split, reading only the ``has_image`` column."""
    t = read_split_table(split_dir, ["has_image"])
    has = t.column("has_image").to_numpy(zero_copy_only=False).astype(bool)
    return int(has.sum()), int((~has).sum())


class LocalBackend:
    """One process: rows read with pyarrow, reshuffled every epoch with a seeded generator."""

    def __init__(
        self, data_dir: str | Path, seed: int, resume: str | Path | None = None, device: torch.device | None = None
    ) -> None:
        import pyarrow.compute as pc

        self.rank, self.world_size = 0, 1
        self.device = device or torch.device("cpu")
        self.seed = seed
        # a remote URI stays a string (Path would fold "s3://" into "s3:/"); the loop downloads it
        self._resume: Path | str | None = (
            (os.fspath(resume) if storage.is_remote(resume) else Path(resume)) if resume else None
        )
        table = read_split_table(storage.join(os.fspath(data_dir), "train"), TRAIN_COLUMNS)
        self._paired = table.filter(pc.field("has_image"))
        self._recipe = table.filter(~pc.field("has_image"))
        self._val_dir: str | Path = storage.join(os.fspath(data_dir), "val")
        self._val = None

    def _batches(self, table, epoch: int, batch_size: int, salt: int) -> Iterator[Rows]:
        n = table.num_rows
        order = np.random.default_rng([self.seed, epoch, salt]).permutation(n)
        for i in range(0, n - batch_size + 1, batch_size):  # drop_last: every step sees a full batch
            yield table.take(order[i : i + batch_size]).to_pylist()

    def paired_batches(self, epoch: int, batch_size: int) -> Iterator[Rows]:
        return self._batches(self._paired, epoch, batch_size, 0)

    def recipe_batches(self, epoch: int, batch_size: int) -> Iterator[Rows]:
        return self._batches(self._recipe, epoch, batch_size, 1)

    def val_batches(self, batch_size: int) -> Iterator[Rows]:
        import pyarrow.compute as pc

        if self._val is None:
            self._val = read_split_table(self._val_dir, TRAIN_COLUMNS).filter(pc.field("has_image"))
        for i in range(0, self._val.num_rows, batch_size):
            yield self._val.slice(i, batch_size).to_pylist()

    @contextlib.contextmanager
    def resume_dir(self) -> Iterator[Path | str | None]:
        yield self._resume

    def report(self, metrics: dict[str, Any], ckpt_dir: Path | None) -> None:
        pass


# -- loop state, logging -------------------------------------------------------------------------------------
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


class MetricsWriter:
    """Rank-0 sink: ``metrics.jsonl`` (append) and TensorBoard events under ``RUN/tb``.

    ``run_dir`` is a local folder (a remote run's staging folder, see :class:`RunFiles`); None when disabled.
    """

    def __init__(self, run_dir: Path | None, enabled: bool) -> None:
        self.enabled = enabled and run_dir is not None
        self._tb = None
        self._path = run_dir / "metrics.jsonl" if run_dir is not None else None
        if self.enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(run_dir / "tb"))
            except Exception as e:  # tensorboard missing or broken: JSONL still works
                log.warning("TensorBoard disabled: %s", e)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self._path.open("a") as f:
            f.write(json.dumps(record, default=float) + "\n")
        if self._tb is not None:
            step = int(record.get("step", 0))
            for k, v in record.items():
                if k in ("kind", "step", "epoch") or not isinstance(v, int | float) or isinstance(v, bool):
                    continue
                tag = k if "/" in k else f"{record.get('kind', 'train')}/{k}"
                self._tb.add_scalar(tag, float(v), step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


# -- the run directory ---------------------------------------------------------------------------------------
class RunFiles:
    """The run directory ``{runs_dir}/{run_name}`` as the loop writes it (a local path or a remote URI).

    Local run directory: ``local`` *is* the run directory and every ``publish_*`` method is a no-op, so a
    local run writes exactly what it always did (``metrics.jsonl`` appended line by line, checkpoints renamed
    into place, ``best`` copied from ``last``).

    Remote run directory (rank 0): the loop writes into ``local``, a staging folder under
    ``storage.cache_dir()/staging`` (else the system temp dir), created fresh for every process and deleted by
    :meth:`close`, and publishes from there. Why a staging folder: object stores have no append (the JSONL log,
    TensorBoard's event files), no rename (the checkpoint swap), and ``safetensors``/``torch.save`` want local
    files. What is published, and when:

    * ``metrics.jsonl``: the whole file is rewritten (no appends on S3) at every epoch end and step
      checkpoint, on :meth:`close` (also after a crash, so the records of lost steps are kept as they are
      locally), and at most every ``publish_every_s`` seconds after a log line (a live view without rewriting
      a growing file on every step). The staging copy starts from the remote one, so a resumed run -- a rerun
      with the same name, or a Ray worker group restarted on another node -- keeps its history.
    * ``tb/`` (whole event files) and ``curves.png`` (rendered by :func:`tnlbt.train.plots.plot_run`) at every
      epoch end: with nothing on local disk to point ``tnlbt plot`` or TensorBoard at, the bucket itself shows
      the curves. Local runs do not render the PNG (``tnlbt plot RUN`` reads the live ``metrics.jsonl``).
    * checkpoints with :func:`tnlbt.train.checkpoint.upload_checkpoint` (``train_state.pt`` last). Metrics are
      published *before* a checkpoint, so a crash in between leaves duplicated records after the resume
      (as locally), never a checkpoint whose epoch is missing from the log.

    Other ranks of a remote run write nothing (``local`` is None).
    """

    METRICS = "metrics.jsonl"

    def __init__(self, uri: str | Path, is_main: bool, publish_every_s: float = 60.0) -> None:
        self.uri = os.fspath(uri)
        self.remote = storage.is_remote(self.uri)
        self.is_main = is_main
        self.publish_every_s = publish_every_s
        self._tmp: str | None = None
        self._last_publish = time.monotonic()
        self.local: Path | None
        if not self.remote:
            self.local = Path(uri) if storage.scheme(self.uri) == "" else Path(storage.local_path(self.uri) or uri)
        elif is_main:
            self._tmp = tempfile.mkdtemp(prefix="tnlbt-run-", dir=ckpt_mod.staging_root())
            self.local = Path(self._tmp)
            src = storage.join(self.uri, self.METRICS)
            if storage.exists(src):
                (self.local / self.METRICS).write_bytes(storage.read_bytes(src))
        else:
            self.local = None

    def join(self, *parts: str) -> str:
        return storage.join(self.uri, *parts)

    # fault injection marker (tests): on the run directory itself, so a restarted process sees it
    def fail_marker_exists(self) -> bool:
        if not self.remote:
            return (self.local / ".fail_injected").exists()
        return storage.exists(self.join(".fail_injected"))

    def write_fail_marker(self, text: str) -> None:
        if not self.remote:
            marker = self.local / ".fail_injected"
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(text)
        else:
            storage.write_text(self.join(".fail_injected"), text)

    def publish_metrics(self, force: bool = True) -> None:
        """Rewrite the remote ``metrics.jsonl`` from the staging copy (remote rank 0 only)."""
        if not (self.remote and self.is_main):
            return
        if not force and time.monotonic() - self._last_publish < self.publish_every_s:
            return
        path = self.local / self.METRICS
        if path.exists():
            storage.write_bytes(self.join(self.METRICS), path.read_bytes())
        self._last_publish = time.monotonic()

    def publish_epoch(self) -> None:
        """Epoch end: ``metrics.jsonl``, ``tb/`` and a fresh ``curves.png`` (remote rank 0 only)."""
        if not (self.remote and self.is_main):
            return
        self.publish_metrics()
        tb = self.local / "tb"
        if tb.is_dir() and any(tb.iterdir()):
            storage.upload_dir(tb, self.join("tb"))
        try:
            from tnlbt.train.plots import plot_run

            png = plot_run(self.local)
            storage.write_bytes(self.join(png.name), png.read_bytes())
        except Exception as e:  # a plot must never stop a training run
            log.warning("curves.png not published: %s: %s", type(e).__name__, e)

    def publish_checkpoint(self, local_ckpt: Path, name: str) -> None:
        """``checkpoints/{name}`` from a local checkpoint folder. Local runs: ``best`` is copied from ``last``
        (temp folder + rename, as before); ``last`` is already in place."""
        if not self.remote:
            dst = self.local / "checkpoints" / name
            if Path(local_ckpt).resolve() != dst.resolve():
                ckpt_mod.copy_checkpoint(local_ckpt, dst)
            return
        if self.is_main:
            ckpt_mod.upload_checkpoint(local_ckpt, self.join("checkpoints", name))

    def close(self) -> None:
        """Publish ``metrics.jsonl`` one last time and delete the staging folder.

        Best effort: it also runs while an exception propagates (a crash), which a failed upload must not mask.
        """
        try:
            self.publish_metrics()
        except Exception as e:
            log.warning("metrics.jsonl not published to %s: %s: %s", self.uri, type(e).__name__, e)
        finally:
            if self._tmp is not None:
                shutil.rmtree(self._tmp, ignore_errors=True)
                self._tmp = None


# -- collectives helpers -------------------------------------------------------------------------------------
def _dist_on(world_size: int) -> bool:
    return world_size > 1 and dist.is_available() and dist.is_initialized()


def all_reduce_grads(params: list[torch.nn.Parameter], world_size: int) -> None:
    """Average ``.grad`` over ranks with one flat all-reduce (one message instead of one per tensor)."""
    if not _dist_on(world_size):
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n


def any_rank(flag: bool, world_size: int, device: torch.device) -> bool:
    """True if ``flag`` is true on any rank (every rank gets the same answer, so they branch together)."""
    if not _dist_on(world_size):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def broadcast_model(model: torch.nn.Module, world_size: int) -> None:
    """Rank 0's parameters and buffers everywhere: all replicas start identical whatever their seeds."""
    if not _dist_on(world_size):
        return
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=0)


# -- precision -----------------------------------------------------------------------------------------------
def cpu_has_bf16() -> bool:
    """True when the CPU advertises bf16 matrix/vector units (AVX512-BF16 or AMX-BF16) in /proc/cpuinfo."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for the forward passes, or None for fp32.

    ``auto``: bf16 on CUDA devices that support it; on CPU bf16 when the CPU has bf16 units, else fp32.
    Measured here (bench/results/train.json, section ``flops``): a demo_cpu training step runs 3.2x faster
    under bf16 autocast than in fp32 on these cores (2048^3 GEMM: 3.4x), so ``auto`` takes bf16 on such
    CPUs. Parameters, optimiser state and the losses stay fp32 (autocast only lowers matmuls/convs), so no
    loss scaling is needed. ``fp32`` / ``bf16`` force the choice (tests use fp32 for exact comparisons).
    """
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp32":
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_has_bf16() else None


# -- validation ----------------------------------------------------------------------------------------------
@torch.no_grad()
def embed_rows(
    model,
    batches: Iterator[Rows],
    collate_fn,
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
            with _autocast(device, amp_dtype):
                imgs.append(model.encode_image(batch["image"], normalize=True).float().cpu())
                recs.append(model.encode_recipe(batch, normalize=True).float().cpu())
            n += len(rows)
    finally:
        model.train(was)
    if not imgs:
        return np.zeros((0, 1), np.float32), np.zeros((0, 1), np.float32)
    return torch.cat(imgs).numpy(), torch.cat(recs).numpy()


def validate(model, backend: Backend, cfg: Config, collate_fn, amp_dtype) -> dict[str, float]:
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


# -- the loop ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        yield
    else:
        with torch.autocast(device.type, dtype=dtype):
            yield


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

    ``data_dir`` and ``run_dir`` are local paths or URIs (:mod:`tnlbt.storage`); see :class:`RunFiles` for what a
    remote run directory gets. ``n_paired`` is the number of paired train rows (to size epochs identically on
    every rank); counted from the Parquet files when not given.
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
