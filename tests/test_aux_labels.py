"""Training with an extra "other bone" class from subNN_bones.nii.gz label maps."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import write_tiny_subject
from femur_core.checkpoint import load_checkpoint
from femur_core.data import find_subjects, load_subject
from femur_core.errors import InputError
from femur_core.inference import load_model, predict_volume
from femur_core.volume_io import check_labels, read_volume
from femur_core.loss import dice_cross_entropy, soft_dice_loss, weighted_cross_entropy
from femur_core.models.registry import default_config
from femur_core.preprocess import GridSpec, prepare
from femur_core.training import TrainConfig, _augment, _effective_config, recipe, train_model


def _write_bones(folder, sid, values=None):
    """A label map on the subject's grid: 1 on the femur, 2 in a slab beside it, 3 in a corner."""
    mask = nib.load(str(folder / f"{sid}_femur.nii.gz"))
    m = np.asarray(mask.dataobj).astype(np.uint8)
    lab = m.copy()
    lab[14:18][m[14:18] == 0] = 2
    lab[:2, :2] = 3
    if values is not None:
        lab = values(lab)
    img = nib.Nifti1Image(lab, mask.affine)
    img.set_qform(mask.affine, code=1)
    img.set_sform(mask.affine, code=1)
    path = folder / f"{sid}_bones.nii.gz"
    nib.save(img, str(path))
    return path


@pytest.fixture
def aux_folder(tmp_path):
    folder = tmp_path / "data"
    for i in range(1, 5):
        write_tiny_subject(folder, f"sub{i:02d}", i)
        _write_bones(folder, f"sub{i:02d}")
    return folder


def test_find_subjects_picks_up_label_maps(aux_folder):
    files = find_subjects(aux_folder)
    assert [f.labels.name for f in files] == [f"sub{i:02d}_bones.nii.gz" for i in range(1, 5)]
    s = load_subject(files[0])
    assert s.labels is not None and s.labels.shape == s.mask.shape
    assert set(np.unique(s.labels.data)) == {0, 1, 2, 3}


def test_label_map_is_optional(tmp_path):
    for i in (1, 2):
        write_tiny_subject(tmp_path / "plain", f"sub{i:02d}", i)
    files = find_subjects(tmp_path / "plain")
    assert all(f.labels is None for f in files)
    assert load_subject(files[0]).labels is None


def test_bad_label_maps_are_refused_with_the_file_named(tmp_path):
    write_tiny_subject(tmp_path, "sub01", 1)
    path = _write_bones(tmp_path, "sub01", values=lambda lab: lab.astype(np.float32) + 0.5)
    image = read_volume(tmp_path / "sub01_image.nii.gz")
    with pytest.raises(InputError, match="not integers") as e:
        check_labels(read_volume(path), image)
    assert "sub01_bones" in str(e.value)
    other = read_volume(tmp_path / "sub01_femur.nii.gz")
    affine = other.affine.copy()
    affine[0, 3] += 3.0
    shifted = other.__class__(other.data, affine, other.source)
    with pytest.raises(InputError, match="not on the same grid"):
        check_labels(shifted, image)


def test_prepare_merges_other_bones_and_keeps_the_femur(aux_folder):
    s = load_subject(find_subjects(aux_folder)[0])
    p = prepare(s.image, GridSpec(), s.mask, s.labels)
    assert p.labels is not None and p.labels.shape == p.mask.shape
    assert set(np.unique(p.labels)) == {0, 1, 2}  # label 3 merged into 2
    np.testing.assert_array_equal(p.labels == 1, p.mask == 1)  # the femur comes from the femur mask


def test_two_class_dice_is_the_femur_dice():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 2, 8, 8, generator=g)
    y = (torch.rand(2, 8, 8, generator=g) > 0.6).long()
    p = torch.softmax(logits, 1)[:, 1]
    inter = (p * y).sum((1, 2))
    by_hand = (1 - (2 * inter + 1) / (p.sum((1, 2)) + y.sum((1, 2)) + 1)).mean()
    assert float(soft_dice_loss(logits, y)) == pytest.approx(float(by_hand), rel=1e-6)


def test_three_class_dice_ce_averages_foreground_classes():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 8, 8, generator=g)
    y = torch.randint(0, 3, (2, 8, 8), generator=g)
    probs = torch.softmax(logits, 1)
    per = []
    for c in (1, 2):
        yc = (y == c).float()
        inter = (probs[:, c] * yc).sum((1, 2))
        per.append(1 - (2 * inter + 1) / (probs[:, c].sum((1, 2)) + yc.sum((1, 2)) + 1))
    by_hand = torch.stack(per).mean() + torch.nn.functional.cross_entropy(logits, y)
    assert float(dice_cross_entropy(logits, y)) == pytest.approx(float(by_hand), rel=1e-6)
    with pytest.raises(ValueError, match="2 classes"):
        weighted_cross_entropy(logits, y)


