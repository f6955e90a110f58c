"""ROI restriction: the views after the first predict only the first view's region of interest.

The box (femur_core.roi.roi_box) is checked on hand-made maps, edges and the empty map included.
The pipeline (femur_core.inference.predict_views) is checked with a small padded 2D network whose
femur probability is a smoothed, pooled intensity of the scan, on a synthetic volume with one
bright block: outside the box every view is exactly the first view; inside, away from the box's
border (where the crop's padding replaces the scan), it equals the full pass; the masks are the
same; a first pass that finds nothing falls back to full passes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from femur_core.inference import LoadedModel, predict_views, predict_volume
from femur_core.models import default_config
from femur_core.preprocess import GridSpec
from femur_core.roi import ROI_DEFAULT, box_fraction, paste, roi_box, roi_margin
from femur_core.volume import Volume


# ----------------------------------------------------------------------------- the box
def test_roi_box_grows_by_the_margin_and_aligns_to_the_pooling_grid():
    prob = np.zeros((20, 64, 80), np.float32)
    prob[8:11, 30:35, 41:50] = 0.9
    box = roi_box(prob, level=0.05, margin=(2, 4, 4), align=(1, 8, 8))
    # slices 8..10 +- 2; rows 30..34 -> 26..38 -> [24, 40); columns 41..49 -> 37..53 -> [32, 56)
    assert box == (slice(6, 13), slice(24, 40), slice(32, 56))
    assert box_fraction(box, prob.shape) == pytest.approx(7 * 16 * 24 / prob.size)


def test_roi_box_counts_only_voxels_above_the_level():
    prob = np.full((6, 32, 32), 0.05, np.float32)  # at the level: outside
    assert roi_box(prob, level=0.05) is None
    prob[3, 16, 16] = 0.0501
    assert roi_box(prob, level=0.05, margin=(0, 0, 0), align=(1, 1, 1)) == (slice(3, 4), slice(16, 17),
                                                                            slice(16, 17))


def test_stray_specks_are_left_out_of_the_box():
    prob = np.zeros((30, 64, 64), np.float32)
    prob[10:15, 20:40, 20:40] = 0.9  # 2000 voxels
    prob[25, 60, 60] = 0.3  # a speck: 0.05 % of the largest part
    prob[2:4, 2:12, 2:12] = 0.2  # 200 voxels: 10 %, kept
    box = roi_box(prob, margin=(0, 0, 0), align=(1, 1, 1))
    assert box == (slice(2, 15), slice(2, 40), slice(2, 40))
    assert roi_box(prob, min_part=0.0, margin=(0, 0, 0), align=(1, 1, 1)) == (slice(2, 26), slice(2, 61),
                                                                              slice(2, 61))
    assert roi_box(prob, min_part=0.2, margin=(0, 0, 0), align=(1, 1, 1)) == (slice(10, 15), slice(20, 40),
                                                                              slice(20, 40))


def test_an_empty_first_pass_has_no_box():
    assert roi_box(np.zeros((5, 16, 16), np.float32)) is None


def test_boxes_at_the_volume_edges_are_clipped_and_end_at_the_edge():
    prob = np.zeros((10, 50, 45), np.float32)
    prob[0, 0, 0] = prob[9, 49, 44] = 1.0  # both corners: the whole volume
    assert roi_box(prob, margin=(3, 16, 16), align=(1, 16, 16)) == (slice(0, 10), slice(0, 50), slice(0, 45))
    prob[:] = 0
    prob[9, 47, 2] = 1.0
    box = roi_box(prob, margin=(2, 4, 4), align=(1, 16, 16))
    # the end is the volume's edge (50, not 64), the start a multiple of 16 (43 -> 32; 2 - 4 -> 0)
    assert box == (slice(7, 10), slice(32, 50), slice(0, 16))
    assert all(0 <= s.start < s.stop <= n for s, n in zip(box, prob.shape))


def test_default_margin_covers_a_2d_networks_input_slices_and_four_pooling_strides():
    assert roi_margin((16, 16), in_slices=3) == (3, 64, 64)
    assert roi_margin((16, 16), in_slices=5) == (4, 64, 64)
    assert roi_margin((2, 8, 8)) == (8, 32, 32)


def test_paste_writes_the_box_into_a_copy():
    base = np.zeros((2, 4, 4), np.float32)
    out = paste(base, np.ones((1, 2, 2)), (slice(1, 2), slice(0, 2), slice(2, 4)))
    assert base.sum() == 0 and out.sum() == 4 and out[1, :2, 2:].min() == 1 and out.dtype == np.float32


# ----------------------------------------------------------------------------- the pipeline
class BlobNet(torch.nn.Module):
    """A small padded 2D network with pooling: femur logit from the centre slice's intensity,
    smoothed 3 x 3 (zero padding) and pooled 4 x 4 (its divisor), minus ``level``."""

    divisor = (4, 4)

    def __init__(self, level: float) -> None:
        super().__init__()
        self.level = level

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x[:, x.shape[1] // 2:x.shape[1] // 2 + 1]
        s = F.avg_pool2d(c, 3, stride=1, padding=1, count_include_pad=True)
        up = F.interpolate(F.avg_pool2d(s, 4), scale_factor=4)
        fg = 8.0 * (0.5 * s + 0.5 * up - self.level)
        return torch.cat([torch.zeros_like(fg), fg], dim=1)


def _model(config: dict | None = None, levels: tuple[float, ...] = (0.5, 0.4, 0.6)) -> LoadedModel:
    """Three members (femur above these normalised intensities) registered as ``2d-same`` (whole slices)."""
    cfg = default_config("2d-same", features=4, levels=3)
    nets = [BlobNet(v) for v in levels]
    return LoadedModel(nets[0], cfg, GridSpec(in_plane_size=None, in_plane_spacing=None), 0.5, None,
                       config or {}, nets)


def _scan(blob: bool = True) -> Volume:
    """Noise and one bright block (1 % of the volume: above the 99.5th percentile clip of normalising)."""
    rng = np.random.default_rng(0)
    data = rng.normal(0.0, 0.02, size=(88, 24, 72)).astype(np.float32)  # model grid (P, I, L): 24 x 72 x 88
    if blob:
        data[51:67, 9:15, 30:46] += 1.0
    return Volume(data, np.diag([1.0, 1.0, 1.0, 1.0]))


def _outside(box, shape):
    m = np.ones(shape, bool)
    m[box] = False
    return m


def _inner(box, shape, border):
    """Voxels of ``box`` at least ``border`` voxels in-plane from its border (the volume's edge is no border)."""
    m = np.zeros(shape, bool)
    sl = [box[0]]
    for s, n in zip(box[1:], shape[1:]):
        sl.append(slice(s.start + (border if s.start > 0 else 0), s.stop - (border if s.stop < n else 0)))
    m[tuple(sl)] = True
    return m


def test_roi_views_equal_the_first_view_outside_and_the_full_views_inside():
    model = _model()
    image = _scan()
    full = predict_views(model, image, flip_tta=True, device="cpu", precision="fp32", keep_views=True, roi=False)
    part = predict_views(model, image, flip_tta=True, device="cpu", precision="fp32", keep_views=True, roi=True)
    shape = part.prepared.image.shape
    assert full.roi is None and part.roi is not None
    assert shape == (24, 72, 88)
    assert 0.0 < box_fraction(part.roi, shape) < 0.35  # the blob's neighbourhood, not the volume
    first = part.views[0]
    assert np.array_equal(first, full.views[0])  # the first view runs in full either way
    box_f = roi_box(first[:, :, ::-1], margin=roi_margin((4, 4), 3), align=(1, 4, 4))
    mirrored = (box_f[0], box_f[1], slice(shape[2] - box_f[2].stop, shape[2] - box_f[2].start))
    for name, v_roi, v_full in zip(part.names[1:], part.views[1:], full.views[1:]):
        box = mirrored if name.endswith("flipped") else part.roi
        out = _outside(box, shape)
        assert np.array_equal(v_roi[out], first[out]), name
        inner = _inner(box, shape, border=8)  # 3 x 3 smoothing + 4 x 4 pooling: 5 voxels of border effect
        np.testing.assert_allclose(v_roi[inner], v_full[inner], atol=1e-5, err_msg=name)
        assert not np.array_equal(v_roi, first), name  # the later views are their own inside the box
    np.testing.assert_allclose(part.mean, sum(part.views) / 6, atol=1e-6)
    m_full = full.prediction(0.5, True).mask.data
    m_roi = part.prediction(0.5, True).mask.data
    assert m_full.sum() > 0 and np.array_equal(m_roi, m_full)


def test_a_first_pass_that_finds_nothing_falls_back_to_full_passes():
    model = _model(levels=(3.0, 0.3, 0.5))  # member 0: nothing above the clipped noise (< 2.6 sd); the others: some
    image = _scan(blob=False)
    full = predict_views(model, image, flip_tta=True, device="cpu", precision="fp32", keep_views=True, roi=False)
    part = predict_views(model, image, flip_tta=True, device="cpu", precision="fp32", keep_views=True, roi=True)
    assert roi_box(part.views[0]) is None and part.roi is None
    for a, b in zip(part.views, full.views):
        assert np.array_equal(a, b)
    assert part.views[2].max() > 0.05  # a later member finds something the first did not: kept
    assert np.array_equal(part.mean, full.mean)


def test_the_models_own_setting_applies_unless_overridden(monkeypatch):
    """``roi_restrict`` stored in the model's configuration decides; the caller's ``roi`` wins."""
    import femur_core.inference as inference

    calls = []
    real = inference.predict_box

    def spy(*args, **kw):
        calls.append(args[3])
        return real(*args, **kw)

    monkeypatch.setattr(inference, "predict_box", spy)
    assert _model().roi_restrict is ROI_DEFAULT
    off = _model({"roi_restrict": False})
    assert off.roi_restrict is False
    predict_volume(off, _scan(), device="cpu", precision="fp32")
    assert calls == []
    pred = predict_volume(off, _scan(), device="cpu", precision="fp32", roi=True)
    assert len(calls) == 5 and pred.mask.data.sum() > 0  # 3 members x 2 views, all but the first
    calls.clear()
    predict_volume(_model({"roi_restrict": True}), _scan(), device="cpu", precision="fp32", flip_tta=False)
    assert len(calls) == 2
    calls.clear()  # without cleanup the model's setting does not apply (stray specks would stay unaveraged)
    predict_volume(_model({"roi_restrict": True}), _scan(), device="cpu", precision="fp32", cleanup=False)
    assert calls == []
    predict_volume(_model({"roi_restrict": True}), _scan(), device="cpu", precision="fp32", cleanup=False, roi=True)
    assert len(calls) == 5


def test_predict_cli_passes_the_roi_flag(tmp_path, tiny_checkpoint, tiny_scan_pair, monkeypatch):
    import femur_core.predict as predict

    seen = []
    real = predict.predict_with_views

    def spy(model, image, **kw):
        seen.append(kw["roi"])
        return real(model, image, **kw)

    monkeypatch.setattr(predict, "predict_with_views", spy)
    for flag, expected in ((["--roi-restrict", "off"], False), (["--roi-restrict", "on"], True), ([], None)):
        out = tmp_path / f"out{len(seen)}"
        assert predict.main([str(tiny_checkpoint), str(tiny_scan_pair[0]), "--out", str(out), *flag]) == 0
        assert seen[-1] is expected and (out / "sub01_image_mask.nii.gz").exists()
