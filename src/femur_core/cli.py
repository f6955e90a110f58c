"""Shared pieces of the command lines: one-line errors, progress bars, run metadata."""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from .errors import Cancelled, FemurError
from .progress import CancelToken, ProgressEvent

__all__ = ["run_main", "cancel_on_sigint", "TqdmProgress", "environment_info", "add_common_training_args",
           "config_from_args"]


def cancel_on_sigint() -> CancelToken:
    """A cancel token that the first Ctrl-C sets: training then stops before its next step and
    saves a resumable state (no half-applied optimiser step); a second Ctrl-C interrupts at once.
    :func:`run_main` puts the previous SIGINT handler back when the command ends."""
    token = CancelToken()
    if threading.current_thread() is not threading.main_thread():
        return token
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        if token.cancelled:
            raise KeyboardInterrupt
        token.cancel()

    signal.signal(signal.SIGINT, handler)
    _SIGINT_HANDLERS.append(previous)
    return token


_SIGINT_HANDLERS: list = []


def run_main(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> None:
    """Run a CLI entry point: user errors become one line on stderr and exit code 2."""
    try:
        code = main(argv)
    except FemurError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 130 if isinstance(exc, Cancelled) else 2
    except KeyboardInterrupt:
        print("interrupted: the last checkpoint is kept; run the same command again to resume", file=sys.stderr)
        code = 130
    except (MemoryError, RuntimeError) as exc:  # torch.OutOfMemoryError is a RuntimeError
        if isinstance(exc, RuntimeError) and "out of memory" not in str(exc).lower():
            raise
        print("error: out of memory; try a smaller model, --device cpu or a coarser grid", file=sys.stderr)
        code = 2
    except OSError as exc:  # disk full, permissions while writing
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        code = 2
    finally:
        while _SIGINT_HANDLERS:
            signal.signal(signal.SIGINT, _SIGINT_HANDLERS.pop())
    sys.exit(code)


class TqdmProgress:
    """A progress callback that drives tqdm bars (one per epoch and one for prediction)."""

    def __init__(self, disable: bool | None = None):
        from tqdm.auto import tqdm

        self._tqdm = tqdm
        self._bar = None
        self._key = None
        self.disable = (not sys.stderr.isatty()) if disable is None else disable

    def __call__(self, ev: ProgressEvent) -> None:
        if ev.stage in ("train", "predict"):
            key = (ev.stage, ev.fold, ev.epoch, ev.total)
            if key != self._key:
                self.close()
                desc = (f"fold {ev.fold} " if ev.fold is not None else "") + (
                    f"epoch {ev.epoch}" if ev.stage == "train" else ev.message or "predict")
                self._bar = self._tqdm(total=ev.total, desc=desc, leave=False, disable=self.disable,
                                       file=sys.stderr)
                self._key = key
            self._bar.n = ev.step
            if ev.loss is not None:
                self._bar.set_postfix(loss=f"{ev.loss:.4f}", refresh=False)
            self._bar.refresh()
        elif ev.stage == "epoch_end":
            self.close()
            fold = f"fold {ev.fold} " if ev.fold is not None else ""
            print(f"{fold}epoch {ev.epoch}: loss {ev.loss:.4f}  val DSC {ev.val_dsc:.4f}", file=sys.stderr)
        elif ev.stage in ("done", "resume", "info"):
            self.close()
            print(ev.message, file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            self._key = None


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except Exception:
        return None


def environment_info() -> dict:
    """Versions, machine and git commit, for config.json."""
    import numpy
    import scipy
    import torch

    from . import __version__

    return {
        "femur_core": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "git_commit": _git_commit(),
        "argv": sys.argv,
    }


def add_common_training_args(ap: argparse.ArgumentParser) -> None:
    from .loss import LOSSES
    from .models.registry import MODELS
    from .training import RECIPES

    g = ap.add_argument_group("model and training")
    g.add_argument("--recipe", choices=list(RECIPES), help="named starting configuration")
    g.add_argument("--model", choices=list(MODELS), help="network from the registry: " +
                   "; ".join(f"{k}: {v.description}" for k, v in MODELS.items()))
    g.add_argument("--features", type=int, help="F, feature maps of the first level")
    g.add_argument("--levels", type=int, help="L, resolution levels per path")
    g.add_argument("--loss", choices=list(LOSSES))
    g.add_argument("--lr", type=float)
    g.add_argument("--lr-schedule", choices=["constant", "poly"],
                   help="poly anneals the rate to ~0 over the budget (or the epochs)")
    g.add_argument("--aux-labels", choices=["on", "off"],
                   help="on: train with an extra 'other bone' class from subNN_bones.nii.gz label maps, "
                        "where every subject has one")
    g.add_argument("--batch-size", type=int, help="samples per step (under torchrun: per process)")
    g.add_argument("--epochs", type=int, help="maximum epochs")
    g.add_argument("--min-epochs", type=int)
    g.add_argument("--patience", type=int)
    g.add_argument("--budget-minutes", type=float, help="wall-clock training budget per model")
    g.add_argument("--in-plane-spacing", type=float, help="model grid pixel size in mm")
    g.add_argument("--in-plane-size", type=int, help="model grid matrix (the study: 256)")
    g.add_argument("--central-slices", type=int, help="keep the central N slices (the study: 48)")
    g.add_argument("--augment", help="comma list of flip,intensity,affine")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto uses bf16 where the hardware runs it fast; fp32 forces full precision")


def config_from_args(args: argparse.Namespace, default_recipe: str):
    """A TrainConfig: the recipe, then every flag the user gave."""
    from .models.registry import default_config
    from .training import recipe

    cfg = recipe(args.recipe or default_recipe)
    if args.model and args.model != cfg.model.name:
        cfg.model = default_config(args.model)
    if args.features:
        cfg.model.features = args.features
    if args.levels:
        cfg.model.levels = args.levels
    for flag, attr in (("loss", "loss"), ("lr", "lr"), ("lr_schedule", "lr_schedule"), ("epochs", "max_epochs"), ("min_epochs", "min_epochs"),
                       ("patience", "patience"), ("budget_minutes", "max_minutes"), ("batch_size", "batch_size")):
        v = getattr(args, flag, None)
        if v is not None:
            setattr(cfg, attr, v)
    if args.epochs is not None and args.min_epochs is None:
        cfg.min_epochs = min(cfg.min_epochs, args.epochs)
    for flag in ("in_plane_spacing", "in_plane_size", "central_slices"):
        v = getattr(args, flag, None)
        if v is not None:
            setattr(cfg.grid, flag, v)
            if flag == "in_plane_size":
                cfg.grid.in_plane_spacing = None
    if getattr(args, "aux_labels", None) is not None:
        cfg.aux_labels = args.aux_labels == "on"
    if args.augment is not None:
        cfg.augment = [a for a in args.augment.split(",") if a]
    cfg.seed, cfg.device, cfg.precision = args.seed, args.device, args.precision
    return cfg


def dump_json(obj) -> bytes:
    return (json.dumps(obj, indent=2, default=str) + "\n").encode()
