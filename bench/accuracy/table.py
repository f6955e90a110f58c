"""The accuracy table: ours vs nnU-Net v2, per fold and mean +- sd, and the results JSON.

Re-print without training, from a work folder or from a results JSON::

    .venv/bin/python bench/accuracy/table.py bench/accuracy/work/k3-b10
    .venv/bin/python bench/accuracy/table.py bench/results/accuracy-2025-01-01.json

Per-fold rows are means over the fold's held-out subjects; the mean +- sd rows are over all
subjects (pooled over folds; sample sd), as femur_core's own report does, and over folds for the
training minutes. NaN distances (an empty prediction) are left out and counted.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from femur_core.metrics import summarise
from femur_core.volume_io import write_json as _write_json_atomic

sys.path.insert(0, str(Path(__file__).resolve().parent))
import convergence  # noqa: E402  (bench/accuracy/convergence.py)

COLS = (("dsc", "DSC", 3), ("precision", "precision", 3), ("recall", "recall", 3),
        ("hd95_mm", "HD95 mm", 2), ("assd_mm", "ASSD mm", 2))
REPO = Path(__file__).resolve().parents[2]


def _machine() -> dict:
    cpu = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                timeout=5).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=REPO, capture_output=True,
                                    text=True, timeout=5).stdout.strip())
    except Exception:
        commit, dirty = None, None
    import numpy
    import torch

    return {"cpu": cpu, "cpu_count": os.cpu_count(), "memory_gib": mem, "gpu": None,
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "numpy": numpy.__version__, "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
            "git_commit": commit, "src_modified_since_commit": dirty,
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}


def _system(res: dict) -> dict:
    """Per-fold means and the pooled summary of one system's results."""
    folds = []
    for f in sorted(res["folds"], key=lambda f: f["fold"]):
        s = summarise(f["subjects"])
        folds.append({**{k: v for k, v in f.items() if k != "subjects"},
                      "n": len(f["subjects"]), "mean": {c: round(s[c]["mean"], 6) for c, _, _ in COLS},
                      "subjects": f["subjects"]})
    rows = [r for f in res["folds"] for r in f["subjects"]]
    s = summarise(rows)
    tm = [f["train_minutes"] for f in res["folds"]]
    import numpy as np

    summary = {"n_subjects": len(rows)}
    for c, _, _ in COLS:
        summary[f"{c}_mean"] = round(s[c]["mean"], 6)
        summary[f"{c}_sd"] = round(s[c]["sd"], 6)
        if s[c]["n_nan"]:
            summary[f"{c}_n_nan"] = s[c]["n_nan"]
    summary["train_minutes_mean"] = round(float(np.mean(tm)), 3)
    summary["train_minutes_sd"] = round(float(np.std(tm, ddof=1)), 3) if len(tm) > 1 else 0.0
    summary["worst_subject_dsc"] = round(min(r["dsc"] for r in rows), 6)
    return {**{k: v for k, v in res.items() if k != "folds"}, "folds": folds, "summary": summary}


def _convergence(ours: dict, peer: dict) -> dict:
    """The levelling-off rule on every fold of both systems (curves stored with each fold)."""
    curves, budgets = {}, {}
    for name, res in (("ours", ours), ("nnU-Net", peer)):
        curves[name] = {f["fold"]: f.get("curve") for f in res["folds"]}
        b = {f.get("budget_minutes") for f in res["folds"]} - {None}
        budgets[name] = b.pop() if len(b) == 1 else (res.get("budget_minutes") or max(
            f["train_minutes"] for f in res["folds"]))
    out = convergence.verdicts(curves, budgets)
    out["budget_minutes"] = budgets
    return out


def _pooled_dsc(res: dict, folds: set) -> float:
    rows = [r["dsc"] for f in res["folds"] if f["fold"] in folds for r in f["subjects"]]
    return sum(rows) / len(rows)


def build(ours: dict, peer: dict | None, meta: dict) -> dict:
    out = {"benchmark": "accuracy on real MRI (ours vs nnU-Net v2)",
           "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
           **meta, "machine": _machine(),
           "metrics": "femur_core.metrics.evaluate(pred, ref, image spacing) on each subject's original grid, "
                      "both femurs as one label; HD95 = max of the two directed 95th percentiles (MONAI); "
                      "ASSD pooled over both surfaces",
           "systems": {"ours": _system(ours)}}
    if peer is not None:
        out["systems"]["nnU-Net"] = _system(peer)
        b = out["systems"]["nnU-Net"]["summary"]
        conv = _convergence(ours, peer)
        out["convergence"] = conv
        empty = sum(1 for f in peer["folds"] for r in f["subjects"] if not r["dsc"] > 0)
        if empty:  # a peer that left masks empty did not converge: no ratio (it would only measure that)
            out["peer_status"] = (f"did not converge in {b['train_minutes_mean']:.0f} CPU-minutes per fold "
                                  f"(empty masks in {empty} of {b['n_subjects']} subjects); no ratio given")
            return out
        # a ratio only where both systems' training loss levelled off, on the folds the peer ran
        peer_folds = {f["fold"] for f in peer["folds"]}
        decide = {"systems": {n: {"folds": {k: v for k, v in s["folds"].items() if k in peer_folds}}
                              for n, s in conv["systems"].items()}}
        allowed, why = convergence.ratio_allowed(decide)
        if not allowed:
            out["peer_status"] = f"segmented every subject, but {why}: no DSC ratio given"
            return out
        out["peer_status"] = f"segmented every subject; {why}"
        da, db = _pooled_dsc(ours, peer_folds), _pooled_dsc(peer, peer_folds)
        ta = [f["train_minutes"] for f in ours["folds"] if f["fold"] in peer_folds]
        tb = [f["train_minutes"] for f in peer["folds"]]
        bud = conv["budget_minutes"]
        out["ratio_ours_over_nnunet"] = {
            "mean_dsc": round(da / db, 4) if db else None,
            "training_time": round((sum(ta) / len(ta)) / (sum(tb) / len(tb)), 4) if sum(tb) else None,
            "folds": sorted(peer_folds), "ours_dsc_mean_on_these_folds": round(da, 6),
            "peer_dsc_mean_on_these_folds": round(db, 6),
            "peer_budget_over_ours": round(bud["nnU-Net"] / bud["ours"], 4) if bud.get("ours") else None}
    return out


