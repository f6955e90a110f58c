"""Reading and writing volumes with their geometry.

Supported inputs: NIfTI (``.nii``, ``.nii.gz``), TIFF stacks (``.tif``,
``.tiff``; spacing from ImageJ / OME metadata or given) and DICOM series folders
(single- or multi-frame, compressed or not: :mod:`femur_core.dicom`; a folder holding
several series needs ``series=``, otherwise the error lists them). Outputs are NIfTI, written atomically (temporary file, then rename) and
never over an existing file unless ``overwrite=True``.
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .dicom import is_dicom_file, read_dicom
from .errors import InputError, OutputExistsError
from .volume import Volume

__all__ = [
    "read_volume",
    "write_volume",
    "atomic_write_bytes",
    "write_json",
    "check_image",
    "check_labels",
    "check_mask",
    "read_pair",
    "NIFTI_SUFFIXES",
    "TIFF_SUFFIXES",
]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
TIFF_SUFFIXES = (".tif", ".tiff")


def _is_nifti(p: Path) -> bool:
    return p.name.lower().endswith(NIFTI_SUFFIXES)


def _is_tiff(p: Path) -> bool:
    return p.name.lower().endswith(TIFF_SUFFIXES)


def read_volume(
    path: "str | os.PathLike",
    spacing: Sequence[float] | None = None,
    series: "str | int | None" = None,
) -> Volume:
    """Read a 3D volume with its geometry.

    Parameters
    ----------
    path : str or path-like
        A NIfTI file, a TIFF stack, or a folder holding one DICOM series.
    spacing : sequence of 3 floats, optional
        Voxel size (mm) along the array axes; used for TIFF stacks without
        spacing metadata (default 1 mm) and ignored otherwise.
    series : str or int, optional
        DICOM only: SeriesInstanceUID or SeriesNumber of the series to read from
        a folder holding several (see :mod:`femur_core.dicom`).

    Returns
    -------
    Volume
        The voxels (float32 for images, original integer type kept) and affine.

    Raises
    ------
    InputError
        The path is missing, unreadable, truncated, not 3D, or of unknown type.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(p, "no such file or folder")
    if not os.access(p, os.R_OK):
        raise InputError(p, "permission denied (not readable)")
    if p.is_dir():
        vol = read_dicom(p, series)
    elif _is_nifti(p):
        vol = _read_nifti(p)
    elif _is_tiff(p):
        vol = _read_tiff(p, spacing)
    elif is_dicom_file(p):
        vol = read_dicom(p, series)
    else:
        raise InputError(p, "unknown file type (expected .nii, .nii.gz, .tif/.tiff or a DICOM folder)")
    return vol


def _read_nifti(p: Path) -> Volume:
    import nibabel as nib

    if p.stat().st_size == 0:
        raise InputError(p, "empty file (0 bytes)")
    try:
        img = nib.load(str(p))
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise InputError(p, f"unreadable or truncated NIfTI ({type(exc).__name__}: {exc})") from None
    # drop trailing singleton dimensions (x, y, z, 1) but refuse real 4D data
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(p, f"expected a 3D volume, got {data.ndim}D data of shape {data.shape}")
    affine = img.affine
    if affine is None or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(p, "invalid affine (singular or not finite)")
    return Volume(np.asarray(data), affine, str(p), {"format": "nifti"})


def _tiff_spacing(tf) -> list[float] | None:
    """Spacing (z, y, x) from ImageJ or OME metadata, or None."""
    try:
        ij = tf.imagej_metadata or {}
        page = tf.pages[0]
        xr = page.tags.get("XResolution")
        yr = page.tags.get("YResolution")
        if ij and xr is not None and yr is not None:
            sx = xr.value[1] / xr.value[0]
            sy = yr.value[1] / yr.value[0]
            sz = float(ij.get("spacing", 1.0))
            return [sz, sy, sx]
    except Exception:
        return None
    return None


