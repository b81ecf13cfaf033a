"""Two workers with the gathered (local-loss form) triplet == one worker on the concatenated global batch.

A real 2-process gloo group runs the real :class:`TrainStep` and the loop's gradient all-reduce; the
reference is
one process on the same global batch. Terms that are local by design (recipe SSL and ITM negatives come from a
worker's own micro-batch; the critics draw random interpolates; dropout draws per rank) are switched off, so
what is compared is exactly the large-batch machinery: gather with gradients, global normalisers, gradient
averaging, and the feature cache on top of it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

OFF = [
    "model.dropout=0.0",
    "model.cross_decoder=false",
    "model.generator=false",
    "model.adversarial=false",
    "loss.w_recipe_ssl=0",
]
V, NI, B = 40, 12, 6


def _batch(n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "title": torch.randint(3, V, (n, 5), generator=g),
        "ingredients": torch.randint(3, V, (n, 3, 4), generator=g),
        "instructions": torch.randint(3, V, (n, 2, 6), generator=g),
        "ingredient_labels": (torch.rand(n, NI, generator=g) < 0.3).float(),
        "has_image": torch.ones(n, dtype=torch.bool),
        "image": torch.randn(n, 3, 32, 32, generator=g),
    }


def _slice(b: dict[str, torch.Tensor], lo: int, hi: int) -> dict[str, torch.Tensor]:
    return {k: v[lo:hi] for k, v in b.items()}


def _grads(rank: int, world: int, k_steps: int, kind: str, out: str | None) -> tuple[dict, dict]:
    """Grad of the step on this rank's share of the global batch, averaged over ranks as the loop does."""
    from tnlbt.config import Config
    from tnlbt.distributed import all_reduce_grads
    from tnlbt.models import create_model
    from tnlbt.train.step import TrainStep

    cfg = Config.load("tiny_test", [*OFF, f"loss.triplet={kind}"])
    torch.manual_seed(0)
    model = create_model(cfg, V, NI).train()
    n_local = B * k_steps
    full = _batch(n_local * world, seed=1)
    mine = _slice(full, rank * n_local, (rank + 1) * n_local)
    micro = [_slice(mine, i * B, (i + 1) * B) for i in range(k_steps)]
    step = TrainStep(model, cfg, rank=rank, world_size=world)
    terms = step.paired_step(micro, margin=0.2)
    all_reduce_grads([p for p in model.parameters()], world)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    if out:
        torch.save({"terms": terms, "grads": grads}, out)
    return terms, grads


CASES = [("ht", 1), ("valid", 1), ("ht", 2)]


def _worker(rank: int, world: int, store: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        for kind, k_steps in CASES:  # one process group for every case: spawning is the slow part
            _grads(rank, world, k_steps, kind, os.path.join(out_dir, f"{kind}{k_steps}_r{rank}.pt"))
        dist.barrier()  # teardown together (see tests/test_distributed.py)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_worker_results(tmp_path_factory) -> Path:
    import torch.multiprocessing as mp

    d = tmp_path_factory.mktemp("dist")
    mp.start_processes(_worker, args=(2, str(d / "store"), str(d)), nprocs=2, join=True, start_method="spawn")
    return d


def _one_worker(kind: str, n: int) -> tuple[dict, dict]:
    """1 worker, the whole global batch as one micro-batch (no cache, no gather)."""
    from tnlbt.config import Config
    from tnlbt.models import create_model
    from tnlbt.train.step import TrainStep

    cfg = Config.load("tiny_test", [*OFF, f"loss.triplet={kind}"])
    torch.manual_seed(0)
    model = create_model(cfg, V, NI).train()
    terms = TrainStep(model, cfg).paired_step([_batch(n, seed=1)], margin=0.2)
    return terms, {n_: p.grad.clone() for n_, p in model.named_parameters() if p.grad is not None}


def _compare(two: dict, one_terms: dict, one_grads: dict) -> None:
    assert two["terms"]["retrieval"] == pytest.approx(one_terms["retrieval"], abs=1e-5)
    assert two["terms"]["trans_text"] == pytest.approx(one_terms["trans_text"], abs=1e-5)
    assert set(two["grads"]) == set(one_grads)
    worst = max(float((two["grads"][n] - one_grads[n]).abs().max()) for n in one_grads)
    assert worst < 1e-5, worst


pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="gloo file store test written for Linux")


@pytest.mark.parametrize("kind", ["ht", "valid"])
def test_two_workers_equal_one_worker_global_batch(two_worker_results: Path, kind: str) -> None:
    terms, grads = _one_worker(kind, 2 * B)
    for rank in (0, 1):  # every rank ends with the same averaged gradient
        _compare(torch.load(two_worker_results / f"{kind}1_r{rank}.pt"), terms, grads)
    # and 1 worker with the two halves as K=2 cached micro-batches
    c_terms, c_grads = _grads(0, 1, k_steps=2, kind=kind, out=None)
    _compare({"terms": c_terms, "grads": c_grads}, terms, grads)


def test_two_workers_with_feature_cache_equal_one_big_batch(two_worker_results: Path) -> None:
    """2 workers x K=2 micro-batches of 6 == 1 worker, one batch of 24."""
    terms, grads = _one_worker("ht", 4 * B)
    _compare(torch.load(two_worker_results / "ht2_r0.pt"), terms, grads)
