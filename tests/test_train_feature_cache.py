"""GradCache (feature-cache accumulation) against its brute-force twin: one batch K times the size.

Toy encoders with dropout and batch norm make the check strict: without the RNG replay the second pass would
draw different dropout masks, and without the buffer restore the running statistics would move twice.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tnlbt.train.feature_cache import grad_cache_backward


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(
            nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 8)
        )
        self.b = nn.Sequential(nn.Linear(5, 16), nn.Dropout(0.5), nn.Tanh(), nn.Linear(16, 8))
        self.head = nn.Linear(8, 3)


def in_batch_loss(embs: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bidirectional hinge over all in-batch negatives (needs the whole batch: the reason for the cache)."""
    x, y = F.normalize(embs[0], dim=-1), F.normalize(embs[1], dim=-1)
    s = x @ y.T
    pos = s.diag()
    cost = (0.2 - pos[:, None] + s).clamp(min=0) + (0.2 - pos[None, :] + s).clamp(min=0)
    cost = cost * (1 - torch.eye(len(s)))
    loss = cost.mean()
    return loss, {"tri": loss.detach()}


def per_sample(k, mb, embs, aux):
    """A per-sample term (mean over the micro-batch), like the ingredient head or SSL terms."""
    logits = aux["model"].head(embs[0])
    loss = F.cross_entropy(logits, mb["y"])
    return loss, {"ce": loss.detach()}


def make_data(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a": torch.randn(n, 6, generator=g),
        "b": torch.randn(n, 5, generator=g),
        "y": torch.randint(0, 3, (n,), generator=g),
    }


def grads_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def run(model: Toy, batches: list[dict[str, torch.Tensor]], with_per_sample: bool, seed: int):
    def forward(mb):
        return (model.a(mb["a"]), model.b(mb["b"])), {"model": model}

    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    res = grad_cache_backward(
        batches, forward, in_batch_loss, per_sample if with_per_sample else None, module=model
    )
    return res, grads_of(model), {n: b.clone() for n, b in model.named_buffers()}


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("with_per_sample", [False, True])
def test_cache_equals_big_batch(k: int, with_per_sample: bool) -> None:
    torch.manual_seed(0)
    model = Toy().train()
    data = make_data(8 * k)
    micro = [{key: v[i * 8 : (i + 1) * 8] for key, v in data.items()} for i in range(k)]
    state0 = {n: t.clone() for n, t in model.state_dict().items()}

    # brute-force twin: one batch of 8k with the same dropout masks. The masks of the cached run are drawn per
    # micro-batch from consecutive RNG states, so the big batch is the K micro-batch forwards concatenated
    # (batch norm normalises per micro-batch in both), back-propagated in one graph.
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    outs = [(model.a(mb["a"]), model.b(mb["b"])) for mb in micro]
    big = [torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])]
    loss, _ = in_batch_loss(big)
    total = loss
    if with_per_sample:
        ce = sum(F.cross_entropy(model.head(o[0]), mb["y"]) for o, mb in zip(outs, micro, strict=True)) / k
        total = total + ce
    total.backward()
    ref_grads = grads_of(model)
    ref_buffers = {n: b.clone() for n, b in model.named_buffers()}

    model.load_state_dict(state0)
    res, grads, buffers = run(model, micro, with_per_sample, seed=123)
    assert torch.allclose(res.loss, total.detach(), atol=1e-6)
    assert set(grads) == set(ref_grads)
    for n in ref_grads:
        assert torch.allclose(grads[n], ref_grads[n], atol=1e-5, rtol=1e-5), n
    for n in ref_buffers:  # running stats moved once per micro-batch, not twice
        assert torch.allclose(buffers[n].float(), ref_buffers[n].float(), atol=1e-6), n


def test_cache_k1_is_plain_backward() -> None:
    torch.manual_seed(0)
    model = Toy().train()
    data = make_data(8)
    _, grads, _ = run(model, [data], True, seed=5)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    emb = (model.a(data["a"]), model.b(data["b"]))
    loss = in_batch_loss(list(emb))[0] + F.cross_entropy(model.head(emb[0]), data["y"])
    loss.backward()
    for n, p in model.named_parameters():
        assert torch.allclose(grads[n], p.grad, atol=1e-6), n


def test_cache_without_rng_replay_differs() -> None:
    """The replay is what makes it exact: with dropout the unreplayed second pass gives other gradients."""
    import tnlbt.train.feature_cache as fc

    torch.manual_seed(0)
    model = Toy().train()
    data = make_data(16)
    micro = [{key: v[i * 8 : (i + 1) * 8] for key, v in data.items()} for i in range(2)]
    state0 = {n: t.clone() for n, t in model.state_dict().items()}
    _, exact, _ = run(model, micro, False, seed=1)
    model.load_state_dict(state0)
    orig = fc.replay_rng
    try:
        import contextlib

        fc.replay_rng = lambda state, device=None: contextlib.nullcontext()
        _, broken, _ = run(model, micro, False, seed=1)
    finally:
        fc.replay_rng = orig
    assert any(not torch.allclose(exact[n], broken[n], atol=1e-5) for n in exact)


def test_cache_empty_raises() -> None:
    with pytest.raises(ValueError):
        grad_cache_backward([], lambda mb: ((), None), in_batch_loss)
