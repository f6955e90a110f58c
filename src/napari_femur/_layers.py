"""Geometry bookkeeping between femur_core volumes and napari layers.

Layers made by this plugin hold voxels in femur_core's canonical layout
(axis 0 coronal slices, posterior; axis 1 rows, inferior; axis 2 columns, left)
with ``affine=napari_affine(canonical_affine)``, so napari shows coronal slices
in millimetres. ``layer.metadata["femur"]`` records how to go back to the
source scan's own grid and orientation::

    {
        "role": "image" | "mask" | "probability",
        "source": "/path/to/sub01_image.nii.gz" or None,
        "reorientation": Reorientation.to_dict() or None,
        "canonical_affine": 4 x 4 list (voxel -> RAS+ mm of the layer data),
        "display": "affine" or "orthogonal" (see below),
        "dicom": {...} (scans read from DICOM: the source files, for DICOM SEG),
        ...  # role-specific: "image_layer", "mask_layer", "threshold", "model"
    }

Oblique scans (slices a little off the scanner axes, like the development scans
tilted by about 1.8 degrees) are shown with ``scale`` and ``translate`` only, the
voxel grid placed in the nearest orthogonal orientation and centred where the
exact affine puts the volume's centre (:func:`display_placement`): with a rotation
in the layer transform napari warns "Non-orthogonal slicing is being requested"
on every slice change. The exact affine stays in ``canonical_affine`` and is what
every saved mask and every prediction uses; a layer still at its display
placement counts as unmoved.

Nothing here imports napari or Qt at module level, so the functions can be used
on the plain attribute dictionaries napari hands to writers.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from femur_core.volume import (
    Reorientation,
    Volume,
    affine_from_napari,
    from_canonical,
    napari_affine,
)

__all__ = [
    "META_KEY",
    "display_placement",
    "is_oblique",
    "geometry_metadata",
    "layer_kwargs",
    "femur_meta",
    "derived_metadata",
    "world_affine",
    "volume_from_layer",
    "source_volume",
]

#: Key of the plugin's entry in ``layer.metadata``.
META_KEY = "femur"

#: napari world axes of canonical layers (femur_core.volume.napari_affine).
AXIS_LABELS = ("posterior", "inferior", "left")


def is_oblique(canonical_affine: np.ndarray, tol: float = 1e-6) -> bool:
    """Whether a canonical volume's axes are off napari's world axes (a rotated scan)."""
    m = napari_affine(canonical_affine)[:3, :3]
    off = m - np.diag(np.diag(m))
    return bool(np.abs(off).max() > tol * np.abs(m).max())


def display_placement(canonical_affine: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """``scale`` and ``translate`` that show a (possibly oblique) canonical volume without rotation.

    The voxel size along each axis is kept; the volume's centre lands where the
    exact affine puts it (so the approximation error of an oblique scan is split
    evenly between its edges).
    """
    m = napari_affine(canonical_affine)
    lin = m[:3, :3]
    scale = np.sqrt((lin ** 2).sum(axis=0)) * np.sign(np.where(np.diag(lin) == 0, 1.0, np.diag(lin)))
    centre = (np.asarray(shape[-3:], dtype=float) - 1) / 2
    translate = (m @ np.append(centre, 1.0))[:3] - scale * centre
    return scale, translate


def display_matrix(canonical_affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The 4 x 4 data -> world matrix of :func:`display_placement`."""
    scale, translate = display_placement(canonical_affine, shape)
    out = np.diag(np.append(scale, 1.0))
    out[:3, 3] = translate
    return out


