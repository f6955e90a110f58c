"""Synthetic DICOM as hospitals store it, made in the tests: full headers, compressed copies, multi-frame.

Nothing here is mocked: files are written by pydicom and re-encoded by the same
pixel-data plugins femur_core decodes with (pydicom's RLE and JPEG-LS encoders,
python-gdcm for JPEG lossless and JPEG 2000), and enhanced multi-frame files
are converted by highdicom.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def rotation(deg_x: float = 0.0, deg_y: float = 0.0, deg_z: float = 0.0) -> np.ndarray:
    """3 x 3 rotation about the x, then y, then z axis."""
    ax, ay, az = np.radians([deg_x, deg_y, deg_z])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def phantom(n: int = 6, rows: int = 20, cols: int = 16, seed: int = 0) -> np.ndarray:
    """uint16 slices with a bright ellipsoid ("femur") on a noisy background, shape (n, rows, cols)."""
    rng = np.random.default_rng(seed)
    k, r, c = np.meshgrid(np.arange(n), np.arange(rows), np.arange(cols), indexing="ij")
    blob = ((k - n / 2) / (n / 2.5)) ** 2 + ((r - rows / 2) / (rows / 3)) ** 2 + ((c - cols / 3) / (cols / 4)) ** 2 <= 1
    return (300 + 900 * blob + rng.integers(0, 200, blob.shape)).astype(np.uint16)


def write_series(folder, pixels: np.ndarray, *, iop=(1, 0, 0, 0, 0, -1), pixel_spacing=(0.8, 0.7),
                 step: float = 4.0, first=(10.0, -20.0, 30.0), positions=None, number: int = 3,
                 description: str = "cor T1", series_uid: str | None = None, study_uid: str | None = None,
                 frame_of_reference: str | None = None, prefix: str = "im") -> dict:
    """A single-frame MR series with complete patient / study / frame-of-reference headers.

    Slice k lies at ``first + k * step * normal`` (LPS) unless ``positions`` gives each one.
    Returns the geometry (``iop``, ``first``, ``step``, ``normal``, ``pixel_spacing``,
    ``series_uid``, ``files`` in slice order) and the voxel -> RAS ``affine``.
    """
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid(entropy_srcs=["study", str(folder.parent)])
    frame_of_reference = frame_of_reference or generate_uid(entropy_srcs=["for", str(folder.parent)])
    row, col = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
    normal = np.cross(row, col)
    files = []
    for k in range(pixels.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        fname = folder / f"{prefix}{k:03d}.dcm"
        ds = FileDataset(str(fname), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Hip", "HIP001", "19700101", "F"
        ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime, ds.StudyID = study_uid, "20260101", "120000", "1"
        ds.AccessionNumber, ds.ReferringPhysicianName = "A1", ""
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.SeriesDescription = series_uid, number, description
        ds.Modality, ds.Manufacturer = "MR", "Synthetic"
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_of_reference, ""
        ds.InstanceNumber, ds.ImageType = k + 1, ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.ContentDate, ds.ContentTime, ds.AcquisitionNumber = "20260101", "120000", 1
        ds.ImageOrientationPatient = [float(v) for v in iop]
        pos = np.asarray(first, float) + k * step * normal if positions is None else np.asarray(positions[k], float)
        ds.ImagePositionPatient = [float(v) for v in pos]
        ds.PixelSpacing = [float(v) for v in pixel_spacing]
        ds.SliceThickness = abs(step)
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "SE", "NONE", "", "2D"
        ds.EchoTime, ds.RepetitionTime, ds.EchoTrainLength, ds.MagneticFieldStrength = 10.0, 500.0, 1, 3.0
        ds.Rows, ds.Columns = pixels.shape[1:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = np.ascontiguousarray(pixels[k], dtype=np.uint16).tobytes()
        ds.save_as(str(fname), enforce_file_format=True)
        files.append(fname)
    ps = pixel_spacing
    aff = np.eye(4)
    aff[:3, 0] = LPS_TO_RAS @ (normal * step)
    aff[:3, 1] = LPS_TO_RAS @ (col * ps[0])
    aff[:3, 2] = LPS_TO_RAS @ (row * ps[1])
    aff[:3, 3] = LPS_TO_RAS @ np.asarray(first, float)
    return {"iop": iop, "first": np.asarray(first, float), "step": step, "normal": normal,
            "pixel_spacing": pixel_spacing, "series_uid": series_uid, "files": files, "affine": aff}


#: Compressed transfer syntaxes made in the tests, and who encodes them.
CODECS = {
    "rle": "pydicom",              # RLE Lossless, pydicom's own encoder
    "jpeg-ls": "pydicom",          # JPEG-LS Lossless, pydicom with pyjpegls
    "jpeg-lossless": "gdcm",       # JPEG Lossless SV1 (process 14), the commonest PACS syntax
    "jpeg2000": "gdcm",            # JPEG 2000 Lossless Only
}


def compress_file(src: Path, dst: Path, codec: str) -> str:
    """Re-encode one DICOM file; returns the new transfer syntax UID."""
    import pydicom
    from pydicom.uid import JPEGLSLossless, RLELossless

    if codec in ("rle", "jpeg-ls"):
        ds = pydicom.dcmread(str(src))
        ds.compress(RLELossless if codec == "rle" else JPEGLSLossless)
        ds.save_as(str(dst), enforce_file_format=True)
        return str(ds.file_meta.TransferSyntaxUID)
    import gdcm

    syntax = {"jpeg-lossless": gdcm.TransferSyntax.JPEGLosslessProcess14_1,
              "jpeg2000": gdcm.TransferSyntax.JPEG2000Lossless}[codec]
    reader = gdcm.ImageReader()
    reader.SetFileName(str(src))
    assert reader.Read(), src
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(syntax))
    change.SetInput(reader.GetImage())
    assert change.Change(), codec
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(dst))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write(), dst
    return str(pydicom.dcmread(str(dst), stop_before_pixels=True).file_meta.TransferSyntaxUID)


def compress_series(src_folder, dst_folder, codec: str) -> str:
    """Re-encode every file of a series folder into ``dst_folder``; returns the transfer syntax UID."""
    dst_folder = Path(dst_folder)
    dst_folder.mkdir(parents=True, exist_ok=True)
    uid = ""
    for f in sorted(Path(src_folder).glob("*.dcm")):
        uid = compress_file(f, dst_folder / f.name, codec)
    return uid


def write_enhanced(src_folder, dst_file) -> Path:
    """Convert a single-frame MR series into one (legacy converted) enhanced multi-frame MR file (highdicom)."""
    import highdicom as hd
    import pydicom
    from pydicom.uid import generate_uid

    datasets = [pydicom.dcmread(str(f)) for f in sorted(Path(src_folder).glob("*.dcm"))]
    rng = np.random.default_rng(1)
    datasets = [datasets[i] for i in rng.permutation(len(datasets))]  # frame order != slice order
    mf = hd.legacy.LegacyConvertedEnhancedMRImage(
        legacy_datasets=datasets, series_instance_uid=generate_uid(), series_number=7,
        sop_instance_uid=generate_uid(), instance_number=1)
    mf.SeriesDescription = "cor T1 enhanced"
    dst_file = Path(dst_file)
    dst_file.parent.mkdir(parents=True, exist_ok=True)
    mf.save_as(str(dst_file), enforce_file_format=True)
    return dst_file


def seg_as_volume(seg_path, image) -> np.ndarray:
    """A SEG's frames put back on the image's slices (each voxel its segment number), using the
    source references only."""
    import highdicom as hd
    import pydicom

    seg = hd.seg.segread(str(seg_path))
    ref = image.meta["dicom"]
    sop = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in ref["files"]]
    where = {(sop[fi], fr + 1 if ref["multiframe"] else None): k for k, (fi, fr) in enumerate(ref["slices"])}
    out = np.zeros(image.shape, np.uint8)
    frames = seg.pixel_array.reshape(-1, int(seg.Rows), int(seg.Columns))  # one frame reads as 2D
    for i, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        src = item.DerivationImageSequence[0].SourceImageSequence[0]
        fr = int(src.ReferencedFrameNumber) if "ReferencedFrameNumber" in src else None
        k = where[(str(src.ReferencedSOPInstanceUID), fr)]
        ident = item if "SegmentIdentificationSequence" in item else seg.SharedFunctionalGroupsSequence[0]
        out[k][frames[i] > 0] = int(ident.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
    return out
