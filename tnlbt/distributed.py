"""Every collective the training code uses, as thin helpers over ``torch.distributed``.

Who am I (:func:`world_info`, :func:`is_main`), the autograd-aware gather the losses use
(:func:`gather_with_grad`), a plain gather and a mean-reduce for logging, and the training loop's three
collectives: average the gradients (:func:`all_reduce_grads`), agree on a flag (:func:`any_rank`) and start
every replica from rank 0's weights (:func:`broadcast_model`). Everything degrades to the identity when no
process group is initialised or it has one rank, so the same training code runs in one process, under
``torchrun`` or inside Ray Train workers (which initialise the group themselves). No Ray here.

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


def _has_peers(world_size: int) -> bool:
    """True when a collective over ``world_size`` ranks has anyone to talk to (else the helpers are identities).

    The loop passes its backend's world size; the other helpers pass the process group's (1 without one).
    """
    return world_size > 1 and _initialized()


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather ``x`` along dim 0 with gradients flowing back to every rank's input (sum over ranks).

    Identity when not distributed or with one rank. Every rank must pass the same shape (pad or drop the
    last uneven batch before calling). Uses the functional collective (torch >= 2.13, recommended) and falls
    back to ``torch.distributed.nn.functional.all_gather``; both gave identical gradients with gloo
    (stack-notes §2.4).
    """
    if not _has_peers(world_info()[1]):
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
    if not _has_peers(world_info()[1]):
        return x
    x = x.detach().contiguous()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts, dim=0)


def all_reduce_mean(x: torch.Tensor | float) -> torch.Tensor:
    """Mean of ``x`` over ranks, detached (for logging); a float tensor (``x`` itself if not distributed)."""
    t = torch.as_tensor(x).detach().clone().float()
    if not _has_peers(world_info()[1]):
        return t
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / dist.get_world_size()


def all_reduce_grads(params: list[torch.nn.Parameter], world_size: int) -> None:
    """Average ``.grad`` over ranks with one flat all-reduce (one message instead of one per tensor)."""
    if not _has_peers(world_size):
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n


def any_rank(flag: bool, world_size: int, device: torch.device) -> bool:
    """True if ``flag`` is true on any rank (every rank gets the same answer, so they branch together)."""
    if not _has_peers(world_size):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def broadcast_model(model: torch.nn.Module, world_size: int) -> None:
    """Rank 0's parameters and buffers everywhere: all replicas start identical whatever their seeds."""
    if not _has_peers(world_size):
        return
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=0)
