"""The npe2 manifest: valid, packaged, and every command imports."""

from __future__ import annotations

import filecmp
import importlib
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import gui_import  # importorskip, but a failure under CI=true
npe2 = gui_import("npe2")
gui_import("napari")

ROOT = Path(__file__).resolve().parents[1]
TOP = ROOT / "napari.yaml"
PACKAGED = ROOT / "src" / "napari_femur" / "napari.yaml"

pytestmark = pytest.mark.gui


def test_packaged_manifest_is_identical_to_the_top_level_one():
    assert TOP.is_file() and PACKAGED.is_file()
    assert filecmp.cmp(TOP, PACKAGED, shallow=False), (
        "src/napari_femur/napari.yaml must be a copy of napari.yaml: cp napari.yaml src/napari_femur/napari.yaml"
    )


def test_manifest_is_valid_and_named():
    mf = npe2.PluginManifest.from_file(TOP)
    assert mf.name == "napari-femur"
    assert mf.display_name == "Femur"
    widgets = {w.display_name for w in mf.contributions.widgets}
    assert widgets == {"Segment Femur", "Femur Threshold", "Train Fold", "Femur Analysis"}


def test_installed_plugin_is_discovered_and_validates():
    pm = npe2.PluginManager.instance()
    pm.discover()
    assert "napari-femur" in pm._manifests
    out = subprocess.run([sys.executable, "-m", "npe2", "validate", "napari-femur"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize(
    "command", [c for c in npe2.PluginManifest.from_file(TOP).contributions.commands], ids=lambda c: c.id
)
def test_every_command_imports(command):
    module, _, attr = command.python_name.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    assert callable(obj)


def test_wheel_ships_the_manifest(tmp_path):
    """``pip wheel .`` puts napari_femur/napari.yaml (identical to the top-level file) in the wheel."""
    gui_import("setuptools")
    src = tmp_path / "src_copy"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "*.egg-info", "build", "runs",
                                                             "__pycache__", ".pytest_cache", "docs", "bench"))
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "whl")],
        capture_output=True, text=True, timeout=600,
    )
    if out.returncode != 0 and "No module named pip" in out.stderr:
        pytest.skip("pip is not available in this environment")
    assert out.returncode == 0, out.stderr[-2000:]
    [wheel] = list((tmp_path / "whl").glob("napari_femur-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        assert "napari_femur/napari.yaml" in names
        assert zf.read("napari_femur/napari.yaml") == TOP.read_bytes()
        eps = next(n for n in names if n.endswith("entry_points.txt"))
        assert "napari_femur:napari.yaml" in zf.read(eps).decode()
