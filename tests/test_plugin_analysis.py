"""Femur Analysis dock widget: right / left labels with names, the table on the clipboard, surfaces that
line up with the image, the uncertainty layer and "next uncertain slice"."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import gui_import  # importorskip, but a failure under CI=true
napari = gui_import("napari")
gui_import("pytestqt")

from napari_femur._analysis_widget import FemurAnalysisWidget  # noqa: E402
from napari_femur._layers import femur_meta, volume_from_layer  # noqa: E402
from napari_femur._sample_data import synthetic_subject_layers  # noqa: E402

pytestmark = pytest.mark.gui

TIMEOUT_MS = 120_000


@pytest.fixture
def viewer_with_scan(make_napari_viewer, tiny_checkpoint):
    """A synthetic two-hip scan and its femur mask, the mask posing as a Segment Femur prediction."""
    viewer = make_napari_viewer()
    layers = []
    for data, kwargs, kind in synthetic_subject_layers(seed=1, geometry="tiny", downsample=1, name="hip"):
        layers.append(getattr(viewer, f"add_{kind}")(data, **kwargs))
    image, mask = layers
    mask.metadata["femur"].update(image_layer=image.name, model=str(tiny_checkpoint), threshold=0.5, cleanup=True)
    widget = FemurAnalysisWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.mask_combo.set_layer(mask)
    return viewer, widget, image, mask


def test_sides_layer_has_names_and_the_table_copies(viewer_with_scan, qtbot):
    from qtpy.QtWidgets import QApplication

    from femur_core.analysis import side_labels

    viewer, widget, image, mask = viewer_with_scan
    with qtbot.waitSignal(widget.analysed, timeout=TIMEOUT_MS) as blocker:
        widget.sides_button.click()
    sides = blocker.args[0]
    assert isinstance(sides, napari.layers.Labels) and sides.name == f"{mask.name} sides"
    assert np.allclose(sides.affine.affine_matrix, mask.affine.affine_matrix)
    want = side_labels(volume_from_layer(mask))  # from the layer's world geometry (RAS)
    assert np.array_equal(np.asarray(sides.data), want.data) and set(np.unique(sides.data)) == {0, 1, 2}
    assert list(sides.features["name"]) == ["right femur", "left femur"]
    assert list(sides.features["index"]) == [1, 2]
    # the right femur is towards the patient's right: napari's third world axis is patient LEFT
    cols = {k: np.argwhere(np.asarray(sides.data) == k)[:, 2].mean() for k in (1, 2)}
    assert femur_meta(sides.metadata)["role"] == "sides" and cols[1] < cols[2]
    assert widget.table.rowCount() == 2 and widget.table.item(0, 0).text() == "right femur"
    text = widget.copy_table()
    assert QApplication.clipboard().text() == text
    lines = [ln.split("\t") for ln in text.strip().splitlines()]
    assert lines[0][:5] == ["scan", "femur", "label", "voxels", "volume_ml"]
    vox_ml = abs(np.linalg.det(want.affine[:3, :3])) / 1000
    for ln, k in zip(lines[1:], (1, 2)):
        n = int((want.data == k).sum())
        assert int(ln[3]) == n and float(ln[4]) == pytest.approx(n * vox_ml, abs=1e-3)
    widget.sides_button.click()  # again: the same layer is updated, not a second one
    assert [ly.name for ly in viewer.layers].count(sides.name) == 1


def test_surfaces_line_up_with_the_mask_in_world_coordinates(viewer_with_scan, qtbot):
    viewer, widget, image, mask = viewer_with_scan
    widget.smooth_spin.setValue(0)
    with qtbot.waitSignal(widget.surfaces_done, timeout=TIMEOUT_MS) as blocker:
        assert widget.make_surfaces() is not None
    surfaces = blocker.args[0]
    qtbot.waitUntil(lambda: widget.worker is None, timeout=TIMEOUT_MS)
    assert [s.name for s in surfaces] == [f"{mask.name} right femur surface", f"{mask.name} left femur surface"]
    data = np.asarray(mask.data) > 0
    for s in surfaces:
        verts = np.asarray(s.data[0], float)
        world = np.array([s.data_to_world(v) for v in verts[:: max(1, len(verts) // 400)]])
        idx = np.array([mask.world_to_data(w) for w in world])
        # unsmoothed marching cubes: every vertex sits half way between a mask voxel and a background voxel
        lo, hi = np.floor(idx + 1e-6).astype(int), np.ceil(idx - 1e-6).astype(int)
        assert np.allclose(np.abs(idx - np.round(idx)).max(axis=1), 0.5, atol=1e-3)
        inside = data[tuple(np.clip(lo, 0, np.array(data.shape) - 1).T)] | data[tuple(np.clip(hi, 0, np.array(data.shape) - 1).T)]
        assert inside.all()
        assert femur_meta(s.metadata)["watertight"]


def test_uncertainty_layer_and_next_uncertain_slice(viewer_with_scan, qtbot):
    from femur_core.uncertainty import slice_order

    viewer, widget, image, mask = viewer_with_scan
    assert not widget.next_button.isEnabled()
    with qtbot.waitSignal(widget.uncertainty_done, timeout=TIMEOUT_MS) as blocker:
        assert widget.run_uncertainty() is not None
    unc = blocker.args[0]
    qtbot.waitUntil(lambda: widget.worker is None, timeout=TIMEOUT_MS)
    assert unc.data.shape == image.data.shape and np.allclose(unc.affine.affine_matrix, image.affine.affine_matrix)
    assert 0.0 <= float(np.min(unc.data)) and float(np.max(unc.data)) <= 1.0
    score = femur_meta(unc.metadata)["score"]
    assert 0.0 <= score <= 1.0 and "Uncertainty score" in widget.status.text()
    order = slice_order(np.asarray(unc.data), axis=0)
    assert widget.next_button.isEnabled() and order.size > 0
    for want in order[:3]:
        z = widget.next_uncertain_slice()
        assert z == want
        assert round(float(unc.world_to_data(viewer.dims.point)[0])) == z  # the viewer shows that slice


def test_no_model_says_what_is_missing(make_napari_viewer):
    viewer = make_napari_viewer()
    for data, kwargs, kind in synthetic_subject_layers(seed=1, geometry="tiny", downsample=1, name="hip"):
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    widget = FemurAnalysisWidget(viewer)
    assert widget.run_uncertainty() is None
    assert "which image and model" in widget.status.text()
