"""Feature-cache accumulation (GradCache): exact large-batch gradients with the memory of one micro-batch.

In-batch-negative losses (triplet, ITM negative sampling) do not survive plain gradient accumulation: each
micro-batch would only see its own negatives. GradCache (Gao et al. 2021; open_clip ``--accum-freq``)
splits the
step in two passes over K micro-batches:

1. **no-grad pass**: embed every micro-batch without building a graph, recording the RNG state before each
one;
2. **loss on the cache**: concatenate the K embeddings into leaf tensors that require grad, compute the
   in-batch loss on all of them (it may all-gather across workers too) and back-propagate to the leaves only;
3. **grad pass**: re-run each micro-batch *with* grad under the replayed RNG state (so dropout draws the same
   masks and the embeddings are bit-identical), and back-propagate ``sum(emb * cached_grad)`` — the chain rule
   through the cached gradient — together with that micro-batch's per-sample terms (divided by K, so they
   average over the K micro-batches like one batch K times the size would).

Batch-norm running statistics would be updated twice (once per pass); they are snapshotted before pass 1 and
restored after it, so the buffers move exactly as in one ordinary pass per micro-batch.

With K = 1 the recomputation buys nothing, so :func:`grad_cache_backward` runs a single ordinary pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class RngState:
    """CPU (and, where used, CUDA) generator states captured before a micro-batch's forward."""

    cpu: torch.Tensor
    cuda: list[torch.Tensor] | None


def capture_rng(device: torch.device | None = None) -> RngState:
    cuda = None
    if device is not None and device.type == "cuda":
        cuda = [torch.cuda.get_rng_state(device)]
    return RngState(cpu=torch.get_rng_state(), cuda=cuda)


@contextlib.contextmanager
def replay_rng(state: RngState, device: torch.device | None = None) -> Iterator[None]:
    """Run the block with the generators set to ``state``; the outer RNG stream is restored afterwards.

    ``fork_rng`` saves the current state and restores it on exit, so replaying micro-batch k does not disturb
    the random stream the rest of the step (and the next step) continues from.
    """
    devices = [device] if (device is not None and device.type == "cuda") else []
    with torch.random.fork_rng(devices=devices, enabled=True):
        torch.set_rng_state(state.cpu)
        if state.cuda is not None and devices:
            torch.cuda.set_rng_state(state.cuda[0], device)
        yield


def snapshot_buffers(module: nn.Module | None) -> dict[str, torch.Tensor]:
    """Copies of the batch-norm style buffers (running mean/var, num_batches_tracked)."""
    if module is None:
        return {}
    return {name: b.detach().clone() for name, b in module.named_buffers() if b is not None}


def restore_buffers(module: nn.Module | None, saved: dict[str, torch.Tensor]) -> None:
    if module is None or not saved:
        return
    with torch.no_grad():
        for name, b in module.named_buffers():
            if name in saved:
                b.copy_(saved[name])


# forward(micro_batch) -> (embeddings, aux): the embeddings the cached loss needs, plus anything the
# per-batch loss wants (token features, raw images, ...). Embeddings must have the micro-batch as dim 0.
ForwardFn = Callable[[Any], tuple[Sequence[torch.Tensor], Any]]
# cached_loss(concatenated embeddings) -> (scalar loss, named detached terms for logging)
CachedLossFn = Callable[[list[torch.Tensor]], tuple[torch.Tensor, dict[str, torch.Tensor]]]
# per_batch_loss(index, micro_batch, embeddings (with grad), aux) -> (scalar loss or None, named terms)
PerBatchLossFn = Callable[[int, Any, Sequence[torch.Tensor], Any],
                          tuple[torch.Tensor | None, dict[str, torch.Tensor]]]


@dataclass
class CacheResult:
    """What one cached step computed. ``terms`` are detached means over the micro-batches."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]
    embeddings: list[torch.Tensor]  # the (detached) concatenated embeddings the cached loss saw


def _accumulate(acc: dict[str, torch.Tensor], terms: dict[str, torch.Tensor], scale: float) -> None:
    for k, v in terms.items():
        v = v.detach().float() * scale
        acc[k] = acc[k] + v if k in acc else v


def grad_cache_backward(
    micro_batches: Sequence[Any],
    forward: ForwardFn,
    cached_loss: CachedLossFn,
    per_batch_loss: PerBatchLossFn | None = None,
    module: nn.Module | None = None,
    device: torch.device | None = None,
) -> CacheResult:
    """Back-propagate ``cached_loss(all embeddings) + mean_k per_batch_loss(k)`` into the parameters.

    Gradients accumulate into ``.grad`` (the caller zeroes them before and steps after). Returns the detached
    loss value and terms. With one micro-batch this is one ordinary forward/backward.
    """
    k_steps = len(micro_batches)
    if k_steps == 0:
        raise ValueError("grad_cache_backward needs at least one micro-batch")
    terms: dict[str, torch.Tensor] = {}

    if k_steps == 1:
        embs, aux = forward(micro_batches[0])
        embs = list(embs)
        loss, cterms = cached_loss(embs)
        _accumulate(terms, cterms, 1.0)
        total = loss
        if per_batch_loss is not None:
            extra, pterms = per_batch_loss(0, micro_batches[0], embs, aux)
            _accumulate(terms, pterms, 1.0)
            if extra is not None:
                total = total + extra
        total.backward()
        return CacheResult(loss=total.detach(), terms=terms, embeddings=[e.detach() for e in embs])

    # pass 1: embeddings without a graph, RNG recorded per micro-batch
    saved = snapshot_buffers(module)
    states: list[RngState] = []
    cached: list[list[torch.Tensor]] = []
    with torch.no_grad():
        for mb in micro_batches:
            states.append(capture_rng(device))
            embs, _ = forward(mb)
            cached.append([e.detach() for e in embs])
    restore_buffers(module, saved)
    sizes = [c[0].shape[0] for c in cached]

    # loss on the cache: gradients w.r.t. the embeddings only
    n_out = len(cached[0])
    leaves = [torch.cat([c[i] for c in cached], dim=0).requires_grad_(True) for i in range(n_out)]
    loss, cterms = cached_loss(leaves)
    _accumulate(terms, cterms, 1.0)
    loss.backward()
    grads = [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for leaf in leaves]
    grad_chunks = [g.split(sizes, dim=0) for g in grads]
    total_value = loss.detach()

    # pass 2: recompute with grad under the replayed RNG; chain rule through the cached gradients
    for k, mb in enumerate(micro_batches):
        with replay_rng(states[k], device):
            embs, aux = forward(mb)
            surrogate = sum((e * grad_chunks[i][k].to(e.dtype)).sum() for i, e in enumerate(embs))
            if per_batch_loss is not None:
                extra, pterms = per_batch_loss(k, mb, list(embs), aux)
                _accumulate(terms, pterms, 1.0 / k_steps)
                if extra is not None:
                    surrogate = surrogate + extra / k_steps
                    total_value = total_value + extra.detach() / k_steps
        surrogate.backward()
    return CacheResult(loss=total_value, terms=terms, embeddings=[leaf.detach() for leaf in leaves])
