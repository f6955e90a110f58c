"""DICOM as hospitals store it (compressed, multi-frame, several series) and masks out as SEG / NRRD / MHA."""

from __future__ import annotations

import numpy as np
import pytest

from dicom_utils import CODECS, compress_series, phantom, rotation, seg_as_volume, write_enhanced, write_series
from femur_core.dicom import list_series, read_dicom
from femur_core.errors import InputError, OutputExistsError
from femur_core.volume_io import read_volume, write_volume
from femur_core.volume import Volume

# an oblique, anisotropic geometry: rows / columns rotated ~10 degrees off the coronal plane
_R = rotation(4.0, -7.0, 6.0)
OBLIQUE_IOP = tuple(np.concatenate([_R @ [1, 0, 0], _R @ [0, 0, -1]]).round(8))


@pytest.fixture
def series(tmp_path):
    pixels = phantom(6, 20, 16)
    geo = write_series(tmp_path / "plain", pixels, iop=OBLIQUE_IOP, pixel_spacing=(0.9, 0.6), step=3.5,
                       first=(12.5, -30.0, 41.0))
    return pixels, geo


# ----------------------------------------------------------------------------- read
@pytest.mark.parametrize("codec", sorted(CODECS))
def test_compressed_series_reads_equal_to_uncompressed(tmp_path, series, codec):
    pixels, geo = series
    uid = compress_series(tmp_path / "plain", tmp_path / codec, codec)
    import pydicom.uid

    assert pydicom.uid.UID(uid).is_compressed  # the files really are compressed
    plain, packed = read_volume(tmp_path / "plain"), read_volume(tmp_path / codec)
    # every codec made here is lossless: the round trip is exact
    np.testing.assert_array_equal(packed.data, plain.data)
    np.testing.assert_array_equal(packed.data, pixels.astype(np.float32))
    np.testing.assert_allclose(packed.affine, geo["affine"], atol=1e-6)


def test_enhanced_multiframe_reads_with_geometry_of_its_slices(tmp_path, series):
    pixels, geo = series
    f = write_enhanced(tmp_path / "plain", tmp_path / "mf" / "enhanced.dcm")
    import pydicom

    ds = pydicom.dcmread(str(f), stop_before_pixels=True)
    assert int(ds.NumberOfFrames) == pixels.shape[0] and "PerFrameFunctionalGroupsSequence" in ds
    for path in (f, f.parent):  # the file itself, or its folder
        vol = read_volume(path)
        np.testing.assert_array_equal(vol.data, pixels.astype(np.float32))  # frames put back in slice order
        np.testing.assert_allclose(vol.affine, geo["affine"], atol=1e-5)
        assert vol.meta["dicom"]["multiframe"] and len(vol.meta["dicom"]["files"]) == 1
    # frame k of the file sits where the header says: the per-frame position is the affine's slice origin
    slices = vol.meta["dicom"]["slices"]
    for k, (_, fr) in enumerate(slices):
        ipp = np.asarray(ds.PerFrameFunctionalGroupsSequence[fr].PlanePositionSequence[0].ImagePositionPatient, float)
        np.testing.assert_allclose(vol.affine @ [k, 0, 0, 1], [*(np.diag([-1, -1, 1]) @ ipp), 1], atol=1e-5)


def test_compressed_enhanced_multiframe(tmp_path, series):
    pixels, _ = series
    f = write_enhanced(tmp_path / "plain", tmp_path / "mf" / "enhanced.dcm")
    from dicom_utils import compress_file

    compress_file(f, tmp_path / "mf" / "enhanced_j2k.dcm", "jpeg2000")
    f.unlink()
    vol = read_volume(tmp_path / "mf" / "enhanced_j2k.dcm")
    np.testing.assert_array_equal(vol.data, pixels.astype(np.float32))


