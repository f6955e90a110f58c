"""The prediction engine: any registry network over a volume on the model grid.

:func:`predict_array` plans how the network sees the volume (tiles, slices or
windows: the registry's :class:`~femur_core.models.Sampling` of the model,
planned by :mod:`femur_core.tiling`), runs the plan with :func:`run_plan` (the
one loop: cut, run, softmax, write back with weights, report progress, stop on
cancel) and, with ``flip_tta``, averages with the prediction of the left-right
mirrored volume. :func:`predict_box` runs the network over a box of the
volume only (the later views of an ROI-restricted prediction,
:mod:`femur_core.roi`). The caller's network is borrowed, never changed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch

from .models.registry import MODELS, ModelConfig, Sampling
from .progress import CancelToken, ProgressCallback, ProgressEvent, Stage, check_cancel, emit
from .roi import Box, paste
from .runtime import autocast, memory_format, to_format
from .tiling import SamplingPlan, plan_slices, plan_tiles, plan_windows

__all__ = ["predict_array", "predict_box", "sampling_plan", "run_plan"]


def sampling_plan(net: torch.nn.Module, model_config: ModelConfig, shape: tuple[int, int, int], *,
                  max_voxels: int = 48 * 256 * 256, literal_tiles: bool = False) -> SamplingPlan:
    """How ``net`` (registered as ``model_config.name``) sees a volume of ``shape``.

    ``max_voxels``: 3D volumes larger than this are cut into windows;
    ``literal_tiles``: 2D tiles run one by one (see :func:`femur_core.tiling.plan_tiles`).
    """
    sampling = MODELS[model_config.name].sampling
    if sampling == Sampling.TILES:
        return plan_tiles(shape, model_config.in_slices, model_config.levels, literal=literal_tiles)
    if sampling == Sampling.SLICES:
        return plan_slices(shape, model_config.in_slices, net.divisor)
    return plan_windows(shape, net.divisor, max_voxels)


def _softmax_fg(logits: torch.Tensor) -> torch.Tensor:
    """Femur (class 1) probability of a batch of logits, in fp32."""
    return torch.softmax(logits.float(), dim=1)[:, 1]


def run_plan(net: torch.nn.Module, plan: SamplingPlan, vol: np.ndarray, *, device: torch.device,
             amp: torch.dtype | None = None, fmt: torch.memory_format | None = None,
             progress: ProgressCallback | None = None, cancel: CancelToken | None = None) -> np.ndarray:
    """Femur probability of ``vol`` by running ``net`` over the passes of ``plan``.

    Every item's output is added to its target region with the plan's weight
    (1 where it has none); the result is the weighted mean where outputs
    overlap. ``net`` must already be on ``device`` in eval mode.
    """
    src = np.pad(vol, plan.pad, mode=plan.pad_mode) if any(a or b for a, b in plan.pad) else vol
    acc = np.zeros(plan.out_shape, np.float32)
    norm = np.zeros(plan.out_shape, np.float32)
    if plan.announce:
        emit(progress, ProgressEvent(Stage.PREDICT, 0, plan.total, message=plan.message))
    for p in plan.passes:
        check_cancel(cancel)
        x = np.ascontiguousarray(np.stack([src[i] for i in p.inputs]))
        x = to_format(torch.from_numpy(x).to(device), fmt)
        with torch.inference_mode(), autocast(device, amp):
            y = _softmax_fg(net(x)).cpu().numpy()
        for y_i, target, crop in zip(y, p.targets, p.crops):
            if plan.weights is None:
                acc[target] += y_i[crop]
                norm[target] += 1.0
            else:
                acc[target] += y_i[crop] * plan.weights
                norm[target] += plan.weights
        emit(progress, ProgressEvent(Stage.PREDICT, p.done, plan.total, message=plan.message))
    return acc[plan.result] / norm[plan.result]


@contextlib.contextmanager
def _borrowed(net: torch.nn.Module, device: torch.device, fmt: torch.memory_format | None) -> Iterator[None]:
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
        yield
    finally:
        for p, data in params:
            p.data = data
        for m, saved in buffers:
            m._buffers.update(saved)
        net.train(was_training)


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
        The network and its registry configuration (the registry entry decides
        tiles, slices or windows).
    image : numpy.ndarray
        Normalised canonical array.
    device, amp
        Torch device and autocast dtype (None = fp32).
    flip_tta : bool
        Average with the prediction of the left-right mirrored input.
    max_voxels : int
        3D: larger volumes are predicted in overlapping windows.
    progress, cancel
        Progress callback (one event per pass) and cancel token (checked before every pass).
    literal_tiles : bool
        Valid-convolution 2D models: run and average the nine mirrored tiles one
        by one instead of the equal single pass over their union (for checking).
    """
    device = torch.device(device)
    fmt = memory_format(MODELS[model_config.name].kind, device, amp)
    vol = np.ascontiguousarray(image, dtype=np.float32)
    plan = sampling_plan(net, model_config, vol.shape, max_voxels=max_voxels, literal_tiles=literal_tiles)
    kw = dict(device=device, amp=amp, fmt=fmt, progress=progress, cancel=cancel)
    with _borrowed(net, device, fmt):
        prob = run_plan(net, plan, vol, **kw)
        if flip_tta:
            flipped = run_plan(net, plan, np.ascontiguousarray(vol[:, :, ::-1]), **kw)
            prob = 0.5 * (prob + flipped[:, :, ::-1])
    return np.ascontiguousarray(prob, dtype=np.float32)


def predict_box(net: torch.nn.Module, model_config: ModelConfig, image: np.ndarray, box: Box, base: np.ndarray,
                **kw) -> np.ndarray:
    """Femur probability of ``image`` inside ``box`` (the network sees that crop only), ``base`` outside.

    Parameters
    ----------
    net, model_config, image
        As for :func:`predict_array`.
    box : tuple of slice
        The region to predict (:func:`femur_core.roi.roi_box`: aligned to the
        network's pooling grid, with a margin for its context).
    base : numpy.ndarray
        The map of ``image``'s shape that is kept outside ``box``.
    **kw
        Options of :func:`predict_array` (device, amp, flip_tta, progress, cancel ...).
    """
    if base.shape != image.shape:
        raise ValueError(f"base map {base.shape} and image {image.shape} differ in shape")
    part = predict_array(net, model_config, np.ascontiguousarray(image[box]), **kw)
    return paste(base, part, box)
