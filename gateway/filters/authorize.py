"""Stage 2: allow or deny each transfer by the zone-pair policy; a denied one never reaches upstream."""

from __future__ import annotations

from mitmproxy import http

from gateway.filters import Gateway, refuse, transfer_of
from gateway.transfer.model import Reason


class Authorize:
    def __init__(self, gateway: Gateway):
        self.gateway = gateway

    def http_connect(self, flow: http.HTTPFlow) -> None:
        # The path is unknown until the tunnel carries requests: each of them is decided again.
        self._decide(flow, path=None)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self._decide(flow, path=flow.request.path.split("?", 1)[0])

    def _decide(self, flow: http.HTTPFlow, path: str | None) -> None:
        transfer = transfer_of(flow)
        if transfer is None or flow.response:
            return
        verdict = self.gateway.runtime.policy.decide(
            transfer.client_zone, transfer.upstream_zone, transfer.upstream_host, path, transfer.listener)
        transfer.verdict = verdict
        if verdict.action != "allow":
            what = f"{transfer.client_zone}->{transfer.upstream_zone}"
            transfer.escalate("deny", [Reason(verdict.rule, "policy", what, "deny")])
            refuse(flow, transfer, error="denied")
