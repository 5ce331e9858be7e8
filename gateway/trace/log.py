"""In-process trace log API: canonical record encoding and group commit on one writer thread.

Producers (asyncio tasks on mitmproxy's loop, or plain threads) hand encoded records to
`GroupCommitter.submit`; the writer thread takes everything queued, commits it to the `LogStore`
with one journal fdatasync and one checkpoint, then answers every producer of the batch (one call
into each event loop per burst of records), and only then keeps up the derived files. A record
therefore waits at most for the commit in flight plus its own. Several worker processes share one
log through the writer process in remote.py instead.

A write that fails (a full disk) stops the log: every append raises TraceError. The writer thread then
opens the directory again every RETRY_INTERVAL, recovering it as after a crash (the unacknowledged
tail of the failed write is cut off); once that succeeds, appends are taken again, without a restart.
"""

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future as ThreadFuture
from pathlib import Path
from typing import Any

import orjson

from gateway.trace.deadlines import LoopDeadlines
from gateway.trace.note import SIG_ED25519, NoteError, load_or_create_signer
from gateway.trace.store import ROTATE_BUNDLES, LogStore, TraceError
from gateway.trace.tiles import MAX_ENTRY
from gateway.trace.witness import WitnessConfig, push_checkpoint

log = logging.getLogger(__name__)

Waiter = asyncio.Future | ThreadFuture
# Records handed over together: their event loop (None: thread futures), entries and waiters.
Burst = tuple[asyncio.AbstractEventLoop | None, list[bytes], list[Waiter]]
RETRY_INTERVAL = 1.0  # seconds between attempts to open a failed log again


