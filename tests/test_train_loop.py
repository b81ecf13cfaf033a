"""The plain training loop (no Ray) on a toy processed dataset: learning, checkpoints, resume, faults.

The toy dataset (written here in the contracts §2 layout, so these tests do not depend on the offline
generator) has a few recipe classes; a class fixes the title/ingredient tokens, the ingredient labels and the
colour of the photos, so a working model learns to match them within a few steps.
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from tnlbt.config import Config

N_CLASSES = 8
VOCAB = ["<pad>", "<start>", "<end>"] + [f"w{i}" for i in range(40)] + ["<unk>"]
INGREDIENTS = [f"ing{i}" for i in range(12)]


def _jpeg(color: np.ndarray, rng: np.random.Generator, size: int = 40) -> bytes:
    from PIL import Image

    arr = np.clip(color[None, None, :] + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def _rows(n: int, split: str, rng: np.random.Generator, paired_share: float = 1.0) -> list[dict]:
    colors = np.random.default_rng(99).uniform(0, 255, (N_CLASSES, 3))
    rows = []
    for i in range(n):
        c = int(rng.integers(N_CLASSES))
        has = bool(rng.random() < paired_share)
        word = 3 + 4 * c
        rows.append(
            {
                "id": f"{split}{i:05d}",
                "partition": split,
                "has_image": has,
                "title_ids": [1, word, word + 1, 2],
                "ingredient_ids": [[1, word + 2, 2], [1, int(rng.integers(3, 43)), 2]],
                "instruction_ids": [[1, word + 3, int(rng.integers(3, 43)), 2]],
                "ingredient_labels": [c % len(INGREDIENTS), (c + 3) % len(INGREDIENTS)],
                "image_ids": [f"{split}{i}_0.jpg"] if has else [],
                "images": [_jpeg(colors[c], rng)] if has else [],
                "title": f"dish {c}",
                "ingredients": ["a", "b"],
                "instructions": ["cook"],
            }
        )
    return rows


def make_toy_processed(
    out: Path, n_train: int = 160, n_val: int = 48, n_recipe_only: int = 48, seed: int = 0, files: int = 2
) -> Path:
    """Write a processed dataset (Parquet per split, vocab.json, ingredients.json) for training tests."""
    from tnlbt.data.schema import rows_to_table

    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    splits = {
        "train": _rows(n_train, "train", rng) + _rows(n_recipe_only, "train", rng, paired_share=0.0),
        "val": _rows(n_val, "val", rng),
        "test": _rows(n_val, "test", rng),
    }
    for split, rows in splits.items():
        (out / split).mkdir(exist_ok=True)
        order = rng.permutation(len(rows))
        rows = [rows[i] for i in order]
        for f in range(files):
            part = rows[f::files]
            pq.write_table(rows_to_table(part), out / split / f"part-{f:05d}.parquet")
    (out / "vocab.json").write_text(json.dumps({"tokens": VOCAB, "min_count": 1}))
    (out / "ingredients.json").write_text(json.dumps({"names": INGREDIENTS}))
    return out


def tiny_cfg(tmp_path: Path, data: Path, *overrides: str) -> Config:
    return Config.load(
        "tiny_test",
        [
            f"train.runs_dir={tmp_path / 'runs'}",
            f"data.processed_dir={data}",
            "train.val_bag_size=32",
            *overrides,
        ],
    )


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs with one torch thread (conftest.one_torch_thread)."""


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory) -> Path:
    return make_toy_processed(tmp_path_factory.mktemp("toy") / "processed")


def _run_local(cfg: Config, data: Path, resume: str | None = None) -> dict:
    from tnlbt.train.ray_trainer import fit_local

    return fit_local(cfg, data, resume)


def test_local_run_learns_and_checkpoints(tmp_path: Path, toy_data: Path) -> None:
    cfg = tiny_cfg(
        tmp_path, toy_data, "train.epochs=3", "train.max_steps_per_epoch=6", "train.run_name=learn"
    )
    summary = _run_local(cfg, toy_data)
    run = tmp_path / "runs" / "learn"
    assert summary["final_epoch"] == 3 and summary["final_step"] == 3 * 6
    recs = read_jsonl(run / "metrics.jsonl")
    train = [r for r in recs if r["kind"] == "train"]
    val = [r for r in recs if r["kind"] == "val"]
    assert len(val) == 3 and all("val/R@1" in r and "val/medR" in r for r in val)
    first = np.mean([r["loss/retrieval"] for r in train[:4]])
    last = np.mean([r["loss/retrieval"] for r in train[-4:]])
    assert last < first * 0.9, (first, last)
    for term in (
        "recipe_ssl",
        "adv",
        "itm",
        "trans_img",
        "trans_text",
        "disc_modality",
        "disc_image",
        "recipe_only_ssl",
    ):
        assert any(f"loss/{term}" in r for r in train), term
    # margin grows with progress (incremental schedule, per step)
    margins = [r["margin"] for r in train]
    assert margins[0] < margins[-1]
    # every record says how long the rest of the run will take; the last one, nothing
    assert all(r["eta_s"] >= 0 for r in train) and train[-1]["eta_s"] == 0.0 and train[0]["eta_s"] > 0
    from tnlbt.train.checkpoint import is_complete, load_train_state

    for name in ("last", "best"):
        assert is_complete(run / "checkpoints" / name), name
    ts = load_train_state(run / "checkpoints" / "last")
    assert ts["loop"]["step"] == summary["final_step"] and ts["loop"]["epoch"] == 3
    assert set(ts["optimizers"]) == {"main", "modality_disc", "generator", "image_disc"}
    assert (run / "tb").is_dir() and any((run / "tb").iterdir())
    # the saved model loads through the model package and embeds
    from tnlbt.models import load_model

    model, *_ = load_model(run / "checkpoints" / "best")
    assert model.encode_image(torch.randn(2, 3, 32, 32)).shape == (2, 32)

    from tnlbt.train.plots import plot_run

    png = plot_run(run)
    assert png.exists() and png.stat().st_size > 10_000


