"""DICOM as hospitals store it: series folders, compressed pixel data, enhanced multi-frame.

A folder may hold several series (a study export): :func:`list_series` lists
them (UID, series number, description, slice count) from the headers alone, and
:func:`read_dicom` reads one, chosen by ``series`` (its SeriesInstanceUID or
SeriesNumber) or the only one there. Classic single-frame images and enhanced
multi-frame images (e.g. Enhanced MR, one file holding every slice with its
per-frame position) give the same :class:`~femur_core.volume.Volume`.

Compressed transfer syntaxes (JPEG lossless / baseline / extended, JPEG-LS,
JPEG 2000, RLE) are decoded by pydicom's pixel-data plugins; the decoder this
package depends on is python-gdcm (GDCM, BSD licensed: one wheel that covers every
classic compressed syntax), with pydicom's own RLE and deflate handlers and any
other installed plugin (pylibjpeg, pyjpegls) as alternatives that pydicom picks
by itself.

Geometry is checked, not assumed: slices must share one orientation, be evenly
spaced (a missing slice is named as such) and be stacked along their normal
(gantry tilt, i.e. a sheared stack, is refused). Each refusal is an
:class:`~femur_core.errors.InputError` naming the folder.

The volume's ``meta["dicom"]`` records the source files (and frame numbers) in
slice order, so that a DICOM SEG of a result can reference the source images
(:mod:`femur_core.export`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputError
from .volume import Volume

__all__ = ["SeriesInfo", "list_series", "select_series", "read_dicom", "is_dicom_file", "LPS_TO_RAS"]

#: DICOM patient coordinates are LPS; femur_core's world (NIfTI) is RAS.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])

#: Largest accepted angle between the slice stacking direction and the slice normal.
MAX_TILT_DEG = 0.1

_IMAGE_MODALITIES_SKIPPED = {"SEG", "RTSTRUCT", "SR", "PR", "KO", "REG", "RTPLAN", "RTDOSE"}


def is_dicom_file(path: "str | os.PathLike") -> bool:
    """Whether a file carries the DICOM preamble (``DICM`` at byte 128) or a ``.dcm`` name."""
    p = Path(path)
    if p.suffix.lower() == ".dcm":
        return True
    try:
        with open(p, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


@dataclass(frozen=True)
class SeriesInfo:
    """One image series found in a folder (from the headers; no pixels read).

    Attributes
    ----------
    uid : str
        SeriesInstanceUID.
    number : int or None
        SeriesNumber, if present.
    description : str
        SeriesDescription ('' if absent).
    n_slices : int
        Number of image frames (files for single-frame images, frames for multi-frame).
    files : tuple of str
        The series' files.
    modality : str
        Modality (MR, CT ...).
    multiframe : bool
        Whether the series is stored as multi-frame image(s).
    """

    uid: str
    number: int | None
    description: str
    n_slices: int
    files: tuple[str, ...] = field(repr=False)
    modality: str = ""
    multiframe: bool = False

    def label(self) -> str:
        """One line for lists: ``#3 "cor T1" 24 slices (24 files), UID 1.2.3``."""
        num = f"#{self.number} " if self.number is not None else ""
        n_files = len(self.files)
        stored = f"{n_files} file{'s' if n_files != 1 else ''}" + (", multi-frame" if self.multiframe else "")
        return f'{num}"{self.description or "(no description)"}" {self.n_slices} slices ({stored}), UID {self.uid}'


