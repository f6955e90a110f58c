"""Table 2 and Figures 3-4 of the study from finished cross-validation folds (derived numbers only).

    python bench/study_table/report.py runs/study-table [--results bench/results] [--figures docs]

Reads ``<run>/fold*/result.json`` (per-subject metrics with and without the cleanup, each subject
scored on its own grid by ``femur_core.metrics.evaluate``) and ``<run>/fold*/curves.npz`` (the
probability histograms of each fold's scored subjects), writes
``bench/results/study-table-<date>.json``, ``docs/study_fig3_curves.png`` (mean ROC and PR curve
of every run over its folds) and ``docs/study_fig4_boxes.png`` (DSC, precision and recall per row),
and prints the table in Markdown. No image voxels are read or drawn.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import platform
import sys
import textwrap
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rows import ROWS, RUNS, STUDY_CURVES  # noqa: E402

from femur_core.volume_io import atomic_write_bytes, write_json
from femur_core.metrics import curves_from_counts  # noqa: E402

METRICS = ("dsc", "precision", "recall", "specificity", "hd95_mm", "assd_mm")


def _folds(run_dir: Path, only: set[int] | None = None) -> list[dict]:
    """The finished folds' results of one run; ``only``: just these fold indices."""
    out = [json.loads(p.read_text()) for p in sorted(run_dir.glob("fold*/result.json"))]
    return [f for f in out if only is None or f["fold"] in only]


def common_folds(runs_dir: Path, run_names) -> set[int]:
    """The fold indices that every run with at least one finished fold has finished: the table
    compares rows on the same subjects (a run cut short by a deadline would otherwise be scored on
    fewer, different subjects than the others)."""
    sets = [{f["fold"] for f in _folds(runs_dir / n)} for n in run_names]
    sets = [s for s in sets if s]
    return set.intersection(*sets) if sets else set()


def _mean_sd(v) -> list[float]:
    a = np.asarray(v, dtype=float)
    a = a[np.isfinite(a)]
    if not len(a):
        return [float("nan"), float("nan")]
    return [round(float(a.mean()), 4), round(float(a.std(ddof=1)), 4) if len(a) > 1 else None]  # no sd of one


def row_result(row, run_dir: Path, n_folds: int, only: set[int] | None = None) -> dict | None:
    """Summary of one table row from its run's finished folds (``only``: just these; None: no fold finished)."""
    folds = _folds(run_dir, only)
    if not folds:
        return None
    key = "subjects" if row.cleanup else "subjects_no_cleanup"
    subjects = [s for f in folds for s in f.get(key, f["subjects"])]
    out = {"label": row.label, "run": row.run, "cleanup": row.cleanup, "folds_done": len(folds),
           "folds": n_folds, "n_subjects": len(subjects),
           "per_subject": {s["subject"]: {m: s[m] for m in METRICS} for s in subjects}}
    for m in METRICS:
        out[m] = _mean_sd([s[m] for s in subjects])
    out["empty_masks"] = sum(1 for s in subjects if not s["dsc"] > 0)
    out["roc_auc"] = _mean_sd([f["roc_auc"] for f in folds])
    out["average_precision"] = _mean_sd([f["average_precision"] for f in folds])
    out["train_cpu_minutes"] = [round(f["train_minutes"], 2) for f in folds]
    out["epochs"] = [f["epochs"] for f in folds]
    out["stop_reason"] = [f["stop_reason"] for f in folds]
    out["thresholds"] = [round(f["threshold"], 4) for f in folds]
    if row.study:
        d, ds, p, ps, r, rs = row.study
        out["study"] = {"dsc": [d, ds], "precision": [p, ps], "recall": [r, rs]}
    return out


def mean_curves(run_dir: Path, only: set[int] | None = None) -> dict | None:
    """Mean ROC (TPR on an FPR grid) and PR (precision on a recall grid) curves over the folds."""
    grid = np.linspace(0, 1, 401)
    roc, pr = [], []
    for npz in sorted(run_dir.glob("fold*/curves.npz")):
        if only is not None and int(npz.parent.name[4:]) not in only:
            continue
        d = np.load(npz)
        c = curves_from_counts(d["pos"], d["neg"])
        o = np.argsort(c.fpr, kind="stable")
        roc.append(np.interp(grid, c.fpr[o], c.recall[o]))
        rec, prec = c.recall[1:], c.precision[1:]
        o = np.argsort(rec, kind="stable")
        pr.append(np.interp(grid, rec[o], prec[o]))
    if not roc:
        return None
    return {"grid": grid, "tpr": np.mean(roc, axis=0), "precision": np.mean(pr, axis=0)}


