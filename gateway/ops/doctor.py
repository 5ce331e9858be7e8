"""`gateway doctor`: does this host leave a way between zones that bypasses the gateway?

Reads the kernel's view with pyroute2 (links, addresses, per-interface forwarding, routes) and
compares it with the configured zones. Each problem comes with the command that fixes it.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from gateway.config.load import Config, Network

MAIN_TABLE = 254
RTN_UNICAST = 1
IFF_UP = 0x1
IFF_LOOPBACK = 0x8


@dataclass(frozen=True)
class Problem:
    message: str
    fix: str


@dataclass(frozen=True)
class _Link:
    index: int
    name: str
    loopback: bool
    admin_up: bool
    oper_up: bool
    forwarding_v4: bool
    forwarding_v6: bool
    addresses: tuple[ipaddress.IPv4Interface | ipaddress.IPv6Interface, ...]


def diagnose(config: Config, netns: str | None = None) -> list[Problem]:
    """Every posture problem of the host (or of network namespace `netns`) for this configuration."""
    with IPRoute(netns=netns) if netns else IPRoute() as ipr:
        links = _read_links(ipr)
        routes = _read_routes(ipr)
        zone_of_link = _zones_of_links(config, links)
        problems = _interface_problems(config, links, zone_of_link)
        problems += _forwarding_problems(zone_of_link, links)
        problems += _listener_problems(config, links)
        problems += _route_problems(config, ipr, links, routes, zone_of_link)
    return problems


def zone_interfaces(config: Config, netns: str | None = None) -> tuple[dict[str, str], set[str]]:
    """({interface name: zone} for every zone interface, every address of this host)."""
    with IPRoute(netns=netns) if netns else IPRoute() as ipr:
        links = _read_links(ipr)
    zones = {links[index].name: zone for index, zone in _zones_of_links(config, links).items()}
    return zones, {str(a.ip) for link in links.values() for a in link.addresses}


def _read_links(ipr: IPRoute) -> dict[int, _Link]:
    addresses: dict[int, list] = {}
    for msg in ipr.get_addr():
        address = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
        addresses.setdefault(msg["index"], []).append(ipaddress.ip_interface(f"{address}/{msg['prefixlen']}"))
    links = {}
    for msg in ipr.get_links():
        spec = msg.get_attr("IFLA_AF_SPEC")
        inet = spec.get_attr("AF_INET") if spec else None
        inet6 = spec.get_attr("AF_INET6") if spec else None
        inet6_conf = inet6.get_attr("IFLA_INET6_CONF") if inet6 else None
        links[msg["index"]] = _Link(
            index=msg["index"],
            name=msg.get_attr("IFLA_IFNAME"),
            loopback=bool(msg["flags"] & IFF_LOOPBACK),
            admin_up=bool(msg["flags"] & IFF_UP),
            oper_up=msg.get_attr("IFLA_OPERSTATE") in ("UP", "UNKNOWN"),
            forwarding_v4=bool(inet and inet["forwarding"]),
            forwarding_v6=bool(inet6_conf and inet6_conf["forwarding"]),
            addresses=tuple(addresses.get(msg["index"], ())),
        )
    return links


def _read_routes(ipr: IPRoute) -> list[tuple[Network, int | None]]:
    """(destination, output interface index) of the unicast routes in the main tables."""
    routes = []
    for family in (socket.AF_INET, socket.AF_INET6):
        for msg in ipr.get_routes(family=family):
            if msg.get_attr("RTA_TABLE", msg["table"]) != MAIN_TABLE or msg["type"] != RTN_UNICAST:
                continue
            default = "0.0.0.0" if family == socket.AF_INET else "::"
            dst = ipaddress.ip_network(f"{msg.get_attr('RTA_DST') or default}/{msg['dst_len']}", strict=False)
            routes.append((dst, msg.get_attr("RTA_OIF")))
    return routes


def _zones_of_links(config: Config, links: dict[int, _Link]) -> dict[int, str]:
    """Zone of each interface: named in a zone, or carrying an address inside a zone's networks."""
    named = {name: zone.name for zone in config.zones for name in zone.interfaces}
    result = {}
    for link in links.values():
        if link.name in named:
            result[link.index] = named[link.name]
            continue
        if link.loopback:
            continue  # the gateway's own loopback is no way into or out of a zone
        for address in link.addresses:
            if (zone := _zone_containing(config, address.network)) is not None:
                result[link.index] = zone
                break
    return result


def _zone_containing(config: Config, network: Network) -> str | None:
    """The zone whose most specific network contains all of `network` (None: no zone or several)."""
    best: tuple[int, str] | None = None
    for zone in config.zones:
        for zone_net in zone.networks:
            if zone_net.version == network.version and network.subnet_of(zone_net):
                if best is None or zone_net.prefixlen > best[0]:
                    best = (zone_net.prefixlen, zone.name)
    return best[1] if best else None


