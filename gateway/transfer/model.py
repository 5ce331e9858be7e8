"""One transfer's state as it moves through the pipeline stages, kept in `flow.metadata`."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from gateway.config.policy import Verdict
from gateway.dlp.urlmask import mask_host
from gateway.dlp.tally import FindingGroup, fit, single

METADATA_KEY = "gateway"
TRANSFER_ID_HEADER = "X-Gateway-Transfer-Id"
WARNING_HEADER = "X-Gateway-Warning"
# Decisions, weakest first: a transfer's decision only ever moves to a stronger one.
DECISION_ORDER = ("allow", "audit", "warn", "redact", "block", "deny", "error")
# Groups of reasons a transfer keeps (a WebSocket connection adds some with every message); past it
# they are only counted, by rule, type and action.
MAX_REASON_GROUPS = 256
REFUSAL_ROOM = 8 * 1024  # bytes of reasons in a refusal body


@dataclass(frozen=True)
class Reason:
    """Why a transfer was stopped or flagged; never holds the sensitive value itself."""

    rule: str
    type: str
    location: str
    action: str


@dataclass
class Transfer:
    id: str
    listener: str
    client_addr: str
    client_zone: str
    upstream_host: str
    upstream_port: int
    upstream_addr: str | None = None
    upstream_zone: str = "unknown"
    via: str | None = None  # the balancer the client came through (PROXY protocol listeners)
    verdict: Verdict | None = None
    decision: str = "allow"
    # Why, grouped per rule, type and action as each scan (or stage) found them (gateway.dlp.tally).
    reasons: list[FindingGroup] = field(default_factory=list)
    reasons_omitted: dict[tuple[str, str, str], int] = field(default_factory=dict)  # past MAX_REASON_GROUPS
    error: str | None = None
    started: float = field(default_factory=time.monotonic)
    opened: bool = False  # its "open" record is durable: it may be forwarded (gateway.filters.record)
    recorded: bool = False  # its final record (the only one, or the completion of an opened one) is written
    # Bodies spooled to disk while scanned, by direction ("request", "response").
    spools: dict[str, Any] = field(default_factory=dict)
    # Digests computed beside a threaded scan, by direction: (the exact body object hashed, digest).
    body_digests: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    # Checks that must pass before a spooled body is released (the record made durable first).
    before_release: list[Callable[[], bool]] = field(default_factory=list)
    cut: bool = False  # a spooled body was withheld: the connection is cut, not answered
    extra: dict[str, Any] = field(default_factory=dict)
    # shown_host's last answer, for the upstream host it was asked of (masking a host costs ~6 us).
    _shown_host: tuple[str, str] | None = field(default=None, repr=False, compare=False)

    def escalate(self, decision: str, reasons: Iterable[Reason | FindingGroup] = ()) -> None:
        if DECISION_ORDER.index(decision) > DECISION_ORDER.index(self.decision):
            self.decision = decision
        self.add_reasons(reasons)

    def add_reasons(self, reasons: Iterable[Reason | FindingGroup]) -> None:
        for reason in reasons:
            if isinstance(reason, Reason):
                reason = single(reason.rule, reason.type, reason.location, reason.action)
            if len(self.reasons) < MAX_REASON_GROUPS:
                self.reasons.append(reason)
            else:
                key = (reason.rule, reason.type, reason.action)
                self.reasons_omitted[key] = self.reasons_omitted.get(key, 0) + reason.count

    @property
    def shown_host(self) -> str:
        """The upstream host as records, alerts and logs show it: a sensitive value in the name masked."""
        host = self.upstream_host
        if self._shown_host is None or self._shown_host[0] != host:
            self._shown_host = (host, mask_host(host))
        return self._shown_host[1]

    @property
    def stopped(self) -> bool:
        return self.decision in ("block", "deny", "error")


def utc_timestamp() -> str:
    """Now, as trace records and logs write it: ISO 8601 in UTC, milliseconds, a trailing Z."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def refusal_body(transfer: Transfer, error: str = "blocked") -> bytes:
    """The JSON a client gets with a refusal: which rules, of what type, how many, where (the first
    few places); never the value. Bounded: reasons with no room are counted in `reasons_omitted`."""
    stopping = [r for r in transfer.reasons if r.action in ("block", "deny", "error")] or transfer.reasons
    reasons, omitted = fit(stopping, REFUSAL_ROOM, public=True)
    answer: dict[str, Any] = {"error": error, "transfer_id": transfer.id, "reasons": reasons}
    if omitted:
        answer["reasons_omitted"] = omitted
    return json.dumps(answer, ensure_ascii=False, separators=(",", ":")).encode()


def reason_entries(transfer: Transfer, room: int) -> tuple[list[dict], int]:
    """A transfer's reasons as records and logs write them, in at most `room` bytes, and how many
    findings they leave out (see gateway.dlp.tally.fit)."""
    entries, omitted = fit(transfer.reasons, room)
    return entries, omitted + sum(transfer.reasons_omitted.values())
