"""Whole-scan prediction: from a scan on any grid to a probability map and mask on that grid.

:func:`predict_volume` brings the scan to the model grid, runs every member
network (and, with flip averaging, its left-right mirror) through the engine,
maps the mean probability back and returns a :class:`Prediction` (threshold
and cleanup on the source grid, at any operating point). :func:`predict_views`
is that pipeline with the views kept apart; :mod:`femur_core.uncertainty`
reads their disagreement.

The jobs around it live in their own modules, re-exported here so that
``femur_core.inference`` stays the one import for callers:
:mod:`femur_core.runtime` (device and precision policy),
:mod:`femur_core.model_loading` (:func:`load_model`, :class:`LoadedModel`),
:mod:`femur_core.tiling` (tile and window planning),
:mod:`femur_core.engine` (:func:`predict_array`: any registry network over
an array on the model grid) and :mod:`femur_core.cleanup` (threshold and one
component per hip side).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from .cleanup import body_midline, keep_largest_per_side, postprocess
from .engine import predict_array, predict_box
from .model_loading import LoadedModel, load_model
from .preprocess import Prepared, prepare
from .progress import CancelToken, ProgressCallback
from .roi import Box, box_fraction, roi_box, roi_margin
from .runtime import (autocast, cpu_bf16_conv3d_training_is_faster, memory_format, resolve_amp, resolve_device,
                      to_format)
from .tiling import TilePlan, tile_plan, window_plan
from .volume import Reorientation, Volume, from_canonical, to_canonical
from .volume_io import check_image

__all__ = [
    "LoadedModel", "Prediction", "ScanViews", "load_model", "predict_array", "predict_volume", "predict_views",
    "postprocess", "body_midline", "keep_largest_per_side", "resolve_device", "resolve_amp",
    "cpu_bf16_conv3d_training_is_faster", "memory_format", "to_format", "autocast", "TilePlan", "tile_plan",
    "window_plan",
]


@dataclass
class Prediction:
    """A whole-scan prediction that can be thresholded again at any point.

    It keeps the probability map in the canonical layout, the reorientation
    back to the scan's own grid and the body midline (where the cleanup splits
    the hip sides), so :meth:`mask_at` gives the mask of any threshold, with or
    without cleanup, on the source grid, without re-running the network.

    Attributes
    ----------
    prob_canonical : numpy.ndarray
        float32 femur probability, canonical (P, I, L) layout.
    reorientation : Reorientation
        From the source grid to the canonical layout and back.
    midline : float or None
        Body midline (canonical column index); None: the centre column.
    threshold, cleanup
        The operating point of :attr:`mask`.
    source : str or None
        The scan the prediction belongs to.
    """

    prob_canonical: np.ndarray
    reorientation: Reorientation
    midline: float | None
    threshold: float
    cleanup: bool = True
    source: str | None = None

    @classmethod
    def from_probability(cls, prob: Volume, image: Volume | None = None, threshold: float = 0.5,
                         cleanup: bool = True) -> "Prediction":
        """Wrap a probability map on any grid (e.g. a napari layer's voxels).

        ``image`` (the scan, on the same grid) gives the body midline; without
        it the hip sides are split at the centre column.
        """
        canon, reo = to_canonical(prob)
        midline = None
        if image is not None:
            if image.shape != prob.shape or not np.allclose(image.affine, prob.affine, atol=1e-3):
                raise ValueError(f"image {image.name} is not on the grid of probability map {prob.name}")
            midline = body_midline(to_canonical(image)[0].data)
        return cls(np.asarray(canon.data, dtype=np.float32), reo, midline, float(threshold), cleanup, prob.source)

    @functools.cached_property
    def prob(self) -> Volume:
        """The probability map on the source grid."""
        vol = from_canonical(self.prob_canonical, self.reorientation)
        vol.source = self.source
        return vol

    @functools.cached_property
    def mask(self) -> Volume:
        """The uint8 mask at :attr:`threshold` (cleaned if :attr:`cleanup`) on the source grid."""
        return self.mask_at(self.threshold, self.cleanup)

    def mask_at(self, threshold: float | None = None, cleanup: bool | None = None) -> Volume:
        """The uint8 mask of ``prob >= threshold`` on the source grid.

        Parameters
        ----------
        threshold : float, optional
            Default: :attr:`threshold`.
        cleanup : bool, optional
            Keep one component per hip side (split at :attr:`midline`, so it is
            right for any source orientation). Default: :attr:`cleanup`.
        """
        thr = self.threshold if threshold is None else float(threshold)
        clean = self.cleanup if cleanup is None else bool(cleanup)
        mask_c = postprocess(self.prob_canonical, thr, clean, midline=self.midline)
        vol = from_canonical(mask_c, self.reorientation)
        vol.source = self.source
        return vol


@dataclass
class ScanViews:
    """One scan through every view of a model: each member network, and its mirror with flip averaging.

    Attributes
    ----------
    image : Volume
        The scan (checked).
    prepared : Prepared
        The scan on the model grid, with the way back.
    mean : numpy.ndarray
        float32 mean probability of the views on the model grid (per member the
        mean of its view and mirrored view, then the mean over members).
    names : list of str
        ``"member<j>"`` / ``"member<j> flipped"`` per view.
    views : list of numpy.ndarray
        Each view's probability map on the model grid, when kept (``keep_views``); else empty.
    roi : tuple of slice or None
        The box (model grid) the views after the first predicted (ROI
        restriction); None: every view ran over the whole volume.
    """

    image: Volume
    prepared: Prepared
    mean: np.ndarray
    names: list[str] = field(default_factory=list)
    views: list[np.ndarray] = field(default_factory=list)
    roi: Box | None = None

    def prediction(self, threshold: float, cleanup: bool) -> Prediction:
        """The mean probability as a :class:`Prediction` on the scan's own grid."""
        prob_c = self.prepared.restore_canonical(self.mean)
        midline = body_midline(to_canonical(self.image)[0].data)
        return Prediction(prob_c, self.prepared.reorientation, midline, float(threshold), cleanup, self.image.source)


Regions = dict  # flipped (bool) -> (first view's map, box), both in that view's frame


def _roi_regions(first: np.ndarray, net, model_config, flip_tta: bool) -> Regions | None:
    """Where the later views run: the first view's ROI in the scan's frame and, with flip
    averaging, in the mirrored frame (aligned there); None: full passes (nothing found, or
    the box is the whole volume)."""
    div = tuple(net.divisor)
    margin = roi_margin(div, model_config.in_slices)
    align = div if len(div) == 3 else (1,) + div
    box = roi_box(first, margin=margin, align=align)
    if box is None or box_fraction(box, first.shape) >= 1.0:
        return None
    out = {False: (first, box)}
    if flip_tta:
        mirrored = np.ascontiguousarray(first[:, :, ::-1])
        out[True] = (mirrored, roi_box(mirrored, margin=margin, align=align))
    return out


def _view(net, model_config, x: np.ndarray, flipped: bool, regions: Regions | None, kw: dict) -> np.ndarray:
    """One view's map in the scan's frame: the network over ``x`` (mirrored if ``flipped``), in
    its ROI only where ``regions`` says."""
    if regions is None:
        p = predict_array(net, model_config, x, **kw)
    else:
        base, box = regions[flipped]
        p = predict_box(net, model_config, x, box, base, **kw)
    return np.ascontiguousarray(p[:, :, ::-1]) if flipped else p


def predict_views(
    model: LoadedModel,
    image: Volume,
    *,
    flip_tta: bool,
    device: str = "auto",
    precision: str = "auto",
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    keep_views: bool = False,
    roi: bool | None = None,
) -> ScanViews:
    """Run every view of ``model`` over a scan on the model grid (the pipeline of :func:`predict_volume`).

    Parameters
    ----------
    model : LoadedModel
        One network or an ensemble (``model.members``).
    image : Volume
        The scan (any orientation, size and spacing).
    flip_tta : bool
        Also run each member on the left-right mirrored scan.
    device, precision : str
        ``auto`` / ``cpu`` / ``cuda`` ...; ``auto`` / ``fp32`` / ``bf16``.
    keep_views : bool
        Keep every view's map (``ScanViews.views``), not only their mean.
    roi : bool, optional
        ROI restriction: the first view (member 0, not mirrored) runs over the
        whole volume; every later view predicts only the box where the first
        exceeds :data:`femur_core.roi.ROI_LEVEL` (grown and aligned by
        :func:`femur_core.roi.roi_box`) and is the first view's map outside
        it. Where the first view finds nothing, every view runs in full.
        Default: the model's own setting (:attr:`LoadedModel.roi_restrict`).
    """
    image = check_image(image)
    dev = resolve_device(device)
    kw = dict(device=dev, amp=resolve_amp(precision, dev), progress=progress, cancel=cancel)
    roi = model.roi_restrict if roi is None else bool(roi)
    prep = prepare(image, model.grid)
    frames = {False: prep.image}
    if flip_tta:
        frames[True] = np.ascontiguousarray(prep.image[:, :, ::-1])
    total, names, views, regions = None, [], [], None
    for j, net in enumerate(model.members):
        maps = []
        for flipped, x in frames.items():
            maps.append(_view(net, model.model_config, x, flipped, regions, kw))
            if roi and j == 0 and not flipped:  # the first view: the region of every later one
                regions = _roi_regions(maps[0], net, model.model_config, flip_tta)
        p_j = maps[0] if len(maps) == 1 else np.ascontiguousarray(0.5 * (maps[0] + maps[1]), dtype=np.float32)
        total = p_j if total is None else total + p_j
        names += [f"member{j}"] + ([f"member{j} flipped"] if flip_tta else [])
        if keep_views:
            views += maps
    box = regions[False][1] if regions else None
    return ScanViews(image, prep, total / len(model.members), names, views, box)


def predict_volume(
    model: LoadedModel,
    image: Volume,
    *,
    flip_tta: bool | None = None,
    cleanup: bool | None = None,
    threshold: float | None = None,
    device: str = "auto",
    precision: str = "auto",
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    roi: bool | None = None,
) -> Prediction:
    """Segment one scan: model grid, network, back to the source grid, threshold, cleanup.

    Parameters
    ----------
    model : LoadedModel
        From :func:`load_model`; an ensemble averages its members' probabilities.
    image : Volume
        The scan (any orientation, size and spacing).
    flip_tta, cleanup : bool, optional
        Left-right flip averaging; keep one component per hip side. Default:
        the model's own settings (:attr:`LoadedModel.flip_tta`, ``.cleanup``).
    threshold : float, optional
        Default: the model's PRC-optimal threshold from its validation data.
    device, precision : str
        ``auto`` / ``cpu`` / ``cuda`` ...; ``auto`` / ``fp32`` / ``bf16``.
    roi : bool, optional
        Later views in the first view's region of interest only (see
        :func:`predict_views`). Default: the model's own setting where
        ``cleanup`` is on, else off (:meth:`LoadedModel.roi_for`).

    Returns
    -------
    Prediction
        ``.prob`` and ``.mask`` on the scan's grid; ``.mask_at(t)`` for other thresholds.
    """
    flip_tta, cleanup, threshold = model.options(flip_tta, cleanup, threshold)
    views = predict_views(model, image, flip_tta=flip_tta, device=device, precision=precision, progress=progress,
                          cancel=cancel, roi=model.roi_for(cleanup, roi))
    return views.prediction(threshold, cleanup)