def test_folder_with_several_series_lists_them_and_reads_the_chosen_one(tmp_path, monkeypatch):
    folder = tmp_path / "study"
    a = write_series(folder, phantom(5, 8, 6, seed=1), number=3, description="cor T1", prefix="a")
    b = write_series(folder, phantom(7, 8, 6, seed=2), number=5, description="cor STIR", prefix="b", step=3.0)
    found = list_series(folder)
    assert [(s.number, s.description, s.n_slices) for s in found] == [(3, "cor T1", 5), (5, "cor STIR", 7)]
    with pytest.raises(InputError) as e:
        read_volume(folder)
    msg = str(e.value)
    assert str(folder) in msg and "holds 2 DICOM series" in msg and "--series" in msg
    assert '#3 "cor T1" 5 slices' in msg and '#5 "cor STIR" 7 slices' in msg
    assert read_volume(folder, series=5).shape == (7, 8, 6)
    assert read_volume(folder, series=a["series_uid"]).shape == (5, 8, 6)
    assert read_volume(folder, series=str(b["series_uid"])).meta["series"] == "cor STIR"
    with pytest.raises(InputError, match=r"no DICOM series with UID or number '9'.*cor T1.*cor STIR"):
        read_volume(folder, series=9)
    # a file given directly reads its own series, also by a relative path
    assert read_dicom(a["files"][2]).shape == (5, 8, 6)
    monkeypatch.chdir(folder)
    assert read_volume(b["files"][1].name).shape == (7, 8, 6)


def test_uneven_spacing_and_gantry_tilt_are_refused_naming_the_folder(tmp_path):
    px = phantom(5, 8, 6)
    normal = np.array([0.0, 1.0, 0.0])  # coronal iop (1,0,0, 0,0,-1): normal = row x col
    uneven = [np.array([10.0, -20.0, 30.0]) + z * normal for z in (0, 4, 8, 13, 17)]
    write_series(tmp_path / "uneven", px, positions=uneven)
    with pytest.raises(InputError, match=r"uneven.*non-uniform slice spacing \(gaps 4 to 5 mm\)"):
        read_volume(tmp_path / "uneven")
    tilted = [np.array([10.0, -20.0, 30.0]) + k * 4.0 * normal + k * np.array([0, 0, 0.7]) for k in range(5)]
    write_series(tmp_path / "tilt", px, positions=tilted)
    with pytest.raises(InputError, match=r"tilt: gantry tilt: the slices are stacked 9.93 degrees off"):
        read_volume(tmp_path / "tilt")
    # an oblique but orthogonal stack (rotated slices stacked along their normal) is fine
    write_series(tmp_path / "oblique", px, iop=OBLIQUE_IOP)
    assert read_volume(tmp_path / "oblique").shape == (5, 8, 6)
    # ... also with positions stored to 0.01 mm, as some scanners write them
    rounded = [np.round(np.array([10.0, -20.0, 30.0]) + k * 0.503 * normal, 2) for k in range(5)]  # gaps 0.50, 0.51
    write_series(tmp_path / "rounded", px, positions=rounded, step=0.5)
    assert read_volume(tmp_path / "rounded").shape == (5, 8, 6)