def format_text(result: dict) -> str:
    head = (f"{'system':<8} {'fold':>9} {'n':>3} " + " ".join(f"{h:>12}" for _, h, _ in COLS)
            + f" {'train min':>11} {'epochs':>7} {'iters':>6}")
    lines = [result.get("protocol", ""), head, "-" * len(head)]
    for name, sysres in result["systems"].items():
        for f in sysres["folds"]:
            vals = " ".join(f"{f['mean'][c]:>12.{d}f}" for c, _, d in COLS)
            ep, it = f.get("epochs"), f.get("iterations")
            lines.append(f"{name:<8} {f['fold']:>9} {f['n']:>3} {vals} {f['train_minutes']:>11.1f}"
                         f" {ep if ep is not None else '':>7} {it if it is not None else '':>6}")
        s = sysres["summary"]
        ms = " ".join(f"{s[c + '_mean']:.{d}f}+-{s[c + '_sd']:.{d}f}".rjust(12) for c, _, d in COLS)
        tm = f"{s['train_minutes_mean']:.1f}+-{s['train_minutes_sd']:.1f}"
        lines.append(f"{name:<8} {'mean+-sd':>9} {s['n_subjects']:>3} {ms} {tm:>11}")
        lines.append("-" * len(head))
    conv = result.get("convergence")
    if conv:
        lines.append(f"training loss levelled off? rule: {conv['rule']}")
        for name, v in conv["systems"].items():
            per = ", ".join(f"fold {k}: {'yes' if f['levelled'] else 'NO'}"
                            + (f" ({f['relative_change']:.1%})" if f.get("relative_change") is not None else
                               " (too few epochs)" if "too few" in f.get("reason", "") else " (no curve)")
                            for k, f in v["folds"].items())
            lines.append(f"  {name}: {per}")
    if result.get("peer_status"):
        lines.append(f"nnU-Net: {result['peer_status']}")
    r = result.get("ratio_ours_over_nnunet")
    if r:
        def num(v, d):
            return f"{v:.{d}f}" if v is not None else "undefined (the peer's value is 0)"
        extra = ""
        if r.get("peer_budget_over_ours") not in (None, 1, 1.0):
            extra += f"; the peer given {r['peer_budget_over_ours']:g} x ours"
        if r.get("folds") is not None and len(r["folds"]) < len(result["systems"]["ours"]["folds"]):
            extra += f"; on fold(s) {', '.join(map(str, r['folds']))} only"
        lines.append(f"ratio (ours/nnU-Net): mean DSC {num(r['mean_dsc'], 3)}, "
                     f"training time {num(r['training_time'], 2)}{extra}")
    peer = result["systems"].get("nnU-Net")
    if peer:
        lines.append(f"nnU-Net preprocessing (not in train min): {peer.get('preprocessing_minutes', float('nan')):.1f} min; "
                     f"prediction: " + ", ".join(f"{f.get('predict_minutes', float('nan')):.1f}" for f in peer["folds"])
                     + " min per fold")
    return "\n".join(lines)


def write_json(result: dict, folder: Path) -> Path:
    day = result["date"][:10]
    path = folder / f"accuracy-{day}.json"
    if path.exists():  # a second run on the same day keeps the first
        path = folder / f"accuracy-{day}-{result['date'][11:16].replace(':', '')}.json"
    return _write_json_atomic(path, result, indent=1)


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if args and args[0] in ("-h", "--help") else 2
    p = Path(args[0])
    if p.is_file():  # a results JSON: reprint it
        print(format_text(json.loads(p.read_text())))
        return 0
    ours = json.loads((p / "results-ours.json").read_text())
    peer_file = p / "results-nnunet.json"
    peer = json.loads(peer_file.read_text()) if peer_file.exists() else None
    prev = p / "accuracy.json"
    meta = {}
    if prev.exists():
        old = json.loads(prev.read_text())
        meta = {k: old[k] for k in ("protocol", "folds", "budget_minutes", "full_protocol", "subset", "n_subjects",
                                    "data", "splits", "total_wall_minutes", "command") if k in old}
    print(format_text(build(ours, peer, meta)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
