"""The real development data (../shared/data/pelvic_mri; CI has it): layout, label maps, orientation and
spacing as its manifest.json says, and a one-epoch train + predict on two subjects whose masks carry
the scans' exact affine. Skips, saying where it looked, where the folder is absent.

Short by design: headers for all subjects, full volumes for two, one 4-feature network (no ensemble)
on a 7.2 mm grid.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from conftest import real_data_dir
from femur_core import read_volume
from femur_core.data import find_subjects, load_subject

from reliability_utils import run_cli

DATA = real_data_dir()

pytestmark = pytest.mark.realdata

if not (DATA / "manifest.json").is_file():
    pytest.skip(f"real data not found: no {DATA}/manifest.json (put the pelvic_mri folder at "
                f"../shared/data/pelvic_mri next to the repository, or set FEMUR_REAL_DATA)",
                allow_module_level=True)

MANIFEST = {row["subject"]: row for row in json.loads((DATA / "manifest.json").read_text())}
TWO = sorted(MANIFEST)[:2]


def test_layout_lists_every_manifest_subject_with_its_label_map():
    files = {f.id: f for f in find_subjects(DATA)}
    assert sorted(files) == sorted(MANIFEST)
    for sid, f in files.items():
        assert f.image.name == f"{sid}_image.nii.gz" and f.mask.name == f"{sid}_femur.nii.gz"
        assert f.labels is not None and f.labels.name == f"{sid}_bones.nii.gz", sid


def test_headers_have_the_manifest_shape_spacing_and_l_i_p_orientation():
    for sid, row in MANIFEST.items():
        headers = [nib.load(str(DATA / f"{sid}_{kind}.nii.gz")) for kind in ("image", "femur", "bones")]
        for h in headers:
            assert h.shape == tuple(reversed(row["shape_zyx"])), sid  # files are (x, y, z)
            np.testing.assert_allclose(h.header.get_zooms()[:3], row["spacing_xyz"], rtol=1e-5)
            assert nib.aff2axcodes(h.affine) == ("L", "I", "P"), sid
            np.testing.assert_allclose(h.affine, headers[0].affine, atol=1e-5)  # one grid per subject


@pytest.mark.parametrize("sid", TWO)
def test_two_subjects_load_with_masks_and_label_maps_as_the_manifest_says(sid):
    row = MANIFEST[sid]
    s = load_subject(next(f for f in find_subjects(DATA) if f.id == sid))
    np.testing.assert_allclose(s.image.spacing, row["spacing_xyz"], rtol=1e-5)
    mask = s.mask.data.astype(bool)
    assert int(mask.sum()) == row["femur_voxels"]
    assert int(mask.any(axis=(0, 1)).sum()) == row["femur_slices"]  # z is the file's slice axis
    lo, hi = row["intensity_range"]
    assert float(s.image.data.min()) == lo and float(s.image.data.max()) == hi
    labels = s.labels.data
    assert set(np.unique(labels)) <= {0, 1, 2, 3, 4} and {1, 2}.issubset(set(np.unique(labels)))
    np.testing.assert_array_equal(labels == 1, mask)  # label 1 of the bone map is the femur mask


def test_one_epoch_train_and_predict_on_two_subjects_keeps_each_scans_affine(tmp_path):
    data = tmp_path / "two"
    data.mkdir()
    for sid in TWO:
        for kind in ("image", "femur", "bones"):
            (data / f"{sid}_{kind}.nii.gz").symlink_to(DATA / f"{sid}_{kind}.nii.gz")
    model = tmp_path / "model"
    proc = run_cli("train", ["--data", data, "--out", model, "--model", "2d-same", "--features", "4", "--levels", "3",
                             "--epochs", "1", "--in-plane-spacing", "7.2", "--ensemble", "1", "--device", "cpu",
                             "--precision", "fp32"],
                   timeout=600)
    assert proc.returncode == 0, proc.stderr
    config = json.loads((model / "config.json").read_text())
    assert config["epochs"] == 1 and config["train"]["aux_labels"] is True  # the label maps were used
    out = tmp_path / "pred"
    proc = run_cli("predict", [model, *(DATA / f"{sid}_image.nii.gz" for sid in TWO), "--out", out, "--device", "cpu",
                               "--precision", "fp32", "--no-tta"], timeout=600)
    assert proc.returncode == 0, proc.stderr
    for sid in TWO:
        src = nib.load(str(DATA / f"{sid}_image.nii.gz"))
        mask = nib.load(str(out / f"{sid}_image_mask.nii.gz"))
        assert mask.shape == src.shape and mask.get_data_dtype() == np.uint8
        np.testing.assert_allclose(mask.affine, src.affine, rtol=0, atol=1e-6)  # oblique: the exact affine
        np.testing.assert_allclose(mask.header.get_sform(), src.header.get_sform(), rtol=0, atol=1e-6)
        assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}
        assert read_volume(out / f"{sid}_image_mask.nii.gz").shape == read_volume(DATA / f"{sid}_image.nii.gz").shape
