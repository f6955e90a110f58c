"""The cleanup that keeps one femur per hip side, on single-hip and off-centre scans.

Canonical layout (P, I, L): array axis 2 runs left-right. Each test names the plausible bug it catches.
"""

from __future__ import annotations

import numpy as np
import pytest

from femur_core.inference import body_midline, keep_largest_per_side, postprocess

SHAPE = (12, 30, 60)


def _box(z0, z1, y0, y1, x0, x1, shape=SHAPE) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[z0:z1, y0:y1, x0:x1] = True
    return m


FEMUR = _box(2, 10, 5, 25, 8, 18)  # 8 x 20 x 10 = 1600 voxels, right half of the array (columns 8-17)


def _blob(n_voxels: int, x0: int, width: int = 4) -> np.ndarray:
    """A component of exactly ``n_voxels`` voxels starting at column ``x0`` (rows of ``width``)."""
    m = np.zeros(SHAPE, bool)
    flat = np.zeros((SHAPE[0], SHAPE[1], width), bool).ravel()
    flat[:n_voxels] = True
    m[:, :, x0:x0 + width] = flat.reshape(SHAPE[0], SHAPE[1], width)
    return m


def test_single_hip_drops_a_small_blob_on_the_other_side():
    # bug caught: "the largest component on each side" without the size rule keeps a false
    # positive across the midline as a second femur
    blob = _blob(200, 45)  # 12.5 % of the femur, across the midline
    out = keep_largest_per_side(FEMUR | blob)
    np.testing.assert_array_equal(out.astype(bool), FEMUR)


def test_second_component_on_the_same_side_is_dropped_whatever_its_size():
    # bug caught: keeping every component above min_fraction (two "femurs" on one hip)
    blob = _blob(1000, 22)  # 62 % of the femur, same side (columns 22-25 < midline 29.5)
    out = keep_largest_per_side(FEMUR | blob)
    np.testing.assert_array_equal(out.astype(bool), FEMUR)


def test_two_hips_of_unequal_size_are_both_kept():
    # bug caught: the study's single-hip rule (largest component only) applied to two-hip scans
    other = _blob(480, 44)  # 30 % of the femur, across the midline (a hip cut by the field of view)
    out = keep_largest_per_side(FEMUR | other | _blob(30, 52))  # and a speck beside it, dropped
    np.testing.assert_array_equal(out.astype(bool), FEMUR | other)


@pytest.mark.parametrize("min_fraction", [0.2, 0.5])
def test_min_fraction_is_the_boundary(min_fraction):
    # bug caught: a strict comparison, or the parameter ignored (0.2 hard-coded)
    at = int(min_fraction * FEMUR.sum())
    kept = keep_largest_per_side(FEMUR | _blob(at, 44), min_fraction=min_fraction)
    assert kept.sum() == FEMUR.sum() + at
    dropped = keep_largest_per_side(FEMUR | _blob(at - 1, 44), min_fraction=min_fraction)
    assert dropped.sum() == FEMUR.sum()


def test_body_midline_is_the_centre_of_the_body_not_of_the_array():
    img = np.full(SHAPE, 10.0, np.float32)
    img[:, :, 0:40] = 300.0  # body in columns 0-39, air beyond: an off-centre field of view
    assert body_midline(img) == pytest.approx(19.5)
    img[:, :, 0:40] += np.random.default_rng(0).normal(0, 5, (SHAPE[0], SHAPE[1], 40))
    assert body_midline(img) == pytest.approx(19.5, abs=0.01)
    assert body_midline(np.zeros(SHAPE, np.float32)) == pytest.approx(29.5)  # nothing to go by: the centre


def _off_centre_image() -> np.ndarray:
    img = np.full(SHAPE, 10.0, np.float32)
    img[:, :, 0:40] = 300.0  # body midline at column 19.5, array centre at 29.5
    return img


def test_cleanup_splits_the_hips_at_the_body_midline():
    """Two hips of an off-centre scan lie on the same side of the ARRAY centre (both < 29.5) but on
    either side of the BODY midline (19.5): postprocess with the image keeps both.
    Bug caught: the cleanup splitting at the array centre (drops the smaller femur)."""
    right = _box(2, 10, 5, 25, 6, 14)  # cx 9.5
    left = _box(2, 10, 5, 20, 24, 30)  # cx 26.5, 56 % of the right one
    prob = np.where(right | left, 0.9, 0.05).astype(np.float32)
    out = postprocess(prob, 0.5, True, _off_centre_image())
    np.testing.assert_array_equal(out.astype(bool), right | left)
    # the same map split at the array centre loses a femur: what the bug would do
    assert postprocess(prob, 0.5, True, None).sum() == right.sum()


def test_cleanup_drops_a_blob_that_only_the_array_centre_puts_on_the_other_side():
    """Single hip, off-centre scan: the femur (cx 26.5) and a false blob (cx 33.5) are on the same side
    of the body midline (19.5), on either side of the array centre (29.5): the blob must go.
    Bug caught: the array-centre split keeps it as a "second femur" (it passes min_fraction)."""
    femur = _box(2, 10, 5, 25, 22, 31)
    blob = _box(2, 10, 5, 20, 32, 36)  # 480 voxels = 33 % of the femur
    prob = np.where(femur | blob, 0.9, 0.05).astype(np.float32)
    out = postprocess(prob, 0.5, True, _off_centre_image())
    np.testing.assert_array_equal(out.astype(bool), femur)


def test_no_cleanup_keeps_every_component():
    prob = np.where(FEMUR | _blob(30, 52) | _blob(30, 22), 0.9, 0.0).astype(np.float32)
    np.testing.assert_array_equal(postprocess(prob, 0.5, False).astype(bool), prob >= 0.5)
