"""Stage 4: trace records, durable before anything crosses; alerts.

A transfer that will be forwarded gets two records: its "open" record (`"phase": "open"`: client,
zones, upstream, method, masked URL, policy, grant, the request body's size and digest), durable
before mitmproxy opens or writes to the upstream connection, and its completion (`"phase": "done"`:
status, digests, decision, bytes), durable before the client gets its answer. Every request body is
whole before its head leaves: one mitmproxy buffers goes upstream after the `request` hooks, a
spooled one after its verdict (gateway.proxy.heldheads, the `release_held_request` hook); the open
record is written in whichever runs. A transfer refused before forwarding (a spooled body's block
too), and a CONNECT tunnel (which opens nothing upstream itself;
each request inside is a transfer of its own), get one record without a phase. A transfer whose
completion never came (its process died) stays open in the log: `gateway trace show --open`.
A record not durable within `trace.append_timeout` (a stalled writer) is answered 503 as if the log
had failed; an open record's completion then follows it to the writer without the client waiting.
While the log has made nothing durable for that long, records are refused at once, not handed over.
The transfer id is the one the client sees in X-Gateway-Transfer-Id.

Longer than 400 lines: every way a transfer ends (answered, refused, failed, malformed, timed out,
cut at a stop) must reach exactly one final record, and the in-flight bookkeeping a graceful stop
waits on is kept beside them; split, that accounting would be spread over modules.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Protocol

import orjson
from mitmproxy import http
from mitmproxy.master import Master

from gateway.config.runtime import Runtime
from gateway.dlp import mask_method, mask_text, mask_url
from gateway.filters import body_size, refusal_response, refuse, transfer_of
from gateway.ops.alerts import AlertLog
from gateway.trace import TraceError, TraceLog, body_hasher
from gateway.trace.tiles import MAX_ENTRY
from gateway.transfer.disk import FreeSpace
from gateway.transfer.edge import (ANSWER_STATUS, BODY_DEADLINE, BODY_IDLE, TRAILERS, UPGRADE, UPSTREAM,
                                   UPSTREAM_TIMED_OUT, MalformedRequest, cut)
from gateway.transfer.model import (
    TRANSFER_ID_HEADER,
    WARNING_HEADER,
    Reason,
    Transfer,
    reason_entries,
    utc_timestamp,
)

log = logging.getLogger(__name__)


class RecordingGateway(Protocol):
    master: Master
    runtime: Runtime
    trace: TraceLog
    alerts: AlertLog


MALFORMED_REQUEST = Reason("malformed", "malformed", "request head", "block")
# Refusals whose error text is the gateway's own (a request body's, an upstream's upgrade), by cause:
# (reason, the answer's error).
OWN_REFUSALS = {
    BODY_IDLE: (Reason("timeout", BODY_IDLE, "request body", "error"), "request body timed out"),
    BODY_DEADLINE: (Reason("timeout", BODY_DEADLINE, "request body", "error"), "request body timed out"),
    TRAILERS: (Reason("framing", "trailers", "request trailers", "block"), "malformed request"),
    UPGRADE: (Reason("upstream", "upgrade", "response head", "block"), "upstream protocol not inspectable"),
}
TRACE_UNAVAILABLE = Reason("trace-log", "unavailable", "trace", "block")
# transfer.extra key: which of its records ("open", "done" or "only") the trace writer did not make
# durable within trace.append_timeout.
TRACE_TIMED_OUT = "trace_timed_out"
# transfer.extra key: the request line as its open record showed it, masked (_masked_request_line).
MASKED_REQUEST_LINE = "masked_request_line"
RECORD_SLACK = 128  # room kept for "rules_omitted", the phase and the writer's worker field


STOPPING = Reason("gateway", "stopping", "shutdown", "block")


class Record:
    def __init__(self, gateway: RecordingGateway):
        self.gateway = gateway
        # Transfers whose final record is not written yet, by id: what a graceful stop waits for.
        self.in_flight: dict[str, tuple[http.HTTPFlow, Transfer]] = {}
        self.stopping = False  # a graceful stop has begun: HTTP/1 connections close, new HTTP/2 streams refused
        self._opening = 0  # open records being written
        self._late: set[asyncio.Task] = set()  # completions of transfers whose open record timed out
        self._space: FreeSpace | None = None

    def _trace_space(self) -> FreeSpace:
        directory = self.gateway.runtime.config.trace_dir  # a reload may name another
        if self._space is None or self._space.directory != directory:
            self._space = FreeSpace(directory, "trace log")
        return self._space

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        transfer = transfer_of(flow)
        if transfer is None:
            return
        self.in_flight[transfer.id] = (flow, transfer)
        if flow.response is not None:
            return
        # Fail closed before anything is forwarded: a transfer that cannot be recorded must not cross.
        failure = self.gateway.trace.failure or self._trace_space().full()
        if failure is not None:
            transfer.escalate("error", [TRACE_UNAVAILABLE])
            transfer.error = f"trace log unavailable: {failure}"
            log.error("refusing transfer %s: %s", transfer.id, transfer.error)
            refuse(flow, transfer, status=503, error="trace log unavailable")
        elif self.stopping and not flow.request.http_version.startswith("HTTP/1"):
            # An HTTP/2 connection takes new streams for as long as it lives: refused, or no drain would end.
            # A request on an HTTP/1 connection accepted before the stop is served, and the connection
            # closed after it (_close_when_stopping): behind a balancer the client's next request goes
            # to another machine instead of getting a 503.
            transfer.escalate("error", [STOPPING])
            transfer.error = "the gateway is stopping"
            refuse(flow, transfer, status=503, error="gateway stopping")

    def _close_when_stopping(self, flow: http.HTTPFlow) -> None:
        """While the gateway stops, an HTTP/1 connection ends with the answer it is getting."""
        if self.stopping and flow.response is not None and flow.request.http_version.startswith("HTTP/1"):
            flow.response.headers["Connection"] = "close"

    async def http_connect(self, flow: http.HTTPFlow) -> None:
        """A CONNECT is a transfer of its own (the tunnel; each request it carries is another), answered
        right after this hook: a refused one with its refusal, an allowed one here, with the id."""
        transfer = transfer_of(flow)
        if transfer is None:
            return
        self.in_flight[transfer.id] = (flow, transfer)
        if flow.response is None:
            flow.response = _tunnel_established(flow, transfer)
        await self._record(flow, transfer)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self._close_when_stopping(flow)
        transfer = transfer_of(flow)
        if transfer is None or flow.response is None:
            return
        flow.response.headers[TRANSFER_ID_HEADER] = transfer.id
        if callable(flow.response.stream):
            # The headers go out now and the body once it is clean: the record must be durable first.
            transfer.before_release.append(lambda: self._record_before_release(flow, transfer))

    async def request(self, flow: http.HTTPFlow) -> None:
        transfer = transfer_of(flow)
        if transfer is None:
            return
        if transfer.cut and not transfer.recorded:
            await self._record(flow, transfer)
            cut(flow)
        elif flow.response is None and not transfer.opened:
            await self._open(flow, transfer)  # mitmproxy connects upstream right after this hook

    async def release_held_request(self, flow: http.HTTPFlow) -> None:
        """A held (spooled) request body passed: its head leaves right after this hook."""
        transfer = transfer_of(flow)
        if transfer is not None and flow.response is None and not transfer.opened:
            await self._open(flow, transfer)

    async def response(self, flow: http.HTTPFlow) -> None:
        self._close_when_stopping(flow)  # again: answers made here (refusals) have no responseheaders
        transfer = transfer_of(flow)
        if transfer is None:
            return
        if not transfer.recorded:
            await self._record(flow, transfer)
        if transfer.cut:
            flow.kill()  # the body was withheld: closing now tells the client it is incomplete
            return
        assert flow.response is not None
        warned = sorted({r.rule for r in transfer.reasons if r.action == "warn"})
        if warned:
            flow.response.headers[WARNING_HEADER] = ", ".join(warned)

    async def error(self, flow: http.HTTPFlow) -> None:
        transfer = transfer_of(flow)
        if transfer is None or transfer.recorded:
            return
        # mitmproxy's error texts may quote what the client sent (a header name, a request line).
        transfer.error = mask_text(flow.error.msg) if flow.error else "unknown error"
        if not transfer.stopped:
            transfer.escalate("error")
        answer = flow.metadata.get(ANSWER_STATUS)
        if answer is not None and not flow.metadata.get("gateway_refused"):
            # Nothing has reached the client yet: it gets our JSON with the transfer id, not
            # mitmproxy's own page (gateway.proxy.answers sends it).
            status, cause = answer
            if cause == UPSTREAM:
                where = f"{transfer.shown_host}:{transfer.upstream_port}"
                transfer.add_reasons([Reason("upstream", "upstream", where, "error")])
                timed_out = flow.metadata.get(UPSTREAM_TIMED_OUT)
                if timed_out is None:
                    refuse(flow, transfer, status=status, error="upstream failed")
                else:  # gateway.proxy.upstreamdeadline closed a silent upstream's connection
                    transfer.error = f"upstream gave no response head within {timed_out:g} s"
                    refuse(flow, transfer, status=504, error="upstream timeout")
            elif cause in OWN_REFUSALS:
                reason, error = OWN_REFUSALS[cause]
                transfer.add_reasons([reason])
                refuse(flow, transfer, status=status, error=error)
            else:
                # mitmproxy's reason quotes the client's header names and values: not kept.
                transfer.error = "request head refused: invalid framing or headers (a smuggling risk)"
                transfer.add_reasons([MALFORMED_REQUEST])
                refuse(flow, transfer, status=status, error="malformed request")
            self._close_when_stopping(flow)  # answers made here have no response hooks either
        await self._record(flow, transfer)

    async def malformed_request(self, malformed: MalformedRequest) -> None:
        """A request head mitmproxy could not parse: refused 400 with a transfer id, and recorded."""
        transfer = malformed.transfer
        if transfer is None:
            return
        transfer.escalate("error", [MALFORMED_REQUEST])
        transfer.error = malformed.reason
        answer = refusal_response(transfer, malformed.status, "malformed request")
        answer.headers["Connection"] = "close"  # mitmproxy closes the connection after it
        malformed.answer = answer
        self._finished(transfer)
        body = answer.raw_content or b""
        record = self._fields(transfer, method=None, url=None, status=malformed.status, req_bytes=0,
                              resp_bytes=len(body), req_digest=None,
                              resp_digest=_hash(self.gateway.runtime.config.body_digest, body))
        if not await self._append(record, transfer):
            malformed.answer = refusal_response(transfer, 503, "trace log unavailable")

    async def cut_in_flight(self, why: str) -> int:
        """A graceful stop's deadline: every transfer still in flight gets its final record as an
        error, then is cut. Returns how many there were."""
        for _ in range(200):  # an open record being written decides whether its completion is a phase's
            if not self._opening:
                break
            await asyncio.sleep(0.01)
        cut_off = [(flow, transfer) for flow, transfer in self.in_flight.values() if not transfer.recorded]
        for _, transfer in cut_off:
            transfer.escalate("error", [STOPPING])
            transfer.error = why
        await asyncio.gather(*(self._record(flow, transfer, refuse_on_failure=False) for flow, transfer in cut_off))
        for flow, _ in cut_off:
            if flow.killable:
                flow.kill()
        return len(cut_off)

    async def _open(self, flow: http.HTTPFlow, transfer: Transfer) -> None:
        """The open record, durable before the upstream connection is opened or written to; a
        transfer it cannot be written for is refused (nothing has crossed yet)."""
        request = flow.request
        method, url = _masked_request_line(request, transfer)
        record = {**self._fields(
            transfer, method=method, url=url, status=None,
            req_bytes=body_size(transfer, "request", request), resp_bytes=None,
            req_digest=_digest(self.gateway.runtime.config.body_digest, transfer, "request", request),
            resp_digest=None), "phase": "open"}
        self._opening += 1
        try:
            transfer.opened = await self._append(record, transfer)
        finally:
            self._opening -= 1
        if not transfer.opened:
            refuse(flow, transfer, status=503, error="trace log unavailable")

    async def _record(self, flow: http.HTTPFlow, transfer: Transfer, refuse_on_failure: bool = True) -> None:
        """The transfer's final record: its completion if it was opened, else its only record."""
        transfer.recorded = True
        try:
            if transfer.extra.get(TRACE_TIMED_OUT) == "open":
                # Its open record is still with a writer that did not answer in time, and may become durable
                # once the writer resumes: this completion (the 503 the client gets now) follows it there,
                # with no further wait for the client.
                record = {**self._build(flow, transfer), "phase": "done"}
                task = asyncio.create_task(self._append(record, transfer, retry=True, bounded=False))
                self._late.add(task)
                task.add_done_callback(self._late.discard)
                return
            if not await self._append(self._build(flow, transfer), transfer, retry=transfer.opened):
                if refuse_on_failure and (flow.response is not None or flow.error is None):
                    refuse(flow, transfer, status=503, error="trace log unavailable")
        finally:
            self._finished(transfer)

    def _finished(self, transfer: Transfer) -> None:
        """Its final record is written (or failed): its answer goes out now, so a graceful stop no
        longer waits for it."""
        transfer.recorded = True
        self.in_flight.pop(transfer.id, None)

    async def _append(self, record: dict[str, Any], transfer: Transfer, retry: bool = False,
                      bounded: bool = True) -> bool:
        """`retry`: a completion waits for a trace writer that is away to come back (bounded), since
        its open record already let the transfer cross. `bounded`: a record not durable within
        trace.append_timeout fails its transfer as if the log had failed, though the writer may
        still make it durable later; while the log is known to have been stalled that long, at once."""
        started = time.perf_counter()
        timeout = self.gateway.runtime.config.trace_append_timeout if bounded else None
        stalled = self.gateway.trace.stalled_for
        try:
            if bounded and stalled > timeout:
                # Not handed over, so it cannot land later; the client does not wait for the timeout.
                raise TraceError(f"the trace writer has made no record durable for {stalled:.1f} s")
            await self.gateway.trace.append(record, retry=retry, timeout=timeout)
        except (TraceError, TimeoutError) as e:
            # A stalled writer (stopped, a hung disk): the client is answered now, not when its own client
            # gives up. A record that timed out stays with the writer, which may still make it durable.
            timed_out = isinstance(e, TimeoutError)
            if timed_out:
                e = f"no answer from the trace writer within {timeout:g} s"
            if timed_out or (bounded and stalled > timeout):
                transfer.extra[TRACE_TIMED_OUT] = record.get("phase", "only")  # counted by the measure stage
            written = "not durable in time (may be written once the writer resumes)" if timed_out else "not recorded"
            # Fail closed: what cannot be proven to have crossed must not cross. The alert log (on its
            # own file) keeps the record the trace log could not.
            log.error("trace log unavailable, refusing transfer %s: %s", transfer.id, e)
            transfer.escalate("error", [TRACE_UNAVAILABLE])
            transfer.error = f"trace log unavailable: {e}"
            self.gateway.alerts.write({**_alert(record), "decision": "error", "status": 503,
                                       "error": transfer.error, "trace": written})
            return False
        # Both records' waits add up: how long the transfer waited on the log.
        transfer.extra["trace_append_seconds"] = transfer.extra.get("trace_append_seconds", 0.0) + \
            time.perf_counter() - started
        if record.get("phase") != "open" and (transfer.decision in ("warn", "block", "deny") or _unavailable(transfer)):
            self.gateway.alerts.write(_alert(record))
        return True

    def _record_before_release(self, flow: http.HTTPFlow, transfer: Transfer) -> bool:
        """Synchronous (a few milliseconds, once per spooled response): the body is released right after."""
        transfer.recorded = True
        try:
            self.gateway.trace.append_sync(self._build(flow, transfer), retry=transfer.opened,
                                           timeout=self.gateway.runtime.config.trace_append_timeout)
        except TraceError as e:
            log.error("trace log unavailable, withholding transfer %s: %s", transfer.id, e)
            transfer.escalate("error", [TRACE_UNAVAILABLE])
            return False
        finally:
            self._finished(transfer)
        return True

    def _build(self, flow: http.HTTPFlow, transfer: Transfer) -> dict[str, Any]:
        digest = self.gateway.runtime.config.body_digest
        request, response = flow.request, flow.response
        method, url = _masked_request_line(request, transfer)
        record = self._fields(
            transfer, method=method, url=url,
            status=response.status_code if response else None,
            req_bytes=body_size(transfer, "request", request),
            resp_bytes=body_size(transfer, "response", response) if response else 0,
            req_digest=_digest(digest, transfer, "request", request),
            resp_digest=_digest(digest, transfer, "response", response) if response else None)
        if transfer.opened:
            record["phase"] = "done"
        return record

    def _fields(self, transfer: Transfer, *, method: str | None, url: str | None, status: int | None,
                req_bytes: int | None, resp_bytes: int | None, req_digest: str | None, resp_digest: str | None) -> dict[str, Any]:
        record = {
            "v": 1,
            "id": transfer.id,
            "time": utc_timestamp(),
            "frontend": self.gateway.runtime.config.name,
            "listener": transfer.listener,
            "client": {"addr": transfer.client_addr, "zone": transfer.client_zone,
                       **({"via": transfer.via} if transfer.via else {})},
            "upstream": {"host": transfer.shown_host, "port": transfer.upstream_port,
                         "addr": transfer.upstream_addr, "zone": transfer.upstream_zone},
            "method": method,
            "url": url,
            "status": status,
            "req_bytes": req_bytes,
            "resp_bytes": resp_bytes,
            "req_digest": req_digest,
            "resp_digest": resp_digest,
            "decision": transfer.decision,
            "policy_rule": transfer.verdict.rule if transfer.verdict else None,
            "rules": [],
            "grant": transfer.extra.get("grant"),  # set by the grant stage for a catalogued dataset
            "consent": transfer.extra.get("consent"),  # records passed / masked / dropped (consent stage)
            "error": transfer.error,
        }
        # Reasons fill what the entry limit leaves (a bulk export has thousands of findings: they are
        # counted per rule and type, with their first locations; see gateway.dlp.tally).
        room = MAX_ENTRY - len(orjson.dumps(record)) - RECORD_SLACK  # the size encode_record gives it
        record["rules"], omitted = reason_entries(transfer, room)
        if omitted:
            record["rules_omitted"] = omitted
        return record


