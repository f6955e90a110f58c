"""Compare ensemble models by the out-of-fold DSC that ``train`` stored in them.

An ensemble trained by ``python -m femur_core.train --ensemble k`` keeps, in its ``model.pt``,
the DSC of every subject as predicted by the one member that never trained on it (at the
threshold chosen on all those predictions): an honest k-fold estimate of one member. This
script reads those figures from several model folders trained on the same subjects and prints,
per model, the mean +- sd, lowest subject, subjects below 0.90, epochs and minutes per member,
and, against the first model, the paired per-subject difference (no prediction is rerun)::

    python bench/accuracy/oof_compare.py runs/s15/k3 runs/s15/k5 runs/s15/k3-12mm [--out bench/results]

The members of different models are trained on different folds, so a paired difference carries
the fold assignment as well as the setting; read gains under about 0.005 as noise at 15 subjects.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from femur_core.volume_io import write_json
from femur_core.checkpoint import load_checkpoint


def read_model(folder: str) -> dict:
    """Out-of-fold scores, threshold and member summaries stored in ``folder/model.pt``."""
    path = Path(folder)
    path = path / "model.pt" if path.is_dir() else path
    payload = load_checkpoint(path)
    if not payload.get("out_of_fold_json"):
        raise SystemExit(f"{path}: no out-of-fold scores (a one-network model, or trained before they were stored)")
    oof = json.loads(payload["out_of_fold_json"])
    members = json.loads(payload.get("members_json") or "[]")
    return {"model": str(path), "threshold": float(payload.get("threshold", float("nan"))),
            "dsc": {o["subject"]: float(o["dsc"]) for o in oof},
            "epochs": [m.get("epochs") for m in members],
            "minutes": [round(float(m.get("minutes", float("nan"))), 1) for m in members],
            "train_subjects": [len(m.get("train", [])) for m in members]}


def summarize(row: dict, base: dict | None) -> dict:
    """Mean, sd, lowest and the paired difference to ``base`` over their common subjects."""
    d = row["dsc"]
    v = np.array(list(d.values()))
    out = {"n": len(v), "mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
           "lowest": min(d, key=d.get), "lowest_dsc": float(v.min()), "below_0.90": int((v < 0.9).sum())}
    if base is not None and base is not row:
        common = sorted(set(d) & set(base["dsc"]))
        g = np.array([d[s] - base["dsc"][s] for s in common])
        out.update(paired_n=len(common), paired_mean=float(g.mean()),
                   paired_sd=float(g.std(ddof=1)) if len(g) > 1 else 0.0, paired_better=int((g > 0).sum()))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="model folders (or model.pt files); the first is the baseline")
    ap.add_argument("--out", help="folder for a JSON of the comparison")
    a = ap.parse_args(argv)
    rows = [read_model(m) for m in a.models]
    for row in rows:
        row["summary"] = summarize(row, rows[0])
        s = row["summary"]
        gain = (f"{s['paired_mean']:+.4f} +- {s['paired_sd']:.4f} ({s['paired_better']}/{s['paired_n']} better)"
                if "paired_mean" in s else "(baseline)")
        print(f"{row['model']}: OOF DSC {s['mean']:.4f} +- {s['sd']:.4f} (n {s['n']}), lowest {s['lowest']} "
              f"{s['lowest_dsc']:.4f}, < 0.90: {s['below_0.90']}, threshold {row['threshold']:.3f}, members train on "
              f"{row['train_subjects']} subjects, epochs {row['epochs']}, minutes {row['minutes']}; paired {gain}")
    if a.out:
        f = write_json(Path(a.out) / f"oof-compare-{time.strftime('%Y%m%d-%H%M%S')}.json",
                       {"models": rows, "command": " ".join(sys.argv)})
        print(f"wrote {f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
