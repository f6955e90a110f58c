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
load, and writes bench/results/responsiveness-<date>.json. ``--profile`` also says where the GUI
thread was during the stalls over 100 ms (a watchdog thread samples its Python stack every 5 ms
while the timer is late), how long each of the panel's handlers took, when each stall came
(seconds from Train, and the progress event before it) and the garbage collections inside it
(a full collection of the viewer's objects holds the interpreter lock for about 0.3 s, so the
watchdog cannot sample during one).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TICK_MS = 10
GOAL_MS = 100.0


class StallSampler:
    """Samples the GUI thread's Python stack while its timer is late (``--profile``).

    A daemon thread wakes every ``sample_ms``; when the last tick is older than
    the tick period plus ``late_ms``, it records the main thread's stack
    (``sys._current_frames``). A sample lands when the GUI thread lets go of the
    interpreter lock (between bytecodes, or in C code that releases it, as Qt's
    calls do), so each sample stands for about ``sample_ms`` of a stall.
    """

    def __init__(self, sample_ms: float = 5.0, late_ms: float = 20.0) -> None:
        self.main_id = threading.main_thread().ident
        self.sample_s, self.late_s = sample_ms / 1000.0, (TICK_MS + late_ms) / 1000.0
        self.last_tick: float | None = None
        self.samples: list[tuple[float, float, list[tuple[str, str, int]]]] = []  # (when, last tick, stack)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stall-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import traceback

        while not self._stop.wait(self.sample_s):
            last = self.last_tick
            now = time.perf_counter()
            if last is None or now - last < self.late_s:
                continue
            frame = sys._current_frames().get(self.main_id)
            if frame is None:
                continue
            stack = [(Path(f.filename).name, f.name, f.lineno or 0) for f in traceback.extract_stack(frame)]
            self.samples.append((now, last, stack))


def _where(stack: list[tuple[str, str, int]]) -> tuple[str, str]:
    """(handler, leaf): the first frame below the bench's event loop, and the innermost frame."""
    fmt = "{1} ({0}:{2})".format
    below = [f for f in stack if f[0] != "responsiveness.py"]
    handler = fmt(*below[0]) if below else "event loop (C++: Qt, X)"
    return handler, fmt(*stack[-1]) if stack else "?"


class GCWatch:
    """Records Python's garbage collections (``gc.callbacks``): start time, duration, generation, thread."""

    def __init__(self) -> None:
        self.runs: list[tuple[float, float, int, str]] = []
        self._start: dict[int, float] = {}

    def __call__(self, phase: str, info: dict) -> None:
        now = time.perf_counter()
        me = threading.get_ident()
        if phase == "start":
            self._start[me] = now
        elif me in self._start:
            t = self._start.pop(me)
            self.runs.append((t, now - t, int(info.get("generation", -1)), threading.current_thread().name))


