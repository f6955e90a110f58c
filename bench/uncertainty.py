"""Does the per-scan uncertainty score rank scans by their actual error?

For every fold of a finished cross-validation run, predict each held-out
subject with that fold's model (``fold<k>/best.pt``; the subject was never
seen in its training), keeping the model's views apart
(:func:`femur_core.uncertainty.predict_with_views`), and compare each per-scan
score with the subject's error, 1 - DSC against its reference mask:
Spearman's rank correlation over all held-out subjects (scipy.stats.spearmanr).

Scores compared (the first is the default shown by predict, the GUI and the
report; it was chosen before this measurement):

- ``view_dsc``: 1 - mean pairwise DSC of the views' masks (femur_core.uncertainty.scan_score);
- ``disagreement_rel``: summed per-voxel disagreement / predicted femur voxels;
- ``prob_band_rel`` (no views needed, a baseline): voxels with an averaged
  probability in (0.2, 0.8) / predicted femur voxels.

Usage (inference only, about 2-4 s per subject on 2 CPU cores)::

    nice -n 10 python bench/uncertainty.py --run /work/runs/cv-base --data ../shared/data/pelvic_mri \\
        --json bench/results/uncertainty-<date>.json

The JSON holds per-subject numbers only (scores, DSC), no voxel data.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

SCORES = ("view_dsc", "disagreement_rel", "prob_band_rel")


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int(np.logical_and(a, b).sum()) / s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="finished CV run folder (splits.json, fold<k>/best.pt)")
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "pelvic_mri"))
    ap.add_argument("--json", help="write the per-subject numbers and correlations here")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)

    from scipy.stats import spearmanr

    from femur_core.inference import load_model
    from femur_core.volume_io import read_volume
    from femur_core.uncertainty import predict_with_views

    run, data = Path(args.run), Path(args.data)
    if not data.is_dir():
        print(f"skip: no data folder {data}", file=sys.stderr)
        return 0
    splits = json.loads((run / "splits.json").read_text())
    rows = []
    t_all = time.perf_counter()
    for k, subjects in enumerate(splits["folds"]):
        ckpt = run / f"fold{k}" / "best.pt"
        if not ckpt.exists():
            print(f"fold {k}: no {ckpt}, skipped", file=sys.stderr)
            continue
        model = load_model(ckpt)
        result = run / f"fold{k}" / "result.json"
        cv_dsc = {}
        if result.exists():
            cv_dsc = {s["subject"]: s["dsc"] for s in json.loads(result.read_text()).get("subjects", [])}
        for sid in subjects:
            t0 = time.perf_counter()
            image = read_volume(data / f"{sid}_image.nii.gz")
            ref = read_volume(data / f"{sid}_femur.nii.gz")
            vp = predict_with_views(model, image, device=args.device)
            mask = vp.prediction.mask.data > 0
            n_mask = max(int(mask.sum()), 1)
            prob = vp.prediction.prob.data
            row = {
                "fold": k, "subject": sid, "n_views": vp.n_views,
                "dsc": _dice(mask, ref.data), "cv_dsc": cv_dsc.get(sid),
                "view_dsc": vp.score,
                "disagreement_rel": float(vp.uncertainty.data.sum()) / n_mask,
                "prob_band_rel": float(((prob > 0.2) & (prob < 0.8)).sum()) / n_mask,
                "seconds": time.perf_counter() - t0,
            }
            rows.append(row)
            print(f"fold {k} {sid}: DSC {row['dsc']:.4f}  " + "  ".join(f"{s} {row[s]:.4f}" for s in SCORES),
                  flush=True)
    if len(rows) < 3:
        print("fewer than 3 subjects: no correlation", file=sys.stderr)
        return 1
    err = np.array([1.0 - r["dsc"] for r in rows])
    corr = {}
    for s in SCORES:
        rho, p = spearmanr([r[s] for r in rows], err)
        corr[s] = {"spearman_rho": float(rho), "p": float(p), "n": len(rows)}
        print(f"{s:17s} Spearman rho {rho:+.3f}  p {p:.3g}  n {len(rows)}")
    # exploratory: each fold has its own model (its own calibration); rank within folds, then pool
    from scipy.stats import rankdata

    within = {}
    for s in SCORES:
        xs, ys = [], []
        for k in sorted({r["fold"] for r in rows}):
            rs = [r for r in rows if r["fold"] == k]
            xs += list(rankdata([r[s] for r in rs]))
            ys += list(rankdata([1.0 - r["dsc"] for r in rs]))
        rho, p = spearmanr(xs, ys)
        within[s] = {"spearman_rho": float(rho), "p": float(p), "n": len(xs)}
        print(f"{s:17s} within-fold ranks pooled: rho {rho:+.3f}  p {p:.3g}")
    out = {"run": str(run), "data": str(data), "rows": rows, "spearman_vs_1_minus_dsc": corr,
           "within_fold_ranks_pooled": within,
           "minutes": (time.perf_counter() - t_all) / 60, "command": " ".join(["python", *sys.argv])}
    if args.json:
        from femur_core.volume_io import write_json
        write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
