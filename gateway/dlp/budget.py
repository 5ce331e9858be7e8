"""An inspection time budget: no body, crafted or not, holds a thread for longer than it.

A scan runs in the thread that asks for it (the event loop's for heads and small bodies, a worker
thread for large ones, the loop again chunk by chunk for streamed ones). A watchdog thread reads that
thread's own CPU clock and, once the budget is spent, raises an exception in it
(`PyThreadState_SetAsyncExc`): every Python loop of the decoders and the engine stops at its next
bytecode, and the scan's caller gets `BudgetExceeded`. That exception is lost when it lands in a
finalizer (CPython prints "Exception ignored in ..." and goes on), so the decoders and the engine also
call `check_deadline()` once a segment, content or chunk, which raises again in a run that has
fired; and a run that fired is refused whatever its work returned. A single long call into C (one
Hyperscan pass, one decompression step) ends first; each is bounded by the profile's size limits.
CPU time, not wall time, so a scan is not refused for the load of others.
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
OVER_BUDGET = "inspection time budget exceeded"
# A streamed body may be large: past the budget it is allowed one more CPU second per this many bytes
# (clean text is scanned at 100-300 MB/s; crafted slow input is far below).
STREAM_BYTES_PER_SECOND = 8 * 1024 * 1024
# While scans keep starting the watchdog looks at least this often (below the event loop's 50 ms scan
# slices), so that a scan starting meanwhile needs no wake-up of its own; idle, it sleeps until one starts.
LOOK_WHILE_BUSY = 0.02


class BudgetExceeded(Exception):
    """The inspection ran past its budget: its content is uninspectable."""


class _Expired(BaseException):
    """Raised inside the scanning thread. A BaseException, so that no decoder's `except Exception`
    takes it for a decoding problem and goes on."""


_current = threading.local()  # the run of this thread's scan, if any


def check_deadline() -> None:
    """Raise in a scan whose budget is spent (its caller gets BudgetExceeded); nothing outside a scan."""
    run = getattr(_current, "run", None)
    if run is not None and run.fired:
        raise _Expired


class _Run:
    __slots__ = ("thread_id", "clock", "deadline", "lock", "done", "fired")

    def __init__(self, thread_id: int, clock: int, deadline: float):
        self.thread_id, self.clock, self.deadline = thread_id, clock, deadline
        self.lock = threading.Lock()
        self.done = self.fired = False


class Watchdog:
    def __init__(self) -> None:
        self._runs: set[_Run] = set()
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        # When the watchdog wakes next on its own (time.monotonic(); None: not until a run starts).
        self._wakes_at: float | None = None
        self._started_since_look = False

    def run(self, seconds: float, work: Callable[[], T]) -> tuple[T, float]:
        """`work()` in this thread, stopped past `seconds` of this thread's CPU time (BudgetExceeded);
        its result and the CPU seconds it took."""
        ident = threading.get_ident()
        clock = time.pthread_getcpuclockid(ident)
        started = time.clock_gettime(clock)
        if seconds <= 0:
            raise BudgetExceeded(OVER_BUDGET)
        run = _Run(ident, clock, started + seconds)
        outer, _current.run = getattr(_current, "run", None), run
        self._watch(run, seconds)
        try:
            try:
                result = work()
            finally:
                with run.lock:  # the watchdog fires only under this lock, while the run is not done
                    run.done = True
                if run.fired:  # fired as work() returned: not raised yet, and never to be
                    _raise_in(ident, None)
        except _Expired:
            raise BudgetExceeded(OVER_BUDGET) from None
        except Exception:
            if run.fired:  # raised once the budget ran out: a library may have wrapped the exception
                raise BudgetExceeded(OVER_BUDGET) from None
            raise
        finally:
            _current.run = outer
            with self._changed:
                self._runs.discard(run)
        if run.fired:  # its exception was lost (a finalizer swallowed it) and the scan ran on: no verdict
            raise BudgetExceeded(OVER_BUDGET)
        return result, time.clock_gettime(clock) - started

    def _watch(self, run: _Run, seconds: float) -> None:
        with self._changed:
            self._runs.add(run)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="inspection-watchdog", daemon=True)
                self._thread.start()
            self._started_since_look = True
            # Woken only when it would otherwise look too late: a wake-up per scan (four a transfer)
            # cost ~30 us of CPU each. A run cannot spend its seconds before as many have passed.
            if self._wakes_at is None or self._wakes_at > time.monotonic() + seconds:
                self._changed.notify()

    def _loop(self) -> None:
        with self._changed:
            while True:
                wait = None  # until a run starts
                for run in list(self._runs):
                    try:
                        left = run.deadline - time.clock_gettime(run.clock)
                    except OSError:  # its thread has just ended
                        continue
                    if left <= 0:
                        _fire(run)
                    else:  # a thread's CPU clock runs no faster than the wall clock
                        wait = left if wait is None else min(wait, left)
                if self._started_since_look:  # scans are coming: look again soon, so they need not wake it
                    wait = LOOK_WHILE_BUSY if wait is None else min(wait, LOOK_WHILE_BUSY)
                    self._started_since_look = False
                wait = None if wait is None else max(wait, 0.002)
                self._wakes_at = None if wait is None else time.monotonic() + wait
                self._changed.wait(wait)


def _fire(run: _Run) -> None:
    with run.lock:
        if not run.done and not run.fired:
            run.fired = True
            _raise_in(run.thread_id, _Expired)


def _raise_in(thread_id: int, exception: type[BaseException] | None) -> None:
    """Raise `exception` in the thread at its next bytecode (None: cancel one not raised yet)."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id),
                                               ctypes.py_object(exception) if exception else None)


WATCHDOG = Watchdog()


class InspectionBudget:
    """The CPU seconds one transfer's inspection may take, all its scans together."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.spent = 0.0

    def spend(self, work: Callable[[], T], *, at_most: float | None = None) -> T:
        """`work()` within what is left (and no more than `at_most`); BudgetExceeded past it."""
        left = self.seconds - self.spent
        try:
            result, spent = WATCHDOG.run(left if at_most is None else min(left, at_most), work)
        except BudgetExceeded:
            self.spent += max(min(left, at_most if at_most is not None else left), 0.0)
            raise
        self.spent += spent
        return result

    def earn(self, seconds: float) -> None:
        """More time for the whole transfer (a streamed body earns it as it arrives)."""
        self.seconds += seconds

    @property
    def left(self) -> float:
        return self.seconds - self.spent
