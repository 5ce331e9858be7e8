"""Last stage: a request refused at its head has its body dropped as it arrives, not held.

mitmproxy reads the body of a request it will not forward before it sends the refusal, and buffers
all of it (64 MiB sent after a head holding an ID number grew a worker by 130 MiB). Its body is held
instead (gateway.proxy.heldheads) with a DiscardedBody in the spool's place: only its size and
digest are kept, for the record, and the refusal is sent once it has all arrived.
"""

from __future__ import annotations

from mitmproxy import http

from gateway.filters import Gateway, transfer_of
from gateway.transfer.spool import DiscardedBody, HeldBody


class DiscardRefusedBodies:
    def __init__(self, gateway: Gateway):
        self.gateway = gateway

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        transfer = transfer_of(flow)
        if transfer is None or not flow.metadata.get("gateway_refused") or flow.request.method == "CONNECT":
            return
        digest = self.gateway.runtime.config.body_digest

        def open_discard() -> DiscardedBody:
            body = transfer.spools["request"] = DiscardedBody(digest)
            return body

        flow.request.stream = HeldBody(0, None, open_discard, lambda _: False)
