"""Recipe1M retrieval metrics: medR and R@1/5/10 for paired rows, and the bagged 1k/10k protocol.

Protocol (method-research.md §5): cosine similarity; the rank of the true item is 1 + the number of database
items *strictly* closer, so ties count for the query (H-T, sklearn ``pairwise_distances`` + ``<``); R@K as
fractions; medR is the median rank (it can be x.5). ``mode="random"`` draws each bag independently
(H-T: ``random.sample``, bags may overlap), ``mode="fixed"`` uses disjoint consecutive bags (AdaMine/T-Food).

How it stays fast and small: similarities are produced ``rows x N`` at a time and each block is used at once
for both directions. Rows: compare each row with its own positive (the diagonal). Columns (the other
direction, the transpose): compare each column with *its* diagonal value and add up over row blocks. So one
fp32 matrix product per bag serves both directions, nothing is sorted, and memory is bounded by
``rows x N`` similarities. The diagonal is taken from matrix products of the same shape as the blocks (so
exact duplicates tie exactly, see :func:`paired_ranks`).

Pure functions; randomness only through an explicit ``np.random.Generator``. Products with torch on CPU,
counting with numpy. No Ray here.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import numpy as np
import torch

from tnlbt.config import EvalConfig

log = logging.getLogger(__name__)

METRICS = ("medR", "R@1", "R@5", "R@10")
DIRECTIONS = ("image_to_recipe", "recipe_to_image")
# Rows per diagonal block (a multiple of the BLAS tile sizes, so the diagonal rounds as in the main product).
_DIAG_ROWS = 128

Array = np.ndarray | torch.Tensor


def _as_tensor(x: Array, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x.detach().cpu()
    if t.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (N, D) array; got shape {tuple(t.shape)}")
    # float64 stays float64 (exact tests); everything else is evaluated in fp32 as the papers do.
    if dtype is None:
        dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    return t.to(dtype)


def _normalized(t: torch.Tensor, name: str) -> torch.Tensor:
    """Rows scaled to unit length (as F.normalize); a NaN/inf anywhere in a row shows up in its norm, so the
    finiteness check costs no extra pass (NaN similarities would otherwise rank as ties, silently)."""
    norms = torch.linalg.vector_norm(t, dim=1, keepdim=True)
    if not bool(torch.isfinite(norms).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return t / norms.clamp_min(1e-12)


def _prepare(queries: Array, database: Array, q_name: str, d_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    q = _as_tensor(queries, q_name)
    d = _as_tensor(database, d_name, q.dtype)
    _check_pair(q, d)
    return _normalized(q, q_name), _normalized(d, d_name)


def _check_pair(q: torch.Tensor, d: torch.Tensor) -> None:
    if q.shape != d.shape:
        raise ValueError(f"paired rows need equal shapes; got {tuple(q.shape)} and {tuple(d.shape)}")
    if q.shape[0] == 0:
        raise ValueError("no rows to evaluate")


def _ranks_normalized(q: torch.Tensor, d: torch.Tensor, chunk_size: int,
                      both: bool) -> tuple[np.ndarray, np.ndarray | None]:
    n = q.shape[0]
    rows = max(1, int(chunk_size))
    dT = d.T
    np_dtype = np.float64 if q.dtype == torch.float64 else np.float32
    diag = np.empty(n, dtype=np_dtype)
    if both:
        # Column j is compared with cos(q_j, d_j) before the block holding row j is computed, so the diagonal
        # comes first, from small products of aligned row blocks (cost _DIAG_ROWS / N of the main product),
        # batched into one call (one parallel region: on a busy machine each call waits for its threads).
        # Not an elementwise product: BLAS rounds per code path, and one ulp would break exact ties; these
        # blocks gave bit-identical diagonals to the main products here (pinned by a duplicates test).
        b = _DIAG_ROWS
        nb = n // b
        if nb:
            blocks = torch.bmm(q[: nb * b].reshape(nb, b, -1), d[: nb * b].reshape(nb, b, -1).transpose(1, 2))
            diag[: nb * b] = blocks.diagonal(dim1=1, dim2=2).reshape(-1).numpy()
        if nb * b < n:
            diag[nb * b:] = torch.mm(q[nb * b:], d[nb * b:].T).diagonal().numpy()
    row_count = np.empty(n, dtype=np.int64)
    col_count = np.zeros(n, dtype=np.int64) if both else None

    def count(sim: np.ndarray, s: int, lo: int, hi: int) -> np.ndarray | None:
        """Rows lo:hi of the block starting at global row s: row counts in place, column counts returned."""
        part = sim[lo:hi]
        idx = np.arange(hi - lo)
        cols = idx + s + lo
        # Rows: the positive's score from this very product, so duplicates in a row tie exactly.
        own = part[idx, cols].copy()
        row_count[s + lo:s + hi] = np.count_nonzero(part > own[:, None], axis=1)
        if not both:
            return None
        # The positive compares equal to itself whatever the rounding: never "strictly closer".
        part[idx, cols] = diag[s + lo:s + hi]
        return np.count_nonzero(part > diag[None, :], axis=0)

    # Products in torch (multi-threaded BLAS); counting in numpy on the same memory, split over threads by
    # rows (numpy releases the GIL in compares and reductions). Measured here: torch's own compare + sum
    # cost 15-100% of the product time on a busy box (thread hand-offs); numpy's much less.
    workers = max(1, min(torch.get_num_threads(), 8))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for s in range(0, n, rows):
            e = min(s + rows, n)
            sim = torch.mm(q[s:e], dT).numpy()  # (e - s, n)
            step = -(-(e - s) // workers)
            futures = [pool.submit(count, sim, s, lo, min(lo + step, e - s)) for lo in range(0, e - s, step)]
            for f in futures:
                part_cols = f.result()
                if col_count is not None and part_cols is not None:
                    col_count += part_cols
    row_rank = row_count + 1
    col_rank = col_count + 1 if col_count is not None else None
    return row_rank, col_rank


def paired_ranks(queries: Array, database: Array, chunk_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Ranks of the true item for both directions of paired rows, from one (blocked) similarity product.

    Returns ``(rank_q, rank_d)``: ``rank_q[i]`` = 1 + #{j : cos(q_i, d_j) > cos(q_i, d_i)} (query i among the
    database) and ``rank_d[j]`` = 1 + #{i : cos(q_i, d_j) > cos(q_j, d_j)} (database item j as the query among
    the queries). Exact duplicates tie exactly within a block; across blocks BLAS may round a duplicate by one
    ulp (it did not with block sizes that are multiples of 8 here).
    """
    q, d = _prepare(queries, database, "queries", "database")
    rq, rd = _ranks_normalized(q, d, chunk_size, both=True)
    assert rd is not None
    return rq, rd


