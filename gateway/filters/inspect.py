"""Stage 3: run the DLP profile the policy chose over what crosses, and act on what it finds.

Request heads (URL path, query and header fields, before anything is forwarded), bodies and trailer
fields are inspected with the rule's request profile (data leaving the client's zone), response heads,
bodies and trailers with its response profile (data arriving), WebSocket messages by their direction.
Bodies above the spool threshold (of unknown length: once past it) are spooled to disk while they
are scanned as they arrive, and released only after a clean verdict; their head is held with them
(gateway.proxy.heldheads), so a blocked one is answered with its refusal like any other. A body that
would take what the worker holds in memory past `dlp.memory_budget` (gateway.transfer.memory) is
spooled too, whatever its size; the budget is given back when its transfer ends.
Every scan of a transfer spends from its inspection budget (`dlp.inspection_budget`, CPU seconds,
gateway.dlp.budget); past it what is left is uninspectable, and the profile's `uninspectable` applies.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Callable

from mitmproxy import http

from gateway.dlp import Profile, ScanResult
from gateway.dlp.budget import (
    OVER_BUDGET,
    STREAM_BYTES_PER_SECOND,
    BudgetExceeded,
    InspectionBudget,
)
from gateway.dlp.coding import DecodeError
from gateway.dlp.stream import StreamScan
from gateway.filters import Gateway, refuse, transfer_of
from gateway.trace import body_hasher
from gateway.transfer.edge import TOO_BIG
from gateway.transfer.memory import MemoryBudget, Reservation
from gateway.transfer.model import Reason, Transfer
from gateway.transfer.spool import HeldBody, SpooledBody, spool_dir

log = logging.getLogger(__name__)

MEMORY_KEY = "gateway_memory"  # flow.metadata: the transfer's Reservation of its worker's memory budget
SPOOL_UNAVAILABLE = Reason("spool", "unavailable", "spool", "block")  # its disk full: 503, not the content's fault
# Bodies up to this size are scanned on the event loop; larger ones in a worker thread so other
# transfers are not stalled while they are inspected.
INLINE_SCAN_LIMIT = 64 * 1024
# CPU seconds such a body may take there (it may hold compressed or encoded text that expands): past
# it, its scan starts again in a worker thread with what is left of the budget.
INLINE_SCAN_SLICE = 0.05
# Findings a scan keeps whole, with their values: none. What is recorded and answered are the groups
# (per rule, type and action: count, first locations, digest of all places), and a redaction masks
# every value of the replacements; only `gateway dlp scan` lists findings one by one.
KEEP_NONE = 0


class Inspect:
    def __init__(self, gateway: Gateway):
        self.gateway = gateway
        self.memory = MemoryBudget(lambda: self.gateway.runtime.config.memory_budget)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        transfer = transfer_of(flow)
        if transfer is None or flow.response:
            return
        profile = self._profile(transfer, "request")
        if profile is not None:
            # The head before anything is forwarded or spooled.
            request = flow.request
            head = self._within_budget(transfer, profile, "request", "request head", lambda: profile.scan_head(
                request.path, list(request.headers.items(multi=True)), direction="request",
                host=transfer.upstream_host, method=request.method, keep=KEEP_NONE))
            self._apply(flow, transfer, head, rewritable=False)
            if not flow.response and _unread_transfer_coding(transfer, request):
                refuse(flow, transfer)
        if not flow.response:
            flow.request.stream = self._holding(flow, transfer, "request", flow.request) or False

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        transfer = transfer_of(flow)
        if transfer is None or flow.metadata.get("gateway_refused"):
            return
        response = flow.response
        profile = self._profile(transfer, "response")
        head = self._within_budget(transfer, profile, "response", "response head", lambda: profile.scan_head(
            "/", list(response.headers.items(multi=True)), direction="response", reason=response.reason,
            host=transfer.upstream_host, keep=KEEP_NONE)) if profile else None
        if profile is not None:
            _unread_transfer_coding(transfer, response)  # refused with the body, or the body cut
        if head is not None and head.action is not None:
            # Applied with the body: nothing of the response, head included, leaves before its verdict.
            transfer.extra["response_head"] = head
        response.stream = self._holding(flow, transfer, "response", response) or False

    async def request(self, flow: http.HTTPFlow) -> None:
        transfer = transfer_of(flow)
        if transfer is None or flow.response or transfer.stopped or "request" in transfer.spools:
            return
        profile = self._profile(transfer, "request")
        if profile is None:
            return
        request = flow.request
        self._apply(flow, transfer, self._trailers(transfer, "request", request), rewritable=False)
        if flow.response or not request.raw_content:
            return
        result = await _scan(profile, request.raw_content, request.headers, "request", transfer, self._digest,
                             self._budget(transfer))
        self._apply(flow, transfer, result)
        if result.action == "redact" and not flow.response:
            _redact(flow, transfer, profile, request, result)

    async def response(self, flow: http.HTTPFlow) -> None:
        try:
            await self._inspect_response(flow)
        finally:  # the transfer's bodies are dropped once the response leaves
            _give_back_memory(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        _give_back_memory(flow)

    async def _inspect_response(self, flow: http.HTTPFlow) -> None:
        transfer = transfer_of(flow)
        if transfer is None or flow.metadata.get("gateway_refused") or not flow.response or \
                "response" in transfer.spools:
            return
        if "response_head" in transfer.extra:
            self._apply(flow, transfer, transfer.extra.pop("response_head"), rewritable=False)
        if transfer.stopped and not flow.metadata.get("gateway_refused"):  # its head was refused
            refuse(flow, transfer)
            return
        profile = self._profile(transfer, "response")
        response = flow.response
        self._apply(flow, transfer, self._trailers(transfer, "response", response), rewritable=False)
        if profile is None or flow.metadata.get("gateway_refused") or not response.raw_content:
            return
        result = await _scan(profile, response.raw_content, response.headers, "response", transfer, self._digest,
                             self._budget(transfer))
        self._apply(flow, transfer, result)
        if result.action == "redact" and not flow.metadata.get("gateway_refused"):
            _redact(flow, transfer, profile, response, result)

    def websocket_message(self, flow: http.HTTPFlow) -> None:
        transfer = transfer_of(flow)
        if transfer is None or flow.websocket is None:
            return
        message = flow.websocket.messages[-1]
        direction = "request" if message.from_client else "response"
        profile = self._profile(transfer, direction)
        if profile is None:
            return
        content_type = "text/plain; charset=utf-8" if message.is_text else "application/octet-stream"
        where = "client message" if message.from_client else "upstream message"
        try:  # each message a budget of its own: a connection may last for days
            result = InspectionBudget(self.gateway.runtime.config.inspection_budget).spend(lambda: profile.scan(
                message.content, content_type=content_type, direction=direction, host=transfer.upstream_host,
                keep=KEEP_NONE))
        except BudgetExceeded:
            result = _over_budget(profile, direction, where, transfer.upstream_host)
        if result.action is None:
            return
        reasons = result.groups
        action = _unrewritable(result.action)
        if action == "block":
            message.drop()  # a message cannot be answered with a 403: it is dropped, the decision recorded
        transfer.escalate(action, reasons)
        transfer.extra["websocket_findings"] = transfer.extra.get("websocket_findings", 0) + sum(group.count for group in reasons)

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        transfer = transfer_of(flow)
        direction = flow.metadata.get(TOO_BIG)
        if transfer is not None and direction is not None:  # closed 1009 by gateway.proxy.wslimits
            where = "client message" if direction == "request" else "upstream message"
            transfer.escalate("block", [Reason("websocket", "message-too-big", where, "block")])

    def _holding(self, flow: http.HTTPFlow, transfer: Transfer, direction: str,
                 message: http.Message) -> HeldBody | None:
        """The stream callable for a body that may be larger than the spool threshold (a Content-Length
        above it, or none: chunked, HTTP/2 without one, a response ending when its connection closes):
        held in memory up to the threshold, then spooled and scanned as it arrives. A body known to
        be smaller is left to mitmproxy, which buffers it, if the worker's memory budget can take it."""
        threshold = self.gateway.runtime.config.spool_threshold
        memory = self._reservation(flow)
        length = message.headers.get("content-length")
        if length is not None:
            if not length.strip().isdigit():
                return None  # mitmproxy refuses it
            if int(length) <= threshold and memory.take(int(length)):
                return None
            threshold = 0  # too large for memory: spooled from its first byte
        return HeldBody(threshold, memory, lambda: self._open_spool(flow, transfer, direction, message),
                        lambda spool: self._judge(flow, transfer, direction, message, spool))

    def _open_spool(self, flow: http.HTTPFlow, transfer: Transfer, direction: str,
                    message: http.Message) -> SpooledBody:
        config = self.gateway.runtime.config
        profile = self._profile(transfer, direction)
        scan = None
        if profile is not None:
            # The scan holds the body's start to read it whole (structure, archives), in memory too.
            buffer = profile.limits.stream_buffer_bytes
            if not self._reservation(flow).take(buffer):
                buffer = 0  # the worker's memory budget spent: read as text, window by window, from the start
            scan = profile.stream(content_type=message.headers.get("content-type"),
                                  content_encoding=message.headers.get("content-encoding"),
                                  direction=direction, host=transfer.upstream_host, buffer_bytes=buffer,
                                  keep=KEEP_NONE)
        budgeted = BudgetedStream(scan, self._budget(transfer)) if scan else None
        spool = SpooledBody(spool_dir(config.state_dir), budgeted, config.body_digest)
        transfer.spools[direction] = spool
        return spool

    def _judge(self, flow: http.HTTPFlow, transfer: Transfer, direction: str, message: http.Message,
               spool: SpooledBody) -> bool:
        """A spooled body's verdict: True releases it; a refused one is answered (its head was held)."""
        started = time.perf_counter()
        result = spool.finish()
        transfer.extra.setdefault("inspection_seconds", {})[direction] = time.perf_counter() - started
        if spool.failure is not None:  # its disk is full: the gateway's failure, not the content's
            transfer.escalate("error", [SPOOL_UNAVAILABLE])
            transfer.error = f"spool unavailable: {spool.failure}"
            log.error("refusing transfer %s: %s", transfer.id, transfer.error)
            refuse(flow, transfer, status=503, error="spool unavailable")
            return False
        head = transfer.extra.pop("response_head", None) if direction == "response" else None
        for found in (head, result, self._trailers(transfer, direction, message)):
            if found is not None and found.action is not None:
                # A spooled body cannot be rewritten: what would be redacted is blocked.
                transfer.escalate(_unrewritable(found.action), found.groups)
        if transfer.stopped:
            refuse(flow, transfer)
            return False
        if not all(check() for check in transfer.before_release):
            if not flow.metadata.get("gateway_refused"):  # else a stage's check answered with its own refusal
                refuse(flow, transfer, status=503, error="trace log unavailable")  # the record is not durable
            return False
        return True

    def _reservation(self, flow: http.HTTPFlow) -> Reservation:
        memory = flow.metadata.get(MEMORY_KEY)
        if memory is None:
            memory = flow.metadata[MEMORY_KEY] = Reservation(self.memory)
            weakref.finalize(flow, memory.close)  # should a flow end with neither hook
        return memory

    @property
    def _digest(self) -> str:
        return self.gateway.runtime.config.body_digest

    def _profile(self, transfer: Transfer, direction: str) -> Profile | None:
        if transfer.verdict is None:
            return None
        name = transfer.verdict.request_profile if direction == "request" else transfer.verdict.response_profile
        return self.gateway.runtime.rules.profile(name) if name else None

    def _trailers(self, transfer: Transfer, direction: str, message: http.Message) -> ScanResult | None:
        """Trailer fields (HTTP/2 carries them; mitmproxy passes them on after the body), read like a head."""
        profile = self._profile(transfer, direction)
        if profile is None or not message.trailers:
            return None
        fields = [(f"trailer:{name}", name, value) for name, value in message.trailers.items(multi=True)]
        return self._within_budget(transfer, profile, direction, "trailers", lambda: profile.scan_fields(
            fields, direction=direction, host=transfer.upstream_host, keep=KEEP_NONE))

    def _budget(self, transfer: Transfer) -> InspectionBudget:
        budget = transfer.extra.get("inspection_budget")
        if budget is None:
            budget = transfer.extra["inspection_budget"] = InspectionBudget(
                self.gateway.runtime.config.inspection_budget)
        return budget

    def _within_budget(self, transfer: Transfer, profile: Profile, direction: str, where: str,
                       scan: Callable[[], ScanResult]) -> ScanResult:
        try:
            return self._budget(transfer).spend(scan)
        except BudgetExceeded:
            return _over_budget(profile, direction, where, transfer.upstream_host)

    def _apply(self, flow: http.HTTPFlow, transfer: Transfer, result: ScanResult | None,
               rewritable: bool = True) -> None:
        if result is None or result.action is None:
            return
        action = result.action if rewritable else _unrewritable(result.action)
        transfer.escalate(action, result.groups)
        if action == "block":
            refuse(flow, transfer)


