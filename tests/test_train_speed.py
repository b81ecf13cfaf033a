"""The training step's speed changes against their brute-force twins (tnlbt/models/dropout.py and
tnlbt/train/step.py: prepare_model, build_optimizers, apply_update).

Each change either keeps the maths (channels-last, fused Adam, the update) and is compared with the plain path to
float tolerance, or changes only the random stream (the dropout mask) and is compared in distribution.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tnlbt import losses as L
from tnlbt.config import Config
from tnlbt.models import create_model
from tnlbt.models.dropout import FastDropout, drop_threshold, fast_dropout, keep_mask, use_fast_dropout
from tnlbt.train.feature_cache import capture_rng, replay_rng
from tnlbt.train.step import (
    TrainStep,
    apply_update,
    build_optimizers,
    load_optimizer_state,
    match_layouts,
    prepare_model,
)

VOCAB, N_ING = 40, 12


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """One torch thread (conftest.one_torch_thread): test processes share the cores."""


# -- dropout mask ---------------------------------------------------------------------------------------------
def test_keep_mask_is_the_int16_lanes_of_the_generators_64_bit_draws() -> None:
    """The mask read back from the raw 64-bit words with NumPy, lane by lane (little-endian int16)."""
    g = torch.Generator().manual_seed(5)
    state = g.get_state()
    mask, scale = keep_mask((7, 9), 0.3, generator=g)
    g.set_state(state)
    words = torch.empty((63 + 3) // 4, dtype=torch.int64).random_(-(2**63), None, generator=g).numpy()
    lanes = [((int(w) >> (16 * k)) & 0xFFFF) for w in words for k in range(4)][:63]
    signed = np.array([v - 65536 if v >= 32768 else v for v in lanes])
    threshold = -32768 + round(0.3 * 65536)
    assert np.array_equal(mask.numpy().reshape(-1), signed >= threshold)
    assert scale == pytest.approx(65536 / (65536 - round(0.3 * 65536)))


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_mask_distribution(p: float) -> None:
    """Drop frequency overall and per int16 lane within 5 sigma of p; neighbours (same word and across words)
    uncorrelated."""
    torch.manual_seed(0)
    n = 1 << 20
    keep = keep_mask((n,), p)[0].numpy().astype(np.float64)
    p_eff = round(p * 65536) / 65536
    assert abs(p - p_eff) < 1e-4
    sigma = math.sqrt(p_eff * (1 - p_eff) / n)
    assert abs((1 - keep.mean()) - p_eff) < 5 * sigma
    for lane in range(4):
        assert abs((1 - keep[lane::4].mean()) - p_eff) < 5 * 2 * sigma
    for lag in (1, 2, 3, 4, 5):
        r = np.corrcoef(keep[:-lag], keep[lag:])[0, 1]
        assert abs(r) < 5 / math.sqrt(n)


def test_fast_dropout_equals_its_formula_elementwise_in_bf16_and_fp32() -> None:
    """Forward: x / (1 - p_eff) where kept, 0 elsewhere, rounded once as native dropout does; backward: the same
    mask and scale applied to the incoming gradient (brute force, element by element)."""
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(6, 11).to(dtype).requires_grad_(True)
        torch.manual_seed(3)
        mask, scale = keep_mask(x.shape, 0.2)
        torch.manual_seed(3)
        y = fast_dropout(x, 0.2)
        g = torch.randn(6, 11).to(dtype)
        y.backward(g)
        for i in range(6):
            for j in range(11):
                want = torch.tensor(float(x.detach()[i, j]) * scale).to(dtype) if mask[i, j] else torch.tensor(0.0)
                assert float(y[i, j]) == float(want)
                want_g = torch.tensor(float(g[i, j]) * scale).to(dtype) if mask[i, j] else torch.tensor(0.0)
                assert float(x.grad[i, j]) == float(want_g)
        assert y.dtype == dtype


def test_fast_dropout_matches_nn_dropout_in_distribution() -> None:
    """Same mean (E[y] = x), variance and drop fraction as nn.Dropout over many draws of a fixed input."""
    torch.manual_seed(1)
    x = torch.randn(64, 128)
    ref = torch.stack([F.dropout(x, 0.1, True) for _ in range(200)])
    new = torch.stack([fast_dropout(x, 0.1) for _ in range(200)])
    for a in (ref, new):
        assert (a == 0).float().mean().item() == pytest.approx(0.1, abs=3e-3)
    torch.testing.assert_close(new.mean(0).mean(), x.mean(), atol=3e-3, rtol=0)
    torch.testing.assert_close(new.var(0).mean(), ref.var(0).mean(), atol=0, rtol=0.03)
    # E[y] = x element by element: the average of 200 draws is within 5 standard errors everywhere it should be
    se = (x.abs() * math.sqrt(0.1 / 0.9) / math.sqrt(200)).clamp(min=1e-6)
    assert ((new.mean(0) - x).abs() / se).max() < 5.5


def test_fast_dropout_replays_under_the_feature_cache_rng_and_moves_the_stream() -> None:
    x = torch.ones(1000)
    torch.manual_seed(7)
    state = capture_rng()
    a = fast_dropout(x, 0.1)
    b = fast_dropout(x, 0.1)
    assert not torch.equal(a, b)  # each call draws fresh words from the default generator
    with replay_rng(state):
        assert torch.equal(fast_dropout(x, 0.1), a)
    assert torch.equal(fast_dropout(x, 0.0), x) and torch.equal(fast_dropout(x, 0.5, training=False), x)
    with pytest.raises(ValueError):
        drop_threshold(1.0)


def test_use_fast_dropout_swaps_every_dropout_and_keeps_state_and_eval_outputs() -> None:
    cfg = Config.load("tiny_test")
    torch.manual_seed(0)
    model = create_model(cfg, VOCAB, N_ING)
    plain = sum(type(m) is nn.Dropout for m in model.modules())
    keys = list(model.state_dict())
    torch.manual_seed(0)
    twin = create_model(cfg, VOCAB, N_ING)
    assert use_fast_dropout(twin) == plain > 0
    assert not any(type(m) is nn.Dropout for m in twin.modules())
    assert [m.p for m in twin.modules() if isinstance(m, FastDropout)] == \
        [m.p for m in model.modules() if type(m) is nn.Dropout]
    assert list(twin.state_dict()) == keys
    model.eval()
    twin.eval()
    b = _batch(cfg, 4)
    with torch.no_grad():
        torch.testing.assert_close(twin.encode_recipe(b), model.encode_recipe(b), rtol=0, atol=0)
    assert use_fast_dropout(twin, enabled=False) == plain


# -- the step's layout, optimisers and update -----------------------------------------------------------------
def _batch(cfg: Config, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = cfg.model.image_size
    title = torch.randint(3, VOCAB, (n, 6), generator=g)
    title[:, -2:] = 0
    ingr = torch.randint(3, VOCAB, (n, 4, 5), generator=g)
    ingr[:, -1] = 0
    return {"title": title, "ingredients": ingr, "instructions": torch.randint(3, VOCAB, (n, 3, 6), generator=g),
            "ingredient_labels": (torch.rand(n, N_ING, generator=g) < 0.3).float(),
            "has_image": torch.ones(n, dtype=torch.bool), "image": torch.randn(n, 3, s, s, generator=g)}


def _conv_cfg(*overrides: str) -> Config:
    """tiny_test with a conv backbone (resnet10t at 32 px), so the channels-last path has convs and pooling."""
    return Config.load("tiny_test", ["model.image_model=resnet10t", "model.image_size=32", *overrides])


def _step_once(cfg: Config, seed: int = 0) -> tuple[dict[str, float], dict[str, torch.Tensor], nn.Module]:
    torch.manual_seed(seed)
    model = create_model(cfg, VOCAB, N_ING).train()
    prepare_model(model, cfg, torch.device("cpu"))
    step = TrainStep(model, cfg)
    torch.manual_seed(seed + 1)
    terms = step.paired_step([_batch(cfg, 6)], 0.1)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return terms, grads, model


def test_channels_last_gives_the_same_losses_and_gradients() -> None:
    """fp32 paired step with every term on, NHWC against NCHW: same dropout draws (layout does not touch the
    RNG), so the same loss terms and gradients up to the conv algorithms' summation order."""
    base = _conv_cfg("train.fast_dropout=false", "train.channels_last=false")
    fast = _conv_cfg("train.fast_dropout=false", "train.channels_last=true")
    t0, g0, _ = _step_once(base)
    t1, g1, m1 = _step_once(fast)
    conv = m1.image_encoder.backbone.conv1[0].weight if hasattr(m1.image_encoder.backbone.conv1, "__getitem__") \
        else m1.image_encoder.backbone.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert t0.keys() == t1.keys()
    for k in t0:
        assert t1[k] == pytest.approx(t0[k], rel=1e-4, abs=1e-5), k
    assert g0.keys() == g1.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-3, atol=1e-5, msg=n)


