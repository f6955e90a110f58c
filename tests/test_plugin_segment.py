"""Segment Femur and Femur Threshold dock widgets."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from conftest import gui_import  # importorskip, but a failure under CI=true
napari = gui_import("napari")
gui_import("pytestqt")

from napari_femur._layers import femur_meta  # noqa: E402
from napari_femur._segment_widget import NO_MODEL_HELP, SegmentFemurWidget  # noqa: E402
from napari_femur._session import session_models  # noqa: E402
from napari_femur._threshold_widget import ThresholdWidget, curve_index  # noqa: E402

pytestmark = pytest.mark.gui

TIMEOUT_MS = 120_000


@pytest.fixture(autouse=True)
def _empty_session_store():
    session_models().clear()
    yield
    session_models().clear()


def _open_pair(viewer, pair):
    [image] = viewer.open(str(pair[0]), plugin="napari-femur")
    [ref] = viewer.open(str(pair[1]), plugin="napari-femur")
    return image, ref


def _use_path(widget: SegmentFemurWidget, path, qtbot=None) -> None:
    """Choose a model file; with ``qtbot``, wait until the widget has loaded it (in a thread worker)."""
    widget.select_model_path(path)
    assert widget.model_combo.currentText().startswith("Model file or run folder")
    if qtbot is not None:
        qtbot.waitUntil(lambda: widget.loader is None, timeout=TIMEOUT_MS)


def test_no_model_says_how_to_get_one(make_napari_viewer, tiny_scan_pair):
    viewer = make_napari_viewer()
    _open_pair(viewer, tiny_scan_pair)
    widget = SegmentFemurWidget(viewer)
    viewer.window.add_dock_widget(widget)
    assert "Train Fold" in widget.model_info.text()
    assert widget.run() is None
    assert widget.status.text() == NO_MODEL_HELP
    assert "femur_core.train" in NO_MODEL_HELP


def test_segment_adds_aligned_layers_and_threshold_updates_mask_and_curve(
    make_napari_viewer, qtbot, tiny_scan_pair, tiny_checkpoint
):
    viewer = make_napari_viewer()
    image, ref = _open_pair(viewer, tiny_scan_pair)
    widget = SegmentFemurWidget(viewer)
    viewer.window.add_dock_widget(widget)
    _use_path(widget, tiny_checkpoint, qtbot)
    assert "2d-same" in widget.model_info.text() and "2D" in widget.model_info.text()
    widget.image_combo.set_layer(image)
    widget.device_combo.setCurrentText("cpu")
    progress_seen = []
    widget.progress.valueChanged.connect(progress_seen.append)

    with qtbot.waitSignal(widget.segmented, timeout=TIMEOUT_MS) as blocker:
        assert widget.run() is not None
    prob_layer, mask_layer = blocker.args[0]
    qtbot.waitUntil(lambda: widget.worker is None, timeout=TIMEOUT_MS)

    assert prob_layer.name == f"{image.name} femur probability (prediction)"
    assert mask_layer.name == f"{image.name} femur (prediction)"
    assert isinstance(mask_layer, napari.layers.Labels)
    for layer in (prob_layer, mask_layer):
        assert layer.data.shape == image.data.shape
        assert np.allclose(layer.affine.affine_matrix, image.affine.affine_matrix)
        assert np.allclose(layer.scale, image.scale) and np.allclose(layer.translate, image.translate)
        meta = femur_meta(layer.metadata)
        assert meta["reorientation"] == femur_meta(image.metadata)["reorientation"]
        assert meta["image_layer"] == image.name
    prob = np.asarray(prob_layer.data)
    assert prob.dtype == np.float32 and 0 <= prob.min() and prob.max() <= 1
    assert progress_seen, "the progress bar moved"
    assert widget.status.text().startswith("Done")

    # ---- threshold section: cached map, slider -> mask, reference -> PR curve
    panel = widget.threshold_panel
    assert panel.mask_layer is mask_layer
    panel.cleanup_check.setChecked(False)
    lo, hi = float(np.quantile(prob, 0.25)), float(np.quantile(prob, 0.75))
    panel.set_threshold(lo)
    n_lo = int(np.count_nonzero(mask_layer.data))
    assert n_lo == int(np.count_nonzero(prob >= np.float32(round(lo, 3))))
    panel.set_threshold(hi)
    n_hi = int(np.count_nonzero(mask_layer.data))
    assert n_hi < n_lo, "a higher threshold gives a smaller mask"
    assert panel.current_point() is None  # no reference yet

    panel.ref_combo.set_layer(ref)
    assert panel.curves is not None
    point_hi = panel.current_point()
    marker_hi = tuple(np.ravel(panel.canvas._current_artist.get_data()))
    panel.set_threshold(lo)
    point_lo = panel.current_point()
    marker_lo = tuple(np.ravel(panel.canvas._current_artist.get_data()))
    assert point_lo["recall"] >= point_hi["recall"]
    assert marker_lo != marker_hi, "the current operating point moved on the curve"
    assert marker_lo == pytest.approx((point_lo["recall"], point_lo["precision"]))
    # the looked-up scores are those of the mask actually shown
    m = np.asarray(mask_layer.data).astype(bool)
    r = np.asarray(ref.data).astype(bool)
    tp, fp, fn = int((m & r).sum()), int((m & ~r).sum()), int((~m & r).sum())
    assert point_lo["tp"] == tp and point_lo["fp"] == fp and point_lo["fn"] == fn
    assert point_lo["dsc"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert "DSC" in panel.stats_label.text()

    assert panel.optimal_button.isEnabled()
    panel.optimal_button.click()
    assert panel.threshold == pytest.approx(panel.optimal_threshold, abs=1e-3)
    assert curve_index(panel.curves, panel.threshold) == panel._optimal_index


def test_rerun_updates_layers_in_place(make_napari_viewer, qtbot, tiny_scan_pair, tiny_checkpoint):
    """A second run with other settings updates the DATA of the same two layers (no duplicates): the
    probability and mask shown are those of the library for the new settings."""
    from femur_core import read_volume, to_canonical
    from femur_core.inference import load_model, predict_volume

    viewer = make_napari_viewer()
    image, _ = _open_pair(viewer, tiny_scan_pair)
    widget = SegmentFemurWidget(viewer)
    qtbot.addWidget(widget)  # closed and deleted at the end of the test, not by a later garbage collection
    _use_path(widget, tiny_checkpoint)
    widget.image_combo.set_layer(image)
    results = []
    for flip in (True, False):
        widget.flip_check.setChecked(flip)
        with qtbot.waitSignal(widget.segmented, timeout=TIMEOUT_MS) as blocker:
            widget.run()
        qtbot.waitUntil(lambda: widget.worker is None, timeout=TIMEOUT_MS)
        prob_layer, mask_layer = blocker.args[0]
        results.append((prob_layer, mask_layer, np.array(prob_layer.data), np.array(mask_layer.data)))
    assert len(viewer.layers) == 4  # image, reference, probability, mask: no duplicates
    (p1, m1, prob1, _), (p2, m2, prob2, mask2) = results
    assert p2 is p1 and m2 is m1  # the same layer objects ...
    assert not np.array_equal(prob1, prob2)  # ... whose data changed (flip averaging off)
    expected = predict_volume(load_model(tiny_checkpoint), read_volume(tiny_scan_pair[0]), flip_tta=False,
                              device="cpu")
    np.testing.assert_allclose(prob2, to_canonical(expected.prob)[0].data, atol=1e-5)
    np.testing.assert_array_equal(mask2, to_canonical(expected.mask)[0].data)
    np.testing.assert_array_equal(np.asarray(m2.data), mask2)


def test_cancel_and_errors_become_messages(make_napari_viewer, qtbot, tiny_scan_pair, tiny_checkpoint, tmp_path):
    viewer = make_napari_viewer()
    image, _ = _open_pair(viewer, tiny_scan_pair)
    widget = SegmentFemurWidget(viewer)
    qtbot.addWidget(widget)
    _use_path(widget, tiny_checkpoint)
    widget.image_combo.set_layer(image)

    # cancel: the job waits in model loading until Cancel was pressed
    release = threading.Event()
    real_get = widget._cache.get

    def slow_get(path):
        release.wait(30)
        return real_get(path)

    widget._cache.get = slow_get
    worker = widget.run()
    with qtbot.waitSignal(worker.finished, timeout=TIMEOUT_MS):
        widget.cancel_button.click()
        release.set()
    assert "cancelled" in widget.status.text().lower()
    assert len(viewer.layers) == 2
    widget._cache.get = real_get

    # a broken model file: an error message, no crash, the widget is usable again
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    _use_path(widget, bad, qtbot)
    assert "Cannot use this model" in widget.model_info.text()
    assert widget.run() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=TIMEOUT_MS)
    assert "Segmentation failed" in widget.status.text()
    assert widget.run_button.isEnabled()


def test_choosing_a_model_loads_it_off_the_gui_thread(make_napari_viewer, qtbot, tiny_checkpoint, tmp_path):
    """The model is loaded in a thread worker: the widget gets it (its description), a file that cannot
    be used puts its error on the status line, and a slow load leaves the GUI thread free."""
    viewer = make_napari_viewer()
    widget = SegmentFemurWidget(viewer)
    qtbot.addWidget(widget)
    loads = []
    release = threading.Event()
    real_get = widget._cache.get

    def watched_get(path):
        loads.append(threading.current_thread() is threading.main_thread())
        release.wait(30)
        return real_get(path)

    widget._cache.get = watched_get
    _use_path(widget, tiny_checkpoint)
    assert widget.loader is not None and "Loading" in widget.model_info.text()  # returned while loading
    release.set()
    qtbot.waitUntil(lambda: widget.loader is None, timeout=TIMEOUT_MS)
    assert loads == [False]  # loaded once, not on the GUI thread
    assert "2d-same" in widget.model_info.text() and "threshold" in widget.model_info.text()
    assert widget.status.text() == ""

    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    _use_path(widget, bad, qtbot)
    assert widget.status.text().startswith("Cannot use this model") and "bad.pt" in widget.status.text()
    assert widget.model_info.text() == widget.status.text()

    # a late result of an earlier choice does not overwrite the current one
    release.clear()
    _use_path(widget, tiny_checkpoint)
    _use_path(widget, bad)
    release.set()
    qtbot.waitUntil(lambda: widget.loader is None, timeout=TIMEOUT_MS)
    qtbot.wait(200)  # the first load's result, if it were shown, would have arrived by now
    assert widget.model_info.text().startswith("Cannot use this model")
    widget._cache.get = real_get


def test_threshold_update_on_a_large_map(make_napari_viewer):
    """Slider -> mask + scores on a 60 x 512 x 512 map (its speed is measured in bench/gui_speed.py)."""
    viewer = make_napari_viewer()
    rng = np.random.default_rng(0)
    shape = (60, 512, 512)
    prob = rng.random(shape, dtype=np.float32)
    ref = np.zeros(shape, np.uint8)
    ref[20:40, 200:300, 200:300] = 1
    meta = {"femur": {"role": "probability", "mask_layer": "m"}}
    viewer.add_image(prob, name="p", metadata=meta)
    mask_layer = viewer.add_labels(np.zeros(shape, np.uint8), name="m")
    ref_layer = viewer.add_labels(ref, name="ref")
    panel = ThresholdWidget(viewer)
    viewer.window.add_dock_widget(panel)
    panel.ref_combo.set_layer(ref_layer)
    assert panel.curves is not None
    for t in (0.3, 0.7):
        panel.set_threshold(t, cleanup=False)
        point = panel.current_point()
        assert point["threshold"] == pytest.approx(t)
        shown = np.asarray(mask_layer.data).astype(bool)
        np.testing.assert_array_equal(shown, prob >= point["threshold"])
        assert point["tp"] == int((shown & (ref > 0)).sum())


def test_threshold_cleanup_is_right_for_a_permuted_flipped_layer(make_napari_viewer):
    """Cleanup keeps one femur per hip side when the layer's left-right axis is its data axis 0.

    The layer's affine permutes and flips its axes (data axis 0 = left, 1 = anterior, 2 = inferior).
    Two femurs at the same inferior position lie on opposite sides along data axis 0: a cleanup
    that took data axis 2 as left-right saw them on one side and dropped the smaller one.
    """
    viewer = make_napari_viewer()
    viewer.dims.ndisplay = 3  # a 2D view of a permuting affine would be a singular 2D transform in vispy
    shape = (40, 20, 16)
    image = np.full(shape, 5.0, np.float32)
    image[2:38] = 100.0  # the body, centred left-right
    prob = np.zeros(shape, np.float32)
    prob[5:13, 6:14, 4:10] = 0.9  # first femur (larger)
    prob[28:34, 6:13, 4:10] = 0.8  # second femur, across the midline along data axis 0
    prob[19:21, 17:19, 14:16] = 0.95  # a small false positive
    world = np.eye(4)
    world[:3, :3] = [[0, -1.2, 0], [0, 0, 2.0], [0.9, 0, 0]]  # napari world = (posterior, inferior, left)
    world[:3, 3] = [3.0, -7.0, 11.0]
    viewer.add_image(image, name="scan", affine=world)
    prob_layer = viewer.add_image(prob, name="scan femur probability", affine=world,
                                  metadata={"femur": {"role": "probability", "image_layer": "scan"}})
    panel = ThresholdWidget(viewer)
    viewer.window.add_dock_widget(panel)
    panel.set_probability_layer(prob_layer)
    panel.set_threshold(0.5, cleanup=True)
    expected = (prob >= 0.5) & (prob < 0.95)  # both femurs, without the false positive
    np.testing.assert_array_equal(np.asarray(panel.mask_layer.data).astype(bool), expected)


# ----------------------------------------------------------------------------- one threshold per probability layer
def _segment(qtbot, widget):
    with qtbot.waitSignal(widget.segmented, timeout=TIMEOUT_MS) as blocker:
        assert widget.run() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=TIMEOUT_MS)
    return blocker.args[0]


def _labels(viewer):
    return [layer for layer in viewer.layers if isinstance(layer, napari.layers.Labels)]


@pytest.mark.parametrize("dock_first", [True, False], ids=["threshold-dock-before-segmenting",
                                                           "threshold-dock-after-segmenting"])
def test_one_threshold_per_probability_layer_whatever_the_order(
    make_napari_viewer, qtbot, tiny_scan_pair, tiny_checkpoint, dock_first
):
    """The slider of every panel moves the one mask layer of the probability layer; never a new one."""
    viewer = make_napari_viewer()
    image, ref = _open_pair(viewer, tiny_scan_pair)
    segment = SegmentFemurWidget(viewer)
    viewer.window.add_dock_widget(segment)
    _use_path(segment, tiny_checkpoint)
    segment.image_combo.set_layer(image)
    segment.flip_check.setChecked(False)
    segment.cleanup_check.setChecked(False)
    dock = None
    if dock_first:
        dock = ThresholdWidget(viewer)
        viewer.window.add_dock_widget(dock)
        assert dock.mask_layer is None and "run Segment Femur" in dock.stats_label.text()
    prob_layer, mask_layer = _segment(qtbot, segment)
    if dock is None:
        dock = ThresholdWidget(viewer)
        viewer.window.add_dock_widget(dock)
    embedded = segment.threshold_panel
    labels_before = _labels(viewer)
    assert labels_before == [ref, mask_layer]
    prob = np.asarray(prob_layer.data)
    t_seg = femur_meta(prob_layer.metadata)["threshold"]
    for panel in (dock, embedded):  # both show the result's threshold and its mask layer
        assert panel.mask_layer is mask_layer
        assert panel.threshold == pytest.approx(t_seg, abs=1e-3)
        assert panel.state is embedded.state

    lo, hi = float(np.quantile(prob, 0.3)), float(np.quantile(prob, 0.8))
    dock.set_threshold(hi)  # the dock's slider ...
    assert _labels(viewer) == labels_before, "no second mask layer"
    np.testing.assert_array_equal(np.asarray(mask_layer.data).astype(bool), prob >= np.float32(round(hi, 3)))
    assert embedded.threshold == pytest.approx(hi, abs=1e-3)  # ... moves the embedded slider too
    assert embedded.spin.value() == pytest.approx(hi, abs=1e-3)
    embedded.slider.setValue(int(round(lo * 1000)))  # and the other way round, through the Qt slider
    np.testing.assert_array_equal(np.asarray(mask_layer.data).astype(bool), prob >= np.float32(round(lo, 3)))
    assert dock.threshold == pytest.approx(lo, abs=1e-3)
    assert _labels(viewer) == labels_before
    # the clean-up flag is shared as well
    dock.cleanup_check.setChecked(True)
    assert embedded.cleanup_check.isChecked()
    # a second run into the same layers: both panels show the new result's threshold, still one mask
    _segment(qtbot, segment)
    assert _labels(viewer) == labels_before
    for panel in (dock, embedded):
        assert panel.threshold == pytest.approx(femur_meta(prob_layer.metadata)["threshold"], abs=1e-3)
        assert panel.mask_layer is mask_layer


def test_prediction_and_reference_colours_and_names(make_napari_viewer, qtbot, tiny_scan_pair, tiny_checkpoint):
    from napari_femur._style import PREDICTION_COLORS, REFERENCE_COLORS

    viewer = make_napari_viewer()
    image, ref = _open_pair(viewer, tiny_scan_pair)
    segment = SegmentFemurWidget(viewer)
    viewer.window.add_dock_widget(segment)
    _use_path(segment, tiny_checkpoint)
    segment.image_combo.set_layer(image)
    segment.flip_check.setChecked(False)
    prob_layer, mask_layer = _segment(qtbot, segment)
    assert "prediction" in mask_layer.name and "prediction" in prob_layer.name

    def rgb(layer, value):
        return tuple(np.round(np.asarray(layer.colormap.map(np.array([value])))[0][:3], 3))

    def hex_rgb(h):
        return tuple(round(int(h[i:i + 2], 16) / 255, 3) for i in (1, 3, 5))

    for value in (1, 2):  # femur / right femur, left femur (label maps)
        assert rgb(mask_layer, value) == hex_rgb(PREDICTION_COLORS[value])
        assert rgb(ref, value) == hex_rgb(REFERENCE_COLORS[value])
        assert rgb(mask_layer, value) != rgb(ref, value)
    # chosen as reference, the manual mask is drawn as an outline over the filled prediction
    panel = segment.threshold_panel
    assert panel.ref_combo.findData(mask_layer.name) < 0, "a prediction is not offered as its own reference"
    panel.ref_combo.set_layer(ref)
    assert ref.contour > 0 and mask_layer.contour == 0
    panel.ref_combo.set_layer(None)
    assert ref.contour == 0


def test_view_fits_the_scan_after_docking_and_after_a_result(
    make_napari_viewer, qtbot, tiny_scan_pair, tiny_checkpoint
):
    viewer = make_napari_viewer(show=True)
    image, _ = _open_pair(viewer, tiny_scan_pair)
    viewer.reset_view()
    qtbot.wait(50)

    def camera():
        return getattr(viewer, "scene", viewer).camera  # napari >= 0.9: viewer.scene.camera

    def fits() -> bool:
        """The whole scan is inside the canvas, and fills it along one axis (what Home gives)."""
        ext = np.asarray(image.extent.world)[:, list(viewer.dims.displayed)]
        size = (ext[1] - ext[0]) * camera().zoom  # canvas pixels the scan takes
        canvas = np.asarray(viewer.window._qt_viewer.canvas.size, dtype=float)  # (height, width)
        centre_ok = np.allclose(np.asarray(camera().center)[-2:], (ext[0] + ext[1]) / 2, atol=1.0)
        return bool(np.all(size <= canvas * 1.001) and np.any(size >= canvas * 0.9) and centre_ok)

    assert fits()
    segment = SegmentFemurWidget(viewer)
    viewer.window.add_dock_widget(segment, area="right")
    qtbot.waitUntil(fits, timeout=5000)  # the canvas narrowed by the dock shows the whole scan
    _use_path(segment, tiny_checkpoint)
    segment.image_combo.set_layer(image)
    segment.flip_check.setChecked(False)
    camera().zoom = camera().zoom * 3  # the user zoomed in
    assert not fits()
    _segment(qtbot, segment)
    assert fits(), "a new result is shown on the whole scan"


def test_a_deferred_plot_redraw_survives_the_deletion_of_its_widget(qtbot, capfd):
    """The cause of 'RuntimeError: wrapped C/C++ object of type _Canvas has been deleted' on stderr:
    a pending draw_idle of a panel that Qt deleted before (or while) it ran."""
    from qtpy.QtWidgets import QWidget

    from napari_femur._plots import PRCurveCanvas

    sip_delete = pytest.importorskip("qtpy.sip").delete
    for when in ("before", "during"):
        holder = QWidget()
        plot = PRCurveCanvas(None, parent=holder)
        canvas = plot.canvas
        if when == "during":  # the holder is deleted while the figure renders (a garbage collection there)
            real_draw = plot.figure.draw

            def draw_then_delete(renderer, _real=real_draw, _holder=holder):
                _real(renderer)
                sip_delete(_holder)

            plot.figure.draw = draw_then_delete
        canvas.draw_idle()
        if when == "before":
            sip_delete(holder)
        qtbot.wait(50)
        err = capfd.readouterr().err
        assert "has been deleted" not in err and "Traceback" not in err, err


@pytest.mark.parametrize("height", [120, 180, 280, 500])
def test_plot_axis_titles_stay_inside_the_figure(qtbot, height):
    """'recall' (PR plot) and 'epoch' (training plot) were cut off at the bottom of a squeezed plot;
    before training the epoch axis ran 0-1.25."""
    from femur_core.metrics import curves_from_histogram
    from napari_femur._plots import PRCurveCanvas, TrainingCurvesCanvas

    rng = np.random.default_rng(0)
    prob = rng.random((4, 20, 20)).astype(np.float32)
    for cls in (PRCurveCanvas, TrainingCurvesCanvas):
        plot = cls(None)
        qtbot.addWidget(plot)
        plot.canvas.setMinimumHeight(0)
        plot.resize(360, height)
        plot.show()
        qtbot.wait(20)
        if cls is PRCurveCanvas:
            plot.set_curves(curves_from_histogram(prob, prob > 0.6, bins=1001), 500)
            plot.set_current(300)
        else:
            plot.planned_epochs = 15
            plot.redraw()
            assert plot.ax_loss.get_xlim() == (0, 15)
            ticks = [t for t in plot.ax_loss.get_xticks() if 0 <= t <= 15]
            assert all(float(t).is_integer() for t in ticks)
        plot.canvas.draw()
        renderer = plot.figure.canvas.get_renderer()
        fig_box = plot.figure.bbox
        for ax in plot.figure.axes:
            for label in (ax.xaxis.label, ax.yaxis.label):
                if label.get_text():
                    box = label.get_window_extent(renderer)
                    assert box.y0 >= fig_box.y0 - 0.5 and box.x0 >= fig_box.x0 - 0.5, label.get_text()
                    assert box.x1 <= fig_box.x1 + 0.5 and box.y1 <= fig_box.y1 + 0.5, label.get_text()


def test_training_plot_joins_the_validated_epochs_only(qtbot):
    """With ``validate_every`` most epochs carry no validation DSC (NaN): the validation line joins the
    validated epochs instead of showing isolated points, and the best one is starred."""
    from napari_femur._plots import TrainingCurvesCanvas

    plot = TrainingCurvesCanvas(None)
    qtbot.addWidget(plot)
    nan = float("nan")
    for epoch, val in enumerate([nan, nan, 0.6, nan, 0.7, nan], start=1):
        plot.add_epoch(epoch, 1.0 / epoch, val)
    plot.redraw()
    lines = {ln.get_label(): ln for ln in plot.ax_dsc.get_lines()}
    line = lines["validation DSC"]
    assert list(line.get_xdata()) == [3, 5] and list(line.get_ydata()) == [0.6, 0.7]
    stars = [ln for ln in plot.ax_dsc.get_lines() if ln.get_marker() == "*"]
    assert stars and list(stars[0].get_xdata()) == [5]
