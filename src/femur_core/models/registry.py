"""The single list of networks: the CLI ``--model`` choices and the GUI combo box read it.

A model is fully described by a :class:`ModelConfig` (JSON-serialisable); the
registry maps its ``name`` to a :class:`ModelSpec` that knows how to build it and
whether inference runs slice-wise (2D) or on volumes (3D).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import Enum

from torch import nn

from .unet import UNet2D, UNet3D

__all__ = ["ModelKind", "Sampling", "ModelConfig", "ModelSpec", "MODELS", "build_model", "model_names"]


class ModelKind(str, Enum):
    """How a network sees a scan (a ``str``: ``ModelKind.D3 == "3d"``).

    ``D2``: slice by slice (neighbouring slices as channels; tiles or one pass
    per slice). ``D3``: volumes (whole, or Gaussian-weighted sliding windows).
    """

    D2 = "2d"
    D3 = "3d"

    def __str__(self) -> str:
        return self.value


class Sampling(str, Enum):
    """How inference cuts a scan into network inputs (``femur_core.engine`` plans each).

    ``TILES``: 2D slices in mirrored 3 x 3 tiles (valid convolutions: the
    output is smaller than the input). ``SLICES``: whole 2D slices padded to
    the network's divisor (padded convolutions). ``WINDOWS``: 3D, the whole
    volume or Gaussian-weighted sliding windows.
    """

    TILES = "tiles"
    SLICES = "slices"
    WINDOWS = "windows"

    def __str__(self) -> str:
        return self.value


@dataclass
class ModelConfig:
    """Architecture of one network.

    Attributes
    ----------
    name : str
        Registry key (``"2d"``, ``"2d-same"``, ``"3d"``, ``"3d-aniso"``).
    features, levels : int
        F (feature maps of the first level) and L (resolution levels per path).
    in_slices : int
        Neighbouring slices given to a 2D network as channels.
    norm : str or None
        Normalisation layer after each convolution (None as in the study).
    pool_kernels : list of list of int, optional
        3D only: pool size per level; None means 2 x 2 x 2 (or the anisotropic rule).
    n_classes : int
        Output classes: 2 (background, femur), or 3 when trained with an extra
        "other bone" class (``TrainConfig.aux_labels``). Channel 1 is the femur
        in every case, so inference reads the femur probability the same way.
    """

    name: str = "3d"
    features: int = 32
    levels: int = 4
    in_slices: int = 3
    norm: str | None = None
    pool_kernels: list[list[int]] | None = None
    n_classes: int = 2

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


@dataclass(frozen=True)
class ModelSpec:
    """How to build one registered network.

    Attributes
    ----------
    kind : ModelKind
        Slice-wise (2D) or volumetric network.
    sampling : Sampling
        How inference feeds it a scan (tiles, slices or windows).
    build : callable
        ``build(config) -> nn.Module``.
    description : str
        One line shown by ``--help`` and the GUI.
    defaults : dict
        Default ``features`` / ``levels`` (and others) for this entry.
    """

    kind: ModelKind
    sampling: Sampling
    build: Callable[[ModelConfig], nn.Module]
    description: str
    defaults: dict = field(default_factory=dict)


def _aniso_kernels(levels: int, n_inplane_only: int) -> list[list[int]]:
    return [[1, 2, 2] if i < n_inplane_only else [2, 2, 2] for i in range(levels - 1)]


MODELS: dict[str, ModelSpec] = {
    "2d": ModelSpec(
        ModelKind.D2, Sampling.TILES,
        lambda c: UNet2D(c.features, c.levels, c.in_slices, "valid", c.norm, c.n_classes),
        "2D U-Net of the study: valid convolutions, 3 slices in, mirrored 3x3 tiles",
        {"features": 64, "levels": 3},
    ),
    "2d-same": ModelSpec(
        ModelKind.D2, Sampling.SLICES,
        lambda c: UNet2D(c.features, c.levels, c.in_slices, "same", c.norm, c.n_classes),
        "2D U-Net with padded convolutions and batch norm (fast CPU default)",
        {"features": 32, "levels": 5, "norm": "batch", "in_slices": 3},
    ),
    "3d": ModelSpec(
        ModelKind.D3, Sampling.WINDOWS,
        lambda c: UNet3D(c.features, c.levels, c.pool_kernels, c.norm, c.n_classes),
        "3D U-Net of the study: padded 3x3x3 convolutions, whole volume or sliding windows",
        {"features": 32, "levels": 4},
    ),
    "3d-aniso": ModelSpec(
        ModelKind.D3, Sampling.WINDOWS,
        lambda c: UNet3D(c.features, c.levels, c.pool_kernels or _aniso_kernels(c.levels, 2), c.norm, c.n_classes),
        "3D U-Net that pools in-plane only at the first two levels (thick slices)",
        {"features": 16, "levels": 4, "norm": "instance"},
    ),
}


def model_names() -> list[str]:
    """Registered model names, in registry order."""
    return list(MODELS)


def default_config(name: str, **overrides) -> ModelConfig:
    """A :class:`ModelConfig` with the registry defaults of ``name``, then ``overrides``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    vals = {**MODELS[name].defaults, **{k: v for k, v in overrides.items() if v is not None}}
    return ModelConfig(name=name, **vals)


def build_model(config: ModelConfig) -> nn.Module:
    """Instantiate the network a config describes."""
    if config.name not in MODELS:
        raise ValueError(f"unknown model {config.name!r}; choose one of {', '.join(MODELS)}")
    return MODELS[config.name].build(config)
