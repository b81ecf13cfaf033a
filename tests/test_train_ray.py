"""Ray Train V2: a 2-worker CPU run on a toy processed dataset, with an injected worker failure.

One ``fit()`` covers: the loss falls, every epoch's validation metrics are logged, a complete checkpoint
directory appears, and rank 0 dying at a global step is survived (FailureConfig: the worker group restarts
from the last reported checkpoint and the run ends at the planned step count and margin). The slow test then
reruns the same name with more epochs: V2's resume-by-rerun continues from the last checkpoint.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_train_loop import make_toy_processed, read_jsonl

from tnlbt.config import Config

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_run(ray_session, tmp_path_factory) -> tuple[Path, Path, dict]:
    from tnlbt.train.ray_trainer import fit

    tmp = tmp_path_factory.mktemp("raytrain")
    data = make_toy_processed(tmp / "processed", n_train=160, n_recipe_only=64)
    cfg = Config.load(
        "tiny_test",
        [
            f"train.runs_dir={tmp / 'runs'}",
            "train.run_name=r2",
            "scaling.num_workers=2",
            "scaling.cpus_per_worker=0.5",
            "train.epochs=3",
            "train.max_steps_per_epoch=4",
            "train.recipe_only_batch_mult=1",
            "train.fail_at_step=5",
            "train.val_bag_size=32",
        ],
    )
    summary = fit(cfg, data)
    return tmp / "runs" / "r2", data, summary


def test_two_worker_run_with_failure(ray_run) -> None:
    from tnlbt.losses import margin_at
    from tnlbt.train.checkpoint import is_complete, load_train_state

    run, _, summary = ray_run
    assert summary["final_step"] == 12 and summary["final_epoch"] == 3
    cfg = Config.load("tiny_test")
    assert summary["margin"] == pytest.approx(margin_at(cfg.loss, 3.0))
    assert (run / ".fail_injected").exists()  # the fault fired (once)
    recs = read_jsonl(run / "metrics.jsonl")
    train = [r for r in recs if r["kind"] == "train"]
    val = [r for r in recs if r["kind"] == "val"]
    steps = [r["step"] for r in train]
    assert steps.count(5) == 2  # step 5 ran, was lost with the crash, and ran again after the restart
    assert steps[-1] == 12
    assert len({r["epoch"] for r in val}) == 3 and all("val/R@1" in r for r in val)
    first = np.mean([r["loss/retrieval"] for r in train[:3]])
    last = np.mean([r["loss/retrieval"] for r in train[-3:]])
    assert last < first, (first, last)
    assert any("loss/recipe_only_ssl" in r for r in train)
    assert is_complete(run / "checkpoints" / "last") and is_complete(run / "checkpoints" / "best")
    assert load_train_state(run / "checkpoints" / "last")["loop"]["step"] == 12
    assert json.loads((run / "config.json").read_text())["scaling"]["num_workers"] == 2
    assert list(run.glob("checkpoint_*")), "Ray's own checkpoint copies live in the run directory"


def test_ray_data_streaming_path(ray_run) -> None:
    """``train.data_path=ray_data`` (big splits): the train splits stream through Ray Data shards
    (``streaming_split``); one short epoch, since every epoch starts Ray Data's executors (the toy run above
    reads its rows into each worker, ``auto``)."""
    from tnlbt.train.ray_trainer import fit, use_in_memory

    run, data, _ = ray_run
    cfg = Config.load("tiny_test", [f"train.runs_dir={run.parent}", "train.run_name=stream",
                                    "scaling.num_workers=2", "scaling.cpus_per_worker=0.5", "train.epochs=1",
                                    "train.max_steps_per_epoch=2", "train.recipe_only_batch_mult=1",
                                    "train.val_bag_size=32", "train.data_path=ray_data"])
    assert not use_in_memory(cfg, data) and use_in_memory(Config.load("tiny_test"), data)
    out = fit(cfg, data)
    assert out["final_step"] == 2 and out["final_epoch"] == 1
    recs = read_jsonl(run.parent / "stream" / "metrics.jsonl")
    assert [(r["kind"], r["step"]) for r in recs] == [("train", 1), ("train", 2), ("val", 2)]


@pytest.mark.slow
def test_rerun_same_name_resumes(ray_run) -> None:
    from tnlbt.train.ray_trainer import fit

    run, data, _ = ray_run
    cfg = Config.load(
        "tiny_test",
        [
            f"train.runs_dir={run.parent}",
            "train.run_name=r2",
            "scaling.num_workers=2",
            "scaling.cpus_per_worker=0.5",
            "train.epochs=4",
            "train.max_steps_per_epoch=4",
            "train.recipe_only_batch_mult=1",
            "train.val_bag_size=32",
        ],
    )
    out = fit(cfg, data)
    assert out["final_step"] == 16 and out["final_epoch"] == 4
    steps = [r["step"] for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "train"]
    assert steps[-4:] == [13, 14, 15, 16]
