"""``tnlbt train``: Ray Train V2 ``TorchTrainer`` launcher around the plain loop in :mod:`tnlbt.train.loop`.

* Data, small splits (``train.data_path``, auto: train + val Parquet up to ``train.in_memory_max_mb``): each
  worker reads the split once into memory and deals itself rows from one seeded permutation per epoch
  (:class:`tnlbt.train.backend.SeededRows`; the same order as ``--no-ray`` for one worker). Measured on the
  demo (issue 10 §3): with Ray Data every epoch began with an 8-10 s wait for the streaming executor, val was
  re-read each epoch (9.3 s) and the read tasks took the training cores; a whole demo epoch took ~95 s
  against ~36 s for the same rows in one process.
* Data, big splits (``ray_data``): the preprocess output is read as Ray Data datasets. ``train`` (paired
  rows) and ``train_recipe`` (recipe-only rows) are split across workers
  (``DataConfig(datasets_to_split=[...])``, which uses
  ``streaming_split(equal=True)`` so every worker gets the same number of rows and the ranks stay in step);
  val is no Ray dataset: rank 0 reads its Parquet parts a row group at a time. Reshuffling each epoch is the
  cheap kind:
  ``randomize_block_order()``
  (no seed: a new block order on every execution, i.e. every epoch) plus a local shuffle buffer of
  ``train.shuffle_buffer`` rows in each worker's iterator. A full ``random_shuffle`` would move every JPEG
  through the object store each epoch.
* Rows reach the worker as Arrow batches (``iter_batches(batch_format="pyarrow")`` -> ``to_pylist()``), never
  through ``iter_torch_batches`` (token lists and JPEG bytes are not tensors). JPEG decoding and augmentation
  happen in the worker's collate. Measured (bench/results/train.json, ``decode`` (loaded) and ``step``): decode +
  random crop/flip costs 0.4-0.65 ms per 64 px image on one core, against ~8 ms of training compute per sample
  on two threads (a 96-row paired step), while a decoded float32 image is 15.6x the bytes of its JPEG. A Ray
  Data ``map_batches`` decode stage would push 15x more bytes through the object store, and on a small box it
  competes for the same cores, to save ~5% of the step.
* Resources: on a small CPU box two workers that each hold a whole CPU leave Ray Data none and the feed hangs
  (stack-notes §1). A local ``ray.init`` therefore gets ``scaling.ray_num_cpus`` logical CPUs (default
  ``max(4, 2 x workers)``) and workers ask for ``scaling.cpus_per_worker`` (fractional is fine).
* Fault tolerance and resume (V2 semantics): ``FailureConfig(max_failures=train.max_failures)`` replaces a
dead
  worker group, which resumes from the last reported checkpoint (``ray.train.get_checkpoint()``); rerunning
  with the same ``RunConfig(name, storage_path)`` (same ``--name``) continues a finished or crashed run.
  ``storage_path`` is the absolute ``train.runs_dir`` and ``name`` the run name, so Ray's experiment folder
  *is* our run directory ``{runs_dir}/{run_name}``.
* Remote storage: ``data.processed_dir`` and ``train.runs_dir`` may be URIs (``s3://bucket/prefix``; see
  :mod:`tnlbt.storage`). Ray Data reads the Parquet parts with the filesystem :func:`tnlbt.storage.ray_storage`
  picks (Ray resolves ``s3://``/``gs://`` itself on each node; other schemes travel as a pickled filesystem),
  and ``RunConfig(storage_path=, storage_filesystem=)`` comes from the same function, so Ray's experiment
  folder is still ``{runs_dir}/{run_name}``. Rank 0 stages and publishes the run's own files
  (:class:`tnlbt.train.run_files.RunFiles`). ``TNLBT_STORAGE_ROUTES`` (an object store on disk standing in for
  S3 in tests) is forwarded to the workers' environment, because a Ray cluster started before it was set
  would not route the scheme otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from tnlbt import storage
from tnlbt.config import Config
from tnlbt.data.schema import MODEL_COLUMNS
from tnlbt.train.backend import LocalBackend, Rows, SeededRows, count_rows, split_parquet_files
from tnlbt.train.loop import run_training

log = logging.getLogger(__name__)


# -- worker side ---------------------------------------------------------------------------------------------
class RayBackend:
    """The loop's view of a Ray Train worker: rank, device, dataset shards, checkpoints, report."""

    def __init__(self, shuffle_buffer: int, resume: str | None, data_dir: str, seed: int,
                 in_memory: bool = False) -> None:
        """``in_memory``: train rows from :class:`SeededRows` instead of Ray Data shards. Val (rank 0 only) is
        read straight from its Parquet parts either way, a row group at a time: a Ray Data execution for it
        cost a streaming-executor start every epoch, and on a small box its read tasks waited for CPUs the
        train splits' executors held (a test's epoch-end validation stalled for minutes)."""
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self._shuffle = shuffle_buffer or None
        self._resume = resume
        self._val_dir = storage.join(data_dir, "val")
        if in_memory:
            rows = SeededRows(data_dir, seed, self.rank, self.world_size)
            self.paired_batches, self.recipe_batches, self.val_batches = (
                rows.paired_batches, rows.recipe_batches, rows.val_batches)
            return
        self._paired = ray.train.get_dataset_shard("train")
        try:
            self._recipe = ray.train.get_dataset_shard("train_recipe")
        except (KeyError, ValueError):
            self._recipe = None

    @staticmethod
    def _rows(it, batch_size: int, shuffle: int | None) -> Iterator[Rows]:
        for table in it.iter_batches(
            batch_size=batch_size,
            batch_format="pyarrow",
            drop_last=True,
            local_shuffle_buffer_size=shuffle,
            local_shuffle_seed=None,  # unseeded, like the block order: a new shuffle on every pass
            prefetch_batches=1,
        ):
            yield table.to_pylist()

    # ``epoch`` (the Backend protocol's; LocalBackend seeds its shuffle with it) is unused here: Ray Data
    # reshuffles on every pass over a shard by itself
    def paired_batches(self, epoch: int, batch_size: int) -> Iterator[Rows]:
        return self._rows(self._paired, batch_size, self._shuffle)

    def recipe_batches(self, epoch: int, batch_size: int) -> Iterator[Rows]:
        if self._recipe is None:
            return iter(())
        return self._rows(self._recipe, batch_size, self._shuffle)

    def val_batches(self, batch_size: int) -> Iterator[Rows]:
        from tnlbt.data.dataset import paired_row_batches

        return paired_row_batches(self._val_dir, batch_size, MODEL_COLUMNS)

    @contextlib.contextmanager
    def resume_dir(self) -> Iterator[Path | str | None]:
        import ray.train

        ck = ray.train.get_checkpoint()  # set after a worker restart or a rerun with the same name
        if ck is not None:
            with ck.as_directory() as d:  # a remote storage_path: Ray downloads it here
                yield Path(d)
            return
        if not self._resume:
            yield None
        else:  # an explicit --resume URI stays a string; the loop downloads it
            yield self._resume if storage.is_remote(self._resume) else Path(self._resume)

    def report(self, metrics: dict[str, Any], ckpt_dir: Path | None) -> None:
        import ray.train

        clean = {k: v for k, v in metrics.items() if isinstance(v, int | float | str | bool)}
        ck = ray.train.Checkpoint.from_directory(str(ckpt_dir)) if ckpt_dir is not None else None
        ray.train.report(clean, checkpoint=ck)  # a barrier: every rank calls it the same number of times


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Entry point of each Ray Train worker (config crosses as plain dicts, rebuilt at once)."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    cfg = Config.from_dict(config["cfg"])
    torch.set_num_threads(max(1, int(config.get("torch_threads", 1))))
    backend = RayBackend(cfg.train.shuffle_buffer, config.get("resume"), config["data_dir"], cfg.train.seed,
                         bool(config.get("in_memory")))
    return run_training(cfg, backend, config["data_dir"], config["run_dir"], n_paired=config["n_paired"])


