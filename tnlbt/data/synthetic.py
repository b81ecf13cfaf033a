"""Offline dataset generator: recipes and procedurally drawn photos in Recipe1M's exact on-disk layout.

``tnlbt synth --out DIR --recipes N --seed S`` writes ``layer1.json``, ``layer2.json``, ``det_ingrs.json`` and
``images/{partition}/{c0}/{c1}/{c2}/{c3}/{image_id}`` (see docs/contracts.md §1), plus ``synth_info.json``
with the parameters and counts.

How it stays learnable but not trivial:

* every ingredient has a visual signature (colour, shape, size; :mod:`tnlbt.data.synth_catalog`); the
  preparation word of its raw line ("sliced", "diced", "cut into wedges") picks the drawn shape and the
  quantity scales how many pieces show; pantry items (salt, oil, water) show nothing;
* the dish type fixes the vessel and the layout (piled, layered, stacked, skewered, grid of items, blended);
  the cooking method named in the instructions changes the look (browning, golden frying with outlines,
  grill stripes, pieces mixed together vs kept apart, blended into one smooth colour);
* photos of one recipe differ in background, vessel colour, placement, scale, rotation, lighting, noise,
  blur and JPEG quality, scaled by ``difficulty`` (0 = clean studio shots, 1 = default, 2 = hard); many
  recipes share ingredients and dish types, so a match needs the combination.

Determinism and scale: every recipe draws from its own RNG seeded by ``(seed, index)`` and every photo from
``(seed, index, photo)``, so output bytes do not depend on the worker count or chunking. Recipes are made in
chunks by a process pool (``imap``, in order); workers write the JPEGs themselves and return only the JSON
text of their chunk, which the parent streams into the three JSON arrays. Memory stays bounded by
(chunk size x workers), never by N.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import multiprocessing as mp
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from tnlbt.data.synth_catalog import METHODS, PREP, UNITS, Dish, Ingredient, catalog

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
SPLIT_P = (0.70, 0.15, 0.15)
PHOTO_COUNT_P = (0.34, 0.26, 0.18, 0.12, 0.10)  # 1..5 photos per recipe (mean about 2.4)
OUTPUT_FILES = ("layer1.json", "layer2.json", "det_ingrs.json", "synth_info.json")
URL_RECIPE = "https://recipes.example.com/recipe/{id}/{slug}"
URL_IMAGE = "https://img.recipes.example.com/{partition}/{image_id}"

# How much each group counts when picking the "key" ingredients named in a title.
_GROUP_SALIENCE = {
    "meat": 3.0,
    "seafood": 3.0,
    "pasta": 2.5,
    "grain": 2.0,
    "fruit": 2.0,
    "veg": 1.6,
    "legume": 1.5,
    "cheese": 1.4,
    "leafy": 1.2,
    "sauce": 1.2,
    "bread": 1.0,
    "sweet": 1.0,
    "dairy": 0.8,
    "nut": 0.6,
    "herb": 0.5,
    "batter": 0.5,
    "liquid": 0.5,
    "drizzle": 0.4,
    "spice": 0.3,
    "pantry": 0.0,
}
# How strongly a cooking method's tint acts on a group (greens barely brown, meat and dough a lot).
_TINT_SENSITIVITY = {
    "leafy": 0.4,
    "herb": 0.4,
    "fruit": 0.6,
    "meat": 1.4,
    "seafood": 1.2,
    "bread": 1.3,
    "batter": 1.3,
    "dough": 1.3,
    "tortilla": 1.2,
    "crumbs": 1.3,
    "cheese": 1.2,
    "pasta": 0.8,
    "grain": 0.8,
}
_SIZE_R = {"s": 0.030, "m": 0.045, "l": 0.062}  # sprite radius as a share of the photo side
_SIZE_N = {"s": 12.0, "m": 7.0, "l": 4.0}  # sprites for a typical amount in a full-size food region
# Layouts whose dough/batter/egg items make up the base colour instead of being drawn as pieces.
_BATTER_LAYOUTS = {"bands", "grid", "stack", "disc"}
_GRILLABLE = {"chunk", "strip", "round", "square", "cube", "wedge", "whole", "blob", "bean"}
_BREADY = {"bread", "tortilla"}  # drawn as the carrier (slices, buns, shells) of the other pieces
_BATTER_DISHES = {"cake", "cookies", "muffins", "pancakes", "pie", "quiche", "omelette"}

_BACKGROUNDS = [
    (236, 232, 224),
    (222, 210, 190),
    (170, 120, 80),
    (120, 84, 56),
    (70, 70, 76),
    (40, 42, 48),
    (210, 220, 226),
    (190, 204, 180),
    (232, 214, 200),
    (150, 160, 170),
    (245, 245, 242),
    (96, 60, 40),
    (200, 180, 150),
    (60, 80, 100),
]
_VESSEL_COLOURS = {
    "bowl": [(245, 245, 240), (40, 60, 110), (200, 90, 60), (230, 220, 190), (60, 60, 64), (110, 150, 120)],
    "plate": [(248, 248, 246), (235, 230, 215), (30, 30, 34), (180, 200, 215), (215, 190, 160)],
    "skillet": [(44, 44, 46), (60, 58, 56), (90, 92, 96)],
    "pot": [(170, 172, 176), (150, 40, 35), (40, 70, 60), (30, 30, 32)],
    "baking dish": [(245, 242, 236), (200, 90, 50), (180, 200, 230), (230, 230, 230)],
    "sheet": [(185, 188, 192), (150, 152, 156), (120, 110, 100)],
    "tin": [(170, 172, 176), (130, 132, 136)],
    "glass": [(225, 235, 240), (210, 225, 232)],
    "board": [(196, 150, 100), (170, 120, 74), (214, 180, 130), (130, 90, 56)],
    "platter": [(248, 248, 244), (225, 215, 190), (60, 90, 120), (205, 170, 120)],
    "pie dish": [(245, 242, 236), (200, 110, 70), (190, 210, 230)],
}


# ------------------------------------------------------------------------------------------------ ids
_MASK40 = (1 << 40) - 1


def _key40(seed: int, what: str) -> int:
    h = hashlib.blake2b(f"tnlbt-synth:{seed}:{what}".encode(), digest_size=5).digest()
    return int.from_bytes(h, "big")


def _mix40(x: int, key: int) -> int:
    """A keyed bijection on 40-bit integers (xor, odd multiplies, xor-shifts): unique ids without a set."""
    x = (x ^ key) & _MASK40
    x = (x * 0x9E3779B1) & _MASK40
    x ^= x >> 19
    x = (x * 0xC2B2AE35) & _MASK40
    x ^= x >> 21
    x = (x + key) & _MASK40
    x = (x * 0x27D4EB2F) & _MASK40
    x ^= x >> 17
    return x


def recipe_id(seed: int, index: int) -> str:
    """10 hex characters, unique per (seed, index)."""
    return format(_mix40(index, _key40(seed, "recipe")), "010x")


def image_id(seed: int, index: int, k: int) -> str:
    """``<10 hex>.jpg``, unique per (seed, index, k) for k < 8."""
    return format(_mix40(index * 8 + k, _key40(seed, "image")), "010x") + ".jpg"


def image_relpath(partition: str, image_name: str) -> str:
    """Recipe1M's four-level path under the image root: ``{partition}/{c0}/{c1}/{c2}/{c3}/{image_id}``."""
    return "/".join([partition, *image_name[:4], image_name])


def _rng(seed: int, *path: int) -> np.random.Generator:
    return np.random.default_rng([seed % (1 << 63), *path])


# -------------------------------------------------------------------------------------------- recipes
@dataclass(frozen=True)
class SynthItem:
    """One ingredient line of a synthetic recipe and how it shows in the photos."""

    ing: Ingredient
    shape: str  # drawn shape, chosen to match the line's preparation word
    amount: float  # quantity relative to a typical one (0.3..3): how much of it shows
    line: str  # raw line, e.g. "1/2 cup diced tomatoes"
    det: str  # cleaned name for det_ingrs.json
    valid: bool
    role: str  # sprite | base | batter | liquid | hidden


@dataclass(frozen=True)
class SynthRecipe:
    index: int
    id: str
    partition: str
    n_photos: int
    dish: Dish
    method: str
    items: tuple[SynthItem, ...]
    extra_lines: tuple[tuple[str, str], ...]  # non-food lines (line, det text), valid=false
    title: str
    instructions: tuple[str, ...]


def _pick(rng: np.random.Generator, seq: list | tuple, p: list[float] | None = None) -> Any:
    return seq[int(rng.choice(len(seq), p=p))]


def _popularity(n: int) -> np.ndarray:
    # Zipf-like: earlier catalogue entries are common, so recipes share ingredients (as real ones do).
    w = 1.0 / (np.arange(n) + 1.5) ** 0.8
    return w / w.sum()


def _singular(name: str) -> str:
    if name.endswith("oes"):
        return name[:-2]
    if name.endswith("ies"):
        return name[:-3] + "y"
    if name.endswith("s") and not name.endswith("ss"):
        return name[:-1]
    return name


def _plural(name: str) -> str:
    if name.endswith("s") or name.endswith("zucchini") or name.endswith("fennel"):
        return name
    return name + ("es" if name.endswith("o") and not name.endswith("avocado") else "s")


def _role(ing: Ingredient, shape: str, dish: Dish) -> str:
    if ing.kind == "pantry":
        return "hidden"
    if ing.kind == "liquid":
        return "liquid" if dish.layout in ("liquid", "blend") else "hidden"
    if ing.kind == "batter":
        if dish.key in _BATTER_DISHES or dish.layout == "blend":
            return "batter"
        if ing.group == "dough" and dish.layout in _BATTER_LAYOUTS:
            return "batter"  # pizza dough / pie crust: the disc itself
        return "hidden" if shape == "none" else "sprite"
    if ing.kind == "base":
        return "base"
    return "sprite"


