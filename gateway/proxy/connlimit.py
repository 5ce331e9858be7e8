"""Limits on open connections, so that no client, and no flood of clients, runs a worker out of file
descriptors.

A worker that hits its descriptor limit can no longer accept anyone, connect upstream, spool a body or
write the trace log's files. So each worker keeps a budget: its descriptor limit (raised from the soft to
the hard limit at start) less FD_RESERVE for everything else. It refuses

- a new client connection when its client holds its share of `gateway.max_client_connections` in this
  worker (the limit divided by the number of workers, rounded up: the kernel spreads one client's
  connections evenly over the workers sharing a listener, so the machine admits about the limit; an IPv6
  client is counted by its /64, which one host can fill with addresses), or when the worker holds half
  its budget in client connections, leaving the other half for their upstream connections;
- a new upstream connection when the budget is spent, or when the client connection it serves already
  holds UPSTREAMS_PER_CONNECTION of them (mitmproxy keeps up to five open per upstream address a
  connection has used, so one forward-proxy connection could otherwise open any number).

A refused client connection gets a 503 (best effort: it is closed at once, unread, and a client that has
already sent its request may see a reset instead) and is counted by listener and reason; no request was
read, so there is no transfer to record. A refused upstream connection fails its request like an
unreachable upstream (502, recorded). Connections already open are never cut.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import resource
import time
from collections import Counter
from typing import Protocol

from mitmproxy import connection
from mitmproxy.proxy import server_hooks

from gateway.config.runtime import Runtime
from gateway.config.zones import host_ip
from gateway.ops.metrics import GatewayMetrics
from gateway.transfer.edge import LIMIT_ERROR, connection_handler

log = logging.getLogger(__name__)

REFUSAL = (b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nRetry-After: 1\r\n"
           b"Content-Type: text/plain\r\nContent-Length: 29\r\n\r\ntoo many connections, retry\r\n")
FD_RESERVE = 256  # descriptors kept for everything but client and upstream connections
UNLIMITED_BUDGET = 1 << 20  # where the descriptor limit is infinite
UPSTREAMS_PER_CONNECTION = 64
SMALL_BUDGET = 128  # below this a worker can hardly serve: said at start
WARN_INTERVAL = 10.0  # seconds between log lines about refusals of one reason


def raise_open_file_limit() -> int:
    """Raise this process's soft descriptor limit to its hard limit; the soft limit then in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass  # e.g. an infinite hard limit the kernel does not take: keep the soft one
    return soft


def descriptor_budget(open_file_limit: int) -> int:
    """Descriptors a worker may spend on client and upstream connections."""
    if open_file_limit == resource.RLIM_INFINITY:
        return UNLIMITED_BUDGET
    return max(2, open_file_limit - FD_RESERVE)


def client_key(client: connection.Client) -> str:
    """Whose share a connection counts against: its IPv4 address (an IPv4-mapped IPv6 address as IPv4),
    or the /64 of its IPv6 address."""
    host = client.peername[0]
    ip = host_ip(host)
    if ip is None:
        return host
    if ip.version == 6:
        return str(ipaddress.ip_network((ip, 64), strict=False))
    return str(ip)


class LimitGateway(Protocol):
    runtime: Runtime
    metrics: GatewayMetrics


