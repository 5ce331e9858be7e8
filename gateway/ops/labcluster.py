"""A boundary of several gateway machines behind two balancers, in network namespaces:
`gateway lab up --gateways N --balancer haproxy`.

    client (P-client) 198.18.10.2 ─┐ front  198.18.10.0/24, floating address 198.18.10.10 (VRRP)
    balancer P-lb1 .11, P-lb2 .12 ─┘   HAProxy (TCP, send-proxy-v2) + keepalived on each
    balancers 198.18.20.11/.12  ─┐ back   198.18.20.0/24
    gateways P-gw1 .21, P-gw2 .22 ─┘   proxy listener :8080 (proxy_protocol: v2), /readyz on :9464
    gateways 198.18.30.21/.22   ─┐ inet   198.18.30.0/24
    upstream host P-up .2:8000  ─┘

Each segment is a Linux bridge in P-sw. Each gateway machine has its own state folder, trace-log origin
(`lab.P/gwK/trace`) and signing key, and runs `gateway cluster witness` (:7380 on the back segment): a
witness cosigning the other machines' logs, and pushes of its own to theirs (peers.yaml); the CA is shared (created once, copied to every machine), so a client
trusts one certificate whichever machine serves it. Gateway namespaces do not forward. Everything the
lab runs is written under the state folder: each machine's gateway.yaml, each balancer's haproxy.cfg
and keepalived.conf, logs and pid files.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from pyroute2 import IPRoute, netns

from gateway.config.load import REPO_ROOT
from gateway.ops.cluster import GatewayMachine, haproxy_config, keepalived_config
from gateway.ops.lab import TCP_PROBE, Lab, LabError, _pid_from, _pids_in_netns, _terminate
from gateway.trace.audit import WITNESSED_FILE, newest_checkpoint
from gateway.trace.note import parse_checkpoint_body, parse_note

FRONT, BACK, INET = "198.18.10", "198.18.20", "198.18.30"
FLOATING = f"{FRONT}.10"
PROXY_PORT, MANAGEMENT_PORT, UPSTREAM_PORT, WITNESS_PORT = 8080, 9464, 8000, 7380
# A draining machine stays not ready but serving this long: HAProxy's checks (inter 1 s, fall 2) mark
# it down within about 2 s, so no new connection finds its listener gone, and the clients' idle
# keep-alive connections (httpx gives one up after 5 s) are closed by the clients, not raced by the close.
DRAIN_DELAY = "6s"
WITNESS_INTERVAL = 2.0  # seconds between a machine's pushes to the others' witnesses (30 by default)
ROUTER_ID = 51
BALANCERS = ("lb1", "lb2")


@dataclass(frozen=True)
class Port:
    """One veth: `ifname` inside namespace `node`, its peer on bridge `segment` in the switch namespace."""

    node: str
    segment: str
    address: str

    @property
    def ifname(self) -> str:
        return f"{self.segment}0"

    @property
    def peer(self) -> str:
        return f"{self.node}-{self.segment}"


class ClusterLab:
    def __init__(self, prefix: str = "gwc", gateways: int = 2, state_dir: Path | None = None,
                 gateway_settings: dict | None = None):
        """`gateway_settings`: more keys for each machine's `gateway:` section (e.g. request_head_timeout)."""
        if not prefix or not all(c.isalnum() or c == "-" for c in prefix) or len(prefix) > 16:
            raise LabError(f"lab prefix must be 1-16 letters, digits or '-': {prefix!r}")
        if not 1 <= gateways <= 9:
            raise LabError("the cluster lab runs 1 to 9 gateway machines")
        self.prefix = prefix
        self.state_dir = state_dir or REPO_ROOT / "state" / f"lab-{prefix}"
        self.gateways = [f"gw{i}" for i in range(1, gateways + 1)]
        self.gateway_settings = gateway_settings or {}
        self.ports = [Port("client", "front", f"{FRONT}.2"), Port("up", "inet", f"{INET}.2")]
        for i, lb in enumerate(BALANCERS, 1):
            self.ports += [Port(lb, "front", f"{FRONT}.1{i}"), Port(lb, "back", f"{BACK}.1{i}")]
        for i, gw in enumerate(self.gateways, 1):
            self.ports += [Port(gw, "back", f"{BACK}.2{i}"), Port(gw, "inet", f"{INET}.2{i}")]

    def netns(self, node: str) -> str:
        return f"{self.prefix}-{node}"

    @property
    def nodes(self) -> list[str]:
        return ["sw", "client", "up", *BALANCERS, *self.gateways]

    def address(self, node: str, segment: str) -> str:
        return next(p.address for p in self.ports if p.node == node and p.segment == segment)

    def command(self, node: str, argv: list[str]) -> list[str]:
        return [shutil.which("ip") or "/usr/sbin/ip", "netns", "exec", self.netns(node), *argv]

    # --- the network -------------------------------------------------------------------------

    def build(self) -> None:
        present = set(netns.listnetns())
        for node in self.nodes:
            if self.netns(node) not in present:
                netns.create(self.netns(node))
        with IPRoute(netns=self.netns("sw")) as sw:
            _up(sw, "lo")
            for segment in ("front", "back", "inet"):
                if not sw.link_lookup(ifname=f"br-{segment}"):
                    sw.link("add", ifname=f"br-{segment}", kind="bridge")
                _up(sw, f"br-{segment}")
            for port in self.ports:
                if not sw.link_lookup(ifname=port.peer):
                    sw.link("add", ifname=port.peer, kind="veth",
                            peer={"ifname": port.ifname, "net_ns_fd": self.netns(port.node)})
                sw.link("set", index=sw.link_lookup(ifname=port.peer)[0],
                        master=sw.link_lookup(ifname=f"br-{port.segment}")[0], state="up")
        for node in self.nodes[1:]:
            with IPRoute(netns=self.netns(node)) as ipr:
                _up(ipr, "lo")
                for port in (p for p in self.ports if p.node == node):
                    _address(ipr, port.ifname, port.address, 24)
                    _up(ipr, port.ifname)
        for node in self.gateways:
            self._sysctl(node, "net/ipv4/ip_forward", "0")
        for lb in BALANCERS:  # the backup balancer's HAProxy binds the floating address it does not hold yet
            self._sysctl(lb, "net/ipv4/ip_nonlocal_bind", "1")

    def _sysctl(self, node: str, key: str, value: str) -> None:
        subprocess.run(self.command(node, ["sh", "-c", f"echo {value} > /proc/sys/{key}"]), check=True)

    def remove(self) -> None:
        present = set(netns.listnetns())
        names = [self.netns(node) for node in self.nodes if self.netns(node) in present]
        for name in names:
            _terminate(_pids_in_netns(name))
        for name in names:
            netns.remove(name)

    # --- what runs on it ---------------------------------------------------------------------

    def write_configs(self) -> None:
        """Every machine's configuration, as files under the state folder."""
        balancers = [f"{self.address(lb, 'back')}/32" for lb in BALANCERS]
        for gw in self.gateways:
            folder = self.state_dir / gw
            (folder / "state").mkdir(parents=True, exist_ok=True)
            address = self.address(gw, "back")
            config = {
                "gateway": {"name": f"{self.prefix}-{gw}", "state_dir": str(folder / "state"), "workers": 1,
                            "drain_delay": DRAIN_DELAY, **self.gateway_settings},
                "zones": {"extranet": {"networks": [f"{FRONT}.0/24"]}, "internet": {"networks": [f"{INET}.0/24"]}},
                "listeners": [{"name": "boundary", "mode": "regular", "listen": f"{address}:{PROXY_PORT}",
                               "proxy_protocol": "v2", "trusted_proxies": balancers}],
                "policy": {"default": "deny", "rules": [
                    {"name": "extranet-to-internet", "from": "extranet", "to": "internet", "action": "allow",
                     "request_profile": "outbound", "response_profile": "inbound"}]},
                "dlp": {"rules": str(REPO_ROOT / "config" / "dlp")},
                "trace": {"dir": "trace", "origin": f"lab.{self.prefix}/{gw}/trace"},
                "management": {"listen": f"{address}:{MANAGEMENT_PORT}"},
            }
            (folder / "gateway.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        machines = [GatewayMachine(gw, self.address(gw, "back"), PROXY_PORT, MANAGEMENT_PORT) for gw in self.gateways]
        for i, lb in enumerate(BALANCERS):
            folder = self.state_dir / lb
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "haproxy.cfg").write_text(haproxy_config((FLOATING, PROXY_PORT), machines,
                                                               stats_socket=str(folder / "haproxy.sock")))
            others = [self.address(other, "front") for other in BALANCERS if other != lb]
            (folder / "keepalived.conf").write_text(keepalived_config(
                f"{self.prefix}-{lb}", "front0", FLOATING, 24, ROUTER_ID, 150 - 50 * i, others,
                self.address(lb, "front")))

    def share_ca(self) -> None:
        """One CA for the boundary: created in the first machine's state (`gateway ca create`, as an admin
        would), its folder copied to the others."""
        first = self.gateways[0]
        subprocess.run([_gateway_command(), "ca", "create", "-c", str(self.state_dir / first / "gateway.yaml"),
                        "-o", str(self.state_dir / "ca-cert.pem")], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        for gw in self.gateways[1:]:
            target = self.state_dir / gw / "state" / "ca"
            if not target.exists():
                shutil.copytree(self.state_dir / first / "state" / "ca", target)

    def write_peers(self) -> None:
        """The peers file (gateway.trace.peers): each machine's entry as `gateway cluster peer` prints it,
        which creates the machine's witness key (and its log key, before the gateway's first start)."""
        entries = []
        for gw in self.gateways:
            back = self.address(gw, "back")
            entries.append(subprocess.run(
                [_gateway_command(), "cluster", "peer", "-c", str(self.state_dir / gw / "gateway.yaml"),
                 "--witness", f"http://{back}:{WITNESS_PORT}", "--management", f"http://{back}:{MANAGEMENT_PORT}",
                 "--log", f"{gw}/state/trace"], check=True, capture_output=True, text=True).stdout)
        (self.state_dir / "peers.yaml").write_text("# The lab's machines (gateway.trace.peers)\npeers:\n"
                                                   + "".join(entries))

    def services(self) -> dict[str, tuple[str, list[str]]]:
        """name -> (node, argv), in start order."""
        gateway_cmd = _gateway_command()
        www = self.state_dir / "www"
        run = {"upstream": ("up", [sys.executable, "-m", "http.server", "--bind", f"{INET}.2", "--directory",
                                   str(www), str(UPSTREAM_PORT)])}
        for gw in self.gateways:
            run[gw] = (gw, [gateway_cmd, "run", "-c", str(self.state_dir / gw / "gateway.yaml")])
        for gw in self.gateways:  # each machine's witness for the others, and its pushes to theirs
            run[f"witness-{gw}"] = (gw, [gateway_cmd, "cluster", "witness", "-c",
                                         str(self.state_dir / gw / "gateway.yaml"), "--peers",
                                         str(self.state_dir / "peers.yaml"), "--interval", str(WITNESS_INTERVAL)])
        for lb in BALANCERS:
            folder = self.state_dir / lb
            run[f"keepalived-{lb}"] = (lb, ["keepalived", "--vrrp", "--dont-fork", "--log-console",
                                            "--use-file", str(folder / "keepalived.conf"),
                                            "--pid", str(folder / "keepalived.pid"),
                                            "--vrrp_pid", str(folder / "vrrp.pid")])
            run[f"haproxy-{lb}"] = (lb, ["haproxy", "-db", "-f", str(folder / "haproxy.cfg")])
        return run

    def start(self, name: str) -> int:
        node, argv = self.services()[name]
        log = open(self.state_dir / f"{name}.log", "ab")
        process = subprocess.Popen(self.command(node, argv), stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        (self.state_dir / f"{name}.pid").write_text(f"{process.pid}\n")
        return process.pid

    def pid(self, name: str) -> int | None:
        return _pid_from(self.state_dir / f"{name}.pid")

    def up(self, timeout: float = 60.0) -> list[str]:
        """Build the network, write the configurations and start everything; problems found (empty: all up)."""
        for tool in ("haproxy", "keepalived"):
            if shutil.which(tool) is None:
                raise LabError(f"the cluster lab needs {tool} (Debian package {tool}; scripts/system-deps)")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.build()
        self.write_configs()
        self.share_ca()
        self.write_peers()
        (self.state_dir / "www").mkdir(exist_ok=True)
        (self.state_dir / "www" / "index.html").write_text("hello from the internet host\n")
        for name in self.services():
            if self.pid(name) is None:
                self.start(name)
        problems = [f"{gw} is not ready (see {self.state_dir / gw}.log)" for gw in self.gateways
                    if not self.wait_ready(gw, timeout)]
        if not self.wait_floating(timeout):
            problems.append(f"no balancer holds {FLOATING}:{PROXY_PORT} (see keepalived-*.log, haproxy-*.log)")
        (self.state_dir / "cluster.json").write_text(json.dumps(
            {"prefix": self.prefix, "gateways": len(self.gateways)}) + "\n")
        return problems

    def down(self) -> None:
        pids = [pid for name in self.services() if (pid := self.pid(name)) is not None]
        _terminate(pids)
        for pid_file in self.state_dir.glob("*.pid"):
            pid_file.unlink()
        self.remove()
        (self.state_dir / "cluster.json").unlink(missing_ok=True)

    # --- checks ------------------------------------------------------------------------------

    def probe(self, node: str, script: str, *args: str, timeout: float = 30.0) -> bool:
        return subprocess.run(self.command(node, [sys.executable, "-c", script, *args]),
                              timeout=timeout + 10).returncode == 0

    def wait_ready(self, gw: str, timeout: float) -> bool:
        """The gateway's /readyz answers 200, as the balancers' health checks see it."""
        return self.probe("lb1", _READY_PROBE, f"http://{self.address(gw, 'back')}:{MANAGEMENT_PORT}/readyz",
                          str(timeout), timeout=timeout)

    def wait_floating(self, timeout: float) -> bool:
        """The client reaches a balancer's HAProxy on the floating address."""
        return self.probe("client", TCP_PROBE, FLOATING, str(PROXY_PORT), str(timeout), timeout=timeout)

    def roll(self, gw: str, timeout: float = 60.0) -> str:
        """One step of a rolling restart: `gateway drain` on the machine (not ready, stops accepting,
        finishes its transfers, stops), then a start; returns once the balancers send it connections
        again. What drain said; LabError if a step failed."""
        drained = subprocess.run(self.command(gw, [_gateway_command(), "drain", "-c",
                                                   str(self.state_dir / gw / "gateway.yaml")]),
                                 capture_output=True, text=True, timeout=timeout + 30)
        if drained.returncode != 0 or "drained and stopped" not in drained.stdout:
            raise LabError(f"gateway drain on {gw} failed: {drained.stdout}{drained.stderr}")
        self.start(gw)
        if not self.wait_ready(gw, timeout):
            raise LabError(f"{gw} not ready again within {timeout:g} s (see {self.state_dir / gw}.log)")
        # The next machine's drain must not begin before the balancers send this one connections again
        # (rise 2, inter 1 s; longer on a busy machine): with both out, HAProxy would close new ones.
        deadline = time.monotonic() + timeout
        while not all(self.serving(lb, gw) for lb in BALANCERS):
            if time.monotonic() > deadline:
                raise LabError(f"the balancers do not see {gw} up within {timeout:g} s")
            time.sleep(0.2)
        return drained.stdout.strip()

    def serving(self, lb: str, gw: str) -> bool:
        """Whether balancer `lb`'s HAProxy has `gw` up (its stats socket's `show servers state`)."""
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(5)
                sock.connect(str(self.state_dir / lb / "haproxy.sock"))
                sock.sendall(b"show servers state gateways\n")
                answer = b"".join(iter(lambda: sock.recv(65536), b"")).decode()
        except OSError:
            return False
        # Lines: be_id be_name srv_id srv_name srv_addr srv_op_state ...; op state 2 is running.
        return any(fields[3] == gw and fields[5] == "2" for line in answer.splitlines()
                   if len(fields := line.split()) > 5 and fields[0].isdigit())

    def wait_cross_witnessed(self, timeout: float = 30.0) -> dict[str, tuple[int, int]]:
        """Wait until each machine's log is cosigned by the others' witnesses to its end; each
        machine's (log size, cosigned size), equal unless the timeout passed first."""
        traces = {gw: self.state_dir / gw / "state" / "trace" for gw in self.gateways}
        deadline = time.monotonic() + timeout
        while True:  # the log's newest checkpoint may be a journal frame not yet in its checkpoint file
            now = {gw: (newest_checkpoint(trace, None)[1].size, _cosigned_size(trace)) for gw, trace in traces.items()}
            if all(log == cosigned for log, cosigned in now.values()) or time.monotonic() > deadline:
                return now
            time.sleep(0.5)

    def holder(self) -> str | None:
        """The balancer that holds the floating address now."""
        for lb in BALANCERS:
            with IPRoute(netns=self.netns(lb)) as ipr:
                if any(a.get_attr("IFA_ADDRESS") == FLOATING for a in ipr.get_addr(family=2)):
                    return lb
        return None

    def status(self) -> list[str]:
        lines = [f"floating address {FLOATING}:{PROXY_PORT} held by {self.holder() or 'nobody'}"]
        for name, (node, _) in self.services().items():
            pid = self.pid(name)
            lines.append(f"{name:16} {self.netns(node):12} {'pid ' + str(pid) if pid else 'not running'}")
        lines.append(f"try: ip netns exec {self.netns('client')} curl -x http://{FLOATING}:{PROXY_PORT} "
                     f"http://{INET}.2:{UPSTREAM_PORT}/")
        return lines


_READY_PROBE = """
import sys, time, urllib.request
url, deadline = sys.argv[1], time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline:
    try:
        if urllib.request.urlopen(url, timeout=1).status == 200:
            sys.exit(0)
    except OSError:
        pass
    time.sleep(0.2)
sys.exit(1)
"""


_up, _address = Lab._link_up, Lab._address


def _cosigned_size(trace: Path) -> int:
    """The size of the log the machine's peers' witnesses last cosigned (-1: none yet)."""
    try:
        return parse_checkpoint_body(parse_note((trace / WITNESSED_FILE).read_bytes()).text).size
    except FileNotFoundError:
        return -1


def _gateway_command() -> str:
    return shutil.which("gateway", path=str(Path(sys.executable).parent)) or "gateway"