# Groups whose lines carry preparation words; nuts, spices, grains, sauces... read wrong with "diced".
_PREP_GROUPS = {"veg", "fruit", "leafy", "herb", "meat", "seafood", "cheese", "bread", "tortilla"}
_CHEESE_PREP = {
    "strand": (["shredded"], ["shredded"]),
    "cube": (["cubed"], ["cubed", "cut into cubes"]),
    "round": (["sliced"], ["sliced"]),
    "crumble": (["crumbled"], ["crumbled"]),
}


def _prep_words(ing: Ingredient, shape: str) -> tuple[list[str], list[str]]:
    """Preparation words that fit this ingredient and produce ``shape`` ("diced" -> cubes)."""
    if ing.unit == "can" and shape in ("bean", "whole"):
        return [], ["rinsed and drained", "drained"]
    if ing.group not in _PREP_GROUPS:
        return [], []
    if ing.group == "cheese":
        return _CHEESE_PREP.get(shape, ([], []))
    if ing.group in ("bread", "tortilla"):
        return ["toasted", "warmed"], ["toasted", "split", "warmed"]
    if ing.group == "herb":
        return ["chopped fresh", "chopped"], ["chopped", "finely chopped", "leaves only"]
    if len(ing.shapes) == 1 and shape in ("dot", "whole", "powder", "bean", "curl", "blob", "drizzle", "egg"):
        return [], []  # "minced corn", "whole cherries" read wrong; the shape is the ingredient's own
    before, after = PREP.get(shape, ([], []))
    if shape == "chunk" and ing.name in ("broccoli", "cauliflower"):
        after = [*after, "cut into florets"]
    return before, after


def _ingredient_line(rng: np.random.Generator, ing: Ingredient, shape: str) -> tuple[str, float]:
    """A raw line like the real data ('1/2 cup diced tomatoes', '3 cloves garlic, minced') and its amount."""
    unit = UNITS[ing.unit]
    n_q = len(unit["q"])
    # Favour middle quantities; the extremes still occur and change how much shows.
    w = np.exp(-0.5 * ((np.arange(n_q) - (n_q - 1) / 2) / max(1.0, n_q / 3)) ** 2)
    qtext, qval = unit["q"][int(rng.choice(n_q, p=w / w.sum()))]
    amount = float(np.clip(qval / unit["typ"], 0.3, 3.0))
    name = ing.name
    if ing.adjectives and rng.random() < 0.35:
        name = f"{_pick(rng, ing.adjectives)} {name}"
    if ing.unit == "taste":
        return f"{name} to taste", 1.0
    before, after = _prep_words(ing, shape)
    prep_before = prep_after = ""
    if (before or after) and (len(ing.shapes) > 1 or rng.random() < 0.7):
        if before and (not after or rng.random() < 0.5):
            prep_before = _pick(rng, before) + " "
        else:
            prep_after = ", " + _pick(rng, after)
    if ing.unit == "count":
        name = _singular(name) if qtext == "1" else _plural(name)
        size_word = (
            _pick(rng, ["", "", "medium ", "large ", "small "]) if ing.group in ("veg", "fruit") else ""
        )
        line = f"{qtext} {size_word}{prep_before}{name}{prep_after}"
    elif ing.unit == "clove":
        word = _pick(rng, unit["one"] if qtext == "1" else unit["many"])
        line = f"{qtext} {word} {name}{prep_after or ', minced'}"
    else:
        words = unit["one"] if qtext in ("1", "1/4", "1/3", "1/2", "2/3", "3/4") else unit["many"]
        line = f"{qtext} {_pick(rng, words)} {prep_before}{name}{prep_after}"
    line = " ".join(line.split())  # collapse double spaces from empty parts
    return line, amount


_EXTRA_LINES = [
    ("cooking spray", "cooking spray"),
    ("parchment paper", "parchment paper"),
    ("wooden skewers, soaked in water", "wooden skewers"),
    ("toothpicks", "toothpicks"),
    ("ice cubes", "ice"),
    ("1 (9x13 inch) baking pan", "baking pan"),
]
_HEADINGS = ["For the sauce:", "Topping:", "For the dressing:", "Garnish:"]


def make_recipe(seed: int, index: int, no_image_share: float = 0.25) -> SynthRecipe:
    """The recipe at ``index`` for ``seed``: pure function of its arguments (the basis of determinism)."""
    cat = catalog()
    meta = _rng(seed, index, 0)  # split and photo count: independent of the content draws below
    u_split, u_noimg = meta.random(2)
    n_photos = 1 + int(meta.choice(5, p=PHOTO_COUNT_P))
    partition = SPLITS[int(np.searchsorted(np.cumsum(SPLIT_P), u_split, side="right").clip(0, 2))]
    if partition == "train" and u_noimg < no_image_share:
        n_photos = 0

    rng = _rng(seed, index, 1)
    weights = np.array([d.weight for d in cat.dishes])
    dish = cat.dishes[int(rng.choice(len(cat.dishes), p=weights / weights.sum()))]
    method = _pick(rng, dish.methods)

    chosen: list[int] = []
    for group, lo, hi in dish.slots:
        k = int(rng.integers(lo, hi + 1))
        pool = [i for i in cat.by_group[group] if i not in chosen]
        k = min(k, len(pool))
        if k:
            chosen.extend(int(i) for i in rng.choice(pool, size=k, replace=False, p=_popularity(len(pool))))
    # 3..12 ingredients: drop pantry/optional extras from the end, pad with pantry staples.
    pantry = list(cat.by_group["pantry"])
    while len(chosen) > 12:
        drop = next(
            (j for j in range(len(chosen) - 1, -1, -1) if cat.ingredients[chosen[j]].kind == "pantry"),
            len(chosen) - 1,
        )
        chosen.pop(drop)
    while len(chosen) < 3:
        extra = int(rng.choice([i for i in pantry if i not in chosen], p=None))
        chosen.append(extra)
    # Pantry lines sit anywhere in the list, as in real recipes; the rest keeps slot order (mains first).
    main = [i for i in chosen if cat.ingredients[i].kind != "pantry"]
    for p in [i for i in chosen if cat.ingredients[i].kind == "pantry"]:
        main.insert(int(rng.integers(0, len(main) + 1)), p)

    items: list[SynthItem] = []
    for i in main:
        ing = cat.ingredients[i]
        shape = ing.shapes[0] if len(ing.shapes) == 1 or rng.random() < 0.5 else _pick(rng, ing.shapes[1:])
        line, amount = _ingredient_line(rng, ing, shape)
        valid = ing.kind == "pantry" or rng.random() > 0.03  # the real extractor misses a few lines
        items.append(SynthItem(ing, shape, amount, line, ing.name, bool(valid), _role(ing, shape, dish)))

    extra: list[tuple[str, str]] = []
    if rng.random() < 0.10:
        extra.append(_pick(rng, _EXTRA_LINES))
    if rng.random() < 0.04:
        h = _pick(rng, _HEADINGS)
        extra.insert(0, (h, h.rstrip(":").lower()))

    title = _make_title(rng, dish, method, items)
    instructions = _make_instructions(rng, dish, method, items)
    return SynthRecipe(
        index,
        recipe_id(seed, index),
        partition,
        n_photos,
        dish,
        method,
        tuple(items),
        tuple(extra),
        title,
        tuple(instructions),
    )


def _key_items(items: tuple[SynthItem, ...] | list[SynthItem], n: int) -> list[SynthItem]:
    scored = sorted(
        (it for it in items if it.role != "hidden"),
        key=lambda it: -(_GROUP_SALIENCE.get(it.ing.group, 1.0) * (0.6 + 0.4 * it.amount)),
    )
    return scored[:n]


def _make_title(rng: np.random.Generator, dish: Dish, method: str, items: list[SynthItem]) -> str:
    names = [_pick(rng, it.ing.titles) for it in _key_items(items, 3)]
    names = list(dict.fromkeys(names))  # "Sausage" twice reads badly
    d = dish.names[0] if rng.random() < 0.5 else _pick(rng, dish.names)
    # "Baked Pasta Pasta Bake" reads badly too: drop key words the dish name already says
    names = [n for n in names if not set(n.lower().split()) & set(d.lower().split())][:2] or names[:1]
    a = names[0] if names else ""
    b = names[1] if len(names) > 1 else ""
    m_adj = METHODS[method]["adj"]
    adj = _pick(
        rng,
        [
            "Easy",
            "Quick",
            "Simple",
            "Classic",
            "Homemade",
            "Best",
            "Healthy",
            "Hearty",
            "Weeknight",
            "Rustic",
            "Summer",
            "Family",
        ],
    )
    who = _pick(rng, ["Grandma's", "Mom's", "Aunt Sue's", "Chef John's", "Uncle Bob's"])
    templates = [
        f"{a} {d}",
        f"{a} and {b} {d}",
        f"{m_adj} {a} {d}",
        f"{adj} {a} {b} {d}",
        f"{d} with {a}",
        f"{d} with {a} and {b}",
        f"{who} {a} {d}",
        f"{adj} {m_adj} {a} {d}",
        f"{a}-{b} {d}" if b else f"{adj} {a} {d}",
    ]
    if not b:
        templates = [t for t in templates if " and " not in t and "-" not in t] or [f"{a} {d}"]
    title = _pick(rng, templates)
    return " ".join(title.replace(" -", " ").split())


