"""Scale-out: data-parallel training under torchrun, CV folds as separate jobs, sharded prediction.

Everything runs on CPU on a tiny synthetic cohort (geometry "tiny", 32 x 32 x 20)
with one thread per process, so the whole module takes well under a minute on
two cores.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ENV = {k: v for k, v in os.environ.items()
       if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
ENV.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")

# a norm-free 2D U-Net: with instance norm, the conv biases in front of each norm get a
# gradient that is zero in exact arithmetic, and Adam turns its rounding noise into
# lr-sized steps, so their values differ between any two summation orders
TINY = ["--recipe", "synthetic-quick", "--model", "2d", "--features", "4", "--levels", "2", "--epochs", "1",
        "--augment", "flip,intensity", "--device", "cpu", "--precision", "fp32", "--seed", "0"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    from femur_core.synthetic import make_cohort

    folder = tmp_path_factory.mktemp("cohort")
    make_cohort(folder, n=5, seed=0, geometry="tiny", downsample=2)
    return folder


def _run(args: list[str], cwd: Path, ok=(0,)) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode in ok, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-4000:]}"
    return r


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def _history(folder: Path) -> list[dict]:
    return list(csv.DictReader((folder / "training" / "history.csv").open()))


# ----------------------------------------------------------------------------- pure helpers
def test_local_share_partitions_global_batch():
    from femur_core.distributed import local_share

    for world in (1, 2, 3, 4):
        for n in range(1, 9):
            got = [local_share(n, r, world) for r in range(world)]
            real = [idx for idx, w in got if w > 0]
            assert sorted(i for idx in real for i in idx) == list(range(n))  # each sample exactly once
            assert max(map(len, real)) - min(map(len, real)) <= 1
            # weights make the average of per-rank mean losses the mean over the global batch
            assert sum(w for _, w in got) == pytest.approx(world)
            assert all(w == pytest.approx(len(idx) * world / n) for idx, w in got if w > 0)


def test_single_process_is_not_distributed(monkeypatch):
    from femur_core import distributed as D

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not D.init_from_env("cpu")
    assert (D.rank(), D.world_size(), D.is_main()) == (0, 1, True)
    net = torch.nn.Conv2d(1, 1, 1)
    assert D.wrap_ddp(net, torch.device("cpu")) is net


# ----------------------------------------------------------------------------- torchrun
def test_torchrun_two_processes_match_one_process_with_the_same_global_batch(cohort, tmp_path):
    from femur_core import train

    data = ["--data", str(cohort), *TINY]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # one process (this one, one thread) with the global batch
        assert train.main([*data, "--batch-size", "4", "--out", str(tmp_path / "single")]) == 0
    finally:
        torch.set_num_threads(threads)
    r = _run(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
              "-m", "femur_core.train", *data, "--batch-size", "2", "--out", "ddp"], tmp_path)
    single, ddp = tmp_path / "single", tmp_path / "ddp"

    # one model, one config, one history: the same files as one process, written once (rank 0 only)
    assert _files(ddp) == _files(single) == ["config.json", "model.pt", "training/best.pt",
                                             "training/history.csv", "training/last.pt", "training/model.pt"]
    assert r.stdout.count("model: ") == 1, r.stdout
    cfg = json.loads((ddp / "config.json").read_text())
    assert (cfg["world_size"], cfg["global_batch_size"], cfg["train"]["batch_size"]) == (2, 4, 2)
    assert "world_size" not in json.loads((single / "config.json").read_text())

    from femur_core.checkpoint import load_checkpoint

    for name in ("training/last.pt", "model.pt"):
        a, b = load_checkpoint(single / name), load_checkpoint(ddp / name)
        assert a["state_dict"].keys() == b["state_dict"].keys()
        for k, v in a["state_dict"].items():
            torch.testing.assert_close(b["state_dict"][k], v, rtol=1e-4, atol=1e-5, msg=f"{name}: {k}")
    # several optimizer steps ran (on this cohort: 19 global batches of 4 slices, the last one of 3,
    # split 2 + 1 with weighted losses); max |difference| measured: 2.5e-7
    steps = load_checkpoint(ddp / "training/last.pt")["optimizer"]["state"][0]["step"]
    assert int(steps) >= 3
    hs, hd = _history(single), _history(ddp)
    assert len(hs) == len(hd) == 1
    assert float(hd[0]["loss"]) == pytest.approx(float(hs[0]["loss"]), rel=1e-5)
    assert float(hd[0]["val_dsc"]) == pytest.approx(float(hs[0]["val_dsc"]), abs=1e-6)


# ----------------------------------------------------------------------------- CV folds as jobs
def _per_subject(report: dict) -> dict:
    return {s["subject"]: {k: v for k, v in s.items()} for f in report["folds"] for s in f["subjects"]}


def test_cv_folds_as_separate_jobs_then_collect_equal_one_process_cv(cohort, tmp_path, capsys):
    from femur_core import cv

    args = ["--data", str(cohort), "--folds", "2", *TINY]
    # the two folds as independent jobs into one shared run folder, then --collect
    _run(["-m", "femur_core.cv", *args, "--fold", "1", "--out", "jobs"], tmp_path)
    assert cv.main(["--collect", str(tmp_path / "jobs")]) == 1
    assert "missing folds: 0" in capsys.readouterr().out
    _run(["-m", "femur_core.cv", *args, "--fold", "0", "--out", "jobs"], tmp_path)
    assert cv.main(["--collect", str(tmp_path / "jobs")]) == 0
    assert "missing folds" not in capsys.readouterr().out

    # the default: every fold in one process, same seed (this process, one thread as in the jobs)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cv.main([*args, "--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)

    one = json.loads((tmp_path / "one" / "report.json").read_text())
    jobs = json.loads((tmp_path / "jobs" / "report.json").read_text())
    assert jobs["summary"]["complete"] and one["summary"]["complete"]
    a, b = _per_subject(one), _per_subject(jobs)
    assert a.keys() == b.keys() and len(a) == 5
    for sid in a:
        for m, v in a[sid].items():
            if isinstance(v, float):
                assert b[sid][m] == pytest.approx(v, rel=1e-6, abs=1e-9, nan_ok=True), (sid, m)
            else:
                assert b[sid][m] == v, (sid, m)
    for fa, fb in zip(one["folds"], jobs["folds"]):
        assert (fa["fold"], fa["test_subjects"], fa["epochs"]) == (fb["fold"], fb["test_subjects"], fb["epochs"])
        assert fb["threshold"] == pytest.approx(fa["threshold"], abs=1e-9)
        assert fb["roc_auc"] == pytest.approx(fa["roc_auc"], rel=1e-9)
    for key, v in one["summary"].items():
        if "minutes" not in key and isinstance(v, float):
            assert jobs["summary"][key] == pytest.approx(v, rel=1e-9, nan_ok=True), key


def test_cv_fold_needs_a_shared_run_folder():
    from femur_core import cv
    from femur_core.errors import InputError

    with pytest.raises(InputError, match="--out"):
        cv.main(["--fold", "0"])


# ----------------------------------------------------------------------------- sharded prediction
def test_predict_shards_cover_every_scan_once_and_summary(cohort, tiny_checkpoint, tmp_path, capsys):
    from femur_core import predict
    from femur_core.predict import expand_inputs, output_name, select_shard

    scans = tmp_path / "scans"
    scans.mkdir()
    for p in sorted(cohort.glob("*.nii.gz")):  # images and masks: the masks must be left out
        (scans / p.name).symlink_to(p)
    (scans / "sub99_image.nii.gz").write_bytes(b"not a nifti file")  # fails, recorded as failed
    inputs = expand_inputs([str(scans)])
    names = [output_name(p) for p in inputs]
    assert len(names) == 6 and not any("femur" in n for n in names)
    good = set(names) - {"sub99_image"}
    out = tmp_path / "out"
    base = [str(tiny_checkpoint), str(scans), "--out", str(out), "--no-tta", "--device", "cpu"]

    def masks() -> set[str]:
        return {p.name.replace("_mask.nii.gz", "") for p in out.glob("*_mask.nii.gz")}

    shards = [select_shard(inputs, i, 2) for i in range(2)]
    assert sorted(p for s in shards for p in s) == sorted(inputs) and [len(s) for s in shards] == [3, 3]

    made = []
    for i in range(2):
        before = masks()
        code = predict.main([*base, "--shard", f"{i}/2"])
        made.append(masks() - before)
        assert made[i] == {output_name(p) for p in shards[i]} - {"sub99_image"}
        assert code == (2 if "sub99_image" in {output_name(p) for p in shards[i]} else 0)
        if i == 0:  # the summary after one shard: the other shard's scans are missing
            capsys.readouterr()
            assert predict.main([*base, "--summary"]) == 1
            text = capsys.readouterr().out
            assert f"done {len(made[0])}," in text
            for n in good - made[0]:
                assert f"missing: {n}" in text
    assert not made[0] & made[1] and made[0] | made[1] == good  # every scan exactly once

    capsys.readouterr()
    assert predict.main([*base, "--summary"]) == 1
    text = capsys.readouterr().out
    assert "done 5, missing 0, failed 1 of 6" in text and "failed: sub99_image" in text

    # a rerun of a shard keeps what exists
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.nii.gz")}
    predict.main([*base, "--shard", "0/2"])
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.nii.gz")} == stamps
    assert "exists, kept" in capsys.readouterr().err
