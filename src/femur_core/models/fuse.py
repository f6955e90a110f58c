"""Inference copies of trained networks with batch norm folded into the convolutions.

In eval mode a batch norm is a fixed per-channel affine map, so it can be
folded into the weights and bias of the convolution before it (torch's
:func:`torch.nn.utils.fusion.fuse_conv_bn_eval`). The folded network computes
the same function with one pass over each feature map fewer; on the CPU in
bf16 autocast it also skips the casts around the fp32 batch norm. Instance
norm depends on the input and is kept.
"""

from __future__ import annotations

import copy

from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

__all__ = ["fold_batch_norm"]

_PAIRS = ((nn.Conv2d, nn.BatchNorm2d), (nn.Conv3d, nn.BatchNorm3d))


def fold_batch_norm(net: nn.Module) -> nn.Module:
    """An eval-mode copy of ``net`` where every convolution followed by a batch
    norm in the same :class:`~torch.nn.Sequential` is replaced by one folded
    convolution (the batch norm by :class:`~torch.nn.Identity`).

    ``net`` itself is not changed. The copy is for inference only: its
    ``state_dict`` no longer matches the training checkpoint's.
    """
    out = copy.deepcopy(net).eval()
    for module in out.modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.children())
        for i in range(len(children) - 1):
            conv, bn = children[i], children[i + 1]
            if any(isinstance(conv, c) and isinstance(bn, b) for c, b in _PAIRS) and bn.track_running_stats:
                module[i] = fuse_conv_bn_eval(conv, bn)
                module[i + 1] = nn.Identity()
    return out