# -- driver side ---------------------------------------------------------------------------------------------
def run_dir_for(cfg: Config) -> Path | str:
    """``{runs_dir}/{run_name}``: an absolute local Path, or a URI string for a remote ``train.runs_dir``."""
    if storage.is_remote(cfg.train.runs_dir):
        return storage.join(cfg.train.runs_dir.rstrip("/"), cfg.train.run_name)
    if storage.scheme(cfg.train.runs_dir):  # file:// URI
        return Path(storage.local_path(cfg.train.runs_dir) or cfg.train.runs_dir, cfg.train.run_name).resolve()
    return (Path(cfg.train.runs_dir).expanduser() / cfg.train.run_name).resolve()


def _norm_data_dir(data_dir: str | Path) -> Path | str:
    """An absolute local Path (as before), or the URI of a remote processed folder."""
    if storage.is_remote(data_dir):
        return os.fspath(data_dir).rstrip("/")
    return Path(storage.local_path(data_dir) or data_dir).resolve()


def _write_config(cfg: Config, run_dir: Path | str) -> None:
    if isinstance(run_dir, Path):
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.to_json(run_dir / "config.json")
    else:
        storage.write_text(storage.join(run_dir, "config.json"), cfg.to_json() + "\n")


def build_datasets(data_dir: Path | str, shuffle_blocks: bool = True) -> dict[str, Any]:
    """Ray Data datasets: ``train`` (paired), ``train_recipe`` (recipe-only); val is read by rank 0 directly.

    ``data_dir`` may be a URI: the part files are listed here and handed to ``read_parquet`` as
    :func:`tnlbt.storage.ray_storage` says (URIs Ray resolves on each node, else paths plus a filesystem).
    """
    import pyarrow.compute as pc
    import ray.data

    def paired(t):
        return t.filter(pc.field("has_image"))

    def recipe_only(t):
        return t.filter(~pc.field("has_image"))

    def read(split: str):
        import pyarrow.parquet as pq

        split_uri = storage.join(os.fspath(data_dir), split)
        fs, inner = split_parquet_files(split_uri)
        names = pq.read_schema(inner[0], filesystem=fs).names
        columns = [c for c in MODEL_COLUMNS if c in names]  # the raw strings stay on disk
        if not storage.is_remote(split_uri):
            return ray.data.read_parquet(inner, columns=columns)
        # file URIs in listing order; ray_storage says whether Ray resolves them or needs the filesystem
        pairs = [storage.ray_storage(storage.join(split_uri, p.rsplit("/", 1)[-1])) for p in inner]
        return ray.data.read_parquet([p for p, _ in pairs], columns=columns, filesystem=pairs[0][1])

    train = read("train")
    if shuffle_blocks:
        train = train.randomize_block_order()
    return {
        "train": train.map_batches(paired, batch_format="pyarrow", batch_size=None),
        "train_recipe": train.map_batches(recipe_only, batch_format="pyarrow", batch_size=None),
    }


