"""Cross-validation: ``python -m femur_core.cv``.

With no arguments it makes a small synthetic cohort and runs a 4-fold CV that
finishes in a few minutes on two CPU cores. With ``--data DIR`` it runs on a
folder of subjects. Folds are stratified on femur volume and recorded in
``splits.json``; each fold trains in ``fold<k>/`` (resumable) and is scored on
its untouched subjects on their original grids.

Protocols: ``honest`` (default) early-stops on an inner split of the training
folds; ``paper`` early-stops on the scored fold, as the study did (optimistic),
and also picks the threshold there.

Scale-out: ``--fold K`` runs one fold into a shared run folder (one job per
fold, e.g. a SLURM array), ``--collect RUN_DIR`` merges the finished folds
and names the missing ones; under ``torchrun`` each fold trains data-parallel
and only rank 0 writes (see docs/scaling.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import distributed as _dist
from .cli import (TqdmProgress, add_common_training_args, args_from_config, cancel_on_sigint, config_from_args,
                  dump_json, environment_info, run_main)
from .data import SUBJECT_FILE, Subject, find_subjects, load_subjects, make_folds
from .ensemble import fit, member_split
from .errors import InputError, OutputExistsError
from .inference import load_model, predict_volume
from .calibration import threshold_from_counts
from .metrics import curves_from_counts, evaluate, histogram_counts, volume_ml
from .progress import CancelToken, ProgressCallback, ProgressEvent, Stage, emit
from .report import format_table, write_report
from .training import TrainConfig, train_model
from .volume_io import atomic_write_bytes, write_volume

__all__ = ["CVSetup", "fold_split", "fold_subjects", "cv_command", "setup_run", "run_fold", "main"]


@dataclass
class CVSetup:
    run_dir: Path
    subjects: dict[str, Subject]
    folds: list[list[str]]
    config: TrainConfig
    protocol: str


def _check_same(path: Path, new: dict, what: str) -> None:
    old = json.loads(path.read_text())
    if old != new:
        raise InputError(path, f"this run folder holds another run ({what} differ); "
                               "use a new --out folder (run folders never mix two runs)")


def fold_split(subjects: list[Subject], n_folds: int, seed: int = 0) -> list[list[str]]:
    """The cross-validation folds of a cohort: stratified on femur volume (the one split of CLI and GUI)."""
    strata = {s.id: volume_ml(s.mask.data, s.mask.spacing) for s in subjects}
    return make_folds([s.id for s in subjects], n_folds, seed, strata)


def fold_subjects(setup: CVSetup, k: int) -> tuple[list[str], list[str], list[str]]:
    """Subject ids of fold ``k``: (training, early stopping, test).

    Honest protocol: early stopping on an inner split of the training folds;
    the study's protocol ("paper"): on the test fold itself.
    """
    test_ids = list(setup.folds[k])
    train_ids = [i for f, ids in enumerate(setup.folds) if f != k for i in ids]
    if setup.protocol == "honest":  # one network's inner split, or every ensemble member's (union)
        splits = member_split([setup.subjects[i] for i in train_ids], setup.config, setup.config.seed + k)
        tr_ids = sorted({i for tr, _ in splits for i in tr})
        es_ids = sorted({i for _, es in splits for i in es})
    else:
        tr_ids, es_ids = train_ids, test_ids
    return tr_ids, es_ids, test_ids


def cv_command(config: TrainConfig, recipe_name: str, *, data: "str | os.PathLike", out: "str | os.PathLike",
               n_folds: int, fold: int | None = None, protocol: str = "honest") -> list[str]:
    """The ``python -m femur_core.cv`` command line that runs ``config`` (``seed`` also seeds the split).

    Raises
    ------
    ValueError
        The configuration holds settings no flag sets.
    """
    cmd = ["python", "-m", "femur_core.cv", "--data", os.fspath(data), "--out", os.fspath(out),
           "--folds", str(n_folds)]
    if fold is not None:
        cmd += ["--fold", str(fold)]
    if protocol != "honest":
        cmd += ["--protocol", protocol]
    return cmd + args_from_config(config, recipe_name)


def setup_run(run_dir: "str | os.PathLike", subjects: list[Subject], config: TrainConfig, n_folds: int = 4,
              seed: int = 0, protocol: str = "honest", data: str | None = None) -> CVSetup:
    """Create (or re-open, for resuming) a run folder with config.json and splits.json."""
    if protocol not in ("honest", "paper"):
        raise ValueError("protocol must be 'honest' or 'paper'")
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    folds = fold_split(subjects, n_folds, seed)
    splits = {"stratified_on": "femur volume (ml), blocks of n_folds dealt at random", "seed": seed,
              "folds": folds}
    settings = {"protocol": protocol, "n_folds": n_folds, "seed": seed, "data": data,
                "train": config.to_dict()}
    if (run / "splits.json").exists():
        _check_same(run / "splits.json", splits, "splits")
    if (run / "config.json").exists():
        _check_same_settings(run / "config.json", settings)
    else:
        try:
            atomic_write_bytes(run / "config.json", dump_json({**settings, "environment": environment_info()}))
        except OutputExistsError:  # a fold job started at the same time wrote it first
            _check_same_settings(run / "config.json", settings)
    if not (run / "splits.json").exists():
        try:
            atomic_write_bytes(run / "splits.json", dump_json(splits))
        except OutputExistsError:
            _check_same(run / "splits.json", splits, "splits")
    return CVSetup(run, {s.id: s for s in subjects}, folds, config, protocol)


def _check_same_settings(path: Path, settings: dict) -> None:
    old = json.loads(path.read_text())
    old = {k: old.get(k) for k in settings}
    if isinstance(old.get("train"), dict):  # settings added since the run started: at their defaults
        old["train"] = TrainConfig.from_dict(old["train"]).to_dict()
    if json.loads(json.dumps(old)) != json.loads(json.dumps(settings)):
        raise InputError(path, "this run folder holds another run (settings differ); "
                               "use a new --out folder (run folders never mix two runs)")


def run_fold(setup: CVSetup, k: int, progress: ProgressCallback | None = None,
             cancel: CancelToken | None = None, write_predictions: bool = True) -> dict:
    """Train fold ``k`` (resuming if interrupted) and score its subjects.

    Returns the fold result, also written atomically to ``fold<k>/result.json``
    (its presence marks the fold finished).
    """
    fold_dir = setup.run_dir / f"fold{k}"
    done = fold_dir / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    cfg = setup.config
    tr_ids, es_ids, test_ids = fold_subjects(setup, k)
    if setup.protocol == "honest":  # one network on an inner split, or an ensemble of inner folds
        train_ids = [i for f, ids in enumerate(setup.folds) if f != k for i in ids]
        res = fit([setup.subjects[i] for i in train_ids], cfg, fold_dir, progress=progress, cancel=cancel,
                  seed=cfg.seed + k, fold=k)
    else:
        if cfg.ensemble > 1:
            raise InputError(None, "the paper protocol early-stops on the scored fold: it trains one network "
                                   "(use --ensemble 1)")
        res = train_model([setup.subjects[i] for i in tr_ids], [setup.subjects[i] for i in es_ids], cfg, fold_dir,
                          progress=progress, cancel=cancel, resume=True, fold=k)
    if not _dist.is_main():  # torchrun: rank 0 scores and writes; the others read its result
        _dist.barrier()
        return json.loads(done.read_text())
    model = load_model(res.checkpoint)
    preds = {}
    pos = neg = None
    for j, sid in enumerate(test_ids):
        s = setup.subjects[sid]
        emit(progress, ProgressEvent(Stage.SCORE, j, len(test_ids), fold=k, message=f"scoring {sid}"))
        p = predict_volume(model, s.image, flip_tta=cfg.flip_tta, cleanup=cfg.cleanup, device=cfg.device,
                           precision=cfg.precision, cancel=cancel)
        preds[sid] = p
        ps, ns = histogram_counts(p.prob.data, s.mask.data.astype(bool))
        pos = ps if pos is None else pos + ps
        neg = ns if neg is None else neg + ns
    curves = curves_from_counts(pos, neg)
    thr = model.threshold
    if setup.protocol == "paper":  # the study: operating point on the scored fold itself
        thr = threshold_from_counts(pos, neg, bounds=None)
    subjects, raw = _score(setup, preds, test_ids, thr, write_predictions)
    np.savez(fold_dir / "curves.tmp.npz", pos=pos, neg=neg)
    os.replace(fold_dir / "curves.tmp.npz", fold_dir / "curves.npz")
    result = {"fold": k, "threshold": thr, "protocol": setup.protocol, "train_subjects": tr_ids,
              "early_stopping_subjects": es_ids, "test_subjects": test_ids, "epochs": res.epochs,
              "aux_labels": res.config.aux_labels, "ensemble": cfg.ensemble,
              "stop_reason": res.stop_reason, "train_minutes": res.minutes,
              "roc_auc": curves.roc_auc(), "average_precision": curves.average_precision(),
              "subjects": subjects}
    if raw is not None:
        result["subjects_no_cleanup"] = raw
    if _dist.world_size() > 1:
        result["world_size"] = _dist.world_size()
    atomic_write_bytes(done, dump_json(result), overwrite=True)
    _dist.barrier()
    emit(progress, ProgressEvent(Stage.FOLD_END, fold=k, message=f"fold {k} done"))
    return result


def _score(setup: CVSetup, preds: dict, test_ids: list[str], thr: float,
           write_predictions: bool) -> tuple[list[dict], list[dict] | None]:
    """Per-subject metrics of the masks at ``thr`` on each subject's own grid.

    Returns the metrics of the masks as the model makes them (with its
    cleanup, when it has one) and, for a model with cleanup, those of the
    same probability maps without it (the post-processing gain, the
    study's Table 2), else None.
    """
    subjects, raw = [], []
    cleanup = setup.config.cleanup
    for sid in test_ids:
        s, p = setup.subjects[sid], preds[sid]
        ref = s.mask.data.astype(bool)
        mask = p.mask.data if thr == p.threshold else p.mask_at(thr).data
        subjects.append({"subject": sid, **evaluate(mask.astype(bool), ref, s.image.spacing).to_dict()})
        if cleanup:
            bare = p.mask_at(thr, cleanup=False).data.astype(bool)
            raw.append({"subject": sid, **evaluate(bare, ref, s.image.spacing).to_dict()})
        if write_predictions:
            write_volume(p.mask.with_data(mask.astype(np.uint8)), setup.run_dir / "predictions" / f"{sid}_mask.nii.gz",
                         overwrite=True, dtype=np.uint8)
    return subjects, (raw if cleanup else None)


def _has_images(folder: Path) -> bool:
    """Whether a folder holds at least one subject image (``<id>_image.nii.gz``)."""
    return any((m := SUBJECT_FILE.match(p.name)) and m["kind"] == "image" for p in folder.iterdir())


def _load_data(args) -> tuple[list[Subject], str]:
    if args.data:
        files = find_subjects(args.data)
        return load_subjects(files), str(Path(args.data).resolve())
    from .synthetic import make_cohort

    data_dir = Path(args.out) / "synthetic_data"
    if _dist.is_main() and (not data_dir.exists() or not _has_images(data_dir)):
        print(f"no --data given: making a synthetic cohort of {args.n_synthetic} subjects in {data_dir}",
              file=sys.stderr)
        make_cohort(data_dir, n=args.n_synthetic, seed=args.seed, geometry="dev", downsample=4)
    _dist.barrier()
    return load_subjects(find_subjects(data_dir)), f"synthetic:{args.n_synthetic}:seed{args.seed}"


def _check_enough_subjects(n: int, n_folds: int, protocol: str, data: "str | None") -> None:
    """Refuse, in one line, a cohort too small for the folds (every fold needs >= 2 training subjects
    under the honest protocol: one to train on, one to early-stop on)."""
    if n_folds < 2:
        raise InputError(None, f"--folds must be at least 2, got {n_folds}")
    smallest_train = n - -(-n // n_folds)  # n minus the largest fold
    if n < n_folds or (protocol == "honest" and smallest_train < 2):
        raise InputError(data, f"{n} subject(s) are too few for {n_folds}-fold cross-validation "
                               f"(use fewer --folds or more subjects)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m femur_core.cv", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="folder of subNN_image/subNN_femur pairs or imagesTr/labelsTr "
                                   "(default: a synthetic cohort)")
    ap.add_argument("--out", help="run folder (default runs/cv-<time>)")
    ap.add_argument("--folds", type=int, default=4)
    ap.add_argument("--fold", type=int, help="run only this fold (0-based) into the shared run folder")
    ap.add_argument("--collect", metavar="RUN_DIR", help="merge finished folds of RUN_DIR into its report")
    ap.add_argument("--protocol", choices=["honest", "paper"], default="honest")
    ap.add_argument("--fold-seed", type=int, help="seed of the outer folds (default: --seed), to compare "
                                                  "training seeds on the same folds")
    ap.add_argument("--n-synthetic", type=int, default=8, help="subjects in the default synthetic cohort")
    add_common_training_args(ap)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.collect:
        run = Path(args.collect)
        if not (run / "splits.json").exists():
            raise InputError(run, "not a cross-validation run folder (no splits.json)")
        report, missing = write_report(run)
        if report["folds"]:
            print(format_table(report["folds"], report["summary"]))
        if missing:
            print(f"missing folds: {', '.join(map(str, missing))} (run them with --fold K --out {run})")
            return 1
        return 0
    return _dist.run_in_process_group(_run, args, args.device)


def _run(args) -> int:
    is_main = _dist.is_main()
    if args.fold is not None and not args.out:
        raise InputError(None, "--fold needs --out RUN_DIR, the run folder that the fold jobs share")
    default_recipe = "cpu-2d" if args.data else "synthetic-quick"
    cfg = config_from_args(args, default_recipe)
    args.out = args.out or f"runs/cv-{time.strftime('%Y%m%d-%H%M%S')}"
    subjects, data_desc = _load_data(args)
    _check_enough_subjects(len(subjects), args.folds, args.protocol, args.data)
    if args.fold is not None and not 0 <= args.fold < args.folds:
        raise InputError(None, f"--fold {args.fold} is outside 0..{args.folds - 1}")
    fold_seed = args.seed if args.fold_seed is None else args.fold_seed
    if is_main:  # torchrun: rank 0 writes config.json / splits.json, the others then check them
        setup = setup_run(args.out, subjects, cfg, args.folds, fold_seed, args.protocol, data_desc)
    _dist.barrier()
    if not is_main:
        setup = setup_run(args.out, subjects, cfg, args.folds, fold_seed, args.protocol, data_desc)
    folds = [args.fold] if args.fold is not None else range(args.folds)
    bar = TqdmProgress()
    t0 = time.monotonic()
    cancel = cancel_on_sigint()  # Ctrl-C: stop before the next step, keep a resumable state
    for k in folds:
        r = run_fold(setup, k, progress=bar if is_main else None, cancel=cancel)
        bar.close()
        if not is_main:
            continue
        print(f"fold {k}: DSC {np.mean([s['dsc'] for s in r['subjects']]):.4f} "
              f"({r['epochs']} epochs, {r['stop_reason']}, {r['train_minutes']:.1f} min)", file=sys.stderr)
    if not is_main:
        return 0
    report, missing = write_report(setup.run_dir)
    print(format_table(report["folds"], report["summary"]))
    print(f"run folder: {setup.run_dir}  ({(time.monotonic() - t0) / 60:.1f} min)")
    if missing:
        print(f"missing folds: {', '.join(map(str, missing))}")
    return 0


if __name__ == "__main__":
    run_main(main)
