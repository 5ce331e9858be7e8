"""A large body held on disk while the DLP engine scans it as it arrives.

Nothing of the body is released before `finish()` has given a verdict; then `release()` reads it back
in chunks. The spool file is unlinked from the start, so a crash leaves nothing behind on disk.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

from gateway.dlp import Finding, ScanResult, StreamScan
from gateway.trace import body_hasher

RELEASE_CHUNK = 256 * 1024


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
        if self.failure is not None:
            finding = Finding(rule="uninspectable", type="uninspectable", action="block", severity="high",
                              location="body", masked=self.failure, value=self.failure)
            return ScanResult(findings=[finding], action="block")
        return self.scan.finish() if self.scan is not None else ScanResult(findings=[], action=None)

    def release(self) -> Iterator[bytes]:
        self.file.flush()
        self.file.seek(0)
        try:
            while chunk := self.file.read(RELEASE_CHUNK):
                yield chunk
        finally:
            self.file.close()

    def discard(self) -> None:
        self.file.close()
