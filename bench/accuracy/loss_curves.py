"""Figure: the training-loss curves of both systems, one panel per system (and per peer budget).

    .venv/bin/python bench/accuracy/loss_curves.py RESULTS.json [MORE.json ...] [--out docs/peer_loss_curves.png]

Reads the accuracy results JSON(s) that accuracy.py writes (each fold keeps its curve: ours from
femur_core's history.csv, the peer from its trainer's time_budget.json). The first file gives our
panel; every file with a peer gives a peer panel (e.g. the equal-budget run and a longer-budget
run). x: minutes on the budget clock (CPU minutes with --budget-clock cpu); y: each system's own
training loss (ours: femur_core's Dice + CE; nnU-Net: its deep-supervised Dice + CE, negative),
each on its own axis. Folds are lines; the two shaded bands are the windows of the levelling-off
rule (bench/accuracy/convergence.py), whose verdict is in each line's legend entry.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import convergence  # noqa: E402


def panels(results: list[dict]) -> list[dict]:
    """The panels to draw: ours from the first result, then each result's peer."""
    out = []
    for i, res in enumerate(results):
        for name, sysres in res["systems"].items():
            if name == "ours" and i > 0:
                continue
            folds = [f for f in sysres["folds"] if f.get("curve")]
            if not folds:
                continue
            budget = folds[0].get("budget_minutes") or res.get("budget_minutes")
            clock = res.get("budget_clock", "wall")
            label = "ours (femur_core cpu-2d, one network)" if name == "ours" else \
                f"nnU-Net v2 ({sysres.get('settings', {}).get('configuration', '2d')})"
            out.append({"title": f"{label}, {budget:g} {clock}-min budget", "budget": budget, "clock": clock,
                        "system": name, "folds": folds,
                        "verdict": res.get("convergence", {}).get("systems", {}).get(name, {}).get("folds", {})})
    return out


def draw(results: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ps = panels(results)
    if not ps:
        raise SystemExit("error: no loss curves in these results (runs from before the curves were recorded?)")
    fig, axes = plt.subplots(1, len(ps), figsize=(5.2 * len(ps), 4.0), squeeze=False)
    for ax, p in zip(axes[0], ps):
        b = p["budget"]
        ax.axvspan(0.6 * b, 0.8 * b, color="0.92", lw=0)
        ax.axvspan(0.8 * b, 1.0 * b, color="0.84", lw=0)
        for f in p["folds"]:
            c = f["curve"]
            v = p["verdict"].get(str(f["fold"])) or p["verdict"].get(f["fold"]) or \
                convergence.levelled_off(c["minutes"], c["loss"], b)
            rel = v.get("relative_change")
            tag = ("levelled off" if v["levelled"] else "NOT levelled off") + \
                (f", {rel:.1%}" if rel is not None else "")
            ax.plot(c["minutes"], c["loss"], lw=1.2, color=f"C{int(f['fold']) % 10}", label=f"fold {f['fold']} ({tag})")
        ax.set_title(p["title"], fontsize=9)
        ax.set_xlabel(f"training time ({p['clock']} minutes)")
        ax.set_ylabel("training loss (its own scale)")
        ax.set_xlim(0, b * 1.03)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle("Training loss per epoch; shaded: the previous and last 20 % of the budget "
                 f"(levelled off: change <= {convergence.TOLERANCE:.0%} of the loss range)", fontsize=9)
    fig.tight_layout()
    import io

    from femur_core.volume_io import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return atomic_write_bytes(out, buf.getvalue(), overwrite=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", help="accuracy results JSON(s)")
    ap.add_argument("--out", default=str(HERE.parents[1] / "docs" / "peer_loss_curves.png"))
    args = ap.parse_args(argv)
    results = [json.loads(Path(r).read_text()) for r in args.results]
    print(draw(results, Path(args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