_PREP_VERBS = {
    "cube": "Dice the {x}.",
    "round": "Slice the {x}.",
    "wedge": "Cut the {x} into wedges.",
    "ring": "Slice the {x} into rings.",
    "strand": "Shred the {x}.",
    "strip": "Cut the {x} into strips.",
    "chunk": "Cut the {x} into bite-size pieces.",
    "leaf": "Wash and dry the {x}.",
    "dot": "Mince the {x}.",
    "crumble": "Crumble the {x}.",
}
_METHOD_STEPS = {
    "bake": [
        "Bake in the preheated oven until golden brown, about {n} minutes.",
        "Bake for {n} minutes, or until a toothpick inserted in the center comes out clean.",
        "Cover with foil and bake {n} minutes; uncover and bake until the top is browned.",
    ],
    "roast": [
        "Roast in the preheated oven for {n} minutes, turning once, until browned and tender.",
        "Spread {a} on the pan and roast until the edges are dark and crisp, about {n} minutes.",
    ],
    "grill": [
        "Grill {a} for {n} minutes per side, until nicely charred.",
        "Place {a} on the hot grill and cook until grill marks appear, {n} minutes per side.",
    ],
    "fry": [
        "Fry {a} in the hot oil until golden and crisp, about {n} minutes.",
        "Fry until golden brown on both sides; drain on paper towels.",
    ],
    "saute": [
        "Saute {a} until tender, about {n} minutes.",
        "Add {a} and saute, stirring, for {n} minutes.",
        "Stir-fry {a} over high heat for {n} minutes.",
    ],
    "boil": ["Boil {a} for {n} minutes, until tender; drain.", "Cook {a} in boiling water for {n} minutes."],
    "simmer": [
        "Reduce heat and simmer, covered, for {n} minutes.",
        "Simmer gently until {a} is tender, about {n} minutes, stirring occasionally.",
    ],
    "blend": [
        "Blend {a}, {b} and {c} until smooth.",
        "Puree in a blender until completely smooth.",
        "Place {a} and {b} in a blender and blend on high until smooth.",
    ],
    "toss": ["Toss {a} with {b} until evenly coated.", "Gently toss everything together in a large bowl."],
    "raw": ["Arrange {a} and {b} and chill until serving.", "Layer {a} with {b}; refrigerate until cold."],
}
_SETUP = {
    "bake": "Preheat oven to {t} degrees F ({c} degrees C).",
    "roast": "Preheat oven to {t} degrees F ({c} degrees C). Line a baking sheet with foil.",
    "grill": "Preheat an outdoor grill for medium-high heat and lightly oil the grate.",
    "fry": "Heat oil in a large skillet over medium-high heat.",
    "saute": "Heat olive oil in a large skillet over medium heat.",
    "boil": "Bring a large pot of lightly salted water to a boil.",
    "simmer": "Heat oil in a large pot over medium heat.",
}


def _make_instructions(
    rng: np.random.Generator, dish: Dish, method: str, items: list[SynthItem]
) -> list[str]:
    names = [it.ing.name for it in items if it.role != "hidden"] or [it.ing.name for it in items]
    rng_names = list(names)
    rng.shuffle(rng_names)
    key = [it.ing.name for it in _key_items(items, 1)]
    # the main ingredient is what gets grilled / fried / simmered; the others fill the mixing steps
    a, b, c = (key + [n for n in rng_names if n not in key] + names + names)[:3]
    steps: list[str] = []
    if method in _SETUP:
        t = int(_pick(rng, [325, 350, 375, 400, 425]))
        steps.append(_SETUP[method].format(t=t, c=round((t - 32) * 5 / 9)))
    for it in [it for it in items if it.shape in _PREP_VERBS and it.role == "sprite"][
        : int(rng.integers(1, 4))
    ]:
        steps.append(_PREP_VERBS[it.shape].format(x=it.ing.name))
    mix = [
        f"In a large bowl, combine {a}, {b} and {c}.",
        f"Stir in {a} and {b}.",
        f"Add {a} and cook, stirring, for {int(rng.integers(2, 8))} minutes.",
        f"Whisk together {a} and {b} in a small bowl.",
        f"Mix {a} with {b} until well combined.",
    ]
    steps.extend(rng.choice(mix, size=int(rng.integers(1, 3)), replace=False).tolist())
    tmpl = _METHOD_STEPS[method]
    for s in rng.choice(tmpl, size=min(len(tmpl), int(rng.integers(1, 3))), replace=False).tolist():
        steps.append(s.format(a=a, b=b, c=c, n=int(_pick(rng, [5, 8, 10, 15, 20, 25, 30, 45]))))
    finish = [
        "Season with salt and pepper to taste.",
        "Serve warm.",
        "Serve immediately.",
        f"Transfer to a {dish.vessel} and serve.",
        "Let cool for 10 minutes before serving.",
        f"Garnish with {c} and serve.",
    ]
    steps.extend(rng.choice(finish, size=int(rng.integers(1, 3)), replace=False).tolist())
    return steps


# ------------------------------------------------------------------------------------------- drawing
def _tint(
    colour: tuple[int, int, int], method: str, group: str, strength: float = 1.0
) -> tuple[int, int, int]:
    tr, tg, tb, s = METHODS[method]["tint"]
    s = s * _TINT_SENSITIVITY.get(group, 1.0) * strength
    r, g, b = colour
    return (int(r + (tr - r) * s), int(g + (tg - g) * s), int(b + (tb - b) * s))


def _shade(c: tuple[int, int, int], f: float) -> tuple[int, int, int]:
    if f <= 1.0:
        return (int(c[0] * f), int(c[1] * f), int(c[2] * f))
    return tuple(int(v + (255 - v) * (f - 1.0)) for v in c)  # type: ignore[return-value]


def _jitter(rng: np.random.Generator, c: tuple[int, int, int], amount: float) -> tuple[int, int, int]:
    if amount <= 0:
        return c
    dr, dg, db = rng.normal(0.0, amount, 3).tolist()  # plain floats: np.clip per scalar is 10x slower
    return (
        min(255, max(0, int(c[0] + dr))),
        min(255, max(0, int(c[1] + dg))),
        min(255, max(0, int(c[2] + db))),
    )


def _mix_colours(cols: list[tuple[tuple[int, int, int], float]]) -> tuple[int, int, int]:
    tot = sum(w for _, w in cols) or 1.0
    return tuple(int(sum(c[k] * w for c, w in cols) / tot) for k in range(3))  # type: ignore[return-value]


def _poly(x: float, y: float, radii: list[float], angle: float) -> list[tuple[float, float]]:
    n = len(radii)
    return [
        (x + r * math.cos(angle + 2 * math.pi * k / n), y + r * math.sin(angle + 2 * math.pi * k / n))
        for k, r in enumerate(radii)
    ]


def _rect_pts(x: float, y: float, half_l: float, half_w: float, angle: float) -> list[tuple[float, float]]:
    ca, sa = math.cos(angle), math.sin(angle)
    return [
        (x + ca * dx - sa * dy, y + sa * dx + ca * dy)
        for dx, dy in ((-half_l, -half_w), (half_l, -half_w), (half_l, half_w), (-half_l, half_w))
    ]


