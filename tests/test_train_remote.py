"""Training and evaluation with the processed data and the run directory on remote storage.

``s3://`` is routed by ``TNLBT_STORAGE_ROUTES`` to an on-disk object store with S3's semantics (no empty
directories, no appends, no prefix renames, an object appears only when its upload completes; see
``tnlbt.storage.ObjectStoreOnDisk``), in this process and in Ray workers. What is checked:

* ``tnlbt train --no-ray`` with ``s3://`` data and runs: the remote run directory gets ``config.json``, the whole
  ``metrics.jsonl``, ``tb/``, ``curves.png`` and complete ``checkpoints/{last,best}``, and the weights are
  bit-identical to the same run on local paths; the local staging folder is gone afterwards;
* a rerun with the same name resumes from the remote ``checkpoints/last`` and keeps the remote history;
* the checkpoint upload protocol (``train_state.pt`` last; a half-replaced ``last`` is not taken; fallback to
  ``best``);
* ``tnlbt eval`` and ``tnlbt plot`` on the remote run;
* Ray Train with 2 workers, ``RunConfig(storage_path, storage_filesystem)`` on the object store (and, slow, an
  injected worker failure plus a rerun that resumes through Ray's own checkpoint).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_train_loop import make_toy_processed, read_jsonl

from tnlbt import storage
from tnlbt.config import Config

DATA_URI = "s3://bucket/processed"
RUNS_URI = "s3://bucket/runs"
COMMON = ("train.epochs=2", "train.max_steps_per_epoch=3", "train.val_bag_size=32")


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs with one torch thread (conftest.one_torch_thread)."""


@pytest.fixture(scope="module")
def s3_root(tmp_path_factory) -> SimpleNamespace:
    """The object store folder with the toy processed dataset uploaded to ``s3://bucket/processed``.

    The route is set only while uploading here and per test by ``routes`` (never module-wide): a session Ray
    cluster started by a test of this module must not inherit it for the rest of the session.
    """
    root = tmp_path_factory.mktemp("remote")
    data = make_toy_processed(root / "processed")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TNLBT_STORAGE_ROUTES", f"s3={root / 'objs'}")
        storage.upload_dir(data, DATA_URI)
    storage.resolve("/")  # forget the route
    return SimpleNamespace(root=root, objs=root / "objs", data=data, cache=root / "cache")


@pytest.fixture
def s3(s3_root, monkeypatch) -> SimpleNamespace:
    monkeypatch.setenv("TNLBT_STORAGE_ROUTES", f"s3={s3_root.objs}")
    monkeypatch.setenv("TNLBT_CACHE_DIR", str(s3_root.cache))  # staging folders go here: checked to be cleaned up
    yield s3_root
    monkeypatch.delenv("TNLBT_STORAGE_ROUTES")
    storage.resolve("/")


def _remote_cfg(name: str, *overrides: str) -> Config:
    return Config.load(
        "tiny_test",
        [f"train.runs_dir={RUNS_URI}", f"data.processed_dir={DATA_URI}", f"train.run_name={name}", *COMMON, *overrides],
    )


def _remote_jsonl(uri: str) -> list[dict]:
    return [json.loads(line) for line in storage.read_text(uri).splitlines() if line.strip()]


def _staging_left(s3: SimpleNamespace) -> list[str]:
    staging = s3.cache / "staging"
    return sorted(p.name for p in staging.iterdir()) if staging.is_dir() else []


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


