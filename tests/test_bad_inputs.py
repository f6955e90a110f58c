"""The bad-input matrix: every bad input ends in one clear line that names the file and the problem.

For the command lines (``python -m femur_core.predict | train | cv``) each case
checks: a non-zero exit code, stderr is exactly one ``error: ...`` line naming
the file and the problem, no traceback, and nothing (half-)written. Most cases
call the CLI's real entry point (``run_main(main, argv)``) in-process, which is
fast; ``test_cli_in_a_real_process`` repeats representative cases through
``python -m`` in a fresh interpreter. The napari reader is checked on the same
files: it raises an error naming the file, which napari shows as a notification.
"""

from __future__ import annotations

import errno
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from femur_core.checkpoint import load_checkpoint, save_checkpoint
from femur_core.cli import run_main
from femur_core.errors import InputError
from femur_core.volume_io import atomic_write_bytes, read_volume, write_volume
from femur_core.models import build_model, default_config
from femur_core.volume import Volume

from reliability_utils import (LIP_AFFINE, QUICK_TRAIN, assert_one_line_error, leftovers, run_cli,
                               tiny_subject_arrays, write_cohort, write_dicom_series, write_nifti,
                               write_tiny_model)

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- bad files
def _good_image(path):
    return write_nifti(path, tiny_subject_arrays(1)[0])


def _bad_2d(p):
    write_nifti(p, np.zeros((20, 24), np.int16) + np.arange(24, dtype=np.int16))
    return ["expected a 3D volume, got 2D"]


def _bad_4d(p):
    write_nifti(p, np.random.default_rng(0).normal(size=(20, 24, 6, 2)).astype(np.float32))
    return ["expected a 3D volume, got 4D"]


def _bad_empty(p):
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"")
    return ["empty file (0 bytes)"]


def _bad_truncated(p):
    _good_image(p)
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2])
    return ["unreadable or truncated NIfTI"]


def _bad_nan(p):
    img = tiny_subject_arrays(1)[0].astype(np.float32)
    img[3, 4, 2] = np.nan
    write_nifti(p, img)
    return ["1 voxels are NaN or Inf"]


def _bad_inf(p):
    img = tiny_subject_arrays(1)[0].astype(np.float32)
    img[3, 4, 2] = np.inf
    img[5, 4, 2] = -np.inf
    write_nifti(p, img)
    return ["2 voxels are NaN or Inf"]


def _bad_constant(p):
    write_nifti(p, np.full((20, 24, 6), 7, np.int16))
    return ["constant image (every voxel is 7)"]


#: image files a model cannot use: builder(path) -> phrases of the expected message
BAD_IMAGES = {"2d": _bad_2d, "4d": _bad_4d, "empty": _bad_empty, "truncated": _bad_truncated,
              "nan": _bad_nan, "inf": _bad_inf, "constant": _bad_constant}
#: ... of which the napari reader refuses these (NaN / Inf / constant images can still be viewed;
#: segmenting them is refused by the same check as the CLI: test_segment_refuses_what_the_cli_refuses)
UNREADABLE = ("2d", "4d", "empty", "truncated")


def _mask_non_binary(folder):
    m = tiny_subject_arrays(2)[1]
    m[1, 1, 1] = 2
    m[2, 1, 1] = 5
    return write_nifti(folder / "sub02_femur.nii.gz", m), ["mask is not binary: values 0, 1, 2, 5"]


def _mask_float_fraction(folder):
    m = tiny_subject_arrays(2)[1].astype(np.float32) * 0.5
    return write_nifti(folder / "sub02_femur.nii.gz", m), ["mask is not binary: values 0, 0.5"]


def _mask_shape(folder):
    m = np.zeros((20, 24, 5), np.uint8)
    return write_nifti(folder / "sub02_femur.nii.gz", m), ["mask shape (20, 24, 5) differs from image",
                                                          "sub02_image.nii.gz"]


