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
import heapq
import logging
from typing import Protocol

from mitmproxy import http

from gateway.config.runtime import Runtime
from gateway.transfer.edge import UPSTREAM_TIMED_OUT, connection_handler

log = logging.getLogger(__name__)


class DeadlineGateway(Protocol):
    runtime: Runtime


class UpstreamDeadline:
    """The requests sent and not yet answered, timed by one timer per worker: a timer of its own per
    request (set, then cancelled at its answer's head) cost ~6 us of the event loop a transfer. The
    deadlines are kept in a heap of plain tuples (compared in C, unlike the loop's timer handles); an
    answered flow leaves only its heap entry, dropped when due or when such entries outnumber the
    waiting flows."""

    def __init__(self, gateway: DeadlineGateway):
        self.gateway = gateway
        self._waiting: dict[str, tuple[http.HTTPFlow, float]] = {}  # flow id -> (flow, timeout), no response head yet
        self._deadlines: list[tuple[float, str]] = []  # heap: (deadline on the loop's clock, flow id)
        self._timer: asyncio.TimerHandle | None = None

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is None and flow.error is None:  # else refused: nothing goes upstream
            timeout = self.gateway.runtime.config.upstream_timeout
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            self._waiting[flow.id] = (flow, timeout)
            if len(self._deadlines) > 2 * len(self._waiting) + 64:
                self._deadlines = [entry for entry in self._deadlines if entry[1] in self._waiting]
                heapq.heapify(self._deadlines)
            heapq.heappush(self._deadlines, (deadline, flow.id))
            if self._timer is None or deadline < self._timer.when():  # none due, or a reload shortened it
                if self._timer is not None:
                    self._timer.cancel()
                self._timer = loop.call_at(deadline, self._look, loop)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self._waiting.pop(flow.id, None)

    def response(self, flow: http.HTTPFlow) -> None:
        self._waiting.pop(flow.id, None)

    def error(self, flow: http.HTTPFlow) -> None:
        self._waiting.pop(flow.id, None)

    def _look(self, loop: asyncio.AbstractEventLoop) -> None:
        """Time out the flows past their deadline; sleep until the earliest deadline of a flow still waiting."""
        self._timer = None
        now, deadlines = loop.time(), self._deadlines
        while deadlines and (deadlines[0][0] <= now or deadlines[0][1] not in self._waiting):
            _, flow_id = heapq.heappop(deadlines)
            waiting = self._waiting.pop(flow_id, None)
            if waiting is not None:
                self._expired(*waiting)
        if deadlines:
            self._timer = loop.call_at(deadlines[0][0], self._look, loop)

    def _expired(self, flow: http.HTTPFlow, timeout: float) -> None:
        handler = connection_handler(flow.client_conn)
        if flow.response is not None or flow.error is not None or handler is None \
                or flow.server_conn not in handler.transports:
            return  # answered meanwhile, the client gone, or still connecting (not timed here)
        log.info("upstream %s gave no response head within %g s: closing it", flow.server_conn.peername, timeout)
        flow.metadata[UPSTREAM_TIMED_OUT] = timeout
        handler.close_connection(flow.server_conn)
