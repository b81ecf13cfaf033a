"""Dropout with a cheaper random mask on CPU (``train.fast_dropout``); the same maths as ``nn.Dropout``.

On CPU, ``torch.nn.functional.dropout`` draws one Bernoulli sample per element from the serial Mersenne
Twister (``bernoulli_``): in the demo step that single-threaded generator was the largest item of the profile
(18.6% of a bf16 step). :func:`keep_mask` draws one 64-bit word per *four* elements instead
(``random_`` over the full 64-bit range, the generator's cheapest call) and reads each 16-bit lane as a
uniform integer in [-32768, 32768): an element is dropped when its lane falls below a threshold. So

* the drop probability is ``round(p * 65536) / 65536`` (0.1 -> 0.1000061), and the kept elements are scaled by
  ``1 / (1 - that)``, so that ``E[dropout(x)] = x`` exactly, as with ``nn.Dropout``;
* each lane is a uniform 16-bit integer and the lanes are independent for any practical purpose (a 64-bit draw
  is two outputs of MT19937, which is 623-dimensionally equidistributed at 32-bit accuracy), so the elements'
  masks are independent Bernoulli draws; tests check the frequency per lane and the correlation of neighbours;
* it uses the default CPU generator, so ``torch.manual_seed``, ``fork_rng`` and the feature cache's RNG replay
  (:mod:`tnlbt.train.feature_cache`) reproduce the masks exactly as they do ``nn.Dropout``'s.

The masks differ from ``nn.Dropout``'s for the same seed (another stream), not in distribution; tests check
both (tests/test_models.py). Elsewhere than on CPU (CUDA has a fused Philox dropout kernel) and in eval mode,
:class:`FastDropout` is ``nn.Dropout``. Dropout inside ``nn.MultiheadAttention`` (on the attention weights, about
a tenth of the demo's dropped elements) is left to PyTorch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_LANES = 4  # int16 lanes per int64 word
_INT16_MIN = -(2**15)


def drop_threshold(p: float) -> tuple[int, float]:
    """(the int16 threshold below which an element is dropped, the keep scale 1 / (1 - effective p))."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    dropped = round(p * 65536)
    return _INT16_MIN + dropped, 65536.0 / (65536 - dropped)


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device | str = "cpu",
              generator: torch.Generator | None = None) -> tuple[Tensor, float]:
    """A bool keep-mask of ``shape`` (True = keep) with drop probability ~``p``, and the scale for kept
    elements. One 64-bit draw of the CPU generator per four elements."""
    threshold, scale = drop_threshold(p)
    n = 1
    for s in shape:
        n *= int(s)
    words = torch.empty((n + _LANES - 1) // _LANES, dtype=torch.int64, device=device)
    words.random_(-(2**63), None, generator=generator)  # from int64 min, no upper bound: all 64 bits
    return words.view(torch.int16)[:n].view(shape).ge(threshold), scale


def fast_dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """``F.dropout(x, p, training)`` with :func:`keep_mask`'s mask on CPU; ``F.dropout`` elsewhere."""
    if not training or p == 0.0 or x.device.type != "cpu":
        return F.dropout(x, p, training)
    mask, scale = keep_mask(x.shape, p, x.device)
    # where() is exact (x or 0) and needs no cast of the bool mask; the scale is applied once, in the input's
    # opmath, as native dropout does. Backward: where(mask, grad, 0) * scale, the same.
    return torch.where(mask, x, 0.0).mul_(scale)


class FastDropout(nn.Dropout):
    """``nn.Dropout`` (no parameters, same ``p``/``inplace`` attributes) with :func:`fast_dropout`'s mask."""

    def forward(self, x: Tensor) -> Tensor:
        if self.inplace or not self.training or x.device.type != "cpu":
            return super().forward(x)
        return fast_dropout(x, self.p, True)


def use_fast_dropout(module: nn.Module, enabled: bool = True) -> int:
    """Swap every plain ``nn.Dropout`` below ``module`` for a :class:`FastDropout` of the same ``p`` (or back,
    ``enabled=False``); returns how many were swapped. State dicts are unaffected (dropout has no state)."""
    src, dst = (nn.Dropout, FastDropout) if enabled else (FastDropout, nn.Dropout)
    swapped = 0
    for parent in module.modules():
        for name, child in list(parent.named_children()):
            if type(child) is src:
                new = dst(child.p, child.inplace)
                new.train(child.training)
                setattr(parent, name, new)
                swapped += 1
    return swapped
