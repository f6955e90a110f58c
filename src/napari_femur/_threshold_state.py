"""One threshold per probability layer, shared by every panel that shows it.

A probability layer made by Segment Femur has exactly one operating point and
exactly one mask layer it drives. :func:`threshold_state` returns the
:class:`ThresholdState` of a layer (created on first use, then the same object
for every caller), so the Femur Threshold dock, the threshold section of
Segment Femur and any further panel all move the same threshold and write into
the same mask layer; each panel follows the state's ``changed`` signal.

The mask layer is looked up when the threshold is applied, not when a panel
first sees the probability layer: a panel opened *before* segmenting sees the
probability layer appear a moment before its mask layer, and must not make a
second mask then. A mask layer is created only when none belongs to the
probability layer at all (e.g. the user deleted it).
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

import numpy as np
from psygnal import Signal

from ._layers import derived_metadata, femur_meta, volume_from_layer, world_affine
from ._qt_utils import same_placement
from ._style import style_prediction

if TYPE_CHECKING:  # pragma: no cover
    from femur_core.inference import Prediction

__all__ = ["ThresholdState", "threshold_state", "prediction_mask_name", "prediction_names"]

_STATES: "weakref.WeakKeyDictionary[Any, ThresholdState]" = weakref.WeakKeyDictionary()


def prediction_names(image_name: str) -> tuple[str, str]:
    """Names of the probability and mask layers Segment Femur makes for an image layer."""
    return f"{image_name} femur probability (prediction)", f"{image_name} femur (prediction)"


def prediction_mask_name(prob_name: str) -> str:
    """Name of the mask layer that belongs to a probability layer of that name."""
    base = prob_name.removesuffix(" (prediction)").removesuffix(" probability").removesuffix(" femur") or prob_name
    return f"{base} femur (prediction)"


def threshold_state(viewer: Any, prob_layer: Any) -> "ThresholdState":
    """The shared :class:`ThresholdState` of ``prob_layer`` (created on first call)."""
    state = _STATES.get(prob_layer)
    if state is None or state.viewer is not viewer:
        state = ThresholdState(viewer, prob_layer)
        _STATES[prob_layer] = state
    return state


class ThresholdState:
    """Threshold, clean-up flag and mask layer of one probability layer.

    Use :func:`threshold_state` rather than the constructor, so that every
    panel gets the same object.

    Signals
    -------
    changed(float)
        The threshold after the mask layer was updated (or after a new result
        reset it); every panel showing this layer moves its slider.
    cleanup_changed(bool)
        The clean-up flag changed.
    data_changed()
        The probability map was replaced (a new segmentation into the same layer).
    """

    changed = Signal(float)
    cleanup_changed = Signal(bool)
    data_changed = Signal()

    def __init__(self, viewer: Any, prob_layer: Any) -> None:
        self.viewer = viewer
        self._layer = weakref.ref(prob_layer)
        self._mask: "weakref.ref | None" = None
        self._prob: np.ndarray | None = None
        self._buffer: np.ndarray | None = None
        self._pred: "Prediction | None" = None
        self._pred_of: np.ndarray | None = None
        meta = femur_meta(prob_layer.metadata)
        self.threshold = float(meta.get("threshold", 0.5))
        self.cleanup = bool(meta.get("cleanup", False))
        prob_layer.events.data.connect(self._on_data)

    # ------------------------------------------------------------------ layers
    @property
    def layer(self) -> Any:
        """The probability layer (None once it was deleted)."""
        return self._layer()

    @property
    def prob(self) -> np.ndarray:
        """The probability map as float32 (cached; one copy for every panel)."""
        if self._prob is None:
            prob = np.asarray(self.layer.data)
            self._prob = prob if prob.dtype == np.float32 else prob.astype(np.float32)
            self._buffer = np.empty(self._prob.shape, dtype=bool)
        return self._prob

    def _on_data(self, *_: Any) -> None:
        self._prob = self._buffer = None
        layer = self.layer
        if layer is not None:  # a new result: its metadata says at which threshold its mask was made
            meta = femur_meta(layer.metadata)
            self.threshold = float(meta.get("threshold", self.threshold))
            self.cleanup = bool(meta.get("cleanup", self.cleanup))
        self.data_changed.emit()
        self.changed.emit(self.threshold)
        self.cleanup_changed.emit(self.cleanup)

    def _fits(self, cand: Any) -> bool:
        import napari

        return (isinstance(cand, napari.layers.Labels) and cand in self.viewer.layers
                and tuple(cand.data.shape) == tuple(self.layer.data.shape))

    def mask_layer(self, create: bool = False) -> Any:
        """The labels layer this probability layer drives.

        Found by the link Segment Femur records (``mask_layer`` in the
        probability layer's metadata, ``probability_layer`` in the mask's);
        with ``create``, a new one is added when none exists.
        """
        layer = self.layer
        if layer is None:
            return None
        cand = self._mask() if self._mask is not None else None
        if cand is not None and self._fits(cand):
            return cand
        layers = self.viewer.layers
        name = femur_meta(layer.metadata).get("mask_layer")
        found = None
        if name and name in layers and self._fits(layers[name]):
            found = layers[name]
        else:
            for cand in layers:
                meta = femur_meta(getattr(cand, "metadata", None))
                if meta.get("role") == "mask" and meta.get("probability_layer") == layer.name and self._fits(cand):
                    found = cand
                    break
        if found is None and create:
            found = self._create_mask_layer()
        if found is not None:
            self._mask = weakref.ref(found)
            layer.metadata.setdefault("femur", {})["mask_layer"] = found.name
        return found

    def _create_mask_layer(self) -> Any:
        layer = self.layer
        meta = derived_metadata(layer.metadata, world_affine(layer), role="mask", probability_layer=layer.name)
        mask = self.viewer.add_labels(
            np.zeros(self.prob.shape, dtype=np.uint8), name=prediction_mask_name(layer.name), metadata=meta,
            **same_placement(layer),
        )
        style_prediction(mask)
        return mask

    # ------------------------------------------------------------------ threshold
    def set_threshold(self, t: float) -> None:
        """Threshold the cached map into the mask layer, in place (``prob >= t``); emits ``changed``."""
        t = float(np.clip(t, 0.0, 1.0))
        layer = self.layer
        if layer is None:
            return
        mask = self.mask_layer(create=True)
        prob = self.prob
        np.greater_equal(prob, np.float32(t), out=self._buffer)
        data = mask.data
        if isinstance(data, np.ndarray) and data.shape == self._buffer.shape and data.flags.writeable:
            np.copyto(data, self._buffer, casting="unsafe")
            mask.refresh()
        else:
            mask.data = self._buffer.astype(np.uint8)
        self.threshold = t
        mask.metadata.setdefault("femur", {})["threshold"] = t
        layer.metadata.setdefault("femur", {})["threshold"] = t
        self.changed.emit(t)

    def set_cleanup(self, on: bool) -> None:
        """Change the clean-up flag (applied on the next release / :meth:`apply_cleanup`)."""
        on = bool(on)
        if on == self.cleanup:
            return
        self.cleanup = on
        layer = self.layer
        if layer is not None:
            layer.metadata.setdefault("femur", {})["cleanup"] = on
        self.cleanup_changed.emit(on)

    def apply_cleanup(self) -> None:
        """Keep one component per hip side at the current threshold (femur_core's ``Prediction.mask_at``).

        The probability layer's voxels become a Prediction on the layer's own
        grid (its affine gives the left-right axis and the image layer the body
        midline), so the cleanup is right for a layer in any orientation.
        """
        layer = self.layer
        mask = self.mask_layer()
        if layer is None or mask is None:
            return
        cleaned = self._prediction().mask_at(self.threshold, cleanup=True).data
        np.copyto(mask.data, cleaned, casting="unsafe")
        mask.refresh()

    def _prediction(self) -> "Prediction":
        """The cached probability map as a femur_core Prediction (built once per map)."""
        from femur_core.inference import Prediction

        if self._pred is None or self._pred_of is not self._prob:
            layer = self.layer
            prob = volume_from_layer(layer).with_data(self.prob)
            image = None
            name = femur_meta(layer.metadata).get("image_layer")
            if name and name in self.viewer.layers:
                cand = volume_from_layer(self.viewer.layers[name])
                if cand.shape == prob.shape and np.allclose(cand.affine, prob.affine, atol=1e-3):
                    image = cand
            self._pred, self._pred_of = Prediction.from_probability(prob, image, self.threshold), self._prob
        return self._pred
