"""Hierarchical Transformer recipe encoder, as H-T (Salvador et al., CVPR 2021; method-research.md §2).

One word embedding is shared by five ``SingleTransformerEncoder``s: title, ingredient lines, instruction lines
(word level), and two mergers over the line embeddings (ingredients, instructions). Each encoder adds learned
positions (xavier-normal init, dropout), runs ``nn.TransformerEncoder`` (post-LN, ReLU: PyTorch's defaults,
which H-T used) and pools with a masked mean over real positions.

Padding rules (where H-T's ``mask[:, 0]`` trick is made exact):
* attention: a sequence with no real position would make every attention score ``-inf`` and the softmax NaN,
  so such rows get position 0 unmasked for attention only;
* pooling: the mean runs over real positions only and an empty sequence pools to exactly 0, so the unmasked
  pad never leaks into the result;
* lines: only non-empty lines go through the word-level encoder (empty lines are the bulk of a padded
  ``(B, N, T)`` batch, so this saves most of the work); empty lines get a 0 embedding and are masked out of
  the merger.
* packing (``RecipeEncoder.pack_lines``, set by ``train.pack_lines`` on a training model): the word-level encoders'
  lines are packed several to a row (:func:`pack_lines`), each line attending only to itself with its own
  positions, so the padding of short lines (half of the ingredient tokens of a batch) is not computed. Same
  maths per line as the padded batch, up to float summation order. In eval mode a packing encoder packs only
  where PyTorch's nested-tensor fast path (which skips padding by itself) cannot run: under CPU autocast, i.e.
  the bf16 validation of every training epoch, which otherwise computes every pad token; fp32 and CUDA
  evaluation and inference keep the padded path.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from torch import Tensor, nn

# The parts of a recipe, each encoded on its own (losses and the training step use the same names).
COMPONENTS = ("title", "ingredients", "instructions")


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` (B, L, W) over positions where ``mask`` (B, L) is True; rows without any give 0."""
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


def attention_padding_mask(real: Tensor) -> Tensor:
    """``key_padding_mask`` (True = ignore) for ``real`` (B, L) with position 0 unmasked in all-padding rows.

    Those rows' outputs are garbage but finite; :func:`masked_mean` gives them weight 0.
    """
    pad = ~real
    if pad.shape[1] > 0:
        # Branch-free (no host sync on GPU): position 0 stays masked only where the row has a real position.
        pad[:, 0] = pad[:, 0] & real.any(dim=1)
    return pad


@dataclass
class LinePacking:
    """Where the real tokens of ``n`` lines go when packed into ``n_bins`` rows of ``width`` slots."""

    line: Tensor  # (n_tok,) the line of each real token (row-major over the lines)
    col: Tensor  # (n_tok,) its column in the line: its position
    slot: Tensor  # (n_tok,) its flat slot in (n_bins * width)
    lengths: Tensor  # (n,) real tokens per line
    n_bins: int
    width: int


def pack_lines(real: Tensor) -> LinePacking:
    """Pack lines (``real`` (n, T) bool, every line with a real token) into rows of T slots: the longest line
    left opens a row and the shortest lines left fill it while they fit (two pointers over the lines sorted
    by length; each row holds whole lines, in any order). One host sync (the lengths)."""
    n, width = real.shape
    lengths = real.sum(dim=1)
    lens = lengths.tolist()
    order = sorted(range(n), key=lambda i: -lens[i])
    row, offset = [0] * n, [0] * n
    lo, hi, n_bins = 0, n - 1, 0
    while lo <= hi:
        a = order[lo]
        row[a], used = n_bins, lens[a]
        lo += 1
        while lo <= hi and used + lens[order[hi]] <= width:
            b = order[hi]
            row[b], offset[b] = n_bins, used
            used += lens[b]
            hi -= 1
        n_bins += 1
    line, col = real.nonzero(as_tuple=True)
    rank = (real.cumsum(dim=1) - 1)[line, col]
    start = torch.tensor(row, device=real.device) * width + torch.tensor(offset, device=real.device)
    return LinePacking(line, col, start[line] + rank, lengths, n_bins, width)


