"""Femur Analysis: right / left labels, volumes, surfaces and uncertainty of a femur mask layer.

A thin layer over femur_core: :func:`femur_core.analysis.side_labels` and
:func:`~femur_core.analysis.measure` (a Labels layer named per femur and a
table that copies to the clipboard), :func:`femur_core.mesh.femur_meshes`
(Surface layers in world millimetres, placed with the image), and
:func:`femur_core.uncertainty.predict_with_views` (an uncertainty layer, the
per-scan score, and "Next uncertain slice", which steps through the coronal
slices a reviewer should look at first). Meshes and uncertainty run in napari
thread workers.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import (
    QApplication,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QWidget,
)

from femur_core.analysis import LABEL_NAMES, LEFT, RIGHT, measure, side_labels
from femur_core.volume import Volume, napari_affine

from ._layers import derived_metadata, femur_meta, volume_from_layer, world_affine
from ._qt_utils import LayerComboBox, error_text, notify_error, same_placement, scrolling_layout

if TYPE_CHECKING:  # pragma: no cover
    import napari

__all__ = ["FemurAnalysisWidget", "SIDE_COLOURS", "table_text"]

#: Colours of the right and left femur (the plugin's prediction colours, label 1 / 2).
SIDE_COLOURS = {RIGHT: "#e69f00", LEFT: "#cc79a7"}


def table_text(rows: list[list[str]]) -> str:
    """Tab-separated lines (pastes as a table into spreadsheets)."""
    return "\n".join("\t".join(str(c) for c in r) for r in rows) + "\n"


def _is_femur_mask(layer: Any) -> bool:
    meta = femur_meta(layer.metadata)
    return meta.get("role") != "sides"


class FemurAnalysisWidget(QWidget):
    """Dock widget "Femur Analysis".

    Signals
    -------
    analysed(object)
        The right / left Labels layer after "Right / left and volumes".
    """

    analysed = Signal(object)
    surfaces_done = Signal(object)
    uncertainty_done = Signal(object)

    def __init__(self, napari_viewer: "napari.Viewer", parent: QWidget | None = None):
        super().__init__(parent)
        import napari

        self.viewer = napari_viewer
        self.worker: Any = None
        self.rows: list[list[str]] = []
        self._slices: np.ndarray = np.zeros(0, int)
        self._slice_pos = -1
        self._unc_layer: Any = None

        self.mask_combo = LayerComboBox(self.viewer, napari.layers.Labels, accept=_is_femur_mask, parent=self)
        self.mask_combo.setToolTip("A femur mask: a prediction of Segment Femur, or any mask on the scan's grid")
        self.sides_button = QPushButton("Right / left and volumes", self)
        self.sides_button.setToolTip("Label the subject's right (1) and left (2) femur from the scan's "
                                     "orientation, and measure each")
        self.table = QTableWidget(0, 3, self)
        self.table.setHorizontalHeaderLabels(["femur", "voxels", "volume mL"])
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QTableWidget.NoEditTriggers)
        self.table.setMinimumHeight(90)
        self.copy_button = QPushButton("Copy table", self)
        self.copy_button.setToolTip("Copy the measurements as tab-separated text (pastes into a spreadsheet)")
        self.copy_button.setEnabled(False)
        self.smooth_spin = QSpinBox(self)
        self.smooth_spin.setRange(0, 200)
        self.smooth_spin.setValue(10)
        self.smooth_spin.setToolTip("Taubin smoothing iterations; the volume is kept")
        self.mesh_button = QPushButton("Surfaces", self)
        self.mesh_button.setToolTip("A watertight surface per femur in world mm (save it with File > Save Selected Layers)")
        self.unc_button = QPushButton("Uncertainty", self)
        self.unc_button.setToolTip("Disagreement of the model's views (flip averaging, ensemble members) "
                                   "for the mask's image and model")
        self.next_button = QPushButton("Next uncertain slice", self)
        self.next_button.setToolTip("Jump to the coronal slice with the most disagreement, then the next")
        self.next_button.setEnabled(False)
        self.status = QLabel("", self)
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextSelectableByMouse)

        lay = scrolling_layout(self)
        form = QFormLayout()
        form.addRow("mask", self.mask_combo)
        lay.addLayout(form)
        lay.addWidget(self.sides_button)
        lay.addWidget(self.table)
        lay.addWidget(self.copy_button)
        row = QHBoxLayout()
        row.addWidget(QLabel("smoothing", self))
        row.addWidget(self.smooth_spin)
        row.addWidget(self.mesh_button, 1)
        lay.addLayout(row)
        row2 = QHBoxLayout()
        row2.addWidget(self.unc_button, 1)
        row2.addWidget(self.next_button, 1)
        lay.addLayout(row2)
        lay.addWidget(self.status)
        lay.addStretch(1)

        self.sides_button.clicked.connect(self.label_sides)
        self.copy_button.clicked.connect(self.copy_table)
        self.mesh_button.clicked.connect(self.make_surfaces)
        self.unc_button.clicked.connect(self.run_uncertainty)
        self.next_button.clicked.connect(self.next_uncertain_slice)

    # ------------------------------------------------------------------ helpers
    def _mask(self) -> tuple[Any, Volume] | None:
        layer = self.mask_combo.current_layer()
        if layer is None:
            self._fail("No mask layer: segment a scan with Segment Femur, or open a mask")
            return None
        try:
            return layer, volume_from_layer(layer)
        except Exception as exc:
            self._fail(error_text(exc))
            return None

    def _fail(self, text: str) -> None:
        self.status.setText(text)
        notify_error(text)

    def _image_layer(self, mask_layer: Any) -> Any:
        name = femur_meta(mask_layer.metadata).get("image_layer")
        return self.viewer.layers[name] if name and name in self.viewer.layers else None

    # ------------------------------------------------------------------ sides and volumes
    def label_sides(self) -> Any:
        """Add (or update) "<mask> sides": 1 right femur, 2 left; fill the table. Returns the layer."""
        got = self._mask()
        if got is None:
            return None
        layer, vol = got
        labels = side_labels(vol)
        ms = measure(labels)
        meta = femur_meta(layer.metadata)
        name = f"{layer.name} sides"
        features = {"index": [m.label for m in ms], "name": [LABEL_NAMES[m.label] for m in ms],
                    "volume_ml": [round(m.volume_ml, 3) for m in ms], "voxels": [m.voxels for m in ms]}
        md = derived_metadata(layer.metadata, world_affine(layer), role="sides", mask_layer=layer.name,
                              side_method=labels.meta.get("side_method"))
        from napari.utils.colormaps import DirectLabelColormap

        cmap = DirectLabelColormap(color_dict={0: "transparent", None: "#bbbbbb", **SIDE_COLOURS})
        data = np.ascontiguousarray(labels.data, dtype=np.uint8)
        if name in self.viewer.layers:
            out = self.viewer.layers[name]
            out.data, out.metadata, out.features = data, md, features
        else:
            out = self.viewer.add_labels(data, name=name, metadata=md, features=features, colormap=cmap,
                                         opacity=0.6, **same_placement(layer))
        self.rows = [["scan", "femur", "label", "voxels", "volume_ml", "threshold", "model"]]
        scan = meta.get("image_layer") or layer.name
        thr = meta.get("threshold")
        model = meta.get("model") or ""
        for m in ms:
            self.rows.append([scan, LABEL_NAMES[m.label], str(m.label), str(m.voxels), f"{m.volume_ml:.3f}",
                              "" if thr is None else f"{float(thr):.4f}", os.path.basename(str(model))])
        self.table.setRowCount(len(ms))
        for i, m in enumerate(ms):
            for j, v in enumerate((LABEL_NAMES[m.label], str(m.voxels), f"{m.volume_ml:.2f}")):
                item = QTableWidgetItem(v)
                if j:
                    item.setTextAlignment(int(Qt.AlignRight | Qt.AlignVCenter))
                self.table.setItem(i, j, item)
        self.table.resizeColumnsToContents()
        self.copy_button.setEnabled(bool(ms))
        how = {"pair": "two femurs", "shape": "one femur, side from its shape", "empty": "no femur"}
        extra = f"; threshold {float(thr):.3f}" if thr is not None else ""
        self.status.setText(f"{how.get(labels.meta.get('side_method'), '')}{extra}")
        self.analysed.emit(out)
        return out

    def copy_table(self) -> str:
        """Put the measurements on the clipboard as tab-separated text; returns it."""
        text = table_text(self.rows) if self.rows else ""
        QApplication.clipboard().setText(text)
        if text:
            self.status.setText(f"Copied {len(self.rows) - 1} row(s) to the clipboard.")
        return text

    # ------------------------------------------------------------------ surfaces
    def make_surfaces(self) -> Any:
        """Surface layers of each femur (thread worker); returns the worker or None."""
        from napari.qt.threading import create_worker

        if self.worker is not None:
            return None
        got = self._mask()
        if got is None:
            return None
        layer, vol = got
        smooth = self.smooth_spin.value()

        def job():
            from femur_core.mesh import femur_meshes

            return femur_meshes(side_labels(vol), smooth_iterations=smooth)

        return self._start(create_worker(job, _start_thread=False, _ignore_errors=True),
                           lambda meshes: self._add_surfaces(layer, meshes), "Meshing…")

    def _add_surfaces(self, layer: Any, meshes: dict) -> None:
        from napari.utils.colormaps import Colormap

        made = []
        to_world = napari_affine(np.eye(4))  # RAS mm -> the plugin's world axes (posterior, inferior, left)
        for k, mesh in meshes.items():
            name = f"{layer.name} {LABEL_NAMES[k]} surface"
            # vertices given in world axes (identity transform): a permuting layer affine would make
            # napari slice the surface "non-orthogonally" in 2D views
            verts = np.asarray(mesh.vertices, dtype=float) @ to_world[:3, :3].T + to_world[:3, 3]
            data = (verts.astype(np.float32), np.asarray(mesh.faces, dtype=np.int64))
            if name in self.viewer.layers:
                self.viewer.layers.remove(name)
            cmap = Colormap(["#000000", SIDE_COLOURS[k]], name=f"femur{k}")
            made.append(self.viewer.add_surface(
                data, name=name, colormap=cmap, units=("mm", "mm", "mm"), contrast_limits=(0.0, 1.0), opacity=0.7,
                metadata={"femur": {"role": "surface", "mask_layer": layer.name, "coordinates": "world (posterior, inferior, left) mm",
                                    "volume_ml": float(mesh.volume) / 1000, "watertight": bool(mesh.is_watertight)}},
            ))
        vols = ", ".join(f"{LABEL_NAMES[k]} {m.volume / 1000:.1f} mL" for k, m in meshes.items())
        self.status.setText(f"Surfaces: {vols}." if meshes else "No femur to mesh.")
        self.surfaces_done.emit(made)

    # ------------------------------------------------------------------ uncertainty
    def run_uncertainty(self) -> Any:
        """Views of the mask's model on the mask's image (thread worker); returns the worker or None."""
        from napari.qt.threading import create_worker

        from ._workers import iter_progress

        if self.worker is not None:
            return None
        layer = self.mask_combo.current_layer()
        if layer is None:
            self._fail("No mask layer: segment a scan with Segment Femur first")
            return None
        meta = femur_meta(layer.metadata)
        image_layer, model_path = self._image_layer(layer), meta.get("model")
        if image_layer is None or not model_path:
            self._fail(f"{layer.name} does not say which image and model made it: "
                       "choose a prediction made by Segment Femur")
            return None
        image = volume_from_layer(image_layer)
        cleanup, thr = bool(meta.get("cleanup", True)), meta.get("threshold")

        def job():
            from femur_core.inference import load_model
            from femur_core.uncertainty import predict_with_views

            model = load_model(model_path)
            return (yield from iter_progress(predict_with_views, model, image, cleanup=cleanup, threshold=thr,
                                             device="auto"))

        return self._start(create_worker(job, _start_thread=False, _ignore_errors=True),
                           lambda vp: self._add_uncertainty(image_layer, vp), "Predicting the model's views…")

    def _add_uncertainty(self, image_layer: Any, vp: Any) -> None:
        from femur_core.uncertainty import slice_order

        name = f"{image_layer.name} uncertainty"
        data = np.ascontiguousarray(vp.uncertainty.data, dtype=np.float32)
        md = derived_metadata(image_layer.metadata, world_affine(image_layer), role="uncertainty",
                              image_layer=image_layer.name, score=vp.score, views=vp.view_names)
        if name in self.viewer.layers:
            out = self.viewer.layers[name]
            out.data, out.metadata = data, md
        else:
            out = self.viewer.add_image(data, name=name, metadata=md, colormap="inferno",
                                        contrast_limits=(0.0, 1.0), blending="additive", opacity=0.8,
                                        **same_placement(image_layer))
        self._unc_layer = out
        self._slices = slice_order(data, axis=0)
        self._slice_pos = -1
        self.next_button.setEnabled(self._slices.size > 0)
        score = "n/a (one view)" if not np.isfinite(vp.score) else f"{vp.score:.4f}"
        self.status.setText(f"Uncertainty score {score} (1 - mean pairwise DSC of {vp.n_views} views); "
                            f"{self._slices.size} slice(s) with disagreement.")
        self.uncertainty_done.emit(out)

    def next_uncertain_slice(self) -> int | None:
        """Show the next slice in order of disagreement (wraps around); returns its index along axis 0."""
        if self._unc_layer is None or self._slices.size == 0:
            return None
        self._slice_pos = (self._slice_pos + 1) % self._slices.size
        z = int(self._slices[self._slice_pos])
        layer = self._unc_layer
        shape = np.asarray(layer.data.shape, float)
        centre = np.array([z, (shape[1] - 1) / 2, (shape[2] - 1) / 2])
        world = np.asarray(layer.data_to_world(centre), float)
        self.viewer.dims.ndisplay = 2
        self.viewer.dims.order = (0, 1, 2)
        self.viewer.dims.set_point(0, float(world[0]))
        self.status.setText(f"Slice {z}: {self._slice_pos + 1} of {self._slices.size} in order of disagreement.")
        return z

    # ------------------------------------------------------------------ workers
    def _start(self, worker: Any, on_result, text: str) -> Any:
        self.worker = worker
        for b in (self.mesh_button, self.unc_button):
            b.setEnabled(False)
        self.status.setText(text)

        def done(result):
            try:
                on_result(result)
            except Exception as exc:  # e.g. a layer was deleted meanwhile
                self.status.setText(notify_error(exc, "Could not show the result"))

        def failed(exc):
            self.status.setText(notify_error(exc, "Failed"))

        def finished():
            self.worker = None
            for b in (self.mesh_button, self.unc_button):
                b.setEnabled(True)

        worker.returned.connect(done)
        worker.errored.connect(failed)
        worker.finished.connect(finished)
        worker.start()
        return worker
