"""Training one model: the study's recipe, early stopping, safe resumable checkpoints.

:func:`train_model` trains on a list of subjects and early-stops on another. It
writes, atomically, ``last.pt`` (weights, optimizer, position, history: a
resumable state, every epoch and on cancel) and ``best.pt`` (the best weights by
validation DSC with the PRC-optimal threshold on the validation subjects), plus
``history.csv``. Progress goes to a callback, cancellation comes through a
:class:`~femur_core.progress.CancelToken`; femur_core never knows who listens.
"""

from __future__ import annotations

import csv
import dataclasses
import gc
import io
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import distributed as _dist
from .checkpoint import load_checkpoint, load_weights_into, save_checkpoint
from .data import Subject
from .errors import Cancelled, InputError, ModelFileError, TrainingDiverged
from .inference import (autocast, memory_format, predict_array, resolve_amp, resolve_device, tile_plan,
                        to_format)
from .volume_io import atomic_write_bytes
from .loss import get_loss
from .calibration import THRESHOLD_BOUNDS, calibrate_threshold  # noqa: F401 (THRESHOLD_BOUNDS: re-exported)
from .metrics import dice
from .models.registry import MODELS, ModelConfig, ModelKind, build_model, default_config
from .preprocess import GridSpec, Prepared, prepare
from .progress import CancelToken, ProgressCallback, ProgressEvent, Stage, check_cancel, emit

__all__ = ["TrainConfig", "TrainResult", "TrainState", "BatchSource", "RECIPES", "recipe", "train_model",
           "prepare_subjects"]

AUGMENTATIONS = ("flip", "intensity", "affine", "gamma", "blur", "lowres")


@dataclass
class TrainConfig:
    """Everything that defines a training run (JSON round-trips via to_dict / from_dict).

    Attributes
    ----------
    model : ModelConfig
        Architecture (registry name, F, L, ...).
    grid : GridSpec
        Model grid (in-plane resampling, central slices).
    loss : str
        ``"wce"`` (the study's class-weighted cross-entropy) or ``"dice_ce"``.
    lr : float
        Adam learning rate (the study: 5e-5).
    lr_schedule : str
        ``"constant"`` (the study) or ``"poly"``: ``lr * (1 - progress) ** 0.9``,
        where progress is the elapsed share of ``max_minutes`` when a budget is
        set (else of ``max_epochs``), so the rate anneals to ~0 by the end of
        the budget (nnU-Net's schedule, stretched over wall-clock time).
    batch_size : int
        Samples per step (the study: 1).
    max_epochs, min_epochs, patience, min_delta
        Early stopping: ``min_epochs`` always run, then stop when validation DSC
        has not improved by ``min_delta`` within the last ``patience`` epochs.
        Not with a ``poly`` schedule over a time budget: that schedule is made
        to run to the end of the budget (its rate is still high half-way, where
        a lucky early epoch on a few validation subjects would stop it; seen
        on the real data: stopped at 4.3 of 8 minutes). ``best.pt`` is still
        the epoch with the best validation DSC.
    max_minutes : float or None
        Training budget in minutes (of ``budget_clock``); training stops at
        the first step past it.
    budget_clock : str
        What ``max_minutes`` counts: ``"wall"`` (wall-clock time) or ``"cpu"``
        (this process's CPU time, :func:`time.process_time`: the same compute
        for every run on a shared, unevenly loaded machine; with one thread it
        is close to the wall time of an idle machine).
    augment : list of str
        Any of ``"flip"`` (left-right, the study), ``"intensity"`` (scale, shift,
        bias field, noise), ``"affine"`` (in-plane rotation and scaling),
        ``"gamma"`` (contrast curve), ``"blur"`` (in-plane Gaussian blur),
        ``"lowres"`` (simulated coarser in-plane resolution), the last three
        nnU-Net's, each applied to a random share of the samples.
    bg_slice_ratio : float
        2D: slices without femur drawn per epoch, relative to slices with femur.
    patch_size : list of int or None
        Random training patches instead of whole slices / volumes: (Y, X) for a
        padded 2D U-Net, (Z, Y, X) for 3D (a 3D network given (Y, X) crops
        in-plane and keeps every slice); the valid 2D U-Net of the study
        trains on its mirrored tiles and ignores it. With
        more than one sample per batch, volumes of different shapes are cut to
        random crops of their element-wise smallest shape (so that a batch
        stacks).
    patches_per_volume : int
        3D with ``patch_size``: random patches drawn from each training volume
        per epoch (the epoch's steps between two validations; 1: one, as a
        whole volume).
    val_fraction : float
        Share of training subjects held out for early stopping (honest protocol).
    seed, device, precision
        Reproducibility and hardware (``auto`` picks cuda / mps / cpu and bf16 where fast).
    flip_tta, cleanup
        Inference defaults stored with the model.
    keep_weights : str
        The weights a run keeps as its model (``best.pt``): ``"best"``, those of
        the epoch with the best validation DSC, or ``"last"``, those of the final
        epoch (nnU-Net's choice: with a poly schedule the rate is near zero at the
        end, and a best epoch picked on a few subjects is noisy).
    validate_every : int
        Validate on the early-stopping subjects every this many epochs, and
        always after the last epoch of a run (the budget ran out, or
        ``max_epochs``); the other epochs record ``val_dsc`` NaN. Each
        validation predicts whole volumes of every early-stopping subject,
        which costs about a third of an epoch of 128 x 128 crops here: with
        ``keep_weights="last"`` and a poly schedule over a budget (no early
        stopping) the budget buys that many more training epochs. Early
        stopping and ``keep_weights="best"`` see validated epochs only
        (``patience`` then counts validations).
    ensemble : int
        Member networks (:func:`femur_core.ensemble.fit`): 1 trains one network
        on an inner split; ``k > 1`` trains one per fold of a ``k``-fold split of
        the subjects, each early-stopped on its own fold, averages their
        probabilities and picks the threshold on their out-of-fold predictions.
        ``max_minutes`` is then the budget of the whole ensemble.
    aux_labels : bool
        Train with a third class, "other bone" (ilium, sacrum, spine...), from
        the subjects' label maps (``subNN_bones.nii.gz``), so that the network
        learns the pelvis pressed against the femoral head as a class of its
        own. Needs ``loss="dice_ce"``. Used only when every training and
        early-stopping subject has a label map; otherwise training runs with
        the femur mask alone (with a progress note where only some subjects
        have one), and the saved configuration says so
        (``aux_labels`` false, ``model.n_classes`` 2).
    pretrain_minutes : float
        Minutes of ``max_minutes`` (same clock) spent first on a synthetic
        cohort (:mod:`femur_core.pretrain`): one network of the same
        architecture and grid learns ``pretrain_subjects`` generated scans,
        then every member starts from its weights at ``lr``; the members share
        what is left of the budget. 0: off (members start from random weights).
    pretrain_subjects : int
        Size of that synthetic cohort.
    """

    model: ModelConfig = field(default_factory=lambda: default_config("3d"))
    grid: GridSpec = field(default_factory=GridSpec)
    loss: str = "wce"
    lr: float = 5e-5
    lr_schedule: str = "constant"
    batch_size: int = 1
    max_epochs: int = 100
    min_epochs: int = 30
    patience: int = 10
    min_delta: float = 1e-4
    max_minutes: float | None = None
    budget_clock: str = "wall"
    augment: list[str] = field(default_factory=lambda: ["flip"])
    bg_slice_ratio: float = 1.0
    patch_size: list[int] | None = None
    patches_per_volume: int = 1
    val_fraction: float = 0.2
    weight_decay: float = 0.0
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    flip_tta: bool = True
    cleanup: bool = True
    aux_labels: bool = False
    ensemble: int = 1
    keep_weights: str = "best"
    validate_every: int = 1
    pretrain_minutes: float = 0.0
    pretrain_subjects: int = 60

    def to_dict(self) -> dict:
        d = asdict(self)
        d["model"] = self.model.to_dict()
        d["grid"] = self.grid.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        vals = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        if "model" in vals and isinstance(vals["model"], dict):
            vals["model"] = ModelConfig.from_dict(vals["model"])
        if "grid" in vals and isinstance(vals["grid"], dict):
            vals["grid"] = GridSpec.from_dict(vals["grid"])
        return cls(**vals)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