def test_multiclass_affine_augmentation_keeps_label_values():
    rng = np.random.default_rng(0)
    x = torch.randn(3, 3, 16, 16)
    y = torch.from_numpy(rng.integers(0, 3, (3, 16, 16))).long()
    _, ya = _augment(x, y, ["affine", "flip"], rng, multiclass=True)
    assert set(torch.unique(ya).tolist()) <= {0, 1, 2}
    assert (ya == 2).any()


def test_effective_config_falls_back_without_label_maps(aux_folder, tmp_path):
    cfg = recipe("synthetic-quick").replace(aux_labels=True)
    with_maps = [load_subject(f) for f in find_subjects(aux_folder)]
    write_tiny_subject(tmp_path / "plain", "sub09", 9)
    without = [load_subject(f) for f in find_subjects(tmp_path / "plain")]
    eff = _effective_config(cfg, with_maps)
    assert eff.aux_labels and eff.model.n_classes == 3
    eff = _effective_config(cfg, with_maps[:2] + without[:1])
    assert not eff.aux_labels and eff.model.n_classes == 2
    with pytest.raises(ValueError, match="dice_ce"):
        _effective_config(cfg.replace(loss="wce"), with_maps)


def test_training_with_label_maps_saves_a_three_class_model(aux_folder, tmp_path, monkeypatch):
    """The loss sees three-channel logits and targets holding the "other bone" class 2; the saved model
    has three outputs; inference reads the femur as softmax channel 1 (not 1 - background, which
    would count the other bones as femur)."""
    from femur_core import loss as loss_mod
    from femur_core.inference import predict_array

    seen = []
    real = loss_mod.LOSSES["dice_ce"]

    def spy(logits, y):
        seen.append((logits.shape[1], set(torch.unique(y).tolist())))
        return real(logits, y)

    monkeypatch.setitem(loss_mod.LOSSES, "dice_ce", spy)
    subjects = [load_subject(f) for f in find_subjects(aux_folder)]
    cfg = TrainConfig(model=default_config("2d-same", features=4, levels=2), grid=GridSpec(), loss="dice_ce",
                      lr=1e-3, batch_size=2, max_epochs=2, min_epochs=1, patience=1, augment=["flip", "affine"],
                      aux_labels=True, device="cpu", precision="fp32")
    res = train_model(subjects[:3], subjects[3:], cfg, tmp_path / "run")
    assert seen and all(c == 3 for c, _ in seen)
    assert set().union(*(labels for _, labels in seen)) == {0, 1, 2}  # the label map's class 2 was trained
    saved = TrainConfig.from_dict(load_checkpoint(res.checkpoint)["config"])
    assert saved.aux_labels and saved.model.n_classes == 3
    model = load_model(res.checkpoint)
    assert model.model_config.n_classes == 3
    pred = predict_volume(model, subjects[3].image, device="cpu", precision="fp32")
    assert pred.prob.shape == subjects[3].image.shape
    # the femur probability is softmax channel 1 of the three outputs, slice by slice
    prep = prepare(subjects[3].image, model.grid)
    prob = predict_array(model.net, model.model_config, prep.image, flip_tta=False)
    k = model.model_config.in_slices // 2
    with torch.no_grad():
        for z in range(prep.image.shape[0]):
            idx = np.clip(np.arange(z - k, z + k + 1), 0, prep.image.shape[0] - 1)
            x = torch.from_numpy(prep.image[idx][None])
            H, W = x.shape[-2:]
            x = torch.nn.functional.pad(x, (0, -W % 2, 0, -H % 2), mode="replicate")  # the net's divisor (2 levels)
            soft = torch.softmax(model.net.eval()(x).float(), 1)[0, :, :H, :W].numpy()
            np.testing.assert_allclose(prob[z], soft[1], atol=1e-5)
            assert not np.allclose(prob[z], 1 - soft[0], atol=1e-3)  # class 2 has mass: it differs


def test_a_mixed_folder_trains_on_the_femur_alone_and_says_so(aux_folder, tmp_path):
    with_maps = [load_subject(f) for f in find_subjects(aux_folder)]
    write_tiny_subject(tmp_path / "plain", "sub09", 9)
    plain = load_subject(find_subjects(tmp_path / "plain")[0])
    cfg = TrainConfig(model=default_config("2d-same", features=4, levels=2), grid=GridSpec(), loss="dice_ce",
                      batch_size=2, max_epochs=1, min_epochs=1, patience=1, aux_labels=True, device="cpu",
                      precision="fp32")
    events = []
    res = train_model(with_maps[:2] + [plain], with_maps[2:3], cfg, tmp_path / "run", progress=events.append)
    notes = [e.message for e in events if e.stage == "info"]
    assert len(notes) == 1 and "sub09" in notes[0]
    assert res.config.aux_labels is False and res.config.model.n_classes == 2
    assert TrainConfig.from_dict(load_checkpoint(res.checkpoint)["config"]).model.n_classes == 2
