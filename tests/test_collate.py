"""collate (contracts §3) against a per-row brute-force loop; RecipeDataset over Parquet files."""

from __future__ import annotations

import io
import random

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from tnlbt.data.collate import collate
from tnlbt.data.dataset import RecipeDataset
from tnlbt.data.schema import RECIPE_SCHEMA, rows_to_table


def _jpeg(color: tuple[int, int, int], size: tuple[int, int] = (48, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _row(rng: random.Random, i: int, n_photos: int) -> dict:
    def line(k: int) -> list[int]:
        return [1, *(rng.randrange(3, 50) for _ in range(k)), 2]

    photos = [_jpeg((40 * j % 256, 255 - 60 * j % 256, 17 * i % 256)) for j in range(n_photos)]
    return {
        "id": f"r{i}",
        "partition": "train",
        "has_image": n_photos > 0,
        "title_ids": line(rng.randrange(0, 6)),
        "ingredient_ids": [line(rng.randrange(0, 7)) for _ in range(rng.randrange(1, 5))],
        "instruction_ids": [line(rng.randrange(0, 9)) for _ in range(rng.randrange(1, 4))],
        "ingredient_labels": sorted(rng.sample(range(10), rng.randrange(0, 4))),
        "image_ids": [f"{i:04d}{j}.jpg" for j in range(n_photos)],
        "images": photos,
        "title": "t",
        "ingredients": ["a"],
        "instructions": ["b"],
    }


def _brute_force(rows: list[dict], n_ingredients: int) -> dict[str, torch.Tensor]:
    """Independent per-row loop: pad each field with Python lists."""
    t = max(len(r["title_ids"]) for r in rows)
    n = max(len(r["ingredient_ids"]) for r in rows)
    m = max(len(r["instruction_ids"]) for r in rows)
    ti = max(len(x) for r in rows for x in r["ingredient_ids"])
    ts = max(len(x) for r in rows for x in r["instruction_ids"])
    title = [r["title_ids"] + [0] * (t - len(r["title_ids"])) for r in rows]
    ingr = [
        [x + [0] * (ti - len(x)) for x in r["ingredient_ids"]] + [[0] * ti] * (n - len(r["ingredient_ids"]))
        for r in rows
    ]
    instr = [
        [x + [0] * (ts - len(x)) for x in r["instruction_ids"]] + [[0] * ts] * (m - len(r["instruction_ids"]))
        for r in rows
    ]
    labels = [[1.0 if k in r["ingredient_labels"] else 0.0 for k in range(n_ingredients)] for r in rows]
    return {
        "title": torch.tensor(title),
        "ingredients": torch.tensor(ingr),
        "instructions": torch.tensor(instr),
        "ingredient_labels": torch.tensor(labels),
    }


def _identity(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img.resize((16, 16)), dtype=np.float32)).permute(2, 0, 1) / 255.0


def test_collate_matches_per_row_loop() -> None:
    rng = random.Random(0)
    rows = [_row(rng, i, 1 + i % 3) for i in range(7)]
    got = collate(rows, n_ingredients=10, image_transform=_identity)
    want = _brute_force(rows, 10)
    # ingredient and instruction lines are padded to one common T per tensor: compare on the overlap
    assert torch.equal(got["title"], want["title"])
    assert torch.equal(got["ingredient_labels"], want["ingredient_labels"])
    for key in ("ingredients", "instructions"):
        g, w = got[key], want[key]
        assert g.shape[:2] == w.shape[:2] and g.dtype == torch.int64
        assert torch.equal(g[..., : w.shape[2]], w) and not g[..., w.shape[2] :].any()
    assert got["image"].shape == (7, 3, 16, 16) and got["has_image"].all()
    for i, r in enumerate(rows):  # "first" picks photo 0 of each recipe
        assert torch.allclose(
            got["image"][i], _identity(Image.open(io.BytesIO(r["images"][0])).convert("RGB"))
        )


def test_fully_padded_lines_are_zero() -> None:
    rng = random.Random(1)
    rows = [_row(rng, 0, 1), _row(rng, 1, 1)]
    rows[0]["ingredient_ids"] = [[1, 5, 2]]
    rows[1]["ingredient_ids"] = [[1, 5, 6, 7, 2], [1, 8, 2], [1, 2]]
    got = collate(rows, n_ingredients=10, with_images=False)
    assert got["ingredients"].shape == (2, 3, 5)
    assert not got["ingredients"][0, 1:].any()
    assert "image" not in got


def test_ray_numpy_batch_equals_row_list() -> None:
    from ray.data._internal.arrow_block import ArrowBlockAccessor

    rng = random.Random(2)
    rows = [_row(rng, i, 2) for i in range(5)]
    batch = ArrowBlockAccessor.for_block(rows_to_table(rows)).to_batch_format("numpy")
    assert batch["ingredient_ids"].dtype == object  # list columns arrive as object arrays
    a = collate(rows, n_ingredients=10, image_transform=_identity)
    b = collate(batch, n_ingredients=10, image_transform=_identity)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_image_key_only_when_all_rows_have_photos() -> None:
    rng = random.Random(3)
    rows = [_row(rng, 0, 2), _row(rng, 1, 0)]
    got = collate(rows, n_ingredients=10, image_transform=_identity)
    assert "image" not in got and got["has_image"].tolist() == [True, False]


def test_random_pick_uses_rng() -> None:
    rng = random.Random(4)
    rows = [_row(rng, i, 3) for i in range(6)]
    a = collate(rows, n_ingredients=10, image_transform=_identity, image_pick="random", rng=random.Random(9))
    b = collate(rows, n_ingredients=10, image_transform=_identity, image_pick="random", rng=random.Random(9))
    first = collate(rows, n_ingredients=10, image_transform=_identity)
    assert torch.equal(a["image"], b["image"]) and not torch.equal(a["image"], first["image"])


def test_default_transform_and_bad_labels() -> None:
    rng = random.Random(5)
    rows = [_row(rng, 0, 1)]
    assert collate(rows, n_ingredients=10)["image"].shape == (1, 3, 224, 224)
    rows[0]["ingredient_labels"] = [12]
    with pytest.raises(ValueError, match="out of range"):
        collate(rows, n_ingredients=10, with_images=False)
    with pytest.raises(ValueError, match="empty batch"):
        collate([], n_ingredients=10)


def test_recipe_dataset_filters_and_row_groups(tmp_path) -> None:
    rng = random.Random(6)
    rows = [_row(rng, i, i % 2) for i in range(11)]
    split = tmp_path / "train"
    split.mkdir()
    pq.write_table(rows_to_table(rows[:7]), split / "part-p00000.parquet", row_group_size=3)
    pq.write_table(rows_to_table(rows[7:]), split / "part-r00000.parquet", row_group_size=3)
    assert pq.read_schema(split / "part-p00000.parquet").equals(RECIPE_SCHEMA)
    ds = RecipeDataset(split)
    assert len(ds) == 11
    order = sorted(rows[:7], key=lambda r: r["id"]) + rows[7:]  # file order: p00000 then r00000
    assert [ds[i]["id"] for i in range(11)] == [r["id"] for r in order]
    assert ds[-1]["id"] == order[-1]["id"] and ds[3]["images"] == order[3]["images"]
    paired = RecipeDataset(split, paired_only=True)
    text = RecipeDataset(split, recipe_only=True)
    assert len(paired) + len(text) == 11 and all(paired[i]["has_image"] for i in range(len(paired)))
    assert not any(text[i]["has_image"] for i in range(len(text)))
    batch = collate([paired[i] for i in range(len(paired))], n_ingredients=10, image_transform=_identity)
    assert batch["image"].shape[0] == len(paired)
    with pytest.raises(IndexError):
        ds[11]
    with pytest.raises(ValueError):
        RecipeDataset(split, paired_only=True, recipe_only=True)


# -- query forms and partial-recipe augmentation (issue 11 §3) ------------------------------------------------
def test_recipe_form_keeps_exactly_the_named_components() -> None:
    from tnlbt.data.collate import QUERY_FORMS

    rows = [_row(random.Random(i), i, 1) for i in range(4)]
    full = collate(rows, n_ingredients=10, with_images=False)
    expect = {"full": {"title", "ingredients", "instructions"}, "title": {"title"},
              "ingredients": {"ingredients"}, "title+ingredients": {"title", "ingredients"},
              "instructions": {"instructions"}}
    assert set(expect) == set(QUERY_FORMS)
    for form, kept in expect.items():
        b = collate(rows, n_ingredients=10, with_images=False, form=form)
        for comp in ("title", "ingredients", "instructions"):
            if comp in kept:
                assert torch.equal(b[comp], full[comp]), (form, comp)
            else:
                assert not b[comp].any(), (form, comp)  # all padding: the encoder masks it
        assert torch.equal(b["ingredient_labels"], full["ingredient_labels"])  # labels are the recipe's, whole
    with pytest.raises(ValueError, match="query form"):
        collate(rows, n_ingredients=10, with_images=False, form="ingredient")


def test_partial_recipes_off_draws_nothing_and_on_cuts_every_row() -> None:
    from tnlbt.data.collate import PartialRecipes

    rows = [_row(random.Random(i), i, 0) for i in range(40)]
    for r in rows:  # several lines each, so a line subset is visible
        r["ingredient_ids"] = [[1, 3 + j, 2] for j in range(6)]
    rng = random.Random(5)
    off = collate(rows, n_ingredients=10, with_images=False, partial=PartialRecipes(0.0), rng=rng)
    assert rng.random() == random.Random(5).random()  # prob 0: the data stream is untouched (same runs as before)
    plain = collate(rows, n_ingredients=10, with_images=False)
    assert not off["partial"].any() and all(torch.equal(off[k], plain[k]) for k in plain)

    on = collate(rows, n_ingredients=10, with_images=False, partial=PartialRecipes(1.0, 0.5), rng=random.Random(1))
    assert on["partial"].all()
    shapes = set()
    for i in range(len(rows)):
        has = tuple(bool(on[c][i].any()) for c in ("title", "ingredients", "instructions"))
        assert has != (True, True, True) and any(has), has  # a partial form, never empty
        shapes.add(has)
        lines = {tuple(x.tolist()) for x in on["ingredients"][i] if x.any()}
        full = [list(x) for x in rows[i]["ingredient_ids"]]
        assert lines <= {tuple(x + [0] * (on["ingredients"].shape[2] - len(x))) for x in full}
        if has[1]:
            assert 1 <= len(lines) <= 6
    assert len(shapes) >= 3  # the four forms are all drawn over 40 rows
    kept = [int(on["ingredients"][i].any(dim=1).sum()) for i in range(len(rows)) if on["ingredients"][i].any()]
    assert min(kept) >= 1 and np.mean(kept) < 5  # about half the lines (line_keep 0.5), at least one
