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
