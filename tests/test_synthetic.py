"""Offline dataset generator: Recipe1M layout, determinism, grounding of photos in recipes, streaming, CLI."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from tnlbt.data import synthetic as sy
from tnlbt.data.synth_catalog import METHODS, PREP, SHAPES, UNITS, catalog

HEX10 = re.compile(r"^[0-9a-f]{10}$")


def _load(d: Path) -> tuple[list, list, list]:
    return tuple(json.loads((d / n).read_text()) for n in ("layer1.json", "layer2.json", "det_ingrs.json"))


def _tree_bytes(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth") / "ds"
    summary = sy.generate_dataset(out, 40, seed=3, workers=1, image_size=64)
    return out, summary


# ------------------------------------------------------------------------------------------- layout
def test_layout_round_trip(small):
    out, summary = small
    layer1, layer2, det = _load(out)
    assert len(layer1) == len(det) == 40 == summary["n_recipes"]
    ids = [r["id"] for r in layer1]
    assert len(set(ids)) == len(ids) and all(HEX10.match(i) for i in ids)
    by_id = {r["id"]: r for r in layer1}
    for r in layer1:
        assert set(r) == {"id", "title", "ingredients", "instructions", "partition", "url"}
        assert r["partition"] in ("train", "val", "test")
        assert r["title"] and r["instructions"] and all(set(x) == {"text"} for x in r["ingredients"])
    # det_ingrs aligned with layer1, line for line
    for r, d in zip(layer1, det, strict=True):
        assert d["id"] == r["id"]
        assert len(d["ingredients"]) == len(d["valid"]) == len(r["ingredients"])
        assert all(isinstance(v, bool) for v in d["valid"])
        assert len(r["ingredients"]) <= 14  # 3..12 foods + up to 2 non-food lines
    # layer2: only recipes with photos, 1..5 photos, every file at its 4-level path, decodable, right size
    n_photos = 0
    for e in layer2:
        assert set(e) == {"id", "images"} and e["id"] in by_id
        assert 1 <= len(e["images"]) <= 5
        part = by_id[e["id"]]["partition"]
        for im in e["images"]:
            name = im["id"]
            assert re.match(r"^[0-9a-f]{10}\.jpg$", name) and im["url"]
            p = out / "images" / part / name[0] / name[1] / name[2] / name[3] / name
            with Image.open(p) as img:
                assert img.format == "JPEG" and img.size == (64, 64)
            n_photos += 1
    assert n_photos == summary["n_photos"] == sum(1 for _ in (out / "images").rglob("*.jpg"))
    # recipe-only recipes exist and are all train
    paired = {e["id"] for e in layer2}
    only = [r for r in layer1 if r["id"] not in paired]
    assert only and all(r["partition"] == "train" for r in only)
    assert len(only) == summary["recipe_only"]
    info = json.loads((out / "synth_info.json").read_text())
    assert info["n_photos"] == n_photos and info["params"]["seed"] == 3


def test_split_and_photo_proportions():
    # make_recipe is what the writer uses; 2000 draws keep this fast and the tolerances honest
    recs = [sy.make_recipe(11, i, no_image_share=0.25) for i in range(2000)]
    parts = np.array([r.partition for r in recs])
    for split, p in zip(sy.SPLITS, sy.SPLIT_P, strict=True):
        assert abs((parts == split).mean() - p) < 0.03
    train = [r for r in recs if r.partition == "train"]
    assert abs(np.mean([r.n_photos == 0 for r in train]) - 0.25) < 0.04
    assert all(r.n_photos >= 1 for r in recs if r.partition != "train")
    counts = np.bincount([r.n_photos for r in recs if r.n_photos], minlength=6)
    assert counts[0] == 0 and all(counts[1:6] > 0)
    n_food = [sum(it.ing.kind != "x" for it in r.items) for r in recs]
    assert min(n_food) >= 3 and max(n_food) <= 12


def test_ids_unique_and_bijective():
    rids = {sy.recipe_id(0, i) for i in range(50_000)}
    assert len(rids) == 50_000
    iids = {sy.image_id(0, i, k) for i in range(10_000) for k in range(5)}
    assert len(iids) == 50_000
    assert sy.recipe_id(0, 7) != sy.recipe_id(1, 7)
    assert sy.image_relpath("val", "ef3dc0de11.jpg") == "val/e/f/3/d/ef3dc0de11.jpg"


# ---------------------------------------------------------------------------------------- determinism
def test_same_seed_same_bytes_any_worker_count(small, tmp_path):
    out, _ = small
    again = tmp_path / "again"
    sy.generate_dataset(again, 40, seed=3, workers=2, image_size=64, chunk_size=7)
    a, b = _tree_bytes(out), _tree_bytes(again)
    assert a.keys() == b.keys()
    assert all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]][:5]


def test_different_seed_different_data(small, tmp_path):
    out, _ = small
    other = tmp_path / "other"
    sy.generate_dataset(other, 40, seed=4, workers=1, image_size=64)
    l1a, _, _ = _load(out)
    l1b, _, _ = _load(other)
    assert {r["id"] for r in l1a}.isdisjoint({r["id"] for r in l1b})
    assert [r["title"] for r in l1a] != [r["title"] for r in l1b]


def test_overwrite_guard(small, tmp_path):
    out, _ = small
    with pytest.raises(FileExistsError):
        sy.generate_dataset(out, 5, seed=3, workers=1, image_size=64)
    d = tmp_path / "ow"
    sy.generate_dataset(d, 12, seed=1, workers=1, image_size=32)
    s = sy.generate_dataset(d, 6, seed=1, workers=1, image_size=32, overwrite=True)
    layer1, _, _ = _load(d)
    assert len(layer1) == 6
    # no photo of the first run survives
    assert sum(1 for _ in (d / "images").rglob("*.jpg")) == s["n_photos"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_recipes": 0},
        {"n_recipes": 5, "image_size": 8},
        {"n_recipes": 5, "no_image_share": 1.0},
        {"n_recipes": 5, "difficulty": -1.0},
    ],
)
def test_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        sy.generate_dataset(tmp_path / "bad", workers=1, **kwargs)


# ------------------------------------------------------------------------------------------ catalogue
def test_catalogue_size_and_consistency():
    cat = catalog()
    assert len(cat.ingredients) >= 150 and len(cat.dishes) >= 25
    assert len({i.name for i in cat.ingredients}) == len(cat.ingredients)
    visible = [i for i in cat.ingredients if i.kind in ("visible", "base")]
    assert len(visible) >= 150 and all(s != "none" for i in visible for s in i.shapes)
    assert len({(i.colour, i.shapes[0]) for i in visible}) >= 140  # signatures are (nearly) all distinct
    for i in cat.ingredients:
        assert i.unit in UNITS and all(s in PREP for s in i.shapes) and i.size in ("s", "m", "l")
    for d in cat.dishes:
        assert all(m in METHODS for m in d.methods) and all(g in cat.by_group for g, _, _ in d.slots)
    assert len({d.vessel for d in cat.dishes}) >= 8 and len({d.layout for d in cat.dishes}) >= 8


def test_every_shape_draws_something():
    rng = np.random.default_rng(0)
    for shape in SHAPES:
        img = Image.new("RGB", (64, 64), (255, 255, 255))
        sy._draw_sprite(ImageDraw.Draw(img), rng, shape, 32, 32, 8, (200, 30, 30))
        changed = (np.asarray(img) != 255).any(-1).sum()
        assert (changed > 10) == (shape != "none"), shape


def test_text_looks_like_recipe1m():
    recs = [sy.make_recipe(5, i) for i in range(400)]
    lines = [it.line for r in recs for it in r.items]
    qty = re.compile(r"^(\d+( \d/\d)?|\d/\d)( |$)")
    assert np.mean([bool(qty.match(x)) for x in lines]) > 0.85
    assert any(x.endswith("to taste") for x in lines)
    assert any(re.match(r"^\d+ cloves garlic, minced$", x) for x in lines)
    assert any(", " in x for x in lines) and any("tbsp." in x or "tablespoon" in x for x in lines)
    # pantry staples are common (and drawn as nothing)
    assert np.mean([any(it.ing.kind == "pantry" for it in r.items) for r in recs]) > 0.5
    # the method is named in the instructions, key ingredients in the title
    verbs = {
        "bake": "bake",
        "roast": "roast",
        "grill": "grill",
        "fry": "fr",
        "saute": "saute",
        "boil": "boil",
        "simmer": "simmer",
        "blend": "blen",
        "toss": "toss",
        "raw": "chill",
    }
    named = [
        any(
            verbs[r.method] in s.lower()
            or (r.method == "raw" and "refrigerate" in s.lower())
            or (r.method == "saute" and "stir-fry" in s.lower())
            for s in r.instructions
        )
        for r in recs
    ]
    assert np.mean(named) > 0.95
    titled = [any(t.lower() in r.title.lower() for it in r.items for t in it.ing.titles) for r in recs]
    assert np.mean(titled) > 0.9
    # det names are catalogue names (plus the few non-food lines), some lines invalid
    names = {i.name for i in catalog().ingredients}
    assert all(it.det in names for r in recs for it in r.items)
    assert 0 < np.mean([not it.valid for r in recs for it in r.items]) < 0.1
    assert sum(len(r.extra_lines) for r in recs) > 10
    assert len({r.title for r in recs}) > 300


# -------------------------------------------------------------------------------------------- photos
def _arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.float32)


def test_photos_of_one_recipe_differ():
    r = next(sy.make_recipe(2, i) for i in range(100) if sy.make_recipe(2, i).n_photos >= 3)
    photos = [_arr(sy.render_photo(r, k, 64, 1.0, 2)) for k in range(3)]
    for a in range(3):
        for b in range(a + 1, 3):
            assert np.abs(photos[a] - photos[b]).mean() > 5
    # and rendering is a pure function of its arguments
    assert np.array_equal(photos[0], _arr(sy.render_photo(r, 0, 64, 1.0, 2)))


def _hist(img: Image.Image) -> np.ndarray:
    a = _arr(img) / 255.0
    s = a.shape[0]
    c = a[s // 4 : 3 * s // 4, s // 4 : 3 * s // 4].reshape(-1, 3)
    q = (c * 3.999).astype(int)
    h = np.bincount(q[:, 0] * 16 + q[:, 1] * 4 + q[:, 2], minlength=64).astype(np.float32)
    return h / np.linalg.norm(h)


def test_photos_are_grounded_in_recipes():
    """Crude colour histograms already find a recipe's other photo far above chance: the photo carries it."""
    recs = [r for r in (sy.make_recipe(0, i) for i in range(160)) if r.n_photos >= 2][:60]
    feats, lab = [], []
    for r in recs:
        for k in range(2):
            feats.append(_hist(sy.render_photo(r, k, 64, 1.0, 0)))
            lab.append(r.index)
    f, lab = np.stack(feats), np.array(lab)
    sim = f @ f.T
    np.fill_diagonal(sim, -np.inf)
    ranks = []
    for i in range(len(lab)):
        j = next(x for x in np.where(lab == lab[i])[0] if x != i)
        ranks.append(1 + int((sim[i] > sim[i, j]).sum()))
    # chance median rank is about 60 of 119 candidates
    assert np.median(ranks) <= 20
    assert np.mean(lab[sim.argmax(1)] == lab) > 0.1


