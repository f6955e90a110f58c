"""Masks out in the formats clinical and research viewers open.

=========  ===========  =====================================================
format     suffix       written by
=========  ===========  =====================================================
nii.gz     .nii.gz      nibabel (:func:`femur_core.volume_io.write_volume`)
nii        .nii         nibabel
nrrd       .nrrd        SimpleITK (3D Slicer's native format; gzip encoded)
mha        .mha         SimpleITK (MetaImage, one file; ITK-SNAP, Slicer)
seg        .seg.dcm     highdicom: DICOM Segmentation referencing the source
                        series (PACS, OHIF, Slicer); needs a DICOM source
=========  ===========  =====================================================

Every writer keeps the mask's exact affine (origin, spacing and direction, also
for oblique scans) and writes atomically (temporary file, then rename), never
over an existing file unless ``overwrite=True``. :data:`MASK_FORMATS` is the one
list the CLI (``predict --format``) and the napari writer share.

A DICOM SEG holds one segment per femur with coded anatomy: category
*Anatomical Structure* (SCT 91723000), type *Femur* (SCT 71341001) with the
laterality modifier *Right* (SCT 24028007) or *Left* (SCT 7771000): a binary
mask is split by side (:func:`femur_core.analysis.side_labels`), a label map is
taken as 1 = right femur, 2 = left femur (:data:`LEFT_RIGHT`); ``segments=FEMUR``
writes one segment *Femur* without laterality.
"""

from __future__ import annotations

import io as _bytes_io
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError, OutputExistsError
from .volume_io import atomic_write_bytes, write_volume
from .volume import Volume

__all__ = [
    "MASK_FORMATS",
    "FEMUR",
    "LEFT_RIGHT",
    "format_of",
    "output_path",
    "write_mask",
    "write_itk",
    "write_seg",
    "seg_segments",
]

#: Mask output formats: name -> file suffix (shared by the CLI and the napari writer).
MASK_FORMATS: dict[str, str] = {
    "nii.gz": ".nii.gz",
    "nii": ".nii",
    "nrrd": ".nrrd",
    "mha": ".mha",
    "seg": ".seg.dcm",
}

#: Segments of a plain femur mask (label 1).
FEMUR: dict[int, str] = {1: "femur"}
#: Segments of a left/right label map (1 = right femur, 2 = left femur).
LEFT_RIGHT: dict[int, str] = {1: "right femur", 2: "left femur"}

_LPS = np.diag([-1.0, -1.0, 1.0])  # RAS <-> LPS (its own inverse)


def format_of(path: "str | os.PathLike") -> str:
    """The format name of a file name (``x.seg.dcm`` / ``x.dcm`` -> ``seg``, ``x.nrrd`` -> ``nrrd`` ...).

    Raises
    ------
    InputError
        The suffix is none of :data:`MASK_FORMATS`.
    """
    name = Path(path).name.lower()
    if name.endswith(".dcm"):
        return "seg"
    for fmt, suffix in MASK_FORMATS.items():
        if name.endswith(suffix):
            return fmt
    raise InputError(path, "unknown mask format (expected " + ", ".join(MASK_FORMATS.values()) + ")")


def output_path(base: "str | os.PathLike", fmt: str) -> Path:
    """``base`` plus the suffix of format ``fmt`` (``out/sub01_mask`` + ``nrrd`` -> ``out/sub01_mask.nrrd``)."""
    if fmt not in MASK_FORMATS:
        raise InputError(None, f"unknown mask format {fmt!r} (choose from {', '.join(MASK_FORMATS)})")
    return Path(os.fspath(base) + MASK_FORMATS[fmt])


def write_mask(mask: Volume, path: "str | os.PathLike", *, source: Volume | Mapping | None = None,
               segments: Mapping[int, str] | None = None, overwrite: bool = False) -> Path:
    """Write a mask or label map in the format its suffix names (see :data:`MASK_FORMATS`).

    Parameters
    ----------
    mask : Volume
        Integer mask / label map on the source scan's grid.
    path : str or path-like
        Target file; the suffix picks the format.
    source : Volume or mapping, optional
        DICOM SEG only: the source image (a Volume read from DICOM) or its
        ``meta["dicom"]`` entry, to reference the source series.
    segments : mapping, optional
        DICOM SEG only: label value -> segment name (default: right / left femur,
        :data:`LEFT_RIGHT`, a binary mask split by side; :data:`FEMUR` for one segment).
    overwrite : bool
        Replace an existing file.

    Returns
    -------
    pathlib.Path
        The written file.
    """
    p = Path(path)
    fmt = format_of(p)
    data = np.asarray(mask.data)
    if data.size and (data.min() < 0 or data.max() > 255):
        raise InputError(p, f"mask values {data.min()}..{data.max()} do not fit 0..255")
    mask = Volume(data.astype(np.uint8), mask.affine, mask.source, mask.meta)
    if fmt in ("nii", "nii.gz"):
        return write_volume(mask, p, overwrite=overwrite, dtype=np.uint8)
    if fmt in ("nrrd", "mha"):
        return write_itk(mask, p, overwrite=overwrite)
    return write_seg(mask, source, p, segments=segments, overwrite=overwrite)


