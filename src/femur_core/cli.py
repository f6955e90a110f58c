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
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .errors import Cancelled, FemurError, InputError
from .progress import CancelToken, ProgressEvent, Stage

__all__ = ["run_main", "cancel_on_sigint", "TqdmProgress", "environment_info", "add_common_training_args",
           "config_from_args", "config_from_overrides", "config_overrides", "args_from_config"]


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
        if ev.stage in (Stage.TRAIN, Stage.PREDICT):
            key = (ev.stage, ev.fold, ev.epoch, ev.total)
            if key != self._key:
                self.close()
                desc = (f"fold {ev.fold} " if ev.fold is not None else "") + (
                    f"epoch {ev.epoch}" if ev.stage is Stage.TRAIN else ev.message or "predict")
                self._bar = self._tqdm(total=ev.total, desc=desc, leave=False, disable=self.disable,
                                       file=sys.stderr)
                self._key = key
            self._bar.n = ev.step
            if ev.loss is not None:
                self._bar.set_postfix(loss=f"{ev.loss:.4f}", refresh=False)
            self._bar.refresh()
        elif ev.stage is Stage.EPOCH_END:
            self.close()
            fold = f"fold {ev.fold} " if ev.fold is not None else ""
            val = f"  val DSC {ev.val_dsc:.4f}" if ev.validated else "  (not validated)"
            print(f"{fold}epoch {ev.epoch}: loss {ev.loss:.4f}{val}", file=sys.stderr)
        elif ev.stage in (Stage.DONE, Stage.RESUME, Stage.INFO):
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
    g.add_argument("--in-slices", type=int, help="2D: neighbouring slices in (odd: 3 = the slice and one each side)")
    g.add_argument("--norm", choices=["none", "batch", "instance"],
                   help="normalisation after each convolution (the study's networks: none)")
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
    g.add_argument("--budget-minutes", type=float, help="wall-clock training budget of the model, of all its "
                                                        "ensemble members together (0 = no limit)")
    g.add_argument("--budget-clock", choices=["wall", "cpu"],
                   help="what --budget-minutes counts: wall-clock time (default) or the process's CPU time "
                        "(the same compute on a shared, unevenly loaded machine)")
    g.add_argument("--flip-tta", choices=["on", "off"],
                   help="inference default stored with the model: average with the left-right mirrored scan")
    g.add_argument("--in-plane-spacing", type=float, help="model grid pixel size in mm")
    g.add_argument("--in-plane-size", type=int, help="model grid matrix (the study: 256)")
    g.add_argument("--central-slices", type=int, help="keep the central N slices (the study: 48)")
    g.add_argument("--patch-size", help="random training crops instead of whole slices/volumes: Y,X (2D) or "
                                        "Z,Y,X (3D), voxels of the model grid; 0 = whole slices/volumes")
    g.add_argument("--patches-per-volume", type=int,
                   help="3D with --patch-size: random patches drawn from each volume per epoch (default 1)")
    g.add_argument("--bg-slice-ratio", type=float,
                   help="2D: slices without femur drawn per epoch, per slice with femur (default: the recipe's)")
    g.add_argument("--augment", help="comma list of flip,intensity,affine,gamma,blur,lowres")
    g.add_argument("--ensemble", type=int, help="member networks: 1 = one network on an inner split; k > 1 = one "
                                                "per fold of a k-fold split, probabilities averaged, threshold "
                                                "on out-of-fold predictions")
    g.add_argument("--keep-weights", choices=["best", "last"],
                   help="the model is the epoch with the best validation DSC, or the final epoch")
    g.add_argument("--validate-every", type=int, metavar="N",
                   help="validate every N epochs and after the last (the others record no validation DSC)")
    g.add_argument("--pretrain-minutes", type=float, metavar="M",
                   help="first M minutes of the budget: one network learns a generated synthetic cohort, and "
                        "every member starts from it (0 = off)")
    g.add_argument("--pretrain-subjects", type=int, metavar="N", help="size of that synthetic cohort")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto uses bf16 where the hardware runs it fast; fp32 forces full precision")


