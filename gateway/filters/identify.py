"""Stage 1: give each transfer its id and listener, and place its client and upstream in zones.

The upstream's host names are scanned by DLP before the name is resolved: a name such as
`<ID number>.attacker.example` is refused here, before a DNS query could carry the number out.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time

from mitmproxy import connection, http
from mitmproxy.net.http import url

from gateway.config.load import format_host_port
from gateway.config.zones import ipv4_spelled_otherwise
from gateway.dlp import Finding
from gateway.dlp.urlmask import every_detector, host_words
from gateway.filters import Gateway, refuse
from gateway.transfer.edge import BALANCERS, MalformedRequest
from gateway.transfer.model import DECISION_ORDER, METADATA_KEY, Reason, Transfer


class Resolver:
    """Resolve upstream names once per TTL, off the event loop; literal addresses pass straight through."""

    def __init__(self, ttl: float = 30.0):
        self.ttl = ttl
        self._cache: dict[tuple[str, int], tuple[float, str | None]] = {}

    async def resolve(self, host: str, port: int) -> str | None:
        if address := literal_address(host):
            return address
        now = time.monotonic()
        cached = self._cache.get((host, port))
        if cached and cached[0] > now:
            return cached[1]
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
            address = infos[0][4][0] if infos else None
        except (OSError, UnicodeError):
            address = None
        self._cache[(host, port)] = (now + (self.ttl if address else 2.0), address)
        return address


def literal_address(host: str) -> str | None:
    """The address a host written as an IP address names (no DNS query), else None."""
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return None


def _host_names_the_target(request: http.Request) -> None:
    """The policy decides on the target the gateway connects to; a request line or Host header naming
    anything else is rewritten to the target's, as a proxy must for an absolute-form request (RFC 9112,
    3.2.2): it would otherwise reach the upstream unscanned and name a host nobody decided on."""
    if request.authority and not (request.is_http2 or request.is_http3) and request.method != "CONNECT":
        # An HTTP/1 request goes upstream in origin-form: mitmproxy makes it so on a forward listener,
        # but a reverse one kept the client's absolute-form URL, naming whatever host the client wrote.
        request.authority = ""
    header = request.host_header
    if header is None:
        return
    try:
        host, port = url.parse_authority(header, check=True)
    except ValueError:
        host, port = "", None
    if (host.lower().rstrip(".") != request.host.lower().rstrip(".")
            or (port or url.default_port(request.scheme)) != request.port):
        host = f"[{request.host}]" if ":" in request.host else request.host  # an IPv6 address
        request.host_header = url.hostport(request.scheme, host, request.port)


class Identify:
    def __init__(self, gateway: Gateway):
        self.gateway = gateway
        self.resolver = Resolver()

    async def http_connect(self, flow: http.HTTPFlow) -> None:
        await self._identify(flow, _names(flow))

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        names = _names(flow)  # the Host header as the client sent it, before it is replaced
        _host_names_the_target(flow.request)
        await self._identify(flow, names)
        transfer = flow.metadata[METADATA_KEY]
        if transfer.upstream_addr is not None:
            # Pin the connection to the address the zone was decided for: no second lookup that a
            # DNS change could steer into another zone. The Host header and TLS SNI keep the name.
            flow.request.data.host = transfer.upstream_addr

    async def malformed_request(self, malformed: MalformedRequest) -> None:
        # No request: the upstream is known only inside a CONNECT tunnel (its target).
        host, port = malformed.upstream or ("", 0)
        malformed.transfer = self._transfer(malformed.id, malformed.client, host, port)
        if host and self._may_be_allowed(malformed.transfer) \
                and not self._names_scan(malformed.transfer, [("host", host)]):
            await self._place_upstream(malformed.transfer)

    async def _identify(self, flow: http.HTTPFlow, names: list[tuple[str, str]]) -> None:
        transfer = self._transfer(flow.id, flow.client_conn, flow.request.host, flow.request.port)
        flow.metadata[METADATA_KEY] = transfer
        if ipv4_spelled_otherwise(transfer.upstream_host):
            # 2130706434, 127.2, 0x7f.0.0.2: the resolver reads them as an address no rule names as written.
            transfer.escalate("block", [Reason("gateway", "host_not_canonical", "host", "block")])
            refuse(flow, transfer)
            return
        if not self._may_be_allowed(transfer):
            return  # denied whatever zone the name is in (authorize says so): no DNS query for it
        findings = self._names_scan(transfer, names)
        if findings:
            # A name is never rewritten: redact fails closed, as block.
            reasons = [Reason(f.rule, f.type, f.location, "block" if f.action == "redact" else f.action)
                       for f in findings]
            transfer.escalate(max((r.action for r in reasons), key=DECISION_ORDER.index), reasons)
            if transfer.stopped:
                # Never resolved (a DNS query would carry the value out): refused in no zone, its
                # name masked wherever the transfer is recorded; a refused CONNECT closes its connection.
                refuse(flow, transfer)
                if flow.request.method == "CONNECT":
                    flow.response.headers["Connection"] = "close"
                return
        await self._place_upstream(transfer)

    def _may_be_allowed(self, transfer: Transfer) -> bool:
        """Whether an allow rule could apply to the transfer; when none can, its upstream is placed
        only if it is written as an address (a name is not resolved)."""
        if self.gateway.runtime.policy.may_allow(transfer.client_zone, transfer.upstream_host, transfer.listener):
            return True
        if address := literal_address(transfer.upstream_host):
            transfer.upstream_addr = address
            transfer.upstream_zone = self.gateway.runtime.zones.zone_of(address)
        return False

    def _names_scan(self, transfer: Transfer, names: list[tuple[str, str]]) -> list[Finding]:
        """The host names (target, Host header, TLS SNI) scanned with the request profile of every
        policy rule the transfer could fall under, before anything resolves them; with every detector
        (its findings block) when none of those rules has a request profile. A name is read as written
        and with its digits apart from the letters around them (`x<ID number>.example`)."""
        runtime = self.gateway.runtime
        fields = [(where, where, text) for where, name in names for text in (name, *host_words(name))]
        profiles = [runtime.rules.profile(profile) for profile in runtime.policy.request_profiles(
            transfer.client_zone, transfer.upstream_host, transfer.listener)] or [every_detector("block")]
        return [finding for profile in profiles
                for finding in profile.scan_fields(fields, direction="request", host=transfer.upstream_host).findings]

    async def _place_upstream(self, transfer: Transfer) -> None:
        transfer.upstream_addr = await self.resolver.resolve(transfer.upstream_host, transfer.upstream_port)
        if transfer.upstream_addr:
            transfer.upstream_zone = self.gateway.runtime.zones.zone_of(transfer.upstream_addr)

    def _transfer(self, transfer_id: str, client: connection.Client, upstream_host: str,
                  upstream_port: int) -> Transfer:
        """The transfer with its client placed; its upstream is placed once its names are found clean."""
        runtime = self.gateway.runtime
        client_ip, client_port = client.peername[:2]
        return Transfer(
            id=transfer_id,
            listener=runtime.listener_name(*client.sockname[:2]),
            client_addr=format_host_port(client_ip, client_port),
            client_zone=runtime.zones.zone_of(client_ip),
            upstream_host=upstream_host,
            upstream_port=upstream_port,
            via=BALANCERS.get(client),
        )


def _names(flow: http.HTTPFlow) -> list[tuple[str, str]]:
    """Every host name the client gave: the request target's (absolute-form URL, CONNECT target or
    the tunnel's), the Host header, the TLS SNI."""
    names = [("host", flow.request.host)]
    header = flow.request.host_header
    if header and header.lower().rsplit(":", 1)[0].strip("[]") != flow.request.host.lower():
        names.append(("header:host", header))  # only a name of its own: a finding is reported once
    if flow.client_conn.sni:
        names.append(("tls sni", flow.client_conn.sni))
    return names
