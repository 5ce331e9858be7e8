"""Append timeouts: many records awaited on one event loop, timed by a single timer.

`asyncio.wait_for` gives each awaited record a timeout context and a timer of its own, set up and
cancelled around every append (~7 us a record, two records a transfer). Here a record's future is
put in a queue with its deadline, and one timer per loop looks at the queue when the earliest
deadline is due: a record answered in time costs a queue entry and nothing else. A future still
unanswered at its deadline fails with TimeoutError; the record stays with the writer (which skips a
future already done when it answers).
"""

from __future__ import annotations

import asyncio
from collections import deque


class LoopDeadlines:
    """Deadlines for futures of one event loop (the loop that calls `watch`)."""

    def __init__(self) -> None:
        self._watched: deque[tuple[float, asyncio.Future]] = deque()
        self._timer: asyncio.TimerHandle | None = None

    def watch(self, fut: asyncio.Future, timeout: float) -> None:
        """`fut` fails with TimeoutError if it is not done within `timeout` seconds."""
        loop = fut.get_loop()
        deadline = loop.time() + timeout
        watched = self._watched
        while watched and watched[0][1].done():  # records are answered in order: forget those answered
            watched.popleft()
        watched.append((deadline, fut))
        if self._timer is None or deadline < self._timer.when():  # an earlier one (a reload shortened it)
            if self._timer is not None:
                self._timer.cancel()
            self._timer = loop.call_at(deadline, self._look, loop)

    def _look(self, loop: asyncio.AbstractEventLoop) -> None:
        """Fail the futures past their deadline, forget the done ones, and sleep until the next deadline."""
        self._timer = None
        now, earliest, kept = loop.time(), None, deque()
        for deadline, fut in self._watched:
            if fut.done():
                continue
            if deadline <= now:
                fut.set_exception(TimeoutError())
                continue
            kept.append((deadline, fut))
            earliest = deadline if earliest is None else min(earliest, deadline)
        self._watched = kept
        if earliest is not None:
            self._timer = loop.call_at(earliest, self._look, loop)
