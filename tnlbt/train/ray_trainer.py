"""``tnlbt train``: Ray Train V2 ``TorchTrainer`` launcher around the plain loop in :mod:`tnlbt.train.loop`.

* Data: the preprocess output is read as Ray Data datasets. ``train`` (paired rows) and ``train_recipe``
  (recipe-only rows) are split across workers (``DataConfig(datasets_to_split=[...])``, which uses
  ``streaming_split(equal=True)`` so every worker gets the same number of rows and the ranks stay in step);
  ``val`` is not split (rank 0 embeds it). Reshuffling each epoch is the cheap kind:
  ``randomize_block_order()``
  (no seed: a new block order on every execution, i.e. every epoch) plus a local shuffle buffer of
  ``train.shuffle_buffer`` rows in each worker's iterator. A full ``random_shuffle`` would move every JPEG
  through the object store each epoch.
* Rows reach the worker as Arrow batches (``iter_batches(batch_format="pyarrow")`` -> ``to_pylist()``), never
  through ``iter_torch_batches`` (token lists and JPEG bytes are not tensors). JPEG decoding and augmentation
  happen in the worker's collate. Measured (bench/results/train.json, ``decode`` and ``flops``): decode +
  random crop/flip costs 0.4-0.65 ms per 64 px image on one core, against ~50 ms of training compute per
  sample, while a decoded float32 image is 15.6x the bytes of its JPEG. A Ray Data ``map_batches`` decode
  stage would push 15x more bytes through the object store, and on a small box it competes for the same
  cores, to save ~1% of the step.
* Resources: on a small CPU box two workers that each hold a whole CPU leave Ray Data none and the feed hangs
  (stack-notes §1). A local ``ray.init`` therefore gets ``scaling.ray_num_cpus`` logical CPUs (default
  ``max(4, 2 x workers)``) and workers ask for ``scaling.cpus_per_worker`` (fractional is fine).
* Fault tolerance and resume (V2 semantics): ``FailureConfig(max_failures=train.max_failures)`` replaces a
dead
  worker group, which resumes from the last reported checkpoint (``ray.train.get_checkpoint()``); rerunning
  with the same ``RunConfig(name, storage_path)`` (same ``--name``) continues a finished or crashed run.
  ``storage_path`` is the absolute ``train.runs_dir`` and ``name`` the run name, so Ray's experiment folder
  *is* our run directory ``{runs_dir}/{run_name}``.
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

from tnlbt.config import Config
from tnlbt.train.loop import TRAIN_COLUMNS, LocalBackend, Rows, count_rows, run_training

log = logging.getLogger(__name__)


# -- worker side ---------------------------------------------------------------------------------------------
class RayBackend:
    """The loop's view of a Ray Train worker: rank, device, dataset shards, checkpoints, report."""

    def __init__(self, shuffle_buffer: int, resume: str | None, seed: int) -> None:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self._shuffle = shuffle_buffer or None
        self._resume = resume
        self._seed = seed
        self._paired = ray.train.get_dataset_shard("train")
        try:
            self._recipe = ray.train.get_dataset_shard("train_recipe")
        except (KeyError, ValueError):
            self._recipe = None
        self._val = ray.train.get_dataset_shard("val")

    @staticmethod
    def _rows(it, batch_size: int, shuffle: int | None, seed: int | None) -> Iterator[Rows]:
        for table in it.iter_batches(batch_size=batch_size, batch_format="pyarrow", drop_last=True,
                                     local_shuffle_buffer_size=shuffle, local_shuffle_seed=seed,
                                     prefetch_batches=1):
            yield table.to_pylist()

    def paired_batches(self, epoch: int, batch_size: int) -> Iterator[Rows]:
        return self._rows(self._paired, batch_size, self._shuffle, None)

    def recipe_batches(self, epoch: int, batch_size: int) -> Iterator[Rows]:
        if self._recipe is None:
            return iter(())
        return self._rows(self._recipe, batch_size, self._shuffle, None)

    def val_batches(self, batch_size: int) -> Iterator[Rows]:
        for table in self._val.iter_batches(batch_size=batch_size, batch_format="pyarrow",
                                            prefetch_batches=1):
            yield table.to_pylist()

    @contextlib.contextmanager
    def resume_dir(self) -> Iterator[Path | None]:
        import ray.train

        ck = ray.train.get_checkpoint()  # set after a worker restart or a rerun with the same name
        if ck is not None:
            with ck.as_directory() as d:
                yield Path(d)
            return
        yield Path(self._resume) if self._resume else None

    def report(self, metrics: dict[str, Any], ckpt_dir: Path | None) -> None:
        import ray.train

        clean = {k: v for k, v in metrics.items() if isinstance(v, int | float | str | bool)}
        ck = ray.train.Checkpoint.from_directory(str(ckpt_dir)) if ckpt_dir is not None else None
        ray.train.report(clean, checkpoint=ck)  # a barrier: every rank calls it the same number of times


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Entry point of each Ray Train worker (config crosses as plain dicts, rebuilt at once)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    cfg = Config.from_dict(config["cfg"])
    torch.set_num_threads(max(1, int(config.get("torch_threads", 1))))
    backend = RayBackend(cfg.train.shuffle_buffer, config.get("resume"), cfg.train.seed)
    return run_training(cfg, backend, config["data_dir"], config["run_dir"], n_paired=config["n_paired"])


