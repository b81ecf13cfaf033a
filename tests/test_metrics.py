"""Retrieval metrics against brute-force twins (full matrix + argsort) and hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tnlbt.config import EvalConfig
from tnlbt.metrics import (
    bag_indices,
    bagged_metrics,
    evaluate_embeddings,
    format_table,
    metrics_from_ranks,
    paired_ranks,
    retrieval_metrics,
)


# -- brute-force twin ---------------------------------------------------------------------------------
def brute_ranks(q: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Full similarity matrix, then sort every row; ties ordered in the query's favour (positive first)."""
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    dn = d / np.linalg.norm(d, axis=1, keepdims=True)
    sim = qn @ dn.T
    n = len(q)
    ranks = np.empty(n, dtype=np.int64)
    for i in range(n):
        not_pos = (np.arange(n) != i).astype(np.int64)
        order = np.lexsort((not_pos, -sim[i]))  # by similarity descending, then the positive first
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
    assert set(res["1k"]) == {"image_to_recipe", "recipe_to_image"}
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


def test_exact_duplicates_tie_in_fp32_across_blocks() -> None:
    """Duplicated photos / recipes (Recipe1M has them) must tie exactly in both directions even when the two
    copies fall in different similarity blocks: the diagonal has to round exactly like the main products."""
    x, y = _correlated(600, 64, 1.0, 11, dtype=np.float32)
    for src, dst in ((3, 500), (7, 450), (130, 131), (255, 256), (10, 599)):
        x[dst] = x[src]
        y[dst] = y[src]
    x[200] = x[20]  # a duplicated photo paired with a different recipe
    y[300] = y[30]
    for chunk in (128, 256, 1024):
        rq, rd = paired_ranks(x, y, chunk_size=chunk)
        np.testing.assert_array_equal(rq, brute_ranks(x.astype(np.float64), y.astype(np.float64)))
        np.testing.assert_array_equal(rd, brute_ranks(y.astype(np.float64), x.astype(np.float64)))
        assert rq[3] == rq[500] and rd[7] == rd[450]