def _colour_pixels(img: Image.Image, colour: tuple[int, int, int], tol: float = 40) -> int:
    return int((np.abs(_arr(img) - np.array(colour, np.float32)).sum(-1) < tol).sum())


def test_amount_changes_how_much_shows():
    """Same recipe and photo seed: 10x the quantity of a visible ingredient shows more of its colour."""
    hits = 0
    tried = 0
    for i in range(60):
        r = sy.make_recipe(1, i)
        look = sy._look(r)
        cand = [it for it, _ in look.sprites if it.shape in ("cube", "round", "chunk", "wedge", "whole")]
        if r.dish.layout not in ("scatter", "pile", "liquid", "disc") or not cand:
            continue
        it = cand[0]
        col = dict((x.ing.name, c) for x, c in look.sprites)[it.ing.name]
        more = [dataclasses.replace(x, amount=3.0) if x is it else x for x in r.items]
        less = [dataclasses.replace(x, amount=0.3) if x is it else x for x in r.items]
        r_more, r_less = dataclasses.replace(r, items=tuple(more)), dataclasses.replace(r, items=tuple(less))
        a = _colour_pixels(sy.render_photo(r_more, 0, 96, 0.0, 1), col)
        b = _colour_pixels(sy.render_photo(r_less, 0, 96, 0.0, 1), col)
        tried += 1
        hits += a > b
        if tried == 10:
            break
    assert tried == 10 and hits >= 9