def _tunnel_established(flow: http.HTTPFlow, transfer: Transfer) -> http.Response:
    # As mitmproxy would answer, plus the id: no Content-Length, which a 2xx to CONNECT must not carry.
    now = time.time()
    return http.Response(flow.request.data.http_version, 200, b"Connection established",
                         http.Headers([(TRANSFER_ID_HEADER.encode(), transfer.id.encode())]), b"", None, now, now)


def _masked_request_line(request: http.Request, transfer: Transfer) -> tuple[str, str]:
    """The method and URL as records show them, masked; kept from the open record for the completion
    (masking costs ~15 us) while the request is still the one that was masked."""
    shown = (request.method, request.scheme, request.path, transfer.upstream_host, transfer.upstream_port)
    kept = transfer.extra.get(MASKED_REQUEST_LINE)
    if kept is not None and kept[0] == shown:
        return kept[1]
    masked = mask_method(request.method), mask_url(_display_url(request, transfer))
    transfer.extra[MASKED_REQUEST_LINE] = (shown, masked)
    return masked


def _display_url(request: http.Request, transfer: Transfer) -> str:
    if request.method == "CONNECT":
        return f"{transfer.shown_host}:{transfer.upstream_port}"
    host = transfer.shown_host
    default = (request.scheme == "https" and transfer.upstream_port == 443) or (
        request.scheme == "http" and transfer.upstream_port == 80)
    authority = host if default else f"{host}:{transfer.upstream_port}"
    return f"{request.scheme}://{authority}{request.path}"


def _digest(name: str, transfer: Transfer, direction: str, message: http.Message) -> str:
    spool = transfer.spools.get(direction)
    if spool is not None:
        return spool.hasher.digest_string()
    body = message.raw_content or b""
    hashed = transfer.body_digests.get(direction)
    if hashed is not None and hashed[0] is body:  # still the very body hashed before (not redacted since)
        return hashed[1]
    # Kept: the open record's digest serves the completion too.
    digest = transfer.body_digests[direction] = (body, _hash(name, body))
    return digest[1]


def _hash(name: str, body: bytes) -> str:
    hasher = body_hasher(name)
    hasher.update(body)
    return hasher.digest_string()


def _unavailable(transfer: Transfer) -> bool:
    """Refused because a part of the gateway could not serve (trace log, spool): people on duty must know."""
    return any(reason.type == "unavailable" for reason in transfer.reasons)


def _alert(record: dict[str, Any]) -> dict[str, Any]:
    keys = ("id", "time", "frontend", "listener", "client", "upstream", "method", "url", "status",
            "decision", "policy_rule", "rules", "rules_omitted")
    return {key: record[key] for key in keys if key in record}