def config_from_args(args: argparse.Namespace, default_recipe: str):
    """A TrainConfig: the recipe (``--recipe`` or ``default_recipe``), then every flag the user gave."""
    return config_from_overrides(getattr(args, "recipe", None) or default_recipe, vars(args))


#: Flags copied to a TrainConfig attribute as they are (flag dest -> attribute).
_PLAIN_FLAGS = {"loss": "loss", "lr": "lr", "lr_schedule": "lr_schedule", "epochs": "max_epochs",
                "min_epochs": "min_epochs", "patience": "patience", "batch_size": "batch_size",
                "seed": "seed", "device": "device", "precision": "precision", "ensemble": "ensemble",
                "budget_clock": "budget_clock", "patches_per_volume": "patches_per_volume",
                "keep_weights": "keep_weights", "validate_every": "validate_every",
                "bg_slice_ratio": "bg_slice_ratio", "pretrain_minutes": "pretrain_minutes",
                "pretrain_subjects": "pretrain_subjects"}
_GRID_FLAGS = ("in_plane_spacing", "in_plane_size", "central_slices")
#: Flags that :func:`args_from_config` always writes, so a printed command reads complete.
ALWAYS_WRITTEN = ("model", "features", "levels", "epochs", "patience", "budget_minutes", "seed", "device")


def config_from_overrides(recipe_name: str, overrides: Mapping[str, Any]):
    """The one way from settings to a TrainConfig, shared by the command lines and the GUI.

    Parameters
    ----------
    recipe_name : str
        A name of :data:`femur_core.training.RECIPES`, the starting point.
    overrides : mapping
        Settings by command-line flag name with underscores (``features``,
        ``budget_minutes``, ``aux_labels`` ...); None values are skipped. Keys
        that are no training flag (``data``, ``out`` ...) are ignored.
        ``budget_minutes`` 0 means no limit; ``aux_labels`` is ``"on"`` /
        ``"off"`` (or a bool); ``augment`` a comma list (or a list).

    Returns
    -------
    TrainConfig
    """
    from .models.registry import default_config
    from .training import recipe

    o = {k: v for k, v in overrides.items() if v is not None}
    cfg = recipe(recipe_name)
    if o.get("model") and o["model"] != cfg.model.name:
        cfg.model = default_config(o["model"])
    if o.get("features"):
        cfg.model.features = int(o["features"])
    if o.get("levels"):
        cfg.model.levels = int(o["levels"])
    if o.get("norm"):
        cfg.model.norm = None if o["norm"] == "none" else o["norm"]
    if o.get("in_slices"):
        if int(o["in_slices"]) < 1 or int(o["in_slices"]) % 2 == 0:
            raise InputError(None, f"--in-slices must be odd and positive, got {o['in_slices']}")
        cfg.model.in_slices = int(o["in_slices"])
    if "bg_slice_ratio" in o and not float(o["bg_slice_ratio"]) >= 0:
        raise InputError(None, f"--bg-slice-ratio must be 0 or more, got {o['bg_slice_ratio']}")
    if "ensemble" in o and int(o["ensemble"]) < 1:
        raise InputError(None, f"--ensemble must be at least 1, got {o['ensemble']}")
    for flag, attr in _PLAIN_FLAGS.items():
        if flag in o:
            setattr(cfg, attr, o[flag])
    if "epochs" in o and "min_epochs" not in o:
        cfg.min_epochs = min(cfg.min_epochs, o["epochs"])
    if "budget_minutes" in o:
        cfg.max_minutes = float(o["budget_minutes"]) or None  # 0 = no limit
    for flag in _GRID_FLAGS:
        if flag in o:
            setattr(cfg.grid, flag, o[flag])
            if flag == "in_plane_size":
                cfg.grid.in_plane_spacing = None
    if "patch_size" in o:
        cfg.patch_size = _patch_size(o["patch_size"])
    if "aux_labels" in o:
        cfg.aux_labels = o["aux_labels"] in ("on", True)
    if "flip_tta" in o:
        cfg.flip_tta = o["flip_tta"] in ("on", True)
    if "augment" in o:
        aug = o["augment"]
        cfg.augment = [a for a in (aug.split(",") if isinstance(aug, str) else aug) if a]
        from .training import AUGMENTATIONS

        bad = [a for a in cfg.augment if a not in AUGMENTATIONS]
        if bad:
            raise InputError(None, f"unknown augmentation {', '.join(bad)}; choose from {', '.join(AUGMENTATIONS)}")
    return cfg


