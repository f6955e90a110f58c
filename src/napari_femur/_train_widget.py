"""Train Fold: train a model while napari stays usable.

Three jobs, chosen under "train": **one fold** of a cross-validation, **all folds**
(the whole CV, with a table of per-fold results and the mean), or the **final
model** on every subject (the model to keep, as ``python -m femur_core.train``),
optionally **fine-tuned** from an existing model ("start from"), e.g. after
corrected scans were added to the data folder. The recipe follows the data
folder (:func:`femur_core.training.recipe_for_data`: ``cpu-2d`` for real scans,
``synthetic-quick`` for a synthetic cohort); the output goes beside the data
folder (``<data>-runs/<job>-<time>``) unless the user picks another one.

Training runs :func:`femur_core.cv.run_fold` (the same code and run-folder
layout as ``python -m femur_core.cv --fold k``: ``config.json``,
``splits.json``, ``fold<k>/last.pt`` / ``best.pt`` / ``history.csv`` /
``result.json``) in a separate process
(:func:`femur_core.worker_process.run_in_process`: training keeps the cores busy
and holds the interpreter lock, which from a thread of the viewer's process
stalled napari for up to half a second), relayed by a napari thread worker
(:func:`napari_femur._train_job.train_in_process`). femur_core's progress events
drive the progress bar and the live loss / validation-DSC plot (rendered off the
GUI thread, :attr:`~napari_femur._plots.TrainingCurvesCanvas.live`; while training,
the viewer's objects are left out of full garbage collections,
:func:`~napari_femur._workers.hold_long_lived_objects`); Cancel sets the
cancel token (the child's too), so training stops before its next step and
leaves a resumable ``last.pt``; Resume continues the same fold in the same
folder. With ``separate_process = False`` training runs in the worker thread
itself (the data folder is then read once per session). A finished
model is registered in the session store and offered by Segment Femur.

Open image + mask layers can be added as extra *training* pairs (they never go
to validation or testing); such runs train in ``fold<k>-with-layers/``.
"Add corrected mask to training data" writes the current image and a (painted,
corrected) labels layer back on the source grid as the next free
``subNN_image.nii.gz`` / ``subNN_femur.nii.gz`` pair of the data folder.
"""

from __future__ import annotations

import json
import os
import shlex
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QProgressBar,
    QPushButton,
    QSizePolicy,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QWidget,
)

from femur_core.cli import args_from_config, config_from_overrides
from femur_core.data import next_subject_id, subject_file
from femur_core.errors import Cancelled, InputError, OutputExistsError
from femur_core.models.registry import MODELS, default_config
from femur_core.progress import CancelToken, ProgressEvent
from femur_core.training import RECIPES, TrainConfig, best_validation_dsc, recipe_for_data

from ._layers import femur_meta, source_volume, world_affine
from ._plots import TrainingCurvesCanvas
from ._qt_utils import (
    LayerComboBox,
    PathPicker,
    disable_missing_devices,
    notify_error,
    notify_info,
    reset_view,
    reset_view_when_shown,
    scrolling_layout,
)
from ._session import session_models
from ._train_job import TrainOutcome, TrainPlan, read_history, train_in_process, train_job
from ._workers import hold_long_lived_objects, release_long_lived_objects

if TYPE_CHECKING:  # pragma: no cover
    import napari
    from femur_core.data import Subject

__all__ = ["TrainFoldWidget", "TrainPlan", "TrainOutcome", "train_job", "train_in_process", "add_training_pair",
           "next_subject_id", "MODES", "default_output", "read_history"]

#: What the Train button trains: key -> label in the "train" chooser.
MODES = {
    "fold": "one fold (k of K)",
    "cv": "all folds (cross-validation table)",
    "final": "final model on every subject",
}


def default_output(data_dir: "str | os.PathLike", mode: str) -> Path:
    """Where a run goes by default: beside the data folder, ``<data>-runs/<job>-<time>``."""
    data = Path(data_dir).resolve()
    return data.parent / f"{data.name}-runs" / f"{mode}-{time.strftime('%Y%m%d-%H%M%S')}"