# -- no Ray ------------------------------------------------------------------------------------------------
def test_cli_train_no_ray_on_remote_storage_matches_local_run(s3, tmp_path: Path) -> None:
    from tnlbt.cli import main
    from tnlbt.train.checkpoint import is_complete, latest_checkpoint, load_train_state, local_checkpoint

    rc = main(
        [
            "train",
            "--config",
            "tiny_test",
            "--data",
            DATA_URI,
            "--name",
            "same",
            "--no-ray",
            f"train.runs_dir={RUNS_URI}",
            *COMMON,
        ]
    )
    assert rc == 0
    run = f"{RUNS_URI}/same"
    assert json.loads(storage.read_text(f"{run}/config.json"))["train"]["runs_dir"] == RUNS_URI
    for name in ("last", "best"):
        assert is_complete(f"{run}/checkpoints/{name}"), name
    assert latest_checkpoint(run) == f"{run}/checkpoints/last"
    assert storage.listdir(f"{run}/tb") and storage.exists(f"{run}/curves.png")
    assert _staging_left(s3) == []  # the staging mirror is deleted when the run ends

    # The same run on local paths: identical records and bit-identical weights.
    local = Config.load(
        "tiny_test",
        [f"train.runs_dir={tmp_path / 'runs'}", f"data.processed_dir={s3.data}", "train.run_name=same", *COMMON],
    )
    from tnlbt.train.ray_trainer import fit_local

    fit_local(local, s3.data)
    lrun = tmp_path / "runs" / "same"
    remote_recs, local_recs = _remote_jsonl(f"{run}/metrics.jsonl"), read_jsonl(lrun / "metrics.jsonl")
    assert [(r["kind"], r["epoch"], r["step"]) for r in remote_recs] == [
        (r["kind"], r["epoch"], r["step"]) for r in local_recs
    ]
    assert [(r["kind"], r["step"]) for r in remote_recs] == [
        ("train", 1),
        ("train", 2),
        ("train", 3),
        ("val", 3),
        ("train", 4),
        ("train", 5),
        ("train", 6),
        ("val", 6),
    ]
    for a, b in zip(remote_recs, local_recs, strict=True):
        assert {k: v for k, v in a.items() if k.startswith(("loss/", "val/"))} == {
            k: v for k, v in b.items() if k.startswith(("loss/", "val/"))
        }
    with local_checkpoint(f"{run}/checkpoints/last") as d:
        remote_w = _weights(d / "model.safetensors")
        ts = load_train_state(d)
    local_w = _weights(lrun / "checkpoints" / "last" / "model.safetensors")
    assert remote_w.keys() == local_w.keys()
    assert all(torch.equal(remote_w[k], local_w[k]) for k in local_w)
    assert ts["loop"]["step"] == 6 and ts["loop"]["epoch"] == 2
    assert not list(lrun.glob("curves.png"))  # local runs keep their behaviour: no PNG unless `tnlbt plot`


def test_rerun_same_name_resumes_from_remote_checkpoint(s3) -> None:
    from tnlbt.train.checkpoint import load_train_state, local_checkpoint
    from tnlbt.train.ray_trainer import fit_local

    first = fit_local(_remote_cfg("res", "train.epochs=1"), DATA_URI)
    assert first["final_step"] == 3 and first["final_epoch"] == 1
    out = fit_local(_remote_cfg("res", "train.epochs=2"), DATA_URI)  # same name: continue from remote `last`
    assert out["final_step"] == 6 and out["final_epoch"] == 2
    recs = _remote_jsonl(f"{RUNS_URI}/res/metrics.jsonl")
    assert [r["step"] for r in recs if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]  # history kept, no step redone
    assert [r["epoch"] for r in recs if r["kind"] == "val"] == [0, 1]
    with local_checkpoint(f"{RUNS_URI}/res/checkpoints/last") as d:
        assert load_train_state(d)["loop"]["step"] == 6
    # an explicit --resume URI (another run's checkpoint) is downloaded and continued
    other = fit_local(_remote_cfg("res2", "train.epochs=3"), DATA_URI, resume=f"{RUNS_URI}/res/checkpoints/last")
    assert other["final_step"] == 9
    assert [r["step"] for r in _remote_jsonl(f"{RUNS_URI}/res2/metrics.jsonl") if r["kind"] == "train"] == [7, 8, 9]
    assert _staging_left(s3) == []