def _savefig(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue(), overwrite=True)


def figure3(out: Path, runs_dir: Path, table: dict, tag: str = "") -> Path | None:
    """Mean ROC and precision-recall curves of every run, AUC / AP (mean over folds) in the legend."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.6))
    drawn = 0
    for run in RUNS:
        c = mean_curves(runs_dir / run.name, set(table["folds_used"]) or None)
        res = next((r for r in table["rows"] if r["run"] == run.name), None)
        if c is None or res is None:
            continue
        a1.plot(c["grid"], c["tpr"], lw=1.4, label=f"{run.name}  AUC {res['roc_auc'][0]:.3f}")
        a2.plot(c["grid"], c["precision"], lw=1.4, label=f"{run.name}  AP {res['average_precision'][0]:.3f}")
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    a1.set(xlabel="false positive rate", ylabel="true positive rate (recall)", xlim=(0, 1), ylim=(0, 1.01),
           title="ROC, mean over folds")
    a1.set_xscale("symlog", linthresh=1e-3)
    a2.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.01), title="Precision-recall, mean over folds")
    s3, s2 = STUDY_CURVES["3D F32 L4"], STUDY_CURVES["2D"]
    fig.suptitle(f"Study (Fig. 3): 3D F32 L4 AUC {s3['roc_auc']} AP {s3['average_precision']}; "
                 f"2D AUC {s2['roc_auc']} AP {s2['average_precision']}.  Curves: probabilities before the "
                 "cleanup (one per model)", fontsize=9)
    a1.legend(fontsize=7, loc="lower right")
    a2.legend(fontsize=7, loc="lower left")
    path = out / f"study{_tagged(tag)}_fig3_curves.png"
    _savefig(fig, path)
    plt.close(fig)
    return path


def figure4(out: Path, table: dict, tag: str = "") -> Path | None:
    """Box plots over subjects of DSC, precision and recall per row; the study's means as red diamonds."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows = table["rows"]
    if not rows:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(14, 5.2), sharey=True)
    labels = [r["label"].replace(" + largest component", " +LC").replace("ours: ", "") for r in rows]
    for ax, m in zip(axes, ("dsc", "precision", "recall")):
        data = [[s[m] for s in r["per_subject"].values() if np.isfinite(s[m])] for r in rows]
        ax.boxplot(data, widths=0.6, showfliers=True)
        for i, r in enumerate(rows, start=1):
            if "study" in r:
                ax.plot(i, r["study"][m][0], "D", color="tab:red", ms=5, label="study mean" if i == 1 else None)
        ax.set_xticks(range(1, len(rows) + 1), labels, rotation=60, ha="right", fontsize=8)
        ax.set_title(m if m == "dsc" else m, fontsize=10)
        ax.set_ylim(0, 1.02)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("per subject (own grid)")
    axes[0].legend(fontsize=8, loc="center left")
    fig.suptitle(textwrap.fill(table["protocol_text"], 150), fontsize=9)
    path = out / f"study{_tagged(tag)}_fig4_boxes.png"
    _savefig(fig, path)
    plt.close(fig)
    return path


def protocol_text(runs_dir: Path) -> str:
    p = runs_dir / "protocol.json"
    if not p.exists():
        return "protocol unknown (no protocol.json)"
    d = json.loads(p.read_text())
    return (f"honest {d['folds']}-fold CV (fold seed {d['fold_seed']}, the same folds for every row), "
            f"{d['budget_cpu_minutes']:g} CPU-minutes of training per fold (1 thread, early-stopping validation "
            f"included)" + (f"; every fold's command also given `{d['extra']}`" if d.get("extra") else ""))


def build(runs_dir: Path) -> dict:
    """The table: every row with at least one finished fold, the protocol and the departures."""
    n_folds = json.loads((runs_dir / "protocol.json").read_text())["folds"] if (runs_dir / "protocol.json").exists() \
        else None
    used = common_folds(runs_dir, [r.name for r in RUNS])
    rows = [r for r in (row_result(row, runs_dir / row.run, n_folds, used or None) for row in ROWS) if r is not None]
    finished = {r.name: sorted(f["fold"] for f in _folds(runs_dir / r.name)) for r in RUNS}
    return {"benchmark": "the study's Table 2 / Figures 3-4 on real scans (bench/study_table)",
            "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "protocol_text": protocol_text(runs_dir),
            "folds_used": sorted(used), "folds_finished": finished,
            "protocol": json.loads((runs_dir / "protocol.json").read_text()) if n_folds else None,
            "machine": {"platform": platform.platform(), "processor": platform.processor()},
            "metrics": "femur_core.metrics.evaluate on each subject's original grid, both femurs as one label, "
                       "threshold from the fold model's early-stopping subjects; mean +- sd over subjects; "
                       "ROC AUC / AP: mean +- sd over folds",
            "runs": {r.name: {"flags": list(r.flags), "departs_from_study": r.departs} for r in RUNS},
            "rows": rows,
            # rows whose run finished more folds than every row did, over all their finished folds
            "rows_more_folds": [r for r in (row_result(row, runs_dir / row.run, n_folds) for row in ROWS)
                                if r is not None and used and r["folds_done"] > len(used)]}