def _mask_affine(folder):
    aff = LIP_AFFINE.copy()
    aff[0, 3] += 3.0
    return (write_nifti(folder / "sub02_femur.nii.gz", tiny_subject_arrays(2)[1], aff),
            ["mask affine differs from image", "sub02_image.nii.gz"])


def _mask_missing(folder):
    (folder / "sub02_femur.nii.gz").unlink()
    return folder / "sub02_image.nii.gz", ["subject sub02 has no mask (sub02_femur.nii.gz missing)"]


def _mask_4d(folder):
    m = np.zeros((20, 24, 6, 3), np.uint8)
    return write_nifti(folder / "sub02_femur.nii.gz", m), ["expected a 3D volume, got 4D"]


#: data-folder problems with the masks: builder(folder) -> (file named, phrases)
BAD_MASKS = {"non_binary": _mask_non_binary, "fractional": _mask_float_fraction, "shape": _mask_shape,
             "affine": _mask_affine, "missing": _mask_missing, "4d": _mask_4d}


# ----------------------------------------------------------------------------- running the CLIs in-process
def _cli(module: str, argv, capfd) -> subprocess.CompletedProcess:
    """Run a CLI's real entry point (``run_main(main, argv)``) and capture its exit code and output."""
    import importlib

    main = importlib.import_module(f"femur_core.{module}").main
    capfd.readouterr()
    with pytest.raises(SystemExit) as e:
        run_main(main, [str(a) for a in argv])
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(argv, e.value.code, out, err)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("model") / "model.pt")


def _no_results(out: Path) -> None:
    """Nothing half-written: no prob / mask maps, no model, no report, no temporary files."""
    if not out.exists():
        return
    made = [p.name for p in out.rglob("*") if p.is_file() and ".status" not in p.parts]
    assert not made, made
    assert not leftovers(out)


# ----------------------------------------------------------------------------- predict
@pytest.mark.parametrize("case", list(BAD_IMAGES))
def test_predict_bad_image(case, tmp_path, model_file, capfd):
    img = tmp_path / "in" / "scan01.nii.gz"
    phrases = BAD_IMAGES[case](img)
    out = tmp_path / "out"
    proc = _cli("predict", [model_file, img, "--out", out, "--device", "cpu"], capfd)
    assert_one_line_error(proc, str(img), *phrases, code=2)
    _no_results(out)


def test_predict_dicom_two_series_and_missing_slices(tmp_path, model_file, capfd):
    two = tmp_path / "two"
    a = write_dicom_series(two, prefix="a", description="cor T1")
    b = write_dicom_series(two, prefix="b", description="cor STIR")
    proc = _cli("predict", [model_file, two, "--out", tmp_path / "o1", "--device", "cpu"], capfd)
    assert_one_line_error(proc, str(two), "holds 2 DICOM series", a["series_uid"], b["series_uid"],
                          "cor T1", "cor STIR", code=2)
    _no_results(tmp_path / "o1")
    gap = tmp_path / "gap"
    write_dicom_series(gap, n=6, skip=(3,))
    proc = _cli("predict", [model_file, gap, "--out", tmp_path / "o2", "--device", "cpu"], capfd)
    assert_one_line_error(proc, str(gap), "1 slice(s) appear to be missing", code=2)
    _no_results(tmp_path / "o2")


def test_predict_missing_and_unknown_inputs(tmp_path, model_file, capfd):
    proc = _cli("predict", [model_file, tmp_path / "nope.nii.gz", "--out", tmp_path / "o"], capfd)
    assert_one_line_error(proc, "nope.nii.gz: no such file or folder")
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    proc = _cli("predict", [model_file, txt, "--out", tmp_path / "o"], capfd)
    assert_one_line_error(proc, "notes.txt: unknown file type")
    empty_dir = tmp_path / "emptydir"
    empty_dir.mkdir()
    proc = _cli("predict", [model_file, empty_dir, "--out", tmp_path / "o"], capfd)
    assert_one_line_error(proc, "emptydir: no DICOM image files found")
    _no_results(tmp_path / "o")