def geometry_metadata(
    canonical_affine: np.ndarray,
    reorientation: Reorientation | None,
    *,
    role: str,
    source: "str | os.PathLike | None" = None,
    **extra: Any,
) -> dict:
    """The ``metadata`` dict of a layer holding canonical-layout voxels.

    Parameters
    ----------
    canonical_affine : numpy.ndarray
        4 x 4 voxel -> RAS+ affine of the (canonical) layer data.
    reorientation : Reorientation or None
        How the source scan was brought to the canonical layout.
    role : str
        ``"image"``, ``"mask"`` or ``"probability"``.
    source : str or path-like, optional
        File or folder the scan came from.
    **extra
        Further JSON-friendly entries (``threshold``, ``image_layer`` ...).

    Returns
    -------
    dict
        ``{"femur": {...}}``, ready to pass as a layer's ``metadata``.
    """
    entry = {
        "role": role,
        "source": None if source is None else os.fspath(source),
        "reorientation": None if reorientation is None else reorientation.to_dict(),
        "canonical_affine": np.asarray(canonical_affine, dtype=float).tolist(),
    }
    entry.update(extra)
    return {META_KEY: entry}


def layer_kwargs(
    canon: Volume,
    reorientation: Reorientation | None,
    *,
    name: str,
    role: str,
    **extra: Any,
) -> dict:
    """Keyword arguments for a napari layer showing a canonical-layout volume.

    Parameters
    ----------
    canon : Volume
        Volume in the canonical layout (output of ``to_canonical``).
    reorientation : Reorientation or None
        What ``to_canonical`` returned, to map results back to the source grid.
    name : str
        Layer name.
    role : str
        ``"image"``, ``"mask"`` or ``"probability"``.
    **extra
        Further entries of the ``metadata["femur"]`` dict.

    Returns
    -------
    dict
        ``name``, ``affine`` (napari world = posterior, inferior, left in mm) or,
        for an oblique scan, ``scale`` and ``translate`` (:func:`display_placement`),
        ``metadata``, ``units`` and ``axis_labels``.
    """
    oblique = is_oblique(canon.affine)
    out = {
        "name": name,
        "metadata": geometry_metadata(
            canon.affine, reorientation, role=role, source=canon.source,
            display="orthogonal" if oblique else "affine", **extra
        ),
        "units": ("mm", "mm", "mm"),
        "axis_labels": AXIS_LABELS,
    }
    if oblique:
        out["scale"], out["translate"] = display_placement(canon.affine, canon.shape)
    else:
        out["affine"] = napari_affine(canon.affine)
    return out


def femur_meta(metadata: Mapping | None) -> dict:
    """The plugin's entry of a layer metadata dict (empty dict if absent)."""
    if not metadata:
        return {}
    entry = metadata.get(META_KEY)
    return dict(entry) if isinstance(entry, Mapping) else {}


def derived_metadata(metadata: Mapping | None, world: np.ndarray, *, role: str, **extra: Any) -> dict:
    """Metadata for a layer derived from an image layer (same grid, new role).

    Parameters
    ----------
    metadata : mapping or None
        The image layer's metadata.
    world : numpy.ndarray
        The image layer's full data -> world affine (see :func:`world_affine`),
        used when the image layer carries no geometry of ours.
    role : str
        Role of the new layer.
    **extra
        Further entries.
    """
    entry = copy.deepcopy(femur_meta(metadata))
    if "canonical_affine" not in entry:
        entry["canonical_affine"] = affine_from_napari(world).tolist()
        entry.setdefault("reorientation", None)
        entry.setdefault("source", None)
    entry["role"] = role
    entry.update(extra)
    return {META_KEY: entry}


def _attr(obj: Any, key: str, default: Any = None) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(key, default)
    return getattr(obj, key, default)


def world_affine(layer: Any, ndim: int = 3) -> np.ndarray:
    """Full data -> world affine of a napari layer (or of its state dict).

    napari maps data to world as ``affine @ (rotate * shear * scale + translate)``;
    this composes both parts into one ``(ndim + 1) x (ndim + 1)`` matrix.

    Parameters
    ----------
    layer : napari layer or mapping
        A layer, or the attribute dict napari passes to writers.
    ndim : int
        Number of spatial dimensions.
    """
    from napari.utils.transforms import Affine

    aff = _attr(layer, "affine")
    if aff is None:
        outer = np.eye(ndim + 1)
    elif hasattr(aff, "affine_matrix"):
        outer = np.asarray(aff.affine_matrix, dtype=float)
    else:
        outer = np.asarray(aff, dtype=float)
    scale = _attr(layer, "scale")
    translate = _attr(layer, "translate")
    rotate = _attr(layer, "rotate")
    shear = _attr(layer, "shear")
    inner = Affine(
        scale=np.ones(ndim) if scale is None else np.asarray(scale, dtype=float),
        translate=np.zeros(ndim) if translate is None else np.asarray(translate, dtype=float),
        rotate=None if rotate is None else np.asarray(rotate, dtype=float),
        shear=None if shear is None else np.asarray(shear, dtype=float),
        ndim=ndim,
    ).affine_matrix
    return outer @ inner


