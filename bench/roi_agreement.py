"""Does restricting the later views to the first view's region of interest change the masks?

For every subject of a data folder, predict the scan with a trained model twice
(:func:`femur_core.inference.predict_views`, the pipeline of ``predict`` and
Segment Femur): every view over the whole volume (``roi=False``), and the views
after the first over the first view's ROI only (``roi=True``,
:mod:`femur_core.roi`). Reports per subject: the box's share of the model-grid
volume, the largest probability difference, the DSC of the two masks (the
agreement), each mask's DSC against the reference mask, and the network time
of both (in this process, not a timing benchmark: see bench/predict_time.py). The
masks are the model's own (cleanup: one component per hip side); the agreement is
also given without cleanup (``predict --no-cleanup``), where stray specks outside the
box keep the first view's probability.

The default model was trained on all these subjects, so its DSC against the
references is not an accuracy estimate; the point is the difference between
the two ways.

    nice -n 10 python bench/roi_agreement.py --model /work/runs/final-crop \\
        [--data ../shared/data/pelvic_mri] [--out bench/results]

Writes ``roi-agreement-<date>.json`` (per-subject numbers only, no voxel data).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int(np.logical_and(a, b).sum()) / s


def _one(model, image, roi: bool, device: str) -> tuple:
    """(prediction, ScanViews, seconds) of one way."""
    from femur_core.inference import predict_views

    flip, cleanup, thr = model.options()
    t0 = time.perf_counter()
    run = predict_views(model, image, flip_tta=flip, device=device, roi=roi)
    sec = time.perf_counter() - t0
    return run.prediction(thr, cleanup), run, sec


def subject_row(model, sid: str, data: Path, device: str) -> dict:
    """The numbers of one subject, both ways."""
    from femur_core.roi import box_fraction
    from femur_core.volume_io import read_volume

    image = read_volume(data / f"{sid}_image.nii.gz")
    ref = read_volume(data / f"{sid}_femur.nii.gz").data
    full, _, t_full = _one(model, image, False, device)
    part, run, t_roi = _one(model, image, True, device)
    box = run.roi
    m_full, m_roi = full.mask.data, part.mask.data
    raw_full, raw_roi = full.mask_at(cleanup=False).data, part.mask_at(cleanup=False).data
    return {
        "subject": sid, "grid_zyx": list(run.prepared.image.shape),
        "box": None if box is None else [[s.start, s.stop] for s in box],
        "box_fraction": 1.0 if box is None else box_fraction(box, run.prepared.image.shape),
        "max_abs_prob_diff": float(np.max(np.abs(full.prob_canonical - part.prob_canonical))),
        "mask_voxels_differing": int(np.count_nonzero((m_full > 0) != (m_roi > 0))),
        "dsc_roi_vs_full": _dice(m_roi, m_full),
        "dsc_ref_full": _dice(m_full, ref), "dsc_ref_roi": _dice(m_roi, ref),
        "no_cleanup_dsc_roi_vs_full": _dice(raw_roi, raw_full),
        "no_cleanup_voxels_differing": int(np.count_nonzero((raw_full > 0) != (raw_roi > 0))),
        "views_s_full": t_full, "views_s_roi": t_roi,
    }


def _summary(rows: list[dict]) -> dict:
    out = {}
    for k in ("dsc_roi_vs_full", "no_cleanup_dsc_roi_vs_full", "dsc_ref_full", "dsc_ref_roi", "box_fraction", "max_abs_prob_diff",
              "views_s_full", "views_s_roi"):
        vals = [r[k] for r in rows]
        out[k] = {"min": min(vals), "mean": statistics.fmean(vals), "max": max(vals)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="trained model (file or folder)")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "pelvic_mri"))
    ap.add_argument("--subjects", help="comma-separated ids (default: every subject of --data)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    data = Path(args.data)
    if not data.is_dir():
        print(f"skip: no data folder {data}", file=sys.stderr)
        return 0
    from femur_core.data import find_subjects
    from femur_core.inference import load_model

    model = load_model(args.model)
    ids = args.subjects.split(",") if args.subjects else [s.id for s in find_subjects(data)]
    rows = []
    for sid in ids:
        r = subject_row(model, sid, data, args.device)
        rows.append(r)
        print(f"{sid}: box {r['box_fraction']:.3f} of the volume, DSC roi/full {r['dsc_roi_vs_full']:.4f} "
              f"({r['mask_voxels_differing']} voxels differ, max prob diff {r['max_abs_prob_diff']:.3f}), "
              f"without cleanup {r['no_cleanup_dsc_roi_vs_full']:.4f} ({r['no_cleanup_voxels_differing']} voxels); "
              f"vs reference full {r['dsc_ref_full']:.4f} roi {r['dsc_ref_roi']:.4f}; "
              f"views {r['views_s_full']:.1f} s -> {r['views_s_roi']:.1f} s", flush=True)
    summ = _summary(rows)
    for k, v in summ.items():
        print(f"{k:20s} min {v['min']:.4f}  mean {v['mean']:.4f}  max {v['max']:.4f}")
    res = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "model": str(args.model), "data": str(data),
           "members": len(model.members), "flip_tta": model.flip_tta, "threshold": model.threshold,
           "rows": rows, "summary": summ, "command": " ".join(["python", *sys.argv])}
    from femur_core.volume_io import write_json
    path = write_json(Path(args.out) / f"roi-agreement-{time.strftime('%Y%m%d-%H%M%S')}.json", res)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
