"""The accuracy benchmark's peer logic that runs without nnU-Net: the plans edited to this CPU
(bench/accuracy/peer_plans.py), the levelling-off rule and when a DSC ratio may be given
(bench/accuracy/convergence.py, bench/accuracy/table.py). CI has neither the peer's venv nor the
real data; these are plain functions on dicts and lists.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "accuracy"
sys.path.insert(0, str(BENCH))

from femur_core.metrics import METRIC_NAMES  # noqa: E402

import convergence  # noqa: E402
import peer_plans  # noqa: E402
import table  # noqa: E402


def _nnunet_plans() -> dict:
    """The shape of nnUNetPlans.json as nnU-Net v2.8.1's default planner writes it (2d part)."""
    return {
        "dataset_name": "Dataset501_Femur", "plans_name": "nnUNetPlans",
        "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "configurations": {"2d": {
            "data_identifier": "nnUNetPlans_2d", "preprocessor_name": "DefaultPreprocessor",
            "batch_size": 9, "patch_size": [384, 384], "median_image_size_in_voxels": [384.0, 384.0],
            "spacing": [0.9114, 0.9114], "normalization_schemes": ["ZScoreNormalization"],
            "use_mask_for_norm": [False], "batch_dice": True,
            "architecture": {
                "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                "arch_kwargs": {
                    "n_stages": 7, "features_per_stage": [32, 64, 128, 256, 512, 512, 512],
                    "conv_op": "torch.nn.modules.conv.Conv2d", "kernel_sizes": [[3, 3]] * 7,
                    "strides": [[1, 1]] + [[2, 2]] * 6, "n_conv_per_stage": [2] * 7,
                    "n_conv_per_stage_decoder": [2] * 6, "conv_bias": True,
                    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm2d",
                    "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
                    "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                    "nonlin_kwargs": {"inplace": True}},
                "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}}},
    }


def test_cpu_configuration_matches_our_recipe_and_keeps_nnunets_choices():
    plans = _nnunet_plans()
    before = json.dumps(plans, sort_keys=True)
    out = peer_plans.add_cpu_configuration(plans)
    assert json.dumps(plans, sort_keys=True) == before, "the input plans must not be modified"
    conf = out["configurations"]["2d_cpu"]
    assert conf["inherits_from"] == "2d"
    assert conf["data_identifier"] == "nnUNetPlans_2d_cpu"  # its own preprocessed folder
    assert conf["spacing"] == [1.8, 1.8]
    assert conf["patch_size"] == [128, 128] and conf["batch_size"] == 4
    # the field of view is kept: 384 voxels of 0.9114 mm -> 194 of 1.8 mm
    assert conf["median_image_size_in_voxels"] == [194.0, 194.0]
    kw = conf["architecture"]["arch_kwargs"]
    assert kw["n_stages"] == 5 and kw["features_per_stage"] == [24, 48, 96, 192, 384]
    assert kw["strides"] == [[1, 1], [2, 2], [2, 2], [2, 2], [2, 2]]
    assert kw["kernel_sizes"] == [[3, 3]] * 5
    assert kw["n_conv_per_stage"] == [2] * 5 and kw["n_conv_per_stage_decoder"] == [2] * 4
    # nnU-Net's own building blocks stay
    assert kw["norm_op"].endswith("InstanceNorm2d") and kw["nonlin"] == "torch.nn.LeakyReLU"
    assert conf["architecture"]["network_class_name"].endswith("PlainConvUNet")
    assert conf["architecture"]["_kw_requires_import"] == ["conv_op", "norm_op", "dropout_op", "nonlin"]
    # and the default configuration is untouched
    assert out["configurations"]["2d"] == plans["configurations"]["2d"]


def test_resolved_configuration_is_nnunets_shallow_update():
    """nnU-Net resolves inherits_from with a shallow dict.update: keys the child lacks come from 2d."""
    out = peer_plans.add_cpu_configuration(_nnunet_plans())
    confs = out["configurations"]
    resolved = {**confs["2d"], **confs["2d_cpu"]}
    assert resolved["normalization_schemes"] == ["ZScoreNormalization"]
    assert resolved["batch_dice"] is True and resolved["preprocessor_name"] == "DefaultPreprocessor"
    assert resolved["architecture"]["arch_kwargs"]["n_stages"] == 5  # the whole architecture is the child's


def test_three_entry_spacing_keeps_the_slice_axis():
    plans = _nnunet_plans()
    plans["configurations"]["2d"]["spacing"] = [5.2, 0.91, 0.91]
    conf = peer_plans.add_cpu_configuration(plans)["configurations"]["2d_cpu"]
    assert conf["spacing"] == [5.2, 1.8, 1.8]


def test_cpu_configuration_refuses_bad_input():
    with pytest.raises(ValueError, match="no configuration '2d'"):
        peer_plans.add_cpu_configuration({"configurations": {"3d_fullres": {}}})
    with pytest.raises(ValueError, match="divisible by 16"):
        peer_plans.add_cpu_configuration(_nnunet_plans(), patch_size=[120, 128])


def test_ours_values_are_our_recipe():
    """peer_plans.OURS must stay in step with femur_core's cpu-2d recipe."""
    from femur_core.training import recipe

    r = recipe("cpu-2d")
    assert r.grid.in_plane_spacing == peer_plans.OURS["in_plane_spacing"]
    assert list(r.patch_size) == peer_plans.OURS["patch_size"]
    assert r.batch_size == peer_plans.OURS["batch_size"]
    assert (r.model.features, r.model.levels) == (peer_plans.OURS["features"], peer_plans.OURS["levels"])


# ---------------------------------------------------------------------------------------------
# the levelling-off rule
# ---------------------------------------------------------------------------------------------

def _times(n: int, budget: float) -> list[float]:
    return [budget * (i + 1) / n for i in range(n)]


def test_flat_tail_has_levelled_off():
    t = _times(50, 8.0)
    loss = [1.0 / (1 + 3 * x) for x in t]  # 1.0 -> 0.04; tail nearly flat
    loss = [max(v, 0.1) for v in loss]
    v = convergence.levelled_off(t, loss, 8.0)
    assert v["levelled"] is True
    assert v["epochs_previous"] == 10 and v["epochs_last"] == 10
    assert v["relative_change"] == 0.0


def test_still_falling_has_not_levelled_off():
    t = _times(50, 8.0)
    loss = [1.0 - 0.1 * x for x in t]  # a straight line: each 20 % window drops 0.16 of a 0.78 range
    v = convergence.levelled_off(t, loss, 8.0)
    assert v["levelled"] is False
    assert v["relative_change"] == pytest.approx(0.16 / 0.78, abs=0.01)
    assert "> 5%" in v["reason"]


def test_rule_works_for_negative_losses_and_the_tolerance_boundary():
    """nnU-Net's loss is negative (Dice term); the rule only uses differences and the range."""
    t = [1, 2, 5, 5.5, 7, 7.5]
    loss = [0.0, -1.0, -0.80, -0.80, -0.85, -0.85]  # range 1.0, windows (4.8, 6.4] and (6.4, 8]
    assert convergence.levelled_off(t, loss, 8.0)["levelled"] is True      # change 0.05 = 5 %
    loss[-1] = loss[-2] = -0.86
    assert convergence.levelled_off(t, loss, 8.0)["levelled"] is False     # 6 %


def test_too_few_epochs_is_not_levelled():
    v = convergence.levelled_off([2.0, 4.0, 7.0, 8.1], [1.0, 0.5, 0.4, 0.4], 8.0)
    assert v["levelled"] is False and "too few epochs" in v["reason"]
    with pytest.raises(ValueError):
        convergence.levelled_off([1.0], [1.0, 2.0], 8.0)


def test_curve_readers(tmp_path):
    fold = tmp_path / "fold0" / "training"
    fold.mkdir(parents=True)
    with (fold / "history.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "loss", "val_dsc", "minutes"])
        w.writerows([[1, 1.2, "nan", 0.2], [2, 0.8, 0.7, 0.4]])
    c = convergence.ours_curve(tmp_path / "fold0")
    assert c["minutes"] == [0.2, 0.4] and c["loss"] == [1.2, 0.8]
    (tmp_path / "fold0" / "member1").mkdir()
    (tmp_path / "fold0" / "member1" / "history.csv").write_text("epoch,loss,val_dsc,minutes\n")
    with pytest.raises(ValueError, match="ensemble"):
        convergence.ours_curve(tmp_path / "fold0")
    tb = tmp_path / "time_budget.json"
    tb.write_text(json.dumps({"curve": [{"epoch": 1, "iterations": 10, "clock_minutes": 0.5, "train_loss": -0.2},
                                        {"epoch": 2, "iterations": 20, "clock_minutes": 1.0, "train_loss": None}]}))
    p = convergence.peer_curve(tb)
    assert p["minutes"] == [0.5, 1.0] and p["loss"][0] == -0.2 and p["loss"][1] != p["loss"][1]  # NaN
    assert convergence.peer_curve(tmp_path / "absent.json") is None


# ---------------------------------------------------------------------------------------------
# the table: a ratio only where both systems levelled off in every fold
# ---------------------------------------------------------------------------------------------

def _system(name: str, dsc: float, curves: list[tuple[list[float], list[float]]], budget: float = 8.0) -> dict:
    folds = []
    for k, (t, loss) in enumerate(curves):
        subs = [{"subject": f"sub{k}{j}", **{m: dsc for m in METRIC_NAMES}, "hd95_mm": 3.0, "assd_mm": 1.0}
                for j in range(2)]
        folds.append({"fold": k, "train_minutes": budget, "budget_minutes": budget, "epochs": len(t),
                      "curve": {"minutes": t, "loss": loss}, "subjects": subs})
    return {"system": name, "folds": folds}


FLAT = (_times(30, 8.0), [1.0] * 3 + [0.3] * 27)
FALLING = (_times(30, 8.0), [1.0 - 0.03 * i for i in range(30)])


def test_table_gives_the_ratio_only_when_both_levelled_off():
    res = table.build(_system("ours", 0.9, [FLAT, FLAT]), _system("nnU-Net", 0.8, [FLAT, FLAT]), {})
    assert res["ratio_ours_over_nnunet"]["mean_dsc"] == pytest.approx(0.9 / 0.8, abs=1e-4)
    assert res["convergence"]["systems"]["nnU-Net"]["all_levelled"] is True
    assert "ratio (ours/nnU-Net): mean DSC 1.125" in table.format_text(res)


def test_table_names_who_did_not_level_off_and_gives_no_ratio():
    res = table.build(_system("ours", 0.9, [FLAT, FLAT]), _system("nnU-Net", 0.8, [FLAT, FALLING]), {})
    assert "ratio_ours_over_nnunet" not in res
    text = table.format_text(res)
    assert "no DSC ratio" in text and "nnU-Net (fold 1)" in text and "ours (" not in text
    assert "ratio (ours/nnU-Net)" not in text


def test_table_keeps_the_empty_mask_verdict():
    res = table.build(_system("ours", 0.9, [FLAT]), _system("nnU-Net", 0.0, [FLAT]), {})
    assert "ratio_ours_over_nnunet" not in res and "did not converge" in res["peer_status"]


def test_peer_on_fewer_folds_or_longer_budget_is_compared_on_its_folds():
    ours = _system("ours", 0.9, [FLAT, FLAT, FLAT])
    peer = _system("nnU-Net", 0.8, [FLAT], budget=20.0)
    peer["folds"][0]["curve"] = {"minutes": _times(30, 20.0), "loss": FLAT[1]}
    res = table.build(ours, peer, {})
    assert res["convergence"]["systems"]["nnU-Net"]["all_levelled"] is True
    assert res["ratio_ours_over_nnunet"]["folds"] == [0]
    assert res["ratio_ours_over_nnunet"]["peer_budget_over_ours"] == pytest.approx(2.5)


def test_results_json_round_trip_reprints_the_same_verdicts(tmp_path, capsys):
    res = table.build(_system("ours", 0.9, [FLAT, FLAT]), _system("nnU-Net", 0.8, [FLAT, FALLING]),
                      {"protocol": "test"})
    path = table.write_json(res, tmp_path)
    assert path.name.startswith("accuracy-") and not list(tmp_path.glob("*.tmp*"))
    assert table.main([str(path)]) == 0
    printed = capsys.readouterr().out
    assert printed.strip() == table.format_text(res).strip()
    assert "nnU-Net: fold 0: yes" in printed and "fold 1: NO" in printed
