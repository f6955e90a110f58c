"""Train Fold dock widget: progress, cancel within a step, resume, hand-over to Segment Femur."""

from __future__ import annotations

import gc
import threading

import numpy as np
import pytest

from conftest import gui_import  # importorskip, but a failure under CI=true
napari = gui_import("napari")
gui_import("pytestqt")
nib = gui_import("nibabel")

from nibabel import orientations as nio  # noqa: E402

import napari_femur._train_job as tj  # noqa: E402
import napari_femur._train_widget as tw  # noqa: E402
from femur_core.checkpoint import load_checkpoint  # noqa: E402
from napari_femur._segment_widget import SegmentFemurWidget  # noqa: E402
from napari_femur._session import session_models  # noqa: E402
from napari_femur._train_widget import TrainFoldWidget, next_subject_id  # noqa: E402

pytestmark = pytest.mark.gui

TIMEOUT_MS = 300_000


@pytest.fixture(autouse=True)
def _empty_session_store():
    session_models().clear()
    yield
    session_models().clear()


def _tiny_settings(widget: TrainFoldWidget, data, out) -> None:
    widget.data_dir.set_path(data)
    widget.out_dir.set_path(out)
    widget.recipe_combo.setCurrentText("synthetic-quick")
    widget.model_combo.setCurrentIndex(widget.model_combo.findData("2d-same"))
    widget.features.setValue(4)
    widget.levels.setValue(2)
    widget.epochs.setValue(2)
    widget.patience.setValue(2)
    widget.budget.setValue(0)
    widget.n_folds.setValue(2)
    widget.fold.setValue(0)
    widget.device_combo.setCurrentText("cpu")
    widget.config_overrides = {"batch_size": 1, "min_epochs": 1, "augment": ["flip"], "precision": "fp32"}


