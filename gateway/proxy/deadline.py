"""A client connection must start its first request soon after it opens.

mitmproxy closes a connection only after 10 minutes without activity, so a client that connects and
says nothing, or trickles a TLS handshake byte by byte, holds a socket (and a file descriptor of the
machine's limit) that long. The request head timeout (gateway.proxy.answers) runs only once a head has
begun; this addon covers the time before: from connecting, and again from a CONNECT's answer to the
tunnel's first request (its TLS handshake included), the client has `request_head_timeout` (and
ANSWER_GRACE more) to deliver a request head, or the connection is closed and counted. No transfer
began, so there is no trace record and nothing to answer. Later requests on a kept-alive connection
are not timed here.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from mitmproxy import connection, ctx, http

from gateway.config.runtime import Runtime
from gateway.ops.metrics import GatewayMetrics
from gateway.transfer.edge import MalformedRequest, connection_handler

log = logging.getLogger(__name__)

# A head begun just after the connection opened has its own deadline (refused 408, recorded): this
# one waits a little longer, so that answer is given first.
ANSWER_GRACE = 1.0


class DeadlineGateway(Protocol):
    runtime: Runtime
    metrics: GatewayMetrics


class FirstRequestDeadline:
    def __init__(self, gateway: DeadlineGateway):
        self.gateway = gateway
        self._timers: dict[str, asyncio.TimerHandle] = {}  # client connection id -> its deadline

    @property
    def waiting(self) -> int:
        """Connections open and still to send their first request."""
        return len(self._timers)

    def client_connected(self, client: connection.Client) -> None:
        if not client.error:  # else refused as it opened (gateway.proxy.connlimit): closed already
            self._start(client)

    def http_connect(self, flow: http.HTTPFlow) -> None:
        self._start(flow.client_conn)  # the tunnel's own first request (and its TLS handshake) next

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self._met(flow.client_conn)

    def malformed_request(self, malformed: MalformedRequest) -> None:
        self._met(malformed.client)

    def client_disconnected(self, client: connection.Client) -> None:
        self._met(client)

    def _start(self, client: connection.Client) -> None:
        self._met(client)
        self._timers[client.id] = asyncio.get_running_loop().call_later(
            ctx.options.request_head_timeout + ANSWER_GRACE, self._expired, client)

    def _met(self, client: connection.Client) -> None:
        timer = self._timers.pop(client.id, None)
        if timer is not None:
            timer.cancel()

    def _expired(self, client: connection.Client) -> None:
        self._timers.pop(client.id, None)
        handler = connection_handler(client)
        if handler is None:
            return
        name = self.gateway.runtime.listener_name(*client.sockname[:2])
        log.info("closing %s on listener %s: no request within %g s", client.peername, name,
                 ctx.options.request_head_timeout)
        self.gateway.metrics.connections_timed_out.labels(listener=name).inc()
        handler.close_connection(client)
