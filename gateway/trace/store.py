"""The single writer of a trace log directory: appends batches durably and signs checkpoints.

Longer than 400 lines: commit, recovery and rotation keep one invariant (below) under one lock;
split apart, the invariant would have no one place.

`LogStore` is synchronous and knows nothing about asyncio; the group-commit thread in log.py and
the writer process in remote.py drive it: `commit` a batch, answer its producers, then `maintain`.
One process holds the directory's lock at a time.

Invariant an acknowledged record relies on: when `commit` returns, the batch's entries and a signed
checkpoint covering them were appended to the journal in one write and made durable by one
fdatasync. Every record at or past the journal's start is in the journal; every record before it is
in a full bundle whose files (and hash tiles) were fsync'd before the journal was replaced by one
starting after them. Everything else (the checkpoint file, full tiles past the journal's start,
partial tiles) is derived from the journal and rebuilt from it by recovery.

What a reader of the files may rely on (the rule `trace verify` checks, gateway/trace/audit.py):
every full tile and full entry bundle below the checkpoint file's size was written and fsync'd
before that checkpoint file was (so, crash or not, it exists whole); those past it may be missing
(not derived yet) but are never wrong. Partial tiles are written, not fsync'd, just before the
checkpoint file they belong to: after a power loss they may be missing or empty until the writer
restarts.

The derived files are written by one background thread in commit order, so a commit's latency is
its journal write and fdatasync only: after every commit it fsyncs the full files completed so far,
writes the partial tiles and then the checkpoint file (a publication), at most one every
PUBLISH_SPACING: a publication first waits out the spacing and is skipped if a newer one was queued
meanwhile. The checkpoint file therefore trails the acknowledged records by at most that spacing
plus the writing of one publication (docs/auditing.md has the figures). A rotation, whose full files
are then already durable, copies the journal's tail to a new file and, once the commit thread has
added the frames written since, makes it durable and renames it over the journal, all in the
background: until that rename is durable, commits write and fdatasync both files, so whichever of
the two the name `journal` points to after a crash holds every acknowledged record. A background
error fails the next `maintain` or `commit` (fail closed).

Recovery keeps the journal up to its last checkpoint frame that verifies and matches the records
before it; what follows was never acknowledged (a write cut short by a crash) and is cut off, unless
it does not look torn, in which case the journal was altered and the log refuses to open.
"""

import errno
import fcntl
import os
import shutil
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import accumulate
from pathlib import Path

from gateway.trace.merkle import leaf_hashes, perfect_root
from gateway.trace.note import Checkpoint, NoteError, Signer, open_checkpoint
from gateway.trace.tiles import (
    JOURNAL_HEADER,
    JOURNAL_MAGIC,
    TILE_HEIGHT,
    TILE_WIDTH,
    Journal,
    TiledTree,
    TileError,
    encode_checkpoint_frame,
    encode_entries,
    read_journal,
    tail_reader,
    tile_path,
    unfinished_write_problem,
)

ROTATE_BUNDLES = 64  # full bundles kept in the journal before it rotates past them
PUBLISH_SPACING = 0.1  # seconds at least between two publications: each costs ~2 ms of CPU (two fsyncs, file churn)


class TraceError(RuntimeError):
    """The trace log cannot accept or keep records; the gateway must stop forwarding."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes, *, durable: bool, mode: int = 0o644) -> None:
    """Write `path` via a temp file and rename, fsync'ing the temp file when `durable` (the caller
    fsyncs the directory)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _write_durable(path: Path, data: bytes, mode: int = 0o644) -> None:
    _write_file(path, data, durable=True, mode=mode)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _sync_files(files: list[Path], dirs: set[Path]) -> None:
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
        _fsync_dir(d)


