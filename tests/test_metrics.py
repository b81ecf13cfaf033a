"""Retrieval metrics against brute-force twins (full matrix + argsort) and hand-computed cases."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch

from tnlbt.config import Config, ConfigError, EvalConfig
from tnlbt.metrics import (
    bag_indices,
    bagged_metrics,
    duplicate_groups,
    evaluate_embeddings,
    format_table,
    metrics_from_ranks,
    paired_ranks,
    positive_counts,
    retrieval_metrics,
)


# -- brute-force twin ---------------------------------------------------------------------------------
def brute_ranks(q: np.ndarray, d: np.ndarray, pessimistic: bool = False) -> np.ndarray:
    """Full similarity matrix, then sort every row; ties ordered in the query's favour (positive first) or,
    ``pessimistic``, against it (positive last)."""
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    dn = d / np.linalg.norm(d, axis=1, keepdims=True)
    sim = qn @ dn.T
    n = len(q)
    ranks = np.empty(n, dtype=np.int64)
    for i in range(n):
        pos_key = (np.arange(n) == i) if pessimistic else (np.arange(n) != i)
        order = np.lexsort((pos_key.astype(np.int64), -sim[i]))  # by similarity descending, then tie order
        ranks[i] = int(np.nonzero(order == i)[0][0]) + 1
    return ranks


def brute_metrics(q: np.ndarray, d: np.ndarray) -> dict[str, float]:
    r = brute_ranks(q, d)
    return {
        "medR": float(np.median(r)),
        "R@1": float(np.mean(r <= 1)),
        "R@5": float(np.mean(r <= 5)),
        "R@10": float(np.mean(r <= 10)),
    }


def _correlated(n: int, d: int, noise: float, seed: int, dtype=np.float64) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    y = x + noise * rng.standard_normal((n, d))
    return x.astype(dtype), y.astype(dtype)


def _sign_vectors(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Entries ±1 with d = 64: after normalisation every entry is ±1/8 and every dot product is exact in
    floating point, in any summation order, so ties are exact on every code path (and frequent)."""
    rng = np.random.default_rng(seed)
    x = rng.choice([-1.0, 1.0], size=(n, d))
    y = x.copy()
    flip = rng.random((n, d)) < 0.3
    y[flip] *= -1
    return x, y


# -- hand-computed cases --------------------------------------------------------------------------------
def test_identical_embeddings_are_perfect() -> None:
    x, _ = _correlated(300, 16, 0.0, 0)
    m = retrieval_metrics(x, x)
    assert m == {"medR": 1.0, "R@1": 1.0, "R@5": 1.0, "R@10": 1.0}


def test_known_permutation_gives_known_ranks() -> None:
    # Orthonormal database; query i equals database row perm[i] blended toward its true item i:
    # q_i = 2*e_perm(i) + 1*e_i  -> the wrong item perm(i) is closer unless perm(i) == i.
    n = 6
    eye = np.eye(n)
    perm = np.array([0, 2, 1, 3, 5, 4])
    q = 2 * eye[perm] + eye
    ranks, _ = paired_ranks(q, eye)
    np.testing.assert_array_equal(ranks, np.where(perm == np.arange(n), 1, 2))
    m = retrieval_metrics(q, eye)
    assert m["R@1"] == pytest.approx(2 / 6) and m["R@5"] == 1.0 and m["medR"] == 2.0

    # Graded: query i = sum_k w_k e_{(i + k) mod n} with decreasing weights and the true item at offset r_i.
    n = 8
    eye = np.eye(n)
    wanted = np.array([1, 3, 2, 8, 5, 1, 4, 6])
    q = np.zeros((n, n))
    for i in range(n):
        weights = np.linspace(2.0, 1.0, n)  # strictly decreasing: offset k has the (k+1)-th best score
        others = [j for j in range(n) if j != i]
        order = [*others[: wanted[i] - 1], i, *others[wanted[i] - 1 :]]
        for w, j in zip(weights, order, strict=True):
            q[i, j] = w
    ranks, _ = paired_ranks(q, eye)
    np.testing.assert_array_equal(ranks, wanted)
    assert retrieval_metrics(q, eye)["medR"] == float(np.median(wanted))


