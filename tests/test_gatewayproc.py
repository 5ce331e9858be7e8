"""The test harness itself: a server that failed to start must never pass for a started one."""

import socket
import sys

import pytest

from tests.gatewayproc import UPSTREAM_SERVER, Process, free_port


def test_a_server_whose_port_is_taken_is_not_taken_for_ready(tmp_path):
    # Its traceback says "Address already in use", which contains "ready": that must not count.
    with socket.create_server(("127.0.0.2", 0)) as busy:
        process = Process([sys.executable, str(UPSTREAM_SERVER), "--bind", "127.0.0.2",
                           "--port", str(busy.getsockname()[1]), "--log", str(tmp_path / "log")])
        with pytest.raises(AssertionError, match="'ready' not seen"):
            process.started("ready", timeout=10)
    assert any("already in use" in line for line in process.lines)


def test_free_port_never_hands_out_a_port_twice():
    ports = [free_port("127.0.0.2") for _ in range(300)]
    assert len(set(ports)) == len(ports)
