"""A large body held on disk while the DLP engine scans it as it arrives.

Nothing of the body is released before `finish()` has given a verdict; then `release()` reads it back
in chunks. `HeldBody` decides when a body of unknown length is large enough to go to a spool (past
the spool threshold, or past what its worker's memory budget, gateway.transfer.memory, has left).
The spool file is unlinked from the start, so a crash leaves nothing behind on disk.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from gateway.dlp import Finding, ScanResult, StreamScan
from gateway.trace import body_hasher
from gateway.transfer.memory import Reservation

RELEASE_CHUNK = 256 * 1024


def spool_dir(state_dir: Path) -> Path:
    """Where long bodies are spooled: the state folder's `spool` (it may be a filesystem of its own)."""
    return state_dir / "spool"


class SpooledBody:
    def __init__(self, directory: Path, scan: StreamScan | None, digest: str):
        directory.mkdir(parents=True, exist_ok=True)
        self.file = tempfile.TemporaryFile(dir=directory)
        self.scan = scan
        self.hasher = body_hasher(digest)
        self.size = 0
        self.failure: str | None = None

    def add(self, chunk: bytes) -> None:
        if self.failure is not None:
            return
        try:
            self.file.write(chunk)
        except OSError as e:  # a full disk: fail closed, the body is never released
            self.failure = f"spool write failed: {e}"
            return
        if self.scan is not None:
            self.scan.feed(chunk)
        self.hasher.update(chunk)
        self.size += len(chunk)

    def finish(self) -> ScanResult:
        try:
            self.file.flush()  # the last buffered bytes: their write may fail too
        except OSError as e:
            self.failure = self.failure or f"spool write failed: {e}"
        if self.failure is not None:
            finding = Finding(rule="uninspectable", type="uninspectable", action="block", severity="high",
                              location="body", masked=self.failure, value=self.failure)
            return ScanResult(findings=[finding], action="block")
        return self.scan.finish() if self.scan is not None else ScanResult(findings=[], action=None)

    def release(self) -> Iterator[bytes]:
        self.file.seek(0)
        try:
            while chunk := self.file.read(RELEASE_CHUNK):
                yield chunk
        finally:
            self.file.close()

    def discard(self) -> None:
        self.file.close()


class DiscardedBody:
    """In a spool's place, the body of a request already refused: read (its client sends it anyway),
    counted and hashed for the record, and dropped, so it takes no memory whatever its size."""

    failure = None

    def __init__(self, digest: str):
        self.hasher = body_hasher(digest)
        self.size = 0

    def add(self, chunk: bytes) -> None:
        self.hasher.update(chunk)
        self.size += len(chunk)

    def discard(self) -> None:
        pass


class HeldBody:
    """mitmproxy's stream callable for a body held until its verdict (gateway.proxy.heldheads holds its
    message head back too, so a refusal is still an answer): in memory up to `threshold` bytes (each
    byte taken from the transfer's `memory` reservation), then given back whole to be inspected, and
    redacted if need be, like any buffered body; past it, or past the worker's memory budget, moved
    to a spool (`open_spool`) and scanned as it arrives. `judge` gives a spooled body's verdict (True:
    release it); a body it refuses is discarded."""

    def __init__(self, threshold: int, memory: Reservation | None, open_spool: Callable[[], SpooledBody | DiscardedBody],
                 judge: Callable[[SpooledBody | DiscardedBody], bool]):
        self.threshold = threshold
        self.reservation = memory
        self.open_spool = open_spool
        self.judge = judge
        self.memory: bytearray | None = bytearray()
        self.spool: SpooledBody | None = None
        self.passed: bool | None = None

    def __call__(self, data: bytes) -> Iterable[bytes]:
        # "Nothing to send" is an empty list, never b"": an empty chunk would end a chunked body.
        if data:
            self.add(data)
            return []
        return self.release()

    def add(self, data: bytes) -> None:
        if self.memory is None:
            self.spool.add(data)
            return
        if len(self.memory) + len(data) <= self.threshold and self.reservation.take(len(data)):
            self.memory += data
            return
        # Too big to hold, or the worker's memory budget spent: spooled from here on.
        self.spool = self.open_spool()
        self.spool.add(bytes(self.memory) + data)
        if self.memory:
            self.reservation.give_back(len(self.memory))
        self.memory = None

    def in_memory(self) -> bytes | None:
        """The whole body, when it stayed under the threshold (None once it is spooled)."""
        return None if self.memory is None else bytes(self.memory)

    def conclude(self) -> bool:
        """A spooled body's verdict, once all of it has arrived."""
        if self.passed is None:
            self.passed = self.judge(self.spool)
            if not self.passed:
                self.spool.discard()
        return self.passed

    def release(self) -> Iterable[bytes]:
        if self.memory is not None:
            return [bytes(self.memory)] if self.memory else []
        return self.spool.release() if self.conclude() else []