def test_fast_dropout_step_runs_every_term_and_differs_only_by_the_stream() -> None:
    """Same terms as the nn.Dropout step, finite, close in value (another mask, same model); with dropout 0 the
    two are identical."""
    t0, _, _ = _step_once(_conv_cfg("train.fast_dropout=false"))
    t1, g1, _ = _step_once(_conv_cfg("train.fast_dropout=true"))
    assert t0.keys() == t1.keys() and all(math.isfinite(v) for v in t1.values())
    assert L.grads_finite(list(g1.values()))
    z0, gz0, _ = _step_once(_conv_cfg("train.fast_dropout=false", "model.dropout=0.0"))
    z1, gz1, _ = _step_once(_conv_cfg("train.fast_dropout=true", "model.dropout=0.0"))
    assert z0 == z1
    for n in gz0:
        assert torch.equal(gz0[n], gz1[n]), n


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_fused_optimizers_follow_the_default_ones(optimizer: str) -> None:
    """Three updates with the same gradients through apply_update: fused Adam/AdamW parameters equal the
    for-loop ones to float rounding (the fused kernel orders the same operations differently). The gradients
    are set by hand, contiguous, on channels-last conv weights: the layout mismatch the fused CPU kernel would
    silently get wrong (match_layouts)."""
    overrides = [f"optim.optimizer={optimizer}", "optim.weight_decay=0.01"]
    models = []
    for fused in (False, True):
        cfg = _conv_cfg(*overrides, f"optim.fused={str(fused).lower()}")
        torch.manual_seed(0)
        model = create_model(cfg, VOCAB, N_ING)
        prepare_model(model, cfg, torch.device("cpu"))
        opts = build_optimizers(model, cfg)
        assert all(o.defaults.get("fused") is (True if fused else None) for o in opts.values())
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=g) * 0.1
            assert apply_update(opts, {"loss": 1.0}, cfg)
        models.append(model)
    for (n, a), b in zip(models[0].named_parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=n)


