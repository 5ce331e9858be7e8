"""The bypass sentinel in the namespace lab: it sees what the kernel carries between zones, and only that."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.config.load import REPO_ROOT
from gateway.ops.lab import Lab
from tests.labs import built_lab

LAB_CONFIG = REPO_ROOT / "config" / "lab.yaml"
METRICS_PORT = 9191
SEND_UDP = (
    "import sys; from scapy.all import IP, UDP, send; "
    "send(IP(dst=sys.argv[1])/UDP(sport=40000, dport=int(sys.argv[2]))/b'probe', count=int(sys.argv[3]), verbose=0)"
)
SERVE = (
    "import socket, sys; s = socket.create_server(('0.0.0.0', int(sys.argv[1])))\n"
    "while True: c = s.accept()[0]; c.recv(10); c.close()"
)
CONNECT = (
    "import socket, sys; "
    "s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5); s.sendall(b'hi'); s.close()"
)


@pytest.fixture(scope="module")
def lab():
    if not any(Path(d).glob("libpcap.so*") for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib")):
        pytest.skip("libpcap is missing (Debian package libpcap0.8): the sentinel's kernel filter needs it")
    yield from built_lab("ts")


@pytest.fixture
def sentinel(lab, tmp_path):
    """A real `gateway sentinel` process in the gateway namespace, with its alerts file."""
    alerts = tmp_path / "alerts.jsonl"
    argv = [sys.executable, "-m", "gateway", "sentinel", "-c", str(LAB_CONFIG),
            "--metrics", f"127.0.0.1:{METRICS_PORT}", "--alerts", str(alerts)]
    process = lab.popen("gw", argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    banner = process.stdout.readline()
    assert banner.startswith("watching ext0 (extranet), inet0 (internet), sec0 (sector-health)"), \
        banner + process.stdout.read()
    assert process.stdout.readline().startswith("kernel filter: outbound and (ip or ip6)")
    yield process, alerts
    lab.set_forwarding(False)
    process.terminate()
    assert process.wait(10) == 0


def bypass_counts(lab: Lab) -> dict[tuple[str, str], float]:
    text = lab.run("gw", ["curl", "-sf", f"http://127.0.0.1:{METRICS_PORT}/metrics"],
                   capture_output=True, text=True, check=True).stdout
    return {
        (sample.labels["src_zone"], sample.labels["dst_zone"]): sample.value
        for family in text_string_to_metric_families(text) if family.name == "gateway_bypass_packets"
        for sample in family.samples if sample.name == "gateway_bypass_packets_total"
    }


def send_udp(lab: Lab, ns: str, dst: str, port: int, count: int) -> None:
    lab.run(ns, [sys.executable, "-c", SEND_UDP, dst, str(port), str(count)], check=True, timeout=30)


def wait_for(predicate, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while not (value := predicate()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return value


def test_forwarded_packet_is_reported_and_counted(lab, sentinel):
    _, alerts = sentinel
    lab.set_forwarding(True)
    inet = lab.zones["internet"]
    send_udp(lab, "ext", inet.host_ip, 9999, count=3)
    counts = wait_for(lambda: bypass_counts(lab).get(("extranet", "internet")) == 3 and bypass_counts(lab))
    assert counts, bypass_counts(lab)
    assert counts[("extranet", "internet")] == 3
    records = [json.loads(line) for line in alerts.read_text().splitlines()]
    outbound = [r for r in records if (r["src_zone"], r["dst_zone"]) == ("extranet", "internet")]
    assert len(outbound) == 1, records  # one alert per flow and interval; the counter has every packet
    assert outbound[0] | {"time": None} == outbound[0] | {
        "time": None, "frontend": "lab-gateway", "kind": "bypass", "src": "198.18.1.2", "dst": inet.host_ip, "interface": "inet0",
        "protocol": "UDP", "dport": 9999,
    }


def test_gateway_traffic_and_blocked_attempts_are_not_bypasses(lab, sentinel):
    ext, sec = lab.zones["extranet"], lab.zones["sector-health"]
    # TCP that ends at the gateway itself, and TCP the gateway originates towards a zone host.
    servers = [lab.popen(ns, [sys.executable, "-c", SERVE, "7100"]) for ns in ("gw", "sec")]
    try:
        assert lab.wait_tcp("ext", ext.gateway_ip, 7100)
        assert lab.wait_tcp("gw", sec.host_ip, 7100)
        lab.run("ext", [sys.executable, "-c", CONNECT, ext.gateway_ip, "7100"], check=True)
        lab.run("gw", [sys.executable, "-c", CONNECT, sec.host_ip, "7100"], check=True)
    finally:
        for server in servers:
            server.kill()
            server.wait()
    # A direct attempt across zones while the gateway does not forward: dropped, so nothing crossed.
    send_udp(lab, "ext", lab.zones["internet"].host_ip, 9999, count=3)
    time.sleep(0.5)
    assert bypass_counts(lab) == {}
    _, alerts = sentinel
    assert alerts.read_text() == ""
