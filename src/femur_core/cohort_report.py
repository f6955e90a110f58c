"""One HTML page to review a cohort of predictions: ``python -m femur_core.cohort_report PRED_DIR``.

Reads the measurements table ``femur_measurements.csv`` that
``python -m femur_core.predict`` appends to (the last row of each scan), and
for each scan its image (the ``input`` column) and label map
(``<scan>_sides.nii.gz``, else ``<scan>_mask.nii.gz``). Writes one
self-contained page (thumbnails embedded as PNG data) with, per scan, a
montage of coronal slices with the right (orange) and left (purple) femur
outlines, the volumes, the threshold, the model and the uncertainty score.
Scans come worst first: no femur found, then a femur volume far from the
cohort's, then by decreasing uncertainty score, so a reviewer can stop
reading when the scans start looking fine.
"""

from __future__ import annotations

import argparse
import base64
import html
import io as _io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .analysis import LEFT, RIGHT, read_csv_rows
from .errors import FemurError, InputError
from .volume_io import atomic_write_bytes, read_volume
from .volume import Volume, to_canonical

__all__ = ["ScanEntry", "cohort_entries", "montage_png", "write_cohort_report", "main"]

#: Outline colours of the right and left femur (also the CSV's and the napari layer's order).
SIDE_COLOURS = {RIGHT: "#e69f00", LEFT: "#cc79a7"}  # the plugin's prediction colours


def _float(v: str | None) -> float:
    try:
        return float(v) if v not in (None, "") else math.nan
    except ValueError:
        return math.nan


@dataclass
class ScanEntry:
    """One row of the report."""

    row: dict
    flags: list[str] = field(default_factory=list)
    severity: int = 0

    @property
    def scan(self) -> str:
        return self.row["scan"]

    @property
    def uncertainty(self) -> float:
        return _float(self.row.get("uncertainty"))


def cohort_entries(rows: list[dict], outlier_mads: float = 3.5) -> list[ScanEntry]:
    """Rows with their flags, sorted worst first.

    A femur is a volume outlier when it lies more than ``outlier_mads`` robust
    standard deviations (1.4826 x median absolute deviation) from the median of
    all femurs of the cohort (needs 5 femurs or more).
    """
    vols = [_float(r.get(k)) for r in rows for k in ("right_ml", "left_ml") if _float(r.get(k)) > 0]
    med = float(np.median(vols)) if vols else math.nan
    mad = 1.4826 * float(np.median(np.abs(np.asarray(vols) - med))) if vols else math.nan
    entries = []
    for r in rows:
        e = ScanEntry(dict(r))
        if r.get("femurs") in ("none", "", None):
            e.flags.append("no femur found")
            e.severity = 2
        if len(vols) >= 5 and mad > 0:
            for side in ("right", "left"):
                v = _float(r.get(f"{side}_ml"))
                if v > 0 and abs(v - med) > outlier_mads * mad:
                    e.flags.append(f"{side} femur {v:.0f} mL (cohort median {med:.0f} mL)")
                    e.severity = max(e.severity, 1)
        if r.get("femurs") in ("right", "left"):
            e.flags.append(f"one femur ({r['femurs']})")
        entries.append(e)

    def key(e: ScanEntry):
        u = e.uncertainty
        return (-e.severity, 0 if np.isfinite(u) else 1, -(u if np.isfinite(u) else 0.0), e.scan)

    return sorted(entries, key=key)


def _pick_slices(lab: np.ndarray, n: int, unc: np.ndarray | None) -> tuple[list[int], int | None]:
    """Up to ``n`` coronal slices (axis 0) spread over the femur, and the most uncertain slice."""
    per = (lab > 0).sum(axis=(1, 2))
    idx = np.flatnonzero(per)
    worst = None
    if unc is not None and float(unc.sum()) > 0:
        worst = int(np.argmax(unc.sum(axis=(1, 2))))
    if idx.size == 0:
        picks = list(np.linspace(0, lab.shape[0] - 1, n).round().astype(int))
    else:
        picks = list(np.unique(np.quantile(idx, np.linspace(0.15, 0.85, n)).round().astype(int)))
    if worst is not None and worst not in picks:
        picks[int(np.argmin([abs(p - worst) for p in picks]))] = worst
    return sorted(set(int(p) for p in picks)), worst


