"""Open client connections are limited per client address and per worker, so neither one client nor a
flood of them can run the gateway out of file descriptors (gateway.connlimit).

Real gateway, real sockets: refused connections get a 503 and are closed at once; admitted ones work.
"""

from __future__ import annotations

import contextlib
import math
import socket
import subprocess
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.gatewayproc import (
    free_port, gateway_config, listener_url, metric_total, start_gateway, start_upstream, write_config,
)

CLIENT_LIMIT = 4
FILE_LIMIT = 420  # capacity per worker: (420 - 256) // 2 = 82 client connections


def start_lab(root, *, gateway: dict | None = None, prefix: list[str] = ()):
    port = free_port("127.0.0.2")
    config = gateway_config(root / "state")
    config["gateway"].update(gateway or {})
    config["listeners"][1]["upstream"] = f"http://127.0.0.2:{port}"
    upstream = start_upstream("127.0.0.2", port, root / "upstream.log")
    process = start_gateway(write_config(root / "gateway.yaml", config), prefix)
    return config, f"http://127.0.0.2:{port}", process, upstream


@contextlib.contextmanager
def connections(config: dict, count: int) -> Iterator[list[socket.socket]]:
    """`count` connections to the forward listener, closed at the end (and the gateway given time to see it)."""
    host, port = config["listeners"][0]["listen"].rsplit(":", 1)
    sockets = []
    try:
        for _ in range(count):
            sockets.append(socket.create_connection((host, int(port)), timeout=5))
        yield sockets
    finally:
        for sock in sockets:
            sock.close()
        time.sleep(0.5)


def proxied_status(config: dict, url: str) -> int:
    with httpx.Client(proxy=listener_url(config, "forward"), timeout=10) as client:
        return client.get(url).status_code


def refused(sockets: list[socket.socket], settle: float = 10.0) -> list[socket.socket]:
    """The connections the gateway answered 503 and closed, once that number has stopped growing."""
    deadline = time.monotonic() + settle
    answered: dict[socket.socket, bytes] = {}
    last_change = time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - last_change < 1.0:
        for sock in sockets:
            if sock in answered:
                continue
            sock.setblocking(False)
            try:
                data = sock.recv(4096)
            except BlockingIOError:
                continue
            answered[sock] = data
            last_change = time.monotonic()
        time.sleep(0.05)
    for data in answered.values():
        assert data.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), data
    return list(answered)


def get_through(sock: socket.socket, url: str) -> bytes:
    """A GET sent as a forward-proxy request on an open connection: the answer's status line."""
    sock.setblocking(True)
    sock.sendall(f"GET {url} HTTP/1.1\r\nHost: {url.split('/')[2]}\r\n\r\n".encode())
    return sock.recv(4096).split(b"\r\n", 1)[0]


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    config, upstream_url, gateway, upstream = start_lab(
        tmp_path_factory.mktemp("connlimit"), gateway={"max_client_connections": CLIENT_LIMIT})
    yield config, upstream_url
    gateway.stop()
    upstream.stop()


def test_one_client_holds_at_most_its_limit_and_others_are_unaffected(limited):
    config, upstream_url = limited
    with connections(config, 3 * CLIENT_LIMIT) as sockets:
        closed = refused(sockets)
        admitted = [sock for sock in sockets if sock not in closed]
        # Each worker admits its share of the limit (one client's connections spread over the workers).
        share = math.ceil(CLIENT_LIMIT / config["gateway"]["workers"])
        assert share <= len(admitted) <= CLIENT_LIMIT
        assert metric_total(config, "gateway_connections_refused_total", 'reason="client_limit"') == len(closed)
        # Admitted connections work; another client address is not limited by this one's connections.
        assert get_through(admitted[0], f"{upstream_url}/text?body=ok") == b"HTTP/1.1 200 OK"
        other = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--interface", "127.0.0.3",
                                "-x", listener_url(config, "forward"), f"{upstream_url}/"],
                               capture_output=True, text=True, timeout=20)
        assert other.stdout == "403", other.stderr  # the policy's answer (internet to internet), not a 503
    assert proxied_status(config, f"{upstream_url}/text?body=again") == 200


def test_a_flood_of_connections_is_refused_before_descriptors_run_out(tmp_path):
    config, upstream_url, gateway, upstream = start_lab(tmp_path, prefix=["prlimit", f"--nofile={FILE_LIMIT}", "--"])
    try:
        capacity = (FILE_LIMIT - 256) // 2
        gateway.wait_for(f"each worker admits {capacity} ")
        flood = FILE_LIMIT + 100  # more than the worker could ever hold
        with connections(config, flood) as sockets:
            closed = refused(sockets)
            assert flood - capacity * config["gateway"]["workers"] <= len(closed) < flood
            assert metric_total(config, "gateway_connections_refused_total", 'reason="capacity"') == len(closed)
            admitted = next(sock for sock in sockets if sock not in closed)
            assert get_through(admitted, f"{upstream_url}/text?body=held") == b"HTTP/1.1 200 OK"
        # Nothing failed: the trace log still takes records, and the gateway never ran out of descriptors.
        assert proxied_status(config, f"{upstream_url}/text?body=after") == 200
        assert httpx.get(f"http://{config['management']['listen']}/readyz", timeout=10).status_code == 200
        assert "Too many open files" not in gateway.output
    finally:
        gateway.stop()
        upstream.stop()
