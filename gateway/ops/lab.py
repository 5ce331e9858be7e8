"""A three-zone boundary on one machine: network namespaces joined by veth links (pyroute2).

Longer than 400 lines: building, checking and tearing down the lab are one object, kept together
so that `down()` removes exactly what `up()` made.

    extranet client  (PREFIX-ext)  eth0 198.18.1.2 ── ext0 198.18.1.1 ┐
    sector server    (PREFIX-sec)  eth0 198.18.2.2 ── sec0 198.18.2.1 ├ gateway (PREFIX-gw)
    internet host    (PREFIX-inet) eth0 198.18.3.2 ── inet0 198.18.3.1 ┘

198.18.0.0/15 is the RFC 2544 benchmark range: nothing real lives there. The gateway namespace
does not forward (ip_forward=0), so the only way between zones is through the gateway process.
Hosts route the other zones' networks via their gateway address, so a forwarding hole shows up
as traffic that really crosses. Every object is named after the prefix, so `down()` can clean up
after a crash and two labs with different prefixes can coexist.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from ipaddress import IPv4Network
from pathlib import Path

from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

NETNS_DIR = Path("/var/run/netns")
HOST_IFNAME = "eth0"
# Short namespace keys accepted by popen()/run(), with the zone each host stands for.
HOST_NAMESPACES = {"ext": "extranet", "sec": "sector-health", "inet": "internet"}
GATEWAY_NS = "gw"
# Run with python -c HOST PORT SECONDS inside a namespace: exit 0 once something accepts TCP connections there.
TCP_PROBE = """
import socket, sys, time
host, port, deadline = sys.argv[1], int(sys.argv[2]), time.monotonic() + float(sys.argv[3])
while time.monotonic() < deadline:
    try:
        socket.create_connection((host, port), timeout=0.5).close()
        sys.exit(0)
    except OSError:
        time.sleep(0.1)
