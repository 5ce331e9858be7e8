"""The gateway core across real test hosts: one network namespace per zone, veth links made with pyroute2.

An extranet client, a sector server and an internet host each sit in their own namespace; the gateway
has an interface in each and does not forward packets: only what its listeners carry crosses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gateway.ops.lab import Lab
from tests.certs import make_ca_and_server
from tests.gatewayproc import REPO, start_gateway, start_upstream
from tests.labs import built_lab

ID_NUMBER = "11010519491231002X"
UPSTREAM_PORT = 8000
TLS_PORT = 8443


@pytest.fixture(scope="module")
def netlab(tmp_path_factory):
    labs = built_lab("gwe")
    lab = next(labs)
    root = tmp_path_factory.mktemp("netns")
    inet, sec = lab.zones["internet"], lab.zones["sector-health"]
    ca, cert, key = make_ca_and_server(root, inet.host_ip)  # the internet host's HTTPS certificate
    config = yaml.safe_load((REPO / "config" / "lab.yaml").read_text())
    config["gateway"]["state_dir"] = str(root / "state")
    config["dlp"]["rules"] = str(REPO / "config" / "dlp")
    config["tls"] = {**config.get("tls", {}), "upstream_ca": str(ca)}
    path = root / "gateway.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True, sort_keys=False))
    processes = []
    try:
        processes.append(start_upstream(inet.host_ip, UPSTREAM_PORT, root / "internet.log",
                                        prefix=lab.command("inet", [])))
        processes.append(start_upstream(inet.host_ip, TLS_PORT, root / "internet-tls.log", tls=(cert, key),
                                        prefix=lab.command("inet", [])))
        processes.append(start_upstream(sec.host_ip, UPSTREAM_PORT, root / "sector.log",
                                        prefix=lab.command("sec", [])))
        processes.append(start_gateway(path, prefix=lab.command("gw", [])))
        subprocess.run([sys.executable, "-m", "gateway", "ca", "export", "-c", str(path), "-o",
                        str(root / "gateway-ca.pem")], check=True, timeout=30, cwd=REPO)
        yield lab, root
    finally:
        for process in processes:
            process.stop()
        labs.close()


def curl(lab: Lab, ns: str, *args: str) -> subprocess.CompletedProcess:
    return lab.run(ns, ["curl", "-sS", "--max-time", "10", *args], capture_output=True, text=True, timeout=30)


def logged_paths(root: Path, name: str) -> list[str]:
    log = root / f"{name}.log"
    return [json.loads(line)["path"] for line in log.read_text().splitlines()] if log.exists() else []


def test_clean_transfer_from_extranet_to_internet_passes_byte_for_byte(netlab):
    lab, root = netlab
    body = root / "payload.bin"
    body.write_bytes(os.urandom(50_000))
    result = curl(lab, "ext", "-x", f"http://{lab.zones['extranet'].gateway_ip}:8080",
                  "--data-binary", f"@{body}", "-H", "content-type: application/octet-stream",
                  "-o", str(root / "echoed.bin"), "-w", "%{http_code}",
                  f"http://{lab.zones['internet'].host_ip}:{UPSTREAM_PORT}/echo")
    assert result.stdout == "200", result.stderr
    assert (root / "echoed.bin").read_bytes() == body.read_bytes()


def test_id_number_towards_the_internet_is_blocked_and_never_arrives(netlab):
    lab, root = netlab
    result = curl(lab, "ext", "-x", f"http://{lab.zones['extranet'].gateway_ip}:8080",
                  "-H", "content-type: application/json", "--data", json.dumps({"sfzh": ID_NUMBER}),
                  "-w", "\n%{http_code}", f"http://{lab.zones['internet'].host_ip}:{UPSTREAM_PORT}/echo?netns-block")
    body, status = result.stdout.rsplit("\n", 1)
    assert status == "403", result
    assert json.loads(body)["reasons"][0]["type"] == "cn_id_card"
    assert "/echo?netns-block" not in logged_paths(root, "internet")


def test_https_through_connect_is_intercepted_with_the_exported_ca(netlab):
    lab, root = netlab
    proxy = f"http://{lab.zones['extranet'].gateway_ip}:8080"
    server = f"https://{lab.zones['internet'].host_ip}:{TLS_PORT}"
    result = curl(lab, "ext", "--cacert", str(root / "gateway-ca.pem"), "-x", proxy, "-i", f"{server}/text?body=secure")
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("secure") and "x-gateway-transfer-id:" in result.stdout.lower()
    blocked = curl(lab, "ext", "--cacert", str(root / "gateway-ca.pem"), "-x", proxy, "-w", "\n%{http_code}",
                   "-H", "content-type: application/json", "--data", json.dumps({"sfzh": ID_NUMBER}),
                   f"{server}/echo?netns-tls-block")
    assert blocked.stdout.rsplit("\n", 1)[1] == "403", blocked
    assert "/text?body=secure" in logged_paths(root, "internet-tls")
    assert "/echo?netns-tls-block" not in logged_paths(root, "internet-tls")


def test_denied_zone_pair_gets_403_policy_and_warn_passes_with_its_header(netlab):
    lab, root = netlab
    proxy = f"http://{lab.zones['extranet'].gateway_ip}:8080"
    denied = curl(lab, "ext", "-x", proxy, "-w", "\n%{http_code}", "http://203.0.113.9/")  # in no zone
    body, status = denied.stdout.rsplit("\n", 1)
    assert status == "403", denied
    assert json.loads(body)["reasons"] == [{"rule": "default", "type": "policy", "count": 1, "locations": ["extranet->unknown"]}]
    warned = curl(lab, "ext", "-x", proxy, "-i", "-H", "content-type: application/json",
                  "--data", json.dumps({"phone": "13812345678"}),
                  f"http://{lab.zones['internet'].host_ip}:{UPSTREAM_PORT}/echo?netns-warn")
    assert warned.stdout.startswith("HTTP/1.1 200") and "x-gateway-warning: mobile" in warned.stdout.lower()
    transfer_id = next(line.split(":", 1)[1].strip() for line in warned.stdout.splitlines()
                       if line.lower().startswith("x-gateway-transfer-id:"))
    alerts = [json.loads(line) for line in (root / "state" / "alerts.jsonl").read_text().splitlines()]
    assert [a["decision"] for a in alerts if a["id"] == transfer_id] == ["warn"]


def test_response_with_id_numbers_from_the_internet_is_blocked(netlab):
    lab, _ = netlab
    result = curl(lab, "ext", "-x", f"http://{lab.zones['extranet'].gateway_ip}:8080", "-w", "\n%{http_code}",
                  f"http://{lab.zones['internet'].host_ip}:{UPSTREAM_PORT}/ids?n=20")
    body, status = result.stdout.rsplit("\n", 1)
    assert status == "403", result
    assert "11010519" not in body


def test_internet_host_cannot_use_the_forward_proxy_towards_the_sector(netlab):
    lab, root = netlab
    # The forward listener only listens on the extranet side; from the internet it is unreachable,
    # and the reverse listener towards the sector is the only way in.
    published = curl(lab, "inet", "-w", "\n%{http_code}",
                     f"http://{lab.zones['internet'].gateway_ip}:8080/text?body=published")
    assert published.stdout.rsplit("\n", 1) == ["published", "200"], published
    assert "/text?body=published" in logged_paths(root, "sector")


def test_unknown_source_is_denied(netlab):
    lab, _ = netlab
    # A second address on the extranet host outside every zone network.
    lab.run("ext", ["ip", "addr", "add", "198.19.200.9/32", "dev", "eth0"], check=True)
    lab.run("gw", ["ip", "route", "add", "198.19.200.9/32", "dev", lab.zones["extranet"].gateway_ifname],
            check=True)
    result = curl(lab, "ext", "--interface", "198.19.200.9", "-x",
                  f"http://{lab.zones['extranet'].gateway_ip}:8080", "-w", "\n%{http_code}",
                  f"http://{lab.zones['internet'].host_ip}:{UPSTREAM_PORT}/text?body=x")
    body, status = result.stdout.rsplit("\n", 1)
    assert status == "403", result
    assert json.loads(body)["reasons"][0]["locations"] == ["unknown->internet"]


def test_packets_do_not_cross_without_the_proxy(netlab):
    lab, _ = netlab
    result = curl(lab, "ext", "--max-time", "2", "-o", "/dev/null", "-w", "%{http_code}",
                  f"http://{lab.zones['internet'].host_ip}:{UPSTREAM_PORT}/")
    assert result.returncode != 0 and result.stdout == "000"
