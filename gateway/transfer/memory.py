"""The bytes of bodies a worker holds in memory, kept within `dlp.memory_budget`.

A body is held whole in memory while it is inspected: one of known length up to `dlp.spool_threshold`
(mitmproxy buffers it), one of unknown length until it passes the threshold (gateway.transfer.spool's
HeldBody). Each is counted here while its transfer lasts: a declared length when its head arrives,
a body of unknown length as its bytes come. A body that would take the worker past its budget goes to
the disk spool instead (from its first byte, or from the byte that would overrun it), so however many
slow or stalled uploads a worker serves, what their bodies hold in memory stays within the budget.
"""

from __future__ import annotations

from collections.abc import Callable


class MemoryBudget:
    """One worker's account: `limit()` is read at each request (a reload may change it)."""

    def __init__(self, limit: Callable[[], int]):
        self.limit = limit
        self.held = 0

    def take(self, size: int) -> bool:
        if self.held + size > self.limit():
            return False
        self.held += size
        return True

    def give_back(self, size: int) -> None:
        self.held -= size


class Reservation:
    """What one transfer holds of its worker's budget, given back whole by `close()` when it ends."""

    def __init__(self, budget: MemoryBudget):
        self.budget = budget
        self.size = 0

    def take(self, size: int) -> bool:
        if not self.budget.take(size):
            return False
        self.size += size
        return True

    def give_back(self, size: int) -> None:
        self.budget.give_back(size)
        self.size -= size

    def close(self) -> None:
        self.give_back(self.size)
