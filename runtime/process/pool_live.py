"""What a pool process does *while* a task body runs in it (see :mod:`runtime.process.pool_child`).

- :class:`ProgressOut` sends the task's progress to the pool as it is
  reported: the task's thread only keeps the latest report, one writer thread
  sends it (so a tight loop of ``progress_sync`` calls costs a few frames, not
  one per call), and every frame of a call is on the pipe before its reply.
- :class:`SoftLimit` raises ``SoftTimeLimitExceeded`` inside the body at the
  task's ``soft_timeout``: a timer thread sends ``SIGUSR1`` to the main thread
  (where bodies run), whose handler raises there, interrupting a blocking call
  too. The handler raises only while the same call runs, so a signal that
  lands as a call ends is dropped and never reaches the next task.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from types import FrameType
from typing import Any

import msgspec

from runtime.errors import SoftTimeLimitExceeded
from runtime.messages import Progress

__all__ = ["SOFT_SIGNAL", "ProgressOut", "Progressed", "SoftLimit"]

#: the signal a pool process raises ``SoftTimeLimitExceeded`` from (owned by taskloom there)
SOFT_SIGNAL = signal.SIGUSR1


class Progressed(msgspec.Struct, tag="progress", tag_field="op", frozen=True):
    """The running task reported progress (sent while it runs), with its
    ``current_task().meta`` as it was then."""

    progress: Progress
    meta: dict[str, Any] = {}


class ProgressOut:
    """The latest progress of the running call, sent to the pool by a writer thread."""

    def __init__(self, write: Callable[[bytes], None]) -> None:
        self._write = write  # one frame to the pool
        self._encoder = msgspec.msgpack.Encoder()  # the writer thread's own
        #: the latest report, not yet sent (append and pop are atomic: none is lost)
        self._latest: deque[Progress] = deque(maxlen=1)
        self._meta: dict[str, Any] = {}  # the running task's current_task().meta
        self._open = False  # a call runs: its reports are sent
        self._wake = threading.Event()
        self._writing = threading.Lock()  # held while a frame is written
        self._thread: threading.Thread | None = None

    def begin(self, meta: dict[str, Any]) -> None:
        """A call starts: its reports (and its ``meta``) are sent from now on."""
        self._latest.clear()
        self._meta = meta
        self._open = True

    def note(self, progress: Progress) -> None:
        """Keep ``progress`` as the latest report; the writer sends it soon."""
        self._latest.append(progress)
        if not self._wake.is_set():
            self._wake.set()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="taskloom-progress",
                                                daemon=True)
                self._thread.start()

    def end(self) -> None:
        """The call is over: drop what is unsent (its reply carries the latest
        report) and wait for a frame being written, so the reply comes after it."""
        with self._writing:
            self._open = False
            self._latest.clear()
            self._meta = {}

    def _run(self) -> None:
        while True:
            self._wake.wait()
            with self._writing:
                self._wake.clear()  # before the pop: a report noted after it wakes us again
                try:
                    progress = self._latest.pop()
                except IndexError:
                    continue
                if not self._open:
                    continue
                body = self._encode(progress)
                if body is None:
                    continue
                self._write(body)

    def _encode(self, progress: Progress) -> bytes | None:
        try:
            return self._encoder.encode(Progressed(progress=progress, meta=self._meta))
        except (TypeError, ValueError):  # meta it cannot encode: without it
            pass
        try:
            return self._encoder.encode(Progressed(progress=progress))
        except (TypeError, ValueError):  # nor the report's own meta: the outcome says why
            return None


class SoftLimit:
    """Raises ``SoftTimeLimitExceeded`` in the main thread ``limit`` seconds
    into a call (once); :meth:`disarm` when the call ends. Install from the
    main thread."""

    def __init__(self) -> None:
        self._main = threading.get_ident()
        self._cond = threading.Condition()
        self._deadline: float | None = None
        self._limit = 0.0
        #: the call armed for runs: the handler raises (once) only while it is set
        self._armed = False
        self._thread: threading.Thread | None = None
        signal.signal(SOFT_SIGNAL, self._handle)

    def arm(self, limit: float) -> None:
        with self._cond:
            self._limit = limit
            self._deadline = time.monotonic() + limit
            self._armed = True
            self._cond.notify()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="taskloom-soft-limit",
                                            daemon=True)
            self._thread.start()

    def disarm(self) -> None:
        """The call ended: no signal is sent for it from now on, and one sent
        just before is dropped by the handler."""
        self._armed = False
        with self._cond:
            self._deadline = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # runs in the main thread between bytecodes: never take the lock here
        if self._armed:
            self._armed = False
            raise SoftTimeLimitExceeded(self._limit)

    def _run(self) -> None:
        with self._cond:
            while True:
                if self._deadline is None:
                    self._cond.wait()
                    continue
                left = self._deadline - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                self._deadline = None
                signal.pthread_kill(self._main, SOFT_SIGNAL)
