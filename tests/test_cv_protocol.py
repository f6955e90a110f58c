"""Cross-validation correctness: who trains, who early-stops, who is scored; the folds' strata; the paper
protocol's threshold; the nnU-Net imagesTr/labelsTr layout; the geometry of the saved predictions.

Each test names the plausible bug it catches. Training is a 4-feature 2D U-Net for one epoch: the
tests are about which subject goes where, not about accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import femur_core.cv as cv
from femur_core.data import Subject, find_subjects, load_subjects, make_folds
from femur_core.inference import load_model, predict_volume
from femur_core.metrics import curves_from_counts, optimal_threshold
from femur_core.models import default_config
from femur_core.preprocess import GridSpec
from femur_core.training import TrainConfig
from femur_core.volume import Volume

from reliability_utils import LIP_AFFINE, tiny_subject_arrays, write_nifti

torch.set_num_threads(1)


def _oblique(seed: int) -> np.ndarray:
    """An (L, I, P)-like affine turned by a few degrees about two axes and shifted: every subject its own."""
    rng = np.random.default_rng(seed)
    a, b = np.deg2rad(rng.uniform(3, 12, 2))
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    aff = LIP_AFFINE.copy()
    aff[:3, :3] = rz @ rx @ aff[:3, :3]
    aff[:3, 3] += rng.uniform(-20, 20, 3)
    return aff


#: case names whose sorted order differs from that of their "_0000" image names
#: ("case_1" < "case_10" but "case_10_0000" < "case_1_0000"): pairing the two sorted lists would mix them
CASES = ["case_1", "case_10", "case_2", "case_3", "case_4", "case_5"]


def write_nnunet_cohort(folder: Path) -> Path:
    """imagesTr/<case>_0000.nii.gz + labelsTr/<case>.nii.gz, each subject with its own oblique affine and
    a femur of its own size."""
    for i, case in enumerate(CASES):
        image, mask = tiny_subject_arrays(10 + i)
        aff = _oblique(i)
        write_nifti(folder / "imagesTr" / f"{case}_0000.nii.gz", image, aff)
        write_nifti(folder / "labelsTr" / f"{case}.nii.gz", mask, aff)
    return folder


def _cfg() -> TrainConfig:
    return TrainConfig(model=default_config("2d-same", features=4, levels=2), grid=GridSpec(), loss="dice_ce",
                       lr=3e-3, batch_size=2, max_epochs=1, min_epochs=1, patience=1, augment=[], device="cpu",
                       precision="fp32", flip_tta=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_nnunet_cohort(tmp_path_factory.mktemp("nnunet"))


def test_nnunet_layout_pairs_each_image_with_its_own_label(data):
    # bug caught: pairing sorted imagesTr with sorted labelsTr (case_1 would get case_10's mask)
    files = find_subjects(data)
    assert sorted(f.id for f in files) == sorted(CASES)
    for f in files:
        assert f.image.name == f"{f.id}_0000.nii.gz" and f.mask.name == f"{f.id}.nii.gz"
    for s in load_subjects(files):
        i = CASES.index(s.id)
        image, mask = tiny_subject_arrays(10 + i)
        np.testing.assert_array_equal(s.mask.data, mask)
        np.testing.assert_array_equal(s.image.data, image)


def _run_cv(data, run_dir, protocol, monkeypatch, n_folds=3):
    """All folds in process, recording the subjects each train_model call really received."""
    calls = {}
    real = cv.train_model

    def spy(train, val, config, out_dir, **kw):
        calls[kw.get("fold")] = ([s.id for s in train], [s.id for s in val])
        return real(train, val, config, out_dir, **kw)

    from femur_core import ensemble

    monkeypatch.setattr(cv, "train_model", spy)  # the paper protocol trains directly
    monkeypatch.setattr(ensemble, "train_model", spy)  # the honest one through ensemble.fit
    subjects = load_subjects(find_subjects(data))
    setup = cv.setup_run(run_dir, subjects, _cfg(), n_folds, 0, protocol)
    results = [cv.run_fold(setup, k) for k in range(n_folds)]
    return setup, results, calls, {s.id: s for s in subjects}


@pytest.fixture(scope="module")
def honest(data, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    try:
        yield _run_cv(data, tmp_path_factory.mktemp("honest"), "honest", mp)
    finally:
        mp.undo()


def test_honest_cv_never_trains_or_early_stops_on_the_scored_subjects(honest):
    # bugs caught: the inner early-stopping split drawn from all subjects, the scored fold used for
    # early stopping, a subject in two folds, a fold left unscored
    setup, results, calls, subjects = honest
    scored = []
    for k, res in enumerate(results):
        train, val = calls[k]
        test = setup.folds[k]
        assert not set(test) & set(train) and not set(test) & set(val), k
        assert not set(train) & set(val) and train and val
        assert sorted(train + val + test) == sorted(subjects), k
        assert (res["train_subjects"], res["early_stopping_subjects"], res["test_subjects"]) == (train, val, test)
        assert [s["subject"] for s in res["subjects"]] == test
        scored += test
    assert sorted(scored) == sorted(subjects)  # every subject scored exactly once


def test_honest_threshold_comes_from_the_early_stopping_subjects(honest):
    # bug caught: the honest protocol tuning its threshold on the scored fold (the paper's optimism)
    setup, results, _, _ = honest
    for k, res in enumerate(results):
        assert res["threshold"] == load_model(setup.run_dir / f"fold{k}" / "best.pt").threshold


def test_cv_predictions_keep_each_scans_exact_geometry(honest, data):
    # bug caught: masks written in the canonical (P, I, L) layout, on the model grid, or with a
    # rounded / default affine
    setup, _, _, _ = honest
    for case in CASES:
        src = nib.load(str(data / "imagesTr" / f"{case}_0000.nii.gz"))
        out = nib.load(str(setup.run_dir / "predictions" / f"{case}_mask.nii.gz"))
        assert out.shape == src.shape and out.get_data_dtype() == np.uint8
        np.testing.assert_allclose(out.affine, src.affine, rtol=0, atol=1e-5)
        assert nib.aff2axcodes(out.affine) == nib.aff2axcodes(src.affine)
        assert set(np.unique(np.asarray(out.dataobj))) <= {0, 1}


def test_paper_protocol_early_stops_and_thresholds_on_the_scored_fold(data, tmp_path, monkeypatch):
    # bugs caught: the paper protocol quietly doing the honest thing (or the reverse), its threshold
    # not the PRC optimum of the scored fold, or the scores computed at another threshold than it says
    setup, results, calls, subjects = _run_cv(data, tmp_path / "paper", "paper", monkeypatch, n_folds=2)
    for k, res in enumerate(results):
        train, val = calls[k]
        assert val == setup.folds[k] == res["test_subjects"]
        assert sorted(train) == sorted(i for f, ids in enumerate(setup.folds) if f != k for i in ids)
        with np.load(setup.run_dir / f"fold{k}" / "curves.npz") as z:
            assert res["threshold"] == pytest.approx(optimal_threshold(curves_from_counts(z["pos"], z["neg"])))
        model = load_model(setup.run_dir / f"fold{k}" / "best.pt")
        for row in res["subjects"]:
            s = subjects[row["subject"]]
            pred = predict_volume(model, s.image, flip_tta=False, device="cpu", precision="fp32")
            mask = pred.mask_at(res["threshold"]).data.astype(bool)
            ref = s.mask.data.astype(bool)
            assert row["dsc"] == pytest.approx(2 * (mask & ref).sum() / (mask.sum() + ref.sum()), abs=1e-9)
            saved = np.asarray(nib.load(str(setup.run_dir / "predictions" / f"{s.id}_mask.nii.gz")).dataobj)
            np.testing.assert_array_equal(saved.astype(bool), mask)


def _subject(sid: str, n_voxels: int, spacing: tuple[float, float, float]) -> Subject:
    mask = np.zeros((20, 20, 20), np.uint8)
    mask.ravel()[:n_voxels] = 1
    aff = np.diag([*spacing, 1.0])
    return Subject(sid, Volume(np.ones(mask.shape, np.float32), aff), Volume(mask, aff))


def test_folds_are_stratified_on_femur_volume_in_millilitres(tmp_path):
    """Six subjects with femurs of 1..6 ml whose voxel counts rank them 0, 3, 1, 4, 2, 5 (their voxels
    differ in size): with 3 folds, every fold holds one of the three smallest femurs in ml and one of
    the three largest. Bugs caught: strata ignored (random folds pass all six seeds with probability
    0.4 ** 6), or counted in voxels instead of millilitres (passes with probability (1/3) ** 6)."""
    voxels = {0: 1000, 3: 1100, 1: 1200, 4: 1300, 2: 1400, 5: 1500}
    subjects = [_subject(f"s{i}", voxels[i], (1.0, 1.0, (i + 1) * 1000 / voxels[i])) for i in range(6)]
    ml = {s.id: s.mask.data.sum() * np.prod(np.diag(s.mask.affine)[:3]) / 1000 for s in subjects}
    np.testing.assert_allclose([ml[f"s{i}"] for i in range(6)], [1, 2, 3, 4, 5, 6])
    small, large = {"s0", "s1", "s2"}, {"s3", "s4", "s5"}
    for seed in range(6):
        setup = cv.setup_run(tmp_path / f"run{seed}", subjects, _cfg(), 3, seed, "honest")
        splits = json.loads((tmp_path / f"run{seed}" / "splits.json").read_text())
        assert splits["folds"] == setup.folds
        for fold in setup.folds:
            assert len(set(fold) & small) == 1 and len(set(fold) & large) == 1, (seed, setup.folds)
    # the same holds for make_folds with any block of n_folds
    strata = {f"x{i}": float(i) for i in range(12)}
    for seed in range(5):
        folds = make_folds(list(strata), 4, seed, strata)
        for block in range(3):
            ids = {f"x{i}" for i in range(4 * block, 4 * block + 4)}
            assert all(len(set(f) & ids) == 1 for f in folds), (seed, folds)


def test_cv_scores_the_same_probabilities_with_and_without_the_cleanup(tmp_path):
    # bugs caught: the post-processing gain (the study's Table 2) measured on other masks than the
    # cleaned ones (another threshold, the cleaned mask twice), or a raw score where no cleanup runs
    from femur_core.inference import Prediction
    from femur_core.metrics import evaluate

    image, mask = tiny_subject_arrays(3)
    aff = LIP_AFFINE
    img_v = Volume(image.astype(np.float32), aff)
    ref_v = Volume(mask, aff)
    prob = mask.astype(np.float32) * 0.9
    prob[0:2, 0:2, 0:2] = 0.8  # a false-positive speck far from the "femur", on its side of the midline
    subj = Subject("sub01", img_v, ref_v)
    pred = Prediction.from_probability(img_v.with_data(prob), img_v, threshold=0.5, cleanup=True)
    setup = cv.CVSetup(tmp_path, {"sub01": subj}, [["sub01"]], _cfg(), "honest")
    cleaned, raw = cv._score(setup, {"sub01": pred}, ["sub01"], 0.5, write_predictions=False)
    spacing = img_v.spacing
    assert cleaned[0]["dsc"] == pytest.approx(1.0)
    want_raw = evaluate(prob >= 0.5, mask.astype(bool), spacing).to_dict()
    assert raw[0] == {"subject": "sub01", **want_raw} and raw[0]["dsc"] < 1.0
    setup.config = _cfg().replace(cleanup=False)
    _, none = cv._score(setup, {"sub01": pred}, ["sub01"], 0.5, write_predictions=False)
    assert none is None


def test_a_run_folder_from_before_a_new_training_setting_still_resumes(tmp_path):
    # bug caught: adding a TrainConfig field (at its default) made every earlier run folder
    # "another run" (settings differ), so an interrupted CV could never be resumed; a real
    # difference must still be refused
    from femur_core.errors import InputError
    from femur_core.training import _with_defaults

    image, mask = tiny_subject_arrays(1)
    subjects = [Subject(f"s{i}", Volume(image.astype(np.float32), LIP_AFFINE), Volume(mask, LIP_AFFINE))
                for i in range(4)]
    cv.setup_run(tmp_path, subjects, _cfg(), 2)
    cfg_file = tmp_path / "config.json"
    saved = json.loads(cfg_file.read_text())
    for key in ("budget_clock", "patches_per_volume"):
        del saved["train"][key]
    cfg_file.write_text(json.dumps(saved))
    cv.setup_run(tmp_path, subjects, _cfg(), 2)  # resumes
    assert _with_defaults(saved["train"]) == _cfg().to_dict()
    with pytest.raises(InputError, match="settings differ"):
        cv.setup_run(tmp_path, subjects, _cfg().replace(budget_clock="cpu"), 2)
