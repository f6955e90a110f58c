"""From a canonical probability map to a mask: threshold, then one component per hip side.

Every function works on arrays in the canonical (P, I, L) layout, where axis 2
is left-right; :class:`femur_core.inference.Prediction` brings the result back
to a scan's own grid.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["body_midline", "keep_largest_per_side", "postprocess"]

def body_midline(image: np.ndarray) -> float:
    """Left-right midline (column index) of the body: centroid of above-mean voxels."""
    img = np.asarray(image, dtype=np.float32)
    body = img > img.mean()
    if not body.any():
        return (img.shape[2] - 1) / 2
    per_column = body.sum(axis=(0, 1))
    return float((np.arange(img.shape[2]) * per_column).sum() / per_column.sum())


def keep_largest_per_side(mask: np.ndarray, midline: float | None = None, min_fraction: float = 0.2) -> np.ndarray:
    """Keep the largest 3D component, plus the largest one on the other hip side.

    The second femur is kept only if it lies across the left-right midline
    (canonical axis 2) from the first and holds at least ``min_fraction`` of its
    voxels, so single-hip scans keep one component as in the study.
    """
    mask = np.asarray(mask).astype(bool)
    lab, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if n <= 1:
        return mask.astype(np.uint8)
    sizes = np.bincount(lab.ravel())[1:]
    xs = np.bincount(lab.ravel(), weights=np.broadcast_to(np.arange(mask.shape[2]), mask.shape).ravel())[1:]
    cx = xs / np.maximum(sizes, 1)
    mid = (mask.shape[2] - 1) / 2 if midline is None else midline
    first = int(np.argmax(sizes))
    keep = [first + 1]
    other = [i for i in range(n) if (cx[i] < mid) != (cx[first] < mid)]
    if other:
        second = max(other, key=lambda i: sizes[i])
        if sizes[second] >= min_fraction * sizes[first]:
            keep.append(second + 1)
    return np.isin(lab, keep).astype(np.uint8)


def postprocess(prob: np.ndarray, threshold: float = 0.5, cleanup: bool = True,
                image: np.ndarray | None = None, *, midline: float | None = None) -> np.ndarray:
    """Threshold a canonical probability map and optionally keep one component per hip side.

    The hip sides are split at ``midline`` (canonical column index), else at the
    body midline of the canonical ``image``, else at the centre column.
    """
    mask = np.asarray(prob) >= threshold
    if cleanup:
        if midline is None and image is not None:
            midline = body_midline(image)
        return keep_largest_per_side(mask, midline)
    return mask.astype(np.uint8)
