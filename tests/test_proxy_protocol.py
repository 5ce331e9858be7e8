"""PROXY protocol v2 on a listener: the header parsed strictly, the client taken from it only when a
trusted balancer sent it, everything else refused, counted and recorded; a real HAProxy in front.

Loopback stands for the networks: the balancer is 127.0.0.5 (trusted), an attacker 127.0.0.6; the
clients the balancer speaks for are in 10.1.0.0/16 (extranet) and 10.2.0.0/16 (sector)."""

from __future__ import annotations

import ipaddress
import json
import re
import shutil
import socket
import struct
import subprocess
import time

import pytest

from gateway.config.load import ConfigError, load_config
from gateway.ops.cluster import GatewayMachine, haproxy_config
from gateway.proxy.proxyproto import ProxyHeader, ProxyHeaderError, parse_block, parse_start
from tests.gatewayproc import (
    Process,
    free_port,
    gateway_config,
    metric_total,
    start_gateway,
    start_upstream,
    trace_records,
    write_config,
)

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
BALANCER, ATTACKER = "127.0.0.5", "127.0.0.6"


def v2_header(source: tuple[str, int] | None, destination: tuple[str, int] = ("127.0.0.1", 80),
              command: int = 0x21, tlvs: bytes = b"") -> bytes:
    """Written here from the specification (haproxy doc/proxy-protocol.txt 2.2), independently of the parser."""
    if source is None:
        return SIGNATURE + bytes([command, 0x00]) + struct.pack("!H", len(tlvs)) + tlvs
    ip = ipaddress.ip_address(source[0])
    family = 0x11 if ip.version == 4 else 0x21
    block = (ip.packed + ipaddress.ip_address(destination[0]).packed
             + struct.pack("!HH", source[1], destination[1]) + tlvs)
    return SIGNATURE + bytes([command, family]) + struct.pack("!H", len(block)) + block


def parse(data: bytes) -> ProxyHeader:
    _, _, length = parse_start(data[:16])
    block = data[16:]
    assert len(block) == length
    return parse_block(data[:16], block)


def with_crc32c(header: bytes, wrong: bool = False) -> bytes:
    """The header with a CRC32C TLV appended (the specification's 2.2.5: CRC32C of the whole header with
    the field zeroed, big-endian), computed with the standard library's table-free bitwise loop here,
    independently of the parser's library."""
    body = header[16:] + b"\x03\x00\x04" + bytes(4)
    zeroed = header[:14] + struct.pack("!H", len(body)) + body
    crc = 0xFFFFFFFF
    for byte in zeroed:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    crc ^= 0xFFFFFFFF
    return zeroed[:-4] + struct.pack("!I", crc ^ (1 if wrong else 0))


# ---- the header alone ------------------------------------------------------------------------------


def test_valid_headers_give_the_client():
    assert parse(v2_header(("10.1.0.9", 40000), ("198.18.10.10", 8080))) == ProxyHeader(
        ("10.1.0.9", 40000), ("198.18.10.10", 8080))
    assert parse(v2_header(("2001:db8::7", 1), ("2001:db8::1", 2))).source == ("2001:db8::7", 1)
    tlv = bytes([0x04]) + struct.pack("!H", 3) + b"abc"  # PP2_TYPE_NOOP
    assert parse(v2_header(("10.1.0.9", 1), tlvs=tlv)).source == ("10.1.0.9", 1)
    assert parse(v2_header(None, command=0x20)) == ProxyHeader(None, None)  # LOCAL: a health check
    assert parse(with_crc32c(v2_header(("10.1.0.9", 2), tlvs=tlv))).source == ("10.1.0.9", 2)
    assert parse(with_crc32c(v2_header(("2001:db8::7", 3), ("2001:db8::1", 2)))).source == ("2001:db8::7", 3)


