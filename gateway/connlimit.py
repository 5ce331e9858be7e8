"""Limits on open client connections, so that no client, and no flood of clients, runs a worker out of
file descriptors.

A worker that hits its descriptor limit can no longer accept anyone, connect upstream, spool a body or
write the trace log's files (which stops forwarding: the log fails closed). So each worker refuses a new
client connection, closing it at once, when

- its client address already holds its share of `gateway.max_client_connections` in this worker (the
  limit divided by the number of workers, rounded up: the kernel spreads one client's connections
  evenly over the workers sharing a listener, so the machine admits about the limit), or
- the worker holds `capacity()` client connections: half of the descriptors left after FD_RESERVE,
  since each client connection may need one upstream connection too.

A refused connection gets a 503 answer (whatever the client sends is not read) and is counted by
listener and reason; no request was read, so there is no transfer to record. Connections already
admitted are never cut.
"""

from __future__ import annotations

import logging
import math
import resource
import time
from collections import Counter
from typing import Protocol

from mitmproxy import connection, ctx
from mitmproxy.addons.proxyserver import Proxyserver

from gateway.metrics import GatewayMetrics
from gateway.runtime import Runtime
from gateway.zones import host_ip

log = logging.getLogger(__name__)

REFUSAL = (b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nRetry-After: 1\r\n"
           b"Content-Type: text/plain\r\nContent-Length: 29\r\n\r\ntoo many connections, retry\r\n")
FD_RESERVE = 256  # descriptors kept for everything but client and upstream connections
WARN_INTERVAL = 10.0  # seconds between log lines about refusals of one reason


def raise_open_file_limit() -> int:
    """Raise this process's soft descriptor limit to its hard limit (children inherit it); the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass  # e.g. an infinite hard limit the kernel does not take: keep the soft one
    return soft


def capacity(open_file_limit: int) -> int:
    return max(1, (open_file_limit - FD_RESERVE) // 2)


class LimitGateway(Protocol):
    runtime: Runtime
    metrics: GatewayMetrics


class ClientConnectionLimit:
    def __init__(self, gateway: LimitGateway, workers: int):
        self.gateway = gateway
        self.workers = workers
        open_file_limit = raise_open_file_limit()
        self.capacity = capacity(open_file_limit)
        log.info("client connections: each worker admits %d (its file descriptor limit is %d)",
                 self.capacity, open_file_limit)
        self._admitted: dict[str, str] = {}  # client connection id -> its client address
        self._per_client: Counter[str] = Counter()
        self._warned_at: dict[str, float] = {}
        self._unreported: Counter[str] = Counter()  # refusals since the last log line, by reason

    def client_connected(self, client: connection.Client) -> None:
        address = client_address(client)
        share = math.ceil(self.gateway.runtime.config.max_client_connections / self.workers)
        if len(self._admitted) >= self.capacity:
            self._refuse(client, address, "capacity", f"this worker holds {self.capacity} client connections, "
                                                      f"all its file descriptors allow")
        elif self._per_client[address] >= share:
            self._refuse(client, address, "client_limit", f"it holds {share} connections in this worker "
                                                          f"(gateway.max_client_connections over {self.workers} worker(s))")
        else:
            self._admitted[client.id] = address
            self._per_client[address] += 1

    def client_disconnected(self, client: connection.Client) -> None:
        address = self._admitted.pop(client.id, None)
        if address is not None:
            self._per_client[address] -= 1
            if not self._per_client[address]:
                del self._per_client[address]

    def _refuse(self, client: connection.Client, address: str, reason: str, why: str) -> None:
        proxyserver: Proxyserver | None = ctx.master.addons.get("proxyserver")
        handler = proxyserver.connections.get(client.id) if proxyserver else None
        if handler is not None and (writer := handler.transports[client].writer) is not None:
            writer.write(REFUSAL)  # sent before the close; a client speaking TLS just sees the close
        client.error = f"connection refused: {why}"  # mitmproxy closes it before reading anything
        listener = self.gateway.runtime.listener_name(*client.sockname[:2])
        self.gateway.metrics.connections_refused.labels(listener=listener, reason=reason).inc()
        self._unreported[reason] += 1
        now = time.monotonic()
        if now - self._warned_at.get(reason, -WARN_INTERVAL) >= WARN_INTERVAL:
            log.warning("refused %d connection(s) on listener %s (%s), the last from %s: %s",
                        self._unreported.pop(reason), listener, reason, address, why)
            self._warned_at[reason] = now


def client_address(client: connection.Client) -> str:
    host = client.peername[0]
    return str(host_ip(host) or host)