def test_predict_bad_model_files(tmp_path, capfd):
    img = _good_image(tmp_path / "scan.nii.gz")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    proc = _cli("predict", [junk, img, "--out", tmp_path / "o"], capfd)
    assert_one_line_error(proc, "junk.pt: unreadable model file", code=2)
    wrong = tmp_path / "wrong.pt"  # weights of an F=8 net under a configuration that says F=4
    from femur_core.training import TrainConfig

    cfg = TrainConfig(model=default_config("2d-same", features=4, levels=2))
    save_checkpoint(wrong, build_model(default_config("2d-same", features=8, levels=2)), cfg.to_dict())
    proc = _cli("predict", [wrong, img, "--out", tmp_path / "o"], capfd)
    assert_one_line_error(proc, "wrong.pt: weights do not match the architecture", code=2)
    proc = _cli("predict", [tmp_path, img, "--out", tmp_path / "o"], capfd)  # a folder without a model
    assert_one_line_error(proc, "no model in this folder", code=2)
    _no_results(tmp_path / "o")


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {_Evil.marker}",))


def test_predict_refuses_a_malicious_checkpoint_in_one_line(tmp_path):
    """A real process: the pickle's payload (touch a marker file) must not run."""
    marker = tmp_path / "pwned"
    _Evil.marker = marker
    evil = tmp_path / "evil.pt"
    torch.save({"format": "napari-femur/1", "config_json": "{}", "state_dict": {}, "x": _Evil()}, evil)
    img = _good_image(tmp_path / "scan.nii.gz")
    proc = run_cli("predict", [evil, img, "--out", tmp_path / "o"])
    assert_one_line_error(proc, "evil.pt: refused", "pickled Python code", code=2)
    assert not marker.exists()
    _no_results(tmp_path / "o")


def test_predict_keeps_existing_outputs_unless_overwrite(tmp_path, model_file, capfd):
    img = _good_image(tmp_path / "scan01.nii.gz")
    out = tmp_path / "out"
    proc = _cli("predict", [model_file, img, "--out", out, "--device", "cpu", "--no-tta"], capfd)
    assert proc.returncode == 0, proc.stderr
    prob, mask = out / "scan01_prob.nii.gz", out / "scan01_mask.nii.gz"
    assert prob.exists() and mask.exists()
    for p in (prob, mask):  # written with the usual permissions (not mkstemp's 0600)
        assert p.stat().st_mode & 0o644 == 0o644
    sentinel = b"kept"
    mask.write_bytes(sentinel)
    proc = _cli("predict", [model_file, img, "--out", out, "--device", "cpu", "--no-tta"], capfd)
    assert proc.returncode == 0 and "exists, kept (use --overwrite to replace)" in proc.stderr
    assert mask.read_bytes() == sentinel
    proc = _cli("predict", [model_file, img, "--out", out, "--device", "cpu", "--no-tta", "--overwrite"], capfd)
    assert proc.returncode == 0, proc.stderr
    assert read_volume(mask).shape == read_volume(img).shape
    assert not leftovers(out)


# ----------------------------------------------------------------------------- train / cv data folders
def _cohort(tmp_path, n=4) -> Path:
    return write_cohort(tmp_path / "data", n)


TRAIN_ARGS = {"train": lambda data, out: ["--data", data, "--out", out, *QUICK_TRAIN],
              "cv": lambda data, out: ["--data", data, "--out", out, "--folds", "2", *QUICK_TRAIN]}


@pytest.mark.parametrize("cli", ["train", "cv"])
@pytest.mark.parametrize("case", ["2d", "4d", "empty", "truncated", "nan", "inf", "constant"])
def test_training_cli_bad_image(cli, case, tmp_path, capfd):
    data = _cohort(tmp_path)
    bad = data / "sub03_image.nii.gz"
    phrases = BAD_IMAGES[case](bad)
    out = tmp_path / "run"
    proc = _cli(cli, TRAIN_ARGS[cli](data, out), capfd)
    assert_one_line_error(proc, str(bad), *phrases, code=2)
    _no_results(out)


