"""The poly learning-rate schedule of TrainConfig."""
import pytest

from femur_core.training import TrainConfig, lr_factor, recipe


def test_constant_is_one():
    cfg = TrainConfig(lr_schedule="constant", max_minutes=10)
    assert lr_factor(cfg, 0.0, 0.0) == 1.0
    assert lr_factor(cfg, 599.0, 50.0) == 1.0


def test_poly_follows_budget_share():
    cfg = TrainConfig(lr_schedule="poly", max_minutes=10)
    assert lr_factor(cfg, 0.0, 0.0) == 1.0
    assert lr_factor(cfg, 300.0, 0.0) == pytest.approx(0.5 ** 0.9)
    assert lr_factor(cfg, 600.0, 0.0) == 0.0
    assert lr_factor(cfg, 900.0, 0.0) == 0.0  # past the budget: stays at 0, never negative
    vals = [lr_factor(cfg, t, 0.0) for t in range(0, 601, 30)]
    assert all(a > b for a, b in zip(vals, vals[1:]))


def test_poly_follows_epochs_without_budget():
    cfg = TrainConfig(lr_schedule="poly", max_minutes=None, max_epochs=40)
    assert lr_factor(cfg, 1e6, 10.0) == pytest.approx(0.75 ** 0.9)


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="lr_schedule"):
        lr_factor(TrainConfig(lr_schedule="cosine"), 0.0, 0.0)


def test_default_real_data_recipe_anneals():
    assert recipe("cpu-2d").lr_schedule == "poly"


def test_poly_over_a_budget_runs_to_the_end():
    from femur_core.training import _early_stop

    falling = [0.9] + [0.5] * 60  # a lucky first epoch, then no improvement for 60 epochs
    cfg = TrainConfig(lr_schedule="poly", max_minutes=8, min_epochs=5, patience=10)
    assert not _early_stop(falling, cfg)
    assert _early_stop(falling, cfg.replace(lr_schedule="constant"))
    assert _early_stop(falling, cfg.replace(max_minutes=None))
