"""Cutting a volume into network inputs: tiles, slices and windows, planned as data.

A :class:`SamplingPlan` says, before any network runs, how the volume is
padded, which crops of it form each network call (a :class:`Pass`), where each
output is written and with what weight, and what part of the accumulated map
is the result. :func:`femur_core.engine.run_plan` executes any plan with any
network; the three planners here are the three ways the registry's networks
see a scan (:class:`femur_core.models.Sampling`):

- :func:`plan_tiles`: 2D valid-convolution networks, mirrored 3 x 3 tiles
  (:func:`tile_plan`) or one pass over their union;
- :func:`plan_slices`: 2D padded-convolution networks, whole slices;
- :func:`plan_windows`: 3D networks, the whole volume or Gaussian-weighted
  sliding windows (:func:`window_plan`).

Nothing here imports torch; the plans are plain numpy indices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .models.unet import valid_input_size

__all__ = ["TilePlan", "tile_plan", "window_plan", "gaussian_weights", "Pass", "SamplingPlan", "plan_tiles",
           "plan_slices", "plan_windows"]

Index = tuple  # a numpy index (ints, integer arrays, slices, None)


# ----------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class TilePlan:
    """Mirrored 3 x 3 tiling of one slice for a valid-convolution 2D U-Net."""

    tile_in: int
    tile_out: int
    margin: int
    starts_y: tuple[int, ...]
    starts_x: tuple[int, ...]


def _starts(n: int, out: int, count: int = 3, align: int = 1) -> tuple[int, ...]:
    """``count`` sorted start offsets, multiples of ``align``, of length-``out`` tiles covering ``n``."""
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


def gaussian_weights(shape: tuple[int, ...], sigma_frac: float = 0.125,
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
    padded = _padded_shape(shape, divisor)
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


def _padded_shape(shape: tuple[int, ...], divisor: tuple[int, ...]) -> tuple[int, ...]:
    """``shape`` rounded up to multiples of ``divisor``."""
    return tuple(int(math.ceil(s / d) * d) for s, d in zip(shape, divisor))


# ----------------------------------------------------------------------------- plans
@dataclass(frozen=True)
class Pass:
    """One network call.

    Attributes
    ----------
    inputs : tuple of index
        Per batch item, the numpy index into the padded volume that gives its
        input (channels first).
    targets : tuple of index
        Per batch item, the region of the accumulated map its output goes to.
    crops : tuple of index
        Per batch item, the part of its output (spatial axes) written there.
    done : int
        Progress step reached after this pass.
    """

    inputs: tuple[Index, ...]
    targets: tuple[Index, ...]
    crops: tuple[Index, ...]
    done: int


@dataclass(frozen=True)
class SamplingPlan:
    """How a (Z, Y, X) volume is cut into network inputs and put back together.

    Attributes
    ----------
    pad : tuple of (int, int)
        ``numpy.pad`` widths of the input volume, and ``pad_mode`` its mode.
    passes : tuple of Pass
        The network calls, in order.
    out_shape : tuple of int
        Shape of the accumulated map.
    result : index
        The part of the accumulated map that is the probability map (the input's shape).
    weights : numpy.ndarray or None
        Weight of every item's output (a window's Gaussian); None: each counts once.
    total, message
        Progress: steps in all, and the message of every event.
    announce : bool
        Also report step 0 before the first pass (one long pass: the whole volume).
    """

    pad: tuple[tuple[int, int], ...]
    pad_mode: str
    passes: tuple[Pass, ...]
    out_shape: tuple[int, ...]
    result: Index
    weights: np.ndarray | None
    total: int
    message: str
    announce: bool = False


def _stack_index(z: int, depth: int, in_slices: int) -> np.ndarray:
    """Slices ``z - in_slices // 2 .. z + in_slices // 2`` (clipped to the volume): a 2D network's channels."""
    k = in_slices // 2
    return np.clip(np.arange(z - k, z + k + 1), 0, depth - 1)


def _slice_passes(depth: int, batch: int, items) -> tuple[Pass, ...]:
    """Passes of ``batch`` slices each; ``items(z)`` gives the (input, target, crop) triples of slice ``z``."""
    passes = []
    for z0 in range(0, depth, batch):
        triples = [t for z in range(z0, min(depth, z0 + batch)) for t in items(z)]
        inputs, targets, crops = zip(*triples)
        passes.append(Pass(inputs, targets, crops, min(depth, z0 + batch)))
    return tuple(passes)


