"""ACME's discriminators and the image -> ingredients head (method-research.md §4.3).

* :class:`ModalityDiscriminator`: WGAN-GP critic on (B, D) embeddings, MLP D -> h -> h/2 -> 1, LeakyReLU 0.2.
  No BatchNorm: the gradient penalty is per-sample, and BatchNorm would couple samples.
* :class:`ImageDiscriminator`: conditional image discriminator (StackGAN D_NET): stride-2 convs down to 4x4, a
  conditional logit on ``[x_code; mu]``, an unconditional logit, and an auxiliary ingredient branch (ACME's
  classification consistency, made multi-label because Recipe1M has no class labels here).
* :class:`IngredientHead`: image embedding (B, D) -> ingredient multi-label logits (ACME's image->recipe
  branch).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ModalityDiscriminator(nn.Module):
    def __init__(self, embed_dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(embed_dim, hidden), nn.LeakyReLU(0.2),
            nn.Linear(hidden, max(1, hidden // 2)), nn.LeakyReLU(0.2),
            nn.Linear(max(1, hidden // 2), 1),
        )

    def forward(self, emb: Tensor) -> Tensor:
        """(B, D) -> (B,) critic scores (image embeddings are "real", recipe embeddings "fake" in ACME)."""
        return self.net(emb).squeeze(-1)


class IngredientHead(nn.Module):
    def __init__(self, embed_dim: int, hidden: int, n_ingredients: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(embed_dim, hidden), nn.LeakyReLU(0.2),
            nn.Linear(hidden, max(1, hidden // 2)), nn.LeakyReLU(0.2),
            nn.Linear(max(1, hidden // 2), n_ingredients),
        )

    def forward(self, emb: Tensor) -> Tensor:
        """(B, D) -> (B, n_ingredients) logits (BCE-with-logits target: the multi-hot ingredient_labels)."""
        return self.net(emb)


def _down(cin: int, cout: int, bn: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 4, stride=2, padding=1, bias=not bn)]
    if bn:
        layers.append(nn.BatchNorm2d(cout))
    layers.append(nn.LeakyReLU(0.2, inplace=True))
    return nn.Sequential(*layers)


class ImageDiscriminator(nn.Module):
    """(B, 3, S, S) in [-1, 1] and mu (B, cond_dim) -> {"logits" (B,) conditional, "uncond_logits" (B,),
    "ingredient_logits" (B, n_ingredients)}. BCE-trained, so BatchNorm is fine here (no gradient penalty)."""

    def __init__(self, image_size: int, channels: int, cond_dim: int, n_ingredients: int) -> None:
        super().__init__()
        if image_size not in (64, 128):
            raise ValueError(f"model.gen_image_size must be 64 or 128, got {image_size}")
        self.image_size = image_size
        d = channels
        layers = [_down(3, d, bn=False), _down(d, d * 2), _down(d * 2, d * 4), _down(d * 4, d * 8)]  # 64 -> 4
        if image_size == 128:
            layers.append(_down(d * 8, d * 8))  # 128 -> 4
        self.encode = nn.Sequential(*layers)
        self.joint = nn.Sequential(nn.Conv2d(d * 8 + cond_dim, d * 8, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(d * 8), nn.LeakyReLU(0.2, inplace=True))
        self.cond_logit = nn.Conv2d(d * 8, 1, 4, stride=4)
        self.uncond_logit = nn.Conv2d(d * 8, 1, 4, stride=4)
        self.ingredient_logits = nn.Linear(d * 8, n_ingredients)

    def forward(self, images: Tensor, mu: Tensor) -> dict[str, Tensor]:
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            raise ValueError(f"image discriminator expects {self.image_size}px images, "
                             f"got {tuple(images.shape)}")
        x = self.encode(images)  # (B, 8d, 4, 4)
        tiled = mu[:, :, None, None].expand(-1, -1, 4, 4).to(x.dtype)
        h = self.joint(torch.cat([x, tiled], dim=1))
        return {
            "logits": self.cond_logit(h).flatten(),
            "uncond_logits": self.uncond_logit(x).flatten(),
            "ingredient_logits": self.ingredient_logits(x.mean(dim=(2, 3))),
        }
