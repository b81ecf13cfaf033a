"""Model checkpoints without pickles: model.safetensors + config.json + vocab.json + ingredients.json.

The config is the full :class:`~tnlbt.config.Config` as JSON and is rebuilt with ``Config.from_dict``. Loading
builds the model with ``image_pretrained=""`` (the checkpoint already holds the backbone weights, and the
original pretrained file need not exist where the checkpoint is served) and then loads every tensor strictly.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from tnlbt.config import Config
from tnlbt.models.tnlbt import TNLBT, create_model

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
VOCAB = "vocab.json"
INGREDIENTS = "ingredients.json"
FORMAT = "tnlbt-model-1"


def save_model(directory: str | Path, model: TNLBT, cfg: Config, vocab_tokens: list[str],
               ingredient_names: list[str]) -> None:
    """Write the four files into ``directory`` (created if needed; existing files are replaced)."""
    from safetensors.torch import save_model as st_save_model

    if len(vocab_tokens) != model.vocab_size:
        raise ValueError(f"save_model: {len(vocab_tokens)} vocab tokens but the model has vocab_size "
                         f"{model.vocab_size}")
    if model.mcfg.ingredient_head and len(ingredient_names) != model.n_ingredients:
        raise ValueError(f"save_model: {len(ingredient_names)} ingredient names but the model predicts "
                         f"{model.n_ingredients}")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "vocab_size": str(model.vocab_size), "n_ingredients": str(model.n_ingredients)}
    # save_model (not save_file) de-duplicates shared tensors instead of failing on them.
    st_save_model(model, str(d / WEIGHTS), metadata=meta)
    cfg.to_json(d / CONFIG)
    (d / VOCAB).write_text(json.dumps({"tokens": list(vocab_tokens)}) + "\n")
    (d / INGREDIENTS).write_text(json.dumps({"names": list(ingredient_names)}) + "\n")


def load_model(checkpoint_dir: str | Path, map_location: str | torch.device = "cpu"
               ) -> tuple[TNLBT, Config, list[str], list[str]]:
    """-> (model in eval mode on ``map_location``, config, vocab tokens, ingredient names)."""
    from safetensors import safe_open
    from safetensors.torch import load_model as st_load_model

    d = Path(checkpoint_dir)
    missing = [n for n in (WEIGHTS, CONFIG, VOCAB, INGREDIENTS) if not (d / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{d} is not a model checkpoint: missing {', '.join(missing)}")
    cfg = Config.from_dict(json.loads((d / CONFIG).read_text()))
    tokens = json.loads((d / VOCAB).read_text())["tokens"]
    names = json.loads((d / INGREDIENTS).read_text())["names"]
    with safe_open(str(d / WEIGHTS), framework="pt") as f:
        meta = f.metadata() or {}
    vocab_size = int(meta.get("vocab_size", len(tokens)))
    n_ingredients = int(meta.get("n_ingredients", len(names)))
    build_cfg = cfg.replace(model=dataclasses.replace(cfg.model, image_pretrained=""))
    model = create_model(build_cfg, vocab_size, n_ingredients)
    missing_keys, unexpected = st_load_model(model, str(d / WEIGHTS), strict=False)
    if missing_keys or unexpected:
        raise ValueError(f"{d / WEIGHTS} does not match its config.json: "
                         f"missing {sorted(missing_keys)[:10]}, unexpected {sorted(unexpected)[:10]}")
    model.to(map_location)
    model.eval()
    return model, cfg, tokens, names
