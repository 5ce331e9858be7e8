"""An upstream's interim responses and HTTP/1 request trailers (issue 20, round two).

- `103 Early Hints` (or an unasked `100 Continue`) before an HTTP/1 upstream's final response: mitmproxy
  took the 103 for the final answer (the client got `103` and nothing else). It is dropped; the final
  response is inspected and answered as any other.
- HTTP/1 request trailers, which mitmproxy cannot pass on: the connection was closed with no answer.
  They are refused 400 with the transfer id and recorded, whatever they hold; nothing is forwarded.
- HTTP/2 response trailers (gRPC's status): inspected with the response profile like a head; clean,
  passed on; holding an ID number, the response is refused 403 (mitmproxy speaks to the upstream
  the client's protocol, so an HTTP/2 upstream's trailers meet an HTTP/2 client).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time

import h2.events

import pytest

from tests.badupstream import BadUpstream
from tests.certs import make_ca_and_server
from tests.gatewayproc import (
    free_port,
    gateway_config,
    listener_url,
    start_gateway,
    start_upstream,
    trace_records,
    write_config,
)
from tests.test_proxy_loopback import raw_exchange
from tests.test_proxy_tls import h2_tunnel

ID_NUMBER = "11010519491231002X"
CLEAN = "办事指南：请携带身份证原件到窗口办理。".encode()


class InterimUpstream:
    """Answers every request with `interim` heads, then 200 with `body` (read from the path's case)."""

    def __init__(self, interim: bytes):
        self.server = socket.create_server(("127.0.0.2", 0))
        self.port = self.server.getsockname()[1]
        self.interim = interim
        self.requests = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            with connection:
                head = connection.recv(65536)
                self.requests += 1
                body = f"申请人身份证号 {ID_NUMBER}".encode() if b"case=id" in head else CLEAN
                connection.sendall(self.interim + b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\n"
                                   b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))

    def close(self) -> None:
        self.server.close()


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    root = tmp_path_factory.mktemp("interim")
    port = free_port("127.0.0.2")
    ca, cert, key = make_ca_and_server(root, "127.0.0.2")
    config = gateway_config(root / "state", workers=1, tls={"upstream_ca": str(ca)})
    config["policy"]["rules"][0]["response_profile"] = "outbound"  # an ID number arriving is blocked too
    config["gateway"]["body_idle_timeout"] = "2s"
    config["gateway"]["body_timeout"] = "4s"
    http2 = BadUpstream("127.0.0.2", tls=(cert, key), http2=True)
    path = write_config(root / "gateway.yaml", config)
    upstream = start_upstream("127.0.0.2", port, root / "upstream.log")
    gateway = start_gateway(path)
    gateway_ca = root / "gateway-ca.pem"
    subprocess.run([sys.executable, "-m", "gateway", "ca", "export", "-c", str(path), "-o", str(gateway_ca)],
                   check=True, timeout=30)
    yield {"root": root, "config": config, "proxy": listener_url(config, "forward"), "gateway_ca": gateway_ca,
           "upstream": f"127.0.0.2:{port}", "gateway": gateway, "http2": http2}
    gateway.stop()
    upstream.stop()
    http2.close()


def curl_i(lab, url: str) -> tuple[list[str], bytes]:
    """`curl -i` through the gateway: the status lines it printed (interim ones too) and the final body."""
    result = subprocess.run(["curl", "-sS", "-i", "--max-time", "20", "-x", lab["proxy"], url],
                            capture_output=True, timeout=30)
    assert result.returncode == 0, result.stderr
    heads = result.stdout.split(b"\r\n\r\n")
    statuses = [head.split(b"\r\n", 1)[0].decode() for head in heads[:-1]]
    return statuses, heads[-1]


def record_of(lab, head: bytes) -> dict:
    transfer_id = next(line.split(b": ", 1)[1].decode() for line in head.split(b"\r\n")
                       if line.lower().startswith(b"x-gateway-transfer-id:"))
    return trace_records(lab["root"] / "state" / "trace", "--id", transfer_id)[0]


