"""Thin helpers over ``torch.distributed``: who am I, autograd-aware gather, mean-reduce for logging.

Everything degrades to the identity when no process group is initialised, so the same training code runs
in one process, under ``torchrun`` or inside Ray Train workers (which initialise the group themselves).
No Ray here.

Gradient semantics of :func:`gather_with_grad` (what the losses rely on): the forward returns the
concatenation of every rank's tensor along dim 0 (rank order); the backward sums, over all ranks, the
gradient each rank computed for slot ``r`` of the gathered tensor and hands the sum to rank ``r`` (a
reduce-scatter). So the gradient arriving at rank r's local tensor is d(sum_s loss_s)/d(x_r). The losses
in :mod:`tnlbt.losses` are scaled with that in mind (see ``TripletLoss``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_info() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` when not distributed."""
    if not _initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def is_main() -> bool:
    """True on rank 0 (and in a plain single process)."""
    return world_info()[0] == 0


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather ``x`` along dim 0 with gradients flowing back to every rank's input (sum over ranks).

    Identity when not distributed or with one rank. Every rank must pass the same shape (pad or drop the
    last uneven batch before calling). Uses the functional collective (torch >= 2.13, recommended) and falls
    back to ``torch.distributed.nn.functional.all_gather``; both gave identical gradients with gloo
    (stack-notes §2.4).
    """
    if not _initialized() or dist.get_world_size() == 1:
        return x
    x = x.contiguous()
    try:
        from torch.distributed._functional_collectives import all_gather_single_autograd

        out = all_gather_single_autograd(x, 0, dist.group.WORLD)
        # The functional op may return an AsyncCollectiveTensor; wait so callers get a plain tensor.
        return out.wait() if hasattr(out, "wait") else out
    except ImportError:  # older torch
        import torch.distributed.nn.functional as dnnf

        return torch.cat(dnnf.all_gather(x), dim=0)


def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Plain all-gather along dim 0 (no autograd), e.g. for counts; identity when not distributed."""
    if not _initialized() or dist.get_world_size() == 1:
        return x
    x = x.detach().contiguous()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts, dim=0)


def all_reduce_mean(x: torch.Tensor | float) -> torch.Tensor:
    """Mean of ``x`` over ranks, detached (for logging); a float tensor (``x`` itself if not distributed)."""
    t = torch.as_tensor(x).detach().clone().float()
    if not _initialized() or dist.get_world_size() == 1:
        return t
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / dist.get_world_size()
