"""Losses against brute-force twins: O(B²) loops, fake 2-rank collectives, gradient reachability."""

from __future__ import annotations

import itertools
import json
import math
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tnlbt.config import Config, LossConfig
from tnlbt.losses import (
    TripletLoss,
    balance_translation,
    check_finite,
    gen_losses,
    grads_finite,
    image_disc_loss,
    ingredient_loss,
    itm_loss,
    margin_at,
    modality_disc_loss,
    modality_gen_loss,
    recipe_ssl_loss,
    sample_itm_negatives,
    total_loss,
)

KINDS = ("ht", "valid", "hard")


# -- brute-force twin ---------------------------------------------------------------------------------
def loop_triplet(img: torch.Tensor, rec: torch.Tensor, m: float, kind: str) -> torch.Tensor:
    """Literal transcription of the formulas with Python loops over (i, j)."""
    x = [v / v.norm() for v in img]
    y = [v / v.norm() for v in rec]
    b = len(x)

    def d(i: int, j: int) -> torch.Tensor:  # image i vs recipe j
        return 1 - torch.dot(x[i], y[j])

    zero = img.sum() * 0
    if kind == "ht":
        s = zero
        for i in range(b):
            for j in range(b):
                if i != j:
                    s = s + torch.relu(m + d(i, i) - d(i, j)) + torch.relu(m + d(j, j) - d(i, j))
        return s / b**2
    if kind == "valid":
        total = zero
        for direction in (0, 1):
            s, n = zero, 0
            for a in range(b):
                for o in range(b):
                    if a == o:
                        continue
                    h = torch.relu(m + d(a, a) - (d(a, o) if direction == 0 else d(o, a)))
                    s = s + h
                    n += int(float(h) > 0)
            total = total + s / max(n, 1)
        return total
    assert kind == "hard"
    total = zero
    for a in range(b):
        neg_i2r = min((d(a, o) for o in range(b) if o != a), key=float)
        neg_r2i = min((d(o, a) for o in range(b) if o != a), key=float)
        total = total + (torch.relu(m + d(a, a) - neg_i2r) + torch.relu(m + d(a, a) - neg_r2i)) / b
    return total


