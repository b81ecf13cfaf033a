"""Every YAML preset loads and validates; the paper and ablation presets say what they claim to."""

from __future__ import annotations

import pytest

from tnlbt.config import Config, configs_dir, list_presets

EXPECTED = {"tiny_test", "demo_cpu", "recipe1m_vit_b16", "ablation_no_dynamic_margin",
            "ablation_no_cross_decoder", "ablation_no_translation", "ablation_no_critic",
            "ablation_no_recipe_ssl", "ablation_small_batch", "ht_baseline"}

# ablation -> the only (section, key) pairs allowed to differ from demo_cpu (besides train.run_name)
ABLATIONS = {
    "ablation_no_dynamic_margin": {("loss", "margin_schedule")},  # constant at loss.margin (0.3, the max)
    "ablation_no_cross_decoder": {("model", "cross_decoder")},
    "ablation_no_translation": {("model", "generator")},
    "ablation_no_critic": {("model", "adversarial")},
    "ablation_no_recipe_ssl": {("loss", "w_recipe_ssl"), ("train", "recipe_only_every")},
    "ablation_small_batch": {("train", "batch_size")},  # demo_cpu has no feature cache to switch off
}


def global_batch(c: Config) -> int:
    return c.train.batch_size * c.scaling.num_workers * c.scaling.cache_steps


def test_all_presets_present() -> None:
    assert set(list_presets()) >= EXPECTED


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_loads_validates_and_roundtrips(name: str) -> None:
    cfg = Config.load(name)
    again = Config.from_dict(cfg.to_dict())
    assert again == cfg
    # every key in the file is a real field (the loader would have raised otherwise) and the run is named
    assert cfg.train.run_name
    assert (configs_dir() / f"{name}.yaml").read_text().strip()


def test_tiny_test_is_tiny() -> None:
    c = Config.load("tiny_test")
    assert c.model.embed_dim <= 64 and c.model.text_layers == 1 and c.model.image_size <= 64
    assert c.model.image_pretrained == ""  # never a download in tests
    assert c.train.precision == "fp32"


def test_paper_preset() -> None:
    c = Config.load("recipe1m_vit_b16")
    m = c.model
    assert (m.image_model, m.embed_dim, m.text_width, m.text_layers, m.text_heads) == \
        ("vit_base_patch16_224", 1024, 512, 2, 4)
    assert global_batch(c) == 768 and c.scaling.num_workers >= 2  # every worker's rows are everyone's negatives
    assert c.scaling.use_gpu and c.train.precision == "bf16" and c.train.epochs == 100
    assert m.cross_decoder and m.adversarial and m.generator and c.loss.w_recipe_ssl > 0


def test_demo_cpu_runs_offline_on_cpu() -> None:
    c = Config.load("demo_cpu")
    assert not c.scaling.use_gpu and c.model.image_pretrained == ""
    # One worker with both of a laptop's cores (2 x 1 thread measured slower on 2 cores; the data-parallel layout
    # is the paper preset's, tested above); one micro-batch, since 64 rows fit (the feature cache is for batches
    # that do not: tests/test_train_feature_cache.py).
    assert c.scaling.num_workers == 1 and c.scaling.cpus_per_worker == 2 and c.scaling.cache_steps == 1
    assert global_batch(c) >= 4 * global_batch(Config.load("ablation_small_batch"))
    assert c.train.batch_size * c.train.recipe_only_batch_mult == 64  # recipe-only batches as big as paired ones
    assert c.model.cross_decoder and c.model.adversarial and c.model.generator


def _diff(a: dict, b: dict) -> set[tuple[str, str]]:
    return {(s, k) for s in a for k in a[s] if a[s][k] != b[s][k]}


@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_ablation_switches_off_exactly_one_term(name: str) -> None:
    base = Config.load("demo_cpu").to_dict()
    abl = Config.load(name).to_dict()
    diff = _diff(base, abl) - {("train", "run_name")}
    assert diff == ABLATIONS[name]
    c = Config.load(name)
    if name == "ablation_no_dynamic_margin":
        assert c.loss.margin_schedule == "constant"
    elif name == "ablation_no_cross_decoder":
        assert not c.model.cross_decoder
    elif name == "ablation_no_translation":
        assert not c.model.generator and c.model.adversarial and c.model.ingredient_head
    elif name == "ablation_no_critic":
        assert not c.model.adversarial and c.model.generator
    elif name == "ablation_no_recipe_ssl":
        assert c.loss.w_recipe_ssl == 0 and c.train.recipe_only_every == 0
    elif name == "ablation_small_batch":
        assert c.scaling.cache_steps == 1 and global_batch(c) < global_batch(Config.load("demo_cpu"))
        assert c.train.batch_size < Config.load("demo_cpu").train.batch_size


def test_ht_baseline_is_ht_at_scaled_batch() -> None:
    """H-T's loss and fixed margin, recipe SSL, no TNLBT/ACME extras, and demo_cpu's batch x 128 / 768."""
    c, full, paper = Config.load("ht_baseline"), Config.load("demo_cpu"), Config.load("recipe1m_vit_b16")
    assert c.loss.triplet == "ht" and c.loss.margin_schedule == "constant" and c.loss.margin == 0.3
    assert c.loss.w_recipe_ssl > 0 and c.train.recipe_only_every > 0
    m = c.model
    assert not (m.cross_decoder or m.adversarial or m.generator or m.ingredient_head)
    assert global_batch(c) == global_batch(full) * 128 // global_batch(paper)
    assert global_batch(Config.load("ablation_small_batch")) == global_batch(c)
    # the same encoders as the full preset: the comparison is about the method
    for k in ("embed_dim", "text_width", "text_layers", "image_model", "image_size", "dropout"):
        assert getattr(m, k) == getattr(full.model, k)