@pytest.mark.parametrize("data, message", [
    (b"PROXY TCP4 10.1.0.9 127.0.0.1 1 2\r\n", "v1 (text)"),
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "does not start with its signature"),
    (v2_header(("10.1.0.9", 1), command=0x11), "version 1"),
    (v2_header(("10.1.0.9", 1), command=0x22), "unknown PROXY command"),
    (v2_header(None, command=0x21), "family 0x00"),  # PROXY with no address
    (SIGNATURE + bytes([0x21, 0x12]) + struct.pack("!H", 12) + bytes(12), "family 0x12"),  # UDP
    (SIGNATURE + bytes([0x21, 0x31]) + struct.pack("!H", 216) + bytes(216), "family 0x31"),  # UNIX
    (SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", 8) + bytes(8), "needs 12"),
    (SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", 2000), "at most 1024"),
    (v2_header(("10.1.0.9", 1), tlvs=b"\x04\x00"), "inside a TLV"),
    (v2_header(("10.1.0.9", 1), tlvs=b"\x04\x00\x09abc"), "past the header's end"),
    (with_crc32c(v2_header(("10.1.0.9", 1)), wrong=True), "CRC32C"),
    (v2_header(("10.1.0.9", 1), tlvs=b"\x03\x00\x02ab"), "CRC32C TLV must be one, of 4 bytes"),
    (with_crc32c(with_crc32c(v2_header(("10.1.0.9", 1)))), "CRC32C TLV must be one"),
])
def test_invalid_headers_are_refused(data, message):
    with pytest.raises(ProxyHeaderError, match=re.escape(message)):
        _, _, length = parse_start(data[:16].ljust(16, b"\0"))
        parse_block(data[:16].ljust(16, b"\0"), data[16:16 + length])


def test_configuration_errors_name_file_and_line(tmp_path):
    config = gateway_config(tmp_path / "state")
    config["listeners"][0].update(proxy_protocol="v1", trusted_proxies=["127.0.0.5/8"])
    config["listeners"][1]["proxy_protocol"] = "v2"
    path = write_config(tmp_path / "gateway.yaml", config)
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    errors = "\n".join(raised.value.errors)
    assert f"{path}:" in errors
    assert "listeners[0].proxy_protocol: 'v1' is not one of: v2" in errors
    assert "listeners[0].trusted_proxies[0]: not a valid network" in errors
    assert "listeners[1]: a listener with proxy_protocol needs trusted_proxies" in errors


def test_install_refuses_a_changed_mitmproxy(monkeypatch):
    from mitmproxy.proxy.server import ConnectionHandler

    from gateway.proxy import proxyproto

    proxyproto.install()
    assert getattr(ConnectionHandler.handle_client, "gateway_answers", False)

    async def changed(self):  # reads the client before its client_connected hook
        await self.handle_connection(self.client)

    monkeypatch.setattr(ConnectionHandler, "handle_client", changed)
    with pytest.raises(RuntimeError, match="review gateway/proxy/proxyproto.py"):
        proxyproto.install()


# ---- a real gateway --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def proxied(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("proxied")
    upstream_port = free_port("127.0.0.2")
    upstream = start_upstream("127.0.0.2", upstream_port, tmp / "upstream.jsonl")
    config = gateway_config(
        tmp / "state",
        zones={"extranet": {"networks": ["127.0.0.1/32", "10.1.0.0/16"]},
               "sector": {"networks": ["10.2.0.0/16"]},
               "internet": {"networks": ["127.0.0.0/8"]}},
        listeners=[{"name": "behind-balancer", "mode": "regular", "listen": f"127.0.0.1:{free_port()}",
                    "proxy_protocol": "v2", "trusted_proxies": [f"{BALANCER}/32"]},
                   {"name": "forward", "mode": "regular", "listen": f"127.0.0.1:{free_port()}"}],
        policy={"default": "deny", "rules": [
            {"name": "extranet-to-internet", "from": "extranet", "to": "internet", "action": "allow"}]},
    )
    gateway = start_gateway(write_config(tmp / "gateway.yaml", config))
    yield {"config": config, "tmp": tmp, "upstream": f"127.0.0.2:{upstream_port}",
           "port": int(config["listeners"][0]["listen"].rsplit(":", 1)[1]), "gateway": gateway}
    gateway.stop()
    upstream.stop()


def exchange(port: int, source: str, data: bytes) -> bytes:
    """Connect from `source`, send `data`, read until the gateway closes or answers one response."""
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as sock:
        sock.sendall(data)
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer) < answer.index(b"\r\n\r\n") + 4 + _length(answer):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        return answer


def _length(answer: bytes) -> int:
    head = answer.split(b"\r\n\r\n", 1)[0].lower()
    for line in head.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 0


def get(upstream: str, path: str) -> bytes:
    return f"GET http://{upstream}{path} HTTP/1.1\r\nHost: {upstream}\r\nConnection: close\r\n\r\n".encode()