def _pair(b: int = 6, d: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(b, d, generator=g, dtype=torch.float64)
    rec = img + 0.9 * torch.randn(b, d, generator=g, dtype=torch.float64)
    return img, rec


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("margin", [0.05, 0.3, 1.5])
def test_triplet_matches_loop_values_and_grads(kind: str, margin: float) -> None:
    img, rec = _pair(seed=3)
    a1, b1 = img.clone().requires_grad_(), rec.clone().requires_grad_()
    a2, b2 = img.clone().requires_grad_(), rec.clone().requires_grad_()
    out = TripletLoss(kind)(a1, b1, margin)
    ref = loop_triplet(a2, b2, margin, kind)
    assert float(ref.detach()) > 0  # the case is not trivial
    torch.testing.assert_close(out["total"], ref, atol=1e-10, rtol=1e-9)
    out["total"].backward()
    ref.backward()
    torch.testing.assert_close(a1.grad, a2.grad, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(b1.grad, b2.grad, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(out["image_to_recipe"] + out["recipe_to_image"], out["total"])


def test_triplet_active_fraction_and_edge_cases() -> None:
    img, rec = _pair()
    # Margin large enough: every hinge is active; tiny negative margin: none is.
    assert float(TripletLoss("ht")(img, rec, 10.0)["active_fraction"]) == pytest.approx(1.0)
    out = TripletLoss("valid")(img, rec, -10.0)
    assert float(out["active_fraction"]) == 0.0 and float(out["total"]) == 0.0
    # Identical, orthogonal pairs: d_pos = 0, d_neg = 1, so with m = 0.5 nothing is active.
    eye = torch.eye(4)
    for kind in KINDS:
        o = TripletLoss(kind)(eye, eye.clone(), 0.5)
        assert float(o["total"]) == 0.0 and float(o["active_fraction"]) == 0.0
    # A batch of one has no negatives: zero loss, no NaN.
    for kind in KINDS:
        o = TripletLoss(kind)(torch.randn(1, 4), torch.randn(1, 4), 0.3)
        assert check_finite(o) == [] and float(o["total"]) == 0.0
    with pytest.raises(ValueError):
        TripletLoss("nope")
    with pytest.raises(ValueError):
        TripletLoss("ht")(torch.randn(3, 4), torch.randn(2, 4), 0.3)


# -- margin schedules --------------------------------------------------------------------------------
def test_margin_constant_and_incremental() -> None:
    assert margin_at(LossConfig(margin_schedule="constant", margin=0.25), 17.3) == 0.25
    cfg = LossConfig(margin_schedule="incremental", margin_start=0.05, margin_delta=0.005, margin_max=0.3)
    assert margin_at(cfg, 0.0) == pytest.approx(0.05)
    assert margin_at(cfg, 10.0) == pytest.approx(0.10)
    assert margin_at(cfg, 10.5) == pytest.approx(0.1025)  # fractional within the epoch (per step)
    assert margin_at(cfg, 49.0) == pytest.approx(0.295)
    assert margin_at(cfg, 80.0) == pytest.approx(0.3)  # capped
    per_epoch = LossConfig(margin_schedule="incremental", margin_per_step=False)
    assert margin_at(per_epoch, 10.99) == pytest.approx(margin_at(per_epoch, 10.0))
    assert margin_at(per_epoch, 11.0) > margin_at(per_epoch, 10.99)
    # Monotone non-decreasing in progress.
    values = [margin_at(cfg, e / 7) for e in range(700)]
    assert all(b >= a for a, b in itertools.pairwise(values))


def test_margin_resume_gives_same_margin() -> None:
    cfg = LossConfig(margin_schedule="incremental")
    steps_per_epoch = 37
    run = [margin_at(cfg, s / steps_per_epoch) for s in range(200)]
    # "Resume" at step 123: the config comes back from the checkpoint's JSON, only the progress is known.
    restored = Config.from_dict(json.loads(Config(loss=cfg).to_json())).loss
    resumed = [margin_at(restored, s / steps_per_epoch) for s in range(123, 200)]
    assert resumed == run[123:]
    acfg = LossConfig(margin_schedule="adaptive")
    assert margin_at(acfg, 5.0, 0.4) == margin_at(acfg, 5.0, 0.4)


def test_margin_adaptive_clamps() -> None:
    cfg = LossConfig(margin_schedule="adaptive", margin_min=0.05, margin_max=0.7)
    assert margin_at(cfg, 0.0, 0.0) == pytest.approx(0.7)
    assert margin_at(cfg, 0.0, 0.5) == pytest.approx(0.35)
    assert margin_at(cfg, 0.0, 0.99) == pytest.approx(0.05)  # 0.007 clamped up to the minimum
    assert margin_at(cfg, 0.0, 1.7) == pytest.approx(0.05)  # out-of-range fraction clamped
    assert margin_at(cfg, 0.0, None) == pytest.approx(0.05)  # before any batch: as if all were active
    assert margin_at(cfg, 0.0, float("nan")) == pytest.approx(0.05)


# -- recipe self-supervision ----------------------------------------------------------------------------
def test_recipe_ssl_matches_loop_and_reaches_projectors() -> None:
    g = torch.Generator().manual_seed(1)
    comps = {
        c: torch.randn(5, 8, generator=g, dtype=torch.float64, requires_grad=True)
        for c in ("title", "ingredients", "instructions")
    }
    proj = nn.ModuleDict({f"{a}->{b}": nn.Linear(8, 8).double() for a in comps for b in comps if a != b})
    used = []

    def project(src: str, dst: str, x: torch.Tensor) -> torch.Tensor:
        used.append((src, dst))
        return proj[f"{src}->{dst}"](x)

    out = recipe_ssl_loss(comps, project, 0.3, kind="ht")
    ref = (
        sum(
            loop_triplet(comps[a], proj[f"{b}->{a}"](comps[b]), 0.3, "ht")
            for a in comps
            for b in comps
            if a != b
        )
        / 6
    )
    torch.testing.assert_close(out, ref)
    assert sorted(used) == sorted((b, a) for a in comps for b in comps if a != b)
    out.backward()
    for c in comps.values():
        assert c.grad is not None and c.grad.abs().sum() > 0
    for p in proj.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        recipe_ssl_loss({"title": comps["title"]}, project, 0.3)


# -- fake 2-rank collectives ------------------------------------------------------------------------------
class FakeWorld:
    """In-process stand-in for a process group. Each rank runs in its own thread; ``gather_fn(rank)`` is an
    all-gather that returns the concatenation of every rank's tensor in rank order.

    With ``autograd=True`` the other ranks' slots are their real (graph-connected) tensors, so one backward of
    the sum of the ranks' losses hands rank r's input d(Σ_s loss_s)/d(x_r): exactly what autograd all-gather's
    backward (a reduce-scatter sum) gives rank r. With ``autograd=False`` the other slots are detached (plain
    all_gather with the local slot put back, open_clip's non-grad path), which must NOT match."""

    def __init__(self, world_size: int, autograd: bool = True) -> None:
        self.world_size = world_size
        self.autograd = autograd
        self.barrier = threading.Barrier(world_size, timeout=30)
        self.slots: dict[int, list] = {}
        self.lock = threading.Lock()

    def gather_fn(self, rank: int):
        calls = itertools.count()

        def gather(x: torch.Tensor) -> torch.Tensor:
            k = next(calls)
            with self.lock:
                self.slots.setdefault(k, [None] * self.world_size)[rank] = x
            self.barrier.wait()
            parts = [p if (s == rank or self.autograd) else p.detach() for s, p in enumerate(self.slots[k])]
            return torch.cat(parts, dim=0)

        return gather

    def run(self, fn):
        results: list = [None] * self.world_size
        errors: list = []

        def target(r: int) -> None:
            try:
                results[r] = fn(r)
            except BaseException as e:  # surface thread errors in the test
                errors.append(e)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.world_size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results


def _encoder_and_data(bg: int, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    enc = nn.Linear(6, 5).double()  # a shared "encoder" whose parameter gradients DDP would average
    u = torch.randn(bg, 6, dtype=torch.float64)
    v = u + 0.8 * torch.randn(bg, 6, dtype=torch.float64)
    return enc, u, v


def _distributed_grads(kind: str, margin: float, world: int, autograd: bool = True):
    enc, u, v = _encoder_and_data(8)
    b = u.shape[0] // world
    fw = FakeWorld(world, autograd=autograd)

    def rank_fn(r: int) -> dict:
        loss = TripletLoss(kind, rank=r, world_size=world, gather_fn=fw.gather_fn(r))
        return loss(enc(u[r * b : (r + 1) * b]), enc(v[r * b : (r + 1) * b]), margin)

    outs = fw.run(rank_fn)
    sum(o["total"] for o in outs).backward()
    # What DDP ends with: the mean over ranks of each rank's parameter gradient.
    grads = [p.grad.clone() / world for p in enc.parameters()]
    return outs, grads


def _global(kind: str, margin: float):
    enc, u, v = _encoder_and_data(8)
    out = TripletLoss(kind)(enc(u), enc(v), margin)
    out["total"].backward()
    return out, [p.grad.clone() for p in enc.parameters()]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("world", [2, 4])
def test_local_loss_equals_global_loss_with_fake_collectives(kind: str, world: int) -> None:
    margin = 0.4
    outs, grads = _distributed_grads(kind, margin, world)
    ref, ref_grads = _global(kind, margin)
    mean_total = sum(float(o["total"]) for o in outs) / world
    assert mean_total == pytest.approx(float(ref["total"]), abs=1e-5, rel=1e-6)
    for o in outs:  # every rank agrees on the global active fraction (so on the adaptive margin)
        assert float(o["active_fraction"]) == pytest.approx(float(ref["active_fraction"]), abs=1e-6)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


def test_detached_gather_does_not_match() -> None:
    """The parity test can fail: gathering without gradient loses the other ranks' contributions."""
    _, grads = _distributed_grads("ht", 0.4, 2, autograd=False)
    _, ref_grads = _global("ht", 0.4)
    assert not all(torch.allclose(g, r, atol=1e-5) for g, r in zip(grads, ref_grads, strict=True))


def test_pre_gathered_columns() -> None:
    enc, u, v = _encoder_and_data(8)
    x, y = enc(u), enc(v)
    ref = TripletLoss("ht")(x, y, 0.3)
    fw = FakeWorld(2)

    def rank_fn(r: int) -> dict:
        loss = TripletLoss("ht", rank=r, world_size=2, gather_fn=fw.gather_fn(r))
        return loss(x[r * 4 : (r + 1) * 4], y[r * 4 : (r + 1) * 4], 0.3, image_all=x, recipe_all=y)

    outs = fw.run(rank_fn)
    assert sum(float(o["total"]) for o in outs) / 2 == pytest.approx(float(ref["total"]), rel=1e-9)


# -- adversarial ----------------------------------------------------------------------------------------
def _disc() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))


def test_modality_disc_loss_trains_only_the_critic() -> None:
    torch.manual_seed(0)
    disc = _disc()
    enc = nn.Linear(4, 8)
    real = enc(torch.randn(6, 4))
    fake = enc(torch.randn(6, 4)) + 1.0
    out = modality_disc_loss(disc, real, fake, gp_weight=10.0)
    assert set(out) >= {"total", "wasserstein", "gp"} and check_finite(out) == []
    torch.testing.assert_close(out["total"], -disc(real).mean() + disc(fake).mean() + 10.0 * out["gp"])
    out["total"].backward()
    # Every critic weight gets a gradient (the last bias cancels in E[D(real)] - E[D(fake)]: grad exactly 0).
    assert all(p.grad is not None for p in disc.parameters())
    assert all(p.grad.abs().sum() > 0 for n, p in disc.named_parameters() if n != "2.bias")
    assert all(p.grad is None for p in enc.parameters())  # detached inputs: encoders untouched


def test_gradient_penalty_is_zero_for_unit_gradient_critic() -> None:
    # D(x) = w.x with |w| = 1 has gradient norm exactly 1 everywhere: GP = 0.
    lin = nn.Linear(8, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(F.normalize(torch.randn(1, 8), dim=1))
    out = modality_disc_loss(lin, torch.randn(5, 8), torch.randn(5, 8), 10.0)
    assert float(out["gp"]) == pytest.approx(0.0, abs=1e-10)
    with torch.no_grad():
        lin.weight.mul_(3.0)  # gradient norm 3: GP = (3 - 1)^2 = 4
    gp = modality_disc_loss(lin, torch.randn(5, 8), torch.randn(5, 8), 10.0)["gp"]
    assert float(gp) == pytest.approx(4.0)


def test_modality_gen_loss_reaches_encoder_not_critic() -> None:
    torch.manual_seed(0)
    disc = _disc()
    enc = nn.Linear(4, 8)
    fake = enc(torch.randn(6, 4))
    loss = modality_gen_loss(disc, fake)
    torch.testing.assert_close(loss, -disc(fake).mean())
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters())
    assert all(p.grad is None for p in disc.parameters())


# -- translation ----------------------------------------------------------------------------------------
def test_translation_terms_match_formulas_and_reach_generator() -> None:
    torch.manual_seed(0)
    b, k = 4, 7
    targets = (torch.rand(b, k) > 0.6).float()
    gen_in = torch.randn(b, 3, requires_grad=True)  # stands in for the generator's output path
    head = nn.Linear(3, 1 + k)
    fake = head(gen_in)
    d_fake, fake_cls = fake[:, :1], fake[:, 1:]
    real_cls = torch.randn(b, k)
    mu, logvar = torch.randn(b, 5, requires_grad=True), torch.randn(b, 5, requires_grad=True)
    out = gen_losses(d_fake, fake_cls, real_cls, targets, mu, logvar, kl_weight=2.0)
    # Hand formulas.
    bce = F.binary_cross_entropy_with_logits
    kl = (-0.5 * (1 + logvar - mu**2 - logvar.exp())).mean()
    expect = bce(d_fake, torch.ones_like(d_fake)) + bce(fake_cls, targets) + bce(real_cls, targets) + 2.0 * kl
    torch.testing.assert_close(out["total"], expect)
    out["total"].backward()
    assert gen_in.grad is not None and gen_in.grad.abs().sum() > 0
    assert mu.grad is not None and logvar.grad is not None
    # KL is zero for the standard normal.
    zeros = torch.zeros(2, 5)
    z = gen_losses(d_fake.detach(), fake_cls.detach(), real_cls, targets, zeros, zeros, 2.0)
    assert float(z["kl"]) == pytest.approx(0.0, abs=1e-7)

    d_real = torch.randn(b, 1)
    dl = image_disc_loss(d_real, d_fake.detach(), real_cls, targets)
    expect_d = (
        bce(d_real, torch.ones_like(d_real))
        + bce(d_fake.detach(), torch.zeros_like(d_real))
        + bce(real_cls, targets)
    )
    torch.testing.assert_close(dl["total"], expect_d)
    # Ingredient loss against a per-element loop.
    logits = torch.randn(b, k)
    ref = sum(
        -(t * math.log(1 / (1 + math.exp(-x))) + (1 - t) * math.log(1 - 1 / (1 + math.exp(-x))))
        for x, t in zip(logits.flatten().tolist(), targets.flatten().tolist(), strict=True)
    ) / (b * k)
    assert float(ingredient_loss(logits, targets)) == pytest.approx(ref, rel=1e-5)


def test_balance_translation() -> None:
    a = torch.tensor(4.0, requires_grad=True)
    b = torch.tensor(1.0, requires_grad=True)
    la, lb = balance_translation(a * 1.0, b * 1.0)
    assert float(la) == pytest.approx(1.0) and float(lb) == pytest.approx(1.0)
    (la + lb).backward()
    assert float(a.grad) == pytest.approx(0.25)  # scaled by the detached ratio, direction kept
    assert float(b.grad) == pytest.approx(1.0)
    la, lb = balance_translation(torch.tensor(0.5), torch.tensor(2.0))
    assert float(la) == 0.5 and float(lb) == pytest.approx(0.5)


# -- ITM ---------------------------------------------------------------------------------------------
def test_itm_negatives_never_positive_and_follow_similarity() -> None:
    b = 6
    sim = torch.randn(b, b)
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        neg_img, neg_rec = sample_itm_negatives(sim, g)
        assert neg_img.shape == (b,) and neg_rec.shape == (b,)
        assert (neg_img != torch.arange(b)).all() and (neg_rec != torch.arange(b)).all()
    # Deterministic for a seeded generator.
    r1 = sample_itm_negatives(sim, torch.Generator().manual_seed(5))
    r2 = sample_itm_negatives(sim, torch.Generator().manual_seed(5))
    assert all(torch.equal(a, c) for a, c in zip(r1, r2, strict=True))
    # A dominant off-diagonal similarity is (almost always) the sampled hard negative.
    sim = torch.zeros(b, b)
    sim[0, 3] = 20.0  # image 0 looks like recipe 3
    _, neg_rec = sample_itm_negatives(sim, torch.Generator().manual_seed(0))
    assert int(neg_rec[0]) == 3
    neg_img, _ = sample_itm_negatives(sim, torch.Generator().manual_seed(0))
    assert int(neg_img[3]) == 0
    # Saturated softmax still leaves negatives to draw; several without replacement.
    big = torch.eye(b) * 1e4
    ni, nr = sample_itm_negatives(big, torch.Generator().manual_seed(0), num=3)
    assert ni.shape == (b, 3) and all(len(set(row.tolist())) == 3 for row in ni)
    assert not (ni == torch.arange(b)[:, None]).any() and not (nr == torch.arange(b)[:, None]).any()
    with pytest.raises(ValueError):
        sample_itm_negatives(torch.zeros(1, 1))


def test_itm_loss() -> None:
    logits = torch.tensor([[2.0, -1.0], [0.0, 3.0]])
    labels = torch.tensor([0, 1])
    p0 = math.exp(2) / (math.exp(2) + math.exp(-1))
    p1 = math.exp(3) / (1 + math.exp(3))
    expect = -(math.log(p0) + math.log(p1)) / 2
    assert float(itm_loss(logits, labels)) == pytest.approx(expect, rel=1e-6)


# -- total and guards -------------------------------------------------------------------------------
def test_total_loss_weights_and_balancing() -> None:
    cfg = LossConfig(w_retrieval=1.0, w_recipe_ssl=0.5, w_adv=0.005, w_trans=0.002, w_itm=2.0)
    t = {
        "retrieval": torch.tensor(1.0),
        "recipe_ssl": torch.tensor(2.0),
        "adv": torch.tensor(-3.0),
        "trans_img": torch.tensor(8.0),
        "trans_text": torch.tensor(2.0),
        "itm": torch.tensor(0.5),
        "active_fraction": torch.tensor(0.9),
    }  # logging terms are ignored
    expect = 1.0 + 0.5 * 2.0 + 0.005 * -3.0 + 0.002 * (2.0 + 2.0) + 2.0 * 0.5
    assert float(total_loss(t, cfg)) == pytest.approx(expect)
    assert float(total_loss({"recipe_ssl": torch.tensor(2.0)}, cfg)) == pytest.approx(1.0)
    # A single translation term: nothing to balance.
    assert float(total_loss({"trans_img": torch.tensor(3.0)}, cfg)) == pytest.approx(0.006)
    with pytest.raises(ValueError):
        total_loss({"foo": torch.tensor(1.0)}, cfg)


def test_check_finite() -> None:
    terms = {
        "a": torch.tensor(1.0),
        "b": torch.tensor(float("nan")),
        "c": torch.tensor([1.0, float("inf")]),
        "d": 2.0,
        "e": float("-inf"),
    }
    assert check_finite(terms) == ["b", "c", "e"]
    assert check_finite({"ok": torch.zeros(3)}) == []


def test_grads_finite_agrees_with_an_elementwise_check() -> None:
    def elementwise(params: list[torch.nn.Parameter]) -> bool:
        return all(bool(torch.isfinite(p.grad).all()) for p in params if p.grad is not None)

    def params(*grads: torch.Tensor | None) -> list[torch.nn.Parameter]:
        out = []
        for g in grads:
            p = torch.nn.Parameter(torch.zeros(0 if g is None else g.numel()))
            p.grad = g
            out.append(p)
        return out

    big = torch.full((1000,), 3e38)  # finite, but its 2-norm overflows to inf
    cases = [
        params(),
        params(None, torch.zeros(0)),
        params(torch.randn(5), big),
        params(torch.randn(5), torch.tensor([1.0, float("nan")])),
        params(torch.tensor([float("-inf")]), None),
        params(torch.zeros(0), torch.randn(70_000)),
    ]
    expected = [True, True, True, False, False, True]
    assert [grads_finite(c) for c in cases] == [elementwise(c) for c in cases] == expected