def _study(name: str, features: int, levels: int) -> TrainConfig:
    return TrainConfig(
        model=default_config(name, features=features, levels=levels),
        grid=GridSpec(in_plane_size=256, central_slices=48),
        loss="wce", lr=5e-5, max_epochs=200, min_epochs=30, patience=10,
    )


#: Named training recipes: the one list the CLI (--recipe) and the GUI offer.
RECIPES: dict[str, TrainConfig] = {
    "study-3d": _study("3d", 32, 4),
    "study-2d": _study("2d", 64, 3),
    "cpu-2d": TrainConfig(
        model=default_config("2d-same", features=24, levels=5),
        grid=GridSpec(in_plane_spacing=1.8), patch_size=[128, 128],
        loss="dice_ce", lr=2e-3, lr_schedule="poly", batch_size=4, max_epochs=400, min_epochs=20,
        patience=20, max_minutes=25.0, augment=["flip", "intensity", "affine"], bg_slice_ratio=0.5,
        weight_decay=1e-5, aux_labels=True, ensemble=3, keep_weights="last",
        validate_every=5,
    ),
    "synthetic-quick": TrainConfig(
        model=default_config("2d-same", features=16, levels=4),
        grid=GridSpec(),
        loss="dice_ce", lr=2e-3, batch_size=4, max_epochs=15, min_epochs=8, patience=5,
        max_minutes=1.75, augment=["flip", "intensity"], bg_slice_ratio=0.5,
    ),
}


