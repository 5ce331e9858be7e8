"""Which client connections are idle HTTP/1 keep-alive connections: what a graceful stop may close
without cutting a request (gateway.proxy.engine).

mitmproxy keeps no such list. `install()` registers each HTTP/1 server layer under its client
connection's id as it is made; a connection is idle when its layer waits for the head of a next request
with no byte of one received, and every byte of its last answer has left the process.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

from mitmproxy.proxy.layers.http._http1 import Http1Server
from mitmproxy.proxy.server import ConnectionHandler

from gateway.proxy.patches import wrap_method

_servers: weakref.WeakValueDictionary[str, Http1Server] = weakref.WeakValueDictionary()  # client id -> layer


def install() -> None:
    wrap_method(Http1Server, "__init__", _registered, ("self.stream_id = 1",))


def _registered(original: Callable) -> Callable:
    def __init__(self: Http1Server, context) -> None:
        original(self, context)
        _servers[context.client.id] = self  # a tunnel's inner requests: the newest layer serves them

    return __init__


def idle_http1(handler: ConnectionHandler) -> bool:
    server = _servers.get(handler.client.id)
    if server is None or server.state != server.read_headers or len(server.buf):
        return False
    io = handler.transports.get(handler.client)
    return io is not None and io.writer is not None and io.writer.transport.get_write_buffer_size() == 0
