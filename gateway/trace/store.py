"""The single writer of a trace log directory: appends batches durably and signs checkpoints.

`LogStore` is synchronous and knows nothing about threads or asyncio; the group-commit thread in
log.py (and, later, a Unix-socket front for several worker processes) drive it. One process holds
the directory's lock at a time.

Commit order, which recovery relies on: entries (journal fdatasync, or full bundle and tiles
fsync'd) are durable before the checkpoint naming them is renamed into place.
"""

import errno
import fcntl
import os
import shutil
import time
from pathlib import Path

from gateway.trace.merkle import CompactRange, leaf_hash, root_of_nodes
from gateway.trace.note import Checkpoint, NoteError, Signer, open_checkpoint
from gateway.trace.tiles import (
    JOURNAL_HEADER, JOURNAL_MAGIC, TILE_HEIGHT, TILE_WIDTH, TileError, encode_entry, read_journal,
    tail_reader, tile_path,
)


class TraceError(RuntimeError):
    """The trace log cannot accept or keep records; the gateway must stop forwarding."""


class _Level:
    """The unfinished tile at one level: its hashes and their compact range."""

    __slots__ = ("hashes", "range")

    def __init__(self) -> None:
        self.hashes: list[bytes] = []
        self.range = CompactRange()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durable(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write `path` via a temp file that is fsync'd and renamed (the caller fsyncs the directory)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


class LogStore:
    def __init__(self, directory: Path, signer: Signer) -> None:
        self.directory = directory
        self.signer = signer
        self.origin = signer.name
        self.size = 0
        self.checkpoint_size = 0
        self.checkpoint_time = 0.0
        self._levels: list[_Level] = [_Level()]
        self._bundle: list[bytes] = []  # entries of the unfinished bundle
        self._journal_fd = -1
        self._lock_fd = -1
        self._partial_written: set[Path] = set()
        self._partial_size = -1

    # ---- opening and recovery -------------------------------------------------------------------

    @classmethod
    def open(cls, directory: Path, signer: Signer) -> "LogStore":
        store = cls(directory, signer)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            store._lock()
            store._recover()
        except (OSError, TileError, NoteError) as exc:
            store.close_files()
            raise TraceError(f"trace log {directory}: {exc}") from exc
        except TraceError:
            store.close_files()
            raise
        return store

    def _lock(self) -> None:
        self._lock_fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TraceError(f"trace log {self.directory} is open in another writer") from None

    def _fail(self, message: str) -> None:
        raise TraceError(f"trace log {self.directory}: {message}")

    def _recover(self) -> None:
        cp_path = self.directory / "checkpoint"
        journal = self.directory / "journal"
        checkpoint: Checkpoint | None = None
        if cp_path.exists():
            _, checkpoint = open_checkpoint(cp_path.read_bytes(), self.signer.verifier)
            self.checkpoint_time = cp_path.stat().st_mtime
        if not journal.exists():
            if checkpoint is not None and checkpoint.size:
                self._fail("journal is missing but the checkpoint covers records")
            _write_durable(journal, JOURNAL_HEADER.pack(JOURNAL_MAGIC, 0))
            _fsync_dir(self.directory)
        start, entries, used, length = read_journal(journal)
        if b"" in entries:
            # Records are never empty: a zero length is a zero-filled block left by a crash.
            k = entries.index(b"")
            used = JOURNAL_HEADER.size + sum(2 + len(e) for e in entries[:k])
            if journal.read_bytes()[used:].strip(b"\0"):
                self._fail(f"journal is corrupt at byte {used} (record {start + k})")
            entries = entries[:k]
        if used < length:
            # A torn last record (crash mid-append): drop it, it was never acknowledged.
            with open(journal, "r+b") as f:
                f.truncate(used)
                os.fsync(f.fileno())
        self._load_full_levels(start)
        cp_size = checkpoint.size if checkpoint else 0
        if cp_size > start + len(entries):
            self._fail(f"checkpoint covers {cp_size} records but the log holds only "
                       f"{start + len(entries)}: records were removed below the checkpoint")
        if checkpoint and cp_size < start:
            if tail_reader(self.directory, cp_size).root() != checkpoint.root:
                self._fail(f"full tiles do not match the checkpoint at size {cp_size}")
        completed: list[tuple[str, bytes]] = []
        if checkpoint and cp_size == start and self.root() != checkpoint.root:
            self._fail(f"full tiles do not match the checkpoint at size {cp_size}")
        for entry in entries:
            self._push(entry, completed)
            if checkpoint and self.size == cp_size and self.root() != checkpoint.root:
                self._fail(f"records up to {cp_size} do not match the checkpoint")
        self.checkpoint_size = cp_size
        self._journal_fd = os.open(journal, os.O_WRONLY | os.O_APPEND)
        if completed or self.size != cp_size or checkpoint is None:
            self._persist(completed, b"")
        self._remove_stale_partials()

    def _remove_stale_partials(self) -> None:
        """Partial tiles left by an earlier run sit at the right edge of each level."""
        for level in ["entries", *range(len(self._levels))]:
            n = self.size >> (TILE_HEIGHT * ((0 if level == "entries" else level) + 1))
            for m in (n - 1, n):
                if m >= 0:
                    shutil.rmtree(self.directory / f"{tile_path(level, m)}.p", ignore_errors=True)

    def _load_full_levels(self, start: int) -> None:
        """Rebuild the unfinished tiles of levels >= 1 for a tree of `start` (a multiple of 256)
        leaves from the full tiles below them."""
        self.size = start
        level = 1
        while start >> (TILE_HEIGHT * level):
            complete = start >> (TILE_HEIGHT * level)  # full tiles at level - 1
            lvl = _Level()
            for n in range(complete - complete % TILE_WIDTH, complete):
                path = self.directory / tile_path(level - 1, n)
                data = path.read_bytes()
                if len(data) != TILE_WIDTH * 32:
                    raise TileError(f"{tile_path(level - 1, n)}: not a full tile")
                row = CompactRange()
                for i in range(0, len(data), 32):
                    row.push(0, data[i:i + 32])
                lvl.hashes.append(row.nodes[0][1])
                lvl.range.push(0, row.nodes[0][1])
            self._levels.append(lvl)
            level += 1

    # ---- appending ------------------------------------------------------------------------------

    def _push(self, entry: bytes, completed: list[tuple[str, bytes]]) -> None:
        """Add one leaf; full bundles and tiles it completes are queued in `completed`."""
        self._bundle.append(entry)
        self.size += 1
        value = leaf_hash(entry)
        level = 0
        while True:
            lvl = self._levels[level]
            lvl.hashes.append(value)
            lvl.range.push(0, value)
            if len(lvl.hashes) < TILE_WIDTH:
                break
            n = (self.size >> (TILE_HEIGHT * (level + 1))) - 1
            if level == 0:
                completed.append((tile_path("entries", n), b"".join(encode_entry(e) for e in self._bundle)))
                self._bundle = []
            completed.append((tile_path(level, n), b"".join(lvl.hashes)))
            value = lvl.range.nodes[0][1]  # the full tile's subtree hash feeds the level above
            self._levels[level] = _Level()
            level += 1
            if level == len(self._levels):
                self._levels.append(_Level())

    def root(self) -> bytes:
        nodes = [value for lvl in reversed(self._levels) for _, value in lvl.range.nodes]
        return root_of_nodes(nodes)

    def commit(self, entries: list[bytes]) -> int:
        """Append `entries` durably under a new signed checkpoint; returns the first index.
        Raises OSError/TileError on failure, after which this store must not be used again."""
        first = self.size
        encoded = b"".join(encode_entry(e) for e in entries)  # length check before any state change
        completed: list[tuple[str, bytes]] = []
        for entry in entries:
            self._push(entry, completed)
        self._persist(completed, b"" if completed else encoded)
        return first

    def _persist(self, completed: list[tuple[str, bytes]], journal_append: bytes) -> None:
        if completed:
            dirty: set[Path] = set()
            for rel, data in completed:
                self._write_immutable(self.directory / rel, data, dirty)
            for d in sorted(dirty, key=lambda p: len(p.parts), reverse=True):
                _fsync_dir(d)
            # The finished bundles are durable: start a journal holding only the unfinished one.
            start = self.size - len(self._bundle)
            body = JOURNAL_HEADER.pack(JOURNAL_MAGIC, start) + b"".join(encode_entry(e) for e in self._bundle)
            journal = self.directory / "journal"
            _write_durable(journal, body)
            _fsync_dir(self.directory)
            os.close(self._journal_fd)
            self._journal_fd = os.open(journal, os.O_WRONLY | os.O_APPEND)
        elif journal_append:
            view = memoryview(journal_append)
            while view:
                view = view[os.write(self._journal_fd, view):]
            os.fdatasync(self._journal_fd)
        self._write_checkpoint()

    def _write_immutable(self, path: Path, data: bytes, dirty: set[Path]) -> None:
        if path.exists():
            # Only recovery rewrites a finished file; it must hold exactly what the journal says.
            if path.read_bytes() != data:
                raise TileError(f"{path.relative_to(self.directory)} differs from the journal")
            return
        parent = path.parent
        missing = []
        while not parent.exists():
            missing.append(parent)
            parent = parent.parent
        for d in reversed(missing):
            d.mkdir()
            dirty.add(d.parent)
        _write_durable(path, data)
        dirty.add(path.parent)

    def _write_checkpoint(self) -> None:
        body = Checkpoint(self.origin, self.size, self.root()).body()
        note = f"{body}\n{self.signer.sign_note(body)}"
        _write_durable(self.directory / "checkpoint", note.encode())
        _fsync_dir(self.directory)
        self.checkpoint_size = self.size
        self.checkpoint_time = time.time()

    # ---- derived files and closing --------------------------------------------------------------

    def write_partial_tiles(self) -> None:
        """Write the partial tiles for the current checkpoint (derived data, not fsync'd: the journal
        is the durable copy) and remove the ones of earlier sizes."""
        if self._partial_size == self.size:
            return
        wanted: dict[Path, bytes] = {}
        width0 = len(self._bundle)
        if width0:
            n = self.size // TILE_WIDTH
            wanted[self.directory / tile_path("entries", n, width0)] = b"".join(encode_entry(e) for e in self._bundle)
        for level, lvl in enumerate(self._levels):
            if lvl.hashes:
                n = self.size >> (TILE_HEIGHT * (level + 1))
                wanted[self.directory / tile_path(level, n, len(lvl.hashes))] = b"".join(lvl.hashes)
        for path, data in wanted.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        for old in self._partial_written - wanted.keys():
            try:
                old.unlink()
                if not any(old.parent.iterdir()):
                    shutil.rmtree(old.parent, ignore_errors=True)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    raise
        self._partial_written = set(wanted)
        self._partial_size = self.size

    def close_files(self) -> None:
        for attr in ("_journal_fd", "_lock_fd"):
            fd = getattr(self, attr)
            if fd >= 0:
                os.close(fd)
                setattr(self, attr, -1)
