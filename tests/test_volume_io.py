"""Geometry and I/O: orientation round trips, atomic NIfTI writing, clear errors."""

from __future__ import annotations


import nibabel as nib
import numpy as np
import pytest
import tifffile

from femur_core.errors import InputError, OutputExistsError
from femur_core.volume_io import check_image, check_mask, read_volume, write_json, write_volume
from femur_core.inference import Prediction
from femur_core.preprocess import GridSpec, prepare
from femur_core.volume import (CANONICAL_AXCODES, Volume, affine_from_napari, from_canonical, napari_affine,
                               to_canonical)


def _affine(codes, spacing=(0.9, 0.9, 5.2), origin=(10.0, -20.0, 30.0)):
    """Affine whose array axes point along the given axis codes."""
    axis = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}
    a = np.zeros((4, 4))
    for j, (c, s) in enumerate(zip(codes, spacing)):
        row, sign = axis[c]
        a[row, j] = sign * s
    a[:3, 3] = origin
    a[3, 3] = 1
    return a


@pytest.mark.parametrize("codes", [("L", "I", "P"), ("R", "A", "S"), ("P", "I", "L"), ("S", "R", "A"),
                                   ("A", "L", "I")])
def test_canonical_round_trip_is_exact(codes):
    rng = np.random.default_rng(0)
    data = rng.normal(size=(5, 6, 7)).astype(np.float32)
    vol = Volume(data, _affine(codes))
    canon, reo = to_canonical(vol)
    assert canon.axcodes == CANONICAL_AXCODES
    back = from_canonical(canon.data, reo)
    np.testing.assert_array_equal(back.data, data)
    np.testing.assert_allclose(back.affine, vol.affine)
    # every voxel keeps its world position
    idx = np.array([1, 2, 3, 1.0])
    world = vol.affine @ idx
    cidx = np.linalg.solve(canon.affine, world)
    ci = np.round(cidx[:3]).astype(int)
    assert canon.data[tuple(ci)] == data[1, 2, 3]


def test_napari_affine_is_positive_scale_for_canonical_data():
    vol = Volume(np.zeros((4, 5, 6), np.float32), _affine(("L", "I", "P"), (0.911, 0.911, 5.2)))
    canon, _ = to_canonical(vol)
    aff = napari_affine(canon.affine)
    np.testing.assert_allclose(np.diag(aff)[:3], [5.2, 0.911, 0.911])
    np.testing.assert_allclose(affine_from_napari(aff), canon.affine)


def test_write_read_nifti_keeps_affine_and_refuses_overwrite(tmp_path):
    aff = _affine(("L", "I", "P"))
    vol = Volume(np.arange(60, dtype=np.float32).reshape(3, 4, 5), aff)
    p = write_volume(vol, tmp_path / "x.nii.gz")
    back = read_volume(p)
    np.testing.assert_allclose(back.affine, aff, atol=1e-5)
    np.testing.assert_array_equal(back.data, vol.data)
    with pytest.raises(OutputExistsError, match="x.nii.gz"):
        write_volume(vol, p)
    write_volume(vol.with_data(vol.data * 2), p, overwrite=True)
    assert read_volume(p).data.max() == 118
    assert not list(tmp_path.glob(".*part"))  # no temporary file left behind


def test_tiff_spacing_given(tmp_path):
    tifffile.imwrite(tmp_path / "s.tif", np.ones((4, 8, 8), np.uint16), photometric="minisblack")
    vol = read_volume(tmp_path / "s.tif", spacing=(5.0, 0.5, 0.5))
    canon, _ = to_canonical(vol)
    np.testing.assert_allclose(canon.spacing, (5.0, 0.5, 0.5))


@pytest.mark.parametrize("shape,msg", [((4, 5), "expected a 3D volume, got 2D"),
                                       ((4, 5, 6, 2), "expected a 3D volume, got 4D")])
