"""Host names are scanned before anything resolves them (issue 20): an ID number in a name never
leaves in a DNS query, and the refusal's record, alert and decision log hold it masked.

The gateway runs in a network namespace of its own whose resolv.conf names a DNS server in that
namespace writing down every name it is asked for (tests/dnsrecorder.py): the proof that no query
was made is that server's log.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.certs import make_ca_and_server
from tests.gatewayproc import REPO, Process, free_port, gateway_config, listener_url, start_gateway, start_upstream, \
    write_config

ID_NUMBER = "11010519491231002X"
ID_HOST = f"{ID_NUMBER.lower()}.attacker.example"
UPSTREAM_PORT, TLS_PORT = 8000, 8443


@pytest.fixture(scope="module")
def dns_namespace(tmp_path_factory):
    """A network namespace (pyroute2) with its loopback up and a resolv.conf naming a recording DNS server."""
    from pyroute2 import NetNS, netns

    name = f"gwhn{os.getpid()}"
    etc = Path("/etc/netns") / name
    try:
        netns.create(name)
    except Exception as e:  # noqa: BLE001 - any failure means: no namespaces here
        print(f"SKIP: cannot create a network namespace: {e}")
        pytest.skip(f"cannot create a network namespace: {e}")
    root = tmp_path_factory.mktemp("names")
    processes: list[Process] = []
    try:
        with NetNS(name) as ns:
            ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
        prefix = ["ip", "netns", "exec", name]
        queries = root / "queries.log"
        processes.append(Process([sys.executable, str(REPO / "tests" / "dnsrecorder.py"), "--log", str(queries)],
                                 prefix).started("ready", timeout=15))
        ca, cert, key = make_ca_and_server(root, "127.0.0.2")
        processes.append(start_upstream("127.0.0.2", UPSTREAM_PORT, root / "upstream.log", prefix=prefix))
        processes.append(start_upstream("127.0.0.2", TLS_PORT, root / "upstream-tls.log", prefix=prefix,
                                        tls=(cert, key)))
        config = gateway_config(root / "state", tls={"upstream_ca": str(ca)})
        processes.append(start_gateway(write_config(root / "gateway.yaml", config), prefix=prefix))
        yield prefix, config, root, queries
    finally:
        for process in processes:
            process.stop()
        shutil.rmtree(etc, ignore_errors=True)
        netns.remove(name)


def curl(prefix: list[str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, "curl", "-sS", "--max-time", "10", *args], capture_output=True, text=True,
                          timeout=30)


def in_namespace(prefix: list[str], script: str) -> dict:
    """Run a Python snippet in the namespace; it prints one JSON object."""
    done = subprocess.run([*prefix, sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def state_text(root: Path) -> str:
    """Everything the gateway wrote: trace log (records, tiles), alerts, decision log, its own output."""
    texts = [path.read_bytes().decode("utf-8", "replace") for path in (root / "state").rglob("*") if path.is_file()]
    return "\n".join(texts)


def assert_never_leaked(root: Path, queries: Path, gateway_output: str) -> None:
    asked = queries.read_text()
    assert ID_NUMBER.lower() not in asked.lower(), asked
    assert ID_NUMBER[:17] not in state_text(root)
    assert ID_NUMBER[:17] not in gateway_output


def test_a_clean_name_is_resolved_by_the_recording_server(dns_namespace):
    prefix, config, root, queries = dns_namespace
    result = curl(prefix, "-x", listener_url(config, "forward"), "-w", "\n%{http_code}",
                  f"http://clean.example.test:{UPSTREAM_PORT}/text?body=resolved")
    assert result.stdout.rsplit("\n", 1) == ["resolved", "200"], result
    assert "clean.example.test." in queries.read_text()  # the gateway resolves through this server


def test_id_number_in_the_url_host_is_refused_without_a_dns_query(dns_namespace):
    prefix, config, root, queries = dns_namespace
    result = curl(prefix, "-x", listener_url(config, "forward"), "-w", "\n%{http_code}",
                  f"http://{ID_HOST}:{UPSTREAM_PORT}/")
    body, status = result.stdout.rsplit("\n", 1)
    assert status == "403", result
    refusal = json.loads(body)
    assert refusal["reasons"] == [{"rule": refusal["reasons"][0]["rule"], "type": "cn_id_card", "count": 1, "locations": ["host"]}]
    gateway = _gateway(dns_namespace)
    records = [json.loads(line) for line in (root / "state" / "alerts.jsonl").read_text().splitlines()]
    alert = next(a for a in records if a["id"] == refusal["transfer_id"])
    assert alert["upstream"]["host"] == "1101**********002x.attacker.example", alert
    assert alert["upstream"]["addr"] is None and alert["upstream"]["zone"] == "unknown"
    assert "1101**********002x.attacker.example" in alert["url"]
    assert_never_leaked(root, queries, gateway.output)


def test_id_number_in_the_host_header_is_refused_without_a_dns_query(dns_namespace):
    prefix, config, root, queries = dns_namespace
    result = curl(prefix, "-x", listener_url(config, "forward"), "-o", "/dev/null", "-w", "%{http_code}",
                  "-H", f"Host: {ID_HOST}", f"http://127.0.0.2:{UPSTREAM_PORT}/text?body=header")
    assert result.stdout == "403", result
    assert "/text?body=header" not in (root / "upstream.log").read_text()
    assert_never_leaked(root, queries, _gateway(dns_namespace).output)


def test_connect_to_an_id_number_host_is_refused_and_its_connection_closed(dns_namespace):
    prefix, config, root, queries = dns_namespace
    host, port = listener_url(config, "forward").removeprefix("http://").split(":")
    seen = in_namespace(prefix, f"""
        import json, socket
        sock = socket.create_connection(("{host}", {port}), timeout=10)
        sock.sendall(b"CONNECT {ID_HOST}:443 HTTP/1.1\\r\\nHost: {ID_HOST}:443\\r\\n\\r\\n")
        answer = b""
        while chunk := sock.recv(65536):  # until the gateway closes the connection
            answer += chunk
        print(json.dumps({{"answer": answer.decode()}}))
    """)
    head, _, body = seen["answer"].partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 403"), seen
    assert json.loads(body)["reasons"][0]["locations"] == ["host"]
    assert_never_leaked(root, queries, _gateway(dns_namespace).output)


def request_in_tls_tunnel(dns_namespace, sni: str | None, path: str) -> tuple[str, str]:
    """CONNECT to the TLS upstream by address, then TLS with `sni` and one request: (CONNECT answer, answer)."""
    prefix, config, _, _ = dns_namespace
    host, port = listener_url(config, "forward").removeprefix("http://").split(":")
    seen = in_namespace(prefix, f"""
        import json, socket, ssl
        sock = socket.create_connection(("{host}", {port}), timeout=10)
        sock.sendall(b"CONNECT 127.0.0.2:{TLS_PORT} HTTP/1.1\\r\\nHost: 127.0.0.2:{TLS_PORT}\\r\\n\\r\\n")
        established = sock.recv(65536).decode()
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        tls = context.wrap_socket(sock, server_hostname={sni!r})
        tls.sendall(b"GET {path} HTTP/1.1\\r\\nHost: 127.0.0.2:{TLS_PORT}\\r\\nConnection: close\\r\\n\\r\\n")
        answer = b""
        while chunk := tls.recv(65536):
            answer += chunk
        print(json.dumps({{"established": established, "answer": answer.decode()}}))
    """)
    return seen["established"], seen["answer"]


def test_id_number_in_the_tls_sni_is_refused_before_any_upstream_connection(dns_namespace):
    _, _, root, queries = dns_namespace
    established, answer = request_in_tls_tunnel(dns_namespace, None, "/text?body=no-sni")
    assert established.startswith("HTTP/1.1 200") and answer.startswith("HTTP/1.1 200"), answer
    established, answer = request_in_tls_tunnel(dns_namespace, ID_HOST, "/text?body=sni")
    assert established.startswith("HTTP/1.1 200"), established
    head, _, body = answer.partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 403"), answer
    assert json.loads(body)["reasons"][0]["locations"] == ["tls sni"]
    logged = (root / "upstream-tls.log").read_text()
    assert "/text?body=no-sni" in logged and "/text?body=sni" not in logged
    assert_never_leaked(root, queries, _gateway(dns_namespace).output)


def _gateway(dns_namespace) -> Process:
    """This module's gateway (the test process may have started others before it: pytest-xdist runs
    several modules in one process)."""
    config_path = str(dns_namespace[2] / "gateway.yaml")
    return next(p for p in Process.started_processes
                if p.argv[1:4] == ["-m", "gateway", "run"] and config_path in p.argv)


# Real-looking host names with digits in their labels: none may be taken for a sensitive value.
ORDINARY_NAMES = """ec2-54-123-45-67.compute-1.amazonaws.com 123456789012.dkr.ecr.us-east-1.amazonaws.com
    s3.cn-north-1.amazonaws.com.cn 1251001001.cos.ap-guangzhou.myqcloud.com r3---sn-4g5e6nsz.googlevideo.com
    a1234.dscb.akamai.net e13579.dscg.akamaiedge.net img14.360buyimg.com api2.weixin.qq.com wx4.sinaimg.cn
    xn--fiqs8s.xn--55qx5d.cn www.12306.cn gd.10086.cn mail.163.com ss1.bdstatic.com zwfw.beijing.gov.cn
    d1a2b3c4d5e6f7.cloudfront.net ip-10-0-12-34.ec2.internal build-20240101120000.ci.example
    p3-sign.douyinpic.com i0.hdslb.com v6.ipv6-test.com crl3.digicert.com vod-1302514847.cos.ap-shanghai.myqcloud.com
    b2b-1688.alibaba.com pic1.zhimg.com 4a7f2c9e1b3d5f60.cdn.example sh-ct-cmcc-183-131-12-4.cdn.example
    u13800.example srv01-dc2-rack17.corp.example""".split()


@pytest.fixture(scope="module")
def hosts_policy(dns_namespace):
    """A second gateway in the namespace whose policy leaves names outside every profile: on `forward`
    an allow rule for `*.gov.example` only (profile `outbound`), on `strict` an allow rule with no
    request profile; a client in zone `internet` (127.0.0.5) has no allow rule at all."""
    prefix, _, root, queries = dns_namespace
    state = root / "hosts-policy"
    state.mkdir()
    config = gateway_config(state / "state", policy={"default": "deny", "rules": [
        {"name": "gov-only", "from": "extranet", "to": "internet", "listeners": ["forward"],
         "hosts": ["*.gov.example"], "action": "allow", "request_profile": "outbound", "response_profile": "inbound"},
        {"name": "no-profile", "from": "extranet", "to": "internet", "listeners": ["strict"], "action": "allow"}]})
    config["listeners"].append({"name": "strict", "mode": "regular", "listen": f"127.0.0.1:{free_port()}"})
    gateway = start_gateway(write_config(state / "gateway.yaml", config), prefix=prefix)
    yield prefix, config, state, queries, gateway
    gateway.stop()


def _fetch(prefix: list[str], config: dict, listener: str, host: str, source: str = "127.0.0.1") -> tuple[str, str]:
    result = curl(prefix, "--interface", source, "-x", listener_url(config, listener), "-w", "\n%{http_code}",
                  f"http://{host}:{UPSTREAM_PORT}/text?body=ok")
    body, _, status = result.stdout.rpartition("\n")
    return status, body


@pytest.mark.parametrize("listener, source, host", [
    ("forward", "127.0.0.1", ID_HOST),                           # outside the rule's hosts
    ("forward", "127.0.0.5", f"x{ID_NUMBER}.attacker2.example"),  # a zone with no allow rule
])
def test_a_name_no_allow_rule_can_cover_is_denied_without_a_dns_query(hosts_policy, listener, source, host):
    prefix, config, state, queries, gateway = hosts_policy
    status, body = _fetch(prefix, config, listener, host, source)
    assert status == "403", body
    assert json.loads(body)["reasons"][0]["type"] == "policy"
    assert_never_leaked(state, queries, gateway.output)


@pytest.mark.parametrize("listener, host", [
    ("strict", f"x{ID_NUMBER}.attacker3.example"),   # allowed, but no request profile: every detector
    ("strict", f"{ID_NUMBER}.attacker4.example"),
    ("forward", f"x{ID_NUMBER}.gov.example"),        # the profile's detectors, the number inside a label
    ("forward", f"id{ID_NUMBER}abc.gov.example"),
])
def test_an_id_number_in_a_label_is_refused_and_masked_without_a_dns_query(hosts_policy, listener, host):
    prefix, config, state, queries, gateway = hosts_policy
    status, body = _fetch(prefix, config, listener, host)
    assert status == "403", body
    refusal = json.loads(body)
    assert refusal["reasons"][0]["type"] == "cn_id_card" and refusal["reasons"][0]["locations"] == ["host"], refusal
    assert_never_leaked(state, queries, gateway.output)
    alerts = [json.loads(line) for line in (state / "state" / "alerts.jsonl").read_text().splitlines()]
    alert = next(a for a in alerts if a["id"] == refusal["transfer_id"])
    assert "1101**********002x" in alert["upstream"]["host"].lower(), alert


def test_ordinary_names_with_digits_pass_every_detector_and_are_resolved(hosts_policy):
    prefix, config, state, queries, gateway = hosts_policy
    refused = {}
    for host in ORDINARY_NAMES:
        status, body = _fetch(prefix, config, "strict", host)
        if status != "200" or body != "ok":
            refused[host] = (status, body)
    assert refused == {}
    asked = queries.read_text()
    assert all(f"{host}." in asked for host in ORDINARY_NAMES)