class BudgetedStream:
    """A streamed body's scan, spending from its transfer's budget (one more second per
    STREAM_BYTES_PER_SECOND received): past it the rest is not scanned, and the body is uninspectable."""

    def __init__(self, scan: StreamScan, budget: InspectionBudget):
        self.scan = scan
        self.budget = budget
        self.received = 0
        self.over = False

    def feed(self, chunk: bytes) -> None:
        self.received += len(chunk)
        # Earned for the transfer, not for this stream alone: the scans after it (the response's head,
        # after a long upload) still have the base budget left.
        self.budget.earn(len(chunk) / STREAM_BYTES_PER_SECOND)
        if not self.over:
            try:
                self.budget.spend(lambda: self.scan.feed(chunk))
            except BudgetExceeded:
                self.over = True

    def finish(self) -> ScanResult:
        if not self.over:
            try:
                return self.budget.spend(self.scan.finish)
            except BudgetExceeded:
                pass
        return _over_budget(self.scan.profile, self.scan.direction, self.scan.location, self.scan.host)


def _give_back_memory(flow: http.HTTPFlow) -> None:
    memory = flow.metadata.get(MEMORY_KEY)
    if memory is not None:
        memory.close()


def _over_budget(profile: Profile, direction: str, where: str, host: str | None) -> ScanResult:
    return profile.apply_rules([], [(f"{where} ({OVER_BUDGET})", OVER_BUDGET)], direction, host)


