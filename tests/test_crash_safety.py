"""Crash safety, cancel and resume.

- kill -9 a cross-validation run at random moments: every file in the run
  folder is complete at every kill point, and the resumed run ends with the
  same folds and a complete report as an uninterrupted run;
- Ctrl-C in the CLI stops within one step with one line (exit 130) and the
  same command resumes;
- a CancelToken stops training within one step, saves a resumable state,
  releases the model, and resuming continues from that step to the same result.
"""

from __future__ import annotations

import gc
import json
import os
import random
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from femur_core.checkpoint import load_checkpoint
from femur_core.data import find_subjects, load_subjects
from femur_core.errors import Cancelled
from femur_core.models import default_config
from femur_core.preprocess import GridSpec
from femur_core.progress import CancelToken
from femur_core.training import TrainConfig, train_model

from reliability_utils import QUICK_TRAIN, cli_env, leftovers, write_cohort

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def subjects(tmp_path_factory):
    return load_subjects(find_subjects(write_cohort(tmp_path_factory.mktemp("data"), 4)))


def _cfg(**kw) -> TrainConfig:
    base = dict(model=default_config("2d-same", features=4, levels=3), grid=GridSpec(), loss="dice_ce", lr=2e-3,
                batch_size=2, max_epochs=2, min_epochs=2, patience=5, augment=["flip", "intensity"],
                device="cpu", precision="fp32")
    base.update(kw)
    return TrainConfig(**base)


class _Recorder:
    """Progress callback: records (epoch, step) of every training step; cancels at a given one."""

    def __init__(self, token: CancelToken | None = None, at: tuple[int, int] | None = None, stage="train"):
        self.token, self.at, self.stage, self.steps = token, at, stage, []

    def __call__(self, ev):
        if ev.stage == "train":
            self.steps.append((ev.epoch, ev.step))
        if self.token is not None and ev.stage == self.stage and (self.at is None or (ev.epoch, ev.step) == self.at):
            self.token.cancel()


def _weights(path: Path) -> dict:
    return load_checkpoint(path)["state_dict"]


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def reference(subjects, tmp_path_factory):
    """An uninterrupted two-epoch run to compare the interrupted ones with."""
    out = tmp_path_factory.mktemp("reference")
    rec = _Recorder()
    res = train_model(subjects[:3], subjects[3:], _cfg(), out, progress=rec)
    return out, res, rec.steps


def test_cancel_stops_within_one_step_and_resumes_to_the_same_result(subjects, reference, tmp_path):
    ref_dir, ref, ref_steps = reference
    n_steps = max(s for e, s in ref_steps if e == 2)
    assert n_steps >= 4
    token = CancelToken()
    rec = _Recorder(token, at=(2, 3))  # cancel after the 3rd step of epoch 2
    with pytest.raises(Cancelled, match="training cancelled at epoch 2, step 3; run it again to resume"):
        train_model(subjects[:3], subjects[3:], _cfg(), tmp_path, progress=rec, cancel=token)
    assert rec.steps[-1] == (2, 3)  # not one step more
    state = load_checkpoint(tmp_path / "last.pt")
    assert (int(state["epoch"]), int(state["step"])) == (1, 3)
    assert not leftovers(tmp_path)
    rec2 = _Recorder()
    res = train_model(subjects[:3], subjects[3:], _cfg(), tmp_path, progress=rec2, cancel=CancelToken())
    assert rec2.steps[0] == (2, 4)  # continues with the next step
    assert rec.steps + rec2.steps == ref_steps
    assert res.epochs == 2 and res.stop_reason == "max_epochs"
    assert [h["loss"] for h in res.history] == pytest.approx([h["loss"] for h in ref.history], abs=1e-6)
    assert [h["val_dsc"] for h in res.history] == pytest.approx([h["val_dsc"] for h in ref.history], abs=1e-6)
    _assert_same_weights(res.checkpoint, ref.checkpoint)
    assert res.threshold == pytest.approx(ref.threshold, abs=1e-6)


