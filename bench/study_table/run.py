"""The study's Table 2 and Figures 3-4 on real scans: one resumable command.

Every run of ``rows.RUNS`` is a ``python -m femur_core.cv`` run folder with the same folds
(``--folds``, ``--fold-seed``: one ``splits.json`` for all), the honest protocol (early stopping on
an inner split of the training folds, threshold from those early-stopping subjects, the scored
fold untouched) and the same per-fold training budget, counted in process CPU time
(``--budget-clock cpu``, one thread per fold), so that a row trained while the machine was busy
gets the same compute as one trained on an idle machine. Each fold runs as its own process
(``--fold K``); ``--jobs 2`` runs two at once. Re-running the command skips finished folds and
resumes unfinished ones from their last checkpoint; then the table and the figures are written
(``report.py``).

    python bench/study_table/run.py --data ../shared/data/pelvic_mri --out runs/study-table \\
        [--folds 2] [--fold-seed 0] [--budget-cpu-minutes 3] [--jobs 2] [--runs 2d-f64-l3,3d-f32-l4]
    python bench/study_table/run.py --out runs/study-table --report-only

Where the data folder is absent it prints why and exits 0 having run nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

from rows import RUNS, run_by_name  # noqa: E402


def fold_command(run, data: Path, out: Path, folds: int, fold_seed: int, k: int, budget: float,
                 extra: tuple[str, ...] = ()) -> list[str]:
    """The cv command line of fold ``k`` of ``run``."""
    return [sys.executable, "-m", "femur_core.cv", "--data", str(data), "--out", str(out / run.name),
            "--folds", str(folds), "--fold-seed", str(fold_seed), "--fold", str(k), "--seed", "0",
            "--device", "cpu", "--budget-minutes", f"{budget:g}", "--budget-clock", "cpu",
            "--epochs", "200", *run.flags, *extra]


def _tasks(runs, out: Path, folds: int) -> list[tuple]:
    """The unfinished folds, fold-major: every run's fold 0 before any fold 1, so that a run cut
    short by a deadline still leaves every row scored on the same subjects."""
    return [(r, k) for k in range(folds) for r in runs if not (out / r.name / f"fold{k}" / "result.json").exists()]


def _alive_pid(run, k: int, out: Path) -> int | None:
    """The process id of a fold already being trained by another invocation, or None."""
    pid_file = out / run.name / f"fold{k}.pid"
    try:
        pid = int(pid_file.read_text())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


class _Running:
    """A fold process: ours (a Popen) or another invocation's (its pid, waited for)."""

    def __init__(self, proc: subprocess.Popen | None = None, pid: int | None = None) -> None:
        self.proc, self.pid = proc, pid

    def poll(self) -> int | None:
        if self.proc is not None:
            return self.proc.poll()
        try:
            os.kill(self.pid, 0)
        except OSError:
            return 0
        return None

    @property
    def returncode(self) -> int:
        return self.proc.returncode if self.proc is not None else 0


def _start(task, args) -> _Running:
    run, k = task
    log = args.out / run.name / f"fold{k}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = fold_command(run, args.data, args.out, args.folds, args.fold_seed, k, args.budget_cpu_minutes,
                       tuple(args.extra.split()))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with log.open("a") as fh:
        fh.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
        fh.flush()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    (args.out / run.name / f"fold{k}.pid").write_text(str(proc.pid))
    return _Running(proc)


def run_all(args) -> list[str]:
    """Run the missing folds, ``args.jobs`` at a time; the names of the folds that failed."""
    runs = [run_by_name(n) for n in args.runs.split(",")] if args.runs else RUNS
    todo = _tasks(runs, args.out, args.folds)
    print(f"{len(todo)} fold(s) to run: " + ", ".join(f"{r.name}/fold{k}" for r, k in todo), flush=True)
    running: list[tuple[tuple, _Running, float]] = []
    for task in list(todo):  # folds another invocation is training: wait for them, in a job slot
        pid = _alive_pid(*task, args.out)
        if pid is not None:
            todo.remove(task)
            running.append((task, _Running(pid=pid), time.monotonic()))
            print(f"{task[0].name} fold {task[1]}: already running (pid {pid}), waiting for it", flush=True)
    failed = []
    while todo or running:
        while todo and len(running) < args.jobs:
            task = todo.pop(0)
            running.append((task, _start(task, args), time.monotonic()))
            print(f"[{time.strftime('%H:%M:%S')}] start {task[0].name} fold {task[1]}", flush=True)
        time.sleep(2)
        for item in list(running):
            (run, k), proc, t0 = item
            if proc.poll() is None:
                continue
            running.remove(item)
            ok = proc.returncode == 0 and (args.out / run.name / f"fold{k}" / "result.json").exists()
            status = "done" if ok else f"FAILED (exit {proc.returncode}, see {run.name}/fold{k}.log)"
            print(f"[{time.strftime('%H:%M:%S')}] {run.name} fold {k}: {status} "
                  f"({(time.monotonic() - t0) / 60:.1f} min wall)", flush=True)
            if not ok:
                failed.append(f"{run.name}/fold{k}")
    return failed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "pelvic_mri")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "study-table")
    ap.add_argument("--folds", type=int, default=2, help="CV folds of every run (the study: 4)")
    ap.add_argument("--fold-seed", type=int, default=0)
    ap.add_argument("--budget-cpu-minutes", type=float, default=3.0,
                    help="training budget per fold, process CPU minutes, early-stopping validation included "
                         "(the study: about 30 epochs and more on a GPU)")
    ap.add_argument("--jobs", type=int, default=1, help="folds trained at once (one CPU thread each)")
    ap.add_argument("--runs", help="comma list of run names (default: all, in rows.RUNS order)")
    ap.add_argument("--extra", default="", help="flags appended to every fold's cv command (they win; for "
                                                "smoke tests, e.g. '--features 4 --in-plane-size 64')")
    ap.add_argument("--report-only", action="store_true", help="write the table and figures from finished folds")
    ap.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--figures", type=Path, default=REPO / "docs")
    ap.add_argument("--tag", default="", help="name of a variant protocol (e.g. bn20), put in the names of the "
                                             "results JSON and the figures so that they do not replace the main table's")
    args = ap.parse_args(argv)
    args.out = args.out.resolve()
    failed = []
    if not args.report_only:
        if not args.data.is_dir():
            print(f"skip: the data folder {args.data} is absent; this benchmark needs the real scans "
                  "(pass --data DIR). Nothing was run.")
            return 0
        args.data = args.data.resolve()
        protocol = {"folds": args.folds, "fold_seed": args.fold_seed, "budget_cpu_minutes": args.budget_cpu_minutes,
                    "data": str(args.data), "extra": args.extra}
        args.out.mkdir(parents=True, exist_ok=True)
        pfile = args.out / "protocol.json"
        if pfile.exists() and json.loads(pfile.read_text()) != protocol:
            raise SystemExit(f"{pfile} holds another protocol ({pfile.read_text().strip()}); use a new --out")
        pfile.write_text(json.dumps(protocol, indent=1) + "\n")
        failed = run_all(args)
    from report import write_all

    write_all(args.out, args.results, args.figures, args.tag)
    if failed:
        print("failed folds: " + ", ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
