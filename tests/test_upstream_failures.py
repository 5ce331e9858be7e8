"""Every way an upstream fails that mitmproxy would answer by itself (its own HTML 502) is answered
by the gateway: `502` with the JSON refusal and `X-Gateway-Transfer-Id`, and one trace record under
that id (decision `error`, status 502). One test per path: connect refused, a name that does not
resolve, upstream TLS refused, an upstream closing before or in the middle of its head, a head that
is no HTTP, a body shorter than announced, bad or cut chunked framing, smuggling-shaped framing, a
long (spooled) body cut, an upload whose upstream hangs up, and an HTTP/2 upstream's resets,
GOAWAY, garbage frames, bad status and close after the head. HTTP/1.1 and HTTP/2 clients alike.
An upstream's 101 to a protocol other than WebSocket is refused the same way (recorded as refused).
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time

import pytest

from tests.badupstream import ANSWERS, H2_FAILURES, SILENT, BadUpstream
from tests.certs import make_ca_and_server
from tests.gatewayproc import (
    free_port,
    gateway_config,
    listener_url,
    metric_total,
    start_gateway,
    trace_records,
    write_config,
)

MIB = 1024 * 1024
ID_NUMBER = "11010519491231002X"
UPSTREAM_TIMEOUT = 2.0
MARGIN = 2.0  # seconds allowed past the deadline on a loaded machine


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    root = tmp_path_factory.mktemp("upstream-failures")
    ca, cert, key = make_ca_and_server(root, "127.0.0.2")
    config = gateway_config(root / "state", workers=1, tls={"upstream_ca": str(ca)})
    config["dlp"]["spool_threshold"] = "1MiB"
    config["gateway"]["upstream_timeout"] = f"{UPSTREAM_TIMEOUT}s"
    # a name that does not resolve is in no zone: allowed there, so that the gateway tries to resolve it
    config["policy"]["rules"].append({"name": "to-unknown", "from": "extranet", "to": "unknown", "action": "allow",
                                      "request_profile": "outbound", "response_profile": "inbound"})
    path = write_config(root / "gateway.yaml", config)
    gateway = start_gateway(path)
    gateway_ca = root / "gateway-ca.pem"
    subprocess.run([sys.executable, "-m", "gateway", "ca", "export", "-c", str(path), "-o", str(gateway_ca)],
                   check=True, timeout=30)
    upload = root / "upload"
    upload.write_bytes(b"a" * 5 * MIB)
    plain, tls, http2 = BadUpstream("127.0.0.2"), BadUpstream("127.0.0.2", tls=(cert, key)), \
        BadUpstream("127.0.0.2", tls=(cert, key), http2=True)
    yield {"root": root, "config": config, "proxy": listener_url(config, "forward"), "gateway_ca": gateway_ca, "upload": upload,
           "plain": plain, "tls": tls, "http2": http2, "gateway": gateway}
    gateway.stop()
    for upstream in (plain, tls, http2):
        upstream.close()


def answered(lab, url: str, *args: str, version: str = "--http1.1") -> tuple[int, str]:
    done = subprocess.run(["curl", "-sS", "--max-time", "30", "--cacert", str(lab["gateway_ca"]), version,
                           "-x", lab["proxy"], "-o", "/dev/null", "-w", "%{http_code} %header{x-gateway-transfer-id}",
                           *args, url], capture_output=True, text=True, timeout=60)
    status, _, transfer_id = done.stdout.partition(" ")
    return int(status), transfer_id


def assert_answered_and_recorded(lab, status: int, transfer_id: str) -> dict:
    assert status == 502 and len(transfer_id) == 36, (status, transfer_id)  # ours, not mitmproxy's page
    record = trace_records(lab["root"] / "state" / "trace", "--id", transfer_id)[0]
    assert (record["status"], record["decision"]) == (502, "error"), record
    assert record["rules"][0]["rule"] == "upstream" and record["error"], record
    return record


VERSIONS = ["--http1.1", "--http2"]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", list(ANSWERS))
def test_an_upstream_failing_its_answer_is_answered_502_with_the_transfer_id(lab, path, version):
    """Plain HTTP to the upstream, and HTTPS through the tunnel (where the client may speak HTTP/2)."""
    for url in (f"http://127.0.0.2:{lab['plain'].port}{path}", f"https://127.0.0.2:{lab['tls'].port}{path}"):
        status, transfer_id = answered(lab, url, version=version)
        assert_answered_and_recorded(lab, status, transfer_id)


def exchanged(sock: socket.socket, url: str, fields: str = "") -> tuple[int, str]:
    """One GET (with header `fields`, each ending in CRLF) through the proxy on an open connection: the
    answer's status and transfer id (its body read)."""
    host = url.split("/")[2]
    sock.sendall(f"GET {url} HTTP/1.1\r\nHost: {host}\r\n{fields}\r\n".encode())
    answer = b""
    while b"\r\n\r\n" not in answer:
        data = sock.recv(65536)
        assert data, answer  # the gateway closed the connection without a (whole) answer
        answer += data
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    fields = {name.lower(): value for name, value in (line.split(": ", 1) for line in lines[1:])}
    while len(body) < int(fields.get("content-length", 0)):
        body += sock.recv(65536)
    return int(lines[0].split()[1]), fields.get("x-gateway-transfer-id", "")