def transfer_id(answer: bytes) -> str:
    for line in answer.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"x-gateway-transfer-id:"):
            return line.split(b":", 1)[1].strip().decode()
    return json.loads(answer.split(b"\r\n\r\n", 1)[1])["transfer_id"]


def record_of(proxied, answer: bytes) -> dict:
    records = trace_records(proxied["tmp"] / "state" / "trace",
                            "--id", transfer_id(answer))
    assert len(records) == 1, records
    return records[0]


def test_zone_is_the_proxy_address_from_a_trusted_balancer(proxied):
    answer = exchange(proxied["port"], BALANCER, v2_header(("10.1.0.9", 40001)) + get(proxied["upstream"], "/a"))
    assert answer.startswith(b"HTTP/1.1 200"), answer
    record = record_of(proxied, answer)
    assert record["client"]["addr"] == "10.1.0.9:40001"
    assert record["client"]["zone"] == "extranet"
    assert record["client"]["via"].startswith(f"{BALANCER}:")

    answer = exchange(proxied["port"], BALANCER, v2_header(("10.2.0.9", 40002)) + get(proxied["upstream"], "/b"))
    assert answer.startswith(b"HTTP/1.1 403"), answer  # sector -> internet: no rule, denied
    record = record_of(proxied, answer)
    assert (record["client"]["zone"], record["decision"]) == ("sector", "deny")


def test_forged_header_from_an_untrusted_address_is_refused_and_recorded(proxied):
    before = metric_total(proxied["config"], "gateway_connections_refused_total", 'reason="proxy_untrusted"')
    seen = (proxied["tmp"] / "upstream.jsonl").read_text().count('"/forged"') \
        if (proxied["tmp"] / "upstream.jsonl").exists() else 0
    answer = exchange(proxied["port"], ATTACKER, v2_header(("10.1.0.9", 40003)) + get(proxied["upstream"], "/forged"))
    assert answer.startswith(b"HTTP/1.1 400"), answer
    record = record_of(proxied, answer)
    assert record["client"]["addr"].startswith(f"{ATTACKER}:")  # the peer, not the claimed client
    assert record["client"]["zone"] == "internet" and "via" not in record["client"]
    assert record["decision"] == "error"
    assert "not in trusted_proxies" in record["error"] and "claiming client 10.1.0.9:40003" in record["error"]
    assert metric_total(proxied["config"], "gateway_connections_refused_total",
                        'reason="proxy_untrusted"') == before + 1
    assert (proxied["tmp"] / "upstream.jsonl").read_text().count('"/forged"') == seen  # nothing crossed


def test_trusted_balancer_without_or_with_a_bad_header_is_refused(proxied):
    for data, reason, text in [
        (get(proxied["upstream"], "/plain"), "proxy_missing", "does not start with its signature"),
        (b"PROXY TCP4 10.1.0.9 127.0.0.1 1 2\r\n" + get(proxied["upstream"], "/v1"), "proxy_malformed", "v1"),
        (with_crc32c(v2_header(("10.1.0.9", 40004)), wrong=True) + get(proxied["upstream"], "/crc"),
         "proxy_malformed", "CRC32C"),
    ]:
        before = metric_total(proxied["config"], "gateway_connections_refused_total", f'reason="{reason}"')
        answer = exchange(proxied["port"], BALANCER, data)
        assert answer.startswith(b"HTTP/1.1 400"), answer
        assert text in record_of(proxied, answer)["error"]
        assert metric_total(proxied["config"], "gateway_connections_refused_total",
                            f'reason="{reason}"') == before + 1


def test_local_command_is_served_as_the_balancer(proxied):
    answer = exchange(proxied["port"], BALANCER, v2_header(None, command=0x20) + get(proxied["upstream"], "/local"))
    assert answer.startswith(b"HTTP/1.1 403"), answer  # the balancer's own address: internet -> internet
    record = record_of(proxied, answer)
    assert record["client"]["addr"].startswith(f"{BALANCER}:") and "via" not in record["client"]


def test_silent_connection_is_closed_and_counted_not_recorded(proxied, tmp_path):
    before = metric_total(proxied["config"], "gateway_connections_refused_total", 'reason="proxy_missing"')
    with socket.create_connection(("127.0.0.1", proxied["port"]), source_address=(BALANCER, 0)) as sock:
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(10)
        assert sock.recv(100) == b""
    deadline = time.monotonic() + 5
    while metric_total(proxied["config"], "gateway_connections_refused_total",
                       'reason="proxy_missing"') != before + 1:
        assert time.monotonic() < deadline
        time.sleep(0.1)


