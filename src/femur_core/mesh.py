"""Surface meshes of femur masks in world millimetres, saved as STL and PLY.

:func:`surface_mesh` runs marching cubes (scikit-image) on a mask padded with
one empty voxel on every side (so the surface closes where the bone touches the
edge of the field of view), maps the vertices through the scan's affine into
RAS+ millimetres (the NIfTI world: x to the patient's right, y anterior, z
superior), and orients the triangles outwards. The mesh is a
:class:`trimesh.Trimesh` (trimesh: a widely used, numpy-only mesh library with
watertightness and volume checks and STL / PLY writers). Optional Taubin
smoothing removes the voxel staircase (it alternates a shrinking and an
inflating Laplacian step); the volume is then restored exactly by scaling
about the centre of mass.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import InputError
from .volume_io import atomic_write_bytes
from .volume import Volume

if TYPE_CHECKING:  # pragma: no cover
    import trimesh

__all__ = ["surface_mesh", "femur_meshes", "save_mesh", "MESH_FORMATS"]

#: File formats :func:`save_mesh` writes (by suffix).
MESH_FORMATS = ("stl", "ply")


def surface_mesh(mask: Volume, label: int | None = None, *, smooth_iterations: int = 0,
                 step_size: int = 1) -> "trimesh.Trimesh":
    """Closed, outward-oriented triangle surface of a mask, vertices in RAS+ mm.

    Parameters
    ----------
    mask : Volume
        Binary mask or label map on any grid (oblique, anisotropic, flipped).
    label : int, optional
        Mesh only the voxels equal to ``label`` (default: every non-zero voxel).
    smooth_iterations : int
        Taubin smoothing iterations (0: none), followed by a scaling about
        the centre of mass that restores the unsmoothed volume.
    step_size : int
        Marching-cubes step in voxels (> 1: coarser, fewer triangles).

    Returns
    -------
    trimesh.Trimesh
        Watertight for any mask (one shell per connected component).

    Raises
    ------
    InputError
        The mask holds no voxel of ``label``.
    """
    import trimesh
    from skimage.measure import marching_cubes

    data = np.asarray(mask.data)
    sel = data == label if label is not None else data != 0
    if not sel.any():
        what = f"label {label}" if label is not None else "foreground"
        raise InputError(mask.source, f"no {what} voxel to mesh")
    # crop to the bone (plus the padding voxel) so marching cubes runs on a small box
    nz = np.argwhere(sel)
    lo, hi = nz.min(axis=0), nz.max(axis=0) + 1
    box = np.pad(sel[tuple(slice(a, b) for a, b in zip(lo, hi))].astype(np.float32), 1)
    verts, faces, _, _ = marching_cubes(box, level=0.5, step_size=step_size, allow_degenerate=False)
    verts = verts - 1.0 + lo  # padded box index -> mask voxel index
    a = np.asarray(mask.affine, dtype=float)
    world = verts @ a[:3, :3].T + a[:3, 3]
    if np.linalg.det(a[:3, :3]) < 0:  # a mirroring affine turns the triangles inside out
        faces = faces[:, ::-1]
    m = trimesh.Trimesh(vertices=world, faces=faces, process=True)
    if m.volume < 0:  # marching cubes' winding differs between versions: orient outwards
        m.invert()
    if smooth_iterations > 0:
        vol0, centre = m.volume, m.center_mass
        trimesh.smoothing.filter_taubin(m, lamb=0.5, nu=0.53, iterations=int(smooth_iterations))
        # Taubin smoothing shrinks a thick-slice staircase by a few percent: restore the volume by
        # scaling about the centre of mass (what trimesh's filter_laplacian(volume_constraint=True) does)
        m.vertices = (m.vertices - centre) * (vol0 / m.volume) ** (1.0 / 3.0) + centre
    return m


def femur_meshes(labels: Volume, *, smooth_iterations: int = 0) -> dict[int, "trimesh.Trimesh"]:
    """One surface per label of a right / left label map (:mod:`femur_core.analysis`)."""
    out = {}
    for k in sorted(int(v) for v in np.unique(np.asarray(labels.data)) if v != 0):
        out[k] = surface_mesh(labels, k, smooth_iterations=smooth_iterations)
    return out


def save_mesh(mesh: "trimesh.Trimesh", path: "str | os.PathLike", overwrite: bool = False) -> Path:
    """Write a mesh as binary STL or PLY (by the file's suffix), atomically.

    Raises
    ------
    InputError
        Unknown suffix.
    OutputExistsError
        The file exists and ``overwrite`` is false.
    """
    p = Path(path)
    fmt = p.suffix.lower().lstrip(".")
    if fmt not in MESH_FORMATS:
        raise InputError(p, f"unknown mesh format {p.suffix!r} (use {', '.join('.' + f for f in MESH_FORMATS)})")
    payload = mesh.export(file_type=fmt)
    if isinstance(payload, str):
        payload = payload.encode("utf-8")
    return atomic_write_bytes(p, payload, overwrite=overwrite)