async def _scan(profile: Profile, body: bytes, headers: http.Headers, direction: str, transfer: Transfer,
                digest: str, budget: InspectionBudget) -> ScanResult:
    def scan() -> ScanResult:
        return profile.scan(body, content_type=headers.get("content-type"), content_encoding=headers.get(
            "content-encoding"), direction=direction, host=transfer.upstream_host, keep=KEEP_NONE)

    def scan_and_digest() -> ScanResult:
        # Hashing, like Hyperscan, releases the GIL: done here, the record stage need not hash on the loop.
        hasher = body_hasher(digest)
        hasher.update(body)
        transfer.body_digests[direction] = (body, hasher.digest_string())
        return scan()

    started = time.perf_counter()
    result = None
    if len(body) <= INLINE_SCAN_LIMIT:
        try:
            result = budget.spend(scan, at_most=INLINE_SCAN_SLICE)
        except BudgetExceeded:
            pass  # too slow for the event loop: scanned again in a worker thread with what is left
    if result is None:
        try:
            result = await asyncio.to_thread(budget.spend, scan_and_digest)
        except BudgetExceeded:
            result = _over_budget(profile, direction, "body", transfer.upstream_host)
    # The Measure stage reports it as gateway_inspection_duration_seconds{direction}.
    transfer.extra.setdefault("inspection_seconds", {})[direction] = time.perf_counter() - started
    return result