def test_train_cancel_within_a_step_resume_and_hand_over(
    make_napari_viewer, qtbot, tiny_data_folder, tmp_path, monkeypatch
):
    viewer = make_napari_viewer()
    [image] = viewer.open(str(tiny_data_folder / "sub01_image.nii.gz"), plugin="napari-femur")
    segment = SegmentFemurWidget(viewer)
    viewer.window.add_dock_widget(segment)
    widget = TrainFoldWidget(viewer)
    viewer.window.add_dock_widget(widget)
    run_dir = tmp_path / "run"
    _tiny_settings(widget, tiny_data_folder, run_dir)
    widget.separate_process = False  # the gate below lives in this process (the default child: next test)
    assert "python -m femur_core.cv" in widget.command.text() and "--fold 0" in widget.command.text()

    # Gate the core's progress callback: after the first training step the core thread waits
    # until the test has pressed Cancel, so "stops before the next step" is checked exactly.
    first_step, gate = threading.Event(), threading.Event()
    real_iter = tj.iter_progress

    def gated_iter(fn, *args, cancel=None, **kwargs):
        def gated_fn(*a, progress, **kw):
            def callback(ev):
                progress(ev)
                if ev.stage == "train" and not first_step.is_set():
                    first_step.set()
                    gate.wait(60)
            return fn(*a, progress=callback, **kw)
        return real_iter(gated_fn, *args, cancel=cancel, **kwargs)

    monkeypatch.setattr(tj, "iter_progress", gated_iter)
    events = []
    widget.progressed.connect(events.append)
    frozen_while_training = []
    widget.progressed.connect(lambda _ev: frozen_while_training.append(gc.get_freeze_count()))
    assert widget.start() is not None
    assert not widget.train_button.isEnabled() and widget.cancel_button.isEnabled()
    qtbot.waitUntil(first_step.is_set, timeout=TIMEOUT_MS)
    qtbot.waitUntil(lambda: widget.progress.maximum() > 1, timeout=TIMEOUT_MS)  # progress reached the GUI
    widget.cancel_button.click()
    gate.set()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=TIMEOUT_MS)

    train_events = [e for e in events if e.stage == "train"]
    assert [(e.epoch, e.step) for e in train_events] == [(1, 1)], "no step ran after Cancel"
    # the viewer's objects were left out of full garbage collections while training, and only then
    assert frozen_while_training and min(frozen_while_training) > 0
    assert gc.get_freeze_count() == 0
    assert train_events[0].total > 1 and train_events[0].loss is not None
    fold_dir = run_dir / "fold0"
    state = load_checkpoint(fold_dir / "last.pt")
    assert (int(state["epoch"]), int(state["step"])) == (0, 1)
    assert not (fold_dir / "result.json").exists()
    assert "Cancelled" in widget.status.text()
    assert widget.resume_button.isEnabled()
    assert len(session_models()) == 0
    assert (run_dir / "splits.json").exists() and (run_dir / "config.json").exists()

    # Train again on the same folder refuses (never mixes runs silently) and points to Resume
    assert widget.start(resume=False) is None
    assert "Resume" in widget.status.text()

    # Resume: continues at epoch 1, step 2, finishes, registers the model
    monkeypatch.setattr(tj, "iter_progress", real_iter)
    events.clear()
    with qtbot.waitSignal(widget.trained, timeout=TIMEOUT_MS) as blocker:
        widget.resume_button.click()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=TIMEOUT_MS)
    resumed = [e for e in events if e.stage == "resume"]
    assert resumed and "resumed at epoch 1, step 1" in resumed[0].message
    first_train = next(e for e in events if e.stage == "train")
    assert (first_train.epoch, first_train.step) == (1, 2), "resumed where it stopped"
    epoch_ends = [e for e in events if e.stage == "epoch_end"]
    assert epoch_ends and all(e.val_dsc is not None for e in epoch_ends)

    entry = blocker.args[0]
    outcome = widget.last_outcome
    assert entry.path == fold_dir / "best.pt" and entry.path.exists()
    assert [h["epoch"] for h in outcome.history] == [1, 2]
    assert all(np.isfinite(h["loss"]) for h in outcome.history)
    assert outcome.test_dsc is not None and (fold_dir / "result.json").exists()
    assert widget.plot.epochs == [1, 2]
    # the panel's curves are rendered off the GUI thread; the picture shown is the final history
    assert widget.plot.live
    qtbot.waitUntil(lambda: not widget.plot.rendering, timeout=TIMEOUT_MS)
    assert widget.plot.shown.epochs == (1, 2) and widget.plot.renders >= 1
    assert not widget.resume_button.isEnabled()

    # ... and Segment Femur offers (and selects) it
    assert segment.model_combo.currentText() == f"trained in this session: {entry.name}"
    assert segment.selected_model_path() == entry.path
    segment.image_combo.set_layer(image)
    segment.flip_check.setChecked(False)
    with qtbot.waitSignal(segment.segmented, timeout=TIMEOUT_MS) as seg:
        segment.run()
    prob_layer, mask_layer = seg.args[0]
    assert mask_layer.data.shape == image.data.shape
    assert np.allclose(mask_layer.affine.affine_matrix, image.affine.affine_matrix)
    qtbot.waitUntil(lambda: segment.worker is None, timeout=TIMEOUT_MS)


