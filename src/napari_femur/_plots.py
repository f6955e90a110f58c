"""Matplotlib canvases that look like napari: precision-recall and training curves.

The figures take their colours from napari's current theme (canvas background,
text, foreground, highlight), follow theme changes, and never use pyplot's
global state (each canvas owns its :class:`~matplotlib.figure.Figure`).

The training curves can be *live* (:attr:`TrainingCurvesCanvas.live`, what the
Train panel uses): a redraw then renders a snapshot of the curves in a
background thread, on a figure of its own, and the GUI thread only shows the
finished picture. Rendering the figure (mostly its text) costs 100-150 ms,
which in the GUI thread stalled napari once per redraw while training; redraw
requests made while one is being rendered collapse into the newest
(:class:`~napari_femur._workers.LatestOnly`).
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from qtpy.QtCore import QObject, QRectF, Signal
from qtpy.QtGui import QImage, QPainter
from qtpy.QtWidgets import QSizePolicy, QVBoxLayout, QWidget

from ._workers import LatestOnly

if TYPE_CHECKING:  # pragma: no cover
    import napari
    from femur_core.metrics import Curves

__all__ = ["theme_colors", "ThemedCanvas", "PRCurveCanvas", "TrainingCurvesCanvas", "CurvesData"]

_DARK = {
    "background": "#262930",
    "canvas": "#262930",
    "foreground": "#414851",
    "text": "#f0f1f2",
    "highlight": "#6a6f76",
    "primary": "#5a626c",
    "secondary": "#868e93",
    "current": "#007acc",
    "warning": "#e3b617",
    "error": "#cc4a35",
}


def _qt_alive(obj: Any) -> bool:
    """Whether the C++ side of a Qt object still exists (any call raises RuntimeError once it is gone)."""
    try:
        obj.objectName()
        return True
    except RuntimeError:
        return False


class _Canvas(FigureCanvasQTAgg):
    """A Qt Agg canvas whose deferred redraw tolerates the widget being deleted meanwhile.

    ``draw_idle()`` schedules the drawing for a later turn of the event loop.
    When the dock holding the canvas is deleted in between (the viewer closed,
    or an undocked panel garbage-collected, which Python may do in the middle
    of rendering the figure), matplotlib's deferred draw would call
    ``update()`` on a deleted widget and print ``RuntimeError: wrapped C/C++
    object of type _Canvas has been deleted``. There is nothing to draw then.
    """

    #: a picture rendered elsewhere (off the GUI thread) that is shown instead of the figure
    live_image: "QImage | None" = None
    #: the owner's hook: renders the figure elsewhere and returns True (then draw() does nothing here)
    live_draw: Any = None

    def _draw_idle(self) -> None:  # matplotlib's QTimer callback behind draw_idle()
        if not _qt_alive(self):  # deleted before the timer fired
            return
        super()._draw_idle()

    def paintEvent(self, event: Any) -> None:  # noqa: N802 - Qt API
        image = self.live_image
        if image is None:
            super().paintEvent(event)
            return
        painter = QPainter(self)
        try:  # scaled when the widget was resized since: a picture of the new size is on its way
            painter.drawImage(QRectF(self.rect()), image)
        finally:
            painter.end()

    def draw(self) -> None:
        live = self.live_draw
        if live is not None and live():
            return
        fit = getattr(self, "fit_margins", None)
        if fit is not None:  # the widget size may have changed since the last draw
            fit()
        try:
            super().draw()
        except RuntimeError:
            if _qt_alive(self):
                raise
            # deleted during rendering: nothing to show


def theme_colors(viewer: "napari.Viewer | None") -> dict[str, str]:
    """Hex colours of the viewer's current napari theme (dark defaults without a viewer)."""
    colors = dict(_DARK)
    if viewer is None:
        return colors
    try:
        from napari.utils.theme import get_theme

        theme = get_theme(viewer.theme)
        for key in colors:
            value = getattr(theme, key, None)
            if value is not None:
                colors[key] = value.as_hex() if hasattr(value, "as_hex") else str(value)
    except Exception:  # unknown theme id, older napari: keep the defaults
        pass
    return colors


def _style_axes(ax: Any, c: dict[str, str]) -> None:
    """Apply the theme colours ``c`` to one axes."""
    ax.set_facecolor(c["canvas"])
    for side in ax.spines.values():
        side.set_color(c["secondary"])
    ax.tick_params(colors=c["text"], labelsize=8)
    ax.xaxis.label.set_color(c["text"])
    ax.yaxis.label.set_color(c["text"])
    ax.title.set_color(c["text"])
    ax.grid(True, color=c["foreground"], linewidth=0.6, alpha=0.8)


