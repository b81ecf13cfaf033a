"""Distributed helpers: identity without a process group, and a real 2-process gloo run (CPU) in which the
local-loss triplet with autograd all-gather reproduces the single-process loss and DDP-averaged gradients."""

from __future__ import annotations

import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from tnlbt.distributed import all_gather_no_grad, all_reduce_mean, gather_with_grad, is_main, world_info
from tnlbt.losses import TripletLoss

WORLD = 2
B_LOCAL = 4


def test_helpers_without_process_group() -> None:
    assert not dist.is_initialized()
    assert world_info() == (0, 1)
    assert is_main()
    x = torch.randn(3, 2, requires_grad=True)
    assert gather_with_grad(x) is x  # identity: gradients untouched
    assert all_gather_no_grad(x) is x
    m = all_reduce_mean(torch.tensor(2.5))
    assert float(m) == 2.5 and not m.requires_grad
    assert float(all_reduce_mean(3)) == 3.0


def _data(kind: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    enc = nn.Linear(6, 5).double()
    u = torch.randn(WORLD * B_LOCAL, 6, dtype=torch.float64)
    v = u + 0.8 * torch.randn(WORLD * B_LOCAL, 6, dtype=torch.float64)
    return enc, u, v


def _worker(rank: int, port: int, out_dir: str, kinds: list[str]) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        results = {"world_info": world_info(), "is_main": is_main()}
        for kind in kinds:
            enc, u, v = _data(kind)
            sl = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
            r, w = world_info()
            out = TripletLoss(kind, rank=r, world_size=w)(enc(u[sl]), enc(v[sl]), 0.4)
            out["total"].backward()
            grads = []
            for p in enc.parameters():  # what DDP does: average parameter gradients over ranks
                g = p.grad.clone()
                dist.all_reduce(g)
                grads.append(g / w)
            results[kind] = {
                "loss_mean": float(all_reduce_mean(out["total"])),
                "active_fraction": float(out["active_fraction"]),
                "grads": grads,
            }
        gathered = gather_with_grad(torch.full((2, 1), float(rank)))
        results["gather"] = gathered.flatten().tolist()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        # Both ranks reach teardown together: a rank destroying its gloo group while the peer's last
        # collective is still draining aborts the peer ("terminate called without an active exception"),
        # seen once in CI on a loaded box.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gloo_two_processes_match_single_process() -> None:
    kinds = ["ht", "valid", "hard"]
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(
            _worker, args=(_free_port(), tmp, kinds), nprocs=WORLD, join=True, start_method="spawn"
        )
        res = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(WORLD)]
    assert [r["world_info"] for r in res] == [(0, 2), (1, 2)]
    assert [r["is_main"] for r in res] == [True, False]
    assert res[0]["gather"] == [0.0, 0.0, 1.0, 1.0]
    for kind in kinds:
        enc, u, v = _data(kind)
        ref = TripletLoss(kind)(enc(u), enc(v), 0.4)
        ref["total"].backward()
        for r in res:
            assert r[kind]["loss_mean"] == pytest.approx(float(ref["total"].detach()), rel=1e-6, abs=1e-6)
            assert r[kind]["active_fraction"] == pytest.approx(float(ref["active_fraction"]))
            for g, p in zip(r[kind]["grads"], enc.parameters(), strict=True):
                torch.testing.assert_close(g, p.grad, atol=1e-5, rtol=1e-5)