def test_ties_count_for_the_query() -> None:
    # Database rows 0..2 identical: queries 0..2 tie with two other items, and still rank 1.
    d = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    q = d.copy()
    ranks, back = paired_ranks(q, d)
    np.testing.assert_array_equal(ranks, [1, 1, 1, 1])
    np.testing.assert_array_equal(back, [1, 1, 1, 1])
    # One item strictly closer + one tie: rank 2, not 3.
    q = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    d = np.array([[1.0, 0.0], [1.0, 0.1], [1.0, 0.1]])  # query 1: row 2 ties its positive, row 0 is farther
    ranks, _ = paired_ranks(q, d)
    assert ranks[1] == 1
    d = np.array([[1.0, 1.0], [1.0, 0.1], [1.0, 1.0]])  # query 1: row 0 and 2 strictly closer
    ranks, _ = paired_ranks(q, d)
    assert ranks[1] == 3


def test_metrics_from_ranks() -> None:
    assert metrics_from_ranks(np.array([1, 2, 6, 11])) == {"medR": 4.0, "R@1": 0.25, "R@5": 0.5, "R@10": 0.75}


# -- against the brute-force twin -------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [8, 64, 1024])
def test_ranks_match_brute_force_random(chunk: int) -> None:
    x, y = _correlated(300, 24, 1.3, 1)
    rq, rd = paired_ranks(x, y, chunk_size=chunk)
    np.testing.assert_array_equal(rq, brute_ranks(x, y))
    np.testing.assert_array_equal(rd, brute_ranks(y, x))  # the transpose direction, from the same product
    assert retrieval_metrics(x, y, chunk_size=chunk) == brute_metrics(x, y)
    assert rq.max() > 10  # not a trivial case


@pytest.mark.parametrize("chunk", [7, 64, 1000])
def test_ranks_match_brute_force_with_many_exact_ties(chunk: int) -> None:
    x, y = _sign_vectors(257, 64, 2)
    y[10] = y[11]  # exact duplicates on top of the many exact score ties
    x[20] = x[21]
    rq, rd = paired_ranks(x, y, chunk_size=chunk)
    np.testing.assert_array_equal(rq, brute_ranks(x, y))
    np.testing.assert_array_equal(rd, brute_ranks(y, x))
    pq, pd = paired_ranks(x, y, chunk_size=chunk, ties="pessimistic")
    np.testing.assert_array_equal(pq, brute_ranks(x, y, pessimistic=True))
    np.testing.assert_array_equal(pd, brute_ranks(y, x, pessimistic=True))
    assert (pq > rq).mean() > 0.2  # many ties: the rule matters
    # fp32 inputs: every value still exact, same answer.
    rq32, rd32 = paired_ranks(x.astype(np.float32), y.astype(np.float32), chunk_size=chunk)
    np.testing.assert_array_equal(rq32, rq)
    np.testing.assert_array_equal(rd32, rd)


def test_chunked_equals_unchunked_fp32() -> None:
    x, y = _correlated(700, 48, 1.0, 3, dtype=np.float32)
    full = paired_ranks(x, y, chunk_size=10**6)
    for chunk in (16, 128, 256):
        part = paired_ranks(x, y, chunk_size=chunk)
        np.testing.assert_array_equal(part[0], full[0])
        np.testing.assert_array_equal(part[1], full[1])


def test_torch_and_numpy_inputs_agree() -> None:
    x, y = _correlated(100, 8, 1.0, 4, dtype=np.float32)
    assert retrieval_metrics(torch.from_numpy(x), torch.from_numpy(y)) == retrieval_metrics(x, y)