def test_cancel_during_validation_saves_the_trained_epoch(subjects, reference, tmp_path):
    ref_dir, ref, ref_steps = reference
    token = CancelToken()
    rec = _Recorder(token, stage="validate")  # the first validation: epoch 1's steps are all done
    with pytest.raises(Cancelled):
        train_model(subjects[:3], subjects[3:], _cfg(), tmp_path, progress=rec, cancel=token)
    state = load_checkpoint(tmp_path / "last.pt")
    n1 = max(s for e, s in ref_steps if e == 1)
    assert (int(state["epoch"]), int(state["step"])) == (0, n1)
    rec2 = _Recorder()
    res = train_model(subjects[:3], subjects[3:], _cfg(), tmp_path, progress=rec2)
    assert rec2.steps[0] == (2, 1)  # epoch 1 is not trained again
    assert [h["loss"] for h in res.history] == pytest.approx([h["loss"] for h in ref.history], abs=1e-6)
    _assert_same_weights(res.checkpoint, ref.checkpoint)


def test_cancel_releases_the_model(subjects, tmp_path, monkeypatch):
    """After Cancelled nothing keeps the network alive, even while the caller holds the exception."""
    import femur_core.training as training

    nets = []
    real_build = training.build_model
    monkeypatch.setattr(training, "build_model", lambda cfg: nets.append(real_build(cfg)) or nets[-1])
    token = CancelToken()
    with pytest.raises(Cancelled) as excinfo:
        train_model(subjects[:3], subjects[3:], _cfg(), tmp_path, progress=_Recorder(token, at=(1, 2)),
                    cancel=token)
    ref = weakref.ref(nets.pop())
    gc.collect()
    assert excinfo.value is not None  # the error is still held (as a GUI worker would)
    assert ref() is None, "the cancelled run still holds its network (and its GPU memory)"


def test_resume_after_early_stopping_does_not_train_more(subjects, tmp_path):
    # lr = 0 and no normalisation statistics to update: validation DSC never improves,
    # so the run early-stops after epoch 2
    cfg = _cfg(lr=0.0, max_epochs=6, min_epochs=1, patience=1,
               model=default_config("2d-same", features=4, levels=3, norm="none"))
    res = train_model(subjects[:3], subjects[3:], cfg, tmp_path)
    assert (res.epochs, res.stop_reason) == (2, "early_stopping")
    rec = _Recorder()
    again = train_model(subjects[:3], subjects[3:], cfg, tmp_path, progress=rec)
    assert (again.epochs, again.stop_reason) == (2, "early_stopping") and rec.steps == []
    assert len(again.history) == 2


# ----------------------------------------------------------------------------- Ctrl-C in the CLI
def _popen(module: str, args: list) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", f"femur_core.{module}", *map(str, args)], env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    t0 = time.monotonic()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < timeout, f"{path} did not appear"
        time.sleep(0.05)