@pytest.mark.parametrize("cli", ["train", "cv"])
@pytest.mark.parametrize("case", list(BAD_MASKS))
def test_training_cli_bad_mask(cli, case, tmp_path, capfd):
    data = _cohort(tmp_path)
    named, phrases = BAD_MASKS[case](data)
    out = tmp_path / "run"
    proc = _cli(cli, TRAIN_ARGS[cli](data, out), capfd)
    assert_one_line_error(proc, str(named), *phrases, code=2)
    _no_results(out)


@pytest.mark.parametrize("cli", ["train", "cv"])
def test_training_cli_bad_folders(cli, tmp_path, capfd):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no scans here")
    proc = _cli(cli, TRAIN_ARGS[cli](empty, tmp_path / "run"), capfd)
    assert_one_line_error(proc, str(empty), "no subjects found", code=2)
    proc = _cli(cli, TRAIN_ARGS[cli](tmp_path / "missing", tmp_path / "run"), capfd)
    assert_one_line_error(proc, "missing: not a folder", code=2)
    one = write_cohort(tmp_path / "one", 1)
    proc = _cli(cli, TRAIN_ARGS[cli](one, tmp_path / "run"), capfd)
    assert_one_line_error(proc, str(one), "too few" if cli == "cv" else "at least 2 subjects", code=2)
    _no_results(tmp_path / "run")


def test_cv_too_few_subjects_for_the_folds(tmp_path, capfd):
    data = _cohort(tmp_path, 3)
    proc = _cli("cv", ["--data", data, "--out", tmp_path / "run", "--folds", "4", *QUICK_TRAIN], capfd)
    assert_one_line_error(proc, str(data), "3 subject(s) are too few for 4-fold cross-validation", code=2)
    proc = _cli("cv", ["--data", data, "--out", tmp_path / "run", "--folds", "1", *QUICK_TRAIN], capfd)
    assert_one_line_error(proc, "--folds must be at least 2", code=2)
    _no_results(tmp_path / "run")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
@pytest.mark.parametrize("device,phrase", [("cuda", "CUDA is not available"), ("tpu9", "unknown device")])
def test_training_cli_unavailable_device(device, phrase, tmp_path, capfd):
    data = _cohort(tmp_path, 3)
    args = ["--data", data, "--out", tmp_path / "m", *QUICK_TRAIN, "--device", device]
    proc = _cli("train", args, capfd)
    assert_one_line_error(proc, phrase, code=2)


# ----------------------------------------------------------------------------- no overwrite, no mixed runs
def test_train_refuses_to_replace_a_model_without_overwrite(tmp_path, capfd):
    data = _cohort(tmp_path, 3)
    out = tmp_path / "m"
    out.mkdir()
    (out / "model.pt").write_bytes(b"precious")
    proc = _cli("train", ["--data", data, "--out", out, *QUICK_TRAIN], capfd)
    assert_one_line_error(proc, str(out / "model.pt"), "exists; pass overwrite=True (--overwrite)", code=2)
    assert (out / "model.pt").read_bytes() == b"precious"


def test_train_does_not_resume_a_run_with_other_settings(tmp_path, capfd):
    """An interrupted run's last.pt with other settings is refused, not mixed into (and left as it was)."""
    from femur_core.training import TrainConfig

    data = _cohort(tmp_path, 3)
    work = tmp_path / "m" / "training"
    other = TrainConfig(model=default_config("2d-same", features=8, levels=3))
    save_checkpoint(work / "last.pt", build_model(other.model), other.to_dict(), epoch=1, step=0)
    before = (work / "last.pt").read_bytes()
    proc = _cli("train", ["--data", data, "--out", tmp_path / "m", *QUICK_TRAIN], capfd)
    assert_one_line_error(proc, str(work / "last.pt"), "an earlier run with different settings is in this folder",
                          code=2)
    assert (work / "last.pt").read_bytes() == before and not (tmp_path / "m" / "model.pt").exists()


