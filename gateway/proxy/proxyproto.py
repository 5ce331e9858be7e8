"""PROXY protocol v2 on listeners behind a TCP load balancer (HAProxy `send-proxy-v2`).

Behind a balancer every connection comes from the balancer; the client is named by the binary header
the balancer sends first (haproxy's doc/proxy-protocol.txt, section 2.2). mitmproxy does not read it,
so the connection handler's start is wrapped (`install`): on a listener with `proxy_protocol: v2`,
before any hook runs and before mitmproxy reads a byte, the header is read and checked strictly
(signature, version 2, command, TCP over IPv4 or IPv6, a bounded length, well-formed TLVs), and

- the connection's peer must be in the listener's `trusted_proxies`;
- a PROXY command's source becomes the client's address (client.peername), so zones, policy,
  connection limits and records all see the client; the balancer's address is kept beside it
  (gateway.transfer.edge.BALANCERS) and written into records as `client.via`;
- a LOCAL command (the balancer's own connection, e.g. a health check) is served as coming from the
  balancer itself, as the specification requires.

A CRC32C TLV (HAProxy's `proxy-v2-options crc32c`) is verified as the specification says: the CRC32C
of the whole header with the TLV's four value bytes zeroed must equal the value sent (big-endian).

Anything else is refused: an untrusted peer, a missing, truncated, v1 (text) or malformed header, a
CRC32C that does not match. The connection gets a 400 with a transfer id, is recorded (the pipeline's
`malformed_request` hook, the reason in the record's `error`, the claimed source too) and counted in
gateway_connections_refused (reason proxy_untrusted, proxy_malformed or proxy_missing). A connection
that says nothing within the request head timeout, or closes before a byte, is closed and counted
(proxy_missing) but not recorded: no transfer began (as gateway.proxy.deadline does for silent plain
connections).

A LOCAL command's address block is ignored, as the specification requires, TLVs and CRC32C included.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import uuid
from dataclasses import dataclass
from typing import Protocol

import google_crc32c
from mitmproxy import ctx
from mitmproxy.net.http import http1
from mitmproxy.proxy.server import ConnectionHandler

from gateway.config.load import Listener, format_host_port
from gateway.config.runtime import Runtime
from gateway.config.zones import host_ip
from gateway.ops.metrics import GatewayMetrics
from gateway.proxy.patches import wrap_method
from gateway.transfer.edge import BALANCERS, MalformedRequest, MalformedRequestHook

log = logging.getLogger(__name__)

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
HEADER_START = 16  # signature, version and command, family, length
MAX_ADDRESS_BLOCK = 1024  # addresses and TLVs; HAProxy sends 12 or 36 bytes plus a few optional TLVs
COMMAND_LOCAL, COMMAND_PROXY = 0x0, 0x1
TCP_OVER_IPV4, TCP_OVER_IPV6 = 0x11, 0x21
ADDRESS_SIZES = {TCP_OVER_IPV4: (4, 12), TCP_OVER_IPV6: (16, 36)}  # (address bytes, block bytes)
TLV_CRC32C = 0x03


class ProxyHeaderError(ValueError):
    """A header that is not a valid PROXY v2 header; `missing` when the connection sent none at all."""

    def __init__(self, message: str, missing: bool = False):
        super().__init__(message)
        self.missing = missing


@dataclass(frozen=True)
class ProxyHeader:
    source: tuple[str, int] | None  # None for the LOCAL command: the balancer speaks for itself
    destination: tuple[str, int] | None


def parse_start(start: bytes) -> tuple[int, int, int]:
    """The first 16 bytes: (command, family, length of the block that follows)."""
    if start[:len(SIGNATURE)] != SIGNATURE:
        if start.startswith(b"PROXY "):
            raise ProxyHeaderError("a PROXY protocol v1 (text) header; this listener takes v2 only")
        raise ProxyHeaderError("no PROXY protocol v2 header (the connection does not start with its signature)",
                               missing=True)
    version, command = start[12] >> 4, start[12] & 0xF
    if version != 2:
        raise ProxyHeaderError(f"PROXY protocol version {version}, not 2")
    if command not in (COMMAND_LOCAL, COMMAND_PROXY):
        raise ProxyHeaderError(f"unknown PROXY command {command:#x}")
    family = start[13]
    length = int.from_bytes(start[14:16], "big")
    if length > MAX_ADDRESS_BLOCK:
        raise ProxyHeaderError(f"PROXY header of {length} bytes after its start (at most {MAX_ADDRESS_BLOCK})")
    return command, family, length


def parse_block(start: bytes, block: bytes) -> ProxyHeader:
    """The addresses (and TLVs) after the start (the 16 bytes parse_start checked)."""
    command, family = start[12] & 0xF, start[13]
    if command == COMMAND_LOCAL:
        return ProxyHeader(None, None)  # the receiver must ignore the address block (section 2.2)
    if family not in ADDRESS_SIZES:
        raise ProxyHeaderError(f"PROXY address family {family:#04x} (only TCP over IPv4 0x11 or IPv6 0x21)")
    size, needed = ADDRESS_SIZES[family]
    if len(block) < needed:
        raise ProxyHeaderError(f"PROXY address block of {len(block)} bytes for family {family:#04x} "
                               f"(needs {needed})")
    address = ipaddress.IPv4Address if family == TCP_OVER_IPV4 else ipaddress.IPv6Address
    source = str(address(block[:size])), int.from_bytes(block[2 * size:2 * size + 2], "big")
    destination = str(address(block[size:2 * size])), int.from_bytes(block[2 * size + 2:needed], "big")
    crc_at = _check_tlvs(block, needed)
    if crc_at is not None:
        _check_crc32c(start + block, len(start) + crc_at)
    return ProxyHeader(source, destination)


def _check_tlvs(block: bytes, offset: int) -> int | None:
    """Walk the TLVs from `offset` to the block's end; where a CRC32C TLV's value starts, if there is one."""
    crc_at = None
    while offset < len(block):
        if offset + 3 > len(block):
            raise ProxyHeaderError("PROXY header ends inside a TLV's type and length")
        kind, length = block[offset], int.from_bytes(block[offset + 1:offset + 3], "big")
        if offset + 3 + length > len(block):
            raise ProxyHeaderError("a PROXY TLV runs past the header's end")
        if kind == TLV_CRC32C:
            if length != 4 or crc_at is not None:
                raise ProxyHeaderError("a PROXY CRC32C TLV must be one, of 4 bytes")
            crc_at = offset + 3
        offset += 3 + length
    return crc_at


def _check_crc32c(header: bytes, at: int) -> None:
    sent = int.from_bytes(header[at:at + 4], "big")
    computed = google_crc32c.value(header[:at] + bytes(4) + header[at + 4:])
    if computed != sent:
        raise ProxyHeaderError(f"PROXY header's CRC32C {sent:#010x} does not match its content ({computed:#010x})")


async def read_header(reader: asyncio.StreamReader) -> ProxyHeader:
    """Read exactly one header (nothing after it) from the connection."""
    start = await reader.readexactly(HEADER_START)
    _, _, length = parse_start(start)
    return parse_block(start, await reader.readexactly(length))


class ProxiedGateway(Protocol):
    runtime: Runtime
    metrics: GatewayMetrics


class ProxyProtocol:
    """The addon the wrapped connection handler asks (found by name, `proxyprotocol`)."""

    def __init__(self, gateway: ProxiedGateway):
        self.gateway = gateway

    async def admit(self, handler: ConnectionHandler) -> bool:
        """True to serve the connection (its client taken from the header where there is one)."""
        client = handler.client
        listener = self._listener(*client.sockname[:2])
        if listener is None or not listener.proxy_protocol:
            return True
        peer = format_host_port(*client.peername[:2])
        trusted = _in(host_ip(client.peername[0]), listener.trusted_proxies)
        timeout = self.gateway.runtime.config.request_head_timeout
        try:
            header = await asyncio.wait_for(read_header(handler.transports[client].reader), timeout)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError) as e:
            if isinstance(e, asyncio.IncompleteReadError) and e.partial:
                why = f"the connection closed inside its PROXY header ({len(e.partial)} bytes)"
                await self._refuse(handler, listener, "proxy_malformed", why, record=True)
            else:  # silent: no transfer began
                await self._refuse(handler, listener, "proxy_untrusted" if not trusted else "proxy_missing",
                                   f"no PROXY header from {peer}", record=False)
            return False
        except ProxyHeaderError as e:
            reason = "proxy_untrusted" if not trusted else "proxy_missing" if e.missing else "proxy_malformed"
            why = f"{e} (from {peer}{'' if trusted else ', not in trusted_proxies'})"
            await self._refuse(handler, listener, reason, why, record=True)
            return False
        if not trusted:
            claimed = f", claiming client {format_host_port(*header.source)}" if header.source else ""
            await self._refuse(handler, listener, "proxy_untrusted",
                               f"PROXY header from {peer}, which is not in trusted_proxies{claimed}", record=True)
            return False
        if header.source is not None:
            BALANCERS[client] = peer
            client.peername = header.source
            handler.log_prefix = f"{format_host_port(*header.source)} via {peer}: "
        return True

    def _listener(self, host: str, port: int) -> Listener | None:
        name = self.gateway.runtime.listener_name(host, port)
        return next((l for l in self.gateway.runtime.config.listeners if l.name == name), None)

    async def _refuse(self, handler: ConnectionHandler, listener: Listener, reason: str, why: str,
                      record: bool) -> None:
        client = handler.client
        self.gateway.metrics.connections_refused.labels(listener=listener.name, reason=reason).inc()
        log.warning("listener %s refused a connection from %s: %s", listener.name,
                    format_host_port(*client.peername[:2]), why)
        writer = handler.transports[client].writer
        if record:
            malformed = MalformedRequest(str(uuid.uuid4()), client, f"PROXY protocol: {why}", 400)
            await handler.handle_hook(MalformedRequestHook(malformed))
            if malformed.answer is not None:
                writer.write(http1.assemble_response(malformed.answer))
        writer.close()


def _in(ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None, networks) -> bool:
    return ip is not None and any(ip.version == n.version and ip in n for n in networks)


def install() -> None:
    wrap_method(ConnectionHandler, "handle_client", _header_first,
                ("await self.handle_hook(server_hooks.ClientConnectedHook(self.client))",
                 "self.handle_connection(self.client)"))


def _header_first(original):
    async def handle_client(self: ConnectionHandler) -> None:
        admission = ctx.master.addons.get("proxyprotocol")
        if admission is None or await admission.admit(self):
            await original(self)

    return handle_client