def montage_png(image: Volume, labels: Volume, uncertainty: Volume | None = None, n: int = 4,
                margin_mm: float = 25.0, height_px: int = 260) -> bytes:
    """PNG bytes of ``n`` coronal slices (radiological view) with the femur outlines.

    The in-plane view is cropped to the femurs plus ``margin_mm``; slices are
    spread over the femur, one of them the most uncertain (its title says so).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    img_c, _ = to_canonical(image)
    lab_c = to_canonical(labels)[0].data
    unc_c = to_canonical(uncertainty)[0].data if uncertainty is not None else None
    sp = img_c.spacing  # (slice, row = inferior, column = patient left)
    picks, worst = _pick_slices(lab_c, n, unc_c)
    if (lab_c > 0).any():
        nz = np.argwhere(lab_c > 0)
        lo = np.maximum(nz.min(axis=0)[1:] - (margin_mm / np.asarray(sp[1:])).astype(int), 0)
        hi = np.minimum(nz.max(axis=0)[1:] + 1 + (margin_mm / np.asarray(sp[1:])).astype(int), lab_c.shape[1:])
    else:
        lo, hi = np.zeros(2, int), np.asarray(lab_c.shape[1:])
    rows, cols = slice(lo[0], hi[0]), slice(lo[1], hi[1])
    vals = img_c.data[:, rows, cols]
    vmin, vmax = (float(np.percentile(vals, 1)), float(np.percentile(vals, 99.5))) if vals.size else (0.0, 1.0)
    h_mm, w_mm = (hi[0] - lo[0]) * sp[1], (hi[1] - lo[1]) * sp[2]
    panel_w = max(0.6, w_mm / max(h_mm, 1e-6))
    ncols = len(picks) if panel_w * len(picks) <= 9 else max(1, int(np.ceil(len(picks) / 2)))
    nrows = int(np.ceil(len(picks) / ncols))
    dpi = 100
    fig = Figure(figsize=(panel_w * ncols * height_px / dpi, nrows * (height_px / dpi + 0.3)), dpi=dpi)
    for i, z in enumerate(picks):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        ax.imshow(img_c.data[z, rows, cols], cmap="gray", vmin=vmin, vmax=max(vmax, vmin + 1e-6),
                  aspect=sp[1] / sp[2], interpolation="bilinear")
        for k, colour in SIDE_COLOURS.items():
            m = lab_c[z, rows, cols] == k
            if m.any():
                ax.contour(m.astype(np.float32), levels=[0.5], colors=[colour], linewidths=1.5)
        ax.set_title(f"slice {z}" + (" (most uncertain)" if z == worst else ""), fontsize=9 * max(1.0, panel_w * ncols / 3),
                     color="#b00020" if z == worst else "black", pad=2)
        ax.set_axis_off()
    fig.subplots_adjust(left=0.005, right=0.995, bottom=0.005, top=1 - 0.3 / (height_px / dpi + 0.3) / nrows,
                        wspace=0.02, hspace=0.12)
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:16px;color:#222}
h1{font-size:20px;margin:0 0 4px} p.sub{color:#555;margin:0 0 12px;font-size:13px}
table{border-collapse:collapse;width:100%} th,td{border-bottom:1px solid #ddd;padding:4px 6px;
text-align:left;vertical-align:top;font-size:13px} th{background:#f3f3f3;position:sticky;top:0}
td.num{text-align:right;font-variant-numeric:tabular-nums} .flag{color:#b00020;font-weight:600}
.note{color:#555} img{display:block;max-width:100%;height:auto} td.thumb{width:62%} .rank{color:#888}
.key span{display:inline-block;width:12px;height:3px;margin:0 4px 3px 8px;vertical-align:middle}
"""


def _cell(v: object, num: bool = False) -> str:
    return f"<td{' class=num' if num else ''}>{html.escape(str(v))}</td>"