def test_seeded_rows_deal_equal_disjoint_shards_and_one_rank_keeps_the_old_order(toy_data: Path) -> None:
    import pyarrow as pa

    from tnlbt.config import Config
    from tnlbt.train.backend import SeededRows
    from tnlbt.train.ray_trainer import use_in_memory

    def rows(rank: int = 0, world: int = 1) -> SeededRows:
        r = SeededRows(toy_data, seed=3, rank=rank, world=world)
        r._paired = pa.table({"id": list(range(r._paired.num_rows))})  # the model columns carry no id
        return r

    ids = lambda batches: [x["id"] for b in batches for x in b]  # noqa: E731
    one = rows()
    n = one._paired.num_rows
    # world 1: the permutation the one-process loop always used (seed, epoch, stream), in full batches of 8
    order = np.random.default_rng([3, 2, 0]).permutation(n)
    assert ids(one.paired_batches(2, 8)) == order[: n // 8 * 8].tolist()
    shards = [ids(rows(r, 3).paired_batches(2, 4)) for r in range(3)]
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) == (n // 3) // 4 * 4  # ranks stay in step
    assert not set(shards[0]) & set(shards[1]) and not set(shards[1]) & set(shards[2])
    assert shards[0] == ids(rows(0, 3).paired_batches(2, 4))  # reproducible
    assert shards[0] != ids(rows(0, 3).paired_batches(3, 4))  # a new order every epoch
    assert sum(len(b) for b in rows(1, 3).recipe_batches(0, 2)) > 0
    assert use_in_memory(Config.load("tiny_test"), toy_data)
    assert not use_in_memory(Config.load("tiny_test", ["train.in_memory_max_mb=0"]), toy_data)
    assert not use_in_memory(Config.load("tiny_test", ["train.data_path=ray_data"]), toy_data)


def test_partial_recipes_train_with_finite_losses(tmp_path: Path, toy_data: Path) -> None:
    """Every paired row cut to a partial form: the step runs, SSL leaves the cut rows out (0, not NaN)."""
    cfg = tiny_cfg(tmp_path, toy_data, "train.epochs=1", "train.max_steps_per_epoch=3", "train.run_name=part",
                   "train.partial_recipes=1.0")
    summary = _run_local(cfg, toy_data)
    assert summary["final_step"] == 3 and summary["skipped_steps"] == 0
    train = [r for r in read_jsonl(tmp_path / "runs" / "part" / "metrics.jsonl") if r["kind"] == "train"]
    assert train and all(np.isfinite(r["loss/loss"]) for r in train)
    assert all(r["loss/recipe_ssl"] == 0.0 for r in train)  # no whole recipe in a paired batch
    assert any(r.get("loss/recipe_only_ssl", 0) > 0 for r in train)  # recipe-only batches stay whole


def test_fault_injection_then_resume_matches_uninterrupted(tmp_path: Path, toy_data: Path) -> None:
    """Rank 0 dies at global step 6 (epoch 1); rerunning the same name resumes from the epoch-0 checkpoint
    and ends at the same step count and margin as an uninterrupted run."""
    common = ("train.epochs=2", "train.max_steps_per_epoch=4", "train.recipe_only_every=2")
    ref = _run_local(tiny_cfg(tmp_path, toy_data, *common, "train.run_name=ref"), toy_data)
    cfg = tiny_cfg(tmp_path, toy_data, *common, "train.run_name=crash", "train.fail_at_step=6")
    with pytest.raises(RuntimeError, match="injected failure"):
        _run_local(cfg, toy_data)
    run = tmp_path / "runs" / "crash"
    assert (run / ".fail_injected").exists()
    from tnlbt.train.checkpoint import load_train_state

    assert load_train_state(run / "checkpoints" / "last")["loop"]["step"] == 4  # epoch 0 checkpoint
    resumed = _run_local(
        cfg, toy_data
    )  # same name: continues from checkpoints/last; the marker stops a 2nd fault
    assert resumed["final_step"] == ref["final_step"] == 8
    assert resumed["margin"] == pytest.approx(ref["margin"])
    steps = [r["step"] for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "train"]
    assert steps[-1] == 8 and steps.count(5) == 2  # step 5 was done, lost with the crash, and redone


def test_step_checkpoints_and_resume_mid_epoch(tmp_path: Path, toy_data: Path) -> None:
    cfg = tiny_cfg(
        tmp_path,
        toy_data,
        "train.epochs=2",
        "train.max_steps_per_epoch=4",
        "train.ckpt_every_steps=5",
        "train.fail_at_step=6",
        "train.run_name=mid",
    )
    with pytest.raises(RuntimeError):
        _run_local(cfg, toy_data)
    from tnlbt.train.checkpoint import load_train_state

    ts = load_train_state(tmp_path / "runs" / "mid" / "checkpoints" / "last")
    assert ts["loop"]["step"] == 5 and ts["loop"]["epoch_step"] == 1  # mid-epoch checkpoint after step 5
    out = _run_local(cfg, toy_data)
    assert out["final_step"] == 8 and out["final_epoch"] == 2


def test_resume_from_explicit_checkpoint(tmp_path: Path, toy_data: Path) -> None:
    a = tiny_cfg(tmp_path, toy_data, "train.epochs=1", "train.max_steps_per_epoch=3", "train.run_name=a")
    _run_local(a, toy_data)
    b = tiny_cfg(tmp_path, toy_data, "train.epochs=2", "train.max_steps_per_epoch=3", "train.run_name=b")
    out = _run_local(b, toy_data, resume=str(tmp_path / "runs" / "a" / "checkpoints" / "last"))
    assert out["final_step"] == 6  # continued from step 3 of run a


def test_too_little_data_is_a_clear_error(tmp_path: Path, toy_data: Path) -> None:
    cfg = tiny_cfg(tmp_path, toy_data, "train.batch_size=256", "train.run_name=big")
    with pytest.raises(ValueError, match="fewer than one global batch"):
        _run_local(cfg, toy_data)


def test_a_killed_checkpoint_write_is_cleaned_by_the_next_save(tmp_path: Path) -> None:
    """``.last.tmp-*`` (killed while writing) and ``.last.old-*`` (killed during the swap) never stay behind;
    when the kill fell between the swap's two renames, the moved-aside checkpoint is put back, not deleted."""
    from tnlbt.models import create_model
    from tnlbt.runs import is_complete
    from tnlbt.train.checkpoint import clean_stale, save_checkpoint

    cfg = Config.load("tiny_test")
    model = create_model(cfg, 10, 3)
    ckpts = tmp_path / "checkpoints"
    last = save_checkpoint(ckpts / "last", model, cfg, [f"w{i}" for i in range(10)], ["a", "b", "c"], {"step": 1})
    (ckpts / ".last.tmp-dead0001").mkdir()
    (ckpts / ".last.tmp-dead0001" / "model.safetensors").write_bytes(b"half a file")
    (ckpts / ".last.old-dead0002").mkdir()
    save_checkpoint(last, model, cfg, [f"w{i}" for i in range(10)], ["a", "b", "c"], {"step": 2})
    assert sorted(p.name for p in ckpts.iterdir()) == ["last"]
    assert torch.load(last / "train_state.pt", weights_only=False)["step"] == 2

    # killed between the two renames: `last` is gone, the previous checkpoint sits in .last.old-*
    os.replace(last, ckpts / ".last.old-dead0003")
    clean_stale(last)
    assert sorted(p.name for p in ckpts.iterdir()) == ["last"] and is_complete(last)


def test_metrics_log_keeps_whole_lines_when_the_disk_fills(tmp_path: Path, monkeypatch) -> None:
    """A write cut short by a full disk leaves no half record (the next append would glue it to a whole one),
    and a tail left by a killed process is cut before the next append."""
    import errno

    from tnlbt.train import run_files

    w = run_files.MetricsWriter(tmp_path, enabled=True)
    w.write({"kind": "train", "step": 1})
    real_write = os.write

    def half_then_full(fd: int, data: bytes) -> int:
        real_write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(run_files.os, "write", half_then_full)
    with pytest.raises(OSError, match="No space left"):
        w.write({"kind": "train", "step": 2})
    monkeypatch.setattr(run_files.os, "write", real_write)
    w.write({"kind": "train", "step": 3})
    w.close()
    path = tmp_path / "metrics.jsonl"
    assert [json.loads(ln)["step"] for ln in path.read_text().splitlines()] == [1, 3]

    with path.open("a") as f:
        f.write('{"kind": "train", "st')  # killed mid-line
    w = run_files.MetricsWriter(tmp_path, enabled=True)
    w.write({"kind": "val", "step": 4})
    w.close()
    assert [json.loads(ln)["step"] for ln in path.read_text().splitlines()] == [1, 3, 4]


def test_eta_is_the_mean_pace_times_the_steps_left() -> None:
    from tnlbt.train.loop import eta_seconds, format_eta

    assert eta_seconds(elapsed_s=30.0, steps_done=10, steps_left=40) == 120.0
    assert math.isnan(eta_seconds(5.0, 0, 40)) and format_eta(float("nan")) == "?"
    assert [format_eta(x) for x in (0.4, 42.0, 545.0, 3720.0)] == ["0s", "42s", "9m05s", "1h02m"]