def _draw_sprite(
    d: ImageDraw.ImageDraw,
    rng: np.random.Generator,
    shape: str,
    x: float,
    y: float,
    r: float,
    c: tuple[int, int, int],
    outline: tuple[int, int, int] | None = None,
) -> None:
    """One ingredient piece. Shapes are bold (outlined, >= 2 px lines) so they survive 64-96 px inputs."""
    ang = float(rng.uniform(0, 2 * math.pi))
    dark = outline or _shade(c, 0.68)
    lw = max(1, int(r * 0.18))
    if shape == "round":
        d.ellipse((x - r, y - r, x + r, y + r), fill=c, outline=dark, width=lw)
        q = r * 0.5
        d.ellipse((x - q, y - q, x + q, y + q), fill=_shade(c, 1.18))
    elif shape == "whole":
        d.ellipse((x - r * 0.8, y - r * 0.8, x + r * 0.8, y + r * 0.8), fill=c, outline=dark, width=lw)
        q = r * 0.22
        d.ellipse(
            (x - r * 0.35 - q, y - r * 0.35 - q, x - r * 0.35 + q, y - r * 0.35 + q), fill=_shade(c, 1.35)
        )
    elif shape == "cube":
        d.polygon(_rect_pts(x, y, r * 0.75, r * 0.75, ang), fill=c, outline=dark, width=lw)
    elif shape == "square":
        d.polygon(
            _rect_pts(x, y, r * 1.3, r * 1.3, ang),
            fill=c,
            outline=_shade(c, 0.55),
            width=max(2, int(r * 0.3)),
        )
    elif shape == "wedge":
        pts = [
            (x + 1.4 * r * math.cos(ang), y + 1.4 * r * math.sin(ang)),
            (x + r * math.cos(ang + 2.5), y + r * math.sin(ang + 2.5)),
            (x + r * math.cos(ang - 2.5), y + r * math.sin(ang - 2.5)),
        ]
        d.polygon(pts, fill=c, outline=dark, width=lw)
        d.line(pts[1:], fill=dark, width=max(2, int(r * 0.3)))  # peel / rind
    elif shape == "ring":
        d.ellipse((x - r, y - r, x + r, y + r), outline=c, width=max(2, int(r * 0.38)))
    elif shape == "strand":
        pts = [(x, y)]
        a = ang
        for _ in range(5):
            a += float(rng.normal(0, 0.7))
            pts.append((pts[-1][0] + r * 0.9 * math.cos(a), pts[-1][1] + r * 0.9 * math.sin(a)))
        d.line(pts, fill=c, width=max(2, int(r * 0.32)), joint="curve")
    elif shape == "strip":
        d.polygon(_rect_pts(x, y, r * 1.4, r * 0.42, ang), fill=c, outline=dark, width=lw)
    elif shape == "leaf":
        pts = _rect_pts(x, y, r * 1.4, r * 0.6, ang)
        pts = [
            pts[0],
            ((pts[0][0] + pts[1][0]) / 2, (pts[0][1] + pts[1][1]) / 2),
            pts[1],
            (
                (pts[1][0] + pts[2][0]) / 2 + (pts[1][0] - pts[0][0]) * 0.3,
                (pts[1][1] + pts[2][1]) / 2 + (pts[1][1] - pts[0][1]) * 0.3,
            ),
            pts[2],
            ((pts[2][0] + pts[3][0]) / 2, (pts[2][1] + pts[3][1]) / 2),
            pts[3],
            (
                (pts[3][0] + pts[0][0]) / 2 - (pts[1][0] - pts[0][0]) * 0.3,
                (pts[3][1] + pts[0][1]) / 2 - (pts[1][1] - pts[0][1]) * 0.3,
            ),
        ]
        d.polygon(pts, fill=c, outline=dark, width=lw)
        d.line([pts[1], pts[5]], fill=_shade(c, 1.3), width=max(1, int(r * 0.12)))
    elif shape == "dot":
        q = r * 0.45
        d.ellipse((x - q, y - q, x + q, y + q), fill=c, outline=dark if q > 3 else None)
    elif shape == "bean":
        d.polygon(_poly(x, y, [r * 0.8, r * 0.45] * 4, ang), fill=c, outline=dark, width=lw)
    elif shape == "crumble":
        for _ in range(3):
            ox, oy = rng.normal(0, r * 0.4, 2)
            d.polygon(_poly(x + ox, y + oy, list(rng.uniform(0.25, 0.55, 5) * r), ang), fill=c, outline=dark)
    elif shape == "powder":
        pts = rng.normal(0, r * 1.2, (14, 2))
        q = max(1.0, r * 0.16)
        for px, py in pts:
            d.rectangle((x + px - q, y + py - q, x + px + q, y + py + q), fill=c)
    elif shape == "blob":
        d.polygon(_poly(x, y, list(rng.uniform(0.8, 1.35, 9) * r * 1.4), ang), fill=c, outline=dark, width=lw)
    elif shape == "chunk":
        d.polygon(_poly(x, y, list(rng.uniform(0.65, 1.15, 6) * r), ang), fill=c, outline=dark, width=lw)
    elif shape == "curl":
        d.arc(
            (x - r, y - r, x + r, y + r),
            start=math.degrees(ang),
            end=math.degrees(ang) + 230,
            fill=c,
            width=max(2, int(r * 0.5)),
        )
    elif shape == "egg":
        d.polygon(_poly(x, y, list(rng.uniform(0.9, 1.3, 8) * r * 1.4), ang), fill=(250, 250, 246))
        q = r * 0.55
        d.ellipse((x - q, y - q, x + q, y + q), fill=c, outline=_shade(c, 0.8))
    elif shape == "drizzle":
        pts = [(x, y)]
        for k in range(7):
            pts.append(
                (
                    pts[-1][0] + r * 1.1 * math.cos(ang),
                    pts[-1][1] + r * 1.1 * math.sin(ang) + (r * 0.7 if k % 2 else -r * 0.7),
                )
            )
        d.line(pts, fill=c, width=max(2, int(r * 0.3)), joint="curve")


class _Region:
    """Where food goes: a circle (cx, cy, r) or a rectangle; samples points uniformly, clustered or piled."""

    def __init__(self, kind: str, a: float, b: float, c: float, e: float = 0.0) -> None:
        self.kind, self.a, self.b, self.c, self.e = kind, a, b, c, e

    @property
    def scale(self) -> float:  # size relative to a 0.33-radius circle on a unit photo side
        if self.kind == "circle":
            return self.c
        return math.sqrt((self.c - self.a) * (self.e - self.b) / math.pi)

    def centre(self) -> tuple[float, float]:
        if self.kind == "circle":
            return self.a, self.b
        return (self.a + self.c) / 2, (self.b + self.e) / 2

    def sample(
        self, rng: np.random.Generator, n: int, spread: float = 1.0, around: tuple[float, float] | None = None
    ) -> np.ndarray:
        if self.kind == "circle":
            cx, cy, r = self.a, self.b, self.c
            if around is None:
                rad = r * np.sqrt(rng.uniform(0, 1, n)) * spread
            else:
                rad = np.abs(rng.normal(0, r * 0.22 * spread, n))
            th = rng.uniform(0, 2 * math.pi, n)
            ox, oy = around if around is not None else (cx, cy)
            pts = np.stack([ox + rad * np.cos(th), oy + rad * np.sin(th)], 1)
            # keep inside the circle (pull back toward the centre)
            dx, dy = pts[:, 0] - cx, pts[:, 1] - cy
            dist = np.sqrt(dx * dx + dy * dy) + 1e-6
            f = np.minimum(1.0, r * 0.92 / dist)
            return np.stack([cx + dx * f, cy + dy * f], 1)
        x0, y0, x1, y1 = self.a, self.b, self.c, self.e
        if around is None:
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            pts = np.stack(
                [
                    cx + (rng.uniform(0, 1, n) - 0.5) * (x1 - x0) * spread,
                    cy + (rng.uniform(0, 1, n) - 0.5) * (y1 - y0) * spread,
                ],
                1,
            )
        else:
            pts = np.stack(
                [
                    rng.normal(around[0], (x1 - x0) * 0.12 * spread, n),
                    rng.normal(around[1], (y1 - y0) * 0.12 * spread, n),
                ],
                1,
            )
        return np.stack([np.clip(pts[:, 0], x0 + 2, x1 - 2), np.clip(pts[:, 1], y0 + 2, y1 - 2)], 1)

    def fill(self, d: ImageDraw.ImageDraw, colour: tuple[int, int, int], shrink: float = 1.0) -> None:
        if self.kind == "circle":
            r = self.c * shrink
            d.ellipse((self.a - r, self.b - r, self.a + r, self.b + r), fill=colour)
        else:
            d.rounded_rectangle(
                (self.a, self.b, self.c, self.e), radius=int(0.08 * (self.c - self.a)), fill=colour
            )


def _draw_vessel(
    d: ImageDraw.ImageDraw, rng: np.random.Generator, vessel: str, cx: float, cy: float, s: float
) -> _Region:
    """Draw the vessel centred at (cx, cy) with unit size s (pixels); return the food region."""
    col = _jitter(rng, _pick(rng, _VESSEL_COLOURS.get(vessel, _VESSEL_COLOURS["plate"])), 8)
    inner = _shade(col, 0.88)
    rim = _shade(col, 0.7)
    if vessel in ("bowl", "pot"):
        r = 0.42 * s
        if vessel == "pot":
            for sx in (-1, 1):
                d.rounded_rectangle(
                    (cx + sx * r - 0.09 * s, cy - 0.05 * s, cx + sx * r + 0.09 * s, cy + 0.05 * s),
                    radius=int(0.03 * s),
                    fill=rim,
                )
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=col, outline=rim, width=max(2, int(0.012 * s)))
        ri = 0.35 * s
        d.ellipse((cx - ri, cy - ri, cx + ri, cy + ri), fill=inner)
        return _Region("circle", cx, cy, 0.34 * s)
    if vessel in ("plate", "platter", "pie dish"):
        rx, ry = (0.46 * s, 0.46 * s) if vessel != "platter" else (0.48 * s, 0.36 * s)
        d.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=col, outline=rim, width=max(2, int(0.01 * s)))
        d.ellipse(
            (cx - rx * 0.72, cy - ry * 0.72, cx + rx * 0.72, cy + ry * 0.72),
            outline=_shade(col, 0.9),
            width=max(1, int(0.008 * s)),
        )
        if vessel == "platter":
            return _Region("rect", cx - rx * 0.66, cy - ry * 0.6, cx + rx * 0.66, cy + ry * 0.6)
        return _Region("circle", cx, cy, (0.36 if vessel == "pie dish" else 0.31) * s)
    if vessel == "skillet":
        r = 0.38 * s
        ang = float(rng.uniform(0, 2 * math.pi))
        hx, hy = cx + math.cos(ang) * 0.62 * s, cy + math.sin(ang) * 0.62 * s
        d.line([(cx, cy), (hx, hy)], fill=_shade(col, 0.8), width=max(3, int(0.07 * s)))
        d.ellipse(
            (cx - r, cy - r, cx + r, cy + r), fill=col, outline=_shade(col, 1.4), width=max(2, int(0.012 * s))
        )
        return _Region("circle", cx, cy, 0.33 * s)
    if vessel in ("baking dish", "sheet", "tin", "board"):
        hw, hh = (0.44 * s, 0.34 * s) if vessel != "board" else (0.46 * s, 0.32 * s)
        d.rounded_rectangle(
            (cx - hw, cy - hh, cx + hw, cy + hh),
            radius=int(0.06 * s),
            fill=col,
            outline=rim,
            width=max(2, int(0.014 * s)),
        )
        if vessel == "board":
            for k in range(6):  # wood grain
                yy = cy - hh + (k + 0.5) * 2 * hh / 6 + float(rng.normal(0, 0.01 * s))
                d.line([(cx - hw + 4, yy), (cx + hw - 4, yy)], fill=_shade(col, 0.9), width=1)
            return _Region("rect", cx - hw * 0.86, cy - hh * 0.82, cx + hw * 0.86, cy + hh * 0.82)
        m = 0.05 * s
        if vessel != "tin":
            d.rounded_rectangle(
                (cx - hw + m, cy - hh + m, cx + hw - m, cy + hh - m), radius=int(0.04 * s), fill=inner
            )
        return _Region("rect", cx - hw + m, cy - hh + m, cx + hw - m, cy + hh - m)
    if vessel == "glass":
        hw, hh = 0.2 * s, 0.4 * s
        d.polygon(
            [(cx - hw, cy - hh), (cx + hw, cy - hh), (cx + hw * 0.82, cy + hh), (cx - hw * 0.82, cy + hh)],
            fill=col,
            outline=_shade(col, 0.75),
            width=max(2, int(0.012 * s)),
        )
        m = 0.025 * s
        return _Region("rect", cx - hw * 0.82 + m, cy - hh * 0.72, cx + hw * 0.82 - m, cy + hh - m)
    return _Region("circle", cx, cy, 0.33 * s)


