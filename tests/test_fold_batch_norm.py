"""Batch norm folded into the convolutions for inference: the same function, the original untouched."""

from __future__ import annotations

import torch
from torch import nn

from femur_core.models import build_model, default_config
from femur_core.models.fuse import fold_batch_norm

torch.set_num_threads(1)


def _trained_like(name: str, **kw) -> nn.Module:
    """A network whose batch norms hold non-trivial running statistics and affine parameters."""
    torch.manual_seed(0)
    net = build_model(default_config(name, **kw))
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return net.eval()


def _count(net: nn.Module, kind) -> int:
    return sum(isinstance(m, kind) for m in net.modules())


def test_folded_2d_and_3d_networks_compute_the_same_function():
    cases = [("2d-same", dict(features=8, levels=3, norm="batch"), (2, 3, 32, 32)),
             ("3d", dict(features=4, levels=2, norm="batch"), (1, 1, 8, 16, 16))]
    for name, kw, shape in cases:
        net = _trained_like(name, **kw)
        before = {k: v.clone() for k, v in net.state_dict().items()}
        x = torch.randn(*shape)
        folded = fold_batch_norm(net)
        assert _count(net, nn.modules.batchnorm._BatchNorm) > 0
        assert _count(folded, nn.modules.batchnorm._BatchNorm) == 0, name
        with torch.no_grad():
            torch.testing.assert_close(folded(x), net(x), rtol=1e-4, atol=1e-4)
        for k, v in net.state_dict().items():  # the original is not changed
            assert torch.equal(v, before[k]), k


def test_instance_norm_is_kept():
    torch.manual_seed(0)
    net = build_model(default_config("2d-same", features=8, levels=3, norm="instance")).eval()
    folded = fold_batch_norm(net)
    n = _count(net, nn.modules.instancenorm._InstanceNorm)
    assert n > 0 and _count(folded, nn.modules.instancenorm._InstanceNorm) == n
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(folded(x), net(x))


def test_load_model_returns_folded_members_that_predict_as_the_checkpoint(tmp_path):
    from femur_core.checkpoint import save_checkpoint
    from femur_core.engine import predict_array
    from femur_core.model_loading import load_model

    cfg = default_config("2d-same", features=8, levels=3, norm="batch")
    net = _trained_like("2d-same", features=8, levels=3, norm="batch")
    path = tmp_path / "model.pt"
    save_checkpoint(path, net, {"model": cfg.to_dict(), "grid": {}}, epoch=1, val_dsc=0.5, threshold=0.4)
    loaded = load_model(path)
    assert _count(loaded.net, nn.modules.batchnorm._BatchNorm) == 0 and not loaded.net.training
    vol = torch.randn(6, 40, 36).numpy()
    want = predict_array(net, cfg, vol)
    got = predict_array(loaded.net, loaded.model_config, vol)
    assert abs(got - want).max() < 1e-4 and loaded.threshold == 0.4
