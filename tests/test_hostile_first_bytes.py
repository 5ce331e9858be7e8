"""First bytes that cannot begin an HTTP request are refused at once, on every listener and in a tunnel.

Through a real gateway whose `request_head_timeout` is long (20 s): another protocol's first line
(SMTP's EHLO, an SSH banner), binary bytes, a first line that does not parse as a request line, and a
TLS ClientHello on a listener's own (plain HTTP) port each get 400 within two seconds (a whole request
line of another HTTP version 505), with a transfer id, a trace record and a count; the connection is
closed. Before, mitmproxy waited for the end of a head that never came (408 after the timeout) or, for
TLS, answered the handshake with a certificate of the gateway's CA and then nothing. A valid request
sent byte by byte, or behind empty lines, still passes.
"""

from __future__ import annotations

import json
import socket
import ssl
import time

import pytest

from tests.gatewayproc import (
    free_port,
    gateway_config,
    listener_url,
    metric_total,
    start_gateway,
    start_upstream,
    trace_records,
    write_config,
)
from tests.test_proxy_loopback import RawUpstream, transfer_id_in

HEAD_TIMEOUT = 20  # seconds: every refusal here must come long before it
AT_ONCE = 2
NOT_HTTP, TLS_REFUSED = "not an HTTP request", "TLS where plain HTTP was expected"
VERSION_REFUSED = "HTTP version not supported (HTTP/1.0 and HTTP/1.1 are)"
PLACES = {"forward": "forward", "reverse": "publish-local", "tunnel": "forward"}  # where -> listener


def client_hello() -> bytes:
    """The first flight of a real TLS client (Python's ssl), as a browser or curl would send it."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname="example.com")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


FIRST_BYTES = {  # the first bytes, and the answer's status and recorded error
    "smtp": (b"EHLO example.com\r\n", 400, NOT_HTTP),
    "ssh": (b"SSH-2.0-OpenSSH_9.6\r\n", 400, NOT_HTTP),
    "binary": (b"\x00\x01\x02\x03\xff\xfe junk", 400, NOT_HTTP),
    "http-0.9": (b"GET /\r\n", 400, NOT_HTTP),  # a whole first line that is no request line
    "junk-after-version": (b"GET / HTTP/1.1 trailing junk\r\n", 400, NOT_HTTP),
    "http-2.0-line": (b"GET / HTTP/2.0\r\n", 505, VERSION_REFUSED),  # a request line, of another version
}


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    root = tmp_path_factory.mktemp("firstbytes")
    port = free_port("127.0.0.2")
    config = gateway_config(root / "state")
    config["gateway"]["request_head_timeout"] = f"{HEAD_TIMEOUT}s"
    config["listeners"][1]["upstream"] = f"http://127.0.0.2:{port}"
    path = write_config(root / "gateway.yaml", config)
    upstream = start_upstream("127.0.0.2", port, root / "upstream.log")
    gateway = start_gateway(path)
    tunnel_end = RawUpstream()
    yield {"config": config, "root": root, "upstream": f"127.0.0.2:{port}", "tunnel_end": tunnel_end}
    tunnel_end.server.close()
    gateway.stop()
    upstream.stop()


def connect(lab, where: str, tunnel_to: str | None = None) -> socket.socket:
    """A client connection to the listener `where` names; for "tunnel", inside an answered CONNECT (to
    `tunnel_to`, by default a server that must receive nothing)."""
    host, port = listener_url(lab["config"], PLACES[where]).removeprefix("http://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=HEAD_TIMEOUT + 5)
    if where == "tunnel":
        target = tunnel_to or f"127.0.0.2:{lab['tunnel_end'].port}"
        sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    return sock


def answer_to(sock: socket.socket, data: bytes, first_write: int = 0) -> tuple[str, str, float]:
    """Send `data` (its first `first_write` bytes alone, then the rest a moment later), read until the
    gateway closes: the answer's head, body and seconds taken."""
    sent = time.monotonic()
    if first_write:
        sock.sendall(data[:first_write])
        time.sleep(0.3)
    sock.sendall(data[first_write:])
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
    head, _, body = answer.decode("latin-1").partition("\r\n\r\n")
    return head, body, time.monotonic() - sent


