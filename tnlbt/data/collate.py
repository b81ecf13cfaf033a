"""Processed rows -> the model batch of docs/contracts.md §3 (the one collate function every loop uses).

Rows come either as a list of row dicts (Parquet / :class:`tnlbt.data.dataset.RecipeDataset`) or as a Ray Data
numpy batch (``dict[column, np.ndarray]``, where list columns are object arrays of arrays). Text is
zero-padded to the longest item in the batch: ``title`` (B, T), ``ingredients`` (B, N, T), ``instructions``
(B, M, T); a line that exists only as padding is all zeros, so the model's masks see it as empty.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from tnlbt.data.images import decode_rgb

# How people query with a recipe: the whole recipe, or part of it (issue 11 §3; SIMMER trains on both).
QUERY_FORMS = ("full", "title", "ingredients", "title+ingredients", "instructions")
PARTIAL_FORMS = QUERY_FORMS[1:]
_KEEPS = {"full": ("title", "ingredients", "instructions"), "title": ("title",), "ingredients": ("ingredients",),
          "title+ingredients": ("title", "ingredients"), "instructions": ("instructions",)}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_image_transform(size: int = 224) -> Callable[[Image.Image], torch.Tensor]:
    """Resize the shorter side to ``size``, centre crop, ImageNet mean/std (H-T's eval transform)."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def transform(img: Image.Image) -> torch.Tensor:
        w, h = img.size
        scale = size / min(w, h)
        img = img.convert("RGB").resize((max(size, round(w * scale)), max(size, round(h * scale))),
                                        Image.Resampling.BILINEAR)
        w, h = img.size
        left, top = (w - size) // 2, (h - size) // 2
        img = img.crop((left, top, left + size, top + size))
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (x - mean) / std

    return transform


def _as_rows(rows: Sequence[Mapping[str, Any]] | Mapping[str, Any]) -> list[Mapping[str, Any]]:
    if isinstance(rows, Mapping):  # Ray Data numpy batch: column -> array of length B
        columns = {k: v for k, v in rows.items()}
        lengths = {len(v) for v in columns.values()}
        if len(lengths) != 1:
            raise ValueError(f"batch columns have different lengths: {sorted(lengths)}")
        n = lengths.pop()
        return [{k: v[i] for k, v in columns.items()} for i in range(n)]
    return list(rows)


def _ints(x: Any) -> np.ndarray:
    return np.asarray(x if x is not None else [], dtype=np.int64).reshape(-1)


def _lines(x: Any) -> list[np.ndarray]:
    return [] if x is None else [_ints(line) for line in x]


def _pad_2d(seqs: list[np.ndarray]) -> torch.Tensor:
    t = max([1, *(len(s) for s in seqs)])
    out = np.zeros((len(seqs), t), dtype=np.int64)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return torch.from_numpy(out)


def _pad_3d(docs: list[list[np.ndarray]]) -> torch.Tensor:
    n = max([1, *(len(d) for d in docs)])
    t = max([1, *(len(line) for d in docs for line in d)])
    out = np.zeros((len(docs), n, t), dtype=np.int64)
    for i, d in enumerate(docs):
        for j, line in enumerate(d):
            out[i, j, : len(line)] = line
    return torch.from_numpy(out)


def recipe_form(title: np.ndarray, ingredients: list[np.ndarray], instructions: list[np.ndarray], form: str
                ) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """One query form of a recipe's token ids: the components ``form`` names are kept, the others emptied (an
    empty component is all padding, which the recipe encoder masks, as for a query typed without it)."""
    if form not in _KEEPS:
        raise ValueError(f"query form must be one of {', '.join(QUERY_FORMS)}; got {form!r}")
    keep = _KEEPS[form]
    return (title if "title" in keep else title[:0], ingredients if "ingredients" in keep else [],
            instructions if "instructions" in keep else [])


@dataclass(frozen=True)
class PartialRecipes:
    """Training augmentation (``train.partial_recipes``): each row becomes, with probability ``prob``, one of the
    :data:`PARTIAL_FORMS` (uniformly), and a kept ingredient or instruction list keeps each line with
    probability ``line_keep`` (at least one line), as people type a few ingredients rather than all."""

    prob: float
    line_keep: float = 0.5

    def apply(self, title: np.ndarray, ingredients: list[np.ndarray], instructions: list[np.ndarray],
              rng: random.Random) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray], bool]:
        if self.prob <= 0 or rng.random() >= self.prob:
            return title, ingredients, instructions, False
        title, ingredients, instructions = recipe_form(title, ingredients, instructions, rng.choice(PARTIAL_FORMS))
        return title, self._subset(ingredients, rng), self._subset(instructions, rng), True

    def _subset(self, lines: list[np.ndarray], rng: random.Random) -> list[np.ndarray]:
        if len(lines) <= 1:
            return lines
        kept = [x for x in lines if rng.random() < self.line_keep]
        return kept or [lines[rng.randrange(len(lines))]]


