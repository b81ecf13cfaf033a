"""The package installs like one: a wheel, installed without the source tree, has its presets, its Serve app
and UI under the ``tnlbt`` name, and no top-level ``serve`` / ``ui`` packages."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SOURCES = ("pyproject.toml", "README.md", "tnlbt", "serve", "ui", "configs")  # what the wheel is built from


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Build the wheel from the repository and install it (no deps: the venv has them) into a fresh target."""
    root = tmp_path_factory.mktemp("wheel")
    src, dist, site = root / "src", root / "dist", root / "site"
    # Built from a copy: setuptools writes build/ and *.egg-info next to the sources, never into the checkout.
    src.mkdir()
    for name in SOURCES:
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy2)(REPO / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(src)],
                   check=True, cwd=root, timeout=300)
    (wheel,) = dist.glob("tnlbt-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, cwd=root,
                   timeout=300)
    return {"wheel": wheel, "site": site, "cwd": root}


def _run(installed: dict[str, Path], *args: str) -> subprocess.CompletedProcess[str]:
    """Python with the installed wheel first on the path, from a folder outside the source tree."""
    env = {**os.environ, "PYTHONPATH": str(installed["site"]), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *args], cwd=installed["cwd"], env=env, capture_output=True, text=True,
                          timeout=300)


def test_wheel_holds_one_top_level_package_with_its_data(installed: dict[str, Path]) -> None:
    names = zipfile.ZipFile(installed["wheel"]).namelist()
    tops = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
    assert tops == {"tnlbt"}, tops  # no top-level serve/ or ui/ to collide with other distributions
    for needed in ("tnlbt/presets/demo_cpu.yaml", "tnlbt/presets/ablation_no_translation.yaml",
                   "tnlbt/serve/app.py", "tnlbt/serve/config.yaml", "tnlbt/ui/app.py", "tnlbt/runs.py"):
        assert needed in names, needed


def test_installed_wheel_runs_without_the_source_tree(installed: dict[str, Path]) -> None:
    where = _run(installed, "-c", "import tnlbt, tnlbt.presets; print(tnlbt.__file__); print(tnlbt.presets.__file__)")
    assert where.returncode == 0, where.stderr
    assert all(line.startswith(str(installed["site"])) for line in where.stdout.split()), where.stdout

    cfg = _run(installed, "-m", "tnlbt", "config", "--config", "ablation_no_translation")  # an overlay on demo_cpu
    assert cfg.returncode == 0, cfg.stderr
    assert '"generator": false' in cfg.stdout and '"run_name": "ablation_no_translation"' in cfg.stdout

    out = installed["cwd"] / "synth"
    synth = _run(installed, "-m", "tnlbt", "synth", "--out", str(out), "--recipes", "12", "--workers", "1",
                 "--image-size", "32")
    assert synth.returncode == 0, synth.stderr
    assert (out / "layer1.json").is_file() and (out / "images").is_dir()

    builders = _run(installed, "-c", "import tnlbt.serve.app as a, tnlbt.serve.deployments as d, tnlbt.ui.app as u; "
                    "print(callable(a.build_app), callable(a.build_ui_app), d.SearchAPI.name, callable(u.build_demo),"
                    " u._photo_input_class().__name__)")
    assert builders.returncode == 0, builders.stderr
    assert builders.stdout.split() == ["True", "True", "SearchAPI", "True", "PhotoInput"]
    assert not list(installed["site"].rglob("*.pyi"))  # nothing writes into the installed package