def test_training_runs_in_another_process_cancel_and_resume(make_napari_viewer, qtbot, tiny_data_folder, tmp_path,
                                                             monkeypatch):
    """The default: training in a child process (the viewer's process only relays its events). Cancel
    reaches the child, which saves a resumable last.pt at the last step the panel was told of; Resume
    continues from there in a new child and hands the model over."""
    import multiprocessing

    import femur_core.cv

    def not_here(*args, **kwargs):
        raise AssertionError("trained in the viewer's process")

    monkeypatch.setattr(femur_core.cv, "run_fold", not_here)  # the child imports its own, unpatched
    viewer = make_napari_viewer()
    widget = TrainFoldWidget(viewer)
    run_dir = tmp_path / "run"
    _tiny_settings(widget, tiny_data_folder, run_dir)
    widget.epochs.setValue(3)
    widget.patience.setValue(3)
    assert widget.separate_process
    events = []

    def on_event(ev):
        events.append(ev)
        if ev.stage == "train" and widget._cancel is not None and not widget._cancel.cancelled:
            widget.cancel_button.click()  # at the first step the GUI hears of

    widget.progressed.connect(on_event)
    assert widget.start() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=TIMEOUT_MS)
    assert "Cancelled" in widget.status.text(), widget.status.text()
    train_events = [e for e in events if e.stage == "train"]
    assert train_events
    fold_dir = run_dir / "fold0"
    state = load_checkpoint(fold_dir / "last.pt")
    last = train_events[-1]
    # every step the child took was reported before it stopped (the pipe keeps their order)
    assert (int(state["epoch"]) + 1, int(state["step"])) == (last.epoch, last.step) or (
        (int(state["epoch"]), int(state["step"])) == (last.epoch, 0))
    assert not (fold_dir / "result.json").exists() and widget.resume_button.isEnabled()
    assert len(session_models()) == 0

    events.clear()
    widget.progressed.disconnect(on_event)
    widget.progressed.connect(events.append)
    with qtbot.waitSignal(widget.trained, timeout=TIMEOUT_MS):
        widget.resume_button.click()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=TIMEOUT_MS)
    first = next(e for e in events if e.stage == "train")
    done_steps = int(state["step"])
    if done_steps < first.total:
        assert (first.epoch, first.step) == (int(state["epoch"]) + 1, done_steps + 1), "resumed where it stopped"
    else:
        assert (first.epoch, first.step) == (int(state["epoch"]) + 2, 1)
    assert [h["epoch"] for h in widget.last_outcome.history] == [1, 2, 3]
    assert (fold_dir / "result.json").exists() and widget.last_outcome.test_dsc is not None
    assert widget.plot.epochs == [1, 2, 3]
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("femur-")], "the child is gone"