def packed_attention_mask(pk: LinePacking, heads: int) -> Tensor:
    """(n_bins * heads, width, width) bool, True = masked: a token attends to the tokens of its own line only;
    empty slots attend to themselves (never a row without a key, which would be NaN)."""
    seg = torch.full((pk.n_bins * pk.width,), -1, dtype=torch.long, device=pk.line.device)
    seg = seg.index_copy(0, pk.slot, pk.line).view(pk.n_bins, pk.width)
    allowed = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] >= 0)
    allowed |= torch.eye(pk.width, dtype=torch.bool, device=seg.device)
    return (~allowed).repeat_interleave(heads, dim=0)


_FASTPATH_LOCK = threading.Lock()


def fastpath_blocked(device: torch.device) -> bool:
    """True where ``nn.TransformerEncoder``'s fused fast path must stay off: CPU autocast (see below)."""
    return device.type != "cuda" and torch.is_autocast_enabled(device.type)


def _run_without_fastpath(encoder: nn.TransformerEncoder, h: Tensor, pad: Tensor | None,
                          mask: Tensor | None = None) -> Tensor:
    """Run ``encoder`` with PyTorch's fused fast path off.

    torch 2.14 checks only CUDA autocast before taking the fused kernel, so CPU bf16 autocast inference (what
    the index/serve code does) fails with "expected scalar type Float but found BFloat16". The switch is a
    process-wide flag, hence the lock: a concurrent caller must not turn it back on mid-run.
    """
    with _FASTPATH_LOCK:
        before = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            return encoder(h, mask=mask, src_key_padding_mask=pad)
        finally:
            torch.backends.mha.set_fastpath_enabled(before)


class SingleTransformerEncoder(nn.Module):
    """Learned positions + dropout -> ``nn.TransformerEncoder`` -> masked mean (H-T's building block)."""

    def __init__(self, width: int, heads: int, layers: int, ff_mult: int, dropout: float,
                 max_positions: int) -> None:
        super().__init__()
        self.max_positions = max_positions
        self.pos = nn.Parameter(torch.empty(max_positions, width))
        nn.init.xavier_normal_(self.pos)
        self.drop = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(
            d_model=width, nhead=heads, dim_feedforward=width * ff_mult, dropout=dropout,
            activation="relu", batch_first=True, norm_first=False,
        )
        # Post-LN (norm_first=False) as H-T; it also keeps PyTorch's nested-tensor fast path in inference,
        # which skips padded positions entirely.
        self.encoder = nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=True)

    def forward(self, x: Tensor, real: Tensor) -> tuple[Tensor, Tensor]:
        """``x`` (B, L, W) embedded inputs, ``real`` (B, L) bool -> (pooled (B, W), tokens (B, L, W))."""
        length = x.shape[1]
        if length > self.max_positions:
            raise ValueError(f"sequence length {length} exceeds "
                             f"model.text_max_positions={self.max_positions}; "
                             "truncate the input (data.max_*_tokens, data.max_ingredients) or raise it")
        h = self.drop(x + self.pos[:length].to(x.dtype))
        pad = attention_padding_mask(real)
        if fastpath_blocked(h.device):
            h = _run_without_fastpath(self.encoder, h, pad)
        else:
            h = self.encoder(h, src_key_padding_mask=pad)
        return masked_mean(h, real), h

    def forward_packed(self, tokens: Tensor, pk: LinePacking) -> Tensor:
        """Embedded real tokens (n_tok, W) of lines packed as ``pk`` says -> pooled (n, W): per line the same
        as :meth:`forward` on the padded lines (positions from each token's column, attention within its
        line, mean over its tokens)."""
        if pk.width > self.max_positions:
            raise ValueError(f"sequence length {pk.width} exceeds model.text_max_positions={self.max_positions}")
        w = tokens.shape[-1]
        x = tokens + self.pos.index_select(0, pk.col).to(tokens.dtype)  # index_select: a cheap backward
        h = x.new_zeros(pk.n_bins * pk.width, w).index_copy(0, pk.slot, x).view(pk.n_bins, pk.width, w)
        h = self.drop(h)
        layer = self.encoder.layers[0]
        mask = packed_attention_mask(pk, layer.self_attn.num_heads)
        if fastpath_blocked(h.device):
            h = _run_without_fastpath(self.encoder, h, None, mask)
        else:
            h = self.encoder(h, mask=mask)
        out = h.reshape(-1, w).index_select(0, pk.slot).float()
        sums = out.new_zeros(pk.lengths.shape[0], w).index_add(0, pk.line, out)
        return (sums / pk.lengths.clamp(min=1).to(sums.dtype)[:, None]).to(h.dtype)


