"""The one prediction engine gives, to the bit, what the three loops it replaced gave.

The references below are those loops as they stood before the engine (one per way a registry
network sees a scan: mirrored 2D tiles, whole 2D slices, 3D volume or windows), written plainly
with the same batches, so each comparison is exact equality on a seeded tiny model.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from femur_core.inference import LoadedModel, predict_array, predict_volume, tile_plan, window_plan
from femur_core.models import MODELS, Sampling, build_model, default_config
from femur_core.preprocess import GridSpec, prepare
from femur_core.tiling import gaussian_weights
from femur_core.volume import Volume, to_canonical


def _fg(net, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return torch.softmax(net(torch.from_numpy(np.ascontiguousarray(x))).float(), dim=1)[:, 1].numpy()


def _stack(vol: np.ndarray, z: int, n: int) -> np.ndarray:
    return vol[np.clip(np.arange(z - n // 2, z + n // 2 + 1), 0, vol.shape[0] - 1)]


def _ref_tiles(net, cfg, vol: np.ndarray, literal: bool) -> np.ndarray:
    Z, H, W = vol.shape
    plan = tile_plan(H, W, cfg.levels)
    m, o, tin = plan.margin, plan.tile_out, plan.tile_in
    padded = np.pad(vol, ((0, 0), (m, m + o), (m, m + o)), mode="reflect")
    if not literal:  # one pass over the union of the tiles, one slice at a time
        uy, ux = plan.starts_y[-1] + tin, plan.starts_x[-1] + tin
        return np.stack([_fg(net, _stack(padded, z, cfg.in_slices)[None, :, :uy, :ux])[0, :H, :W]
                         for z in range(Z)])
    prob, count = np.zeros((Z, H, W), np.float32), np.zeros((H, W), np.float32)
    for sy in plan.starts_y:
        for sx in plan.starts_x:
            count[sy:sy + o, sx:sx + o] += 1
    for z0 in range(0, Z, 2):  # nine tiles of two slices per pass
        where = [(z, sy, sx) for z in range(z0, min(Z, z0 + 2)) for sy in plan.starts_y for sx in plan.starts_x]
        tiles = [_stack(padded, z, cfg.in_slices)[:, sy:sy + tin, sx:sx + tin] for z, sy, sx in where]
        for (z, sy, sx), pt in zip(where, _fg(net, np.stack(tiles))):
            ey, ex = min(H, sy + o), min(W, sx + o)
            prob[z, sy:ey, sx:ex] += pt[:ey - sy, :ex - sx]
    return prob / count[None]


def _ref_slices(net, cfg, vol: np.ndarray) -> np.ndarray:
    Z, H, W = vol.shape
    out = []
    for z0 in range(0, Z, 8):  # eight slices per pass, replicate-padded to the divisor
        x = torch.from_numpy(np.stack([_stack(vol, z, cfg.in_slices) for z in range(z0, min(Z, z0 + 8))]))
        dy, dx = (-H) % net.divisor[0], (-W) % net.divisor[1]
        out.append(_fg(net, F.pad(x, [0, dx, 0, dy], mode="replicate").numpy())[:, :H, :W])
    return np.concatenate(out)


def _ref_3d(net, vol: np.ndarray, max_voxels: int) -> np.ndarray:
    shape = vol.shape
    pads = [(-s) % d for s, d in zip(shape, net.divisor)]
    xp = F.pad(torch.from_numpy(vol)[None, None], [0, pads[2], 0, pads[1], 0, pads[0]], mode="replicate")
    if vol.size <= max_voxels:
        return _fg(net, xp.numpy())[0][:shape[0], :shape[1], :shape[2]]
    full = xp.shape[2:]
    _, patch, starts = window_plan(shape, net.divisor, max_voxels)
    w = gaussian_weights(patch, split=tuple(p < f for p, f in zip(patch, full)))
    acc, norm = np.zeros(full, np.float32), np.zeros(full, np.float32)
    for a in starts[0]:
        for b in starts[1]:
            for c in starts[2]:
                sl = (slice(a, a + patch[0]), slice(b, b + patch[1]), slice(c, c + patch[2]))
                acc[sl] += _fg(net, xp[(slice(None), slice(None)) + sl].numpy())[0] * w
                norm[sl] += w
    return (acc / norm)[:shape[0], :shape[1], :shape[2]]


def _reference(net, cfg, vol: np.ndarray, *, literal: bool = False, max_voxels: int = 48 * 256 * 256) -> np.ndarray:
    net = net.eval()
    once = {
        Sampling.TILES: lambda v: _ref_tiles(net, cfg, v, literal),
        Sampling.SLICES: lambda v: _ref_slices(net, cfg, v),
        Sampling.WINDOWS: lambda v: _ref_3d(net, v, max_voxels),
    }[MODELS[cfg.name].sampling]
    prob = once(vol)
    return np.ascontiguousarray(0.5 * (prob + once(np.ascontiguousarray(vol[:, :, ::-1]))[:, :, ::-1]), np.float32)


CASES = [
    ("2d", {}, (5, 52, 60)),
    ("2d", {"literal_tiles": True}, (5, 52, 60)),
    ("2d-same", {}, (10, 36, 44)),
    ("3d", {}, (10, 36, 44)),
    ("3d", {"max_voxels": 10 * 20 * 20}, (10, 36, 44)),
    ("3d-aniso", {}, (10, 36, 44)),
    ("3d-aniso", {"max_voxels": 8 * 16 * 24}, (10, 36, 44)),
]


@pytest.mark.parametrize("name,extra,shape", CASES, ids=[f"{c[0]}{'-' + next(iter(c[1])) if c[1] else ''}"
                                                         for c in CASES])
def test_engine_equals_the_former_loops_bit_for_bit(name, extra, shape):
    cfg = default_config(name, features=4, levels=3)
    torch.manual_seed(len(name) + len(extra))
    net = build_model(cfg)
    vol = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    events = []
    prob = predict_array(net, cfg, vol, amp=None, flip_tta=True, progress=events.append, **extra)
    ref = _reference(net, cfg, vol, literal=bool(extra.get("literal_tiles")),
                     max_voxels=extra.get("max_voxels", 48 * 256 * 256))
    assert prob.shape == shape and prob.dtype == np.float32
    assert np.array_equal(prob, ref)
    assert prob.std() > 1e-4  # a real map, not a constant
    assert events and events[-1].step == events[-1].total and all(e.stage == "predict" for e in events)


@pytest.mark.parametrize("name", ["2d", "2d-same", "3d"])
def test_an_ensemble_prediction_is_the_mean_of_its_members(name):
    """predict_volume on a 3-member ensemble: the members' flip-averaged maps averaged, on the scan's grid."""
    cfg = default_config(name, features=4, levels=3)
    torch.manual_seed(7)
    nets = [build_model(cfg).eval() for _ in range(3)]
    model = LoadedModel(nets[0], cfg, GridSpec(in_plane_size=40), 0.5, None, {}, nets)
    permuted = np.array([[0, 0, -1.0, 0], [3.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 0, 1]])
    image = Volume(np.random.default_rng(2).normal(size=(8, 40, 48)).astype(np.float32) + 3, permuted)
    pred = predict_volume(model, image, device="cpu", precision="fp32")
    prep = prepare(image, model.grid)
    mean = sum(_reference(n, cfg, prep.image) for n in nets) / 3
    assert np.array_equal(pred.prob_canonical, prep.restore_canonical(mean))
    assert pred.prob.shape == image.shape and np.array_equal(pred.prob.affine, image.affine)
    assert pred.midline is not None and pred.midline == pytest.approx(
        float(np.average(np.arange(to_canonical(image)[0].shape[2]),
                         weights=(to_canonical(image)[0].data > image.data.mean()).sum(axis=(0, 1)))))


def test_every_registered_network_has_a_sampling_plan():
    """The registry, not the network's attributes, decides how a scan is cut."""
    from femur_core.engine import sampling_plan

    expected = {Sampling.TILES: "2D tiles", Sampling.SLICES: "2D slices", Sampling.WINDOWS: "3D volume"}
    for name, spec in MODELS.items():
        cfg = default_config(name, features=4, levels=3)
        plan = sampling_plan(build_model(cfg), cfg, (6, 40, 40))
        assert plan.message == expected[spec.sampling], name
        assert plan.passes and plan.passes[-1].done == plan.total
