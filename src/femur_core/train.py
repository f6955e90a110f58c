"""Train one model on every subject of a folder: ``python -m femur_core.train --data DIR --out MODEL_DIR``.

Early stopping uses an inner split of the subjects (``val_fraction``). The
model folder receives ``model.pt`` (weights, configuration and the
PRC-optimal threshold; loads without unpickling), ``config.json`` and the
training history. Interrupted runs resume when the same command is run again.

Data-parallel on several GPUs (or CPU processes): ``torchrun --nproc-per-node N
-m femur_core.train ...``; ``--batch-size`` is then per process, and only
rank 0 writes files and prints (see docs/scaling.md).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from . import distributed as _dist
from .cli import (TqdmProgress, add_common_training_args, cancel_on_sigint, config_from_args, dump_json,
                  environment_info, run_main)
from .data import find_subjects, inner_split, load_subjects
from .errors import InputError, OutputExistsError
from .volume_io import atomic_write_bytes
from .training import train_model

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m femur_core.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="folder of subjects (subNN_image/subNN_femur or imagesTr/labelsTr)")
    ap.add_argument("--out", required=True, help="model folder to create")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing finished model.pt")
    add_common_training_args(ap)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return _dist.run_in_process_group(_main, args, args.device)


def _main(args) -> int:
    is_main, world = _dist.is_main(), _dist.world_size()
    out = Path(args.out)
    if (out / "model.pt").exists() and not args.overwrite:
        raise OutputExistsError(out / "model.pt")
    cfg = config_from_args(args, "cpu-2d")
    subjects = load_subjects(find_subjects(args.data))
    if len(subjects) < 2:
        raise InputError(args.data, "training needs at least 2 subjects (one is held out for early stopping), "
                                    f"found {len(subjects)}")
    tr, es = inner_split([s.id for s in subjects], cfg.val_fraction, cfg.seed)
    by_id = {s.id: s for s in subjects}
    work = out / "training"
    t0 = time.monotonic()
    if is_main and args.overwrite and work.exists() and (out / "model.pt").exists():
        shutil.rmtree(work)
    _dist.barrier()
    res = train_model([by_id[i] for i in tr], [by_id[i] for i in es], cfg, work,
                      progress=TqdmProgress() if is_main else None, resume=True, cancel=cancel_on_sigint())
    if not is_main:
        return 0
    atomic_write_bytes(out / "model.pt", res.checkpoint.read_bytes(), overwrite=True)
    atomic_write_bytes(out / "config.json", dump_json({
        "data": str(Path(args.data).resolve()), "train_subjects": tr, "early_stopping_subjects": es,
        "train": res.config.to_dict(), "threshold": res.threshold, "epochs": res.epochs, "stop_reason": res.stop_reason,
        "train_minutes": res.minutes, "environment": environment_info(),
        **({"world_size": world, "global_batch_size": cfg.batch_size * world} if world > 1 else {})}),
        overwrite=True)
    best = max(res.history, key=lambda h: h["val_dsc"]) if res.history else {}
    print(f"model: {out / 'model.pt'}  epochs {res.epochs} ({res.stop_reason}), "
          f"{res.minutes:.1f} min training, best early-stopping DSC {best.get('val_dsc', float('nan')):.4f}, "
          f"threshold {res.threshold:.3f}  ({(time.monotonic() - t0) / 60:.1f} min in all)")
    return 0


if __name__ == "__main__":
    run_main(main)