def test_ctrl_c_stops_training_with_one_line_and_the_same_command_resumes(tmp_path):
    data = write_cohort(tmp_path / "data", 3)
    out = tmp_path / "model"
    args = ["--data", data, "--out", out, *QUICK_TRAIN, "--epochs", "4"]
    proc = _popen("train", args)
    _wait_for(out / "training" / "history.csv", proc)  # epoch 1 is done, epoch 2 is running
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err and lines[-1].startswith("error: training cancelled at epoch")
    assert lines[-1].endswith("run it again to resume")
    assert not any(ln.startswith("error") for ln in lines[:-1])  # the rest is the epoch log
    state = load_checkpoint(out / "training" / "last.pt")
    done = len(json.loads(state["history_json"]))
    assert done >= 1 and not (out / "model.pt").exists() and not leftovers(out)
    proc = _popen("train", args)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "resumed at epoch" in err
    rows = (out / "training" / "history.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == [1, 2, 3, 4]  # history continues, nothing repeated
    assert (out / "model.pt").exists()


# ----------------------------------------------------------------------------- kill -9
def _check_complete(run: Path) -> int:
    """Every checkpoint and JSON file in the run folder is whole (loads); returns how many were checked."""
    n = 0
    for p in sorted(run.rglob("*")):
        if p.name.endswith(".part") or not p.is_file():
            continue  # a temporary file of the write that was killed (never read, replaced next time)
        if p.suffix == ".pt":
            load_checkpoint(p)
        elif p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".npz":
            with np.load(p) as z:
                [z[k] for k in z.files]
        elif p.name.endswith(".nii.gz"):
            from femur_core.volume_io import read_volume

            read_volume(p)
        else:
            continue
        n += 1
    return n


def _wait_for_first_write(run: Path, proc: subprocess.Popen, since: float, timeout: float = 90) -> None:
    """Until a file in ``run`` is newer than ``since`` (or the process ends)."""
    t0 = time.monotonic()
    while proc.poll() is None and time.monotonic() - t0 < timeout:
        for p in run.rglob("*"):
            try:
                if p.is_file() and p.stat().st_mtime >= since:
                    return
            except FileNotFoundError:  # renamed while we looked
                pass
        time.sleep(0.05)


def _structure(report: dict) -> list:
    return [(f["fold"], f["train_subjects"], f["early_stopping_subjects"], f["test_subjects"], f["epochs"],
             [s["subject"] for s in f["subjects"]]) for f in report["folds"]]


def test_kill_9_at_random_moments_then_resume(tmp_path):
    seed = int(os.environ.get("FEMUR_KILL_SEED", random.randrange(10**6)))
    rng = random.Random(seed)
    data = write_cohort(tmp_path / "data", 4)
    args = lambda out: ["--data", data, "--out", out, "--folds", "2", *QUICK_TRAIN, "--epochs", "3"]  # noqa: E731
    ref_out, run = tmp_path / "reference", tmp_path / "run"
    reference = _popen("cv", args(ref_out))  # runs alongside the killed ones
    kills = []
    for _ in range(3):
        # the random moment is counted from the run's first write (start-up time varies a lot on a busy
        # machine), so that the kills land in training, checkpointing, scoring or report writing
        launched = time.time()
        proc = _popen("cv", args(run))
        _wait_for_first_write(run, proc, launched)
        delay = rng.uniform(0.0, 3.0)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        checked = _check_complete(run)  # no half-written file at this kill point
        kills.append((round(delay, 2), proc.returncode, checked))
    assert sum(k[2] for k in kills) > 0, kills
    # (delay s, exit code: -9 killed / 0 had finished, files checked); rerun with FEMUR_KILL_SEED=seed
    print(f"kill -9 seed {seed}: {kills}")
    proc = _popen("cv", args(run))
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, f"seed {seed}, kills {kills}: {err}"
    _, ref_err = reference.communicate(timeout=180)
    assert reference.returncode == 0, ref_err
    _check_complete(run)
    rep, ref = (json.loads((d / "report.json").read_text()) for d in (run, ref_out))
    assert rep["summary"]["complete"] and rep["summary"]["n_subjects"] == 4, (seed, kills)
    assert json.loads((run / "splits.json").read_text()) == json.loads((ref_out / "splits.json").read_text())
    assert _structure(rep) == _structure(ref), (seed, kills)
    # resuming replays the same steps: the scores match the uninterrupted run
    for a, b in zip(rep["folds"], ref["folds"]):
        for sa, sb in zip(a["subjects"], b["subjects"]):
            assert sa["dsc"] == pytest.approx(sb["dsc"], abs=1e-4), (seed, kills)
    for k in range(2):
        hist = (run / f"fold{k}" / "history.csv").read_text().splitlines()[1:]
        assert [int(r.split(",")[0]) for r in hist] == [1, 2, 3]