def _read_tiff(p: Path, spacing: Sequence[float] | None) -> Volume:
    import tifffile

    try:
        with tifffile.TiffFile(str(p)) as tf:
            data = tf.asarray()
            meta_spacing = _tiff_spacing(tf)
    except Exception as exc:
        raise InputError(p, f"unreadable TIFF ({type(exc).__name__}: {exc})") from None
    data = np.squeeze(data)
    if data.ndim != 3:
        raise InputError(p, f"expected a 3D stack, got {data.ndim}D data of shape {data.shape}")
    sp = list(spacing) if spacing is not None else (meta_spacing or [1.0, 1.0, 1.0])
    if len(sp) != 3 or not all(np.isfinite(s) and s > 0 for s in sp):
        raise InputError(p, f"invalid spacing {sp}")
    # TIFF stacks are taken as (slice, row, column) = canonical (P, I, L)
    affine = np.array(
        [[0, 0, -sp[2], 0], [-sp[0], 0, 0, 0], [0, -sp[1], 0, 0], [0, 0, 0, 1]], dtype=float
    )
    return Volume(data, affine, str(p), {"format": "tiff", "spacing_given": spacing is not None or meta_spacing is not None})


def _umask() -> int:
    """The process umask, read without changing it.

    Linux reports it in ``/proc/self/status``; elsewhere a probe file created
    with mode 0777 in the temporary folder shows which bits the system removes.
    (``os.umask`` can only read the mask by setting it, which races with other
    threads creating files.)
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    probe = Path(tempfile.gettempdir()) / f".femur-umask-{secrets.token_hex(6)}"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o777)
    try:
        return 0o777 & ~os.fstat(fd).st_mode
    finally:
        os.close(fd)
        probe.unlink()


def atomic_write_bytes(path: "str | os.PathLike", payload: bytes, overwrite: bool = False) -> Path:
    """Write bytes to ``path`` through a temporary file and an atomic rename.

    On any failure (disk full, permissions, interruption) the temporary file is
    removed and ``path`` is left as it was; an ``OSError`` carries ``path`` as
    its ``filename`` so the message names the file being written.
    """
    p = Path(path)
    if p.exists() and not overwrite:
        raise OutputExistsError(p)
    tmp = None
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".part", dir=str(p.parent))
        with os.fdopen(fd, "wb") as fh:
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
    except BaseException as exc:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        if isinstance(exc, OSError):
            exc.filename = str(p)  # name the target, not the temporary file
        raise
    return p


def write_json(path: "str | os.PathLike", obj, indent: int = 1, overwrite: bool = True) -> Path:
    """Write ``obj`` as JSON (numbers and strings; other objects as ``str``) atomically.

    The benchmarks and reports write their results with this: a crash or a full
    disk leaves the previous file (or none), never half a JSON document.

    Parameters
    ----------
    path : path-like
        Target file; its folder is created if missing.
    obj
        Anything ``json.dumps`` takes (objects it does not know become strings).
    indent : int
        JSON indentation.
    overwrite : bool
        Replace an existing file (default); otherwise refuse with
        :class:`~femur_core.errors.OutputExistsError`.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    payload = (json.dumps(obj, indent=indent, default=str) + "\n").encode()
    return atomic_write_bytes(path, payload, overwrite=overwrite)


#: Storage step of written probability maps (uint8 with NIfTI scl_slope 1/255).
PROB_SLOPE = 1.0 / 255.0


def write_volume(vol: Volume, path: "str | os.PathLike", overwrite: bool = False, dtype=None,
                 slope: float | None = None) -> Path:
    """Write a volume as NIfTI with its affine, atomically.

    Parameters
    ----------
    vol : Volume
        What to write; its affine becomes both the sform and the qform.
    path : str or path-like
        Target ``.nii`` or ``.nii.gz`` file.
    overwrite : bool
        Replace an existing file (default: refuse with :class:`OutputExistsError`).
    dtype : numpy dtype, optional
        Store as this type (e.g. ``np.uint8`` for masks).
    slope : float, optional
        Store ``round(data / slope)`` in the integer ``dtype`` with the NIfTI
        scaling ``scl_slope = slope`` (readers get ``stored * slope`` back). With
        ``dtype=np.uint8, slope=1/255`` a probability map in [0, 1] keeps 1/255
        steps and writes about 10x faster than float32 (see :data:`PROB_SLOPE`).

    Returns
    -------
    pathlib.Path
        The written file.
    """
    import nibabel as nib

    p = Path(path)
    if not _is_nifti(p):
        raise InputError(p, "output must be a .nii or .nii.gz file")
    if p.exists() and not overwrite:
        raise OutputExistsError(p)
    data = np.asarray(vol.data)
    if slope is not None:
        if dtype is None or not np.issubdtype(np.dtype(dtype), np.integer):
            raise ValueError("slope needs an integer dtype")
        info = np.iinfo(dtype)
        data = np.clip(np.rint(data / slope), info.min, info.max).astype(dtype)
    elif dtype is not None:
        data = data.astype(dtype)
    elif data.dtype == bool:
        data = data.astype(np.uint8)
    img = nib.Nifti1Image(data, vol.affine)
    img.set_qform(vol.affine, code=1)
    img.set_sform(vol.affine, code=1)
    if slope is not None:
        img.header.set_slope_inter(slope, 0.0)
    payload = img.to_bytes()
    if p.name.lower().endswith(".gz"):
        import gzip

        payload = gzip.compress(payload, compresslevel=4, mtime=0)
    try:
        return atomic_write_bytes(p, payload, overwrite=overwrite)
    except OSError as exc:
        if isinstance(exc, OutputExistsError):
            raise
        raise InputError(p, f"cannot write ({exc.strerror or exc})") from None


