"""U-Nets of the reference study, in 2D (valid convolutions) and 3D (padded).

``features`` (F) is the number of feature maps of the first level, doubled at
each pooling; ``levels`` (L) is the number of resolution levels in each path,
so the network pools L - 1 times (the study's F=32, L=4 3D U-Net costs 1.34
TFLOP per forward on 48 x 256 x 256). Both end in two-class logits; the softmax
is applied by the loss and by inference. Weights are Xavier-initialised, biases
0.1, as in the study.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["UNet2D", "UNet3D", "init_weights", "valid_input_size", "valid_output_size"]


def init_weights(model: nn.Module, bias: float = 0.1) -> nn.Module:
    """Xavier-uniform weights and constant biases for every (transposed) convolution."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.constant_(m.bias, bias)
    return model


def _norm(kind: str | None, ch: int, dim: int) -> nn.Module:
    if kind is None or kind == "none":
        return nn.Identity()
    if kind == "instance":
        return (nn.InstanceNorm2d if dim == 2 else nn.InstanceNorm3d)(ch, affine=True)
    if kind == "batch":
        return (nn.BatchNorm2d if dim == 2 else nn.BatchNorm3d)(ch)
    raise ValueError(f"unknown norm {kind!r}")


class _DoubleConv(nn.Module):
    def __init__(self, cin: int, cout: int, dim: int, padding: int, norm: str | None, kernel=3):
        super().__init__()
        Conv = nn.Conv2d if dim == 2 else nn.Conv3d
        self.block = nn.Sequential(
            Conv(cin, cout, kernel, padding=padding), _norm(norm, cout, dim), nn.ReLU(inplace=True),
            Conv(cout, cout, kernel, padding=padding), _norm(norm, cout, dim), nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


def _center_crop(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    slices = [slice(None), slice(None)]
    for s, t in zip(x.shape[2:], like.shape[2:]):
        off = (s - t) // 2
        slices.append(slice(off, off + t))
    return x[tuple(slices)]


class _UNet(nn.Module):
    def __init__(
        self,
        dim: int,
        in_channels: int,
        n_classes: int,
        features: int,
        levels: int,
        padding: int,
        pool_kernels: Sequence[Sequence[int]] | None,
        norm: str | None,
    ):
        super().__init__()
        if levels < 2:
            raise ValueError("levels must be >= 2")
        self.dim, self.levels, self.padding = dim, levels, padding
        if pool_kernels is None:
            pool_kernels = [(2,) * dim] * (levels - 1)
        pool_kernels = [tuple(int(v) for v in k) for k in pool_kernels]
        if len(pool_kernels) != levels - 1:
            raise ValueError(f"need {levels - 1} pool kernels, got {len(pool_kernels)}")
        self.pool_kernels = pool_kernels
        Pool = nn.MaxPool2d if dim == 2 else nn.MaxPool3d
        Up = nn.ConvTranspose2d if dim == 2 else nn.ConvTranspose3d
        Conv = nn.Conv2d if dim == 2 else nn.Conv3d
        ch = [features * 2**i for i in range(levels)]
        self.down = nn.ModuleList()
        self.pools = nn.ModuleList()
        cin = in_channels
        for i in range(levels):
            self.down.append(_DoubleConv(cin, ch[i], dim, padding, norm))
            cin = ch[i]
            if i < levels - 1:
                self.pools.append(Pool(pool_kernels[i], pool_kernels[i]))
        self.ups = nn.ModuleList()
        self.up_convs = nn.ModuleList()
        for i in reversed(range(levels - 1)):
            self.ups.append(Up(ch[i + 1], ch[i], pool_kernels[i], pool_kernels[i]))
            self.up_convs.append(_DoubleConv(2 * ch[i], ch[i], dim, padding, norm))
        self.head = Conv(ch[0], n_classes, 1)
        init_weights(self)

    @property
    def divisor(self) -> tuple[int, ...]:
        """Input sizes (padded nets) must be multiples of this along each axis."""
        out = [1] * self.dim
        for k in self.pool_kernels:
            out = [a * b for a, b in zip(out, k)]
        return tuple(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x)
            if i < self.levels - 1:
                skips.append(x)
                x = self.pools[i](x)
        for up, conv in zip(self.ups, self.up_convs):
            x = up(x)
            skip = skips.pop()
            if self.padding == 0:
                skip = _center_crop(skip, x)
            x = conv(torch.cat([skip, x], dim=1))
        return self.head(x)


class UNet2D(_UNet):
    """The study's 2D U-Net: three neighbouring slices in, centre-slice logits out.

    Parameters
    ----------
    features, levels : int
        F and L of the study (F=64, L=3 or 4).
    in_slices : int
        Neighbouring slices stacked as channels (3 in the study).
    padding : {"valid", "same"}
        "valid" (the study) shrinks the output to the centre of the input tile;
        "same" keeps the size.
    norm : {None, "instance", "batch"}
        Optional normalisation after each convolution (the study used none).
    """

    def __init__(self, features: int = 64, levels: int = 4, in_slices: int = 3,
                 padding: str = "valid", norm: str | None = None, n_classes: int = 2):
        if padding not in ("valid", "same"):
            raise ValueError("padding must be 'valid' or 'same'")
        super().__init__(2, in_slices, n_classes, features, levels, 0 if padding == "valid" else 1, None, norm)
        self.in_slices = in_slices


class UNet3D(_UNet):
    """The study's padded 3D U-Net (output size = input size).

    Parameters
    ----------
    features, levels : int
        F and L of the study (F=16 or 32, L=3 or 4).
    pool_kernels : sequence of (kz, ky, kx), optional
        Pool sizes per level; default 2 x 2 x 2 everywhere (the study). Use
        (1, 2, 2) at the first levels for thick-slice data (anisotropic U-Net).
    norm : {None, "instance", "batch"}
        Optional normalisation after each convolution (the study used none).
    """

    def __init__(self, features: int = 32, levels: int = 4, pool_kernels=None,
                 norm: str | None = None, n_classes: int = 2, in_channels: int = 1):
        super().__init__(3, in_channels, n_classes, features, levels, 1, pool_kernels, norm)


def valid_output_size(input_size: int, levels: int) -> int:
    """Output size of a valid-convolution U-Net along one axis (<= 0 if impossible)."""
    s = input_size
    for _ in range(levels - 1):
        s -= 4
        if s <= 0 or s % 2:
            return -1
        s //= 2
    s -= 4
    for _ in range(levels - 1):
        s = s * 2 - 4
    return s


def valid_input_size(min_output: int, levels: int) -> tuple[int, int]:
    """Smallest (input, output) sizes of a valid U-Net with output >= ``min_output``."""
    s = max(min_output, 1)
    # search upward over inputs; cheap (sizes are a few hundred)
    for inp in range(s, s + 64 * 2**levels + 400):
        out = valid_output_size(inp, levels)
        if out >= min_output:
            return inp, out
    raise ValueError(f"no valid tile for output {min_output} with {levels} levels")
