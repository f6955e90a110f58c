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


def test_a_cpu_budget_counts_the_process_cpu_time_not_the_waiting():
    # bug caught: a "cpu" budget read from the wall clock, so a run on a loaded (or idle) machine
    # trains for less (or more) compute than its peers
    import time

    from femur_core.training import _Clock

    wall, cpu = _Clock(kind="wall"), _Clock(2.0, kind="cpu")
    time.sleep(0.3)  # waiting costs no CPU time
    assert wall.elapsed() >= 0.3
    assert 2.0 <= cpu.elapsed() < 2.0 + 0.2
    with pytest.raises(ValueError, match="budget_clock"):
        _Clock(kind="gpu")


def test_3d_patches_per_volume_set_the_steps_between_validations():
    # bug caught: a 3D patch epoch of one patch per volume (validation, a whole-volume pass per
    # early-stopping subject, then costs about as much as the epoch's training steps), or patches
    # drawn for some volumes only
    import numpy as np

    from femur_core.models import default_config
    from femur_core.training import _epoch_samples

    preps = [object()] * 3
    cfg = TrainConfig(model=default_config("3d", features=4, levels=2), patch_size=[8, 16, 16],
                      patches_per_volume=4)
    order = _epoch_samples(preps, cfg, np.random.default_rng(0))
    assert sorted(order) == sorted([(i, -1) for i in range(3)] * 4)
    whole = _epoch_samples(preps, cfg.replace(patch_size=None), np.random.default_rng(0))
    assert sorted(whole) == [(0, -1), (1, -1), (2, -1)]  # whole volumes: each once per epoch
