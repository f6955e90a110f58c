"""Run long work in a separate process, with its progress events and cancellation relayed.

Training keeps the CPU cores busy and holds Python's global interpreter lock
between kernels, so an application that runs it in a thread (a napari viewer)
cannot answer its own events in time. :func:`run_in_process` calls the same
femur_core function in a child process started with :mod:`multiprocessing`'s
*spawn* method (a fresh interpreter: safe with CUDA and with a GUI toolkit in
the parent) and behaves like calling it directly:

- the child's progress events arrive, in order, at the caller's ``progress``
  callback (in the calling thread);
- setting the caller's :class:`~femur_core.progress.CancelToken` sets the
  child's, so the work stops at its next check (for training: a resumable
  ``last.pt`` is saved) and :class:`~femur_core.errors.Cancelled` is raised;
- the function's return value is returned, its exception re-raised (with the
  child's traceback as a note); a child that dies without an answer is a
  :class:`WorkerProcessError` naming its exit code;
- a child whose parent has died cancels its work at the next check.

The function must be importable by name (a module-level function) and its
arguments and result picklable: they travel between the processes.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from .errors import FemurError
from .progress import CancelToken, ProgressCallback, emit

__all__ = ["run_in_process", "WorkerProcessError"]

_EVENT, _RESULT, _ERROR = "event", "result", "error"


class WorkerProcessError(FemurError):
    """The child process ended without a result, or its result / exception could not be sent back."""


class _SharedFlag:
    """A flag in shared memory with an Event's ``set`` / ``is_set``, and no lock.

    (A :class:`multiprocessing.Event` is a condition with locks: a child that
    dies while waiting on it leaves the parent's ``set()`` blocked for ever.)
    """

    def __init__(self, ctx: Any) -> None:
        self._value = ctx.RawValue("b", 0)

    def set(self) -> None:
        self._value.value = 1

    def is_set(self) -> bool:
        return bool(self._value.value)


class _FlagToken(CancelToken):
    """A cancel token over a :class:`_SharedFlag` (the parent sets it, the child checks it)."""

    def __init__(self, flag: _SharedFlag) -> None:  # no super().__init__: the flag is the state
        self._event = flag


def _watch_parent(parent_pid: int, stop: _SharedFlag) -> None:
    """Set ``stop`` when the parent process goes away (the child is re-parented)."""
    def watch() -> None:
        while not stop.is_set():
            if os.getppid() != parent_pid:
                stop.set()
                return
            time.sleep(1.0)

    threading.Thread(target=watch, name="femur-parent-watch", daemon=True).start()


def _sendable_error(exc: BaseException) -> BaseException:
    """``exc`` with the child's traceback, or a WorkerProcessError when it does not survive pickling."""
    tb = "".join(traceback.format_exception(exc))
    try:
        back = pickle.loads(pickle.dumps(exc))
    except Exception:
        back = WorkerProcessError(f"{type(exc).__name__}: {exc}")
    back.remote_traceback = tb
    return back


def _child(fn: Callable[..., Any], args: tuple, kwargs: dict, out: Any, stop: _SharedFlag,
           parent_pid: int, niceness: int = 0) -> None:
    """The child's main: call ``fn`` and send its events, then its result or exception.

    ``out`` is the writing end of a pipe: each message is written before ``send``
    returns (nothing is buffered in the child, so an event sent before a crash
    still arrives).
    """
    _watch_parent(parent_pid, stop)
    if niceness > 0 and hasattr(os, "nice"):  # give way to the process that waits for us (a viewer)
        os.nice(niceness)
    lock = threading.Lock()

    def send(message: tuple) -> None:
        with lock:
            out.send(message)

    try:
        value = fn(*args, progress=lambda ev: send((_EVENT, ev)), cancel=_FlagToken(stop), **kwargs)
        try:
            pickle.dumps(value)
            message = (_RESULT, value)
        except Exception as exc:
            message = (_ERROR, _sendable_error(WorkerProcessError(
                f"the result of {getattr(fn, '__name__', fn)!r} cannot be sent back: {exc}")))
    except BaseException as exc:  # everything goes back to the parent
        message = (_ERROR, _sendable_error(exc))
    send(message)
    out.close()


def _receive(reader: Any, timeout_s: float) -> tuple | None:
    """The next message, None when there is none yet; EOFError when the child's end is closed."""
    if not reader.poll(timeout_s):
        return None
    return reader.recv()


def _drain_until_exit(proc: Any, reader: Any, timeout_s: float) -> None:
    """Read (and drop) what a stopping child still sends, so that it is never blocked on a full pipe."""
    deadline = time.monotonic() + timeout_s
    while proc.is_alive() and time.monotonic() < deadline:
        try:
            _receive(reader, 0.1)
        except (EOFError, OSError):
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
            return


def run_in_process(
    fn: Callable[..., Any],
    *args: Any,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    poll_s: float = 0.1,
    stop_timeout_s: float = 120.0,
    niceness: int = 0,
    **kwargs: Any,
) -> Any:
    """Call ``fn(*args, progress=..., cancel=..., **kwargs)`` in a spawned child process.

    Parameters
    ----------
    fn : callable
        A module-level function taking ``progress`` and ``cancel`` keywords
        (e.g. :func:`femur_core.cv.run_fold`).
    *args, **kwargs
        Its arguments (picklable).
    progress : callable, optional
        Receives each :class:`~femur_core.progress.ProgressEvent` of the child,
        in order, in the calling thread.
    cancel : CancelToken, optional
        Setting it cancels the child's work at its next check.
    poll_s : float
        How often the cancel token and the child's liveness are checked.
    stop_timeout_s : float
        After a cancel (or an error in ``progress``), how long the child may take
        to stop cleanly before it is terminated.
    niceness : int
        Lower the child's scheduling priority by this much (POSIX ``nice``), so
        that a viewer waiting on it keeps the CPU when it needs it; 0 keeps it.

    Returns
    -------
    Any
        What ``fn`` returned.

    Raises
    ------
    Exception
        The exception ``fn`` raised (e.g. :class:`~femur_core.errors.Cancelled`),
        with ``remote_traceback`` (the child's traceback, text) as an attribute.
    WorkerProcessError
        The child died without an answer (its exit code is in the message).
    """
    ctx = multiprocessing.get_context("spawn")
    reader, writer = ctx.Pipe(duplex=False)
    stop = _SharedFlag(ctx)
    name = f"femur-{getattr(fn, '__name__', 'work')}"
    proc = ctx.Process(target=_child, args=(fn, args, kwargs, writer, stop, os.getpid(), niceness), name=name, daemon=True)
    proc.start()
    writer.close()  # the child holds the only writing end: its exit is an end of file here
    finished = False
    try:
        while True:
            if cancel is not None and cancel.cancelled and not stop.is_set():
                stop.set()
            try:
                message = _receive(reader, poll_s)
            except (EOFError, OSError):
                proc.join(timeout=10.0)
                raise WorkerProcessError(
                    f"the {name} process ended (exit code {proc.exitcode}) without a result") from None
            if message is None:
                continue
            kind, payload = message
            if kind == _EVENT:
                emit(progress, payload)
            elif kind == _RESULT:
                finished = True
                return payload
            else:
                finished = True
                raise payload
    finally:
        if not finished:
            stop.set()  # e.g. the progress callback failed: stop the work cleanly
            _drain_until_exit(proc, reader, stop_timeout_s)
        proc.join(timeout=30.0)
        if proc.is_alive():  # pragma: no cover - a child that ignores its cancel token
            proc.terminate()
            proc.join(timeout=10.0)
        reader.close()
