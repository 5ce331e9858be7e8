"""Bypass sentinel: packets the kernel carried between zones without the gateway.

A gateway host that does not forward only ever transmits on its zone interfaces packets it
originated itself. So the sentinel asks the kernel (a BPF filter attached to one packet socket
per zone interface) for outgoing packets whose source is not one of this host's addresses and
which do not stay inside one zone network: forwarded or bridged traffic, i.e. a routing or
firewall hole. Legitimate proxy traffic never reaches Python, so line rate costs nothing; what
does arrive is classified by zone (longest prefix), counted in
`gateway_bypass_packets_total{src_zone,dst_zone}` and reported as an alert JSON line (at most
one line per flow every `alert_interval` seconds, the counter counts every packet).
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, start_http_server

from gateway.config.load import Config
from gateway.config.zones import ZoneMap
from gateway.ops.alerts import AlertLog
from gateway.ops.doctor import zone_interfaces
from gateway.ops.sdnotify import sd_notify


def bpf_filter(config: Config, own_addresses: Iterable[str]) -> str:
    """Kernel filter: IP packets leaving this host that it did not originate and that cross zone networks."""
    clauses = ["outbound", "(ip or ip6)"]
    clauses += [f"not src host {address}" for address in sorted(own_addresses, key=str)]
    # Traffic within one zone network is no bypass; the default route's 0/0 is no network to stay in.
    for zone in config.zones:
        for network in zone.networks:
            if network.prefixlen:
                clauses.append(f"not (src net {network} and dst net {network})")
    return " and ".join(clauses)


class Sentinel:
    def __init__(self, config: Config, alerts_file: Path, netns: str | None = None,
                 registry: CollectorRegistry | None = None, alert_interval: float = 10.0) -> None:
        self.interfaces, own = zone_interfaces(config, netns)
        if not self.interfaces:
            raise SentinelError("no zone interface found on this host: nothing to watch "
                                "(zones need `interfaces`, or networks assigned to local interfaces)")
        # Addresses without scope suffixes, link-local ones included: this host originated them.
        self.own_addresses = {address.split("%")[0] for address in own}
        self.filter = bpf_filter(config, self.own_addresses)
        self.zones = ZoneMap(config.zones, interfaces={})
        self.registry = registry or CollectorRegistry()
        self.packets = Counter(
            "gateway_bypass_packets", "Packets carried between zones by the kernel, around the gateway",
            ["src_zone", "dst_zone"], registry=self.registry,
        )
        self.frontend = config.name
        self.alerts = AlertLog(alerts_file)
        self.alert_interval = alert_interval
        self._last_alert: dict[tuple, float] = {}
        self._lock = threading.Lock()
        self._sniffer = None

    def start(self) -> None:
        # scapy is imported here, not at module load: it is slow to import and only the sentinel needs it.
        import scapy.layers.inet  # noqa: F401  (registers the Ethernet, IP and IPv6 dissectors)
        import scapy.layers.inet6  # noqa: F401
        import scapy.layers.l2  # noqa: F401
        from scapy.arch.common import compile_filter
        from scapy.sendrecv import AsyncSniffer

        # Compile once up front: without libpcap, AsyncSniffer only reports the failure at stop().
        try:
            compile_filter(self.filter, iface=next(iter(self.interfaces)))
        except Exception as exc:  # scapy raises ImportError or Scapy_Exception
            raise SentinelError(f"cannot build the kernel packet filter (is libpcap0.8 installed?): {exc}") from exc
        self._sniffer = AsyncSniffer(iface=list(self.interfaces), filter=self.filter, prn=self.observe,
                                     store=False, promisc=False)
        self._sniffer.start()

    @property
    def running(self) -> bool:
        return self._sniffer is not None and self._sniffer.running

    def stop(self) -> None:
        if self._sniffer is not None and self._sniffer.running:
            self._sniffer.stop()
        self.alerts.close()

    def observe(self, packet) -> None:
        """Called by the sniffer thread for every packet the kernel filter let through."""
        from scapy.layers.inet import IP
        from scapy.layers.inet6 import IPv6

        layer = packet.getlayer(IP) or packet.getlayer(IPv6)
        if layer is None or layer.dst in self.own_addresses or layer.src in self.own_addresses:
            return
        src_zone, dst_zone = self.zones.zone_of(layer.src), self.zones.zone_of(layer.dst)
        if src_zone == dst_zone:
            return
        self.packets.labels(src_zone=src_zone, dst_zone=dst_zone).inc()
        # fields of the transport header itself (scapy's getattr would also search an ICMP error's quote)
        flow = (layer.src, layer.dst, layer.payload.name, layer.payload.fields.get("dport"))
        now = time.monotonic()
        with self._lock:
            if now - self._last_alert.get(flow, -self.alert_interval) < self.alert_interval:
                return
            self._last_alert[flow] = now
        self.alerts.write({
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "frontend": self.frontend,
            "kind": "bypass",
            "message": f"packet from {src_zone} to {dst_zone} carried by the kernel, not the gateway",
            "interface": packet.sniffed_on,
            "src": layer.src,
            "dst": layer.dst,
            "src_zone": src_zone,
            "dst_zone": dst_zone,
            "protocol": layer.payload.name,
            "dport": flow[3],
            "length": len(packet),
        })


class SentinelError(RuntimeError):
    pass


def run_sentinel(config: Config, metrics_listen: str | None, alerts_file: Path | None = None) -> int:
    """`gateway sentinel`: watch until SIGTERM/SIGINT."""
    alerts = alerts_file or config.alerts_file
    try:
        sentinel = Sentinel(config, alerts)
        if metrics_listen:
            host, _, port = metrics_listen.rpartition(":")
            start_http_server(int(port), addr=host.strip("[]"), registry=sentinel.registry)
        sentinel.start()
    except (SentinelError, OSError, ValueError) as exc:
        print(f"gateway sentinel: {exc}", file=sys.stderr)
        return 2
    watched = ", ".join(f"{name} ({zone})" for name, zone in sorted(sentinel.interfaces.items()))
    print(f"watching {watched}; alerts to {alerts}; metrics on {metrics_listen or 'none'}", flush=True)
    print(f"kernel filter: {sentinel.filter}", flush=True)
    sd_notify("READY=1")
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    while not stopping.wait(1.0):
        if not sentinel.running:  # the capture thread died: let systemd restart us
            print("gateway sentinel: packet capture stopped unexpectedly", file=sys.stderr)
            return 1
        sd_notify("WATCHDOG=1")  # only while the capture thread lives
    sd_notify("STOPPING=1")
    sentinel.stop()
    return 0

