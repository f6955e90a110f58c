"""femur_core.worker_process: work in a child process behaves like the direct call (events, result, errors,
cancel), and the Train panel's job module that runs there loads no GUI module."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from femur_core.errors import Cancelled, InputError
from femur_core.progress import CancelToken, ProgressEvent
from femur_core.worker_process import WorkerProcessError, run_in_process


# --- functions the child runs (module level: the child imports them by name)
def count_to(n, *, progress=None, cancel=None):
    for i in range(1, n + 1):
        progress(ProgressEvent("train", i, n, message=str(os.getpid())))
    return {"n": n, "pid": os.getpid()}


def refuse(path, *, progress=None, cancel=None):
    progress(ProgressEvent("load", message="reading"))
    raise InputError(path, "not a scan")


def until_cancelled(*, progress=None, cancel=None):
    step = 0
    while True:
        step += 1
        progress(ProgressEvent("train", step))
        cancel.raise_if_cancelled()
        time.sleep(0.05)


def own_niceness(*, progress=None, cancel=None):
    return os.nice(0)


def die(code, *, progress=None, cancel=None):
    progress(ProgressEvent("info", message="about to die"))
    os._exit(code)


def test_events_in_order_and_the_result_from_another_process():
    events = []
    result = run_in_process(count_to, 25, progress=events.append)
    assert [e.step for e in events] == list(range(1, 26))
    assert all(e.stage == "train" and e.total == 25 for e in events)
    assert result["n"] == 25 and result["pid"] != os.getpid()
    assert {e.message for e in events} == {str(result["pid"])}


def test_the_childs_exception_is_raised_with_its_type_and_message():
    events = []
    with pytest.raises(InputError) as info:
        run_in_process(refuse, "/data/sub01.nii.gz", progress=events.append)
    assert info.value.path == "/data/sub01.nii.gz" and info.value.problem == "not a scan"
    assert str(info.value) == "/data/sub01.nii.gz: not a scan"
    assert "in refuse" in info.value.remote_traceback
    assert [e.stage for e in events] == ["load"]


def test_cancel_reaches_the_child():
    cancel = CancelToken()
    events = []

    def on_event(ev):
        events.append(ev)
        if ev.step == 3:
            cancel.cancel()

    with pytest.raises(Cancelled):
        run_in_process(until_cancelled, progress=on_event, cancel=cancel)
    assert len(events) >= 3 and [e.step for e in events] == list(range(1, len(events) + 1))


def test_a_child_that_dies_is_an_error_naming_its_exit_code():
    events = []
    with pytest.raises(WorkerProcessError, match="exit code 7"):
        run_in_process(die, 7, progress=events.append)
    assert [e.message for e in events] == ["about to die"]


def test_cancel_from_another_thread_while_the_caller_waits():
    cancel = CancelToken()
    timer = threading.Timer(0.5, cancel.cancel)
    timer.start()
    try:
        with pytest.raises(Cancelled):
            run_in_process(until_cancelled, cancel=cancel)
    finally:
        timer.cancel()


def test_train_job_module_loads_no_gui_module():
    """What the training process imports (napari_femur._train_job) loads neither napari nor Qt."""
    probe = ("import sys, json\nimport napari_femur._train_job\n"
             "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
             "('napari', 'qtpy', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6', 'magicgui', 'superqt', 'vispy'))))\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


@pytest.mark.skipif(not hasattr(os, "nice"), reason="POSIX nice only")
def test_the_child_runs_at_the_asked_lower_priority():
    mine = os.nice(0)
    assert run_in_process(own_niceness) == mine
    assert run_in_process(own_niceness, niceness=5) == min(mine + 5, 19)
