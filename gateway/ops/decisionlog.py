"""The decision log: one JSON line on standard output per decision that is not a plain allow.

Standard output goes to journald under systemd, so operators can follow it with
`journalctl -u gateway -o cat | jq` next to the alert file. A line names the transfer id (the one
the client saw in X-Gateway-Transfer-Id, and the trace record's id), zones, the decision and the
rules behind it; never a matched value, a body, or a full URL with its query.
"""

from __future__ import annotations

import json
import sys
import threading
from typing import Any, TextIO

from gateway.dlp import mask_method
from gateway.transfer.model import Transfer, reason_entries, utc_timestamp

REASONS_ROOM = 16 * 1024  # bytes of reasons in one line (grouped and counted past it, see gateway.dlp.tally)


class DecisionLog:
    def __init__(self, stream: TextIO | None = None):
        self._stream = stream
        self._lock = threading.Lock()

    def write(self, transfer: Transfer, *, method: str | None = None, status: int | None = None,
              event: str = "decision") -> None:
        line = json.dumps(decision_entry(transfer, method=method, status=status, event=event),
                          ensure_ascii=False, separators=(",", ":"))
        stream = self._stream or sys.stdout  # looked up late: tests and daemons may replace sys.stdout
        with self._lock:
            stream.write(line + "\n")
            stream.flush()


def decision_entry(transfer: Transfer, *, method: str | None, status: int | None, event: str) -> dict[str, Any]:
    reasons, omitted = reason_entries(transfer, REASONS_ROOM)
    entry = {
        "time": utc_timestamp(),
        "level": "error" if transfer.decision == "error" else "warning",
        "event": event,
        "transfer_id": transfer.id,
        "listener": transfer.listener,
        "src_zone": transfer.client_zone,
        "dst_zone": transfer.upstream_zone,
        "client": transfer.client_addr,
        "upstream": f"{transfer.shown_host}:{transfer.upstream_port}",
        "method": None if method is None else mask_method(method),  # a client's text when not a standard one
        "status": status,
        "decision": transfer.decision,
        "policy_rule": transfer.verdict.rule if transfer.verdict else None,
        "reasons": reasons,
        "error": transfer.error,
    }
    if omitted:
        entry["reasons_omitted"] = omitted
    return entry
