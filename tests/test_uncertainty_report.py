"""Uncertainty from the model's views, and predict's analysis outputs: label map, CSV, meshes, cohort report."""

from __future__ import annotations

import csv
import dataclasses
import html

import numpy as np
import pytest

from femur_core.uncertainty import predict_with_views, scan_score, slice_order, view_disagreement


# ----------------------------------------------------------------------------- pieces
def test_view_disagreement_and_score_values():
    a = np.zeros((2, 3, 4), np.float32)
    b = a.copy()
    b[0, 0, :2] = 1.0
    u = view_disagreement([a, b])
    assert u.max() == pytest.approx(1.0) and u[0, 0, 0] == pytest.approx(1.0) and u[1].max() == 0
    assert view_disagreement([a]).max() == 0
    rng = np.random.default_rng(3)
    six = [rng.random((3, 5, 7), dtype=np.float32) for _ in range(6)]
    u6 = view_disagreement(six)
    assert u6.dtype == np.float32 and u6.shape == (3, 5, 7) and u6.max() > 0.2
    np.testing.assert_allclose(u6, np.clip(2 * np.std(np.stack(six), axis=0), 0, 1), rtol=0, atol=1e-6)
    same = np.full((2, 3, 4), 0.9, np.float32)
    assert scan_score([same, same], 0.5) == 0.0
    assert np.isnan(scan_score([same], 0.5))
    c = same.copy()
    c[0] = 0.1  # view 2 keeps half of view 1's voxels: DSC 2*12 / (24+12) = 2/3
    assert scan_score([same, c], 0.5) == pytest.approx(1 / 3)


def test_slice_order_most_uncertain_first():
    u = np.zeros((5, 4, 4), np.float32)
    u[3] = 0.5
    u[1, 0, 0] = 0.9
    u[4, :2] = 0.2
    assert slice_order(u).tolist() == [3, 4, 1]
    assert slice_order(u, min_fraction=0.2).tolist() == [3, 4]
    assert slice_order(np.zeros((3, 2, 2))).size == 0


@pytest.fixture(scope="module")
def scan():
    from femur_core.synthetic import make_subject

    return make_subject(1, "tiny", hips="both")


def test_views_give_the_same_prediction_as_predict_volume(tiny_checkpoint, scan):
    from femur_core.inference import load_model, predict_volume

    model = load_model(tiny_checkpoint)
    image, _ = scan
    for flip in (True, False):
        ref = predict_volume(model, image, flip_tta=flip, device="cpu")
        vp = predict_with_views(model, image, flip_tta=flip, device="cpu")
        assert np.array_equal(vp.prediction.prob.data, ref.prob.data)
        assert np.array_equal(vp.prediction.mask.data, ref.mask.data)
        assert np.array_equal(vp.uncertainty.affine, image.affine) and vp.uncertainty.shape == image.shape
        assert vp.n_views == (2 if flip else 1)
    assert vp.uncertainty.data.max() == 0 and np.isnan(vp.score)  # one view: nothing to compare


def test_ensemble_members_are_views(tiny_checkpoint, scan):
    """A model holding several member networks (femur_core.ensemble): 2 views per member, mean = average."""
    import torch

    from femur_core.inference import load_model, predict_volume

    model = load_model(tiny_checkpoint)
    image, _ = scan
    other = load_model(tiny_checkpoint).net
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    solo = [dataclasses.replace(model, net=n) for n in (model.net, other)]
    for m in solo:
        if hasattr(m, "members"):
            m.members = [m.net]
    ens = dataclasses.replace(model)
    ens.members = [model.net, other]  # the lead's LoadedModel field; plain attribute before it lands
    vp = predict_with_views(ens, image, device="cpu")
    assert vp.view_names == ["member0", "member0 flipped", "member1", "member1 flipped"]
    singles = [predict_volume(m, image, device="cpu").prob.data for m in solo]
    assert np.allclose(vp.prediction.prob.data, (singles[0] + singles[1]) / 2, atol=1e-5)
    assert vp.uncertainty.data.max() > 0 and np.isfinite(vp.score)


# ----------------------------------------------------------------------------- the predict CLI
@pytest.fixture(scope="module")
def predicted(tmp_path_factory, tiny_checkpoint):
    """predict on three synthetic scans (two femurs, right hip only, left hip only) with --mesh --report."""
    from femur_core import predict, write_volume
    from femur_core.synthetic import make_subject

    root = tmp_path_factory.mktemp("pred")
    scans = root / "scans"
    truth = {}
    for seed, hips in ((1, "both"), (2, "right"), (3, "left")):
        image, mask = make_subject(seed, "tiny", hips=hips)
        write_volume(image, scans / f"s{seed}_{hips}.nii.gz")
        truth[f"s{seed}_{hips}"] = mask
    out = root / "out"
    code = predict.main([str(tiny_checkpoint), str(scans), "--out", str(out), "--device", "cpu",
                         "--threshold", "0.0", "--mesh", "--mesh-smooth", "5", "--report"])
    assert code == 0
    return out, truth