def errors_counted(lab) -> float:
    return metric_total(lab["config"], "gateway_transfers_total", 'action="error"')


def assert_refused_at_once(lab, where: str, data: bytes, status: int, reason: str, first_write: int = 0) -> None:
    before = errors_counted(lab)
    with connect(lab, where) as sock:
        head, body, seconds = answer_to(sock, data, first_write)
    assert head.startswith(f"HTTP/1.1 {status}"), head
    assert seconds < AT_ONCE, f"answered after {seconds:.1f} s"
    transfer_id = transfer_id_in(head)
    assert json.loads(body)["transfer_id"] == transfer_id
    [record] = trace_records(lab["root"] / "state" / "trace", "--id", transfer_id)
    assert (record["status"], record["decision"], record["error"]) == (status, "error", reason)
    assert errors_counted(lab) - before == 1


@pytest.mark.parametrize("where", ["forward", "reverse", "tunnel"])
@pytest.mark.parametrize("case", FIRST_BYTES)
def test_first_bytes_that_are_no_request_are_refused_at_once(lab, where, case):
    assert_refused_at_once(lab, where, *FIRST_BYTES[case])
    if where == "tunnel":
        assert lab["tunnel_end"].connections == 0 and not lab["tunnel_end"].received


@pytest.mark.parametrize("where", ["forward", "reverse"])
@pytest.mark.parametrize("sent, first_write", [("whole", 0), ("first 6 bytes", 0), ("whole", 1)],
                         ids=["client-hello", "first-record-bytes", "one-byte-first"])
def test_tls_on_a_listeners_own_port_is_refused_at_once(lab, where, sent, first_write):
    """No listener is configured for TLS to the gateway itself: refused, no certificate minted for the
    client's name (the answer is the plain 400, no ServerHello)."""
    hello = client_hello()
    assert_refused_at_once(lab, where, hello if sent == "whole" else hello[:6], 400, TLS_REFUSED, first_write)


@pytest.mark.parametrize("first_write", [1, 2])
def test_tls_in_a_tunnel_whose_first_write_is_short_is_opened(lab, first_write):
    """mitmproxy needs three bytes to tell TLS: one or two sent alone were taken for no HTTP (400)."""
    before = errors_counted(lab)
    hello = client_hello()
    with connect(lab, "tunnel", tunnel_to=lab["upstream"]) as sock:
        sock.sendall(hello[:first_write])
        time.sleep(0.3)
        sock.sendall(hello[first_write:])
        answer = sock.recv(65536)
    assert answer.startswith(b"\x16\x03"), answer[:40]  # the gateway's ServerHello
    assert errors_counted(lab) == before


@pytest.mark.parametrize("where", ["forward", "reverse", "tunnel"])
def test_a_valid_request_sent_byte_by_byte_passes(lab, where):
    target = "/text?body=bytewise"
    if where == "forward":
        target = f"http://{lab['upstream']}{target}"
    request = f"GET {target} HTTP/1.1\r\nHost: {lab['upstream']}\r\nConnection: close\r\n\r\n".encode()
    with connect(lab, where, tunnel_to=lab["upstream"]) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for byte in request:
            sock.sendall(bytes([byte]))
            time.sleep(0.002)
        head, body, _ = answer_to(sock, b"")
    assert head.startswith("HTTP/1.1 200"), head
    assert body == "bytewise"


@pytest.mark.parametrize("where", ["forward", "reverse"])
def test_a_request_behind_empty_lines_in_one_write_passes(lab, where):
    """RFC 9112 lets a client send empty lines before a request line; h11 dropped one per read and left
    the request unread behind it until more bytes came (408 after the timeout)."""
    target = "/text?body=after-empty-lines"
    if where == "forward":
        target = f"http://{lab['upstream']}{target}"
    request = f"\r\n\n\r\nGET {target} HTTP/1.1\r\nHost: {lab['upstream']}\r\nConnection: close\r\n\r\n".encode()
    with connect(lab, where) as sock:
        head, body, seconds = answer_to(sock, request)
    assert head.startswith("HTTP/1.1 200"), head
    assert body == "after-empty-lines" and seconds < AT_ONCE
