"""One TNLBT training step: every loss term composed from :mod:`tnlbt.models` and :mod:`tnlbt.losses`.

A **paired step** sees ``scaling.cache_steps`` (K) micro-batches. Terms and where they are computed:

* ``retrieval`` — bidirectional triplet on the image/recipe embeddings of all K micro-batches of every worker
  (the feature cache concatenates this worker's K, :class:`~tnlbt.losses.TripletLoss` all-gathers the workers'
  with gradients, local-loss form). This is the large-batch term.
* per micro-batch (accumulated in the cache's second pass, divided by K):
  ``recipe_ssl`` (H-T component-to-component triplet), ``adv`` (encoder side of the WGAN-GP modality critic),
  ``trans_img`` (recipe -> image generator: adversarial + ingredient classification + KL) and ``trans_text``
  (image -> ingredients), balanced as ACME, and ``itm`` (Cross Decoder image-text matching with hard negatives
  sampled from the micro-batch's similarities, ALBEF style: the negatives' *tokens* must be on this worker,
  so ITM negatives come from the local micro-batch while the triplet's come from the global batch);
  the critics' own losses (``disc_modality``: WGAN-GP; ``disc_image``: conditional BCE) on detached inputs.

All of it goes into one backward: the critic losses see detached inputs (only critic parameters get their
gradient) and the encoder/generator-side terms call the critics with detached parameters (only the encoders
and
the generator get theirs), so the four optimisers' parameter sets receive exactly their own gradients.

A **recipe-only step** (H-T's alternation) runs the recipe encoder on a recipe-only batch and back-propagates
``w_recipe_ssl x recipe_ssl`` only.

The step only runs backward; :func:`apply_update` (the loop calls it) all-reduces gradients, checks them,
clips and steps the optimisers. :func:`prepare_model` sets the model's training-time layout first.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from tnlbt import losses as L
from tnlbt.config import Config
from tnlbt.models.dropout import use_fast_dropout
from tnlbt.models.recipe_encoder import COMPONENTS
from tnlbt.train.feature_cache import grad_cache_backward
from tnlbt.train.precision import maybe_autocast


def prepare_model(model: nn.Module, cfg: Config, device: torch.device) -> None:
    """Training-time speed settings of ``model`` (before its optimisers are built). The model computes the same
    function: layouts and packing change no maths (up to float summation order), and the dropout masks come
    from another random stream of the same distribution.

    * ``train.channels_last``: 4-d weights (convs) in NHWC memory; :class:`TrainStep` hands the images over in
      the same layout, so oneDNN (CPU) and cuDNN run their fastest kernels and skip layout reorders;
    * ``train.fast_dropout``: :class:`~tnlbt.models.dropout.FastDropout` for every ``nn.Dropout`` (CPU only:
      a cheaper mask of the same distribution; on CUDA it is ``nn.Dropout``);
    * ``train.pack_lines``: the recipe encoder packs its word-level lines in training (no padded tokens).
    """
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.train.fast_dropout:
        use_fast_dropout(model)
    encoder = getattr(model, "recipe_encoder", None)
    if encoder is not None:
        encoder.pack_lines = cfg.train.pack_lines


def build_optimizers(model: nn.Module, cfg: Config) -> dict[str, torch.optim.Optimizer]:
    """``main`` (Adam/AdamW; image backbone group at ``lr x backbone_lr_scale``), and Adam(gan_lr, gan_betas)
    for ``modality_disc``, ``generator`` and ``image_disc`` when those parts exist. ``optim.fused``: the fused
    implementation (one kernel over all of an optimiser's tensors instead of ~10 ops per parameter)."""
    groups = model.parameter_groups()
    o = cfg.optim
    main_groups = [{"params": groups["main"], "lr": o.lr, "name": "main"}]
    if groups["image_backbone"]:
        main_groups.append({"params": groups["image_backbone"], "lr": o.lr * o.backbone_lr_scale,
                            "name": "image_backbone"})
    main_cls = torch.optim.AdamW if o.optimizer == "adamw" else torch.optim.Adam
    fused = {"fused": True} if o.fused else {}
    opts: dict[str, torch.optim.Optimizer] = {
        "main": main_cls(main_groups, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, **fused)
    }
    for name in ("modality_disc", "generator", "image_disc"):
        if groups.get(name):
            opts[name] = torch.optim.Adam(groups[name], lr=o.gan_lr, betas=tuple(o.gan_betas), **fused)
    for opt in opts.values():
        for g in opt.param_groups:
            g["base_lr"] = g["lr"]
    return opts


def apply_update(optimizers: dict[str, torch.optim.Optimizer], terms: dict[str, float], cfg: Config,
                 world_size: int = 1, device: torch.device | None = None) -> bool:
    """After a step's backward: all-reduce the gradients, skip the step on every rank together when a term or
    a gradient is not finite (gradients zeroed), else clip the main optimiser's gradients and step all
    optimisers. True when the optimisers stepped.

    One pass of per-tensor 2-norms serves both the finiteness check and the clipping (which is then exactly
    ``clip_grad_norm_``'s foreach arithmetic). A finite gradient whose 2-norm overflows float32 counts as not
    finite here (:func:`tnlbt.losses.grads_finite` uses the max-norm, which cannot overflow): clipping could
    not have used it either.
    """
    from tnlbt.distributed import all_reduce_grads, any_rank

    device = device or torch.device("cpu")
    main = {id(p) for g in optimizers["main"].param_groups for p in g["params"]}
    all_params = [p for opt in optimizers.values() for g in opt.param_groups for p in g["params"]]
    all_reduce_grads(all_params, world_size)
    with_grad = [p for p in all_params if p.grad is not None and p.grad.numel()]
    norms = torch._foreach_norm([p.grad for p in with_grad], 2.0) if with_grad else []
    bad = bool(L.check_finite(terms)) or (bool(norms) and not bool(torch.stack(norms).isfinite().all()))
    if any_rank(bad, world_size, device):
        for opt in optimizers.values():
            opt.zero_grad(set_to_none=True)
        return False
    if cfg.optim.grad_clip > 0:
        main_norms = [n for p, n in zip(with_grad, norms, strict=True) if id(p) in main]
        if main_norms:
            total = torch.linalg.vector_norm(torch.stack(main_norms), 2.0)
            coef = torch.clamp(cfg.optim.grad_clip / (total + 1e-6), max=1.0)
            torch._foreach_mul_([p.grad for p in with_grad if id(p) in main], coef)
    for opt in optimizers.values():
        if any(g.get("fused") for g in opt.param_groups):
            match_layouts(opt)
        opt.step()
    return True


def load_optimizer_state(opt: torch.optim.Optimizer, state: dict[str, Any], cfg: Config) -> None:
    """``opt.load_state_dict(state)`` keeping this run's implementation (``optim.fused``): a saved param group
    carries its own ``fused`` flag, which would otherwise silently override the config on resume."""
    fused = True if cfg.optim.fused else None
    opt.load_state_dict(state)
    for g in opt.param_groups:
        g["fused"] = fused
        if fused:
            g["foreach"] = None
    match_layouts(opt)


def match_layouts(opt: torch.optim.Optimizer) -> int:
    """Give every gradient and per-parameter state tensor (Adam's moments) its parameter's strides; returns how
    many were re-laid.

    The fused CPU Adam kernel (torch 2.14) walks params, grads and moments as flat memory and does not check
    their strides: a channels-last weight with a contiguous gradient (a gradient set by hand) or with moments
    from a checkpoint of a run without channels-last silently gets a wrong update. Autograd already lays
    gradients out like their parameters, so this is a no-op (a stride comparison per tensor) on normal steps.
    """
    fixed = 0
    for g in opt.param_groups:
        for p in g["params"]:
            stride = p.stride()
            if p.grad is not None and p.grad.stride() != stride:
                p.grad = torch.empty_like(p).copy_(p.grad)
                fixed += 1
            state = opt.state.get(p, {})
            for k, v in state.items():
                if isinstance(v, Tensor) and v.shape == p.shape and v.stride() != stride:
                    state[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)
                    fixed += 1
    return fixed


def _frozen_call(module: nn.Module, *args: Any) -> Any:
    """Call ``module`` with detached parameters: gradients reach the inputs, never the module's weights."""
    from torch.func import functional_call

    params = {k: v.detach() for k, v in module.named_parameters()}
    buffers = dict(module.named_buffers())
    return functional_call(module, {**params, **buffers}, args)


class TrainStep:
    """Computes and back-propagates a paired or recipe-only step for one worker.

    ``rank``/``world_size`` go to the triplet loss (global negatives); ``amp_dtype`` (e.g. bf16) wraps the
    model forwards in autocast, the losses run in float32.
    """

    def __init__(self, model: nn.Module, cfg: Config, rank: int = 0, world_size: int = 1,
                 device: torch.device | None = None, amp_dtype: torch.dtype | None = None,
                 gather_fn: Any = None) -> None:
        self.model = model
        self.cfg = cfg
        self.lc = cfg.loss
        self.rank, self.world_size = rank, world_size
        self.device = device or torch.device("cpu")
        self.amp_dtype = amp_dtype
        self.triplet = L.TripletLoss(cfg.loss.triplet, rank=rank, world_size=world_size, gather_fn=gather_fn)
        self.ssl_triplet = L.TripletLoss(cfg.loss.triplet)  # recipe SSL: per micro-batch, local negatives
        m = model
        self.use_ssl = cfg.loss.w_recipe_ssl > 0
        self.use_adv = m.modality_disc is not None and cfg.loss.w_adv > 0
        self.use_ingr = m.ingredient_head is not None and cfg.loss.w_trans > 0
        self.use_gen = m.generator is not None and m.image_disc is not None and cfg.loss.w_trans > 0
        self.use_itm = m.cross_decoder is not None and cfg.loss.w_itm > 0
        self.gen_fused = bool(cfg.model.gen_use_fused) and m.cross_decoder is not None
        self.channels_last = cfg.train.channels_last

    # -- paired ---------------------------------------------------------------------------------------------
    def _forward(self, mb: dict[str, Tensor]) -> tuple[list[Tensor], dict[str, Any]]:
        images = mb["image"]
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with maybe_autocast(self.device, self.amp_dtype):
            img = self.model.image_features(images)
            rec = self.model.recipe_features(mb)
        return [img["emb"].float(), rec["emb"].float()], {"img": img, "rec": rec, "batch": mb, "images": images}

    def _cached_loss(self, margin: float):
        def fn(embs: list[Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
            out = self.triplet(embs[0], embs[1], margin)
            terms = {"retrieval": out["total"].detach(), "active_fraction": out["active_fraction"]}
            return out["total"] * self.lc.w_retrieval, terms

        return fn

    def _per_batch(self, margin: float):
        model, lc = self.model, self.lc

        def fn(k: int, mb: dict[str, Tensor], embs: list[Tensor], aux: dict[str, Any]
               ) -> tuple[Tensor | None, dict[str, Tensor]]:
            img, rec = aux["img"], aux["rec"]
            img_emb, rec_emb = embs
            terms: dict[str, Tensor] = {}
            extra: list[Tensor] = []  # critic losses: own optimisers, not weighted
            fused = None
            with maybe_autocast(self.device, self.amp_dtype):
                if self.use_ssl:
                    comps = {c: rec[c].float() for c in COMPONENTS if c in rec}
                    cut = mb.get("partial")  # partial-recipe rows: a missing component has nothing to match
                    if cut is not None:
                        comps = {c: v[~cut] for c, v in comps.items()}
                    # every rank reports the same terms (they are all-reduced), so a batch of cut rows adds 0
                    terms["recipe_ssl"] = (self._ssl(comps, margin) if len(next(iter(comps.values()))) >= 2
                                           else rec_emb.sum() * 0.0)
                if self.use_adv:
                    terms["adv"] = L.modality_gen_loss(model.modality_disc, rec_emb)
                    d = L.modality_disc_loss(model.modality_disc, img_emb, rec_emb, lc.gp_weight)
                    extra.append(d["total"])
                    terms["disc_modality"] = d["total"].detach()
                if self.use_itm:
                    b = img_emb.shape[0]
                    sim = torch.nn.functional.normalize(img_emb.detach(), dim=1) @ \
                        torch.nn.functional.normalize(rec_emb.detach(), dim=1).T
                    neg_img, neg_rec = L.sample_itm_negatives(sim)
                    it, rt, rm = img["tokens"], rec["tokens"], rec["token_mask"]
                    it_all = torch.cat([it, it[neg_img], it])
                    rt_all = torch.cat([rt, rt, rt[neg_rec]])
                    rm_all = torch.cat([rm, rm, rm[neg_rec]])
                    out = model.cross_decode(it_all, rt_all, rm_all)
                    labels = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long().to(img_emb.device)
                    terms["itm"] = L.itm_loss(out["itm_logits"].float(), labels)
                    fused = out["fused"][:b]
                if self.use_ingr:
                    logits = model.ingredient_head(img_emb)
                    terms["trans_text"] = L.ingredient_loss(logits.float(), mb["ingredient_labels"])
                if self.use_gen:
                    cond = fused if (self.gen_fused and fused is not None) else rec_emb
                    g = model.generate(cond)
                    fake = g["image"]
                    real = model.images_for_gan(aux["images"])
                    targets = mb["ingredient_labels"]
                    dfake = _frozen_call(model.image_disc, fake, g["mu"])
                    # the discriminator on the real images: its own loss needs it with parameter gradients; the
                    # generator's ingredient term on real images only needs its value (no path to the generator)
                    dr = model.image_disc(real, g["mu"].detach())
                    gl = L.gen_losses(torch.cat([dfake["logits"], dfake["uncond_logits"]]).float(),
                                      dfake["ingredient_logits"].float(), dr["ingredient_logits"].detach().float(),
                                      targets, g["mu"].float(), g["logvar"].float(), lc.kl_weight)
                    terms["trans_img"] = gl["total"]
                    # image discriminator on detached generated images (BCE real/fake + ingredients on real)
                    df = model.image_disc(fake.detach(), g["mu"].detach())
                    dl = L.image_disc_loss(torch.cat([dr["logits"], dr["uncond_logits"]]).float(),
                                           torch.cat([df["logits"], df["uncond_logits"]]).float(),
                                           dr["ingredient_logits"].float(), targets)
                    extra.append(dl["total"])
                    terms["disc_image"] = dl["total"].detach()
            loss_terms = {k: v for k, v in terms.items() if k in L.TERM_WEIGHTS}
            total = L.total_loss(loss_terms, lc) if loss_terms else None
            for e in extra:
                total = e if total is None else total + e
            return total, {k: v.detach() for k, v in terms.items()}

        return fn

    def paired_step(self, micro_batches: list[dict[str, Tensor]], margin: float) -> dict[str, float]:
        """Back-propagate one paired step over K micro-batches; returns float terms (mean over ranks) incl.
        ``loss`` (the weighted total without the critics), ``active_fraction``."""
        res = grad_cache_backward(micro_batches, self._forward, self._cached_loss(margin),
                                  self._per_batch(margin), module=self.model, device=self.device)
        terms = dict(res.terms)
        weighted = {k: v for k, v in terms.items() if k in L.TERM_WEIGHTS}
        terms["loss"] = L.total_loss(weighted, self.lc).detach() if weighted else torch.zeros(())
        return self._reduce(terms)

    # -- recipe-only ----------------------------------------------------------------------------------------
    def recipe_only_step(self, batch: dict[str, Tensor], margin: float) -> dict[str, float]:
        """H-T recipe-only batch: recipe self-supervision only."""
        with maybe_autocast(self.device, self.amp_dtype):
            rec = self.model.recipe_features(batch)
            comps = {c: rec[c].float() for c in COMPONENTS if c in rec}
            ssl = self._ssl(comps, margin)
        (ssl * self.lc.w_recipe_ssl).backward()
        return self._reduce({"recipe_only_ssl": ssl.detach()})

    def _ssl(self, comps: dict[str, Tensor], margin: float) -> Tensor:
        """Recipe SSL (local negatives): all component pairs in one batched loss (``train.batched_ssl``), or
        one :class:`~tnlbt.losses.TripletLoss` call per pair."""
        if self.cfg.train.batched_ssl:
            return L.recipe_ssl_loss_batched(comps, self.model.ssl_project_many, margin, self.lc.triplet)
        return L.recipe_ssl_loss(comps, self.model.ssl_project, margin, loss_fn=self.ssl_triplet)

    def _reduce(self, terms: dict[str, Tensor]) -> dict[str, float]:
        """Mean over ranks (one all-reduce of the stacked terms) -> floats for logging and finite checks."""
        from tnlbt.distributed import all_reduce_mean

        keys = sorted(terms)
        vec = torch.stack([torch.as_tensor(terms[k]).detach().float().reshape(()).to(self.device)
                           for k in keys])
        if self.world_size > 1:
            vec = all_reduce_mean(vec)
        return {k: float(v) for k, v in zip(keys, vec.tolist(), strict=True)}
