"""Fine-tuning: continue training an existing model on added or corrected scans.

A model's weights only fit the architecture they were trained with, and its
intensities and pixel sizes only mean something on the grid it was trained
on. :func:`finetune_config` therefore takes the architecture (``model``), the
grid and the label-map setting from the model file, and everything about the
optimisation (loss, epochs, budget, augmentation, batch) from the recipe the
user chose, with a smaller learning rate: the weights are already good, the
new scans should adjust them, not overwrite them. Pass the model as
``init_from`` to :func:`femur_core.training.train_model` (or to
:func:`femur_core.train.train_final_model`, ``--init-from`` on the command line).
"""

from __future__ import annotations

import os

from .checkpoint import load_checkpoint, resolve_model_path
from .errors import ModelFileError
from .training import TrainConfig

__all__ = ["finetune_config", "DEFAULT_LR_SCALE"]

#: Learning rate of a fine-tuning run, relative to the recipe's.
DEFAULT_LR_SCALE = 0.1


def finetune_config(
    model_path: "str | os.PathLike",
    config: TrainConfig,
    lr_scale: float = DEFAULT_LR_SCALE,
) -> TrainConfig:
    """The training configuration that continues ``model_path`` with the recipe ``config``.

    Parameters
    ----------
    model_path : path-like
        A checkpoint (``model.pt`` / ``best.pt``) or a model / run folder.
    config : TrainConfig
        The recipe for the new run (optimisation settings).
    lr_scale : float
        Multiplies the recipe's learning rate (default 0.1).

    Returns
    -------
    TrainConfig
        ``config`` with the model's architecture, grid and ``aux_labels``, and
        ``lr * lr_scale``.

    Raises
    ------
    femur_core.errors.ModelFileError
        The file is not a napari-femur model, or its configuration is unusable.
    """
    path = resolve_model_path(model_path)
    payload = load_checkpoint(path)
    try:
        base = TrainConfig.from_dict(payload["config"])
    except Exception as exc:
        raise ModelFileError(f"{path}: its training configuration cannot be read ({exc})") from None
    if not lr_scale > 0:
        raise ValueError(f"lr_scale must be positive, got {lr_scale}")
    return config.replace(model=base.model, grid=base.grid, aux_labels=base.aux_labels,
                          lr=config.lr * float(lr_scale))
