"""Crash safety, cancel and resume.

- kill -9 a training inside an epoch (a checkpoint on disk, the run not
  finished): the same command resumes to weights equal, bit for bit, to an
  uninterrupted run's (deterministic settings, a model that learned the femur);
- kill -9 a cross-validation run at random moments: every file in the run
  folder is complete at every kill point, and the resumed run ends with the
  same folds and scores as an uninterrupted run;
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

#: how long a subprocess may take before the test gives up on it: a hang detector, not a timing
#: check (about 30 s on two idle cores; ten times that on a machine shared by several jobs)
WATCHDOG_S = 900


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


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = WATCHDOG_S) -> None:
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
    _, err = proc.communicate(timeout=WATCHDOG_S)
    assert proc.returncode == 130, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err and lines[-1].startswith("error: training cancelled at epoch")
    assert lines[-1].endswith("run it again to resume")
    assert not any(ln.startswith("error") for ln in lines[:-1])  # the rest is the epoch log
    state = load_checkpoint(out / "training" / "last.pt")
    done = len(json.loads(state["history_json"]))
    assert done >= 1 and not (out / "model.pt").exists() and not leftovers(out)
    proc = _popen("train", args)
    _, err = proc.communicate(timeout=WATCHDOG_S)
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


def _wait_for_first_write(run: Path, proc: subprocess.Popen, since: float, timeout: float = WATCHDOG_S) -> None:
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


#: a deterministic training that learns the tiny cohort's "femur" in a few epochs: a constant rate
#: (the default recipe's rate follows the wall clock, which no replay can reproduce), a fixed number
#: of epochs and no time budget (study-2d has none), no early stopping within 5 epochs (patience 10)
DETERMINISTIC = ["--recipe", "study-2d", "--model", "2d-same", "--features", "4", "--levels", "3",
                 "--loss", "dice_ce", "--lr", "3e-3", "--lr-schedule", "constant", "--in-plane-size", "24",
                 "--augment", "flip", "--device", "cpu", "--precision", "fp32"]

#: test probe run before the command in the same process: every training step appends
#: "epoch step steps_in_epoch" to the file named by FEMUR_TEST_STEPS (line-buffered, written
#: after the optimiser step), so the test knows where training is when it kills it
_STEP_PROBE = """
import os
import femur_core.cli as _cli
_log = open(os.environ["FEMUR_TEST_STEPS"], "a", buffering=1)
_call = _cli.TqdmProgress.__call__
def _probe(self, ev):
    if ev.stage == "train":
        _log.write(f"{ev.epoch} {ev.step} {ev.total}\\n")
    return _call(self, ev)