def _style_legend(legend: Any, c: dict[str, str]) -> None:
    if legend is None:
        return
    legend.get_frame().set_facecolor(c["background"])
    legend.get_frame().set_edgecolor(c["foreground"])
    for text in legend.get_texts():
        text.set_color(c["text"])


def _fit_margins(figure: Figure, margins_px: Sequence[float]) -> None:
    """Place the axes so that tick labels and axis titles always lie inside the figure."""
    w, h = figure.bbox.width, figure.bbox.height
    if w <= 0 or h <= 0:
        return
    left, bottom, right, top = margins_px
    lo_x, hi_x = min(left / w, 0.45), max(1 - right / w, 0.55)
    lo_y, hi_y = min(bottom / h, 0.45), max(1 - top / h, 0.55)
    figure.subplots_adjust(left=lo_x, right=hi_x, bottom=lo_y, top=hi_y)


class ThemedCanvas(QWidget):
    """A matplotlib canvas in a QWidget, coloured like the napari theme.

    Parameters
    ----------
    viewer : napari.Viewer, optional
        Source of the theme; the canvas re-colours on ``viewer.events.theme``.
    height : int
        Minimum height in pixels.
    """

    def __init__(self, viewer: "napari.Viewer | None" = None, height: int = 220, parent: QWidget | None = None):
        super().__init__(parent)
        self._viewer = viewer
        # margins fixed in pixels (see _fit_margins), not a layout engine: a squeezed canvas must
        # still show its axis labels (constrained layout gave up below some height and cut them)
        self.figure = Figure(figsize=(4, 3), dpi=90)
        self.canvas = _Canvas(self.figure)
        self.canvas.fit_margins = self._fit_margins
        self.canvas.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Expanding)
        self.canvas.setMinimumHeight(height)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.canvas)
        self.colors = theme_colors(viewer)
        if viewer is not None:
            viewer.events.theme.connect(self._on_theme)
            self.destroyed.connect(self._disconnect_theme)

    def _disconnect_theme(self, *_: Any) -> None:
        try:
            self._viewer.events.theme.disconnect(self._on_theme)
        except Exception:  # pragma: no cover
            pass

    def _on_theme(self, *_: Any) -> None:
        try:
            self.colors = theme_colors(self._viewer)
            self.redraw()
        except RuntimeError:  # canvas deleted
            self._disconnect_theme()

    def style_axes(self, ax: Any) -> None:
        """Apply the theme colours to one axes."""
        _style_axes(ax, self.colors)

    def style_legend(self, legend: Any) -> None:
        _style_legend(legend, self.colors)

    #: space (pixels) for tick labels and axis titles: left, bottom, right, top
    margins_px = (50, 38, 12, 10)

    def _fit_margins(self) -> None:
        """Place the axes so that tick labels and axis titles always lie inside the figure."""
        _fit_margins(self.figure, self.margins_px)

    def redraw(self) -> None:  # pragma: no cover - overridden
        self.figure.set_facecolor(self.colors["background"])
        self.canvas.draw_idle()