def test_wrong_dimensions(tmp_path, shape, msg):
    p = tmp_path / "bad.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), np.eye(4)), p)
    with pytest.raises(InputError, match=msg) as e:
        read_volume(p)
    assert "bad.nii.gz" in str(e.value)


def test_truncated_and_empty_files(tmp_path):
    good = tmp_path / "good.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), good)
    raw = good.read_bytes()
    trunc = tmp_path / "trunc.nii.gz"
    trunc.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputError, match="trunc.nii.gz: unreadable or truncated"):
        read_volume(trunc)
    empty = tmp_path / "empty.nii"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="empty file"):
        read_volume(empty)
    with pytest.raises(InputError, match="no such file"):
        read_volume(tmp_path / "missing.nii.gz")
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    with pytest.raises(InputError, match="unknown file type"):
        read_volume(other)


def test_check_image_rejects_nan_and_constant():
    aff = np.eye(4)
    d = np.ones((3, 3, 3), np.float32)
    with pytest.raises(InputError, match="constant image"):
        check_image(Volume(d, aff, "c.nii"))
    d2 = np.random.default_rng(0).normal(size=(3, 3, 3)).astype(np.float32)
    d2[1, 1, 1] = np.nan
    with pytest.raises(InputError, match="c.nii: 1 voxels are NaN or Inf"):
        check_image(Volume(d2, aff, "c.nii"))


def test_check_mask_rejects_non_binary_and_geometry_mismatch():
    aff = np.eye(4)
    img = Volume(np.random.default_rng(0).normal(size=(3, 4, 5)).astype(np.float32), aff, "img.nii")
    m = np.zeros((3, 4, 5), np.uint8)
    m[1, 1, 1] = 2
    with pytest.raises(InputError, match="m.nii: mask is not binary: values 0, 2"):
        check_mask(Volume(m, aff, "m.nii"), img)
    with pytest.raises(InputError, match="shape"):
        check_mask(Volume(np.zeros((3, 4, 6), np.uint8), aff, "m.nii"), img)
    shifted = aff.copy()
    shifted[0, 3] = 2.0
    with pytest.raises(InputError, match="affine differs"):
        check_mask(Volume(np.zeros((3, 4, 5), np.uint8), shifted, "m.nii"), img)


def test_prepare_restore_keeps_masks_aligned():
    """A mask resampled to a coarser model grid and back overlaps the original."""
    from femur_core.metrics import dice

    z, y, x = np.mgrid[0:12, 0:96, 0:96]
    mask = (((y - 50) / 20.0) ** 2 + ((x - 40) / 15.0) ** 2 + ((z - 6) / 4.0) ** 2 < 1).astype(np.uint8)
    rng = np.random.default_rng(1)
    img = (mask * 100 + rng.normal(0, 5, mask.shape)).astype(np.float32)
    # store it in an RAS file orientation to exercise the reorientation too
    vol = Volume(img, _affine(("P", "I", "L"), (5.0, 0.9, 0.9)))
    mvol = Volume(mask, vol.affine)
    prep = prepare(vol, GridSpec(in_plane_spacing=1.8), mvol)
    assert prep.image.shape == (12, 48, 48)
    # the way predict_volume maps a model-grid map back: canonical source grid, then source orientation
    back = Prediction(prep.restore_canonical(prep.mask.astype(np.float32)), prep.reorientation, None, 0.5).prob
    assert back.shape == vol.shape
    np.testing.assert_allclose(back.affine, vol.affine)
    assert dice(back.data >= 0.5, mask) > 0.95