# ---------------------------------------------------------------------------- pure helpers
def add_training_pair(image_layer: Any, mask_layer: Any, folder: "str | os.PathLike") -> tuple[Path, Path]:
    """Save an image layer and its mask as the next ``subNN`` pair of a data folder.

    Both go back to the source scan's grid and orientation (the image layer's
    geometry metadata), so the files match the folder's other subjects. The
    mask is binarised (every non-zero label is femur). Nothing is overwritten.

    Returns
    -------
    (Path, Path)
        The image and mask files written.

    Raises
    ------
    ValueError
        The mask is not on the image's voxel grid.
    femur_core.errors.OutputExistsError
        Never expected (the id is new), but never overwrites.
    """
    from femur_core.volume_io import write_volume

    img = np.asarray(image_layer.data)
    msk = np.asarray(mask_layer.data)
    if img.ndim != 3:
        raise ValueError(f"image layer {image_layer.name!r} is not 3D")
    if msk.shape != img.shape:
        raise ValueError(f"mask {mask_layer.name!r} has shape {msk.shape}, image {image_layer.name!r} "
                         f"{img.shape}: not on the same grid")
    w_img, w_msk = world_affine(image_layer), world_affine(mask_layer)
    if not np.allclose(w_img, w_msk, atol=1e-3):
        raise ValueError(f"mask {mask_layer.name!r} is not on the voxel grid of {image_layer.name!r} "
                         "(use the mask Segment Femur made, or one opened with this plugin)")
    if not np.any(msk):
        raise ValueError(f"mask {mask_layer.name!r} is empty")
    image_vol = source_volume(img, image_layer.metadata, w_img)
    mask_vol = source_volume((msk != 0).astype(np.uint8), image_layer.metadata, w_img)
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    sid = next_subject_id(out)
    img_path, msk_path = subject_file(out, sid, "image"), subject_file(out, sid, "femur")
    if img_path.exists() or msk_path.exists():  # pragma: no cover - next_subject_id avoids it
        raise OutputExistsError(img_path)
    write_volume(image_vol, img_path, overwrite=False)
    try:
        write_volume(mask_vol, msk_path, overwrite=False, dtype=np.uint8)
    except BaseException:
        img_path.unlink(missing_ok=True)
        raise
    return img_path, msk_path