class PRCurveCanvas(ThemedCanvas):
    """Precision-recall curve with the current and the PRC-optimal operating points."""

    def __init__(self, viewer: "napari.Viewer | None" = None, parent: QWidget | None = None):
        super().__init__(viewer, height=280, parent=parent)
        self.curves: "Curves | None" = None
        self.current_index: int | None = None
        self.optimal_index: int | None = None
        self.message = "choose a reference mask to see the precision-recall curve"
        self.ax = self.figure.add_subplot(111)
        self._current_artist = None
        self._current_text = None
        self.redraw()

    def set_curves(self, curves: "Curves | None", optimal_index: int | None = None, message: str = "") -> None:
        """Show new curves (None clears the plot and shows ``message``)."""
        self.curves = curves
        self.optimal_index = optimal_index
        if message:
            self.message = message
        self.redraw()

    def set_current(self, index: int | None) -> None:
        """Move the current operating point (cheap: updates one marker)."""
        self.current_index = index
        if self.curves is None or self._current_artist is None or index is None:
            return
        r, p = float(self.curves.recall[index]), float(self.curves.precision[index])
        self._current_artist.set_data([r], [p])
        self._current_text.set_text(self._point_label(index))
        self.canvas.draw_idle()

    def _point_label(self, index: int) -> str:
        c = self.curves
        tp, fp, fn = int(c.tp[index]), int(c.fp[index]), int(c.fn[index])
        dsc = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else float("nan")
        t = float(c.thresholds[index])
        return f"t = {t:.3f}   DSC {dsc:.3f}\nP {float(c.precision[index]):.3f}   R {float(c.recall[index]):.3f}"

    def redraw(self) -> None:
        c = self.colors
        self.figure.set_facecolor(c["background"])
        ax = self.ax
        ax.clear()
        self.style_axes(ax)
        ax.set_xlabel("recall", fontsize=9)
        ax.set_ylabel("precision", fontsize=9)
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        self._current_artist = self._current_text = None
        if self.curves is None:
            ax.text(0.5, 0.5, self.message, ha="center", va="center", wrap=True,
                    color=c["text"], fontsize=8, transform=ax.transAxes)
            self.canvas.draw_idle()
            return
        cv = self.curves
        rec = np.asarray(cv.recall[1:], dtype=float)
        prec = np.asarray(cv.precision[1:], dtype=float)
        ok = np.isfinite(rec) & np.isfinite(prec)
        ap = cv.average_precision()
        label = f"PR curve (AP {ap:.3f})" if math.isfinite(ap) else "PR curve"
        ax.plot(rec[ok], prec[ok], color="#4fc3f7", linewidth=1.8, label=label)
        if self.optimal_index is not None:
            i = self.optimal_index
            ax.plot([cv.recall[i]], [cv.precision[i]], marker="*", markersize=13, linestyle="none",
                    color="#ffd54f", markeredgecolor=c["background"],
                    label=f"PRC-optimal t = {float(cv.thresholds[i]):.3f}")
        (self._current_artist,) = ax.plot([np.nan], [np.nan], marker="o", markersize=8, linestyle="none",
                                          color="#ff7043", markeredgecolor=c["text"], label="current threshold")
        self._current_text = ax.text(0.03, 0.05, "", transform=ax.transAxes, color=c["text"], fontsize=8,
                                     va="bottom", ha="left", family="monospace",
                                     bbox={"facecolor": c["background"], "edgecolor": c["foreground"],
                                           "alpha": 0.85, "boxstyle": "round,pad=0.3"})
        self.style_legend(ax.legend(loc="lower right", fontsize=7, framealpha=0.85))
        if self.current_index is not None:
            self.set_current(self.current_index)
        else:
            self.canvas.draw_idle()


@dataclass(frozen=True)
class CurvesData:
    """A snapshot of the training curves (what one picture of :class:`TrainingCurvesCanvas` shows)."""

    step_x: tuple[float, ...] = ()
    step_loss: tuple[float, ...] = ()
    epochs: tuple[int, ...] = ()
    epoch_loss: tuple[float, ...] = ()
    val_dsc: tuple[float, ...] = ()
    planned_epochs: int = 10


def _plot_curves(a: Any, b: Any, d: CurvesData, c: dict[str, str]) -> None:
    """Draw the curves ``d`` on the loss axes ``a`` and its twin ``b`` (colours ``c``); no rendering.

    Touches nothing but its arguments, so it may run in any thread on a figure
    that thread owns.
    """
    a.clear()
    b.clear()
    _style_axes(a, c)
    _style_axes(b, c)
    b.set_facecolor("none")  # the twin axes must not hide the loss axes
    b.grid(False)
    a.set_xlabel("epoch", fontsize=9)
    a.set_ylabel("training loss", fontsize=9, color="#4fc3f7")
    b.set_ylabel("validation DSC", fontsize=9, color="#ffb74d")
    b.set_ylim(0, 1)
    b.yaxis.set_label_position("right")
    handles = []
    if d.step_x:
        (h,) = a.plot(d.step_x, d.step_loss, color="#4fc3f7", linewidth=0.8, alpha=0.45,
                      label="loss (running, per step)")
        handles.append(h)
    if d.epochs:
        (h,) = a.plot(d.epochs, d.epoch_loss, color="#4fc3f7", marker="o", markersize=4,
                      linewidth=1.6, label="loss (epoch mean)")
        handles.append(h)
        validated = [(e, v) for e, v in zip(d.epochs, d.val_dsc) if np.isfinite(v)]  # validate_every
        (h,) = b.plot([e for e, _ in validated], [v for _, v in validated], color="#ffb74d", marker="s",
                      markersize=4, linewidth=1.6, label="validation DSC")
        handles.append(h)
        best = int(np.nanargmax(d.val_dsc)) if np.isfinite(d.val_dsc).any() else None
        if best is not None:
            b.plot([d.epochs[best]], [d.val_dsc[best]], marker="*", markersize=12,
                   linestyle="none", color="#ffd54f", markeredgecolor=c["background"])
    if d.epochs or d.step_x:
        right = max(d.epochs[-1] if d.epochs else 0, d.step_x[-1] if d.step_x else 0, 1)
        a.set_xlim(0, right + 0.25)
    else:  # before training: the epochs the run may take, whole numbers
        a.set_xlim(0, max(int(d.planned_epochs), 1))
        a.set_ylim(0, 1)
    a.xaxis.set_major_locator(MaxNLocator(integer=True))
    if not handles:
        a.text(0.5, 0.5, "loss and validation DSC appear here while training", ha="center",
               va="center", color=c["text"], fontsize=8, transform=a.transAxes)
    else:
        _style_legend(a.legend(handles=handles, loc="upper right", fontsize=7, framealpha=0.85), c)


