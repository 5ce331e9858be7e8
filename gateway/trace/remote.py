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

`RemoteTraceLog` is the worker side, with TraceLog's API (`await append(record)`, `append_sync`,
`failure`, `tree_size`, `last_checkpoint_time`, `records_appended`, `close()`). Its socket is
read by its own thread, so `append_sync` may block the event loop without deadlocking. If the
writer goes away, `failure` is set and every append raises TraceError (fail closed) until the
client has reconnected to a writer that is back.

Wire format (both directions big-endian):
  worker -> writer: u32 length, then the canonical record (see encode_record); a worker sends
                    the records of one event loop iteration in one write
  writer -> worker: b"A", u64 tree size, f64 checkpoint time, u64 first leaf index, u32 count: the
                    worker's next `count` records are durable as leaves first .. first + count - 1
                    (consecutive: a worker's records in one batch come from one read). Sent once on
                    connect with count 0, then once per batch holding this worker's records.
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

from gateway.trace.log import (
    Waiter,
    answer_waiters,
    call_in_loop,
    encode_record,
    fail_waiters,
    open_store,
)
from gateway.trace.store import LogStore, TraceError
from gateway.trace.tiles import MAX_ENTRY

log = logging.getLogger(__name__)

_LENGTH = struct.Struct(">I")
_ACK = struct.Struct(">QdQI")
MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes including the terminating NUL
RECONNECT_INTERVAL = 0.2  # seconds between attempts while the writer is away
SEND_TIMEOUT = 10.0  # a writer that takes no record for this long is treated as gone
SYNC_APPEND_TIMEOUT = 30.0


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

    def __init__(self, store: LogStore, socket_path: Path, *, idle_flush: float = 0.2):
        _check_socket_path(socket_path)
        self.store = store
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
        """Finish the batch in hand and return from `serve` (safe from a signal handler)."""
        self._stopping = True

    def serve(self, parent_pid: int | None = None) -> None:
        """Until `stop()`, or until `parent_pid` is no longer this process's parent."""
        try:
            while not self._stopping:
                events = self._selector.select(self.idle_flush)
                if not events:
                    self.store.publish(wait=False)  # derived files only: errors fail the next commit
                    if parent_pid is not None and os.getppid() != parent_pid:
                        log.warning("trace writer: the supervisor is gone; stopping")
                        return
                    continue
                batch: list[tuple[_Peer, list[bytes]]] = []
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

    def _read(self, peer: _Peer, batch: list[tuple[_Peer, list[bytes]]]) -> None:
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
        offset, end = 0, len(data)
        while end - offset >= 4:
            length = int.from_bytes(data[offset:offset + 4])
            if not 0 < length <= MAX_ENTRY:  # the store would refuse the whole batch: drop only this client
                log.error("trace writer: a client sent a %d-byte record; dropping the client", length)
                self._drop(peer)
                break
            if end - offset - 4 < length:
                break
            entries.append(data[offset + 4:offset + 4 + length])
            offset += 4 + length
        peer.inbox[:] = data[offset:]
        if entries:
            batch.append((peer, entries))

    def _commit(self, batch: list[tuple[_Peer, list[bytes]]]) -> None:
        try:
            first = self.store.commit(batch[0][1] if len(batch) == 1 else
                                      [entry for _, entries in batch for entry in entries])
        except Exception as exc:  # fail closed: tell every client, then stop (a fresh writer recovers)
            raise self._failed(exc) from exc
        size, when = self.store.checkpoint_size, self.store.checkpoint_time
        for peer, entries in batch:
            if peer.sock.fileno() >= 0:  # else the client left before its answer; its records are durable all the same
                peer.outbox += b"A" + _ACK.pack(size, when, first, len(entries))
                self._flush(peer)
            first += len(entries)
        try:
            self.store.maintain()  # derived files, once the batch is answered
        except Exception as exc:
            raise self._failed(exc) from exc

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
        writer = TraceWriter(open_store(args.dir, args.origin, args.key), args.socket)
    except (TraceError, OSError) as exc:
        print(f"gateway trace writer: {exc}", file=sys.stderr, flush=True)
        return 1
    # Ctrl-C reaches the whole process group: the supervisor stops the writer last, with SIGTERM,
    # once no worker can hand over a record any more.
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
        # Waiters of the records sent and not yet answered, by burst: (their loop or None, waiters).
        self._pending: deque[tuple[asyncio.AbstractEventLoop | None, list[Waiter]]] = deque()
        self._bursts: dict[asyncio.AbstractEventLoop, tuple[list[bytes], list[asyncio.Future]]] = {}
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

    async def append(self, record: dict[str, Any]) -> int:
        """Leaf index of `record`, once the writer has made it and a checkpoint covering it durable."""
        entry = self._encode(record)
        loop = asyncio.get_running_loop()
        if self._failure is not None:
            raise self._failure
        fut = loop.create_future()
        burst = self._bursts.get(loop)
        if burst is None:
            burst = self._bursts[loop] = ([], [])
            loop.call_soon(self._hand_over, loop)  # one send per loop iteration, like GroupCommitter
        burst[0].append(entry)
        burst[1].append(fut)
        return await fut

    def append_sync(self, record: dict[str, Any]) -> int:
        fut: ThreadFuture = ThreadFuture()
        self._send(None, [self._encode(record)], [fut])
        try:
            return fut.result(SYNC_APPEND_TIMEOUT)
        except TimeoutError:
            raise TraceError(f"trace writer gave no answer within {SYNC_APPEND_TIMEOUT:.0f} s") from None

    @property
    def failure(self) -> TraceError | None:
        return self._failure

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
        entries, futures = self._bursts.pop(loop)
        try:
            self._send(loop, entries, futures)
        except TraceError as exc:
            fail_waiters(futures, exc)

    def _send(self, loop: asyncio.AbstractEventLoop | None, entries: list[bytes], waiters: list[Waiter]) -> None:
        frames = b"".join(chain.from_iterable(zip(map(_LENGTH.pack, map(len, entries)), entries)))
        with self._lock:
            if self._failure is not None:
                raise self._failure
            assert self._sock is not None
            self._pending.append((loop, waiters))
            try:
                self._sock.sendall(frames)
            except OSError as exc:  # a timeout too: the stream may hold half a frame, so drop it
                _shutdown(self._sock)
                self._fail_locked(TraceError(f"trace writer unavailable: {exc}"))
                raise self._failure from None

    # The reader thread.

    def _run(self) -> None:
        while not self._closed:
            sock = self._dial()
            if sock is None:
                time.sleep(RECONNECT_INTERVAL)
                continue
            reason = self._receive(sock)
            failure = TraceError(f"trace writer unavailable: {reason}")
            if not self._closed and self._failure is None:
                log.error("%s; refusing transfers until it is back", failure)
            with self._lock:
                self._sock = None
                self._fail_locked(failure)
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
            if count > sum(len(waiters) for _, waiters in self._pending):
                return False
            left = count
            while left:
                loop, waiters = self._pending[0]
                if len(waiters) > left:  # the writer read part of this burst so far
                    self._pending[0] = (loop, waiters[left:])
                    waiters = waiters[:left]
                else:
                    self._pending.popleft()
                answers.append((loop, waiters, first + count - left))
                left -= len(waiters)
            self._tree_size, self._checkpoint_time = size, when
            self._acknowledged += count
            if self._failure is not None and not count:  # the greeting of a fresh connection
                self._failure = None
                self._connected.set()
        for loop, waiters, leaf in answers:
            call_in_loop(loop, answer_waiters, waiters, leaf)
        return True

    def _fail_locked(self, failure: TraceError) -> None:
        self._failure = failure
        pending, self._pending = self._pending, deque()
        for loop, waiters in pending:
            call_in_loop(loop, fail_waiters, waiters, failure)

    def __enter__(self) -> "RemoteTraceLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _shutdown(sock: socket.socket) -> None:
    """Wake the reader thread: its recv returns at once."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already disconnected


if __name__ == "__main__":
    sys.exit(main())
