"""Every TNLBT loss term: retrieval triplet (3 aggregations, global negatives), margin schedules, recipe
self-supervision, WGAN-GP modality alignment, translation (recipe->image GAN, image->ingredients), ITM.

Sources (method-research.md): triplet "ht" = H-T §3.1 exactly [HT-code]; "valid" = AdaMine/T-Food
aggregation (§4.5) [TFood-code]; "hard" = batch-hard as ACME (§4.3) but on cosine distance; margin schedules =
T-Food (§4.5), the adaptive rule's behaviour before the first batch is ours; recipe SSL = H-T §3.2; modality
discriminator, generator/discriminator terms, KL and the balancing of the two translation terms = ACME (§4.3),
with BCE for the multi-label ingredient target instead of ACME's MultiLabelMarginLoss [INF]; ITM negatives =
ALBEF/T-Food (§4.7).

Every loss returns plain tensors or a ``dict`` of named terms (with ``"total"``); the training step
(:mod:`tnlbt.train.step`) combines the terms with :func:`total_loss`, and the loop (:mod:`tnlbt.train.loop`)
skips a step whose terms :func:`check_finite` flags or whose gradients :func:`grads_finite` rejects. No Ray here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tnlbt.config import LossConfig
from tnlbt.models.recipe_encoder import COMPONENTS

TripletKind = Literal["ht", "valid", "hard"]
GatherFn = Callable[[Tensor], Tensor]


# -- margin schedules ---------------------------------------------------------------------------------
def margin_at(cfg: LossConfig, epoch: float, active_fraction: float | None = None) -> float:
    """The triplet margin at training progress ``epoch`` (a float: completed epochs + fraction of this one).

    * ``constant``: ``cfg.margin``.
    * ``incremental`` (T-Food): ``min(margin_start + margin_delta * e, margin_max)``, where ``e = epoch`` when
      ``cfg.margin_per_step`` (grows within an epoch) else ``floor(epoch)`` (T-Food updates at epoch end).
    * ``adaptive`` (T-Food): ``clamp(margin_max * (1 - f), margin_min, margin_max)`` with ``f`` the fraction
      of active (non-zero) hinge terms of the previous batch. Before any batch (``None``) we assume ``f = 1``,
      which is what a randomly initialised model shows (every triplet violates the margin), so training starts
      at ``margin_min``.

    A pure function of its arguments: a resumed run at the same progress (and, for ``adaptive``, the same
    saved active fraction) gets the same margin.
    """
    if cfg.margin_schedule == "constant":
        return float(cfg.margin)
    if cfg.margin_schedule == "incremental":
        e = max(float(epoch), 0.0)
        if not cfg.margin_per_step:
            e = float(math.floor(e))
        return float(min(cfg.margin_start + cfg.margin_delta * e, cfg.margin_max))
    if cfg.margin_schedule == "adaptive":
        f = 1.0 if active_fraction is None or not math.isfinite(active_fraction) else active_fraction
        f = min(max(float(f), 0.0), 1.0)
        return float(min(max(cfg.margin_max * (1.0 - f), cfg.margin_min), cfg.margin_max))
    raise ValueError(f"unknown margin schedule {cfg.margin_schedule!r}")


# -- retrieval triplet ----------------------------------------------------------------------------------
class TripletLoss(nn.Module):
    """Bidirectional triplet loss on cosine distance ``d = 1 - cos``, in-batch (optionally global) negatives.

    ``kind``:
      * ``"ht"``: H-T §3.1, ``(1/B²) Σ_{i≠j} [m + d_ii − d_ij]₊ + [m + d_jj − d_ij]₊`` (the zero diagonal
        counts in the denominator).
      * ``"valid"``: AdaMine, per direction ``Σ hinge / #(non-zero hinge terms)`` (0 when none is active);
        the two directions are summed.
      * ``"hard"``: batch-hard, per anchor the hardest (closest) negative of the other modality, mean over
        anchors per direction, the two directions summed (ACME averages over all 2B anchors instead, i.e. half
        of this; the factor belongs in ``w_retrieval``).

    Global negatives (local-loss form, as open_clip's ``ClipLoss(local_loss=True, gather_with_grad=True)``):
    with ``world_size > 1`` each rank scores its own B rows against the columns gathered from all ranks
    (``gather_fn``, default :func:`tnlbt.distributed.gather_with_grad`; or pass ``image_all`` / ``recipe_all``
    already gathered), the positive of local row i being global column ``rank * B + i``. Normalisers (B²,
    active counts, anchors) are global: counts are gathered too, so every rank uses the same numbers.

    Scale: rank r returns ``world_size * (its share of the global sum) / global normaliser``. Why: autograd
    all-gather hands each rank d(Σ_s loss_s)/d(x_r) (sum over ranks), and Σ_s loss_s = world_size * L_global;
    DDP then *averages* parameter gradients over ranks, dividing by world_size again, so the parameter
    gradient equals that of the single-process loss on the concatenated batch. The mean of ``"total"`` over
    ranks (:func:`tnlbt.distributed.all_reduce_mean`) is the global loss value; with one rank nothing changes.

    ``forward(image, recipe, margin)`` returns ``{"total", "image_to_recipe", "recipe_to_image",
    "active_fraction", "margin"}``; the last two are detached (logging and the adaptive margin). The active
    fraction is over all ``2·B·(B−1)`` hinge terms (``ht``/``valid``) or all ``2·B`` anchors (``hard``).
    """

    def __init__(self, kind: TripletKind = "ht", rank: int = 0, world_size: int = 1,
                 gather_fn: GatherFn | None = None) -> None:
        super().__init__()
        if kind not in ("ht", "valid", "hard"):
            raise ValueError(f"unknown triplet kind {kind!r}; choose 'ht', 'valid' or 'hard'")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad rank/world_size: {rank}/{world_size}")
        self.kind = kind
        self.rank = rank
        self.world_size = world_size
        if gather_fn is None and world_size > 1:
            from tnlbt.distributed import gather_with_grad

            gather_fn = gather_with_grad
        self.gather_fn = gather_fn

    def _gather(self, x: Tensor) -> Tensor:
        return x if self.gather_fn is None else self.gather_fn(x)

    def forward(self, image: Tensor, recipe: Tensor, margin: float,
                image_all: Tensor | None = None, recipe_all: Tensor | None = None) -> dict[str, Tensor]:
        if image.ndim != 2 or image.shape != recipe.shape:
            raise ValueError(f"image and recipe embeddings must both be (B, D); got {tuple(image.shape)} "
                             f"and {tuple(recipe.shape)}")
        x = F.normalize(image, dim=1)
        y = F.normalize(recipe, dim=1)
        # Gather the normalised embeddings: the gradient through the normalisation stays on the owning rank.
        xa = F.normalize(image_all, dim=1) if image_all is not None else self._gather(x)
        ya = F.normalize(recipe_all, dim=1) if recipe_all is not None else self._gather(y)
        b, bg = x.shape[0], xa.shape[0]
        if ya.shape[0] != bg or bg != b * self.world_size:
            raise ValueError(f"gathered batch has {bg}/{ya.shape[0]} rows, expected world_size x local = "
                             f"{self.world_size} x {b} (every rank must use the same batch size)")
        pos = torch.arange(b, device=x.device) + self.rank * b
        rows = torch.arange(b, device=x.device)
        # d_ij = 1 - cos. Rows: this rank's anchors; columns: all negatives (global batch).
        d_i2r = 1.0 - x @ ya.T  # image anchor i vs recipe j
        d_r2i = 1.0 - y @ xa.T  # recipe anchor j vs image i
        is_pos = torch.zeros_like(d_i2r, dtype=torch.bool)
        is_pos[rows, pos] = True
        w = float(self.world_size)
        terms: dict[str, Tensor] = {}
        counts = []
        for name, d in (("image_to_recipe", d_i2r), ("recipe_to_image", d_r2i)):
            d_pos = d[rows, pos]
            if self.kind == "hard":
                if bg > 1:
                    d_neg = d.masked_fill(is_pos, float("inf")).min(dim=1).values
                    hinge = F.relu(margin + d_pos - d_neg)
                else:  # no negative at all: nothing to push away
                    hinge = d_pos * 0.0
            else:
                hinge = F.relu(margin + d_pos[:, None] - d).masked_fill(is_pos, 0.0)
            terms[name] = hinge.sum()
            counts.append((hinge.detach() > 0).sum())
        local = torch.stack(counts).to(torch.float64)
        if self.world_size > 1:
            # Every rank needs the global counts (same normaliser, same active fraction): gather and sum.
            glob = self.gather_fn(local.view(1, 2)).view(-1, 2).sum(0)
        else:
            glob = local
        n_terms = 2 * bg * (bg - 1) if self.kind != "hard" else 2 * bg
        if self.kind == "ht":
            for name in terms:
                terms[name] = terms[name] * (w / (bg * bg))
        elif self.kind == "valid":
            for k, name in enumerate(list(terms)):
                terms[name] = terms[name] * (w / max(float(glob[k]), 1.0))
        else:
            for name in terms:
                terms[name] = terms[name] * (w / bg)
        total = terms["image_to_recipe"] + terms["recipe_to_image"]
        frac = float(glob.sum()) / n_terms if n_terms > 0 else 0.0
        return {
            "total": total,
            "image_to_recipe": terms["image_to_recipe"],
            "recipe_to_image": terms["recipe_to_image"],
            "active_fraction": torch.tensor(frac, dtype=torch.float32),
            "margin": torch.tensor(float(margin), dtype=torch.float32),
        }


# -- recipe self-supervision ----------------------------------------------------------------------------
def recipe_ssl_loss(components: Mapping[str, Tensor], project: Callable[[str, str, Tensor], Tensor],
                    margin: float, kind: TripletKind = "ht", loss_fn: TripletLoss | None = None) -> Tensor:
    """H-T §3.2: mean over the ordered pairs (a, b), a != b, of ``triplet(e_a, P[b->a](e_b))``.

    ``components``: ``{"title", "ingredients", "instructions"} -> (B, W)`` raw component embeddings (at least
    two present). ``project(source, target, x)`` maps component ``source``'s embedding into ``target``'s space
    (``TNLBT.ssl_project``). Gradients flow into both the query and the projected value (as H-T). ``loss_fn``:
    a :class:`TripletLoss` to use instead of a local one of ``kind`` (e.g. one that gathers across ranks).
    """
    names = [c for c in COMPONENTS if c in components]
    if len(names) < 2:
        raise ValueError(f"recipe SSL needs at least two of {COMPONENTS}; got {sorted(components)}")
    fn = loss_fn if loss_fn is not None else TripletLoss(kind)
    losses = [fn(components[a], project(b, a, components[b]), margin)["total"]
              for a in names for b in names if a != b]
    return torch.stack(losses).mean()


def local_triplet_totals(image: Tensor, recipe: Tensor, margin: float, kind: TripletKind = "ht") -> Tensor:
    """:class:`TripletLoss` ``"total"`` (one rank, in-batch negatives) of P independent problems at once:
    ``image``/``recipe`` (P, B, D) -> (P,). The same sums as P calls, a handful of batched ops instead of ~50
    per call; the recipe->image distances are the transpose of the image->recipe ones (one product)."""
    if image.ndim != 3 or image.shape != recipe.shape:
        raise ValueError(f"expected two (P, B, D) stacks of the same shape; got {tuple(image.shape)} and "
                         f"{tuple(recipe.shape)}")
    b = image.shape[1]
    x = F.normalize(image, dim=2)
    y = F.normalize(recipe, dim=2)
    d = 1.0 - torch.bmm(x, y.transpose(1, 2))  # d[p, i, j]: image anchor i vs recipe j
    eye = torch.eye(b, dtype=torch.bool, device=d.device)
    d_pos = torch.diagonal(d, dim1=1, dim2=2)  # (P, B)
    total = d.new_zeros(d.shape[0])
    for dist in (d, d.transpose(1, 2)):  # rows: image anchors, then recipe anchors
        if kind == "hard":
            if b > 1:
                d_neg = dist.masked_fill(eye, float("inf")).min(dim=2).values
                total = total + F.relu(margin + d_pos - d_neg).sum(dim=1) / b
            continue
        hinge = F.relu(margin + d_pos[:, :, None] - dist).masked_fill(eye, 0.0)
        sums = hinge.sum(dim=(1, 2))
        if kind == "ht":
            total = total + sums / (b * b)
        else:  # valid: mean over the active (non-zero) hinge terms, 0 when none is
            total = total + sums / (hinge.detach() > 0).sum(dim=(1, 2)).clamp(min=1).to(sums.dtype)
    return total


def recipe_ssl_loss_batched(components: Mapping[str, Tensor],
                            project_many: Callable[[list[tuple[str, str]], Tensor], Tensor], margin: float,
                            kind: TripletKind = "ht") -> Tensor:
    """:func:`recipe_ssl_loss` with local negatives, all ordered pairs at once: ``project_many(pairs, x)``
    maps the stacked sources (P, B, W) through their P projectors (``TNLBT.ssl_project_many``), and
    :func:`local_triplet_totals` scores the P problems together."""
    names = [c for c in COMPONENTS if c in components]
    if len(names) < 2:
        raise ValueError(f"recipe SSL needs at least two of {COMPONENTS}; got {sorted(components)}")
    pairs = [(a, b) for a in names for b in names if a != b]  # query a, value b projected into a's space
    queries = torch.stack([components[a] for a, _ in pairs])
    values = project_many([(b, a) for a, b in pairs], torch.stack([components[b] for _, b in pairs]))
    return local_triplet_totals(queries, values.to(queries.dtype), margin, kind).mean()


# -- adversarial modality alignment (ACME, WGAN-GP) ------------------------------------------------------
def _unwrap(module: nn.Module) -> nn.Module:
    return module.module if hasattr(module, "module") and isinstance(module.module, nn.Module) else module


def modality_disc_loss(disc: nn.Module, real: Tensor, fake: Tensor, gp_weight: float) -> dict[str, Tensor]:
    """Critic loss ``-E[D(real)] + E[D(fake)] + gp_weight * GP`` (real = image, fake = recipe embeddings).

    Both inputs are detached here, so this loss trains only the critic. GP is the WGAN-GP penalty
    ``E[(||∇D(x̂)||₂ − 1)²]`` on random interpolates ``x̂ = α·real + (1−α)·fake`` (one α per row).
    Returns ``{"total", "wasserstein" (E[D(real)] − E[D(fake)], detached), "gp"}``.
    """
    real = real.detach()
    fake = fake.detach()
    d_real = disc(real).reshape(-1)
    d_fake = disc(fake).reshape(-1)
    alpha = torch.rand(real.shape[0], *([1] * (real.ndim - 1)), device=real.device, dtype=real.dtype)
    interp = (alpha * real + (1.0 - alpha) * fake).requires_grad_(True)
    d_interp = disc(interp)
    (grad,) = torch.autograd.grad(d_interp.sum(), interp, create_graph=True)
    gp = ((grad.reshape(grad.shape[0], -1).norm(2, dim=1) - 1.0) ** 2).mean()
    total = -d_real.mean() + d_fake.mean() + gp_weight * gp
    return {"total": total, "wasserstein": (d_real.mean() - d_fake.mean()).detach(), "gp": gp}


def modality_gen_loss(disc: nn.Module, fake: Tensor) -> Tensor:
    """Encoder-side adversarial loss ``-E[D(fake)]``: gradients reach ``fake`` (the recipe encoder), never the
    critic's parameters (it is evaluated with detached copies of them), so no grad clean-up is needed."""
    from torch.func import functional_call

    d = _unwrap(disc)
    params = {k: v.detach() for k, v in d.named_parameters()}
    buffers = dict(d.named_buffers())
    return -functional_call(d, {**params, **buffers}, (fake,)).mean()


# -- translation (ACME) ---------------------------------------------------------------------------------
def ingredient_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Image -> ingredients multi-label loss: BCE-with-logits against the multi-hot target, mean."""
    return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype))


def kl_loss(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) of conditioning augmentation, mean over elements (StackGAN/ACME)."""
    return -0.5 * torch.mean(1.0 + logvar - mu.pow(2) - logvar.exp())


def gen_losses(d_fake_logits: Tensor, fake_cls_logits: Tensor, real_cls_logits: Tensor, targets: Tensor,
               mu: Tensor, logvar: Tensor, kl_weight: float) -> dict[str, Tensor]:
    """Recipe->image generator terms (ACME ``L_img``): adversarial BCE (fake should look real) + ingredient
    classification BCE on real and generated images + ``kl_weight`` x KL of the conditioning augmentation."""
    adv = F.binary_cross_entropy_with_logits(d_fake_logits, torch.ones_like(d_fake_logits))
    cls_fake = ingredient_loss(fake_cls_logits, targets)
    cls_real = ingredient_loss(real_cls_logits, targets)
    kl = kl_loss(mu, logvar)
    total = adv + cls_fake + cls_real + kl_weight * kl
    return {"total": total, "adv": adv, "cls_fake": cls_fake, "cls_real": cls_real, "kl": kl}


def image_disc_loss(d_real_logits: Tensor, d_fake_logits: Tensor, real_cls_logits: Tensor,
                    targets: Tensor) -> dict[str, Tensor]:
    """Conditional image discriminator: BCE(D(real), 1) + BCE(D(fake), 0) + ingredient BCE on real images.
    The caller passes logits computed on detached generated images."""
    real = F.binary_cross_entropy_with_logits(d_real_logits, torch.ones_like(d_real_logits))
    fake = F.binary_cross_entropy_with_logits(d_fake_logits, torch.zeros_like(d_fake_logits))
    cls_real = ingredient_loss(real_cls_logits, targets)
    return {"total": real + fake + cls_real, "real": real, "fake": fake, "cls_real": cls_real}


def balance_translation(l_img: Tensor, l_text: Tensor) -> tuple[Tensor, Tensor]:
    """ACME: scale the larger of the two translation losses down to the smaller with a detached ratio, so
    neither direction dominates; the gradient direction of each is kept. Returns ``(l_img, l_text)``."""
    a, b = float(l_img.detach()), float(l_text.detach())
    if not (math.isfinite(a) and math.isfinite(b)) or a == b or max(abs(a), abs(b)) == 0.0:
        return l_img, l_text
    if abs(a) > abs(b):
        return l_img * (abs(b) / abs(a)), l_text
    return l_img, l_text * (abs(a) / abs(b))


# -- image-text matching (ALBEF / T-Food) --------------------------------------------------------------------
@torch.no_grad()
def sample_itm_negatives(sim: Tensor, generator: torch.Generator | None = None,
                         num: int = 1) -> tuple[Tensor, Tensor]:
    """Hard negatives for ITM, sampled from the similarity matrix as ALBEF does.

    ``sim``: (B, B) similarities, rows = images, columns = recipes, matching pairs on the diagonal. For each
    recipe j an image is drawn from ``softmax(sim[:, j])`` and for each image i a recipe from
    ``softmax(sim[i, :])``, with the positive's probability zeroed (ALBEF adds 1e-4 before zeroing so a
    saturated softmax cannot leave a row without mass). Returns ``(neg_image_index_for_each_recipe,
    neg_recipe_index_for_each_image)``, each (B,) int64, or (B, num) when ``num > 1`` (drawn without
    replacement).
    """
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"sim must be square (B, B); got {tuple(sim.shape)}")
    b = sim.shape[0]
    if b < 2 or not 1 <= num <= b - 1:
        raise ValueError(f"need 1 <= num <= B-1 negatives; B={b}, num={num}")
    s = torch.nan_to_num(sim.detach().float(), nan=0.0)
    eye = torch.eye(b, dtype=torch.bool, device=s.device)
    w_i2r = (F.softmax(s, dim=1) + 1e-4).masked_fill(eye, 0.0)  # per image, over recipes
    w_r2i = (F.softmax(s.T, dim=1) + 1e-4).masked_fill(eye, 0.0)  # per recipe, over images
    gen = generator
    if gen is not None and gen.device != s.device:
        # torch.multinomial needs a generator on the tensor's device; sample on the generator's device.
        w_i2r, w_r2i = w_i2r.to(gen.device), w_r2i.to(gen.device)
    neg_img = torch.multinomial(w_r2i, num, replacement=False, generator=gen).to(sim.device)
    neg_rec = torch.multinomial(w_i2r, num, replacement=False, generator=gen).to(sim.device)
    if num == 1:
        neg_img, neg_rec = neg_img[:, 0], neg_rec[:, 0]
    return neg_img, neg_rec