def _patch_size(value) -> list[int] | None:
    """``"128,128"`` / ``[128, 128]`` -> [128, 128]; ``"0"``, ``0`` or ``[]`` -> None (whole samples)."""
    if isinstance(value, str):
        try:
            parts = [int(v) for v in value.replace("x", ",").split(",") if v.strip()]
        except ValueError:
            raise InputError(None, f"--patch-size must be sizes separated by commas, got {value!r}") from None
    elif isinstance(value, int):
        parts = [value]
    else:
        parts = [int(v) for v in value]
    if not parts or parts == [0]:
        return None
    if len(parts) not in (2, 3) or min(parts) < 8:
        raise InputError(None, f"--patch-size must be Y,X or Z,Y,X of at least 8 voxels each, got {value!r}")
    return parts


def config_overrides(cfg) -> dict[str, Any]:
    """Every training flag's value for ``cfg`` (the inverse of :func:`config_from_overrides`)."""
    d = {"model": cfg.model.name, "features": cfg.model.features, "levels": cfg.model.levels,
         "in_slices": cfg.model.in_slices, "norm": cfg.model.norm or "none",
         "budget_minutes": cfg.max_minutes or 0, "aux_labels": "on" if cfg.aux_labels else "off",
         "flip_tta": "on" if cfg.flip_tta else "off",
         "augment": ",".join(cfg.augment),
         "patch_size": ",".join(map(str, cfg.patch_size)) if cfg.patch_size else "0"}
    d.update({flag: getattr(cfg, attr) for flag, attr in _PLAIN_FLAGS.items()})
    d.update({flag: getattr(cfg.grid, flag) for flag in _GRID_FLAGS})
    return d


def args_from_config(cfg, recipe_name: str, always: tuple[str, ...] = ALWAYS_WRITTEN) -> list[str]:
    """Command-line flags with which ``--recipe recipe_name`` gives exactly ``cfg``.

    The flags in ``always`` are written every time (``--budget-minutes 0`` for
    no limit); the others only where ``cfg`` differs from the recipe.

    Raises
    ------
    ValueError
        ``cfg`` holds settings that no flag sets (they are named).
    """
    want = config_overrides(cfg)
    base = config_overrides(config_from_overrides(recipe_name, {}))
    chosen = {k: v for k, v in want.items() if k in always or v != base[k]}
    target = cfg.to_dict()
    for _ in range(3):  # a flag can change another setting (--epochs lowers min_epochs): add what still differs
        got = config_from_overrides(recipe_name, chosen)
        if got.to_dict() == target:
            break
        have = config_overrides(got)
        missing = {k: v for k, v in want.items() if have[k] != v and k not in chosen}
        if not missing:
            break
        chosen.update(missing)
    got_d = got.to_dict()
    if got_d != target:
        diff = sorted(k for k in target if got_d.get(k) != target[k])
        raise ValueError(f"no command-line flag sets {', '.join(diff)}")
    out = ["--recipe", recipe_name]
    for k, v in chosen.items():
        if v is not None:
            out += [f"--{k.replace('_', '-')}", _flag_value(v)]
    return out


def _flag_value(v: Any) -> str:
    if isinstance(v, float):
        short = f"{v:g}"
        return short if float(short) == v else repr(v)
    return str(v)


def dump_json(obj) -> bytes:
    return (json.dumps(obj, indent=2, default=str) + "\n").encode()
