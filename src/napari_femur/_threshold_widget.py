"""Femur Threshold: move the operating point of a cached probability map, live.

The slider thresholds the probability layer in place (``prob >= t``, one
vectorised comparison into the mask layer's own buffer, then a refresh): the
network is never re-run. The threshold belongs to the probability layer, not to
the panel (:mod:`napari_femur._threshold_state`): the Femur Threshold dock and
the threshold section of Segment Femur show the same value and move the same
mask layer, whichever was opened first. With a reference mask chosen, the precision-recall
curve of the probability map is computed once per (probability, reference)
pair with :func:`femur_core.metrics.curves_from_histogram`; moving the slider
only looks up the point of the current threshold in those arrays, so DSC,
precision and recall follow the slider instantly. The PRC-optimal point is
:func:`femur_core.metrics.optimal_threshold`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSlider,
    QVBoxLayout,
    QWidget,
)

from femur_core.metrics import curves_from_histogram, optimal_threshold

from ._layers import femur_meta, world_affine
from ._plots import PRCurveCanvas
from ._qt_utils import LayerComboBox, notify_error, reset_view_when_shown
from ._style import colors_legend, show_as_reference_outline
from ._threshold_state import ThresholdState, threshold_state

if TYPE_CHECKING:  # pragma: no cover
    import napari
    from femur_core.metrics import Curves

__all__ = ["ThresholdWidget", "curve_index", "point_stats"]

#: Slider resolution; with ``BINS = STEPS + 1`` histogram bins every slider
#: position is exactly one of the curve's thresholds.
STEPS = 1000
BINS = STEPS + 1


def is_probability_layer(layer: Any) -> bool:
    """A layer this plugin made to hold a femur probability map."""
    return femur_meta(getattr(layer, "metadata", None)).get("role") == "probability"


def curve_index(curves: "Curves", t: float) -> int:
    """Index of the curve point that thresholding at ``t`` gives (``prob >= t``).

    The curve's thresholds are decreasing grid values after the ``inf``
    sentinel; the point for ``t`` is the one with the smallest grid threshold
    that is still ``>= t``.
    """
    thr = np.asarray(curves.thresholds[1:], dtype=float)
    k = int(np.searchsorted(-thr, -float(t) + 1e-9, side="right")) - 1
    return max(k, -1) + 1


def point_stats(curves: "Curves", index: int) -> dict[str, float]:
    """Threshold, DSC, precision and recall of one curve point."""
    tp, fp, fn = int(curves.tp[index]), int(curves.fp[index]), int(curves.fn[index])
    den = 2 * tp + fp + fn
    return {
        "threshold": float(curves.thresholds[index]),
        "dsc": 2 * tp / den if den else float("nan"),
        "precision": float(curves.precision[index]),
        "recall": float(curves.recall[index]),
        "tp": tp,
        "fp": fp,
        "fn": fn,
    }


def reference_positive(ref: np.ndarray) -> np.ndarray:
    """Femur voxels of a reference labels array.

    A binary mask counts every non-zero voxel; a multi-label one (such as the
    ``subNN_bones`` files, 1 = femur) counts label 1.
    """
    ref = np.asarray(ref)
    if ref.dtype == bool:
        return ref
    if ref.size and int(ref.max()) > 1:
        return ref == 1
    return ref != 0


class ThresholdWidget(QWidget):
    """Dock widget "Femur Threshold" (also embedded in Segment Femur).

    Parameters
    ----------
    napari_viewer : napari.Viewer
        The viewer (napari passes it by this name).
    parent : QWidget, optional
        Parent widget.
    compact : bool
        Embedded use: no probability chooser (the owner sets the layer).

    Signals
    -------
    threshold_applied(float)
        After the mask layer was updated for a new threshold (by this panel or
        by another panel showing the same probability layer).
    """

    threshold_applied = Signal(float)

    def __init__(self, napari_viewer: "napari.Viewer", parent: QWidget | None = None, compact: bool = False):
        super().__init__(parent)
        import napari

        self.viewer = napari_viewer
        self._state: ThresholdState | None = None
        self._curves: "Curves | None" = None
        self._optimal_index: int | None = None
        self._curve_key: tuple | None = None
        self._ref_layer: Any = None

        self.prob_combo = LayerComboBox(self.viewer, napari.layers.Image, accept=is_probability_layer, parent=self)
        self.prob_combo.setToolTip("Probability map made by Segment Femur")
        self.ref_combo = LayerComboBox(self.viewer, napari.layers.Labels, none_text="(no reference)",
                                       accept=lambda layer: femur_meta(layer.metadata).get("role") != "prediction"
                                       and femur_meta(layer.metadata).get("probability_layer") is None,
                                       parent=self)
        self.ref_combo.setToolTip("A reference (manual) femur mask on the same grid: shows the PR curve; "
                                  "it is drawn as an outline over the filled prediction")

        self.slider = QSlider(Qt.Horizontal, self)
        self.slider.setRange(0, STEPS)
        self.slider.setValue(STEPS // 2)
        self.slider.setToolTip("Voxels with probability >= threshold are femur")
        self.spin = QDoubleSpinBox(self)
        self.spin.setRange(0.0, 1.0)
        self.spin.setDecimals(3)
        self.spin.setSingleStep(1.0 / STEPS)
        self.spin.setValue(0.5)
        self.cleanup_check = QCheckBox("clean up on release", self)
        self.cleanup_check.setToolTip(
            "After the slider is released, keep the largest connected component per hip side "
            "(curve and scores describe the raw threshold)"
        )
        self.optimal_button = QPushButton("Jump to optimal", self)
        self.optimal_button.setToolTip("Move to the PRC-optimal threshold (closest to precision = recall = 1)")
        self.optimal_button.setEnabled(False)
        self.legend = QLabel(colors_legend(), self)
        self.legend.setTextFormat(Qt.RichText)
        self.legend.setToolTip("Layer colours: predicted masks are filled in orange, references drawn as "
                               "blue outlines (left femur: purple / green)")
        self.stats_label = QLabel("", self)
        self.stats_label.setWordWrap(True)
        self.stats_label.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.canvas = PRCurveCanvas(self.viewer, parent=self)

        form = QFormLayout()
        form.setContentsMargins(0, 0, 0, 0)
        if compact:
            self.prob_combo.hide()
        else:
            form.addRow("probability", self.prob_combo)
        form.addRow("reference", self.ref_combo)
        row = QHBoxLayout()
        row.addWidget(self.slider, 1)
        row.addWidget(self.spin)
        form.addRow("threshold", row)
        lay = QVBoxLayout(self)
        if compact:
            lay.setContentsMargins(0, 0, 0, 0)
        lay.addLayout(form)
        buttons = QHBoxLayout()
        buttons.addWidget(self.cleanup_check, 1)
        buttons.addWidget(self.optimal_button)
        lay.addLayout(buttons)
        lay.addWidget(self.legend)
        lay.addWidget(self.stats_label)
        lay.addWidget(self.canvas, 1)

        self.slider.valueChanged.connect(self._on_slider)
        self.slider.sliderReleased.connect(self._on_released)
        self.spin.valueChanged.connect(self._on_spin)
        self.spin.editingFinished.connect(self._on_released)
        self.cleanup_check.toggled.connect(self._on_cleanup_toggled)
        self.optimal_button.clicked.connect(self.jump_to_optimal)
        self.prob_combo.layer_changed.connect(self._on_prob_layer)
        self.ref_combo.layer_changed.connect(self._on_ref_layer)
        self.destroyed.connect(self._disconnect_state)
        self._on_prob_layer(self.prob_combo.current_layer())
        if parent is None:  # a dock of its own
            reset_view_when_shown(self, self.viewer)

    # ------------------------------------------------------------------ public API
    @property
    def threshold(self) -> float:
        """The current threshold in [0, 1]."""
        return self.slider.value() / STEPS

    @property
    def state(self) -> ThresholdState | None:
        """The shared threshold state of the probability layer shown (None without one)."""
        return self._state

    def set_threshold(self, t: float, cleanup: bool | None = None) -> None:
        """Move the threshold to ``t`` (snapped to 1/1000): mask, scores and curve point follow.

        Parameters
        ----------
        t : float
            Threshold in [0, 1].
        cleanup : bool, optional
            Also run the component cleanup now (default: the checkbox, as on release).
        """
        value = int(round(float(np.clip(t, 0.0, 1.0)) * STEPS))
        if value == self.slider.value():
            self._apply(self.threshold)
        else:
            self.slider.setValue(value)  # -> _on_slider -> _apply
        if cleanup if cleanup is not None else self.cleanup_check.isChecked():
            self._apply_cleanup()

    def set_probability_layer(self, layer: Any) -> None:
        """Show ``layer`` (made by Segment Femur); the threshold is the layer's own."""
        self.prob_combo.set_layer(layer)
        self._on_prob_layer(layer, force=True)

    def current_point(self) -> dict[str, float] | None:
        """Scores at the current threshold (None without a reference mask)."""
        if self._curves is None:
            return None
        return point_stats(self._curves, curve_index(self._curves, self.threshold))

    @property
    def curves(self) -> "Curves | None":
        """The precision-recall curves of the current (probability, reference) pair."""
        return self._curves

    @property
    def optimal_threshold(self) -> float | None:
        """The PRC-optimal threshold of the current pair, or None."""
        if self._curves is None or self._optimal_index is None:
            return None
        return float(self._curves.thresholds[self._optimal_index])

    @property
    def mask_layer(self) -> Any:
        """The labels layer the slider writes into (None before there is one)."""
        return None if self._state is None else self._state.mask_layer()

    @property
    def _prob_layer(self) -> Any:
        return None if self._state is None else self._state.layer

    @property
    def _prob(self) -> np.ndarray | None:
        return None if self._state is None or self._state.layer is None else self._state.prob

    def jump_to_optimal(self) -> None:
        """Move the slider to the PRC-optimal threshold."""
        t = self.optimal_threshold
        if t is not None:
            self.set_threshold(t)

    # ------------------------------------------------------------------ layers
    def _on_prob_layer(self, layer: Any, force: bool = False) -> None:
        if self._state is not None and layer is self._state.layer and not force:
            return
        self._disconnect_state()
        self._state = None
        self._curve_key = None
        if layer is not None:
            state = threshold_state(self.viewer, layer)
            self._state = state
            state.changed.connect(self._on_state_changed)
            state.cleanup_changed.connect(self._on_state_cleanup)
            state.data_changed.connect(self._on_state_data)
            self._set_slider_silently(state.threshold)
            self.cleanup_check.blockSignals(True)
            self.cleanup_check.setChecked(state.cleanup)
            self.cleanup_check.blockSignals(False)
        self.slider.setEnabled(layer is not None)
        self.spin.setEnabled(layer is not None)
        self._update_curves()

    def _disconnect_state(self, *_: Any) -> None:
        state = self._state
        if state is None:
            return
        for sig, slot in ((state.changed, self._on_state_changed), (state.cleanup_changed, self._on_state_cleanup),
                          (state.data_changed, self._on_state_data)):
            try:
                sig.disconnect(slot)
            except Exception:  # pragma: no cover
                pass

    def _alive(self) -> bool:
        try:
            self.objectName()
            return True
        except RuntimeError:  # the Qt side is gone (viewer closed)
            self._disconnect_state()
            return False

    def _on_state_changed(self, t: float) -> None:
        """The shared threshold moved (here or in another panel): follow it."""
        if not self._alive():
            return
        self._set_slider_silently(t)
        self._update_stats()
        self.threshold_applied.emit(float(t))

    def _on_state_cleanup(self, on: bool) -> None:
        if not self._alive():
            return
        self.cleanup_check.blockSignals(True)
        self.cleanup_check.setChecked(on)
        self.cleanup_check.blockSignals(False)

    def _on_state_data(self) -> None:
        if not self._alive():
            return
        self._curve_key = None
        self._update_curves()

    def _on_cleanup_toggled(self, on: bool) -> None:
        if self._state is not None:
            self._state.set_cleanup(on)

    def _on_ref_layer(self, layer: Any) -> None:
        if self._ref_layer is not None:
            for ev in (self._ref_layer.events.data, self._ref_layer.events.paint):
                try:
                    ev.disconnect(self._on_ref_edited)
                except Exception:  # pragma: no cover
                    pass
            if self._ref_layer in self.viewer.layers:
                show_as_reference_outline(self._ref_layer, False)
        self._ref_layer = layer
        if layer is not None:
            layer.events.data.connect(self._on_ref_edited)
            layer.events.paint.connect(self._on_ref_edited)
            show_as_reference_outline(layer, True)
        self._update_curves()

    def _on_ref_edited(self, *_: Any) -> None:
        self._curve_key = None
        self._update_curves()
    # ------------------------------------------------------------------ curves
    def _update_curves(self) -> None:
        ref_layer = self.ref_combo.current_layer()
        prob_layer = self._prob_layer
        if ref_layer is None or prob_layer is None or self._prob is None:
            self._curves, self._optimal_index, self._curve_key = None, None, None
            msg = ("choose a reference mask to see the precision-recall curve" if prob_layer is not None
                   else "run Segment Femur to get a probability map")
            self.canvas.set_curves(None, message=msg)
            self.optimal_button.setEnabled(False)
            self._update_stats()
            return
        key = (id(prob_layer), id(ref_layer), id(self._prob))
        if key == self._curve_key and self._curves is not None:
            return
        ref = np.asarray(ref_layer.data)
        problem = None
        if ref.shape != self._prob.shape:
            problem = (f"reference {ref_layer.name!r} has shape {ref.shape}, the probability map "
                       f"{self._prob.shape}: not on the same grid")
        elif not np.allclose(world_affine(ref_layer), world_affine(prob_layer), atol=1e-3):
            problem = f"reference {ref_layer.name!r} is placed differently from the probability map"
        if problem is not None:
            self._curves, self._optimal_index, self._curve_key = None, None, None
            self.canvas.set_curves(None, message=problem)
            self.optimal_button.setEnabled(False)
            self.stats_label.setText(problem)
            return
        try:
            curves = curves_from_histogram(self._prob, reference_positive(ref), bins=BINS)
        except ValueError as exc:
            notify_error(exc, "precision-recall curve")
            self._curves = None
            self.canvas.set_curves(None, message=str(exc))
            return
        self._curves = curves
        self._curve_key = key
        try:
            self._optimal_index = curve_index(curves, optimal_threshold(curves))
        except ValueError:  # reference without femur voxels
            self._optimal_index = None
        self.optimal_button.setEnabled(self._optimal_index is not None)
        self.canvas.current_index = curve_index(curves, self.threshold)
        self.canvas.set_curves(curves, self._optimal_index)
        self._update_stats()

    # ------------------------------------------------------------------ threshold
    def _set_slider_silently(self, t: float) -> None:
        value = int(round(float(np.clip(t, 0.0, 1.0)) * STEPS))
        for w in (self.slider, self.spin):
            w.blockSignals(True)
        self.slider.setValue(value)
        self.spin.setValue(value / STEPS)
        for w in (self.slider, self.spin):
            w.blockSignals(False)

    def _on_slider(self, value: int) -> None:
        self.spin.blockSignals(True)
        self.spin.setValue(value / STEPS)
        self.spin.blockSignals(False)
        self._apply(value / STEPS)

    def _on_spin(self, value: float) -> None:
        self.slider.blockSignals(True)
        self.slider.setValue(int(round(value * STEPS)))
        self.slider.blockSignals(False)
        self._apply(self.threshold)

    def _on_released(self) -> None:
        if self.cleanup_check.isChecked():
            self._apply_cleanup()

    def _apply(self, t: float) -> None:
        """Move the shared threshold (it writes the mask layer; every panel follows)."""
        if self._state is None or self._state.layer is None:
            return
        try:
            self._state.set_threshold(t)
        except Exception as exc:  # never let a slider move crash the viewer
            notify_error(exc, "threshold")

    def _apply_cleanup(self) -> None:
        """Keep one component per hip side at the current threshold (femur_core postprocess)."""
        if self._state is None:
            return
        try:
            self._state.apply_cleanup()
        except Exception as exc:
            notify_error(exc, "cleanup")

    def _update_stats(self) -> None:
        if self._prob_layer is None:
            self.stats_label.setText("No probability map yet: run Segment Femur first.")
            return
        t = self.threshold
        if self._curves is None:
            self.stats_label.setText(f"threshold {t:.3f}; choose a reference mask for DSC / precision / recall")
            return
        idx = curve_index(self._curves, t)
        s = point_stats(self._curves, idx)
        opt = self.optimal_threshold
        opt_text = f"   (PRC-optimal t = {opt:.3f})" if opt is not None else ""
        self.stats_label.setText(
            f"t = {t:.3f}:  DSC {s['dsc']:.3f}   precision {s['precision']:.3f}   "
            f"recall {s['recall']:.3f}{opt_text}"
        )
        self.canvas.set_current(idx)