def test_match_layouts_fixes_grads_and_resumed_moments() -> None:
    """A channels-last weight with a contiguous gradient and contiguous moments (a checkpoint of a run without
    channels-last): after match_layouts one fused step equals the for-loop step; without it, it would not."""
    torch.manual_seed(0)
    w, grad, m, v = torch.randn(8, 3, 3, 3), torch.randn(8, 3, 3, 3), torch.randn(8, 3, 3, 3), torch.rand(8, 3, 3, 3)
    out = []
    for fused in (False, True):
        p = nn.Parameter(w.clone().to(memory_format=torch.channels_last))
        opt = torch.optim.Adam([p], lr=0.1, fused=fused or None)
        opt.load_state_dict({"state": {0: {"step": torch.tensor(3.0), "exp_avg": m.clone(), "exp_avg_sq": v.clone()}},
                             "param_groups": opt.state_dict()["param_groups"]})
        p.grad = grad.clone()
        if fused:
            assert match_layouts(opt) == 3
            assert match_layouts(opt) == 0
        opt.step()
        out.append(p.detach().clone())
    torch.testing.assert_close(out[1], out[0], rtol=1e-5, atol=1e-6)


def test_apply_update_matches_the_step_by_hand_and_skips_non_finite() -> None:
    """Finite: clip the main group to grad_clip, then every optimiser steps (by hand: the same calls one by
    one). A NaN term or gradient: nothing moves, gradients are cleared."""
    cfg = _conv_cfg("optim.grad_clip=0.05")
    params = []
    for by_hand in (True, False):
        torch.manual_seed(0)
        model = create_model(cfg, VOCAB, N_ING)
        opts = build_optimizers(model, cfg)
        g = torch.Generator().manual_seed(2)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        if by_hand:
            main = [p for grp in opts["main"].param_groups for p in grp["params"]]
            total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in main]))
            for p in main:
                p.grad.mul_(min(1.0, 0.05 / (float(total) + 1e-6)))
            for o in opts.values():
                o.step()
        else:
            assert apply_update(opts, {"loss": 1.0}, cfg)
        params.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*params, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)

    torch.manual_seed(0)
    model = create_model(cfg, VOCAB, N_ING)
    opts = build_optimizers(model, cfg)
    before = [p.detach().clone() for p in model.parameters()]
    for bad_terms, bad_grad in (({"loss": float("nan")}, False), ({"loss": 1.0}, True)):
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        if bad_grad:
            next(model.parameters()).grad[0] = float("inf")
        assert not apply_update(opts, bad_terms, cfg)
        assert all(p.grad is None for p in model.parameters())
        assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


