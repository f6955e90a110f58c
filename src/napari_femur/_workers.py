"""Adapting femur_core's progress callbacks to napari thread workers.

femur_core reports progress by calling ``progress(event)`` from inside long
work and stops when a :class:`~femur_core.progress.CancelToken` is set. A
napari :func:`~napari.qt.threading.thread_worker` wants a generator whose
yields reach the GUI thread through the ``yielded`` signal. :func:`iter_progress`
bridges the two: it runs the work in a helper thread and yields each event as
it arrives, then returns the work's result (``worker.returned``) or re-raises
its exception (``worker.errored``). :class:`LatestOnly` is a one-slot mailbox
for work where only the newest request matters (e.g. redrawing a plot while
progress events keep coming: requests made while one is being served collapse
into the newest). :func:`hold_long_lived_objects` keeps Python's full garbage
collections short while a long job reports to the viewer (see there).
"""

from __future__ import annotations

import gc
import queue
import threading
from collections.abc import Callable, Generator
from typing import Any

from femur_core.progress import CancelToken, ProgressEvent

__all__ = ["iter_progress", "LatestOnly", "hold_long_lived_objects", "release_long_lived_objects"]

_DONE = object()


def iter_progress(
    fn: Callable[..., Any],
    *args: Any,
    cancel: CancelToken | None = None,
    **kwargs: Any,
) -> Generator[ProgressEvent, None, Any]:
    """Run ``fn(*args, progress=callback, **kwargs)`` and yield its progress events.

    Parameters
    ----------
    fn : callable
        A femur_core function taking a ``progress`` callback (and usually a
        ``cancel`` token, passed through in ``kwargs``).
    *args, **kwargs
        Passed to ``fn``.
    cancel : CancelToken, optional
        Set when the generator is closed early (``worker.quit()``), so the
        work stops at its next check. Also passed to ``fn`` as ``cancel``.

    Yields
    ------
    ProgressEvent
        In the order ``fn`` reported them.

    Returns
    -------
    Any
        What ``fn`` returned (the generator's ``StopIteration.value``).
    """
    events: queue.Queue = queue.Queue()
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            if cancel is not None:
                kwargs["cancel"] = cancel
            outcome["value"] = fn(*args, progress=events.put, **kwargs)
        except BaseException as exc:  # re-raised in the worker thread below
            outcome["error"] = exc
        finally:
            events.put(_DONE)

    helper = threading.Thread(target=target, name=f"femur-{getattr(fn, '__name__', 'work')}", daemon=True)
    helper.start()
    try:
        while True:
            item = events.get()
            if item is _DONE:
                break
            yield item
    finally:
        if helper.is_alive() and cancel is not None:
            cancel.cancel()  # generator closed early: stop the work too
    helper.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


class LatestOnly:
    """A one-slot mailbox between threads: :meth:`put` replaces what is waiting.

    A consumer thread calls :meth:`take` and gets the newest item put since its
    last take; items put meanwhile and never taken are dropped (coalesced). Made
    for requests where only the latest state matters, such as a redraw of a plot
    whose data keeps growing.

    Attributes
    ----------
    dropped : int
        How many items were replaced before being taken.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._item: Any = _DONE  # _DONE: empty
        self._closed = False
        self.dropped = 0

    @property
    def pending(self) -> bool:
        """Whether an item waits to be taken."""
        with self._cond:
            return self._item is not _DONE

    @property
    def closed(self) -> bool:
        return self._closed

    def put(self, item: Any) -> bool:
        """Leave ``item`` for the consumer (replacing a waiting one); False once closed."""
        with self._cond:
            if self._closed:
                return False
            if self._item is not _DONE:
                self.dropped += 1
            self._item = item
            self._cond.notify()
            return True

    def take(self, timeout: float | None = None) -> Any:
        """Wait for the newest item and remove it.

        Raises
        ------
        EOFError
            The mailbox was closed (a waiting item is dropped).
        TimeoutError
            Nothing arrived within ``timeout`` seconds.
        """
        with self._cond:
            if not self._cond.wait_for(lambda: self._closed or self._item is not _DONE, timeout):
                raise TimeoutError("nothing to take")
            if self._closed:
                raise EOFError("mailbox closed")
            item, self._item = self._item, _DONE
            return item

    def close(self) -> None:
        """Wake the consumer with EOFError; later puts are refused."""
        with self._cond:
            self._closed = True
            self._item = _DONE
            self._cond.notify_all()


_gc_holders = [0, False]  # [holds, whether we froze]


def hold_long_lived_objects() -> None:
    """Leave the objects that exist now out of Python's full garbage collections, until released.

    A napari viewer holds about half a million objects that the cyclic garbage
    collector tracks (napari, Qt wrappers, torch); a full collection walks them
    all, about 0.3 s in which the GUI thread stands still, and the drawing and
    event handling of a long training make such collections come. With the
    existing objects frozen (:func:`gc.freeze`) a full collection only walks the
    objects made since. Calls nest; :func:`release_long_lived_objects` undoes the
    outermost one (:func:`gc.unfreeze`: cyclic garbage among the frozen objects
    is then collected as usual). Nothing is frozen when the application froze
    objects itself.
    """
    if _gc_holders[0] == 0 and gc.get_freeze_count() == 0:
        gc.freeze()
        _gc_holders[1] = True
    _gc_holders[0] += 1


def release_long_lived_objects() -> None:
    """Undo one :func:`hold_long_lived_objects` (the last one unfreezes what it froze)."""
    if _gc_holders[0] == 0:
        return
    _gc_holders[0] -= 1
    if _gc_holders[0] == 0 and _gc_holders[1]:
        gc.unfreeze()
        _gc_holders[1] = False