def test_remote_fault_then_rerun_keeps_records_of_lost_steps(s3) -> None:
    """Rank 0 dies at step 4: the crash still publishes metrics.jsonl, the marker lives on the remote run (so
    the rerun, a new process with a new staging folder, does not fail again), and the rerun resumes at step 3."""
    from tnlbt.train.ray_trainer import fit_local

    cfg = _remote_cfg("crash", "train.fail_at_step=4")
    with pytest.raises(RuntimeError, match="injected failure"):
        fit_local(cfg, DATA_URI)
    assert storage.exists(f"{RUNS_URI}/crash/.fail_injected")
    assert [r["step"] for r in _remote_jsonl(f"{RUNS_URI}/crash/metrics.jsonl")][-1] == 4
    out = fit_local(cfg, DATA_URI)
    assert out["final_step"] == 6
    steps = [r["step"] for r in _remote_jsonl(f"{RUNS_URI}/crash/metrics.jsonl") if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 4, 5, 6]  # step 4 was done, lost with the crash, and redone
    assert _staging_left(s3) == []


def test_checkpoint_upload_writes_train_state_last(s3, tmp_path: Path, monkeypatch) -> None:
    from tnlbt.train import checkpoint as ck

    src = tmp_path / "ckpt"
    src.mkdir()
    for name, data in [
        ("model.safetensors", b"w1"),
        ("config.json", b"{}"),
        ("vocab.json", b"{}"),
        ("ingredients.json", b"{}"),
        (ck.TRAIN_STATE, b"s1"),
        ("extra.txt", b"x"),
    ]:
        (src / name).write_bytes(data)
    uri = "s3://bucket/ckpt-unit/checkpoints/last"
    assert not ck.is_complete(uri)
    order: list[str] = []
    real = ck._upload_file
    monkeypatch.setattr(ck, "_upload_file", lambda p, d: (order.append(p.name), real(p, d)))
    ck.upload_checkpoint(src, uri)
    assert order[-1] == ck.TRAIN_STATE and len(order) == 6
    assert ck.is_complete(uri)

    # Replacing it: the old marker goes first, objects the new checkpoint lacks are dropped.
    (src / "extra.txt").unlink()
    (src / "model.safetensors").write_bytes(b"w2")
    seen: list[bool] = []
    monkeypatch.setattr(ck, "_upload_file", lambda p, d: (seen.append(ck.is_complete(uri)), real(p, d)))
    ck.upload_checkpoint(src, uri)
    assert seen == [False] * 5  # never complete while files are replaced
    assert storage.listdir(uri) == sorted(
        ["model.safetensors", "config.json", "vocab.json", "ingredients.json", ck.TRAIN_STATE]
    )
    assert storage.read_bytes(f"{uri}/model.safetensors") == b"w2"

    # A cut-short upload of `last` (no train_state.pt): resume falls back to the complete `best`.
    run = "s3://bucket/ckpt-unit"
    assert ck.latest_checkpoint(run) == uri
    ck.upload_checkpoint(src, f"{run}/checkpoints/best")
    storage.remove(f"{uri}/{ck.TRAIN_STATE}")
    assert ck.latest_checkpoint(run) == f"{run}/checkpoints/best"
    with ck.local_checkpoint(f"{run}/checkpoints/best") as d:
        assert (d / "model.safetensors").read_bytes() == b"w2"
        local_copy = d
    assert not local_copy.exists()  # the download is temporary