def plan_tiles(shape: tuple[int, int, int], in_slices: int, levels: int, *, literal: bool = False,
               batch: int | None = None) -> SamplingPlan:
    """Mirrored 3 x 3 tile averaging of a valid-convolution 2D U-Net.

    The tiles are crops of one mirror-padded slice at offsets that are multiples
    of the pooling stride, so every tile's output equals the same crop of the
    network's output on the whole padded slice: the average over the tiles that
    cover a pixel is that one value. The default plan therefore runs the network
    once over the union of the tiles (about 3.5x fewer FLOPs for 3 x 3 tiles of
    55 %); ``literal=True`` runs the nine tiles and averages them (the study's
    procedure, kept to check the equality; see tests/test_inference_2d.py).
    ``batch``: slices per pass (default: 1 for the union, 2 for the tiles).
    """
    Z, H, W = shape
    plan = tile_plan(H, W, levels)
    m, o, tin = plan.margin, plan.tile_out, plan.tile_in
    batch = batch or (2 if literal else 1)
    if literal:
        def items(z):
            zi = _stack_index(z, Z, in_slices)
            return [((zi, slice(sy, sy + tin), slice(sx, sx + tin)),
                     (z, slice(sy, min(H, sy + o)), slice(sx, min(W, sx + o))),
                     (slice(0, min(H, sy + o) - sy), slice(0, min(W, sx + o) - sx)))
                    for sy in plan.starts_y for sx in plan.starts_x]
    else:  # the union of the tiles: input [0, last start + tile_in), output [0, last start + tile_out)
        uy, ux = plan.starts_y[-1] + tin, plan.starts_x[-1] + tin

        def items(z):
            return [((_stack_index(z, Z, in_slices), slice(0, uy), slice(0, ux)),
                     (z, slice(0, H), slice(0, W)), (slice(0, H), slice(0, W)))]
    return SamplingPlan(((0, 0), (m, m + o), (m, m + o)), "reflect", _slice_passes(Z, batch, items), (Z, H, W),
                        (slice(None),) * 3, None, Z, "2D tiles")


def plan_slices(shape: tuple[int, int, int], in_slices: int, divisor: tuple[int, int], *,
                batch: int = 8) -> SamplingPlan:
    """Whole slices of a padded-convolution 2D U-Net, edge-padded to multiples of its ``divisor``."""
    Z, H, W = shape
    ty, tx = _padded_shape((H, W), divisor)

    def items(z):
        return [((_stack_index(z, Z, in_slices), slice(None), slice(None)),
                 (z, slice(None), slice(None)), (slice(0, H), slice(0, W)))]
    return SamplingPlan(((0, 0), (0, ty - H), (0, tx - W)), "edge", _slice_passes(Z, batch, items), (Z, H, W),
                        (slice(None),) * 3, None, Z, "2D slices")


def plan_windows(shape: tuple[int, int, int], divisor: tuple[int, int, int], max_voxels: int,
                 patch: tuple[int, int, int] | None = None) -> SamplingPlan:
    """A 3D network over the whole volume (at most ``max_voxels``), else over sliding windows.

    The volume is edge-padded to multiples of ``divisor``; windows
    (:func:`window_plan`) overlap by about half and are blended with
    :func:`gaussian_weights`.
    """
    padded = _padded_shape(shape, divisor)
    pad = tuple((0, p - s) for s, p in zip(shape, padded))
    result = tuple(slice(0, s) for s in shape)
    whole = (slice(None),) * 3
    if int(np.prod(shape)) <= max_voxels:
        one = Pass(((None,) + whole,), (whole,), (whole,), 1)
        return SamplingPlan(pad, "edge", (one,), padded, result, None, 1, "3D volume", announce=True)
    _, win, starts = window_plan(shape, divisor, max_voxels, patch)
    passes = []
    for a in starts[0]:
        for b in starts[1]:
            for c in starts[2]:
                sl = (slice(a, a + win[0]), slice(b, b + win[1]), slice(c, c + win[2]))
                passes.append(Pass(((None,) + sl,), (sl,), (whole,), len(passes) + 1))
    w = gaussian_weights(win, split=tuple(p < f for p, f in zip(win, padded)))
    return SamplingPlan(pad, "edge", tuple(passes), padded, result, w, len(passes), "3D windows")
