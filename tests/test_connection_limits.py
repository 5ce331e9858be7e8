"""Open client connections are limited per client address and per worker, so neither one client nor a
flood of them can run the gateway out of file descriptors (gateway.proxy.connlimit).

Real gateway, real sockets: refused connections get a 503 and are closed at once; admitted ones work.
"""

from __future__ import annotations

import contextlib
import json
import math
import resource
import socket
import subprocess
import time
from collections.abc import Iterator

import httpx
import pytest
from mitmproxy import connection

from gateway.proxy.connlimit import client_key, descriptor_budget
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

CLIENT_LIMIT = 4
FILE_LIMIT = 420  # capacity per worker: (420 - 256) // 2 = 82 client connections


def start_lab(root, *, gateway: dict | None = None, workers: int | None = None, prefix: list[str] = ()):
    port = free_port("127.0.0.2")
    config = gateway_config(root / "state", workers)
    config["gateway"].update(gateway or {})
    config["listeners"][1]["upstream"] = f"http://127.0.0.2:{port}"
    upstream = start_upstream("127.0.0.2", port, root / "upstream.log")
    process = start_gateway(write_config(root / "gateway.yaml", config), prefix)
    return config, f"http://127.0.0.2:{port}", process, upstream


@contextlib.contextmanager
def connections(config: dict, count: int) -> Iterator[list[socket.socket]]:
    """`count` connections to the forward listener, closed at the end."""
    host, port = config["listeners"][0]["listen"].rsplit(":", 1)
    sockets = []
    try:
        for _ in range(count):
            sockets.append(socket.create_connection((host, int(port)), timeout=5))
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


def proxied_status(config: dict, url: str) -> int:
    with httpx.Client(proxy=listener_url(config, "forward"), timeout=10) as client:
        return client.get(url).status_code


def refused(config: dict, sockets: list[socket.socket], reason: str, before: float = 0) -> list[socket.socket]:
    """The connections the gateway answered 503 and closed: read until as many have been answered as the
    gateway counted refused (`before` the ones it had counted already) and that count holds still."""
    answered: list[socket.socket] = []
    deadline, steady_since, last = time.monotonic() + 20, time.monotonic(), None
    while time.monotonic() < deadline:
        for sock in sockets:
            if sock in answered:
                continue
            sock.setblocking(False)
            try:
                data = sock.recv(4096)
            except BlockingIOError:
                continue
            assert data.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), data
            answered.append(sock)
        counted = metric_total(config, "gateway_connections_refused_total", f'reason="{reason}"') - before
        if (counted, len(answered)) != last:
            last, steady_since = (counted, len(answered)), time.monotonic()
        elif counted == len(answered) and time.monotonic() - steady_since > 0.5:
            return answered
        time.sleep(0.05)
    raise AssertionError(f"refused {last[0]} connections, {last[1]} answered 503")


def eventually_ok(config: dict, url: str, within: float = 10.0) -> None:
    """A request that succeeds once the gateway has seen the test's connections close."""
    deadline = time.monotonic() + within
    while (status := proxied_status(config, url)) != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert status == 200


def get_through(sock: socket.socket, url: str, whole: bool = False) -> bytes:
    """A GET sent as a forward-proxy request on an open connection: the answer's status line (or the
    `whole` answer, head and body)."""
    sock.settimeout(10)
    sock.sendall(f"GET {url} HTTP/1.1\r\nHost: {url.split('/')[2]}\r\n\r\n".encode())
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += sock.recv(65536)
    head = answer.split(b"\r\n\r\n", 1)[0]
    length = next((int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
                   if line.startswith(b"content-length:")), 0)
    while len(answer) < len(head) + 4 + length:
        answer += sock.recv(65536)
    return answer if whole else head.split(b"\r\n", 1)[0]


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
        closed = refused(config, sockets, "client_limit")
        admitted = [sock for sock in sockets if sock not in closed]
        # Each worker admits its share of the limit (one client's connections spread over the workers).
        share = math.ceil(CLIENT_LIMIT / config["gateway"]["workers"])
        assert share <= len(admitted) <= CLIENT_LIMIT
        # Admitted connections work; another client address is not limited by this one's connections.
        assert get_through(admitted[0], f"{upstream_url}/text?body=ok") == b"HTTP/1.1 200 OK"
        other = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--interface", "127.0.0.3",
                                "-x", listener_url(config, "forward"), f"{upstream_url}/"],
                               capture_output=True, text=True, timeout=20)
        assert other.stdout == "403", other.stderr  # the policy's answer (internet to internet), not a 503
    eventually_ok(config, f"{upstream_url}/text?body=again")