def test_cv_run_folders_never_mix_two_runs(tmp_path, capfd):
    from femur_core.cli import config_from_args
    from femur_core.cv import build_parser, setup_run
    from femur_core.data import find_subjects, load_subjects

    data = _cohort(tmp_path, 4)
    run = tmp_path / "run"
    args = build_parser().parse_args(["--data", str(data), "--out", str(run), "--folds", "2", *QUICK_TRAIN])
    subjects = load_subjects(find_subjects(data))
    setup_run(run, subjects, config_from_args(args, "cpu-2d"), 2, 0, "honest", str(data.resolve()))
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    # other settings (F=8) into the same folder
    other = ["--data", data, "--out", run, "--folds", "2", *QUICK_TRAIN, "--features", "8"]
    proc = _cli("cv", other, capfd)
    assert_one_line_error(proc, str(run / "config.json"), "holds another run (settings differ)",
                          "run folders never mix two runs", code=2)
    # other subjects (hence other folds) into the same folder
    data6 = write_cohort(tmp_path / "data6", 6)
    proc = _cli("cv", ["--data", data6, "--out", run, "--folds", "2", *QUICK_TRAIN], capfd)
    assert_one_line_error(proc, str(run / "splits.json"), "holds another run (splits differ)", code=2)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # untouched


