"""Reader, writer and sample data of the napari plugin."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import gui_import  # importorskip, but a failure under CI=true
napari = gui_import("napari")
nib = gui_import("nibabel")

from nibabel import orientations as nio  # noqa: E402

from femur_core.volume import napari_affine  # noqa: E402
from napari_femur._reader import get_reader, read_paths  # noqa: E402
from napari_femur._writer import labels_to_volume, write_labels  # noqa: E402

pytestmark = pytest.mark.gui

#: world RAS -> napari world (posterior, inferior, left), as femur_core.volume documents
RAS_TO_PIL = napari_affine(np.eye(4))


def _affine(axcodes: tuple[str, str, str], spacing=(0.9, 1.1, 5.2), origin=(-40.0, 25.0, 10.0)) -> np.ndarray:
    """A voxel -> RAS affine whose array axes point along ``axcodes``."""
    ornt = nio.axcodes2ornt(axcodes)
    a = np.zeros((4, 4))
    for i, (axis, sign) in enumerate(ornt):
        a[int(axis), i] = sign * spacing[i]
    a[:3, 3] = origin
    a[3, 3] = 1
    return a


def _scan(path, axcodes, shape=(8, 10, 6), dtype=np.int16, seed=0):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 1000, shape).astype(dtype)
    affine = _affine(axcodes)
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return data, affine


def _mask_for(data: np.ndarray) -> np.ndarray:
    """An asymmetric binary mask (no flip or permutation maps it onto itself)."""
    m = np.zeros(data.shape, np.uint8)
    m[1:3, 2:7, 0:2] = 1
    m[5, 8, 4] = 1
    return m


@pytest.mark.parametrize("axcodes", [("L", "I", "P"), ("R", "A", "S"), ("P", "I", "L"), ("S", "L", "A")])
def test_reader_canonical_layout_and_mm_world(tmp_path, axcodes):
    """Layers are in the canonical layout; every voxel sits at its true position in mm."""
    data, affine = _scan(tmp_path / "sub01_image.nii.gz", axcodes)
    [(layer_data, kwargs, kind)] = read_paths(str(tmp_path / "sub01_image.nii.gz"))
    assert kind == "image"
    canon_affine = np.asarray(kwargs["metadata"]["femur"]["canonical_affine"])
    assert tuple(nio.aff2axcodes(canon_affine)) == ("P", "I", "L")
    assert sorted(layer_data.shape) == sorted(data.shape)
    # the same voxel value at the same world position (napari world = P, I, L in mm)
    for idx in [(0, 0, 0), (7, 9, 5), (3, 4, 2)]:
        value = data[idx]
        world_ras = affine @ np.array([*idx, 1.0])
        world_napari = RAS_TO_PIL @ world_ras
        layer_idx = np.linalg.solve(np.asarray(kwargs["affine"]), world_napari)[:3]
        li = tuple(int(round(v)) for v in layer_idx)
        assert np.allclose(layer_idx, li, atol=1e-6)
        assert layer_data[li] == value


@pytest.mark.parametrize("axcodes", [("L", "I", "P"), ("R", "A", "S")])
def test_reader_writer_round_trip_in_viewer(make_napari_viewer, tmp_path, axcodes):
    """open -> labels on the image -> save: same shape, orientation and affine as the source scan."""
    data, affine = _scan(tmp_path / "sub01_image.nii.gz", axcodes)
    mask = _mask_for(data)
    nib.save(nib.Nifti1Image(mask, affine), str(tmp_path / "sub01_femur.nii.gz"))
    viewer = make_napari_viewer()
    [image] = viewer.open(str(tmp_path / "sub01_image.nii.gz"), plugin="napari-femur")
    [labels] = viewer.open(str(tmp_path / "sub01_femur.nii.gz"), plugin="napari-femur")
    assert isinstance(image, napari.layers.Image)
    assert isinstance(labels, napari.layers.Labels), "a 0/1 uint8 file named *_femur opens as labels"
    assert np.allclose(labels.affine.affine_matrix, image.affine.affine_matrix)
    assert labels.metadata["femur"]["reorientation"]["source_shape"] == list(data.shape)
    out = tmp_path / "out_mask.nii.gz"
    written = labels.save(str(out), plugin="napari-femur")
    assert written == [str(out)]
    back = nib.load(str(out))
    assert back.shape == data.shape
    assert np.allclose(back.affine, affine, atol=1e-5)
    assert tuple(nio.aff2axcodes(back.affine)) == axcodes
    assert np.array_equal(np.asarray(back.dataobj), mask)
    assert back.get_data_dtype() == np.uint8


def test_writer_falls_back_to_layer_affine(tmp_path):
    """A labels layer without our metadata is written with its own napari placement."""
    canon_affine = _affine(("P", "I", "L"))
    labels = napari.layers.Labels(np.ones((3, 4, 5), np.uint8), affine=napari_affine(canon_affine))
    out = tmp_path / "plain"
    [written] = write_labels(str(out), labels.data, labels._get_state())
    assert written.endswith("plain.nii.gz")
    back = nib.load(written)
    assert np.allclose(back.affine, canon_affine)
    assert back.shape == (3, 4, 5)


def test_writer_ignores_stale_geometry_after_the_layer_moved(tmp_path):
    _scan(tmp_path / "sub01_image.nii.gz", ("R", "A", "S"))
    [(data, kwargs, _)] = read_paths(str(tmp_path / "sub01_image.nii.gz"))
    moved = np.asarray(kwargs["affine"]).copy()
    moved[:3, 3] += 10.0
    layer = napari.layers.Labels(np.zeros(data.shape, np.uint8), affine=moved, metadata=kwargs["metadata"])
    vol = labels_to_volume(layer.data, layer._get_state())
    assert vol.shape == data.shape  # stays in layer layout: the stored reorientation no longer applies
    assert np.allclose(napari_affine(vol.affine), moved)


def test_reader_rejects_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    assert get_reader(str(tmp_path / "notes.txt")) is None
    assert get_reader(str(tmp_path)) is None  # a folder without DICOM files
    assert get_reader(str(tmp_path / "scan.nii.gz")) is not None


def test_reader_error_names_the_file(tmp_path):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"\x1f\x8b not really gzip")
    reader = get_reader(str(bad))
    with pytest.raises(ValueError, match="broken.nii.gz"):
        reader(str(bad))


def test_reader_opens_dicom_series_folder(tmp_path):
    """A DICOM series folder opens as one image whose every voxel sits at its DICOM position (mm):
    pixel (row r, column c) of the slice at ImagePositionPatient P is at P + c * dx * row direction
    + r * dy * column direction (LPS), with the slice spacing from the positions, not SliceThickness."""
    from reliability_utils import write_dicom_series

    folder = tmp_path / "series"
    rows, cols, n = 6, 5, 4
    geo = write_dicom_series(folder, n=n, rows=rows, cols=cols, iop=(1, 0, 0, 0, 0, -1), first=(10.0, -20.0, 30.0),
                             step=4.0, pixel_spacing=(0.8, 0.7))
    reader = get_reader(str(folder))
    assert reader is not None
    [(data, kwargs, kind)] = reader(str(folder))
    assert kind == "image"
    assert data.ndim == 3 and sorted(data.shape) == sorted((n, rows, cols))
    assert kwargs["metadata"]["femur"]["source"] == str(folder)
    row_dir, col_dir = np.asarray(geo["iop"][:3], float), np.asarray(geo["iop"][3:], float)
    dy, dx = geo["pixel_spacing"]
    layer_affine = np.asarray(kwargs["affine"])
    checked = 0
    for k, px in geo["pixels"].items():
        for r, c in [(0, 0), (rows - 1, 0), (0, cols - 1), (2, 3)]:
            lps = geo["first"] + k * geo["step"] * geo["normal"] + c * dx * row_dir + r * dy * col_dir
            ras = np.array([-lps[0], -lps[1], lps[2], 1.0])
            idx = np.linalg.solve(layer_affine, RAS_TO_PIL @ ras)[:3]
            li = tuple(int(round(v)) for v in idx)
            assert np.allclose(idx, li, atol=1e-4), (k, r, c, idx)
            assert data[li] == px[r, c], (k, r, c)
            checked += 1
    assert checked == 4 * n
    # the scale is the true spacing: 4 mm between slices (positions), 0.8 / 0.7 mm in-plane
    assert sorted(np.round(np.linalg.norm(layer_affine[:3, :3], axis=0), 6)) == [0.7, 0.8, 4.0]


def test_sample_data_loads(make_napari_viewer):
    gui_import("femur_core.synthetic")
    viewer = make_napari_viewer()
    layers = viewer.open_sample("napari-femur", "synthetic_hip")
    kinds = sorted(type(layer).__name__ for layer in layers)
    assert kinds == ["Image", "Labels"]
    image = next(layer for layer in layers if isinstance(layer, napari.layers.Image))
    labels = next(layer for layer in layers if isinstance(layer, napari.layers.Labels))
    assert image.data.shape == labels.data.shape
    assert np.allclose(image.affine.affine_matrix, labels.affine.affine_matrix)
    assert labels.data.any() and set(np.unique(labels.data)) <= {0, 1}
    # napari world axis 0 walks coronal slices: its scale is the slice spacing, in mm
    assert image.metadata["femur"]["reorientation"] is not None
