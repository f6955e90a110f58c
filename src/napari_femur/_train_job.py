"""The Train panel's jobs, without Qt: what runs in the training process (or thread).

:func:`train_job` is a generator of femur_core progress events that returns a
:class:`TrainOutcome`: one fold (``python -m femur_core.cv --fold k``), all folds
(the whole cross-validation and its report) or the final model on every subject
(``python -m femur_core.train``, optionally fine-tuned). :func:`run_train_job`
is the same job as a plain function with ``progress`` / ``cancel`` keywords, the
form :func:`femur_core.worker_process.run_in_process` runs in a child process;
:func:`train_in_process` is the Train panel's thread-worker generator that
relays that child's events to the GUI.

Nothing here imports napari or Qt: the training process loads torch and
femur_core only.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from femur_core.errors import InputError
from femur_core.progress import CancelToken, ProgressCallback, ProgressEvent, emit
from femur_core.training import TrainConfig

from ._workers import iter_progress

__all__ = ["TrainPlan", "TrainOutcome", "train_job", "run_train_job", "train_in_process", "read_history"]

def read_history(fold_dir: "str | os.PathLike") -> list[dict]:
    """The per-epoch history of a training folder (``history.csv``), or []."""
    p = Path(fold_dir) / "history.csv"
    if not p.is_file():
        return []
    with open(p, newline="") as fh:
        rows = list(csv.DictReader(fh))
    out = []
    for r in rows:
        out.append({k: (float(v) if k != "epoch" else int(float(v))) for k, v in r.items() if v not in (None, "")})
    return out


@dataclass
class TrainPlan:
    """Everything a training run needs, gathered in the GUI thread.

    Attributes
    ----------
    run_dir : Path
        Run folder (shared by the folds).
    fold, n_folds, seed : int
        Fold k (0-based, as ``--fold``) of K, and the split / training seed.
    config : TrainConfig
        The training recipe with the widget's changes.
    data_dir : Path or None
        Folder of ``subNN_image`` / ``subNN_femur`` pairs.
    extra : list of Subject
        Training pairs made from open layers.
    resume : bool
        Continue an interrupted run (Resume) rather than start one (Train).
    """

    run_dir: Path
    fold: int
    n_folds: int
    config: TrainConfig
    data_dir: Path | None = None
    extra: list = field(default_factory=list)
    seed: int = 0
    resume: bool = False
    mode: str = "fold"
    init_from: Path | None = None

    @property
    def fold_dir(self) -> Path:
        if self.mode == "final":
            return self.run_dir / "training"
        if self.data_dir is None:
            return self.run_dir / "layers"
        return self.run_dir / (f"fold{self.fold}-with-layers" if self.extra else f"fold{self.fold}")


@dataclass
class TrainOutcome:
    """What the worker returns."""

    checkpoint: Path
    history: list[dict]
    fold_dir: Path
    test_dsc: float | None = None
    threshold: float | None = None
    stop_reason: str = ""
    note: str = ""
    cv_summary: dict | None = None


def _subjects_cache_key(folder: Path) -> tuple:
    files = sorted((p.name, p.stat().st_mtime_ns) for p in folder.iterdir() if p.name.endswith((".nii", ".nii.gz")))
    return (str(folder.resolve()), tuple(files))


def train_job(plan: TrainPlan, cancel: CancelToken,
              subject_cache: dict | None = None) -> Generator[ProgressEvent, None, TrainOutcome]:
    """The thread worker's generator: load data, train (or resume) fold k, yield progress.

    Returns
    -------
    TrainOutcome
    """
    from femur_core.cv import fold_subjects, run_fold, setup_run
    from femur_core.data import find_subjects, load_subjects
    from femur_core.training import train_model

    cfg = plan.config
    subjects: list = []
    if plan.data_dir is not None:
        yield ProgressEvent("load", message=f"reading subjects in {plan.data_dir}")
        key = _subjects_cache_key(plan.data_dir)
        if subject_cache is not None and key in subject_cache:
            subjects = subject_cache[key]
        else:
            subjects = load_subjects(find_subjects(plan.data_dir))
            if subject_cache is not None:
                subject_cache.clear()
                subject_cache[key] = subjects
        cancel.raise_if_cancelled()
    if plan.mode == "final":
        return (yield from _final_job(plan, subjects, cancel))
    if plan.mode == "cv":
        return (yield from _cv_job(plan, subjects, cancel))
    fd = plan.fold_dir
    if not plan.resume and ((fd / "last.pt").exists() or (fd / "result.json").exists()):
        raise InputError(fd, "this fold was already trained or started here (e.g. from a terminal); press "
                             "Resume to continue it, or choose another output folder")
    if subjects:
        # the run folder, folds and splits.json of `python -m femur_core.cv --data DIR --out RUN --folds K`
        setup = setup_run(plan.run_dir, subjects, cfg, plan.n_folds, plan.seed, "honest",
                          str(plan.data_dir.resolve()))
    if subjects and not plan.extra:
        # exactly `python -m femur_core.cv ... --fold k`
        result = yield from iter_progress(run_fold, setup, plan.fold, cancel=cancel)
        dscs = [s["dsc"] for s in result.get("subjects", []) if s.get("dsc") is not None]
        return TrainOutcome(plan.fold_dir / "best.pt", read_history(plan.fold_dir), plan.fold_dir,
                            float(np.mean(dscs)) if dscs else None, result.get("threshold"),
                            result.get("stop_reason", ""),
                            f"test subjects of fold {plan.fold}: {', '.join(result.get('test_subjects', []))}")
    if subjects:
        tr_ids, es_ids, test_ids = fold_subjects(setup, plan.fold)
        train = [setup.subjects[i] for i in tr_ids] + list(plan.extra)
        val = [setup.subjects[i] for i in es_ids]
        note = (f"{len(plan.extra)} layer pair(s) added to training; fold {plan.fold} subjects "
                f"({', '.join(test_ids)}) kept out")
    else:
        train = list(plan.extra)
        val = list(plan.extra)
        note = "trained on open layers only: the validation DSC is measured on the training data"
    res = yield from iter_progress(train_model, train, val, cfg, plan.fold_dir, resume=True, cancel=cancel,
                                   fold=plan.fold)
    return TrainOutcome(res.checkpoint, list(res.history), plan.fold_dir, None, res.threshold,
                        res.stop_reason, note)


def _final_job(plan: TrainPlan, subjects: list, cancel: CancelToken) -> Generator[ProgressEvent, None, TrainOutcome]:
    """The final model on every subject (femur_core.train.train_final_model), optionally fine-tuned."""
    from femur_core.train import train_final_model

    subjects = list(subjects) + list(plan.extra)
    if not plan.resume and (plan.fold_dir / "last.pt").exists():
        raise InputError(plan.fold_dir, "a model was already started here; press Resume to continue it, "
                                        "or choose another output folder")
    data = str(plan.data_dir.resolve()) if plan.data_dir is not None else None
    final = yield from iter_progress(train_final_model, subjects, plan.config, plan.run_dir, cancel=cancel,
                                     init_from=plan.init_from, data=data)
    res = final.result
    start = f"fine-tuned from {plan.init_from}; " if plan.init_from is not None else ""
    return TrainOutcome(final.model, list(res.history), plan.fold_dir, None, res.threshold, res.stop_reason,
                        f"{start}trained on {len(final.train_subjects)} subjects, early stopping on "
                        f"{', '.join(final.early_stopping_subjects)}")


def _cv_job(plan: TrainPlan, subjects: list, cancel: CancelToken) -> Generator[ProgressEvent, None, TrainOutcome]:
    """Every fold of a cross-validation (finished folds are kept, an interrupted one resumes), then the report."""
    from femur_core.cv import run_fold, setup_run
    from femur_core.report import write_report

    if plan.extra:
        raise InputError(None, "open layer pairs can be added to one fold or to the final model, not to a "
                               "whole cross-validation (its folds are scored on the data folder alone)")
    setup = setup_run(plan.run_dir, subjects, plan.config, plan.n_folds, plan.seed, "honest",
                      str(plan.data_dir.resolve()))
    last = None
    for k in range(plan.n_folds):
        result = yield from iter_progress(run_fold, setup, k, cancel=cancel)
        yield ProgressEvent("fold_result", k, plan.n_folds, fold=k, message=json.dumps(result))
        last = k, result
    report, _missing = write_report(plan.run_dir)
    k, result = last
    fold_dir = plan.run_dir / f"fold{k}"
    summary = report.get("summary", {})
    return TrainOutcome(fold_dir / "best.pt", read_history(fold_dir), fold_dir,
                        summary.get("dsc_mean"), result.get("threshold"), result.get("stop_reason", ""),
                        f"{plan.n_folds}-fold cross-validation in {plan.run_dir} (report.json, metrics.csv, "
                        "plots, predictions/)", summary)


def run_train_job(plan: TrainPlan, *, progress: ProgressCallback | None = None,
                  cancel: CancelToken | None = None) -> TrainOutcome:
    """:func:`train_job` as a plain function: each event goes to ``progress``; returns the outcome."""
    job = train_job(plan, cancel if cancel is not None else CancelToken())
    while True:
        try:
            event = next(job)
        except StopIteration as stop:
            return stop.value
        emit(progress, event)


def train_in_process(plan: TrainPlan, cancel: CancelToken) -> Generator[ProgressEvent, None, TrainOutcome]:
    """The thread worker's generator: :func:`run_train_job` in a child process, its events yielded here.

    Training then neither holds this process's interpreter lock nor competes with
    the viewer's thread for it; Cancel reaches the child through ``cancel``.
    """
    from femur_core.worker_process import run_in_process

    # niceness: the viewer's event loop wins the CPU whenever it needs it (2 cores: both are training's)
    return (yield from iter_progress(run_in_process, run_train_job, plan, cancel=cancel, niceness=10))
