"""The run folder's report: metrics.csv, report.json, ROC / PR / training-curve plots, a table."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np

from .volume_io import atomic_write_bytes
from .metrics import curves_from_counts, summarise

__all__ = ["collect", "format_table", "write_report"]

METRICS = ("dsc", "precision", "recall", "specificity", "hd95_mm", "assd_mm", "volume_diff")


def _load_fold(run_dir: Path, k: int) -> dict | None:
    p = run_dir / f"fold{k}" / "result.json"
    if not p.exists():
        return None
    return json.loads(p.read_text())


def collect(run_dir: "str | Path") -> tuple[list[dict], list[int]]:
    """Finished fold results and the list of missing folds of a run folder."""
    run = Path(run_dir)
    splits = json.loads((run / "splits.json").read_text())
    done, missing = [], []
    for k in range(len(splits["folds"])):
        r = _load_fold(run, k)
        (done if r is not None else missing).append(r if r is not None else k)
    return done, missing


def _savefig(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue(), overwrite=True)


def _plots(run: Path, folds: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    curves = []
    for f in folds:
        npz = run / f"fold{f['fold']}" / "curves.npz"
        if npz.exists():
            d = np.load(npz)
            curves.append((f["fold"], curves_from_counts(d["pos"], d["neg"])))
    for kind in ("roc", "pr"):
        fig, ax = plt.subplots(figsize=(4.6, 4.2))
        grid = np.linspace(0, 1, 201)
        interp = []
        for k, c in curves:
            if kind == "roc":
                x, y, lab = c.fpr, c.recall, f"fold {k} AUC {c.roc_auc():.4f}"
                ax.plot(x, y, lw=1, alpha=0.7, label=lab)
                interp.append(np.interp(grid, x, y))
            else:
                x, y, lab = c.recall[1:], c.precision[1:], f"fold {k} AP {c.average_precision():.4f}"
                ax.plot(x, y, lw=1, alpha=0.7, label=lab)
                order = np.argsort(x)
                interp.append(np.interp(grid, x[order], y[order]))
        if interp:
            ax.plot(grid, np.mean(interp, axis=0), "k", lw=2, label="mean over folds")
        if kind == "roc":
            ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC", xscale="symlog",
                   xlim=(0, 1), ylim=(0, 1.01))
            ax.set_xscale("symlog", linthresh=1e-3)
        else:
            ax.set(xlabel="recall", ylabel="precision", title="Precision-recall", xlim=(0, 1), ylim=(0, 1.01))
        ax.legend(fontsize=7, loc="lower left" if kind == "pr" else "lower right")
        _savefig(fig, run / f"{kind}.png")
        plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(8.5, 3.4))
    for f in folds:
        hist = run / f"fold{f['fold']}" / "history.csv"
        if not hist.exists():
            continue
        rows = list(csv.DictReader(hist.open()))
        ep = [int(r["epoch"]) for r in rows]
        axes[0].plot(ep, [float(r["loss"]) for r in rows], label=f"fold {f['fold']}")
        validated = [(e, float(r["val_dsc"])) for e, r in zip(ep, rows) if math.isfinite(float(r["val_dsc"]))]
        axes[1].plot([e for e, _ in validated], [v for _, v in validated], marker=".",  # validate_every
                     label=f"fold {f['fold']}")
    axes[0].set(xlabel="epoch", ylabel="training loss", title="loss")
    axes[1].set(xlabel="epoch", ylabel="early-stopping DSC", title="validation DSC")
    axes[1].legend(fontsize=7)
    _savefig(fig, run / "training_curves.png")
    plt.close(fig)


def format_table(folds: list[dict], summary: dict) -> str:
    """A per-fold and mean +- sd text table (DSC, precision, recall, HD95, ASSD)."""
    cols = ("dsc", "precision", "recall", "hd95_mm", "assd_mm")
    head = f"{'fold':>6} {'n':>3} {'thr':>5} " + " ".join(f"{c:>10}" for c in cols) + f" {'train min':>9}"
    lines = [head, "-" * len(head)]
    for f in folds:
        s = summarise(f["subjects"])
        vals = " ".join(f"{s[c]['mean']:>10.4f}" if c in ("dsc", "precision", "recall") else f"{s[c]['mean']:>10.2f}"
                        for c in cols)
        lines.append(f"{f['fold']:>6} {len(f['subjects']):>3} {f['threshold']:>5.2f} {vals} {f['train_minutes']:>9.1f}")
    lines.append("-" * len(head))
    ms = " ".join(
        (f"{summary[c + '_mean']:.3f}+-{summary[c + '_sd']:.3f}" if c in ("dsc", "precision", "recall")
         else f"{summary[c + '_mean']:.2f}+-{summary[c + '_sd']:.2f}").rjust(10) for c in cols)
    lines.append(f"{'mean':>6} {summary['n_subjects']:>3} {'':>5} {ms} {summary['train_minutes_mean']:>9.1f}")
    return "\n".join(lines)


def write_report(run_dir: "str | Path") -> tuple[dict, list[int]]:
    """Merge finished folds into metrics.csv, report.json and plots.

    Returns the report dict and the list of missing folds (report written only
    from the folds that exist; ``"complete": false`` when some are missing).
    """
    run = Path(run_dir)
    folds, missing = collect(run)
    folds.sort(key=lambda f: f["fold"])
    rows = [{"fold": f["fold"], "subject": s["subject"], **{m: s[m] for m in METRICS}}
            for f in folds for s in f["subjects"]]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["fold", "subject", *METRICS])
    w.writeheader()
    w.writerows(rows)
    atomic_write_bytes(run / "metrics.csv", buf.getvalue().encode(), overwrite=True)
    s = summarise(rows) if rows else {}
    summary = {"n_subjects": len(rows), "complete": not missing, "missing_folds": missing}
    for m in METRICS:
        if m in s:
            summary[f"{m}_mean"] = s[m]["mean"]
            summary[f"{m}_sd"] = s[m]["sd"]
    for key in ("roc_auc", "average_precision", "train_minutes"):
        vals = [f[key] for f in folds if key in f]
        summary[f"{key}_mean"] = float(np.mean(vals)) if vals else float("nan")
        summary[f"{key}_sd"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
    report = {"folds": folds, "summary": summary}
    atomic_write_bytes(run / "report.json", (json.dumps(report, indent=2) + "\n").encode(), overwrite=True)
    if folds:
        _plots(run, folds)
    return report, missing