def _n_frames(ds) -> int:
    try:
        return int(getattr(ds, "NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        return 1


def _is_image(ds) -> bool:
    if str(getattr(ds, "Modality", "")).upper() in _IMAGE_MODALITIES_SKIPPED:
        return False
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        return False
    return hasattr(ds, "ImagePositionPatient") or "PerFrameFunctionalGroupsSequence" in ds


def _headers(folder: Path):
    """(path, header dataset) of every readable DICOM image file in ``folder`` (not recursive)."""
    import pydicom

    try:
        files = sorted(f for f in folder.iterdir() if f.is_file())
    except OSError as exc:
        raise InputError(folder, f"cannot list the folder ({exc.strerror or exc})") from None
    out = []
    for f in files:
        try:
            # large values (the pixel data) are deferred: read only if used, yet "PixelData" in ds works
            ds = pydicom.dcmread(str(f), defer_size=4096)
        except Exception:
            continue  # not a DICOM file (README, DICOMDIR fragments, ...)
        if _is_image(ds):
            out.append((f, ds))
    return out


def list_series(folder: "str | os.PathLike") -> list[SeriesInfo]:
    """The image series in a folder, sorted by series number then description.

    Raises
    ------
    InputError
        The folder holds no DICOM image files.
    """
    folder = Path(folder)
    groups: dict[str, list] = {}
    for f, ds in _headers(folder):
        groups.setdefault(str(getattr(ds, "SeriesInstanceUID", "unknown")), []).append((f, ds))
    if not groups:
        raise InputError(folder, "no DICOM image files found in this folder (a folder must hold one DICOM "
                                 "series; other scans are read as files: NIfTI .nii/.nii.gz or TIFF .tif/.tiff)")
    out = []
    for uid, items in groups.items():
        ds0 = items[0][1]
        try:
            number = int(ds0.SeriesNumber) if getattr(ds0, "SeriesNumber", None) not in (None, "") else None
        except (TypeError, ValueError):
            number = None
        out.append(SeriesInfo(
            uid=uid, number=number, description=str(getattr(ds0, "SeriesDescription", "") or ""),
            n_slices=sum(_n_frames(ds) for _, ds in items), files=tuple(str(f) for f, _ in items),
            modality=str(getattr(ds0, "Modality", "") or ""),
            multiframe=any(_n_frames(ds) > 1 or "PerFrameFunctionalGroupsSequence" in ds for _, ds in items),
        ))
    out.sort(key=lambda s: (s.number if s.number is not None else 1 << 30, s.description, s.uid))
    return out


def select_series(series: list[SeriesInfo], selector: "str | int | None", folder: "str | os.PathLike") -> SeriesInfo:
    """Pick one series by SeriesInstanceUID or SeriesNumber (or the only one).

    Raises
    ------
    InputError
        Several series and no selector, or a selector that matches none / several;
        the message lists every series with its description and slice count.
    """
    listing = "; ".join(s.label() for s in series)
    if selector is None or str(selector).strip() == "":
        if len(series) == 1:
            return series[0]
        raise InputError(folder, f"holds {len(series)} DICOM series, choose one by UID or number "
                                 f"(CLI: --series): {listing}")
    sel = str(selector).strip()
    hits = [s for s in series if s.uid == sel]
    if not hits and sel.lstrip("+-").isdigit():
        hits = [s for s in series if s.number == int(sel)]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise InputError(folder, f"no DICOM series with UID or number {sel!r}; it holds: {listing}")
    raise InputError(folder, f"{len(hits)} DICOM series have number {sel}, choose one by UID: "
                             + "; ".join(s.label() for s in hits))


# ----------------------------------------------------------------------------- frames and geometry
@dataclass
class _Frame:
    file: int          # index into the series' files
    frame: int         # 0-based frame number within that file
    position: np.ndarray
    orientation: np.ndarray
    pixel_spacing: tuple[float, float]
    slope: float = 1.0
    intercept: float = 0.0


def _item(seq_owner, keyword: str):
    seq = getattr(seq_owner, keyword, None)
    return seq[0] if seq else None


def _functional(ds, frame: int, group: str):
    """A functional group item of one frame (per-frame first, then shared), or None."""
    per = getattr(ds, "PerFrameFunctionalGroupsSequence", None)
    if per is not None and frame < len(per):
        it = _item(per[frame], group)
        if it is not None:
            return it
    shared = _item(ds, "SharedFunctionalGroupsSequence")
    return _item(shared, group) if shared is not None else None


def _frames_of(ds, file_index: int, path: Path) -> list[_Frame]:
    n = _n_frames(ds)
    if "PerFrameFunctionalGroupsSequence" in ds:
        frames = []
        for i in range(n):
            pos = _functional(ds, i, "PlanePositionSequence")
            ori = _functional(ds, i, "PlaneOrientationSequence")
            meas = _functional(ds, i, "PixelMeasuresSequence")
            if pos is None or ori is None or meas is None or "PixelSpacing" not in meas:
                raise InputError(path, f"multi-frame image: frame {i + 1} has no plane position, "
                                       "orientation or pixel spacing")
            pvt = _functional(ds, i, "PixelValueTransformationSequence")
            frames.append(_Frame(file_index, i, np.asarray(pos.ImagePositionPatient, float),
                                 np.asarray(ori.ImageOrientationPatient, float),
                                 tuple(float(v) for v in meas.PixelSpacing),
                                 float(getattr(pvt, "RescaleSlope", 1) or 1) if pvt is not None else 1.0,
                                 float(getattr(pvt, "RescaleIntercept", 0) or 0) if pvt is not None else 0.0))
        return frames
    if n > 1:
        raise InputError(path, f"multi-frame image ({n} frames) without per-frame positions "
                               "(PerFrameFunctionalGroupsSequence); cannot place its slices")
    for kw in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        if kw not in ds:
            raise InputError(path, f"DICOM image has no {kw}; cannot place it in 3D")
    return [_Frame(file_index, 0, np.asarray(ds.ImagePositionPatient, float),
                   np.asarray(ds.ImageOrientationPatient, float),
                   tuple(float(v) for v in ds.PixelSpacing),
                   float(getattr(ds, "RescaleSlope", 1) or 1), float(getattr(ds, "RescaleIntercept", 0) or 0))]


def _order_and_check(frames: list[_Frame], folder: Path) -> tuple[list[_Frame], float, np.ndarray]:
    """Sort frames along the slice normal and refuse what a regular grid cannot hold.

    Returns the sorted frames, the slice step (mm) and the unit normal.
    """
    if len(frames) < 2:
        raise InputError(folder, "a DICOM series needs at least 2 slices for a 3D volume")
    ori0 = frames[0].orientation
    if any(not np.allclose(f.orientation, ori0, atol=1e-3) for f in frames):
        n_ori = len({tuple(np.round(f.orientation, 3)) for f in frames})
        raise InputError(folder, f"slices have {n_ori} different orientations (a localizer or several "
                                 "stacks in one series); cannot form one 3D volume")
    if any(not np.allclose(f.pixel_spacing, frames[0].pixel_spacing, rtol=1e-4) for f in frames):
        raise InputError(folder, "slices have different pixel spacings; cannot form one 3D volume")
    row, col = ori0[:3], ori0[3:]
    normal = np.cross(row, col)
    normal = normal / np.linalg.norm(normal)
    frames = sorted(frames, key=lambda f: float(normal @ f.position))
    pos = np.array([normal @ f.position for f in frames])
    gaps = np.diff(pos)
    if np.any(gaps <= 1e-3):
        n_dup = int(np.sum(gaps <= 1e-3))
        raise InputError(folder, f"{n_dup} slice(s) share a position with another slice (several echoes, "
                                 "time points or repeated slices in one series); cannot form one 3D volume")
    step = float(np.median(gaps))
    if np.any(np.abs(gaps - step) > 0.1 * step):
        missing = int(round((pos[-1] - pos[0]) / step)) + 1 - len(pos)
        if missing >= 1:
            raise InputError(folder, f"uneven slice spacing: {missing} slice(s) appear to be missing from "
                                     f"the series (gaps {gaps.min():.3g} to {gaps.max():.3g} mm)")
        raise InputError(folder, f"non-uniform slice spacing (gaps {gaps.min():.3g} to {gaps.max():.3g} mm); "
                                 "resample the series to even spacing first")
    if np.any(np.abs(gaps - step) > max(0.01 * step, 0.02)):  # 0.02 mm: positions stored to 0.01 mm
        raise InputError(folder, f"non-uniform slice spacing (gaps {gaps.min():.4g} to {gaps.max():.4g} mm, "
                                 "more than 1% apart); resample the series to even spacing first")
    span = frames[-1].position - frames[0].position
    along = float(normal @ span)
    across = float(np.linalg.norm(span - along * normal))
    tilt = float(np.degrees(np.arctan2(across, abs(along))))
    # a shear below a tenth of a pixel across the whole stack is rounding, not tilt
    if tilt > MAX_TILT_DEG and across > 0.1 * min(frames[0].pixel_spacing):
        raise InputError(folder, f"gantry tilt: the slices are stacked {tilt:.2f} degrees off their normal "
                                 "(a sheared volume); resample the series to an orthogonal grid first")
    return frames, step, normal


def _pixels(ds, path: Path) -> np.ndarray:
    """Decoded stored values of a dataset, shape (frames, rows, cols)."""
    if int(getattr(ds, "SamplesPerPixel", 1) or 1) != 1:
        raise InputError(path, f"colour image ({ds.SamplesPerPixel} samples per pixel); a grey-scale MR "
                               "series is needed")
    try:
        arr = ds.pixel_array
    except Exception as exc:
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(ts, "name", str(ts))
        hint = ""
        if ts is not None and getattr(ts, "is_compressed", False):
            hint = " (compressed: the python-gdcm package decodes it; pip install python-gdcm)"
        raise InputError(path, f"cannot decode the pixel data, transfer syntax {name}{hint}: "
                               f"{type(exc).__name__}: {exc}") from None
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = arr[None]
    return arr


def read_dicom(path: "str | os.PathLike", series: "str | int | None" = None) -> Volume:
    """Read one DICOM series (single- or multi-frame, compressed or not) as a Volume.

    Parameters
    ----------
    path : str or path-like
        A folder holding the series, or one of its files (then the series of
        that file is read, from its folder, unless ``series`` says otherwise).
    series : str or int, optional
        SeriesInstanceUID or SeriesNumber; needed when the folder holds several series.

    Returns
    -------
    Volume
        float32 voxels (rescale slope / intercept applied) in (slice, row, column)
        order with their voxel -> RAS+ affine; ``meta`` holds ``format="dicom"``,
        ``series`` (description), ``series_uid`` and ``dicom`` (files and frame
        numbers in slice order, for DICOM SEG export).

    Raises
    ------
    InputError
        No series, an ambiguous or unknown choice, geometry that is no regular
        grid (missing slices, uneven spacing, gantry tilt, mixed orientations),
        or undecodable pixel data; the message names the folder or file.
    """
    import pydicom

    p = Path(path)
    folder = p if p.is_dir() else p.parent
    found = list_series(folder)
    if p.is_file() and series is None:
        me = p.resolve()
        hits = [s for s in found if any(Path(f).resolve() == me for f in s.files)]
        if not hits:
            raise InputError(p, "not a DICOM image file")
        info = hits[0]
    else:
        info = select_series(found, series, folder)
    where = p if (p.is_file() and len(info.files) == 1) else folder
    datasets = []
    frames: list[_Frame] = []
    for i, f in enumerate(info.files):
        try:
            ds = pydicom.dcmread(f)
        except Exception as exc:
            raise InputError(f, f"unreadable DICOM file ({type(exc).__name__}: {exc})") from None
        datasets.append(ds)
        frames.extend(_frames_of(ds, i, Path(f)))
    frames, step, normal = _order_and_check(frames, Path(where))
    decoded: dict[int, np.ndarray] = {}
    slices = []
    rows = cols = None
    for fr in frames:
        if fr.file not in decoded:
            decoded[fr.file] = _pixels(datasets[fr.file], Path(info.files[fr.file]))
        px = decoded[fr.file][fr.frame]
        if rows is None:
            rows, cols = px.shape
        elif px.shape != (rows, cols):
            raise InputError(where, f"slices have different sizes ({rows}x{cols} and {px.shape[0]}x{px.shape[1]})")
        slices.append(px.astype(np.float32) * np.float32(fr.slope) + np.float32(fr.intercept))
    arr = np.stack(slices)
    row, col = frames[0].orientation[:3], frames[0].orientation[3:]
    ps = frames[0].pixel_spacing  # (row spacing, column spacing)
    # index (k, r, c) -> first + k * step * normal + r * ps[0] * col + c * ps[1] * row  (LPS)
    m = np.eye(4)
    m[:3, 0] = LPS_TO_RAS @ (normal * step)
    m[:3, 1] = LPS_TO_RAS @ (col * ps[0])
    m[:3, 2] = LPS_TO_RAS @ (row * ps[1])
    m[:3, 3] = LPS_TO_RAS @ frames[0].position
    meta = {
        "format": "dicom",
        "series": info.description,
        "series_uid": info.uid,
        "dicom": {"files": list(info.files), "slices": [[fr.file, fr.frame] for fr in frames],
                  "multiframe": info.multiframe},
    }
    return Volume(arr, m, str(where), meta)
