"""Cross Decoder ("Cross-Modal Embedding Fusing Decoder"), training only; method-research.md §4.7 [INF].

The follow-up paper to TNLBT names the module but its text was not available, so this follows the public
analogue (T-Food's image-query decoder with an ALBEF-style ITM head): image tokens, projected to the text
width, are the queries of a transformer decoder whose memory is the recipe's tokens (title words, ingredient
lines, instruction lines); with ``cross_bidirectional`` a second decoder lets recipe tokens attend to the
image tokens. The outputs are mean-pooled, projected to D with tanh (the fused embedding that conditions the
generator) and read by a 2-way image-text matching head. Negatives are built by the caller by re-indexing the
token tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tnlbt.models.recipe_encoder import attention_padding_mask, masked_mean


class CrossDecoder(nn.Module):
    def __init__(self, image_width: int, width: int, heads: int, layers: int, ff_mult: int, dropout: float,
                 embed_dim: int, bidirectional: bool) -> None:
        super().__init__()
        self.bidirectional = bidirectional
        self.img_proj = nn.Sequential(nn.Linear(image_width, width), nn.LayerNorm(width))

        def dec() -> nn.TransformerDecoder:
            layer = nn.TransformerDecoderLayer(
                d_model=width, nhead=heads, dim_feedforward=width * ff_mult, dropout=dropout,
                activation="gelu", batch_first=True, norm_first=True,
            )
            # Pre-LN: the decoder is trained from scratch next to a pretrained backbone; pre-LN is the stabler
            # choice there (ALBEF/BERT-style fusion layers are post-LN but start from pretrained weights).
            return nn.TransformerDecoder(layer, num_layers=layers, norm=nn.LayerNorm(width))

        self.image_decoder = dec()
        self.recipe_decoder = dec() if bidirectional else None
        self.fuse = nn.Linear(width * (2 if bidirectional else 1), embed_dim)
        self.itm_head = nn.Linear(embed_dim, 2)

    def forward(self, img_tokens: Tensor, rec_tokens: Tensor, rec_mask: Tensor) -> dict[str, Tensor]:
        """``img_tokens`` (B, Li, W_img), ``rec_tokens`` (B, Lr, W), ``rec_mask`` (B, Lr) True = real ->
        {"fused": (B, D), "itm_logits": (B, 2)}."""
        if img_tokens.shape[0] != rec_tokens.shape[0] or rec_tokens.shape[:2] != rec_mask.shape:
            raise ValueError(f"cross_decode: batch mismatch img {tuple(img_tokens.shape)}, "
                             f"rec {tuple(rec_tokens.shape)}, mask {tuple(rec_mask.shape)}")
        rec_mask = rec_mask.bool()
        img = self.img_proj(img_tokens)
        rec_tokens = rec_tokens.to(img.dtype)
        rec_pad = attention_padding_mask(rec_mask)
        out = self.image_decoder(img, rec_tokens, memory_key_padding_mask=rec_pad)
        parts = [out.mean(dim=1)]
        if self.recipe_decoder is not None:
            rout = self.recipe_decoder(rec_tokens, img, tgt_key_padding_mask=rec_pad)
            parts.append(masked_mean(rout, rec_mask))
        fused = torch.tanh(self.fuse(torch.cat(parts, dim=-1)))
        return {"fused": fused, "itm_logits": self.itm_head(fused)}
