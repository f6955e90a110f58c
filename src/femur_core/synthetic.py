"""Synthetic T1-weighted hip MRI with exact femur masks.

The project's embedded default data: CI, demos and the default cross-validation
run on it, and no real scan is ever needed to build or test the project.

Anatomy is built in continuous millimetre coordinates of a *body frame*
(RAS+ axes: x to the patient's right, y anterior, z superior; origin midway
between the two hip joint centres) from signed distance functions (SDFs) of a
few primitives (spheres, ellipsoids, tapered elliptic capsules), joined with a
smooth minimum. A small random pose rotation and offset map the body frame to
the world, and a geometry preset (:data:`GEOMETRIES`) decides how the world is
sampled on the voxel grid, so the same anatomy can be drawn as a thick-slice
whole-pelvis scan (``"dev"``), a thin-slice single-hip scan (``"study"``) or a
tiny unit-test volume (``"tiny"``).

What is drawn
-------------
* proximal femur: head (sphere), neck (tapered elliptic capsule at a random
  neck-shaft angle and anteversion), intertrochanteric region, greater and
  lesser trochanters (ellipsoids), upper shaft (tapered capsule); a dark
  cortical shell (thin at the head, thicker down the shaft) around bright,
  textured fatty marrow;
* pelvis: acetabular roof pressed against the femoral head with a thin dark
  joint space, ilium wing, pubic and ischial rami, all with the same marrow
  and cortex as the femur (so a threshold cannot tell them apart); sacrum and
  lumbar vertebrae with dark discs;
* soft tissue: subcutaneous fat ring, muscle with thin fat septa, psoas
  muscles, pelvic / abdominal contents (fat and bowel), bladder, air;
* acquisition: partial volume across thick slices (supersampled), in-plane
  supersampling for coarse pixels, a smooth multiplicative coil bias field and
  Rician noise.

The mask is exactly the femur (head, neck, trochanters, shaft, cortex
included): a voxel is in the mask when its centre lies inside the femur.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from .errors import OutputExistsError
from .volume import Volume

__all__ = [
    "BONE_LABELS",
    "GEOMETRIES",
    "make_subject",
    "make_cohort",
    "SYNTHETIC_MARKER",
    "threshold_baseline",
    "threshold_baseline_dsc",
]

#: File that :func:`make_cohort` leaves in a cohort folder (the folder is synthetic).
SYNTHETIC_MARKER = "synthetic.json"

#: Acquisition presets. ``matrix`` is the in-plane size (array axes 0 and 1),
#: ``pixel_mm`` the in-plane spacing, ``slice_mm`` the spacing of the coronal
#: slices (array axis 2), ``thickness_mm`` the slice thickness (partial volume),
#: ``n_slices`` an inclusive range drawn per subject. Arrays are laid out with
#: axis codes ``axcodes`` (axis 0 to patient Left, 1 Inferior, 2 Posterior).
#: ``hips_random`` gives the odds of ``hips="random"``; ``centre_both`` /
#: ``centre_one`` place the field of view in the body frame (x, y, z mm; for one
#: hip x is *lateral* from that hip centre), ``jitter_mm`` its random shift.
GEOMETRIES: dict[str, dict] = {
    "dev": {
        "description": "whole pelvis like the development data: 1.5 T coronal T1 TSE, "
        "384 x 384 of 0.911 mm, 4 mm slices 5.2 mm apart, both hips",
        "matrix": (384, 384),
        "pixel_mm": 0.911458,
        "slice_mm": 5.2,
        "thickness_mm": 4.0,
        "n_slices": (36, 48),
        "axcodes": ("L", "I", "P"),
        "hips_random": {"both": 0.8, "left": 0.1, "right": 0.1},
        "centre_both": (0.0, 14.0, 48.0),
        "centre_one": (35.0, 14.0, 48.0),
        "jitter_mm": (12.0, 8.0, 14.0),
    },
    "study": {
        "description": "one hip like the reference study: 3 T T1, 512 x 512 of 0.234 mm "
        "(12 cm field of view), 60 slices of 1.5 mm",
        "matrix": (512, 512),
        "pixel_mm": 0.234,
        "slice_mm": 1.5,
        "thickness_mm": 1.5,
        "n_slices": (60, 60),
        "axcodes": ("L", "I", "P"),
        "hips_random": {"left": 0.5, "right": 0.5},
        "centre_both": None,
        "centre_one": (10.0, -4.0, -18.0),
        "jitter_mm": (5.0, 4.0, 5.0),
    },
    "tiny": {
        "description": "unit-test size: 64 x 64 of 4.5 mm (29 cm field of view, both femurs), "
        "20 slices 5.2 mm apart",
        "matrix": (64, 64),
        "pixel_mm": 4.5,
        "slice_mm": 5.2,
        "thickness_mm": 4.0,
        "n_slices": (20, 20),
        "axcodes": ("L", "I", "P"),
        "hips_random": {"both": 0.8, "left": 0.1, "right": 0.1},
        "centre_both": (0.0, 4.0, -20.0),
        "centre_one": (25.0, 4.0, -20.0),
        "jitter_mm": (8.0, 4.0, 8.0),
    },
}

# tissue labels of the rendering (not exported: the mask is the only truth)
_AIR, _FAT, _MUSCLE, _VISCERA, _FLUID, _CORTEX, _MARROW, _DISC, _JOINT = range(9)
_N_TISSUES = 9
_BIG = np.float32(1e4)


# --------------------------------------------------------------------------- geometry


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=float)
    return v / np.linalg.norm(v)


def _perp(axis: np.ndarray, hint) -> np.ndarray:
    """Unit vector perpendicular to ``axis``, as close to ``hint`` as possible."""
    h = np.asarray(hint, dtype=float)
    h = h - axis * float(h @ axis)
    if np.linalg.norm(h) < 1e-6:
        h = np.cross(axis, [1.0, 0.0, 0.0])
        if np.linalg.norm(h) < 1e-6:
            h = np.cross(axis, [0.0, 1.0, 0.0])
    return _unit(h)


def _rotation(rx: float, ry: float, rz: float) -> np.ndarray:
    """Rotation matrix from angles (radians) about x, y and z, applied in that order."""
    cx, sx, cy, sy, cz, sz = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry), np.cos(rz), np.sin(rz)
    mx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    my = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    mz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return mz @ my @ mx


Points = tuple[np.ndarray, np.ndarray, np.ndarray]


@dataclass
class _Ellipsoid:
    """Ellipsoid with semi-axes ``radii`` along the rows of the rotation ``frame``."""

    centre: np.ndarray
    frame: np.ndarray  # 3 x 3, rows are unit axes
    radii: np.ndarray

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        ext = np.sqrt(((self.frame * self.radii[:, None]) ** 2).sum(axis=0))
        return self.centre - ext, self.centre + ext

    def sdf(self, p: Points) -> np.ndarray:
        dx, dy, dz = (p[i] - np.float32(self.centre[i]) for i in range(3))
        k0 = None
        k1 = None
        for ax, r in zip(self.frame.astype(np.float32), self.radii):
            u = dx * ax[0] + dy * ax[1] + dz * ax[2]
            a = (u / np.float32(r)) ** 2
            b = (u / np.float32(r * r)) ** 2
            k0 = a if k0 is None else k0 + a
            k1 = b if k1 is None else k1 + b
        k0 = np.sqrt(k0)
        k1 = np.sqrt(k1)
        return k0 * (k0 - 1) / np.maximum(k1, np.float32(1e-6))


@dataclass
class _Capsule:
    """Tapered capsule from ``a`` to ``b`` with an elliptic cross-section.

    The cross-section has radius ``ru`` along ``udir`` and ``rv`` along the third
    axis, both interpolated linearly from the ``a`` end to the ``b`` end.
    """

    a: np.ndarray
    b: np.ndarray
    ru: tuple[float, float]
    rv: tuple[float, float]
    udir: np.ndarray

    def _frame(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        axis = self.b - self.a
        length = float(np.linalg.norm(axis))
        e = axis / length
        u_ax = _perp(e, self.udir)
        return e, u_ax, np.cross(e, u_ax), length

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        e, u_ax, v_ax, _ = self._frame()
        lo, hi = [], []
        for end, ru, rv in ((self.a, self.ru[0], self.rv[0]), (self.b, self.ru[1], self.rv[1])):
            ext = np.sqrt((u_ax * ru) ** 2 + (v_ax * rv) ** 2 + (e * min(ru, rv)) ** 2)
            lo.append(end - ext)
            hi.append(end + ext)
        return np.minimum(*lo), np.maximum(*hi)

    def sdf(self, p: Points) -> np.ndarray:
        e, u_ax, v_ax, length = self._frame()
        f32 = np.float32
        v = _project(p, self.a, v_ax)
        rv_max = max(self.rv)
        if max(self.ru) > 2 * rv_max and v.size > 4096:
            # thin plate (ilium, sacrum): only points near its mid-plane need the full formula
            far = np.abs(v) - f32(rv_max)
            near = far < f32(16.0)
            if near.mean() < 0.6:
                sub = tuple(c[near] for c in p)
                far[near] = self._sdf(sub, v[near], e, u_ax, length)
                return far
        return self._sdf(p, v, e, u_ax, length)

    def _sdf(self, p: Points, v: np.ndarray, e, u_ax, length: float) -> np.ndarray:
        f32 = np.float32
        s = _project(p, self.a, e)
        t = np.clip(s * f32(1 / length), 0, 1)
        s -= t * f32(length)  # s is now the axial overshoot beyond the ends
        u = _project(p, self.a, u_ax)
        if self.ru[0] == self.ru[1]:
            ru = f32(self.ru[0])
        else:
            ru = f32(self.ru[0]) + f32(self.ru[1] - self.ru[0]) * t
        if self.rv[0] == self.rv[1]:
            rv = f32(self.rv[0])
        else:
            rv = f32(self.rv[0]) + f32(self.rv[1] - self.rv[0]) * t
        rw = np.minimum(ru, rv)
        u /= ru
        v = v / rv
        s /= rw
        k0 = u * u + v * v + s * s
        np.sqrt(k0, out=k0)
        u /= ru
        v /= rv
        s /= rw
        k1 = u * u + v * v + s * s
        np.sqrt(k1, out=k1)
        np.maximum(k1, f32(1e-6), out=k1)
        out = k0 - 1
        out *= k0
        out /= k1
        return out


def _project(p: Points, origin: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """Signed coordinate of points ``p`` along a unit ``direction`` from ``origin`` (float32)."""
    f32 = np.float32
    out = p[0] * f32(direction[0])
    out += p[1] * f32(direction[1])
    out += p[2] * f32(direction[2])
    out -= f32(float(np.dot(origin, direction)))
    return out


@dataclass
class _Sphere:
    centre: np.ndarray
    radius: float

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        return self.centre - self.radius, self.centre + self.radius

    def sdf(self, p: Points) -> np.ndarray:
        c = self.centre.astype(np.float32)
        return np.sqrt((p[0] - c[0]) ** 2 + (p[1] - c[1]) ** 2 + (p[2] - c[2]) ** 2) - np.float32(self.radius)


@dataclass
class _Cylinder:
    """Flat-ended cylinder (vertebral body) with an elliptic cross-section and rounded rims.

    Axis from ``a`` to ``b``; radius ``ru`` along ``udir``, ``rv`` across; rim
    rounding ``round_mm``.
    """

    a: np.ndarray
    b: np.ndarray
    ru: float
    rv: float
    udir: np.ndarray
    round_mm: float = 3.0

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        return _Capsule(self.a, self.b, (self.ru, self.ru), (self.rv, self.rv), self.udir).bounds()

    def sdf(self, p: Points) -> np.ndarray:
        e, u_ax, v_ax, length = _Capsule(self.a, self.b, (self.ru,) * 2, (self.rv,) * 2, self.udir)._frame()
        f32 = np.float32
        r = self.round_mm
        mid = (self.a + self.b) / 2
        dx, dy, dz = (p[i] - f32(mid[i]) for i in range(3))
        s = np.abs(dx * f32(e[0]) + dy * f32(e[1]) + dz * f32(e[2])) - f32(length / 2 - r)
        u = (dx * f32(u_ax[0]) + dy * f32(u_ax[1]) + dz * f32(u_ax[2])) / f32(self.ru - r)
        v = (dx * f32(v_ax[0]) + dy * f32(v_ax[1]) + dz * f32(v_ax[2])) / f32(self.rv - r)
        k0 = np.sqrt(u * u + v * v)
        k1 = np.sqrt((u / f32(self.ru - r)) ** 2 + (v / f32(self.rv - r)) ** 2)
        dr = k0 * (k0 - 1) / np.maximum(k1, f32(1e-6))
        out = np.sqrt(np.maximum(dr, 0) ** 2 + np.maximum(s, 0) ** 2) + np.minimum(np.maximum(dr, s), 0)
        return out - f32(r)


def _smin(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Polynomial smooth minimum (exact minimum where ``|a - b| >= k``)."""
    if k <= 0:
        return np.minimum(a, b)
    h = np.maximum(np.float32(k) - np.abs(a - b), 0) / np.float32(k)
    return np.minimum(a, b) - h * h * np.float32(k / 4)


