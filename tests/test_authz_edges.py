"""Ways round a grant, through the real gateway: a protocol upgrade (records would cross in frames,
never counted, billed, reduced to the granted fields or filtered by consent), a path spelled in
another case (another resource on a case-sensitive upstream), and a method-override header or a
lower-case method (another method than the one the catalogue and the grant were checked for)."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys

import h2.config
import h2.connection
import h2.events
import pytest

from tests.authzkit import Kit
from tests.certs import make_ca_and_server
from tests.gatewayproc import (
    Process,
    free_port,
    gateway_config,
    listener_url,
    metric_total,
    start_gateway,
    start_upstream,
    trace_records,
    write_config,
)

# A WebSocket upstream that accepts the upgrade on any path and sends a dataset's record in a frame.
WS_RECORD_SERVER = """
import asyncio, sys, websockets
async def serve(ws):
    print("upgraded", ws.request.path, flush=True)
    await ws.send('[{"age": 71, "district": "bijiang"}]')
    async for _ in ws:
        pass
async def main():
    async with websockets.serve(serve, "127.0.0.2", int(sys.argv[1])):
        print("ready", flush=True)
        await asyncio.Future()
asyncio.run(main())
"""
WS_KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455's sample nonce


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    root = tmp_path_factory.mktemp("authz-edges")
    kit = Kit(root / "keys")
    port, ws_port, tls_port = free_port("127.0.0.2"), free_port("127.0.0.2"), free_port("127.0.0.2")
    ca, cert, key = make_ca_and_server(root, "127.0.0.2")
    config = gateway_config(root / "state", authz=kit.authz_section(), tls={"upstream_ca": str(ca)})
    path = write_config(root / "gateway.yaml", config)
    upstream = start_upstream("127.0.0.2", port, root / "upstream.log")
    tls_upstream = start_upstream("127.0.0.2", tls_port, root / "tls-upstream.log", tls=(cert, key))
    ws_upstream = Process([sys.executable, "-c", WS_RECORD_SERVER, str(ws_port)]).started("ready")
    gateway = start_gateway(path)
    gateway_ca = root / "gateway-ca.pem"
    subprocess.run([sys.executable, "-m", "gateway", "ca", "export", "-c", str(path), "-o", str(gateway_ca)],
                   check=True, timeout=30)
    yield {"kit": kit, "config": config, "root": root, "upstream": f"127.0.0.2:{port}",
           "ws_upstream": ws_upstream, "ws": f"127.0.0.2:{ws_port}", "tls": f"127.0.0.2:{tls_port}",
           "gateway_ca": gateway_ca}
    gateway.stop()
    for process in (ws_upstream, tls_upstream, upstream):
        process.stop()


def exchange(lab, authority: str, target: str, method: str = "GET", **fields: str) -> tuple[int, dict, bytes]:
    """One request written byte for byte through the forward listener: (status, head fields, what
    followed the head: the body, or after a 101 what the first seconds brought)."""
    host, port = listener_url(lab["config"], "forward").removeprefix("http://").rsplit(":", 1)
    head = "".join(f"{name.replace('_', '-')}: {value}\r\n" for name, value in fields.items())
    with socket.create_connection((host, int(port)), timeout=15) as connection:
        connection.sendall(f"{method} http://{authority}{target} HTTP/1.1\r\nHost: {authority}\r\n{head}\r\n".encode())
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = connection.recv(65536)
            assert chunk, answer
            answer += chunk
        head, _, rest = answer.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        received = {name.lower(): value for name, value in (line.split(": ", 1) for line in lines[1:])}
        status = int(lines[0].split()[1])
        connection.settimeout(3)
        try:
            while (status == 101 and b"district" not in rest) or len(rest) < int(received.get("content-length", 0)):
                if not (chunk := connection.recv(65536)):
                    break
                rest += chunk
        except TimeoutError:
            pass
    return status, received, rest


def refused(lab, answer: tuple[int, dict, bytes], reason: str, status: int = 403) -> dict:
    """The refusal's trace record's `grant`, after checking the answer names `reason`."""
    code, fields, body = answer
    assert code == status, answer
    assert [r["type"] for r in json.loads(body)["reasons"]] == [reason], body
    [record] = trace_records(lab["root"] / "state" / "trace", "--id", fields["x-gateway-transfer-id"])
    return record["grant"]


def upstream_paths(lab) -> list[str]:
    log = lab["root"] / "upstream.log"  # written from the upstream's first request on
    return [json.loads(line)["path"] for line in log.read_text().splitlines()] if log.exists() else []


def upgrade(protocol: str = "websocket", **fields: str) -> dict:
    return {"Connection": "Upgrade", "Upgrade": protocol, "Sec-WebSocket-Key": WS_KEY,
            "Sec-WebSocket-Version": "13", **fields}


def test_an_upgrade_to_a_catalogued_dataset_is_refused_before_it_leaves(lab):
    """Before: each got 101 and a frame holding the record; the trace said records 0, and the grant's
    records quota (2 a day) never filled. Now refused 403 `upgrade_refused`, recorded and counted; a
    WebSocket to a path listed as uncatalogued still works."""
    kit = lab["kit"]
    credentials = {"X-Data-Grant": kit.grant(quota={"records": {"day": 2}}), "X-Data-Licence": kit.licence()}
    before = metric_total(lab["config"], "gateway_grant_decisions_total",
                          'class="conditional",result="upgrade_refused"')
    for protocol in ("websocket", "websocket", "websocket", "h2c", "WebSocket, h2c"):
        grant = refused(lab, exchange(lab, lab["ws"], "/api/residents/1.json", **upgrade(protocol, **credentials)),
                        "upgrade_refused")
        assert grant["dataset"] == "health.residents" and grant["result"] == "upgrade_refused", grant
    # An open dataset's records are no more countable in frames; nor does a grant-less upgrade pass.
    refused(lab, exchange(lab, lab["ws"], "/open/bus-stops/1", **upgrade()), "upgrade_refused")
    refused(lab, exchange(lab, lab["ws"], "/api/residents/2", **upgrade()), "upgrade_refused")
    after = metric_total(lab["config"], "gateway_grant_decisions_total", 'class="conditional",result="upgrade_refused"')
    assert after == before + 6
    status, _, frames = exchange(lab, lab["ws"], "/elsewhere", **upgrade())
    assert status == 101 and b'"district"' in frames, (status, frames)
    assert [line for line in lab["ws_upstream"].lines if line.startswith("upgraded")] == ["upgraded /elsewhere"]


def test_an_http2_extended_connect_never_becomes_a_request(lab):
    """RFC 8441's WebSocket over HTTP/2 (`:protocol`): mitmproxy offers no SETTINGS_ENABLE_CONNECT_PROTOCOL
    and ends the connection on the unknown pseudo-header, so nothing reaches the upstream (a guard: the
    grant stage sees only an `Upgrade` header; a mitmproxy that passed `:protocol` on would fail here)."""
    kit = lab["kit"]
    host, port = listener_url(lab["config"], "forward").removeprefix("http://").rsplit(":", 1)
    raw = socket.create_connection((host, int(port)), timeout=10)
    raw.sendall(f"CONNECT {lab['tls']} HTTP/1.1\r\nHost: {lab['tls']}\r\n\r\n".encode())
    assert raw.recv(65536).startswith(b"HTTP/1.1 200")
    context = ssl.create_default_context(cafile=str(lab["gateway_ca"]))
    context.set_alpn_protocols(["h2"])
    events = []
    with context.wrap_socket(raw, server_hostname="127.0.0.2") as sock:
        assert sock.selected_alpn_protocol() == "h2"
        connection = h2.connection.H2Connection(h2.config.H2Configuration(validate_outbound_headers=False))
        connection.initiate_connection()
        connection.send_headers(1, [(":method", "CONNECT"), (":protocol", "websocket"), (":scheme", "https"),
                                    (":path", "/api/residents/1"), (":authority", lab["tls"]),
                                    ("x-data-grant", kit.grant()), ("x-data-licence", kit.licence())])
        sock.sendall(connection.data_to_send())
        while not any(isinstance(e, (h2.events.ConnectionTerminated, h2.events.StreamReset, h2.events.ResponseReceived))
                      for e in events) and (data := sock.recv(65536)):
            events += connection.receive_data(data)
            sock.sendall(connection.data_to_send())
    assert not [e for e in events if isinstance(e, h2.events.ResponseReceived)], events
    assert any(isinstance(e, (h2.events.ConnectionTerminated, h2.events.StreamReset)) for e in events), events
    assert not (lab["root"] / "tls-upstream.log").exists()


def test_granted_paths_match_in_the_case_written(lab):
    """Before: a grant for /api/residents/1.json reached /API/RESIDENTS/1.json (another file on a
    case-sensitive upstream); the catalogue's own match ignores case, the grant's does not."""
    kit = lab["kit"]
    credentials = {"X-Data-Grant": kit.grant(datasets=[{"id": "health.residents", "methods": ["GET"],
                                                        "paths": ["/api/residents/1.json"]}]),
                   "X-Data-Licence": kit.licence()}
    assert exchange(lab, lab["upstream"], "/api/residents/1.json", **credentials)[0] == 200
    for target in ("/API/RESIDENTS/1.json?fields=age", "/api/Residents/1.json", "/api/residents/1.JSON"):
        assert refused(lab, exchange(lab, lab["upstream"], target, **credentials), "grant_scope")["result"] == \
            "grant_scope"
    assert upstream_paths(lab).count("/api/residents/1.json") == 1
    assert not [path for path in upstream_paths(lab) if path.lower().startswith("/api/residents/1.json")
                and path != "/api/residents/1.json"]


@pytest.mark.parametrize("name,value", [("X-HTTP-Method-Override", "DELETE"), ("X-Method-Override", "PUT"),
                                        ("X-HTTP-Method", "PATCH"), ("x-http-method-override", "DELETE"),
                                        ("X-HTTP-METHOD", "get")])
def test_a_method_override_header_is_refused(lab, name, value):
    """Before: a GET-only grant with these headers got 200, and each header reached the upstream (which
    a framework may obey in place of GET). Now 403 `method_override`, nothing forwarded."""
    kit = lab["kit"]
    target = f"/api/residents/{free_port()}"
    credentials = {"X-Data-Grant": kit.grant(), "X-Data-Licence": kit.licence()}
    refused(lab, exchange(lab, lab["upstream"], target, **{name: value}, **credentials), "method_override")
    refused(lab, exchange(lab, lab["upstream"], "/open/bus-stops/3", **{name: value}), "method_override")
    assert target not in upstream_paths(lab)
    # The request's own method named again changes nothing: it passes.
    assert exchange(lab, lab["upstream"], target, **{name: "GET"}, **credentials)[0] == 200


def test_a_method_override_query_parameter_is_refused(lab):
    """`?_method=` is read as the method by Symfony, Laravel and Express's method-override."""
    kit = lab["kit"]
    credentials = {"X-Data-Grant": kit.grant(), "X-Data-Licence": kit.licence()}
    for query in ("_method=DELETE", "a=1&_method=PUT", "_method=GET&_method=PATCH"):
        refused(lab, exchange(lab, lab["upstream"], f"/api/residents/88?{query}", **credentials), "method_override")
    assert not [path for path in upstream_paths(lab) if path.startswith("/api/residents/88")]
    assert exchange(lab, lab["upstream"], "/api/residents/88?_method=GET", **credentials)[0] == 200


def test_a_lower_case_method_is_another_method(lab):
    """Methods are case-sensitive tokens (RFC 9110 9.1): `get` was matched as GET and forwarded as `get`;
    now it is a method the catalogue does not list (grant_scope), whatever the grant."""
    kit = lab["kit"]
    credentials = {"X-Data-Grant": kit.grant(), "X-Data-Licence": kit.licence()}
    for method in ("get", "Get"):
        refused(lab, exchange(lab, lab["upstream"], "/api/residents/77", method, **credentials), "grant_scope")
    refused(lab, exchange(lab, lab["upstream"], "/open/bus-stops/77", "get"), "grant_scope")
    assert "/api/residents/77" not in upstream_paths(lab) and "/open/bus-stops/77" not in upstream_paths(lab)
    assert exchange(lab, lab["upstream"], "/api/residents/77", **credentials)[0] == 200