class RecipeEncoder(nn.Module):
    """H-T hierarchical recipe encoder: (title, ingredients, instructions) ids -> (B, D) plus components."""

    def __init__(self, vocab_size: int, width: int, heads: int, layers: int, ff_mult: int, dropout: float,
                 max_positions: int, embed_dim: int) -> None:
        super().__init__()
        self.width = width
        self.word_embedding = nn.Embedding(vocab_size, width)

        def enc() -> SingleTransformerEncoder:
            return SingleTransformerEncoder(width, heads, layers, ff_mult, dropout, max_positions)

        self.title_encoder = enc()
        self.ingredient_encoder = enc()
        self.instruction_encoder = enc()
        self.ingredient_merger = enc()
        self.instruction_merger = enc()
        self.proj = nn.Linear(3 * width, embed_dim)
        self.pack_lines = False  # pack the word-level lines (train.pack_lines; in eval mode see above)

    def encode_lines(self, ids: Tensor, word_enc: SingleTransformerEncoder,
                     merger: SingleTransformerEncoder) -> tuple[Tensor, Tensor, Tensor]:
        """``ids`` (B, N, T) -> (component (B, W), merged line outputs (B, N, W), line mask (B, N))."""
        B, N, T = ids.shape
        flat = ids.reshape(B * N, T)
        real_tok = flat.ne(0)
        line_real = real_tok.any(dim=1)
        lines = self.word_embedding.weight.new_zeros(B * N, self.width)
        keep = line_real.nonzero(as_tuple=True)[0]
        if keep.numel() > 0:
            sel = flat.index_select(0, keep)
            sel_real = real_tok.index_select(0, keep)
            # Drop the all-pad tail columns of the kept lines.
            t_max = int(sel_real.any(dim=0).nonzero().max()) + 1
            if self.pack_lines and (self.training or fastpath_blocked(flat.device)):
                pk = pack_lines(sel_real[:, :t_max])
                pooled = word_enc.forward_packed(self.word_embedding(sel[pk.line, pk.col]), pk)
            else:
                pooled, _ = word_enc(self.word_embedding(sel[:, :t_max]), sel_real[:, :t_max])
            lines = lines.index_copy(0, keep, pooled.to(lines.dtype))
        lines = lines.view(B, N, self.width)
        line_mask = line_real.view(B, N)
        comp, merged = merger(lines, line_mask)
        return comp, merged, line_mask

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Model batch (docs/contracts.md §3) -> {"title", "ingredients", "instructions" (B, W),
        "tokens" (B, T+N+M, W), "token_mask" (B, T+N+M) bool, "emb" (B, D) unnormalised}."""
        for k in COMPONENTS:
            if k not in batch:
                raise KeyError(f"recipe batch is missing {k!r}; expected keys {COMPONENTS}")
        title = batch["title"]
        t_real = title.ne(0)
        e_t, t_tok = self.title_encoder(self.word_embedding(title), t_real)
        e_g, g_tok, g_mask = self.encode_lines(batch["ingredients"], self.ingredient_encoder,
                                               self.ingredient_merger)
        e_s, s_tok, s_mask = self.encode_lines(batch["instructions"], self.instruction_encoder,
                                               self.instruction_merger)
        emb = torch.tanh(self.proj(torch.cat([e_t, e_g, e_s], dim=-1)))
        return {
            "emb": emb,
            "title": e_t,
            "ingredients": e_g,
            "instructions": e_s,
            # Token-level view for the Cross Decoder: title word outputs, then ingredient and instruction line
            # outputs of the mergers (the hierarchy's natural "tokens" at the recipe level).
            "tokens": torch.cat([t_tok, g_tok.to(t_tok.dtype), s_tok.to(t_tok.dtype)], dim=1),
            "token_mask": torch.cat([t_real, g_mask, s_mask], dim=1),
        }