def itm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Image-text matching cross-entropy over the 2-way head (label 1 = matching pair)."""
    return F.cross_entropy(logits, labels.long())


# -- combination and guards -------------------------------------------------------------------------------
# term name -> LossConfig weight field. "trans_img"/"trans_text" are balanced (ACME) before weighting.
TERM_WEIGHTS = {
    "retrieval": "w_retrieval",
    "recipe_ssl": "w_recipe_ssl",
    "adv": "w_adv",
    "trans_img": "w_trans",
    "trans_text": "w_trans",
    "itm": "w_itm",
}


def total_loss(terms: Mapping[str, Tensor], cfg: LossConfig) -> Tensor:
    """``w_retrieval·retrieval + w_recipe_ssl·recipe_ssl + w_adv·adv + w_trans·(trans_img + trans_text)
    + w_itm·itm`` over the terms present (ACME's weights are the config defaults); the two translation terms
    are balanced with :func:`balance_translation` when both are present. Unknown keys are ignored (logging
    terms may ride along); no known key raises."""
    present = [k for k in TERM_WEIGHTS if k in terms]
    if not present:
        raise ValueError(f"no loss term among {sorted(terms)}; expected some of {list(TERM_WEIGHTS)}")
    t = dict(terms)
    if "trans_img" in t and "trans_text" in t:
        t["trans_img"], t["trans_text"] = balance_translation(t["trans_img"], t["trans_text"])
    out = None
    for k in present:
        v = t[k] * getattr(cfg, TERM_WEIGHTS[k])
        out = v if out is None else out + v
    return out


def check_finite(terms: Mapping[str, Tensor | float]) -> list[str]:
    """Names of the terms holding a NaN or an infinity (the step that produced them should be skipped)."""
    bad = []
    for name, v in terms.items():
        if isinstance(v, Tensor):
            if v.numel() and not bool(torch.isfinite(v.detach()).all()):
                bad.append(name)
        elif isinstance(v, int | float) and not math.isfinite(v):
            bad.append(name)
    return bad


def grads_finite(params: Iterable[Tensor]) -> bool:
    """True when every element of every ``.grad`` of ``params`` is finite (params without one are skipped).

    One fused pass instead of an ``isfinite().all()`` and a host sync per tensor: the max-abs (inf) norm of
    each gradient, which is finite exactly when all its elements are (NaN propagates through the max; unlike
    the 2-norm it cannot overflow on large finite values), then a single check of the stacked norms.
    """
    # empty gradients hold nothing non-finite, and the inf norm of an empty tensor is an error
    grads = [p.grad for p in params if p.grad is not None and p.grad.numel()]
    if not grads:
        return True
    return bool(torch.stack(torch._foreach_norm(grads, math.inf)).isfinite().all())