def metrics_from_ranks(ranks: np.ndarray) -> dict[str, float]:
    """``{"medR", "R@1", "R@5", "R@10"}`` from 1-based ranks (R@K as fractions)."""
    r = np.asarray(ranks)
    return {
        "medR": float(np.median(r)),
        "R@1": float(np.mean(r <= 1)),
        "R@5": float(np.mean(r <= 5)),
        "R@10": float(np.mean(r <= 10)),
    }


def retrieval_metrics(queries: Array, database: Array, chunk_size: int = 1024) -> dict[str, float]:
    """medR and R@1/5/10 for paired rows (query i belongs with database row i), cosine similarity; rank =
    1 + #database items strictly closer (ties count for the query). Chunked over queries."""
    q, d = _prepare(queries, database, "queries", "database")
    rq, _ = _ranks_normalized(q, d, chunk_size, both=False)
    return metrics_from_ranks(rq)


def bag_indices(n: int, bag_size: int, n_bags: int, rng: np.random.Generator,
                mode: Literal["random", "fixed"] = "random") -> list[np.ndarray]:
    """The row indices of each bag: independent random draws without replacement inside a bag (H-T), or
    disjoint consecutive blocks (``fixed``; ``n_bags`` is capped at ``n // bag_size``)."""
    if bag_size < 1 or n_bags < 1:
        raise ValueError(f"bag_size and n_bags must be >= 1; got {bag_size}, {n_bags}")
    if bag_size > n:
        raise ValueError(f"bag size {bag_size} is larger than the {n} paired rows")
    if mode == "random":
        return [np.sort(rng.choice(n, bag_size, replace=False)) for _ in range(n_bags)]
    if mode == "fixed":
        k = min(n_bags, n // bag_size)
        return [np.arange(b * bag_size, (b + 1) * bag_size) for b in range(k)]
    raise ValueError(f"unknown bag mode {mode!r}; choose 'random' or 'fixed'")


def bagged_metrics(image_emb: Array, recipe_emb: Array, bag_size: int, n_bags: int,
                   rng: np.random.Generator, mode: Literal["random", "fixed"] = "random",
                   chunk_size: int = 1024) -> dict[str, dict[str, dict[str, float]]]:
    """The Recipe1M bag protocol in both directions.

    Returns ``{"image_to_recipe": {metric: {"mean", "std"}}, "recipe_to_image": {...}}`` over the bags
    (population std). One similarity product per bag serves both directions; at most ``chunk_size x
    bag_size`` similarities are held at once. Deterministic for a given ``rng`` state.
    """
    x, y = _prepare(image_emb, recipe_emb, "image_emb", "recipe_emb")
    per_bag: dict[str, list[dict[str, float]]] = {k: [] for k in DIRECTIONS}
    for idx in bag_indices(x.shape[0], bag_size, n_bags, rng, mode):
        t = torch.from_numpy(idx)
        r_i2r, r_r2i = _ranks_normalized(x[t], y[t], chunk_size, both=True)
        assert r_r2i is not None
        per_bag["image_to_recipe"].append(metrics_from_ranks(r_i2r))
        per_bag["recipe_to_image"].append(metrics_from_ranks(r_r2i))
    out: dict[str, dict[str, dict[str, float]]] = {}
    for direction, bags in per_bag.items():
        out[direction] = {}
        for m in METRICS:
            vals = np.array([b[m] for b in bags], dtype=np.float64)
            out[direction][m] = {"mean": float(vals.mean()), "std": float(vals.std())}
    return out


def setting_name(bag_size: int) -> str:
    """``1000 -> "1k"``, ``10000 -> "10k"``, anything else its number."""
    return {1000: "1k", 10000: "10k"}.get(bag_size, str(bag_size))


def evaluate_embeddings(image_emb: Array, recipe_emb: Array, cfg: EvalConfig,
                        bag_sizes: list[int] | tuple[int, ...] | None = None) -> dict[str, Any]:
    """Bagged metrics for every bag size: ``{"1k": {"image_to_recipe": ..., "recipe_to_image": ...}, ...}``.

    Each setting gets its own generator seeded from ``(cfg.seed, bag_size)``, so adding or removing a setting
    does not change the others. Bag sizes larger than N are skipped with a warning and a line in ``"notes"``;
    if that leaves nothing, the whole set is evaluated as one bag (keyed by N) so small demo splits still
    get numbers. ``"notes"`` is present only when something was skipped.
    """
    n = int(image_emb.shape[0])
    sizes = list(bag_sizes if bag_sizes is not None else cfg.bag_sizes)
    out: dict[str, Any] = {}
    notes: list[str] = []
    todo: list[tuple[int, int]] = []
    for size in sizes:
        if size > n:
            notes.append(f"bag size {size} skipped: only {n} paired rows")
        else:
            todo.append((size, cfg.n_bags))
    if not todo and n >= 2:
        notes.append(f"evaluated the whole set of {n} as one bag instead")
        todo.append((n, 1))
    for size, n_bags in todo:
        rng = np.random.default_rng([cfg.seed, size])
        out[setting_name(size)] = bagged_metrics(image_emb, recipe_emb, size, n_bags, rng, cfg.mode,
                                                 cfg.chunk_size)
    for note in notes:
        log.warning(note)
    if notes:
        out["notes"] = notes
    return out


def format_table(metrics: dict[str, Any]) -> str:
    """The papers' table: one line per setting, medR then R@1/5/10 in percent for both directions,
    ``mean ± std`` over the bags."""
    head = f"{'setting':>8} | {'direction':<16} | " + " | ".join(f"{m:>13}" for m in METRICS)
    lines = [head, "-" * len(head)]
    for setting, res in metrics.items():
        if setting == "notes" or not isinstance(res, dict):
            continue
        for direction in DIRECTIONS:
            if direction not in res:
                continue
            cells = []
            for m in METRICS:
                v = res[direction][m]
                scale = 1.0 if m == "medR" else 100.0
                cells.append(f"{v['mean'] * scale:6.1f} ± {v['std'] * scale:4.1f}")
            lines.append(f"{setting:>8} | {direction:<16} | " + " | ".join(f"{c:>13}" for c in cells))
    for note in metrics.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)