# ----------------------------------------------------------------------------- NRRD / MHA
def _to_sitk(vol: Volume):
    """A SimpleITK image of a volume: ITK index axes = the volume's array axes, geometry in LPS."""
    import SimpleITK as sitk

    a = np.asarray(vol.affine, dtype=float)
    spacing = np.sqrt((a[:3, :3] ** 2).sum(axis=0))
    direction = _LPS @ (a[:3, :3] / spacing)  # unit columns, LPS
    origin = _LPS @ a[:3, 3]
    # GetImageFromArray reads numpy (z, y, x) as ITK (x, y, z): reverse the axes first
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(np.asarray(vol.data), (2, 1, 0))))
    img.SetSpacing([float(s) for s in spacing])
    img.SetOrigin([float(v) for v in origin])
    img.SetDirection([float(v) for v in direction.ravel()])  # row-major 3 x 3
    return img


def write_itk(vol: Volume, path: "str | os.PathLike", *, overwrite: bool = False) -> Path:
    """Write a volume as NRRD or MetaImage (``.mha``) with SimpleITK, atomically.

    The file's origin, spacing and direction are the volume's affine in
    DICOM / ITK's LPS convention (readers such as 3D Slicer and ITK-SNAP place
    it exactly where the NIfTI of the same volume lies).
    """
    import SimpleITK as sitk

    p = Path(path)
    if p.exists() and not overwrite:
        raise OutputExistsError(p)
    suffix = ".nrrd" if p.name.lower().endswith(".nrrd") else ".mha"
    with tempfile.TemporaryDirectory(prefix="femur_export_") as tmp:
        tmp_file = Path(tmp) / f"out{suffix}"
        try:
            sitk.WriteImage(_to_sitk(vol), str(tmp_file), useCompression=True)
        except RuntimeError as exc:
            raise InputError(p, f"SimpleITK could not write it ({str(exc).strip().splitlines()[-1]})") from None
        payload = tmp_file.read_bytes()
    try:
        return atomic_write_bytes(p, payload, overwrite=overwrite)
    except OutputExistsError:
        raise
    except OSError as exc:
        raise InputError(p, f"cannot write ({exc.strerror or exc})") from None


# ----------------------------------------------------------------------------- DICOM SEG
@dataclass(frozen=True)
class _SegmentSpec:
    label: str
    laterality: str | None  # "Right" / "Left" / None


_SEGMENT_SPECS = {
    "femur": _SegmentSpec("Femur", None),
    "right femur": _SegmentSpec("Right femur", "Right"),
    "left femur": _SegmentSpec("Left femur", "Left"),
}


