"""Property-based tests (hypothesis) for geometry, readers / writers and metrics.

Volumes, spacings (0.2-6 mm) and orientations (signed axis permutations, an
origin, optionally an oblique rotation) are generated; the properties are:

- NIfTI write -> read is exact (data bit for bit, affine within 1e-5 mm);
- to_canonical -> from_canonical is exact, and every voxel keeps its world position;
- prepare -> back to the source grid (as predict_volume does) keeps a mask aligned with its image
  (shape, affine exact; DSC high);
- the metrics do not depend on the orientation a scan was stored in.

Overlap / distance / ROC properties of the metrics themselves are in
tests/test_metrics.py and are not repeated here.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from femur_core import metrics as M
from femur_core.volume_io import read_volume, write_volume
from femur_core.inference import Prediction
from femur_core.preprocess import GridSpec, prepare
from femur_core.volume import CANONICAL_AXCODES, Volume, from_canonical, to_canonical

SETTINGS = dict(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

PERMUTATIONS = list(itertools.permutations(range(3)))


@st.composite
def affines(draw, oblique: bool = False):
    """A voxel -> RAS affine: signed permutation of the axes, spacings 0.2-6 mm, origin within 200 mm,
    and (``oblique``) a rotation of up to 30 degrees about a random axis."""
    perm = draw(st.sampled_from(PERMUTATIONS))
    signs = draw(st.tuples(*[st.sampled_from([-1.0, 1.0])] * 3))
    spacing = draw(st.tuples(*[st.floats(0.2, 6.0, allow_nan=False, allow_infinity=False)] * 3))
    origin = draw(st.tuples(*[st.floats(-200, 200, allow_nan=False, allow_infinity=False)] * 3))
    a = np.zeros((4, 4))
    for j in range(3):
        a[perm[j], j] = signs[j] * spacing[j]
    if oblique:
        angle = draw(st.floats(-math.pi / 6, math.pi / 6))
        axis = np.array(draw(st.tuples(*[st.floats(-1, 1)] * 3)))
        assume(np.linalg.norm(axis) > 0.1)
        k = axis / np.linalg.norm(axis)
        kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
        rot = np.eye(3) + math.sin(angle) * kx + (1 - math.cos(angle)) * kx @ kx
        a[:3, :3] = rot @ a[:3, :3]
    a[:3, 3] = origin
    a[3, 3] = 1
    return a


shapes = st.tuples(*[st.integers(1, 7)] * 3)
dtypes = st.sampled_from([np.uint8, np.int16, np.float32, np.float64])


@st.composite
def volumes(draw, oblique: bool = False):
    shape = draw(shapes)
    dtype = draw(dtypes)
    if np.dtype(dtype).kind == "f":
        elements = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=np.dtype(dtype).itemsize * 8)
    else:
        info = np.iinfo(dtype)
        elements = st.integers(int(info.min), int(info.max))
    data = draw(arrays(dtype, shape, elements=elements))
    return Volume(data, draw(affines(oblique)))


@settings(**SETTINGS)
@given(vol=volumes(oblique=True), gz=st.booleans())
def test_prop_nifti_write_read_round_trip_is_exact(tmp_path_factory, vol, gz):
    path = tmp_path_factory.mktemp("rt") / ("v.nii.gz" if gz else "v.nii")
    write_volume(vol, path)
    back = read_volume(path)
    assert back.shape == vol.shape
    assert back.data.dtype == vol.data.dtype
    np.testing.assert_array_equal(back.data, vol.data)
    np.testing.assert_allclose(back.affine, vol.affine, rtol=0, atol=1e-5)
    assert back.axcodes == vol.axcodes
    np.testing.assert_allclose(back.spacing, vol.spacing, rtol=1e-6)


@settings(**SETTINGS)
@given(vol=volumes(oblique=True), seed=st.integers(0, 2**16))
def test_prop_canonical_round_trip_is_exact_and_keeps_world_positions(vol, seed):
    canon, reo = to_canonical(vol)
    assert canon.axcodes == CANONICAL_AXCODES
    assert sorted(canon.shape) == sorted(vol.shape)
    back = from_canonical(canon.data, reo)
    np.testing.assert_array_equal(back.data, vol.data)
    np.testing.assert_array_equal(back.affine, vol.affine)
    # a voxel of the source sits at the same world position in the canonical volume
    rng = np.random.default_rng(seed)
    idx = np.array([rng.integers(n) for n in vol.shape] + [1], float)
    cidx = np.linalg.solve(canon.affine, vol.affine @ idx)
    ci = np.round(cidx[:3]).astype(int)
    np.testing.assert_allclose(cidx[:3], ci, atol=1e-6)
    assert canon.data[tuple(ci)] == vol.data[tuple(idx[:3].astype(int))]
    # only the axes moved: the same spacings, permuted
    np.testing.assert_allclose(sorted(canon.spacing), sorted(vol.spacing), rtol=1e-9)


@st.composite
def masked_scans(draw):
    """An ellipsoid mask (not tiny) in a random orientation and spacing, with its image."""
    Z, Y, X = draw(st.integers(3, 10)), draw(st.integers(24, 48)), draw(st.integers(24, 48))
    ry, rx = draw(st.floats(0.2, 0.35)) * Y, draw(st.floats(0.2, 0.35)) * X
    cy, cx = draw(st.floats(0.4, 0.6)) * Y, draw(st.floats(0.4, 0.6)) * X
    z, y, x = np.mgrid[0:Z, 0:Y, 0:X]
    mask = (((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 + ((z - (Z - 1) / 2) / (Z / 2 + 0.5)) ** 2 < 1)
    assume(mask.sum() > 50)
    # store it in a random orientation: build the canonical volume, then map it to a random layout
    canon_aff = np.zeros((4, 4))
    sz, sy, sx = draw(st.floats(0.5, 6.0)), draw(st.floats(0.3, 2.0)), draw(st.floats(0.3, 2.0))
    canon_aff[:3, :3] = [[0, 0, -sx], [-sz, 0, 0], [0, -sy, 0]]  # (P, I, L)
    canon_aff[:3, 3] = draw(st.tuples(*[st.floats(-100, 100)] * 3))
    canon_aff[3, 3] = 1
    target = draw(affines())  # only its orientation is used
    from nibabel import orientations as nio

    tr = nio.ornt_transform(nio.axcodes2ornt(CANONICAL_AXCODES), nio.io_orientation(target))
    data = np.ascontiguousarray(nio.apply_orientation(mask.astype(np.uint8), tr))
    affine = canon_aff @ nio.inv_ornt_aff(tr, mask.shape)
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    image = (data * 100 + rng.normal(0, 5, data.shape)).astype(np.float32)
    factor = draw(st.sampled_from([0.5, 0.75, 1.0, 1.5, 2.0]))
    central = draw(st.one_of(st.none(), st.integers(1, Z)))
    return Volume(image, affine), Volume(data, affine), GridSpec(in_plane_spacing=factor * min(sy, sx),
                                                                  central_slices=central)


@settings(**SETTINGS)
@given(masked_scans())
def test_prop_prepare_restore_keeps_the_mask_aligned(case):
    image, mask, grid = case
    prep = prepare(image, grid, mask)
    assert prep.mask.shape == prep.image.shape
    # the way predict_volume maps a model-grid map back: canonical source grid, then source orientation
    back = Prediction(prep.restore_canonical(prep.mask.astype(np.float32)), prep.reorientation, None, 0.5).prob
    assert back.shape == image.shape
    np.testing.assert_array_equal(back.affine, image.affine)
    # what the model grid kept (the central slices) comes back where it was
    z0, z1 = prep.slice_range
    canon_mask, reo = to_canonical(mask)
    kept = np.zeros_like(canon_mask.data)
    kept[z0:z1] = canon_mask.data[z0:z1]
    expected = from_canonical(kept, reo).data.astype(bool)
    got = back.data >= 0.5
    slab = np.zeros(canon_mask.shape, bool)
    slab[z0:z1] = True
    assert not (got & ~from_canonical(slab, reo).data).any()  # nothing appears outside the kept slices
    assert M.dice(got, expected) > 0.85
    # and the mask centroid moves by less than one model-grid pixel
    ci, ce = (np.array(np.nonzero(m)).mean(axis=1) for m in (got, expected))
    sp = np.array(image.spacing)
    model_px = max(prep.spacing[1:])
    assert np.linalg.norm((ci - ce) * sp) < model_px


@st.composite
def mask_pairs_with_orientation(draw):
    shape = draw(st.tuples(*[st.integers(2, 6)] * 3))
    a = draw(arrays(np.bool_, shape))
    b = draw(arrays(np.bool_, shape))
    return a, b, draw(affines())


@settings(**SETTINGS)
@given(mask_pairs_with_orientation())
def test_prop_metrics_do_not_depend_on_the_stored_orientation(case):
    """Scoring on the file's own grid (as cv does) equals scoring in the canonical layout."""
    a, b, affine = case
    va, vb = Volume(a.astype(np.uint8), affine), Volume(b.astype(np.uint8), affine)
    ca, cb = to_canonical(va)[0], to_canonical(vb)[0]
    m_file = M.evaluate(a, b, va.spacing).to_dict()
    m_canon = M.evaluate(ca.data.astype(bool), cb.data.astype(bool), ca.spacing).to_dict()
    for k, v in m_file.items():
        if math.isnan(v):
            assert math.isnan(m_canon[k]), k
        else:
            assert m_canon[k] == pytest.approx(v, rel=1e-9, abs=1e-9), k
    assert M.volume_ml(a, va.spacing) == pytest.approx(M.volume_ml(ca.data, ca.spacing))
