"""Typed config: defaults validate, overrides parse, errors name the key and the allowed values."""

from __future__ import annotations

import json

import pytest

from tnlbt.config import Config, ConfigError, apply_overrides


def test_defaults_round_trip_through_json():
    cfg = Config()
    again = Config.from_dict(json.loads(cfg.to_json()))
    assert again == cfg
    assert isinstance(again.optim.betas, tuple)


def test_overrides_parse_yaml_values():
    cfg = Config.load(None, ["train.epochs=3", "model.cross_decoder=false", "optim.lr=3e-4",
                             "optim.betas=[0.5, 0.9]", "eval.bag_sizes=[100, 500]"])
    assert cfg.train.epochs == 3
    assert cfg.model.cross_decoder is False
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.optim.betas == (0.5, 0.9)
    assert cfg.eval.bag_sizes == (100, 500)


def test_config_is_frozen():
    cfg = Config()
    with pytest.raises(AttributeError):
        cfg.train.epochs = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("train.nope=1", "unknown key(s) 'nope'; allowed: run_name"),
        ("nosection.x=1", "unknown key(s) 'nosection'; allowed: data, model"),
        ("loss.triplet=cosine", "loss.triplet: 'cosine' is not allowed; choose one of 'ht', 'valid', 'hard'"),
        ("train.epochs=abc", "train.epochs: expected an integer"),
        ("train.epochs=0", "train.epochs: must be >= 1"),
        ("model.cross_decoder=maybe", "model.cross_decoder: expected true or false"),
        ("model.gen_image_size=96", "choose one of 64, 128"),
        ("loss.margin_start=0.5", "loss.margin_start: must be <= loss.margin_max"),
        ("model.text_heads=3", "model.text_width: must be divisible by model.text_heads"),
        ("optim.betas=[0.9]", "optim.betas: expected 2 values"),
        ("epochs=3", "must be section.key"),
        ("train.epochs", "must look like section.key=value"),
    ],
)
def test_errors_name_key_and_allowed(override, needle):
    with pytest.raises(ConfigError) as e:
        Config.load(None, [override])
    assert needle in str(e.value)


def test_apply_overrides_does_not_mutate_input():
    raw = {"train": {"epochs": 2}}
    out = apply_overrides(raw, ["train.epochs=5"])
    assert raw == {"train": {"epochs": 2}} and out["train"]["epochs"] == 5


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match="unknown preset 'no_such_preset'"):
        Config.load("no_such_preset")


def test_missing_yaml_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        Config.from_yaml(tmp_path / "x.yaml")