def test_load_optimizer_state_keeps_this_runs_implementation() -> None:
    """A checkpoint of a run with the for-loop Adam resumed with optim.fused=true steps fused (and back)."""
    for saved, now in ((False, True), (True, False)):
        cfg_saved = _conv_cfg(f"optim.fused={str(saved).lower()}")
        cfg_now = _conv_cfg(f"optim.fused={str(now).lower()}")
        torch.manual_seed(0)
        model = create_model(cfg_saved, VOCAB, N_ING)
        opts = build_optimizers(model, cfg_saved)
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        apply_update(opts, {"loss": 1.0}, cfg_saved)
        states = {k: o.state_dict() for k, o in opts.items()}
        fresh = build_optimizers(model, cfg_now)
        for k, o in fresh.items():
            load_optimizer_state(o, states[k], cfg_now)
            assert all(bool(g["fused"]) is now for g in o.param_groups)
            assert len(o.state) == len(opts[k].state)


# -- packed lines ---------------------------------------------------------------------------------------------
def test_pack_lines_places_every_token_once_and_keeps_lines_whole() -> None:
    """Brute force over the plan: every real token gets a distinct slot, a line's tokens are consecutive in one
    row in column order, and no row overflows."""
    from tnlbt.models.recipe_encoder import pack_lines

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 9, (37,), generator=g)
    real = torch.arange(8)[None, :] < lengths[:, None]
    real[5, 2] = False  # a hole: the token after it keeps its own column
    pk = pack_lines(real)
    assert sorted(pk.slot.tolist()) == sorted(set(pk.slot.tolist())) and len(pk.slot) == int(real.sum())
    assert pk.n_bins * pk.width >= len(pk.slot) and pk.n_bins < real.shape[0]
    for i in range(real.shape[0]):
        slots = pk.slot[pk.line == i].tolist()
        cols = pk.col[pk.line == i].tolist()
        assert cols == real[i].nonzero().flatten().tolist()
        assert slots == list(range(slots[0], slots[0] + len(slots)))
        assert slots[0] // pk.width == slots[-1] // pk.width