# ----------------------------------------------------------------------------- write
def _mask_of(vol: Volume, labels: bool = False) -> Volume:
    m = (vol.data > 1000).astype(np.uint8)
    if labels:  # a left/right label map: columns left of the middle are "right femur" = 1, others 2
        m = m * np.where(np.arange(m.shape[2]) < m.shape[2] // 2, 1, 2)[None, None, :].astype(np.uint8)
    assert m.any() and m.sum() < m.size
    return vol.with_data(m)


@pytest.mark.parametrize("labels", [False, True], ids=["femur", "left-right"])
def test_dicom_seg_references_the_source_and_lands_on_its_slices(tmp_path, series, labels):
    import highdicom as hd
    import pydicom

    from femur_core.export import FEMUR, write_mask

    _, geo = series
    image = read_volume(tmp_path / "plain")
    mask = _mask_of(image, labels)
    out = write_mask(mask, tmp_path / "out" / "mask.seg.dcm", source=image, segments=None if labels else FEMUR)
    seg = hd.seg.segread(str(out))
    sop_of = {str(pydicom.dcmread(str(f), stop_before_pixels=True).SOPInstanceUID): k
              for k, f in enumerate(geo["files"])}  # files were written in slice order
    assert seg.SeriesInstanceUID != geo["series_uid"]
    assert {str(s.SeriesInstanceUID) for s in seg.ReferencedSeriesSequence} == {geo["series_uid"]}
    descs = {int(d.SegmentNumber): d for d in seg.SegmentSequence}
    if labels:
        assert {n: d.SegmentLabel for n, d in descs.items()} == {1: "Right femur", 2: "Left femur"}
        mods = {n: d.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence[0].CodeValue
                for n, d in descs.items()}
        assert mods == {1: "24028007", 2: "7771000"}  # SCT Right, Left
    else:
        assert [d.SegmentLabel for d in descs.values()] == ["Femur"]
    for d in descs.values():
        assert d.SegmentedPropertyTypeCodeSequence[0].CodeValue == "71341001"  # SCT Femur
        assert d.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"  # Anatomical Structure
    # each SEG frame names the source image it lies on; its pixels are the mask of that slice
    frames = seg.pixel_array.reshape(-1, int(seg.Rows), int(seg.Columns))  # one frame reads as 2D
    seen = set()
    for i, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        ref = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        k = sop_of[str(ref)]
        ident = item if "SegmentIdentificationSequence" in item else seg.SharedFunctionalGroupsSequence[0]
        number = int(ident.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        np.testing.assert_array_equal(frames[i].astype(bool), mask.data[k] == number)
        ipp = np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, float)
        np.testing.assert_allclose(ipp, geo["first"] + k * geo["step"] * geo["normal"], atol=1e-4)
        seen.add((k, number))
    expect = {(k, n) for k in range(mask.shape[0]) for n in np.unique(mask.data[k]) if n}
    assert seen == expect  # every non-empty (slice, segment) is there, nothing else


def test_dicom_seg_of_a_mask_on_one_slice_and_of_an_empty_mask(tmp_path, series):
    import highdicom as hd
    import pydicom

    from femur_core.export import write_mask

    _, geo = series
    image = read_volume(tmp_path / "plain")
    one = np.zeros(image.shape, np.uint8)
    one[2, 4:9, 3:7] = 1
    seg = hd.seg.segread(str(write_mask(image.with_data(one), tmp_path / "one.seg.dcm", source=image)))
    assert int(seg.NumberOfFrames) == 1  # empty slices are left out
    src = seg.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].SourceImageSequence[0]
    assert src.ReferencedSOPInstanceUID == pydicom.dcmread(str(geo["files"][2]), stop_before_pixels=True).SOPInstanceUID
    np.testing.assert_array_equal(seg.pixel_array.reshape(one.shape[1:]), one[2])
    empty = hd.seg.segread(str(write_mask(image.with_data(one * 0), tmp_path / "empty.seg.dcm", source=image)))
    assert int(empty.NumberOfFrames) == image.shape[0] and not empty.pixel_array.any()  # a valid, empty SEG


def test_dicom_seg_of_an_enhanced_multiframe_source(tmp_path, series):
    import highdicom as hd

    from femur_core.export import FEMUR, write_mask

    f = write_enhanced(tmp_path / "plain", tmp_path / "mf" / "enhanced.dcm")
    image = read_volume(f)
    mask = _mask_of(image)
    out = write_mask(mask, tmp_path / "mf_mask.seg.dcm", source=image, segments=FEMUR)
    seg = hd.seg.segread(str(out))
    frames = seg.pixel_array.reshape(-1, int(seg.Rows), int(seg.Columns))  # one frame reads as 2D
    for i, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        src = item.DerivationImageSequence[0].SourceImageSequence[0]
        fr = int(src.ReferencedFrameNumber) - 1  # 1-based frame of the multi-frame source
        k = [s[1] for s in image.meta["dicom"]["slices"]].index(fr)
        np.testing.assert_array_equal(frames[i].astype(bool), mask.data[k] == 1)


