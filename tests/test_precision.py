"""How `precision="auto"` picks bf16 or fp32."""
import torch

from femur_core import inference
from femur_core.inference import resolve_amp

CPU = torch.device("cpu")


def test_explicit_precision_wins():
    assert resolve_amp("fp32", CPU, train_kind="3d") is None
    assert resolve_amp("bf16", CPU, train_kind="3d") is torch.bfloat16


def test_3d_training_follows_the_measurement(monkeypatch):
    monkeypatch.setattr(inference, "cpu_bf16_conv3d_training_is_faster", lambda: True)
    assert resolve_amp("auto", CPU, train_kind="3d") is torch.bfloat16
    monkeypatch.setattr(inference, "cpu_bf16_conv3d_training_is_faster", lambda: False)
    assert resolve_amp("auto", CPU, train_kind="3d") is None


def test_measurement_is_a_cached_bool():
    inference.cpu_bf16_conv3d_training_is_faster.cache_clear()
    first = inference.cpu_bf16_conv3d_training_is_faster()
    assert isinstance(first, bool)
    assert inference.cpu_bf16_conv3d_training_is_faster() is first
    assert inference.cpu_bf16_conv3d_training_is_faster.cache_info().hits >= 1
    if not inference._cpu_has_fast_bf16():
        assert first is False  # no fast bf16 instructions: never bf16