def test_predict_writes_sides_uncertainty_meshes_and_one_csv_row_per_scan(predicted, tiny_checkpoint):
    import trimesh

    from femur_core import read_volume
    from femur_core.analysis import LEFT, RIGHT, side_labels

    out, truth = predicted
    rows = list(csv.DictReader((out / "femur_measurements.csv").open()))
    assert sorted(r["scan"] for r in rows) == sorted(truth)
    for r in rows:
        mask = read_volume(out / f"{r['scan']}_mask.nii.gz")
        sides = read_volume(out / f"{r['scan']}_sides.nii.gz")
        unc = read_volume(out / f"{r['scan']}_uncertainty.nii.gz")
        assert np.allclose(sides.affine, mask.affine) and np.allclose(unc.affine, mask.affine)
        assert np.array_equal(sides.data > 0, mask.data > 0)
        assert np.array_equal(sides.data, side_labels(mask).data)
        assert 0 <= unc.data.min() and unc.data.max() <= 1
        vox_ml = abs(np.linalg.det(mask.affine[:3, :3])) / 1000
        for k, side in ((RIGHT, "right"), (LEFT, "left")):
            n = int((sides.data == k).sum())
            assert int(r[f"{side}_voxels"]) == n and float(r[f"{side}_ml"]) == pytest.approx(n * vox_ml, abs=1e-3)
            for ext in ("stl", "ply"):
                f = out / f"{r['scan']}_femur_{side}.{ext}"
                assert f.exists() == (n > 0)
                if n:
                    m = trimesh.load(f, file_type=ext)
                    assert m.is_watertight and m.volume == pytest.approx(n * vox_ml * 1000, rel=0.05)
        assert float(r["threshold"]) == 0.0 and r["model"] == str(tiny_checkpoint)
        assert 0.0 <= float(r["uncertainty"]) <= 1.0 and r["input"].endswith(f"{r['scan']}.nii.gz")


def test_predict_reruns_keep_the_table_and_append_on_overwrite(predicted, tiny_checkpoint, tmp_path):
    from femur_core import predict

    out, truth = predicted
    before = (out / "femur_measurements.csv").read_text()
    scans = out.parent / "scans"
    assert predict.main([str(tiny_checkpoint), str(scans), "--out", str(out), "--device", "cpu"]) == 0
    assert (out / "femur_measurements.csv").read_text() == before  # everything kept: no row added
    one = scans / "s2_right.nii.gz"
    csv_b = tmp_path / "elsewhere.csv"
    assert predict.main([str(tiny_checkpoint), str(one), "--out", str(tmp_path / "o"), "--device", "cpu",
                         "--csv", str(csv_b), "--no-uncertainty"]) == 0
    [row] = list(csv.DictReader(csv_b.open()))
    assert row["scan"] == "s2_right" and row["uncertainty"] == ""
    assert not (tmp_path / "o" / "s2_right_uncertainty.nii.gz").exists()
    assert (tmp_path / "o" / "s2_right_sides.nii.gz").exists()


def test_cohort_report_lists_every_scan_worst_first(predicted):
    out, truth = predicted
    page = (out / "report.html").read_text()
    rows = list(csv.DictReader((out / "femur_measurements.csv").open()))
    by_unc = [r["scan"] for r in sorted(rows, key=lambda r: -float(r["uncertainty"]))]
    pos = [page.index(f"<b>{html.escape(s)}</b>") for s in by_unc]
    assert pos == sorted(pos)  # no femur-less or outlier scan here: decreasing uncertainty
    assert page.count("data:image/png;base64,") == len(truth)
    assert "right femur" in page and "left femur" in page  # the outline colour key
    for r in rows:
        assert (f"one femur ({r['femurs']})" in page) == (r["femurs"] in ("right", "left"))


def test_cohort_report_flags_and_errors(tmp_path):
    from femur_core.analysis import MEASUREMENT_FIELDS, append_csv_rows
    from femur_core.cohort_report import cohort_entries, main, write_cohort_report
    from femur_core.errors import InputError

    with pytest.raises(InputError, match="no measurements table"):
        write_cohort_report(tmp_path)
    base = {k: "" for k in MEASUREMENT_FIELDS}
    rows = [dict(base, scan=f"s{i}", femurs="right+left", right_ml=str(200 + i), left_ml=str(201 + i),
                 uncertainty=f"0.0{i}") for i in range(6)]
    rows.append(dict(base, scan="big", femurs="right+left", right_ml="900", left_ml="205", uncertainty="0.001"))
    rows.append(dict(base, scan="empty", femurs="none", right_ml="0", left_ml="0", uncertainty=""))
    order = [e.scan for e in cohort_entries(rows)]
    assert order[:2] == ["empty", "big"] and order[2:] == [f"s{i}" for i in range(5, -1, -1)]
    append_csv_rows(tmp_path / "femur_measurements.csv", rows)
    with pytest.raises(SystemExit) as e:
        from femur_core.cli import run_main

        run_main(main, [str(tmp_path)])
    assert e.value.code == 0
    page = (tmp_path / "report.html").read_text()
    assert "no femur found" in page and "no thumbnail" in page and "right femur 900 mL" in page
