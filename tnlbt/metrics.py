"""Recipe1M retrieval metrics: medR and R@1/5/10 for paired rows, and the bagged 1k/10k protocol.

Protocol (method-research.md §5): cosine similarity, R@K as fractions, medR the median rank (it can be x.5).
``mode="random"`` draws each bag independently (H-T: ``random.sample``, bags may overlap), ``mode="fixed"``
uses disjoint consecutive bags (AdaMine/T-Food).

Ties. The default rule, ``ties="optimistic"``, ranks the true item at 1 + the number of candidates *strictly*
closer, so candidates that tie exactly count for the query (as H-T's medR: sklearn ``pairwise_distances`` and
``<``); R@K is then ``rank <= K``, consistent with medR. H-T's own R@K is a top-K membership test in which
ties fall in ``argpartition``'s arbitrary order, so on a split with many exact ties its R@K is lower than
ours (medR equal). ``ties="pessimistic"`` ranks the true item at the number of candidates closer *or equal*
(itself included): ties count against the query, the worst case of H-T's order, deterministic. Both rules
come from the same counts; :func:`bagged_metrics` also reports how many queries tie (``"exact_ties"``).

Exact at any size. Every similarity is computed once, by one fp32 block product, and both directions compare
those very numbers: the bag's similarity matrix is produced as lower row blocks ``q[s:e] @ d[:e].T`` (which
hold the diagonal block, so each pair's own score is read off the product that also holds its row) and upper
strips ``q[:s] @ d[s:e].T`` (computed after the diagonal they are compared with). Exact duplicates (rows that
are bitwise identical as given; Recipe1M has duplicate recipes and shared photos) are found first and tie by
construction: their comparisons with the positive are classified as ties from the groups, never by comparing
two separately rounded products (BLAS rounds the same dot product differently in different calls or tiles).

Memory: at most ``rows x N`` similarities at once (``rows`` = ``chunk_size``); nothing is sorted. Pure
functions; randomness only through an explicit ``np.random.Generator``. Products with torch on CPU, counting
with numpy. No Ray here.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from tnlbt.config import EvalConfig

log = logging.getLogger(__name__)

METRICS = ("medR", "R@1", "R@5", "R@10")
DIRECTIONS = ("image_to_recipe", "recipe_to_image")
TieRule = Literal["optimistic", "pessimistic"]
TIE_RULES: tuple[TieRule, ...] = ("optimistic", "pessimistic")
# Columns whose bits are compared first when looking for identical rows (full rows only for candidates).
_PROBE_COLUMNS = 16
# Duplicate groups up to this size are corrected pair by pair, larger ones block-wise (see _Duplicates).
_LARGE_GROUP = 64

Array = np.ndarray | torch.Tensor


def _as_tensor(x: Array, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x.detach().cpu()
    if t.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (N, D) array; got shape {tuple(t.shape)}")
    # float64 stays float64 (exact tests); everything else is evaluated in fp32 as the papers do.
    if dtype is None:
        dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    return t.to(dtype).contiguous()


def _normalized(t: torch.Tensor, name: str) -> torch.Tensor:
    """Rows scaled to unit length (as F.normalize); a NaN/inf anywhere in a row shows up in its norm, so the
    finiteness check costs no extra pass (NaN similarities would otherwise rank as ties, silently)."""
    norms = torch.linalg.vector_norm(t, dim=1, keepdim=True)
    if not bool(torch.isfinite(norms).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return t / norms.clamp_min(1e-12)


def duplicate_groups(x: np.ndarray) -> np.ndarray | None:
    """For each row, the index of the first row that is bitwise identical to it; ``None`` if all rows differ.

    Exact duplicates must tie however BLAS rounds, so they are recognised from their bits rather than from
    their similarities. A few columns are compared first (cheap; rows that differ there differ), full rows
    only for the candidates that remain. ``-0.0`` and ``0.0`` count as different bits.
    """
    n, dim = x.shape
    if n < 2 or dim == 0:
        return None
    x = np.ascontiguousarray(x)
    bits = x.view(np.dtype(f"u{x.itemsize}"))
    cols = np.unique(np.linspace(0, dim - 1, min(dim, _PROBE_COLUMNS)).astype(np.int64))
    probe = np.ascontiguousarray(bits[:, cols])
    keys = probe.view(np.dtype((np.void, probe.shape[1] * probe.itemsize))).ravel()
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    candidates = np.nonzero(counts[inverse.ravel()] > 1)[0]
    if len(candidates) == 0:
        return None
    labels = np.arange(n)
    first: dict[bytes, int] = {}
    for i in candidates.tolist():  # ascending, so the first occurrence is the group's label
        labels[i] = first.setdefault(x[i].tobytes(), i)
    return labels if bool((labels != np.arange(n)).any()) else None


@dataclass(frozen=True)
class _Side:
    """One modality of the paired rows: unit rows, and which rows are exact duplicates of which."""

    emb: torch.Tensor
    groups: np.ndarray | None

    def take(self, idx: np.ndarray) -> _Side:
        groups = self.groups[idx] if self.groups is not None else None
        return _Side(self.emb[torch.from_numpy(idx)], groups)


def _side(x: Array, name: str, dtype: torch.dtype | None = None) -> _Side:
    """Normalised rows; the rows of a duplicate group all get its first row's normalised bits, so identical
    inputs stay identical whatever the normalisation kernel does with rows at different addresses."""
    t = _as_tensor(x, name, dtype)
    groups = duplicate_groups(t.numpy())
    emb = _normalized(t, name)
    if groups is not None:
        dup = torch.from_numpy(np.nonzero(groups != np.arange(len(groups)))[0])
        emb[dup] = emb[torch.from_numpy(groups)[dup]]
    return _Side(emb, groups)


def _prepare(queries: Array, database: Array, q_name: str, d_name: str) -> tuple[_Side, _Side]:
    q = _side(queries, q_name)
    d = _side(database, d_name, q.emb.dtype)
    if q.emb.shape != d.emb.shape:
        raise ValueError(f"paired rows need equal shapes; got {tuple(q.emb.shape)} and {tuple(d.emb.shape)}")
    if q.emb.shape[0] == 0:
        raise ValueError("no rows to evaluate")
    return q, d


def _check_rule(ties: str) -> None:
    if ties not in TIE_RULES:
        raise ValueError(f"unknown tie rule {ties!r}; choose 'optimistic' or 'pessimistic'")


@dataclass(frozen=True)
class PositiveCounts:
    """Where each query's true item stands among its candidates.

    ``closer[i]``: candidates strictly closer than the true item; ``tied[i]``: other candidates with exactly
    the true item's score (its exact duplicates included); ``duplicate[i]``: the true item has an exact
    duplicate among the candidates (a tie whatever the rounding).
    """

    closer: np.ndarray
    tied: np.ndarray
    duplicate: np.ndarray

    def ranks(self, ties: TieRule = "optimistic") -> np.ndarray:
        """1-based ranks: ``1 + closer`` (ties for the query) or ``1 + closer + tied`` (ties against it)."""
        _check_rule(ties)
        return self.closer + 1 if ties == "optimistic" else self.closer + self.tied + 1


@dataclass(frozen=True)
class _Duplicates:
    """The exact-duplicate structure of one side of a bag, ready for :meth:`fix`.

    Small groups as explicit ordered pairs ``(i, j)``, ``i != j`` (cost: the number of pairs); groups larger
    than ``_LARGE_GROUP`` (a collapsed model puts every row in one) as member lists handled block-wise, so
    memory never grows with the square of a group.
    """

    flag: np.ndarray  # bool per row: has at least one exact duplicate in the bag
    pi: np.ndarray
    pj: np.ndarray
    large: list[np.ndarray]

    @classmethod
    def of(cls, groups: np.ndarray | None) -> _Duplicates | None:
        if groups is None:
            return None
        _, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
        inverse = inverse.ravel()
        size = counts[inverse]
        if not bool((size > 1).any()):
            return None
        order = np.argsort(inverse, kind="stable")
        starts = np.concatenate([[0], np.cumsum(counts)])
        pi: list[np.ndarray] = []
        pj: list[np.ndarray] = []
        large: list[np.ndarray] = []
        for g in np.nonzero(counts > 1)[0].tolist():
            members = order[starts[g]:starts[g + 1]]  # ascending row indices
            if len(members) > _LARGE_GROUP:
                large.append(members)
                continue
            a, b = np.meshgrid(members, members, indexing="ij")
            keep = a != b
            pi.append(a[keep])
            pj.append(b[keep])
        empty = np.zeros(0, dtype=np.int64)
        return cls(size > 1, np.concatenate(pi) if pi else empty, np.concatenate(pj) if pj else empty, large)

    def fix(self, sim: np.ndarray, r0: int, c0: int, thr: np.ndarray, by_row: bool,
            gt: np.ndarray, ge: np.ndarray) -> None:
        """Correct the counts for the entries of ``sim`` (rows ``r0:``, columns ``c0:``) that pair a true item
        with one of its exact duplicates: such an entry ties by definition, however its product rounded,
        so it leaves ``gt`` (strictly closer) and joins ``ge`` (closer or equal).

        ``by_row``: row direction (row i's true item is column i; these are this side's duplicates among the
        columns), else column direction (column j's true item is row j; duplicates among the rows)."""
        h, w = sim.shape
        if len(self.pi):
            sel = (self.pi >= r0) & (self.pi < r0 + h) & (self.pj >= c0) & (self.pj < c0 + w)
            if bool(sel.any()):
                i, j = self.pi[sel], self.pj[sel]
                key = i if by_row else j
                vals = sim[i - r0, j - c0]
                np.subtract.at(gt, key[vals > thr[key]], 1)
                np.add.at(ge, key[vals < thr[key]], 1)
        for members in self.large:
            rows = members[(members >= r0) & (members < r0 + h)]
            cols = members[(members >= c0) & (members < c0 + w)]
            if len(rows) == 0 or len(cols) == 0:
                continue
            vals = sim[np.ix_(rows - r0, cols - c0)]
            other = rows[:, None] != cols[None, :]
            axis = 1 if by_row else 0
            t = thr[rows][:, None] if by_row else thr[cols][None, :]
            key = rows if by_row else cols
            gt[key] -= np.count_nonzero((vals > t) & other, axis=axis)
            ge[key] += np.count_nonzero((vals < t) & other, axis=axis)


def _count(mask: np.ndarray, axis: int) -> np.ndarray:
    """``count_nonzero(mask, axis)``, summing bytes into a narrow integer (several times faster here)."""
    dtype = np.uint16 if mask.shape[axis] < 2**16 else np.int64
    return np.add.reduce(mask.view(np.uint8), axis=axis, dtype=dtype)


def _count_block(sim: np.ndarray, thr_rows: np.ndarray, thr_cols: np.ndarray | None) -> list[np.ndarray]:
    """Per row: entries ``>`` and ``>=`` its threshold; per column likewise (if ``thr_cols``). One bool
    buffer serves the four compares."""
    mask = np.greater(sim, thr_rows[:, None])
    out = [_count(mask, 1), _count(np.greater_equal(sim, thr_rows[:, None], out=mask), 1)]
    if thr_cols is not None:
        out += [_count(np.greater(sim, thr_cols, out=mask), 0), _count(np.greater_equal(sim, thr_cols, out=mask), 0)]
    return out


def _positive_counts(q: _Side, d: _Side, chunk_size: int,
                     both: bool) -> tuple[PositiveCounts, PositiveCounts | None]:
    """The counts of :class:`PositiveCounts` for query ``i`` against database rows (row direction) and, if
    ``both``, for database row ``j`` against the queries (column direction), from one blocked product.

    Block schedule: for each row block ``s:e`` the lower block ``q[s:e] @ d[:e].T`` holds the block's
    diagonal, so the pair scores ``t[s:e]`` are read off the very product whose rows are compared with them;
    then the strip ``q[:s] @ d[s:e].T`` above it. Every entry is computed once, and when it is compared (with
    its row's and with its column's pair score) both scores are already known, so both directions compare
    the same fp32 numbers. Same flops as one full product; at most ``chunk_size x N`` scores at once.
    """
    qe, de = q.emb, d.emb
    n = qe.shape[0]
    rows = max(1, int(chunk_size))
    t = np.empty(n, dtype=np.float64 if qe.dtype == torch.float64 else np.float32)
    gt_r, ge_r = np.zeros(n, np.int64), np.zeros(n, np.int64)
    gt_c, ge_c = (np.zeros(n, np.int64), np.zeros(n, np.int64)) if both else (gt_r[:0], ge_r[:0])
    d_dups = _Duplicates.of(d.groups)  # duplicates among the candidates of the row direction
    q_dups = _Duplicates.of(q.groups) if both else None

    # Products in torch (multi-threaded BLAS); counting in numpy on the same memory, split over threads by
    # rows (numpy releases the GIL in compares and reductions). Measured here: torch's own compare + sum
    # cost 15-100% of the product time on a busy box (thread hand-offs); numpy's much less.
    workers = max(1, min(torch.get_num_threads(), 8))

    def count(pool: ThreadPoolExecutor, pieces: list[tuple[np.ndarray, int, int]]) -> None:
        """Count ``(sim, r0, c0)`` pieces (rows ``r0:``, columns ``c0:`` of the similarity matrix) in one
        round of jobs: each wait for the threads costs a time slice on a busy machine."""
        jobs = []
        for sim, r0, c0 in pieces:
            h, w = sim.shape
            step = -(-h // workers)
            thr_cols = t[c0:c0 + w] if both else None
            for a in range(r0, r0 + h, step):
                b = min(a + step, r0 + h)
                jobs.append((a, b, c0, w, pool.submit(_count_block, sim[a - r0:b - r0], t[a:b], thr_cols)))
        for a, b, c0, w, job in jobs:
            res = job.result()
            gt_r[a:b] += res[0]
            ge_r[a:b] += res[1]
            if both:
                gt_c[c0:c0 + w] += res[2]
                ge_c[c0:c0 + w] += res[3]
        for sim, r0, c0 in pieces:
            if d_dups is not None:
                d_dups.fix(sim, r0, c0, t, True, gt_r, ge_r)
            if q_dups is not None:
                q_dups.fix(sim, r0, c0, t, False, gt_c, ge_c)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for s in range(0, n, rows):
            e = min(s + rows, n)
            low = torch.mm(qe[s:e], de[:e].T).numpy()  # (e - s, e): row block s:e, columns up to its diagonal
            k = np.arange(e - s)
            t[s:e] = low[k, s + k]
            pieces = [(low, s, 0)]
            if s:
                pieces.append((torch.mm(qe[:s], de[s:e].T).numpy(), 0, s))  # (s, e - s): above the diagonal
            count(pool, pieces)

    # >= counted the true item itself (its own entry equals its threshold): tied = others that tie.
    no_dup = np.zeros(n, dtype=bool)
    row = PositiveCounts(gt_r, ge_r - gt_r - 1, d_dups.flag if d_dups is not None else no_dup)
    col = PositiveCounts(gt_c, ge_c - gt_c - 1, q_dups.flag if q_dups is not None else no_dup) if both else None
    return row, col


def positive_counts(queries: Array, database: Array,
                    chunk_size: int = 1024) -> tuple[PositiveCounts, PositiveCounts]:
    """:class:`PositiveCounts` of paired rows in both directions (query i belongs with database row i; then
    database row j as the query among the queries), from one blocked similarity product."""
    q, d = _prepare(queries, database, "queries", "database")
    row, col = _positive_counts(q, d, chunk_size, both=True)
    assert col is not None
    return row, col


def paired_ranks(queries: Array, database: Array, chunk_size: int = 1024,
                 ties: TieRule = "optimistic") -> tuple[np.ndarray, np.ndarray]:
    """Ranks of the true item for both directions of paired rows, from one (blocked) similarity product.

    Returns ``(rank_q, rank_d)``: ``rank_q[i]`` = 1 + #{j : cos(q_i, d_j) > cos(q_i, d_i)} (query i among the
    database) and ``rank_d[j]`` = 1 + #{i : cos(q_i, d_j) > cos(q_j, d_j)} (database item j as the query among
    the queries); with ``ties="pessimistic"`` ``>=`` instead of ``>`` (the true item counted once). Exact
    duplicates of the true item tie exactly, in both directions, whatever the block sizes.
    """
    _check_rule(ties)
    row, col = positive_counts(queries, database, chunk_size)
    return row.ranks(ties), col.ranks(ties)


def metrics_from_ranks(ranks: np.ndarray) -> dict[str, float]:
    """``{"medR", "R@1", "R@5", "R@10"}`` from 1-based ranks (R@K as fractions)."""
    r = np.asarray(ranks)
    return {
        "medR": float(np.median(r)),
        "R@1": float(np.mean(r <= 1)),
        "R@5": float(np.mean(r <= 5)),
        "R@10": float(np.mean(r <= 10)),
    }


def retrieval_metrics(queries: Array, database: Array, chunk_size: int = 1024,
                      ties: TieRule = "optimistic") -> dict[str, float]:
    """medR and R@1/5/10 for paired rows (query i belongs with database row i), cosine similarity; rank =
    1 + #database items strictly closer (``ties="optimistic"``, ties count for the query) or closer or
    equal (``"pessimistic"``). Chunked over queries."""
    _check_rule(ties)
    q, d = _prepare(queries, database, "queries", "database")
    row, _ = _positive_counts(q, d, chunk_size, both=False)
    return metrics_from_ranks(row.ranks(ties))


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
                   chunk_size: int = 1024, ties: TieRule = "optimistic") -> dict[str, Any]:
    """The Recipe1M bag protocol in both directions.

    Returns ``{"image_to_recipe": {metric: {"mean", "std"}}, "recipe_to_image": {...}, "exact_ties": {...}}``
    over the bags (population std), ranks under the tie rule ``ties``. ``"exact_ties"`` says how much the
    rule matters here: ``{"rule": ties, direction: {"queries", "tied_queries", "fraction",
    "duplicate_positives"}}``, summed over the bags, where a query is *tied* when at least one other
    candidate in its bag has exactly its true item's score, and ``duplicate_positives`` counts the tied
    queries whose true item has an exact (bitwise) duplicate in the bag. One similarity product per bag
    serves both directions; at most ``chunk_size x bag_size`` similarities are held at once; exact
    duplicates are found once for the whole set. Deterministic for a given ``rng`` state.
    """
    _check_rule(ties)
    x, y = _prepare(image_emb, recipe_emb, "image_emb", "recipe_emb")
    per_bag: dict[str, list[dict[str, float]]] = {k: [] for k in DIRECTIONS}
    tie_counts = {k: np.zeros(3, dtype=np.int64) for k in DIRECTIONS}  # queries, tied, duplicate positives
    for idx in bag_indices(x.emb.shape[0], bag_size, n_bags, rng, mode):
        i2r, r2i = _positive_counts(x.take(idx), y.take(idx), chunk_size, both=True)
        assert r2i is not None
        for direction, counts in (("image_to_recipe", i2r), ("recipe_to_image", r2i)):
            per_bag[direction].append(metrics_from_ranks(counts.ranks(ties)))
            tie_counts[direction] += (len(counts.tied), int(np.count_nonzero(counts.tied)),
                                      int(np.count_nonzero(counts.duplicate)))
    out: dict[str, Any] = {}
    for direction, bags in per_bag.items():
        out[direction] = {}
        for m in METRICS:
            vals = np.array([b[m] for b in bags], dtype=np.float64)
            out[direction][m] = {"mean": float(vals.mean()), "std": float(vals.std())}
    exact: dict[str, Any] = {"rule": ties}
    for direction, (queries, tied, dup) in tie_counts.items():
        exact[direction] = {"queries": int(queries), "tied_queries": int(tied), "fraction": float(tied / queries),
                            "duplicate_positives": int(dup)}
    out["exact_ties"] = exact
    return out


def setting_name(bag_size: int) -> str:
    """``1000 -> "1k"``, ``10000 -> "10k"``, anything else its number."""
    return {1000: "1k", 10000: "10k"}.get(bag_size, str(bag_size))


def evaluate_embeddings(image_emb: Array, recipe_emb: Array, cfg: EvalConfig,
                        bag_sizes: list[int] | tuple[int, ...] | None = None) -> dict[str, Any]:
    """Bagged metrics for every bag size: ``{"1k": {"image_to_recipe": ..., "recipe_to_image": ...,
    "exact_ties": ...}, ...}`` under the tie rule ``cfg.ties``.

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
                                                 cfg.chunk_size, cfg.ties)
    for note in notes:
        log.warning(note)
    if notes:
        out["notes"] = notes
    return out


def format_table(metrics: dict[str, Any]) -> str:
    """The papers' table: one line per setting, medR then R@1/5/10 in percent for both directions,
    ``mean ± std`` over the bags; a note per setting where queries tie exactly (the rule then matters)."""
    head = f"{'setting':>8} | {'direction':<16} | " + " | ".join(f"{m:>13}" for m in METRICS)
    lines = [head, "-" * len(head)]
    tie_notes: list[str] = []
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
        exact = res.get("exact_ties")
        if isinstance(exact, dict) and any(exact.get(k, {}).get("tied_queries", 0) for k in DIRECTIONS):
            parts = [f"{k} {100 * exact[k]['fraction']:.1f}%" for k in DIRECTIONS if k in exact]
            tie_notes.append(f"{setting}: queries whose true item ties exactly with another candidate: "
                             f"{', '.join(parts)} (tie rule: {exact.get('rule', 'optimistic')})")
    for note in [*metrics.get("notes", []), *tie_notes]:
        lines.append(f"note: {note}")
    return "\n".join(lines)
