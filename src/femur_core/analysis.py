"""Per-femur analysis of a segmentation: right / left label map and volumes.

A predicted mask holds one or two femurs. :func:`side_labels` splits it into a
label map with :data:`RIGHT` (1) for the subject's right femur and
:data:`LEFT` (2) for the left one. The side comes from the scan's affine in
patient (RAS+) coordinates, never from the array order, so a scan stored
flipped, transposed, oblique or with thick slices gets the same answer:

- two femurs (two large components far apart along the patient's left-right
  axis): the one at larger RAS x (towards the patient's right) is the right
  femur; any further small component takes the side of the nearer femur;
- one femur (a single-hip scan): the top of the femoral head lies *medial* to
  the bone's centre, so the direction from the head top to the centre along
  the patient's left-right axis points laterally: towards RAS +x for a right
  femur, -x for a left one (:func:`side_from_shape`).

:func:`measure` gives the voxel count and volume (mL) per label, and
:func:`append_csv_rows` appends rows to a CSV file that several processes
(prediction shards) may share, under a file lock.
"""

from __future__ import annotations

import csv
import io as _io
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from .errors import InputError
from .volume import Volume

__all__ = [
    "RIGHT",
    "LEFT",
    "LABEL_NAMES",
    "FemurMeasure",
    "side_labels",
    "side_from_shape",
    "voxel_volume_mm3",
    "measure",
    "MEASUREMENT_FIELDS",
    "measurement_row",
    "append_csv_rows",
    "check_csv_header",
    "read_csv_rows",
]

#: Label of the subject's right femur in the label map.
RIGHT = 1
#: Label of the subject's left femur in the label map.
LEFT = 2
#: Names of the labels (napari shows them; the CSV uses the side words).
LABEL_NAMES: dict[int, str] = {0: "background", RIGHT: "right femur", LEFT: "left femur"}
_SIDE_WORD = {RIGHT: "right", LEFT: "left"}


