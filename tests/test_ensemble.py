"""Ensembles: k fold members trained by fit(), one model file, averaged prediction,
out-of-fold threshold; a cross-validation run folder loads as the ensemble of its folds;
the nnU-Net-style augmentations."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from femur_core.checkpoint import load_checkpoint
from femur_core.data import find_subjects, load_subjects
from femur_core.ensemble import fit, member_split
from femur_core.inference import load_model, predict_array, predict_volume
from femur_core.models.registry import default_config
from femur_core.preprocess import GridSpec, prepare
from femur_core.training import THRESHOLD_BOUNDS, TrainConfig, _augment

from conftest import write_tiny_subject


def _cfg(**kw) -> TrainConfig:
    base = dict(model=default_config("2d-same", features=4, levels=2), grid=GridSpec(), loss="dice_ce", lr=3e-3,
                batch_size=2, max_epochs=2, min_epochs=1, patience=1, augment=["flip"], device="cpu",
                precision="fp32")
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture
def six_subjects(tmp_path):
    folder = tmp_path / "data"
    for i in range(1, 7):
        write_tiny_subject(folder, f"sub{i:02d}", i)
    return load_subjects(find_subjects(folder))


def test_member_split_every_subject_early_stops_exactly_once(six_subjects):
    splits = member_split(six_subjects, _cfg(ensemble=3), seed=0)
    assert len(splits) == 3
    held = [i for _, es in splits for i in es]
    assert sorted(held) == sorted(s.id for s in six_subjects)  # out-of-fold: each subject once
    for tr, es in splits:
        assert not set(tr) & set(es)
        assert sorted(tr + es) == sorted(s.id for s in six_subjects)
    one = member_split(six_subjects, _cfg(ensemble=1), seed=0)
    assert len(one) == 1 and len(one[0][1]) >= 1


def test_fit_ensemble_writes_one_file_whose_prediction_is_the_members_mean(six_subjects, tmp_path):
    res = fit(six_subjects, _cfg(ensemble=2), tmp_path / "fit")
    payload = load_checkpoint(res.model_file)
    assert len(payload["member_state_dicts"]) == 2
    assert json.loads(payload["config_json"])["ensemble"] == 2
    assert "out-of-fold" in res.threshold_source
    # every subject scored once, by the member that never trained on it
    assert sorted(o["subject"] for o in res.out_of_fold) == sorted(s.id for s in six_subjects)
    for o in res.out_of_fold:
        assert o["subject"] not in res.split[o["member"]]["train"]
        assert 0.0 <= o["dsc"] <= 1.0
    assert THRESHOLD_BOUNDS[0] <= res.threshold <= THRESHOLD_BOUNDS[1]
    model = load_model(res.model_file)
    assert len(model.members) == 2 and model.threshold == pytest.approx(res.threshold)
    # the two members differ (other data, other seed)
    a, b = (dict(m.named_parameters()) for m in model.members)
    assert any(not torch.equal(a[k], b[k]) for k in a)
    # whole-scan probability = mean of the members' probabilities
    s = six_subjects[0]
    pred = predict_volume(model, s.image, device="cpu", precision="fp32", flip_tta=False, cleanup=False)
    prep = prepare(s.image, model.grid)
    each = [predict_array(n, model.model_config, prep.image, device="cpu") for n in model.members]
    expect = prep.restore_canonical((each[0] + each[1]) / 2)
    from femur_core.volume import to_canonical

    got = to_canonical(pred.prob)[0].data
    np.testing.assert_allclose(got, expect, atol=1e-5)
    assert not np.allclose(each[0], each[1])


def test_fewer_subjects_than_members_trains_one_member_per_subject(six_subjects, tmp_path):
    events = []
    res = fit(six_subjects[:2], _cfg(ensemble=3, max_epochs=1), tmp_path / "few", progress=events.append)
    assert len(res.members) == 2 and res.config.ensemble == 2
    assert any("too few" in (e.message or "") for e in events)
    assert len(load_model(res.model_file).members) == 2


def test_fit_single_network_keeps_the_inner_split(six_subjects, tmp_path):
    res = fit(six_subjects, _cfg(), tmp_path / "one")
    payload = load_checkpoint(res.model_file)
    assert "member_state_dicts" not in payload
    assert len(res.members) == 1 and "early-stopping" in res.threshold_source
    assert len(load_model(res.model_file).members) == 1


def test_cv_run_folder_loads_as_the_ensemble_of_its_folds(tiny_data_folder, tmp_path):
    from femur_core.cv import main

    run = tmp_path / "cv"
    assert main(["--data", str(tiny_data_folder), "--folds", "2", "--out", str(run), "--features", "4", "--levels", "2",
              "--epochs", "1", "--budget-minutes", "0", "--device", "cpu", "--precision", "fp32",
              "--in-plane-spacing", "1.5", "--ensemble", "1"]) == 0
    model = load_model(run)
    assert len(model.members) == 2
    assert "out-of-fold" in model.threshold_source
    fold0 = load_model(run / "fold0")  # one fold alone is one network
    assert len(fold0.members) == 1


def test_augmentations_keep_shapes_labels_and_are_seeded():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(6, 3, 32, 32)).astype(np.float32))
    y = torch.from_numpy((rng.random((6, 32, 32)) > 0.7).astype(np.int64))
    names = ["gamma", "blur", "lowres"]
    xa, ya = _augment(x, y, names, np.random.default_rng(1))
    xb, _ = _augment(x, y, names, np.random.default_rng(1))
    assert xa.shape == x.shape and torch.equal(ya, y)  # intensity-only: labels untouched
    assert torch.equal(xa, xb)  # same seed, same result
    assert not torch.equal(xa, x)  # something changed at these probabilities over 6 samples x 3
    assert torch.isfinite(xa).all()
    # gamma keeps each sample's value range
    from femur_core.training import _gamma

    xg = _gamma(x, np.random.default_rng(3), p=1.0)
    np.testing.assert_allclose(xg.amin(dim=(1, 2, 3)), x.amin(dim=(1, 2, 3)), atol=1e-5)
    np.testing.assert_allclose(xg.amax(dim=(1, 2, 3)), x.amax(dim=(1, 2, 3)), atol=1e-4)
    # blur lowers the high-frequency energy
    from femur_core.training import _blur

    xs = _blur(x, np.random.default_rng(3), p=1.0)
    assert float(xs.diff(dim=-1).abs().mean()) < float(x.diff(dim=-1).abs().mean())


def test_cancelled_ensemble_resumes_without_retraining_finished_members(six_subjects, tmp_path):
    """Cancel inside member 2, run again: member 1 is kept as it was, the model is complete and
    equal to an uninterrupted run (constant rate, fixed epochs: an exact replay)."""
    from femur_core.errors import Cancelled
    from femur_core.progress import CancelToken

    cfg = _cfg(ensemble=2, max_epochs=2, min_epochs=2)
    ref = fit(six_subjects, cfg, tmp_path / "ref")
    token, seen = CancelToken(), []

    def cancel_in_member_2(ev):
        seen.append(ev)
        if ev.stage == "info" and "member 2 of 2" in (ev.message or ""):
            token.cancel()

    with pytest.raises(Cancelled):
        fit(six_subjects, cfg, tmp_path / "run", progress=cancel_in_member_2, cancel=token)
    first = (tmp_path / "run" / "member0" / "best.pt").read_bytes()
    assert not (tmp_path / "run" / "model.pt").exists()
    res = fit(six_subjects, cfg, tmp_path / "run")
    assert (tmp_path / "run" / "member0" / "best.pt").read_bytes()[-64:] != b"" and \
        load_checkpoint(tmp_path / "run" / "member0" / "best.pt")["epoch"] == load_checkpoint(
            tmp_path / "ref" / "member0" / "best.pt")["epoch"]
    a, b = load_checkpoint(ref.model_file), load_checkpoint(res.model_file)
    for sa, sb in zip(a["member_state_dicts"], b["member_state_dicts"]):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert first  # member 1's checkpoint existed before the resume
