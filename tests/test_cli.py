"""The ``tnlbt`` command: help for every subcommand, config printing, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tnlbt.cli import COMMANDS, build_parser, main


def test_every_subcommand_has_help(capsys):
    for name in COMMANDS:
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args([name, "--help"])
        assert e.value.code == 0
        assert "usage: tnlbt " + name in capsys.readouterr().out


def test_every_subcommand_resolves_to_a_function():
    import importlib

    for name, target in COMMANDS.items():
        module, func = target.split(":")
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:  # pragma: no cover - reported as a failure below
            pytest.fail(f"{name}: module {module} missing ({e})")
        assert callable(getattr(mod, func)), f"{name}: {target} is not callable"


def test_config_command_prints_validated_json(capsys):
    assert main(["config", "train.epochs=7"]) == 0
    assert json.loads(capsys.readouterr().out)["train"]["epochs"] == 7


def test_config_error_is_one_clear_line(capsys):
    assert main(["config", "loss.triplet=nope"]) == 2
    err = capsys.readouterr().err
    assert "loss.triplet" in err and "'ht'" in err and "Traceback" not in err


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "tnlbt", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "synth" in out.stdout and "preprocess" in out.stdout


def test_index_pool_flags_reach_index_run(monkeypatch, tmp_path):
    """--actors / --device / --index-setting are passed on (they size the pool on an autoscaling cluster)."""
    import tnlbt.index.embed as embed
    import tnlbt.ray_init as ray_init

    seen = {}

    def fake_index_run(run, **kw):
        seen.update(kw)
        return {"recipes": 1, "photos": 2, "skipped_photos": 0, "version": "v1", "store": "edge",
                "qdrant_url": None, "store_path": "x", "embed_s": 0.0, "load_s": 0.0, "embeddings": "e"}

    monkeypatch.setattr(embed, "index_run", fake_index_run)
    monkeypatch.setattr(ray_init, "ensure_ray", lambda *a, **k: False)
    rc = main(["index", "--run", str(tmp_path), "--actors", "6", "--device", "cuda", "--index-setting", "hnsw_ef=64"])
    assert rc == 0
    index = seen["index"]
    assert index.actors == 6 and index.device == "cuda" and index.store.resolved_settings().hnsw_ef == 64
    with pytest.raises(SystemExit):
        build_parser().parse_args(["index", "--run", "r", "--device", "tpu"])
    with pytest.raises(ValueError, match="choose auto, cpu or cuda"):
        embed.embed_for_index(tmp_path, tmp_path, device="tpu")


def test_a_full_disk_is_one_line_and_its_own_exit_code(monkeypatch, capsys):
    """ENOSPC anywhere under a command (also wrapped, as a Ray worker's failure arrives) -> one line, exit 28."""
    import errno

    import tnlbt.cli as cli

    def full(_args):
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/runs/x/metrics.jsonl")
        except OSError as e:
            raise RuntimeError("worker 0 failed") from e

    monkeypatch.setattr(cli, "cli_config", full)
    assert main(["config", "--config", "tiny_test"]) == cli.EXIT_NO_SPACE == 28
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[0]] and "out of disk space (" in err[0] and "/runs/x/metrics.jsonl" in err[0]
    assert "Traceback" not in err[0]
    def raising(text: str):
        def fn(_args):
            raise RuntimeError(text)

        return fn

    monkeypatch.setattr(cli, "cli_config", raising("RayTaskError: ... OSError: [Errno 28] No space left on device"))
    assert main(["config", "--config", "tiny_test"]) == 28
    monkeypatch.setattr(cli, "cli_config", raising("something else"))
    with pytest.raises(RuntimeError, match="something else"):  # other failures keep their traceback
        main(["config", "--config", "tiny_test"])


def test_a_local_ray_quiets_what_only_says_the_dashboard_is_off(monkeypatch):
    """ensure_ray's local Ray (dashboard off) runs a setup hook in every worker that silences Ray Train's
    placement-group cleaner, which warned once a second that the State API was unavailable (36 lines in a
    12-step run, 1,213 in a demo); the hook is named by an import path a worker can resolve."""
    import importlib
    import logging

    import ray

    import tnlbt.ray_init as ray_init

    seen = {}
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw))
    assert ray_init.ensure_ray(2) is True
    assert seen["include_dashboard"] is False and seen["num_cpus"] == 2
    module, _, name = seen["runtime_env"]["worker_process_setup_hook"].rpartition(".")
    hook = getattr(importlib.import_module(module), name)
    noisy = logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner")
    monkeypatch.setattr(noisy, "level", logging.NOTSET)
    hook()
    assert noisy.getEffectiveLevel() == logging.ERROR