@dataclass
class _Bone:
    """A bone: smooth union of primitives, optional spherical carve, cortex thickness.

    ``cortex`` is the cortical thickness in mm; ``cortex_axis`` (origin, unit
    direction, start, length, extra) thickens it by up to ``extra`` mm along a
    direction (the femoral shaft).
    """

    parts: list
    k: float
    cortex: float
    carve: _Sphere | None = None
    cortex_axis: tuple | None = None

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = zip(*(p.bounds() for p in self.parts))
        return np.min(lo, axis=0), np.max(hi, axis=0)


# --------------------------------------------------------------------------- grid


class _Grid:
    """Sample positions on (a supersampling of) the voxel grid, and their body-frame map.

    ``coords[ax]`` holds, for every sample index along array axis ``ax``, its
    position in (fractional) voxel indices of the image grid; the positions are
    increasing, so body-frame boxes map to index ranges with a binary search.
    """

    def __init__(self, vox_to_body: np.ndarray, coords: list[np.ndarray]):
        self.vox_to_body = vox_to_body
        self.body_to_vox = np.linalg.inv(vox_to_body)
        self.coords = [np.asarray(c, dtype=np.float64) for c in coords]
        self.shape = tuple(len(c) for c in self.coords)

    @classmethod
    def voxel_centres(cls, vox_to_body: np.ndarray, shape) -> "_Grid":
        return cls(vox_to_body, [np.arange(n, dtype=np.float64) for n in shape])

    @classmethod
    def supersampled(cls, vox_to_body: np.ndarray, shape, n_xy: int, z_offsets: np.ndarray) -> "_Grid":
        """``n_xy`` x ``n_xy`` samples in-plane per voxel, one per ``z_offsets`` (voxels) across the slice."""
        sub = (np.arange(n_xy) + 0.5) / n_xy - 0.5
        c0 = (np.arange(shape[0])[:, None] + sub[None, :]).ravel()
        c1 = (np.arange(shape[1])[:, None] + sub[None, :]).ravel()
        c2 = (np.arange(shape[2])[:, None] + np.asarray(z_offsets)[None, :]).ravel()
        return cls(vox_to_body, [c0, c1, c2])

    def box(self, lo: np.ndarray, hi: np.ndarray, margin: float) -> tuple[slice, ...] | None:
        """Sample index slices covering a body-frame box (plus ``margin`` mm), or None."""
        lo = np.asarray(lo) - margin
        hi = np.asarray(hi) + margin
        corners = np.array([[x, y, z, 1.0] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
        idx = (self.body_to_vox @ corners.T)[:3]
        out = []
        for ax in range(3):
            i0 = int(np.searchsorted(self.coords[ax], idx[ax].min() - 0.5, side="left"))
            i1 = int(np.searchsorted(self.coords[ax], idx[ax].max() + 0.5, side="right"))
            if i1 <= i0:
                return None
            out.append(slice(i0, i1))
        return tuple(out)

    def points(self, sl: tuple[slice, ...]) -> Points:
        """Body-frame coordinates (float32 arrays) of the samples in ``sl``."""
        m = self.vox_to_body
        ii, jj, kk = (self.coords[ax][sl[ax]] for ax in range(3))
        out = []
        for r in range(3):
            a = (m[r, 0] * ii + m[r, 3]).astype(np.float32)[:, None, None]
            b = (m[r, 1] * jj).astype(np.float32)[None, :, None]
            c = (m[r, 2] * kk).astype(np.float32)[None, None, :]
            out.append((a + b) + c)
        return out[0], out[1], out[2]


def _bone_sdf(grid: _Grid, bone: _Bone, margin: float = 8.0):
    """Evaluate a bone's SDF in its bounding box; returns (slices, sdf, cortex) or None."""
    lo, hi = bone.bounds()
    sl = grid.box(lo, hi, margin)
    if sl is None:
        return None
    p = grid.points(sl)
    d = np.full(p[0].shape, _BIG, dtype=np.float32)
    for part in bone.parts:
        plo, phi = part.bounds()
        psl = grid.box(plo, phi, bone.k + 2.0)
        if psl is None:
            continue
        # part box relative to the bone box
        rel = tuple(slice(max(a.start - b.start, 0), min(a.stop, b.stop) - b.start) for a, b in zip(psl, sl))
        if any(r.stop <= r.start for r in rel):
            continue
        sub = (p[0][rel], p[1][rel], p[2][rel])
        d[rel] = _smin(d[rel], part.sdf(sub), bone.k)
    if bone.carve is not None:
        d = np.maximum(d, -bone.carve.sdf(p))
    cortex: np.ndarray | float = np.float32(bone.cortex)
    if bone.cortex_axis is not None:
        origin, direction, start, length, extra = bone.cortex_axis
        s = sum((p[i] - np.float32(origin[i])) * np.float32(direction[i]) for i in range(3))
        ramp = np.clip((s - np.float32(start)) / np.float32(length), 0, 1)
        cortex = np.float32(bone.cortex) + np.float32(extra) * ramp
    return sl, d, cortex


# --------------------------------------------------------------------------- anatomy


@dataclass
class _Anatomy:
    """All random anatomical parameters of one subject (body frame, mm)."""

    hip_centres: dict[str, np.ndarray]
    femurs: dict[str, _Bone]
    pelvis: dict[str, _Bone]
    joints: dict[str, tuple[_Ellipsoid, _Sphere, _Sphere]]
    spine: _Bone
    discs: _Capsule
    sacrum: _Bone
    psoas: list[_Capsule]
    bladder: _Ellipsoid
    body: dict


def _lvec(side: float, lat: float, ap: float, sup: float) -> np.ndarray:
    """Body-frame vector from (lateral, anterior, superior) components on one side."""
    return np.array([side * lat, ap, sup], dtype=float)


def _make_femur(rng: np.random.Generator, c: np.ndarray, side: float, scale: float) -> _Bone:
    """Proximal femur of one side, head centred at ``c``."""
    sc = scale * rng.uniform(0.95, 1.05)
    r_head = rng.uniform(22.0, 26.0) * scale
    theta = np.deg2rad(rng.uniform(120.0, 140.0))  # neck-shaft angle
    beta = np.deg2rad(rng.uniform(5.0, 25.0))  # anteversion
    alpha = np.deg2rad(rng.uniform(4.0, 10.0))  # shaft adduction
    neck_len = rng.uniform(46.0, 56.0) * sc
    # shaft direction (distal, slightly medial) and neck direction (towards the head)
    s_lat, s_sup = -np.sin(alpha), -np.cos(alpha)
    ang = np.arctan2(s_sup, s_lat) - theta
    n_lat, n_sup = np.cos(ang), np.sin(ang)
    shaft = _unit(_lvec(side, s_lat, 0.0, s_sup))
    neck = _unit(_lvec(side, n_lat * np.cos(beta), np.sin(beta), n_sup * np.cos(beta)))
    base = c - neck_len * neck  # neck axis meets the shaft axis
    lat = _lvec(side, 1.0, 0.0, 0.0)
    ant = np.array([0.0, 1.0, 0.0])
    sup_perp = _perp(neck, [0.0, 0.0, 1.0])
    shaft_frame = np.array([_perp(shaft, lat), _perp(shaft, ant), shaft])
    shaft_frame[1] = np.cross(shaft_frame[2], shaft_frame[0])
    r_shaft = rng.uniform(13.0, 15.5) * sc
    parts = [
        _Sphere(c, r_head),
        _Capsule(c - 0.2 * r_head * neck, base, (0.70 * r_head, 0.98 * r_head), (0.60 * r_head, 0.78 * r_head),
                 sup_perp),
        # intertrochanteric region / metaphysis
        _Ellipsoid(base + 16 * sc * shaft + 3 * sc * lat, shaft_frame, np.array([22.0, 17.0, 36.0]) * sc),
        # greater trochanter (lateral, posterior, up)
        _Ellipsoid(
            base + _lvec(side, 21.0, -7.0, 14.0) * sc,
            shaft_frame,
            np.array([11.0, 15.0, 21.0]) * sc * rng.uniform(0.9, 1.1),
        ),
        # lesser trochanter (posteromedial, below the neck)
        _Ellipsoid(
            base + 38 * sc * shaft + _lvec(side, -13.0, -9.0, 0.0) * sc,
            shaft_frame,
            np.array([9.0, 8.0, 11.0]) * sc,
        ),
        # shaft, slightly tapering, well beyond any field of view
        _Capsule(base + 10 * sc * shaft, base + 320 * sc * shaft, (r_shaft, 0.85 * r_shaft),
                 (r_shaft, 0.85 * r_shaft), lat),
    ]
    cortex = rng.uniform(1.5, 2.2)
    extra = rng.uniform(1.5, 3.0)
    return _Bone(parts, k=7.0 * sc, cortex=cortex, cortex_axis=(base, shaft, 45.0 * sc, 60.0 * sc, extra))


def _make_pelvis_side(
    rng: np.random.Generator, c: np.ndarray, side: float, scale: float, r_head: float, gap: float
) -> tuple[_Bone, tuple[_Ellipsoid, _Sphere, _Sphere]]:
    """One hemipelvis (acetabulum, ilium, rami) and its joint space around the head."""
    sc = scale * rng.uniform(0.95, 1.05)
    eye = np.eye(3)
    block = _Ellipsoid(c + _lvec(side, -17.0, -3.0, 14.0) * sc, eye, np.array([29.0, 30.0, 31.0]) * sc)
    crest = c + _lvec(side, rng.uniform(38.0, 55.0), -40.0, rng.uniform(110.0, 130.0)) * sc
    wing_dir = _unit(crest - (c + _lvec(side, -4.0, -4.0, 20.0) * sc))
    wing_u = _perp(wing_dir, _lvec(side, 0.45, 0.9, 0.0))
    parts = [
        block,
        _Capsule(c + _lvec(side, -8.0, -4.0, 18.0) * sc, crest, (30.0 * sc, 50.0 * sc), (16.0 * sc, 9.0 * sc), wing_u),
        # iliac crest: a thicker rim along the top of the wing
        _Capsule(crest + (48.0 * wing_u - 6.0 * wing_dir) * sc, crest - (48.0 * wing_u + 6.0 * wing_dir) * sc,
                 (9.0 * sc, 9.0 * sc), (10.0 * sc, 10.0 * sc), [0.0, 0.0, 1.0]),
        # superior pubic ramus to the symphysis
        _Capsule(c + _lvec(side, -22.0, 14.0, -12.0) * sc, np.array([side * 7.0, 38.0 * sc, -34.0 * sc]),
                 (10.0 * sc, 12.0 * sc), (9.0 * sc, 8.0 * sc), [0.0, 0.0, 1.0]),
        # ischium down to the tuberosity
        _Capsule(c + _lvec(side, -12.0, -16.0, -18.0) * sc, c + _lvec(side, -26.0, -30.0, -68.0) * sc,
                 (15.0 * sc, 17.0 * sc), (12.0 * sc, 14.0 * sc), [0.0, 1.0, 0.0]),
        # inferior ramus back to the symphysis
        _Capsule(c + _lvec(side, -26.0, -28.0, -70.0) * sc, np.array([side * 9.0, 26.0 * sc, -52.0 * sc]),
                 (8.0 * sc, 9.0 * sc), (7.0 * sc, 8.0 * sc), [0.0, 0.0, 1.0]),
    ]
    carve = _Sphere(c, r_head + gap)
    bone = _Bone(parts, k=8.0 * sc, cortex=rng.uniform(1.4, 2.0), carve=carve)
    joint = (block, _Sphere(c, r_head), carve)
    return bone, joint


def _make_anatomy(rng: np.random.Generator) -> _Anatomy:
    scale = rng.uniform(0.92, 1.08)
    half = rng.uniform(82.0, 93.0) * scale
    hips = {"right": np.array([half, 0.0, 0.0]), "left": np.array([-half, 0.0, 0.0])}
    femurs, pelvis, joints = {}, {}, {}
    gap = rng.uniform(1.5, 3.0)
    for name, side in (("right", 1.0), ("left", -1.0)):
        c = hips[name] + rng.normal(0.0, 1.5, 3)
        hips[name] = c
        femurs[name] = _make_femur(rng, c, side, scale)
        r_head = femurs[name].parts[0].radius
        pelvis[name], joints[name] = _make_pelvis_side(rng, c, side, scale, r_head, gap)
    # lumbar spine and sacrum (midline)
    s1 = np.array([0.0, -8.0, 92.0]) * scale
    verts = []
    z = s1[2] + 8 * scale
    for _ in range(5):
        h = rng.uniform(24.0, 28.0) * scale
        zc = z + h / 2
        yc = s1[1] - 0.05 * (zc - s1[2])
        verts.append(_Cylinder(np.array([0.0, yc, zc - h / 2]), np.array([0.0, yc, zc + h / 2]),
                               25.0 * scale, 18.0 * scale, np.array([1.0, 0.0, 0.0])))
        z += h + rng.uniform(8.0, 11.0) * scale
    spine = _Bone(verts, k=0.0, cortex=1.5)
    discs = _Capsule(np.array([0.0, s1[1], s1[2]]), np.array([0.0, s1[1] - 0.05 * (z - s1[2]), z]),
                     (23.0 * scale, 23.0 * scale), (16.0 * scale, 16.0 * scale), [1.0, 0.0, 0.0])
    tip = np.array([0.0, -78.0, -22.0]) * scale
    sacrum = _Bone(
        [
            _Capsule(s1, tip, (40.0 * scale, 10.0 * scale), (17.0 * scale, 7.0 * scale), [1.0, 0.0, 0.0]),
            # sacroiliac joints towards the ilia
            _Capsule(s1 + np.array([0.0, -12.0, -18.0]) * scale, np.array([half * 0.72, -40.0 * scale, 62.0 * scale]),
                     (14.0 * scale, 12.0 * scale), (12.0 * scale, 10.0 * scale), [0.0, 0.0, 1.0]),
            _Capsule(s1 + np.array([0.0, -12.0, -18.0]) * scale, np.array([-half * 0.72, -40.0 * scale, 62.0 * scale]),
                     (14.0 * scale, 12.0 * scale), (12.0 * scale, 10.0 * scale), [0.0, 0.0, 1.0]),
        ],
        k=10.0 * scale,
        cortex=1.6,
    )
    psoas = []
    for side in (1.0, -1.0):
        top = np.array([side * 34.0, -15.0, 300.0]) * scale
        mid = np.array([side * 48.0, -18.0, 95.0]) * scale
        low = hips["right" if side > 0 else "left"] + _lvec(side, -22.0, 26.0, -20.0) * scale
        psoas.append(_Capsule(top, mid, (16.0 * scale, 24.0 * scale), (14.0 * scale, 18.0 * scale), [1.0, 0.0, 0.0]))
        psoas.append(_Capsule(mid, low, (24.0 * scale, 17.0 * scale), (18.0 * scale, 14.0 * scale), [1.0, 0.0, 0.0]))
    fill = rng.uniform(0.5, 1.1)
    bladder = _Ellipsoid(np.array([0.0, 38.0, -22.0 + 12 * fill]) * scale, np.eye(3),
                         np.array([42.0, 30.0, 28.0]) * scale * fill ** (1 / 3))
    body = {
        "a": rng.uniform(158.0, 185.0) * scale,  # half width (L-R) at the hips
        "b": rng.uniform(105.0, 130.0) * scale,  # half depth (A-P)
        "yc": rng.uniform(-15.0, 0.0) * scale,
        "fat": rng.uniform(12.0, 35.0) * scale,
        "crotch": -rng.uniform(120.0, 145.0) * scale,
        "cavity_z": np.array([-80.0, -45.0, 0.0, 40.0, 90.0, 140.0, 400.0]) * scale,
        "cavity_w": np.array([0.0, 38.0, 52.0, 56.0, 68.0, 110.0, 125.0]) * scale,
        "half": half,
    }
    body["cavity_lut"] = np.interp(
        np.arange(body["cavity_z"][0], body["cavity_z"][-1] + 1), body["cavity_z"], body["cavity_w"]
    ).astype(np.float32)
    waist = rng.uniform(0.82, 0.95)
    z_lut = np.arange(body["cavity_z"][0], body["cavity_z"][-1] + 1)
    body["waist_lut"] = (1.0 / np.interp(z_lut, np.array([70.0, 200.0]) * scale, [1.0, waist])).astype(np.float32)
    return _Anatomy(hips, femurs, pelvis, joints, spine, discs, sacrum, psoas, bladder, body)


# --------------------------------------------------------------------------- rendering


def _paint_bone(lab: np.ndarray, grid: _Grid, bone: _Bone) -> None:
    res = _bone_sdf(grid, bone)
    if res is None:
        return
    sl, d, cortex = res
    view = lab[sl]
    view[d < 0] = _CORTEX
    view[d < -cortex] = _MARROW


def _paint_shape(lab: np.ndarray, grid: _Grid, shape, value: int, margin: float = 2.0) -> None:
    lo, hi = shape.bounds()
    sl = grid.box(lo, hi, margin)
    if sl is None:
        return
    view = lab[sl]
    view[shape.sdf(grid.points(sl)) < 0] = value


def _soft_tissue(grid: _Grid, anat: _Anatomy, fields: dict[str, np.ndarray]) -> np.ndarray:
    """Soft-tissue labels at the voxel centres: air, fat ring, muscle with septa, pelvic contents."""
    bd = anat.body
    f32 = np.float32
    full = tuple(slice(0, n) for n in grid.shape)
    x, y, z = grid.points(full)
    lab = np.zeros(grid.shape, dtype=np.uint8)
    ax = np.abs(x)
    del x
    zq = np.clip((z - f32(bd["cavity_z"][0])).astype(np.int32), 0, len(bd["cavity_lut"]) - 1)
    # the two thighs part below the crotch; the waist narrows above the pelvis
    gap = np.maximum((f32(bd["crotch"]) - z) * f32(0.45), f32(0.0))
    xs = ax * bd["waist_lut"][zq]
    xs *= xs
    yn = (y - f32(bd["yc"])) ** 2
    body = (xs * f32(1 / bd["a"] ** 2) + yn * f32(1 / bd["b"] ** 2) < 1) & (ax > gap)
    a_in, b_in = bd["a"] - bd["fat"], bd["b"] - 0.8 * bd["fat"]
    inner = xs * f32(1 / a_in**2) + yn * f32(1 / b_in**2) < 1
    del yn, xs
    inner &= ax > np.where(gap > 0, gap + f32(0.6 * bd["fat"]), f32(-1.0))
    lab[body] = _FAT
    lab[inner] = _MUSCLE
    # pelvic / abdominal contents between the bones, anterior to the back muscles
    cav = inner & (ax < bd["cavity_lut"][zq]) & (y > f32(bd["yc"] - 0.5 * bd["b"] + 12.0))
    cav &= z > f32(bd["cavity_z"][0])
    lab[cav] = _VISCERA
    lab[cav & (fields["mid"] < -1.5)] = _FLUID
    return lab


def _paint_structures(lab: np.ndarray, grid: _Grid, anat: _Anatomy) -> None:
    """Paint muscles, bladder, spine, pelvis, joint spaces and femurs over ``lab`` (in place)."""
    for ps in anat.psoas:
        _paint_shape(lab, grid, ps, _MUSCLE)
    _paint_shape(lab, grid, anat.bladder, _FLUID)
    _paint_shape(lab, grid, anat.discs, _DISC)
    _paint_bone(lab, grid, anat.spine)
    _paint_bone(lab, grid, anat.sacrum)
    for side in ("right", "left"):
        _paint_bone(lab, grid, anat.pelvis[side])
        block, head, cup = anat.joints[side]
        lo, hi = cup.bounds()
        sl = grid.box(lo, hi, 1.0)
        if sl is not None:
            p = grid.points(sl)
            j = (cup.sdf(p) < 0) & (block.sdf(p) < 2.0)
            lab[sl][j] = _JOINT
        _paint_bone(lab, grid, anat.femurs[side])


def _bone_mask(grid: _Grid, bone: _Bone) -> np.ndarray:
    """Samples of ``grid`` that lie inside ``bone`` (cortex included)."""
    mask = np.zeros(grid.shape, dtype=bool)
    res = _bone_sdf(grid, bone)
    if res is not None:
        sl, d, _ = res
        mask[sl] = d < 0
    return mask


def _femur_mask(grid: _Grid, anat: _Anatomy, side: str) -> np.ndarray:
    """Samples of ``grid`` that lie inside one femur."""
    return _bone_mask(grid, anat.femurs[side])


#: Values of the bone label map (:func:`make_subject` with ``bones=True``), the
#: same as the development data's ``subNN_bones.nii.gz``.
BONE_LABELS: dict[str, int] = {"background": 0, "femur": 1, "ilium": 2, "spine": 3, "sacrum": 4}


def _bone_label_map(grid: _Grid, anat: _Anatomy, femur: np.ndarray) -> np.ndarray:
    """Label map of the bones at the samples of ``grid`` (:data:`BONE_LABELS`).

    The femur label is ``femur`` (the mask of the femurs in the field of view);
    the other bones are painted under it, so a voxel on both keeps the femur.
    """
    lab = np.zeros(grid.shape, dtype=np.uint8)
    lab[_bone_mask(grid, anat.spine)] = BONE_LABELS["spine"]
    lab[_bone_mask(grid, anat.sacrum)] = BONE_LABELS["sacrum"]
    for side in ("right", "left"):
        lab[_bone_mask(grid, anat.pelvis[side])] = BONE_LABELS["ilium"]
    lab[femur > 0] = BONE_LABELS["femur"]
    return lab


def _septa_fraction(field: np.ndarray, pixel_mm: float) -> np.ndarray:
    """Fat fraction of thin septa along the zero set of a smooth noise field.

    About 1.4 mm wide lines at fine pixels; at coarse pixels wider and fainter
    lines with the same amount of fat (a partial-volume look, not speckles).
    """
    g = max(1.0, pixel_mm / 1.0)
    width = np.float32(0.1 * g)
    out = np.abs(field) * np.float32(-1.0 / width)
    out += np.float32(1.0)
    np.clip(out, 0, 1, out=out)
    out *= np.float32(1.0 / g)
    return out


def _block_mean(lab: np.ndarray, tables: list[np.ndarray], block: tuple[int, int, int]) -> list[np.ndarray]:
    """Mean of ``table[lab]`` over blocks of ``block`` samples, for each table."""
    b0, b1, b2 = block
    n = b0 * b1 * b2
    if n == 1:
        return [t[lab] for t in tables]
    shape = (lab.shape[0] // b0, lab.shape[1] // b1, lab.shape[2] // b2)
    if b0 == b1 == 1 and b2 <= 3:
        # one code per voxel for the (few) samples across the slice: one lookup per table
        nt = len(tables[0])
        code = lab[:, :, 0::b2].astype(np.intp)
        for m in range(1, b2):
            code *= nt
            code += lab[:, :, m::b2]
        idx = np.indices((nt,) * b2).reshape(b2, -1)
        return [t[idx].mean(axis=0).astype(np.float32)[code] for t in tables]
    out = []
    li = lab.astype(np.intp)
    for t in tables:
        v = np.take(t, li)
        acc = np.zeros(shape, dtype=np.float32)
        for i in range(b0):
            for j in range(b1):
                for k in range(b2):
                    acc += v[i::b0, j::b1, k::b2]
        acc *= np.float32(1.0 / n)
        out.append(acc)
    return out


def _smooth_noise(rng: np.random.Generator, shape, spacing, sigma_mm) -> np.ndarray:
    """Unit-variance Gaussian-filtered noise with correlation length ``sigma_mm``.

    ``sigma_mm`` is a float or one value per array axis.

    Generated on a grid no finer than ``sigma_mm / 2`` and linearly upsampled
    axis by axis, so large correlation lengths stay cheap.
    """
    spacing = np.asarray(spacing, dtype=float)
    sigma_mm = np.broadcast_to(np.asarray(sigma_mm, dtype=float), (3,))
    step = np.maximum(spacing, sigma_mm / 2.0)
    lr_shape = [int(np.ceil(n * sp / st)) + 1 if st > sp else n for n, sp, st in zip(shape, spacing, step)]
    noise = rng.standard_normal(lr_shape, dtype=np.float32)
    sig = [sm / st if sm / st > 0.3 else 0.0 for sm, st in zip(sigma_mm, step)]
    noise = ndi.gaussian_filter(noise, sig, mode="wrap", truncate=2.5)
    noise -= np.float32(noise.mean())
    noise *= np.float32(1.0 / (float(noise.std()) or 1.0))
    for ax, (n, m) in enumerate(zip(shape, lr_shape)):
        if n == m:
            continue
        pos = np.arange(n) * (spacing[ax] / step[ax])
        i0 = np.clip(np.floor(pos).astype(np.intp), 0, m - 2)
        f = (pos - i0).astype(np.float32)
        fshape = [1] * noise.ndim
        fshape[ax] = n
        f = f.reshape(fshape)
        lo = np.take(noise, i0, axis=ax)
        hi = np.take(noise, i0 + 1, axis=ax)
        hi -= lo
        hi *= f
        lo += hi
        noise = lo
    return noise


def _tissue_tables(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-tissue base intensity, fine / coarse texture amplitudes and septum gain (T1, pre-bias).

    The septum gain is what a thin fat septum adds to a tissue (muscle only).
    """
    base = np.zeros(_N_TISSUES, dtype=np.float32)
    fine = np.zeros(_N_TISSUES, dtype=np.float32)
    coarse = np.zeros(_N_TISSUES, dtype=np.float32)
    jit = lambda v: v * rng.uniform(0.9, 1.1)  # noqa: E731
    base[_AIR] = 0.0
    base[_FAT] = jit(620.0)
    base[_MUSCLE] = jit(215.0)
    base[_VISCERA] = jit(470.0)
    base[_FLUID] = jit(150.0)
    base[_CORTEX] = jit(60.0)
    base[_MARROW] = jit(375.0)
    base[_DISC] = jit(230.0)
    base[_JOINT] = jit(120.0)
    fine[_FAT], coarse[_FAT] = 15.0, 25.0
    fine[_MUSCLE], coarse[_MUSCLE] = 12.0, 25.0
    fine[_VISCERA], coarse[_VISCERA] = 30.0, jit(120.0)
    fine[_MARROW], coarse[_MARROW] = jit(55.0), jit(45.0)
    fine[_FLUID], coarse[_FLUID] = 8.0, 20.0
    septa = np.zeros(_N_TISSUES, dtype=np.float32)
    septa[_MUSCLE] = base[_FAT] - base[_MUSCLE]
    return base, fine, coarse, septa


def _apply_bias(rng: np.random.Generator, img: np.ndarray) -> None:
    """Multiply by a smooth coil sensitivity (about 0.7 - 1.4), in place.

    The field is separable: an in-plane part (quadratic, brighter towards the
    body sides) times a part across slices (brighter near the anterior and
    posterior coil arrays).
    """
    shape = img.shape
    xi = np.linspace(-1, 1, shape[0], dtype=np.float32)[:, None]
    yj = np.linspace(-1, 1, shape[1], dtype=np.float32)[None, :]
    zk = np.linspace(-1, 1, shape[2], dtype=np.float32)
    c = rng.uniform(-1, 1, 8).astype(np.float32)
    plane = (0.12 * c[0] * xi + 0.12 * c[1] * yj + (0.10 + 0.06 * c[2]) * xi**2 + 0.05 * c[3] * yj**2
             + 0.06 * c[4] * xi * yj)
    depth = 0.08 * c[5] * zk + (0.10 + 0.05 * c[6]) * zk**2
    img *= np.exp(plane).astype(np.float32)[:, :, None]
    img *= np.exp(depth).astype(np.float32)[None, None, :]


def _add_rician(rng: np.random.Generator, img: np.ndarray, sigma: float) -> None:
    """Magnitude of the image plus complex Gaussian noise of std ``sigma`` (in place).

    The imaginary part reuses the real part's white noise rolled by a random
    shift (independent voxels pair up), which halves the cost of drawing it.
    """
    noise = rng.standard_normal(img.shape, dtype=np.float32)
    noise *= np.float32(sigma)
    shift = int(rng.integers(1, img.size))
    imag = np.roll(noise.ravel(), shift).reshape(img.shape)
    img += noise
    np.square(img, out=img)
    np.square(imag, out=imag)
    img += imag
    np.sqrt(img, out=img)


def _place(rng: np.random.Generator, geo: dict, anat: _Anatomy, side: str, n_slices: int,
           matrix: tuple[int, int], pixel: float) -> tuple[np.ndarray, np.ndarray]:
    """Body pose and voxel grid: returns (body_to_world 4 x 4, voxel-to-world affine)."""
    rot = _rotation(*np.deg2rad(rng.uniform([-5.0, -3.0, -4.0], [5.0, 3.0, 4.0])))
    body_to_world = np.eye(4)
    body_to_world[:3, :3] = rot
    body_to_world[:3, 3] = rng.uniform(-30.0, 30.0, 3)
    jitter = rng.uniform(-1, 1, 3) * np.asarray(geo["jitter_mm"])
    if side == "both":
        centre = np.asarray(geo["centre_both"], dtype=float) + jitter
    else:
        sgn = 1.0 if side == "right" else -1.0
        lat, ap, sup = geo["centre_one"]
        centre = anat.hip_centres[side] + _lvec(sgn, lat, ap, sup) + jitter
    world_c = body_to_world[:3, :3] @ centre + body_to_world[:3, 3]
    fov = np.array([matrix[0] * pixel, matrix[1] * pixel, n_slices * geo["slice_mm"]])
    if side != "both":
        # push the field of view laterally until the other femur is wholly outside it
        other = "left" if side == "right" else "right"
        lo, hi = anat.femurs[other].bounds()
        corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
        wx = (corners @ body_to_world[:3, :3].T + body_to_world[:3, 3])[:, 0]
        margin = 2.0 * pixel + 2.0
        if side == "left":  # other femur at world +x (right)
            world_c[0] = min(world_c[0], wx.min() - margin - fov[0] / 2)
        else:
            world_c[0] = max(world_c[0], wx.max() + margin + fov[0] / 2)
    # array axes: 0 -> Left (-x), 1 -> Inferior (-z), 2 -> Posterior (-y)
    cols = np.array([[-pixel, 0.0, 0.0], [0.0, 0.0, -pixel], [0.0, -geo["slice_mm"], 0.0]]).T
    shape = np.array([matrix[0], matrix[1], n_slices])
    affine = np.eye(4)
    affine[:3, :3] = cols
    affine[:3, 3] = world_c - cols @ ((shape - 1) / 2.0)
    return body_to_world, affine


def _pick_hips(rng: np.random.Generator, geo: dict, hips: str) -> str:
    choices = ("left", "right", "both", "random")
    if hips not in choices:
        raise ValueError(f"hips must be one of {choices}, got {hips!r}")
    if hips == "random":
        names = list(geo["hips_random"])
        probs = np.array([geo["hips_random"][k] for k in names], dtype=float)
        hips = names[int(rng.choice(len(names), p=probs / probs.sum()))]
    if hips == "both" and geo["centre_both"] is None:
        raise ValueError("this geometry's field of view holds one hip: use hips='left', 'right' or 'random'")
    return hips


def make_subject(
    seed: int, geometry: str = "dev", hips: str = "random", downsample: int = 1, bones: bool = False
) -> "tuple[Volume, Volume] | tuple[Volume, Volume, Volume]":
    """Generate one synthetic T1-weighted hip MRI and its exact femur mask.

    Parameters
    ----------
    seed : int
        Seed of the ``numpy.random.Generator``; the same seed (and arguments)
        gives identical arrays.
    geometry : str
        Key of :data:`GEOMETRIES`: ``"dev"`` (whole pelvis, thick coronal
        slices), ``"study"`` (one hip, 12 cm field of view, thin slices) or
        ``"tiny"`` (64 x 64 x 20, for unit tests).
    hips : {"random", "both", "left", "right"}
        Which femur(s) the field of view holds. ``"random"`` draws from the
        preset's ``hips_random`` odds (mostly both for ``"dev"``). For one hip
        the field of view is shifted until the other femur lies wholly outside.
    downsample : int
        Divide the in-plane matrix by this (spacing multiplied by it); the
        slices are unchanged.
    bones : bool
        Also return a label map of the bones (:data:`BONE_LABELS`: 1 femur,
        2 ilium, 3 spine, 4 sacrum), like the development data's
        ``subNN_bones.nii.gz``; the image and mask are the same either way.

    Returns
    -------
    image : Volume
        float32 intensities (roughly 0 - 1500, like int16 T1 scans), array
        axes (L, I, P) for the built-in presets.
    mask : Volume
        uint8 0/1 mask of the femur(s) on the same grid (voxel centre inside the
        femur: head, neck, trochanters and shaft, cortex included).
        ``meta`` of both holds ``seed``, ``geometry``, ``hips`` and ``synthetic``.
    bone_map : Volume
        Only with ``bones=True``: uint8 label map on the same grid (voxel centre
        inside the bone); its femur label equals ``mask``.
    """
    if geometry not in GEOMETRIES:
        raise ValueError(f"unknown geometry {geometry!r}; choose from {sorted(GEOMETRIES)}")
    downsample = int(downsample)
    if downsample < 1:
        raise ValueError(f"downsample must be a positive integer, got {downsample}")
    geo = GEOMETRIES[geometry]
    matrix = (geo["matrix"][0] // downsample, geo["matrix"][1] // downsample)
    if min(matrix) < 8:
        raise ValueError(f"downsample={downsample} leaves a {matrix} matrix; use a smaller factor")
    pixel = geo["pixel_mm"] * downsample
    rng = np.random.default_rng(seed)
    side = _pick_hips(rng, geo, hips)
    lo_n, hi_n = geo["n_slices"]
    n_slices = int(rng.integers(lo_n, hi_n + 1))
    anat = _make_anatomy(rng)
    body_to_world, affine = _place(rng, geo, anat, side, n_slices, matrix, pixel)
    shape = (matrix[0], matrix[1], n_slices)
    vox_to_body = np.linalg.inv(body_to_world) @ affine
    spacing = (pixel, pixel, geo["slice_mm"])

    fields = {
        "fine": _smooth_noise(rng, shape, spacing, 0.8),
        "coarse": _smooth_noise(rng, shape, spacing, 5.0),
        # muscle septa run mostly along the limb (array axis 1 is inferior)
        "mid": _smooth_noise(rng, shape, spacing, (11.0, 35.0, 12.0)),
    }
    tables = _tissue_tables(rng)
    centres = _Grid.voxel_centres(vox_to_body, shape)
    soft = _soft_tissue(centres, anat, fields)

    # sub-voxel samples: across the slice thickness (partial volume), and 2 x 2
    # in-plane for coarse pixels; bones are drawn on the supersampled grid
    n_xy = 2 if pixel >= 2.0 else 1
    n_z = 1 if geo["thickness_mm"] < 2.5 else (3 if n_xy == 1 else 2)
    dz = ((np.arange(n_z) + 0.5) / n_z - 0.5) * geo["thickness_mm"] / geo["slice_mm"]
    fine_grid = _Grid.supersampled(vox_to_body, shape, n_xy, dz)
    lab = soft
    for ax, rep in enumerate((n_xy, n_xy, n_z)):
        if rep > 1:
            lab = np.repeat(lab, rep, axis=ax)
    if lab is soft:
        lab = soft.copy()
    _paint_structures(lab, fine_grid, anat)
    base, fine_amp, coarse_amp, septa = _block_mean(lab, list(tables), (n_xy, n_xy, n_z))
    del lab
    fine_amp *= fields["fine"]
    coarse_amp *= fields["coarse"]
    img = base
    img += fine_amp
    img += coarse_amp
    septa *= _septa_fraction(fields["mid"], pixel)
    img += septa
    del fine_amp, coarse_amp, septa
    np.maximum(img, 0, out=img)
    _apply_bias(rng, img)
    _add_rician(rng, img, float(rng.uniform(7.0, 14.0)))

    mask = np.zeros(shape, dtype=np.uint8)
    for s in (("right", "left") if side == "both" else (side,)):
        mask[_femur_mask(centres, anat, s)] = 1
    meta = {"synthetic": True, "seed": int(seed), "geometry": geometry, "hips": side, "downsample": downsample}
    src = f"synthetic:{geometry}:seed{seed}"
    image, femur = Volume(img, affine, src, dict(meta)), Volume(mask, affine.copy(), src + ":femur", dict(meta))
    if not bones:
        return image, femur
    bone_map = Volume(_bone_label_map(centres, anat, mask), affine.copy(), src + ":bones", dict(meta))
    return image, femur, bone_map


def make_cohort(
    out_dir: "str | os.PathLike",
    n: int = 8,
    seed: int = 0,
    geometry: str = "dev",
    downsample: int = 1,
    overwrite: bool = False,
    bones: bool = False,
) -> list[str]:
    """Write ``n`` synthetic subjects as ``subNN_image.nii.gz`` / ``subNN_femur.nii.gz``.

    Parameters
    ----------
    out_dir : str or path-like
        Folder to write into (created if missing).
    n : int
        Number of subjects (``sub01`` ... ``subNN``).
    seed : int
        Cohort seed; subject ``i`` (from 0) uses ``seed * 1000 + i``.
    geometry, downsample
        As in :func:`make_subject` (hips drawn at random per subject).
    overwrite : bool
        Replace existing files; otherwise refuse before writing anything.
    bones : bool
        Also write ``subNN_bones.nii.gz`` label maps (:data:`BONE_LABELS`), which
        training uses for its "other bone" class (``aux_labels``), as with the
        development data.

    Returns
    -------
    list of str
        The subject ids, e.g. ``["sub01", "sub02"]``.

    Notes
    -----
    Images are stored as int16 (rounded), like the real scans; masks as uint8.
    The folder also gets ``synthetic.json`` (:data:`SYNTHETIC_MARKER`: generator,
    seed, geometry), which :func:`femur_core.training.recipe_for_data` reads.

    Raises
    ------
    OutputExistsError
        A target file exists and ``overwrite`` is False.
    """
    from .data import subject_file
    from .volume_io import atomic_write_bytes, write_volume

    out = Path(out_dir)
    ids = [f"sub{i + 1:02d}" for i in range(int(n))]
    kinds = ("image", "femur", "bones") if bones else ("image", "femur")
    if not overwrite:
        for sid in ids:
            for kind in kinds:
                if subject_file(out, sid, kind).exists():
                    raise OutputExistsError(subject_file(out, sid, kind))
    out.mkdir(parents=True, exist_ok=True)
    # the marker that says "synthetic" to recipe_for_data (the GUI then picks the quick recipe)
    marker = {"generator": "femur_core.synthetic.make_cohort", "n": int(n), "seed": int(seed),
              "geometry": geometry, "downsample": int(downsample), "bones": bool(bones)}
    atomic_write_bytes(out / SYNTHETIC_MARKER, (json.dumps(marker, indent=2) + "\n").encode(), overwrite=True)
    for i, sid in enumerate(ids):
        vols = make_subject(seed * 1000 + i, geometry=geometry, downsample=downsample, bones=bones)
        img = vols[0].with_data(np.clip(np.rint(vols[0].data), 0, np.iinfo(np.int16).max).astype(np.int16))
        write_volume(img, subject_file(out, sid, "image"), overwrite=overwrite)
        for kind, vol in zip(kinds[1:], vols[1:]):
            write_volume(vol, subject_file(out, sid, kind), overwrite=overwrite, dtype=np.uint8)
    return ids


# --------------------------------------------------------------------------- baseline


def threshold_baseline(image: np.ndarray, mask: np.ndarray, bins: int = 512) -> dict[str, float]:
    """Best Dice any global intensity rule reaches against a mask.

    Three rules are searched over ``bins`` intensity levels (edges evenly spaced
    between the image minimum and maximum): keep voxels ``>= t``, keep voxels
    ``<= t``, and keep voxels in a band ``[lo, hi]``.

    Parameters
    ----------
    image : numpy.ndarray
        Intensities (any shape).
    mask : numpy.ndarray
        Binary truth of the same shape.
    bins : int
        Number of intensity levels searched.

    Returns
    -------
    dict
        ``dsc_above``, ``t_above``, ``dsc_below``, ``t_below``, ``dsc_band``,
        ``lo``, ``hi``.
    """
    if np.shape(image) != np.shape(mask):
        raise ValueError(f"image and mask shapes differ: {np.shape(image)} vs {np.shape(mask)}")
    img = np.asarray(image, dtype=np.float32).ravel()
    m = np.asarray(mask).ravel() > 0
    n_pos = int(m.sum())
    if n_pos == 0:
        raise ValueError("mask is empty")
    lo_v, hi_v = float(img.min()), float(img.max())
    if hi_v <= lo_v:
        hi_v = lo_v + 1.0
    edges = np.linspace(lo_v, hi_v, bins + 1)
    idx = ((img - np.float32(lo_v)) * np.float32(bins / (hi_v - lo_v))).astype(np.intp)
    np.clip(idx, 0, bins - 1, out=idx)
    tot = np.bincount(idx, minlength=bins).astype(np.float64)
    pos = np.bincount(idx[m], minlength=bins).astype(np.float64)
    ctot = np.concatenate([[0.0], np.cumsum(tot)])
    cpos = np.concatenate([[0.0], np.cumsum(pos)])
    # band [edges[a], edges[b + 1]) for a <= b
    tp = cpos[None, 1:] - cpos[:-1, None]
    pp = ctot[None, 1:] - ctot[:-1, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        dsc = np.where(np.triu(np.ones((bins, bins), dtype=bool)), 2 * tp / (pp + n_pos), -1.0)
    a, b = np.unravel_index(int(np.argmax(dsc)), dsc.shape)
    above = dsc[:, -1]
    below = dsc[0, :]
    ia, ib = int(np.argmax(above)), int(np.argmax(below))
    return {
        "dsc_above": float(above[ia]),
        "t_above": float(edges[ia]),
        "dsc_below": float(below[ib]),
        "t_below": float(edges[ib + 1]),
        "dsc_band": float(dsc[a, b]),
        "lo": float(edges[a]),
        "hi": float(edges[b + 1]),
    }


def threshold_baseline_dsc(image: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """Best Dice a single global intensity threshold or band reaches, and its threshold.

    The data is meant to be *not* solvable by thresholding: this is the number
    that shows it. Searched rules are ``image >= t``, ``image <= t`` and
    ``lo <= image <= hi`` (see :func:`threshold_baseline` for all of them).

    Returns
    -------
    dsc : float
        The best Dice over all three rules (a band is never worse than a
        one-sided threshold, so this is the best band's Dice).
    threshold : float
        The threshold of the winning rule: ``t`` for a one-sided threshold,
        the lower edge ``lo`` for a band.
    """
    r = threshold_baseline(image, mask)
    best = max(("above", r["dsc_above"], r["t_above"]), ("below", r["dsc_below"], r["t_below"]),
               ("band", r["dsc_band"], r["lo"]), key=lambda v: v[1])
    return best[1], best[2]
