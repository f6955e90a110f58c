"""One way from settings to a TrainConfig and back to command-line flags (CLI and GUI share it)."""

from __future__ import annotations

import dataclasses

import pytest

from femur_core.cli import args_from_config, config_from_args, config_from_overrides
from femur_core.cv import build_parser
from femur_core.preprocess import GridSpec
from femur_core.training import RECIPES, recipe


def _round_trip(cfg, name):
    args = build_parser().parse_args(args_from_config(cfg, name))
    return config_from_args(args, "cpu-2d")


@pytest.mark.parametrize("name", list(RECIPES))
def test_every_recipe_and_changed_settings_round_trip_through_the_flags(name):
    base = recipe(name)
    variants = [
        base,
        base.replace(max_minutes=None, device="cpu", precision="fp32", seed=3),
        base.replace(max_epochs=3, min_epochs=2, batch_size=2, augment=[], aux_labels=not base.aux_labels,
                     lr=1.2345678e-4, lr_schedule="poly", loss="wce"),
        base.replace(grid=GridSpec(in_plane_size=128, central_slices=24)),
        base.replace(patch_size=[96, 112]),
        base.replace(patch_size=None),
        base.replace(keep_weights="last" if base.keep_weights == "best" else "best"),
        base.replace(validate_every=base.validate_every + 2),
        base.replace(model=dataclasses.replace(base.model, norm="instance" if base.model.norm != "instance" else None)),
        base.replace(max_minutes=3.0, budget_clock="cpu", flip_tta=not base.flip_tta, patches_per_volume=4),
        base.replace(bg_slice_ratio=0.2 if base.bg_slice_ratio != 0.2 else 0.0),
    ]
    for cfg in variants:
        assert _round_trip(cfg, name).to_dict() == cfg.to_dict()


def test_no_limit_is_written_and_read_as_budget_zero():
    cfg = recipe("cpu-2d").replace(max_minutes=None)
    args = args_from_config(cfg, "cpu-2d")
    assert args[args.index("--budget-minutes") + 1] == "0" and "--device" in args
    assert config_from_overrides("cpu-2d", {"budget_minutes": 0}).max_minutes is None
    assert config_from_overrides("cpu-2d", {}).max_minutes == 25.0


def test_settings_without_a_flag_are_named():
    with pytest.raises(ValueError, match="val_fraction"):
        args_from_config(recipe("cpu-2d").replace(val_fraction=0.5), "cpu-2d")


def test_patch_size_flag_is_checked():
    assert config_from_overrides("cpu-2d", {"patch_size": "96,112"}).patch_size == [96, 112]
    assert config_from_overrides("cpu-2d", {"patch_size": "0"}).patch_size is None
    for bad in ("96", "a,b", "4,4", "1,2,3,4"):
        with pytest.raises(Exception, match="--patch-size"):
            config_from_overrides("cpu-2d", {"patch_size": bad})


def test_bg_slice_ratio_flag_sets_the_share_of_femur_free_slices_and_is_checked():
    args = build_parser().parse_args(["--recipe", "study-2d", "--bg-slice-ratio", "0.2"])
    cfg = config_from_args(args, "cpu-2d")
    assert cfg.bg_slice_ratio == 0.2 and recipe("study-2d").bg_slice_ratio == 1.0
    assert config_from_overrides("cpu-2d", {}).bg_slice_ratio == recipe("cpu-2d").bg_slice_ratio
    with pytest.raises(Exception, match="--bg-slice-ratio"):
        config_from_overrides("study-2d", {"bg_slice_ratio": -0.5})