def _redact(flow: http.HTTPFlow, transfer: Transfer, profile: Profile, message: http.Message,
            result: ScanResult) -> None:
    """Mask the values to redact in `message`'s body; one that cannot be rewritten so (a value inside
    base64, a body the rewrite cannot decode) is blocked: it must not cross unmasked."""
    try:
        message.raw_content = profile.redact(
            message.raw_content, content_type=message.headers.get("content-type"),
            content_encoding=message.headers.get("content-encoding"), result=result)
    except DecodeError:
        where = "request body" if isinstance(message, http.Request) else "response body"
        transfer.escalate("block", [Reason("redaction", "unredactable", where, "block")])
        refuse(flow, transfer)
        return
    _fix_length(message)


def _unread_transfer_coding(transfer: Transfer, message: http.Message) -> bool:
    """A transfer coding other than chunked (deflate, gzip, br ...) would hide the body from every
    scan, which undoes only content codings; none is in real use, so such a message is blocked."""
    codings = [coding.strip().lower() for field in message.headers.get_all("transfer-encoding")
               for coding in field.split(",") if coding.strip()]
    if not codings or codings == ["chunked"]:
        return False
    where = "request head" if isinstance(message, http.Request) else "response head"
    transfer.escalate("block", [Reason("framing", "transfer-coding", f"{where} transfer-encoding", "block")])
    return True


def _unrewritable(action: str) -> str:
    """The action for what cannot be rewritten value by value (a head, a body already streaming):
    redact fails closed, as block."""
    return "block" if action == "redact" else action


def _fix_length(message: http.Message) -> None:
    if "content-length" in message.headers:
        message.headers["content-length"] = str(len(message.raw_content or b""))
