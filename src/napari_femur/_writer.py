"""napari writer: a labels layer -> NIfTI, NRRD, MHA or DICOM SEG on the source scan's own grid.

A mask drawn or predicted on a layer this plugin opened is in the canonical
layout; the writer maps it back with the reorientation stored in
``layer.metadata["femur"]``, so the file has the same array orientation, shape
and affine as the scan it belongs to (and overlays it in any viewer). A labels
layer without that metadata (or one the user has moved since) is written with
the affine of its own napari placement (``affine_from_napari``).

The file suffix picks the format (:data:`femur_core.export.MASK_FORMATS`):
``.nii.gz`` / ``.nii``, ``.nrrd``, ``.mha``, or ``.dcm`` / ``.seg.dcm`` for a DICOM
SEG, which needs the layer's scan to have been read from DICOM (its source files
are in ``metadata["femur"]["dicom"]``). Oblique scans are shown without rotation
(see :mod:`napari_femur._layers`) but saved with their exact affine.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from femur_core.export import MASK_FORMATS, format_of, write_mask
from femur_core.volume_io import write_volume
from femur_core.volume import Volume

from ._layers import femur_meta, source_volume, world_affine

__all__ = ["write_labels", "labels_to_volume"]


def _with_nifti_suffix(path: "str | os.PathLike") -> Path:
    """The path as given when it names a mask format, else with ``.nii.gz`` appended."""
    p = Path(path)
    if not p.name.lower().endswith(tuple(MASK_FORMATS.values()) + (".dcm",)):
        p = p.with_name(p.name + ".nii.gz")
    return p


def _label_dtype(data: np.ndarray) -> np.dtype:
    hi = int(data.max(initial=0)) if data.size else 0
    lo = int(data.min(initial=0)) if data.size else 0
    if lo >= 0 and hi <= 255:
        return np.dtype(np.uint8)
    if lo >= 0 and hi <= 65535:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


def labels_to_volume(data: Any, attributes: dict) -> Volume:
    """The labels as a :class:`Volume` on the source scan's grid.

    Parameters
    ----------
    data : array-like
        3D labels layer data.
    attributes : dict
        The layer state napari passes to writers (``metadata``, ``affine``,
        ``scale``, ``translate``, ...), or an equivalent dict.

    Raises
    ------
    ValueError
        The layer is not 3D.
    """
    arr = np.asarray(data)
    if arr.ndim != 3:
        raise ValueError(f"can only save 3D masks as NIfTI, this labels layer is {arr.ndim}D")
    world = world_affine(attributes, ndim=3)
    vol = source_volume(arr, attributes.get("metadata"), world)
    return Volume(np.ascontiguousarray(vol.data).astype(_label_dtype(arr)), vol.affine, vol.source)


def write_labels(path: str, data: Any, attributes: dict) -> list[str]:
    """npe2 single-layer writer for labels layers.

    Parameters
    ----------
    path : str
        Target file; its suffix picks the format (``.nii.gz`` is appended when it names none).
        napari's save dialog has already asked before replacing an existing
        file, so an existing target is overwritten here.
    data : array-like
        The labels.
    attributes : dict
        Layer state (metadata with the geometry, affine, scale ...).

    Returns
    -------
    list of str
        The written path.
    """
    target = _with_nifti_suffix(path)
    vol = labels_to_volume(data, attributes)
    if format_of(target) in ("nii", "nii.gz"):
        written = write_volume(vol, target, overwrite=True)  # keeps label values above 255
    else:
        dicom = femur_meta(attributes.get("metadata")).get("dicom")
        written = write_mask(vol, target, source=dicom, overwrite=True)
    return [os.fspath(written)]