def test_a_flood_of_connections_is_refused_before_descriptors_run_out(tmp_path):
    # A soft limit below the hard one: the gateway raises it, and its capacity follows the hard one.
    config, upstream_url, gateway, upstream = start_lab(
        tmp_path, prefix=["prlimit", f"--nofile={FILE_LIMIT - 120}:{FILE_LIMIT}", "--"])
    try:
        capacity = (FILE_LIMIT - 256) // 2
        gateway.wait_for(f"each worker admits {capacity} client connections and {2 * capacity} in all")
        flood = FILE_LIMIT + 100  # more than the worker could ever hold
        with connections(config, flood) as sockets:
            closed = refused(config, sockets, "capacity")
            assert flood - capacity * config["gateway"]["workers"] <= len(closed) < flood
            admitted = next(sock for sock in sockets if sock not in closed)
            assert get_through(admitted, f"{upstream_url}/text?body=held") == b"HTTP/1.1 200 OK"
        # Nothing failed: the trace log still takes records, and the gateway never ran out of descriptors.
        eventually_ok(config, f"{upstream_url}/text?body=after")
        assert httpx.get(f"http://{config['management']['listen']}/readyz", timeout=10).status_code == 200
        assert "Too many open files" not in gateway.output
    finally:
        gateway.stop()
        upstream.stop()


def test_upstream_connections_stay_within_the_descriptor_budget(tmp_path):
    """Each admitted client connection holding an upstream connection spends the whole budget; a request
    needing one more upstream connection then fails 502, recorded and counted, and the worker lives on."""
    second_port = free_port("127.0.0.2")
    second = start_upstream("127.0.0.2", second_port, tmp_path / "second.log")
    config, upstream_url, gateway, upstream = start_lab(
        tmp_path, workers=1, prefix=["prlimit", f"--nofile={FILE_LIMIT}", "--"])
    capacity = (FILE_LIMIT - 256) // 2
    try:
        with connections(config, capacity) as sockets:
            for sock in sockets:  # each now holds an upstream connection (mitmproxy keeps it open)
                assert get_through(sock, f"{upstream_url}/text?body=hold") == b"HTTP/1.1 200 OK"
            answer = get_through(sockets[0], f"http://127.0.0.2:{second_port}/text?body=one-more", whole=True)
            assert answer.startswith(b"HTTP/1.1 502 ")
            transfer_id = json.loads(answer.split(b"\r\n\r\n", 1)[1])["transfer_id"]
            [record] = trace_records(tmp_path / "state" / "trace", "--id", transfer_id)
            assert record["status"] == 502 and record["error"].startswith("Connection killed: connection limit")
            assert metric_total(config, "gateway_upstream_errors_total", 'kind="limit"') == 1
        eventually_ok(config, f"http://127.0.0.2:{second_port}/text?body=after")
    finally:
        gateway.stop()
        upstream.stop()
        second.stop()


def test_connections_count_by_client_address():
    def key(host: str) -> str:
        return client_key(connection.Client(peername=(host, 40000), sockname=("127.0.0.1", 8080), timestamp_start=0))
    assert key("10.1.2.3") == key("::ffff:10.1.2.3") == "10.1.2.3"  # one host however it reached us
    assert key("2001:db8:1:2:aaaa::1") == key("2001:db8:1:2:bbbb::2") == "2001:db8:1:2::/64"
    assert key("2001:db8:1:3::1") != key("2001:db8:1:2::1")
    assert key("fe80::1%eth0") == "fe80::/64"
    assert descriptor_budget(1024) == 768 and descriptor_budget(resource.RLIM_INFINITY) > 100_000
