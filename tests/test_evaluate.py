"""``embed_pairs`` with a fake model (row alignment, id order, bad rows skipped and counted) and
``tnlbt eval`` end to end with a tiny random-init model."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from tnlbt.data.schema import rows_to_table
from tnlbt.evaluate import cli_eval, embed_pairs
from tnlbt.runs import checkpoint_location


def _jpeg(value: int, size: int = 48) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (value, 255 - value, 128)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _row(i: int, *, has_image: bool = True, photo: bytes | None = None, vocab: int = 30) -> dict:
    return {
        "id": f"r{i:03d}",
        "partition": "test",
        "has_image": has_image,
        "title_ids": [1, 3 + i % (vocab - 4), 2],
        "ingredient_ids": [[1, 3 + (i * 7) % (vocab - 4), 2], [1, 4, 2]],
        "instruction_ids": [[1, 5, 6, 2]],
        "ingredient_labels": [0],
        "image_ids": ["a.jpg"] if has_image else [],
        "images": [photo if photo is not None else _jpeg(20 * (i % 12))] if has_image else [],
        "title": f"recipe {i}",
        "ingredients": ["x"],
        "instructions": ["y"],
    }


def write_split(split_dir: Path, rows: list[dict], per_file: int = 5) -> None:
    split_dir.mkdir(parents=True, exist_ok=True)
    for k in range(0, len(rows), per_file):
        pq.write_table(rows_to_table(rows[k : k + per_file]), split_dir / f"part-{k // per_file:05d}.parquet")


class FakeModel:
    """Image embedding carries the photo's red level, recipe embedding its title token: alignment shows."""

    def __init__(self) -> None:
        self.eval_called = False

    def eval(self) -> FakeModel:
        self.eval_called = True
        return self

    def image_transform(self, train: bool):
        assert train is False

        def tf(img: Image.Image) -> torch.Tensor:
            arr = np.asarray(img.convert("RGB").resize((8, 8)), dtype=np.float32)
            return torch.from_numpy(arr).permute(2, 0, 1)

        return tf

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        out = torch.zeros(images.shape[0], 4)
        out[:, 0] = images[:, 0].mean(dim=(1, 2))
        out[:, 3] = 1.0
        return out

    def encode_recipe(self, batch: dict[str, torch.Tensor], normalize: bool = True) -> torch.Tensor:
        out = torch.zeros(batch["title"].shape[0], 4)
        if batch["title"].shape[1] > 1:  # a query form without a title pads it to one empty column
            out[:, 1] = batch["title"][:, 1].float()
        out[:, 3] = 1.0
        return out


def test_embed_split_aligns_rows_sorts_ids_and_skips_bad_rows(tmp_path: Path) -> None:
    order = [7, 2, 9, 0, 5, 11, 3, 8, 1, 10, 4, 6]  # shuffled on disk
    rows = [_row(i) for i in order]
    rows.insert(3, _row(50, has_image=False))  # recipe-only: not part of the evaluation
    rows.insert(6, _row(60, photo=b"not a jpeg"))  # undecodable photo: skipped and counted
    write_split(tmp_path / "test", rows)
    model = FakeModel()
    out = embed_pairs(model, tmp_path / "test", batch_size=4)
    assert model.eval_called
    assert out["ids"] == [f"r{i:03d}" for i in sorted(order)]
    assert out["skipped"] == 1 and out["skipped_ids"] == ["r060"]
    assert out["image_emb"].dtype == np.float32 and out["image_emb"].shape == (12, 4)
    for k, rid in enumerate(out["ids"]):
        i = int(rid[1:])
        assert round(float(out["image_emb"][k, 0]) / 20) == i % 12  # this row's photo ...
        assert int(out["recipe_emb"][k, 1]) == 3 + i % 26  # ... and this row's recipe
    # Batch size does not change the result.
    again = embed_pairs(FakeModel(), tmp_path / "test", batch_size=64)
    np.testing.assert_array_equal(again["image_emb"], out["image_emb"])