def _ensure_ray(cfg: Config) -> None:
    import ray

    from tnlbt.ray_init import ensure_ray

    if ray.is_initialized() or os.environ.get("RAY_ADDRESS"):
        ensure_ray(log_to_driver=True)  # an existing cluster decides its own resources
        return
    ensure_ray(cfg.scaling.ray_num_cpus or max(4, 2 * cfg.scaling.num_workers), log_to_driver=True)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False


def use_in_memory(cfg: Config, data_dir: str | Path) -> bool:
    """``train.data_path``: auto = in memory when the train + val Parquet parts are at most ``in_memory_max_mb``."""
    if cfg.train.data_path != "auto":
        return cfg.train.data_path == "in_memory"
    total = 0
    for split in ("train", "val"):
        fs, files = split_parquet_files(storage.join(os.fspath(data_dir), split))
        total += sum(info.size for info in fs.get_file_info(files))
    return total <= cfg.train.in_memory_max_mb * 2**20


def fit(cfg: Config, data_dir: str | Path, resume: str | None = None) -> dict[str, Any]:
    """Run ``TorchTrainer.fit()`` and return the rank-0 summary (``Result.return_value`` or last metrics)."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    data_dir = _norm_data_dir(data_dir)
    run_dir = run_dir_for(cfg)
    _write_config(cfg, run_dir)
    n_paired, n_recipe = count_rows(storage.join(os.fspath(data_dir), "train"))
    in_memory = use_in_memory(cfg, data_dir)
    _ensure_ray(cfg)
    sc = cfg.scaling
    resources = {"CPU": sc.cpus_per_worker}
    if sc.use_gpu:
        resources["GPU"] = sc.gpus_per_worker
    threads = max(1, round(sc.cpus_per_worker))  # intra-op threads per worker: its CPU share
    if isinstance(run_dir, Path):
        storage_path, storage_fs = str(run_dir.parent), None
    else:
        storage_path, storage_fs = storage.ray_storage(cfg.train.runs_dir.rstrip("/"))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": cfg.to_dict(),
            "data_dir": str(data_dir),
            "run_dir": str(run_dir),
            "resume": _norm_resume(resume),
            "n_paired": n_paired,
            "torch_threads": threads,
            "in_memory": in_memory,
        },
        scaling_config=ScalingConfig(num_workers=sc.num_workers, use_gpu=sc.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=cfg.train.run_name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            worker_runtime_env=storage.ray_runtime_env() or None,  # the routes, for a Ray started earlier
        ),
        **({} if in_memory else {"datasets": build_datasets(data_dir),
                                 "dataset_config": DataConfig(datasets_to_split=["train", "train_recipe"])}),
    )
    log.info(
        "training %s: %d paired + %d recipe-only train rows, %d workers, global batch %d, rows %s",
        run_dir,
        n_paired,
        n_recipe,
        sc.num_workers,
        cfg.train.batch_size * sc.num_workers * sc.cache_steps,
        "in each worker's memory (train.data_path)" if in_memory else "streamed by Ray Data",
    )
    result = trainer.fit()
    out = result.return_value if getattr(result, "return_value", None) else (result.metrics or {})
    return dict(out or {})


def _norm_resume(resume: str | Path | None) -> str | None:
    if not resume:
        return None
    if storage.is_remote(resume):
        return os.fspath(resume).rstrip("/")
    return str(Path(storage.local_path(resume) or resume).resolve())


def fit_local(cfg: Config, data_dir: str | Path, resume: str | None = None) -> dict[str, Any]:
    """The same loop in this process, without Ray (one worker)."""
    data_dir = _norm_data_dir(data_dir)
    run_dir = run_dir_for(cfg)
    _write_config(cfg, run_dir)
    device = torch.device("cuda" if (cfg.scaling.use_gpu and torch.cuda.is_available()) else "cpu")
    backend = LocalBackend(data_dir, cfg.train.seed, _norm_resume(resume), device)
    return run_training(cfg, backend, data_dir, run_dir)


def cli_train(args: argparse.Namespace) -> int:
    overrides = list(args.overrides or [])
    if args.name:
        overrides.append(f"train.run_name={args.name}")
    if args.data:
        overrides.append(f"data.processed_dir={args.data}")
    cfg = Config.load(args.config, overrides)
    data_dir = cfg.data.processed_dir
    if not storage.isdir(storage.join(data_dir, "train")):
        raise FileNotFoundError(f"{data_dir}/train not found: run `tnlbt preprocess --out {data_dir}` first")
    if args.resume and not storage.isdir(args.resume):
        raise FileNotFoundError(f"--resume {args.resume}: no such checkpoint directory")
    summary = fit_local(cfg, data_dir, args.resume) if args.no_ray else fit(cfg, data_dir, args.resume)
    keys = ("final_epoch", "final_step", "best_val_R@1", "val/R@1", "val/medR", "skipped_steps")
    print(" ".join(f"{k}={summary[k]}" for k in keys if k in summary))
    print(f"run directory: {run_dir_for(cfg)}")
    return 0
