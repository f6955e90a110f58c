"""The single-pass 2D path equals the study's literal 3 x 3 mirrored-tile average."""
import numpy as np
import pytest
import torch

from femur_core.inference import predict_array, tile_plan
from femur_core.models import build_model, default_config


@pytest.mark.parametrize("levels,shape", [(3, (3, 96, 96)), (3, (2, 70, 110)), (4, (2, 100, 84))])
def test_single_pass_equals_nine_tile_average(levels, shape):
    cfg = default_config("2d", features=4, levels=levels)
    torch.manual_seed(levels)
    net = build_model(cfg).eval()
    rng = np.random.default_rng(0)
    img = rng.normal(size=shape).astype(np.float32)
    fast = predict_array(net, cfg, img, amp=None)
    literal = predict_array(net, cfg, img, amp=None, literal_tiles=True)
    assert fast.shape == literal.shape == shape
    # same numbers up to fp32 summation order; the tiles really differ from a plain resize
    np.testing.assert_allclose(fast, literal, atol=2e-5, rtol=0)
    assert fast.std() > 1e-4


def test_tile_offsets_are_stride_aligned_and_cover():
    for h, w, levels in [(256, 256, 3), (200, 300, 4), (97, 131, 3)]:
        plan = tile_plan(h, w, levels)
        a = 2 ** (levels - 1)
        for starts, n in ((plan.starts_y, h), (plan.starts_x, w)):
            assert all(s % a == 0 for s in starts)
            covered = np.zeros(n, bool)
            for s in starts:
                covered[s:s + plan.tile_out] = True
            assert covered.all()
            assert len(starts) == 1 or all(b - a_ < plan.tile_out for a_, b in zip(starts, starts[1:]))