def test_embed_pairs_per_query_form(tmp_path: Path) -> None:
    """The recipe side cut to a form; the photos whole. FakeModel's recipe vector is its title token."""
    write_split(tmp_path / "test", [_row(i) for i in range(9)])
    out = embed_pairs(FakeModel(), tmp_path / "test", batch_size=4, forms=["title", "ingredients"])
    np.testing.assert_array_equal(out["recipe_emb_forms"]["title"], out["recipe_emb"])
    assert not out["recipe_emb_forms"]["ingredients"][:, 1].any()  # no title in an ingredients-only query
    np.testing.assert_array_equal(out["image_emb"], embed_pairs(FakeModel(), tmp_path / "test")["image_emb"])
    assert "recipe_emb_forms" not in embed_pairs(FakeModel(), tmp_path / "test")


def test_embed_split_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        embed_pairs(FakeModel(), tmp_path / "missing")
    write_split(tmp_path / "only_bad", [_row(1, photo=b"xx"), _row(2, has_image=False)])
    with pytest.raises(ValueError, match="no usable paired rows"):
        embed_pairs(FakeModel(), tmp_path / "only_bad")


def test_checkpoint_location(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoint_location(tmp_path)
    last = tmp_path / "checkpoints" / "last"
    last.mkdir(parents=True)
    (last / "model.safetensors").write_bytes(b"")
    assert checkpoint_location(tmp_path) == last
    best = tmp_path / "checkpoints" / "best"
    best.mkdir()
    (best / "model.safetensors").write_bytes(b"")
    assert checkpoint_location(tmp_path) == best
    assert checkpoint_location(best) == best


def test_cli_eval_end_to_end_tiny_model(tmp_path: Path) -> None:
    from tnlbt.config import Config
    from tnlbt.models import create_model, save_model

    vocab = ["<pad>", "<start>", "<end>", *[f"w{i}" for i in range(26)], "<unk>"]
    cfg = Config.load(
        "tiny_test",
        [f"data.processed_dir={tmp_path / 'data'}", "eval.bag_sizes=[10, 1000]", "eval.n_bags=3",
         "eval.ties=pessimistic"],
    )
    torch.manual_seed(0)
    model = create_model(cfg, len(vocab), 4)
    run = tmp_path / "run"
    save_model(run / "checkpoints" / "best", model, cfg, vocab, ["a", "b", "c", "d"])
    write_split(tmp_path / "data" / "test", [_row(i) for i in range(16)], per_file=8)
    args = argparse.Namespace(run=str(run), split="test", data=None, bags=2, mode=None)
    assert cli_eval(args) == 0
    res = json.loads((run / "metrics_test.json").read_text())
    assert set(res) == {"10", "notes", "meta", "query_forms"}  # 1000 > 16 rows: skipped with a note
    assert set(res["query_forms"]) == {"full", "title", "ingredients", "title+ingredients", "instructions"}
    assert res["query_forms"]["full"]["10"] == res["10"]
    assert res["query_forms"]["title"]["10"]["image_to_recipe"]["medR"]["mean"] >= 1.0
    assert res["meta"]["n_pairs"] == 16 and res["meta"]["n_bags"] == 2
    r1 = res["10"]["image_to_recipe"]["R@1"]
    assert 0.0 <= r1["mean"] <= 1.0 and res["10"]["recipe_to_image"]["medR"]["mean"] >= 1.0
    # The tie report: the rule used (the run's eval.ties), and per direction how many of the 2 x 10 queries tie.
    assert res["meta"]["ties"] == "pessimistic" and res["10"]["exact_ties"]["rule"] == "pessimistic"
    for direction in ("image_to_recipe", "recipe_to_image"):
        rep = res["10"]["exact_ties"][direction]
        assert rep["queries"] == 20 and 0 <= rep["duplicate_positives"] <= rep["tied_queries"] <= 20
    with pytest.raises(ValueError, match="--ties"):  # checked before anything is loaded
        cli_eval(argparse.Namespace(run=str(run), split="test", data=None, bags=2, mode=None, ties="random"))