def seg_segments(segments: Mapping[int, str]):
    """highdicom segment descriptions with coded anatomy for ``{label value: segment name}``."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from . import __version__

    algo = hd.AlgorithmIdentificationSequence(
        name="femur_core", family=codes.DCM.ArtificialIntelligence, version=__version__)
    out = []
    for number, name in sorted(segments.items()):
        spec = _SEGMENT_SPECS.get(name.lower())
        if spec is None:
            raise ValueError(f"unknown segment {name!r} (choose from {', '.join(_SEGMENT_SPECS)})")
        desc = hd.seg.SegmentDescription(
            segment_number=int(number), segment_label=spec.label,
            segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=codes.SCT.Femur,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algo,
        )
        if spec.laterality is not None:
            desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
                hd.sr.CodedConcept.from_code(getattr(codes.SCT, spec.laterality))]
        out.append(desc)
    return out


def _dicom_ref(source: "Volume | Mapping | None", where: Path) -> Mapping:
    if isinstance(source, Volume):
        ref = source.meta.get("dicom")
    else:
        ref = source
    if not ref or not ref.get("files"):
        name = source.source if isinstance(source, Volume) else None
        raise InputError(where, "a DICOM SEG needs the source DICOM series; "
                                + (f"{name} was not read from DICOM" if name else "no DICOM source given")
                                + " (write .nii.gz, .nrrd or .mha instead)")
    return ref


def write_seg(mask: Volume, source: "Volume | Mapping | None", path: "str | os.PathLike", *,
              segments: Mapping[int, str] | None = None, overwrite: bool = False) -> Path:
    """Write a mask as a DICOM Segmentation (highdicom) that references its source series.

    Parameters
    ----------
    mask : Volume
        Label map on the source series' grid, in its (slice, row, column) order
        (what :func:`femur_core.dicom.read_dicom` returned, and every femur_core
        prediction of it).
    source : Volume or mapping
        The source image read from DICOM, or its ``meta["dicom"]`` entry.
    path : str or path-like
        Target ``.dcm`` file.
    segments : mapping, optional
        Label value -> segment name, numbered from 1 (:data:`FEMUR` or
        :data:`LEFT_RIGHT`). By default a binary femur mask is split into right
        and left femur (:func:`femur_core.analysis.side_labels`, from patient
        coordinates) and a label map is taken as right (1) / left (2).
    overwrite : bool
        Replace an existing file.
    """
    import highdicom as hd
    import pydicom
    from pydicom.uid import generate_uid

    from . import __version__

    p = Path(path)
    if p.exists() and not overwrite:
        raise OutputExistsError(p)
    ref = _dicom_ref(source, p)
    files = [str(f) for f in ref["files"]]
    slices = [tuple(int(v) for v in s) for s in ref["slices"]]
    data = np.asarray(mask.data).astype(np.uint8)
    if data.shape[0] != len(slices):
        raise InputError(p, f"mask has {data.shape[0]} slices, the source series {len(slices)}")
    try:
        headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    except Exception as exc:
        raise InputError(p, f"cannot read the source DICOM series ({type(exc).__name__}: {exc})") from None
    if any(int(getattr(h, "Rows", 0)) != data.shape[1] or int(getattr(h, "Columns", 0)) != data.shape[2]
           for h in headers):
        raise InputError(p, f"mask slices {data.shape[1:]} differ from the source images' rows x columns")
    if segments is None:
        if int(data.max(initial=0)) == 1:  # a femur mask: one segment per femur, by side
            from .analysis import side_labels

            data = np.asarray(side_labels(Volume(data, mask.affine)).data).astype(np.uint8)
        segments = LEFT_RIGHT if data.any() else FEMUR
    extra = sorted(set(np.unique(data).tolist()) - {0} - set(segments))
    if extra:
        raise InputError(p, f"mask holds label values {extra} that no segment describes")
    if ref.get("multiframe"):
        if len(files) != 1:
            raise InputError(p, f"a DICOM SEG of a series stored as {len(files)} multi-frame files is not "
                                "supported (write .nii.gz, .nrrd or .mha instead)")
        # one multi-frame source: frames of the SEG follow the source's frame order
        n_frames = int(getattr(headers[0], "NumberOfFrames", 1) or 1)
        frames = np.zeros((n_frames, *data.shape[1:]), np.uint8)
        for k, (_, fr) in enumerate(slices):
            frames[fr] = data[k]
        sources = headers[:1]
    else:
        order = [fi for fi, _ in slices]  # source images in slice order
        frames = data
        sources = [headers[i] for i in order]
    try:
        seg = hd.seg.Segmentation(
            source_images=sources, pixel_array=frames,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=seg_segments(segments),
            series_instance_uid=generate_uid(), series_number=int(getattr(headers[0], "SeriesNumber", 0) or 0) + 1000,
            sop_instance_uid=generate_uid(), instance_number=1,
            manufacturer="napari-femur", manufacturer_model_name="femur_core",
            software_versions=__version__, device_serial_number="0",
            series_description="Femur segmentation", content_label="FEMUR",
            omit_empty_frames=bool(frames.any()),
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise InputError(p, f"cannot make a DICOM SEG of this source ({type(exc).__name__}: {exc})") from None
    buf = _bytes_io.BytesIO()
    seg.save_as(buf)
    try:
        return atomic_write_bytes(p, buf.getvalue(), overwrite=overwrite)
    except OutputExistsError:
        raise
    except OSError as exc:
        raise InputError(p, f"cannot write ({exc.strerror or exc})") from None