def _profile_report(sampler: StallSampler, stalls_at: list[tuple[float, float]], events: list[tuple[float, str]],
                    handler_s: dict[str, list[float]], t0: float, sample_ms: float = 5.0,
                    gc_runs: list[tuple[float, float, int, str]] = ()) -> dict:
    """Attribute the samples to the stalls over the goal; summarise handlers and when stalls happen."""
    big = [(start, ms) for start, ms in stalls_at if ms > GOAL_MS]
    by_handler: Counter = Counter()
    by_leaf: Counter = Counter()
    by_stack: Counter = Counter()
    in_big = 0
    big_starts = {start for start, _ in big}  # the stall's last tick, the very float the sampler saw
    for _when, last, stack in sampler.samples:
        if last not in big_starts:
            continue
        in_big += 1
        handler, leaf = _where(stack)
        by_handler[handler] += 1
        by_leaf[leaf] += 1
        by_stack[" > ".join(f"{f[1]}" for f in stack if f[0] != "responsiveness.py")[-400:]] += 1
    ev_t = np.asarray([t for t, _ in events])
    timeline = []
    for start, ms in big:
        i = int(np.searchsorted(ev_t, start, side="right")) - 1
        last_ev = f"{events[i][1]} {1000 * (start - events[i][0]):.0f} ms before" if i >= 0 else "none yet"
        end = start + (ms + TICK_MS) / 1000.0
        gc_ms = sum(1000 * d for t, d, _, _ in gc_runs if t < end and t + d > start)
        timeline.append({"at_s": round(start - t0, 2), "stall_ms": round(ms, 1), "last_event": last_ev,
                         "gc_ms_inside": round(gc_ms, 1)})
    handlers = {k: {"n": len(v), "total_ms": round(1000 * sum(v), 1), "max_ms": round(1000 * max(v), 1),
                    "mean_ms": round(1000 * sum(v) / len(v), 1)} for k, v in sorted(handler_s.items())}
    return {
        "sample_ms": sample_ms,
        "samples_in_stalls_over_goal": in_big,
        "by_handler": by_handler.most_common(15),
        "by_leaf": by_leaf.most_common(15),
        "by_stack": by_stack.most_common(10),
        "handlers": handlers,
        "stalls_over_goal": timeline,
        "gc": {f"generation {g}": {"n": sum(1 for r in gc_runs if r[2] == g),
                                   "max_ms": round(1000 * max((r[1] for r in gc_runs if r[2] == g), default=0), 1)}
               for g in (0, 1, 2)},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=1.0, help="training time budget (default 1)")
    ap.add_argument("--in-thread", action="store_true",
                    help="train in the worker thread of the viewer's process (default: in a child process)")
    ap.add_argument("--baseline", action="store_true",
                    help="no training: the same viewer and timer for --minutes (the machine's own stalls)")
    ap.add_argument("--profile", action="store_true",
                    help="also find where the GUI thread spends its stalls: a watchdog thread samples the GUI "
                         "thread's Python stack every 5 ms while the timer is late, and each progress handler "
                         "is timed (printed, and saved in the results JSON under 'profile')")
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
    sampler = StallSampler() if args.profile else None
    gc_watch = GCWatch()
    if args.profile:
        import gc

        gc.callbacks.append(gc_watch)
    events: list[tuple[float, str]] = []  # (arrival, stage) of each progress event in the GUI thread
    handler_s: dict[str, list[float]] = {}  # seconds each GUI-thread handler took, by handler and stage

    def tick() -> None:
        now = time.perf_counter()
        ticks.append(now)
        if sampler is not None:
            sampler.last_tick = now

    timer.timeout.connect(tick)
    n_events = [0]
    counts = {"train": 0, "epoch_end": 0}

    def on_event(ev) -> None:
        n_events[0] += 1
        events.append((time.perf_counter(), ev.stage))
        if ev.stage in counts:
            counts[ev.stage] += 1

    if args.profile:  # time the panel's handlers (start() connects them through the instance)
        def timed(name: str, fn):
            def wrapper(*a):
                t = time.perf_counter()
                try:
                    return fn(*a)
                finally:
                    stage = getattr(a[0], "stage", "") if a else ""
                    handler_s.setdefault(f"{name}({stage})" if stage else name, []).append(time.perf_counter() - t)
            return wrapper

        for name in ("_on_progress", "_on_returned", "_on_error", "_on_finished"):
            setattr(widget, name, timed(name, getattr(widget, name)))

    widget.progressed.connect(on_event)
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    timer.start()
    if sampler is not None:
        sampler.start()
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
    if sampler is not None:
        sampler.stop()
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
    if sampler is not None:
        tk = np.asarray(ticks)
        stalls_at = [(float(tk[i]), float(stalls[i])) for i in np.flatnonzero(stalls > 20)]
        res["profile"] = prof = _profile_report(sampler, stalls_at, events, handler_s, t0, gc_runs=gc_watch.runs)
        print(f"profile: {prof['samples_in_stalls_over_goal']} samples (every {prof['sample_ms']:.0f} ms) in the "
              f"stalls over {GOAL_MS:.0f} ms; where the GUI thread was (handler below the event loop):")
        for where, n in prof["by_handler"]:
            print(f"  {n:5d}  {where}")
        print("innermost frame:")
        for where, n in prof["by_leaf"]:
            print(f"  {n:5d}  {where}")
        print("handlers (GUI thread):")
        for name, h in prof["handlers"].items():
            print(f"  {name}: n {h['n']}, mean {h['mean_ms']} ms, max {h['max_ms']} ms, total {h['total_ms']} ms")
        print("stalls over the goal (s from start, ms, the progress event before):")
        for st in prof["stalls_over_goal"]:
            print(f"  {st['at_s']:7.2f} s  {st['stall_ms']:6.1f} ms  {st['last_event']}; "
                  f"garbage collection inside: {st['gc_ms_inside']} ms")
        print("garbage collections (this process, all threads): " + ", ".join(
            f"{g}: {v['n']} (longest {v['max_ms']} ms)" for g, v in prof["gc"].items()))
    what = "no training" if args.baseline else f"training in the {res['training_in']}"
    print(f"{what}, {wall:.0f} s ({n_events[0]} progress events); GUI timer every {TICK_MS} ms: "
          f"longest stall {res['longest_stall_ms']} ms, 99th percentile {res['p99_stall_ms']} ms, "
          f"{res['stalls_over_100ms']} stalls over {GOAL_MS:.0f} ms (goal: none); "
          f"load average {res['loadavg_1min_before_after'][0]} -> {res['loadavg_1min_before_after'][1]} "
          f"on {res['cpus']} CPUs")
    out = ROOT / "bench" / "results" / f"responsiveness-{time.strftime('%Y%m%d-%H%M%S')}.json"
    from femur_core.volume_io import write_json
    write_json(out, res, indent=2)
    print(f"written {out}")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
