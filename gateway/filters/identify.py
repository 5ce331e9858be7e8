"""Stage 1: give each transfer its id and listener, and place its client and upstream in zones."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time

from mitmproxy import connection, http
from mitmproxy.net.http import url

from gateway.config.load import format_host_port
from gateway.filters import Gateway
from gateway.transfer.edge import BALANCERS, MalformedRequest
from gateway.transfer.model import METADATA_KEY, Transfer


class Resolver:
    """Resolve upstream names once per TTL, off the event loop; literal addresses pass straight through."""

    def __init__(self, ttl: float = 30.0):
        self.ttl = ttl
        self._cache: dict[tuple[str, int], tuple[float, str | None]] = {}

    async def resolve(self, host: str, port: int) -> str | None:
        try:
            return str(ipaddress.ip_address(host.strip("[]")))
        except ValueError:
            pass
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


def _host_names_the_target(request: http.Request) -> None:
    """The policy decides on the target the gateway connects to; a Host header naming anything else
    is replaced by the target's, as a proxy must for an absolute-form request (RFC 9112, 3.2.2):
    it would otherwise reach the upstream unscanned and name a host nobody decided on."""
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
        await self._identify(flow)

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        _host_names_the_target(flow.request)
        await self._identify(flow)
        transfer = flow.metadata[METADATA_KEY]
        if transfer.upstream_addr is not None:
            # Pin the connection to the address the zone was decided for: no second lookup that a
            # DNS change could steer into another zone. The Host header and TLS SNI keep the name.
            flow.request.data.host = transfer.upstream_addr

    async def malformed_request(self, malformed: MalformedRequest) -> None:
        # No request: the upstream is known only inside a CONNECT tunnel (its target).
        host, port = malformed.upstream or ("", 0)
        address = await self.resolver.resolve(host, port) if host else None
        malformed.transfer = self._transfer(malformed.id, malformed.client, host, port, address)

    async def _identify(self, flow: http.HTTPFlow) -> None:
        host, port = flow.request.host, flow.request.port
        address = await self.resolver.resolve(host, port)
        flow.metadata[METADATA_KEY] = self._transfer(flow.id, flow.client_conn, host, port, address)

    def _transfer(self, transfer_id: str, client: connection.Client, upstream_host: str, upstream_port: int,
                  upstream_addr: str | None) -> Transfer:
        runtime = self.gateway.runtime
        client_ip, client_port = client.peername[:2]
        return Transfer(
            id=transfer_id,
            listener=runtime.listener_name(*client.sockname[:2]),
            client_addr=format_host_port(client_ip, client_port),
            client_zone=runtime.zones.zone_of(client_ip),
            upstream_host=upstream_host,
            upstream_port=upstream_port,
            upstream_addr=upstream_addr,
            upstream_zone=runtime.zones.zone_of(upstream_addr) if upstream_addr else "unknown",
            via=BALANCERS.get(client),
        )

