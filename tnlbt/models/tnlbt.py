"""The TNLBT model: dual encoders for retrieval plus the training-only parts (docs/contracts.md §4).

Retrieval is dual-encoder: :meth:`TNLBT.encode_image` and :meth:`TNLBT.encode_recipe` are the only way
anything else gets embeddings. Training additionally uses the token/component outputs (:meth:`image_features`,
:meth:`recipe_features`), the recipe self-supervision projectors (H-T §3.2), the Cross Decoder with its ITM
head, and ACME's modality discriminator, ingredient head, conditional generator and image discriminator. Each
training-only part is switched by ``ModelConfig`` and is absent (``None``, no parameters) when off.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tnlbt.config import Config, ModelConfig
from tnlbt.models.cross_decoder import CrossDecoder
from tnlbt.models.discriminators import ImageDiscriminator, IngredientHead, ModalityDiscriminator
from tnlbt.models.generator import Generator
from tnlbt.models.image_encoder import ImageEncoder, build_image_transform
from tnlbt.models.recipe_encoder import COMPONENTS, RecipeEncoder

SSL_PAIRS = tuple(f"{a}->{b}" for a in COMPONENTS for b in COMPONENTS if a != b)


class TNLBT(nn.Module):
    """Image and recipe encoders into a D-dimensional joint space, plus switchable training-only parts."""

    def __init__(self, mcfg: ModelConfig, vocab_size: int, n_ingredients: int) -> None:
        super().__init__()
        if vocab_size < 4:
            raise ValueError(f"vocab_size must be >= 4 (<pad>, <start>, <end>, <unk>), got {vocab_size}")
        if n_ingredients < 1 and mcfg.ingredient_head:
            raise ValueError("n_ingredients must be >= 1 when model.ingredient_head is on")
        self.mcfg = mcfg
        self.vocab_size = vocab_size
        self.n_ingredients = n_ingredients
        W, D = mcfg.text_width, mcfg.embed_dim
        self.recipe_encoder = RecipeEncoder(vocab_size, W, mcfg.text_heads, mcfg.text_layers,
                                            mcfg.text_ff_mult, mcfg.dropout, mcfg.text_max_positions, D)
        self.image_encoder = ImageEncoder(mcfg.image_model, mcfg.image_size, D, mcfg.image_pretrained)
        # P[src->dst]: maps component src's embedding into dst's space (H-T's P[b][a] for query a, value b).
        self.ssl_proj = nn.ModuleDict({k: nn.Linear(W, W) for k in SSL_PAIRS})
        self.cross_decoder: CrossDecoder | None = None
        if mcfg.cross_decoder:
            self.cross_decoder = CrossDecoder(self.image_encoder.token_width, W, mcfg.cross_heads,
                                              mcfg.cross_layers, mcfg.text_ff_mult, mcfg.dropout, D,
                                              mcfg.cross_bidirectional)
        self.modality_disc = ModalityDiscriminator(D, mcfg.disc_hidden) if mcfg.adversarial else None
        self.ingredient_head = (IngredientHead(D, mcfg.ingredient_hidden, max(1, n_ingredients))
                                if mcfg.ingredient_head else None)
        self.generator: Generator | None = None
        self.image_disc: ImageDiscriminator | None = None
        if mcfg.generator:
            self.generator = Generator(D, mcfg.gen_cond_dim, mcfg.gen_noise_dim, mcfg.gen_channels,
                                       mcfg.gen_image_size)
            self.image_disc = ImageDiscriminator(mcfg.gen_image_size, mcfg.gen_channels, mcfg.gen_cond_dim,
                                                 max(1, n_ingredients))

    def forward(self, images: Tensor | None = None, batch: dict[str, Tensor] | None = None
                ) -> dict[str, dict[str, Tensor]]:
        """{"image": image_features(images), "recipe": recipe_features(batch)} for the inputs given (so the
        model can be wrapped by DDP or torch.compile; the named methods below are the contract)."""
        out: dict[str, dict[str, Tensor]] = {}
        if images is not None:
            out["image"] = self.image_features(images)
        if batch is not None:
            out["recipe"] = self.recipe_features(batch)
        return out

    # -- retrieval contract -----------------------------------------------------------------------------
    def image_features(self, images: Tensor) -> dict[str, Tensor]:
        """(B, 3, S, S) normalised images -> {"emb": (B, D) unnormalised, "tokens": (B, L, W_img)}."""
        return self.image_encoder(images)

    def recipe_features(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Model batch -> {"emb" (B, D) unnormalised, "title"/"ingredients"/"instructions" (B, W),
        "tokens" (B, L, W), "token_mask" (B, L) bool, True = real}."""
        return self.recipe_encoder(batch)

    def encode_image(self, images: Tensor, normalize: bool = True) -> Tensor:
        emb = self.image_encoder(images)["emb"]
        return F.normalize(emb, dim=-1) if normalize else emb

    def encode_recipe(self, batch: dict[str, Tensor], normalize: bool = True) -> Tensor:
        emb = self.recipe_encoder(batch)["emb"]
        return F.normalize(emb, dim=-1) if normalize else emb

    def image_transform(self, train: bool) -> Callable[[Any], Tensor]:
        """PIL.Image -> (3, S, S) float tensor with the backbone's own mean/std/interpolation/crop_pct."""
        return build_image_transform(self.image_encoder.data_config, self.mcfg.image_size, train)

    @property
    def data_config(self) -> dict[str, Any]:
        """The backbone's preprocessing: mean, std, interpolation, crop_pct, input_size."""
        return dict(self.image_encoder.data_config)

    # -- training-only parts ----------------------------------------------------------------------------
    def ssl_project(self, src: str, dst: str, x: Tensor) -> Tensor:
        """Project component ``src``'s embedding (B, W) into component ``dst``'s space (H-T §3.2)."""
        key = f"{src}->{dst}"
        if key not in self.ssl_proj:
            raise KeyError(f"no SSL projector {key!r}; components are {COMPONENTS}, src != dst")
        return self.ssl_proj[key](x)

    def ssl_project_many(self, pairs: list[tuple[str, str]], x: Tensor) -> Tensor:
        """:meth:`ssl_project` of P (src, dst) pairs at once: ``x`` (P, B, W) -> (P, B, W), one batched
        product with the P projectors' weights stacked."""
        mods = [self.ssl_proj[f"{a}->{b}"] for a, b in pairs]
        weight = torch.stack([m.weight for m in mods])  # (P, W_out, W_in)
        bias = torch.stack([m.bias for m in mods])[:, None, :]
        return torch.baddbmm(bias, x, weight.transpose(1, 2))

    def cross_decode(self, img_tokens: Tensor, rec_tokens: Tensor, rec_mask: Tensor) -> dict[str, Tensor]:
        """Fuse image tokens with recipe tokens -> {"fused": (B, D), "itm_logits": (B, 2)}, 1 = match."""
        if self.cross_decoder is None:
            raise RuntimeError("cross_decode needs model.cross_decoder=true")
        return self.cross_decoder(img_tokens, rec_tokens, rec_mask)

    def generate(self, cond_emb: Tensor, noise: Tensor | None = None, sample: bool | None = None
                 ) -> dict[str, Tensor]:
        """Recipe (or fused) embedding (B, D) -> {"image": (B, 3, G, G) in [-1, 1], "mu", "logvar"}."""
        if self.generator is None:
            raise RuntimeError("generate needs model.generator=true")
        return self.generator(cond_emb, noise, sample)

    def images_for_gan(self, images: Tensor) -> Tensor:
        """Encoder-normalised images (B, 3, S, S) -> (B, 3, G, G) in [-1, 1]: the real images for the image
        discriminator, on the generator's scale."""
        cfg = self.image_encoder.data_config
        mean = images.new_tensor(cfg["mean"]).view(1, 3, 1, 1)
        std = images.new_tensor(cfg["std"]).view(1, 3, 1, 1)
        x = (images * std + mean).clamp(0.0, 1.0) * 2.0 - 1.0
        g = self.mcfg.gen_image_size
        if x.shape[-1] != g or x.shape[-2] != g:
            x = F.interpolate(x, size=(g, g), mode="bilinear", align_corners=False, antialias=True)
        return x

    def freeze_backbone(self, flag: bool) -> None:
        """Freeze (no grad, run under no_grad) or unfreeze the image backbone (projection stays trainable)."""
        self.image_encoder.freeze(flag)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Disjoint parameter lists for the optimisers; every parameter is in exactly one group."""
        def params(m: nn.Module | None) -> list[nn.Parameter]:
            return list(m.parameters()) if m is not None else []

        backbone = params(self.image_encoder.backbone)
        disc = params(self.modality_disc)
        gen = params(self.generator)
        img_disc = params(self.image_disc)
        taken = {id(p) for p in backbone + disc + gen + img_disc}
        main = [p for p in self.parameters() if id(p) not in taken]
        return {"image_backbone": backbone, "main": main, "modality_disc": disc, "generator": gen,
                "image_disc": img_disc}

    def parameter_counts(self) -> dict[str, int]:
        return {k: sum(p.numel() for p in v) for k, v in self.parameter_groups().items()}


def create_model(cfg: Config, vocab_size: int, n_ingredients: int) -> TNLBT:
    """Build the model described by ``cfg.model`` (weights as ``model.image_pretrained`` says)."""
    return TNLBT(cfg.model, vocab_size, n_ingredients)
