"""Stage 5 (last): count each finished transfer in the metrics and log every decision that is not an allow.

It only reads what the earlier stages decided, so it runs after Record: a transfer is measured on
the hook that recorded it (response, error, or a refused CONNECT), exactly once. It also answers
/readyz for the management listener, since it sees the engine's `running` and `done` hooks.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections import Counter
from typing import Protocol

from mitmproxy import connection, http, tls
from mitmproxy.proxy.server_hooks import ServerConnectionHookData

from gateway.authz import REASONS as GRANT_REASONS
from gateway.config.runtime import Runtime
from gateway.filters import body_size, transfer_of
from gateway.filters.record import TRACE_TIMED_OUT
from gateway.ops.decisionlog import DecisionLog
from gateway.ops.metrics import ACTION_OF_DECISION, GatewayMetrics
from gateway.trace import TraceLog
from gateway.transfer.disk import filesystem_problems
from gateway.transfer.edge import LIMIT_ERROR, UPSTREAM_TIMED_OUT, MalformedRequest
from gateway.transfer.model import Transfer
from gateway.transfer.spool import spool_dir

# Reasons that are not DLP findings: the zone policy's deny, a trace log that could not record, an
# unreachable upstream or its refused upgrade, a malformed request, a stage that failed on the flow, a
# grant refused.
NOT_DLP_TYPES = frozenset({"policy", "unavailable", "upstream", "upgrade", "malformed", "internal-error",
                           "host_not_canonical", *GRANT_REASONS})


class MeasuredGateway(Protocol):
    runtime: Runtime
    trace: TraceLog | None
    metrics: GatewayMetrics
    master: object
    stopping: bool  # a graceful stop is draining the transfers in flight


class Measure:
    def __init__(self, gateway: MeasuredGateway, decisions: DecisionLog | None = None):
        self.gateway = gateway
        self.metrics = gateway.metrics
        self.decisions = decisions or DecisionLog()
        self.running_since: float | None = None
        self._connection_listener: dict[str, str] = {}  # client connection id -> listener it reached
        self._trace_records_seen = 0
        self._trace_lock = threading.Lock()  # refreshed from the proxy loop and from scrapes

    # Lifecycle, for /readyz.

    def running(self) -> None:
        self.running_since = time.time()
        self.metrics.listeners_known([listener.name for listener in self.gateway.runtime.config.listeners])
        self.refresh_trace_metrics()

    def done(self) -> None:
        self.running_since = None

    def problems(self) -> list[str]:
        """Why the gateway is not ready to take traffic; empty when it is. Called from the management thread."""
        if self.running_since is None:
            return ["engine not running"]
        problems = ["stopping: finishing the transfers in flight"] if self.gateway.stopping else []
        config = self.gateway.runtime.config
        proxyserver = self.gateway.master.addons.get("proxyserver")
        bound = len(proxyserver.listen_addrs()) if proxyserver else 0
        if bound < len(config.listeners):
            problems.append(f"{bound} of {len(config.listeners)} listeners bound")
        trace = self.gateway.trace
        if trace is None:
            problems.append("trace log not open")
        elif trace.failure is not None:
            problems.append(str(trace.failure))
        elif not os.access(config.trace_dir, os.W_OK):
            problems.append(f"trace log directory not writable: {config.trace_dir}")
        return problems + filesystem_problems(config.trace_dir, spool_dir(config.state_dir))

    # Connections.

    def client_connected(self, client: connection.Client) -> None:
        if client.error:
            return  # refused as it opened (gateway.proxy.connlimit): never active
        name = self.gateway.runtime.listener_name(*client.sockname[:2])
        self._connection_listener[client.id] = name
        self.metrics.active_connections.labels(listener=name).inc()

    def client_disconnected(self, client: connection.Client) -> None:
        name = self._connection_listener.pop(client.id, None)
        if name is not None:
            self.metrics.active_connections.labels(listener=name).dec()

    def server_connect_error(self, data: ServerConnectionHookData) -> None:
        self._upstream_error(data.client, connect_error_kind(data.server.error or ""))

    def tls_failed_server(self, data: tls.TlsData) -> None:
        self._upstream_error(data.context.client, "tls")

    def _upstream_error(self, client: connection.Client, kind: str) -> None:
        listener = self._connection_listener.get(client.id, "unknown")
        self.metrics.upstream_errors.labels(listener=listener, kind=kind).inc()

    # Transfers.

    def request(self, flow: http.HTTPFlow) -> None:
        transfer = transfer_of(flow)
        if transfer is not None and flow.response is None:
            transfer.extra["forwarded"] = True  # every stage let the request go on to the upstream

    def http_connect(self, flow: http.HTTPFlow) -> None:
        transfer = transfer_of(flow)
        if transfer is not None and transfer.recorded:  # the tunnel's own transfer ends here
            self._finish(flow, transfer)

    def response(self, flow: http.HTTPFlow) -> None:
        transfer = transfer_of(flow)
        if transfer is not None and transfer.recorded:
            self._finish(flow, transfer)

    def error(self, flow: http.HTTPFlow) -> None:
        transfer = transfer_of(flow)
        if transfer is None:
            return
        if flow.error and transfer.extra.get("forwarded") and is_upstream_failure(flow):
            self._upstream_error(flow.client_conn, "timeout" if UPSTREAM_TIMED_OUT in flow.metadata else "protocol")
        if transfer.recorded:
            self._finish(flow, transfer)

    def websocket_message(self, flow: http.HTTPFlow) -> None:
        transfer = transfer_of(flow)
        if transfer is None or flow.websocket is None:
            return
        message = flow.websocket.messages[-1]
        if not message.dropped:
            direction = "request" if message.from_client else "response"
            self._bytes(transfer, direction, len(message.content))
        if self._count_findings(transfer):
            self.decisions.write(transfer, event="websocket_message")

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        transfer = transfer_of(flow)
        if transfer is not None and self._count_findings(transfer):
            self.decisions.write(transfer, event="websocket_end")

    def malformed_request(self, malformed: MalformedRequest) -> None:
        transfer = malformed.transfer
        if transfer is not None and transfer.recorded:
            self._count(transfer, method=None, status=malformed.answer.status_code if malformed.answer else None)

    def _finish(self, flow: http.HTTPFlow, transfer: Transfer) -> None:
        if transfer.extra.get("measured"):
            return
        if transfer.extra.get("forwarded"):
            # Bytes that really crossed: the request once sent upstream, the upstream's answer unless
            # the gateway replaced it with its own refusal.
            # A cut transfer's withheld body did not cross (a cut request also has no response).
            if flow.server_conn.timestamp_tcp_setup is not None and not (
                    transfer.cut and "request" in transfer.spools):
                self._bytes(transfer, "request", body_size(transfer, "request", flow.request))
            if flow.response is not None and not flow.metadata.get("gateway_refused") and not transfer.cut:
                self._bytes(transfer, "response", body_size(transfer, "response", flow.response))
        self._count(transfer, method=flow.request.method,
                    status=flow.response.status_code if flow.response else None)

    def _count(self, transfer: Transfer, *, method: str | None, status: int | None) -> None:
        """Once per transfer: its decision, durations and findings, and a log line unless a plain allow."""
        transfer.extra["measured"] = True
        m = self.metrics
        src, dst = transfer.client_zone, transfer.upstream_zone
        m.transfers.labels(listener=transfer.listener, src_zone=src, dst_zone=dst,
                           action=ACTION_OF_DECISION[transfer.decision]).inc()
        m.transfer_duration.labels(src_zone=src, dst_zone=dst).observe(time.monotonic() - transfer.started)
        for direction, seconds in transfer.extra.get("inspection_seconds", {}).items():
            m.inspection_duration.labels(direction=direction).observe(seconds)
        if TRACE_TIMED_OUT in transfer.extra:
            m.trace_append_timeouts.labels(record=transfer.extra[TRACE_TIMED_OUT]).inc()
        if "trace_append_seconds" in transfer.extra:
            m.trace_append_duration.observe(transfer.extra["trace_append_seconds"])
        self._count_findings(transfer)
        self.refresh_trace_metrics()
        if transfer.decision != "allow":
            self.decisions.write(transfer, method=method, status=status)

    def _bytes(self, transfer: Transfer, direction: str, size: int) -> None:
        if size:
            self.metrics.transfer_bytes.labels(src_zone=transfer.client_zone, dst_zone=transfer.upstream_zone,
                                               direction=direction).inc(size)

    def _count_findings(self, transfer: Transfer) -> int:
        """Count the findings added since the last call (WebSocket messages add more after the handshake)."""
        counted = transfer.extra.get("findings_counted", 0)
        new = Counter()
        for group in transfer.reasons[counted:]:
            new[(group.rule, group.type, group.action)] += group.count
        transfer.extra["findings_counted"] = len(transfer.reasons)
        omitted = Counter(transfer.reasons_omitted)  # groups past MAX_REASON_GROUPS, only counted
        new.update(omitted - transfer.extra.get("omitted_counted", Counter()))
        transfer.extra["omitted_counted"] = omitted
        findings = 0
        for (rule, type, action), count in new.items():
            if type not in NOT_DLP_TYPES:
                self.metrics.dlp_findings.labels(rule=rule, type=type, action=action).inc(count)
                findings += count
        return findings

    def refresh_trace_metrics(self) -> None:
        """Copy the trace log's own counters into the metrics (after each transfer, and before each scrape)."""
        trace = self.gateway.trace
        if trace is None:
            return
        with self._trace_lock:
            appended = trace.records_appended
            if appended > self._trace_records_seen:
                self.metrics.trace_records.inc(appended - self._trace_records_seen)
                self._trace_records_seen = appended
            self.metrics.trace_tree_size.set(trace.tree_size)
            if trace.last_checkpoint_time:
                self.metrics.trace_last_checkpoint.set(trace.last_checkpoint_time)


