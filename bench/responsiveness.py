"""Responsiveness of napari while the Train widget trains in the background (a benchmark, not a test).

A real viewer (virtual X server: bench/run_responsiveness.sh) opens a synthetic scan, docks Train
Fold and trains fold 0 of a small synthetic cohort for about a minute (``--minutes``): in a child
process relayed by a thread worker (the panel's default), or with ``--in-thread`` in the worker
thread itself (how the panel trained before); ``--baseline`` runs the viewer and the timer without
training (the stalls the machine's load causes alone). Meanwhile a 10 ms QTimer in the GUI thread records when it actually fires; a
*stall* is the time the event loop could not answer beyond that period (the gap between two
ticks minus 10 ms). Progress events keep arriving and the loss plot keeps redrawing in the GUI
thread, so the measurement covers what the user sees. Goal: longest stall <= 100 ms.

Prints the longest stall, the 99th percentile and the count above 100 ms, with the machine's
load, and writes bench/results/responsiveness-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TICK_MS = 10
GOAL_MS = 100.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=1.0, help="training time budget (default 1)")
    ap.add_argument("--in-thread", action="store_true",
                    help="train in the worker thread of the viewer's process (default: in a child process)")
    ap.add_argument("--baseline", action="store_true",
                    help="no training: the same viewer and timer for --minutes (the machine's own stalls)")
    args = ap.parse_args(argv)

    import napari
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    from femur_core.synthetic import make_cohort
    from napari_femur._sample_data import synthetic_subject_layers
    from napari_femur._train_widget import TrainFoldWidget

    work = Path(tempfile.mkdtemp(prefix="femur-resp-"))
    make_cohort(work / "data", n=6, seed=0, geometry="dev", downsample=4)
    viewer = napari.Viewer(show=True)
    for data, kwargs, kind in synthetic_subject_layers():
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    widget = TrainFoldWidget(viewer)
    viewer.window.add_dock_widget(widget, area="right")
    widget.data_dir.set_path(work / "data")  # -> recipe synthetic-quick, output beside the data
    widget.n_folds.setValue(3)
    widget.epochs.setValue(1000)  # the budget decides
    widget.budget.setValue(args.minutes)
    widget.device_combo.setCurrentText("cpu")
    widget.separate_process = not args.in_thread
    app = QApplication.instance()
    for _ in range(20):
        app.processEvents()
        time.sleep(0.01)

    ticks: list[float] = []
    timer = QTimer()
    timer.setInterval(TICK_MS)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    n_events = [0]
    counts = {"train": 0, "epoch_end": 0}

    def on_event(ev) -> None:
        n_events[0] += 1
        if ev.stage in counts:
            counts[ev.stage] += 1

    widget.progressed.connect(on_event)
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    timer.start()
    if args.baseline:  # no training: what the machine's load alone does to the event loop
        while time.perf_counter() - t0 < args.minutes * 60:
            app.processEvents()
            time.sleep(0.001)
    else:
        worker = widget.start()
        if worker is None:
            print(f"training did not start: {widget.status.text()}", file=sys.stderr)
            return 1
        while widget.worker is not None:
            app.processEvents()
            time.sleep(0.001)
    timer.stop()
    wall = time.perf_counter() - t0
    gaps = np.diff(np.asarray(ticks)) * 1000.0
    stalls = np.clip(gaps - TICK_MS, 0, None)
    res = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "training_wall_s": round(wall, 1),
        "budget_minutes": args.minutes,
        "training_in": "none (baseline)" if args.baseline else "worker thread" if args.in_thread else "child process",
        "ticks": int(len(ticks)),
        "progress_events": n_events[0],
        "training_steps": counts["train"],
        "epochs_finished": counts["epoch_end"],
        "longest_stall_ms": round(float(stalls.max()), 1) if stalls.size else None,
        "p99_stall_ms": round(float(np.percentile(stalls, 99)), 1) if stalls.size else None,
        "median_gap_ms": round(float(np.median(gaps)), 1) if gaps.size else None,
        "stalls_over_100ms": int((stalls > GOAL_MS).sum()),
        "loadavg_1min_before_after": [round(load0[0], 2), round(os.getloadavg()[0], 2)],
        "cpus": os.cpu_count(),
        "status": widget.status.text(),
    }
    what = "no training" if args.baseline else f"training in the {res['training_in']}"
    print(f"{what}, {wall:.0f} s ({n_events[0]} progress events); GUI timer every {TICK_MS} ms: "
          f"longest stall {res['longest_stall_ms']} ms, 99th percentile {res['p99_stall_ms']} ms, "
          f"{res['stalls_over_100ms']} stalls over {GOAL_MS:.0f} ms (goal: none); "
          f"load average {res['loadavg_1min_before_after'][0]} -> {res['loadavg_1min_before_after'][1]} "
          f"on {res['cpus']} CPUs")
    out = ROOT / "bench" / "results" / f"responsiveness-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"written {out}")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
