"""One trace log per machine: a writer process serving records over a Unix socket, and its client.

Longer than 400 lines: the writer and its client are the two ends of one wire format (below),
kept side by side.

Several proxy worker processes cannot share one `LogStore` (it is a single writer holding the
directory's lock), and one process doing everything is bound to one core by the GIL. So the
writer runs in its own process (`serve`): it reads whatever records every connected worker has
sent, commits them as one batch (one journal write, one fdatasync, one signed checkpoint), and
answers each worker with the leaf indices of its records. A record is acknowledged only once it
is durable, exactly as with the in-process `TraceLog`. The hashing and signing happen in the
writer's process, on another core than the workers' event loops.

`RemoteTraceLog` is the worker side, with TraceLog's API (`await append(record)`, `append_sync`, `stalled_for`,
`failure`, `tree_size`, `last_checkpoint_time`, `records_appended`, `close()`). Its socket is
read by its own thread, so `append_sync` may block the event loop without deadlocking. If the
writer goes away, `failure` is set and every new append raises TraceError (fail closed) until the
client has reconnected to a writer that is back; but records already sent and not acknowledged, and
appends made with `retry=True` (completions of transfers that already crossed), are held for up to
RETRY_WINDOW seconds and sent again to the next writer, marked as resent. The old writer may have
made a resent record durable before it died without answering: the new writer looks each resent
record up among the log's recent records (the journal, read at start, and its own commits since) and
answers it with the leaf it already has instead of appending it twice. Records are never dropped
silently: one that cannot be sent within the window fails its waiter.

Wire format (both directions big-endian):
  worker -> writer: u32 length, then the canonical record (see encode_record); a worker sends
                    the records of one event loop iteration in one write. The length's top bit
                    (RESENT) marks a record sent before to a writer that went away
  writer -> worker: b"A", u64 tree size, f64 checkpoint time, u64 first leaf index, u32 count: the
                    worker's next `count` records are durable as leaves first .. first + count - 1
                    (consecutive: a worker's records in one batch come from one read; a resent record
                    found in the log gets one of its own). Sent once on connect with count 0, then
                    per batch holding this worker's records.
                    b"E", u32 length, UTF-8 message: the log failed; the writer closes the connection
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import selectors
import signal
import socket
import struct
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future as ThreadFuture
from itertools import chain
from pathlib import Path
from typing import Any

from gateway.trace.deadlines import LoopDeadlines
from gateway.trace.log import (
    Waiter,
    answer_waiters,
    call_in_loop,
    encode_record,
    fail_waiters,
    open_store,
)
from gateway.trace.store import LogStore, TraceError
from gateway.trace.tiles import MAX_ENTRY, TileError, read_journal

log = logging.getLogger(__name__)

# Records handed to the writer together: their event loop (None: thread futures), entries, waiters.
Sent = tuple[asyncio.AbstractEventLoop | None, list[bytes], list[Waiter]]
_LENGTH = struct.Struct(">I")
_ACK = struct.Struct(">QdQI")
MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes including the terminating NUL
RECONNECT_INTERVAL = 0.2  # seconds between attempts while the writer is away
SEND_TIMEOUT = 10.0  # a writer that takes no record for this long is treated as gone
SYNC_APPEND_TIMEOUT = 30.0
RETRY_WINDOW = 10.0  # seconds a record waits for a writer that went away to be back (the supervisor restarts it)
RESENT = 1 << 31  # flag in a record's length: sent before, to a writer that may have committed it
RECENT_RECORDS = 1 << 15  # records a writer remembers to answer a resent one from


def _check_socket_path(path: Path) -> None:
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise TraceError(f"trace writer socket path is longer than {MAX_SOCKET_PATH} bytes: {path} "
                         "(use a shorter state_dir)")


# ---- the writer process ---------------------------------------------------------------------------


class _Peer:
    __slots__ = ("sock", "inbox", "outbox")

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.inbox = bytearray()
        self.outbox = bytearray()


class TraceWriter:
    """Serves one LogStore to any number of local clients; single-threaded (selectors)."""

    def __init__(self, store: LogStore, socket_path: Path, *, idle_flush: float = 0.2,
                 recent: list[bytes] = (), recent_start: int = 0):
        _check_socket_path(socket_path)
        self.store = store
        # The log's last records, for resent ones: entry -> leaf index (oldest first, bounded).
        self._recent: dict[bytes, int] = {}
        self._remember(recent[-RECENT_RECORDS:], recent_start + max(0, len(recent) - RECENT_RECORDS))
        self.socket_path = socket_path
        self.idle_flush = idle_flush
        self._selector = selectors.DefaultSelector()
        self._peers: dict[int, _Peer] = {}
        self._stopping = False
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        socket_path.unlink(missing_ok=True)  # left by a writer that was killed
        old_umask = os.umask(0o177)  # only the gateway's own user may hand over records
        try:
            self._listener.bind(os.fspath(socket_path))
        finally:
            os.umask(old_umask)
        self._listener.listen(128)
        self._listener.setblocking(False)
        self._selector.register(self._listener, selectors.EVENT_READ)

    def stop(self) -> None:
        """Return from `serve` once no client is connected, their records in hand committed (safe from a
        signal handler): workers told to stop at the same time (a signal to the whole process group) hand
        over the records of the transfers they finish first."""
        self._stopping = True

    def serve(self, parent_pid: int | None = None) -> None:
        """Until `stop()`, or until `parent_pid` is no longer this process's parent."""
        try:
            while not (self._stopping and not self._peers):
                events = self._selector.select(self.idle_flush)
                if not events:
                    self.store.publish(wait=False)  # derived files only: errors fail the next commit
                    if parent_pid is not None and os.getppid() != parent_pid and not self._peers:
                        # Only once no worker is connected: orphaned workers finish their transfers first.
                        log.warning("trace writer: the supervisor is gone; stopping")
                        return
                    continue
                batch: list[tuple[_Peer, list[bytes], list[int | None]]] = []
                for key, mask in events:
                    if key.fileobj is self._listener:
                        self._accept()
                        continue
                    peer = self._peers.get(key.fd)
                    if peer is None:
                        continue
                    if mask & selectors.EVENT_READ:
                        self._read(peer, batch)
                    if mask & selectors.EVENT_WRITE and peer.sock.fileno() >= 0:
                        self._flush(peer)
                if batch:
                    self._commit(batch)
            self.store.finish_sync()
            self.store.publish()
        finally:
            self._close()

    def _accept(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except BlockingIOError:
            return
        sock.setblocking(False)
        peer = _Peer(sock)
        self._peers[sock.fileno()] = peer
        self._selector.register(sock, selectors.EVENT_READ)
        size = self.store.checkpoint_size
        peer.outbox += b"A" + _ACK.pack(size, self.store.checkpoint_time, size, 0)
        self._flush(peer)

    def _read(self, peer: _Peer, batch: list[tuple[_Peer, list[bytes], list[int | None]]]) -> None:
        try:
            data = peer.sock.recv(1 << 20)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(peer)
            return
        if peer.inbox:
            peer.inbox += data
            data = bytes(peer.inbox)
        entries = []
        known: list[int | None] = []  # a resent record's leaf when the log holds it already
        offset, end = 0, len(data)
        while end - offset >= 4:
            length = int.from_bytes(data[offset:offset + 4])
            resent, length = length & RESENT, length & ~RESENT
            if not 0 < length <= MAX_ENTRY:  # the store would refuse the whole batch: drop only this client
                log.error("trace writer: a client sent a %d-byte record; dropping the client", length)
                self._drop(peer)
                break
            if end - offset - 4 < length:
                break
            entry = data[offset + 4:offset + 4 + length]
            entries.append(entry)
            known.append(self._recent.get(entry) if resent else None)
            offset += 4 + length
        peer.inbox[:] = data[offset:]
        if entries:
            batch.append((peer, entries, known))

    def _commit(self, batch: list[tuple[_Peer, list[bytes], list[int | None]]]) -> None:
        new = [entry for _, entries, known in batch for entry, leaf in zip(entries, known) if leaf is None]
        try:
            first = self.store.commit(new) if new else self.store.size
        except Exception as exc:  # fail closed: tell every client, then stop (a fresh writer recovers)
            raise self._failed(exc) from exc
        self._remember(new, first)
        size, when = self.store.checkpoint_size, self.store.checkpoint_time
        for peer, entries, known in batch:
            answer = bytearray()
            run = 0  # new records since the last answer
            for leaf in known:
                if leaf is None:
                    run += 1
                    continue
                if run:
                    answer += b"A" + _ACK.pack(size, when, first, run)
                    first, run = first + run, 0
                answer += b"A" + _ACK.pack(size, when, leaf, 1)
            if run:
                answer += b"A" + _ACK.pack(size, when, first, run)
                first += run
            if peer.sock.fileno() >= 0:  # else the client left before its answer; its records are durable all the same
                peer.outbox += answer
                self._flush(peer)
        try:
            self.store.maintain()  # derived files, once the batch is answered
        except Exception as exc:
            raise self._failed(exc) from exc

    def _remember(self, entries: list[bytes], first: int) -> None:
        recent = self._recent
        recent.update(zip(entries, range(first, first + len(entries))))
        while len(recent) > RECENT_RECORDS:
            del recent[next(iter(recent))]

    def _failed(self, exc: Exception) -> TraceError:
        """Tell every client that the log failed; the error to stop with."""
        message = f"trace log write failed, forwarding must stop: {exc}".encode()
        for peer in list(self._peers.values()):
            peer.outbox += b"E" + _LENGTH.pack(len(message)) + message
            self._flush(peer)
        return TraceError(message.decode())

    def _flush(self, peer: _Peer) -> None:
        try:
            sent = peer.sock.send(peer.outbox)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._drop(peer)
            return
        del peer.outbox[:sent]
        self._selector.modify(peer.sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if peer.outbox else 0))

    def _drop(self, peer: _Peer) -> None:
        fd = peer.sock.fileno()
        if fd < 0:
            return
        self._peers.pop(fd, None)
        self._selector.unregister(peer.sock)
        peer.sock.close()

    def _close(self) -> None:
        for peer in list(self._peers.values()):
            self._drop(peer)
        self._selector.unregister(self._listener)
        self._listener.close()
        self._selector.close()
        self.socket_path.unlink(missing_ok=True)
        self.store.close_files()