_ERRNO = re.compile(r"\[Errno (-?\d+)\]")
_ERRNO_KINDS = {111: "refused", 110: "timeout", 113: "unreachable", 101: "unreachable"}


def connect_error_kind(message: str) -> str:
    """A bounded kind for a failed upstream connection, from mitmproxy's error text (an OSError's str)."""
    if message.startswith(LIMIT_ERROR):
        return "limit"  # refused by gateway.proxy.connlimit, never tried
    lowered = message.lower()
    match = _ERRNO.search(message)
    if match:
        number = int(match.group(1))
        if number < 0:  # getaddrinfo's EAI_* codes are negative
            return "dns"
        if number in _ERRNO_KINDS:
            return _ERRNO_KINDS[number]
    if "connect call failed" in lowered or "refused" in lowered:
        return "refused"
    if "timed out" in lowered or "timeout" in lowered:
        return "timeout"
    if "name or service" in lowered or "nodename" in lowered or "resolution" in lowered:
        return "dns"
    return "connect"


def is_upstream_failure(flow: http.HTTPFlow) -> bool:
    """A forwarded request that failed after its upstream connection was made, through no fault of the client."""
    assert flow.error is not None
    if flow.server_conn.error or flow.server_conn.timestamp_tcp_setup is None:
        return False  # failed to connect: counted once by server_connect_error
    return not flow.error.msg.lower().startswith(("client", "request"))