@dataclass
class _Look:
    """Per-recipe colours after the cooking method (same for all photos of a recipe)."""

    sprites: list[tuple[SynthItem, tuple[int, int, int]]]
    base: list[tuple[SynthItem, tuple[int, int, int]]]
    base_colour: tuple[int, int, int] | None  # batter / dough / liquid / blend colour


def _look(recipe: SynthRecipe) -> _Look:
    m = recipe.method
    sprites = [(it, _tint(it.ing.colour, m, it.ing.group)) for it in recipe.items if it.role == "sprite"]
    base = [(it, _tint(it.ing.colour, m, it.ing.group)) for it in recipe.items if it.role == "base"]
    layout = recipe.dish.layout
    base_colour = None
    if layout == "blend":
        cols = [
            (it.ing.colour, it.amount * (2.0 if it.ing.group in ("fruit", "veg", "leafy") else 1.0))
            for it in recipe.items
            if it.role in ("sprite", "liquid", "batter", "base")
            and it.ing.group not in ("herb", "nut", "drizzle", "spice")
        ]
        base_colour = _mix_colours(cols) if cols else (200, 180, 140)
        # a blend leaves only garnish (herbs, nuts, drizzles, spices) as separate pieces
        sprites = [(it, c) for it, c in sprites if it.ing.group in ("herb", "nut", "drizzle", "spice")]
        base = []
    elif layout == "liquid":
        cols = [(it.ing.colour, it.amount * 2.0) for it in recipe.items if it.role == "liquid"]
        # simmering lends the liquid some colour of what cooks in it (tomato sauce reddens a chili)
        cols += [
            (it.ing.colour, it.amount * (1.5 if it.ing.group in ("sauce", "spice") else 0.3))
            for it in recipe.items
            if it.role == "sprite"
        ]
        base_colour = _tint(_mix_colours(cols), m, "liquid") if cols else (200, 160, 100)
    elif recipe.dish.key in _BATTER_DISHES or any(it.role == "batter" for it in recipe.items):
        cols = [(it.ing.colour, it.amount) for it in recipe.items if it.role == "batter"]
        base_colour = _tint(_mix_colours(cols), m, "batter") if cols else None
    return _Look(sprites, base, base_colour)


def _base_carpet(
    d: ImageDraw.ImageDraw, rng: np.random.Generator, region: _Region, base: list, px: float, pile: bool
) -> None:
    """Pasta, rice, noodles: a dense textured layer under the other pieces."""
    for it, col in base:
        n = int(28 * (0.5 + 0.5 * it.amount) * (region.scale / (0.33 * px)) ** 2)
        if it.shape in ("dot",):
            region.fill(d, _shade(col, 0.95), shrink=0.82 if pile else 0.97)
            n = int(n * 1.5)
        pts = region.sample(rng, n, spread=0.75 if pile else 1.0)
        r = _SIZE_R[it.ing.size] * px * (1.3 if it.shape == "strand" else 1.0)
        for x, y in pts:
            _draw_sprite(d, rng, it.shape, float(x), float(y), r, _jitter(rng, col, 6))


def _count(it: SynthItem, region: _Region, px: float, difficulty: float, rng: np.random.Generator) -> int:
    n = _SIZE_N[it.ing.size] * it.amount**0.8 * (region.scale / (0.33 * px)) ** 2
    n *= float(rng.uniform(1 - 0.15 * difficulty, 1 + 0.15 * difficulty)) if difficulty > 0 else 1.0
    return int(np.clip(round(n), 1, 40))


def render_photo(recipe: SynthRecipe, k: int, size: int, difficulty: float, seed: int) -> Image.Image:
    """Photo ``k`` of ``recipe``: deterministic in (seed, recipe index, k, size, difficulty)."""
    rng = _rng(seed, recipe.index, 2, k)
    dfc = float(difficulty)
    S = float(size)
    bg = _jitter(rng, _pick(rng, _BACKGROUNDS), 10 * dfc) if dfc > 0 else (238, 236, 232)
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    if dfc > 0 and rng.random() < min(0.9, 0.2 + 0.35 * dfc):
        _background_pattern(d, rng, size, bg)
    if dfc > 0 and rng.random() < 0.3 * dfc:
        _clutter(d, rng, size)

    scale = float(rng.uniform(1 - 0.12 * dfc, 1 + 0.04 * dfc)) if dfc > 0 else 1.0
    cx = S / 2 + (float(rng.normal(0, 0.04 * dfc)) * S if dfc > 0 else 0.0)
    cy = S / 2 + (float(rng.normal(0, 0.04 * dfc)) * S if dfc > 0 else 0.0)
    px = S * scale
    region = _draw_vessel(d, rng, recipe.dish.vessel, cx, cy, px)
    look = _look(recipe)
    _draw_food(d, rng, recipe, look, region, px, dfc)

    arr = np.asarray(img, dtype=np.float32)
    if dfc > 0:
        arr = _photo_nuisance(arr, rng, size, dfc, seed)
    out = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if dfc > 0 and rng.random() < 0.15 * dfc:
        out = out.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.4, 0.9)) * S / 256))
    return out


def _draw_food(
    d: ImageDraw.ImageDraw,
    rng: np.random.Generator,
    recipe: SynthRecipe,
    look: _Look,
    region: _Region,
    px: float,
    dfc: float,
) -> None:
    layout = recipe.dish.layout
    method = METHODS[recipe.method]
    outline = (120, 70, 20) if method.get("outline") else None
    cj = 5 + 5 * dfc  # per-piece colour jitter
    drop = 0.08 * dfc  # pieces hidden by others / out of view

    grill = bool(method.get("stripes"))
    grill_a = float(rng.uniform(0.3, 1.2))
    grill_c, grill_s = math.cos(grill_a), math.sin(grill_a)

    def sprite(it: SynthItem, col: tuple[int, int, int], x: float, y: float, rscale: float = 1.0) -> None:
        if rng.random() < drop:
            return
        r = _SIZE_R[it.ing.size] * px * rscale * float(rng.uniform(0.85, 1.15))
        c = _jitter(rng, col, cj)
        _draw_sprite(d, rng, it.shape, x, y, r, c, outline)
        if grill and it.shape in _GRILLABLE:
            # grill marks: dark parallel bars across each piece, one direction per photo (the grate's)
            for off in (-0.45, 0.1, 0.65):
                ox, oy = -grill_s * off * r, grill_c * off * r
                d.line(
                    [
                        (x + ox - grill_c * r * 0.8, y + oy - grill_s * r * 0.8),
                        (x + ox + grill_c * r * 0.8, y + oy + grill_s * r * 0.8),
                    ],
                    fill=_shade(c, 0.3),
                    width=max(1, int(r * 0.22)),
                )

    if layout in ("scatter", "pile", "liquid", "blend", "disc", "sectors"):
        if look.base_colour is not None and layout in ("liquid", "blend"):
            region.fill(d, _jitter(rng, look.base_colour, 4))
            # a smooth blend still has soft swirls; keep them faint so the colour stays uniform
            for _ in range(3 if layout == "blend" else 0):
                x, y = region.sample(rng, 1)[0]
                q = region.scale * 0.3
                d.ellipse((x - q, y - q * 0.6, x + q, y + q * 0.6), fill=_shade(look.base_colour, 1.04))
        if layout == "disc":
            disc_col = look.base_colour or (236, 210, 160)
            region.fill(d, _shade(disc_col, 0.85), shrink=0.98)
            region.fill(d, disc_col, shrink=0.86)
            sauce = [(it, c) for it, c in look.sprites if it.ing.group == "sauce" and it.shape == "blob"]
            if sauce:
                region.fill(d, sauce[0][1], shrink=0.74)
        if layout == "sectors":
            _sectors(d, rng, look, region, px, sprite)
            return
        if look.base and layout != "blend":
            _base_carpet(d, rng, region, look.base, px, pile=(layout == "pile"))
        spread = 0.7 if layout == "pile" else (0.8 if layout == "disc" else 1.0)
        pieces = []
        mixed = method.get("mixed", True)
        for it, col in look.sprites:
            if layout == "disc" and it.ing.group == "sauce" and it.shape == "blob":
                continue
            n = _count(it, region, px, dfc, rng)
            # kept-apart methods (toss, raw, grill) leave each ingredient in its own cluster
            around = None if mixed else tuple(region.sample(rng, 1, spread=0.7)[0])
            for x, y in region.sample(rng, n, spread=spread, around=around):
                pieces.append((it, col, float(x), float(y)))
        if mixed:
            order = rng.permutation(len(pieces))
            pieces = [pieces[i] for i in order]
        # drizzles and powders go on top
        pieces.sort(key=lambda p: p[0].shape in ("drizzle", "powder"))
        for it, col, x, y in pieces:
            sprite(it, col, x, y)
    elif layout == "bands":
        _bands(d, rng, recipe, look, region, px, sprite)
    elif layout == "stack":
        _stack(d, rng, recipe, look, region, px, sprite)
    elif layout == "skewer":
        _skewers(d, rng, look, region, px, sprite)
    elif layout == "grid":
        _grid(d, rng, recipe, look, region, px, sprite)
    elif layout == "wrap":
        _wraps(d, rng, look, region, px, sprite)


