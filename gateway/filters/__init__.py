"""The proxy pipeline, one small mitmproxy addon per stage, in the order they run on each hook:

identify (zones) -> authorize (policy) -> grant (catalogue, grants) -> inspect (DLP)
  -> consent (data subjects' consent, per record) -> record (trace log, alerts) -> measure (metrics)
  -> discard (the body of a request refused at its head, dropped as it arrives)
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Protocol

from mitmproxy import hooks, http

from gateway.config.runtime import Runtime
from gateway.transfer.model import (
    METADATA_KEY,
    TRANSFER_ID_HEADER,
    Reason,
    Transfer,
    refusal_body,
)


class Gateway(Protocol):
    """What stages need from the running gateway: the current runtime (replaced whole on reload)."""

    runtime: Runtime


# transfer.extra keys: the consent dataset whose response the consent stage filters (set at the request's
# head), and the response's records as the grant stage read them to count them, (body, Records), handed
# to the consent stage so that a response is parsed once.
CONSENT_DATASET = "consent_dataset"
RECORDS_READ = "records_read"


def transfer_of(flow: http.HTTPFlow) -> Transfer | None:
    return flow.metadata.get(METADATA_KEY)


def body_size(transfer: Transfer, direction: str, message: http.Message) -> int:
    """A body's size, also when it was spooled to disk rather than held by mitmproxy."""
    spool = transfer.spools.get(direction)
    return spool.size if spool is not None else len(message.raw_content or b"")


# Kept free on the trace log's and the spool's filesystems: below it transfers are refused 503 before
# anything is forwarded, so that a full disk is met by a refusal (and its record), not a failed write.
DISK_RESERVE = 16 * 1024 * 1024


def disk_full(directory: Path, what: str) -> str | None:
    """Why `directory`'s filesystem cannot take `what` any more (less than DISK_RESERVE free), or None."""
    return _too_little(_free_bytes(directory), directory, what)


def _free_bytes(directory: Path) -> int:
    folder = directory
    while not folder.exists() and folder != folder.parent:  # the spool folder is made on first use
        folder = folder.parent
    return shutil.disk_usage(folder).free


def _too_little(free: int, directory: Path, what: str) -> str | None:
    if free >= DISK_RESERVE:
        return None
    return (f"{what} filesystem full: {free // 1024} KiB free at {directory}, "
            f"{DISK_RESERVE // (1024 * 1024)} MiB kept in reserve")


# Far enough above the reserve, a filesystem is looked at again only after DISK_RECHECK seconds.
DISK_AMPLE = DISK_RESERVE + 256 * 1024 * 1024
DISK_RECHECK = 1.0


class FreeSpace:
    """`disk_full` on a hot path (every transfer): while the last look found DISK_AMPLE free, the next
    look waits DISK_RECHECK seconds (its system calls on every transfer cost ~2 % of the proxy's 1 KiB
    throughput); near the reserve every call looks. The trace log fails closed on a failed write
    whatever this says, so a disk filled from outside within that second still stops transfers."""

    def __init__(self, directory: Path, what: str):
        self.directory, self.what = directory, what
        self._ample_until = 0.0

    def full(self) -> str | None:
        now = time.monotonic()
        if now < self._ample_until:
            return None
        free = _free_bytes(self.directory)
        self._ample_until = now + DISK_RECHECK if free >= DISK_AMPLE else 0.0
        return _too_little(free, self.directory, self.what)


# Hooks after which mitmproxy has sent the client nothing of the flow yet (it answers a refusal set here).
_UNANSWERED_HOOKS = frozenset({"requestheaders", "request", "http_connect"})


def fail_closed(event: hooks.Hook, args: tuple, error: Exception) -> None:
    """A stage raised on a flow (a bug, input nobody foresaw): the flow must not go on half-inspected.
    Refused 500 while its client has nothing yet, else killed; an error either way, so recorded."""
    flow = args[0] if args else None
    if not isinstance(flow, http.HTTPFlow):
        return
    transfer = transfer_of(flow)
    if transfer is not None:
        transfer.escalate("error", [Reason("gateway", "internal-error", event.name, "block")])
        transfer.error = transfer.error or f"internal error in the {event.name} stage ({type(error).__name__})"
        if event.name in _UNANSWERED_HOOKS and not flow.metadata.get("gateway_refused"):
            refuse(flow, transfer, status=500, error="internal error")
            return
    if flow.killable:
        flow.kill()


def refusal_response(transfer: Transfer, status: int, error: str) -> http.Response:
    return http.Response.make(status, refusal_body(transfer, error), {
        "Content-Type": "application/json; charset=utf-8",
        TRANSFER_ID_HEADER: transfer.id,
    })


def refuse(flow: http.HTTPFlow, transfer: Transfer, status: int = 403, error: str = "blocked") -> None:
    """Answer the client ourselves with the JSON refusal; mitmproxy then never contacts the upstream."""
    flow.response = refusal_response(transfer, status, error)
    flow.metadata["gateway_refused"] = True
    flow.request.stream = False  # a refused request's body is read and dropped, never streamed on
