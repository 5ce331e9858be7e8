"""An upstream must begin to answer soon after it was sent a request.

mitmproxy waits for a response head as long as the upstream connection is open, and closes a
connection only after `tcp_timeout` (10 minutes) without traffic: a server that accepts a request and
says nothing held its client that long, with no answer. From the `request` hook (the request is then
whole: a buffered one is sent right after it, a spooled one has just been released), the upstream has
`gateway.upstream_timeout` to deliver a complete response head. Past it the upstream connection is
closed with the flow marked UPSTREAM_TIMED_OUT: mitmproxy's error path runs, and the record stage
answers the client 504 with its transfer id (gateway.proxy.answers) and records the completion as an
error; the measure stage counts it as `gateway_upstream_errors_total{kind="timeout"}`.

Not timed here: opening the connection beyond the deadline (the kernel's connect retries bound it,
about 2 minutes, then 502), and a response whose head came and whose body then stalls (mitmproxy's
`tcp_timeout`). An HTTP/2 upstream connection carries the client's other streams too: they end with it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from mitmproxy import http

from gateway.config.runtime import Runtime
from gateway.transfer.edge import UPSTREAM_TIMED_OUT, connection_handler

log = logging.getLogger(__name__)


class DeadlineGateway(Protocol):
    runtime: Runtime


class UpstreamDeadline:
    def __init__(self, gateway: DeadlineGateway):
        self.gateway = gateway
        self._timers: dict[str, asyncio.TimerHandle] = {}  # flow id -> its deadline

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is None and flow.error is None:  # else refused: nothing goes upstream
            timeout = self.gateway.runtime.config.upstream_timeout
            self._timers[flow.id] = asyncio.get_running_loop().call_later(timeout, self._expired, flow, timeout)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self._met(flow)

    def response(self, flow: http.HTTPFlow) -> None:
        self._met(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._met(flow)

    def _met(self, flow: http.HTTPFlow) -> None:
        timer = self._timers.pop(flow.id, None)
        if timer is not None:
            timer.cancel()

    def _expired(self, flow: http.HTTPFlow, timeout: float) -> None:
        self._timers.pop(flow.id, None)
        handler = connection_handler(flow.client_conn)
        if flow.response is not None or flow.error is not None or handler is None \
                or flow.server_conn not in handler.transports:
            return  # answered meanwhile, the client gone, or still connecting (not timed here)
        log.info("upstream %s gave no response head within %g s: closing it", flow.server_conn.peername, timeout)
        flow.metadata[UPSTREAM_TIMED_OUT] = timeout
        handler.close_connection(flow.server_conn)
