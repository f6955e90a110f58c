"""Loss curves of both systems and the benchmark's rule for "the training loss has levelled off".

The rule (:func:`levelled_off`): with the budget B of a fold and the per-epoch mean training loss
at each epoch's end (budget clock), the loss has levelled off when the mean over the last 20 % of
the budget, (0.8 B, B], is within 5 % of the loss range (max - min of the whole curve) of the mean
over the 20 % before it, (0.6 B, 0.8 B]. Both windows must hold at least two epochs; otherwise
the rule cannot be applied and the answer is "not levelled off" (with the reason). Epochs that end
past the budget (the last one may) count in the last window.

The curves: ours from femur_core's ``history.csv`` (``loss``, ``minutes`` on the budget clock),
the peer from ``time_budget.json`` (``curve``: nnU-Net's logged ``train_losses`` per epoch,
``clock_minutes`` on the budget clock), both written by the training runs. The two losses are on
different scales (ours: Dice + CE of femur_core, positive; nnU-Net: its deep-supervised Dice + CE,
where the Dice term is negative), so each is judged and plotted on its own.

Pure functions here (no nnU-Net, no torch): tests/test_bench_peer.py checks them.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

WINDOW = 0.2   # share of the budget in each window
TOLERANCE = 0.05  # of the loss range
MIN_EPOCHS_PER_WINDOW = 2

RULE = (f"the mean training loss over the last {WINDOW:.0%} of the budget is within {TOLERANCE:.0%} of the "
        f"loss range (max - min over the run) of the mean over the {WINDOW:.0%} before it "
        f"(at least {MIN_EPOCHS_PER_WINDOW} epochs in each window)")


def levelled_off(minutes: list[float], losses: list[float], budget_minutes: float,
                 window: float = WINDOW, tolerance: float = TOLERANCE,
                 min_epochs: int = MIN_EPOCHS_PER_WINDOW) -> dict:
    """Apply the levelling-off rule to one training curve.

    Parameters
    ----------
    minutes : list of float
        Budget-clock minutes at the end of each epoch (increasing).
    losses : list of float
        Mean training loss of each epoch (same length; NaN epochs are ignored).
    budget_minutes : float
        The run's budget B.

    Returns
    -------
    dict
        ``levelled`` (bool), ``last_mean``, ``previous_mean``, ``change`` (last - previous),
        ``range``, ``relative_change`` (|change| / range), ``epochs_last``, ``epochs_previous``
        and ``reason`` (a sentence).
    """
    if len(minutes) != len(losses):
        raise ValueError(f"{len(minutes)} times but {len(losses)} losses")
    if budget_minutes <= 0:
        raise ValueError("budget_minutes must be > 0")
    pts = [(float(t), float(v)) for t, v in zip(minutes, losses) if v is not None and math.isfinite(float(v))]
    lo, mid = (1 - 2 * window) * budget_minutes, (1 - window) * budget_minutes
    prev = [v for t, v in pts if lo < t <= mid]
    last = [v for t, v in pts if t > mid]
    out = {"levelled": False, "last_mean": None, "previous_mean": None, "change": None, "range": None,
           "relative_change": None, "epochs_last": len(last), "epochs_previous": len(prev),
           "window": window, "tolerance": tolerance}
    if len(prev) < min_epochs or len(last) < min_epochs:
        out["reason"] = (f"too few epochs to apply the rule ({len(prev)} in the previous window, {len(last)} in "
                         f"the last; need {min_epochs} in each)")
        return out
    vals = [v for _, v in pts]
    rng = max(vals) - min(vals)
    a, b = sum(last) / len(last), sum(prev) / len(prev)
    rel = abs(a - b) / rng if rng > 0 else 0.0
    out.update(last_mean=round(a, 6), previous_mean=round(b, 6), change=round(a - b, 6), range=round(rng, 6),
               relative_change=round(rel, 4), levelled=bool(rel <= tolerance))
    out["reason"] = (f"last-window mean {a:.4f} vs previous {b:.4f}: change {abs(a - b) / rng if rng else 0:.1%} of "
                     f"the loss range {rng:.4f} ({'<=' if out['levelled'] else '>'} {tolerance:.0%})")
    return out


# --------------------------------------------------------------------------------------------
# reading the curves the runs wrote
# --------------------------------------------------------------------------------------------

def ours_curve(fold_dir: Path) -> dict | None:
    """femur_core's per-epoch history of one fold (one network: ``--ensemble 1``).

    Returns ``{"minutes": [...], "loss": [...]}`` or None when the fold has no history yet.
    Several members (an ensemble) would be several curves: refused, as the benchmark runs one.
    """
    files = sorted(Path(fold_dir).rglob("history.csv"))
    if not files:
        return None
    if len(files) > 1:
        raise ValueError(f"{fold_dir}: {len(files)} history.csv files (an ensemble?); the loss-curve rule "
                         f"expects one network per fold (--ours-ensemble 1)")
    rows = list(csv.DictReader(files[0].open()))
    return {"source": str(files[0]), "minutes": [float(r["minutes"]) for r in rows],
            "loss": [float(r["loss"]) for r in rows], "epochs": [int(r["epoch"]) for r in rows]}


def peer_curve(time_budget_json: Path) -> dict | None:
    """The peer's per-epoch training loss from its ``time_budget.json`` (None when absent or old)."""
    p = Path(time_budget_json)
    if not p.exists():
        return None
    tb = json.loads(p.read_text())
    curve = tb.get("curve")
    if not curve:
        return None
    return {"source": str(p), "minutes": [c["clock_minutes"] for c in curve],
            "loss": [c["train_loss"] if c["train_loss"] is not None else float("nan") for c in curve],
            "epochs": [c["epoch"] for c in curve], "iterations": [c["iterations"] for c in curve]}


def verdicts(curves: dict[str, dict[int, dict | None]], budgets: dict[str, float]) -> dict:
    """The rule for every system and fold: ``{system: {fold: verdict}}`` plus a summary.

    ``curves[system][fold]`` is a curve from :func:`ours_curve` / :func:`peer_curve` (None: missing,
    which counts as not levelled off); ``budgets[system]`` is that system's per-fold budget.
    """
    out: dict = {"rule": RULE, "systems": {}}
    for system, folds in curves.items():
        per = {}
        for k, c in sorted(folds.items()):
            if c is None:
                per[k] = {"levelled": False, "reason": "no loss curve recorded"}
            else:
                per[k] = levelled_off(c["minutes"], c["loss"], budgets[system])
        out["systems"][system] = {"folds": per, "all_levelled": bool(per) and all(v["levelled"] for v in per.values())}
    return out


def ratio_allowed(verdict: dict) -> tuple[bool, str]:
    """May a DSC ratio be given? Only when every system levelled off in every fold.

    Returns (allowed, sentence naming the system(s) and fold(s) that did not level off).
    """
    missing = []
    for system, v in verdict.get("systems", {}).items():
        bad = [str(k) for k, f in v["folds"].items() if not f["levelled"]]
        if bad or not v["folds"]:
            missing.append(f"{system} (fold{'s' if len(bad) != 1 else ''} {', '.join(bad) or 'none recorded'})")
    if not verdict.get("systems"):
        return False, "no loss curves: convergence not checked"
    if missing:
        return False, "training loss not levelled off: " + "; ".join(missing)
    return True, "the training loss levelled off in every fold compared, in both systems"
