"""Stage 2b (after authorize): a request to a catalogued dataset needs what its class requires.

A host serving a catalogued dataset is closed by default (gateway.authz.catalog.Catalog.route): a
request to it that matches no endpoint (`uncatalogued`) or spells its path otherwise than in normal form
(`path_not_normal`) is refused, and its endpoints are found by path first, so that a method the
endpoint does not list is refused (`grant_scope`) rather than passed as if uncatalogued. The host is
recognised by name and by the address the transfer is pinned to.

Open datasets pass; conditional and contract ones need a grant signed by every required authority,
valid on this gateway, now, for this path, method and fields, not revoked, within quota, and the
consumer's licence for the grant's scenario (gateway.authz.gate decides). The grant and licence
headers are removed before the request goes on (and before DLP reads the head). Before any grant is
looked at, whatever the class: a request asking for a protocol upgrade (its records would cross in
frames, uncounted and unfiltered) is refused `upgrade_refused`, one with a method-override header (or
`?_method=`) naming another method than its own `method_override`; the method is compared as sent
(`get` is not GET). A refusal is a 403 (429 over quota, with RateLimit headers) naming its reason;
every decision is counted, and written to the transfer's trace record (`grant`).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Protocol

from mitmproxy import http

from gateway.authz.gate import Decision, Gate, Presented
from gateway.authz.quota import Exceeded, QuotaStore
from gateway.authz.records import Unfilterable, project, read_records
from gateway.config.runtime import Runtime
from gateway.filters import CONSENT_DATASET, RECORDS_READ, body_size, refuse, transfer_of
from gateway.filters.granthead import keep_standard_fields
from gateway.ops.metrics import GatewayMetrics
from gateway.transfer.model import Reason

log = logging.getLogger(__name__)

GRANT_HEADER = "X-Data-Grant"
GRANT_ID_HEADER = "X-Data-Grant-Id"
LICENCE_HEADER = "X-Data-Licence"
ALLOWED = "grant_allowed"  # the allowing Decision: quota scopes, granted fields, whether records count
# Headers by which frameworks take another method than the request's own (names compared case-insensitively).
METHOD_OVERRIDES = ("X-HTTP-Method-Override", "X-Method-Override", "X-HTTP-Method")
METHOD_PARAMETER = "_method"  # the query parameter Symfony, Laravel and Express's method-override read
REVOCATION_POLL = 1.0  # seconds; the view itself reads the file at most once a second


class GrantGateway(Protocol):
    runtime: Runtime
    metrics: GatewayMetrics


class Grant:
    def __init__(self, gateway: GrantGateway):
        self.gateway = gateway
        self._gate: Gate | None = None
        self._quota: QuotaStore | None = None
        self._poller: asyncio.Task | None = None

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        transfer = transfer_of(flow)
        if transfer is None or flow.response:
            return
        request = flow.request
        presented = {name: request.headers.get_all(name) for name in (GRANT_HEADER, GRANT_ID_HEADER, LICENCE_HEADER)}
        for name, values in presented.items():
            if values:
                del request.headers[name]
        gate = self._current_gate()
        # As sent: mitmproxy's `method` is upper-cased, but `get` goes upstream as `get`, another method.
        method = request.data.method.decode("utf-8", "surrogateescape")
        route = gate.catalog.route(transfer.upstream_host, transfer.upstream_addr, method, request.path) \
            if gate else None
        if route is not None and route.refusal is not None:
            reason, detail = route.refusal
            self.gateway.metrics.grant_decisions.labels("none", reason).inc()
            transfer.escalate("deny", [Reason("catalogue", reason, detail, "deny")])
            refuse(flow, transfer, status=403, error="grant refused")
            return
        match = route.match if route is not None else None
        if match is None:
            return  # a host serving no dataset, or a path listed as uncatalogued: the zone policy alone decides
        if (problem := _request_problem(request, method, presented)) is not None:
            decision = gate.refusal(match, *problem)
        else:
            has_body = "transfer-encoding" in request.headers or request.headers.get("content-length", "0") != "0"
            decision = gate.decide(match, method, request.path, Presented(
                *(values[0] if values else None for values in presented.values())), time.time(), has_body)
        transfer.extra["grant"] = decision.record
        self.gateway.metrics.grant_decisions.labels(match.dataset.cls, decision.record["result"]).inc()
        if gate.revocation.current is not None:
            self.gateway.metrics.revocation_list_issued.set(gate.revocation.current.iat)
        if decision.allowed:
            transfer.extra[ALLOWED] = decision
            return
        _refuse(flow, transfer, match.dataset.id, decision.reason, decision.detail, decision.status,
                decision.exceeded)

    def running(self) -> None:
        """Read the revocation list at start, and again every REVOCATION_POLL: every worker's view (and the
        age the metric exports, the oldest of any worker's) follows the file without waiting for requests."""
        self._refresh_revocation(force=True)
        self._poller = asyncio.get_running_loop().create_task(self._poll_revocation())

    async def _poll_revocation(self) -> None:
        while True:
            await asyncio.sleep(REVOCATION_POLL)
            self._refresh_revocation()

    def _refresh_revocation(self, force: bool = False) -> None:
        if (gate := self._current_gate()) is not None:
            gate.revocation.refresh(force=force)
            if gate.revocation.current is not None:
                self.gateway.metrics.revocation_list_issued.set(gate.revocation.current.iat)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        transfer = transfer_of(flow)
        decision: Decision | None = transfer.extra.get(ALLOWED) if transfer is not None else None
        if decision is None or flow.metadata.get("gateway_refused") or not (decision.fields or decision.count_records):
            return

        def held_whole() -> bool:
            # Runs only if the body is spooled (above dlp.spool_threshold): it is never held whole, so its
            # records can be neither counted nor reduced to the granted fields. Refused, not passed uncounted.
            _refuse(flow, transfer, decision.record["dataset"], "grant_uncountable",
                    "response body (spooled): records not counted", 502)
            return False
        transfer.before_release.append(held_whole)

    def response(self, flow: http.HTTPFlow) -> None:
        transfer = transfer_of(flow)
        decision: Decision | None = transfer.extra.get(ALLOWED) if transfer is not None else None
        if decision is None or flow.metadata.get("gateway_refused"):
            return
        response, grant, dataset = flow.response, decision.record, decision.record["dataset"]
        if "response" in transfer.spools:  # released once clean: only its size is known
            grant["records"] = None
            self._count(flow, transfer, decision, 0, body_size(transfer, "response", response))
            return
        content_type = response.headers.get("content-type", "")
        try:
            body = response.content or b""  # content codings undone: gzip is counted as the client reads it
        except ValueError as e:  # mitmproxy's words for it name the codec, not the header
            _refuse(flow, transfer, dataset, "grant_uncountable", "response body: its Content-Encoding "
                    f"({response.headers.get('content-encoding', 'none')}) cannot be undone ({e})", 502)
            return
        if response.status_code == 206 and (decision.count_records or decision.fields is not None):
            # A slice of a body is not records: they are counted, and reduced to the granted fields, whole.
            reason, done = ("grant_uncountable", "counted") if decision.count_records else \
                ("grant_unfilterable", "reduced to the granted fields")
            _refuse(flow, transfer, dataset, reason, f"a partial response (206): records are {done} in a whole body "
                    f"only (Content-Range: {response.headers.get('content-range', 'none')})", 502)
            return
        if decision.fields is not None:
            try:
                projected, records = project(body, content_type, decision.fields)
            except Unfilterable as e:
                _refuse(flow, transfer, dataset, "grant_unfilterable",
                        f"a grant for some fields only, and a response body whose records cannot be read: {e}", 502)
                return
            response.content = body = projected  # encoded again as sent; Content-Length follows
            if dropped := keep_standard_fields(response):  # nor a field of its head the records' are not
                grant["headers_dropped"] = dropped
        else:
            try:  # the envelope is the consent stage's to check
                read = read_records(body, content_type, envelope_checked=False)
            except Unfilterable as e:
                if decision.count_records and body:
                    _refuse(flow, transfer, dataset, "grant_uncountable", "response body: records are counted in "
                            f"whole JSON, CSV and XML bodies, and this one's cannot be read ({e})", 502)
                    return
                read = None
            records = 0 if read is None else len(read.items)
            if read is not None and CONSENT_DATASET in transfer.extra:
                transfer.extra[RECORDS_READ] = (body, read)
        grant["records"] = records  # as the upstream sent them, for settlement (the consent stage may drop some)
        self._count(flow, transfer, decision, records, len(body))

    def _count(self, flow: http.HTTPFlow, transfer, decision: Decision, records: int, size: int) -> None:
        if not decision.quota_scopes:
            return
        exceeded = self._quota.add(decision.quota_scopes, records, size, time.time())
        if exceeded is not None and "response" not in transfer.spools:
            _refuse(flow, transfer, decision.record["dataset"], "grant_quota",
                    f"{exceeded.scope}: this response's {exceeded.measure} would pass the limit per "
                    f"{exceeded.period} ({exceeded.limit})", 429, exceeded)

    def done(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        if self._quota is not None:
            self._quota.close()

    def _current_gate(self) -> Gate | None:
        """The gate for the configuration in use, built again when a reload replaced it."""
        config = self.gateway.runtime.config
        if config.authz is None:
            return None
        if self._gate is None or self._gate.settings is not config.authz:
            if self._quota is None:
                self._quota = QuotaStore(config.state_dir / "authz" / "quota.sqlite")
            self._gate = Gate(config.authz, config.name, self._quota, _addresses,
                              config.state_dir / "authz" / "revocation.sqlite")
        return self._gate


def _request_problem(request: http.Request, method: str, presented: dict[str, list[str]]) -> tuple[str, str] | None:
    """(reason, detail) when a request to a catalogued dataset asks for what the grant cannot govern."""
    if any(len(values) > 1 for values in presented.values()):
        return "grant_malformed", "a grant or licence header sent more than once"
    if "upgrade" in request.headers:
        # After a 101 the data would cross in frames (WebSocket) or another protocol, where records
        # are neither counted, billed nor reduced to the granted fields or the consented ones.
        protocols = ", ".join(request.headers.get_all("upgrade")) or "(empty)"
        return "upgrade_refused", f"Upgrade: {protocols}: a catalogued dataset is served as HTTP requests only"
    # An upstream may act on these in place of the method the catalogue and the grant were checked for.
    for name in METHOD_OVERRIDES:
        if any(value != method for value in request.headers.get_all(name)):
            return "method_override", f"{name}: {', '.join(request.headers.get_all(name))} on a {method}"
    overrides = request.query.get_all(METHOD_PARAMETER)
    if any(value != method for value in overrides):
        return "method_override", f"?{METHOD_PARAMETER}={', '.join(overrides)} on a {method}"
    return None


def _refuse(flow: http.HTTPFlow, transfer, dataset: str, reason: str, detail: str, status: int,
            exceeded: Exceeded | None = None) -> None:
    transfer.escalate("deny", [Reason(dataset, reason, detail, "deny")])
    refuse(flow, transfer, status=status, error="grant refused")
    if (record := transfer.extra.get("grant")) is not None:
        record["result"] = reason
    if exceeded is not None:
        flow.response.headers["RateLimit-Policy"] = f'"{exceeded.policy}";q={exceeded.limit}'
        flow.response.headers["RateLimit"] = f'"{exceeded.policy}";r=0;t={exceeded.reset}'
        flow.response.headers["Retry-After"] = str(exceeded.reset)


def _addresses(name: str) -> list[str]:
    """The addresses a catalogued host name resolves to when the configuration loads (a request naming
    one of them, or another name for it, is that host's)."""
    try:
        return [info[4][0] for info in socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)]
    except (OSError, UnicodeError):
        return []