def test_methods_change_the_look():
    """Grilling adds dark stripes, frying browns, blending makes one smooth colour."""
    r = next(r for r in (sy.make_recipe(4, i) for i in range(300)) if r.dish.key == "grilled plate")
    grilled = dataclasses.replace(r, method="grill")
    raw = dataclasses.replace(r, method="raw")
    g, w = _arr(sy.render_photo(grilled, 0, 96, 0.0, 4)), _arr(sy.render_photo(raw, 0, 96, 0.0, 4))
    assert (g.sum(-1) < 150).mean() > (w.sum(-1) < 150).mean() + 0.02
    # frying tints the pieces toward gold/brown
    assert sy._tint((240, 220, 200), "fry", "meat") != (240, 220, 200)
    assert sum(sy._tint((240, 220, 200), "roast", "meat")) < sum((240, 220, 200))
    # a smoothie (blend) is one smooth colour: low spread inside the glass compared with a salad's bowl
    sm = next(r for r in (sy.make_recipe(4, i) for i in range(300)) if r.dish.key == "smoothie")
    sa = next(r for r in (sy.make_recipe(4, i) for i in range(300)) if r.dish.key == "salad")
    a_sm, a_sa = _arr(sy.render_photo(sm, 0, 96, 0.0, 4)), _arr(sy.render_photo(sa, 0, 96, 0.0, 4))
    assert a_sm[40:60, 42:54].std(axis=(0, 1)).mean() < a_sa[36:60, 36:60].std(axis=(0, 1)).mean()


