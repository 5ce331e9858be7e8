"""Map addresses to zones by longest matching prefix; an address in no zone is in zone "unknown"."""

from __future__ import annotations

import functools
import ipaddress
import re
import string
from collections.abc import Iterable

from gateway.config.load import Network, Zone

UNKNOWN = "unknown"

_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_DOTTED_QUAD = re.compile(rf"(?:{_OCTET}\.){{3}}{_OCTET}")  # four plain decimal octets, no leading zero


def ipv4_spelled_otherwise(host: str) -> bool:
    """A host that ends in a number (WHATWG URL: an IPv4 address to every resolver, inet_aton style) but
    is not four plain decimal octets: 2130706434, 127.2, 0x7f.0.0.2, 0177.0.0.2, 127.0.0.02."""
    host = host.rstrip(".")
    if _DOTTED_QUAD.fullmatch(host):
        return False  # the usual spelling, answered without building an address (~1.5 us a transfer)
    last = host.rsplit(".", 1)[-1].lower()
    if not (last.isdigit() or (last.startswith("0x") and all(c in string.hexdigits for c in last[2:]))):
        return False
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return True
    return False


def interface_networks(names: Iterable[str]) -> dict[str, list[Network]]:
    """The networks configured on the named local interfaces, read with pyroute2 (missing ones: empty)."""
    from pyroute2 import IPRoute

    wanted = set(names)
    found: dict[str, list[Network]] = {name: [] for name in wanted}
    if not wanted:
        return found
    with IPRoute() as ipr:
        index_to_name = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        for addr in ipr.get_addr():
            name = index_to_name.get(addr["index"])
            if name in wanted:
                found[name].append(ipaddress.ip_network(
                    f"{addr.get_attr('IFA_ADDRESS')}/{addr['prefixlen']}", strict=False))
    return found


def host_ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP address in a socket's host string (an IPv6 zone cut off), an IPv4-mapped IPv6 address as
    the IPv4 address it maps (one host, whichever way it reached us); None if it is no IP address."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        return ip.ipv4_mapped
    return ip


class ZoneMap:
    def __init__(self, zones: Iterable[Zone], interfaces: dict[str, list[Network]] | None = None):
        interfaces = interfaces if interfaces is not None else interface_networks(
            name for zone in zones for name in zone.interfaces)
        entries = []
        for zone in zones:
            entries += [(net, zone.name) for net in zone.networks]
            entries += [(net, zone.name) for name in zone.interfaces for net in interfaces.get(name, ())]
        # Longest prefix first, so the first containing network is the most specific one.
        self._entries = sorted(entries, key=lambda entry: entry[0].prefixlen, reverse=True)
        # Per map, so a reload starts afresh; bounded, so a flood of source addresses cannot grow it.
        self.zone_of = functools.lru_cache(maxsize=4096)(self._zone_of)

    def _zone_of(self, address: str) -> str:
        ip = host_ip(address)
        if ip is None:
            return UNKNOWN
        for network, name in self._entries:
            if ip.version == network.version and ip in network:
                return name
        return UNKNOWN
