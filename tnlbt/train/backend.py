"""Where the training loop's rows come from: the :class:`Backend` protocol and the one-process :class:`LocalBackend`.

A backend hides what differs between a Ray Train worker and a single process (``tnlbt train --no-ray``): rank
and world size, the device, batches of Parquet rows, a checkpoint to resume from, and how an epoch's metrics
and checkpoint are reported. The Ray one (``RayBackend``) lives in :mod:`tnlbt.train.ray_trainer`. Also the
Parquet helpers both use: the part files of a split, a split as one table, its row counts.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from tnlbt import storage
from tnlbt.data.schema import MODEL_COLUMNS

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.fs

Rows = list[dict[str, Any]]



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


def split_parquet_files(split_dir: str | Path) -> tuple[pyarrow.fs.FileSystem, list[str]]:
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


def read_split_table(split_dir: str | Path, columns: list[str] | None = None) -> pa.Table:
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


class SeededRows:
    """A train split held in memory (pyarrow), dealt to ``world`` ranks with one seeded permutation per epoch.

    Every rank draws the same permutation (seed, epoch, stream) and takes rows ``rank, rank + world, ...`` of
    it, cut to the same count on every rank so the ranks stay in step (their collectives match). With
    ``world=1`` this is the one-process order. No Ray Data: for a split this small the streaming executor's
    start-up each epoch and its read tasks on the workers' cores cost more than the training (issue 10 §3).
    ``val`` is read once, on first use (rank 0 embeds it).
    """

    def __init__(self, data_dir: str | Path, seed: int, rank: int = 0, world: int = 1) -> None:
        import pyarrow.compute as pc

        self.seed, self.rank, self.world = seed, rank, world
        table = read_split_table(storage.join(os.fspath(data_dir), "train"), list(MODEL_COLUMNS))
        self._paired = table.filter(pc.field("has_image"))
        self._recipe = table.filter(~pc.field("has_image"))
        self._val_dir: str | Path = storage.join(os.fspath(data_dir), "val")
        self._val = None

    def _batches(self, table, epoch: int, batch_size: int, salt: int) -> Iterator[Rows]:
        n = table.num_rows
        order = np.random.default_rng([self.seed, epoch, salt]).permutation(n)
        if self.world > 1:
            order = order[self.rank :: self.world][: n // self.world]
        for i in range(0, len(order) - batch_size + 1, batch_size):  # drop_last: every step sees a full batch
            yield table.take(order[i : i + batch_size]).to_pylist()

    def paired_batches(self, epoch: int, batch_size: int) -> Iterator[Rows]:
        return self._batches(self._paired, epoch, batch_size, 0)

    def recipe_batches(self, epoch: int, batch_size: int) -> Iterator[Rows]:
        return self._batches(self._recipe, epoch, batch_size, 1)

    def val_batches(self, batch_size: int) -> Iterator[Rows]:
        import pyarrow.compute as pc

        if self._val is None:
            self._val = read_split_table(self._val_dir, list(MODEL_COLUMNS)).filter(pc.field("has_image"))
        for i in range(0, self._val.num_rows, batch_size):
            yield self._val.slice(i, batch_size).to_pylist()


class LocalBackend:
    """One process: rows read with pyarrow, reshuffled every epoch with a seeded generator."""

    def __init__(
        self, data_dir: str | Path, seed: int, resume: str | Path | None = None, device: torch.device | None = None
    ) -> None:
        self.rank, self.world_size = 0, 1
        self.device = device or torch.device("cpu")
        # a remote URI stays a string (Path would fold "s3://" into "s3:/"); the loop downloads it
        self._resume: Path | str | None = (
            (os.fspath(resume) if storage.is_remote(resume) else Path(resume)) if resume else None
        )
        rows = SeededRows(data_dir, seed)
        self.paired_batches, self.recipe_batches, self.val_batches = (
            rows.paired_batches, rows.recipe_batches, rows.val_batches)

    @contextlib.contextmanager
    def resume_dir(self) -> Iterator[Path | str | None]:
        yield self._resume

    def report(self, metrics: dict[str, Any], ckpt_dir: Path | None) -> None:
        pass
