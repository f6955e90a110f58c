"""Prediction: whole-volume or sliding-window 3D, mirrored 3 x 3 tiles in 2D,
left-right flip averaging, and cleanup that keeps one component per hip side.

The path from a scan to a mask on the scan's own grid is
:func:`predict_volume`; :func:`predict_array` does the network part on an
array already on the model grid (training validation uses it too).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .checkpoint import load_checkpoint, load_weights_into, resolve_model_path
from .errors import InputError, ModelFileError
from .models.registry import MODELS, ModelConfig, ModelKind, build_model
from .models.unet import valid_input_size
from .preprocess import GridSpec, prepare
from .progress import CancelToken, ProgressCallback, ProgressEvent, Stage, check_cancel, emit
from .volume import Reorientation, Volume, from_canonical, to_canonical
from .volume_io import check_image

__all__ = [
    "LoadedModel", "Prediction", "load_model", "predict_array", "predict_volume", "postprocess",
    "keep_largest_per_side", "resolve_device", "resolve_amp", "tile_plan", "window_plan",
]


# ----------------------------------------------------------------------------- devices
def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` picks cuda, then mps, then cpu; other names are passed to torch."""
    if name in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise InputError(None, f"unknown device {name!r} (use auto, cpu, cuda, cuda:1 or mps)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(None, f"device {name!r} requested but CUDA is not available (use --device cpu)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InputError(None, f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    return dev


def _cpu_has_fast_bf16() -> bool:
    try:
        caps = torch.backends.cpu.get_cpu_capability()
    except Exception:  # pragma: no cover
        caps = ""
    return "AVX512" in str(caps).upper() or "AMX" in str(caps).upper()


@functools.lru_cache(maxsize=1)
def cpu_bf16_conv3d_training_is_faster() -> bool:
    """Time one 3D convolution step (forward + backward, 32 channels) in bf16 and in fp32 on the CPU.

    oneDNN's bf16 conv3d backward is many times slower than fp32 on some CPUs
    (an Intel VM with AMX: a 3D training step > 45 s against 4.9 s) and about
    3.4 times faster on others (an AMD EPYC with AVX-512 BF16: 0.51 s against
    1.75 s; bench/speed.py, "training step 3d"). Measured once per process,
    in well under a second where bf16 is fast; bf16 wins only when it is
    clearly (20 %) faster.
    """
    if not _cpu_has_fast_bf16():
        return False
    x = torch.randn(1, 32, 8, 32, 32)

    def step(dtype: torch.dtype | None) -> float:
        fmt = memory_format(ModelKind.D3, torch.device("cpu"), dtype)
        net = torch.nn.Conv3d(32, 32, 3, padding=1)
        if fmt is not None:
            net = net.to(memory_format=fmt)
        xi = to_format(x, fmt).requires_grad_(True)
        best = float("inf")
        for _ in range(3):  # the first call includes oneDNN's kernel set-up
            t0 = time.perf_counter()
            with autocast(torch.device("cpu"), dtype):
                y = net(xi)
            y.float().sum().backward()
            best = min(best, time.perf_counter() - t0)
        return best

    return step(torch.bfloat16) < 0.8 * step(None)


def resolve_amp(precision: str, device: torch.device, train_kind: ModelKind | None = None) -> torch.dtype | None:
    """Autocast dtype for ``precision`` in {"auto", "fp32", "bf16"} (None = fp32).

    ``auto`` uses bf16 where the hardware runs it fast (CUDA with bf16 support,
    CPUs with AVX-512/AMX) and fp32 elsewhere. ``train_kind=ModelKind.D3`` (training a
    3D network) on the CPU uses bf16 only where a short measurement finds its
    conv3d backward faster than fp32
    (:func:`cpu_bf16_conv3d_training_is_faster`).
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision != "auto":
        raise ValueError(f"precision must be auto, fp32 or bf16, got {precision!r}")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        if train_kind == ModelKind.D3:
            return torch.bfloat16 if cpu_bf16_conv3d_training_is_faster() else None
        return torch.bfloat16 if _cpu_has_fast_bf16() else None
    return None


def memory_format(kind: ModelKind, device: torch.device, amp: torch.dtype | None) -> torch.memory_format | None:
    """Channels-last layout where it pays: bf16 convolutions on the CPU (oneDNN runs
    NHWC / NDHWC bf16 kernels several times faster than NCHW); None elsewhere."""
    if device.type != "cpu" or amp is None:
        return None
    return torch.channels_last_3d if kind == ModelKind.D3 else torch.channels_last


def to_format(t: torch.Tensor, fmt: torch.memory_format | None) -> torch.Tensor:
    return t if fmt is None else t.contiguous(memory_format=fmt)


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# ----------------------------------------------------------------------------- loading
@dataclass
class LoadedModel:
    """A trained model ready to predict, with the settings it was trained with.

    An ensemble (the fold models of a cross-validation, or a model trained
    with ``TrainConfig.ensemble > 1``) has several ``members`` of one
    architecture; ``net`` is the first. Prediction averages the members'
    probabilities.
    """

    net: torch.nn.Module
    model_config: ModelConfig
    grid: GridSpec
    threshold: float = 0.5
    path: Path | None = None
    train_config: dict = field(default_factory=dict)
    members: list[torch.nn.Module] = field(default_factory=list)
    threshold_source: str = ""

    def __post_init__(self) -> None:
        if not self.members:
            self.members = [self.net]

    @property
    def kind(self) -> ModelKind:
        return MODELS[self.model_config.name].kind

    @property
    def flip_tta(self) -> bool:
        """Inference default stored with the model: left-right flip averaging (``TrainConfig.flip_tta``)."""
        return bool(self.train_config.get("flip_tta", True))

    @property
    def cleanup(self) -> bool:
        """Inference default stored with the model: one component per hip side (``TrainConfig.cleanup``)."""
        return bool(self.train_config.get("cleanup", True))


def _build_loaded(payload: dict, p: Path) -> LoadedModel:
    cfg = payload["config"]
    try:
        mc = ModelConfig.from_dict(cfg["model"])
        grid = GridSpec.from_dict(cfg.get("grid", {}))
        states = payload.get("member_state_dicts") or [payload["state_dict"]]
        nets = [build_model(mc) for _ in states]
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFileError(f"{p}: invalid model configuration ({exc})") from None
    for net, sd in zip(nets, states):
        load_weights_into(net, {"state_dict": sd}, p)
        net.eval()
    thr = payload.get("threshold", cfg.get("threshold", 0.5))
    thr = float(thr.item() if torch.is_tensor(thr) else thr)
    return LoadedModel(nets[0], mc, grid, thr, p, cfg, nets, str(payload.get("threshold_source", "")))


def _cv_run_models(folder: Path) -> list[Path]:
    """The fold models of a cross-validation run folder (``fold<k>/model.pt`` or ``best.pt``)."""
    out = []
    for d in sorted(folder.glob("fold*"), key=lambda q: (len(q.name), q.name)):
        if d.is_dir() and d.name[4:].isdigit():
            for cand in (d / "model.pt", d / "best.pt"):
                if cand.is_file():
                    out.append(cand)
                    break
    return out


def _cv_threshold(folder: Path, models: list[LoadedModel]) -> tuple[float, str]:
    """PRC-optimal threshold of a CV run's out-of-fold predictions (its ``fold*/curves.npz``),
    else the median of the fold models' thresholds."""
    from .calibration import threshold_from_counts

    files = sorted(folder.glob("fold*/curves.npz"))
    if files and len(files) == len(models):
        pos = neg = None
        for f in files:
            with np.load(f) as z:
                pos = z["pos"] if pos is None else pos + z["pos"]
                neg = z["neg"] if neg is None else neg + z["neg"]
        if pos is not None and pos.sum() > 0:
            thr = threshold_from_counts(pos, neg)
            return thr, f"out-of-fold predictions of the cross-validation ({len(files)} folds)"
    return float(np.median([m.threshold for m in models])), "median of the fold models' thresholds"


def load_model(path: "str | os.PathLike") -> LoadedModel:
    """Load a checkpoint file, a model folder, or a cross-validation run folder, safely.

    A run folder of a cross-validation (``fold<k>/`` models and no
    ``model.pt`` / ``best.pt`` of its own) loads as the ensemble of its fold
    models, with the threshold of their out-of-fold predictions.

    Raises
    ------
    ModelFileError
        Missing, unsafe (pickled objects), corrupt, or not matching its architecture.
    """
    folder = Path(path)
    if folder.is_dir() and not (folder / "model.pt").is_file() and not (folder / "best.pt").is_file():
        files = _cv_run_models(folder)
        if len(files) > 1:
            parts = [_build_loaded(load_checkpoint(f), f) for f in files]
            first = parts[0]
            for f, m in zip(files, parts):
                if m.model_config != first.model_config or m.grid != first.grid:
                    raise ModelFileError(f"{f}: its architecture or grid differs from {files[0]}; "
                                         "a run folder's fold models must match to be averaged")
            thr, source = _cv_threshold(folder, parts)
            return LoadedModel(first.net, first.model_config, first.grid, thr, folder, first.train_config,
                               [n for m in parts for n in m.members], source)
    p = resolve_model_path(path)
    return _build_loaded(load_checkpoint(p), p)


# ----------------------------------------------------------------------------- 2D tiling
@dataclass(frozen=True)
class TilePlan:
    """Mirrored 3 x 3 tiling of one slice for a valid-convolution 2D U-Net."""

    tile_in: int
    tile_out: int
    margin: int
    starts_y: tuple[int, ...]
    starts_x: tuple[int, ...]


def _starts(n: int, out: int, count: int = 3, align: int = 1) -> tuple[int, ...]:
    if out >= n:
        return (0,)
    last = int(math.ceil((n - out) / align)) * align
    return tuple(sorted({int(round(i * last / (count - 1) / align)) * align for i in range(count)}))


def tile_plan(height: int, width: int, levels: int) -> TilePlan:
    """3 x 3 overlapping tiles (ordered overlap) covering a ``height`` x ``width`` slice.

    The output tile is the smallest valid size >= 55 % of the longer side, so
    neighbouring tiles overlap and interior voxels are averaged over 2-4 tiles.
    Tile offsets are multiples of the network's total pooling stride
    ``2 ** (levels - 1)``: a valid-convolution U-Net is then exactly
    translation-equivariant between tiles, which the fast path uses.
    """
    need = int(math.ceil(0.55 * max(height, width)))
    tin, tout = valid_input_size(need, levels)
    a = 2 ** (levels - 1)
    return TilePlan(tin, tout, (tin - tout) // 2, _starts(height, tout, align=a), _starts(width, tout, align=a))


def _slice_stack(vol: np.ndarray, z: int, in_slices: int) -> np.ndarray:
    k = in_slices // 2
    idx = np.clip(np.arange(z - k, z + k + 1), 0, vol.shape[0] - 1)
    return vol[idx]


def _softmax_fg(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.float(), dim=1)[:, 1]


def _predict_2d_valid(net, vol, in_slices, levels, device, amp, progress, cancel, batch_slices=None, fmt=None,
                      literal_tiles=False):
    """Mirrored 3 x 3 tile averaging of a valid-convolution 2D U-Net.

    The tiles are crops of one mirror-padded slice at offsets that are multiples
    of the pooling stride, so every tile's output equals the same crop of the
    network's output on the whole padded slice: the average over the tiles that
    cover a pixel is that one value. The default path therefore runs the network
    once over the union of the tiles (about 3.5x fewer FLOPs for 3 x 3 tiles of
    55 %); ``literal_tiles=True`` runs the nine tiles and averages them (the
    study's procedure, kept to check the equality; see tests/test_inference_2d.py).
    """
    Z, H, W = vol.shape
    plan = tile_plan(H, W, levels)
    m, o = plan.margin, plan.tile_out
    padded = np.pad(vol, ((0, 0), (m, m + o), (m, m + o)), mode="reflect")
    prob = np.zeros((Z, H, W), np.float32)
    if batch_slices is None:  # one slice per pass was fastest for the single pass (bf16, 2 cores); 2 for tiles
        batch_slices = 2 if literal_tiles else 1
    if not literal_tiles:
        # union of the tiles: input [0, last start + tile_in), output [0, last start + tile_out)
        uy, ux = plan.starts_y[-1] + plan.tile_in, plan.starts_x[-1] + plan.tile_in
        for z0 in range(0, Z, batch_slices):
            check_cancel(cancel)
            zs = range(z0, min(Z, z0 + batch_slices))
            x = np.stack([_slice_stack(padded, z, in_slices)[:, :uy, :ux] for z in zs])
            x = to_format(torch.from_numpy(np.ascontiguousarray(x)).to(device), fmt)
            with torch.inference_mode(), autocast(device, amp):
                p = _softmax_fg(net(x)).cpu().numpy()
            prob[z0:z0 + len(zs)] = p[:, :H, :W]
            emit(progress, ProgressEvent(Stage.PREDICT, z0 + len(zs), Z, message="2D tiles"))
        return prob
    count = np.zeros((H, W), np.float32)
    for sy in plan.starts_y:
        for sx in plan.starts_x:
            count[sy:sy + o, sx:sx + o] += 1
    for z0 in range(0, Z, batch_slices):
        check_cancel(cancel)
        tiles, where = [], []
        for z in range(z0, min(Z, z0 + batch_slices)):
            st = _slice_stack(padded, z, in_slices)
            for sy in plan.starts_y:
                for sx in plan.starts_x:
                    tiles.append(st[:, sy:sy + plan.tile_in, sx:sx + plan.tile_in])
                    where.append((z, sy, sx))
        x = to_format(torch.from_numpy(np.ascontiguousarray(np.stack(tiles))).to(device), fmt)
        with torch.inference_mode(), autocast(device, amp):
            p = _softmax_fg(net(x)).cpu().numpy()
        for (z, sy, sx), pt in zip(where, p):
            ey, ex = min(H, sy + o), min(W, sx + o)
            prob[z, sy:ey, sx:ex] += pt[: ey - sy, : ex - sx]
        emit(progress, ProgressEvent(Stage.PREDICT, min(Z, z0 + batch_slices), Z, message="2D tiles"))
    return prob / count[None]


def _pad_to(x: torch.Tensor, divisor: tuple[int, ...]) -> tuple[torch.Tensor, tuple[int, ...]]:
    shape = x.shape[2:]
    target = [int(math.ceil(s / d) * d) for s, d in zip(shape, divisor)]
    pads = []
    for s, t in reversed(list(zip(shape, target))):
        pads += [0, t - s]
    if any(pads):
        mode = "replicate"
        x = F.pad(x, pads, mode=mode)
    return x, tuple(shape)


def _predict_2d_same(net, vol, in_slices, device, amp, progress, cancel, batch_slices=8, fmt=None):
    Z = vol.shape[0]
    out = np.zeros(vol.shape, np.float32)
    div = net.divisor
    for z0 in range(0, Z, batch_slices):
        check_cancel(cancel)
        zs = range(z0, min(Z, z0 + batch_slices))
        x = torch.from_numpy(np.stack([_slice_stack(vol, z, in_slices) for z in zs])).to(device)
        x, shape = _pad_to(x, div)
        x = to_format(x, fmt)
        with torch.inference_mode(), autocast(device, amp):
            p = _softmax_fg(net(x))[:, : shape[0], : shape[1]].cpu().numpy()
        out[z0:z0 + len(zs)] = p
        emit(progress, ProgressEvent(Stage.PREDICT, z0 + len(zs), Z, message="2D slices"))
    return out


def _gaussian_weights(shape: tuple[int, ...], sigma_frac: float = 0.125,
                      split: tuple[bool, ...] | None = None) -> np.ndarray:
    """Blending weights of one window: Gaussian along the axes that are ``split`` into overlapping
    windows (default: all), flat along the others, floored at 1e-6 of the peak (never zero).

    A Gaussian along an axis that every window holds whole would cancel out, were it not for the
    floor: it pushed the weights of a volume's first and last slices below it, where the windows'
    edges were then averaged flat (a floor of 1e-3 did that).
    """
    split = tuple(split) if split is not None else (True,) * len(shape)
    grids = np.meshgrid(*[np.arange(s) - (s - 1) / 2 for s in shape], indexing="ij")
    w = np.exp(-sum((g / max(sigma_frac * s, 1e-3)) ** 2 / 2 for g, s, a in zip(grids, shape, split) if a))
    w = np.broadcast_to(w, shape) / np.max(w)
    return np.maximum(w, 1e-6).astype(np.float32)


def window_plan(shape: tuple[int, ...], divisor: tuple[int, ...], max_voxels: int,
                patch: tuple[int, ...] | None = None):
    """Sliding windows for a volume too large for one pass.

    The volume is padded to multiples of the network's ``divisor``. Axes that
    fit whole in the requested patch are not split (a 60-slice scan is one
    window deep, not two); in-plane windows are as large as ``max_voxels``
    allows and overlap by about half.

    Returns
    -------
    padded_shape, patch, starts
        The padded volume shape, the window shape (multiples of ``divisor``)
        and, per axis, the sorted window start offsets (every voxel covered).
    """
    padded = tuple(int(math.ceil(s / d) * d) for s, d in zip(shape, divisor))
    if patch is None:
        side = int((max_voxels / max(padded[0], 1)) ** 0.5)
        patch = (padded[0], side, side)
    win = tuple(pd if p >= s else int(min(pd, max(d, (p // d) * d)))
                for p, s, d, pd in zip(patch, shape, divisor, padded))
    starts = []
    for pd, p in zip(padded, win):
        n = max(1, int(math.ceil((pd - p) / max(p / 2, 1))) + 1)
        starts.append(sorted({int(round(i * (pd - p) / max(n - 1, 1))) for i in range(n)}))
    return padded, win, starts


def _predict_3d(net, vol, device, amp, progress, cancel, max_voxels: int, patch=None, channels_last=False):
    div = net.divisor
    x = torch.from_numpy(np.ascontiguousarray(vol))[None, None]
    def run(t):
        t = t.to(device)
        if channels_last:
            t = t.contiguous(memory_format=torch.channels_last_3d)
        with torch.inference_mode(), autocast(device, amp):
            return _softmax_fg(net(t))[0].cpu().numpy()
    if vol.size <= max_voxels:
        xp, shape = _pad_to(x, div)
        emit(progress, ProgressEvent(Stage.PREDICT, 0, 1, message="3D volume"))
        p = run(xp)[: shape[0], : shape[1], : shape[2]]
        emit(progress, ProgressEvent(Stage.PREDICT, 1, 1, message="3D volume"))
        return p
    # sliding windows with half overlap and Gaussian weighting
    _, patch, starts = window_plan(vol.shape, div, max_voxels, patch)  # padded shape = _pad_to(x, div) below
    xp, shape = _pad_to(x, div)
    full = xp.shape[2:]
    w = _gaussian_weights(patch, split=tuple(p < f for p, f in zip(patch, full)))
    acc = np.zeros(full, np.float32)
    norm = np.zeros(full, np.float32)
    total = len(starts[0]) * len(starts[1]) * len(starts[2])
    k = 0
    for a in starts[0]:
        for b in starts[1]:
            for c in starts[2]:
                check_cancel(cancel)
                sl = (slice(a, a + patch[0]), slice(b, b + patch[1]), slice(c, c + patch[2]))
                acc[sl] += run(xp[(slice(None), slice(None)) + sl]) * w
                norm[sl] += w
                k += 1
                emit(progress, ProgressEvent(Stage.PREDICT, k, total, message="3D windows"))
    return (acc / norm)[: shape[0], : shape[1], : shape[2]]


def predict_array(
    net: torch.nn.Module,
    model_config: ModelConfig,
    image: np.ndarray,
    *,
    device: torch.device | str = "cpu",
    amp: torch.dtype | None = None,
    flip_tta: bool = False,
    max_voxels: int = 48 * 256 * 256,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    literal_tiles: bool = False,
) -> np.ndarray:
    """Femur probability of a normalised (Z, Y, X) array on the model grid.

    Parameters
    ----------
    net, model_config
        The network and its registry configuration (decides 2D or 3D path).
    image : numpy.ndarray
        Normalised canonical array.
    device, amp
        Torch device and autocast dtype (None = fp32).
    flip_tta : bool
        Average with the prediction of the left-right mirrored input.
    max_voxels : int
        3D: larger volumes are predicted in overlapping windows.
    literal_tiles : bool
        Valid-convolution 2D models: run and average the nine mirrored tiles one
        by one instead of the equal single pass over their union (for checking).
    """
    device = torch.device(device)
    kind = MODELS[model_config.name].kind
    fmt = memory_format(kind, device, amp)
    with _borrowed(net, device, fmt):
        return _predict_array(net, model_config, image, kind, device, amp, fmt, flip_tta, max_voxels, progress,
                              cancel, literal_tiles)


@contextlib.contextmanager
def _borrowed(net: torch.nn.Module, device: torch.device, fmt: torch.memory_format | None):
    """``net`` on ``device``, in eval mode and ``fmt`` layout for the duration of a prediction.

    Afterwards the caller's module is as it was: its mode, and the very
    tensors (device, layout) of every parameter and buffer.
    """
    was_training = net.training
    params = [(p, p.data) for p in net.parameters()]
    buffers = [(m, dict(m._buffers)) for m in net.modules()]
    try:
        net.to(device).eval()
        net.to(memory_format=fmt if fmt is not None else torch.contiguous_format)
        yield net
    finally:
        for p, data in params:
            p.data = data
        for m, saved in buffers:
            m._buffers.update(saved)
        net.train(was_training)


def _predict_array(net, model_config, image, kind, device, amp, fmt, flip_tta, max_voxels, progress, cancel,
                   literal_tiles) -> np.ndarray:
    channels_last = kind == ModelKind.D3 and fmt is not None

    def once(vol: np.ndarray) -> np.ndarray:
        if kind == ModelKind.D3:
            return _predict_3d(net, vol, device, amp, progress, cancel, max_voxels, channels_last=channels_last)
        if getattr(net, "padding", 1) == 0:
            return _predict_2d_valid(net, vol, model_config.in_slices, model_config.levels, device, amp,
                                     progress, cancel, fmt=fmt, literal_tiles=literal_tiles)
        return _predict_2d_same(net, vol, model_config.in_slices, device, amp, progress, cancel, fmt=fmt)

    vol = np.ascontiguousarray(image, dtype=np.float32)
    prob = once(vol)
    if flip_tta:
        prob = 0.5 * (prob + once(np.ascontiguousarray(vol[:, :, ::-1]))[:, :, ::-1])
    return np.ascontiguousarray(prob, dtype=np.float32)


# ----------------------------------------------------------------------------- cleanup
def body_midline(image: np.ndarray) -> float:
    """Left-right midline (column index) of the body: centroid of above-mean voxels."""
    img = np.asarray(image, dtype=np.float32)
    body = img > img.mean()
    if not body.any():
        return (img.shape[2] - 1) / 2
    per_column = body.sum(axis=(0, 1))
    return float((np.arange(img.shape[2]) * per_column).sum() / per_column.sum())


def keep_largest_per_side(mask: np.ndarray, midline: float | None = None, min_fraction: float = 0.2) -> np.ndarray:
    """Keep the largest 3D component, plus the largest one on the other hip side.

    The second femur is kept only if it lies across the left-right midline
    (canonical axis 2) from the first and holds at least ``min_fraction`` of its
    voxels, so single-hip scans keep one component as in the study.
    """
    mask = np.asarray(mask).astype(bool)
    lab, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if n <= 1:
        return mask.astype(np.uint8)
    sizes = np.bincount(lab.ravel())[1:]
    xs = np.bincount(lab.ravel(), weights=np.broadcast_to(np.arange(mask.shape[2]), mask.shape).ravel())[1:]
    cx = xs / np.maximum(sizes, 1)
    mid = (mask.shape[2] - 1) / 2 if midline is None else midline
    first = int(np.argmax(sizes))
    keep = [first + 1]
    other = [i for i in range(n) if (cx[i] < mid) != (cx[first] < mid)]
    if other:
        second = max(other, key=lambda i: sizes[i])
        if sizes[second] >= min_fraction * sizes[first]:
            keep.append(second + 1)
    return np.isin(lab, keep).astype(np.uint8)


def postprocess(prob: np.ndarray, threshold: float = 0.5, cleanup: bool = True,
                image: np.ndarray | None = None, *, midline: float | None = None) -> np.ndarray:
    """Threshold a canonical probability map and optionally keep one component per hip side.

    The hip sides are split at ``midline`` (canonical column index), else at the
    body midline of the canonical ``image``, else at the centre column.
    """
    mask = np.asarray(prob) >= threshold
    if cleanup:
        if midline is None and image is not None:
            midline = body_midline(image)
        return keep_largest_per_side(mask, midline)
    return mask.astype(np.uint8)


# ----------------------------------------------------------------------------- whole scans
@dataclass
class Prediction:
    """A whole-scan prediction that can be thresholded again at any point.

    It keeps the probability map in the canonical layout, the reorientation
    back to the scan's own grid and the body midline (where the cleanup splits
    the hip sides), so :meth:`mask_at` gives the mask of any threshold, with or
    without cleanup, on the source grid, without re-running the network.

    Attributes
    ----------
    prob_canonical : numpy.ndarray
        float32 femur probability, canonical (P, I, L) layout.
    reorientation : Reorientation
        From the source grid to the canonical layout and back.
    midline : float or None
        Body midline (canonical column index); None: the centre column.
    threshold, cleanup
        The operating point of :attr:`mask`.
    source : str or None
        The scan the prediction belongs to.
    """

    prob_canonical: np.ndarray
    reorientation: Reorientation
    midline: float | None
    threshold: float
    cleanup: bool = True
    source: str | None = None

    @classmethod
    def from_probability(cls, prob: Volume, image: Volume | None = None, threshold: float = 0.5,
                         cleanup: bool = True) -> "Prediction":
        """Wrap a probability map on any grid (e.g. a napari layer's voxels).

        ``image`` (the scan, on the same grid) gives the body midline; without
        it the hip sides are split at the centre column.
        """
        canon, reo = to_canonical(prob)
        midline = None
        if image is not None:
            if image.shape != prob.shape or not np.allclose(image.affine, prob.affine, atol=1e-3):
                raise ValueError(f"image {image.name} is not on the grid of probability map {prob.name}")
            midline = body_midline(to_canonical(image)[0].data)
        return cls(np.asarray(canon.data, dtype=np.float32), reo, midline, float(threshold), cleanup, prob.source)

    @functools.cached_property
    def prob(self) -> Volume:
        """The probability map on the source grid."""
        vol = from_canonical(self.prob_canonical, self.reorientation)
        vol.source = self.source
        return vol

    @functools.cached_property
    def mask(self) -> Volume:
        """The uint8 mask at :attr:`threshold` (cleaned if :attr:`cleanup`) on the source grid."""
        return self.mask_at(self.threshold, self.cleanup)

    def mask_at(self, threshold: float | None = None, cleanup: bool | None = None) -> Volume:
        """The uint8 mask of ``prob >= threshold`` on the source grid.

        Parameters
        ----------
        threshold : float, optional
            Default: :attr:`threshold`.
        cleanup : bool, optional
            Keep one component per hip side (split at :attr:`midline`, so it is
            right for any source orientation). Default: :attr:`cleanup`.
        """
        thr = self.threshold if threshold is None else float(threshold)
        clean = self.cleanup if cleanup is None else bool(cleanup)
        mask_c = postprocess(self.prob_canonical, thr, clean, midline=self.midline)
        vol = from_canonical(mask_c, self.reorientation)
        vol.source = self.source
        return vol


def predict_volume(
    model: LoadedModel,
    image: Volume,
    *,
    flip_tta: bool | None = None,
    cleanup: bool | None = None,
    threshold: float | None = None,
    device: str = "auto",
    precision: str = "auto",
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> Prediction:
    """Segment one scan: model grid, network, back to the source grid, threshold, cleanup.

    Parameters
    ----------
    model : LoadedModel
        From :func:`load_model`.
    image : Volume
        The scan (any orientation, size and spacing).
    flip_tta, cleanup : bool, optional
        Left-right flip averaging; keep one component per hip side. Default:
        the model's own settings (:attr:`LoadedModel.flip_tta`, ``.cleanup``).
    threshold : float, optional
        Default: the model's PRC-optimal threshold from its validation data.
    device, precision : str
        ``auto`` / ``cpu`` / ``cuda`` ...; ``auto`` / ``fp32`` / ``bf16``.

    Returns
    -------
    Prediction
        ``.prob`` and ``.mask`` on the scan's grid; ``.mask_at(t)`` for other thresholds.
    """
    flip_tta = model.flip_tta if flip_tta is None else bool(flip_tta)
    cleanup = model.cleanup if cleanup is None else bool(cleanup)
    image = check_image(image)
    dev = resolve_device(device)
    amp = resolve_amp(precision, dev)
    prep = prepare(image, model.grid)
    prob_m = None
    for net in model.members:  # an ensemble averages its members' probabilities
        p_j = predict_array(net, model.model_config, prep.image, device=dev, amp=amp,
                            flip_tta=flip_tta, progress=progress, cancel=cancel)
        prob_m = p_j if prob_m is None else prob_m + p_j
    prob_m = prob_m / len(model.members)
    thr = model.threshold if threshold is None else float(threshold)
    prob_c = prep.restore_canonical(prob_m)
    midline = body_midline(to_canonical(image)[0].data)
    return Prediction(prob_c, prep.reorientation, midline, thr, cleanup, image.source)
