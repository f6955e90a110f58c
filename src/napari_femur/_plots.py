"""Matplotlib canvases that look like napari: precision-recall and training curves.

The figures take their colours from napari's current theme (canvas background,
text, foreground, highlight), follow theme changes, and never use pyplot's
global state (each canvas owns its :class:`~matplotlib.figure.Figure`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from qtpy.QtWidgets import QSizePolicy, QVBoxLayout, QWidget

if TYPE_CHECKING:  # pragma: no cover
    import napari
    from femur_core.metrics import Curves

__all__ = ["theme_colors", "ThemedCanvas", "PRCurveCanvas", "TrainingCurvesCanvas"]

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

    def _draw_idle(self) -> None:  # matplotlib's QTimer callback behind draw_idle()
        if not _qt_alive(self):  # deleted before the timer fired
            return
        super()._draw_idle()

    def draw(self) -> None:
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
        c = self.colors
        ax.set_facecolor(c["canvas"])
        for side in ax.spines.values():
            side.set_color(c["secondary"])
        ax.tick_params(colors=c["text"], labelsize=8)
        ax.xaxis.label.set_color(c["text"])
        ax.yaxis.label.set_color(c["text"])
        ax.title.set_color(c["text"])
        ax.grid(True, color=c["foreground"], linewidth=0.6, alpha=0.8)

    def style_legend(self, legend: Any) -> None:
        if legend is None:
            return
        c = self.colors
        legend.get_frame().set_facecolor(c["background"])
        legend.get_frame().set_edgecolor(c["foreground"])
        for text in legend.get_texts():
            text.set_color(c["text"])

    #: space (pixels) for tick labels and axis titles: left, bottom, right, top
    margins_px = (50, 38, 12, 10)

    def _fit_margins(self) -> None:
        """Place the axes so that tick labels and axis titles always lie inside the figure."""
        w, h = self.figure.bbox.width, self.figure.bbox.height
        if w <= 0 or h <= 0:
            return
        left, bottom, right, top = self.margins_px
        lo_x, hi_x = min(left / w, 0.45), max(1 - right / w, 0.55)
        lo_y, hi_y = min(bottom / h, 0.45), max(1 - top / h, 0.55)
        self.figure.subplots_adjust(left=lo_x, right=hi_x, bottom=lo_y, top=hi_y)

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


class TrainingCurvesCanvas(ThemedCanvas):
    """Training loss (per step and per epoch) and validation DSC per epoch.

    Attributes
    ----------
    planned_epochs : int
        Width of the epoch axis before training (the run's maximum epochs).
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
        self.redraw()

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

    def redraw(self) -> None:
        c = self.colors
        self.figure.set_facecolor(c["background"])
        a, b = self.ax_loss, self.ax_dsc
        a.clear()
        b.clear()
        self.style_axes(a)
        self.style_axes(b)
        b.set_facecolor("none")  # the twin axes must not hide the loss axes
        b.grid(False)
        a.set_xlabel("epoch", fontsize=9)
        a.set_ylabel("training loss", fontsize=9, color="#4fc3f7")
        b.set_ylabel("validation DSC", fontsize=9, color="#ffb74d")
        b.set_ylim(0, 1)
        b.yaxis.set_label_position("right")
        handles = []
        if self.step_x:
            (h,) = a.plot(self.step_x, self.step_loss, color="#4fc3f7", linewidth=0.8, alpha=0.45,
                          label="loss (running, per step)")
            handles.append(h)
        if self.epochs:
            (h,) = a.plot(self.epochs, self.epoch_loss, color="#4fc3f7", marker="o", markersize=4,
                          linewidth=1.6, label="loss (epoch mean)")
            handles.append(h)
            validated = [(e, v) for e, v in zip(self.epochs, self.val_dsc) if np.isfinite(v)]  # validate_every
            (h,) = b.plot([e for e, _ in validated], [v for _, v in validated], color="#ffb74d", marker="s",
                          markersize=4, linewidth=1.6, label="validation DSC")
            handles.append(h)
            best = int(np.nanargmax(self.val_dsc)) if np.isfinite(self.val_dsc).any() else None
            if best is not None:
                b.plot([self.epochs[best]], [self.val_dsc[best]], marker="*", markersize=12,
                       linestyle="none", color="#ffd54f", markeredgecolor=c["background"])
        if self.epochs or self.step_x:
            right = max(self.epochs[-1] if self.epochs else 0, self.step_x[-1] if self.step_x else 0, 1)
            a.set_xlim(0, right + 0.25)
        else:  # before training: the epochs the run may take, whole numbers
            a.set_xlim(0, max(int(self.planned_epochs), 1))
            a.set_ylim(0, 1)
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
        if not handles:
            a.text(0.5, 0.5, "loss and validation DSC appear here while training", ha="center",
                   va="center", color=c["text"], fontsize=8, transform=a.transAxes)
        else:
            self.style_legend(a.legend(handles=handles, loc="upper right", fontsize=7, framealpha=0.85))
        self.canvas.draw_idle()