# ----------------------------------------------------------------------------- out of disk
class _FullDisk:
    """Simulate a disk that fills up: writes to the temporary files of chosen targets fail with ENOSPC
    after half the bytes reached the disk (so a non-atomic writer would leave a half-written file)."""

    def __init__(self, monkeypatch, match=lambda name: True):
        self.match, self.failed = match, []
        real_mkstemp, real_fdopen = tempfile.mkstemp, os.fdopen
        self._names: dict[int, str] = {}

        def mkstemp(*a, **k):
            fd, name = real_mkstemp(*a, **k)
            self._names[fd] = name
            return fd, name

        def fdopen(fd, *a, **k):
            fh = real_fdopen(fd, *a, **k)
            name = self._names.pop(fd, None)
            if name is None or not self.match(Path(name).name):
                return fh
            outer = self

            class Full:
                def write(self, b):
                    fh.write(b[: len(b) // 2])
                    fh.flush()
                    outer.failed.append(name)
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

                def __getattr__(self, attr):
                    return getattr(fh, attr)

                def __enter__(self):
                    return self

                def __exit__(self, *exc):
                    fh.close()

            return Full()

        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
        monkeypatch.setattr(os, "fdopen", fdopen)


#: the same simulation, for a CLI run in a fresh interpreter
FULL_DISK_PREAMBLE = """
import errno, os, tempfile
_real_mkstemp, _real_fdopen, _names = tempfile.mkstemp, os.fdopen, {}
def _mkstemp(*a, **k):
    fd, name = _real_mkstemp(*a, **k)
    _names[fd] = name
    return fd, name
class _Full:
    def __init__(self, fh): self.fh = fh
    def write(self, b):
        self.fh.write(b[: len(b) // 2]); self.fh.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    def __getattr__(self, a): return getattr(self.fh, a)
    def __enter__(self): return self
    def __exit__(self, *e): self.fh.close()
def _fdopen(fd, *a, **k):
    fh = _real_fdopen(fd, *a, **k)
    return _Full(fh) if _names.pop(fd, None) else fh
tempfile.mkstemp, os.fdopen = _mkstemp, _fdopen
"""


def test_atomic_write_on_a_full_disk_leaves_nothing(tmp_path, monkeypatch):
    full = _FullDisk(monkeypatch)
    target = tmp_path / "sub" / "report.json"
    with pytest.raises(OSError) as e:
        atomic_write_bytes(target, b"x" * 1000)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(target)
    assert full.failed and not Path(full.failed[0]).exists()  # the temporary file is removed
    assert not target.exists() and not leftovers(tmp_path)
    # replacing an existing file: the old content survives a failed write
    monkeypatch.undo()
    atomic_write_bytes(target, b"old")
    _FullDisk(monkeypatch)
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"new" * 1000, overwrite=True)
    assert target.read_bytes() == b"old" and not leftovers(tmp_path)


def test_write_volume_and_checkpoint_on_a_full_disk(tmp_path, monkeypatch):
    vol = Volume(np.ones((3, 4, 5), np.float32), LIP_AFFINE)
    last = tmp_path / "last.pt"
    net = build_model(default_config("2d-same", features=4, levels=2))
    save_checkpoint(last, net, {"a": 1}, epoch=1)
    _FullDisk(monkeypatch)
    with pytest.raises(InputError, match=r"x\.nii\.gz: cannot write \(No space left on device\)"):
        write_volume(vol, tmp_path / "x.nii.gz")
    with pytest.raises(OSError) as e:
        save_checkpoint(last, net, {"a": 1}, epoch=2)
    assert e.value.filename == str(last)
    monkeypatch.undo()
    assert int(load_checkpoint(last)["epoch"]) == 1  # the previous checkpoint is intact
    assert not (tmp_path / "x.nii.gz").exists() and not leftovers(tmp_path)


def test_predict_full_disk_leaves_no_half_result(tmp_path, model_file, monkeypatch, capfd):
    """The mask write fails after the prob map was written: the prob map is removed too."""
    img = _good_image(tmp_path / "scan01.nii.gz")
    out = tmp_path / "out"
    # the prob map is written, then the disk is full for the mask and for the status file
    full = _FullDisk(monkeypatch, match=lambda name: name.startswith((".scan01_mask", ".scan01.json")))
    proc = _cli("predict", [model_file, img, "--out", out, "--device", "cpu", "--no-tta"], capfd)
    assert len(full.failed) == 2
    assert_one_line_error(proc, str(out / "scan01_mask.nii.gz"), "cannot write (No space left on device)", code=2)
    assert not (out / "scan01_prob.nii.gz").exists() and not (out / "scan01_mask.nii.gz").exists()
    assert not leftovers(out)


# ----------------------------------------------------------------------------- permissions
def _deny(monkeypatch, *denied: Path):
    """``os.access`` says no for these paths: the check femur_core makes before reading (works as root)."""
    real = os.access
    denied_s = {str(p) for p in denied}
    monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if str(p) in denied_s else real(p, mode, *a, **k))


def test_unreadable_image_and_folder(tmp_path, model_file, monkeypatch, capfd):
    img = _good_image(tmp_path / "scan01.nii.gz")
    data = _cohort(tmp_path)
    _deny(monkeypatch, img, data, data / "sub02_femur.nii.gz")
    proc = _cli("predict", [model_file, img, "--out", tmp_path / "o", "--device", "cpu"], capfd)
    assert_one_line_error(proc, str(img), "permission denied (not readable)", code=2)
    proc = _cli("train", TRAIN_ARGS["train"](data, tmp_path / "m"), capfd)
    assert_one_line_error(proc, str(data), "permission denied (folder not readable)", code=2)
    monkeypatch.undo()
    _deny(monkeypatch, data / "sub02_femur.nii.gz")
    proc = _cli("cv", TRAIN_ARGS["cv"](data, tmp_path / "run"), capfd)
    assert_one_line_error(proc, "sub02_femur.nii.gz: permission denied (not readable)", code=2)
    for d in ("o", "m", "run"):
        _no_results(tmp_path / d)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root reads files whatever their mode; test_unreadable_image_and_folder covers it")
