"""The region of interest of a scan, found by a first network pass, for the later passes.

An ensemble with flip averaging runs several views (member networks, mirrored
inputs) over the same scan. The femur fills a small part of it: on the
development scans about a quarter of the coronal slices and half of the
in-plane extent. With ROI restriction
(:func:`femur_core.inference.predict_views`, ``roi=True``) the first view runs
over the whole volume; :func:`roi_box` turns its probability map into a box
(where it exceeds :data:`ROI_LEVEL`, grown by a margin and aligned to the
network's pooling grid), and every later view predicts that box only: outside
it, its map is the first view's (:func:`paste`).

Nothing here imports torch; boxes are tuples of slices on the model grid.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

__all__ = ["ROI_LEVEL", "ROI_MIN_PART", "ROI_MARGIN_STRIDES", "ROI_DEFAULT", "Box", "roi_region", "roi_box", "roi_margin", "box_fraction", "paste"]

Box = tuple[slice, slice, slice]

#: First-pass probability above which a voxel is inside the region of interest.
#: Far below any operating threshold (the models' PRC-optimal thresholds are
#: 0.3 - 0.6): outside the box the mean of the views is the first view's
#: probability, < 0.05; for a voxel there to change the mask the other views
#: would have to average more than ~0.55 where the first says < 0.05.
ROI_LEVEL = 0.05

#: Connected parts of ``prob > ROI_LEVEL`` smaller than this share of the largest part are
#: left out of the box: on the development scans the first pass's two femurs are parts of
#: 6 000 - 7 500 voxels each on the model grid, and its stray low-probability specks (pelvis,
#: muscle, at most 0.7 probability) parts of at most 2.5 % of that, which would otherwise stretch
#: the box over most of the volume; the mask's cleanup (one component per hip side) removes them.
ROI_MIN_PART = 0.1

#: Whether prediction restricts the later views to the ROI when neither the
#: caller nor the model says (measured on the 15 development scans:
#: bench/roi_agreement.py, bench/README.md "Time of predict").
ROI_DEFAULT = True


#: In-plane margin of the box, in pooling strides of the network (its ``divisor``).
ROI_MARGIN_STRIDES = 4


def roi_margin(divisor: tuple[int, ...], in_slices: int = 1) -> tuple[int, int, int]:
    """Default margin (slices, rows, columns) of the box around the first pass's femur.

    In-plane: :data:`ROI_MARGIN_STRIDES` pooling strides of the network (64
    voxels, 115 mm, for a 5-level 2D U-Net on the 1.8 mm grid). A padded U-Net
    sees far: one member's view cropped with a margin of one stride differed
    from its full view by up to 0.98 in probability inside the box (view DSC
    0.955 on sub01), with two by 0.53, three 0.15, four 0.02, the level of
    bf16 rounding (bench/README.md "Time of predict"). Slices: a 2D network's
    neighbouring input slices plus two (its slices are predicted one by one);
    a 3D network: the same strides along every axis.
    """
    if len(divisor) == 3:
        return tuple(ROI_MARGIN_STRIDES * d for d in divisor)
    return (in_slices // 2 + 2, ROI_MARGIN_STRIDES * divisor[0], ROI_MARGIN_STRIDES * divisor[1])


def _grown(lo: int, hi: int, margin: int, align: int, size: int) -> slice:
    """``[lo, hi)`` grown by ``margin``, its ends on multiples of ``align`` (the end may be ``size``)."""
    start = max(0, lo - margin) // align * align
    stop = min(size, int(math.ceil(min(size, hi + margin) / align)) * align)
    return slice(start, stop)


def roi_region(prob: np.ndarray, level: float = ROI_LEVEL, min_part: float = ROI_MIN_PART) -> np.ndarray:
    """Voxels of ``prob > level`` in a connected part (26-connectivity) of at least ``min_part``
    times the voxels of the largest part (bool array; all False where none exceeds ``level``)."""
    hit = np.asarray(prob) > level
    labels, n = ndimage.label(hit, structure=np.ones((3, 3, 3), bool))
    if n <= 1:
        return hit
    sizes = np.bincount(labels.ravel())[1:]
    keep = np.flatnonzero(sizes >= min_part * sizes.max()) + 1
    return np.isin(labels, keep)


def roi_box(prob: np.ndarray, *, level: float = ROI_LEVEL, min_part: float = ROI_MIN_PART,
            margin: tuple[int, int, int] = (3, 64, 64), align: tuple[int, int, int] = (1, 16, 16)) -> Box | None:
    """The box of :func:`roi_region` (``prob > level``, stray specks left out), grown by ``margin``
    and aligned, inside the volume.

    Parameters
    ----------
    prob : numpy.ndarray
        (Z, Y, X) probability map of the first pass.
    level : float
        Probability above which a voxel is in the region of interest.
    min_part : float
        Connected parts smaller than this share of the largest are left out (0: none).
    margin : tuple of int
        Voxels added on every side, per axis (clipped at the volume's edges).
    align : tuple of int
        Per axis: the box starts on a multiple of this and ends on one or at
        the volume's edge, so the crop sits on the network's pooling grid
        like the whole volume does (a padded network then sees the same
        windows inside the box; the engine pads a box that ends at the edge
        exactly as it pads the whole volume).

    Returns
    -------
    tuple of slice or None
        None where no voxel exceeds ``level`` (the caller falls back to full passes).
    """
    hit = roi_region(prob, level, min_part)
    if not hit.any():
        return None
    box = []
    for axis in range(3):
        idx = np.flatnonzero(hit.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append(_grown(int(idx[0]), int(idx[-1]) + 1, margin[axis], align[axis], hit.shape[axis]))
    return tuple(box)


def box_fraction(box: Box, shape: tuple[int, ...]) -> float:
    """Share of a volume of ``shape`` that ``box`` covers (1.0: the whole volume)."""
    inside = np.prod([s.stop - s.start for s in box])
    return float(inside / np.prod(shape))


def paste(base: np.ndarray, part: np.ndarray, box: Box) -> np.ndarray:
    """A copy of ``base`` with ``part`` written into ``box`` (float32, C-contiguous)."""
    out = np.array(base, dtype=np.float32, copy=True)
    out[box] = part
    return out