@pytest.mark.parametrize("path", ["/garbage-head", "/bad-header-line"])
def test_an_unparsable_upstream_head_is_answered_502_and_the_connection_serves_on(lab, path):
    """mitmproxy failed the stream a second time when the upstream's connection closed after a head it
    could not parse, and asserted on the client connection the 502 had left open: "mitmproxy has
    crashed!" with a traceback, and that connection answered nothing more until its idle deadline."""
    logged = len(lab["gateway"].lines)
    protocol_errors = metric_total(lab["config"], "gateway_upstream_errors_total", 'kind="protocol"')
    host, port = lab["proxy"].removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        first = exchanged(sock, f"http://127.0.0.2:{lab['plain'].port}{path}")
        # The 502 is whole and so was the request: the connection serves the client's next one.
        second = exchanged(sock, f"http://127.0.0.2:{lab['plain'].port}/close-before-head")
    record = assert_answered_and_recorded(lab, *first)
    assert record["error"].startswith("Cannot parse HTTP response: "), record
    assert_answered_and_recorded(lab, *second)
    assert metric_total(lab["config"], "gateway_upstream_errors_total", 'kind="protocol"') == protocol_errors + 2
    crashes = [line for line in lab["gateway"].lines[logged:] if "crashed" in line or "Traceback" in line]
    assert not crashes, lab["gateway"].output


@pytest.mark.parametrize("upgrade", ["x-raw", "h2c"])
def test_an_upgrade_to_a_protocol_other_than_websocket_is_refused_502(lab, upgrade):
    """After a 101 to anything but WebSocket mitmproxy sent the client the 101 (recorded as allowed, with
    no reason), then closed (with rawtcp it would relay both ways, uninspected). Now the client gets 502
    and nothing of what the upstream sent; the transfer is recorded as refused, and counted."""
    server = socket.create_server(("127.0.0.2", 0))
    received = bytearray()

    def upgrading_upstream() -> None:
        connection, _ = server.accept()
        with connection, contextlib.suppress(OSError):
            received.extend(connection.recv(65536))
            connection.sendall(f"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: {upgrade}\r\n\r\n"
                               f"raw sfzh={ID_NUMBER}\n".encode())
            connection.settimeout(5)
            while data := connection.recv(65536):
                received.extend(data)

    thread = threading.Thread(target=upgrading_upstream, daemon=True)
    thread.start()
    protocol_errors = metric_total(lab["config"], "gateway_upstream_errors_total", 'kind="protocol"')
    host, port = lab["proxy"].removeprefix("http://").rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            status, transfer_id = exchanged(sock, f"http://127.0.0.2:{server.getsockname()[1]}/",
                                            f"Connection: Upgrade\r\nUpgrade: {upgrade}\r\n")
            assert status == 502, status
            sock.settimeout(1)
            with pytest.raises(TimeoutError):  # nothing follows the 502: the connection waits for a request
                sock.recv(65536)
        thread.join(10)
    finally:
        server.close()
    assert f"Upgrade: {upgrade}".encode() in received  # the upstream was asked, and switched
    record = assert_answered_and_recorded(lab, status, transfer_id)
    assert [(r["rule"], r["type"], r["locations"], r["action"]) for r in record["rules"]] == \
        [("upstream", "upgrade", ["response head"], "block")], record
    assert record["error"] == f"upstream switched protocols to '{upgrade}': only WebSocket is inspected"
    assert metric_total(lab["config"], "gateway_upstream_errors_total", 'kind="protocol"') == protocol_errors + 1


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("framing", [[], ["-H", "transfer-encoding: chunked"]], ids=["length", "chunked"])
def test_an_upstream_hanging_up_on_a_spooled_upload_is_answered_502(lab, version, framing):
    status, transfer_id = answered(lab, f"https://127.0.0.2:{lab['tls'].port}/close-before-head",
                                   "-T", str(lab["upload"]), *framing, version=version)
    assert_answered_and_recorded(lab, status, transfer_id)