# ---------------------------------------------------------------------------- widget
class TrainFoldWidget(QWidget):
    """Dock widget "Train Fold".

    Parameters
    ----------
    napari_viewer : napari.Viewer
        The viewer (napari passes it by this name).
    parent : QWidget, optional
        Parent widget.

    Attributes
    ----------
    config_overrides : dict
        Extra :class:`~femur_core.training.TrainConfig` fields applied last
        (e.g. a smaller model grid); empty by default.
    separate_process : bool
        Train in a child process (default), or in the worker thread (False).

    Signals
    -------
    trained(object)
        The :class:`~napari_femur._session.SessionModel` of a finished run.
    progressed(object)
        Every femur_core :class:`~femur_core.progress.ProgressEvent`, in the GUI thread.
    """

    trained = Signal(object)
    progressed = Signal(object)

    def __init__(self, napari_viewer: "napari.Viewer", parent: QWidget | None = None):
        super().__init__(parent)
        import napari

        self.viewer = napari_viewer
        self.worker: Any = None
        self._cancel: CancelToken | None = None
        self._plan: TrainPlan | None = None
        self._subject_cache: dict = {}
        self._config_overrides: dict = {}
        self._last_step_draw = 0.0  # monotonic time of the last mid-epoch redraw of the curves
        #: train in a child process (the default: the viewer stays responsive); False: in the worker thread
        self.separate_process = True
        self.last_outcome: TrainOutcome | None = None

        # data
        self.data_dir = PathPicker("folder", placeholder="folder of subNN_image / subNN_femur pairs", parent=self)
        self.use_layers = QCheckBox("add open image + mask layers as a training pair", self)
        self.pair_image = LayerComboBox(
            self.viewer, napari.layers.Image,
            accept=lambda layer: femur_meta(layer.metadata).get("role") != "probability", parent=self)
        self.pair_mask = LayerComboBox(self.viewer, napari.layers.Labels, parent=self)
        self.add_pair_button = QPushButton("Add corrected mask to training data", self)
        self.add_pair_button.setToolTip(
            "Save the image layer and the labels layer (e.g. a corrected Segment Femur mask) on the scan's "
            "own grid as the next subNN_image.nii.gz / subNN_femur.nii.gz of the data folder")
        # model and recipe
        self.recipe_combo = QComboBox(self)
        self.recipe_combo.addItems(list(RECIPES))
        self.recipe_combo.setToolTip("Named training recipes of femur_core (the CLI's --recipe)")
        self.model_combo = QComboBox(self)
        for name, spec in MODELS.items():
            self.model_combo.addItem(f"{name} ({spec.kind.upper()})", name)
            self.model_combo.setItemData(self.model_combo.count() - 1, spec.description, Qt.ToolTipRole)
        self.features = QSpinBox(self)
        self.features.setRange(2, 256)
        self.features.setToolTip("F: feature maps of the first level")
        self.levels = QSpinBox(self)
        self.levels.setRange(2, 7)
        self.levels.setToolTip("L: resolution levels per path")
        # folds and stopping
        self.n_folds = QSpinBox(self)
        self.n_folds.setRange(2, 20)
        self.n_folds.setValue(4)
        self.fold = QSpinBox(self)
        self.fold.setRange(0, 3)
        self.fold.setToolTip("Fold k is held out for testing (0-based, as --fold of python -m femur_core.cv)")
        self.seed = QSpinBox(self)
        self.seed.setRange(0, 1_000_000)
        self.epochs = QSpinBox(self)
        self.epochs.setRange(1, 10_000)
        self.epochs.setToolTip("Maximum epochs")
        self.patience = QSpinBox(self)
        self.patience.setRange(1, 1000)
        self.patience.setToolTip("Early stopping: stop when validation DSC has not improved for this many epochs")
        self.budget = QDoubleSpinBox(self)
        self.budget.setRange(0.0, 10_000.0)
        self.budget.setDecimals(1)
        self.budget.setSpecialValueText("no limit")
        self.budget.setSuffix(" min")
        self.budget.setToolTip("Wall-clock training budget (0 = no limit)")
        self.device_combo = QComboBox(self)
        self.device_combo.addItems(["auto", "cpu", "cuda"])
        self.device_combo.setToolTip("auto: CUDA if available, else CPU")
        disable_missing_devices(self.device_combo)
        self.out_dir = PathPicker("folder", placeholder="beside the data folder (<data>-runs/...)", parent=self)
        self.out_dir.setToolTip("Run / model folder. Filled in beside the data folder when you choose one; "
                                "type or pick another to keep it")
        self._out_auto = True  # the output follows the data folder until the user sets one
        # what to train
        self.mode_combo = QComboBox(self)
        for key, label in MODES.items():
            self.mode_combo.addItem(label, key)
        self.mode_combo.setToolTip(
            "one fold: train on the other folds, score fold k (a quick check);\n"
            "all folds: the whole cross-validation, one row per fold and the mean (how good is this recipe?);\n"
            "final model: every subject (a few held out for early stopping): the model to keep and use")
        self.init_from = PathPicker("file_or_folder", filter="Models (*.pt);;All files (*)",
                                    placeholder="(none: random start)", parent=self)
        self.init_from.setToolTip(
            "Fine-tune: start from this model (model.pt, best.pt or its folder) instead of a random start, "
            "e.g. after adding corrected scans to the data folder. Its architecture and grid are kept; the "
            "recipe's other settings apply with a 10x smaller learning rate")
        self.recipe_note = QLabel("", self)
        self.recipe_note.setWordWrap(True)
        self.cv_table = QTableWidget(0, 5, self)
        self.cv_table.setHorizontalHeaderLabels(["fold", "test subjects", "DSC", "threshold", "epochs"])
        self.cv_table.verticalHeader().setVisible(False)
        self.cv_table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.cv_table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeToContents)
        self.cv_table.horizontalHeader().setSectionResizeMode(1, QHeaderView.Stretch)
        self.cv_table.setMinimumHeight(90)
        # its columns must not widen the dock (that narrows the canvas and crops the scan): width 0 in layouts
        self.cv_table.setSizePolicy(QSizePolicy.Ignored, QSizePolicy.Preferred)
        self.cv_table.setToolTip("Per-fold results of the cross-validation (mean +- sd in the last row)")
        self.cv_table.hide()
        # actions
        self.train_button = QPushButton("Train", self)
        self.cancel_button = QPushButton("Cancel", self)
        self.resume_button = QPushButton("Resume", self)
        self.cancel_button.setEnabled(False)
        self.resume_button.setEnabled(False)
        self.resume_button.setToolTip("Continue the interrupted fold in the same run folder")
        self.progress = QProgressBar(self)
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.status = QLabel("", self)
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.command = QLabel("", self)
        self.command.setWordWrap(True)
        self.command.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.command.setToolTip("The same run from a terminal")
        self.plot = TrainingCurvesCanvas(self.viewer, parent=self)
        self.plot.live = True  # rendered off the GUI thread: a redraw stalled napari for 0.1-0.15 s

        data_box = QGroupBox("Training data", self)
        f = QFormLayout(data_box)
        f.addRow("data folder", self.data_dir)
        f.addRow("", self.recipe_note)
        f.addRow(self.use_layers)
        f.addRow("image", self.pair_image)
        f.addRow("mask", self.pair_mask)
        f.addRow(self.add_pair_button)
        model_box = QGroupBox("Model and fold", self)
        g = QFormLayout(model_box)
        g.addRow("train", self.mode_combo)
        g.addRow("start from", self.init_from)
        g.addRow("recipe", self.recipe_combo)
        g.addRow("model", self.model_combo)
        fl = QHBoxLayout()
        fl.addWidget(QLabel("F", self))
        fl.addWidget(self.features)
        fl.addWidget(QLabel("L", self))
        fl.addWidget(self.levels)
        g.addRow("features / levels", fl)
        kk = QHBoxLayout()
        kk.addWidget(self.fold)
        kk.addWidget(QLabel("of", self))
        kk.addWidget(self.n_folds)
        kk.addWidget(QLabel("seed", self))
        kk.addWidget(self.seed)
        g.addRow("fold", kk)
        g.addRow("max epochs", self.epochs)
        g.addRow("patience", self.patience)
        g.addRow("time budget", self.budget)
        g.addRow("device", self.device_combo)
        g.addRow("output", self.out_dir)
        lay = scrolling_layout(self)
        lay.addWidget(data_box)
        lay.addWidget(model_box)
        buttons = QHBoxLayout()
        buttons.addWidget(self.train_button, 1)
        buttons.addWidget(self.cancel_button)
        buttons.addWidget(self.resume_button)
        lay.addLayout(buttons)
        lay.addWidget(self.progress)
        lay.addWidget(self.status)
        lay.addWidget(self.plot, 1)
        lay.addWidget(self.cv_table)
        lay.addWidget(self.command)

        self.recipe_combo.currentTextChanged.connect(self._on_recipe)
        self.model_combo.currentIndexChanged.connect(self._on_model)
        self.n_folds.valueChanged.connect(lambda n: self.fold.setMaximum(n - 1))
        self.train_button.clicked.connect(lambda: self.start(resume=False))
        self.resume_button.clicked.connect(lambda: self.start(resume=True))
        self.cancel_button.clicked.connect(self.cancel)
        self.add_pair_button.clicked.connect(self.add_corrected_mask)
        self.use_layers.toggled.connect(self._sync_enabled)
        self.mode_combo.currentIndexChanged.connect(lambda _: self._on_mode())
        self.data_dir.path_changed.connect(lambda _: self._on_data_dir())
        self.out_dir.path_changed.connect(self._on_out_dir)
        self.init_from.path_changed.connect(lambda _: self._sync_enabled())
        self.epochs.valueChanged.connect(self._on_epochs)
        reset_view_when_shown(self, self.viewer)
        for w in (self.data_dir, self.out_dir):
            w.path_changed.connect(lambda _: self._sync_enabled())
        for w in (self.fold, self.n_folds, self.seed, self.features, self.levels, self.epochs, self.patience):
            w.valueChanged.connect(lambda _: self._update_command())
        self.budget.valueChanged.connect(lambda _: self._update_command())
        self.device_combo.currentTextChanged.connect(lambda _: self._update_command())
        default = recipe_for_data(None)  # the real-data default until a data folder says otherwise
        self.recipe_combo.setCurrentText(default)
        self._on_recipe(default)
        self._on_mode()
        self._sync_enabled()

    # ------------------------------------------------------------------ settings
    @property
    def mode(self) -> str:
        """``"fold"``, ``"cv"`` or ``"final"`` (see :data:`MODES`)."""
        return self.mode_combo.currentData()

    def set_mode(self, mode: str) -> None:
        """Choose what Train trains (a key of :data:`MODES`)."""
        self.mode_combo.setCurrentIndex(self.mode_combo.findData(mode))

    def _on_mode(self) -> None:
        mode = self.mode
        self.fold.setEnabled(mode == "fold")
        self.n_folds.setEnabled(mode != "final")
        self.init_from.setEnabled(mode == "final")
        self.cv_table.setVisible(mode == "cv" and self.cv_table.rowCount() > 0)
        self.train_button.setText({"fold": "Train fold", "cv": "Run cross-validation",
                                   "final": "Train final model"}[mode])
        self._auto_output()
        self._update_command()

    def _on_data_dir(self) -> None:
        """A new data folder: the recipe that fits it, and an output folder beside it."""
        data = self.data_dir.path()
        if data is not None and data.is_dir():
            name = recipe_for_data(data)
            if name in RECIPES and name != self.recipe_combo.currentText():
                self.recipe_combo.setCurrentText(name)  # -> _on_recipe
            what = "a synthetic cohort" if name == "synthetic-quick" else "scans (the real-data default)"
            self.recipe_note.setText(f"recipe {name}: {what}")
        else:
            self.recipe_note.setText("")
        self._auto_output()

    def _auto_output(self) -> None:
        data = self.data_dir.path()
        if self._out_auto and data is not None and data.is_dir():
            self._setting_out = True
            try:
                self.out_dir.set_path(default_output(data, self.mode))
            finally:
                self._setting_out = False

    def _on_out_dir(self, text: str) -> None:
        if not getattr(self, "_setting_out", False):  # set by the user (or a caller): keep it
            self._out_auto = not text.strip()

    def _on_epochs(self, value: int) -> None:
        self.plot.planned_epochs = int(value)
        if not self.plot.epochs and not self.plot.step_x:
            self.plot.redraw()

    @property
    def config_overrides(self) -> dict:
        """Extra TrainConfig fields applied last (setting them updates the terminal command)."""
        return self._config_overrides

    @config_overrides.setter
    def config_overrides(self, value: dict) -> None:
        self._config_overrides = dict(value)
        self._update_command()

    def _on_recipe(self, name: str) -> None:
        if name not in RECIPES:
            return
        cfg = RECIPES[name]
        idx = self.model_combo.findData(cfg.model.name)
        self.model_combo.blockSignals(True)
        self.model_combo.setCurrentIndex(max(idx, 0))
        self.model_combo.blockSignals(False)
        self.features.setValue(cfg.model.features)
        self.levels.setValue(cfg.model.levels)
        self.epochs.setValue(cfg.max_epochs)
        self.patience.setValue(cfg.patience)
        self.budget.setValue(cfg.max_minutes or 0.0)
        self._update_command()

    def _on_model(self, *_: Any) -> None:
        name = self.model_combo.currentData()
        defaults = default_config(name)
        self.features.setValue(defaults.features)
        self.levels.setValue(defaults.levels)
        self._update_command()

    def build_config(self) -> TrainConfig:
        """The recipe with the widget's settings (femur_core.cli.config_from_overrides, as the CLI)."""
        cfg = config_from_overrides(self.recipe_combo.currentText(), {
            "model": self.model_combo.currentData(), "features": self.features.value(),
            "levels": self.levels.value(), "epochs": self.epochs.value(), "patience": self.patience.value(),
            "budget_minutes": self.budget.value(), "seed": self.seed.value(),
            "device": self.device_combo.currentText(),
        })
        return cfg.replace(**self.config_overrides) if self.config_overrides else cfg

    def _update_command(self) -> None:
        from femur_core.cv import cv_command

        data = self.data_dir.path()
        out = self.out_dir.path()
        if data is None or out is None or (self.use_layers.isChecked() and self._layer_pair_ready()):
            self.command.setText("")
            return
        try:
            if self.mode == "final":
                cmd = ["python", "-m", "femur_core.train", "--data", os.fspath(data), "--out", os.fspath(out),
                       *args_from_config(self.build_config(), self.recipe_combo.currentText())]
                if self.init_from.path() is not None:
                    cmd += ["--init-from", os.fspath(self.init_from.path())]
            else:
                cmd = cv_command(self.build_config(), self.recipe_combo.currentText(), data=data, out=out,
                                 n_folds=self.n_folds.value(), fold=self.fold.value() if self.mode == "fold" else None)
        except ValueError as exc:
            self.command.setText(f"No terminal command for these settings: {exc}")
            return
        self.command.setText(f"Same run from a terminal: {shlex.join(cmd)}")

    def _layer_pair_ready(self) -> bool:
        return self.pair_image.current_layer() is not None and self.pair_mask.current_layer() is not None

    def _sync_enabled(self) -> None:
        running = self.worker is not None
        for w in (self.pair_image, self.pair_mask):
            w.setEnabled(self.use_layers.isChecked() and not running)
        self.train_button.setEnabled(not running)
        self.cancel_button.setEnabled(running)
        self.resume_button.setEnabled(not running and self._resumable())
        self._update_command()

    def current_plan(self, resume: bool = False) -> TrainPlan:
        """Gather a :class:`TrainPlan` from the widget (GUI thread).

        Raises
        ------
        InputError
            Missing data or output folder, or an unusable layer pair.
        """
        from femur_core.data import Subject
        from femur_core.volume_io import check_image, check_mask

        data = self.data_dir.path()
        if data is not None and not data.is_dir():
            raise InputError(data, "data folder does not exist")
        extra: list[Subject] = []
        if self.use_layers.isChecked():
            img_layer, msk_layer = self.pair_image.current_layer(), self.pair_mask.current_layer()
            if img_layer is None or msk_layer is None:
                raise InputError(None, "choose an image layer and a mask layer for the training pair")
            from ._layers import volume_from_layer

            img = volume_from_layer(img_layer)
            if np.asarray(msk_layer.data).shape != img.shape or not np.allclose(
                world_affine(msk_layer), world_affine(img_layer), atol=1e-3
            ):
                raise InputError(None, f"mask layer {msk_layer.name!r} is not on the grid of {img_layer.name!r}")
            msk = img.with_data((np.asarray(msk_layer.data) != 0).astype(np.uint8))
            img = check_image(img)
            extra.append(Subject(f"layer:{img_layer.name}", img, check_mask(msk, img)))
        if data is None and not extra:
            raise InputError(None, "choose a data folder, or tick 'add open image + mask layers'")
        out = self.out_dir.path()
        if out is None:
            raise InputError(None, "choose an output folder (it is filled in beside the data folder when you "
                                   "choose one)")
        cfg = self.build_config()
        init = self.init_from.path() if self.mode == "final" else None
        if init is not None:
            from femur_core.finetune import finetune_config

            cfg = finetune_config(init, cfg)
        if self.mode == "cv" and data is None:
            raise InputError(None, "a cross-validation needs a data folder")
        return TrainPlan(out, self.fold.value(), self.n_folds.value(), cfg, data, extra,
                         self.seed.value(), resume, self.mode, init)

    def _resumable(self) -> bool:
        plan = self._plan
        if plan is None:
            return False
        if plan.mode == "cv":  # any fold started and not finished
            return self.last_outcome is None and any(
                (plan.run_dir / f"fold{k}" / "last.pt").exists() and not (plan.run_dir / f"fold{k}" / "result.json").exists()
                for k in range(plan.n_folds))
        fd = plan.fold_dir
        finished = (fd / "result.json").exists() or (plan.mode == "final" and (plan.run_dir / "model.pt").exists())
        return (fd / "last.pt").exists() and not finished and self.last_outcome is None

    # ------------------------------------------------------------------ actions
    def start(self, resume: bool = False) -> Any:
        """Start (``resume=False``) or resume training in a thread worker; returns the worker or None."""
        from napari.qt.threading import create_worker

        if self.worker is not None:
            notify_info("Training is already running")
            return None
        try:
            if resume and self._plan is not None:
                plan = self._plan
                plan.resume = True
            else:
                plan = self.current_plan(resume)
                fd = plan.fold_dir
                if plan.mode == "fold" and not resume and ((fd / "last.pt").exists() or (fd / "result.json").exists()):
                    self._plan = plan
                    raise InputError(fd, "this fold was already trained or started here; press Resume to "
                                         "continue it, or choose another output folder")
        except Exception as exc:
            self.status.setText(notify_error(exc, "Cannot train"))
            self._sync_enabled()
            return None
        self._plan = plan
        self.last_outcome = None
        self._cancel = CancelToken()
        if resume:
            self.plot.reset(read_history(plan.fold_dir))
        else:
            self.plot.reset()
        if plan.mode == "cv" and not resume:
            self.cv_table.setRowCount(0)
        if self.separate_process:
            worker = create_worker(train_in_process, plan, self._cancel, _start_thread=False, _ignore_errors=True)
        else:
            worker = create_worker(train_job, plan, self._cancel, self._subject_cache,
                                   _start_thread=False, _ignore_errors=True)
        worker.yielded.connect(self._on_progress)
        worker.returned.connect(self._on_returned)
        worker.errored.connect(self._on_error)
        worker.finished.connect(self._on_finished)
        self.worker = worker
        self.progress.setRange(0, 0)
        what = {"fold": f"fold {plan.fold}", "cv": f"{plan.n_folds}-fold cross-validation",
                "final": "the final model"}[plan.mode]
        self.status.setText(("Resuming" if resume else "Starting") + f" {what} in {plan.run_dir}…")
        self._sync_enabled()
        # a full garbage collection of the viewer's objects stalls napari for about 0.3 s: while training,
        # collections leave the objects that exist now alone (released in _on_finished)
        hold_long_lived_objects()
        worker.start()
        return worker

    def cancel(self) -> None:
        """Stop training before its next step (a resumable state is saved)."""
        if self._cancel is not None:
            self._cancel.cancel()
            self.status.setText("Cancelling after the current step…")

    def _on_progress(self, ev: ProgressEvent) -> None:
        self.progressed.emit(ev)
        if ev.stage == "train":
            self.progress.setRange(0, max(ev.total, 1))
            self.progress.setValue(ev.step)
            loss = f", loss {ev.loss:.4f}" if ev.loss is not None else ""
            self.status.setText(f"Fold {ev.fold}: epoch {ev.epoch}/{ev.epochs}, step {ev.step}/{ev.total}{loss}")
            self.plot.add_step(ev.epoch, ev.step, ev.total, ev.loss)
            # a picture costs the render thread 0.1-0.15 s of CPU: at most one a second between epoch ends
            now = time.monotonic()
            if ev.step == ev.total or now - self._last_step_draw >= 1.0:
                self._last_step_draw = now
                self.plot.redraw()
        elif ev.stage == "validate":
            self.progress.setRange(0, 0)
            self.status.setText(f"Fold {ev.fold}: validating epoch {ev.epoch}…")
        elif ev.stage == "epoch_end":
            self.plot.add_epoch(ev.epoch, ev.loss, ev.val_dsc)
            self.plot.redraw()
            val = f"validation DSC {ev.val_dsc:.4f}" if ev.validated else "not validated"
            self.status.setText(f"Fold {ev.fold}: epoch {ev.epoch}: loss {ev.loss:.4f}, {val}")
        elif ev.stage == "fold_result":
            self._add_cv_row(json.loads(ev.message))
            self.plot.reset()
        elif ev.stage == "score":
            self.progress.setRange(0, max(ev.total, 1))
            self.progress.setValue(ev.step)
            self.status.setText(ev.message or "scoring the test fold")
        elif ev.message:
            self.status.setText(ev.message)

    def _on_error(self, exc: BaseException) -> None:
        if isinstance(exc, Cancelled):
            self.status.setText(f"Cancelled: {exc}. Press Resume to continue.")
            notify_info("Training cancelled; Resume continues it")
            return
        self.status.setText(notify_error(exc, "Training failed"))

    def _on_finished(self) -> None:
        release_long_lived_objects()
        self.worker = None
        self._cancel = None
        self.progress.setRange(0, 1)
        self.progress.setValue(1 if self.last_outcome is not None else 0)
        self._sync_enabled()

    def _add_cv_row(self, result: dict) -> None:
        """One finished fold of a cross-validation in the table."""
        dscs = [s["dsc"] for s in result.get("subjects", []) if s.get("dsc") is not None]
        row = self.cv_table.rowCount()
        self.cv_table.insertRow(row)
        cells = [str(result.get("fold", row)), ", ".join(result.get("test_subjects", [])),
                 f"{np.mean(dscs):.3f}" if dscs else "-", f"{float(result.get('threshold', float('nan'))):.3f}",
                 str(result.get("epochs", ""))]
        for c, text in enumerate(cells):
            self.cv_table.setItem(row, c, QTableWidgetItem(text))
        self.cv_table.setVisible(True)

    def _add_cv_summary(self, summary: dict) -> None:
        row = self.cv_table.rowCount()
        self.cv_table.insertRow(row)
        mean, sd = summary.get("dsc_mean", float("nan")), summary.get("dsc_sd", float("nan"))
        cells = ["mean", f"{summary.get('n_subjects', '')} subjects", f"{mean:.3f} ± {sd:.3f}", "", ""]
        for c, text in enumerate(cells):
            self.cv_table.setItem(row, c, QTableWidgetItem(text))

    def _on_returned(self, outcome: TrainOutcome) -> None:
        self.last_outcome = outcome
        plan = self._plan
        self.plot.reset(outcome.history)
        model_name = plan.config.model.name if plan is not None else "model"
        if plan is not None and plan.mode == "final":
            label = f"final {model_name}" + (" (fine-tuned)" if plan.init_from is not None else "")
        elif plan is not None and plan.mode == "cv":
            label = f"CV fold {plan.n_folds - 1}/{plan.n_folds} {model_name}"
            if outcome.cv_summary is not None:
                self._add_cv_summary(outcome.cv_summary)
        else:
            label = (f"fold {plan.fold}/{plan.n_folds} {model_name}" if plan is not None and plan.data_dir is not None
                     else f"{model_name} on layers")
        best = best_validation_dsc(outcome.history)
        scores = f"best validation DSC {best:.3f}"
        if outcome.test_dsc is not None:
            scores += (f", cross-validation DSC {outcome.test_dsc:.3f}" if plan is not None and plan.mode == "cv"
                       else f", test DSC {outcome.test_dsc:.3f}")
        desc = f"{label}: {scores} ({outcome.checkpoint})"
        entry = session_models().add(f"{label} ({plan.run_dir.name if plan is not None else ''})",
                                     outcome.checkpoint, desc,
                                     outcome.history)
        stopped = (outcome.stop_reason or "finished").replace("_", " ")
        note = f" {outcome.note[0].upper()}{outcome.note[1:]}." if outcome.note else ""
        self.status.setText(f"Done (stopped: {stopped}). {label}: {scores}.{note} "
                            f"Model {outcome.checkpoint}, now offered in Segment Femur.")
        notify_info(f"Model trained: {entry.name}")
        reset_view(self.viewer)
        self.trained.emit(entry)

    def add_corrected_mask(self) -> tuple[Path, Path] | None:
        """Save the chosen image + labels layers as the next subNN pair of the data folder."""
        folder = self.data_dir.path()
        img_layer, msk_layer = self.pair_image.current_layer(), self.pair_mask.current_layer()
        try:
            if folder is None:
                raise InputError(None, "choose the data folder to add the pair to")
            if img_layer is None or msk_layer is None:
                raise InputError(None, "choose the image layer and the (corrected) mask layer")
            paths = add_training_pair(img_layer, msk_layer, folder)
        except Exception as exc:
            self.status.setText(notify_error(exc, "Cannot add the pair"))
            return None
        self.status.setText(f"Added {paths[0].name} and {paths[1].name} to {folder}.")
        notify_info(f"Added {paths[0].name} + {paths[1].name}")
        return paths
