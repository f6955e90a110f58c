"""Small Qt building blocks shared by the dock widgets."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qtpy.QtCore import QEvent, QObject, QSize, Qt, QTimer, Signal
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFrame,
    QHBoxLayout,
    QLineEdit,
    QPushButton,
    QScrollArea,
    QVBoxLayout,
    QWidget,
)

if TYPE_CHECKING:  # pragma: no cover
    import napari

__all__ = ["LayerComboBox", "PathPicker", "notify_error", "notify_info", "same_placement", "error_text",
           "scrolling_layout", "disable_missing_devices", "reset_view_when_shown", "reset_view"]


def reset_view(viewer: Any) -> None:
    """Fit the scan into the canvas (napari's Home), if the viewer has layers; never raises."""
    try:
        if len(viewer.layers):
            viewer.reset_view()
    except Exception:  # pragma: no cover - the viewer may be closing
        pass


class _ResetOnShow(QObject):
    """Event filter: reset the view once, after the widget was first shown (docked)."""

    def __init__(self, viewer: Any, parent: QWidget) -> None:
        super().__init__(parent)
        self._viewer = viewer
        self._done = False

    def eventFilter(self, obj: Any, event: Any) -> bool:  # noqa: N802 - Qt API
        # a wrapper that PyQt made anew for the C++ filter (the first one collected) has no state: done
        if getattr(self, "_done", True) or event.type() != QEvent.Show:
            return False
        self._done = True
        # after the dock took its width from the canvas: the next turn of the event loop, and once
        # more when napari's style sheet has resized the dock's contents
        viewer = self._viewer
        QTimer.singleShot(0, lambda: reset_view(viewer))
        QTimer.singleShot(500, lambda: reset_view(viewer))
        return False


def reset_view_when_shown(widget: QWidget, viewer: Any) -> None:
    """Reset ``viewer``'s view once ``widget`` is first shown: a new dock narrows the canvas,
    which would otherwise crop the scan at its edges until the user presses Home."""
    event_filter = _ResetOnShow(viewer, widget)
    # the widget keeps the Python object: with only Qt's parent link, PyQt may collect the wrapper and
    # hand the filter's events to a fresh one without its attributes (seen at viewer close in CI)
    widget._femur_reset_on_show = event_filter
    widget.installEventFilter(event_filter)


def disable_missing_devices(combo: QComboBox) -> None:
    """Grey out the "cuda" entry of a device combo box where CUDA is not available."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover
        has_cuda = False
    idx = combo.findText("cuda")
    if not has_cuda and idx >= 0:
        item = combo.model().item(idx)
        item.setEnabled(False)
        item.setToolTip("CUDA is not available on this machine")


class _VerticalScrollArea(QScrollArea):
    """Scrolls vertically only; asks for the full width its content needs."""

    def _bar(self) -> int:
        return self.verticalScrollBar().sizeHint().width()

    def setWidget(self, widget: QWidget) -> None:  # noqa: N802 - Qt API
        super().setWidget(widget)
        widget.installEventFilter(self)

    def eventFilter(self, obj: Any, event: Any) -> bool:  # noqa: N802 - Qt API
        # the content's size hints change once napari's style sheet is applied:
        # tell the dock layout, which caches our hints
        if obj is self.widget() and event.type() == QEvent.LayoutRequest:
            self.updateGeometry()
        return super().eventFilter(obj, event)

    def minimumSizeHint(self) -> QSize:
        inner = self.widget().minimumSizeHint() if self.widget() is not None else QSize(0, 0)
        return QSize(inner.width() + self._bar(), min(inner.height(), 240))

    def sizeHint(self) -> QSize:
        inner = self.widget().sizeHint() if self.widget() is not None else QSize(0, 0)
        return QSize(inner.width() + self._bar(), inner.height())


def scrolling_layout(owner: QWidget) -> QVBoxLayout:
    """Give ``owner`` a frameless vertical scroll area; returns the layout to fill.

    Tall dock widgets then scroll instead of forcing the napari window to grow
    past the screen when several docks share one side; the width still follows
    what the content needs (no horizontal clipping).
    """
    outer = QVBoxLayout(owner)
    outer.setContentsMargins(0, 0, 0, 0)
    scroll = _VerticalScrollArea(owner)
    scroll.setWidgetResizable(True)
    scroll.setFrameShape(QFrame.NoFrame)
    scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
    content = QWidget(scroll)
    scroll.setWidget(content)
    outer.addWidget(scroll)
    return QVBoxLayout(content)


def error_text(exc: BaseException) -> str:
    """A one-line message for the user: femur_core errors are already complete sentences."""
    from femur_core.errors import FemurError

    if isinstance(exc, FemurError):
        return str(exc)
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def notify_error(exc: "BaseException | str", context: str = "") -> str:
    """Show an error as a napari notification (never raises); returns the text shown."""
    text = exc if isinstance(exc, str) else error_text(exc)
    if context:
        text = f"{context}: {text}"
    try:
        from napari.utils.notifications import show_error

        show_error(text)
    except Exception:  # pragma: no cover - notifications must never crash the viewer
        pass
    return text


def notify_info(text: str) -> None:
    """Show an information notification (never raises)."""
    try:
        from napari.utils.notifications import show_info

        show_info(text)
    except Exception:  # pragma: no cover
        pass


def same_placement(layer: Any) -> dict:
    """Keyword arguments that place a new layer exactly where ``layer`` is."""
    return {
        "affine": layer.affine.affine_matrix.copy(),
        "scale": tuple(layer.scale),
        "translate": tuple(layer.translate),
        "rotate": layer.rotate.copy(),
        "shear": tuple(layer.shear),
        "units": tuple(str(u) for u in layer.units),
        "axis_labels": tuple(layer.axis_labels),
    }


class LayerComboBox(QComboBox):
    """A combo box of the viewer's layers of some type(s), kept in sync with the layer list.

    Parameters
    ----------
    viewer : napari.Viewer
        The viewer whose layers are listed.
    layer_types : type or tuple of types
        Layer classes to list (e.g. ``napari.layers.Image``).
    accept : callable, optional
        Extra filter ``accept(layer) -> bool``.
    none_text : str, optional
        If given, a first entry with this text that means "no layer".
    parent : QWidget, optional
        Parent widget.

    Signals
    -------
    layer_changed(object)
        The selected layer (or None) after a user choice or a list change.
    """

    layer_changed = Signal(object)

    def __init__(
        self,
        viewer: "napari.Viewer",
        layer_types: type | tuple[type, ...],
        accept: Callable[[Any], bool] | None = None,
        none_text: str | None = None,
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        self._viewer = viewer
        self._types = layer_types
        self._accept = accept
        self._none_text = none_text
        self._last: str | None = None
        self.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
        self.setMinimumContentsLength(12)
        ev = viewer.layers.events
        self._connections = [ev.inserted, ev.removed, ev.reordered, ev.renamed]
        for emitter in self._connections:
            emitter.connect(self._on_layers_changed)
        self.destroyed.connect(self._disconnect)
        self.currentIndexChanged.connect(self._on_index_changed)
        self.refresh()

    def _disconnect(self, *_: Any) -> None:
        for emitter in self._connections:
            try:
                emitter.disconnect(self._on_layers_changed)
            except Exception:  # pragma: no cover
                pass
        self._connections = []

    def _candidates(self) -> list[Any]:
        out = []
        for layer in self._viewer.layers:
            if isinstance(layer, self._types) and (self._accept is None or self._accept(layer)):
                out.append(layer)
        return out

    def _on_layers_changed(self, *_: Any) -> None:
        try:
            self.refresh()
        except RuntimeError:  # the Qt object is gone (viewer closing)
            self._disconnect()

    def refresh(self, prefer: str | None = None) -> None:
        """Rebuild the entries, keeping (or moving to ``prefer``) the selection by name."""
        keep = prefer if prefer is not None else self.currentData()
        names = [layer.name for layer in self._candidates()]
        self.blockSignals(True)
        self.clear()
        if self._none_text is not None:
            self.addItem(self._none_text, None)
        for n in names:
            self.addItem(n, n)
        idx = self.findData(keep) if keep is not None else -1
        if idx < 0:
            idx = 0 if self.count() else -1
        self.setCurrentIndex(idx)
        self.blockSignals(False)
        current = self.currentData()
        if current != self._last:
            self._last = current
            self.layer_changed.emit(self.current_layer())

    def set_layer(self, layer: Any | None) -> None:
        """Select ``layer`` (by name), or the "no layer" entry for None."""
        self.refresh(prefer=None if layer is None else layer.name)
        if layer is None and self._none_text is not None:
            self.setCurrentIndex(0)

    def _on_index_changed(self, _index: int) -> None:
        current = self.currentData()
        if current != self._last:
            self._last = current
            self.layer_changed.emit(self.current_layer())

    def current_layer(self) -> Any | None:
        """The selected layer, or None."""
        name = self.currentData()
        if name is None:
            return None
        try:
            return self._viewer.layers[name]
        except (KeyError, ValueError):
            return None


class PathPicker(QWidget):
    """A line edit with a browse button for a file or a folder.

    Parameters
    ----------
    mode : {"file", "folder", "file_or_folder"}
        What the browse buttons choose.
    filter : str
        File dialog name filter (file mode).
    placeholder : str
        Hint shown in the empty line edit.

    Signals
    -------
    path_changed(str)
        The text after editing finished or a browse choice.
    """

    path_changed = Signal(str)

    def __init__(
        self,
        mode: str = "folder",
        filter: str = "",
        placeholder: str = "",
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        self._mode = mode
        self._filter = filter
        self.edit = QLineEdit(self)
        self.edit.setPlaceholderText(placeholder)
        self.edit.editingFinished.connect(lambda: self.path_changed.emit(self.edit.text()))
        lay = QHBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.edit, 1)
        self.buttons: list[QPushButton] = []
        kinds: Sequence[str] = ("file", "folder") if mode == "file_or_folder" else (mode,)
        for kind in kinds:
            btn = QPushButton("File…" if kind == "file" else "Folder…", self)
            btn.setToolTip("Choose a file" if kind == "file" else "Choose a folder")
            btn.clicked.connect(lambda _=False, k=kind: self._browse(k))
            lay.addWidget(btn)
            self.buttons.append(btn)

    def _browse(self, kind: str) -> None:
        start = self.edit.text() or str(Path.home())
        if kind == "file":
            path, _ = QFileDialog.getOpenFileName(self, "Choose a file", start, self._filter)
        else:
            path = QFileDialog.getExistingDirectory(self, "Choose a folder", start)
        if path:
            self.set_path(path)

    def path(self) -> Path | None:
        """The chosen path, or None when empty."""
        text = self.edit.text().strip()
        return Path(os.path.expanduser(text)) if text else None

    def set_path(self, path: "str | os.PathLike | None") -> None:
        """Set the text and emit ``path_changed``."""
        self.edit.setText("" if path is None else os.fspath(path))
        self.path_changed.emit(self.edit.text())
