"""A plain map-style torch Dataset over one processed split (``OUT/{split}/part-*.parquet``), no Ray needed.

Used by the non-Ray training loop, evaluation and tests. Only the ``has_image`` column is read up front (to
build the index and apply ``paired_only`` / ``recipe_only``); rows are read one Parquet row group at a time
and the last few groups are cached, so sequential and locally shuffled access stay cheap and memory stays
bounded.

``split_dir`` may be a URI (``s3://bucket/processed/train``): files are listed and opened through
:mod:`tnlbt.storage` (``pyarrow.parquet`` with ``filesystem=``). The filesystem is resolved again in each
process rather than stored on the dataset, so DataLoader workers pickle only strings (and pick up their own
credentials / ``TNLBT_STORAGE_ROUTES``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from torch.utils.data import Dataset


def split_files(split_dir: str | Path) -> list[Path] | list[str]:
    """The split's Parquet files in a stable order: Paths for a local folder, URIs for a remote one."""
    from tnlbt import storage

    names = storage.list_files(split_dir, "part-*.parquet")  # not the hidden .part-*.tmp of a running write
    if not storage.is_remote(split_dir):
        return [Path(storage.local_path(split_dir)) / n for n in names]
    return [storage.join(split_dir, n) for n in names]


def _open_parquet(path: str | Path) -> pq.ParquetFile:
    from tnlbt import storage

    return storage.open_parquet(path)


class RecipeDataset(Dataset):
    """Rows of one split as dicts with the columns of docs/contracts.md §2 (or the ``columns`` asked for)."""

    def __init__(
        self,
        split_dir: str | Path,
        paired_only: bool = False,
        recipe_only: bool = False,
        *,
        columns: Sequence[str] | None = None,
        cache_row_groups: int = 4,
    ):
        if paired_only and recipe_only:
            raise ValueError("RecipeDataset: paired_only and recipe_only exclude each other")
        from tnlbt import storage

        self.split_dir: Path | str = split_dir if storage.is_remote(split_dir) else Path(split_dir)
        self.files = split_files(self.split_dir)
        if not self.files:
            raise FileNotFoundError(
                f"no part-*.parquet files in {self.split_dir} (run `tnlbt preprocess` first)")
        self.columns = list(columns) if columns is not None else None
        self._cache_size = max(1, cache_row_groups)
        self._cache: OrderedDict[tuple[int, int], list[dict[str, Any]]] = OrderedDict()
        index = []  # (file, row group, row) for every kept row
        for fi, path in enumerate(self.files):
            pf = _open_parquet(path)
            for gi in range(pf.metadata.num_row_groups):
                flags = pf.read_row_group(gi, columns=["has_image"]).column(0).to_numpy(zero_copy_only=False)
                keep = np.ones(len(flags), bool)
                if paired_only:
                    keep = flags.astype(bool)
                elif recipe_only:
                    keep = ~flags.astype(bool)
                for ri in np.flatnonzero(keep):
                    index.append((fi, gi, int(ri)))
        self.index = np.asarray(index, dtype=np.int64).reshape(-1, 3)

    def __len__(self) -> int:
        return len(self.index)

    def _group(self, fi: int, gi: int) -> list[dict[str, Any]]:
        key = (fi, gi)
        rows = self._cache.get(key)
        if rows is None:
            table = _open_parquet(self.files[fi]).read_row_group(gi, columns=self.columns)
            rows = table.to_pylist()
            self._cache[key] = rows
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return rows

    def __getitem__(self, i: int) -> dict[str, Any]:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} rows")
        fi, gi, ri = (int(v) for v in self.index[i])
        return dict(self._group(fi, gi)[ri])

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_cache"] = OrderedDict()  # DataLoader workers start with an empty cache
        return state


def paired_row_batches(split_dir: str | Path, batch_size: int, columns: Sequence[str]
                       ) -> Iterator[list[dict[str, Any]]]:
    """The paired rows of a split (local folder or URI) in order, ``batch_size`` at a time, read one row group
    at a time through :class:`RecipeDataset` (bounded memory; ``FileNotFoundError`` at once without parts)."""
    ds = RecipeDataset(split_dir, paired_only=True, columns=list(columns))
    n = len(ds)
    return ([ds[i] for i in range(start, min(start + batch_size, n))] for start in range(0, n, batch_size))