def encode_record(record: dict[str, Any]) -> bytes:
    """Canonical encoding: sorted keys, no whitespace, UTF-8 (the leaf data of the tree). For the
    str, int, bool, None, list and dict values records hold it is byte for byte
    json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False); orjson makes
    it about eight times faster. (Records carry no floats; orjson would write NaN as null.)"""
    if not isinstance(record, dict):
        raise TraceError(f"a trace record must be a dict, not {type(record).__name__}")
    try:
        data = orjson.dumps(record, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError as exc:
        raise TraceError(f"trace record is not canonical JSON: {exc}") from None
    if len(data) > MAX_ENTRY:
        raise TraceError(f"trace record of {len(data)} bytes exceeds the {MAX_ENTRY}-byte entry limit")
    return data


def answer_waiters(waiters: list[Waiter], first: int) -> None:
    """waiters[i] gets leaf index first + i; run on the waiters' event loop for asyncio futures."""
    for leaf, waiter in enumerate(waiters, first):
        if not waiter.done():  # a cancelled producer: its record is durable all the same
            waiter.set_result(leaf)


def fail_waiters(waiters: list[Waiter], error: BaseException) -> None:
    for waiter in waiters:
        if not waiter.done():
            waiter.set_exception(error)


def call_in_loop(loop: asyncio.AbstractEventLoop | None, fn: Any, *args: Any) -> None:
    """fn(*args) on `loop` (one wake-up for a whole burst), or here for thread futures."""
    if loop is None:
        fn(*args)
        return
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        pass  # loop already closed: nobody is waiting


class GroupCommitter:
    """One writer thread batching submissions into durable commits; fails closed on any error."""

    def __init__(self, store: LogStore, *, max_batch: int = 16384, max_wait: float = 0.0,
                 idle_flush: float = 0.2, reopen: Callable[[], LogStore] | None = None) -> None:
        self.store = store
        self.reopen = reopen  # a fresh store on the same directory, recovered as after a crash
        self._retry_at = 0.0
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.idle_flush = idle_flush
        self.failure: TraceError | None = None
        self.committed = 0
        self.committing_since: float | None = None  # monotonic time the batch being made durable was taken
        self._queue: deque[Burst] = deque()
        self._queued = 0  # records in _queue
        self._bursts: dict[asyncio.AbstractEventLoop, tuple[list[bytes], list[asyncio.Future]]] = {}
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="trace-log-writer", daemon=True)
        self._thread.start()

    def submit(self, entry: bytes, waiter: ThreadFuture) -> None:
        self._enqueue((None, [entry], [waiter]))

    def submit_from_loop(self, loop: asyncio.AbstractEventLoop, entry: bytes, waiter: asyncio.Future) -> None:
        """Hand records to the writer once per event loop iteration, after every producer that was
        ready has added its own: the writer then wakes once, when the loop is idle, and takes them
        all. (Waking it on the first record would make it wait for the GIL while the loop runs the
        other producers, and commit small batches.)"""
        if self.failure is not None:
            raise self.failure
        burst = self._bursts.get(loop)
        if burst is None:
            burst = self._bursts[loop] = ([], [])
            loop.call_soon(self._hand_over, loop)
        burst[0].append(entry)
        burst[1].append(waiter)

    def _hand_over(self, loop: asyncio.AbstractEventLoop) -> None:
        entries, futures = self._bursts.pop(loop)
        try:
            self._enqueue((loop, entries, futures))
        except TraceError as exc:
            fail_waiters(futures, exc)

    def _enqueue(self, burst: Burst) -> None:
        with self._cond:
            if self.failure is not None:
                raise self.failure
            if self._closing:
                raise TraceError("trace log is closed")
            was_empty = not self._queue
            self._queue.append(burst)
            self._queued += len(burst[1])
            if was_empty:
                self._cond.notify()

    def _take_batch(self) -> list[Burst] | None:
        with self._cond:
            while not self._queue:
                if self._closing:
                    return None
                if not self._cond.wait(timeout=self.idle_flush):
                    return []  # idle: upkeep, outside the lock
            if self.max_wait and self._queued < self.max_batch:
                # Bounded wait for more producers to join this batch.
                self._cond.wait_for(lambda: self._queued >= self.max_batch or self._closing,
                                    timeout=self.max_wait)
            batch = [self._queue.popleft()]  # a burst is never split
            count = len(batch[0][1])
            while self._queue and count + len(self._queue[0][1]) <= self.max_batch:
                batch.append(self._queue.popleft())
                count += len(batch[-1][1])
            self._queued -= count
            return batch

    def _run(self) -> None:
        while (batch := self._take_batch()) is not None:
            if self.failure is not None and self.reopen is not None and time.monotonic() >= self._retry_at:
                self._recover()
            if not batch:
                if self.failure is None:
                    self.store.publish(wait=False)  # derived files only: errors fail the next commit
                continue
            if self.failure is not None:
                self._answer(batch, None, self.failure)
                continue
            entries = batch[0][1] if len(batch) == 1 else [entry for _, burst, _ in batch for entry in burst]
            self.committing_since = time.monotonic()
            try:
                first = self.store.commit(entries)
            except Exception as exc:  # any write error: stop accepting records (fail closed)
                self._fail(batch, exc)
                continue
            finally:
                self.committing_since = None
            self.committed += len(entries)
            self._answer(batch, first, None)
            try:
                self.store.maintain()  # derived files, once the batch is answered
            except Exception as exc:
                self._fail([], exc)
        if self.failure is None:
            try:
                self.store.finish_sync()
                self.store.publish()
            except Exception as exc:
                self.failure = TraceError(f"trace log write failed, forwarding must stop: {exc}")

    def _recover(self) -> None:
        """Open the failed log's directory again (what a restart would do); on success take appends again."""
        self._retry_at = time.monotonic() + RETRY_INTERVAL
        failed = self.store
        try:
            failed.close_files()  # its lock too, which the fresh store takes
        except Exception:  # a file job's error: the store is dropped all the same
            pass
        try:
            store = self.reopen()
        except Exception as exc:
            log.debug("trace log still unavailable: %s", exc)
            return
        store.on_publish = failed.on_publish
        with self._cond:
            self.store = store
            self.failure = None
        log.warning("trace log writable again at %d records: taking transfers again", store.checkpoint_size)

    def _fail(self, batch: list[Burst], exc: Exception) -> None:
        failure = TraceError(f"trace log write failed, forwarding must stop: {exc}")
        failure.__cause__ = exc
        if self.failure is None:
            log.error("%s; opening it again every %.0f s", failure, RETRY_INTERVAL)
        self._retry_at = time.monotonic() + RETRY_INTERVAL
        with self._cond:
            self.failure = failure
            pending = list(self._queue)
            self._queue.clear()
            self._queued = 0
        self._answer(batch + pending, None, failure)

    @staticmethod
    def _answer(batch: list[Burst], first: int | None, error: TraceError | None) -> None:
        for loop, entries, waiters in batch:
            if error is not None:
                call_in_loop(loop, fail_waiters, waiters, error)
            else:
                call_in_loop(loop, answer_waiters, waiters, first)
                first += len(entries)

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join()


WITNESS_PUSH_SPACING = 0.5  # seconds at least between pushes: checkpoints are published up to 50 times a second


