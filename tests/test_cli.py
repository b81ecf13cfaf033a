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