def _sectors(d, rng, look: _Look, region: _Region, px: float, sprite) -> None:
    """Separate regions (rice bowls, plated mains): each ingredient in its own wedge of the vessel."""
    groups = [(it, c) for it, c in look.sprites if it.shape not in ("drizzle", "powder")]
    tops = [(it, c) for it, c in look.sprites if it.shape in ("drizzle", "powder")]
    parts: list[tuple[str, Any, Any]] = [("base", it, c) for it, c in look.base] + [
        ("s", it, c) for it, c in groups
    ]
    if not parts:
        return
    cx, cy = region.centre()
    R = region.scale if region.kind == "circle" else min(region.c - region.a, region.e - region.b) / 2
    w = np.array([0.6 + it.amount for _, it, _ in parts])
    bounds = np.concatenate([[0], np.cumsum(w / w.sum())]) * 2 * math.pi + float(rng.uniform(0, 2 * math.pi))
    for j, (kind, it, col) in enumerate(parts):
        a0, a1 = bounds[j], bounds[j + 1]
        n = _count(it, region, px, 0, rng) if kind == "s" else int(22 * (a1 - a0) / math.pi + 6)
        if kind == "base":
            d.pieslice(
                (cx - R, cy - R, cx + R, cy + R), math.degrees(a0), math.degrees(a1), fill=_shade(col, 0.95)
            )
        ang = rng.uniform(a0 + 0.1, a1 - 0.1, n) if a1 - a0 > 0.25 else np.full(n, (a0 + a1) / 2)
        rad = R * np.sqrt(rng.uniform(0.08, 0.85, n))
        for a, rr in zip(ang, rad, strict=True):
            sprite(it, col, cx + rr * math.cos(a), cy + rr * math.sin(a))
    for it, col in tops:
        for x, y in region.sample(rng, _count(it, region, px, 0, rng), spread=0.6):
            sprite(it, col, float(x), float(y))


def _bands(d, rng, recipe: SynthRecipe, look: _Look, region: _Region, px: float, sprite) -> None:
    """Layers seen from the side: parfait glasses, sandwiches, cake slices."""
    if region.kind == "circle":  # cake on a plate: draw the slice as a rectangle in the middle
        cx, cy = region.centre()
        R = region.scale
        x0, y0, x1, y1 = cx - R * 0.8, cy - R * 0.55, cx + R * 0.8, cy + R * 0.55
    else:
        x0, y0, x1, y1 = region.a, region.b, region.c, region.e
    layers: list[tuple[tuple[int, int, int], float, SynthItem | None]] = []
    bread = [(it, c) for it, c in look.sprites if it.ing.group in _BREADY]
    others = [(it, c) for it, c in look.sprites if it.ing.group not in _BREADY and it.shape != "drizzle"]
    if look.base_colour is not None:  # cake sponge layers with the fillings between
        sponge = look.base_colour
        for j, (it, c) in enumerate(others or [(None, _shade(sponge, 1.2))]):
            layers.append((sponge, 1.6, None))
            layers.append((c, 0.4 + 0.3 * (it.amount if it else 1.0), it))
            if j >= 2:
                break
        layers.append((sponge, 1.6, None))
    else:
        if bread:
            layers.append((bread[0][1], 1.2, None))
        for it, c in others:
            layers.append((c, 0.4 + 0.4 * it.amount, it))
        for it, c in look.base:
            layers.append((c, 0.6 + 0.4 * it.amount, it))
        if bread:
            layers.append((bread[0][1], 1.2, None))
    if not layers:
        return
    tot = sum(h for _, h, _ in layers)
    y = y0
    H = y1 - y0
    for col, h, it in layers:
        hh = H * h / tot
        d.rectangle((x0, y, x1, y + hh), fill=_jitter(rng, col, 4))
        if it is not None and it.shape not in ("blob", "none"):
            n = max(2, int((x1 - x0) / (px * 0.07)))
            for x in np.linspace(x0 + 4, x1 - 4, n) + rng.normal(0, 2, n):
                sprite(it, col, float(x), float(y + hh / 2), 0.8)
        y += hh
    for it, col in look.sprites:
        if it.shape == "drizzle":
            sprite(it, col, float(rng.uniform(x0, x1 - (x1 - x0) * 0.5)), y0)