def collate(
    rows: Sequence[Mapping[str, Any]] | Mapping[str, np.ndarray],
    *,
    n_ingredients: int,
    image_transform: Callable[[Image.Image], torch.Tensor] | None = None,
    image_pick: Literal["random", "first"] = "first",
    rng: random.Random | None = None,
    with_images: bool = True,
    form: str = "full",
    partial: PartialRecipes | None = None,
) -> dict[str, torch.Tensor]:
    """Rows (contracts §2) -> model batch (contracts §3).

    ``image`` is present only when ``with_images`` and every row has a photo; ``image_pick="random"`` draws
    one of a recipe's photos with ``rng`` (H-T train), ``"first"`` takes the first (val/test).
    ``image_transform`` defaults to :func:`default_image_transform` (224, ImageNet statistics).
    ``form`` (one of :data:`QUERY_FORMS`) keeps only those recipe components (evaluation per query form);
    ``partial`` draws partial forms per row with ``rng`` (training) and adds ``partial`` (B,) bool: which rows
    were cut, so the recipe self-supervision can leave them out.
    """
    items = _as_rows(rows)
    if not items:
        raise ValueError("collate: empty batch")
    if image_pick not in ("random", "first"):
        raise ValueError(f"collate: image_pick must be 'random' or 'first', got {image_pick!r}")
    texts = [recipe_form(_ints(r["title_ids"]), _lines(r["ingredient_ids"]), _lines(r["instruction_ids"]), form)
             for r in items]
    cut: list[bool] = []
    if partial is not None:
        pick_rng = rng if rng is not None else random.Random()
        drawn = [partial.apply(*t, pick_rng) for t in texts]
        texts, cut = [d[:3] for d in drawn], [d[3] for d in drawn]
    batch: dict[str, torch.Tensor] = {
        "title": _pad_2d([t[0] for t in texts]),
        "ingredients": _pad_3d([t[1] for t in texts]),
        "instructions": _pad_3d([t[2] for t in texts]),
    }
    if partial is not None:
        batch["partial"] = torch.tensor(cut, dtype=torch.bool)
    labels = torch.zeros(len(items), n_ingredients, dtype=torch.float32)
    for i, r in enumerate(items):
        idx = _ints(r.get("ingredient_labels"))
        if idx.size and (idx.min() < 0 or idx.max() >= n_ingredients):
            raise ValueError(f"collate: ingredient label out of range 0..{n_ingredients - 1} in row {i}")
        labels[i, torch.from_numpy(idx)] = 1.0
    batch["ingredient_labels"] = labels

    photos = [list(r.get("images") if r.get("images") is not None else []) for r in items]
    has_image = [bool(r.get("has_image", True)) and len(p) > 0 for r, p in zip(items, photos, strict=True)]
    batch["has_image"] = torch.tensor(has_image, dtype=torch.bool)
    if with_images and all(has_image):
        transform = image_transform or default_image_transform()
        pick = rng if rng is not None else random
        images = []
        for p in photos:
            k = pick.randrange(len(p)) if image_pick == "random" else 0
            images.append(transform(decode_rgb(bytes(p[k]))))
        batch["image"] = torch.stack(images).float()
    return batch