def _interface_problems(config: Config, links: dict[int, _Link], zone_of_link: dict[int, str]) -> list[Problem]:
    by_name = {link.name: link for link in links.values()}
    problems = []
    for zone in config.zones:
        for name in zone.interfaces:
            link = by_name.get(name)
            if link is None:
                problems.append(Problem(
                    f"zone {zone.name}: interface {name} does not exist",
                    f"create or rename the interface (`ip -br link` lists them), or correct "
                    f"zones.{zone.name}.interfaces in the configuration",
                ))
                continue
            usable = [a for a in link.addresses if not a.ip.is_link_local
                      and (not zone.networks or any(a.ip in net for net in zone.networks))]
            if not usable:
                wanted = ", ".join(map(str, zone.networks)) or "any address"
                problems.append(Problem(
                    f"zone {zone.name}: interface {name} has no address in {wanted}",
                    f"ip address add ADDRESS/PREFIX dev {name} (inside {wanted}), and in the host's "
                    f"network configuration",
                ))
    # Every zone interface, named or found by its address, must be up.
    for index, zone in sorted(zone_of_link.items()):
        link = links[index]
        if not link.admin_up or not link.oper_up:
            state = "administratively down" if not link.admin_up else "without carrier"
            problems.append(Problem(
                f"zone {zone}: interface {link.name} is {state}",
                f"ip link set {link.name} up (and check the cable or peer); make it permanent in the "
                f"host's network configuration",
            ))
    return problems


def _forwarding_problems(zone_of_link: dict[int, str], links: dict[int, _Link]) -> list[Problem]:
    """The kernel routes whatever arrives on an interface with forwarding on: around the gateway."""
    problems = []
    zone_links = [links[i] for i in sorted(zone_of_link)]
    for version, attr, sysctl in (
        (4, "forwarding_v4", "net.ipv4.ip_forward=0"),
        (6, "forwarding_v6", "net.ipv6.conf.all.forwarding=0"),
    ):
        forwarding = [f"{link.name} ({zone_of_link[link.index]})" for link in zone_links if getattr(link, attr)]
        if forwarding:
            problems.append(Problem(
                f"IPv{version} forwarding is on for zone interfaces {', '.join(forwarding)}: the kernel "
                f"carries traffic between zones around the gateway",
                f"sysctl -w {sysctl}; persist it: echo {sysctl} > /etc/sysctl.d/90-gateway.conf",
            ))
    return problems


def _listener_problems(config: Config, links: dict[int, _Link]) -> list[Problem]:
    local = {a.ip for link in links.values() for a in link.addresses}
    problems = []
    for listener in config.listeners:
        ip = ipaddress.ip_address(listener.host)
        if not ip.is_unspecified and ip not in local:
            problems.append(Problem(
                f"listener {listener.name}: no interface has its address {listener.host}",
                f"add {listener.host} to the interface facing its zone, or correct "
                f"listeners[{listener.name}].listen ({listener.defined_at})",
            ))
    return problems


def _route_problems(config: Config, ipr: IPRoute, links: dict[int, _Link],
                    routes: list[tuple[Network, int | None]], zone_of_link: dict[int, str]) -> list[Problem]:
    def name(index: int | None) -> str:
        return links[index].name if index in links else f"#{index}"

    def zone_iface(zone: str) -> str:
        names = [links[i].name for i, z in zone_of_link.items() if z == zone]
        return "|".join(names) if names else f"<interface of {zone}>"

    def is_loopback(index: int | None) -> bool:
        return index in links and links[index].name == "lo"

    problems = []
    # Each route lying inside one zone must leave by that zone's interface.
    for dst, oif in routes:
        zone = _zone_containing(config, dst)
        if zone is None or oif is None or is_loopback(oif):
            continue
        actual = zone_of_link.get(oif)
        if actual != zone:
            problems.append(Problem(
                f"route to {dst} (zone {zone}) leaves by {name(oif)}, "
                f"{'in zone ' + actual if actual else 'which is in no zone'}",
                f"ip route replace {dst} dev {zone_iface(zone)} (via its router); remove the wrong route: "
                f"ip route del {dst} dev {name(oif)}",
            ))
    # A zone network without a route of its own falls back to a broader one: where does it lead?
    for zone in config.zones:
        for network in zone.networks:
            if any(dst.version == network.version and dst.subnet_of(network) for dst, _ in routes):
                continue
            if network.prefixlen == 0:
                continue  # no default route is a choice (an isolated boundary), not a leak
            probe = network.network_address if network.num_addresses <= 2 else network.network_address + 1
            try:
                found = ipr.route("get", dst=str(probe))
            except NetlinkError:
                problems.append(Problem(
                    f"zone {zone.name}: no route to {network}",
                    f"ip route add {network} dev {zone_iface(zone.name)} (via its router)",
                ))
                continue
            oif = found[0].get_attr("RTA_OIF")
            if is_loopback(oif):
                continue
            if zone_of_link.get(oif) != zone.name:
                actual = zone_of_link.get(oif)
                problems.append(Problem(
                    f"zone {zone.name}: traffic to {network} leaves by {name(oif)}, "
                    f"{'in zone ' + actual if actual else 'which is in no zone'}",
                    f"ip route add {network} dev {zone_iface(zone.name)} (via its router)",
                ))
    return problems