@pytest.mark.parametrize("autocast", [False, True])
def test_packed_recipe_encoder_matches_the_padded_one(autocast: bool) -> None:
    """Training mode, dropout 0: packed lines give the padded path's embeddings and gradients (fp32 to 1e-5;
    under bf16 autocast to bf16 rounding)."""
    cfg = Config.load("tiny_test", ["model.dropout=0.0", "model.text_layers=2"])
    torch.manual_seed(0)
    model = create_model(cfg, VOCAB, N_ING).train()
    b = _batch(cfg, 9, seed=4)
    b["ingredients"][2] = 0  # a recipe without ingredient lines
    b["instructions"][4, :, 3:] = 0
    outs, grads = [], []
    for packed in (False, True):
        model.recipe_encoder.pack_lines = packed
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model.recipe_features(b)
        (out["emb"].float().sum() + out["tokens"].float().pow(2).sum()).backward()
        outs.append({k: v.detach().float() for k, v in out.items() if k != "token_mask"})
        grads.append({n: p.grad.clone() for n, p in model.recipe_encoder.named_parameters() if p.grad is not None})
    tol = {"atol": 3e-2, "rtol": 3e-2} if autocast else {"atol": 1e-5, "rtol": 1e-4}
    for k in outs[0]:
        torch.testing.assert_close(outs[1][k], outs[0][k], **tol, msg=k)
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        scale = max(1.0, float(grads[0][n].abs().max()))
        torch.testing.assert_close(grads[1][n] / scale, grads[0][n] / scale, **tol, msg=n)
    # eval mode: fp32 keeps the padded path (exactly the same numbers); under CPU autocast (the bf16 validation
    # of a training run) the packing encoder packs, within bf16 rounding of the padded path
    model.eval()
    model.recipe_encoder.pack_lines = True
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        emb = model.recipe_features(b)["emb"].float()
    torch.testing.assert_close(emb, outs[0]["emb"], **tol)


def test_eval_under_cpu_autocast_packs_the_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    """Which path eval takes: packed only where the fused fast path is blocked (CPU autocast), padded in fp32."""
    from tnlbt.models import recipe_encoder as re_mod

    cfg = Config.load("tiny_test")
    model = create_model(cfg, VOCAB, N_ING).eval()
    model.recipe_encoder.pack_lines = True
    calls: list[int] = []
    real_pack = re_mod.pack_lines
    monkeypatch.setattr(re_mod, "pack_lines", lambda real: calls.append(1) or real_pack(real))
    b = _batch(cfg, 4, seed=1)
    with torch.no_grad():
        model.recipe_features(b)
        assert calls == []
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model.recipe_features(b)
    assert len(calls) == 2  # ingredient and instruction lines


