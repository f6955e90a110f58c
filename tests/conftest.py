"""Shared test configuration."""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path

import pytest

# ----------------------------------------------------------------------------
# napari plugin tests (tests/test_plugin_*.py)
#
# They are marked ``gui`` and need napari and a display: run them under
#   OMP_NUM_THREADS=1 QT_QPA_PLATFORM=xcb xvfb-run -a -s "-screen 0 1280x1024x24" \
#       python -m pytest tests/test_plugin_*.py
# (QT_QPA_PLATFORM=offscreen crashes in napari's OpenGL check on some machines).
# Without napari the modules skip at import (gui_import); without a display the
# gui tests skip with the command above as the reason. Under CI=true (set by
# .ci/run, and by most CI services) both are FAILURES instead: a broken napari
# install must not turn the GUI tests into skips on a green CI run.
# ----------------------------------------------------------------------------

DISPLAY_HELP = 'needs a display: run under xvfb-run -a -s "-screen 0 1280x1024x24" with QT_QPA_PLATFORM=xcb'


def in_ci() -> bool:
    """True where the environment says CI (``CI=true``, as .ci/run exports)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def gui_import(name: str):
    """Import a module that the GUI tests need: ``pytest.importorskip`` on a developer machine,
    a plain import under CI, where a missing or broken package is an error, not a skip."""
    if in_ci():
        return importlib.import_module(name)
    return pytest.importorskip(name)


# Qt 6 through PyQt6 (the napari extra's binding) where it is installed, also in an environment
# that still holds PyQt5: qtpy would pick PyQt5 first, and napari warns that its support ends.
if importlib.util.find_spec("PyQt6") is not None:
    os.environ.setdefault("QT_API", "pyqt6")


def _has_display() -> bool:
    if os.environ.get("QT_QPA_PLATFORM", "") == "offscreen":
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def pytest_runtest_setup(item):
    """Skip ``@pytest.mark.gui`` tests when no display is available (fail under CI).

    A hook rather than an autouse fixture: session fixtures (pytest-qt's QApplication,
    requested through make_napari_viewer) are set up before any function fixture and
    would abort the run without a display.
    """
    if item.get_closest_marker("gui") is not None and not _has_display():
        if in_ci():
            pytest.fail("CI=true but no display for the GUI tests; " + DISPLAY_HELP, pytrace=False)
        pytest.skip(DISPLAY_HELP)


# ----------------------------------------------------------------------------
# Real development data (tests/test_realdata.py, marker ``realdata``): the folder
# ../shared/data/pelvic_mri next to the repository root, or FEMUR_REAL_DATA.
# ----------------------------------------------------------------------------
REPO_ROOT = Path(__file__).resolve().parents[1]


def real_data_dir() -> Path:
    """Where the real scans are looked for: ``$FEMUR_REAL_DATA``, else ``<repo>/../shared/data/pelvic_mri``."""
    env = os.environ.get("FEMUR_REAL_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data" / "pelvic_mri"


def write_tiny_subject(folder, sid="sub01", seed=3):
    """Write a small NIfTI scan in the real data's (L, I, P) orientation, with a bright blob as "femur".

    Shapes (x, y, z) = (20, 24, 6), 1.5 mm pixels, 5 mm slices. Returns ``(image_path, mask_path)``.
    """
    from pathlib import Path

    import nibabel as nib
    import numpy as np

    rng = np.random.default_rng(seed)
    shape = (20, 24, 6)  # axis 0 to patient left, axis 1 inferior, axis 2 posterior (L, I, P)
    affine = np.array([[-1.5, 0, 0, 15.0], [0, 0, -5.0, 12.0], [0, -1.5, 0, 30.0], [0, 0, 0, 1]])
    x, y, z = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    cx, cy = 6 + rng.uniform(-1.5, 1.5), 12 + rng.uniform(-2, 2)
    blob = ((x - cx) / 4.0) ** 2 + ((y - cy) / 6.0) ** 2 + ((z - 3) / 2.2) ** 2 <= 1.0
    image = (200 + 600 * blob + rng.normal(0, 40, shape)).astype(np.int16)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in ((f"{sid}_image.nii.gz", image), (f"{sid}_femur.nii.gz", blob.astype(np.uint8))):
        img = nib.Nifti1Image(data, affine)
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        nib.save(img, str(folder / name))
        paths.append(folder / name)
    return tuple(paths)


@pytest.fixture
def tiny_scan_pair(tmp_path):
    """One small subject (see :func:`write_tiny_subject`): ``(image_path, mask_path)``."""
    return write_tiny_subject(tmp_path, "sub01", 3)


@pytest.fixture
def tiny_data_folder(tmp_path):
    """A data folder of four small subjects, sub01 .. sub04."""
    folder = tmp_path / "data"
    for i in range(1, 5):
        write_tiny_subject(folder, f"sub{i:02d}", i)
    return folder


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """An untrained, tiny 2D model saved with femur_core's own checkpoint writer (no training needed)."""
    from femur_core.checkpoint import save_checkpoint
    from femur_core.models.registry import build_model, default_config
    from femur_core.preprocess import GridSpec
    from femur_core.training import TrainConfig

    cfg = TrainConfig(model=default_config("2d-same", features=4, levels=2), grid=GridSpec())
    path = tmp_path_factory.mktemp("model") / "best.pt"
    save_checkpoint(path, build_model(cfg.model), cfg.to_dict(), threshold=0.5)
    return path
