"""Loading trained models: a checkpoint file, a model folder or a cross-validation run folder.

:func:`load_model` reads weights safely (no unpickling of objects) into the
registry network the checkpoint names and returns a :class:`LoadedModel`: the
network(s), the model grid, the operating threshold and the inference defaults
stored with the model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .calibration import threshold_from_counts
from .checkpoint import load_checkpoint, load_weights_into, resolve_model_path
from .errors import ModelFileError
from .models.fuse import fold_batch_norm
from .models.registry import MODELS, ModelConfig, ModelKind, build_model
from .preprocess import GridSpec
from .roi import ROI_DEFAULT

__all__ = ["LoadedModel", "load_model"]

@dataclass
class LoadedModel:
    """A trained model ready to predict, with the settings it was trained with.

    An ensemble (the fold models of a cross-validation, or a model trained
    with ``TrainConfig.ensemble > 1``) has several ``members`` of one
    architecture; ``net`` is the first. Prediction averages the members'
    probabilities. The networks are inference copies in eval mode, with batch
    norm folded into the convolutions (:func:`femur_core.models.fuse.fold_batch_norm`).
    """

    net: torch.nn.Module
    model_config: ModelConfig
    grid: GridSpec
    threshold: float = 0.5
    path: Path | None = None
    train_config: dict = field(default_factory=dict)
    members: list[torch.nn.Module] = field(default_factory=list)
    threshold_source: str = ""

    def __post_init__(self) -> None:
        if not self.members:
            self.members = [self.net]

    @property
    def kind(self) -> ModelKind:
        return MODELS[self.model_config.name].kind

    @property
    def flip_tta(self) -> bool:
        """Inference default stored with the model: left-right flip averaging (``TrainConfig.flip_tta``)."""
        return bool(self.train_config.get("flip_tta", True))

    @property
    def cleanup(self) -> bool:
        """Inference default stored with the model: one component per hip side (``TrainConfig.cleanup``)."""
        return bool(self.train_config.get("cleanup", True))

    @property
    def roi_restrict(self) -> bool:
        """Inference default stored with the model (``roi_restrict`` in its configuration, else
        :data:`femur_core.roi.ROI_DEFAULT`): the views after the first predict only the region
        of interest the first one found (:func:`femur_core.inference.predict_views`)."""
        return bool(self.train_config.get("roi_restrict", ROI_DEFAULT))

    def roi_for(self, cleanup: bool, roi: bool | None = None) -> bool:
        """ROI restriction of a prediction: ``roi`` where given, else :attr:`roi_restrict` where
        the mask is cleaned up (one component per hip side). Without cleanup the first view's
        stray specks outside the box would stay in the mask unaveraged (bench/README.md, "Time of
        predict"), so it is off unless asked for."""
        return bool(roi) if roi is not None else self.roi_restrict and bool(cleanup)

    def options(self, flip_tta: bool | None = None, cleanup: bool | None = None,
                threshold: float | None = None) -> tuple[bool, bool, float]:
        """``(flip_tta, cleanup, threshold)`` for a prediction: each one given, else the model's own."""
        return (self.flip_tta if flip_tta is None else bool(flip_tta),
                self.cleanup if cleanup is None else bool(cleanup),
                self.threshold if threshold is None else float(threshold))


def _build_loaded(payload: dict, p: Path) -> LoadedModel:
    """The :class:`LoadedModel` of one checkpoint ``payload`` read from ``p``."""
    cfg = payload["config"]
    try:
        mc = ModelConfig.from_dict(cfg["model"])
        grid = GridSpec.from_dict(cfg.get("grid", {}))
        states = payload.get("member_state_dicts") or [payload["state_dict"]]
        nets = [build_model(mc) for _ in states]
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFileError(f"{p}: invalid model configuration ({exc})") from None
    for net, sd in zip(nets, states):
        load_weights_into(net, {"state_dict": sd}, p)
    nets = [fold_batch_norm(net) for net in nets]  # inference only: the same function, cheaper
    thr = payload.get("threshold", cfg.get("threshold", 0.5))
    thr = float(thr.item() if torch.is_tensor(thr) else thr)
    return LoadedModel(nets[0], mc, grid, thr, p, cfg, nets, str(payload.get("threshold_source", "")))


def _cv_run_models(folder: Path) -> list[Path]:
    """The fold models of a cross-validation run folder (``fold<k>/model.pt`` or ``best.pt``)."""
    out = []
    for d in sorted(folder.glob("fold*"), key=lambda q: (len(q.name), q.name)):
        if d.is_dir() and d.name[4:].isdigit():
            for cand in (d / "model.pt", d / "best.pt"):
                if cand.is_file():
                    out.append(cand)
                    break
    return out


def _cv_threshold(folder: Path, models: list[LoadedModel]) -> tuple[float, str]:
    """PRC-optimal threshold of a CV run's out-of-fold predictions (its ``fold*/curves.npz``),
    else the median of the fold models' thresholds."""
    files = sorted(folder.glob("fold*/curves.npz"))
    if files and len(files) == len(models):
        pos = neg = None
        for f in files:
            with np.load(f) as z:
                pos = z["pos"] if pos is None else pos + z["pos"]
                neg = z["neg"] if neg is None else neg + z["neg"]
        if pos is not None and pos.sum() > 0:
            thr = threshold_from_counts(pos, neg)
            return thr, f"out-of-fold predictions of the cross-validation ({len(files)} folds)"
    return float(np.median([m.threshold for m in models])), "median of the fold models' thresholds"


def load_model(path: "str | os.PathLike") -> LoadedModel:
    """Load a checkpoint file, a model folder, or a cross-validation run folder, safely.

    A run folder of a cross-validation (``fold<k>/`` models and no
    ``model.pt`` / ``best.pt`` of its own) loads as the ensemble of its fold
    models, with the threshold of their out-of-fold predictions.

    Raises
    ------
    ModelFileError
        Missing, unsafe (pickled objects), corrupt, or not matching its architecture.
    """
    folder = Path(path)
    if folder.is_dir() and not (folder / "model.pt").is_file() and not (folder / "best.pt").is_file():
        files = _cv_run_models(folder)
        if len(files) > 1:
            parts = [_build_loaded(load_checkpoint(f), f) for f in files]
            first = parts[0]
            for f, m in zip(files, parts):
                if m.model_config != first.model_config or m.grid != first.grid:
                    raise ModelFileError(f"{f}: its architecture or grid differs from {files[0]}; "
                                         "a run folder's fold models must match to be averaged")
            thr, source = _cv_threshold(folder, parts)
            return LoadedModel(first.net, first.model_config, first.grid, thr, folder, first.train_config,
                               [n for m in parts for n in m.members], source)
    p = resolve_model_path(path)
    return _build_loaded(load_checkpoint(p), p)
