"""Free space on the trace log's and the spool's filesystems: what the stages refuse transfers on, and
what /readyz reports, in the single process as in the supervisor of several workers (no mitmproxy here)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

# Kept free on the trace log's and the spool's filesystems: below it transfers are refused 503 before
# anything is forwarded, so that a full disk is met by a refusal (and its record), not a failed write.
DISK_RESERVE = 16 * 1024 * 1024


def disk_full(directory: Path, what: str) -> str | None:
    """Why `directory`'s filesystem cannot take `what` any more (less than DISK_RESERVE free), or None."""
    return _too_little(_free_bytes(directory), directory, what)


def _free_bytes(directory: Path) -> int:
    folder = directory
    while not folder.exists() and folder != folder.parent:  # the spool folder is made on first use
        folder = folder.parent
    return shutil.disk_usage(folder).free


def _too_little(free: int, directory: Path, what: str) -> str | None:
    if free >= DISK_RESERVE:
        return None
    return (f"{what} filesystem full: {free // 1024} KiB free at {directory}, "
            f"{DISK_RESERVE // (1024 * 1024)} MiB kept in reserve")


def filesystem_problems(trace_dir: Path, spool: Path) -> list[str]:
    """Why the trace log's or the spool's filesystem cannot take more (what every worker refuses transfers
    on, and /readyz says); empty when both can."""
    return [problem for problem in (disk_full(trace_dir, "trace log"), disk_full(spool, "spool")) if problem]


# Far enough above the reserve, a filesystem is looked at again only after DISK_RECHECK seconds.
DISK_AMPLE = DISK_RESERVE + 256 * 1024 * 1024
DISK_RECHECK = 1.0


class FreeSpace:
    """`disk_full` on a hot path (every transfer): while the last look found DISK_AMPLE free, the next
    look waits DISK_RECHECK seconds (its system calls on every transfer cost ~2 % of the proxy's 1 KiB
    throughput); near the reserve every call looks. The trace log fails closed on a failed write
    whatever this says, so a disk filled from outside within that second still stops transfers."""

    def __init__(self, directory: Path, what: str):
        self.directory, self.what = directory, what
        self._ample_until = 0.0

    def full(self) -> str | None:
        now = time.monotonic()
        if now < self._ample_until:
            return None
        free = _free_bytes(self.directory)
        self._ample_until = now + DISK_RECHECK if free >= DISK_AMPLE else 0.0
        return _too_little(free, self.directory, self.what)