@dataclass(frozen=True)
class _RenderRequest:
    serial: int
    data: CurvesData
    colors: dict
    size_inches: tuple[float, float]
    dpi: float
    margins_px: tuple


class _Relay(QObject):
    """Carries finished pictures from render threads to the GUI thread (a queued signal).

    One for the process, made in the GUI thread and never deleted: a render
    thread emits on it, never on a widget (a deleted widget's signal crashes
    PyQt), and the picture goes to its canvas only while that still exists.
    """

    rendered = Signal(object)  # (weak reference to the canvas, request, RGBA array or exception)

    def __init__(self) -> None:
        super().__init__()
        self.rendered.connect(self._deliver)

    def _deliver(self, payload: tuple) -> None:
        ref, req, result = payload
        canvas = ref()
        if canvas is not None:
            canvas._show_rendered(req, result)


_RELAY: list[_Relay] = []


def _gui_relay() -> _Relay:
    if not _RELAY:
        _RELAY.append(_Relay())
    return _RELAY[0]


def _render_loop(requests: LatestOnly, owner: "weakref.ref", relay: _Relay, idle_s: float = 2.0) -> None:
    """The render thread: draw each (newest) request on a figure of its own, hand the RGBA pixels over.

    Ends when ``requests`` is closed, or, once idle, when the owning canvas is gone.
    """
    figure = a = b = None
    while True:
        try:
            req = requests.take(timeout=idle_s)
        except TimeoutError:
            if owner() is None:
                return
            continue
        except EOFError:
            return
        try:
            if figure is None:
                figure = Figure(figsize=req.size_inches, dpi=req.dpi)
                FigureCanvasAgg(figure)
                a = figure.add_subplot(111)
                b = a.twinx()
            else:
                figure.set_dpi(req.dpi)
                figure.set_size_inches(*req.size_inches)
            figure.set_facecolor(req.colors["background"])
            _plot_curves(a, b, req.data, req.colors)
            _fit_margins(figure, req.margins_px)
            figure.canvas.draw()
            result: Any = np.asarray(figure.canvas.buffer_rgba()).copy()
        except Exception as exc:  # shown as "not drawn"; the next request tries again
            result = exc
        relay.rendered.emit((owner, req, result))


