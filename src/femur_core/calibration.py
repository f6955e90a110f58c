"""The operating threshold of a probability map: the point of its precision-recall curve
closest to precision = recall = 1.

Training calibrates its model on the early-stopping subjects
(:func:`calibrate_threshold`); the study's cross-validation protocol on the scored
fold itself (:func:`threshold_from_counts` over the fold's summed histograms). Both
go through :func:`threshold_from_counts`, so they pick the same point of the same curve.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .metrics import curves_from_counts, histogram_counts, optimal_threshold

__all__ = ["THRESHOLD_BOUNDS", "threshold_from_counts", "calibrate_threshold"]

#: The PRC-optimal threshold of a few early-stopping subjects is kept inside these bounds:
#: a value at the very ends of [0, 1] says the probabilities are miscalibrated there, not
#: that a near-0 or near-1 cut generalises (seen: 0.004 on a 2-subject inner split).
THRESHOLD_BOUNDS = (0.05, 0.95)


def threshold_from_counts(pos: np.ndarray, neg: np.ndarray,
                          bounds: tuple[float, float] | None = THRESHOLD_BOUNDS) -> float:
    """The PRC-optimal threshold from per-bin voxel counts.

    Parameters
    ----------
    pos, neg : numpy.ndarray
        Reference-positive and -negative voxels per probability bin
        (:func:`femur_core.metrics.histogram_counts`, summed over scans).
    bounds : (float, float) or None
        Clip the result into these bounds; None keeps it as it is.

    Returns
    -------
    float
        0.5 where the reference holds no femur voxel.
    """
    if not np.asarray(pos).any():
        return 0.5
    thr = float(optimal_threshold(curves_from_counts(pos, neg)))
    return float(np.clip(thr, *bounds)) if bounds is not None else thr


def calibrate_threshold(probs: Sequence[np.ndarray], refs: Sequence[np.ndarray],
                        bounds: tuple[float, float] | None = THRESHOLD_BOUNDS) -> float:
    """The PRC-optimal threshold of probability maps against their reference masks, taken together.

    0.5 without any map or without femur voxels in the references.
    """
    pos = neg = None
    for prob, ref in zip(probs, refs):
        p, n = histogram_counts(prob, np.asarray(ref).astype(bool))
        pos, neg = (p, n) if pos is None else (pos + p, neg + n)
    if pos is None:
        return 0.5
    return threshold_from_counts(pos, neg, bounds)
