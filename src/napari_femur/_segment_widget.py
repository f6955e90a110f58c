"""Segment Femur: run a trained model on an image layer, in a thread worker.

The widget takes an image layer (any 3D scan placed in mm; layers from this
plugin's reader are in the canonical coronal layout), a model (one trained in
this session by Train Fold, or a checkpoint file / run folder), and the
inference options of :func:`femur_core.inference.predict_volume`. Run starts a
napari thread worker that yields femur_core progress events to the progress
bar; Cancel sets the work's cancel token. The result appears as two layers
placed exactly like the image: "<name> femur probability (prediction)" (image)
and "<name> femur (prediction)" (labels, filled in the prediction colour),
with the geometry metadata the writer needs. The threshold section below moves
the operating point on the cached map; it shares the probability layer's one
threshold with the Femur Threshold dock (napari_femur._threshold_state).
Choosing a model loads it in a thread worker too (a large checkpoint or an
ensemble takes seconds): the GUI stays responsive, the model line says what it
is when it is loaded, and a file that cannot be used says why on the status line.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from femur_core.errors import Cancelled
from femur_core.models.registry import MODELS
from femur_core.progress import CancelToken, ProgressEvent
from femur_core.volume import Volume

from ._layers import derived_metadata, femur_meta, volume_from_layer, world_affine
from ._qt_utils import (
    disable_missing_devices,
    LayerComboBox,
    PathPicker,
    error_text,
    notify_error,
    notify_info,
    reset_view,
    reset_view_when_shown,
    same_placement,
    scrolling_layout,
)
from ._session import session_models
from ._style import style_prediction
from ._threshold_state import prediction_names
from ._threshold_widget import ThresholdWidget
from ._workers import iter_progress

if TYPE_CHECKING:  # pragma: no cover
    import napari
    from femur_core.inference import LoadedModel, Prediction

__all__ = ["SegmentFemurWidget", "segment_job", "ModelCache", "NO_MODEL_HELP"]

NO_MODEL_HELP = (
    "No model yet. Train one with the Train Fold widget (Plugins > Femur > Train Fold), "
    "or from a terminal: python -m femur_core.train --data DATA_FOLDER --out MODEL_FOLDER; "
    "then choose its model.pt / best.pt or the folder here."
)

_PATH_ITEM = "Model file or run folder…"
_PATH_KEY = "path:"
_SESSION = "session:"


def registry_summary() -> str:
    """One line per registered architecture (tooltip of the model chooser)."""
    return "\n".join(f"{name} ({spec.kind.upper()}): {spec.description}" for name, spec in MODELS.items())


def describe_model(model: "LoadedModel") -> str:
    """One line: architecture from the registry, 2D / 3D, F / L, threshold, grid."""
    mc = model.model_config
    spec = MODELS.get(mc.name)
    kind = spec.kind if spec is not None else "?"
    how = "2D, slice by slice" if kind == "2d" else "3D, whole volume or windows" if kind == "3d" else kind
    grid = model.grid
    if grid.in_plane_spacing:
        g = f"{grid.in_plane_spacing:g} mm pixels"
    elif grid.in_plane_size:
        g = f"{grid.in_plane_size} px in-plane"
    else:
        g = "native grid"
    if grid.central_slices:
        g += f", central {grid.central_slices} slices"
    return f"{mc.name} U-Net ({how}), F={mc.features} L={mc.levels}; threshold {model.threshold:.3f}; {g}"


class ModelCache:
    """Loaded models by checkpoint path, reloaded when the file changes."""

    def __init__(self) -> None:
        self._items: dict[Path, tuple[float, Any]] = {}
        self._lock = threading.Lock()  # thread workers load: one load of a file at a time

    def get(self, path: "str | os.PathLike") -> "LoadedModel":
        """Load (or reuse) the model at ``path`` (a checkpoint file or a run folder); thread-safe."""
        from femur_core.checkpoint import resolve_model_path
        from femur_core.inference import load_model

        p = resolve_model_path(path)
        with self._lock:
            mtime = p.stat().st_mtime
            hit = self._items.get(p)
            if hit is not None and hit[0] == mtime:
                return hit[1]
            model = load_model(p)
            self._items[p] = (mtime, model)
            return model


def segment_job(
    cache: ModelCache,
    model_path: "str | os.PathLike",
    image: Volume,
    *,
    flip_tta: bool,
    cleanup: bool,
    device: str,
    cancel: CancelToken,
) -> Generator[ProgressEvent, None, tuple["Prediction", "LoadedModel"]]:
    """The thread worker's generator: load the model, predict, yield progress.

    Returns
    -------
    (Prediction, LoadedModel)
        The prediction on the image's own grid, and the model used.
    """
    from femur_core.inference import predict_volume

    yield ProgressEvent("load", message="loading model")
    model = cache.get(model_path)
    cancel.raise_if_cancelled()
    yield ProgressEvent("predict", 0, 0, message=describe_model(model))
    pred = yield from iter_progress(
        predict_volume, model, image, flip_tta=flip_tta, cleanup=cleanup, device=device, cancel=cancel
    )
    return pred, model


class SegmentFemurWidget(QWidget):
    """Dock widget "Segment Femur".

    Parameters
    ----------
    napari_viewer : napari.Viewer
        The viewer (napari passes it by this name).
    parent : QWidget, optional
        Parent widget.

    Signals
    -------
    segmented(object)
        ``(probability layer, mask layer)`` after a successful run.
    """

    segmented = Signal(object)

    def __init__(self, napari_viewer: "napari.Viewer", parent: QWidget | None = None):
        super().__init__(parent)
        import napari

        self.viewer = napari_viewer
        self.worker: Any = None
        #: the thread worker loading the chosen model (None when no load is running)
        self.loader: Any = None
        self._runs = 0  # segmentation runs started (a load error older than a run leaves its status alone)
        self._cancel: CancelToken | None = None
        self._cache = ModelCache()
        self._store = session_models()

        self.image_combo = LayerComboBox(
            self.viewer, napari.layers.Image,
            accept=lambda layer: femur_meta(layer.metadata).get("role") != "probability"
            and not getattr(layer, "rgb", False),
            parent=self,
        )
        self.image_combo.setToolTip("The MRI volume to segment")
        self.model_combo = QComboBox(self)
        self.model_combo.setToolTip("Architectures femur_core knows:\n" + registry_summary())
        self.model_path = PathPicker("file_or_folder", filter="Checkpoints (*.pt);;All files (*)",
                                     placeholder="best.pt, model.pt or a run folder", parent=self)
        self.model_info = QLabel("", self)
        self.model_info.setWordWrap(True)
        self.model_info.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.device_combo = QComboBox(self)
        self.device_combo.addItems(["auto", "cpu", "cuda"])
        self.device_combo.setToolTip("auto: CUDA if available, else CPU")
        disable_missing_devices(self.device_combo)
        self.flip_check = QCheckBox("flip averaging", self)
        self.flip_check.setChecked(True)
        self.flip_check.setToolTip("Average with the prediction of the left-right mirrored scan (twice the time)")
        self.cleanup_check = QCheckBox("one component per hip", self)
        self.cleanup_check.setChecked(True)
        self.cleanup_check.setToolTip("Keep the largest connected component on each hip side")
        self.run_button = QPushButton("Run", self)
        self.cancel_button = QPushButton("Cancel", self)
        self.cancel_button.setEnabled(False)
        self.progress = QProgressBar(self)
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.status = QLabel("", self)
        self.status.setWordWrap(True)
        self.threshold_panel = ThresholdWidget(self.viewer, parent=self)

        form = QFormLayout()
        form.addRow("image", self.image_combo)
        form.addRow("model", self.model_combo)
        model_box = QWidget(self)  # one row, so that hiding the path picker leaves no gap
        model_lay = QVBoxLayout(model_box)
        model_lay.setContentsMargins(0, 0, 0, 0)
        model_lay.addWidget(self.model_path)
        model_lay.addWidget(self.model_info)
        form.addRow("", model_box)
        form.addRow("device", self.device_combo)
        lay = scrolling_layout(self)
        lay.addLayout(form)
        checks = QHBoxLayout()
        checks.addWidget(self.flip_check)
        checks.addWidget(self.cleanup_check)
        lay.addLayout(checks)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button, 1)
        buttons.addWidget(self.cancel_button)
        lay.addLayout(buttons)
        lay.addWidget(self.progress)
        lay.addWidget(self.status)
        box = QGroupBox("Threshold", self)
        box_lay = QVBoxLayout(box)
        box_lay.addWidget(self.threshold_panel)
        lay.addWidget(box, 1)

        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self.model_combo.currentIndexChanged.connect(self._on_model_choice)
        self.model_path.path_changed.connect(lambda _: self._describe())
        self._store.changed.connect(self._on_store_changed)
        self.destroyed.connect(self._disconnect_store)
        self._fill_models()
        reset_view_when_shown(self, self.viewer)

    # ------------------------------------------------------------------ models
    def _disconnect_store(self, *_: Any) -> None:
        try:
            self._store.changed.disconnect(self._on_store_changed)
        except Exception:  # pragma: no cover
            pass

    def _on_store_changed(self) -> None:
        try:
            newest = self._store.latest()
            self._fill_models(prefer=_SESSION + newest.name if newest is not None else None)
        except RuntimeError:  # widget deleted
            self._disconnect_store()

    def _fill_models(self, prefer: str | None = None) -> None:
        keep = prefer if prefer is not None else self.model_combo.currentData()
        self.model_combo.blockSignals(True)
        self.model_combo.clear()
        for m in self._store.models():
            self.model_combo.addItem(f"trained in this session: {m.name}", _SESSION + m.name)
            self.model_combo.setItemData(self.model_combo.count() - 1, m.description or str(m.path), Qt.ToolTipRole)
        self.model_combo.addItem(_PATH_ITEM, _PATH_KEY)
        idx = self.model_combo.findData(keep) if keep is not None else -1
        if idx < 0:
            # the newest session model if any, else the path entry
            idx = self.model_combo.count() - 2 if self._store.models() else 0
        self.model_combo.setCurrentIndex(idx)
        self.model_combo.blockSignals(False)
        self._on_model_choice()

    def _current_choice(self) -> tuple[str, str | None]:
        key = self.model_combo.currentData() or _PATH_KEY
        if key.startswith(_SESSION):
            return "session", key[len(_SESSION):]
        return "path", None

    def _on_model_choice(self, *_: Any) -> None:
        kind, _name = self._current_choice()
        self.model_path.setVisible(kind == "path")
        self._describe()

    def selected_model_path(self) -> Path | None:
        """The checkpoint file or run folder the Run button would use, or None."""
        kind, name = self._current_choice()
        if kind == "session":
            m = self._store.get(name)
            return None if m is None else m.path
        return self.model_path.path()

    def select_session_model(self, name: str) -> None:
        """Choose a model from the session store by name."""
        idx = self.model_combo.findData(_SESSION + name)
        if idx >= 0:
            self.model_combo.setCurrentIndex(idx)

    def select_model_path(self, path: "str | os.PathLike") -> None:
        """Choose "model file or run folder" with ``path``."""
        self.model_combo.setCurrentIndex(self.model_combo.findData(_PATH_KEY))
        self.model_path.set_path(path)

    def _describe(self) -> None:
        """Show what the chosen model is: load it in a thread worker, describe it when it is loaded."""
        from napari.qt.threading import create_worker

        if self.worker is None:  # a new model: an old run's message no longer applies
            self.status.setText("")
        path = self.selected_model_path()
        if path is None:
            self.model_info.setText(NO_MODEL_HELP)
            self.run_button.setToolTip(NO_MODEL_HELP)
            return
        self.model_info.setText("Loading the model…")
        self.run_button.setToolTip("Segment the chosen image layer")
        loader = create_worker(self._cache.get, path, _start_thread=False, _ignore_errors=True)
        runs = self._runs
        loader.returned.connect(lambda model: self._on_model_loaded(path, model))
        loader.errored.connect(lambda exc: self._on_model_error(path, exc, runs))
        loader.finished.connect(lambda: self._on_loader_finished(loader))
        self.loader = loader
        loader.start()

    def _still_chosen(self, path: Path) -> bool:
        """Whether ``path`` is still the chosen model (a late result of an earlier choice is dropped)."""
        try:
            return self.selected_model_path() == path
        except RuntimeError:  # the widget was deleted while the model loaded
            return False

    def _on_model_loaded(self, path: Path, model: "LoadedModel") -> None:
        if self._still_chosen(path):
            self.model_info.setText(describe_model(model))

    def _on_model_error(self, path: Path, exc: BaseException, runs: int) -> None:
        if not self._still_chosen(path):
            return
        text = f"Cannot use this model: {error_text(exc)}"
        self.model_info.setText(text)
        if self.worker is None and runs == self._runs:  # a run's own message wins
            self.status.setText(text)

    def _on_loader_finished(self, loader: Any) -> None:
        if self.loader is loader:
            self.loader = None

    # ------------------------------------------------------------------ run
    def run(self) -> Any:
        """Start segmentation in a thread worker (returns the worker, or None)."""
        from napari.qt.threading import create_worker

        if self.worker is not None:
            notify_info("Segmentation is already running")
            return None
        layer = self.image_combo.current_layer()
        if layer is None:
            self._fail("No image layer: open a scan (File > Open) or File > Open Sample > Femur")
            return None
        path = self.selected_model_path()
        if path is None:
            self._fail(NO_MODEL_HELP)
            return None
        try:
            image = volume_from_layer(layer)
        except Exception as exc:
            self._fail(error_text(exc))
            return None
        self._cancel = CancelToken()
        self._layer = layer
        self._runs += 1
        worker = create_worker(
            segment_job, self._cache, path, image,
            flip_tta=self.flip_check.isChecked(), cleanup=self.cleanup_check.isChecked(),
            device=self.device_combo.currentText(), cancel=self._cancel,
            _start_thread=False, _ignore_errors=True,
        )
        worker.yielded.connect(self._on_progress)
        worker.returned.connect(self._on_returned)
        worker.errored.connect(self._on_error)
        worker.finished.connect(self._on_finished)
        self.worker = worker
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.progress.setRange(0, 0)
        self.status.setText(f"Segmenting {layer.name}…")
        worker.start()
        return worker

    def cancel(self) -> None:
        """Ask the running segmentation to stop (at its next slice or window)."""
        if self._cancel is not None:
            self._cancel.cancel()
            self.status.setText("Cancelling…")

    def _fail(self, text: str) -> None:
        self.status.setText(text)
        notify_error(text)

    def _on_progress(self, ev: ProgressEvent) -> None:
        if ev.total:
            self.progress.setRange(0, ev.total)
            self.progress.setValue(ev.step)
        else:
            self.progress.setRange(0, 0)
        if ev.message:
            self.status.setText(ev.message if ev.stage != "predict" or not ev.total
                                else f"{ev.message}: {ev.step}/{ev.total}")

    def _on_error(self, exc: BaseException) -> None:
        if isinstance(exc, Cancelled):
            self.status.setText("Segmentation cancelled.")
            notify_info("Segmentation cancelled")
            return
        text = notify_error(exc, "Segmentation failed")
        self.status.setText(text)

    def _on_finished(self) -> None:
        self.worker = None
        self._cancel = None
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        self.progress.setRange(0, 1)
        self.progress.setValue(1 if self.status.text().startswith("Done") else 0)

    def _on_returned(self, result: tuple) -> None:
        try:
            prob_layer, mask_layer = self._add_result_layers(self._layer, *result)
        except Exception as exc:  # e.g. the image layer was deleted meanwhile
            self.status.setText(notify_error(exc, "Could not show the result"))
            return
        pred = result[0]
        self.status.setText(
            f"Done: {int(np.count_nonzero(mask_layer.data))} femur voxels at threshold {pred.threshold:.3f}."
        )
        self.threshold_panel.set_probability_layer(prob_layer)
        reset_view(self.viewer)
        self.segmented.emit((prob_layer, mask_layer))

    def _add_result_layers(self, image_layer: Any, pred: "Prediction", model: "LoadedModel") -> tuple[Any, Any]:
        """Add (or update) the probability and mask layers, placed like the image."""
        import napari

        world = world_affine(image_layer)
        prob_name, mask_name = prediction_names(image_layer.name)
        common = {
            "image_layer": image_layer.name,
            "model": os.fspath(model.path) if model.path is not None else None,
            "threshold": float(pred.threshold),
            "cleanup": self.cleanup_check.isChecked(),
        }
        prob_meta = derived_metadata(image_layer.metadata, world, role="probability", mask_layer=mask_name, **common)
        mask_meta = derived_metadata(image_layer.metadata, world, role="mask", probability_layer=prob_name, **common)
        prob = np.ascontiguousarray(pred.prob.data, dtype=np.float32)
        mask = np.ascontiguousarray(pred.mask.data, dtype=np.uint8)
        if prob.shape != tuple(image_layer.data.shape):
            raise ValueError(f"prediction shape {prob.shape} differs from the image {image_layer.data.shape}")
        place = same_placement(image_layer)
        layers = self.viewer.layers
        if prob_name in layers and isinstance(layers[prob_name], napari.layers.Image):
            prob_layer = layers[prob_name]
            prob_layer.metadata = prob_meta
            prob_layer.data = prob
        else:
            prob_layer = self.viewer.add_image(
                prob, name=prob_name, metadata=prob_meta, colormap="magma", contrast_limits=(0.0, 1.0),
                blending="additive", opacity=0.7, visible=False, **place,
            )
        if mask_name in layers and isinstance(layers[mask_name], napari.layers.Labels):
            mask_layer = layers[mask_name]
            mask_layer.metadata = mask_meta
            mask_layer.data = mask
        else:
            mask_layer = self.viewer.add_labels(mask, name=mask_name, metadata=mask_meta, **place)
            style_prediction(mask_layer)
        return prob_layer, mask_layer
