"""One transfer's state as it moves through the pipeline stages, kept in `flow.metadata`."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from gateway.config.policy import Verdict

METADATA_KEY = "gateway"
TRANSFER_ID_HEADER = "X-Gateway-Transfer-Id"
WARNING_HEADER = "X-Gateway-Warning"
# Decisions, weakest first: a transfer's decision only ever moves to a stronger one.
DECISION_ORDER = ("allow", "audit", "warn", "redact", "block", "deny", "error")


@dataclass(frozen=True)
class Reason:
    """Why a transfer was stopped or flagged; never holds the sensitive value itself."""

    rule: str
    type: str
    location: str
    action: str

    def public(self) -> dict[str, str]:
        return {"rule": self.rule, "type": self.type, "location": self.location}

    def entry(self) -> dict[str, str]:
        """As trace records and the decision log write it: `public()` plus the action."""
        return {"rule": self.rule, "type": self.type, "location": self.location, "action": self.action}


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
    verdict: Verdict | None = None
    decision: str = "allow"
    reasons: list[Reason] = field(default_factory=list)
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

    def escalate(self, decision: str, reasons: list[Reason] = ()) -> None:
        if DECISION_ORDER.index(decision) > DECISION_ORDER.index(self.decision):
            self.decision = decision
        self.reasons.extend(reasons)

    @property
    def stopped(self) -> bool:
        return self.decision in ("block", "deny", "error")


def utc_timestamp() -> str:
    """Now, as trace records and logs write it: ISO 8601 in UTC, milliseconds, a trailing Z."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def refusal_body(transfer: Transfer, error: str = "blocked") -> bytes:
    """The JSON a client gets with a refusal: which rules, of what type, where; never the value."""
    reasons = [r.public() for r in transfer.reasons if r.action in ("block", "deny", "error")] or [
        r.public() for r in transfer.reasons]
    return json.dumps({"error": error, "transfer_id": transfer.id, "reasons": reasons},
                      ensure_ascii=False).encode()