def test_train_errors_are_messages(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    widget = TrainFoldWidget(viewer)
    widget.data_dir.set_path(tmp_path / "missing")
    assert widget.start() is None
    assert "data folder does not exist" in widget.status.text()
    widget.data_dir.set_path(None)
    assert widget.start() is None
    assert "choose a data folder" in widget.status.text()


def test_add_corrected_mask_writes_next_pair_on_the_source_grid(make_napari_viewer, tiny_data_folder):
    viewer = make_napari_viewer()
    src_img = tiny_data_folder / "sub02_image.nii.gz"
    [image] = viewer.open(str(src_img), plugin="napari-femur")
    [mask] = viewer.open(str(tiny_data_folder / "sub02_femur.nii.gz"), plugin="napari-femur")
    # a correction painted in napari (canonical layout)
    mask.data[0, 0, 0] = 1
    mask.refresh()
    widget = TrainFoldWidget(viewer)
    widget.data_dir.set_path(tiny_data_folder)
    widget.pair_image.set_layer(image)
    widget.pair_mask.set_layer(mask)
    assert next_subject_id(tiny_data_folder) == "sub05"
    img_path, msk_path = widget.add_corrected_mask()
    assert (img_path.name, msk_path.name) == ("sub05_image.nii.gz", "sub05_femur.nii.gz")
    src = nib.load(str(src_img))
    for p in (img_path, msk_path):
        back = nib.load(str(p))
        assert back.shape == src.shape
        assert np.allclose(back.affine, src.affine, atol=1e-5)
        assert nio.aff2axcodes(back.affine) == nio.aff2axcodes(src.affine)
    assert np.array_equal(np.asarray(nib.load(str(img_path)).dataobj), np.asarray(src.dataobj))
    new_mask = np.asarray(nib.load(str(msk_path)).dataobj)
    old_mask = np.asarray(nib.load(str(tiny_data_folder / "sub02_femur.nii.gz")).dataobj)
    diff = np.argwhere(new_mask != old_mask)
    assert len(diff) == 1 and set(np.unique(new_mask)) == {0, 1}
    # canonical (P, I, L) index (0, 0, 0) = most anterior slice, top row, most right-hand column,
    # which is index (0, 0, 0) of the (L, I, P) source too (axes permuted, none flipped)
    assert nio.aff2axcodes(src.affine) == ("L", "I", "P")
    assert tuple(diff[0]) == (0, 0, 0)
    # a second add never overwrites
    img2, _ = widget.add_corrected_mask()
    assert img2.name == "sub06_image.nii.gz"
    from femur_core.data import find_subjects

    assert [s.id for s in find_subjects(tiny_data_folder)][-2:] == ["sub05", "sub06"]


def test_train_on_open_layers_adds_them_to_training(make_napari_viewer, qtbot, tiny_data_folder, tmp_path,
                                                     monkeypatch):
    """Open image + mask layers go into the TRAINING subjects (never early stopping), with the layers'
    own pixels and geometry; the data folder's fold-k subjects stay out of both."""
    import femur_core.training as training
    from femur_core import read_volume, to_canonical

    calls = []
    real_train = training.train_model

    def spy(train, val, *args, **kwargs):
        calls.append(([s for s in train], [s for s in val]))
        return real_train(train, val, *args, **kwargs)

    monkeypatch.setattr(training, "train_model", spy)
    viewer = make_napari_viewer()
    [image] = viewer.open(str(tiny_data_folder / "sub01_image.nii.gz"), plugin="napari-femur")
    [mask] = viewer.open(str(tiny_data_folder / "sub01_femur.nii.gz"), plugin="napari-femur")
    mask.data[0, 0, 0] = 1  # an edit made in napari: the pair trains on the layer, not on the file
    widget = TrainFoldWidget(viewer)
    _tiny_settings(widget, tiny_data_folder, tmp_path / "run")
    widget.separate_process = False  # the spy above lives in this process
    widget.epochs.setValue(1)
    widget.use_layers.setChecked(True)
    widget.pair_image.set_layer(image)
    widget.pair_mask.set_layer(mask)
    assert widget.command.text() == ""  # not expressible as one CLI call
    with qtbot.waitSignal(widget.trained, timeout=TIMEOUT_MS) as blocker:
        assert widget.start() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=TIMEOUT_MS)
    entry = blocker.args[0]
    assert entry.path == tmp_path / "run" / "fold0-with-layers" / "best.pt"
    assert entry.path.exists() and session_models().get(entry.name) is not None
    [(train, val)] = calls
    pair = [s for s in train if s.id.startswith("layer:")]
    assert len(pair) == 1 and not any(s.id.startswith("layer:") for s in val)
    # the layers' own data on the scan's own grid
    src_img, src_mask = (read_volume(tiny_data_folder / f"sub01_{k}.nii.gz") for k in ("image", "femur"))
    np.testing.assert_allclose(to_canonical(pair[0].image)[0].affine, to_canonical(src_img)[0].affine, atol=1e-5)
    np.testing.assert_array_equal(to_canonical(pair[0].image)[0].data, to_canonical(src_img)[0].data)
    edited = to_canonical(src_mask)[0].data.copy()
    edited[0, 0, 0] = 1
    np.testing.assert_array_equal(to_canonical(pair[0].mask)[0].data, edited)
    # the fold's test subjects (named in the note) are in neither training nor early stopping
    used = {s.id for s in train + val if not s.id.startswith("layer:")}
    kept_out = {f"sub0{i}" for i in range(1, 5)} - used
    assert kept_out and all(sid in widget.last_outcome.note for sid in kept_out)
    assert "layer pair" in widget.last_outcome.note


def _drain(gen):
    """Run a worker generator to its end; returns its value."""
    try:
        while True:
            next(gen)
    except StopIteration as stop:
        return stop.value


def _settings(run_dir):
    import json

    cfg = json.loads((run_dir / "config.json").read_text())
    cfg.pop("environment")
    return cfg


