"""Tests of femur_core.metrics against independent, brute-force computations."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import ndimage as ndi

from femur_core import metrics as M

# --------------------------------------------------------------------------
# Independent reference implementations (plain Python loops, no scipy)
# --------------------------------------------------------------------------


def loop_confusion(pred, ref):
    tp = fp = fn = tn = 0
    for p, r in zip(np.asarray(pred).ravel().tolist(), np.asarray(ref).ravel().tolist()):
        p, r = bool(p), bool(r)
        if p and r:
            tp += 1
        elif p:
            fp += 1
        elif r:
            fn += 1
        else:
            tn += 1
    return tp, fp, fn, tn


def loop_surface_points(mask):
    """Surface voxel indices: foreground voxels with a 6-neighbour outside the mask."""
    mask = np.asarray(mask, dtype=bool)
    pts = []
    offsets = []
    for ax in range(mask.ndim):
        for step in (-1, 1):
            o = [0] * mask.ndim
            o[ax] = step
            offsets.append(o)
    for idx in itertools.product(*(range(n) for n in mask.shape)):
        if not mask[idx]:
            continue
        for o in offsets:
            nb = tuple(i + d for i, d in zip(idx, o))
            outside = any(j < 0 or j >= n for j, n in zip(nb, mask.shape))
            if outside or not mask[nb]:
                pts.append(idx)
                break
    return np.array(pts, dtype=float).reshape(-1, mask.ndim)


def brute_distances(pred, ref, spacing):
    """Pairwise surface distances, minimum per point, via broadcasting."""
    a = loop_surface_points(pred) * np.asarray(spacing, float)
    b = loop_surface_points(ref) * np.asarray(spacing, float)
    if len(a) == 0 or len(b) == 0:
        return None
    d = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    return d.min(axis=1), d.min(axis=0)


def loop_counts_at(prob, ref, t):
    tp = fp = 0
    for p, r in zip(prob.ravel().tolist(), ref.ravel().tolist()):
        if p >= t:
            if r:
                tp += 1
            else:
                fp += 1
    return tp, fp


def loop_auc(prob, ref):
    """Mann-Whitney: P(score_pos > score_neg) + 0.5 P(tie)."""
    pos = [p for p, r in zip(prob.ravel().tolist(), ref.ravel().tolist()) if r]
    neg = [p for p, r in zip(prob.ravel().tolist(), ref.ravel().tolist()) if not r]
    s = 0.0
    for p in pos:
        for n in neg:
            s += 1.0 if p > n else (0.5 if p == n else 0.0)
    return s / (len(pos) * len(neg))


def loop_ap(prob, ref):
    """sum_n (R_n - R_{n-1}) P_n over distinct thresholds, descending."""
    n_pos = int(sum(bool(r) for r in ref.ravel().tolist()))
    ap, r_prev = 0.0, 0.0
    for t in sorted(set(prob.ravel().tolist()), reverse=True):
        tp, fp = loop_counts_at(prob, ref, t)
        r = tp / n_pos
        ap += (r - r_prev) * (tp / (tp + fp))
        r_prev = r
    return ap


def rand_masks(seed, shape=(5, 6, 7), p=0.4, smooth=True):
    rng = np.random.default_rng(seed)
    a = rng.random(shape) < p
    b = rng.random(shape) < p
    if smooth:
        a = ndi.binary_opening(a) | ndi.binary_closing(a)
        b = ndi.binary_opening(b) | ndi.binary_closing(b)
    return a, b


# --------------------------------------------------------------------------
# Confusion and overlap
# --------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_confusion_matches_loops(seed):
    a, b = rand_masks(seed, smooth=False)
    assert M.confusion(a, b) == loop_confusion(a, b)
    assert all(type(v) is int for v in M.confusion(a, b))


def test_confusion_accepts_nonbool_masks():
    a = np.array([[0, 2], [3, 0]], dtype=np.uint8)
    b = np.array([[0, 1], [0, 1]], dtype=np.int64)
    assert M.confusion(a, b) == (1, 1, 1, 1)


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):
        M.confusion(np.zeros((2, 3), bool), np.zeros((3, 2), bool))
    with pytest.raises(ValueError, match=r"\(4,\).*\(5,\)"):
        M.hd95(np.zeros(4, bool), np.zeros(5, bool), (1.0,))


@pytest.mark.parametrize("seed", range(5))
def test_overlap_metrics_match_formulas(seed):
    a, b = rand_masks(seed, smooth=False)
    tp, fp, fn, tn = loop_confusion(a, b)
    assert M.dice(a, b) == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert M.precision(a, b) == pytest.approx(tp / (tp + fp))
    assert M.recall(a, b) == pytest.approx(tp / (tp + fn))
    assert M.specificity(a, b) == pytest.approx(tn / (tn + fp))


def test_overlap_known_values():
    ref = np.zeros((4, 4), bool)
    ref[:2, :2] = True  # 4 voxels
    pred = np.zeros((4, 4), bool)
    pred[:2, :3] = True  # 6 voxels, 4 overlap
    assert M.dice(pred, ref) == pytest.approx(8 / 10)
    assert M.precision(pred, ref) == pytest.approx(4 / 6)
    assert M.recall(pred, ref) == pytest.approx(1.0)
    assert M.specificity(pred, ref) == pytest.approx(10 / 12)


def test_overlap_empty_conventions():
    e = np.zeros((3, 3, 3), bool)
    f = e.copy()
    f[1, 1, 1] = True
    full = np.ones((3, 3, 3), bool)
    # both empty
    assert (M.dice(e, e), M.precision(e, e), M.recall(e, e), M.specificity(e, e)) == (1.0, 1.0, 1.0, 1.0)
    # prediction empty, reference not
    assert M.dice(e, f) == 0.0
    assert M.precision(e, f) == 0.0
    assert M.recall(e, f) == 0.0
    assert M.specificity(e, f) == 1.0
    # reference empty, prediction not
    assert M.dice(f, e) == 0.0
    assert M.precision(f, e) == 0.0
    assert M.recall(f, e) == 0.0
    assert M.specificity(f, e) == pytest.approx(26 / 27)
    # no reference negatives
    assert M.specificity(f, full) == 1.0
    assert M.specificity(full, full) == 1.0


# --------------------------------------------------------------------------
# Surfaces and distances
# --------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_surface_matches_loops_and_scipy_erosion(seed):
    a, _ = rand_masks(seed, shape=(4, 5, 6), p=0.6, smooth=False)
    got = np.argwhere(M._surface(a)).astype(float)
    np.testing.assert_array_equal(got, loop_surface_points(a))
    cross = ndi.generate_binary_structure(3, 1)
    expected = a & ~ndi.binary_erosion(a, structure=cross, border_value=0)
    np.testing.assert_array_equal(M._surface(a), expected)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (5.2, 0.91, 0.91), (0.5, 2.0, 1.3)])
def test_surface_distances_match_brute_force(seed, spacing):
    a, b = rand_masks(seed, shape=(6, 7, 8), p=0.5)
    if not a.any() or not b.any():
        pytest.skip("degenerate draw")
    d_ab, d_ba = M.surface_distances(a, b, spacing)
    e_ab, e_ba = brute_distances(a, b, spacing)
    np.testing.assert_allclose(d_ab, e_ab, atol=1e-9)
    np.testing.assert_allclose(d_ba, e_ba, atol=1e-9)
    pooled = np.concatenate([e_ab, e_ba])
    assert M.hd95(a, b, spacing) == pytest.approx(max(np.percentile(e_ab, 95), np.percentile(e_ba, 95)))
    assert M.hd95(a, b, spacing, method="pooled") == pytest.approx(np.percentile(pooled, 95))
    assert M.assd(a, b, spacing) == pytest.approx(pooled.mean())


@pytest.mark.parametrize("seed", range(4))
def test_edt_and_kdtree_backends_agree(seed):
    a, b = rand_masks(seed, shape=(7, 9, 10), p=0.5)
    sp = (5.2, 0.91, 0.91)
    pc, rc = M._crop_pair(a, b)
    sa, sb = M._surface(pc), M._surface(rc)
    np.testing.assert_allclose(M._distances_to(sa, sb, sp, "edt"), M._distances_to(sa, sb, sp, "kdtree"), atol=1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_auto_backend_choice_does_not_change_results(seed, monkeypatch):
    """surface_distances gives the same numbers whichever backend "auto" picks."""
    a, b = rand_masks(seed, shape=(8, 20, 20), p=0.5)
    sp = (5.2, 0.91, 0.91)
    monkeypatch.setattr(M, "_KDTREE_FACTOR", 0)  # always the k-d tree
    kd = M.surface_distances(a, b, sp)
    monkeypatch.setattr(M, "_KDTREE_FACTOR", 10**9)  # always the EDT
    edt = M.surface_distances(a, b, sp)
    np.testing.assert_allclose(kd[0], edt[0], atol=1e-9)
    np.testing.assert_allclose(kd[1], edt[1], atol=1e-9)


def test_large_mask_takes_kdtree_path(monkeypatch):
    """A big mask (sparse surfaces in a large box) is measured with the k-d tree, a small dense one
    with the EDT, and both give the brute-force distances: spies record which backend ran."""
    calls = []
    real_tree, real_edt = M.cKDTree, M.ndi.distance_transform_edt
    monkeypatch.setattr(M, "cKDTree", lambda pts: calls.append("kdtree") or real_tree(pts))
    monkeypatch.setattr(M.ndi, "distance_transform_edt", lambda *a, **k: calls.append("edt") or real_edt(*a, **k))
    z, y, x = np.ogrid[:30, :120, :120]
    ref = ((z - 15) / 14.0) ** 2 + ((y - 60) / 57.0) ** 2 + ((x - 60) / 57.0) ** 2 <= 1
    pred = ((z - 15) / 13.0) ** 2 + ((y - 61) / 55.0) ** 2 + ((x - 58) / 56.0) ** 2 <= 1
    sp = (5.2, 0.91, 0.91)
    d_pr, d_rp = M.surface_distances(pred, ref, sp)
    assert calls == ["kdtree", "kdtree"]
    # exact: the k-d tree answer equals the EDT answer over the whole box
    np.testing.assert_allclose(d_pr, M._distances_to(*(M._surface(c) for c in M._crop_pair(pred, ref)), sp, "edt"))
    calls.clear()
    a, b = rand_masks(1, shape=(6, 8, 9), p=0.6)  # small and dense: the EDT
    d_ab, d_ba = M.surface_distances(a, b, sp)
    assert calls == ["edt", "edt"]
    e_ab, e_ba = brute_distances(a, b, sp)
    np.testing.assert_allclose(d_ab, e_ab)
    np.testing.assert_allclose(d_ba, e_ba)


def test_crop_equals_full_grid():
    a = np.zeros((10, 12, 14), bool)
    b = np.zeros_like(a)
    a[2:5, 3:8, 4:9] = True
    b[3:7, 4:9, 6:12] = True
    sp = (2.0, 1.0, 0.5)
    cross = ndi.generate_binary_structure(3, 1)
    sa = a & ~ndi.binary_erosion(a, cross)
    sb = b & ~ndi.binary_erosion(b, cross)
    full_ab = ndi.distance_transform_edt(~sb, sampling=sp)[sa]
    full_ba = ndi.distance_transform_edt(~sa, sampling=sp)[sb]
    d_ab, d_ba = M.surface_distances(a, b, sp)
    np.testing.assert_allclose(d_ab, full_ab)
    np.testing.assert_allclose(d_ba, full_ba)


def test_mask_touching_array_edge():
    a = np.ones((3, 4, 5), bool)  # every voxel on the array edge is surface
    b = a.copy()
    b[:, :, -1] = False
    d_ab, d_ba = M.surface_distances(a, b, (1.0, 1.0, 1.0))
    e_ab, e_ba = brute_distances(a, b, (1.0, 1.0, 1.0))
    np.testing.assert_allclose(d_ab, e_ab)
    np.testing.assert_allclose(d_ba, e_ba)


def test_anisotropic_slice_shift_sheet():
    """A one-slice sheet shifted by one 5 mm slice: every distance is 5 mm."""
    ref = np.zeros((6, 8, 8), bool)
    ref[2, 2:6, 2:6] = True
    pred = np.roll(ref, 1, axis=0)
    sp = (5.0, 0.91, 0.91)
    d_ab, d_ba = M.surface_distances(pred, ref, sp)
    np.testing.assert_allclose(d_ab, 5.0)
    np.testing.assert_allclose(d_ba, 5.0)
    assert M.hd95(pred, ref, sp) == pytest.approx(5.0)
    assert M.assd(pred, ref, sp) == pytest.approx(5.0)
    # the same shift with isotropic voxels is 1 voxel = 1 mm
    assert M.hd95(pred, ref, (1.0, 1.0, 1.0)) == pytest.approx(1.0)


def test_anisotropic_block_shift_axis_dependence():
    ref = np.zeros((8, 12, 12), bool)
    ref[2:5, 3:9, 3:9] = True
    sp = (5.2, 0.91, 0.91)
    through = np.roll(ref, 1, axis=0)
    in_plane = np.roll(ref, 1, axis=2)
    d1 = np.concatenate(M.surface_distances(through, ref, sp))
    d2 = np.concatenate(M.surface_distances(in_plane, ref, sp))
    assert d1.max() == pytest.approx(5.2)
    assert d2.max() == pytest.approx(0.91)
    assert set(np.round(d1, 6)) <= {0.0, 0.91, 1.82, 2.73, 5.2}
    e1 = brute_distances(through, ref, sp)
    assert M.hd95(through, ref, sp) == pytest.approx(max(np.percentile(e1[0], 95), np.percentile(e1[1], 95)))


def test_distance_empty_conventions():
    e = np.zeros((4, 4, 4), bool)
    f = e.copy()
    f[1:3, 1:3, 1:3] = True
    sp = (1.0, 1.0, 1.0)
    assert M.hd95(e, e, sp) == 0.0
    assert M.assd(e, e, sp) == 0.0
    assert math.isnan(M.hd95(e, f, sp)) and math.isnan(M.hd95(f, e, sp))
    assert math.isnan(M.assd(e, f, sp)) and math.isnan(M.assd(f, e, sp))
    d_ab, d_ba = M.surface_distances(f, e, sp)
    assert d_ab.size == 8 and np.all(np.isinf(d_ab)) and d_ba.size == 0
    d_ab, d_ba = M.surface_distances(e, e, sp)
    assert d_ab.size == 0 and d_ba.size == 0


def test_identical_masks_zero_distance():
    a, _ = rand_masks(3, shape=(6, 7, 8), p=0.5)
    assert M.hd95(a, a, (5.2, 0.9, 0.9)) == 0.0
    assert M.assd(a, a, (5.2, 0.9, 0.9)) == 0.0


def test_bad_spacing_and_method():
    a = np.ones((2, 2, 2), bool)
    with pytest.raises(ValueError, match="spacing"):
        M.hd95(a, a, (1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        M.hd95(a, a, (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="method"):
        M.hd95(a, a, (1.0, 1.0, 1.0), method="mean")


# --------------------------------------------------------------------------
# Volume
# --------------------------------------------------------------------------


def test_volume_ml_and_difference():
    ref = np.zeros((4, 10, 10), bool)
    ref[:2, :5, :4] = True  # 40 voxels
    pred = np.zeros_like(ref)
    pred[:2, :5, :5] = True  # 50 voxels
    sp = (5.0, 2.0, 1.0)  # 10 mm^3 per voxel
    assert M.volume_ml(ref, sp) == pytest.approx(40 * 10 / 1000)
    assert M.volume_difference(pred, ref, sp) == pytest.approx(0.25)
    assert M.volume_difference(ref, pred, sp) == pytest.approx(-0.2)
    e = np.zeros_like(ref)
    assert M.volume_difference(e, e) == 0.0
    assert math.isnan(M.volume_difference(pred, e))
    assert M.volume_difference(e, ref) == -1.0


# --------------------------------------------------------------------------
# Curves
# --------------------------------------------------------------------------


def small_scores(seed, n=300, grid=None):
    rng = np.random.default_rng(seed)
    ref = rng.random(n) < 0.3
    prob = np.clip(0.35 * ref + 0.65 * rng.random(n), 0, 1)
    if grid is not None:
        prob = np.round(prob * grid) / grid  # many ties
    return prob, ref


@pytest.mark.parametrize("seed", range(4))
def test_exact_roc_matches_loops(seed):
    prob, ref = small_scores(seed, n=120, grid=20)
    fpr, tpr, thr = M.roc_curve_exact(prob, ref)
    assert thr[0] == np.inf and fpr[0] == 0 and tpr[0] == 0
    assert np.all(np.diff(thr) < 0)
    np.testing.assert_array_equal(thr[1:], sorted(set(prob.tolist()), reverse=True))
    n_pos, n_neg = int(ref.sum()), int((~ref).sum())
    for f, t, th in zip(fpr[1:], tpr[1:], thr[1:]):
        tp, fp = loop_counts_at(prob, ref, th)
        assert t == pytest.approx(tp / n_pos) and f == pytest.approx(fp / n_neg)
    assert M.roc_auc_exact(prob, ref) == pytest.approx(loop_auc(prob, ref))
    assert M.average_precision_exact(prob, ref) == pytest.approx(loop_ap(prob, ref))


@pytest.mark.parametrize("seed", range(3))
def test_exact_continuous_scores(seed):
    prob, ref = small_scores(seed, n=200)
    assert M.roc_auc_exact(prob, ref) == pytest.approx(loop_auc(prob, ref))
    assert M.average_precision_exact(prob, ref) == pytest.approx(loop_ap(prob, ref))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("seed", range(3))
def test_histogram_equals_exact_on_grid_values(seed, dtype):
    """Probabilities on the bin grid: the fast path is exact, ties included."""
    prob, ref = small_scores(seed, n=5000, grid=1000)
    prob = prob.astype(dtype)
    c = M.curves_from_histogram(prob.reshape(50, 100), ref.reshape(50, 100), bins=1001)
    assert c.roc_auc() == pytest.approx(M.roc_auc_exact(prob, ref), abs=1e-12)
    assert c.average_precision() == pytest.approx(M.average_precision_exact(prob, ref), abs=1e-12)
    # every grid point is the operating point prob >= t of the original map
    for k in range(1, len(c.thresholds), 37):
        t = c.thresholds[k]
        tp = int(np.count_nonzero((prob >= dtype(t)) & ref))
        fp = int(np.count_nonzero((prob >= dtype(t)) & ~ref))
        assert (c.tp[k], c.fp[k]) == (tp, fp)
        assert c.fn[k] == ref.sum() - tp and c.tn[k] == (~ref).sum() - fp


@pytest.mark.parametrize("seed", range(3))
def test_histogram_close_to_exact_on_continuous_values(seed):
    prob, ref = small_scores(seed, n=20000)
    prob = prob.astype(np.float32)
    assert M.roc_auc(prob, ref) == pytest.approx(M.roc_auc_exact(prob, ref), abs=1e-3)
    assert M.average_precision(prob, ref) == pytest.approx(M.average_precision_exact(prob, ref), abs=1e-3)


def test_histogram_counts_cover_every_voxel_and_add_up():
    rng = np.random.default_rng(7)
    p1, r1 = rng.random((3, 4, 5)), rng.random((3, 4, 5)) < 0.5
    p2, r2 = rng.random(50), rng.random(50) < 0.2
    pos1, neg1 = M.histogram_counts(p1, r1, bins=11)
    pos2, neg2 = M.histogram_counts(p2, r2, bins=11)
    assert pos1.sum() == r1.sum() and neg1.sum() == (~r1).sum()
    pooled = M.curves_from_counts(pos1 + pos2, neg1 + neg2)
    direct = M.curves_from_histogram(np.concatenate([p1.ravel(), p2]), np.concatenate([r1.ravel(), r2]), bins=11)
    np.testing.assert_array_equal(pooled.tp, direct.tp)
    np.testing.assert_array_equal(pooled.fp, direct.fp)


def test_curves_layout_and_wrappers():
    prob, ref = small_scores(0, n=500, grid=100)
    c = M.curves_from_histogram(prob, ref, bins=101)
    assert len(c.thresholds) == 102 and c.thresholds[0] == np.inf
    np.testing.assert_allclose(c.thresholds[1:], np.linspace(1, 0, 101))
    assert c.tp[0] == 0 and c.fp[0] == 0 and c.precision[0] == 1.0
    assert c.tp[-1] == ref.sum() and c.fp[-1] == (~ref).sum()  # threshold 0: all predicted
    assert np.all(np.diff(c.tp) >= 0) and np.all(np.diff(c.fp) >= 0)
    fpr, tpr, thr = M.roc_curve(prob, ref, bins=101)
    np.testing.assert_array_equal(fpr, c.fpr)
    np.testing.assert_array_equal(tpr, c.tpr)
    prec, rec, _ = M.pr_curve(prob, ref, bins=101)
    np.testing.assert_array_equal(prec, c.precision)
    np.testing.assert_array_equal(rec, c.recall)


def test_curves_degenerate_and_invalid():
    prob = np.array([0.1, 0.5, 0.9])
    assert math.isnan(M.roc_auc(prob, np.zeros(3, bool)))
    assert math.isnan(M.average_precision(prob, np.zeros(3, bool)))
    assert math.isnan(M.roc_auc(prob, np.ones(3, bool)))
    assert M.average_precision(prob, np.ones(3, bool)) == pytest.approx(1.0)
    assert M.roc_auc(prob, np.array([False, False, True])) == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        M.curves_from_histogram(np.array([0.2, 1.5]), np.array([True, False]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        M.curves_from_histogram(np.array([0.2, np.nan]), np.array([True, False]))
    with pytest.raises(ValueError, match="shape"):
        M.curves_from_histogram(np.zeros(3), np.zeros(4, bool))
    with pytest.raises(ValueError, match="bins"):
        M.curves_from_histogram(prob, np.ones(3, bool), bins=1)


def test_optimal_threshold_crafted():
    ref = np.array([1, 1, 1, 1, 0, 0, 0, 0], bool)
    prob = np.array([0.9, 0.8, 0.7, 0.3, 0.6, 0.2, 0.1, 0.0])
    # (R, P): t=.7 -> (.75, 1) d=.25; t=.3 -> (1, .8) d=.2; t=.2 -> (1, .667)
    c = M.curves_from_histogram(prob, ref, bins=11)
    assert M.optimal_threshold(c) == pytest.approx(0.3)
    # brute force over every grid threshold
    best = min(
        (math.hypot(1 - tp / 4, 1 - (tp / (tp + fp) if tp + fp else 1.0)), -t, t)
        for t in [k / 10 for k in range(11)]
        for tp, fp in [loop_counts_at(prob, ref, t)]
    )
    assert M.optimal_threshold(c) == pytest.approx(best[2])
    assert M.optimal_threshold(M._exact_curves(prob, ref)) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        M.optimal_threshold(M.curves_from_histogram(prob, np.zeros(8, bool), bins=11))


# --------------------------------------------------------------------------
# evaluate / summarise
# --------------------------------------------------------------------------


def test_evaluate_matches_single_metrics():
    a, b = rand_masks(11, shape=(6, 8, 9), p=0.5)
    sp = (5.2, 0.91, 0.91)
    m = M.evaluate(a, b, sp)
    assert m.dsc == pytest.approx(M.dice(a, b))
    assert m.precision == pytest.approx(M.precision(a, b))
    assert m.recall == pytest.approx(M.recall(a, b))
    assert m.specificity == pytest.approx(M.specificity(a, b))
    assert m.hd95_mm == pytest.approx(M.hd95(a, b, sp))
    assert m.assd_mm == pytest.approx(M.assd(a, b, sp))
    assert m.volume_diff == pytest.approx(M.volume_difference(a, b, sp))
    d = m.to_dict()
    assert list(d) == list(M.METRIC_NAMES)
    assert list(d) == ["dsc", "precision", "recall", "specificity", "hd95_mm", "assd_mm", "volume_diff"]
    assert all(type(v) is float for v in d.values())


def test_evaluate_empty_prediction():
    e = np.zeros((4, 4, 4), bool)
    f = e.copy()
    f[1:3, 1:3, 1:3] = True
    m = M.evaluate(e, f, (1.0, 1.0, 1.0))
    assert (m.dsc, m.precision, m.recall, m.specificity) == (0.0, 0.0, 0.0, 1.0)
    assert math.isnan(m.hd95_mm) and math.isnan(m.assd_mm)
    assert m.volume_diff == -1.0


def test_summarise():
    rows = [
        M.SubjectMetrics(0.9, 0.8, 0.95, 0.99, 2.0, 1.0, 0.1),
        {"subject": "s2", "dsc": 0.7, "precision": 0.6, "recall": 0.85, "specificity": 0.97,
         "hd95_mm": float("nan"), "assd_mm": float("nan"), "volume_diff": -0.1},
        M.SubjectMetrics(0.8, 0.7, 0.9, 0.98, 4.0, 3.0, 0.0),
    ]
    s = M.summarise(rows)
    assert set(s) == set(M.METRIC_NAMES)
    assert s["dsc"]["mean"] == pytest.approx(0.8)
    assert s["dsc"]["sd"] == pytest.approx(0.1)  # sample sd of .9 .7 .8
    assert s["dsc"]["n"] == 3 and s["dsc"]["n_nan"] == 0
    assert s["hd95_mm"]["mean"] == pytest.approx(3.0)
    assert s["hd95_mm"]["sd"] == pytest.approx(math.sqrt(2.0))
    assert s["hd95_mm"]["n"] == 2 and s["hd95_mm"]["n_nan"] == 1
    one = M.summarise(rows[:1])
    assert one["dsc"] == {"mean": 0.9, "sd": 0.0, "n": 1, "n_nan": 0}
    all_nan = M.summarise(rows[1:2])
    assert math.isnan(all_nan["assd_mm"]["mean"]) and all_nan["assd_mm"]["n_nan"] == 1
    with pytest.raises(ValueError):
        M.summarise([])


# --------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------


@st.composite
def mask_pairs(draw, max_side=5):
    shape = draw(st.tuples(*[st.integers(1, max_side)] * 3))
    a = draw(arrays(np.bool_, shape))
    b = draw(arrays(np.bool_, shape))
    return a, b


spacings = st.tuples(*[st.floats(0.3, 6.0, allow_nan=False)] * 3)


@settings(max_examples=60, deadline=None)
@given(mask_pairs())
def test_prop_dice_symmetric_bounded(pair):
    a, b = pair
    d = M.dice(a, b)
    assert 0.0 <= d <= 1.0
    assert d == M.dice(b, a)
    assert M.dice(a, a) == 1.0
    assert M.precision(a, b) == M.recall(b, a)


@settings(max_examples=40, deadline=None)
@given(mask_pairs(), spacings)
def test_prop_distances_symmetric_nonnegative(pair, sp):
    a, b = pair
    h, h2 = M.hd95(a, b, sp), M.hd95(b, a, sp)
    s, s2 = M.assd(a, b, sp), M.assd(b, a, sp)
    if a.any() != b.any():
        assert math.isnan(h) and math.isnan(s)
        return
    assert h == pytest.approx(h2) and s == pytest.approx(s2)
    assert M.hd95(a, b, sp, method="pooled") == pytest.approx(M.hd95(b, a, sp, method="pooled"))
    assert s >= 0.0 and h >= 0.0
    assert M.hd95(a, a, sp) == 0.0 and M.assd(a, a, sp) == 0.0
    if a.any():
        d_ab, d_ba = M.surface_distances(a, b, sp)
        # no distance exceeds the box diagonal
        diag = math.sqrt(sum((n * v) ** 2 for n, v in zip(a.shape, sp)))
        assert max(d_ab.max(), d_ba.max()) <= diag + 1e-9


@settings(max_examples=15, deadline=None)
@given(mask_pairs(max_side=4), spacings)
def test_prop_distances_match_brute_force(pair, sp):
    a, b = pair
    if not (a.any() and b.any()):
        return
    d_ab, d_ba = M.surface_distances(a, b, sp)
    e_ab, e_ba = brute_distances(a, b, sp)
    np.testing.assert_allclose(d_ab, e_ab, atol=1e-9)
    np.testing.assert_allclose(d_ba, e_ba, atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 20), st.booleans()), min_size=2, max_size=40))
def test_prop_auc_matches_mann_whitney(items):
    prob = np.array([p / 20 for p, _ in items])
    ref = np.array([r for _, r in items])
    if ref.all() or not ref.any():
        return
    expected = loop_auc(prob, ref)
    assert M.roc_auc_exact(prob, ref) == pytest.approx(expected)
    assert M.roc_auc(prob, ref, bins=21) == pytest.approx(expected)
    assert M.average_precision(prob, ref, bins=21) == pytest.approx(loop_ap(prob, ref))
