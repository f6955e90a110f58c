"""Synthetic hip MRI generator: geometry, exact masks, realism checks, cohort files."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from femur_core.errors import OutputExistsError
from femur_core.volume_io import read_pair
from femur_core.data import find_subjects, load_subject
from femur_core.synthetic import (
    BONE_LABELS,
    GEOMETRIES,
    make_cohort,
    make_subject,
    threshold_baseline,
    threshold_baseline_dsc,
)

# in-plane 4-neighbourhood: erode / dilate within each coronal slice only
_IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE[:, :, 1] = ndi.generate_binary_structure(2, 1)


@pytest.fixture(scope="module")
def dev_small():
    """A dev-like subject with both hips at 96 x 96 in-plane."""
    return make_subject(3, "dev", hips="both", downsample=4)


def test_same_seed_same_arrays():
    a_img, a_msk = make_subject(11, "tiny")
    b_img, b_msk = make_subject(11, "tiny")
    np.testing.assert_array_equal(a_img.data, b_img.data)
    np.testing.assert_array_equal(a_msk.data, b_msk.data)
    np.testing.assert_array_equal(a_img.affine, b_img.affine)
    c_img, _ = make_subject(12, "tiny")
    assert c_img.shape != a_img.shape or not np.array_equal(c_img.data, a_img.data)


@pytest.mark.parametrize(
    "geometry, downsample, hips",
    [("tiny", 1, "both"), ("dev", 4, "random"), ("study", 8, "random")],
)
def test_geometry_matches_preset(geometry, downsample, hips):
    geo = GEOMETRIES[geometry]
    img, msk = make_subject(5, geometry, hips=hips, downsample=downsample)
    n0, n1 = (m // downsample for m in geo["matrix"])
    lo, hi = geo["n_slices"]
    assert img.shape[:2] == (n0, n1)
    assert lo <= img.shape[2] <= hi
    px = geo["pixel_mm"] * downsample
    np.testing.assert_allclose(img.spacing, (px, px, geo["slice_mm"]), rtol=1e-6)
    assert img.axcodes == tuple(geo["axcodes"]) == ("L", "I", "P")
    assert img.data.dtype == np.float32 and msk.data.dtype == np.uint8
    assert msk.shape == img.shape
    np.testing.assert_array_equal(msk.affine, img.affine)
    assert np.isfinite(img.data).all()
    assert img.data.min() >= 0
    # intensities like an int16 T1 scan: fat well above 300, nothing absurd
    assert 300 < np.percentile(img.data, 99) < 1500
    assert img.data.max() < 2500


def test_dev_full_size_grid_is_the_real_protocol():
    geo = GEOMETRIES["dev"]
    assert geo["matrix"] == (384, 384)
    assert geo["pixel_mm"] == pytest.approx(0.911, abs=1e-3)
    assert geo["slice_mm"] == pytest.approx(5.2)
    study = GEOMETRIES["study"]
    assert study["matrix"][0] * study["pixel_mm"] == pytest.approx(120, abs=1)
    assert study["n_slices"] == (60, 60)


@pytest.mark.parametrize("hips, n_parts", [("both", 2), ("left", 1), ("right", 1)])
def test_mask_binary_with_one_part_per_femur(hips, n_parts):
    for seed in (0, 1):
        img, msk = make_subject(seed, "tiny", hips=hips)
        assert img.meta["hips"] == hips
        assert set(np.unique(msk.data)) == {0, 1}
        labels, n = ndi.label(msk.data)
        assert n == n_parts
        sizes = ndi.sum(msk.data, labels, range(1, n + 1))
        assert sizes.min() > 200  # whole proximal femurs, not specks
        # each femur lies on its own side of the patient (world x: + right, - left)
        for lab in range(1, n + 1):
            centre = np.array(ndi.center_of_mass(labels == lab))
            x_world = (img.affine @ np.r_[centre, 1.0])[0]
            if hips == "left":
                assert x_world < -20
            elif hips == "right":
                assert x_world > 20


def test_dev_subject_has_two_femurs(dev_small):
    _, msk = dev_small
    assert ndi.label(msk.data)[1] == 2


def test_random_hips_mostly_both_for_dev():
    sides = [make_subject(s, "dev", downsample=8)[0].meta["hips"] for s in range(8)]
    assert sides.count("both") >= 5  # 6 of these 8 seeds; odds 0.8 / 0.1 / 0.1
    assert set(sides) <= {"both", "left", "right"}


def test_femur_is_bright_marrow_inside_dark_cortex(dev_small):
    img, msk = dev_small
    a, m = img.data, msk.data > 0
    inner = ndi.binary_erosion(m, _IN_PLANE, iterations=2)
    rim = m & ~ndi.binary_erosion(m, _IN_PLANE)
    around = ndi.binary_dilation(m, _IN_PLANE, iterations=3) & ~m
    marrow = np.median(a[inner])
    assert 250 < marrow < 600
    assert marrow > 1.5 * np.median(a[rim])  # dark cortex at the surface
    assert marrow > 1.2 * np.median(a[around])  # muscle, joint space, cortex around it
    assert (a[m] > 0.6 * marrow).mean() > 0.6  # mostly marrow


def test_pelvis_marrow_matches_femur_marrow(dev_small):
    """Bright bone touching the femoral head that is not femur: thresholding cannot split them."""
    img, msk = dev_small
    a, m = img.data, msk.data > 0
    marrow = np.median(a[ndi.binary_erosion(m, _IN_PLANE, iterations=2)])
    near = ndi.binary_dilation(m, _IN_PLANE, iterations=6) & ~ndi.binary_dilation(m, _IN_PLANE, iterations=1)
    similar = near & (np.abs(a - marrow) < 0.2 * marrow)
    assert similar.sum() > 0.1 * m.sum()


def test_threshold_baseline_finds_exact_rules():
    rng = np.random.default_rng(0)
    img = rng.uniform(0, 100, (20, 20, 10)).astype(np.float32)
    dsc, t = threshold_baseline_dsc(img, img > 60)
    assert dsc > 0.99 and 58 < t < 62
    r = threshold_baseline(img, (img > 30) & (img < 50))
    assert r["dsc_band"] > 0.98
    assert 28 < r["lo"] < 32 and 48 < r["hi"] < 52
    assert r["dsc_above"] < 0.7 and r["dsc_below"] < 0.7
    with pytest.raises(ValueError):
        threshold_baseline(img, np.zeros(img.shape, bool))


def test_thresholding_cannot_solve_the_data(dev_small):
    img, msk = dev_small
    dsc, _ = threshold_baseline_dsc(img.data, msk.data)
    # measured about 0.09 - 0.18 on dev-like subjects (real scans: about 0.04)
    assert dsc < 0.4
    # even on the slices that hold femur
    ks = np.flatnonzero(msk.data.any(axis=(0, 1)))
    dsc_slices, _ = threshold_baseline_dsc(img.data[:, :, ks], msk.data[:, :, ks])
    assert dsc_slices < 0.5


def test_make_cohort_writes_readable_pairs_and_refuses_overwrite(tmp_path):
    ids = make_cohort(tmp_path / "syn", n=2, seed=1, geometry="tiny")
    assert ids == ["sub01", "sub02"]
    for sid in ids:
        img, msk = read_pair(tmp_path / "syn" / f"{sid}_image.nii.gz", tmp_path / "syn" / f"{sid}_femur.nii.gz")
        assert img.shape == msk.shape and img.axcodes == ("L", "I", "P")
        assert set(np.unique(msk.data)) == {0, 1}
        assert msk.data.sum() > 200
    # stored values are the generator's, rounded
    ref_img, ref_msk = make_subject(1000, "tiny")
    img, msk = read_pair(tmp_path / "syn" / "sub01_image.nii.gz", tmp_path / "syn" / "sub01_femur.nii.gz")
    np.testing.assert_allclose(img.data, ref_img.data, atol=0.51)
    np.testing.assert_array_equal(msk.data, ref_msk.data)
    np.testing.assert_allclose(img.affine, ref_img.affine, atol=1e-4)

    before = (tmp_path / "syn" / "sub02_femur.nii.gz").read_bytes()
    with pytest.raises(OutputExistsError):
        make_cohort(tmp_path / "syn", n=2, seed=2, geometry="tiny")
    assert (tmp_path / "syn" / "sub02_femur.nii.gz").read_bytes() == before
    assert make_cohort(tmp_path / "syn", n=2, seed=2, geometry="tiny", overwrite=True) == ids
    assert (tmp_path / "syn" / "sub02_femur.nii.gz").read_bytes() != before


def test_bone_map_holds_the_femur_mask_and_the_other_bones(dev_small):
    image, mask, bones = make_subject(3, "dev", hips="both", downsample=4, bones=True)
    # the image and mask do not depend on whether the bone map is asked for
    np.testing.assert_array_equal(image.data, dev_small[0].data)
    np.testing.assert_array_equal(mask.data, dev_small[1].data)
    np.testing.assert_array_equal(bones.affine, image.affine)
    assert bones.data.dtype == np.uint8 and bones.shape == image.shape
    np.testing.assert_array_equal(bones.data == BONE_LABELS["femur"], mask.data > 0)
    counts = np.bincount(bones.data.ravel(), minlength=5)
    assert set(np.unique(bones.data)) <= set(BONE_LABELS.values())
    # a whole-pelvis field of view holds ilium, spine and sacrum, each sizeable
    for name in ("ilium", "spine", "sacrum"):
        assert counts[BONE_LABELS[name]] > 100, name
    # the ilia are beside the femurs (acetabulum): some ilium voxel within 3 voxels of a femur voxel
    near = ndi.binary_dilation(mask.data > 0, iterations=3)
    assert (near & (bones.data == BONE_LABELS["ilium"])).any()


def test_make_cohort_with_bones_loads_as_label_maps(tmp_path):
    make_cohort(tmp_path / "syn", n=2, seed=1, geometry="tiny", bones=True)
    files = find_subjects(tmp_path / "syn")
    assert [f.id for f in files] == ["sub01", "sub02"]
    assert all(f.labels is not None and f.labels.name.endswith("_bones.nii.gz") for f in files)
    subj = load_subject(files[0])
    np.testing.assert_array_equal(subj.labels.data == 1, subj.mask.data > 0)
    _, _, ref = make_subject(1000, "tiny", bones=True)
    np.testing.assert_array_equal(subj.labels.data, ref.data)
    # refuses before writing anything when a bone map is in the way
    before = (tmp_path / "syn" / "sub02_bones.nii.gz").read_bytes()
    (tmp_path / "syn" / "sub01_image.nii.gz").unlink()
    (tmp_path / "syn" / "sub01_femur.nii.gz").unlink()
    with pytest.raises(OutputExistsError):
        make_cohort(tmp_path / "syn", n=2, seed=2, geometry="tiny", bones=True)
    assert not (tmp_path / "syn" / "sub01_image.nii.gz").exists()
    assert (tmp_path / "syn" / "sub02_bones.nii.gz").read_bytes() == before


@pytest.mark.parametrize(
    "kwargs",
    [
        {"geometry": "nope"},
        {"geometry": "study", "hips": "both"},
        {"geometry": "tiny", "hips": "middle"},
        {"geometry": "tiny", "downsample": 0},
        {"geometry": "tiny", "downsample": 16},
    ],
)
def test_bad_arguments_are_refused(kwargs):
    with pytest.raises(ValueError):
        make_subject(0, **kwargs)
