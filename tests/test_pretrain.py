"""Pretraining on the synthetic generator: one network on a generated cohort, then every ensemble
member starts from its weights and the members share what is left of the budget."""

from __future__ import annotations

import json

import pytest
import torch

from femur_core import pretrain as pretrain_mod
from femur_core.checkpoint import load_checkpoint
from femur_core.data import find_subjects, load_subjects
from femur_core.ensemble import fit
from femur_core.models.registry import default_config
from femur_core.preprocess import GridSpec
from femur_core.pretrain import pretrain_synthetic
from femur_core.training import TrainConfig

from conftest import write_tiny_subject


def _cfg(**kw) -> TrainConfig:
    base = dict(model=default_config("2d-same", features=4, levels=2), grid=GridSpec(), loss="dice_ce", lr=3e-3,
                batch_size=2, max_epochs=2, min_epochs=1, patience=1, augment=["flip"], device="cpu",
                precision="fp32", pretrain_subjects=2)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture
def tiny_geometry(monkeypatch):
    """Pretrain on the generator's unit-test preset (64 x 64 x 20) instead of full-size pelvis scans."""
    monkeypatch.setattr(pretrain_mod, "PRETRAIN_GEOMETRY", ("tiny", 1))


def test_pretrain_writes_a_model_of_the_run_architecture_and_resumes_finished(tmp_path, tiny_geometry):
    cfg = _cfg(pretrain_minutes=5.0, aux_labels=True)
    pre = pretrain_synthetic(cfg, tmp_path / "pre")
    assert pre.model.exists() and pre.epochs == 2 and pre.minutes > 0
    # the cohort carries bone maps, so the network has the "other bone" class like the real run's
    assert sorted(p.name for p in (tmp_path / "pre" / "synthetic").glob("sub01_*")) == [
        "sub01_bones.nii.gz", "sub01_femur.nii.gz", "sub01_image.nii.gz"]
    saved = json.loads(load_checkpoint(pre.model)["config_json"])
    assert saved["aux_labels"] is True and saved["model"]["n_classes"] == 3
    assert saved["model"]["features"] == 4 and saved["ensemble"] == 1
    info = json.loads((tmp_path / "pre" / "pretrain.json").read_text())
    assert info["epochs"] == 2 and info["subjects"] == 2 and info["geometry"] == "tiny"
    # a finished pretraining is returned as it is, not trained again
    before = pre.model.stat().st_mtime_ns
    again = pretrain_synthetic(cfg, tmp_path / "pre")
    assert again.model == pre.model and again.minutes == pytest.approx(pre.minutes)
    assert pre.model.stat().st_mtime_ns == before


def test_fit_starts_every_member_from_the_pretrained_network(tmp_path, tiny_geometry):
    folder = tmp_path / "data"
    for i in range(1, 5):
        write_tiny_subject(folder, f"sub{i:02d}", i)
    subjects = load_subjects(find_subjects(folder))  # no label maps: the pretraining follows (2 classes)
    events = []
    cfg = _cfg(ensemble=2, pretrain_minutes=2.0, max_minutes=30.0, aux_labels=True, lr_schedule="poly")
    res = fit(subjects, cfg, tmp_path / "fit", progress=events.append)
    pre = tmp_path / "fit" / "pretrain" / "net" / "model.pt"
    assert pre.exists()
    assert json.loads(load_checkpoint(pre)["config_json"])["model"]["n_classes"] == 2
    starts = [e.message for e in events if "starting from the weights of" in (e.message or "")]
    assert len(starts) == 2 and all(str(pre) in m for m in starts)
    assert res.pretrain["epochs"] == 2 and res.pretrain["subjects"] == 2
    # the members share the budget that the pretraining left; the model records the whole budget
    for m in res.members:
        assert m.config.max_minutes == pytest.approx((30.0 - res.pretrain["minutes"]) / 2)
    assert res.config.max_minutes == 30.0 and res.config.pretrain_minutes == 2.0
    # members start from the same weights but learn different folds
    a, b = (load_checkpoint(m.checkpoint)["state_dict"] for m in res.members)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_pretraining_longer_than_the_budget_is_refused(tmp_path, tiny_geometry):
    folder = tmp_path / "data"
    for i in range(1, 4):
        write_tiny_subject(folder, f"sub{i:02d}", i)
    subjects = load_subjects(find_subjects(folder))
    with pytest.raises(ValueError, match="pretrain_minutes"):
        fit(subjects, _cfg(pretrain_minutes=10.0, max_minutes=8.0), tmp_path / "fit")
    assert not (tmp_path / "fit" / "pretrain").exists()
