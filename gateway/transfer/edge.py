"""What the proxy edge tells the pipeline below the addon API: flow metadata keys it sets, the
hook it runs for a request too malformed to become a flow, and how a transfer is cut."""

from __future__ import annotations

import weakref
from dataclasses import dataclass

from mitmproxy import connection, ctx, http
from mitmproxy.proxy import commands
from mitmproxy.proxy.server import ConnectionHandler

# flow.metadata key: (status, cause: UPSTREAM, MALFORMED or one below) when the error hook may answer the client.
ANSWER_STATUS = "gateway_error_answer"
UPSTREAM, MALFORMED = "upstream", "malformed"
# A request body that timed out (gateway.proxy.bodytimeout): no byte of it for body_idle_timeout, or not
# whole within body_timeout of its head (drip-fed).
BODY_IDLE, BODY_DEADLINE = "body-idle", "body-deadline"
TRAILERS = "trailers"  # HTTP/1 request trailers, refused (gateway.proxy.heads)
UPGRADE = "upgrade"  # an upstream's 101 to a protocol other than WebSocket, refused (gateway.proxy.heads)
# flow.metadata key: the seconds an upstream was given to begin its answer, when it did not and its
# connection was closed for it (gateway.proxy.upstreamdeadline): answered 504, not 502.
UPSTREAM_TIMED_OUT = "gateway_upstream_timed_out"
# flow.metadata key: "request" (from the client) or "response", when a WebSocket message too big to
# inspect closed the connection (gateway.proxy.wslimits).
TOO_BIG = "gateway_websocket_too_big"
LIMIT_ERROR = "connection limit"  # how an upstream connection refused by gateway.proxy.connlimit fails
# The balancer ("host:port") a client connection came through, for listeners taking the PROXY protocol
# (gateway.proxy.proxyproto): the client's peername is then the address the balancer vouched for.
BALANCERS: weakref.WeakKeyDictionary[connection.Client, str] = weakref.WeakKeyDictionary()


@dataclass
class MalformedRequest:
    """A request head that could not be parsed: no flow, nothing forwarded."""

    id: str
    client: connection.Client
    reason: str
    status: int                          # 400; 408 for a head too slow, 431 for one too long
    upstream: tuple[str, int] | None = None  # where the connection leads, when known (a CONNECT tunnel's target)
    transfer: object | None = None       # the pipeline's Transfer for it (set by the identify stage)
    answer: http.Response | None = None  # what the client gets instead of mitmproxy's page


@dataclass
class MalformedRequestHook(commands.StartHook):
    malformed: MalformedRequest


@dataclass
class ReleaseHeldRequestHook(commands.StartHook):
    """A held request body passed its verdict: its head leaves right after this hook (the upstream
    connection opened first), unless the hook sets `flow.response` (then that is the answer)."""
    flow: http.HTTPFlow


def connection_handler(client: connection.Client) -> ConnectionHandler | None:
    """The handler mitmproxy serves a client connection with (None once it has ended)."""
    proxyserver = ctx.master.addons.get("proxyserver")
    return proxyserver.connections.get(client.id) if proxyserver else None


def cut(flow) -> None:
    """Close both sides of a transfer whose streamed body earned a block: the upstream got at most the
    headers and never a byte of the withheld body, and the client gets no answer but the cut."""
    flow.kill()
    handler = connection_handler(flow.client_conn)
    if handler is None:
        return
    for side in (flow.server_conn, flow.client_conn):
        io = handler.transports.get(side)
        if io is None:
            continue
        if io.writer is not None:
            # Abort, not close: nothing still queued (such as a chunked body's terminator) may follow.
            io.writer.transport.abort()
        handler.close_connection(side)