def row_note(r: dict) -> str:
    """A plain-words verdict on a row: whether its models learned to segment in the budget."""
    dsc = r["dsc"][0]
    empty = r.get("empty_masks", 0)
    if not np.isfinite(dsc) or dsc < 0.1:
        verdict = "did not learn to segment in the budget"
    elif dsc < 0.5:
        verdict = "learning, far from converged"
    else:
        verdict = ""
    if empty:
        verdict += ("; " if verdict else "") + f"{empty} of {r['n_subjects']} subjects with DSC 0"
    return verdict


def markdown(table: dict, key: str = "rows") -> str:
    """The table in Markdown, the study's numbers beside ours (``key``: ``rows`` or ``rows_more_folds``)."""
    def ms(v, d=3):
        if v is None or not np.isfinite(v[0]):
            return "-"
        return f"{v[0]:.{d}f}" if v[1] is None else f"{v[0]:.{d}f} ± {v[1]:.{d}f}"

    head = ("| row | DSC study | DSC ours | precision study | precision ours | recall study | recall ours | "
            "ROC AUC | AP | HD95 mm | ASSD mm | train CPU-min / fold | epochs | threshold | folds | note |")
    lines = [head, "|" + "---|" * 16]
    for r in table[key]:
        st = r.get("study", {})
        lines.append(
            f"| {r['label']} | {ms(st.get('dsc'))} | {ms(r['dsc'])} | {ms(st.get('precision'))} | "
            f"{ms(r['precision'])} | {ms(st.get('recall'))} | {ms(r['recall'])} | {ms(r['roc_auc'], 4)} | "
            f"{ms(r['average_precision'], 3)} | {ms(r['hd95_mm'], 1)} | {ms(r['assd_mm'], 2)} | "
            f"{', '.join(f'{m:.2f}' for m in r['train_cpu_minutes'])} | {', '.join(map(str, r['epochs']))} | "
            f"{', '.join(f'{t:.2f}' for t in r['thresholds'])} | {r['folds_done']}/{r['folds']} | {row_note(r)} |")
    return "\n".join(lines)


def _tagged(tag: str) -> str:
    """``_<tag>`` for a file name, or nothing."""
    return f"_{tag}" if tag else ""


def write_all(runs_dir: Path, results: Path, figures: Path, tag: str = "") -> dict:
    """Build the table, write its JSON and both figures, print it.

    ``tag`` names a variant protocol in the file names (``study-table-<tag>-<date>.json``,
    ``study_<tag>_fig3_curves.png``), so that it does not overwrite the main table's files.
    """
    table = build(runs_dir)
    if table["folds_used"] and table["protocol"] and len(table["folds_used"]) < table["protocol"]["folds"]:
        table["protocol_text"] += (f"; scored on fold(s) {', '.join(map(str, table['folds_used']))} only, the folds "
                                   "every row finished (the same subjects for every row)")
    path = write_json(results / f"study-table{'-' + tag if tag else ''}-{table['date'][:10]}.json", table)
    f3, f4 = figure3(figures, runs_dir, table, tag), figure4(figures, table, tag)
    print(table["protocol_text"])
    print(markdown(table))
    if table["rows_more_folds"]:
        print("\nRows with more folds finished, over all of them (not the same subjects as the table above):")
        print(markdown(table, "rows_more_folds"))
    print(f"written: {path}" + "".join(f", {p}" for p in (f3, f4) if p))
    return table


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs_dir", type=Path)
    ap.add_argument("--results", type=Path, default=Path(__file__).resolve().parents[1] / "results")
    ap.add_argument("--figures", type=Path, default=Path(__file__).resolve().parents[2] / "docs")
    ap.add_argument("--tag", default="", help="name of a variant protocol, put in the output file names")
    args = ap.parse_args(argv)
    write_all(args.runs_dir, args.results, args.figures, args.tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
