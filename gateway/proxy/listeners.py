"""The listening sockets several workers share: bound once by the supervisor (SO_REUSEPORT), handed down
to each worker, and served there by mitmproxy.

`install_inherited_listeners` is the small extension point into mitmproxy that makes a worker serve
the sockets it was handed (tests/test_workers.py fails loudly when a mitmproxy upgrade changes it).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import socket
from dataclasses import dataclass

from gateway.config.load import Listener, format_host_port

log = logging.getLogger(__name__)


def reuse_port_socket(listener: Listener) -> socket.socket:
    """A listening TCP socket on the listener's address that others of ours may share (SO_REUSEPORT)."""
    family = socket.AF_INET6 if ":" in listener.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((listener.host, listener.port))
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"listener {listener.name} cannot listen on "
                                 f"{format_host_port(listener.host, listener.port)}: {exc.strerror or exc}") from None
    sock.set_inheritable(False)  # handed down explicitly (pass_fds), one per worker
    return sock


_LISTEN_CALL = "asyncio.start_server(self.handle_stream, host, port)"


def install_inherited_listeners(sockets: dict[tuple[str, int], socket.socket]) -> None:
    """Make mitmproxy's TCP listeners serve the sockets handed down by the supervisor, by address.
    An address without one (a listener added by a reload) is bound here, shared through SO_REUSEPORT
    with the other workers. mitmproxy 12 calls `asyncio.start_server(handler, host, port)` in
    AsyncioServerInstance.listen; this wraps that method and refuses to run if its source changed."""
    from mitmproxy.proxy.mode_servers import AsyncioServerInstance

    current = AsyncioServerInstance.listen
    original = getattr(current, "gateway_original", current)
    if _LISTEN_CALL not in inspect.getsource(original):
        raise RuntimeError("mitmproxy's AsyncioServerInstance.listen changed: review gateway/proxy/listeners.py")

    async def listen(self, host: str, port: int) -> list:
        if self.mode.transport_protocol != "tcp":
            return await original(self, host, port)
        sock = sockets.get((host, port))
        if sock is not None:
            # A duplicate: mitmproxy closes its server when a reload changes the listeners, and the
            # handed-down socket may be needed again by a later reload.
            return [await asyncio.start_server(self.handle_stream, sock=sock.dup())]
        return [await asyncio.start_server(self.handle_stream, host, port, reuse_port=True)]

    listen.gateway_original = original
    AsyncioServerInstance.listen = listen


async def stop_listening(server) -> int:
    """Stop one of mitmproxy's server instances (a graceful stop) without dropping a connection the
    kernel already took for it: closing a listening socket resets the connections in its accept queue,
    whose clients may have sent a request already, and a worker's socket stays open in its supervisor,
    so it would go on queueing connections nobody accepts until the worker exits. Instead, what is
    queued is accepted and served like any other connection accepted before the stop (HTTP/1: its
    request served, the connection closed after it; gateway.filters.record), and the socket is shut
    down, for every process
    holding it: it leaves its SO_REUSEPORT group at once, so later connections go to the other workers
    or, with none listening, are refused by the kernel before any byte is read (a client may retry).
    Returns how many queued connections were taken."""
    # mitmproxy's asyncio servers of this instance (AsyncioServerInstance._servers: should mitmproxy
    # rename it, nothing is drained and tests/test_record_first.py's stop test fails); their sockets
    # are kept open by a duplicate while mitmproxy closes its own.
    servers = [s for s in getattr(server, "_servers", []) if isinstance(s, asyncio.Server)]
    fds = [sock.fileno() for s in servers for sock in s.sockets]
    listening = [socket.socket(fileno=os.dup(fd)) for fd in fds]
    loop = asyncio.get_running_loop()
    for fd in fds:
        loop.remove_reader(fd)  # the loop accepts no more
    # A connection the loop accepted just before gets its transport in a task of its own, which fails
    # (and drops it) once the server is closed: let it run first.
    await asyncio.sleep(0)
    await server.stop()
    queued = []
    for sock in listening:
        sock.setblocking(False)
        with contextlib.suppress(OSError):  # BlockingIOError: the queue is empty
            while True:
                queued.append(sock.accept()[0])
        with contextlib.suppress(OSError):  # ENOTCONN: another worker's drain shut it down first
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()
    for conn in queued:
        reader, writer = await asyncio.open_connection(sock=conn)
        task = loop.create_task(server.handle_stream(reader, writer))
        _serving.add(task)
        task.add_done_callback(_serving.discard)
    if queued:
        log.info("stopping: %d connections waiting in %s's queue taken and answered", len(queued),
                 server.mode.description)
    return len(queued)


_serving: set[asyncio.Task] = set()  # the tasks serving connections taken at a stop (kept from the collector)


def parse_listen_fds(text: str) -> dict[tuple[str, int], socket.socket]:
    """`127.0.0.1:8080=5,[::1]:8443=6` -> {(host, port): socket}."""
    sockets = {}
    for item in filter(None, text.split(",")):
        address, _, fd = item.rpartition("=")
        host, _, port = address.rpartition(":")
        sockets[(host.strip("[]"), int(port))] = socket.socket(fileno=int(fd))
    return sockets


@dataclass(frozen=True)
class WorkerRole:
    """What a worker process gets from its supervisor."""

    index: int
    count: int  # workers the supervisor runs (the configuration may have changed since it started them)
    parent: int
    listen_sockets: dict[tuple[str, int], socket.socket]
