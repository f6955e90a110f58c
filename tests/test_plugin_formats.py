"""The plugin with scans as hospitals store them: oblique scans, compressed / multi-frame DICOM, SEG / NRRD / MHA out."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from conftest import gui_import  # importorskip, but a failure under CI=true
napari = gui_import("napari")
gui_import("pytestqt")

from dicom_utils import (  # noqa: E402
    compress_file, compress_series, phantom, rotation, seg_as_volume, write_enhanced, write_series)
from napari_femur._layers import femur_meta  # noqa: E402
from napari_femur._segment_widget import SegmentFemurWidget  # noqa: E402
from napari_femur._session import session_models  # noqa: E402

from femur_core.volume import Volume  # noqa: E402
from femur_core.volume_io import read_volume, write_volume  # noqa: E402

pytestmark = pytest.mark.gui

TIMEOUT_MS = 120_000
SLICING = "Non-orthogonal slicing"


@pytest.fixture(autouse=True)
def _empty_session_store():
    session_models().clear()
    yield
    session_models().clear()


def _tilted_scan(tmp_path, deg: float = 1.8):
    """A NIfTI scan and mask in the real data's (L, I, P) layout, tilted by ``deg`` about two axes, anisotropic."""
    rng = np.random.default_rng(2)
    shape = (20, 24, 6)
    base = np.array([[-1.5, 0, 0], [0, 0, -5.0], [0, -1.5, 0]])  # (L, I, P), 1.5 x 1.5 x 5 mm
    aff = np.eye(4)
    aff[:3, :3] = rotation(deg, 0.0, deg) @ base
    aff[:3, 3] = (15.0, 12.0, 30.0)
    x, y, z = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    blob = ((x - 7) / 4.0) ** 2 + ((y - 12) / 6.0) ** 2 + ((z - 3) / 2.2) ** 2 <= 1.0
    image = (200 + 600 * blob + rng.normal(0, 40, shape)).astype(np.float32)
    img_path = write_volume(Volume(image, aff), tmp_path / "tilted_image.nii.gz")
    msk_path = write_volume(Volume(blob.astype(np.uint8), aff), tmp_path / "tilted_femur.nii.gz", dtype=np.uint8)
    return img_path, msk_path, aff


def _walk_slices(viewer, layer):
    for k in range(layer.data.shape[0]):
        viewer.dims.set_current_step(0, k)


def test_oblique_scan_shows_without_slicing_warning_and_saves_its_exact_affine(make_napari_viewer, tmp_path):
    import nrrd
    import SimpleITK as sitk

    img_path, msk_path, aff = _tilted_scan(tmp_path)
    viewer = make_napari_viewer()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        [image] = viewer.open(str(img_path), plugin="napari-femur")
        [mask] = viewer.open(str(msk_path), plugin="napari-femur")
        _walk_slices(viewer, image)
        viewer.dims.ndisplay = 2
    assert not [w for w in seen if SLICING in str(w.message)]
    assert isinstance(mask, napari.layers.Labels)
    assert femur_meta(image.metadata)["display"] == "orthogonal"
    assert np.allclose(image.rotate, np.eye(3)) and np.allclose(image.affine.affine_matrix, np.eye(4))
    # control: the same layer placed by its exact (rotated) affine makes napari warn, so the check above can fail
    from femur_core.volume import napari_affine

    exact = np.asarray(femur_meta(image.metadata)["canonical_affine"])
    with pytest.warns(UserWarning, match=SLICING):
        viewer.add_image(image.data, affine=napari_affine(exact), name="exact")
        _walk_slices(viewer, image)
    viewer.layers.remove("exact")
    # saved masks keep the source's exact affine (and orientation / shape), in every format
    mask.data = mask.data.copy()
    mask.data[2, 3, 4] = 1  # an edit
    for suffix in (".nii.gz", ".nrrd", ".mha"):
        out = tmp_path / f"saved{suffix}"
        viewer.layers.selection = {mask}
        saved = viewer.layers.save(str(out), selected=True, plugin="napari-femur")  # the manifest's writers
        assert saved == [str(out)]
        lps = np.diag([-1.0, -1.0, 1.0, 1.0])
        if suffix == ".nii.gz":
            back = read_volume(out)
            np.testing.assert_allclose(back.affine, aff, atol=1e-5)
            data = back.data
        else:
            img = sitk.ReadImage(str(out))
            got = np.eye(4)
            got[:3, :3] = np.asarray(img.GetDirection()).reshape(3, 3) * np.asarray(img.GetSpacing())
            got[:3, 3] = img.GetOrigin()
            np.testing.assert_allclose(lps @ got, aff, atol=1e-5)
            data = np.transpose(sitk.GetArrayFromImage(img), (2, 1, 0))
            if suffix == ".nrrd":
                ndata, header = nrrd.read(str(out))
                np.testing.assert_allclose(lps[:3, :3] @ np.asarray(header["space directions"], float).T,
                                           aff[:3, :3], atol=1e-5)
                np.testing.assert_array_equal(ndata, data)
        src_mask = read_volume(msk_path).data
        assert data.shape == src_mask.shape
        assert int((data != src_mask).sum()) == 1  # the source's own array layout, plus the one edit