def write_cohort_report(pred_dir: "str | os.PathLike", *, csv_path: "str | os.PathLike | None" = None,
                        out_path: "str | os.PathLike | None" = None, slices: int = 4) -> Path:
    """Write the cohort page of a prediction folder; returns its path (default ``PRED_DIR/report.html``).

    Raises
    ------
    InputError
        No measurements table, or it holds no scan.
    """
    d = Path(pred_dir)
    csv_p = Path(csv_path) if csv_path else d / "femur_measurements.csv"
    if not csv_p.is_file():
        raise InputError(csv_p, "no measurements table (run python -m femur_core.predict ... --out "
                                f"{d} first)")
    rows = read_csv_rows(csv_p)
    if not rows:
        raise InputError(csv_p, "the measurements table holds no scan")
    entries = cohort_entries(rows)
    body = []
    for rank, e in enumerate(entries, 1):
        r = e.row
        try:
            labels_p = d / f"{e.scan}_sides.nii.gz"
            labels = read_volume(labels_p if labels_p.exists() else d / f"{e.scan}_mask.nii.gz")
            image = read_volume(r["input"])
            unc_p = d / f"{e.scan}_uncertainty.nii.gz"
            unc = read_volume(unc_p) if unc_p.exists() else None
            png = base64.b64encode(montage_png(image, labels, unc, n=slices)).decode("ascii")
            thumb = f'<img alt="{html.escape(e.scan)} coronal slices" src="data:image/png;base64,{png}">'
        except (FemurError, OSError, ValueError) as exc:
            thumb = f'<span class="flag">no thumbnail: {html.escape(str(exc))}</span>'
        unc_txt = f"{e.uncertainty:.4f}" if np.isfinite(e.uncertainty) else "–"
        flags = "".join(f'<div class="{"flag" if e.severity or "femur found" in f else "note"}">'
                        f"{html.escape(f)}</div>" for f in e.flags)
        body.append(
            "<tr>" + f'<td class="rank">{rank}</td>' + f"<td><b>{html.escape(e.scan)}</b>{flags}</td>"
            + _cell(unc_txt, True) + _cell(r.get("right_ml", ""), True) + _cell(r.get("left_ml", ""), True)
            + _cell(f"{r.get('right_voxels', '')} / {r.get('left_voxels', '')}", True)
            + _cell(r.get("threshold", ""), True) + f'<td class="thumb">{thumb}</td></tr>')
    models = sorted({r.get("model", "") for r in rows if r.get("model")})
    page = (
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
        f"<title>Femur segmentation review: {html.escape(d.name)}</title><style>{_CSS}</style></head><body>"
        f"<h1>Femur segmentation review: {len(entries)} scans</h1>"
        f'<p class="sub">{html.escape(str(d))} &middot; model: {html.escape(", ".join(models) or "?")} &middot; '
        "worst first (no femur, a femur volume far from the cohort's, then by uncertainty: 1 - mean "
        'pairwise DSC of the model\'s views) &middot; coronal slices, radiological view <span class="key">'
        f'<span style="background:{SIDE_COLOURS[RIGHT]}"></span>right femur'
        f'<span style="background:{SIDE_COLOURS[LEFT]}"></span>left femur</span></p>'
        "<table><thead><tr><th>#</th><th>scan</th><th>uncertainty</th><th>right mL</th><th>left mL</th>"
        "<th>voxels R / L</th><th>threshold</th><th>coronal slices</th></tr></thead><tbody>"
        + "".join(body) + "</tbody></table></body></html>"
    )
    out = Path(out_path) if out_path else d / "report.html"
    return atomic_write_bytes(out, page.encode("utf-8"), overwrite=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m femur_core.cohort_report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pred_dir", help="the --out folder of python -m femur_core.predict")
    ap.add_argument("--csv", help="measurements table (default: PRED_DIR/femur_measurements.csv)")
    ap.add_argument("--out", help="HTML file to write (default: PRED_DIR/report.html)")
    ap.add_argument("--slices", type=int, default=4, help="coronal slices per scan (default 4)")
    args = ap.parse_args(argv)
    print(write_cohort_report(args.pred_dir, csv_path=args.csv, out_path=args.out, slices=args.slices))
    return 0


if __name__ == "__main__":
    from .cli import run_main

    run_main(main)