class TrainingCurvesCanvas(ThemedCanvas):
    """Training loss (per step and per epoch) and validation DSC per epoch.

    Attributes
    ----------
    planned_epochs : int
        Width of the epoch axis before training (the run's maximum epochs).
    renders : int
        Pictures rendered off the GUI thread and shown (live mode).
    shown : CurvesData or None
        The data of the picture shown last in live mode.
    """

    margins_px = (50, 38, 50, 10)  # the validation-DSC axis on the right

    def __init__(self, viewer: "napari.Viewer | None" = None, parent: QWidget | None = None):
        super().__init__(viewer, height=250, parent=parent)
        self.planned_epochs = 10
        self.ax_loss = self.figure.add_subplot(111)
        self.ax_dsc = self.ax_loss.twinx()
        self.step_x: list[float] = []
        self.step_loss: list[float] = []
        self.epochs: list[int] = []
        self.epoch_loss: list[float] = []
        self.val_dsc: list[float] = []
        self._live = False
        self._requests: LatestOnly | None = None
        self._render_thread: threading.Thread | None = None
        self._requested = 0  # serial of the newest render request
        self._shown_serial = 0
        self.renders = 0
        self.shown: CurvesData | None = None
        self.render_error: Exception | None = None
        self.canvas.live_draw = self._live_canvas_draw
        self.redraw()

    # ------------------------------------------------------------------ data
    def reset(self, history: Sequence[dict] = ()) -> None:
        """Clear, then show an earlier history (e.g. of a resumed run)."""
        self.step_x, self.step_loss = [], []
        self.epochs = [int(h["epoch"]) for h in history]
        self.epoch_loss = [float(h.get("loss", float("nan"))) for h in history]
        self.val_dsc = [float(h.get("val_dsc", float("nan"))) for h in history]
        self.redraw()

    def add_step(self, epoch: int, step: int, total: int, loss: float | None) -> None:
        """A running training loss inside an epoch (x = fractional epoch)."""
        if loss is None or total <= 0:
            return
        self.step_x.append(epoch - 1 + step / total)
        self.step_loss.append(float(loss))

    def add_epoch(self, epoch: int, loss: float | None, val_dsc: float | None) -> None:
        """An epoch's mean loss and validation DSC."""
        if self.epochs and epoch <= self.epochs[-1]:
            keep = [i for i, e in enumerate(self.epochs) if e < epoch]
            self.epochs = [self.epochs[i] for i in keep]
            self.epoch_loss = [self.epoch_loss[i] for i in keep]
            self.val_dsc = [self.val_dsc[i] for i in keep]
        self.epochs.append(int(epoch))
        self.epoch_loss.append(float("nan") if loss is None else float(loss))
        self.val_dsc.append(float("nan") if val_dsc is None else float(val_dsc))

    def data(self) -> CurvesData:
        """A snapshot of the curves."""
        return CurvesData(tuple(self.step_x), tuple(self.step_loss), tuple(self.epochs), tuple(self.epoch_loss),
                          tuple(self.val_dsc), int(self.planned_epochs))

    # ------------------------------------------------------------------ drawing
    @property
    def live(self) -> bool:
        """Render off the GUI thread (True), or in it like the other plots (False, the default).

        Live, :meth:`redraw` returns at once; the picture follows when the render
        thread has drawn it (only the newest of the requests made meanwhile), and
        ``ax_loss`` / ``ax_dsc`` of :attr:`figure` are no longer updated.
        """
        return self._live

    @live.setter
    def live(self, value: bool) -> None:
        value = bool(value)
        if value == self._live:
            return
        self._live = value
        if not value:
            self.canvas.live_image = None
        self.redraw()

    @property
    def rendering(self) -> bool:
        """Whether a live picture is still being rendered (the newest request not shown yet)."""
        return self._shown_serial < self._requested

    def redraw(self) -> None:
        if self._live:
            self._request_render()
            return
        self.figure.set_facecolor(self.colors["background"])
        _plot_curves(self.ax_loss, self.ax_dsc, self.data(), self.colors)
        self.canvas.draw_idle()

    def _live_canvas_draw(self) -> bool:
        """The canvas wants a new picture (e.g. it was resized): render it off the GUI thread when live."""
        if not self._live:
            return False
        self._request_render()
        return True

    def _request_render(self) -> None:
        if self._requests is None:
            self._requests = LatestOnly()
            # the thread holds no reference to this widget (a weak one) and never touches it
            self._render_thread = threading.Thread(
                target=_render_loop, args=(self._requests, weakref.ref(self), _gui_relay()),
                name="femur-curves-render", daemon=True)
            self._render_thread.start()
        self._requested += 1
        self._requests.put(_RenderRequest(
            self._requested, self.data(), dict(self.colors), tuple(float(v) for v in self.figure.get_size_inches()),
            float(self.figure.dpi), tuple(self.margins_px)))

    def _show_rendered(self, req: _RenderRequest, result: Any) -> None:
        """GUI thread: show a picture the render thread made."""
        if not _qt_alive(self) or not _qt_alive(self.canvas):
            return
        self._shown_serial = max(self._shown_serial, req.serial)
        if isinstance(result, Exception):
            self.render_error = result  # kept for a look in a debugger; the next redraw tries again
            return
        if not self._live:
            return
        h, w = result.shape[:2]
        image = QImage(result.tobytes(), w, h, 4 * w, QImage.Format_RGBA8888).copy()
        image.setDevicePixelRatio(self.canvas.device_pixel_ratio)
        self.canvas.live_image = image
        self.renders += 1
        self.shown = req.data
        self.canvas.update()