# -- batched recipe SSL ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["ht", "valid", "hard"])
def test_batched_ssl_equals_one_triplet_loss_per_pair(kind: str) -> None:
    """recipe_ssl_loss_batched == recipe_ssl_loss (one TripletLoss per ordered pair), value and gradients,
    on a TNLBT's real projectors; two components too."""
    cfg = Config.load("tiny_test")
    torch.manual_seed(0)
    model = create_model(cfg, VOCAB, N_ING)
    w = cfg.model.text_width
    for names in (("title", "ingredients", "instructions"), ("title", "instructions")):
        comps = {c: torch.randn(10, w, requires_grad=True) for c in names}
        vals, grads = [], []
        for batched in (False, True):
            model.zero_grad(set_to_none=True)
            for v in comps.values():
                v.grad = None
            if batched:
                loss = L.recipe_ssl_loss_batched(comps, model.ssl_project_many, 0.3, kind)
            else:
                loss = L.recipe_ssl_loss(comps, model.ssl_project, 0.3, kind)
            loss.backward()
            vals.append(loss.detach())
            grads.append([v.grad.clone() for v in comps.values()]
                         + [p.grad.clone() for p in model.ssl_proj.parameters() if p.grad is not None])
        torch.testing.assert_close(vals[1], vals[0], rtol=1e-5, atol=1e-6)
        assert len(grads[0]) == len(grads[1]) > len(names)
        for a, b in zip(*grads, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_one_discriminator_pass_on_real_images_gives_the_frozen_passs_values() -> None:
    """The step reads the generator's real-image ingredient term from the discriminator's own (trained) pass:
    in train mode batch norm uses the batch's statistics, so a frozen-parameter pass on the same inputs (what
    the step did before) gives the same values, and neither has a gradient path to the generator."""
    from tnlbt.train.step import _frozen_call

    cfg = Config.load("tiny_test")
    torch.manual_seed(0)
    model = create_model(cfg, VOCAB, N_ING).train()
    real = torch.rand(6, 3, 64, 64) * 2 - 1
    mu = torch.randn(6, cfg.model.gen_cond_dim, requires_grad=True)
    frozen = _frozen_call(model.image_disc, real, mu.detach())["ingredient_logits"]
    own = model.image_disc(real, mu.detach())["ingredient_logits"]
    assert torch.equal(frozen, own.detach()) and not frozen.requires_grad and own.requires_grad


def test_apply_update_treats_an_overflowing_gradient_norm_as_not_finite() -> None:
    cfg = _conv_cfg("optim.grad_clip=1.0")
    torch.manual_seed(0)
    model = create_model(cfg, VOCAB, N_ING)
    opts = build_optimizers(model, cfg)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    next(model.parameters()).grad.fill_(3e38)  # finite elements, 2-norm beyond float32
    assert not apply_update(opts, {"loss": 1.0}, cfg)


def test_packed_fast_dropout_forward_replays_exactly_for_the_feature_cache() -> None:
    """GradCache recomputes each micro-batch under the RNG state of its first pass: with packed lines and the
    cheaper mask on, the replayed forward gives the same embeddings bit for bit (dropout active)."""
    cfg = Config.load("tiny_test", ["scaling.cache_steps=2"])
    torch.manual_seed(0)
    model = create_model(cfg, VOCAB, N_ING).train()
    prepare_model(model, cfg, torch.device("cpu"))
    assert model.recipe_encoder.pack_lines and any(isinstance(m, FastDropout) for m in model.modules())
    step = TrainStep(model, cfg)
    b = _batch(cfg, 6, seed=2)
    state = capture_rng()
    with torch.no_grad():
        first, _ = step._forward(b)
    again, _ = step._forward(b)  # a fresh draw: dropout is on
    assert not torch.equal(first[1], again[1].detach())
    with replay_rng(state):
        replayed, _ = step._forward(b)
    for a, r in zip(first, replayed, strict=True):
        assert torch.equal(a, r.detach())
    terms = step.paired_step([b, _batch(cfg, 6, seed=3)], 0.1)
    assert all(math.isfinite(v) for v in terms.values())


def test_precision_auto_takes_fp32_without_bf16_units_and_a_forced_bf16_warns(monkeypatch, caplog) -> None:
    """On a CPU without bf16 units torch emulates bf16 (~80x slower GEMMs on a Zen 2): auto trains in fp32
    there, and a forced bf16 is kept (the user asked) but said to be slow."""
    import logging

    from tnlbt.train import precision as P

    cpu = torch.device("cpu")
    monkeypatch.setattr(P, "cpu_has_bf16", lambda: False)
    assert P.resolve_precision("auto", cpu) is None and P.resolve_precision("fp32", cpu) is None
    with caplog.at_level(logging.WARNING, logger=P.__name__):
        assert P.resolve_precision("bf16", cpu) is torch.bfloat16
    assert "without bf16 units" in caplog.text
    caplog.clear()
    monkeypatch.setattr(P, "cpu_has_bf16", lambda: True)
    with caplog.at_level(logging.WARNING, logger=P.__name__):
        assert P.resolve_precision("auto", cpu) is torch.bfloat16 and P.resolve_precision("bf16", cpu) is torch.bfloat16
    assert caplog.text == ""
