"""The systemd notify protocol as gateway.service (Type=notify, WatchdogSec, ExecReload=SIGHUP) uses it,
checked against a real notify socket: with one process, and with the supervisor and two workers."""

from __future__ import annotations

import signal
import socket
import sys
import time

import pytest

from tests.gatewayproc import Process, gateway_config, listener_url, write_config


def receive_until(sock: socket.socket, wanted: str, timeout: float = 30.0) -> list[str]:
    """Every notify message up to and including one that contains `wanted`."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            message = sock.recv(4096).decode()
        except TimeoutError:
            break
        seen.append(message)
        if wanted in message.split("\n"):
            return seen
    raise AssertionError(f"{wanted} never sent; got {seen}")


@pytest.mark.parametrize("workers", [1, 2])
def test_ready_watchdog_reload_and_stopping(tmp_path, workers):
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    config = gateway_config(tmp_path / "state", workers=workers)
    path = write_config(tmp_path / "gateway.yaml", config)
    gateway = Process([sys.executable, "-m", "gateway", "run", "-c", str(path)],
                      env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "1000000"})
    try:
        receive_until(notify, "READY=1")
        host, port = listener_url(config, "forward").removeprefix("http://").rsplit(":", 1)
        socket.create_connection((host, int(port)), timeout=2).close()  # ready means listening
        receive_until(notify, "WATCHDOG=1", timeout=5)
        gateway.signal(signal.SIGHUP)
        after_reload = receive_until(notify, "READY=1")
        assert any("RELOADING=1" in m.split("\n") for m in after_reload), after_reload
        gateway.signal(signal.SIGTERM)
        receive_until(notify, "STOPPING=1")
        assert gateway.proc.wait(30) == 0
    finally:
        gateway.stop()
        notify.close()


def test_a_notification_with_nobody_listening_is_dropped(tmp_path, monkeypatch):
    """A worker whose supervisor was killed outright still stops cleanly: its STOPPING=1 has nowhere to go."""
    from gateway.ops.sdnotify import sd_notify

    gone = tmp_path / "gone.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(gone))
    monkeypatch.setenv("NOTIFY_SOCKET", str(gone))  # bound once, nobody reads it now
    sd_notify("STOPPING=1")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "never.sock"))
    sd_notify("STOPPING=1")
