"""napari reader: NIfTI files and DICOM series folders, shown in the canonical layout.

Every volume is brought to femur_core's canonical layout (coronal slices first,
then rows top to bottom, then columns) by a pure permutation / flip of axes and
given ``affine=napari_affine(canonical_affine)``, so napari shows coronal
slices in millimetres, in world coordinates (posterior, inferior, left).
The way back to the file's own grid is kept in ``layer.metadata["femur"]``,
which the writer uses.

Masks (an integer file whose name says mask / femur / label / seg / bones, or
that holds only 0 and 1) open as labels layers.

DICOM: compressed and enhanced multi-frame series open like any other
(:mod:`femur_core.dicom`). A folder holding several series opens as one layer
per series, named by series number, description and slice count (a series that cannot form a
3D volume, e.g. a localizer, is left out with a warning naming it); the chosen
layer is what the Segment widget segments. A scan read from DICOM keeps its
source files in ``metadata["femur"]["dicom"]``, so masks of it can be saved as
DICOM SEG.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from femur_core.dicom import list_series
from femur_core.errors import InputError
from femur_core.volume_io import read_volume
from femur_core.volume import Volume, to_canonical

from ._layers import layer_kwargs
from ._style import reference_kwargs

__all__ = ["get_reader", "read_paths", "volume_layer_data", "looks_like_mask"]

LayerDataTuple = tuple[Any, dict, str]

_NIFTI = (".nii", ".nii.gz")
_MASK_WORDS = re.compile(r"(mask|femur|label|labels|seg|segmentation|bones|gt|manual)", re.IGNORECASE)


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(_NIFTI)


def _looks_like_dicom_folder(path: Path, max_files: int = 16) -> bool:
    """A folder with at least one file carrying the DICOM preamble (or a .dcm name)."""
    try:
        entries = sorted(p for p in path.iterdir() if p.is_file())
    except OSError:
        return False
    for p in entries[:max_files]:
        if p.suffix.lower() == ".dcm":
            return True
        try:
            with open(p, "rb") as fh:
                head = fh.read(132)
        except OSError:
            continue
        if len(head) == 132 and head[128:132] == b"DICM":
            return True
    return False


def _stem(path: Path) -> str:
    name = path.name
    for ext in (".nii.gz", ".nii", ".dcm"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def looks_like_mask(vol: Volume, path: "str | os.PathLike | None" = None) -> bool:
    """Whether a volume should open as labels.

    Integer (or boolean) voxels that are all 0 / 1, or small non-negative
    integers in a file whose name says it is a mask.
    """
    data = np.asarray(vol.data)
    if data.dtype == bool:
        return True
    if not np.issubdtype(data.dtype, np.integer) or data.size == 0:
        return False
    lo, hi = int(data.min()), int(data.max())
    if lo < 0:
        return False
    if hi <= 1:
        return True
    name = Path(path).name if path is not None else ""
    return bool(_MASK_WORDS.search(name)) and hi <= 255


def volume_layer_data(
    vol: Volume,
    *,
    name: str,
    as_labels: bool | None = None,
    source: "str | os.PathLike | None" = None,
) -> LayerDataTuple:
    """A napari layer data tuple showing a volume in the canonical layout.

    Parameters
    ----------
    vol : Volume
        A volume in any orientation.
    name : str
        Layer name.
    as_labels : bool, optional
        Force labels (True) or image (False); default :func:`looks_like_mask`.
    source : str or path-like, optional
        Recorded as the layer's source scan.

    Returns
    -------
    tuple
        ``(data, kwargs, "image" | "labels")``.
    """
    labels = looks_like_mask(vol, source or vol.source) if as_labels is None else as_labels
    canon, reo = to_canonical(vol)
    if source is not None:
        canon.source = os.fspath(source)
    extra = {"dicom": vol.meta["dicom"]} if vol.meta.get("dicom") else {}
    kwargs = layer_kwargs(canon, reo, name=name, role="mask" if labels else "image", **extra)
    if labels:
        data = np.asarray(canon.data)
        if data.dtype == bool or data.dtype.itemsize > 4:
            data = data.astype(np.uint8 if int(data.max(initial=0)) <= 255 else np.int32)
        kwargs.update(reference_kwargs(data))  # a mask from a file: drawn in the reference colours
        return data, kwargs, "labels"
    data = np.asarray(canon.data)
    finite = data[np.isfinite(data)] if data.dtype.kind == "f" else data
    if finite.size:
        lo, hi = float(np.percentile(finite, 0.5)), float(np.percentile(finite, 99.5))
        if hi > lo:
            kwargs["contrast_limits"] = (lo, hi)
    kwargs["colormap"] = "gray"
    return data, kwargs, "image"


def read_paths(paths: "str | os.PathLike | Sequence[str | os.PathLike]") -> list[LayerDataTuple]:
    """Read NIfTI files / DICOM folders into layer data tuples.

    Raises
    ------
    femur_core.errors.InputError
        A path is unreadable, not 3D, holds several DICOM series, ... (the
        message names the file and the problem; napari shows it).
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    layers: list[LayerDataTuple] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            layers.extend(_read_dicom_folder(path))
            continue
        vol = read_volume(path)
        layers.append(volume_layer_data(vol, name=_stem(path), source=path))
    return layers


def _read_dicom_folder(folder: Path) -> list[LayerDataTuple]:
    """One layer per series of a DICOM folder (the only one, or each of several)."""
    series = list_series(folder)
    if len(series) == 1:
        return [volume_layer_data(read_volume(folder), name=folder.name, source=folder)]
    layers, failed = [], []
    for s in series:
        try:
            vol = read_volume(folder, series=s.uid)
        except InputError as exc:
            failed.append(f"{s.label()}: {exc.problem}")
            continue
        tag = f"#{s.number} " if s.number is not None else ""
        name = f"{folder.name} {tag}{s.description} ({s.n_slices} slices)"
        layers.append(volume_layer_data(vol, name=name, source=folder))
    if not layers:
        raise InputError(folder, f"none of its {len(series)} DICOM series forms a 3D volume: " + "; ".join(failed))
    if failed:
        import warnings

        warnings.warn(f"{folder}: {len(failed)} series left out: " + "; ".join(failed), stacklevel=2)
    return layers


def get_reader(path: "str | list[str]") -> Callable[..., list[LayerDataTuple]] | None:
    """npe2 reader contribution: a reader function for supported paths, else None.

    Parameters
    ----------
    path : str or list of str
        What napari was asked to open.

    Returns
    -------
    callable or None
        :func:`read_paths` if every path is a NIfTI file, a ``.dcm`` file or a
        folder that holds DICOM files; None otherwise (napari then tries
        other readers).
    """
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not paths:
        return None
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            if not _looks_like_dicom_folder(p):
                return None
        elif not (_is_nifti(p) or p.suffix.lower() == ".dcm"):
            return None
    return read_paths

