"""Every training recipe x every registered model: one tiny epoch, or a one-line refusal before any work.

Both lists come from the registries (``femur_core.training.RECIPES`` and
``femur_core.models.MODELS``), so a recipe or a network added later is in the
matrix without touching this file. The cohort's volumes have DIFFERENT shapes
and carry label maps (the ``aux_labels`` path of ``cpu-2d``): a recipe with
more than one sample per batch then has to stack 3D samples of different
sizes, which crashed (``ValueError: all input arrays must have the same
shape``) with ``cv --recipe cpu-2d --model 3d-aniso``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from femur_core.checkpoint import load_checkpoint
from femur_core.data import find_subjects, load_subjects
from femur_core.errors import FemurError
from femur_core.inference import load_model, predict_volume
from femur_core.models import MODELS, default_config
from femur_core.preprocess import GridSpec
from femur_core.training import RECIPES, TrainConfig, recipe, train_model

from reliability_utils import run_cli, tiny_subject_arrays, write_nifti

torch.set_num_threads(1)

#: (x, y, z) file shapes (L, I, P): the model grid keeps them, so the 3D volumes differ in every axis
SHAPES = [(20, 24, 6), (22, 24, 8), (20, 26, 7), (24, 28, 6), (22, 26, 9)]

#: combinations that must refuse, with a pattern of their one-line message (none today: every
#: recipe trains every registered network); a combination that starts refusing fails the test
REFUSED: dict[tuple[str, str], str] = {}


def write_varied_cohort(folder, shapes=SHAPES, bones: bool = True) -> Path:
    """Subjects sub01.. of different shapes, each with a label map (1 femur, 2 a slab of "other bone")."""
    folder = Path(folder)
    for i, shape in enumerate(shapes, 1):
        image, mask = tiny_subject_arrays(i, shape)
        write_nifti(folder / f"sub{i:02d}_image.nii.gz", image)
        write_nifti(folder / f"sub{i:02d}_femur.nii.gz", mask)
        if bones:
            lab = mask.copy()
            lab[shape[0] - 5:shape[0] - 2][mask[shape[0] - 5:shape[0] - 2] == 0] = 2
            write_nifti(folder / f"sub{i:02d}_bones.nii.gz", lab)
    return folder


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return load_subjects(find_subjects(write_varied_cohort(tmp_path_factory.mktemp("varied"))))


def _tiny(recipe_name: str, model_name: str) -> TrainConfig:
    """The recipe as it is (loss, batch size, schedule, augmentation, label-map class), shrunk:
    a 4-feature network, the native grid, one epoch, no time budget, fp32 on the CPU."""
    levels = MODELS[model_name].defaults.get("levels", 3)
    return recipe(recipe_name).replace(
        model=default_config(model_name, features=4, levels=min(levels, 3)), grid=GridSpec(),
        max_epochs=1, min_epochs=1, max_minutes=None, device="cpu", precision="fp32")


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("recipe_name", list(RECIPES))
def test_every_recipe_trains_every_model_or_refuses_in_one_line(cohort, recipe_name, model_name, tmp_path):
    cfg = _tiny(recipe_name, model_name)
    out = tmp_path / "run"
    train, val = cohort[:4], cohort[4:]
    if (recipe_name, model_name) in REFUSED:
        with pytest.raises(FemurError, match=REFUSED[recipe_name, model_name]) as e:
            train_model(train, val, cfg, out)
        assert "\n" not in str(e.value)
        assert not out.exists() or not any(out.iterdir()), "refused after work had started"
        return
    res = train_model(train, val, cfg, out)
    assert res.epochs == 1 and len(res.history) == 1 and np.isfinite(res.history[0]["loss"])
    # the recipe's own settings were used, not silently replaced
    assert res.config.batch_size == RECIPES[recipe_name].batch_size
    assert res.config.loss == RECIPES[recipe_name].loss
    assert res.config.aux_labels == RECIPES[recipe_name].aux_labels  # every subject has a label map
    saved = TrainConfig.from_dict(load_checkpoint(res.checkpoint)["config"])
    assert saved.model.name == model_name
    assert saved.model.n_classes == (3 if RECIPES[recipe_name].aux_labels else 2)
    # the trained model segments a scan of yet another shape, on that scan's grid
    model = load_model(res.checkpoint)
    subject = cohort[-1]
    pred = predict_volume(model, subject.image, device="cpu", precision="fp32")
    assert pred.mask.shape == subject.image.shape
    np.testing.assert_array_equal(pred.mask.affine, subject.image.affine)


def test_3d_batches_of_volumes_of_different_sizes_are_crops_of_one_size(cohort):
    """The crash fix: with batch > 1, 3D samples of different volumes stack (one common crop size), 2D
    slices of different sizes too (padded to the largest); batch 1 or one shape: as before."""
    from femur_core.training import _batch_patch_size, _batch_slice_size, prepare_subjects

    cfg = _tiny("cpu-2d", "3d-aniso").replace(patch_size=None)
    preps = prepare_subjects(cohort, cfg.grid)
    assert len({p.image.shape for p in preps}) > 1
    size = _batch_patch_size(preps, cfg, 4)
    assert size == [min(p.image.shape[a] for p in preps) for a in range(3)]
    assert _batch_patch_size(preps, cfg, 1) is None  # one sample per step: whole volumes
    assert _batch_patch_size(preps[:1] * 3, cfg, 4) is None  # one shape: whole volumes
    assert _batch_patch_size(preps, cfg.replace(patch_size=[4, 8, 100]), 4) == [4, 8, size[2]]
    # an in-plane (Y, X) patch (the 2D recipe's) given to a 3D network keeps every slice
    assert _batch_patch_size(preps, cfg.replace(patch_size=[8, 100]), 4) == [size[0], 8, size[2]]
    # 2D: slices of a batch are padded (or tiled) as for the largest slice
    assert _batch_slice_size(preps, 4) == (max(p.image.shape[1] for p in preps),
                                           max(p.image.shape[2] for p in preps))
    assert _batch_slice_size(preps, 1) is None and _batch_slice_size(preps[:1] * 3, 4) is None


def test_cli_cv_with_a_2d_recipe_and_a_3d_model_runs(tmp_path):
    """The command of the bug report, shrunk: ``cv --recipe cpu-2d --model 3d-aniso --folds 3 --fold 0``
    on volumes of different sizes (batch 4) ends with exit 0 and a scored fold."""
    data = write_varied_cohort(tmp_path / "data", SHAPES + [(20, 22, 7)])
    out = tmp_path / "cv"
    proc = run_cli("cv", ["--data", data, "--recipe", "cpu-2d", "--model", "3d-aniso", "--folds", "3",
                          "--fold", "0", "--out", out, "--features", "4", "--levels", "3", "--epochs", "1", "--ensemble", "1",
                          "--device", "cpu", "--precision", "fp32"], timeout=300)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "missing folds: 1, 2" in proc.stdout
    result = json.loads((out / "fold0" / "result.json").read_text())
    assert result["epochs"] == 1 and len(result["subjects"]) == 2



def test_2d_crops_have_the_patch_size_and_mostly_hold_femur(cohort):
    """``patch_size`` (Y, X) for the padded 2D U-Net: every sample is a crop of that size (slices
    smaller than the patch are padded), its target the same pixels as its image, and a femur slice
    gives a crop with femur in it at least two times in three."""
    from femur_core.models import build_model
    from femur_core.training import _make_2d_sample, prepare_subjects

    cfg = _tiny("cpu-2d", "2d-same").replace(aux_labels=False, patch_size=[16, 32])
    preps = prepare_subjects(cohort, cfg.grid)
    net = build_model(cfg.model)
    p = preps[0]
    z = int(np.nonzero(p.mask.reshape(p.mask.shape[0], -1).any(axis=1))[0][0])
    rng = np.random.default_rng(0)
    with_fg = 0
    for _ in range(60):
        x, y = _make_2d_sample(p, z, cfg, net, rng)
        assert x.shape == (cfg.model.in_slices, 16, 32) and y.shape == (16, 32)
        with_fg += int((y == 1).any())
    assert with_fg >= 40
    # the crop is the same window of image and target: a crop of the target itself is found in the mask
    big = [-(-(n + 6) // d) * d for n, d in zip(p.image.shape[1:], net.divisor)]  # larger than the slice
    x, y = _make_2d_sample(p, z, cfg.replace(patch_size=big), net, rng)
    assert list(x.shape[1:]) == big
    assert int(y.sum()) == int(p.mask[z].sum())
