"""Recipe -> image conditional generator (ACME's StackGAN-style translation branch; method-research.md §4.3).

Conditioning augmentation (CA-Net): ``Linear + GLU`` gives ``mu, logvar`` in R^gen_cond_dim and ``c = mu +
sigma * eps``. ``[c; z]`` (z ~ N(0, I), ``gen_noise_dim``) -> FC -> 4x4 map with ``16 * gen_channels``
channels -> 4 up-blocks (nearest x2, conv3x3, BatchNorm, GLU) -> 64x64 -> conv3x3 -> tanh. For 128 px a second
stage follows ACME's: the 64x64 code is joined with ``c`` (tiled), mixed by a conv, two residual blocks, and
one more up-block. Output images are in [-1, 1].
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class GLU(nn.Module):
    """Channel-halving gated linear unit (StackGAN uses it after every conv)."""

    def forward(self, x: Tensor) -> Tensor:
        a, b = x.chunk(2, dim=1)
        return a * torch.sigmoid(b)


def up_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="nearest"),
        nn.Conv2d(cin, cout * 2, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout * 2),
        GLU(),
    )


class ResBlock(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(ch, ch * 2, 3, padding=1, bias=False), nn.BatchNorm2d(ch * 2), GLU(),
            nn.Conv2d(ch, ch, 3, padding=1, bias=False), nn.BatchNorm2d(ch),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class CondAugment(nn.Module):
    """CA-Net: embedding (B, D) -> mu, logvar (B, cond_dim); c = mu + exp(logvar / 2) * eps."""

    def __init__(self, in_dim: int, cond_dim: int) -> None:
        super().__init__()
        self.cond_dim = cond_dim
        self.fc = nn.Linear(in_dim, cond_dim * 4)
        self.glu = GLU()

    def forward(self, emb: Tensor, sample: bool = True) -> tuple[Tensor, Tensor, Tensor]:
        h = self.glu(self.fc(emb))
        mu, logvar = h[:, : self.cond_dim], h[:, self.cond_dim:]
        if not sample:
            return mu, mu, logvar
        eps = torch.randn_like(mu)
        return mu + eps * torch.exp(0.5 * logvar), mu, logvar


class Generator(nn.Module):
    """(B, D) conditioning embedding -> {"image" (B, 3, S, S) in [-1, 1], "mu", "logvar" (B, cond_dim)}."""

    def __init__(self, in_dim: int, cond_dim: int, noise_dim: int, channels: int, image_size: int) -> None:
        super().__init__()
        if image_size not in (64, 128):
            raise ValueError(f"model.gen_image_size must be 64 or 128, got {image_size}")
        self.noise_dim = noise_dim
        self.image_size = image_size
        g = channels
        self.ca = CondAugment(in_dim, cond_dim)
        self.fc = nn.Sequential(nn.Linear(cond_dim + noise_dim, g * 16 * 4 * 4 * 2, bias=False),
                                nn.BatchNorm1d(g * 16 * 4 * 4 * 2), GLU())
        self.stage1 = nn.Sequential(up_block(g * 16, g * 8), up_block(g * 8, g * 4),
                                    up_block(g * 4, g * 2), up_block(g * 2, g))  # 4 -> 64
        self.g = g
        if image_size == 128:
            self.joint = nn.Sequential(nn.Conv2d(g + cond_dim, g * 2, 3, padding=1, bias=False),
                                       nn.BatchNorm2d(g * 2), GLU())
            self.stage2 = nn.Sequential(ResBlock(g), ResBlock(g), up_block(g, g // 2))
            out_ch = g // 2
        else:
            self.joint = None
            self.stage2 = None
            out_ch = g
        self.to_img = nn.Sequential(nn.Conv2d(out_ch, 3, 3, padding=1), nn.Tanh())

    def forward(self, cond_emb: Tensor, noise: Tensor | None = None,
                sample: bool | None = None) -> dict[str, Tensor]:
        """``sample`` (default: training mode) draws c = mu + sigma * eps; otherwise c = mu."""
        c, mu, logvar = self.ca(cond_emb, self.training if sample is None else sample)
        if noise is None:
            noise = torch.randn(cond_emb.shape[0], self.noise_dim, device=cond_emb.device, dtype=c.dtype)
        h = self.fc(torch.cat([c, noise.to(c.dtype)], dim=1)).view(-1, self.g * 16, 4, 4)
        h = self.stage1(h)
        if self.joint is not None and self.stage2 is not None:
            tiled = c[:, :, None, None].expand(-1, -1, h.shape[2], h.shape[3]).to(h.dtype)
            h = self.stage2(self.joint(torch.cat([h, tiled], dim=1)))
        return {"image": self.to_img(h), "mu": mu, "logvar": logvar}