# ---- a real HAProxy in front -----------------------------------------------------------------------


def test_real_haproxy_in_front_gives_the_client_zone(proxied, tmp_path):
    if shutil.which("haproxy") is None:
        pytest.skip("haproxy is not installed (scripts/system-deps installs it)")
    management = int(proxied["config"]["management"]["listen"].rsplit(":", 1)[1])
    front = free_port()
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(haproxy_config(("127.0.0.1", front),
                                  [GatewayMachine("gw1", "127.0.0.1", proxied["port"], management)], source=BALANCER))
    assert subprocess.run(["haproxy", "-c", "-q", "-f", str(cfg)]).returncode == 0
    haproxy = Process(["haproxy", "-db", "-f", str(cfg)])
    try:
        curl = ["curl", "-s", "-i", "--max-time", "10", "--retry", "5", "--retry-connrefused", "--retry-delay", "1",
                "-x", f"http://127.0.0.1:{front}"]
        deadline = time.monotonic() + 15
        while True:  # the health check must have seen /readyz before the server takes connections
            allowed = subprocess.run([*curl, f"http://{proxied['upstream']}/via-haproxy"],
                                     capture_output=True).stdout
            if allowed.startswith(b"HTTP/1.1 200") or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert allowed.startswith(b"HTTP/1.1 200"), allowed + haproxy.output.encode()
        record = record_of(proxied, allowed)
        assert record["client"]["addr"].startswith("127.0.0.1:") and record["client"]["zone"] == "extranet"
        assert record["client"]["via"].startswith(f"{BALANCER}:")
        # The same balancer for a client in another zone: curl from 127.0.0.7 (internet) is denied.
        denied = subprocess.run([*curl, "--interface", "127.0.0.7", f"http://{proxied['upstream']}/other"],
                                capture_output=True).stdout
        assert denied.startswith(b"HTTP/1.1 403"), denied
        record = record_of(proxied, denied)
        assert record["client"]["addr"].startswith("127.0.0.7:") and record["client"]["zone"] == "internet"
    finally:
        haproxy.stop()


def test_real_haproxy_header_with_crc32c_verifies(tmp_path):
    """HAProxy's own bytes (`send-proxy-v2` with `proxy-v2-options crc32c`, as haproxy_config writes it):
    the header carries a CRC32C TLV, the parser verifies it, and one flipped bit of it is refused."""
    if shutil.which("haproxy") is None:
        pytest.skip("haproxy is not installed (scripts/system-deps installs it)")
    catcher = socket.create_server(("127.0.0.1", 0))
    front = free_port()
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(f"""defaults
    mode tcp
    timeout connect 2s
    timeout client 10s
    timeout server 10s
frontend f
    bind 127.0.0.1:{front}
    default_backend b
backend b
    server catcher 127.0.0.1:{catcher.getsockname()[1]} send-proxy-v2 proxy-v2-options crc32c source {BALANCER}
""")
    haproxy = Process(["haproxy", "-db", "-f", str(cfg)])
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                client = socket.create_connection(("127.0.0.1", front), timeout=2, source_address=("127.0.0.9", 0))
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline, haproxy.output
                time.sleep(0.1)
        with client:
            client.sendall(b"hello")
            catcher.settimeout(10)
            served, _ = catcher.accept()
            with served:
                data = b""
                while not data.endswith(b"hello"):
                    data += served.recv(4096)
    finally:
        haproxy.stop()
        catcher.close()
    _, _, length = parse_start(data[:16])
    header = data[:16 + length]
    assert parse(header).source[0] == "127.0.0.9"
    offset, crc = 16 + 12, None  # the TLVs after the IPv4 address block
    while offset < len(header):
        if header[offset] == 0x03:
            crc = offset + 3
        offset += 3 + int.from_bytes(header[offset + 1:offset + 3], "big")
    assert crc is not None, f"no CRC32C TLV in HAProxy's header: {header.hex()}"
    broken = header[:crc] + bytes([header[crc] ^ 0x01]) + header[crc + 1:]
    with pytest.raises(ProxyHeaderError, match="CRC32C"):
        parse(broken)