@pytest.mark.parametrize("path", H2_FAILURES)
def test_an_http2_upstream_failing_is_answered_502_with_the_transfer_id(lab, path):
    before = len(lab["http2"].requests)
    status, transfer_id = answered(lab, f"https://127.0.0.2:{lab['http2'].port}{path}", version="--http2")
    assert lab["http2"].requests[before:] == [path]  # it was the HTTP/2 upstream that failed
    assert_answered_and_recorded(lab, status, transfer_id)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("target", ["refused", "no such name", "tls to plain", "untrusted name"])
def test_an_upstream_that_cannot_be_reached_is_answered_502_with_the_transfer_id(lab, target, version):
    url = {"refused": f"http://127.0.0.2:{free_port('127.0.0.2')}/",
           "no such name": "https://no-such-host.invalid/",
           "tls to plain": f"https://127.0.0.2:{lab['plain'].port}/",  # the TLS handshake fails
           # a certificate for 127.0.0.2 presented for another name of the same address
           "untrusted name": f"https://127.0.0.2.nip.invalid:{lab['tls'].port}/"}[target]
    resolve = ["--resolve", f"127.0.0.2.nip.invalid:{lab['tls'].port}:127.0.0.2"] if target == "untrusted name" else []
    status, transfer_id = answered(lab, url, *resolve, version=version)
    assert_answered_and_recorded(lab, status, transfer_id)


@pytest.mark.parametrize(("upstream", "version"), [(upstream, version) for upstream in ("plain", "tls")
                                                     for version in VERSIONS] + [("http2", "--http2")])
def test_a_silent_upstream_is_answered_504_within_the_upstream_timeout(lab, upstream, version):
    """An upstream that reads the request and never answers: 504 with the transfer id once
    gateway.upstream_timeout has passed (mitmproxy alone waited for its 600 s tcp_timeout)."""
    scheme = "http" if upstream == "plain" else "https"
    url = f"{scheme}://127.0.0.2:{lab[upstream].port}{SILENT}?{version}"
    timeouts = metric_total(lab["config"], "gateway_upstream_errors_total", 'kind="timeout"')
    started = time.monotonic()
    status, transfer_id = answered(lab, url, version=version)
    took = time.monotonic() - started
    print(f"answered {status} after {took:.2f} s")
    assert status == 504 and len(transfer_id) == 36 and UPSTREAM_TIMEOUT <= took < UPSTREAM_TIMEOUT + MARGIN, \
        (status, transfer_id, took)
    assert f"{SILENT}?{version}" in lab[upstream].requests  # the request did reach it
    records = trace_records(lab["root"] / "state" / "trace", "--id", transfer_id, opened=True)
    assert [(r.get("phase"), r["status"], r["decision"]) for r in records] == [("open", None, "allow"),
                                                                            ("done", 504, "error")]
    assert records[1]["rules"][0]["rule"] == "upstream"
    assert records[1]["error"] == f"upstream gave no response head within {UPSTREAM_TIMEOUT:g} s"
    assert metric_total(lab["config"], "gateway_upstream_errors_total", 'kind="timeout"') == timeouts + 1


@pytest.mark.parametrize("version", VERSIONS)
def test_a_silent_upstream_after_a_spooled_upload_is_answered_504(lab, version):
    """The deadline runs from the request's release: a 5 MiB upload (spooled, judged, then sent) too."""
    started = time.monotonic()
    status, transfer_id = answered(lab, f"https://127.0.0.2:{lab['tls'].port}{SILENT}?upload{version}",
                                   "-T", str(lab["upload"]), version=version)
    took = time.monotonic() - started
    print(f"answered {status} after {took:.2f} s")
    assert status == 504 and len(transfer_id) == 36 and took >= UPSTREAM_TIMEOUT, (status, took)
    [done] = trace_records(lab["root"] / "state" / "trace", "--id", transfer_id)
    assert (done["status"], done["decision"], done["req_bytes"]) == (504, "error", 5 * MIB)