@pytest.mark.parametrize("interim", [b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n",
                                     b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\n\r\n"],
                         ids=["103", "100-then-103"])
def test_interim_responses_are_dropped_and_the_final_one_answered(lab, interim):
    upstream = InterimUpstream(interim)
    try:
        statuses, body = curl_i(lab, f"http://127.0.0.2:{upstream.port}/page?case=clean")
        assert statuses == ["HTTP/1.1 200 OK"] and body == CLEAN
        statuses, body = curl_i(lab, f"http://127.0.0.2:{upstream.port}/page?case=id")
        assert statuses == ["HTTP/1.1 403 Forbidden"], statuses
        refusal = json.loads(body)
        assert refusal["reasons"][0]["rule"] == "id-card" and ID_NUMBER.encode() not in body
    finally:
        upstream.close()


@pytest.mark.parametrize("trailer", ["X-Checksum: 5d41402a", f"X-Applicant: {ID_NUMBER}"], ids=["clean", "id"])
def test_http1_request_trailers_are_refused_400_and_recorded(lab, trailer):
    marker = f"trailers-{free_port()}"
    head, _ = raw_exchange(lab, f"POST http://{lab['upstream']}/echo?case={marker} HTTP/1.1\r\n"
                                f"Host: {lab['upstream']}\r\nTransfer-Encoding: chunked\r\nTrailer: X-Data\r\n\r\n"
                                f"5\r\nhello\r\n0\r\n{trailer}\r\n\r\n".encode())
    assert head.startswith("HTTP/1.1 400"), head
    record = record_of(lab, head.encode())
    assert record["status"] == 400 and record["decision"] == "error" and "trailers" in record["error"]
    assert ID_NUMBER not in json.dumps(record)
    log = lab["root"] / "upstream.log"
    assert not log.exists() or marker not in log.read_text()


def h2_get(lab, path: str) -> tuple[int, bytes, dict[str, str]]:
    """An HTTP/2 GET to the HTTP/2 upstream through a CONNECT tunnel: status, body, trailer fields."""
    status, body, trailers = None, b"", {}
    with h2_tunnel({**lab, "upstream": f"https://127.0.0.2:{lab['http2'].port}"}) as (sock, connection, target):
        connection.send_headers(1, [(":method", "GET"), (":path", path), (":scheme", "https"),
                                    (":authority", target), ("te", "trailers")], end_stream=True)
        sock.sendall(connection.data_to_send())
        while data := sock.recv(65536):
            for event in connection.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    status = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.DataReceived):
                    body += event.data
                    connection.acknowledge_received_data(event.flow_controlled_length, 1)
                elif isinstance(event, h2.events.TrailersReceived):
                    trailers = {name.decode(): value.decode() for name, value in event.headers}
                if isinstance(event, h2.events.StreamEnded):
                    return status, body, trailers
            sock.sendall(connection.data_to_send())
    return status, body, trailers


def test_http2_response_trailers_pass_when_clean(lab):
    status, body, trailers = h2_get(lab, "/h2-trailers?message=done")
    assert (status, body) == (200, b"trailers follow")
    assert trailers == {"grpc-status": "0", "grpc-message": "done"}


def test_http2_response_trailers_holding_an_id_number_refuse_the_response(lab):
    status, body, trailers = h2_get(lab, "/h2-trailers?message=id-number")
    assert status == 403 and ID_NUMBER.encode() not in body and not trailers
    assert json.loads(body)["reasons"][0]["locations"] == ["trailer:grpc-message"]


def test_a_stalled_http2_upload_is_answered_408(lab):
    """The body timeout of tests/test_body_memory.py, on an HTTP/2 stream."""
    with h2_tunnel({**lab, "upstream": f"https://127.0.0.2:{lab['http2'].port}"}) as (sock, connection, target):
        connection.send_headers(1, [(":method", "POST"), (":path", "/stalled"), (":scheme", "https"),
                                    (":authority", target), ("content-length", "100000")])
        connection.send_data(1, b"x" * 1000)
        sock.sendall(connection.data_to_send())
        started = time.monotonic()
        status = headers = None
        while status is None and (data := sock.recv(65536)):
            for event in connection.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    headers = {name.decode(): value.decode() for name, value in event.headers}
                    status = int(headers[":status"])
            sock.sendall(connection.data_to_send())
        assert status == 408 and 1.5 < time.monotonic() - started < 10
    record = trace_records(lab["root"] / "state" / "trace", "--id", headers["x-gateway-transfer-id"])[0]
    assert record["status"] == 408 and record["rules"][0]["rule"] == "timeout"
    assert "/stalled" not in lab["http2"].requests


def test_a_body_trickling_past_the_body_timeout_is_answered_408(lab):
    """A byte every half second is never idle for 2 s; the whole body must still come within 4 s."""
    host, port = lab["proxy"].removeprefix("http://").rsplit(":", 1)
    marker = f"trickle-{free_port()}"
    with socket.create_connection((host, int(port)), timeout=15) as sock:
        sock.sendall(f"POST http://{lab['upstream']}/echo?case={marker} HTTP/1.1\r\nHost: {lab['upstream']}\r\n"
                     "Content-Length: 100\r\n\r\n".encode())
        started = time.monotonic()
        sock.settimeout(0.5)
        answer = b""
        while not answer and time.monotonic() - started < 12:
            try:
                sock.sendall(b"x")
                answer = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
        waited = time.monotonic() - started
    head = answer.decode()
    assert head.startswith("HTTP/1.1 408") and 3.5 < waited < 8, (head, waited)
    record = record_of(lab, answer.split(b"\r\n\r\n")[0])
    assert record["status"] == 408 and "not received within 4 s" in record["error"]
    assert [(r["rule"], r["type"]) for r in record["rules"]] == [("timeout", "body-deadline")]