def _stack(d, rng, recipe: SynthRecipe, look: _Look, region: _Region, px: float, sprite) -> None:
    """Burgers and pancake stacks seen at an angle: ellipses piled upward."""
    cx, cy = region.centre()
    R = region.scale if region.kind == "circle" else (region.c - region.a) / 2
    layers: list[tuple[tuple[int, int, int], float]] = []
    if recipe.dish.key == "pancakes" and look.base_colour is not None:
        layers = [(look.base_colour, 0.7)] * int(rng.integers(3, 6))
        tops = look.sprites
    else:
        bread = [c for it, c in look.sprites if it.ing.group in _BREADY] or [(214, 160, 90)]
        fill = [(c, 0.35 + 0.25 * it.amount) for it, c in look.sprites if it.ing.group not in _BREADY]
        layers = [(bread[0], 0.8), *fill, (bread[0], 1.1)]
        tops = []
    th = R * 0.2
    y = cy + R * 0.55
    for col, h in layers:
        hh = th * h
        c2 = _jitter(rng, col, 4)
        d.ellipse((cx - R * 1.05, y - hh - R * 0.28, cx + R * 1.05, y - hh + R * 0.28), fill=_shade(c2, 0.8))
        d.ellipse((cx - R * 1.05, y - hh * 1.6 - R * 0.28, cx + R * 1.05, y - hh * 1.6 + R * 0.28), fill=c2)
        y -= hh * 1.3
    for it, col in tops:
        for _ in range(max(1, _count(it, region, px, 0, rng) // 2)):
            sprite(it, col, cx + float(rng.normal(0, R * 0.3)), y - R * 0.05 + float(rng.normal(0, R * 0.08)))


def _skewers(d, rng, look: _Look, region: _Region, px: float, sprite) -> None:
    cx, cy = region.centre()
    half = (region.c - region.a) / 2 if region.kind == "rect" else region.scale
    n_sticks = int(rng.integers(2, 4))
    ang = float(rng.uniform(-0.5, 0.5))
    ca, sa = math.cos(ang), math.sin(ang)
    items = [(it, c) for it, c in look.sprites if it.shape not in ("drizzle", "powder")] or look.sprites
    if not items:
        return
    for s_i in range(n_sticks):
        off = (s_i - (n_sticks - 1) / 2) * px * 0.16
        x0, y0 = cx - ca * half - sa * off, cy - sa * half + ca * off
        x1, y1 = cx + ca * half - sa * off, cy + sa * half + ca * off
        d.line([(x0, y0), (x1, y1)], fill=(190, 160, 110), width=max(2, int(px * 0.012)))
        n = int(half * 2 / (px * 0.085))
        for j in range(1, n):
            it, col = items[(j + s_i) % len(items)]
            t = j / n
            sprite(it, col, x0 + (x1 - x0) * t, y0 + (y1 - y0) * t, 1.15)
    for it, col in look.sprites:
        if it.shape in ("drizzle", "powder"):
            sprite(it, col, cx, cy)


def _grid(d, rng, recipe: SynthRecipe, look: _Look, region: _Region, px: float, sprite) -> None:
    """Many items: cookies, muffins, tacos, toasts; each carries the recipe's pieces at a smaller size."""
    key = recipe.dish.key
    bread = [c for it, c in look.sprites if it.ing.group in _BREADY]
    fillings = [(it, c) for it, c in look.sprites if it.ing.group not in _BREADY]
    item_col = look.base_colour or (bread[0] if bread else (220, 180, 120))
    if key in ("tacos",):
        n_c, n_r = int(rng.integers(2, 4)), 1
    elif key in ("toast",):
        n_c, n_r = int(rng.integers(2, 4)), int(rng.integers(1, 3))
    elif key == "muffins":
        n_c, n_r = 3, 2
    else:
        n_c, n_r = int(rng.integers(3, 5)), int(rng.integers(2, 4))
    if region.kind == "circle":
        cx, cy = region.centre()
        R = region.scale
        x0, y0, x1, y1 = cx - R * 0.9, cy - R * 0.9, cx + R * 0.9, cy + R * 0.9
    else:
        x0, y0, x1, y1 = region.a, region.b, region.c, region.e
    cw, ch = (x1 - x0) / n_c, (y1 - y0) / n_r
    r_item = min(cw, ch) * 0.42
    for i in range(n_c):
        for j in range(n_r):
            x = x0 + cw * (i + 0.5) + float(rng.normal(0, cw * 0.04))
            y = y0 + ch * (j + 0.5) + float(rng.normal(0, ch * 0.04))
            col = _jitter(rng, item_col, 5)
            if key == "tacos":
                d.chord(
                    (x - r_item, y - r_item, x + r_item, y + r_item),
                    180,
                    360,
                    fill=col,
                    outline=_shade(col, 0.75),
                    width=2,
                )
                y -= r_item * 0.3
            elif key == "toast":
                d.rectangle(
                    (x - r_item, y - r_item * 0.8, x + r_item, y + r_item * 0.8),
                    fill=col,
                    outline=_shade(col, 0.6),
                    width=max(2, int(r_item * 0.12)),
                )
            else:
                d.ellipse(
                    (x - r_item, y - r_item, x + r_item, y + r_item),
                    fill=col,
                    outline=_shade(col, 0.7),
                    width=max(2, int(r_item * 0.1)),
                )
            for it, fc in fillings:
                k = max(1, round(it.amount * (1.5 if it.ing.size == "s" else 1.0)))
                for _ in range(k):
                    sprite(
                        it,
                        fc,
                        x + float(rng.normal(0, r_item * 0.35)),
                        y + float(rng.normal(0, r_item * 0.3)),
                        0.75,
                    )


def _wraps(d, rng, look: _Look, region: _Region, px: float, sprite) -> None:
    bread = [c for it, c in look.sprites if it.ing.group in _BREADY] or [(236, 212, 156)]
    fillings = [(it, c) for it, c in look.sprites if it.ing.group not in _BREADY] + look.base
    cx, cy = region.centre()
    w = (region.c - region.a) if region.kind == "rect" else region.scale * 2
    r = w * 0.22
    for k in (-1, 1):
        x = cx + k * r * 1.1
        col = _jitter(rng, bread[0], 4)
        d.ellipse(
            (x - r, cy - r, x + r, cy + r), fill=col, outline=_shade(col, 0.75), width=max(2, int(r * 0.08))
        )
        d.ellipse((x - r * 0.8, cy - r * 0.8, x + r * 0.8, cy + r * 0.8), fill=_shade(col, 0.92))
        for it, fc in fillings:
            for _ in range(max(1, round(1.5 * it.amount))):
                rr = r * 0.55 * math.sqrt(float(rng.uniform()))
                a = float(rng.uniform(0, 2 * math.pi))
                sprite(it, fc, x + rr * math.cos(a), cy + rr * math.sin(a), 0.8)


def _background_pattern(
    d: ImageDraw.ImageDraw, rng: np.random.Generator, size: int, bg: tuple[int, int, int]
) -> None:
    kind = int(rng.integers(0, 4))
    alt = _shade(bg, float(rng.uniform(0.75, 0.9))) if rng.random() < 0.7 else _jitter(rng, bg, 40)
    step = int(size * float(rng.uniform(0.06, 0.16))) or 1
    if kind == 0:  # stripes
        for x in range(0, size, step * 2):
            d.rectangle((x, 0, x + step - 1, size), fill=alt)
    elif kind == 1:  # checked tablecloth
        for x in range(0, size, step):
            for y in range(0, size, step):
                if (x // step + y // step) % 2:
                    d.rectangle((x, y, x + step - 1, y + step - 1), fill=alt)
    elif kind == 2:  # wood grain
        for y in range(0, size, max(2, step // 3)):
            d.line([(0, y), (size, y + int(rng.integers(-4, 5)))], fill=alt, width=1)
    else:  # dots
        for x in range(step // 2, size, step):
            for y in range(step // 2, size, step):
                q = step * 0.15
                d.ellipse((x - q, y - q, x + q, y + q), fill=alt)


def _clutter(d: ImageDraw.ImageDraw, rng: np.random.Generator, size: int) -> None:
    """Cutlery or a napkin at the edge: nuisance that belongs to no recipe."""
    S = float(size)
    if rng.random() < 0.5:
        x = float(rng.choice([0.06, 0.94])) * S
        col = _pick(rng, [(200, 200, 205), (180, 182, 190), (60, 50, 40)])
        d.rounded_rectangle((x - 0.015 * S, 0.15 * S, x + 0.015 * S, 0.85 * S), radius=2, fill=col)
    else:
        x0 = float(rng.uniform(-0.1, 0.7)) * S
        y0 = float(rng.choice([-0.1, 0.75])) * S
        col = _jitter(rng, _pick(rng, [(230, 60, 50), (240, 240, 235), (60, 110, 170), (230, 200, 80)]), 10)
        d.rectangle((x0, y0, x0 + 0.35 * S, y0 + 0.35 * S), fill=col)


@lru_cache(maxsize=4)
def _coords(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    return c[None, :].repeat(size, 0), c[:, None].repeat(size, 1)


@lru_cache(maxsize=4)
def _noise_bank(seed: int, size: int) -> np.ndarray:
    """A fixed noise field per (seed, size); photos take shifted crops (much cheaper than fresh noise)."""
    n = size + 64
    return _rng(seed, 1 << 40, size).standard_normal((n, n, 3), dtype=np.float32)


def _photo_nuisance(
    arr: np.ndarray, rng: np.random.Generator, size: int, dfc: float, seed: int
) -> np.ndarray:
    xx, yy = _coords(size)
    ang = float(rng.uniform(0, 2 * math.pi))
    grad = float(rng.uniform(0, 0.22 * dfc))
    light = 1.0 + grad * (xx * math.cos(ang) + yy * math.sin(ang))
    light *= 1.0 + float(rng.normal(0, 0.06 * dfc))
    wb = 1.0 + rng.normal(0, 0.035 * dfc, 3).astype(np.float32)  # white balance / colour temperature
    arr = arr * light[..., None] * wb[None, None, :]
    bank = _noise_bank(seed, size)
    ox, oy = (int(v) for v in rng.integers(0, 64, 2))
    sigma = float(rng.uniform(1.5, 2.0 + 5.0 * dfc))
    arr += bank[oy : oy + size, ox : ox + size] * sigma
    return arr


# ------------------------------------------------------------------------------------------- writing
def _recipe_json(r: SynthRecipe, seed: int) -> tuple[str, str | None, str]:
    ingredients = [{"text": it.line} for it in r.items]
    det = [{"text": it.det} for it in r.items]
    valid = [it.valid for it in r.items]
    for line, det_text in r.extra_lines:
        if line.endswith(":"):
            ingredients.insert(0, {"text": line})
            det.insert(0, {"text": det_text})
            valid.insert(0, False)
        else:
            ingredients.append({"text": line})
            det.append({"text": det_text})
            valid.append(False)
    slug = "-".join(r.title.lower().replace("'", "").split())
    l1 = {
        "id": r.id,
        "title": r.title,
        "ingredients": ingredients,
        "instructions": [{"text": s} for s in r.instructions],
        "partition": r.partition,
        "url": URL_RECIPE.format(id=r.id, slug=slug),
    }
    l2 = None
    if r.n_photos:
        ims = [image_id(seed, r.index, k) for k in range(r.n_photos)]
        l2 = {
            "id": r.id,
            "images": [{"id": im, "url": URL_IMAGE.format(partition=r.partition, image_id=im)} for im in ims],
        }
    dj = {"id": r.id, "ingredients": det, "valid": valid}
    return (
        json.dumps(l1, ensure_ascii=False),
        json.dumps(l2, ensure_ascii=False) if l2 else None,
        json.dumps(dj, ensure_ascii=False),
    )


def _gen_chunk(task: tuple[dict, int, int]) -> tuple[list[str], list[str], list[str], dict]:
    """Worker: make recipes [start, stop), write their photos, return their JSON lines and counts."""
    p, start, stop = task
    seed, size, dfc = p["seed"], p["image_size"], p["difficulty"]
    img_root = Path(p["out"]) / "images"
    l1s: list[str] = []
    l2s: list[str] = []
    dets: list[str] = []
    stats = {
        "recipes": {s: 0 for s in SPLITS},
        "paired": {s: 0 for s in SPLITS},
        "photos": {s: 0 for s in SPLITS},
        "recipe_only": 0,
    }
    made_dirs: set[Path] = set()
    for index in range(start, stop):
        r = make_recipe(seed, index, p["no_image_share"])
        a, b, c = _recipe_json(r, seed)
        l1s.append(a)
        dets.append(c)
        stats["recipes"][r.partition] += 1
        if b is None:
            stats["recipe_only"] += 1
            continue
        l2s.append(b)
        stats["paired"][r.partition] += 1
        for k in range(r.n_photos):
            name = image_id(seed, index, k)
            path = img_root / image_relpath(r.partition, name)
            if path.parent not in made_dirs:
                path.parent.mkdir(parents=True, exist_ok=True)
                made_dirs.add(path.parent)
            im = render_photo(r, k, size, dfc, seed)
            q_lo = int(max(40, 92 - 28 * dfc))
            quality = int(_rng(seed, index, 3, k).integers(q_lo, 96)) if dfc > 0 else 95
            im.save(path, "JPEG", quality=quality)
            stats["photos"][r.partition] += 1
    return l1s, l2s, dets, stats


class _JsonArrayWriter:
    """Streams a JSON array to ``path`` one element at a time (``[\\n`` elem ``,\\n`` elem ... ``\\n]``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp = path.with_name(path.name + ".tmp")
        self.f = self.tmp.open("w", encoding="utf-8")
        self.f.write("[")
        self.n = 0

    def write_many(self, elems: list[str]) -> None:
        for e in elems:
            self.f.write("\n" if self.n == 0 else ",\n")
            self.f.write(e)
            self.n += 1

    def close(self) -> None:
        self.f.write("\n]\n" if self.n else "]\n")
        self.f.close()
        os.replace(self.tmp, self.path)  # a crashed run never leaves a complete-looking file

    def abort(self) -> None:
        self.f.close()
        self.tmp.unlink(missing_ok=True)


def _n_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _run_chunks(tasks: list[tuple[dict, int, int]], n_proc: int) -> Iterator[tuple]:
    if n_proc <= 1 or mp.current_process().daemon:  # a daemonic process (pool worker) may not fork children
        yield from map(_gen_chunk, tasks)
        return
    # forkserver: safe when the caller has threads (Ray driver, web app); the server preloads this module once
    # so each worker starts by a cheap fork instead of re-importing numpy and PIL.
    methods = mp.get_all_start_methods()
    ctx = mp.get_context("forkserver" if "forkserver" in methods else "spawn")
    if "forkserver" in methods:
        ctx.set_forkserver_preload([__name__])
    with ctx.Pool(n_proc) as pool:
        yield from pool.imap(_gen_chunk, tasks, chunksize=1)


def generate_dataset(
    out: str | Path,
    n_recipes: int,
    seed: int = 0,
    workers: int = 0,
    image_size: int = 256,
    difficulty: float = 1.0,
    no_image_share: float = 0.25,
    overwrite: bool = False,
    *,
    chunk_size: int = 0,
) -> dict:
    """Write ``n_recipes`` synthetic recipes and their photos to ``out`` in Recipe1M's layout.

    Returns a summary: ``recipes`` / ``paired`` / ``photos`` per split, ``recipe_only``, ``n_recipes``,
    ``n_photos``, ``seconds``, ``photos_per_s``, ``workers``, ``out``. Same arguments -> same bytes, whatever
    ``workers`` and ``chunk_size`` (0 = automatic) are. Raises ``FileExistsError`` if ``out`` already holds a
    dataset and ``overwrite`` is false, ``ValueError`` on bad arguments.
    """
    if not isinstance(n_recipes, int) or n_recipes < 1:
        raise ValueError(f"n_recipes must be a positive integer, got {n_recipes!r}")
    if not 32 <= int(image_size) <= 2048:
        raise ValueError(f"image_size must be in 32..2048, got {image_size}")
    if not 0.0 <= float(difficulty) <= 3.0:
        raise ValueError(f"difficulty must be in [0, 3], got {difficulty}")
    if not 0.0 <= float(no_image_share) < 1.0:
        raise ValueError(f"no_image_share must be in [0, 1), got {no_image_share}")
    out = Path(out)
    existing = [f for f in OUTPUT_FILES if (out / f).exists()] + (
        ["images"] if (out / "images").exists() else []
    )
    if existing:
        if not overwrite:
            raise FileExistsError(
                f"{out} already holds a dataset ({', '.join(existing)}); pass overwrite=True "
                "(--overwrite) to replace it"
            )
        for f in OUTPUT_FILES:
            (out / f).unlink(missing_ok=True)
        shutil.rmtree(out / "images", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)

    n_proc = _n_cpus() if workers <= 0 else int(workers)
    if chunk_size <= 0:
        # small chunks keep all workers busy and memory flat; >= 8 keeps the per-task overhead low
        chunk_size = int(np.clip(math.ceil(n_recipes / (4 * n_proc)), 8, 64))
    params = {
        "out": str(out),
        "seed": int(seed),
        "image_size": int(image_size),
        "difficulty": float(difficulty),
        "no_image_share": float(no_image_share),
    }
    tasks = [(params, a, min(a + chunk_size, n_recipes)) for a in range(0, n_recipes, chunk_size)]
    n_proc = max(1, min(n_proc, len(tasks)))

    totals = {
        "recipes": {s: 0 for s in SPLITS},
        "paired": {s: 0 for s in SPLITS},
        "photos": {s: 0 for s in SPLITS},
        "recipe_only": 0,
    }
    t0 = time.perf_counter()
    writers = [_JsonArrayWriter(out / n) for n in ("layer1.json", "layer2.json", "det_ingrs.json")]
    from tqdm import tqdm

    try:
        with tqdm(total=n_recipes, unit="recipe", desc="synth", disable=None, leave=False) as bar:
            for l1s, l2s, dets, st in _run_chunks(tasks, n_proc):
                writers[0].write_many(l1s)
                writers[1].write_many(l2s)
                writers[2].write_many(dets)
                for key in ("recipes", "paired", "photos"):
                    for s in SPLITS:
                        totals[key][s] += st[key][s]
                totals["recipe_only"] += st["recipe_only"]
                bar.update(len(l1s))
    except BaseException:
        for w in writers:
            w.abort()
        raise
    for w in writers:
        w.close()
    seconds = time.perf_counter() - t0
    n_photos = sum(totals["photos"].values())
    info = {
        "generator": "tnlbt.data.synthetic",
        "params": {k: v for k, v in params.items() if k != "out"},
        "n_recipes": n_recipes,
        **totals,
        "n_photos": n_photos,
    }
    (out / "synth_info.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    summary = {
        **info,
        "out": str(out),
        "seconds": round(seconds, 3),
        "photos_per_s": round(n_photos / seconds, 1) if seconds > 0 else 0.0,
        "workers": n_proc,
    }
    log.info(
        "synth: %d recipes, %d photos in %.1f s (%.0f photos/s, %d workers) -> %s",
        n_recipes,
        n_photos,
        seconds,
        summary["photos_per_s"],
        n_proc,
        out,
    )
    return summary


# ------------------------------------------------------------------------------------------- preview
def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def write_preview(data_dir: str | Path, png_path: str | Path, n: int = 12) -> Path:
    """Contact sheet: for the first ``n`` recipes with photos, title + ingredient lines next to the photos."""
    import ijson

    data_dir = Path(data_dir)
    wanted: dict[str, list[str]] = {}
    with (data_dir / "layer2.json").open("rb") as f:
        for entry in ijson.items(f, "item"):
            wanted[entry["id"]] = [im["id"] for im in entry["images"]]
            if len(wanted) >= n:
                break
    if not wanted:
        raise ValueError(f"{data_dir}/layer2.json lists no recipes with photos")
    recipes: dict[str, dict] = {}
    with (data_dir / "layer1.json").open("rb") as f:
        for entry in ijson.items(f, "item"):
            if entry["id"] in wanted:
                recipes[entry["id"]] = entry
                if len(recipes) == len(wanted):
                    break
    thumb, text_w, row_h, pad = 150, 430, 170, 8
    width = text_w + 5 * (thumb + pad) + pad
    sheet = Image.new("RGB", (width, row_h * len(recipes) + pad), (255, 255, 255))
    d = ImageDraw.Draw(sheet)
    f_title, f_line = _font(15), _font(12)  # 11 px collapses spaces after digits
    for row, (rid, ims) in enumerate((k, v) for k, v in wanted.items() if k in recipes):
        r = recipes[rid]
        y = row * row_h + pad
        d.text((pad, y), f"{r['title']}  [{r['partition']}]"[:60], fill=(0, 0, 0), font=f_title)
        lines = [x["text"] for x in r["ingredients"]]
        method_line = next(
            (
                s["text"]
                for s in r["instructions"]
                if any(
                    m in s["text"].lower()
                    for m in (
                        "bake",
                        "roast",
                        "grill",
                        "fry",
                        "saute",
                        "boil",
                        "simmer",
                        "blend",
                        "toss",
                        "chill",
                        "stir-fry",
                    )
                )
            ),
            "",
        )
        ty = y + 20
        for line in lines[:9]:
            d.text((pad + 4, ty), "- " + line[:64], fill=(40, 40, 40), font=f_line)
            ty += 14
        if len(lines) > 9:
            d.text((pad + 4, ty), f"  (+{len(lines) - 9} more)", fill=(90, 90, 90), font=f_line)
            ty += 14
        d.text((pad + 4, min(ty, y + row_h - 16)), ("> " + method_line)[:70], fill=(30, 80, 160), font=f_line)
        for k, im_name in enumerate(ims[:5]):
            p = data_dir / "images" / image_relpath(r["partition"], im_name)
            x = text_w + k * (thumb + pad)
            try:
                with Image.open(p) as im:
                    sheet.paste(im.convert("RGB").resize((thumb, thumb)), (x, y))
            except OSError:
                d.rectangle((x, y, x + thumb, y + thumb), outline=(200, 0, 0))
                d.text((x + 4, y + 4), "missing", fill=(200, 0, 0), font=f_line)
        d.line([(0, y + row_h - pad // 2), (width, y + row_h - pad // 2)], fill=(220, 220, 220))
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(png_path)
    return png_path


# ------------------------------------------------------------------------------------------------ CLI
def cli_synth(args: argparse.Namespace) -> int:
    """``tnlbt synth``: generate, print a short summary, optionally write the preview sheet."""
    try:
        s = generate_dataset(
            args.out,
            args.recipes,
            seed=args.seed,
            workers=args.workers,
            image_size=args.image_size,
            difficulty=args.difficulty,
            no_image_share=args.no_image_share,
            overwrite=args.overwrite,
        )
    except FileExistsError as e:
        print(f"tnlbt synth: {e}")
        return 2
    per = ", ".join(f"{sp} {s['recipes'][sp]} ({s['paired'][sp]} with photos)" for sp in SPLITS)
    print(f"wrote {s['n_recipes']} recipes to {s['out']}: {per}; {s['recipe_only']} recipe-only")
    print(
        f"{s['n_photos']} photos at {args.image_size}px in {s['seconds']:.1f} s "
        f"({s['photos_per_s']:.0f} photos/s, {s['workers']} workers)"
    )
    if args.preview:
        p = write_preview(args.out, args.preview)
        print(f"preview: {p}")
    if getattr(args, "catalog", None):
        from tnlbt.data.catalog import catalog_from_layout, write_catalog

        splits = tuple(x.strip() for x in args.catalog_splits.split(",") if x.strip())
        rows = list(catalog_from_layout(args.out, splits))
        p = write_catalog(args.catalog, rows)
        print(f"catalog: {len(rows)} recipes ({', '.join(splits)}) -> {p}; index it with "
              f"`tnlbt index --run RUN --catalog {p} --photos {Path(args.out) / 'images'}`")
    return 0
