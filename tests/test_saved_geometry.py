"""Saved predictions keep the scan's exact geometry: ``python -m femur_core.predict`` on an oblique NIfTI
and on a DICOM series folder (CV ``predictions/`` are checked in test_cv_protocol.py).

Bugs caught: outputs written in the canonical (P, I, L) layout or with the canonical affine, the affine
rounded or rebuilt from spacing alone (oblique rotation lost), DICOM slices placed by SliceThickness or
in file order instead of by position, and probability data transposed against its affine.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from femur_core import read_volume
from femur_core.inference import load_model, predict_volume

from reliability_utils import LIP_AFFINE, run_cli, tiny_subject_arrays, write_dicom_series, write_nifti, write_tiny_model


def _oblique_affine() -> np.ndarray:
    a, b = np.deg2rad(9.0), np.deg2rad(-14.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    aff = LIP_AFFINE.copy()
    aff[:3, :3] = rz @ ry @ aff[:3, :3]
    aff[:3, 3] = [-31.25, 17.5, 102.75]
    return aff


def _centres(affine: np.ndarray, shape) -> np.ndarray:
    """World positions (mm) of every voxel centre, sorted, rounded to 1 um: the grid as a set."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    pts = idx @ affine[:3, :3].T + affine[:3, 3]
    pts = np.round(pts, 3) + 0.0
    return pts[np.lexsort(pts.T[::-1])]


@pytest.fixture(scope="module")
def predicted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("geometry")
    image, _ = tiny_subject_arrays(5)
    nii = write_nifti(tmp / "oblique_scan.nii.gz", image, _oblique_affine())
    geo = write_dicom_series(tmp / "dicom_scan", n=5, rows=12, cols=10, iop=(0.96, 0.28, 0.0, 0.0, 0.0, -1.0),  # oblique, unit
                             first=(-40.0, 60.0, 25.0), step=3.5, pixel_spacing=(1.2, 0.9))
    model = write_tiny_model(tmp / "model.pt")
    out = tmp / "out"
    proc = run_cli("predict", [model, nii, tmp / "dicom_scan", "--out", out, "--device", "cpu", "--precision", "fp32",
                               "--no-tta"], timeout=300)
    assert proc.returncode == 0, proc.stderr
    return tmp, out, geo, model


def test_nifti_outputs_carry_the_scans_oblique_affine(predicted):
    tmp, out, _, model = predicted
    src = nib.load(str(tmp / "oblique_scan.nii.gz"))
    for name in ("oblique_scan_mask.nii.gz", "oblique_scan_prob.nii.gz"):
        saved = nib.load(str(out / name))
        assert saved.shape == src.shape
        np.testing.assert_allclose(saved.affine, src.affine, rtol=0, atol=1e-5)
        np.testing.assert_allclose(saved.header.get_sform(), src.header.get_sform(), rtol=0, atol=1e-5)
        assert nib.aff2axcodes(saved.affine) == nib.aff2axcodes(src.affine)
    assert nib.load(str(out / "oblique_scan_mask.nii.gz")).get_data_dtype() == np.uint8
    # the data lies in the scan's own voxel order: equal to the library's prediction on that grid
    expected = predict_volume(load_model(model), read_volume(tmp / "oblique_scan.nii.gz"), flip_tta=False,
                              device="cpu", precision="fp32")
    prob = np.asarray(nib.load(str(out / "oblique_scan_prob.nii.gz")).get_fdata())
    assert np.ptp(expected.prob.data) > 0.01  # a map with structure, so a transposition would show
    np.testing.assert_allclose(prob, expected.prob.data, atol=1 / 255 + 1e-6)
    np.testing.assert_array_equal(np.asarray(nib.load(str(out / "oblique_scan_mask.nii.gz")).dataobj),
                                  expected.mask.data)


def test_dicom_folder_outputs_sit_on_the_series_pixel_grid(predicted):
    tmp, out, geo, model = predicted
    rows, cols = 12, 10
    row_dir, col_dir = np.asarray(geo["iop"][:3], float), np.asarray(geo["iop"][3:], float)
    dy, dx = geo["pixel_spacing"]
    # every pixel centre of the series from the DICOM tags alone (LPS -> RAS)
    pixels = []
    for k in geo["pixels"]:
        for r in range(rows):
            for c in range(cols):
                lps = geo["first"] + k * geo["step"] * geo["normal"] + c * dx * row_dir + r * dy * col_dir
                pixels.append([-lps[0], -lps[1], lps[2]])
    pixels = np.round(np.asarray(pixels), 3) + 0.0
    pixels = pixels[np.lexsort(pixels.T[::-1])]
    for name in ("dicom_scan_mask.nii.gz", "dicom_scan_prob.nii.gz"):
        saved = nib.load(str(out / name))
        assert sorted(saved.shape) == sorted((len(geo["pixels"]), rows, cols))
        np.testing.assert_allclose(_centres(saved.affine, saved.shape), pixels, atol=2e-3)
    # and the data is in the order its affine says: that of the library's own reading of the folder
    image = read_volume(tmp / "dicom_scan")
    saved = nib.load(str(out / "dicom_scan_prob.nii.gz"))
    np.testing.assert_allclose(saved.affine, image.affine, atol=1e-4)
    expected = predict_volume(load_model(model), image, flip_tta=False, device="cpu", precision="fp32")
    np.testing.assert_allclose(np.asarray(saved.get_fdata()), expected.prob.data, atol=1 / 255 + 1e-6)