def test_cli_checks_and_eval_and_plot_on_remote_run(s3) -> None:
    from tnlbt.cli import main
    from tnlbt.train.ray_trainer import fit_local

    # cli_train's checks speak URIs: a missing remote split or --resume is one clear error
    assert main(["train", "--config", "tiny_test", "--data", "s3://bucket/nothing", "--no-ray"]) == 2
    assert (
        main(
            [
                "train",
                "--config",
                "tiny_test",
                "--data",
                DATA_URI,
                "--no-ray",
                "--resume",
                "s3://bucket/nothing/checkpoints/last",
            ]
        )
        == 2
    )

    fit_local(_remote_cfg("ev", "train.epochs=1", "eval.bag_sizes=[16]"), DATA_URI)
    run = f"{RUNS_URI}/ev"
    assert main(["eval", "--run", run, "--bags", "2"]) == 0  # data: the run config's s3:// processed_dir
    res = json.loads(storage.read_text(f"{run}/metrics_test.json"))
    assert res["meta"]["checkpoint"] == f"{run}/checkpoints/best"
    assert res["meta"]["n_pairs"] == 48 and res["meta"]["data"] == DATA_URI
    assert 0.0 <= res["16"]["image_to_recipe"]["R@1"]["mean"] <= 1.0

    from tnlbt.evaluate import embed_pairs
    from tnlbt.models import load_model
    from tnlbt.runs import checkpoint_location
    from tnlbt.train.checkpoint import local_checkpoint

    assert checkpoint_location(run) == f"{run}/checkpoints/best"
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoint_location(f"{RUNS_URI}/missing")
    with local_checkpoint(checkpoint_location(run)) as d:
        model, *_ = load_model(d)
    remote = embed_pairs(model, f"{DATA_URI}/test", batch_size=7)
    local = embed_pairs(model, s3.data / "test", batch_size=7)
    assert remote["ids"] == local["ids"] and len(remote["ids"]) == 48
    assert torch.equal(torch.from_numpy(remote["image_emb"]), torch.from_numpy(local["image_emb"]))

    storage.remove(f"{run}/curves.png")
    assert main(["plot", run]) == 0
    assert storage.read_bytes(f"{run}/curves.png")[:4] == b"\x89PNG"


# -- Ray Train ---------------------------------------------------------------------------------------------
def _ray_cfg(name: str, *overrides: str) -> Config:
    return _remote_cfg(
        name, "scaling.num_workers=2", "scaling.cpus_per_worker=0.5", "train.recipe_only_batch_mult=1", *overrides
    )


@pytest.mark.ray
def test_ray_two_workers_on_remote_storage(ray_session, s3) -> None:
    """2 Ray Train workers, Ray's storage on the object store (the route reaches the workers through
    ``worker_runtime_env`` even though the session's Ray cluster started without it)."""
    from tnlbt.train.checkpoint import is_complete
    from tnlbt.train.ray_trainer import fit, use_in_memory

    cfg = _ray_cfg("ray2", "train.epochs=1", "train.max_steps_per_epoch=2")
    assert use_in_memory(cfg, DATA_URI)  # auto: the toy split is read into each worker (tests/test_train_ray: Ray Data)
    out = fit(cfg, DATA_URI)
    assert out["final_step"] == 2 and out["final_epoch"] == 1
    run = f"{RUNS_URI}/ray2"
    recs = _remote_jsonl(f"{run}/metrics.jsonl")
    assert [(r["kind"], r["step"]) for r in recs] == [("train", 1), ("train", 2), ("val", 2)]
    assert is_complete(f"{run}/checkpoints/last") and is_complete(f"{run}/checkpoints/best")
    names = storage.listdir(run)
    assert "config.json" in names and any(n.startswith("checkpoint_") for n in names), names  # Ray's own copies


@pytest.mark.ray
@pytest.mark.slow
def test_ray_failure_and_rerun_on_remote_storage(ray_session, s3) -> None:
    """A worker dies at step 4 (the group restarts from Ray's checkpoint on the object store), then a rerun
    with more epochs resumes through ``ray.train.get_checkpoint()`` from the remote experiment folder."""
    from tnlbt.train.checkpoint import load_train_state, local_checkpoint
    from tnlbt.train.ray_trainer import fit

    out = fit(_ray_cfg("rayf", "train.fail_at_step=4"), DATA_URI)
    assert out["final_step"] == 6 and out["final_epoch"] == 2
    run = f"{RUNS_URI}/rayf"
    assert storage.exists(f"{run}/.fail_injected")
    steps = [r["step"] for r in _remote_jsonl(f"{run}/metrics.jsonl") if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 4, 5, 6]
    out = fit(_ray_cfg("rayf", "train.epochs=3"), DATA_URI)
    assert out["final_step"] == 9 and out["final_epoch"] == 3
    steps = [r["step"] for r in _remote_jsonl(f"{run}/metrics.jsonl") if r["kind"] == "train"]
    assert steps[-4:] == [6, 7, 8, 9]
    with local_checkpoint(f"{run}/checkpoints/last") as d:
        assert load_train_state(d)["loop"]["step"] == 9