def volume_from_layer(layer: Any) -> Volume:
    """The voxels of a 3D layer as a :class:`Volume` with a voxel -> RAS+ affine.

    The array keeps the layer's axis order (canonical for layers this plugin
    made); the affine comes from the layer's transforms, so any correctly placed
    3D layer works.

    Raises
    ------
    ValueError
        The layer is not a single-channel 3D volume.
    """
    data = np.asarray(layer.data)
    if getattr(layer, "rgb", False):
        raise ValueError(f"layer {layer.name!r} is an RGB image; a grey-scale 3D MRI volume is needed")
    if data.ndim != 3:
        raise ValueError(
            f"layer {layer.name!r} is {data.ndim}D (shape {data.shape}); a 3D MRI volume is needed"
        )
    world = world_affine(layer)
    meta = femur_meta(layer.metadata)
    exact = _exact_affine(meta, world, data.shape)
    affine = exact if exact is not None else affine_from_napari(world)
    return Volume(data, affine, meta.get("source") or layer.name, {"layer": layer.name})


def _exact_affine(meta: Mapping, world: np.ndarray | None, shape: tuple[int, ...],
                  atol: float = 1e-3) -> np.ndarray | None:
    """The layer data's exact voxel -> RAS+ affine from its metadata, if the layer is unmoved.

    Unmoved: placed by the exact affine or by its orthogonal display placement.
    """
    canon = meta.get("canonical_affine")
    if canon is None:
        return None
    canon = np.asarray(canon, dtype=float)
    if world is None:
        return canon
    if np.allclose(napari_affine(canon), world, atol=atol):
        return canon
    if len(shape) == 3 and np.allclose(display_matrix(canon, shape), world, atol=atol):
        return canon
    return None


def _reorientation(meta: Mapping, world: np.ndarray | None, shape: tuple[int, ...] = (),
                   atol: float = 1e-3) -> Reorientation | None:
    """The stored reorientation, if present and still describing the layer's placement."""
    d = meta.get("reorientation")
    if not d:
        return None
    try:
        reo = Reorientation.from_dict(d)
    except (KeyError, TypeError, ValueError):
        return None
    if world is not None and meta.get("canonical_affine") is not None:
        # the user may have moved the layer since; then its own placement wins
        if _exact_affine(meta, world, shape, atol) is None:
            return None
    return reo


def source_volume(data: np.ndarray, metadata: Mapping | None, world: np.ndarray) -> Volume:
    """Map layer data back to the source scan's grid and orientation.

    Parameters
    ----------
    data : numpy.ndarray
        3D layer data (canonical layout when the layer came from this plugin).
    metadata : mapping or None
        Layer metadata; its ``"femur"`` entry gives the reorientation.
    world : numpy.ndarray
        The layer's full data -> world affine (:func:`world_affine`).

    Returns
    -------
    Volume
        With the source scan's array orientation and affine when the layer's
        geometry metadata is present and consistent; otherwise the layer data
        as is with ``affine_from_napari(world)``.
    """
    data = np.asarray(data)
    meta = femur_meta(metadata)
    reo = _reorientation(meta, world, data.shape)
    if reo is not None:
        try:
            vol = from_canonical(data, reo)
        except ValueError:
            vol = None
        if vol is not None:
            vol.source = meta.get("source")
            return vol
    return Volume(data, affine_from_napari(world), meta.get("source"))
