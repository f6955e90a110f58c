"""Train one model on every subject of a folder: ``python -m femur_core.train --data DIR --out MODEL_DIR``.

Early stopping uses an inner split of the subjects (``val_fraction``). The
model folder receives ``model.pt`` (weights, configuration and the
PRC-optimal threshold; loads without unpickling), ``config.json`` and the
training history. Interrupted runs resume when the same command is run again.

Fine-tuning: ``--init-from MODEL`` starts from an existing model (its
architecture and grid, the recipe's other settings, a 10x smaller learning
rate; see :mod:`femur_core.finetune`), e.g. after corrected scans were added
to the folder. :func:`train_final_model` is the same run as a function (the
napari Train widget calls it in a thread worker).

Data-parallel on several GPUs (or CPU processes): ``torchrun --nproc-per-node N
-m femur_core.train ...``; ``--batch-size`` is then per process, and only
rank 0 writes files and prints (see docs/scaling.md).
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import distributed as _dist
from .cli import (TqdmProgress, add_common_training_args, cancel_on_sigint, config_from_args, dump_json,
                  environment_info, run_main)
from .data import Subject, find_subjects, load_subjects
from .ensemble import FitResult, fit
from .errors import InputError, OutputExistsError
from .finetune import finetune_config
from .progress import CancelToken, ProgressCallback
from .training import TrainConfig, best_validation_dsc
from .volume_io import atomic_write_bytes

__all__ = ["main", "train_final_model", "FinalModel"]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m femur_core.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="folder of subjects (subNN_image/subNN_femur or imagesTr/labelsTr)")
    ap.add_argument("--out", required=True, help="model folder to create")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing finished model.pt")
    ap.add_argument("--init-from", metavar="MODEL",
                    help="fine-tune: start from this model (model.pt or its folder); keeps its architecture "
                         "and grid, takes the recipe's other settings with a 10x smaller learning rate")
    add_common_training_args(ap)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return _dist.run_in_process_group(_main, args, args.device)


@dataclass
class FinalModel:
    """What :func:`train_final_model` left in its model folder."""

    model: Path  # model.pt
    result: FitResult
    train_subjects: list[str]
    early_stopping_subjects: list[str]


def train_final_model(
    subjects: list[Subject],
    config: TrainConfig,
    out: "str | os.PathLike",
    *,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    init_from: "str | os.PathLike | None" = None,
    data: str | None = None,
    overwrite: bool = False,
) -> FinalModel:
    """Train the model to keep on every subject (early stopping on an inner split).

    Parameters
    ----------
    subjects : list of Subject
        At least 2 (one is held out for early stopping).
    config : TrainConfig
        The recipe (for fine-tuning, :func:`femur_core.finetune.finetune_config`).
    out : path-like
        Model folder: ``model.pt``, ``config.json``, ``training/`` (resumable).
    progress, cancel
        As in :func:`femur_core.training.train_model`.
    init_from : path-like, optional
        Fine-tune: start from this model's weights.
    data : str, optional
        Where the subjects came from (recorded in ``config.json``).
    overwrite : bool
        Replace a finished ``model.pt`` (else :class:`OutputExistsError`).
    """
    is_main, world = _dist.is_main(), _dist.world_size()
    out = Path(out)
    if (out / "model.pt").exists() and not overwrite:
        raise OutputExistsError(out / "model.pt")
    if len(subjects) < 2:
        raise InputError(data, "training needs at least 2 subjects (one is held out for early stopping), "
                               f"found {len(subjects)}")
    work = out / "training"
    if is_main and overwrite and work.exists() and (out / "model.pt").exists():
        shutil.rmtree(work)
    _dist.barrier()
    res = fit(subjects, config, work, progress=progress, cancel=cancel, init_from=init_from)
    tr = sorted({i for s in res.split for i in s["train"]})
    es = sorted({i for s in res.split for i in s["early_stopping"]})
    if is_main:
        atomic_write_bytes(out / "model.pt", res.model_file.read_bytes(), overwrite=True)
        atomic_write_bytes(out / "config.json", dump_json({
            "data": data, "train_subjects": tr, "early_stopping_subjects": es, "members": res.split,
            **({"init_from": str(Path(init_from).resolve())} if init_from is not None else {}),
            "train": res.config.to_dict(), "threshold": res.threshold, "threshold_source": res.threshold_source,
            "epochs": res.epochs, "member_epochs": [m.epochs for m in res.members],
            **({"out_of_fold_dsc": res.out_of_fold} if res.out_of_fold else {}),
            **({"pretrain": res.pretrain} if res.pretrain else {}),
            "stop_reason": res.stop_reason, "train_minutes": res.minutes, "environment": environment_info(),
            **({"world_size": world, "global_batch_size": config.batch_size * world} if world > 1 else {})}),
            overwrite=True)
    return FinalModel(out / "model.pt", res, tr, es)


def _main(args) -> int:
    is_main = _dist.is_main()
    out = Path(args.out)
    if (out / "model.pt").exists() and not args.overwrite:
        raise OutputExistsError(out / "model.pt")
    cfg = config_from_args(args, "cpu-2d")
    if args.init_from:
        cfg = finetune_config(args.init_from, cfg)
    subjects = load_subjects(find_subjects(args.data))
    t0 = time.monotonic()
    final = train_final_model(subjects, cfg, out, progress=TqdmProgress() if is_main else None,
                              cancel=cancel_on_sigint(), init_from=args.init_from,
                              data=str(Path(args.data).resolve()), overwrite=args.overwrite)
    if not is_main:
        return 0
    res = final.result
    best = [best_validation_dsc(m.history) for m in res.members]
    print(f"model: {final.model}  {len(res.members)} member(s), epochs "
          f"{'+'.join(str(m.epochs) for m in res.members)} ({res.stop_reason}), {res.minutes:.1f} min training, "
          f"best early-stopping DSC {' / '.join(f'{b:.4f}' for b in best)}, threshold {res.threshold:.3f} "
          f"from {res.threshold_source}  ({(time.monotonic() - t0) / 60:.1f} min in all)")
    if res.out_of_fold:
        d = np.array([o["dsc"] for o in res.out_of_fold])
        worst = min(res.out_of_fold, key=lambda o: o["dsc"])
        print(f"out-of-fold DSC of one member (a {len(res.members)}-fold CV inside the training): "
              f"{d.mean():.3f} +- {d.std(ddof=1) if len(d) > 1 else 0.0:.3f}, lowest {worst['dsc']:.3f} "
              f"({worst['subject']}); the averaged ensemble is not scored here")
    return 0

if __name__ == "__main__":
    run_main(main)
