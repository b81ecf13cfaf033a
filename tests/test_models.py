"""Model tests: H-T recipe encoder against per-sentence/per-recipe loops, padding safety, timm encoders for
every preset, gradient routing, switchable parts, checkpoints, pretrained-weight loading and preprocessing.

Tiny randomly initialised models only (timm ``pretrained=False``); nothing is downloaded.
"""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch
import torch.nn.functional as F

from tnlbt.config import Config, list_presets
from tnlbt.models import TNLBT, create_model, load_model, save_model
from tnlbt.models.image_encoder import ImageEncoder, PretrainedWeightsError, create_backbone
from tnlbt.models.recipe_encoder import SingleTransformerEncoder, attention_padding_mask, masked_mean

VOCAB = 40
N_ING = 12
# Small timm models that work at 32-64 px and are fast on CPU (see bench/results/model.json for speeds).
TINY_IMAGE_MODELS = [
    ("test_vit", 32),
    ("vit_tiny_patch16_224", 32),
    ("resnet10t", 32),
    ("test_resnet", 64),
    ("test_convnext", 64),
    ("mobilenetv3_small_050", 64),
]


def tiny_cfg(**model_overrides: object) -> Config:
    m = dict(
        embed_dim=32,
        text_width=32,
        text_layers=1,
        text_heads=2,
        text_ff_mult=2,
        dropout=0.0,
        image_model="test_vit",
        image_size=32,
        cross_heads=2,
        disc_hidden=16,
        ingredient_hidden=16,
        gen_channels=4,
        gen_noise_dim=8,
        gen_cond_dim=8,
        gen_image_size=64,
    )
    m.update(model_overrides)
    return Config.from_dict({"model": m})