# ----------------------------------------------------------------------------------------- streaming
def test_writer_streams_chunk_by_chunk(tmp_path, monkeypatch):
    events: list[str] = []
    gen, write = sy._gen_chunk, sy._JsonArrayWriter.write_many

    def gen_spy(task):
        events.append("gen")
        return gen(task)

    def write_spy(self, elems):
        events.append(f"write{len(elems)}")
        return write(self, elems)

    monkeypatch.setattr(sy, "_gen_chunk", gen_spy)
    monkeypatch.setattr(sy._JsonArrayWriter, "write_many", write_spy)
    sy.generate_dataset(tmp_path / "s", 30, workers=1, image_size=32, chunk_size=8)
    # each chunk is written (3 files) before the next one is generated; no write sees more than a chunk
    assert events[:5] == ["gen", "write8", "write" + events[2][5:], "write8", "gen"]
    assert events.count("gen") == 4
    assert all(int(e[5:]) <= 8 for e in events if e.startswith("write"))


# ------------------------------------------------------------------------------------- preview + CLI
def test_preview_sheet(small, tmp_path):
    out, _ = small
    png = sy.write_preview(out, tmp_path / "sheet.png", n=5)
    with Image.open(png) as im:
        assert im.width > 800 and im.height >= 5 * 160
        a = np.asarray(im.convert("RGB"))
        assert (a < 250).mean() > 0.05  # photos and text, not a blank page


def test_cli_synth(tmp_path, capsys):
    from tnlbt.cli import main

    out = tmp_path / "cli"
    argv = [
        "synth",
        "--out",
        str(out),
        "--recipes",
        "12",
        "--workers",
        "1",
        "--image-size",
        "48",
        "--preview",
        str(tmp_path / "p.png"),
    ]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "12 recipes" in text and str(out) in text and "photos/s" in text and (tmp_path / "p.png").exists()
    assert main(argv) == 2  # refuses to clobber
    assert "overwrite" in capsys.readouterr().out
    assert main([*argv, "--overwrite"]) == 0
