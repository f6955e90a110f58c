"""Progress reporting and cancellation, passed into long-running work.

femur_core never knows who listens: the CLI passes a callback that drives a
tqdm bar, the napari plugin one that yields to a thread worker. Work checks a
:class:`CancelToken` between steps and raises :class:`~femur_core.errors.Cancelled`.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from .errors import Cancelled

__all__ = ["Stage", "ProgressEvent", "ProgressCallback", "CancelToken", "emit", "check_cancel"]


class Stage(str, Enum):
    """What a :class:`ProgressEvent` reports (a ``str``: ``Stage.TRAIN == "train"``).

    Members
    -------
    LOAD
        Reading data or a model (message only).
    RESUME
        Training continues from a checkpoint (the message says where).
    TRAIN
        One training step: ``step`` of ``total`` in epoch ``epoch``, with the running ``loss``.
    VALIDATE
        One early-stopping subject scored: ``step`` of ``total``.
    EPOCH_END
        An epoch finished: ``loss`` and ``val_dsc``.
    PREDICT
        Prediction of one scan: ``step`` of ``total`` slices, tiles or windows.
    SCORE
        Cross-validation: test subject ``step`` of ``total`` of fold ``fold`` predicted and scored.
    FOLD_END
        A cross-validation fold finished.
    FOLD_RESULT
        A cross-validation fold's result for a listener (``message``: the result as JSON;
        the Train panel's all-folds table).
    DONE
        A training run finished (the message sums it up).
    INFO
        A note for the status line.
    """

    LOAD = "load"
    RESUME = "resume"
    TRAIN = "train"
    VALIDATE = "validate"
    EPOCH_END = "epoch_end"
    PREDICT = "predict"
    SCORE = "score"
    FOLD_END = "fold_end"
    FOLD_RESULT = "fold_result"
    DONE = "done"
    INFO = "info"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class ProgressEvent:
    """One progress report.

    Attributes
    ----------
    stage : Stage
        What is running (see :class:`Stage`; its string value is accepted and
        converted, an unknown stage is a ``ValueError``).
    step, total : int
        Position within the stage (``total`` 0 when unknown).
    epoch, epochs : int
        Current epoch (1-based) and the epoch limit, where it applies.
    fold : int or None
        Cross-validation fold, where it applies.
    loss : float or None
        Training loss (running mean over the epoch so far).
    val_dsc : float or None
        Validation DSC at the end of an epoch (NaN or None for an epoch that
        was not validated, ``TrainConfig.validate_every``; see :attr:`validated`).
    message : str
        Free text for a status line.
    """

    stage: Stage
    step: int = 0
    total: int = 0
    epoch: int = 0
    epochs: int = 0
    fold: int | None = None
    loss: float | None = None
    val_dsc: float | None = None
    message: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "stage", Stage(self.stage))

    @property
    def validated(self) -> bool:
        """Whether the event carries a validation DSC (an epoch end that was validated)."""
        return self.val_dsc is not None and math.isfinite(self.val_dsc)


ProgressCallback = Callable[[ProgressEvent], None]


class CancelToken:
    """A thread-safe flag: the GUI (or a signal handler) sets it, the work checks it."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise Cancelled("cancelled by the user")


def emit(callback: ProgressCallback | None, event: ProgressEvent) -> None:
    """Call ``callback(event)`` if there is a callback."""
    if callback is not None:
        callback(event)


def check_cancel(token: CancelToken | None) -> None:
    """Raise :class:`Cancelled` if ``token`` is set."""
    if token is not None:
        token.raise_if_cancelled()