@pytest.mark.realdata
def test_real_tilted_scan_opens_without_slicing_warning(make_napari_viewer, tmp_path):
    from conftest import real_data_dir

    data = real_data_dir()
    img = data / "sub01_image.nii.gz"
    if not img.exists():
        pytest.skip(f"real scans not found at {data} (set FEMUR_REAL_DATA; development data only)")
    viewer = make_napari_viewer()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        [image] = viewer.open(str(img), plugin="napari-femur")
        for k in range(0, image.data.shape[0], 4):
            viewer.dims.set_current_step(0, k)
    assert not [w for w in seen if SLICING in str(w.message)]
    from napari_femur._writer import write_labels

    labels = np.zeros(image.data.shape, np.uint8)
    labels[image.data.shape[0] // 2, 10:20, 10:20] = 1
    out = write_labels(str(tmp_path / "m.nii.gz"), labels, {"metadata": image.metadata, "affine": image.affine.affine_matrix,
                                                           "scale": image.scale, "translate": image.translate})
    np.testing.assert_allclose(read_volume(out[0]).affine, read_volume(img).affine, atol=1e-5)


def test_folder_with_two_series_opens_one_layer_each(make_napari_viewer, tmp_path):
    folder = tmp_path / "study"
    write_series(folder, phantom(5, 8, 6, seed=1), number=3, description="cor T1", prefix="a")
    write_series(folder, phantom(7, 8, 6, seed=2), number=5, description="cor STIR", prefix="b")
    viewer = make_napari_viewer()
    layers = viewer.open(str(folder), plugin="napari-femur")
    assert sorted((layer.name, layer.data.size) for layer in layers) == [("study #3 cor T1 (5 slices)", 5 * 8 * 6),
                                                                         ("study #5 cor STIR (7 slices)", 7 * 8 * 6)]
    assert all(isinstance(layer, napari.layers.Image) for layer in layers)
    uids = {femur_meta(layer.metadata)["dicom"]["files"][0][-8:] for layer in layers}
    assert len(uids) == 2  # each layer keeps its own series' files (for DICOM SEG)


@pytest.mark.parametrize("kind", ["compressed-folder", "enhanced-file"])
def test_gui_segments_compressed_and_multiframe_dicom_and_saves_seg(make_napari_viewer, qtbot, tmp_path,
                                                                     tiny_checkpoint, kind):
    from napari_femur._writer import write_labels

    R = rotation(1.8, 0.0, 1.8)
    iop = tuple(np.concatenate([R @ [1, 0, 0], R @ [0, 0, -1]]).round(8))
    pixels = phantom(6, 20, 16)
    write_series(tmp_path / "plain", pixels, iop=iop, pixel_spacing=(0.9, 0.6), step=3.5)
    if kind == "compressed-folder":
        compress_series(tmp_path / "plain", tmp_path / "jpeg", "jpeg-lossless")
        path = tmp_path / "jpeg"
    else:
        mf = write_enhanced(tmp_path / "plain", tmp_path / "mf" / "enhanced.dcm")
        path = tmp_path / "enhanced_j2k.dcm"
        compress_file(mf, path, "jpeg2000")
    viewer = make_napari_viewer()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        [image] = viewer.open(str(path), plugin="napari-femur")
        _walk_slices(viewer, image)
    assert not [w for w in seen if SLICING in str(w.message)]
    widget = SegmentFemurWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.select_model_path(tiny_checkpoint)
    widget.image_combo.set_layer(image)
    widget.device_combo.setCurrentText("cpu")
    with qtbot.waitSignal(widget.segmented, timeout=TIMEOUT_MS) as blocker:
        assert widget.run() is not None
    _, mask_layer = blocker.args[0]
    qtbot.waitUntil(lambda: widget.worker is None, timeout=TIMEOUT_MS)
    mask_layer.data = mask_layer.data.copy()
    mask_layer.data[3, 5:9, 4:8] = 1  # make sure there is something to save
    out = write_labels(str(tmp_path / "femur.seg.dcm"), mask_layer.data,
                       {"metadata": mask_layer.metadata, "affine": mask_layer.affine.affine_matrix,
                        "scale": mask_layer.scale, "translate": mask_layer.translate})
    nii = write_labels(str(tmp_path / "femur.nii.gz"), mask_layer.data,
                       {"metadata": mask_layer.metadata, "affine": mask_layer.affine.affine_matrix,
                        "scale": mask_layer.scale, "translate": mask_layer.translate})
    source = read_volume(path)
    saved = read_volume(nii[0])
    np.testing.assert_allclose(saved.affine, source.affine, atol=1e-5)  # the exact oblique affine
    # the SEG, read by highdicom, puts each frame on the source slice the NIfTI has it on
    rebuilt = (seg_as_volume(out[0], source) > 0).astype(np.uint8)
    np.testing.assert_array_equal(rebuilt, saved.data)
    assert saved.data.any()