def recipe(name: str, **overrides) -> TrainConfig:
    """A copy of a named recipe with some fields replaced."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    base = TrainConfig.from_dict(json.loads(json.dumps(RECIPES[name].to_dict())))
    return base.replace(**overrides) if overrides else base


def recipe_for_data(folder: "str | os.PathLike | None") -> str:
    """The recipe that fits a data folder.

    ``"synthetic-quick"`` for a cohort written by
    :func:`femur_core.synthetic.make_cohort` (it holds ``synthetic.json``),
    otherwise ``"cpu-2d"``, the default for real scans (and for no folder).
    """
    from .synthetic import SYNTHETIC_MARKER

    if folder is not None and (Path(folder) / SYNTHETIC_MARKER).is_file():
        return "synthetic-quick"
    return "cpu-2d"


@dataclass
class TrainResult:
    """What a finished training run left behind."""

    checkpoint: Path  # best.pt
    last: Path
    history: list[dict]
    stop_reason: str
    epochs: int
    minutes: float
    threshold: float
    config: TrainConfig  # the configuration the run used (aux_labels resolved)


# ----------------------------------------------------------------------------- data
def prepare_subjects(subjects: list[Subject], grid: GridSpec, cache: dict | None = None) -> list[Prepared]:
    """Bring subjects (with their label maps, where they have one) to the model grid.

    Memoised in ``cache`` by id and grid.
    """
    out = []
    key_grid = json.dumps(grid.to_dict(), sort_keys=True)
    for s in subjects:
        key = (s.id, key_grid)
        if cache is not None and key in cache:
            out.append(cache[key])
            continue
        p = prepare(s.image, grid, s.mask, s.labels)
        if cache is not None:
            cache[key] = p
        out.append(p)
    return out


def _epoch_samples(preps: list[Prepared], cfg: TrainConfig, rng: np.random.Generator) -> list[tuple[int, int]]:
    """(subject index, slice index) pairs for 2D; (subject index, -1) for 3D."""
    kind = MODELS[cfg.model.name].kind
    if kind == ModelKind.D3:
        per = max(1, int(cfg.patches_per_volume)) if cfg.patch_size else 1
        order = [(i, -1) for i in range(len(preps)) for _ in range(per)]
        rng.shuffle(order)
        return order
    fg, bg = [], []
    for i, p in enumerate(preps):
        has = p.mask.reshape(p.mask.shape[0], -1).any(axis=1)
        fg += [(i, int(z)) for z in np.nonzero(has)[0]]
        bg += [(i, int(z)) for z in np.nonzero(~has)[0]]
    n_bg = min(len(bg), int(math.ceil(cfg.bg_slice_ratio * max(len(fg), 1))))
    chosen = fg + [bg[j] for j in rng.choice(len(bg), n_bg, replace=False)] if bg else list(fg)
    order = [chosen[j] for j in rng.permutation(len(chosen))]
    return order


def _target(p: Prepared, cfg: TrainConfig) -> np.ndarray:
    """The training target: the label map with the extra class, or the femur mask."""
    if cfg.aux_labels:
        if p.labels is None:
            raise InputError(None, "aux_labels is set but a subject has no label map")
        return p.labels
    return p.mask


def _crop_or_pad(a: np.ndarray, start: tuple[int, ...], size: tuple[int, ...]) -> np.ndarray:
    sl = tuple(slice(s, s + n) for s, n in zip(start, size))
    return a[(Ellipsis,) + sl]


def _batch_slice_size(preps: list[Prepared], batch: int) -> tuple[int, int] | None:
    """2D: the largest in-plane shape of the training volumes where a batch may mix shapes, else None."""
    shapes = {p.image.shape[1:] for p in preps}
    if batch <= 1 or len(shapes) <= 1:
        return None
    return max(s[0] for s in shapes), max(s[1] for s in shapes)


def _make_2d_sample(p: Prepared, z: int, cfg: TrainConfig, net, rng,
                    size: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One training slice stack and its target; ``size`` (:func:`_batch_slice_size`): pad (padded
    U-Net) or tile (valid U-Net) as for a slice of that shape, so that every sample of a batch stacks."""
    k = cfg.model.in_slices // 2
    idx = np.clip(np.arange(z - k, z + k + 1), 0, p.image.shape[0] - 1)
    x = p.image[idx]
    y = _target(p, cfg)[z]
    H, W = y.shape
    if getattr(net, "padding", 1) == 0:  # valid U-Net: random tile of the mirrored slice
        plan = tile_plan(*(size or (H, W)), cfg.model.levels)
        m, o = plan.margin, plan.tile_out
        xp = np.pad(x, ((0, 0), (m, m + o), (m, m + o)), mode="reflect")
        yp = np.pad(y, ((0, o), (0, o)), mode="constant")
        sy = int(rng.integers(0, max(H - o, 0) + 1))
        sx = int(rng.integers(0, max(W - o, 0) + 1))
        return xp[:, sy:sy + plan.tile_in, sx:sx + plan.tile_in], yp[sy:sy + o, sx:sx + o]
    div = net.divisor
    if cfg.patch_size:  # padded U-Net: a random crop (femur-centred two times in three)
        x, y = _crop_2d(x, y, cfg.patch_size, rng)
        H, W = y.shape
        size = None
    th, tw = [int(math.ceil(s / d) * d) for s, d in zip(size or (H, W), div)]
    x = np.pad(x, ((0, 0), (0, th - H), (0, tw - W)), mode="edge")
    y = np.pad(y, ((0, th - H), (0, tw - W)), mode="constant")
    return x, y