class WitnessPusher:
    """Pushes the newest published checkpoint to the witnesses on its own thread, so appends never
    wait for a witness; cosignatures land in the log directory (see gateway.trace.witness)."""

    def __init__(self, directory: Path, store: LogStore, witnesses: list[WitnessConfig]) -> None:
        self.directory = directory
        self.verifier = store.signer.verifier
        self.witnesses = witnesses
        self.last_error: str | None = None
        self._wake = threading.Event()
        self._closing = False
        self._closed = threading.Event()  # cuts the spacing short on close
        self._thread = threading.Thread(target=self._run, name="trace-log-witness", daemon=True)
        self._thread.start()

    def poke(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            for witness in self.witnesses:
                try:
                    push_checkpoint(self.directory, self.verifier, witness)
                except Exception as exc:  # a witness being down must never stop the log
                    self.last_error = f"{witness.url}: {exc}"
                    log.warning("trace log: witness push failed: %s", self.last_error)
            if self._closing and not self._wake.is_set():
                return
            self._closed.wait(WITNESS_PUSH_SPACING)

    def close(self, timeout: float = 10.0) -> None:
        self._closing = True
        self._closed.set()
        self._wake.set()
        self._thread.join(timeout)


SIGNING_KEY_FILE = "trace-signing.key"  # the gateway's, in its state folder
VERIFIER_KEY_FILE = "trace-signing.pub"  # beside it (load_or_create_signer) and in the log folder: one name


def open_store(directory: Path, origin: str, signing_key: Path, *,
               rotate_bundles: int = ROTATE_BUNDLES) -> LogStore:
    """The log directory's single writer: the signing key created on first use (its verifier key
    beside it), and a copy of the verifier key, VERIFIER_KEY_FILE, in the log directory."""
    try:
        signer = load_or_create_signer(signing_key, origin, SIG_ED25519)
    except (OSError, NoteError) as exc:
        raise TraceError(f"trace signing key: {exc}") from exc  # (its message names the file)
    store = LogStore.open(directory, signer, rotate_bundles=rotate_bundles)
    pub = directory / VERIFIER_KEY_FILE
    if not pub.exists() or pub.read_text().strip() != signer.verifier.vkey():
        pub.write_text(signer.verifier.vkey() + "\n")
    legacy = directory / "log.pub"  # its name before: one name only
    if legacy.exists() and legacy.read_text().strip() == signer.verifier.vkey():
        legacy.unlink()
    return store


class TraceLog:
    """Append-only, tamper-evident trace log (see the module docs of gateway.trace)."""

    def __init__(self, committer: GroupCommitter, pusher: WitnessPusher | None = None) -> None:
        self._committer = committer
        self._pusher = pusher
        self._deadlines: dict[asyncio.AbstractEventLoop, LoopDeadlines] = {}
        self._closed = False

    @classmethod
    def open(cls, directory: Path, *, origin: str, signing_key: Path, max_batch: int = 16384,
             max_wait: float = 0.0, rotate_bundles: int = ROTATE_BUNDLES,
             witnesses: list[WitnessConfig] | None = None) -> "TraceLog":
        directory = Path(directory)

        def reopen() -> LogStore:
            return open_store(directory, origin, Path(signing_key), rotate_bundles=rotate_bundles)

        store = reopen()
        pusher = WitnessPusher(directory, store, witnesses) if witnesses else None
        if pusher is not None:
            store.on_publish = pusher.poke
            pusher.poke()
        return cls(GroupCommitter(store, max_batch=max_batch, max_wait=max_wait, reopen=reopen), pusher)

    @property
    def _store(self) -> LogStore:
        return self._committer.store  # replaced when a failed log is opened again

    async def append(self, record: dict[str, Any], retry: bool = False, timeout: float | None = None) -> int:
        """Leaf index of `record`, returned once it and a checkpoint covering it are durable; TimeoutError
        past `timeout` seconds (the record stays queued, and may still be written).
        (`retry` is for RemoteTraceLog's API: a log that failed in this process stays failed.)"""
        entry = encode_record(record)
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._committer.submit_from_loop(loop, entry, fut)
        if timeout is not None:
            self._deadlines.setdefault(loop, LoopDeadlines()).watch(fut, timeout)
        return await fut

    def append_sync(self, record: dict[str, Any], retry: bool = False, timeout: float | None = None) -> int:
        entry = encode_record(record)
        fut: ThreadFuture = ThreadFuture()
        self._committer.submit(entry, fut)
        try:
            return fut.result(timeout)
        except TimeoutError:
            raise TraceError(f"the trace log made no record durable within {timeout:g} s") from None

    @property
    def tree_size(self) -> int:
        return self._store.checkpoint_size

    @property
    def last_checkpoint_time(self) -> float:
        return self._store.checkpoint_time

    @property
    def records_appended(self) -> int:
        return self._committer.committed

    @property
    def failure(self) -> TraceError | None:
        return self._committer.failure

    @property
    def stalled_for(self) -> float:
        """Seconds the batch being made durable has taken so far (a hung disk); 0 when none is."""
        since = self._committer.committing_since
        return time.monotonic() - since if since is not None else 0.0

    @property
    def witness_error(self) -> str | None:
        """The last failed witness push, if any (appends go on regardless)."""
        return self._pusher.last_error if self._pusher else None

    @property
    def verifier_key(self) -> str:
        return self._store.signer.verifier.vkey()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._committer.close()
        if self._pusher is not None:
            self._pusher.close()  # after the final publish: one last push
        self._store.close_files()

    def __enter__(self) -> "TraceLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