def check_image(vol: Volume) -> Volume:
    """Refuse images a model cannot use: non-finite voxels, empty or constant volumes.

    Returns the volume with float32 data.
    """
    data = np.asarray(vol.data)
    if data.size == 0 or min(data.shape) == 0:
        raise InputError(vol.source, f"empty volume (shape {data.shape})")
    if not np.issubdtype(data.dtype, np.number):
        raise InputError(vol.source, f"non-numeric voxel type {data.dtype}")
    data = data.astype(np.float32, copy=False)
    bad = ~np.isfinite(data)
    if bad.any():
        raise InputError(vol.source, f"{int(bad.sum())} voxels are NaN or Inf")
    if float(data.max()) == float(data.min()):
        raise InputError(vol.source, f"constant image (every voxel is {float(data.min()):g})")
    return Volume(data, vol.affine, vol.source, vol.meta)


def check_mask(mask: Volume, image: Volume | None = None, atol_mm: float = 1e-3) -> Volume:
    """Check that a mask is binary (0/1) and, if given, on the image's grid.

    Returns the mask as a uint8 volume.
    """
    vals = _finite_values(mask, "mask")
    if not np.all(np.isin(vals, [0, 1])):
        raise InputError(mask.source, f"mask is not binary: values {_shown(vals)} (expected only 0 and 1)")
    _check_on_grid(mask, image, "mask", atol_mm)
    return Volume(np.asarray(mask.data).astype(np.uint8), mask.affine, mask.source, mask.meta)


def _finite_values(vol: Volume, what: str) -> np.ndarray:
    """The distinct values of a mask or label map; refuses NaN / Inf."""
    data = np.asarray(vol.data)
    if not np.all(np.isfinite(data)):
        raise InputError(vol.source, f"{what} holds NaN or Inf values")
    return np.unique(data)


def _shown(vals: np.ndarray) -> str:
    return ", ".join(f"{v:g}" for v in vals[:8]) + (" ..." if len(vals) > 8 else "")


def _check_on_grid(vol: Volume, image: Volume | None, what: str, atol_mm: float) -> None:
    """Refuse a mask or label map that is not on the image's grid (shape and affine)."""
    if image is None:
        return
    if vol.shape != image.shape:
        raise InputError(vol.source, f"{what} shape {vol.shape} differs from image {image.name} shape {image.shape}")
    if not np.allclose(vol.affine, image.affine, atol=atol_mm):
        raise InputError(vol.source, f"{what} affine differs from image {image.name} affine (not on the same grid)")


def check_labels(labels: Volume, image: Volume | None = None, atol_mm: float = 1e-3) -> Volume:
    """Check a multi-label map (0 background, 1 femur, 2... other structures).

    The values must be finite non-negative integers below 256 and, if an image
    is given, the map must lie on its grid. Returns a uint8 volume.
    """
    vals = _finite_values(labels, "label map")
    if np.any(vals < 0) or np.any(vals > 255) or not np.all(vals == np.round(vals)):
        raise InputError(labels.source, f"label map values {_shown(vals)} are not integers in 0..255")
    _check_on_grid(labels, image, "label map", atol_mm)
    return Volume(np.asarray(labels.data).astype(np.uint8), labels.affine, labels.source, labels.meta)


def read_pair(image_path: "str | os.PathLike", mask_path: "str | os.PathLike") -> tuple[Volume, Volume]:
    """Read and check an image and its binary mask on the same grid."""
    img = check_image(read_volume(image_path))
    msk = check_mask(read_volume(mask_path), img)
    return img, msk