def test_unreadable_for_real_with_chmod(tmp_path, model_file, capfd):  # pragma: no cover - non-root only
    img = _good_image(tmp_path / "scan01.nii.gz")
    img.chmod(0)
    try:
        proc = _cli("predict", [model_file, img, "--out", tmp_path / "o", "--device", "cpu"], capfd)
        assert_one_line_error(proc, str(img), "permission denied", code=2)
    finally:
        img.chmod(0o644)


def test_unwritable_output_folder(tmp_path, model_file, monkeypatch, capfd):
    img = _good_image(tmp_path / "scan01.nii.gz")
    out = tmp_path / "out"

    def no_write(*a, **k):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), k.get("dir"))

    monkeypatch.setattr(tempfile, "mkstemp", no_write)
    proc = _cli("predict", [model_file, img, "--out", out, "--device", "cpu", "--no-tta"], capfd)
    assert_one_line_error(proc, str(out / "scan01_prob.nii.gz"), "cannot write (Permission denied)", code=2)
    assert not list(out.rglob("*.nii.gz"))


# ----------------------------------------------------------------------------- real processes
def test_cli_in_a_real_process(tmp_path, model_file):
    """Representative cases through ``python -m`` in a fresh interpreter: one line, exit 2, no traceback."""
    trunc = tmp_path / "scan01.nii.gz"
    _bad_truncated(trunc)
    proc = run_cli("predict", [model_file, trunc, "--out", tmp_path / "o", "--device", "cpu"])
    assert_one_line_error(proc, str(trunc), "unreadable or truncated NIfTI", code=2)
    _no_results(tmp_path / "o")

    data = _cohort(tmp_path)
    _mask_non_binary(data)
    proc = run_cli("train", TRAIN_ARGS["train"](data, tmp_path / "m"))
    assert_one_line_error(proc, str(data / "sub02_femur.nii.gz"), "mask is not binary", code=2)
    _no_results(tmp_path / "m")

    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_cli("cv", TRAIN_ARGS["cv"](empty, tmp_path / "run"))
    assert_one_line_error(proc, str(empty), "no subjects found", code=2)
    _no_results(tmp_path / "run")


def test_cli_full_disk_in_a_real_process(tmp_path):
    """Training on a full disk: the first file it writes fails; one line names it; nothing half-written."""
    data = _cohort(tmp_path, 3)
    out = tmp_path / "m"
    proc = run_cli("train", TRAIN_ARGS["train"](data, out), preamble=FULL_DISK_PREAMBLE)
    line = assert_one_line_error(proc, "No space left on device", code=2)
    assert str(out / "training") in line and line.split(": ")[1].endswith(".pt")
    assert not leftovers(out)
    assert not [p for p in out.rglob("*") if p.is_file()]


# ----------------------------------------------------------------------------- DICOM geometry
@pytest.mark.parametrize("iop,step", [((1, 0, 0, 0, 0, -1), 4.0),     # coronal, as the study's scans
                                      ((1, 0, 0, 0, 0, -1), -4.0),    # coronal, files in reverse order
                                      ((1, 0, 0, 0, 1, 0), 2.5),      # axial
                                      ((0, 1, 0, 0, 0, -1), 3.0)])    # sagittal
def test_dicom_series_affine_maps_every_voxel_to_its_patient_position(tmp_path, iop, step):
    geo = write_dicom_series(tmp_path / "s", n=5, rows=6, cols=5, iop=iop, step=step,
                             pixel_spacing=(0.8, 0.7), first=(12.5, -30.0, 41.0))
    vol = read_volume(tmp_path / "s")
    assert vol.shape == (5, 6, 5) and vol.meta["format"] == "dicom"
    row, col = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    for k, px in geo["pixels"].items():
        ipp = geo["first"] + k * step * geo["normal"]
        i = [j for j in range(vol.shape[0]) if np.array_equal(vol.data[j], px.astype(np.float32))]
        assert len(i) == 1  # every written slice is in the volume exactly once
        for r, c in ((0, 0), (5, 4), (2, 3)):
            lps = ipp + c * 0.7 * row + r * 0.8 * col  # DICOM: column index along the row direction
            np.testing.assert_allclose(vol.affine @ [i[0], r, c, 1], [*(lps_to_ras @ lps), 1], atol=1e-6)
    np.testing.assert_allclose(sorted(vol.spacing), sorted([abs(step), 0.8, 0.7]), atol=1e-6)