class ConnectionLimits:
    def __init__(self, gateway: LimitGateway, workers: int):
        self.gateway = gateway
        self.workers = workers
        open_file_limit = raise_open_file_limit()
        self.budget = descriptor_budget(open_file_limit)
        self.client_capacity = max(1, self.budget // 2)
        (log.warning if self.budget < SMALL_BUDGET else log.info)(
            "connections: each worker admits %d client connections and %d in all (file descriptor limit %s)",
            self.client_capacity, self.budget, "unlimited" if open_file_limit == resource.RLIM_INFINITY
            else open_file_limit)
        self._clients: dict[str, str] = {}  # admitted client connection id -> its client key
        self._per_client: Counter[str] = Counter()
        # Open upstream connection ids by client connection id. Forgotten with their client connection too:
        # mitmproxy closes them all then, some without a server_disconnected hook (gateway.proxy.answers).
        self._upstreams: dict[str, set[str]] = {}
        self._upstream_count = 0
        self._warned_at: dict[str, float] = {}
        self._unreported: Counter[str] = Counter()  # refusals since the last log line, by reason

    def client_connected(self, client: connection.Client) -> None:
        key = client_key(client)
        share = math.ceil(self.gateway.runtime.config.max_client_connections / self.workers)
        if len(self._clients) >= self.client_capacity:
            self._refuse_client(client, key, "capacity", f"this worker holds {self.client_capacity} client "
                                                         f"connections, all its file descriptors allow")
        elif self._per_client[key] >= share:
            self._refuse_client(client, key, "client_limit", f"{key} holds {share} connections in this worker "
                                                             f"(max_client_connections over {self.workers} workers)")
        else:
            self._clients[client.id] = key
            self._per_client[key] += 1

    def client_disconnected(self, client: connection.Client) -> None:
        key = self._clients.pop(client.id, None)
        if key is not None:
            self._per_client[key] -= 1
            if not self._per_client[key]:
                del self._per_client[key]
        self._upstream_count -= len(self._upstreams.pop(client.id, ()))

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        # Open connections only: mitmproxy queues a connection to an address that already has five open
        # for the same client connection without a descriptor, so only open ones are counted, and a
        # few connecting at once may overshoot the budget by as many (FD_RESERVE absorbs that).
        if data.server.error:
            return  # already refused: mitmproxy reports it without connecting
        if len(self._clients) + self._upstream_count >= self.budget:
            data.server.error = f"{LIMIT_ERROR}: this worker's {self.budget} connections are all in use"
        elif len(self._upstreams.get(data.client.id, ())) >= UPSTREAMS_PER_CONNECTION:
            data.server.error = (f"{LIMIT_ERROR}: the client connection holds {UPSTREAMS_PER_CONNECTION} "
                                 f"upstream connections; open another one")
        else:
            return
        self._count_refusal(data.server.error, "upstream", self._listener(data.client), client_key(data.client))

    def server_connected(self, data: server_hooks.ServerConnectionHookData) -> None:
        if data.client.id in self._clients:  # else its client connection has ended already
            self._upstreams.setdefault(data.client.id, set()).add(data.server.id)
            self._upstream_count += 1

    def server_disconnected(self, data: server_hooks.ServerConnectionHookData) -> None:
        held = self._upstreams.get(data.client.id)
        if held is not None and data.server.id in held:
            held.remove(data.server.id)
            self._upstream_count -= 1

    def _refuse_client(self, client: connection.Client, key: str, reason: str, why: str) -> None:
        handler = connection_handler(client)
        if handler is not None and (writer := handler.transports[client].writer) is not None:
            writer.write(REFUSAL)  # flushed by the close mitmproxy does next
        client.error = f"connection refused: {why}"  # mitmproxy closes it before reading anything
        listener = self._listener(client)
        self.gateway.metrics.connections_refused.labels(listener=listener, reason=reason).inc()
        self._count_refusal(why, reason, listener, key)

    def _listener(self, client: connection.Client) -> str:
        return self.gateway.runtime.listener_name(*client.sockname[:2])

    def _count_refusal(self, why: str, reason: str, listener: str, key: str) -> None:
        """Log refusals of one reason at most every WARN_INTERVAL: a flood must not flood the log."""
        self._unreported[reason] += 1
        now = time.monotonic()
        if now - self._warned_at.get(reason, -WARN_INTERVAL) >= WARN_INTERVAL:
            log.warning("refused %d connection(s) (%s) since the last report; the last on listener %s from %s: %s",
                        self._unreported.pop(reason), reason, listener, key, why)
            self._warned_at[reason] = now

