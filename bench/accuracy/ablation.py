"""Ablation table of accuracy directions, from cross-validation run folders on the same folds.

Each row is one ``python -m femur_core.cv`` run folder (same ``splits.json``: give the runs the
same ``--fold-seed``), scored as the CV scored it (``metrics.csv`` via ``report.json``: per
subject on its own grid). Ensemble rows average, per fold, the probabilities of the listed
runs' fold models on that fold's held-out subjects (none of the models saw them), with the
mean of the members' own thresholds (each chosen on its run's early-stopping subjects) and the
usual cleanup; the subjects are then scored the same way.

    python bench/accuracy/ablation.py --data ../shared/data/pelvic_mri \\
        --run base=runs/cv-base --run aug=runs/cv-aug --run 5sl=runs/cv-5sl \\
        --ensemble base+aug+5sl --ensemble base+aug [--baseline base] [--out bench/results]

``--threshold 0.5`` scores every row, single runs too, at one common threshold instead: the
thresholds the CV picks on its 2-3 early-stopping subjects per fold are noisy (they moved a
row's mean DSC by up to 0.01), and a comparison of probabilities should not carry that noise.
Rows whose runs lack some folds are scored on the folds they have (paired gains then omitted).

Prints the table (mean +- sd over subjects of DSC, precision, recall, HD95, ASSD; lowest subject;
subjects below 0.90; epochs and minutes per fold; paired difference against the baseline row)
and writes it as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from femur_core.volume_io import write_json
from femur_core.data import find_subjects, load_subjects
from femur_core.inference import Prediction, load_model, predict_volume
from femur_core.metrics import evaluate

COLS = ("dsc", "precision", "recall", "hd95_mm", "assd_mm")


def _run_rows(run: Path) -> tuple[dict[str, dict], list[dict]]:
    folds = [json.loads(p.read_text()) for p in sorted(run.glob("fold*/result.json"))]
    rows = {s["subject"]: {c: s[c] for c in COLS} for f in folds for s in f["subjects"]}
    return rows, folds


def _ensemble_rows(runs: list[Path], subjects: dict, flip_tta: bool = True, threshold: float | None = None,
                   cache: dict | None = None) -> tuple[dict[str, dict], dict]:
    """Average the runs' fold models on each fold's held-out subjects and score them.

    ``threshold`` None: the mean of the members' own thresholds; a number: that one for every
    fold (rows then differ in their probabilities only). Folds that some run lacks (a run
    stopped early) are left out. ``cache`` keeps each (run, fold, subject) probability map.
    """
    splits = [json.loads((r / "splits.json").read_text())["folds"] for r in runs]
    if any(s != splits[0] for s in splits):
        raise SystemExit(f"runs {', '.join(map(str, runs))} do not share their folds (use the same --fold-seed)")
    cache = {} if cache is None else cache
    rows, info = {}, {"thresholds": []}
    for k, test_ids in enumerate(splits[0]):
        files = [r / f"fold{k}" / "model.pt" for r in runs]
        if not all(f.exists() for f in files):
            continue
        models = [load_model(f) for f in files]
        thr = float(np.mean([m.threshold for m in models])) if threshold is None else float(threshold)
        info["thresholds"].append(thr)
        for sid in test_ids:
            s = subjects[sid]
            probs = []
            for f, m in zip(files, models):
                key = (str(f), sid, flip_tta)
                if key not in cache:
                    cache[key] = predict_volume(m, s.image, flip_tta=flip_tta, cleanup=True).prob
                probs.append(cache[key])
            mean = probs[0].with_data(np.mean([p.data for p in probs], axis=0).astype(np.float32))
            pred = Prediction.from_probability(mean, s.image, threshold=thr, cleanup=True)
            m = evaluate(pred.mask.data > 0, s.mask.data > 0, s.image.spacing)
            rows[sid] = {c: m.to_dict()[c] for c in COLS}
    return rows, info


def _summary(rows: dict[str, dict], base: dict[str, dict] | None) -> dict:
    ids = sorted(rows)
    out = {"n": len(ids)}
    for c in COLS:
        v = np.array([rows[i][c] for i in ids], dtype=float)
        out[c] = [float(np.nanmean(v)), float(np.nanstd(v, ddof=1))]
    d = np.array([rows[i]["dsc"] for i in ids])
    out["lowest"] = [ids[int(np.argmin(d))], float(d.min())]
    out["below_0.90"] = int((d < 0.90).sum())
    if base is not None and set(ids) <= set(base):
        diff = np.array([rows[i]["dsc"] - base[i]["dsc"] for i in ids])
        out["paired_dsc_gain"] = [float(diff.mean()), float(diff.std(ddof=1))]
        out["better_subjects"] = int((diff > 0).sum())
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--run", action="append", default=[], metavar="NAME=RUN_DIR")
    ap.add_argument("--ensemble", action="append", default=[], metavar="NAME+NAME...")
    ap.add_argument("--baseline", help="row the paired differences refer to (default: the first run)")
    ap.add_argument("--threshold", type=float, help="score every row, single runs too, at this one threshold "
                    "(re-predicted; without it a run is scored as its CV scored it, at its own thresholds)")
    ap.add_argument("--note", default="", help="protocol note stored with the results")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "results"))
    args = ap.parse_args(argv)
    runs = dict(item.split("=", 1) for item in args.run)
    if not runs:
        ap.error("give at least one --run NAME=RUN_DIR")
    if not Path(args.data).exists():
        print(f"skip: {args.data} not found (the real data is needed)")
        return 0
    subjects = {s.id: s for s in load_subjects(find_subjects(args.data))}
    table, details = {}, {}
    cache: dict = {}
    for name, d in runs.items():
        rows, folds = _run_rows(Path(d))
        if args.threshold is not None:
            rows, _ = _ensemble_rows([Path(d)], subjects, threshold=args.threshold, cache=cache)
        table[name] = rows
        details[name] = {"run": str(d), "epochs_per_fold": [f["epochs"] for f in folds],
                         "train_minutes_per_fold": [round(f["train_minutes"], 2) for f in folds],
                         "thresholds": [f["threshold"] for f in folds],
                         "config": json.loads((Path(d) / "config.json").read_text()).get("train")}
    for spec in args.ensemble:
        names = spec.split("+")
        t0 = time.perf_counter()
        rows, info = _ensemble_rows([Path(runs[n]) for n in names], subjects, threshold=args.threshold, cache=cache)
        table[f"ensemble({spec})"] = rows
        details[f"ensemble({spec})"] = {**info, "members": names, "score_seconds": time.perf_counter() - t0}
    base_name = args.baseline or next(iter(runs))
    summary = {name: _summary(rows, None if name == base_name else table[base_name]) for name, rows in table.items()}
    res = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "note": args.note, "baseline": base_name,
           "threshold": args.threshold if args.threshold is not None else "each run's own",
           "summary": summary, "details": details, "per_subject": table}
    path = write_json(Path(args.out) / f"ablation-accuracy-{time.strftime('%Y%m%d-%H%M')}.json", res, indent=2)
    head = f"{'row':34s} {'DSC':>13s} {'prec':>6s} {'recall':>6s} {'HD95 mm':>11s} {'ASSD':>5s} {'lowest':>13s} <0.90 {'paired gain (better)':>22s}"
    print(head)
    print("-" * len(head))
    for name, s in summary.items():
        gain = (f"{s['paired_dsc_gain'][0]:+.4f}+-{s['paired_dsc_gain'][1]:.4f} ({s['better_subjects']}/{s['n']})"
                if "paired_dsc_gain" in s else "(baseline)")
        print(f"{name:34s} {s['dsc'][0]:.3f}+-{s['dsc'][1]:.3f} {s['precision'][0]:6.3f} {s['recall'][0]:6.3f} "
              f"{s['hd95_mm'][0]:5.2f}+-{s['hd95_mm'][1]:4.2f} {s['assd_mm'][0]:5.2f} "
              f"{s['lowest'][0]:>6s} {s['lowest'][1]:.3f} {s['below_0.90']:5d} {gain:>22s}")
    for name, d in details.items():
        if "epochs_per_fold" in d:
            print(f"{name}: epochs per fold {d['epochs_per_fold']}, minutes per fold {d['train_minutes_per_fold']}")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