def test_dicom_seg_needs_a_dicom_source(tmp_path):
    from femur_core.export import write_mask

    vol = Volume(np.ones((3, 4, 5), np.uint8), np.eye(4), "scan.nii.gz")
    with pytest.raises(InputError, match="needs the source DICOM series; scan.nii.gz was not read from DICOM"):
        write_mask(vol, tmp_path / "m.seg.dcm", source=vol)
    assert not (tmp_path / "m.seg.dcm").exists()


def _oblique_volume() -> Volume:
    """A rotated, anisotropic mask volume (origin off zero)."""
    rng = np.random.default_rng(4)
    aff = np.eye(4)
    aff[:3, :3] = rotation(3.0, 20.0, -12.0) @ np.diag([0.7, 1.1, 4.5])
    aff[:3, 3] = (-12.0, 33.5, 71.25)
    return Volume((rng.random((9, 7, 5)) > 0.6).astype(np.uint8), aff, "src.nii.gz")


@pytest.mark.parametrize("fmt", ["nrrd", "mha"])
def test_nrrd_and_mha_keep_origin_spacing_and_direction(tmp_path, fmt):
    import SimpleITK as sitk

    from femur_core.export import output_path, write_mask

    vol = _oblique_volume()
    out = write_mask(vol, output_path(tmp_path / "mask", fmt))
    lps = np.diag([-1.0, -1.0, 1.0])
    img = sitk.ReadImage(str(out))
    arr = np.transpose(sitk.GetArrayFromImage(img), (2, 1, 0))  # back to ITK index order = our axes
    np.testing.assert_array_equal(arr, vol.data)
    spacing = np.asarray(img.GetSpacing())
    direction = np.asarray(img.GetDirection()).reshape(3, 3)
    affine_lps = np.eye(4)
    affine_lps[:3, :3] = direction * spacing
    affine_lps[:3, 3] = img.GetOrigin()
    np.testing.assert_allclose(np.diag([-1, -1, 1, 1]) @ affine_lps, vol.affine, atol=1e-5)
    np.testing.assert_allclose(spacing, [0.7, 1.1, 4.5], atol=1e-6)
    if fmt == "nrrd":  # an independent reader: pynrrd's own header parsing
        import nrrd

        data, header = nrrd.read(str(out))
        np.testing.assert_array_equal(data, vol.data)
        assert header["space"] == "left-posterior-superior"
        dirs = np.asarray(header["space directions"], float)  # one row per array axis
        np.testing.assert_allclose(lps @ dirs.T, vol.affine[:3, :3], atol=1e-5)
        np.testing.assert_allclose(lps @ np.asarray(header["space origin"], float), vol.affine[:3, 3], atol=1e-5)
    else:  # MetaImage: the text header itself
        head = out.read_bytes().split(b"ElementDataFile")[0].decode()
        fields = dict(line.split(" = ", 1) for line in head.strip().splitlines())
        np.testing.assert_allclose(np.fromstring(fields["Offset"], sep=" "), lps @ vol.affine[:3, 3], atol=1e-5)
        np.testing.assert_allclose(np.fromstring(fields["ElementSpacing"], sep=" "), [0.7, 1.1, 4.5], atol=1e-6)
    with pytest.raises(OutputExistsError):
        write_mask(vol, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # nothing else left behind


# ----------------------------------------------------------------------------- end to end, CLI
def test_cli_segments_compressed_folder_and_enhanced_file_to_seg(tmp_path, series):
    import nibabel as nib

    from reliability_utils import run_cli, write_tiny_model

    model = write_tiny_model(tmp_path / "model.pt")
    compress_series(tmp_path / "plain", tmp_path / "jpeg", "jpeg-lossless")
    mf = write_enhanced(tmp_path / "plain", tmp_path / "mf" / "enhanced.dcm")
    compress_file_ = __import__("dicom_utils").compress_file
    compress_file_(mf, tmp_path / "enhanced_j2k.dcm", "jpeg2000")
    out = tmp_path / "out"
    proc = run_cli("predict", [model, tmp_path / "jpeg", tmp_path / "enhanced_j2k.dcm", "--out", out,
                               "--format", "seg,nii.gz", "--device", "cpu", "--threshold", "0.5"], timeout=300)
    assert proc.returncode == 0, proc.stderr
    for name, src in (("jpeg", tmp_path / "jpeg"), ("enhanced_j2k", tmp_path / "enhanced_j2k.dcm")):
        image = read_volume(src)
        nii = nib.load(str(out / f"{name}_mask.nii.gz"))
        np.testing.assert_allclose(nii.affine, image.affine, atol=1e-4)  # the source's exact (oblique) affine
        mask = np.asarray(nii.dataobj)
        assert 0 < mask.sum() < mask.size  # a real mask, neither empty nor everything
        # the SEG holds one segment per femur: its label volume is the right (1) / left (2) map of the mask
        seg_labels = seg_as_volume(out / f"{name}_mask.seg.dcm", image)
        np.testing.assert_array_equal(seg_labels > 0, mask > 0)
        np.testing.assert_array_equal(seg_labels, np.asarray(nib.load(str(out / f"{name}_sides.nii.gz")).dataobj))
        import highdicom as hd

        seg = hd.seg.segread(str(out / f"{name}_mask.seg.dcm"))
        labels = {int(d.SegmentNumber): d.SegmentLabel for d in seg.SegmentSequence}
        assert labels and set(labels.items()) <= {(1, "Right femur"), (2, "Left femur")}


def test_cli_series_choice(tmp_path):
    from reliability_utils import run_cli, write_tiny_model

    model = write_tiny_model(tmp_path / "model.pt")
    folder = tmp_path / "study"
    write_series(folder, phantom(5, 8, 6, seed=1), number=3, description="cor T1", prefix="a")
    write_series(folder, phantom(7, 8, 6, seed=2), number=5, description="cor STIR", prefix="b")
    proc = run_cli("predict", [model, folder, "--out", tmp_path / "o1", "--device", "cpu"], timeout=300)
    assert proc.returncode == 2 and '#3 "cor T1" 5 slices' in proc.stderr and '#5 "cor STIR" 7 slices' in proc.stderr
    assert "--series" in proc.stderr
    proc = run_cli("predict", [model, folder, "--series", "5", "--out", tmp_path / "o2", "--device", "cpu",
                               "--format", "nrrd"], timeout=300)
    assert proc.returncode == 0, proc.stderr
    import nrrd

    data, _ = nrrd.read(str(tmp_path / "o2" / "study_mask.nrrd"))
    assert data.shape == (7, 8, 6)  # the STIR series
    proc = run_cli("predict", [model, folder, "--format", "png", "--out", tmp_path / "o3"], timeout=300)
    assert proc.returncode != 0 and "--format: unknown format png" in proc.stderr
    nii = write_volume(Volume(phantom(5, 8, 6).astype(np.float32), np.diag([1.0, 1.0, 3.0, 1.0])), tmp_path / "scan.nii.gz")
    proc = run_cli("predict", [model, nii, "--format", "seg", "--out", tmp_path / "o4", "--device", "cpu"], timeout=300)
    assert proc.returncode == 2 and "scan.nii.gz: --format seg needs a DICOM input" in proc.stderr
    assert not [p for p in (tmp_path / "o4").glob("*") if p.is_file()]  # no half result (prob map without mask)
