"""Helpers shared by the reliability tests (bad inputs, crash safety, cancel, properties).

Not a test module: tiny NIfTI writers, a tiny cohort, a tiny model file, and a
runner for the command lines in a real subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

#: (L, I, P) file orientation like the real data: x to patient left, y inferior, z posterior.
LIP_AFFINE = np.array([[-1.5, 0, 0, 15.0], [0, 0, -5.0, 12.0], [0, -1.5, 0, 30.0], [0, 0, 0, 1]])
TINY_SHAPE = (20, 24, 6)


def write_nifti(path, data, affine=LIP_AFFINE) -> Path:
    """Save ``data`` with ``affine`` as both sform and qform (plain nibabel, not femur_core)."""
    img = nib.Nifti1Image(np.asarray(data), np.asarray(affine, float))
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def tiny_subject_arrays(seed: int, shape=TINY_SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """A noisy bright ellipsoid ("femur") and its 0/1 mask."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    cx, cy = shape[0] * 0.3 + rng.uniform(-1.5, 1.5), shape[1] * 0.5 + rng.uniform(-2, 2)
    blob = ((x - cx) / 4.0) ** 2 + ((y - cy) / 6.0) ** 2 + ((z - shape[2] / 2) / 2.2) ** 2 <= 1.0
    image = (200 + 600 * blob + rng.normal(0, 40, shape)).astype(np.int16)
    return image, blob.astype(np.uint8)


def write_subject(folder, sid: str, seed: int) -> tuple[Path, Path]:
    image, mask = tiny_subject_arrays(seed)
    return (write_nifti(Path(folder) / f"{sid}_image.nii.gz", image),
            write_nifti(Path(folder) / f"{sid}_femur.nii.gz", mask))


def write_cohort(folder, n: int, seed: int = 0) -> Path:
    """``n`` tiny subjects sub01 .. subNN in ``folder``."""
    for i in range(1, n + 1):
        write_subject(folder, f"sub{i:02d}", seed * 100 + i)
    return Path(folder)


def write_tiny_model(path) -> Path:
    """An untrained tiny 2D model file written by femur_core's own checkpoint writer."""
    from femur_core.checkpoint import save_checkpoint
    from femur_core.models import build_model, default_config
    from femur_core.preprocess import GridSpec
    from femur_core.training import TrainConfig

    import torch

    cfg = TrainConfig(model=default_config("2d-same", features=4, levels=2), grid=GridSpec())
    with torch.random.fork_rng():  # seeded: an unseeded random net gave an empty mask now and then
        torch.manual_seed(0)
        net = build_model(cfg.model)
    return save_checkpoint(path, net, cfg.to_dict(), threshold=0.5)


#: quick training flags for the CLIs (tiny 2D net, few epochs, fp32 on CPU)
QUICK_TRAIN = ["--model", "2d-same", "--ensemble", "1", "--features", "4", "--levels", "3", "--epochs", "2",
               "--device", "cpu", "--precision", "fp32", "--augment", ""]


def cli_env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="default", NO_COLOR="1")
    env.pop("PYTHONBREAKPOINT", None)
    return env


def run_cli(module: str, args: list, cwd=None, preamble: str = "", timeout: float = 120,
            **popen) -> subprocess.CompletedProcess:
    """Run ``python -m femur_core.<module> ARGS`` in a fresh interpreter.

    ``preamble`` is Python run first in the same process (to simulate a full
    disk or an unreadable file by monkeypatching); the module then runs as
    ``__main__`` exactly as ``python -m`` would run it.
    """
    args = [str(a) for a in args]
    if preamble:
        code = (preamble + "\nimport runpy, sys\n"
                f"sys.argv = ['femur_core.{module}'] + {args!r}\n"
                f"runpy.run_module('femur_core.{module}', run_name='__main__', alter_sys=True)\n")
        cmd = [sys.executable, "-c", code]
    else:
        cmd = [sys.executable, "-m", f"femur_core.{module}", *args]
    return subprocess.run(cmd, cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=timeout, **popen)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str, code: int | None = None) -> str:
    """Non-zero exit, no traceback, stderr exactly one ``error: ...`` line holding every needle."""
    err = proc.stderr
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{err}"
    assert lines[0].startswith("error: "), lines[0]
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    assert proc.returncode != 0
    if code is not None:
        assert proc.returncode == code, (proc.returncode, err)
    return lines[0]


def leftovers(folder) -> list[Path]:
    """Temporary files of interrupted atomic writes (``.name.XXXX.part``) under ``folder``."""
    return sorted(Path(folder).rglob("*.part")) if Path(folder).exists() else []


def write_dicom_series(folder, n: int = 4, rows: int = 6, cols: int = 5, *, series_uid: str | None = None,
                       iop=(1, 0, 0, 0, 0, -1), first=(10.0, -20.0, 30.0), step: float = 4.0,
                       pixel_spacing=(0.8, 0.7), skip: tuple = (), description: str = "cor T1",
                       prefix: str = "im") -> dict:
    """Write a tiny single-frame MR series; slice k sits at ``first + k * step * normal`` (LPS mm).

    Returns the geometry written: ``series_uid``, ``iop``, ``first``, ``step``,
    ``pixel_spacing``, ``normal`` and the pixel arrays by slice index.
    """
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    row, col = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
    normal = np.cross(row, col)
    pixels = {}
    for k in range(n):
        if k in skip:
            continue
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        fname = folder / f"{prefix}{k:03d}.dcm"
        ds = FileDataset(str(fname), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID = series_uid
        ds.SeriesDescription = description
        ds.Modality = "MR"
        ds.InstanceNumber = k + 1
        ds.ImageOrientationPatient = [float(v) for v in iop]
        ds.ImagePositionPatient = [float(v) for v in np.asarray(first, float) + k * step * normal]
        ds.PixelSpacing = [float(v) for v in pixel_spacing]
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        px = (np.arange(rows * cols, dtype=np.uint16).reshape(rows, cols) + 100 * k).astype(np.uint16)
        ds.PixelData = px.tobytes()
        ds.save_as(str(fname), enforce_file_format=True)
        pixels[k] = px
    return {"series_uid": series_uid, "iop": iop, "first": np.asarray(first, float), "step": step,
            "pixel_spacing": pixel_spacing, "normal": normal, "pixels": pixels}