def test_probability_map_written_in_1_255_steps_reads_back(tmp_path):
    import nibabel as nib

    from femur_core.volume_io import PROB_SLOPE, read_volume, write_volume
    from femur_core.volume import Volume

    rng = np.random.default_rng(0)
    prob = rng.random((6, 7, 5)).astype(np.float32)
    prob[0, 0, 0], prob[0, 0, 1] = 0.0, 1.0
    aff = np.diag([0.9, 0.9, 5.2, 1.0])
    aff[:3, 3] = (10, -20, 30)
    p = write_volume(Volume(prob, aff), tmp_path / "x_prob.nii.gz", dtype=np.uint8, slope=PROB_SLOPE)
    assert nib.load(str(p)).get_data_dtype() == np.uint8
    back = read_volume(p)
    np.testing.assert_allclose(back.data, prob, atol=0.5 / 255 + 1e-7, rtol=0)
    assert back.data[0, 0, 0] == 0.0 and abs(back.data[0, 0, 1] - 1.0) < 1e-6
    np.testing.assert_allclose(back.affine, aff)
    with pytest.raises(ValueError, match="integer dtype"):
        write_volume(Volume(prob, aff), tmp_path / "y.nii.gz", dtype=np.float32, slope=PROB_SLOPE)


def test_io_module_does_not_shadow_the_standard_library():
    """``femur_core.io`` is gone (it shadowed ``io``); the package API still exports the readers."""
    import importlib.util

    import femur_core

    assert importlib.util.find_spec("femur_core.io") is None
    assert femur_core.read_volume is read_volume and femur_core.write_volume is write_volume


def test_written_files_follow_the_process_umask_and_import_leaves_it_alone(tmp_path):
    """Files get 0666 minus the umask (not mkstemp's 0600), read without toggling the umask on import."""
    import subprocess
    import sys

    code = (
        "import os, sys\n"
        "os.umask(0o027)\n"
        "import femur_core.volume_io as v\n"
        "assert os.umask(0o027) == 0o027, 'import changed the umask'\n"
        "p = v.atomic_write_bytes(sys.argv[1], b'x')\n"
        "print(oct(os.stat(p).st_mode & 0o777))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "f.bin")], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0o640"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]  # no temporary file left


def test_subject_file_names_have_one_definition(tmp_path):
    from femur_core.data import SUBJECT_FILE, find_subjects, next_subject_id, subject_file

    assert next_subject_id(tmp_path / "missing") == "sub01"
    assert subject_file(tmp_path, "sub07", "femur").name == "sub07_femur.nii.gz"
    assert SUBJECT_FILE.match("sub07_bones.nii")["kind"] == "bones"
    vol = Volume(np.arange(24, dtype=np.float32).reshape(2, 3, 4), np.eye(4))
    write_volume(vol, subject_file(tmp_path, "sub02", "image"))
    write_volume(vol.with_data(np.ones((2, 3, 4), np.uint8)), subject_file(tmp_path, "sub02", "femur"))
    (tmp_path / "SUB09_Bones.nii.gz").write_bytes(b"")  # any case takes its number
    assert next_subject_id(tmp_path) == "sub10"
    [s] = find_subjects(tmp_path)
    assert (s.id, s.image.name, s.mask.name, s.labels) == ("sub02", "sub02_image.nii.gz", "sub02_femur.nii.gz", None)


def test_write_json_is_atomic_and_reads_back(tmp_path, monkeypatch):
    import json
    import pathlib

    target = tmp_path / "results" / "run.json"  # the folder does not exist yet
    obj = {"dsc": [0.91, 0.88], "path": pathlib.Path("/x/y"), "n": 3}
    assert write_json(target, obj) == target
    back = json.loads(target.read_text())
    assert back == {"dsc": [0.91, 0.88], "path": "/x/y", "n": 3}
    assert target.read_text().endswith("\n")
    # a failure half-way leaves the previous file whole and no temporary file behind
    before = target.read_bytes()

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.fsync", boom)
    with pytest.raises(OSError) as err:
        write_json(target, {"dsc": [0.0]})
    assert err.value.filename == str(target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in target.parent.iterdir()) == ["run.json"]
    monkeypatch.undo()
    with pytest.raises(OutputExistsError):
        write_json(target, {}, overwrite=False)