def test_printed_command_run_as_printed_writes_the_widgets_config(make_napari_viewer, tiny_data_folder, tmp_path,
                                                                  monkeypatch):
    """The terminal command, run as printed, gives the widget's config.json and splits.json.

    The budget is "no limit" and the device "cpu": a command without --budget-minutes (the CLI then
    takes the recipe's budget) or without --device (auto) wrote another config.json.
    """
    import json
    import shlex
    import subprocess
    import sys

    import femur_core.cv
    from femur_core.progress import CancelToken

    from reliability_utils import cli_env

    viewer = make_napari_viewer()
    widget = TrainFoldWidget(viewer)
    _tiny_settings(widget, tiny_data_folder, tmp_path / "gui")
    # the widget's run up to training (config.json and splits.json are written before it)
    monkeypatch.setattr(femur_core.cv, "run_fold", lambda setup, k, **kw: {"subjects": []})
    _drain(tw.train_job(widget.current_plan(), CancelToken()))

    prefix = "Same run from a terminal: "
    assert widget.command.text().startswith(prefix)
    cmd = shlex.split(widget.command.text()[len(prefix):])
    assert cmd[:3] == ["python", "-m", "femur_core.cv"]
    cmd[cmd.index("--out") + 1] = str(tmp_path / "cli")
    proc = subprocess.run([sys.executable, *cmd[1:]], capture_output=True, text=True, env=cli_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert _settings(tmp_path / "cli") == _settings(tmp_path / "gui")
    assert _settings(tmp_path / "gui")["train"]["max_minutes"] is None
    assert (json.loads((tmp_path / "cli" / "splits.json").read_text())
            == json.loads((tmp_path / "gui" / "splits.json").read_text()))
    # and the widget's settings are accepted by the run folder the command made (no "settings differ")
    plan = widget.current_plan()
    plan.run_dir = tmp_path / "cli"
    plan.fold = 1
    _drain(tw.train_job(plan, CancelToken()))


def test_training_with_layers_holds_out_the_same_fold_and_writes_splits(make_napari_viewer, tiny_data_folder,
                                                                        tmp_path, monkeypatch):
    """fold<k>-with-layers/ trains on the subjects fold<k>/ trains on (stratified split, splits.json written)."""
    import json

    import femur_core.training
    from femur_core.cv import setup_run
    from femur_core.data import Subject, find_subjects, inner_split, load_subjects
    from femur_core.errors import Cancelled
    from femur_core.progress import CancelToken

    viewer = make_napari_viewer()
    widget = TrainFoldWidget(viewer)
    _tiny_settings(widget, tiny_data_folder, tmp_path / "run")
    subjects = load_subjects(find_subjects(tiny_data_folder))
    extra = Subject("layer:x", subjects[0].image, subjects[0].mask)
    seen = {}

    def fake_train(train, val, cfg, out, **kw):
        seen["train"], seen["val"] = [s.id for s in train], [s.id for s in val]
        raise Cancelled("stop here")

    monkeypatch.setattr(femur_core.training, "train_model", fake_train)
    for seed in range(4):
        widget.seed.setValue(seed)
        run = tmp_path / f"run{seed}"
        plan = widget.current_plan()
        plan.run_dir, plan.extra = run, [extra]
        with pytest.raises(Cancelled):
            _drain(tw.train_job(plan, CancelToken()))
        splits = json.loads((run / "splits.json").read_text())
        ref = setup_run(tmp_path / f"ref{seed}", subjects, plan.config, plan.n_folds, seed, "honest",
                        str(tiny_data_folder.resolve()))
        assert splits["folds"] == ref.folds
        k, cfg = plan.fold, plan.config
        test_ids = ref.folds[k]
        tr_ids, es_ids = inner_split([i for f in ref.folds if f != test_ids for i in f], cfg.val_fraction,
                                     cfg.seed + k)  # as cv.run_fold (honest protocol)
        assert seen == {"train": tr_ids + ["layer:x"], "val": es_ids}
        assert not set(test_ids) & set(seen["train"] + seen["val"])


# ----------------------------------------------------------------------------- what to train, recipe, output
def test_recipe_and_output_follow_the_data_folder(make_napari_viewer, qtbot, tiny_data_folder, tmp_path):
    from pathlib import Path

    from femur_core.synthetic import make_cohort

    viewer = make_napari_viewer()
    widget = TrainFoldWidget(viewer)
    qtbot.addWidget(widget)
    assert widget.out_dir.path() is None, "no silent default in the home directory"
    assert widget.start() is None and "choose a data folder" in widget.status.text()
    assert widget.recipe_combo.currentText() == "cpu-2d"
    # real-looking scans: the real-data default recipe, output beside the data
    widget.data_dir.set_path(tiny_data_folder)
    assert widget.recipe_combo.currentText() == "cpu-2d"
    out = widget.out_dir.path()
    assert out.parent == tiny_data_folder.parent / "data-runs" and out.name.startswith("fold-")
    assert not str(out).startswith(str(Path.home())) or str(tiny_data_folder).startswith(str(Path.home()))
    widget.set_mode("final")
    assert widget.out_dir.path().name.startswith("final-") and widget.init_from.isEnabled()
    assert "femur_core.train" in widget.command.text()
    # a synthetic cohort: the quick recipe
    make_cohort(tmp_path / "syn", n=2, seed=0, geometry="tiny")
    widget.data_dir.set_path(tmp_path / "syn")
    assert widget.recipe_combo.currentText() == "synthetic-quick"
    assert "synthetic" in widget.recipe_note.text()
    # a folder the user picks is kept when the data folder or the job changes
    widget.out_dir.set_path(tmp_path / "mine")
    widget.data_dir.set_path(tiny_data_folder)
    widget.set_mode("cv")
    assert widget.out_dir.path() == tmp_path / "mine"
    assert not widget.init_from.isEnabled() and not widget.fold.isEnabled()


def test_final_model_then_fine_tune_it_from_the_panel(make_napari_viewer, qtbot, tiny_data_folder, tmp_path):
    import json

    viewer = make_napari_viewer()
    widget = TrainFoldWidget(viewer)
    qtbot.addWidget(widget)
    _tiny_settings(widget, tiny_data_folder, tmp_path / "model")
    widget.epochs.setValue(1)
    widget.set_mode("final")
    with qtbot.waitSignal(widget.trained, timeout=TIMEOUT_MS) as blocker:
        assert widget.start() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=TIMEOUT_MS)
    first = blocker.args[0]
    assert first.path == tmp_path / "model" / "model.pt" and first.path.is_file()
    assert "final" in first.name and (tmp_path / "model" / "config.json").is_file()

    # fine-tune it on the same folder (after corrected scans were added): its architecture is kept
    widget.out_dir.set_path(tmp_path / "tuned")
    widget.init_from.set_path(tmp_path / "model")
    widget.features.setValue(6)  # ignored: the model's own architecture wins
    assert "--init-from" in widget.command.text()
    with qtbot.waitSignal(widget.trained, timeout=TIMEOUT_MS) as blocker:
        assert widget.start() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=TIMEOUT_MS)
    tuned = blocker.args[0]
    assert tuned.path == tmp_path / "tuned" / "model.pt" and "fine-tuned" in tuned.name
    info = json.loads((tmp_path / "tuned" / "config.json").read_text())
    assert info["init_from"] == str((tmp_path / "model").resolve())
    assert info["train"]["model"]["features"] == 4
    assert "fine-tuned from" in widget.status.text().lower()
    assert {m.path for m in session_models().models()} == {first.path, tuned.path}