def _world(affine: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """(N, 3) voxel indices -> (N, 3) RAS+ mm."""
    a = np.asarray(affine, dtype=float)
    return idx @ a[:3, :3].T + a[:3, 3]


def voxel_volume_mm3(affine: np.ndarray) -> float:
    """Volume of one voxel in mm^3 (|det| of the affine's 3 x 3 part; right for sheared grids too)."""
    return float(abs(np.linalg.det(np.asarray(affine, dtype=float)[:3, :3])))


def side_from_shape(points_ras: np.ndarray, top_fraction: float = 0.05) -> tuple[int, float]:
    """Side of a single proximal femur from its shape: the head is medial.

    The most superior voxels of a proximal femur are the top of the femoral
    head, which lies medial to the bone's centre (the neck, trochanters and
    shaft lie lateral to it). The centre minus the head top, along the
    patient's left-right axis, points laterally: RAS +x for a right femur.
    On the 30 femurs of the 15 development scans and 40 synthetic single-hip
    femurs this gave the right side every time, with ``|offset_mm|`` of
    13.6 mm or more (bench/README.md, "Left and right").

    Parameters
    ----------
    points_ras : numpy.ndarray
        (N, 3) RAS+ mm coordinates of the femur's voxels.
    top_fraction : float
        Fraction of the voxels, the most superior ones, taken as the head top.

    Returns
    -------
    (label, offset_mm)
        :data:`RIGHT` or :data:`LEFT`, and the signed offset (RAS x, mm) from
        the head top to the bone's centre: positive for a right femur. A small
        ``|offset_mm|`` (a few mm) means the shape says little.
    """
    p = np.asarray(points_ras, dtype=float)
    z = p[:, 2]
    top = z >= np.quantile(z, 1.0 - top_fraction)
    offset = float(p[:, 0].mean() - p[top, 0].mean())
    return (RIGHT if offset > 0 else LEFT), offset


def side_labels(mask: Volume, *, min_separation_mm: float = 50.0, min_fraction: float = 0.2) -> Volume:
    """Label map of a femur mask: :data:`RIGHT` (1) and :data:`LEFT` (2), from patient coordinates.

    Parameters
    ----------
    mask : Volume
        Binary femur mask (any orientation, spacing, oblique affine).
    min_separation_mm : float
        Two components count as two femurs when their centres lie at least this
        far apart along the patient's left-right axis (femoral heads lie about
        15-20 cm apart; parts of one femur lie within a few cm).
    min_fraction : float
        ... and the second holds at least this fraction of the largest one's voxels.

    Returns
    -------
    Volume
        uint8 label map on the mask's grid. ``meta["side_method"]`` is
        ``"pair"`` (two femurs), ``"shape"`` (one femur, head-top-to-centre
        direction; ``meta["shape_offset_mm"]`` gives its strength) or
        ``"empty"``; ``meta["labels"]`` lists the labels present.
    """
    m = np.asarray(mask.data) > 0
    out = np.zeros(m.shape, np.uint8)
    lab, n = ndimage.label(m, structure=np.ones((3, 3, 3), bool))
    meta: dict = {"label_names": {str(k): v for k, v in LABEL_NAMES.items()}}
    if n == 0:
        return mask.with_data(out, side_method="empty", labels=[], **meta)
    sizes = np.bincount(lab.ravel())[1:].astype(float)
    idx_sum = np.stack([np.bincount(lab.ravel(), weights=g.ravel())[1:]
                        for g in np.indices(m.shape, dtype=np.float32)], axis=1)
    centres = _world(mask.affine, idx_sum / sizes[:, None])  # the affine is linear: centroid maps exactly
    first = int(np.argmax(sizes))
    far = [i for i in range(n) if i != first and sizes[i] >= min_fraction * sizes[first]
           and abs(centres[i, 0] - centres[first, 0]) >= min_separation_mm]
    if far:
        second = max(far, key=lambda i: sizes[i])
        mid = 0.5 * (centres[first, 0] + centres[second, 0])
        side = np.where(centres[:, 0] > mid, RIGHT, LEFT).astype(np.uint8)
        extra = {"side_method": "pair"}
    else:
        pts = _world(mask.affine, np.argwhere(lab == first + 1).astype(float))
        label, offset = side_from_shape(pts)
        side = np.full(n, label, np.uint8)
        extra = {"side_method": "shape", "shape_offset_mm": round(offset, 2)}
    lut = np.concatenate([[0], side]).astype(np.uint8)
    out = lut[lab]
    present = sorted(int(v) for v in np.unique(side))
    return mask.with_data(out, labels=present, **extra, **meta)


@dataclass(frozen=True)
class FemurMeasure:
    """Size of one femur of a label map."""

    label: int
    side: str
    voxels: int
    volume_ml: float


def measure(labels: Volume) -> list[FemurMeasure]:
    """Voxel count and volume (mL) of every femur label present (right first)."""
    data = np.asarray(labels.data)
    vox_ml = voxel_volume_mm3(labels.affine) / 1000.0
    counts = np.bincount(data.ravel().astype(np.int64), minlength=LEFT + 1)
    return [FemurMeasure(k, _SIDE_WORD[k], int(counts[k]), float(counts[k] * vox_ml))
            for k in (RIGHT, LEFT) if counts[k] > 0]


#: Columns of the measurements CSV (one row per scan).
MEASUREMENT_FIELDS: tuple[str, ...] = (
    "scan", "input", "femurs", "right_ml", "right_voxels", "left_ml", "left_voxels", "total_ml",
    "total_voxels", "side_method", "voxel_mm3", "threshold", "model", "uncertainty", "written_utc",
)


def measurement_row(scan: str, labels: Volume, *, input_path: str = "", threshold: float | None = None,
                    model: str = "", uncertainty: float | None = None, written_utc: str = "") -> dict:
    """One CSV row (:data:`MEASUREMENT_FIELDS`) for one scan's label map."""
    ms = {m.side: m for m in measure(labels)}
    vox_mm3 = voxel_volume_mm3(labels.affine)

    def f(v: float | None, nd: int) -> str:
        return "" if v is None or not np.isfinite(v) else f"{v:.{nd}f}"

    tot = sum(m.voxels for m in ms.values())
    return {
        "scan": scan, "input": input_path,
        "femurs": "+".join(s for s in ("right", "left") if s in ms) or "none",
        "right_ml": f(ms["right"].volume_ml, 3) if "right" in ms else "0.000",
        "right_voxels": ms["right"].voxels if "right" in ms else 0,
        "left_ml": f(ms["left"].volume_ml, 3) if "left" in ms else "0.000",
        "left_voxels": ms["left"].voxels if "left" in ms else 0,
        "total_ml": f(tot * vox_mm3 / 1000.0, 3), "total_voxels": tot,
        "side_method": labels.meta.get("side_method", ""), "voxel_mm3": f(vox_mm3, 4),
        "threshold": f(threshold, 4), "model": model, "uncertainty": f(uncertainty, 5),
        "written_utc": written_utc,
    }


def _header_line(fields: Sequence[str]) -> str:
    buf = _io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(fields)
    return buf.getvalue()


def check_csv_header(path: "str | os.PathLike", fields: Sequence[str] = MEASUREMENT_FIELDS) -> None:
    """Raise :class:`InputError` if ``path`` exists, is not empty and starts with another header."""
    p = Path(path)
    if not p.is_file():
        return
    try:
        with open(p, "rb") as fh:
            first = fh.readline().decode("utf-8", "replace")
    except OSError as exc:
        raise InputError(p, f"cannot read ({exc.strerror or exc})") from None
    if first and first != _header_line(fields):
        raise InputError(p, f"its header is not this table's ({', '.join(fields[:4])}, ...); choose another CSV file")


def append_csv_rows(path: "str | os.PathLike", rows: Iterable[Mapping], fields: Sequence[str] = MEASUREMENT_FIELDS,
                    timeout_s: float = 60.0) -> Path:
    """Append rows to a CSV file that other processes may append to at the same time.

    The file is locked (``filelock``, a ``<name>.lock`` file beside it) while
    the header is checked or written and the rows are appended in one write,
    flushed and synced, so concurrent shards never interleave half lines and
    exactly one header is written.

    Raises
    ------
    InputError
        The existing file's header differs from ``fields`` (another tool's or
        an older version's table: nothing is appended).
    """
    from filelock import FileLock, Timeout

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    header = _header_line(fields)
    buf = _io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fields), lineterminator="\n", extrasaction="raise")
    for r in rows:
        w.writerow(r)
    payload = buf.getvalue()
    try:
        with FileLock(str(p) + ".lock", timeout=timeout_s):
            with open(p, "a+b") as fh:  # O_APPEND: every write goes to the end
                fh.seek(0)
                first = fh.readline().decode("utf-8", "replace")
                if not first:
                    payload = header + payload
                elif first != header:
                    raise InputError(p, f"its header is not this table's ({', '.join(fields[:4])}, ...); "
                                        "choose another CSV file")
                else:
                    fh.seek(-1, os.SEEK_END)
                    if fh.read(1) != b"\n":  # a previous writer died mid-line: start a fresh line
                        payload = "\n" + payload
                fh.write(payload.encode("utf-8"))
                fh.flush()
                os.fsync(fh.fileno())
    except Timeout:
        raise InputError(p, f"could not lock it within {timeout_s:g} s (another process holds {p.name}.lock)") from None
    except OSError as exc:
        raise InputError(p, f"cannot write ({exc.strerror or exc})") from None
    return p


def read_csv_rows(path: "str | os.PathLike", latest_per_scan: bool = True) -> list[dict]:
    """Rows of a measurements CSV; by default only the last row of each scan (a rerun replaces)."""
    p = Path(path)
    try:
        with open(p, encoding="utf-8", newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if r.get("scan")]
    except OSError as exc:
        raise InputError(p, f"cannot read ({exc.strerror or exc})") from None
    if not latest_per_scan:
        return rows
    last: dict[str, dict] = {}
    for r in rows:
        last.pop(r["scan"], None)
        last[r["scan"]] = r
    return list(last.values())
