"""Training the model to keep, and fine-tuning it from an existing model (femur_core.train / finetune)."""

from __future__ import annotations

import json

import pytest
import torch

from femur_core.checkpoint import load_checkpoint
from femur_core.data import find_subjects, load_subjects
from femur_core.errors import InputError, OutputExistsError
from femur_core.finetune import finetune_config
from femur_core.models.registry import default_config
from femur_core.train import train_final_model
from femur_core.training import recipe, recipe_for_data


def _tiny(cfg, **kw):
    return cfg.replace(model=default_config("2d-same", features=4, levels=2), batch_size=2, max_epochs=1,
                       min_epochs=1, max_minutes=None, augment=["flip"], precision="fp32", device="cpu",
                       aux_labels=False, **kw)


def test_recipe_for_data_follows_the_folder(tmp_path, tiny_data_folder):
    from femur_core.synthetic import SYNTHETIC_MARKER, make_cohort

    assert recipe_for_data(tiny_data_folder) == "cpu-2d"  # scans of unknown origin: the real-data default
    assert recipe_for_data(None) == "cpu-2d"
    make_cohort(tmp_path / "syn", n=1, seed=0, geometry="tiny")
    marker = json.loads((tmp_path / "syn" / SYNTHETIC_MARKER).read_text())
    assert marker["generator"].endswith("make_cohort") and marker["n"] == 1
    assert recipe_for_data(tmp_path / "syn") == "synthetic-quick"


def test_final_model_then_fine_tune_starts_from_its_weights(tmp_path, tiny_data_folder):
    subjects = load_subjects(find_subjects(tiny_data_folder))
    base_cfg = _tiny(recipe("synthetic-quick"))
    first = train_final_model(subjects, base_cfg, tmp_path / "model", data=str(tiny_data_folder))
    assert first.model == tmp_path / "model" / "model.pt" and first.model.is_file()
    info = json.loads((tmp_path / "model" / "config.json").read_text())
    assert info["train_subjects"] == first.train_subjects and info["early_stopping_subjects"]
    assert sorted(first.train_subjects + first.early_stopping_subjects) == [s.id for s in subjects]
    with pytest.raises(OutputExistsError):
        train_final_model(subjects, base_cfg, tmp_path / "model")

    # the fine-tuning recipe keeps the model's architecture and grid, lowers the learning rate
    other = recipe("cpu-2d").replace(max_epochs=0, min_epochs=0, device="cpu", precision="fp32")
    ft_cfg = finetune_config(tmp_path / "model", other)
    assert ft_cfg.model == first.result.config.model and ft_cfg.grid == first.result.config.grid
    assert ft_cfg.lr == pytest.approx(other.lr * 0.1) and ft_cfg.loss == other.loss
    # zero epochs: the saved model is the starting point, i.e. exactly the first model's weights
    tuned = train_final_model(subjects, ft_cfg, tmp_path / "tuned", init_from=tmp_path / "model")
    a = load_checkpoint(first.model)["state_dict"]
    b = load_checkpoint(tuned.model)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "tuned" / "config.json").read_text())["init_from"] == str(first.model.parent)
    # ... and without init_from the same run starts elsewhere (random initialisation)
    fresh = train_final_model(subjects, ft_cfg.replace(seed=1), tmp_path / "fresh")
    c = load_checkpoint(fresh.model)["state_dict"]
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_fine_tune_refuses_another_architecture(tmp_path, tiny_data_folder, tiny_checkpoint):
    subjects = load_subjects(find_subjects(tiny_data_folder))
    cfg = _tiny(recipe("synthetic-quick")).replace(model=default_config("2d-same", features=6, levels=2),
                                                   max_epochs=0)
    with pytest.raises(InputError, match="cannot fine-tune this model"):
        train_final_model(subjects, cfg, tmp_path / "m", init_from=tiny_checkpoint)
    assert not (tmp_path / "m" / "model.pt").exists()