class LogStore:
    def __init__(self, directory: Path, signer: Signer, *, rotate_bundles: int = ROTATE_BUNDLES,
                 publish_spacing: float = PUBLISH_SPACING) -> None:
        self.directory = directory
        self.signer = signer
        self.origin = signer.name
        self.rotate_bundles = rotate_bundles
        self.publish_spacing = publish_spacing
        self.checkpoint_size = 0  # size of the newest durable signed checkpoint (in the journal)
        self.checkpoint_time = 0.0
        self.checkpoint_note = b""
        self._tree = TiledTree()
        self._bundle: list[bytes] = []  # pieces of the unfinished bundle (entries in the bundle format)
        self._journal_fd = -1
        self._journal_start = 0
        self._journal_end = 0  # bytes of frames in the journal file
        self._bundle_offsets: dict[int, int] = {}  # bundle start index -> journal offset of its first frame
        self._completed: list[tuple[str, bytes]] = []  # full bundles and tiles not yet handed to the files thread
        self._derived_upto = 0  # full files up to this record are written or queued on the files thread
        self._sync_job: Future | None = None  # fsync of the full files up to _sync_target
        self._sync_target = 0
        self._rotation: Future | None = None  # the new journal being prepared: (its fd, bytes copied)
        self._replacing: Future | None = None  # the new journal made durable and renamed over the old one
        self._old_journal: tuple[int, int] | None = None  # (fd, end) of the old one while _replacing runs
        self._files: ThreadPoolExecutor | None = None
        self._jobs: deque[Future] = deque()  # file jobs whose errors are still to be raised
        self._lock_fd = -1
        self._publish_size = -1
        self._publications = 0  # publications queued; the files thread skips all but the newest
        self._published_at = 0.0  # files thread: monotonic time of the last publication
        # Touched by the files thread only.
        self._unsynced: list[Path] = []  # full files written but not yet fsync'd
        self._unsynced_dirs: set[Path] = set()
        self._partial_written: set[Path] = set()
        self.on_publish: Callable[[], None] | None = None  # e.g. poke the witness pusher

    # ---- opening and recovery -------------------------------------------------------------------

    @classmethod
    def open(cls, directory: Path, signer: Signer, **options) -> "LogStore":
        store = cls(directory, signer, **options)
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

    def _frame_checkpoint(self, note: bytes, size: int, root: bytes) -> bool:
        """Whether a journal checkpoint frame is signed by this log and names `size` and `root`."""
        try:
            _, checkpoint = open_checkpoint(note, self.signer.verifier)
        except NoteError:
            return False
        return checkpoint.size == size and checkpoint.root == root

    def _recover(self) -> None:
        cp_path = self.directory / "checkpoint"
        journal_path = self.directory / "journal"
        file_cp: Checkpoint | None = None
        if cp_path.exists():
            _, file_cp = open_checkpoint(cp_path.read_bytes(), self.signer.verifier)
        if not journal_path.exists():
            if file_cp is not None and file_cp.size:
                self._fail("journal is missing but the checkpoint covers records")
            _write_durable(journal_path, JOURNAL_HEADER.pack(JOURNAL_MAGIC, 0))
            _fsync_dir(self.directory)
        journal = read_journal(journal_path)
        start = journal.start
        self._load_full_levels(start)
        if file_cp is not None and file_cp.size <= start:
            if tail_reader(self.directory, file_cp.size).root() != file_cp.root:
                self._fail(f"full tiles do not match the checkpoint at size {file_cp.size}")
        durable_size, durable_end, durable_note = self._durable_prefix(journal)
        if file_cp is not None and file_cp.size > durable_size:
            if file_cp.size > journal.end:
                self._fail(f"checkpoint covers {file_cp.size} records but the log holds only "
                           f"{journal.end}: records were removed below the checkpoint")
            # The checkpoint file vouches for more than the journal's frames (checked below).
            last = journal.entry_offsets[file_cp.size - 1 - start]
            durable_size, durable_end, durable_note = file_cp.size, last + 2 + len(journal.entries[file_cp.size - 1 - start]), b""
        problem = unfinished_write_problem(journal, durable_end, self.origin, self._signed)
        if problem:
            self._fail(f"journal: {problem}: the journal was altered")
        entries = journal.entries[:durable_size - start]
        checked = file_cp.size - start if file_cp is not None and start < file_cp.size <= durable_size else 0
        completed = self._add_entries(entries[:checked])[1] if checked else []
        if checked and self.root() != file_cp.root:
            self._fail(f"records up to {file_cp.size} do not match the checkpoint")
        completed += self._add_entries(entries[checked:])[1]
        for size in range(start + TILE_WIDTH, durable_size + 1, TILE_WIDTH):
            k = size - start - 1
            self._bundle_offsets[size] = journal.entry_offsets[k] + 2 + len(entries[k])
        self._journal_start = start
        self._journal_end = durable_end
        self._journal_fd = os.open(journal_path, os.O_RDWR)
        if len(journal.data) > durable_end:
            # The unacknowledged tail of a write cut short by a crash.
            os.ftruncate(self._journal_fd, durable_end)
            os.fsync(self._journal_fd)
        self._derived_upto = start
        self._completed = completed
        self._queue_full_files()
        if durable_note:
            self._set_checkpoint(durable_note, os.stat(journal_path).st_mtime)
        else:
            note = self._sign()
            self._append_journal(encode_checkpoint_frame(note))
            self._set_checkpoint(note)
        self._remove_stale_partials()
        if file_cp is None or file_cp.size != self.size:
            self.publish()

    def _durable_prefix(self, journal: Journal) -> tuple[int, int, bytes]:
        """(size, end offset, note) of the journal's last checkpoint frame that verifies and matches
        the records before it, every earlier frame included; (start, header end, b"") if none."""
        scan = self._tree.copy()
        good = (journal.start, JOURNAL_HEADER.size, b"")
        for size, end, note in journal.checkpoints:  # in journal order: sizes never decrease
            scan.append(leaf_hashes(journal.entries[scan.size - journal.start:size - journal.start]))
            if not self._frame_checkpoint(note, size, scan.root()):
                if self._signed(note) and unfinished_write_problem(journal, good[1], self.origin, self._signed):
                    self._fail(f"journal: records {good[0]}..{size - 1} do not match their signed "
                               f"checkpoint at size {size}: the journal was altered")
                return good
            good = (size, end, note)
        return good

    def _signed(self, note: bytes) -> bool:
        try:
            open_checkpoint(note, self.signer.verifier)
            return True
        except NoteError:
            return False

    def _remove_stale_partials(self) -> None:
        """Partial tiles left by an earlier run sit at the right edge of each level."""
        for level in ["entries", *range(len(self._tree.levels))]:
            n = self.size >> (TILE_HEIGHT * ((0 if level == "entries" else level) + 1))
            for m in (n - 1, n):
                if m >= 0:
                    shutil.rmtree(self.directory / f"{tile_path(level, m)}.p", ignore_errors=True)

    def _load_full_levels(self, start: int) -> None:
        """Rebuild the unfinished tiles of levels >= 1 for a tree of `start` (a multiple of 256)
        leaves from the full tiles below them."""
        upper_rows: list[list[bytes]] = []
        level = 1
        while start >> (TILE_HEIGHT * level):
            complete = start >> (TILE_HEIGHT * level)  # full tiles at level - 1
            row = []
            for n in range(complete - complete % TILE_WIDTH, complete):
                data = (self.directory / tile_path(level - 1, n)).read_bytes()
                if len(data) != TILE_WIDTH * 32:
                    raise TileError(f"{tile_path(level - 1, n)}: not a full tile")
                row.append(perfect_root([data[i:i + 32] for i in range(0, len(data), 32)]))
            upper_rows.append(row)
            level += 1
        self._tree = TiledTree(start, upper_rows)

    # ---- appending ------------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self._tree.size

    def _add_entries(self, entries: list[bytes]) -> tuple[bytes, list[tuple[str, bytes]], list[tuple[int, int]]]:
        """Add a batch of leaves: (their frames, the full bundles and tiles they complete as
        (path, data), and (size, end offset in the frames) for each bundle they complete).
        A bad entry raises TileError before any state changes."""
        first = self.size
        frames = encode_entries(entries)
        completed = [(tile_path(level, n), b"".join(hashes))
                     for level, n, hashes in self._tree.append(leaf_hashes(entries))]
        bundle_ends = []
        begin = 0
        if len(entries) >= TILE_WIDTH - first % TILE_WIDTH:
            ends = list(accumulate(map(len, entries)))
            for k in range(TILE_WIDTH - first % TILE_WIDTH, len(entries) + 1, TILE_WIDTH):
                end = ends[k - 1] + 2 * k
                self._bundle.append(frames[begin:end])
                completed.append((tile_path("entries", (first + k) // TILE_WIDTH - 1), b"".join(self._bundle)))
                self._bundle = []
                bundle_ends.append((first + k, end))
                begin = end
        if begin < len(frames):
            self._bundle.append(frames[begin:] if begin else frames)
        return frames, completed, bundle_ends

    def root(self) -> bytes:
        return self._tree.root()

    def _sign(self) -> bytes:
        body = Checkpoint(self.origin, self.size, self.root()).body()
        return f"{body}\n{self.signer.sign_note(body)}".encode()

    def _set_checkpoint(self, note: bytes, when: float | None = None) -> None:
        self.checkpoint_note = note
        self.checkpoint_size = self.size
        self.checkpoint_time = time.time() if when is None else when

    def _append_journal(self, data: bytes) -> None:
        if self._replacing is not None and self._replacing.done():
            self._close_old_journal()
        _pwrite_all(self._journal_fd, data, self._journal_end)
        if self._old_journal is not None:  # the rename may not be durable yet: keep the old one whole too
            old_fd, old_end = self._old_journal
            _pwrite_all(old_fd, data, old_end)
            os.fdatasync(old_fd)
            self._old_journal = (old_fd, old_end + len(data))
        os.fdatasync(self._journal_fd)
        self._journal_end += len(data)

    def commit(self, entries: list[bytes]) -> int:
        """Append `entries` and a signed checkpoint covering them with one write and one fdatasync;
        returns the first index. Call `maintain` once the batch is answered. Raises OSError or
        TileError on failure (a bad entry: before any state changed), after which this store
        must not be used again."""
        self._check_files_thread()
        first = self.size
        frames, completed, bundle_ends = self._add_entries(entries)
        for size, end in bundle_ends:
            self._bundle_offsets[size] = self._journal_end + end
        note = self._sign()
        self._append_journal(frames + encode_checkpoint_frame(note))
        self._set_checkpoint(note)
        self._completed += completed
        return first

    def maintain(self) -> None:
        """Upkeep of the derived files after a commit: hand its full bundles and tiles and its
        publication to the files thread and move the journal rotation on. Raises the error of a
        failed file job (the store must then not be used again)."""
        self._check_files_thread()
        self.publish(wait=False)
        self._rotate_when_synced()

    def _submit(self, job: Callable, *args: object) -> Future:
        if self._files is None:
            self._files = ThreadPoolExecutor(1, thread_name_prefix="trace-log-files")
        return self._files.submit(job, *args)

    def _check_files_thread(self, wait: bool = False) -> None:
        """Raise the error of a finished file job (of every queued one, when `wait`)."""
        while self._jobs and (wait or self._jobs[0].done()):
            self._jobs.popleft().result()

    def _queue_full_files(self) -> None:
        if self._completed:
            self._jobs.append(self._submit(self._write_full_files, self._completed))
            self._completed = []
        self._derived_upto = self.size - self.size % TILE_WIDTH

    def _write_full_files(self, completed: list[tuple[str, bytes]]) -> None:
        """Files thread: write full bundles and tiles (not fsync'd: the journal holds their records
        until a sync job has made them durable and the journal rotates past them)."""
        for rel, data in completed:
            path = self.directory / rel
            parent = path.parent
            missing = []
            while not parent.exists():
                missing.append(parent)
                parent = parent.parent
            for d in reversed(missing):
                d.mkdir()
                self._unsynced_dirs.add(d.parent)
            try:
                same = path.read_bytes() == data  # left by a run that crashed before rotating
            except FileNotFoundError:
                same = False
            if not same:
                _write_file(path, data, durable=False)
            self._unsynced.append(path)
            self._unsynced_dirs.add(path.parent)

    def _sync_full_files(self) -> None:
        """Files thread: fsync the full files written so far (those of the jobs queued before)."""
        files, dirs = self._unsynced, self._unsynced_dirs
        self._unsynced, self._unsynced_dirs = [], set()
        _sync_files(files, dirs)

    def _rotate_when_synced(self) -> None:
        """Rotation in four steps, each started once the one before is done, off the commit path:
        fsync the full files not yet published (files thread; usually none), copy the journal's
        tail past them to a new journal (files thread), catch up with the frames written since and
        write to both (here), make the new one durable and rename it (files thread)."""
        if self._replacing is not None:
            if self._replacing.done():
                self._close_old_journal()
        elif self._rotation is not None:
            if self._rotation.done():
                job, self._rotation = self._rotation, None
                self._switch_journal(*job.result())
        elif self._sync_job is not None:
            if self._sync_job.done():
                job, self._sync_job = self._sync_job, None
                job.result()
                self._rotation = self._submit(self._prepare_journal, self._sync_target,
                                              self._bundle_offsets[self._sync_target], self._journal_end)
        elif self._derived_upto - self._journal_start >= self.rotate_bundles * TILE_WIDTH:
            self._sync_target = self._derived_upto
            self._sync_job = self._submit(self._sync_full_files)

    def _prepare_journal(self, start: int, offset: int, end: int) -> tuple[int, int]:
        """Files thread: a new journal starting at record `start` holding the journal's frames from
        byte `offset` to `end` (already written, so stable while commits go on), made durable."""
        tail = os.pread(self._journal_fd, end - offset, offset)
        fd = os.open(self.directory / ".journal.tmp", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _pwrite_all(fd, JOURNAL_HEADER.pack(JOURNAL_MAGIC, start) + tail, 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        return fd, end

    def _switch_journal(self, fd: int, copied: int) -> None:
        """Add the frames written since the copy to the new journal (not yet durable: the old one
        holds them) and have later commits written to both until the files thread has made the
        new one durable and put it in the old one's place."""
        start = self._sync_target
        shift = self._bundle_offsets[start] - JOURNAL_HEADER.size  # old offset - new offset
        try:
            if self._journal_end > copied:
                _pwrite_all(fd, os.pread(self._journal_fd, self._journal_end - copied, copied), copied - shift)
        except BaseException:
            os.close(fd)
            raise
        self._old_journal = (self._journal_fd, self._journal_end)
        self._journal_fd = fd
        self._bundle_offsets = {n: o - shift for n, o in self._bundle_offsets.items() if n > start}
        self._journal_start = start
        self._journal_end -= shift
        self._replacing = self._submit(self._replace_journal, fd)

    def _replace_journal(self, fd: int) -> None:
        """Files thread: make the new journal durable (its later frames are fdatasync'd by their
        commits) and rename it over the old one."""
        os.fdatasync(fd)
        os.replace(self.directory / ".journal.tmp", self.directory / "journal")
        _fsync_dir(self.directory)

    def _close_old_journal(self) -> None:
        """Once the new journal's rename is durable (or failed: then raise), stop writing the old one."""
        job, self._replacing = self._replacing, None
        os.close(self._old_journal[0])
        self._old_journal = None
        job.result()

    # ---- derived files and closing --------------------------------------------------------------

    def publish(self, wait: bool = True) -> None:
        """Have the full files before the newest checkpoint made durable, then its partial tiles
        and the checkpoint file written, so a tlog-tiles client sees a consistent log; `wait` for
        that and every file job before it."""
        if self._publish_size != self.checkpoint_size:
            self._publish_size = self.checkpoint_size
            self._queue_full_files()
            self._publications += 1
            self._jobs.append(self._submit(self._write_published, self._partial_tiles(), self.checkpoint_note,
                                           self._publications))
        if wait:
            self._check_files_thread(wait=True)

    def _partial_tiles(self) -> dict[Path, bytes]:
        wanted: dict[Path, bytes] = {}
        width0 = self.size % TILE_WIDTH
        if width0:
            n = self.size // TILE_WIDTH
            wanted[self.directory / tile_path("entries", n, width0)] = b"".join(self._bundle)
        for level, rows in enumerate(self._tree.levels):
            if rows[0]:
                n = self.size >> (TILE_HEIGHT * (level + 1))
                wanted[self.directory / tile_path(level, n, len(rows[0]))] = b"".join(rows[0])
        return wanted

    def _write_published(self, partial_tiles: dict[Path, bytes], checkpoint_note: bytes, number: int) -> None:
        """Files thread: fsync the full files written so far, then write the partial tiles (not
        fsync'd: the journal is their durable copy), remove those of earlier sizes, and write the
        checkpoint file; nothing if a newer publication is queued behind this one."""
        time.sleep(max(0.0, self._published_at + self.publish_spacing - time.monotonic()))
        if number != self._publications:
            return
        self._published_at = time.monotonic()
        self._sync_full_files()
        wanted = partial_tiles
        for path, data in wanted.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_file(path, data, durable=False)
        for old in self._partial_written - wanted.keys():
            try:
                old.unlink()
                if not any(old.parent.iterdir()):
                    shutil.rmtree(old.parent, ignore_errors=True)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    raise
        self._partial_written = set(wanted)
        _write_durable(self.directory / "checkpoint", checkpoint_note)
        _fsync_dir(self.directory)
        if self.on_publish is not None:
            self.on_publish()

    def finish_sync(self) -> None:
        """On close: finish the file jobs and a rotation in progress."""
        self._queue_full_files()
        self._check_files_thread(wait=True)
        while self._sync_job is not None or self._rotation is not None or self._replacing is not None:
            (self._replacing or self._rotation or self._sync_job).exception()  # wait; _rotate_when_synced raises it
            self._rotate_when_synced()

    def close_files(self) -> None:
        if self._files is not None:
            self._files.shutdown(wait=True)
            self._files = None
            if self._rotation is not None and self._rotation.exception() is None:
                os.close(self._rotation.result()[0])  # a rotation left unfinished: the journal stays as it is
            if self._old_journal is not None:
                os.close(self._old_journal[0])
                self._old_journal = None
        for attr in ("_journal_fd", "_lock_fd"):
            fd = getattr(self, attr)
            if fd >= 0:
                os.close(fd)
                setattr(self, attr, -1)