def test_all_folds_fill_the_cross_validation_table(make_napari_viewer, qtbot, tiny_data_folder, tmp_path):
    import json

    viewer = make_napari_viewer()
    widget = TrainFoldWidget(viewer)
    qtbot.addWidget(widget)
    _tiny_settings(widget, tiny_data_folder, tmp_path / "cv")
    widget.epochs.setValue(1)
    widget.set_mode("cv")
    assert "--fold " not in widget.command.text() and "--folds 2" in widget.command.text()
    with qtbot.waitSignal(widget.trained, timeout=TIMEOUT_MS):
        assert widget.start() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=TIMEOUT_MS)
    table = widget.cv_table
    assert not table.isHidden() and table.rowCount() == 3  # fold 0, fold 1, mean
    report = json.loads((tmp_path / "cv" / "report.json").read_text())
    for k in (0, 1):
        result = json.loads((tmp_path / "cv" / f"fold{k}" / "result.json").read_text())
        assert table.item(k, 0).text() == str(k)
        assert table.item(k, 1).text() == ", ".join(result["test_subjects"])
        assert float(table.item(k, 2).text()) == pytest.approx(
            np.mean([s["dsc"] for s in result["subjects"]]), abs=5e-4)
    assert table.item(2, 0).text() == "mean"
    assert table.item(2, 2).text().startswith(f"{report['summary']['dsc_mean']:.3f}")
    assert "cross-validation DSC" in widget.status.text()
