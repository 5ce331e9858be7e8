"""The proxy pipeline, one small mitmproxy addon per stage, in the order they run on each hook:

identify (zones) -> authorize (policy) -> grant (catalogue, grants) -> inspect (DLP)
  -> consent (data subjects' consent, per record) -> record (trace log, alerts) -> measure (metrics)
  -> discard (the body of a request refused at its head, dropped as it arrives)
"""

from __future__ import annotations

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