def test_dicom_two_series_missing_slices_and_single_slice(tmp_path):
    a = write_dicom_series(tmp_path / "two", prefix="a")
    b = write_dicom_series(tmp_path / "two", prefix="b")
    with pytest.raises(InputError, match="holds 2 DICOM series") as e:
        read_volume(tmp_path / "two")
    assert a["series_uid"] in str(e.value) and b["series_uid"] in str(e.value)
    assert "4 files" in str(e.value)
    write_dicom_series(tmp_path / "gap", n=7, skip=(2, 3))
    with pytest.raises(InputError, match=r"gap: uneven slice spacing: 2 slice\(s\) appear to be missing"):
        read_volume(tmp_path / "gap")
    write_dicom_series(tmp_path / "one", n=1)
    with pytest.raises(InputError, match="at least 2 slices"):
        read_volume(tmp_path / "one")
    # a .dcm file given directly reads its folder's series
    write_dicom_series(tmp_path / "good", n=3)
    assert read_volume(tmp_path / "good" / "im001.dcm").shape == (3, 6, 5)


# ----------------------------------------------------------------------------- napari reader
@pytest.mark.parametrize("case", UNREADABLE)
def test_reader_refuses_bad_files_naming_them(case, tmp_path):
    """napari shows a reader's exception as an error notification: the message must name file and problem."""
    from napari_femur._reader import get_reader

    p = tmp_path / "scan01.nii.gz"
    phrases = BAD_IMAGES[case](p)
    reader = get_reader(str(p))
    assert reader is not None
    with pytest.raises(ValueError) as e:
        reader(str(p))
    assert str(p) in str(e.value) and all(ph in str(e.value) for ph in phrases)


def test_reader_refuses_bad_dicom_folders(tmp_path):
    from napari_femur._reader import get_reader

    write_dicom_series(tmp_path / "gap", n=6, skip=(4,))
    # several series open one layer each (tests/test_plugin_formats.py); refused only when none can
    write_dicom_series(tmp_path / "twobad", n=6, skip=(4,), prefix="a", description="cor T1")
    write_dicom_series(tmp_path / "twobad", n=1, prefix="b", description="localizer")
    for folder, phrase in (("gap", "appear to be missing"),
                           ("twobad", r"none of its 2 DICOM series forms a 3D volume.*cor T1.*missing.*localizer")):
        reader = get_reader(str(tmp_path / folder))
        assert reader is not None
        with pytest.raises(ValueError, match=phrase) as e:
            reader(str(tmp_path / folder))
        assert str(tmp_path / folder) in str(e.value)


@pytest.mark.parametrize("case", ["nan", "inf", "constant"])
def test_reader_opens_odd_images_but_segmenting_them_is_refused(case, tmp_path, model_file):
    """NaN / Inf / constant images can be looked at; segmenting them fails with the CLI's message."""
    from napari_femur._reader import get_reader

    from femur_core.inference import load_model, predict_volume

    p = tmp_path / "scan01.nii.gz"
    phrases = BAD_IMAGES[case](p)
    [(data, kwargs, kind)] = get_reader(str(p))(str(p))
    assert kind == "image" and data.shape == (6, 24, 20)
    with pytest.raises(InputError) as e:
        predict_volume(load_model(model_file), read_volume(p), device="cpu")
    assert str(p) in str(e.value) and all(ph in str(e.value) for ph in phrases)