def make_batch(B: int = 4, T: int = 7, N: int = 5, M: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random batch with ragged lengths: <start> words <end>, then 0 padding; some lines empty."""
    g = torch.Generator().manual_seed(seed)

    def seq(max_len: int) -> torch.Tensor:
        n = int(torch.randint(1, max_len - 1, (1,), generator=g))
        out = torch.zeros(max_len, dtype=torch.long)
        out[0], out[1 : n + 1], out[n + 1] = 1, torch.randint(3, VOCAB, (n,), generator=g), 2
        return out

    def lines(n_lines: int) -> torch.Tensor:
        out = torch.zeros(B, n_lines, T, dtype=torch.long)
        for b in range(B):
            k = int(torch.randint(1, n_lines + 1, (1,), generator=g))
            for i in range(k):
                out[b, i] = seq(T)
        return out

    return {
        "title": torch.stack([seq(T) for _ in range(B)]),
        "ingredients": lines(N),
        "instructions": lines(M),
        "ingredient_labels": (torch.rand(B, N_ING, generator=g) > 0.7).float(),
        "has_image": torch.ones(B, dtype=torch.bool),
    }


@pytest.fixture(scope="module")
def model() -> TNLBT:
    torch.manual_seed(0)
    return create_model(tiny_cfg(), VOCAB, N_ING).eval()


# -- pooling and padding -----------------------------------------------------------------------------------
def test_masked_mean_matches_loop() -> None:
    torch.manual_seed(1)
    x = torch.randn(6, 9, 5)
    mask = torch.rand(6, 9) > 0.4
    mask[2] = False  # an empty row pools to exactly 0
    got = masked_mean(x, mask)
    for b in range(6):
        rows = [x[b, t] for t in range(9) if mask[b, t]]
        want = torch.stack(rows).mean(0) if rows else torch.zeros(5)
        torch.testing.assert_close(got[b], want)


def test_attention_padding_mask_unmasks_only_empty_rows() -> None:
    real = torch.tensor([[True, True, False], [False, False, False]])
    pad = attention_padding_mask(real)
    assert pad.tolist() == [[False, False, True], [False, True, True]]
    assert real.tolist() == [[True, True, False], [False, False, False]]  # input not mutated


@pytest.mark.parametrize("grad", [True, False], ids=["train-path", "inference-fast-path"])
def test_sentence_encoder_padding_matches_per_sentence_loop(grad: bool) -> None:
    """Padded batch == each sentence encoded alone without padding (fast path included)."""
    torch.manual_seed(2)
    enc = SingleTransformerEncoder(16, 2, 2, 2, 0.0, 20).eval()
    lengths = [5, 1, 9, 3]
    x = torch.randn(4, 9, 16)
    real = torch.arange(9)[None, :] < torch.tensor(lengths)[:, None]
    with torch.set_grad_enabled(grad):
        pooled, _ = enc(x, real)
        for b, n in enumerate(lengths):
            alone, _ = enc(x[b : b + 1, :n], torch.ones(1, n, dtype=torch.bool))
            torch.testing.assert_close(pooled[b], alone[0], atol=1e-5, rtol=1e-4)


def brute_force_recipe_emb(m: TNLBT, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """H-T recipe embedding one recipe and one line at a time, with no padding anywhere."""
    r = m.recipe_encoder
    W = r.width

    def encode(enc: SingleTransformerEncoder, ids: torch.Tensor) -> torch.Tensor:
        ids = ids[ids != 0]
        return enc(r.word_embedding(ids)[None], torch.ones(1, len(ids), dtype=torch.bool))[0][0]

    def lines(
        ids: torch.Tensor, word: SingleTransformerEncoder, merger: SingleTransformerEncoder
    ) -> torch.Tensor:
        vecs = [encode(word, line) for line in ids if bool((line != 0).any())]
        if not vecs:
            return torch.zeros(W)
        v = torch.stack(vecs)[None]
        return merger(v, torch.ones(1, len(vecs), dtype=torch.bool))[0][0]

    out = []
    for b in range(batch["title"].shape[0]):
        e_t = encode(r.title_encoder, batch["title"][b])
        e_g = lines(batch["ingredients"][b], r.ingredient_encoder, r.ingredient_merger)
        e_s = lines(batch["instructions"][b], r.instruction_encoder, r.instruction_merger)
        out.append(torch.tanh(r.proj(torch.cat([e_t, e_g, e_s]))))
    return torch.stack(out)


@pytest.mark.parametrize("grad", [True, False], ids=["train-path", "inference-fast-path"])
def test_recipe_encoder_matches_brute_force(model: TNLBT, grad: bool) -> None:
    batch = make_batch(B=5, seed=3)
    batch["ingredients"][1] = 0  # a recipe with no ingredient lines at all
    batch["instructions"][3, 1:] = 0
    with torch.set_grad_enabled(grad):
        got = model.encode_recipe(batch, normalize=False)
        want = brute_force_recipe_emb(model, batch)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_no_nan_with_empty_lines_and_lists() -> None:
    torch.manual_seed(4)
    m = create_model(tiny_cfg(), VOCAB, N_ING).train()
    batch = make_batch(B=3, seed=4)
    batch["ingredients"][:] = 0  # every recipe without ingredients
    batch["instructions"][0] = 0
    batch["instructions"][1, -1] = 0
    f = m.recipe_features(batch)
    for k in ("emb", "title", "ingredients", "instructions", "tokens"):
        assert torch.isfinite(f[k]).all(), k
    assert torch.equal(f["ingredients"], torch.zeros_like(f["ingredients"]))  # empty component pools to 0
    assert not f["token_mask"][:, 7:12].any()  # ingredient-line positions are all padding
    (f["emb"].sum() + f["tokens"].sum()).backward()
    for n, p in m.recipe_encoder.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), n
    with torch.no_grad():
        m.eval()
        assert torch.isfinite(m.encode_recipe(batch)).all()


def test_too_long_sequence_is_a_clear_error(model: TNLBT) -> None:
    batch = make_batch(B=2, T=7)
    batch["title"] = torch.ones(2, 60, dtype=torch.long)
    with pytest.raises(ValueError, match="text_max_positions"):
        model.encode_recipe(batch)


# -- shapes and the encoder contract -----------------------------------------------------------------------
def test_shapes_and_normalisation(model: TNLBT) -> None:
    batch = make_batch(B=4, T=7, N=5, M=4)
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        r = model.recipe_features(batch)
        i = model.image_features(images)
        assert r["emb"].shape == (4, 32) and i["emb"].shape == (4, 32)
        for k in ("title", "ingredients", "instructions"):
            assert r[k].shape == (4, 32)
        assert r["tokens"].shape == (4, 7 + 5 + 4, 32) and r["token_mask"].shape == (4, 16)
        assert r["token_mask"].dtype == torch.bool
        assert i["tokens"].shape == (4, 5, model.image_encoder.token_width)  # test_vit at 32 px: cls + 2x2
        ei, er = model.encode_image(images), model.encode_recipe(batch)
        both = model(images=images, batch=batch)
        torch.testing.assert_close(both["image"]["emb"], i["emb"])
        torch.testing.assert_close(both["recipe"]["emb"], r["emb"])
        torch.testing.assert_close(ei.norm(dim=-1), torch.ones(4))
        torch.testing.assert_close(er.norm(dim=-1), torch.ones(4))
        torch.testing.assert_close(model.encode_image(images, normalize=False), i["emb"])
        torch.testing.assert_close(model.encode_recipe(batch, normalize=False), r["emb"])
        torch.testing.assert_close(F.normalize(r["emb"], dim=-1), er)
        for a, b in [("title", "ingredients"), ("instructions", "title")]:
            assert model.ssl_project(a, b, r[a]).shape == (4, 32)
    with pytest.raises(KeyError):
        model.ssl_project("title", "title", r["title"])
    assert len(model.ssl_proj) == 6


def _preset_image_models() -> list:
    """One case per distinct (image_model, image_size, embed_dim) among the presets, named by its presets."""
    cases: dict[tuple[str, int, int], list[str]] = {}
    for preset in list_presets():
        try:
            m = Config.load(preset).model
        except Exception:  # a broken preset is test_config's business
            continue
        cases.setdefault((m.image_model, m.image_size, m.embed_dim), []).append(preset)
    return [pytest.param(name, size, dim, id=f"{name}-{size}px[{','.join(presets)}]")
            for (name, size, dim), presets in cases.items()]


@pytest.mark.parametrize(("name", "size", "dim"), _preset_image_models())
def test_every_preset_image_model_gives_B_by_D(name: str, size: int, dim: int) -> None:
    enc = ImageEncoder(name, size, dim).eval()  # random init: weights are not the point here
    with torch.no_grad():
        out = enc(torch.randn(2, 3, size, size))
    assert out["emb"].shape == (2, dim)
    assert out["tokens"].ndim == 3 and out["tokens"].shape[0] == 2


@pytest.mark.parametrize(("name", "size"), TINY_IMAGE_MODELS)
def test_tiny_image_models_give_B_by_D(name: str, size: int) -> None:
    enc = ImageEncoder(name, size, 24)
    out = enc(torch.randn(2, 3, size, size))
    assert out["emb"].shape == (2, 24)
    assert out["tokens"].shape[0] == 2 and out["tokens"].shape[2] == enc.token_width
    out["emb"].sum().backward()
    assert enc.proj.weight.grad is not None


def test_unknown_image_model_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown timm model"):
        ImageEncoder("no_such_model_xyz", 32, 8)


# -- gradients ---------------------------------------------------------------------------------------------
def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: p.grad for n, p in module.named_parameters()}


def test_recipe_gradients_reach_every_recipe_encoder_and_no_image_param() -> None:
    torch.manual_seed(5)
    m = create_model(tiny_cfg(), VOCAB, N_ING).train()
    batch = make_batch(B=4, seed=5)
    m.encode_recipe(batch).sum().backward()
    r = m.recipe_encoder
    assert r.word_embedding.weight.grad is not None and r.word_embedding.weight.grad.abs().sum() > 0
    for sub in (
        "title_encoder",
        "ingredient_encoder",
        "instruction_encoder",
        "ingredient_merger",
        "instruction_merger",
        "proj",
    ):
        grads = _grads(getattr(r, sub))
        assert all(g is not None for g in grads.values()), sub
        assert any(g.abs().sum() > 0 for g in grads.values() if g is not None), sub
    assert all(g is None for g in _grads(m.image_encoder).values())
    m.zero_grad(set_to_none=True)
    m.encode_image(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(g is not None for g in _grads(m.image_encoder).values())
    assert all(g is None for g in _grads(m.recipe_encoder).values())


def test_freeze_backbone() -> None:
    m = create_model(tiny_cfg(), VOCAB, N_ING)
    m.freeze_backbone(True)
    assert not any(p.requires_grad for p in m.image_encoder.backbone.parameters())
    m.encode_image(torch.randn(2, 3, 32, 32)).sum().backward()
    assert m.image_encoder.proj.weight.grad is not None
    assert all(p.grad is None for p in m.image_encoder.backbone.parameters())
    m.freeze_backbone(False)
    assert all(p.requires_grad for p in m.image_encoder.backbone.parameters())
    m.encode_image(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in m.image_encoder.backbone.parameters())


# -- switchable parts --------------------------------------------------------------------------------------
def test_parameter_groups_partition_all_parameters(model: TNLBT) -> None:
    groups = model.parameter_groups()
    assert set(groups) == {"image_backbone", "main", "modality_disc", "generator", "image_disc"}
    ids = [id(p) for ps in groups.values() for p in ps]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}
    assert all(len(v) > 0 for v in groups.values())
    main = {id(p) for p in groups["main"]}
    assert id(model.recipe_encoder.word_embedding.weight) in main
    assert id(model.image_encoder.proj.weight) in main
    assert all(id(p) in main for p in model.cross_decoder.parameters())
    assert all(id(p) in main for p in model.ingredient_head.parameters())


@pytest.mark.parametrize(
    ("flag", "attrs", "group"),
    [
        ("cross_decoder", ["cross_decoder"], None),
        ("adversarial", ["modality_disc"], "modality_disc"),
        ("ingredient_head", ["ingredient_head"], None),
        ("generator", ["generator", "image_disc"], "generator"),
    ],
)
def test_switched_off_parts_are_absent(flag: str, attrs: list[str], group: str | None) -> None:
    on = create_model(tiny_cfg(), VOCAB, N_ING)
    off = create_model(tiny_cfg(**{flag: False}), VOCAB, N_ING)
    for a in attrs:
        assert getattr(on, a) is not None
        assert getattr(off, a) is None
        assert not any(k.startswith(a + ".") for k in off.state_dict())
    if group:
        assert off.parameter_groups()[group] == []
    if flag == "generator":
        assert off.parameter_groups()["image_disc"] == []
        with pytest.raises(RuntimeError, match="generator"):
            off.generate(torch.randn(2, 32))
    if flag == "cross_decoder":
        with pytest.raises(RuntimeError, match="cross_decoder"):
            off.cross_decode(torch.randn(2, 5, 64), torch.randn(2, 3, 32), torch.ones(2, 3, dtype=torch.bool))
    assert sum(p.numel() for p in off.parameters()) < sum(p.numel() for p in on.parameters())


# -- Cross Decoder, generator, discriminators --------------------------------------------------------------
@pytest.mark.parametrize("bidirectional", [False, True])
def test_cross_decoder_shapes_and_masking(bidirectional: bool) -> None:
    torch.manual_seed(6)
    m = create_model(tiny_cfg(cross_bidirectional=bidirectional), VOCAB, N_ING).eval()
    batch = make_batch(B=3, seed=6)
    with torch.no_grad():
        r = m.recipe_features(batch)
        i = m.image_features(torch.randn(3, 3, 32, 32))
        out = m.cross_decode(i["tokens"], r["tokens"], r["token_mask"])
        assert out["fused"].shape == (3, 32) and out["itm_logits"].shape == (3, 2)
        # Padded recipe positions must not influence the result.
        noisy = r["tokens"].clone()
        noisy[~r["token_mask"]] = 1e3 * torch.randn_like(noisy[~r["token_mask"]])
        out2 = m.cross_decode(i["tokens"], noisy, r["token_mask"])
        torch.testing.assert_close(out["fused"], out2["fused"], atol=1e-5, rtol=1e-4)
        # Hard negatives are formed by re-indexing: a permuted pairing changes the fused output.
        perm = torch.tensor([1, 2, 0])
        out3 = m.cross_decode(i["tokens"], r["tokens"][perm], r["token_mask"][perm])
        assert not torch.allclose(out["fused"], out3["fused"])
    # Gradients reach both encoders through the decoder.
    m.train()
    r = m.recipe_features(batch)
    i = m.image_features(torch.randn(3, 3, 32, 32))
    m.cross_decode(i["tokens"], r["tokens"], r["token_mask"])["itm_logits"].sum().backward()
    assert m.recipe_encoder.word_embedding.weight.grad is not None
    assert m.image_encoder.backbone.patch_embed.proj.weight.grad is not None


@pytest.mark.parametrize("size", [64, 128])
def test_generator_and_image_discriminator(size: int) -> None:
    torch.manual_seed(7)
    m = create_model(tiny_cfg(gen_image_size=size), VOCAB, N_ING)
    cond = torch.randn(3, 32)
    g = m.generate(cond)
    assert g["image"].shape == (3, 3, size, size)
    assert g["image"].abs().max() <= 1.0
    assert g["mu"].shape == (3, 8) and g["logvar"].shape == (3, 8)
    d = m.image_disc(g["image"], g["mu"])
    assert d["logits"].shape == (3,) and d["uncond_logits"].shape == (3,)
    assert d["ingredient_logits"].shape == (3, N_ING)
    m.eval()
    z = torch.randn(3, 8)
    torch.testing.assert_close(m.generate(cond, z)["image"], m.generate(cond, z)["image"])  # c = mu in eval
    real = m.images_for_gan(torch.randn(3, 3, 32, 32))
    assert real.shape == (3, 3, size, size) and real.min() >= -1 and real.max() <= 1


def test_images_for_gan_inverts_normalisation(model: TNLBT) -> None:
    mean = torch.tensor(model.data_config["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.data_config["std"]).view(1, 3, 1, 1)
    raw = torch.full((1, 3, 32, 32), 0.25)
    out = model.images_for_gan((raw - mean) / std)
    torch.testing.assert_close(out, torch.full((1, 3, 64, 64), -0.5))


def test_modality_discriminator_and_ingredient_head(model: TNLBT) -> None:
    emb = torch.randn(5, 32)
    assert model.modality_disc(emb).shape == (5,)
    assert model.ingredient_head(emb).shape == (5, N_ING)
    bn = torch.nn.modules.batchnorm._BatchNorm
    assert not any(isinstance(x, bn) for x in model.modality_disc.modules())  # WGAN-GP: no BatchNorm


def test_bf16_autocast_forward_is_finite(model: TNLBT) -> None:
    batch = make_batch(B=2)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want_r, want_i = model.encode_recipe(batch), model.encode_image(images)
        # CPU autocast takes the fast-path workaround (torch's fused encoder kernel rejects bf16 there).
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got_r, got_i = model.encode_recipe(batch).float(), model.encode_image(images).float()
    assert torch.isfinite(got_r).all() and torch.isfinite(got_i).all()
    torch.testing.assert_close(got_r, want_r, atol=0.05, rtol=0.05)
    torch.testing.assert_close(got_i, want_i, atol=0.05, rtol=0.05)
    assert torch.backends.mha.get_fastpath_enabled()  # the process-wide switch is restored


# -- checkpoints -------------------------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path) -> None:
    torch.manual_seed(8)
    # A pretrained path that does not exist where the checkpoint is loaded must not matter.
    cfg = tiny_cfg(cross_bidirectional=True)
    m = create_model(cfg, VOCAB, N_ING).eval()
    cfg_saved = cfg.with_overrides(["model.image_pretrained=/nonexistent/weights.safetensors"])
    vocab = ["<pad>", "<start>", "<end>"] + [f"w{i}" for i in range(VOCAB - 4)] + ["<unk>"]
    names = [f"ing{i}" for i in range(N_ING)]
    save_model(tmp_path / "ck", m, cfg_saved, vocab, names)
    assert {p.name for p in (tmp_path / "ck").iterdir()} == {
        "model.safetensors",
        "config.json",
        "vocab.json",
        "ingredients.json",
    }
    m2, cfg2, vocab2, names2 = load_model(tmp_path / "ck")
    assert cfg2 == cfg_saved and vocab2 == vocab and names2 == names
    assert not m2.training
    batch = make_batch(B=3)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(m.encode_recipe(batch), m2.encode_recipe(batch))
        assert torch.equal(m.encode_image(images), m2.encode_image(images))
    sd1, sd2 = m.state_dict(), m2.state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    # A trained checkpoint also serves as image_pretrained: its image_encoder.backbone.* tensors are taken.
    bb = create_backbone("test_vit", 32, str(tmp_path / "ck" / "model.safetensors"))
    bsd = m.image_encoder.backbone.state_dict()
    assert all(torch.equal(v, bsd[k]) for k, v in bb.state_dict().items())


def test_save_checks_vocab_and_load_reports_missing_files(tmp_path, model: TNLBT) -> None:
    with pytest.raises(ValueError, match="vocab"):
        save_model(tmp_path / "bad", model, tiny_cfg(), ["<pad>"], [f"i{i}" for i in range(N_ING)])
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        load_model(tmp_path)


# -- pretrained weights ------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_local_pretrained_file_loads(tmp_path, fmt: str) -> None:
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(9)
    # A classifier-bearing "pretrained" model at another resolution: head dropped, pos_embed resampled.
    src = timm.create_model("test_vit", pretrained=False, img_size=64)
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    path = tmp_path / f"w.{fmt}"
    if fmt == "safetensors":
        save_file(sd, str(path))
    else:
        torch.save({"state_dict": sd}, path)
    bb = create_backbone("test_vit", 32, str(path))
    got = bb.state_dict()
    for k, v in got.items():
        if k != "pos_embed":
            assert torch.equal(v, sd[k]), k
    assert got["pos_embed"].shape != sd["pos_embed"].shape  # resampled 64 px -> 32 px grid
    # Through the model config.
    m = create_model(tiny_cfg(image_pretrained=str(path)), VOCAB, N_ING)
    assert torch.equal(m.image_encoder.backbone.patch_embed.proj.weight, sd["patch_embed.proj.weight"])


def test_local_pretrained_mismatch_is_reported(tmp_path) -> None:
    import timm
    from safetensors.torch import save_file

    save_file(
        timm.create_model("test_resnet", pretrained=False).state_dict(), str(tmp_path / "r.safetensors")
    )
    with pytest.raises(PretrainedWeightsError, match="missing key"):
        create_backbone("test_convnext", 64, str(tmp_path / "r.safetensors"))
    with pytest.raises(PretrainedWeightsError, match="not found"):
        create_backbone("test_vit", 32, str(tmp_path / "nope.safetensors"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(PretrainedWeightsError, match="cannot read"):
        create_backbone("test_vit", 32, str(tmp_path / "junk.pth"))


def test_hub_offline_fails_fast_with_instructions(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(PretrainedWeightsError, match=r"model\.image_pretrained=/path/to/weights") as e:
        create_backbone("vit_tiny_patch16_224", 32, "hub")
    assert time.perf_counter() - t0 < 2.0
    assert "HF_HUB_OFFLINE" in str(e.value)


def test_hub_unreachable_fails_fast(monkeypatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network unreachable (test)")

    monkeypatch.setattr(socket, "create_connection", refuse)
    t0 = time.perf_counter()
    with pytest.raises(PretrainedWeightsError, match="unreachable"):
        create_backbone("resnet10t", 32, "hub")
    assert time.perf_counter() - t0 < 2.0
    assert os.environ.get("HF_HUB_OFFLINE") is None


# -- preprocessing -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "mean"), [("test_vit", (0.5, 0.5, 0.5)), ("resnet10t", (0.485, 0.456, 0.406))]
)
def test_image_transform_uses_the_backbone_config(name: str, mean: tuple[float, ...]) -> None:
    from PIL import Image

    m = create_model(
        tiny_cfg(image_model=name, image_size=48, cross_decoder=False, generator=False), VOCAB, N_ING
    )
    cfg = m.data_config
    assert tuple(cfg["mean"]) == pytest.approx(mean)
    colour = (200, 100, 50)
    for train in (True, False):
        for mode in ("RGB", "RGBA", "L"):
            img = Image.new("RGB", (90, 70), colour).convert(mode)
            x = m.image_transform(train)(img)
            assert x.shape == (3, 48, 48) and x.dtype == torch.float32
            if mode == "RGB":
                want = torch.tensor(
                    [(c / 255 - mu) / sd for c, mu, sd in zip(colour, cfg["mean"], cfg["std"], strict=True)]
                )
                torch.testing.assert_close(x.mean(dim=(1, 2)), want.float(), atol=1e-3, rtol=1e-3)
    import pickle

    pickle.loads(pickle.dumps(m.image_transform(False)))  # Ray Data workers receive it pickled
