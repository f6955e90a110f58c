"""Under CI=true a GUI test that cannot run is a failure, never a skip (tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

import conftest
from conftest import gui_import

MISSING = "femur_no_such_gui_package"


def test_missing_gui_package_skips_on_a_developer_machine(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        gui_import(MISSING)


@pytest.mark.parametrize("value", ["true", "True", "1"])
def test_missing_gui_package_is_an_error_under_ci(monkeypatch, value):
    # the plugin test modules import napari through gui_import: a broken install fails collection
    monkeypatch.setenv("CI", value)
    with pytest.raises(ImportError):
        gui_import(MISSING)
    assert gui_import("json").dumps([1]) == "[1]"  # a present module is returned as usual


def test_gui_test_without_a_display_fails_under_ci_and_skips_elsewhere(monkeypatch):
    item = SimpleNamespace(get_closest_marker=lambda name: object() if name == "gui" else None)
    for var in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no display"):
        conftest.pytest_runtest_setup(item)
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="xvfb-run"):
        conftest.pytest_runtest_setup(item)


def test_every_plugin_test_module_imports_napari_through_the_guard():
    """A module-level pytest.importorskip of a GUI package would bring the silent skip of a whole
    module back (an importorskip inside one test, e.g. of an optional Qt binding part, is allowed)."""
    for path in sorted(Path(__file__).parent.glob("test_plugin_*.py")):
        lines = path.read_text().splitlines()
        module_level = [ln for ln in lines if "importorskip(" in ln and not ln[:1].isspace()]
        assert not module_level, f"{path.name}: use conftest.gui_import, not pytest.importorskip: {module_level}"
        assert any(ln.startswith(("napari = gui_import(", "gui_import(")) for ln in lines), path.name


def test_ci_script_sets_ci_true():
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert "export CI=true" in ci