sys.exit(1)
"""


@dataclass(frozen=True)
class ZoneLink:
    """One veth link between the gateway and the host standing for a zone."""

    zone: str
    ns: str  # short namespace key of the zone's host: "ext", "sec" or "inet"
    network: str  # CIDR
    gateway_ip: str
    host_ip: str
    gateway_ifname: str
    host_ifname: str

    @property
    def prefixlen(self) -> int:
        return IPv4Network(self.network).prefixlen


def _zone_link(zone: str, ns: str, third_octet: int) -> ZoneLink:
    network = IPv4Network(f"198.18.{third_octet}.0/24")
    return ZoneLink(
        zone=zone,
        ns=ns,
        network=str(network),
        gateway_ip=str(network[1]),
        host_ip=str(network[2]),
        gateway_ifname=f"{ns}0",
        host_ifname=HOST_IFNAME,
    )


class LabError(RuntimeError):
    pass


class Lab:
    def __init__(self, prefix: str = "gwlab") -> None:
        # Namespace names are file names under /var/run/netns; keep them plain.
        if not prefix or not all(c.isalnum() or c == "-" for c in prefix) or len(prefix) > 32:
            raise LabError(f"lab prefix must be 1-32 letters, digits or '-': {prefix!r}")
        self.prefix = prefix
        self.zones: dict[str, ZoneLink] = {
            link.zone: link
            for link in (
                _zone_link("extranet", "ext", 1),
                _zone_link("sector-health", "sec", 2),
                _zone_link("internet", "inet", 3),
            )
        }

    # --- names -------------------------------------------------------------------------------

    def netns(self, ns: str) -> str:
        """Full namespace name for a short key ("gw", "ext", "sec", "inet")."""
        if ns != GATEWAY_NS and ns not in HOST_NAMESPACES:
            raise LabError(f"unknown lab namespace {ns!r}: use gw, ext, sec or inet")
        return f"{self.prefix}-{ns}"

    @property
    def namespaces(self) -> list[str]:
        return [self.netns(ns) for ns in (GATEWAY_NS, *HOST_NAMESPACES)]

    def zone_of_ns(self, ns: str) -> ZoneLink:
        return self.zones[HOST_NAMESPACES[ns]]

    # --- lifecycle ---------------------------------------------------------------------------

    def exists(self) -> bool:
        present = set(netns.listnetns())
        return all(name in present for name in self.namespaces)

    def up(self) -> None:
        """Build the topology; safe to call again on a complete or half-built lab."""
        present = set(netns.listnetns())
        for name in self.namespaces:
            if name not in present:
                netns.create(name)
        with IPRoute(netns=self.netns(GATEWAY_NS)) as gw:
            self._link_up(gw, "lo")
            for link in self.zones.values():
                if not gw.link_lookup(ifname=link.gateway_ifname):
                    gw.link(
                        "add",
                        ifname=link.gateway_ifname,
                        kind="veth",
                        peer={"ifname": link.host_ifname, "net_ns_fd": self.netns(link.ns)},
                    )
                self._address(gw, link.gateway_ifname, link.gateway_ip, link.prefixlen)
                self._link_up(gw, link.gateway_ifname)
        for link in self.zones.values():
            with IPRoute(netns=self.netns(link.ns)) as host:
                self._link_up(host, "lo")
                self._address(host, link.host_ifname, link.host_ip, link.prefixlen)
                self._link_up(host, link.host_ifname)
                for other in self.zones.values():
                    if other is not link:
                        host.route("replace", dst=other.network, gateway=link.gateway_ip)
        self.set_forwarding(False)

    def down(self) -> None:
        """Stop every process inside the lab's namespaces and delete them (veths go with them)."""
        present = set(netns.listnetns())
        names = [name for name in self.namespaces if name in present]
        for name in names:
            _terminate(_pids_in_netns(name))
        for name in names:
            netns.remove(name)

    # --- processes ---------------------------------------------------------------------------

    def command(self, ns: str, argv: list[str]) -> list[str]:
        """argv wrapped to run inside a lab namespace (`ip netns exec` also gives it its own /sys)."""
        ip = shutil.which("ip") or "/usr/sbin/ip"
        if not os.path.exists(ip):
            raise LabError("the lab needs iproute2's `ip` command (Debian package iproute2)")
        return [ip, "netns", "exec", self.netns(ns), *argv]

    def popen(self, ns: str, argv: list[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.command(ns, argv), **kwargs)

    def run(self, ns: str, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(ns, argv), **kwargs)

    # --- knobs tests turn --------------------------------------------------------------------

    def wait_tcp(self, ns: str, host: str, port: int, timeout: float = 15.0) -> bool:
        """True once something accepts TCP connections on host:port, as seen from namespace ns."""
        return self.run(ns, [sys.executable, "-c", TCP_PROBE, host, str(port), str(timeout)]).returncode == 0

    def set_forwarding(self, enabled: bool) -> None:
        """Switch IPv4 forwarding in the gateway namespace (on = the hole the gateway must not have)."""
        self.run(
            GATEWAY_NS,
            ["sh", "-c", f"echo {int(enabled)} > /proc/sys/net/ipv4/ip_forward"],
            check=True,
        )

    def forwarding(self) -> bool:
        out = self.run(
            GATEWAY_NS, ["cat", "/proc/sys/net/ipv4/ip_forward"], check=True, capture_output=True, text=True
        )
        return out.stdout.strip() == "1"

    def set_link(self, zone: str, up: bool) -> None:
        """Bring the gateway's interface towards a zone up or down."""
        link = self.zones[zone]
        with IPRoute(netns=self.netns(GATEWAY_NS)) as gw:
            gw.link("set", index=gw.link_lookup(ifname=link.gateway_ifname)[0], state="up" if up else "down")

    # --- helpers -----------------------------------------------------------------------------

    @staticmethod
    def _link_up(ipr: IPRoute, ifname: str) -> None:
        index = ipr.link_lookup(ifname=ifname)
        if not index:
            raise LabError(f"interface {ifname} missing")
        ipr.link("set", index=index[0], state="up")

    @staticmethod
    def _address(ipr: IPRoute, ifname: str, address: str, prefixlen: int) -> None:
        index = ipr.link_lookup(ifname=ifname)[0]
        try:
            ipr.addr("add", index=index, address=address, prefixlen=prefixlen)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise


# --- `gateway lab up | down | status`: the lab plus the gateway and two upstream servers ------

UPSTREAM_PORT = 8000


@dataclass(frozen=True)
class LabService:
    name: str
    ns: str
    argv: list[str]
    ready: tuple[str, str, int]  # (namespace, host, port) accepting connections once it runs


def lab_services(lab: Lab, config: Path, state_dir: Path) -> list[LabService]:
    gateway_cmd = shutil.which("gateway", path=str(Path(sys.executable).parent)) or shutil.which("gateway")
    if gateway_cmd is None:
        raise LabError("the `gateway` command is not installed in this environment (pip install -e .)")
    services = []
    for ns in ("sec", "inet"):
        link = lab.zone_of_ns(ns)
        services.append(LabService(
            name=f"upstream-{ns}",
            ns=ns,
            argv=[sys.executable, "-m", "http.server", "--bind", link.host_ip,
                  "--directory", str(state_dir / f"www-{ns}"), str(UPSTREAM_PORT)],
            ready=(ns, link.host_ip, UPSTREAM_PORT),
        ))
    # The gateway is ready once its first listener accepts; it checks its own config on start.
    from gateway.config.load import load_config

    first = load_config(config).listeners[0]
    services.append(LabService(
        name="gateway", ns=GATEWAY_NS, argv=[gateway_cmd, "run", "-c", str(config)],
        ready=(GATEWAY_NS, first.host, first.port),
    ))
    return services


def lab_up(lab: Lab, config: Path, state_dir: Path, timeout: float = 30.0) -> list[str]:
    """Build the lab and start its services; returns problems (empty when everything runs)."""
    _same_lab(lab, state_dir)
    lab.up()
    state_dir.mkdir(parents=True, exist_ok=True)
    for ns in ("sec", "inet"):
        www = state_dir / f"www-{ns}"
        www.mkdir(exist_ok=True)
        zone = lab.zone_of_ns(ns).zone
        (www / "index.html").write_text(f"hello from the {zone} host\n")
    problems = []
    for service in lab_services(lab, config, state_dir):
        pid_file = state_dir / f"{service.name}.pid"
        if _pid_from(pid_file) is not None:
            continue  # already running: `up` is idempotent
        log = open(state_dir / f"{service.name}.log", "ab")
        process = lab.popen(service.ns, service.argv, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        pid_file.write_text(f"{process.pid}\n")
        deadline = time.monotonic() + timeout
        ready = False
        while not ready and process.poll() is None and time.monotonic() < deadline:
            ready = lab.wait_tcp(*service.ready, timeout=1.0)
        if not ready:
            if process.poll() is not None:
                pid_file.unlink()
            problems.append(f"{service.name} is not accepting connections on "
                            f"{service.ready[1]}:{service.ready[2]} (see {state_dir / service.name}.log)")
    (state_dir / "lab.json").write_text(json.dumps({"prefix": lab.prefix, "config": str(config)}) + "\n")
    return problems


def _same_lab(lab: Lab, state_dir: Path) -> None:
    """A state folder holds one lab's pid files: another prefix's lab there is refused (its services
    would be taken for this one's, and stopped with it)."""
    try:
        recorded = json.loads((state_dir / "lab.json").read_text())["prefix"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    if recorded != lab.prefix:
        raise LabError(f"{state_dir} holds the lab '{recorded}' (one lab runs at a time): "
                       f"`gateway lab down --prefix {recorded}` first")


def lab_down(lab: Lab, state_dir: Path) -> None:
    """Stop the services (by pid file, then anything else left in the namespaces) and remove the lab."""
    _same_lab(lab, state_dir)
    pids = []
    for pid_file in sorted(state_dir.glob("*.pid")):
        if (pid := _pid_from(pid_file)) is not None:
            pids.append(pid)
        pid_file.unlink()
    _terminate(pids)
    lab.down()
    (state_dir / "lab.json").unlink(missing_ok=True)


def lab_status(lab: Lab, state_dir: Path) -> tuple[bool, list[str]]:
    """(everything up, report lines)."""
    lines = []
    healthy = lab.exists()
    lines.append(f"namespaces: {' '.join(lab.namespaces)} ({'present' if healthy else 'MISSING'})")
    if healthy:
        lines.append(f"gateway forwarding: {'ON (a hole!)' if lab.forwarding() else 'off'}")
    for link in lab.zones.values():
        lines.append(f"{link.zone:14} {link.network:16} gateway {link.gateway_ifname}={link.gateway_ip}"
                     f"  host {lab.netns(link.ns)}:{link.host_ifname}={link.host_ip}")
    for name in ("gateway", "upstream-sec", "upstream-inet"):
        pid = _pid_from(state_dir / f"{name}.pid")
        healthy &= pid is not None
        lines.append(f"{name:14} {'pid ' + str(pid) if pid else 'not running'}")
    ext, sec, inet = lab.zones["extranet"], lab.zones["sector-health"], lab.zones["internet"]
    lines += [
        "try:",
        f"  ip netns exec {lab.netns('ext')} curl -x http://{ext.gateway_ip}:8080 http://{inet.host_ip}:8000/",
        f"  ip netns exec {lab.netns('ext')} curl -x http://{ext.gateway_ip}:8080 http://{sec.host_ip}:8000/",
        f"  ip netns exec {lab.netns('inet')} curl http://{inet.gateway_ip}:8080/",
    ]
    return healthy, lines


def _pid_from(pid_file: Path) -> int | None:
    """The pid in a pid file if that process still runs."""
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _alive(pid) else None


def lab_supported() -> str | None:
    """None when this machine can build a lab, else the reason it cannot."""
    if os.geteuid() != 0:
        return "the namespace lab needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN)"
    if not os.path.exists("/proc/self/ns/net"):
        return "this kernel has no network namespace support"
    if not (shutil.which("ip") or os.path.exists("/usr/sbin/ip")):
        return "iproute2's `ip` command is missing (Debian package iproute2)"
    probe = f"gwprobe-{os.getpid()}"
    try:
        netns.create(probe)
    except OSError as exc:
        return f"cannot create a network namespace: {exc}"
    netns.remove(probe)
    return None


def _pids_in_netns(name: str) -> list[int]:
    """Processes whose network namespace is the named one (same inode as its bind mount)."""
    try:
        target = os.stat(NETNS_DIR / name)
    except FileNotFoundError:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:  # gone meanwhile, or a kernel thread
            continue
        if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
            pids.append(int(entry))
    return pids


def _terminate(pids: list[int], grace: float = 3.0) -> None:
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [pid for pid in alive if _alive(pid)]
    for pid in alive:
        _signal(pid, signal.SIGKILL)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _alive(pid: int) -> bool:
    # A zombie child of ours still has a /proc entry; reap it so it counts as gone.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return False
    except ChildProcessError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