def test_bad_input_is_a_clear_error() -> None:
    x, y = _correlated(10, 4, 1.0, 5)
    with pytest.raises(ValueError, match="equal shapes"):
        retrieval_metrics(x, y[:5])
    y[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(x, y)
    with pytest.raises(ValueError, match="2-D"):
        retrieval_metrics(x[0], x[0])
    with pytest.raises(ValueError, match="larger"):
        bagged_metrics(x, x, 11, 2, np.random.default_rng(0))


# -- bags ---------------------------------------------------------------------------------------------
def test_bagged_matches_per_bag_brute_force() -> None:
    x, y = _correlated(400, 16, 1.2, 6)
    res = bagged_metrics(x, y, 100, 5, np.random.default_rng(7), chunk_size=32)
    bags = bag_indices(400, 100, 5, np.random.default_rng(7))
    for direction, (q, d) in {"image_to_recipe": (x, y), "recipe_to_image": (y, x)}.items():
        per = [brute_metrics(q[b], d[b]) for b in bags]
        for m in ("medR", "R@1", "R@5", "R@10"):
            vals = np.array([p[m] for p in per])
            assert res[direction][m]["mean"] == pytest.approx(vals.mean())
            assert res[direction][m]["std"] == pytest.approx(vals.std())


def test_bagged_deterministic_for_rng_and_sensitive_to_it() -> None:
    x, y = _correlated(500, 16, 1.5, 8)
    a = bagged_metrics(x, y, 100, 4, np.random.default_rng(1))
    b = bagged_metrics(x, y, 100, 4, np.random.default_rng(1))
    c = bagged_metrics(x, y, 100, 4, np.random.default_rng(2))
    assert a == b
    assert a != c


def test_bag_indices_random_and_fixed() -> None:
    rng = np.random.default_rng(0)
    bags = bag_indices(1000, 300, 5, rng, "random")
    assert len(bags) == 5 and all(len(set(b.tolist())) == 300 for b in bags)  # no repeats inside a bag
    assert all(b.min() >= 0 and b.max() < 1000 for b in bags)
    fixed = bag_indices(1000, 300, 5, rng, "fixed")
    assert len(fixed) == 3  # capped at N // bag_size
    flat = np.concatenate(fixed)
    assert len(set(flat.tolist())) == len(flat) == 900  # disjoint
    np.testing.assert_array_equal(fixed[1], np.arange(300, 600))  # consecutive
    with pytest.raises(ValueError):
        bag_indices(10, 5, 1, rng, "other")  # type: ignore[arg-type]


def test_fixed_mode_metrics() -> None:
    x, y = _correlated(250, 8, 1.0, 9)
    res = bagged_metrics(x, y, 100, 10, np.random.default_rng(0), mode="fixed")
    per = [brute_metrics(x[i : i + 100], y[i : i + 100]) for i in (0, 100)]
    assert res["image_to_recipe"]["R@1"]["mean"] == pytest.approx(np.mean([p["R@1"] for p in per]))


def test_evaluate_embeddings_settings_and_table() -> None:
    x, y = _correlated(1200, 16, 1.0, 10, dtype=np.float32)
    cfg = EvalConfig(bag_sizes=(1000, 10000), n_bags=2, seed=3)
    res = evaluate_embeddings(x, y, cfg)
    assert set(res) == {"1k", "notes"} and "10000" in res["notes"][0]
    assert set(res["1k"]) == {"image_to_recipe", "recipe_to_image", "exact_ties"}
    # Independent of which other settings are evaluated.
    assert evaluate_embeddings(x, y, cfg, bag_sizes=[1000])["1k"] == res["1k"]
    res2 = evaluate_embeddings(x, y, cfg, bag_sizes=[100, 1000])
    assert set(res2) == {"100", "1k"} and res2["1k"] == res["1k"]
    table = format_table(res2)
    r1 = res2["1k"]["image_to_recipe"]["R@1"]["mean"] * 100
    assert f"{r1:6.1f}" in table and "medR" in table and "recipe_to_image" in table
    # Everything too large: the whole (small) set as one bag.
    small = evaluate_embeddings(x[:50], y[:50], cfg)
    assert "50" in small and small["50"]["image_to_recipe"]["R@1"]["std"] == 0.0
    assert small["50"]["image_to_recipe"]["R@1"]["mean"] == brute_metrics(x[:50], y[:50])["R@1"]
    assert "note:" in format_table(small)


# -- exact duplicates at the paper's size, against an exact twin --------------------------------------------
def _unit(x: np.ndarray) -> torch.Tensor:
    """Unit rows in fp32 by the same formula as tnlbt.metrics (so the twin multiplies the same numbers)."""
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return t / torch.linalg.vector_norm(t, dim=1, keepdim=True).clamp_min(1e-12)


def exact_twin(q: np.ndarray, d: np.ndarray, rows: int = 1000) -> dict[str, np.ndarray]:
    """Closer/tied counts in both directions from the full fp32 similarity matrix S, ranked by plain compares
    ``S[i, j] > S[i, i]`` (rows) and ``S[i, j] > S[j, j]`` (columns).

    The twin itself is exact on duplicates: S is the product of the *distinct* rows only, expanded by index,
    so two copies of a vector have literally the same similarity to everything (a product computed twice,
    at two positions, may round differently, which is the bug under test). Memory: the distinct product plus
    ``rows x N`` at a time."""
    uq, iq = np.unique(q, axis=0, return_inverse=True)
    ud, idd = np.unique(d, axis=0, return_inverse=True)
    iq, idd = iq.ravel(), idd.ravel()
    u = torch.mm(_unit(uq), _unit(ud).T).numpy()
    n = len(q)
    own = u[iq, idd]
    out = {k: np.zeros(n, dtype=np.int64) for k in ("row_closer", "row_tied", "col_closer", "col_tied")}
    for s in range(0, n, rows):
        sim = u[iq[s:s + rows]][:, idd]
        out["row_closer"][s:s + rows] = np.count_nonzero(sim > own[s:s + rows, None], axis=1)
        out["row_tied"][s:s + rows] = np.count_nonzero(sim == own[s:s + rows, None], axis=1) - 1
        out["col_closer"] += np.count_nonzero(sim > own[None, :], axis=0)
        out["col_tied"] += np.count_nonzero(sim == own[None, :], axis=0)
    out["col_tied"] -= 1
    return out


def _with_duplicates(n: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Correlated fp32 pairs whose ranks spread (pair cosine ~ 3 / sqrt(dim), a few times the spread of
    unrelated pairs), with Recipe1M's kinds of exact duplicates: duplicated pairs, shared photos (image rows
    only), duplicate recipes (recipe rows only), and one photo shared by 80 pairs (a group larger than the
    pair-wise path handles) of which 40 also share the recipe."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim), dtype=np.float32)
    y = x + np.float32(np.sqrt(dim) / 3) * rng.standard_normal((n, dim), dtype=np.float32)
    for frac, sides in ((0.10, (x, y)), (0.05, (x,)), (0.05, (y,))):
        src, dst = rng.choice(n, int(frac * n)), rng.choice(n, int(frac * n))
        for a in sides:
            a[dst] = a[src]
    big = rng.choice(n, 80, replace=False)
    x[big] = x[big[0]]
    y[big[:40]] = y[big[0]]
    return x, y


@contextlib.contextmanager
def _torch_threads(k: int) -> Iterator[None]:
    """More intra-op threads than this box's cores: MKL then splits products differently, which is how the
    old separately computed diagonal came to differ by an ulp from the block products (as on bigger
    machines); oversubscription only costs time here."""
    before = torch.get_num_threads()
    torch.set_num_threads(k)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _assert_counts_match(x: np.ndarray, y: np.ndarray, chunks: tuple[int, ...], ranks_too: bool) -> None:
    """Closer and tied counts in both directions equal the exact twin's, at every block size; with
    ``ranks_too`` also both tie rules through paired_ranks and the metrics of retrieval_metrics."""
    want = exact_twin(x, y)
    for chunk in chunks:
        row, col = positive_counts(x, y, chunk_size=chunk)
        np.testing.assert_array_equal(row.closer, want["row_closer"])
        np.testing.assert_array_equal(row.tied, want["row_tied"])
        np.testing.assert_array_equal(col.closer, want["col_closer"])
        np.testing.assert_array_equal(col.tied, want["col_tied"])
        # Every true item with an exact duplicate among the candidates is tied, and flagged.
        assert np.all(row.tied[row.duplicate] >= 1) and np.all(col.tied[col.duplicate] >= 1)
        assert row.duplicate.sum() > 0.1 * len(x) and col.duplicate.sum() > 0.1 * len(x)
    if not ranks_too:
        return
    for ties, extra in (("optimistic", 0), ("pessimistic", 1)):
        rq, rd = paired_ranks(x, y, chunk_size=chunks[0], ties=ties)  # type: ignore[arg-type]
        np.testing.assert_array_equal(rq, 1 + want["row_closer"] + extra * want["row_tied"])
        np.testing.assert_array_equal(rd, 1 + want["col_closer"] + extra * want["col_tied"])
        assert retrieval_metrics(x, y, chunks[0], ties) == metrics_from_ranks(rq)  # type: ignore[arg-type]
        assert retrieval_metrics(y, x, chunks[0], ties) == metrics_from_ranks(rd)  # type: ignore[arg-type]


@pytest.mark.parametrize("dim", [64, 256, 512, 1024, 2048])
def test_exact_duplicates_match_exact_twin(dim: int) -> None:
    """Issue 11: at D = 1024 the column direction's diagonal came from separate products that round one ulp
    differently, so a duplicate of the true item counted as strictly closer. Both directions must now agree
    with the exact twin entry for entry: closer and tied counts, both tie rules, at any block size."""
    x, y = _with_duplicates(1000, dim, seed=dim)
    with _torch_threads(8):
        _assert_counts_match(x, y, (1024, 300), ranks_too=True)
    rq, _ = paired_ranks(x, y)
    assert 1 < np.median(rq) < 200  # a real ranking, not all 1 nor all random


def test_exact_duplicates_match_exact_twin_10k() -> None:
    """The 10k setting at D = 1024 (one bag of the paper's protocol), default block size."""
    x, y = _with_duplicates(10_000, 1024, seed=11)
    _assert_counts_match(x, y, (1024,), ranks_too=False)


def test_tie_rules_on_hand_made_ties() -> None:
    # Database rows 0..2 identical, query 0..2 identical to them: each ties with two other items.
    d = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    q = d.copy()
    ranks, back = paired_ranks(q, d, ties="pessimistic")
    np.testing.assert_array_equal(ranks, [3, 3, 3, 1])
    np.testing.assert_array_equal(back, [3, 3, 3, 1])
    assert retrieval_metrics(q, d, ties="pessimistic")["R@1"] == 0.25
    assert retrieval_metrics(q, d)["R@1"] == 1.0
    row, col = positive_counts(q, d)
    for counts in (row, col):
        np.testing.assert_array_equal(counts.tied, [2, 2, 2, 0])
        np.testing.assert_array_equal(counts.duplicate, [True, True, True, False])
    # Query 1 = (1, 0): its true item (0.6, 0.8) scores 0.6; (0.8, 0.6) is strictly closer; (0.6, -0.8) is a
    # different vector with bitwise the same score: a tie that no duplicate test would find.
    q = np.array([[0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]])
    d = np.array([[0.8, 0.6], [0.6, 0.8], [0.6, -0.8]])
    row, _ = positive_counts(q, d)
    assert (row.closer[1], row.tied[1], bool(row.duplicate[1])) == (1, 1, False)
    assert paired_ranks(q, d)[0][1] == 2 and paired_ranks(q, d, ties="pessimistic")[0][1] == 3
    with pytest.raises(ValueError, match="tie rule"):
        paired_ranks(q, d, ties="random")  # type: ignore[arg-type]


def test_duplicate_groups() -> None:
    x = np.arange(24, dtype=np.float32).reshape(6, 4)
    assert duplicate_groups(x) is None
    x[3] = x[1]
    x[5] = x[1]
    x[4, 2] = -0.0
    x[2, 2] = 0.0
    x[4, :2], x[4, 3] = x[2, :2], x[2, 3]  # rows 2 and 4 differ only in the sign of a zero: not the same bits
    np.testing.assert_array_equal(duplicate_groups(x), [0, 1, 2, 1, 4, 1])
    # Identical in every probed column, different elsewhere: the full-row check tells them apart.
    wide = np.zeros((3, 1000), dtype=np.float32)
    wide[1, 1] = 1.0
    wide[2] = wide[0]
    np.testing.assert_array_equal(duplicate_groups(wide), [0, 1, 0])


def test_bagged_reports_exact_ties() -> None:
    """The tie report counts queries per direction over the bags; with every row in a duplicated pair every
    query is tied (and a duplicate positive); the pessimistic rule then ranks each at 2."""
    x, y = _correlated(50, 16, 1.0, 12, dtype=np.float32)
    x2, y2 = np.concatenate([x, x]), np.concatenate([y, y])
    res = bagged_metrics(x2, y2, 100, 1, np.random.default_rng(0), chunk_size=32)
    for direction in ("image_to_recipe", "recipe_to_image"):
        rep = res["exact_ties"][direction]
        assert rep == {"queries": 100, "tied_queries": 100, "fraction": 1.0, "duplicate_positives": 100}
    assert res["exact_ties"]["rule"] == "optimistic"
    pess = bagged_metrics(x2, y2, 100, 1, np.random.default_rng(0), chunk_size=32, ties="pessimistic")
    assert pess["exact_ties"]["rule"] == "pessimistic"
    assert pess["image_to_recipe"]["R@1"]["mean"] == 0.0 < res["image_to_recipe"]["R@1"]["mean"]
    assert pess["image_to_recipe"]["medR"]["mean"] == res["image_to_recipe"]["medR"]["mean"] + 1
    # Summed over bags; no ties without duplicates in generic data.
    clean = bagged_metrics(x, y, 40, 3, np.random.default_rng(0))
    assert clean["exact_ties"]["recipe_to_image"] == {"queries": 120, "tied_queries": 0, "fraction": 0.0,
                                                      "duplicate_positives": 0}
    table = format_table({"100": res})
    assert "ties exactly" in table and "100.0%" in table
    assert "ties exactly" not in format_table({"40": clean})


def test_eval_config_tie_rule() -> None:
    x, y = _correlated(60, 8, 1.0, 13, dtype=np.float32)
    x = np.concatenate([x, x])
    y = np.concatenate([y, y])
    opt = evaluate_embeddings(x, y, EvalConfig(bag_sizes=(100,), n_bags=2))
    pess = evaluate_embeddings(x, y, EvalConfig(bag_sizes=(100,), n_bags=2, ties="pessimistic"))
    assert pess["100"]["exact_ties"]["rule"] == "pessimistic"
    assert pess["100"]["image_to_recipe"]["R@1"]["mean"] < opt["100"]["image_to_recipe"]["R@1"]["mean"]
    with pytest.raises(ConfigError, match="ties"):  # the loader checks Literal choices
        Config.from_dict({"eval": {"ties": "random"}})


def _ulp_jitter(real_mm: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``torch.mm`` whose every result is moved by -1, 0 or +1 ulp, differently in every call and at every
    position: a BLAS that rounds the same dot product differently in different blocks, tiles or threads."""
    calls = iter(range(10**9))

    def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = real_mm(a, b)
        step = torch.randint(-1, 2, out.shape, generator=torch.Generator().manual_seed(next(calls)))
        return torch.nextafter(out, out + step.to(out.dtype))

    return mm


def test_duplicates_tie_whatever_the_blas_rounding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Exactness by construction, not by luck of tiling: with products that round differently wherever they
    are computed, every exact duplicate still ties with the true item in both directions (the old kernel
    counted about a third of them as strictly closer under this jitter). Only near ties within an ulp could
    move, and these data have none that matter: the counts equal the unjittered twin's."""
    x, y = _with_duplicates(1000, 1024, seed=5)
    want = exact_twin(x, y)
    monkeypatch.setattr(torch, "mm", _ulp_jitter(torch.mm))
    for chunk in (1024, 128):
        row, col = positive_counts(x, y, chunk_size=chunk)
        np.testing.assert_array_equal(row.closer, want["row_closer"])
        np.testing.assert_array_equal(col.closer, want["col_closer"])
        np.testing.assert_array_equal(row.tied, want["row_tied"])
        np.testing.assert_array_equal(col.tied, want["col_tied"])