_cli.TqdmProgress.__call__ = _probe
"""


def _popen_probed(module: str, args: list, steps: Path) -> subprocess.Popen:
    code = (_STEP_PROBE + "\nimport runpy, sys\n"
            f"sys.argv = ['femur_core.{module}'] + {[str(a) for a in args]!r}\n"
            f"runpy.run_module('femur_core.{module}', run_name='__main__', alter_sys=True)\n")
    return subprocess.Popen([sys.executable, "-c", code], env={**cli_env(), "FEMUR_TEST_STEPS": str(steps)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _steps(path: Path) -> list[tuple[int, int, int]]:
    if not path.exists():
        return []
    return [tuple(map(int, ln.split())) for ln in path.read_text().splitlines() if len(ln.split()) == 3]


def test_kill_9_mid_epoch_then_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path):
    """kill -9 inside epoch 3 of 5 (epoch 2's checkpoint on disk), run the same command again: the
    final weights are EQUAL, bit for bit, to those of an uninterrupted run of the same command.

    Exact equality, not a tolerance: the resumed run restores the weights and Adam's moments and step
    count losslessly from last.pt and replays epoch 3 from its start; the sample order and every
    augmentation draw come from generators seeded by (seed, epoch, step), the rate is constant, and
    both runs use one thread (OMP_NUM_THREADS=1, fp32), so every floating-point operation happens in
    the same order. Any difference means the resume lost or changed something (e.g. the optimizer
    state not restored, a step replayed twice, the RNG not re-seeded per epoch, the wrong epoch
    resumed); a tolerance would hide a small one.
    """
    data = write_cohort(tmp_path / "data", 4)
    args = lambda out: ["--data", data, "--out", out, *DETERMINISTIC, "--epochs", "5"]  # noqa: E731
    ref_out, out = tmp_path / "reference", tmp_path / "killed"
    reference = _popen_probed("train", args(ref_out), tmp_path / "ref_steps.txt")  # alongside the killed one
    steps = tmp_path / "steps.txt"
    proc = _popen_probed("train", args(out), steps)
    t0 = time.monotonic()
    while not any(e == 3 and s >= 1 for e, s, _ in _steps(steps)):  # epoch 2 saved, epoch 3 has begun
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < WATCHDOG_S, "training never reached epoch 3"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    epoch, step, total = _steps(steps)[-1]
    # the kill landed inside an epoch's training steps (epoch 3, or a later one where this test was
    # starved of CPU while training went on): some steps of it done, not all of them
    assert epoch >= 3 and 1 <= step < total, (epoch, step, total)
    state = load_checkpoint(out / "training" / "last.pt")
    assert (int(state["epoch"]), int(state["step"])) == (epoch - 1, 0)  # the checkpoint the resume starts from
    assert not (out / "model.pt").exists()  # the run had not finished
    proc = _popen_probed("train", args(out), steps)
    _, err = proc.communicate(timeout=WATCHDOG_S)
    assert proc.returncode == 0, err
    assert f"resumed at epoch {epoch}, step 0" in err
    _, ref_err = reference.communicate(timeout=WATCHDOG_S)
    assert reference.returncode == 0, ref_err
    resumed = _steps(steps)
    # the killed epoch and the rest were trained once after the resume, as in the reference run
    after = resumed[resumed.index((epoch, step, total)) + 1:]
    assert after == [t for t in _steps(tmp_path / "ref_steps.txt") if t[0] >= epoch]
    for name in ("model.pt", "training/last.pt"):
        mine, ref = _weights(out / name), _weights(ref_out / name)
        assert mine.keys() == ref.keys()
        for k in mine:
            assert torch.equal(mine[k], ref[k]), f"{name}: {k} differs from the uninterrupted run"
    hist = lambda d: [r.split(",")[:3] for r in (d / "training" / "history.csv").read_text().splitlines()]  # noqa: E731
    assert hist(out) == hist(ref_out)  # epoch, loss, validation DSC (not the minutes)
    assert load_checkpoint(out / "model.pt")["threshold"] == load_checkpoint(ref_out / "model.pt")["threshold"]
    # ... and the model compared is one that learned the femur, not an all-foreground one
    from femur_core import read_volume
    from femur_core.inference import load_model, predict_volume
    from femur_core.metrics import evaluate
    from reliability_utils import write_subject

    img, ref_mask = (read_volume(f) for f in write_subject(tmp_path / "unseen", "sub09", 909))
    pred = predict_volume(load_model(ref_out / "model.pt"), img, device="cpu", precision="fp32")
    m = evaluate(pred.mask.data.astype(bool), ref_mask.data.astype(bool), img.spacing)
    assert m.dsc > 0.6 and m.specificity > 0.95, m


def test_kill_9_at_random_moments_leaves_whole_files_and_the_run_completes(tmp_path):
    """kill -9 a cross-validation run at random moments (training, checkpointing, scoring, report
    writing): every file in the run folder is whole at every kill point, and the resumed run ends
    with the folds and the scores of an uninterrupted run (deterministic settings: same numbers)."""
    seed = int(os.environ.get("FEMUR_KILL_SEED", random.randrange(10**6)))
    rng = random.Random(seed)
    data = write_cohort(tmp_path / "data", 4)
    args = lambda out: ["--data", data, "--out", out, "--folds", "2", *DETERMINISTIC, "--epochs", "3"]  # noqa: E731
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
        if proc.returncode == 0:
            break  # the run finished before the delay: no more kill points
    # (delay s, exit code: -9 killed / 0 had finished, files checked); rerun with FEMUR_KILL_SEED=seed
    print(f"kill -9 seed {seed}: {kills}")
    assert kills[0][1] == -signal.SIGKILL, kills  # at least one kill landed (the first is at most 3 s in)
    assert sum(k[2] for k in kills if k[1] != 0) > 0, kills  # ... with files on disk to check
    proc = _popen("cv", args(run))
    _, err = proc.communicate(timeout=WATCHDOG_S)
    assert proc.returncode == 0, f"seed {seed}, kills {kills}: {err}"
    _, ref_err = reference.communicate(timeout=WATCHDOG_S)
    assert reference.returncode == 0, ref_err
    _check_complete(run)
    rep, ref = (json.loads((d / "report.json").read_text()) for d in (run, ref_out))
    assert rep["summary"]["complete"] and rep["summary"]["n_subjects"] == 4, (seed, kills)
    assert json.loads((run / "splits.json").read_text()) == json.loads((ref_out / "splits.json").read_text())
    assert _structure(rep) == _structure(ref), (seed, kills)
    # resuming replays the same steps: the same scores, and scores of a model that segments (not
    # an all-foreground mask, whose specificity is 0 and whose DSC no resume bug could change)
    for a, b in zip(rep["folds"], ref["folds"]):
        for sa, sb in zip(a["subjects"], b["subjects"]):
            assert sa["dsc"] == pytest.approx(sb["dsc"], abs=1e-9), (seed, kills)
            assert sb["specificity"] > 0.9, sb
    for k in range(2):
        hist = (run / f"fold{k}" / "history.csv").read_text().splitlines()[1:]
        assert [int(r.split(",")[0]) for r in hist] == [1, 2, 3]
