"""`gateway drain`: take one machine out of a balanced boundary, gracefully.

Built on the gateway's own graceful stop: the process serving the management listener (the supervisor,
or the single process) gets SIGTERM, the signal systemd's `stop` sends. From then on /readyz answers
503 ("stopping"), so the balancers' health checks hand new connections to the other machines; the
gateway finishes what it holds and exits (how long it waits for transfers in flight is the graceful
stop's business, issue 19). `drain` waits for the exit and says how long it took.
"""

from __future__ import annotations

import signal
import time

import psutil

from gateway.config.load import Config, format_host_port


def management_pid(config: Config) -> int | None:
    """The process listening on the configuration's management address (in this network namespace)."""
    wanted = (config.management_host, config.management_port)
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.pid and (conn.laddr.ip, conn.laddr.port) == wanted:
            return conn.pid
    return None


def drain(config: Config, timeout: float) -> tuple[bool, str]:
    """(stopped within timeout, what happened)."""
    address = format_host_port(config.management_host, config.management_port)
    pid = management_pid(config)
    if pid is None:
        return False, f"no gateway listens on {address} (the configuration's management address) here"
    process = psutil.Process(pid)
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    while _running(process):
        if time.monotonic() - started > timeout:
            return False, f"gateway pid {pid} still running {timeout:g} s after SIGTERM"
        time.sleep(0.1)
    return True, f"gateway pid {pid} drained and stopped in {time.monotonic() - started:.1f} s"


def _running(process: psutil.Process) -> bool:
    """Still running: an exited process its parent has not reaped yet (a zombie) has stopped."""
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