# -- driver side ---------------------------------------------------------------------------------------------
def run_dir_for(cfg: Config) -> Path:
    return (Path(cfg.train.runs_dir).expanduser() / cfg.train.run_name).resolve()


def build_datasets(data_dir: Path, shuffle_blocks: bool = True) -> dict[str, Any]:
    """Ray Data datasets: ``train`` (paired), ``train_recipe`` (recipe-only), ``val`` (paired)."""
    import pyarrow.compute as pc
    import ray.data

    def paired(t):
        return t.filter(pc.field("has_image"))

    def recipe_only(t):
        return t.filter(~pc.field("has_image"))

    def read(split: str):
        files = sorted(str(p) for p in (data_dir / split).glob("*.parquet"))
        if not files:
            raise FileNotFoundError(f"no Parquet files in {data_dir / split} (run `tnlbt preprocess` first)")
        import pyarrow.parquet as pq

        names = pq.read_schema(files[0]).names
        return ray.data.read_parquet(files, columns=[c for c in TRAIN_COLUMNS if c in names])

    train = read("train")
    if shuffle_blocks:
        train = train.randomize_block_order()
    return {
        "train": train.map_batches(paired, batch_format="pyarrow", batch_size=None),
        "train_recipe": train.map_batches(recipe_only, batch_format="pyarrow", batch_size=None),
        "val": read("val").map_batches(paired, batch_format="pyarrow", batch_size=None),
    }


def _ensure_ray(cfg: Config) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])  # an existing cluster decides its own resources
        return
    n = cfg.scaling.ray_num_cpus or max(4, 2 * cfg.scaling.num_workers)
    ray.init(num_cpus=n, include_dashboard=False, log_to_driver=True)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False


def fit(cfg: Config, data_dir: str | Path, resume: str | None = None) -> dict[str, Any]:
    """Run ``TorchTrainer.fit()`` and return the rank-0 summary (``Result.return_value`` or last metrics)."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    data_dir = Path(data_dir).resolve()
    run_dir = run_dir_for(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.to_json(run_dir / "config.json")
    n_paired, n_recipe = count_rows(data_dir / "train")
    _ensure_ray(cfg)
    sc = cfg.scaling
    resources = {"CPU": sc.cpus_per_worker}
    if sc.use_gpu:
        resources["GPU"] = sc.gpus_per_worker
    threads = max(1, round(sc.cpus_per_worker))  # intra-op threads per worker: its CPU share
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "data_dir": str(data_dir), "run_dir": str(run_dir),
                           "resume": str(Path(resume).resolve()) if resume else None, "n_paired": n_paired,
                           "torch_threads": threads},
        scaling_config=ScalingConfig(num_workers=sc.num_workers, use_gpu=sc.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=cfg.train.run_name,
            storage_path=str(run_dir.parent),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
        ),
        datasets=build_datasets(data_dir),
        dataset_config=DataConfig(datasets_to_split=["train", "train_recipe"]),
    )
    log.info("training %s: %d paired + %d recipe-only train rows, %d workers, global batch %d", run_dir,
             n_paired, n_recipe, sc.num_workers, cfg.train.batch_size * sc.num_workers * sc.cache_steps)
    result = trainer.fit()
    out = result.return_value if getattr(result, "return_value", None) else (result.metrics or {})
    return dict(out or {})


def fit_local(cfg: Config, data_dir: str | Path, resume: str | None = None) -> dict[str, Any]:
    """The same loop in this process, without Ray (one worker)."""
    data_dir = Path(data_dir).resolve()
    run_dir = run_dir_for(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.to_json(run_dir / "config.json")
    device = torch.device("cuda" if (cfg.scaling.use_gpu and torch.cuda.is_available()) else "cpu")
    backend = LocalBackend(data_dir, cfg.train.seed, resume, device)
    return run_training(cfg, backend, data_dir, run_dir)


def cli_train(args: argparse.Namespace) -> int:
    overrides = list(args.overrides or [])
    if args.name:
        overrides.append(f"train.run_name={args.name}")
    if args.data:
        overrides.append(f"data.processed_dir={args.data}")
    cfg = Config.load(args.config, overrides)
    data_dir = Path(cfg.data.processed_dir)
    if not (data_dir / "train").is_dir():
        raise FileNotFoundError(f"{data_dir}/train not found: run `tnlbt preprocess --out {data_dir}` first")
    if args.resume and not Path(args.resume).is_dir():
        raise FileNotFoundError(f"--resume {args.resume}: no such checkpoint directory")
    summary = fit_local(cfg, data_dir, args.resume) if args.no_ray else fit(cfg, data_dir, args.resume)
    keys = ("final_epoch", "final_step", "best_val_R@1", "val/R@1", "val/medR", "skipped_steps")
    print(" ".join(f"{k}={summary[k]}" for k in keys if k in summary))
    print(f"run directory: {run_dir_for(cfg)}")
    return 0