def _crop_2d(x: np.ndarray, y: np.ndarray, patch: list[int], rng) -> tuple[np.ndarray, np.ndarray]:
    """A (C, ph, pw) / (ph, pw) crop of a slice stack and its target; a slice smaller than the
    patch is padded first. Two crops in three are centred on a random femur pixel where the
    slice has one (nnU-Net's foreground oversampling), the others uniform."""
    ph, pw = int(patch[-2]), int(patch[-1])
    H, W = y.shape
    py, px = max(ph - H, 0), max(pw - W, 0)
    if py or px:
        x = np.pad(x, ((0, 0), (py // 2, py - py // 2), (px // 2, px - px // 2)), mode="edge")
        y = np.pad(y, ((py // 2, py - py // 2), (px // 2, px - px // 2)), mode="constant")
        H, W = y.shape
    fg = np.nonzero(y == 1)
    if len(fg[0]) and rng.random() < 2 / 3:
        j = int(rng.integers(len(fg[0])))
        sy = int(np.clip(fg[0][j] - ph // 2, 0, H - ph))
        sx = int(np.clip(fg[1][j] - pw // 2, 0, W - pw))
    else:
        sy, sx = int(rng.integers(0, H - ph + 1)), int(rng.integers(0, W - pw + 1))
    return x[:, sy:sy + ph, sx:sx + pw], y[sy:sy + ph, sx:sx + pw]


def _patch_3d(patch: list[int] | None) -> list[int] | None:
    """A 3D patch size: (Z, Y, X) as given; an in-plane (Y, X) patch (a 2D recipe's) keeps every slice."""
    if patch and len(patch) == 2:
        return [1 << 30, int(patch[0]), int(patch[1])]
    return patch


def _batch_patch_size(preps: list[Prepared], cfg: TrainConfig, batch: int) -> list[int] | None:
    """3D: the patch size that makes the samples of one batch stackable.

    ``cfg.patch_size`` where every volume is at least that large; with more
    than one sample per batch, otherwise the element-wise smallest volume
    shape (random crops of one common size, foreground-centred half of the
    time, as for ``patch_size``); None (whole volumes) for one sample per batch
    or volumes that all have one shape.
    """
    shapes = [p.image.shape for p in preps]
    patch = _patch_3d(cfg.patch_size)
    if batch <= 1:
        return patch
    size = [min(d) for d in zip(*shapes)]
    if patch:
        size = [min(a, b) for a, b in zip(patch, size)]
    elif all(s == shapes[0] for s in shapes):
        return None
    return size


def _make_3d_sample(p: Prepared, cfg: TrainConfig, net, rng,
                    patch_size: list[int] | None) -> tuple[np.ndarray, np.ndarray]:
    """A whole volume, or a random crop of ``patch_size`` (see :func:`_batch_patch_size`)."""
    x, y = p.image, _target(p, cfg)
    if patch_size:
        size = [min(a, b) for a, b in zip(patch_size, x.shape)]
        if rng.random() < 0.5 and (y == 1).any():
            zz, yy, xx = np.nonzero(y == 1)
            j = int(rng.integers(len(zz)))
            centre = (zz[j], yy[j], xx[j])
            start = [int(np.clip(c - s // 2, 0, d - s)) for c, s, d in zip(centre, size, x.shape)]
        else:
            start = [int(rng.integers(0, d - s + 1)) for s, d in zip(size, x.shape)]
        x = _crop_or_pad(x, tuple(start), tuple(size))
        y = _crop_or_pad(y, tuple(start), tuple(size))
    div = net.divisor
    target = [int(math.ceil(s / d) * d) for s, d in zip(x.shape, div)]
    pads = [(0, t - s) for s, t in zip(x.shape, target)]
    return np.pad(x, pads, mode="edge")[None], np.pad(y, pads, mode="constant")


# ----------------------------------------------------------------------------- augmentation
def _augment(x: torch.Tensor, y: torch.Tensor, names: list[str], rng: np.random.Generator,
             multiclass: bool = False):
    """x: (B, C, [Z,] Y, X) float, y: (B, [Z,] Y, X). In-plane operations only.

    A binary ``y`` is warped bilinearly and cut at 0.5; a ``multiclass`` one by
    nearest neighbour.
    """
    if "flip" in names:
        flip = torch.from_numpy(rng.random(x.shape[0]) < 0.5)
        if flip.any():
            x = torch.where(flip.view(-1, *[1] * (x.ndim - 1)), x.flip(-1), x)
            y = torch.where(flip.view(-1, *[1] * (y.ndim - 1)), y.flip(-1), y)
    if "affine" in names:
        B = x.shape[0]
        ang = torch.from_numpy(rng.uniform(-10, 10, B)).float() * math.pi / 180
        sc = torch.from_numpy(rng.uniform(0.9, 1.1, B)).float()
        theta = torch.zeros(B, 2, 3)
        theta[:, 0, 0] = torch.cos(ang) / sc
        theta[:, 0, 1] = -torch.sin(ang) / sc
        theta[:, 1, 0] = torch.sin(ang) / sc
        theta[:, 1, 1] = torch.cos(ang) / sc
        lead = x.shape[:-2]
        H, W = x.shape[-2:]
        xs = x.reshape(B, -1, H, W)
        # rotation and scaling about the centre are the same in normalised coordinates for the
        # image tile and a centred, smaller target tile (valid U-Net), so one theta serves both
        Hy, Wy = y.shape[-2:]
        ys = y.reshape(B, -1, Hy, Wy).float()
        grid = F.affine_grid(theta, (B, 1, H, W), align_corners=False)
        grid_y = F.affine_grid(theta, (B, 1, Hy, Wy), align_corners=False)
        xs = F.grid_sample(xs, grid, mode="bilinear", padding_mode="border", align_corners=False)
        ys = F.grid_sample(ys, grid_y, mode="nearest" if multiclass else "bilinear", padding_mode="zeros",
                           align_corners=False)
        x = xs.reshape(*lead, H, W)
        y = (ys.round() if multiclass else ys >= 0.5).reshape(y.shape).to(y.dtype)
    if "gamma" in names:
        x = _gamma(x, rng)
    if "blur" in names:
        x = _blur(x, rng)
    if "lowres" in names:
        x = _lowres(x, rng)
    if "intensity" in names:
        B = x.shape[0]
        shape = (B,) + (1,) * (x.ndim - 1)
        scale = torch.from_numpy(rng.uniform(0.8, 1.25, B)).float().view(shape)
        shift = torch.from_numpy(rng.uniform(-0.2, 0.2, B)).float().view(shape)
        # smooth multiplicative bias field from a 4 x 4 random grid
        coarse = torch.from_numpy(rng.normal(0, 0.12, (B, 1, 4, 4))).float()
        field_ = torch.exp(F.interpolate(coarse, size=x.shape[-2:], mode="bicubic", align_corners=False))
        field_ = field_.view(B, *([1] * (x.ndim - 3)), *x.shape[-2:])
        noise = torch.from_numpy(rng.uniform(0, 0.08, B)).float().view(shape)
        gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
        x = (x * field_) * scale + shift + noise * torch.randn(x.shape, generator=gen)
    return x, y


def _per_sample(rng: np.random.Generator, n: int, p: float) -> np.ndarray:
    return np.nonzero(rng.random(n) < p)[0]


def _gamma(x: torch.Tensor, rng: np.random.Generator, p: float = 0.3) -> torch.Tensor:
    """nnU-Net's gamma: per sample, rescale to [0, 1], raise to gamma in [0.7, 1.5], restore range."""
    x = x.clone()
    for i in _per_sample(rng, x.shape[0], p):
        xi = x[i]
        lo, hi = xi.min(), xi.max()
        rngv = torch.clamp(hi - lo, min=1e-6)
        g = float(rng.uniform(0.7, 1.5))
        x[i] = ((xi - lo) / rngv).clamp(0, 1) ** g * rngv + lo
    return x


def _gauss_kernel(sigma: float) -> torch.Tensor:
    r = max(1, int(math.ceil(2.5 * sigma)))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def _blur(x: torch.Tensor, rng: np.random.Generator, p: float = 0.2) -> torch.Tensor:
    """In-plane Gaussian blur, sigma 0.5-1.0 pixel, on a random share of the samples."""
    x = x.clone()
    for i in _per_sample(rng, x.shape[0], p):
        k = _gauss_kernel(float(rng.uniform(0.5, 1.0)))
        r = (len(k) - 1) // 2
        xi = x[i].reshape(-1, 1, *x.shape[-2:])
        xi = F.conv2d(F.pad(xi, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
        xi = F.conv2d(F.pad(xi, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
        x[i] = xi.reshape(x[i].shape)
    return x


def _lowres(x: torch.Tensor, rng: np.random.Generator, p: float = 0.2) -> torch.Tensor:
    """Simulated low in-plane resolution: down by 1-2x (nearest), back up (bilinear)."""
    x = x.clone()
    H, W = x.shape[-2:]
    for i in _per_sample(rng, x.shape[0], p):
        f = float(rng.uniform(1.0, 2.0))
        xi = x[i].reshape(1, -1, H, W)
        small = F.interpolate(xi, size=(max(4, int(H / f)), max(4, int(W / f))), mode="nearest")
        x[i] = F.interpolate(small, size=(H, W), mode="bilinear", align_corners=False).reshape(x[i].shape)
    return x


# ----------------------------------------------------------------------------- loop
def lr_factor(config: "TrainConfig", elapsed_s: float, epoch_progress: float) -> float:
    """Multiplier of ``config.lr`` at this point of training (see ``TrainConfig.lr_schedule``).

    Parameters
    ----------
    elapsed_s : float
        Training seconds so far (used when ``config.max_minutes`` is set).
    epoch_progress : float
        Epochs done so far, fractional (used otherwise).
    """
    if config.lr_schedule == "constant":
        return 1.0
    if config.lr_schedule != "poly":
        raise ValueError(f"unknown lr_schedule {config.lr_schedule!r}; choose constant or poly")
    if config.max_minutes:
        frac = elapsed_s / (60.0 * config.max_minutes)
    else:
        frac = epoch_progress / max(config.max_epochs, 1)
    return float(max(0.0, 1.0 - min(frac, 1.0)) ** 0.9)


def _early_stop(vals: list[float], cfg: TrainConfig) -> bool:
    """The study's rule: after min_epochs, stop when the last `patience` epochs
    did not improve on the best before them by min_delta (never for a poly
    schedule over a time budget, see :class:`TrainConfig`)."""
    if cfg.lr_schedule == "poly" and cfg.max_minutes:
        return False
    vals = [v for v in vals if np.isfinite(v)]  # epochs without validation (validate_every) do not count
    e = len(vals)
    if e < max(cfg.min_epochs, cfg.patience + 1):
        return False
    before = max(vals[: e - cfg.patience])
    recent = max(vals[e - cfg.patience:])
    return recent < before + cfg.min_delta


def _validate(net, cfg: TrainConfig, preps: list[Prepared], device, amp, cancel) -> tuple[float, list[np.ndarray]]:
    dscs, probs = [], []
    for p in preps:
        check_cancel(cancel)
        prob = predict_array(net, cfg.model, p.image, device=device, amp=amp, flip_tta=False, cancel=cancel)
        probs.append(prob)
        dscs.append(dice(prob >= 0.5, p.mask.astype(bool)))
    return float(np.mean(dscs)) if dscs else float("nan"), probs


def _validate_shared(net, cfg: TrainConfig, preps: list[Prepared], device, amp, cancel) -> float:
    """Validation DSC with the subjects split over the torchrun processes (same value on every rank)."""
    mine = list(range(_dist.rank(), len(preps), _dist.world_size()))
    _, probs = _validate(net, cfg, [preps[i] for i in mine], device, amp, cancel)
    dscs = {i: dice(prob >= 0.5, preps[i].mask.astype(bool)) for i, prob in zip(mine, probs)}
    vals = _dist.gather_floats(dscs, len(preps))
    return float(np.mean(vals)) if vals else float("nan")


def _optimal_threshold_on(probs: list[np.ndarray], preps: list[Prepared]) -> float:
    return calibrate_threshold(probs, [p.mask for p in preps])


def _write_history(out_dir: Path, history: list[dict]) -> None:
    buf = io.StringIO()
    if history:
        w = csv.DictWriter(buf, fieldnames=list(history[0].keys()))
        w.writeheader()
        w.writerows(history)
    atomic_write_bytes(out_dir / "history.csv", buf.getvalue().encode(), overwrite=True)


def _effective_config(config: TrainConfig, subjects: list[Subject]) -> TrainConfig:
    """The configuration a run really uses: ``aux_labels`` only where every subject has a label map.

    It also sets ``model.n_classes`` to match (3 with the extra class, else 2).
    """
    aux = bool(config.aux_labels) and all(s.labels is not None for s in subjects)
    if aux and config.loss != "dice_ce":
        raise ValueError(f"aux_labels needs loss 'dice_ce' (the {config.loss!r} loss is for two classes)")
    n_classes = 3 if aux else 2
    if aux == config.aux_labels and config.model.n_classes == n_classes:
        return config
    return config.replace(aux_labels=aux, model=dataclasses.replace(config.model, n_classes=n_classes))



# ----------------------------------------------------------------------------- the trainer
@dataclass
class TrainState:
    """Where a run is: saved to ``last.pt`` and restored as one unit (resume).

    Attributes
    ----------
    epoch : int
        Epochs finished.
    step : int
        Steps of the next epoch already done (a run cancelled within an epoch).
    elapsed_s : float
        Training seconds so far (the budget and the poly schedule use them).
    best_val : float
        Best validation DSC so far (-1 before the first epoch).
    history : list of dict
        One row per finished epoch (``history.csv``).
    losses : list of float
        The losses of this epoch's steps so far.
    """

    epoch: int = 0
    step: int = 0
    elapsed_s: float = 0.0
    best_val: float = -1.0
    history: list[dict] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)

    def save(self, path: Path, net, opt, cfg_dict: dict, world: int = 1) -> None:
        """Write a resumable ``last.pt`` (weights, optimiser, this state) atomically."""
        save_checkpoint(path, net, cfg_dict, optimizer=opt.state_dict(), epoch=self.epoch, step=self.step,
                        elapsed_s=self.elapsed_s, history_json=json.dumps(self.history), best_val=self.best_val,
                        losses_json=json.dumps(self.losses), **({"world_size": world} if world > 1 else {}))

    @classmethod
    def restore(cls, path: Path, net, opt, cfg_dict: dict, world: int = 1) -> "TrainState":
        """Load ``last.pt`` into ``net`` and ``opt``; refuses one written with other settings."""
        payload = load_checkpoint(path)
        if _with_defaults(payload["config"]) != cfg_dict:
            raise InputError(path, "an earlier run with different settings is in this folder; "
                                   "choose another output folder or delete it")
        load_weights_into(net, payload, path)
        opt.load_state_dict(payload["optimizer"])
        state = cls(int(payload["epoch"]), int(payload["step"]), float(payload["elapsed_s"]),
                    float(payload["best_val"]), json.loads(payload["history_json"]))
        if state.step and int(payload.get("world_size", 1)) != world:  # other global batches: redo the epoch
            state.step = 0
        state.losses = json.loads(payload.get("losses_json", "[]")) if state.step else []
        return state


#: The clocks a training budget may count (``TrainConfig.budget_clock``).
BUDGET_CLOCKS = {"wall": time.monotonic, "cpu": time.process_time}


def _with_defaults(cfg_dict: dict) -> dict:
    """A saved configuration with the fields added since it was written at their defaults (a run
    started before a new setting existed still resumes; one with other values is still refused)."""
    if not isinstance(cfg_dict, dict):
        return cfg_dict
    return TrainConfig.from_dict(cfg_dict).to_dict()


class _Clock:
    """Training time across resumes: the seconds of earlier sessions plus this one's.

    ``kind`` is a key of :data:`BUDGET_CLOCKS`: wall-clock or process CPU seconds.
    """

    def __init__(self, earlier_s: float = 0.0, kind: str = "wall") -> None:
        if kind not in BUDGET_CLOCKS:
            raise ValueError(f"unknown budget_clock {kind!r}; choose {' or '.join(BUDGET_CLOCKS)}")
        self.now = BUDGET_CLOCKS[kind]
        self.earlier_s, self.t0 = earlier_s, self.now()

    def elapsed(self) -> float:
        return self.earlier_s + self.now() - self.t0

    def over(self, config: TrainConfig) -> bool:
        """Past the budget (the same answer on every torchrun process)."""
        return config.max_minutes is not None and _dist.reduce_flag(self.elapsed() > 60 * config.max_minutes)


class BatchSource:
    """The training batches: which samples each epoch draws and how one batch is built.

    Everything is seeded by (seed, epoch[, step]), so a resumed run draws the
    very batches an uninterrupted one would. Under torchrun every process
    builds the global batch and keeps its share.
    """

    def __init__(self, preps: list[Prepared], config: TrainConfig, net, world: int = 1) -> None:
        self.preps, self.config, self.net, self.world = preps, config, net, world
        self.kind = MODELS[config.model.name].kind
        global_batch = config.batch_size * world
        # more than one sample per (global) batch and volumes of different shapes: 3D crops of one size
        # (2D: slices padded / tiled as for the largest slice)
        self.patch_3d = _batch_patch_size(preps, config, global_batch) if self.kind == ModelKind.D3 else None
        self.size_2d = _batch_slice_size(preps, global_batch) if self.kind != ModelKind.D3 else None

    def epoch(self, epoch: int) -> list[list[tuple[int, int]]]:
        """The global batches of an epoch: lists of (subject index, slice index or -1)."""
        samples = _epoch_samples(self.preps, self.config, np.random.default_rng([self.config.seed, epoch]))
        gb = self.config.batch_size * self.world
        return [samples[i:i + gb] for i in range(0, len(samples), gb)]

    def batch(self, batch: list[tuple[int, int]], epoch: int, step: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Inputs, targets and this process's share weight of one global batch, augmented."""
        cfg = self.config
        rng = np.random.default_rng([cfg.seed, epoch, step])
        xs, ys = [], []
        for i, z in batch:
            if self.kind == ModelKind.D3:
                x, y = _make_3d_sample(self.preps[i], cfg, self.net, rng, self.patch_3d)
            else:
                x, y = _make_2d_sample(self.preps[i], z, cfg, self.net, rng, self.size_2d)
            xs.append(x)
            ys.append(y)
        xb = torch.from_numpy(np.stack(xs).astype(np.float32))
        yb = torch.from_numpy(np.stack(ys).astype(np.int64))
        xb, yb = _augment(xb, yb, cfg.augment, rng, multiclass=cfg.aux_labels)
        share_w = 1.0
        if self.world > 1:  # this rank's share of the global batch, built and augmented as one process would
            share, share_w = _dist.local_share(len(xb))
            xb, yb = xb[share], yb[share]
        return xb, yb, share_w


def _set_lr(opt, config: TrainConfig, clock: _Clock, epoch_progress: float, world: int) -> None:
    """Apply the schedule (:func:`lr_factor`); under torchrun rank 0's clock decides for every rank."""
    if config.lr_schedule == "constant":
        return
    fac = lr_factor(config, clock.elapsed(), epoch_progress)
    fac = _dist.broadcast_object(fac) if world > 1 else fac
    for g in opt.param_groups:
        g["lr"] = config.lr * fac


@dataclass
class _Run:
    """The live objects of one training run (released as a whole on cancel)."""

    config: TrainConfig
    cfg_dict: dict
    out: Path
    net: torch.nn.Module
    ddp_net: torch.nn.Module
    opt: torch.optim.Optimizer
    loss_fn: object
    device: torch.device
    amp: torch.dtype | None
    fmt: torch.memory_format | None
    world: int
    is_main: bool
    progress: ProgressCallback | None
    cancel: CancelToken | None
    fold: int | None
    phase: str = "steps"  # "steps", "validate" or "bookkeeping" (what a cancel interrupts)
    #: autocast of the early-stopping predictions: inference's policy, which can differ from
    #: training's (3D on a CPU whose bf16 conv3d backward is slow: fp32 steps, bf16 forward passes)
    val_amp: torch.dtype | None = None

    @property
    def last_path(self) -> Path:
        return self.out / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.out / "best.pt"

    def save_last(self, state: TrainState) -> None:
        if self.is_main:
            state.save(self.last_path, self.net, self.opt, self.cfg_dict, self.world)


def _build_run(config: TrainConfig, out: Path, progress, cancel, fold) -> _Run:
    """Device, precision, network, optimiser and loss of a run, seeded by ``config.seed``."""
    device = _dist.device_for_rank(resolve_device(config.device))
    kind = MODELS[config.model.name].kind
    amp = resolve_amp(config.precision, device, train_kind=kind)
    torch.manual_seed(config.seed)
    net = build_model(config.model).to(device)
    fmt = memory_format(kind, device, amp)
    if fmt is not None:
        net = net.to(memory_format=fmt)
    opt = torch.optim.Adam(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return _Run(config, config.to_dict(), out, net, net, opt, get_loss(config.loss), device, amp, fmt,
                _dist.world_size(), _dist.is_main(), progress, cancel, fold,
                val_amp=resolve_amp(config.precision, device))


def _init_weights_from(run: _Run, init_from: "str | os.PathLike") -> None:
    """Fine-tuning: start from the weights of another model of the same architecture."""
    from .checkpoint import resolve_model_path

    init_path = resolve_model_path(init_from)
    try:
        load_weights_into(run.net, load_checkpoint(init_path), init_path)
    except ModelFileError as exc:
        raise InputError(init_path, f"cannot fine-tune this model with these settings ({exc}); its "
                                    "architecture, and its label-map class, must be kept "
                                    "(femur_core.finetune.finetune_config)") from None
    emit(run.progress, ProgressEvent(Stage.INFO, fold=run.fold, message=f"starting from the weights of {init_path}"))


def _check_cancel_all(run: _Run) -> None:
    """Raise :class:`Cancelled` on every torchrun process at the same step."""
    want_stop = run.cancel is not None and run.cancel.cancelled
    if _dist.reduce_flag(want_stop) if run.world > 1 else want_stop:
        raise Cancelled("cancelled by the user")


def _check_finite(run: _Run, state: TrainState, step: int, loss: torch.Tensor) -> None:
    """Raise :class:`TrainingDiverged` (on every torchrun process at once) when the loss is NaN or
    infinite, before its step: the weights and the ``last.pt`` of the previous epoch stay finite."""
    bad = not bool(torch.isfinite(loss.detach()))
    if _dist.reduce_flag(bad) if run.world > 1 else bad:
        hint = ("; or --precision fp32 (bf16 3D convolutions gave NaN gradients on some CPUs)"
                if run.amp is not None else "")
        raise TrainingDiverged(
            f"training diverged: loss {float(loss.detach())} at epoch {state.epoch + 1}, step {step + 1} "
            f"({run.last_path} keeps the end of epoch {state.epoch}); try a lower --lr{hint}")


def _train_epoch(run: _Run, state: TrainState, source: BatchSource, clock: _Clock) -> bool:
    """The steps of epoch ``state.epoch`` from ``state.step`` on; True when the budget ran out."""
    config = run.config
    batches = source.epoch(state.epoch)
    if not state.step:
        state.losses = []
    run.phase = "steps"
    for step in range(state.step, len(batches)):
        _check_cancel_all(run)
        xb, yb, share_w = source.batch(batches[step], state.epoch, step)
        xb, yb = to_format(xb.to(run.device), run.fmt), yb.to(run.device)
        with autocast(run.device, run.amp):
            logits = run.ddp_net(xb)
        loss = run.loss_fn(logits.float(), yb)
        if share_w != 1.0:
            loss = loss * share_w
        _check_finite(run, state, step, loss)
        run.opt.zero_grad(set_to_none=True)
        loss.backward()
        _set_lr(run.opt, config, clock, state.epoch + step / max(len(batches), 1), run.world)
        run.opt.step()
        state.losses.append(_dist.reduce_mean(float(loss.detach())) if run.world > 1 else float(loss.detach()))
        state.step = step + 1
        emit(run.progress, ProgressEvent(Stage.TRAIN, step + 1, len(batches), state.epoch + 1, config.max_epochs,
                                         run.fold, float(np.mean(state.losses))))
        if clock.over(config):
            return True
    return False


def best_validation_dsc(history: list[dict]) -> float:
    """The best ``val_dsc`` of a run's history (NaN when no epoch was validated)."""
    return max((v for h in history if math.isfinite(v := float(h.get("val_dsc", float("nan"))))),
               default=float("nan"))


def _validates(config: TrainConfig, epoch: int, last: bool) -> bool:
    """Whether epoch ``epoch`` (0-based) is validated: every ``validate_every``-th, and the run's last."""
    return last or epoch + 1 >= config.max_epochs or (epoch + 1) % max(int(config.validate_every), 1) == 0


def _validate_epoch(run: _Run, state: TrainState, val_p: list[Prepared]) -> float:
    """Validation DSC of the current weights on the early-stopping subjects."""
    run.phase = "validate"
    emit(run.progress, ProgressEvent(Stage.VALIDATE, epoch=state.epoch + 1, epochs=run.config.max_epochs,
                                     fold=run.fold))
    if run.world > 1:
        return _validate_shared(run.net, run.config, val_p, run.device, run.val_amp, run.cancel)
    return _validate(run.net, run.config, val_p, run.device, run.val_amp, run.cancel)[0]


def _end_epoch(run: _Run, state: TrainState, val_dsc: float, clock: _Clock) -> None:
    """Record the epoch; write ``best.pt`` (on improvement), ``last.pt`` and ``history.csv``."""
    run.phase = "bookkeeping"
    state.epoch += 1
    state.history.append({"epoch": state.epoch, "loss": float(np.mean(state.losses)) if state.losses else float("nan"),
                          "val_dsc": val_dsc, "minutes": round(clock.elapsed() / 60, 3)})
    if val_dsc > state.best_val:
        state.best_val = val_dsc
        if run.is_main:
            save_checkpoint(run.best_path, run.net, run.cfg_dict, epoch=state.epoch, val_dsc=val_dsc)
    state.step, state.losses, state.elapsed_s = 0, [], clock.elapsed()
    run.save_last(state)
    if run.is_main:
        _write_history(run.out, state.history)
    emit(run.progress, ProgressEvent(Stage.EPOCH_END, epoch=state.epoch, epochs=run.config.max_epochs, fold=run.fold,
                                     loss=state.history[-1]["loss"], val_dsc=val_dsc))


def _train_loop(run: _Run, state: TrainState, source: BatchSource, val_p: list[Prepared], clock: _Clock) -> str:
    """Epochs until the limit, the budget or early stopping; returns the stop reason."""
    config = run.config
    while state.epoch < config.max_epochs:
        if state.history and _early_stop([h["val_dsc"] for h in state.history], config):
            return "early_stopping"  # resumed after the run had already stopped
        if clock.over(config):
            return "time_budget"
        over_budget = _train_epoch(run, state, source, clock)
        validate = _validates(config, state.epoch, over_budget)
        val_dsc = _validate_epoch(run, state, val_p) if validate else float("nan")
        _end_epoch(run, state, val_dsc, clock)
        if over_budget:
            return "time_budget"
        if _early_stop([h["val_dsc"] for h in state.history], config):
            return "early_stopping"
    return "max_epochs"


def _finish(run: _Run, state: TrainState, val_p: list[Prepared]) -> float:
    """Reload the kept weights (``keep_weights``), calibrate the threshold on the early-stopping subjects,
    store it in ``best.pt``."""
    thr = 0.5
    if run.is_main:  # under torchrun rank 0 alone writes; the others wait
        if run.config.keep_weights == "last" and state.history:  # the final weights are the model
            save_checkpoint(run.best_path, run.net, run.cfg_dict, epoch=state.epoch,
                            val_dsc=float(state.history[-1]["val_dsc"]))
        if not run.best_path.exists():  # zero epochs ran (budget 0): keep the current weights
            save_checkpoint(run.best_path, run.net, run.cfg_dict, epoch=state.epoch, val_dsc=float("nan"))
        best = load_checkpoint(run.best_path)
        load_weights_into(run.net, best, run.best_path)
        _, probs = _validate(run.net, run.config, val_p, run.device, run.val_amp, run.cancel)
        thr = _optimal_threshold_on(probs, val_p)
        save_checkpoint(run.best_path, run.net, run.cfg_dict, epoch=int(best.get("epoch", state.epoch)),
                        val_dsc=float(best.get("val_dsc", float("nan"))), threshold=thr)
    if run.world > 1:
        _dist.barrier()
        thr = float(_dist.broadcast_object(thr))
    return thr


def _config_for(config: TrainConfig, subjects: list[Subject], progress, fold) -> TrainConfig:
    """The effective configuration, with a note where only some subjects have a label map."""
    effective = _effective_config(config, subjects)
    missing = [s.id for s in subjects if s.labels is None]
    if config.aux_labels and not effective.aux_labels and len(missing) < len(subjects):
        emit(progress, ProgressEvent(Stage.INFO, fold=fold, message=(
            f"training with the femur mask alone: {len(missing)} subject(s) have no label map "
            f"(subNN_bones.nii.gz), e.g. {', '.join(missing[:3])}")))
    return effective


def train_model(
    train: list[Subject],
    val: list[Subject],
    config: TrainConfig,
    out_dir: "str | os.PathLike",
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    resume: bool = True,
    cache: dict | None = None,
    fold: int | None = None,
    init_from: "str | os.PathLike | None" = None,
) -> TrainResult:
    """Train one model and early-stop on ``val``.

    Parameters
    ----------
    train, val : list of Subject
        Training subjects and early-stopping subjects (must not be empty).
    config : TrainConfig
        The recipe.
    out_dir : path-like
        Where ``last.pt``, ``best.pt`` and ``history.csv`` go.
    progress : callable, optional
        Receives :class:`~femur_core.progress.ProgressEvent` per step and epoch.
    cancel : CancelToken, optional
        Checked before every step; on cancel a resumable ``last.pt`` is written
        and :class:`~femur_core.errors.Cancelled` raised.
    resume : bool
        Continue from ``out_dir/last.pt`` (a :class:`TrainState`) if it exists and matches ``config``.
    cache : dict, optional
        Memo of preprocessed subjects shared between calls (cross-validation).
    init_from : path-like, optional
        Fine-tuning: start from the weights of this model (checkpoint file or
        model folder) instead of a random initialisation. Its architecture
        must be ``config.model`` (see :func:`femur_core.finetune.finetune_config`).
        A resumable ``last.pt`` in ``out_dir`` wins (the run already started).

    Returns
    -------
    TrainResult
    """
    if not train:
        raise InputError(None, "no training subjects")
    if not val:
        raise InputError(None, "no validation subjects for early stopping")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = _config_for(config, train + val, progress, fold)
    run = _build_run(config, out, progress, cancel, fold)
    resuming = resume and run.last_path.exists()
    if init_from is not None and not resuming:
        _init_weights_from(run, init_from)
    state = TrainState()
    if resuming:
        state = TrainState.restore(run.last_path, run.net, run.opt, run.cfg_dict, run.world)
        emit(progress, ProgressEvent(Stage.RESUME, epoch=state.epoch, fold=fold,
                                     message=f"resumed at epoch {state.epoch + 1}, step {state.step}"))
    run.ddp_net = _dist.wrap_ddp(run.net, run.device)  # `net` itself when one process trains
    source = BatchSource(prepare_subjects(train, config.grid, cache), config, run.net, run.world)
    val_p = prepare_subjects(val, config.grid, cache)
    clock = _Clock(state.elapsed_s, config.budget_clock)
    run.net.train()
    try:
        stop_reason = _train_loop(run, state, source, val_p, clock)
    except (KeyboardInterrupt, Cancelled) as exc:
        stopped = _stop_on_cancel(run, state, clock, exc)
    else:
        stopped = None
    if stopped is not None:  # release the model (and GPU memory) before raising: callers may keep the error
        device, run, source = run.device, None, None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        raise stopped
    thr = _finish(run, state, val_p)
    emit(progress, ProgressEvent(Stage.DONE, epoch=state.epoch, epochs=config.max_epochs, fold=fold,
                                 message=f"stopped: {stop_reason}"))
    minutes, device = clock.elapsed() / 60, run.device
    del run, source
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return TrainResult(out / "best.pt", out / "last.pt", state.history, stop_reason, state.epoch, minutes, thr, config)


def _stop_on_cancel(run: _Run, state: TrainState, clock: _Clock, exc: BaseException) -> BaseException:
    """Save a resumable ``last.pt`` for the position reached; the exception to raise.

    During the end-of-epoch bookkeeping the ``last.pt`` on disk (the previous
    epoch's) is kept: replaying the epoch from it gives the same result.
    """
    if run.phase == "bookkeeping":
        where = f"after epoch {state.epoch}"
    else:
        state.elapsed_s = clock.elapsed()
        run.save_last(state)
        where = f"at epoch {state.epoch + 1}, step {state.step}"
    if isinstance(exc, KeyboardInterrupt):
        return KeyboardInterrupt()
    return Cancelled(f"training cancelled {where}; run it again to resume")
