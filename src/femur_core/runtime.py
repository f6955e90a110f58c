"""Where and how fast the networks run: device choice, autocast precision, memory layout.

One policy for training and prediction: :func:`resolve_device` picks the
device, :func:`resolve_amp` the autocast dtype (bf16 only where the hardware
runs it fast, measured once for 3D training on the CPU), :func:`memory_format`
the tensor layout that pays with it.
"""

from __future__ import annotations

import contextlib
import functools
import time

import torch

from .errors import InputError
from .models.registry import ModelKind

__all__ = ["resolve_device", "resolve_amp", "cpu_bf16_conv3d_training_is_faster", "memory_format", "to_format",
           "autocast"]


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
    """Whether the CPU has AVX-512 or AMX (oneDNN's fast bf16 kernels)."""
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
    """``t`` in memory layout ``fmt`` (unchanged for None)."""
    return t if fmt is None else t.contiguous(memory_format=fmt)


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` on ``device``'s type; a no-op context for None (fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
