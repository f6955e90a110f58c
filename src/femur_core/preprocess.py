"""From a scan to the model grid and back.

:func:`prepare` takes a :class:`~femur_core.volume.Volume` in any orientation,
brings it to the canonical (P, I, L) layout, optionally keeps the central N
slices (the study: 48), resamples in-plane to a target spacing or matrix size
(the study: 512 -> 256 with cubic interpolation) and normalises intensities.
:meth:`Prepared.restore_canonical` maps a probability map from the model grid
back onto the canonical source grid; :class:`femur_core.inference.Prediction`
takes it on to the source orientation, where metrics are always computed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .volume import Reorientation, Volume, to_canonical

__all__ = ["GridSpec", "Prepared", "normalise", "prepare", "resample_inplane"]


@dataclass
class GridSpec:
    """The model grid.

    Attributes
    ----------
    in_plane_spacing : float or None
        Target in-plane pixel size in mm (wins over ``in_plane_size``).
    in_plane_size : int or None
        Target in-plane matrix (the study: 256); None with no spacing keeps the grid.
    central_slices : int or None
        Keep only the central N coronal slices (the study: 48); None keeps all.
    """

    in_plane_spacing: float | None = None
    in_plane_size: int | None = None
    central_slices: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GridSpec":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass
class Prepared:
    """A scan on the model grid, with everything needed to map results back."""

    image: np.ndarray  # float32 (Z, Y, X), normalised
    mask: np.ndarray | None  # uint8 (Z, Y, X) on the model grid, if a mask was given
    canonical_shape: tuple[int, int, int]
    slice_range: tuple[int, int]
    spacing: tuple[float, float, float]  # model-grid spacing (mm)
    reorientation: Reorientation
    #: uint8 (Z, Y, X) training target with an extra class: 0 background, 1 femur (= ``mask``),
    #: 2 other bone; only when a label map was given
    labels: np.ndarray | None = None

    def restore_canonical(self, prob: np.ndarray) -> np.ndarray:
        """Probability map from the model grid onto the canonical source grid."""
        z0, z1 = self.slice_range
        out = np.zeros(self.canonical_shape, dtype=np.float32)
        out[z0:z1] = resample_inplane(prob, self.canonical_shape[1:], "bilinear")
        return out


def normalise(x: np.ndarray, lo_pct: float = 0.5, hi_pct: float = 99.5) -> np.ndarray:
    """Clip to robust percentiles and z-score over the volume (float32)."""
    x = np.asarray(x, dtype=np.float32)
    lo, hi = np.percentile(x, [lo_pct, hi_pct])
    x = np.clip(x, lo, hi)
    sd = float(x.std())
    return ((x - float(x.mean())) / (sd if sd > 0 else 1.0)).astype(np.float32)


def resample_inplane(x: np.ndarray, size: tuple[int, int], mode: str = "bicubic") -> np.ndarray:
    """Resample every slice of a (Z, Y, X) array to ``size`` = (Y', X').

    ``bicubic`` (with anti-aliasing when shrinking) for images, ``bilinear``
    for probabilities and masks.
    """
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[1:]) == size:
        return np.ascontiguousarray(x, dtype=np.float32)
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[:, None]
    shrinking = size[0] < x.shape[1] or size[1] < x.shape[2]
    kw = {"align_corners": False}
    if mode in ("bicubic", "bilinear") and shrinking:
        kw["antialias"] = True
    out = F.interpolate(t, size=size, mode=mode, **kw)[:, 0].numpy()
    return np.ascontiguousarray(out, dtype=np.float32)


def _target_size(shape_yx: tuple[int, int], spacing_yx: tuple[float, float], grid: GridSpec) -> tuple[int, int]:
    if grid.in_plane_spacing:
        return tuple(max(8, int(round(n * s / grid.in_plane_spacing))) for n, s in zip(shape_yx, spacing_yx))  # type: ignore[return-value]
    if grid.in_plane_size:
        f = grid.in_plane_size / max(shape_yx)
        return tuple(max(8, int(round(n * f))) for n in shape_yx)  # type: ignore[return-value]
    return tuple(shape_yx)  # type: ignore[return-value]


def prepare(image: Volume, grid: GridSpec, mask: Volume | None = None,
            labels: Volume | None = None) -> Prepared:
    """Bring a scan (and optionally its mask) to the model grid.

    Parameters
    ----------
    image : Volume
        The scan, any orientation.
    grid : GridSpec
        Target grid.
    mask : Volume, optional
        Reference mask on the image's grid.
    labels : Volume, optional
        Label map on the image's grid (0 background, 1 femur, 2 and up other
        bones); needs ``mask``. It becomes ``Prepared.labels``: the femur from
        ``mask``, every other bone label merged into class 2.

    Returns
    -------
    Prepared
    """
    canon, reo = to_canonical(image)
    cmask = to_canonical(mask)[0].data if mask is not None else None
    nz = canon.shape[0]
    z0, z1 = 0, nz
    if grid.central_slices and grid.central_slices < nz:
        z0 = (nz - grid.central_slices) // 2
        z1 = z0 + grid.central_slices
    sp = canon.spacing
    size = _target_size(canon.shape[1:], sp[1:], grid)
    img = resample_inplane(canon.data[z0:z1].astype(np.float32), size, "bicubic")
    img = normalise(img)
    msk = None
    if cmask is not None:
        msk = (resample_inplane(cmask[z0:z1].astype(np.float32), size, "bilinear") >= 0.5).astype(np.uint8)
    lab = None
    if labels is not None:
        if msk is None:
            raise ValueError("a label map needs the femur mask too")
        other = to_canonical(labels)[0].data[z0:z1] >= 2
        other = resample_inplane(other.astype(np.float32), size, "bilinear") >= 0.5
        lab = np.where(msk > 0, 1, np.where(other, 2, 0)).astype(np.uint8)
    spacing = (sp[0], sp[1] * canon.shape[1] / size[0], sp[2] * canon.shape[2] / size[1])
    return Prepared(img, msk, canon.shape, (z0, z1), spacing, reo, lab)