def main(argv: list[str] | None = None) -> int:
    """`python -m gateway.trace.remote`: the writer process (started by the gateway's supervisor)."""
    parser = argparse.ArgumentParser(prog="gateway-trace-writer", description=main.__doc__)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--origin", required=True)
    parser.add_argument("--key", type=Path, required=True)
    parser.add_argument("--socket", type=Path, required=True)
    parser.add_argument("--parent", type=int, help="stop when this process is no longer the parent")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args.dir.mkdir(parents=True, exist_ok=True)
        store = open_store(args.dir, args.origin, args.key)
        # What a writer that died may have made durable without answering: the journal's records.
        journal = read_journal(args.dir / "journal")
        durable = journal.entries[:store.size - journal.start]
        writer = TraceWriter(store, args.socket, recent=durable, recent_start=journal.start)
    except (TraceError, TileError, OSError) as exc:
        print(f"gateway trace writer: {exc}", file=sys.stderr, flush=True)
        return 1
    # Ctrl-C reaches the whole process group: the supervisor stops the writer last, with SIGTERM,
    # once no worker can hand over a record any more. A SIGTERM to the whole group reaches it with the
    # workers: it then serves them until the last is gone (stop()).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: writer.stop())
    try:
        writer.serve(args.parent)
    except TraceError as exc:
        print(f"gateway trace writer: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


# ---- the worker side ------------------------------------------------------------------------------


class RemoteTraceLog:
    """A worker's handle on the machine's trace log (same API as TraceLog)."""

    def __init__(self, socket_path: Path, *, fields: dict[str, Any] | None = None):
        _check_socket_path(socket_path)
        self.socket_path = socket_path
        self.fields = fields or {}  # added to every record, e.g. {"worker": 1}
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()  # pending order == byte order on the socket
        # The records sent and not yet answered, by burst: (their loop or None, entries, waiters).
        self._pending: deque[Sent] = deque()
        self._unanswered_since: float | None = None  # monotonic: records pending and no answer since
        # Records waiting for a writer that went away, to be sent again (RETRY_WINDOW): (deadline, burst).
        self._held: deque[tuple[float, Sent]] = deque()
        self._bursts: dict[asyncio.AbstractEventLoop, tuple[list[bytes], list[asyncio.Future], list[bool]]] = {}
        self._deadlines: dict[asyncio.AbstractEventLoop, LoopDeadlines] = {}
        self._failure: TraceError | None = TraceError("trace writer not connected yet")
        self._connected = threading.Event()
        self._closed = False
        self._tree_size = 0
        self._checkpoint_time = 0.0
        self._acknowledged = 0
        self._thread = threading.Thread(target=self._run, name="trace-client", daemon=True)

    @classmethod
    def connect(cls, socket_path: Path, *, fields: dict[str, Any] | None = None,
                wait: float = 5.0) -> "RemoteTraceLog":
        """A client whose connection is up (waiting at most `wait` seconds; after that it keeps
        trying in the background, failing closed meanwhile)."""
        client = cls(Path(socket_path), fields=fields)
        client._thread.start()
        client._connected.wait(wait)
        return client

    # TraceLog's API.

    async def append(self, record: dict[str, Any], retry: bool = False, timeout: float | None = None) -> int:
        """Leaf index of `record`, once the writer has made it and a checkpoint covering it durable;
        TimeoutError past `timeout` seconds (the record stays with the writer, and may still be written).
        While the writer is away this raises TraceError at once, unless `retry`: then the record
        waits for the writer to be back (up to RETRY_WINDOW)."""
        entry = self._encode(record)
        loop = asyncio.get_running_loop()
        if self._failure is not None and not retry:
            raise self._failure
        fut = loop.create_future()
        burst = self._bursts.get(loop)
        if burst is None:
            burst = self._bursts[loop] = ([], [], [])
            loop.call_soon(self._hand_over, loop)  # one send per loop iteration, like GroupCommitter
        burst[0].append(entry)
        burst[1].append(fut)
        burst[2].append(retry)
        if timeout is not None:
            self._deadlines.setdefault(loop, LoopDeadlines()).watch(fut, timeout)
        return await fut

    def append_sync(self, record: dict[str, Any], retry: bool = False, timeout: float = SYNC_APPEND_TIMEOUT) -> int:
        fut: ThreadFuture = ThreadFuture()
        self._send(None, [self._encode(record)], [fut], [retry])
        try:
            return fut.result(timeout)
        except TimeoutError:
            raise TraceError(f"trace writer gave no answer within {timeout:g} s") from None

    @property
    def failure(self) -> TraceError | None:
        return self._failure

    @property
    def stalled_for(self) -> float:
        """Seconds the writer has answered nothing while records wait for it (stopped, a hung disk); 0
        when none waits. A writer that went away sets `failure` instead."""
        since = self._unanswered_since
        return time.monotonic() - since if since is not None else 0.0

    @property
    def tree_size(self) -> int:
        return self._tree_size

    @property
    def last_checkpoint_time(self) -> float:
        return self._checkpoint_time

    @property
    def records_appended(self) -> int:
        """Records this client handed over and got acknowledged."""
        return self._acknowledged

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._lock:
            if self._sock is not None:
                _shutdown(self._sock)
        self._thread.join(5)
        with self._lock:
            self._fail_locked(TraceError("trace log is closed"))

    # Sending.

    def _encode(self, record: dict[str, Any]) -> bytes:
        return encode_record({**record, **self.fields} if self.fields else record)

    def _hand_over(self, loop: asyncio.AbstractEventLoop) -> None:
        entries, futures, retries = self._bursts.pop(loop)
        try:
            self._send(loop, entries, futures, retries)
        except TraceError as exc:
            fail_waiters(futures, exc)

    def _send(self, loop: asyncio.AbstractEventLoop | None, entries: list[bytes], waiters: list[Waiter],
              retries: list[bool]) -> None:
        with self._lock:
            if self._failure is not None:
                held = [(entry, waiter) for entry, waiter, retry in zip(entries, waiters, retries) if retry]
                if held:
                    self._held.append((time.monotonic() + RETRY_WINDOW, (loop, *map(list, zip(*held)))))
                if len(held) == len(entries):
                    return
                if held:  # a burst both: the others fail here, the held wait
                    fail_waiters([w for w, retry in zip(waiters, retries) if not retry], self._failure)
                    return
                raise self._failure
            assert self._sock is not None
            if not self._pending:
                self._unanswered_since = time.monotonic()
            self._pending.append((loop, entries, waiters))
            try:
                self._sock.sendall(_frames(entries))
            except OSError as exc:  # a timeout too: the stream may hold half a frame, so drop it
                _shutdown(self._sock)
                self._hold_locked(TraceError(f"trace writer unavailable: {exc}"))

    # The reader thread.

    def _run(self) -> None:
        while not self._closed:
            sock = self._dial()
            if sock is None:
                self._expire_held()
                time.sleep(RECONNECT_INTERVAL)
                continue
            reason = self._receive(sock)
            failure = TraceError(f"trace writer unavailable: {reason}")
            if not self._closed and self._failure is None:
                log.error("%s; refusing transfers until it is back", failure)
            with self._lock:
                self._sock = None
                self._hold_locked(failure)
            sock.close()

    def _dial(self) -> socket.socket | None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(SEND_TIMEOUT)
            sock.connect(os.fspath(self.socket_path))
        except OSError:
            sock.close()
            return None
        with self._lock:
            self._sock = sock
        return sock

    def _receive(self, sock: socket.socket) -> str:
        """Read answers until the connection ends; returns why it ended."""
        buffer = bytearray()
        while True:
            try:
                data = sock.recv(1 << 16)
            except TimeoutError:
                continue
            except OSError as exc:
                return str(exc)
            if not data:
                return "the writer closed the connection"
            buffer += data
            offset = 0
            while len(buffer) - offset >= 1:
                kind = buffer[offset:offset + 1]
                if kind == b"A":
                    if len(buffer) - offset < 1 + _ACK.size:
                        break
                    size, when, first, count = _ACK.unpack_from(buffer, offset + 1)
                    offset += 1 + _ACK.size
                    if not self._acknowledge(size, when, first, count):
                        return f"the writer acknowledged {count} records, more than were sent"
                elif kind == b"E":
                    if len(buffer) - offset < 5:
                        break
                    (length,) = _LENGTH.unpack_from(buffer, offset + 1)
                    if len(buffer) - offset - 5 < length:
                        break
                    return buffer[offset + 5:offset + 5 + length].decode(errors="replace")
                else:
                    return f"unexpected answer {bytes(kind)!r}"
            del buffer[:offset]

    def _acknowledge(self, size: int, when: float, first: int, count: int) -> bool:
        """Answer the next `count` waiters (leaves first, first + 1, ...); False if fewer are pending."""
        answers = []
        with self._lock:
            if count > sum(len(waiters) for _, _, waiters in self._pending):
                return False
            left = count
            while left:
                loop, entries, waiters = self._pending[0]
                if len(waiters) > left:  # the writer read part of this burst so far
                    self._pending[0] = (loop, entries[left:], waiters[left:])
                    waiters = waiters[:left]
                else:
                    self._pending.popleft()
                answers.append((loop, waiters, first + count - left))
                left -= len(waiters)
            self._tree_size, self._checkpoint_time = size, when
            self._acknowledged += count
            self._unanswered_since = time.monotonic() if self._pending else None
            if self._failure is not None and not count:  # the greeting of a fresh connection
                if not self._resend_held_locked():
                    return True  # the new connection failed already; the reader sees it end
                self._failure = None
                self._connected.set()
        for loop, waiters, leaf in answers:
            call_in_loop(loop, answer_waiters, waiters, leaf)
        return True

    def _hold_locked(self, failure: TraceError) -> None:
        """The writer went away: what it was sent and did not answer waits for the next one."""
        self._failure = failure
        deadline = time.monotonic() + RETRY_WINDOW
        self._held.extend((deadline, sent) for sent in self._pending)
        self._pending.clear()
        self._unanswered_since = None

    def _resend_held_locked(self) -> bool:
        """On a fresh connection, before anything new: the held records, marked as resent."""
        if not self._held:
            return True
        held = [sent for _, sent in self._held]
        try:
            self._sock.sendall(b"".join(_frames(entries, RESENT) for _, entries, _ in held))
        except OSError:
            _shutdown(self._sock)
            return False
        self._held.clear()
        self._pending.extend(held)
        self._unanswered_since = time.monotonic()
        log.warning("trace writer back: %d held records sent again", sum(len(e) for _, e, _ in held))
        return True

    def _expire_held(self) -> None:
        now = time.monotonic()
        with self._lock:
            while self._held and self._held[0][0] <= now:
                _, (loop, _, waiters) = self._held.popleft()
                call_in_loop(loop, fail_waiters, waiters, TraceError(
                    f"trace writer away for more than {RETRY_WINDOW:.0f} s: record not written"))

    def _fail_locked(self, failure: TraceError) -> None:
        self._failure = failure
        failed = [*self._pending, *(sent for _, sent in self._held)]
        self._pending.clear()
        self._unanswered_since = None
        self._held.clear()
        for loop, _, waiters in failed:
            call_in_loop(loop, fail_waiters, waiters, failure)

    def __enter__(self) -> "RemoteTraceLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _frames(entries: list[bytes], flags: int = 0) -> bytes:
    return b"".join(chain.from_iterable(zip((_LENGTH.pack(len(e) | flags) for e in entries), entries)))


def _shutdown(sock: socket.socket) -> None:
    """Wake the reader thread: its recv returns at once."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already disconnected


if __name__ == "__main__":
    sys.exit(main())
