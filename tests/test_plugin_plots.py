"""The live training plot: rendered off the GUI thread, redraw requests coalesced into the newest."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from conftest import gui_import  # importorskip, but a failure under CI=true
gui_import("pytestqt")
gui_import("matplotlib")

from napari_femur._workers import (  # noqa: E402
    LatestOnly,
    hold_long_lived_objects,
    release_long_lived_objects,
)

WAIT_MS = 30_000


def test_latest_only_hands_over_the_newest_item_and_drops_the_rest():
    box = LatestOnly()
    assert not box.pending
    with pytest.raises(TimeoutError):
        box.take(timeout=0)
    for item in ("a", "b", "c"):
        assert box.put(item)
    assert box.pending and box.dropped == 2
    assert box.take() == "c"
    assert not box.pending
    box.put("d")
    assert box.take(timeout=0) == "d" and box.dropped == 2  # taken in time: nothing dropped
    box.put("e")
    box.close()
    assert box.closed and not box.put("f")
    with pytest.raises(EOFError):  # closing wakes the consumer; what waited is dropped
        box.take()


def test_latest_only_wakes_a_waiting_consumer():
    box = LatestOnly()
    got: list = []
    consumer = threading.Thread(target=lambda: got.append(box.take(timeout=30)))
    consumer.start()
    box.put(42)
    consumer.join(timeout=30)
    assert got == [42]


def test_holding_long_lived_objects_freezes_them_until_the_last_release():
    import gc

    assert gc.get_freeze_count() == 0
    kept = [[] for _ in range(10)]  # objects made before the hold
    hold_long_lived_objects()
    frozen = gc.get_freeze_count()
    assert frozen >= len(kept)
    hold_long_lived_objects()  # nested (two panels training)
    release_long_lived_objects()
    assert gc.get_freeze_count() == frozen, "still held once"
    release_long_lived_objects()
    assert gc.get_freeze_count() == 0
    release_long_lived_objects()  # one release too many does nothing
    assert gc.get_freeze_count() == 0

    gc.freeze()  # the application froze objects itself: left as they are
    try:
        before = gc.get_freeze_count()
        hold_long_lived_objects()
        release_long_lived_objects()
        assert gc.get_freeze_count() == before
    finally:
        gc.unfreeze()


def _colour_pixels(image, rgb, tol=12) -> int:
    """How many pixels of a QImage have the colour ``rgb`` (within ``tol``)."""
    from qtpy.QtGui import QImage

    img = image.convertToFormat(QImage.Format_RGBA8888)
    arr = np.frombuffer(img.constBits().asstring(img.sizeInBytes()), np.uint8)
    arr = arr.reshape(img.height(), img.bytesPerLine())[:, : 4 * img.width()].reshape(img.height(), img.width(), 4)
    return int((np.abs(arr[..., :3].astype(int) - np.asarray(rgb)).max(axis=-1) <= tol).sum())


@pytest.mark.gui
def test_live_plot_renders_the_newest_curves_in_a_background_thread(qtbot, monkeypatch):
    """Redraws made while a picture is being rendered collapse into one, of the newest data; the GUI
    thread neither builds nor renders the figure."""
    import napari_femur._plots as plots

    gate, entered = threading.Event(), threading.Event()
    calls: list[tuple[str, tuple]] = []
    real_plot = plots._plot_curves

    def plot_curves(a, b, data, colors):
        calls.append((threading.current_thread().name, data.epochs))
        entered.set()
        assert gate.wait(timeout=60), "the test never opened the gate"
        real_plot(a, b, data, colors)

    plot = plots.TrainingCurvesCanvas(None)  # built while not live: drawn in the GUI thread
    qtbot.addWidget(plot)
    plot.resize(420, 280)
    plot.show()
    qtbot.waitExposed(plot)
    monkeypatch.setattr(plots, "_plot_curves", plot_curves)

    plot.live = True  # a first picture (no epochs yet) starts rendering and waits at the gate
    assert entered.wait(timeout=30)
    for epoch in range(1, 6):  # five redraws while that one renders
        for step in (1, 2):
            plot.add_step(epoch, step, 2, 1.0 / (epoch + step))
        plot.add_epoch(epoch, 1.0 / epoch, 0.5 + epoch / 20)
        plot.redraw()
    assert plot.rendering
    gate.set()
    qtbot.waitUntil(lambda: not plot.rendering, timeout=WAIT_MS)

    assert [epochs for _, epochs in calls] == [(), (1, 2, 3, 4, 5)], "the four redraws in between were dropped"
    assert all(name == "femur-curves-render" for name, _ in calls), "built in the render thread only"
    assert plot.renders == 2 and plot.shown.epochs == (1, 2, 3, 4, 5)
    assert plot._requests.dropped >= 4  # (and any redraw Qt asked for meanwhile, e.g. on showing)
    image = plot.canvas.live_image
    ratio = plot.canvas.device_pixel_ratio
    assert (image.width(), image.height()) == (round(plot.canvas.width() * ratio),
                                               round(plot.canvas.height() * ratio))
    assert _colour_pixels(image, (0x4F, 0xC3, 0xF7)) > 50, "the loss curve is in the picture"
    assert _colour_pixels(image, (0xFF, 0xB7, 0x4D)) > 50, "the validation DSC curve is in the picture"
    assert plot.ax_loss.get_lines() == [], "the GUI thread's figure was not rebuilt"

    # what is painted on screen is that picture
    shot = plot.canvas.grab().toImage()
    assert _colour_pixels(shot, (0xFF, 0xB7, 0x4D)) > 50

    # not live any more: drawn in the GUI thread again, the picture is dropped
    plot.live = False
    assert plot.canvas.live_image is None
    assert [tuple(line.get_xdata()) for line in plot.ax_dsc.get_lines()][0] == (1, 2, 3, 4, 5)
    assert calls[-1][0] == threading.current_thread().name


@pytest.mark.gui
def test_a_resized_live_plot_gets_a_picture_of_its_new_size(qtbot):
    from napari_femur._plots import TrainingCurvesCanvas

    plot = TrainingCurvesCanvas(None)
    qtbot.addWidget(plot)
    plot.resize(400, 260)
    plot.show()
    qtbot.waitExposed(plot)
    plot.live = True
    plot.add_epoch(1, 0.5, 0.7)
    plot.redraw()
    qtbot.waitUntil(lambda: not plot.rendering and plot.canvas.live_image is not None, timeout=WAIT_MS)
    plot.resize(520, 360)
    ratio = plot.canvas.device_pixel_ratio

    def new_size() -> bool:
        img = plot.canvas.live_image
        return not plot.rendering and (img.width(), img.height()) == (
            round(plot.canvas.width() * ratio), round(plot.canvas.height() * ratio))

    qtbot.waitUntil(new_size, timeout=WAIT_MS)
    assert plot.shown.epochs == (1,)


@pytest.mark.gui
def test_a_live_plot_deleted_while_it_renders_stays_quiet(qtbot, capfd, monkeypatch):
    """The picture of a plot whose widget Qt deleted meanwhile is dropped without a traceback, and its
    render thread ends once the widget is gone."""
    import gc

    import napari_femur._plots as plots
    from qtpy.QtWidgets import QWidget

    sip_delete = pytest.importorskip("qtpy.sip").delete
    gate, entered, rendered = threading.Event(), threading.Event(), threading.Event()
    real_plot = plots._plot_curves

    def plot_curves(*args):
        entered.set()
        assert gate.wait(timeout=60)
        real_plot(*args)
        rendered.set()

    holder = QWidget()
    plot = plots.TrainingCurvesCanvas(None, parent=holder)
    monkeypatch.setattr(plots, "_plot_curves", plot_curves)
    plot.live = True
    assert entered.wait(timeout=30)
    thread = plot._render_thread
    sip_delete(holder)
    gate.set()
    assert rendered.wait(timeout=30)
    qtbot.wait(100)  # the finished picture reaches the GUI thread: dropped, the widget is gone
    assert plot.renders == 0
    del plot, holder
    gc.collect()
    thread.join(timeout=30)
    assert not thread.is_alive()
    err = capfd.readouterr().err
    assert "has been deleted" not in err and "Traceback" not in err, err


def test_reset_view_when_shown_survives_garbage_collection(qtbot):
    """The view-reset event filter is kept by its widget: after a full garbage collection the first
    Show still resets the view once (a collected wrapper once reached Qt as a stateless one)."""
    import gc

    from qtpy.QtWidgets import QWidget

    from napari_femur._qt_utils import reset_view_when_shown

    class FakeViewer:
        layers = [object()]
        resets = 0

        def reset_view(self):
            FakeViewer.resets += 1

    widget = QWidget()
    qtbot.addWidget(widget)
    reset_view_when_shown(widget, FakeViewer())
    gc.collect()
    widget.show()
    qtbot.waitUntil(lambda: FakeViewer.resets >= 1, timeout=2000)
    widget.hide()
    widget.show()
    qtbot.wait(700)
    assert FakeViewer.resets == 2  # one Show handled: the reset at once and the one 500 ms later
