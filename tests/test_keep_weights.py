"""Which weights a run keeps as its model: the best validation epoch or the final one."""

from __future__ import annotations

import numpy as np
import torch

from femur_core.checkpoint import load_checkpoint
from femur_core.data import find_subjects, load_subjects
from femur_core.models import default_config
from femur_core.preprocess import GridSpec
from femur_core.training import TrainConfig, train_model

from reliability_utils import write_cohort

torch.set_num_threads(1)


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(model=default_config("2d-same", features=4, levels=3), grid=GridSpec(), loss="dice_ce",
                       lr=2e-2, batch_size=2, max_epochs=4, min_epochs=4, patience=10, augment=[],
                       device="cpu", precision="fp32", **kw)


def test_best_keeps_the_best_validation_epoch_and_last_the_final_one(tmp_path):
    subjects = load_subjects(find_subjects(write_cohort(tmp_path / "data", 4)))
    best = train_model(subjects[:3], subjects[3:], _cfg(), tmp_path / "best")
    val = [h["val_dsc"] for h in best.history]
    assert load_checkpoint(best.checkpoint)["epoch"] == int(np.argmax(val)) + 1
    assert int(np.argmax(val)) + 1 < 4, val  # (seeded: the best epoch is not the last, so the two differ)

    last = train_model(subjects[:3], subjects[3:], _cfg(keep_weights="last"), tmp_path / "last")
    kept, final = load_checkpoint(last.checkpoint), load_checkpoint(last.last)
    assert kept["epoch"] == len(last.history) == 4
    assert kept["val_dsc"] == last.history[-1]["val_dsc"]
    for k, v in final["state_dict"].items():
        torch.testing.assert_close(kept["state_dict"][k], v, rtol=0, atol=0)
    # the same seed and data: the two runs trained the same weights, only the kept epoch differs
    same = all(torch.equal(a, b) for a, b in zip(load_checkpoint(best.last)["state_dict"].values(),
                                                  final["state_dict"].values()))
    assert same


def test_validate_every_skips_validations_but_not_the_last_and_trains_the_same_weights(tmp_path):
    subjects = load_subjects(find_subjects(write_cohort(tmp_path / "data", 4)))
    every = train_model(subjects[:3], subjects[3:], _cfg(keep_weights="last"), tmp_path / "every")
    sparse = train_model(subjects[:3], subjects[3:], _cfg(keep_weights="last", validate_every=3), tmp_path / "sparse")
    val = [h["val_dsc"] for h in sparse.history]
    assert len(val) == 4 and np.isnan(val[0]) and np.isnan(val[1]), val  # epochs 1, 2: not validated
    assert val[2] == every.history[2]["val_dsc"] and val[3] == every.history[3]["val_dsc"]  # 3rd and the last
    # validation only reads the network: skipping it trains exactly the same weights
    for a, b in zip(load_checkpoint(every.checkpoint)["state_dict"].values(),
                    load_checkpoint(sparse.checkpoint)["state_dict"].values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert sparse.threshold == every.threshold


def test_a_run_stopped_by_its_budget_validates_its_last_epoch():
    from femur_core.training import _early_stop, _validates

    cfg = _cfg(validate_every=5)
    assert [_validates(cfg, e, last=False) for e in range(4)] == [False, False, False, True]  # max_epochs 4
    assert _validates(cfg, 1, last=True)  # the budget ran out during epoch 2
    assert _validates(cfg.replace(max_epochs=100), 9, last=False) and not _validates(cfg.replace(max_epochs=100), 8,
                                                                                         last=False)
    # early stopping counts validated epochs only
    stop = cfg.replace(min_epochs=1, patience=2, validate_every=1)
    assert not _early_stop([0.5, float("nan"), 0.6, float("nan"), 0.61], stop)
    assert _early_stop([0.5, 0.7, float("nan"), 0.6, float("nan"), 0.6], stop)


def test_best_validation_dsc_skips_unvalidated_epochs():
    from femur_core.training import best_validation_dsc

    nan = float("nan")
    assert best_validation_dsc([{"val_dsc": nan}, {"val_dsc": 0.7}, {"val_dsc": nan}, {"val_dsc": 0.6}]) == 0.7
    assert np.isnan(best_validation_dsc([{"val_dsc": nan}])) and np.isnan(best_validation_dsc([]))


def test_a_nan_loss_stops_training_with_a_clear_error_and_keeps_the_finite_last_epoch(tmp_path, monkeypatch):
    import pytest

    import femur_core.training as training
    from femur_core.errors import TrainingDiverged

    subjects = load_subjects(find_subjects(write_cohort(tmp_path / "data", 4)))
    real = training.get_loss
    calls = {"n": 0, "poison_after": None}

    def poisoned(*a, **kw):
        fn = real(*a, **kw)

        def loss(logits, target):
            calls["n"] += 1
            value = fn(logits, target)
            after = calls["poison_after"]
            return value * float("nan") if after is not None and calls["n"] > after else value
        return loss

    monkeypatch.setattr(training, "get_loss", poisoned)
    train_model(subjects[:3], subjects[3:], _cfg().replace(max_epochs=1, min_epochs=1), tmp_path / "count")
    calls.update(poison_after=calls["n"], n=0)  # the steps of one epoch: the second epoch's first loss is NaN
    with pytest.raises(TrainingDiverged, match=r"loss nan at epoch 2, step 1 .*keeps the end of epoch 1.*--lr"):
        train_model(subjects[:3], subjects[3:], _cfg(), tmp_path / "run")
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    weights = [v for v in last["state_dict"].values() if v.is_floating_point()]
    assert weights and all(torch.isfinite(v).all() for v in weights)


def test_an_epoch_end_event_says_whether_it_was_validated():
    from femur_core.progress import ProgressEvent, Stage

    assert ProgressEvent(Stage.EPOCH_END, val_dsc=0.8).validated
    assert not ProgressEvent(Stage.EPOCH_END, val_dsc=float("nan")).validated
    assert not ProgressEvent(Stage.EPOCH_END).validated
