"""Run the gateway: one mitmproxy engine serving every configured listener through the pipeline.

Only the mitmproxy addons the gateway needs are loaded (each hook is dispatched through every addon,
so the stock set of ~30 costs about half the CPU of a small request).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING

from mitmproxy import options
from mitmproxy.addons import errorcheck, next_layer, proxyserver, tlsconfig
from mitmproxy.master import Master

from gateway.config.load import Config, ConfigError, load_config
from gateway.config.runtime import Runtime, build_runtime
from gateway.filters import fail_closed
from gateway.filters.authorize import Authorize
from gateway.filters.consent import Consent
from gateway.filters.discard import DiscardRefusedBodies
from gateway.filters.grant import Grant
from gateway.filters.identify import Identify
from gateway.filters.inspect import Inspect
from gateway.filters.measure import Measure
from gateway.filters.record import Record
from gateway.ops.alerts import AlertLog
from gateway.ops.management import ManagementServer
from gateway.ops.metrics import GatewayMetrics, exposition_registry
from gateway.ops.sameconfig import same_config
from gateway.ops.sdnotify import sd_notify, watchdog_interval
from gateway.proxy import (
    answers,
    backpressure,
    bodytimeout,
    h2limits,
    heads,
    heldheads,
    idle,
    logmask,
    proxyproto,
    wslimits,
)
from gateway.proxy.connlimit import ConnectionLimits
from gateway.proxy.deadline import FirstRequestDeadline
from gateway.proxy.upstreamdeadline import UpstreamDeadline
from gateway.proxy.dispatch import CachedHookDispatch
from gateway.proxy.listeners import install_inherited_listeners, stop_listening
from gateway.proxy.state import (
    announce,
    ca_dir,
    close_abandoned_transfers,
    trace_key_path,
    trusted_upstream_ca,
    writer_socket_path,
)
from gateway.proxy.tunnels import OnlyHttp, PlainListeners
from gateway.trace import TraceLog
from gateway.trace.remote import RemoteTraceLog

if TYPE_CHECKING:
    from gateway.proxy.listeners import WorkerRole

log = logging.getLogger("gateway")

AWAITED_REQUEST = 1.0  # seconds a graceful stop waits for the first request of a connection just accepted
ANSWERS_OUT = 0.1  # seconds for the answers of the last transfers to be written before the engine stops

class GatewayServer:
    """The whole gateway in one process, or (with `worker`) one of several proxy workers run by the
    supervisor in gateway.proxy.supervisor, which then serves the management listener and the trace log."""

    def __init__(self, config_path: Path | None, frontend: str | None = None, worker: WorkerRole | None = None):
        logmask.install()
        self.config_path = config_path
        self.frontend = frontend
        self.worker = worker
        self.runtime: Runtime = build_runtime(load_config(config_path, frontend))
        self.metrics = GatewayMetrics(worker=worker.index if worker else None)
        self.metrics.config_loaded(True, initial=True)
        self.metrics.config_in_use(*same_config(self.runtime.config))
        self.metrics.witnessed.directory = self.runtime.config.trace_dir
        self.management: ManagementServer | None = None
        self.trace: TraceLog | RemoteTraceLog | None = None
        self.alerts: AlertLog | None = None
        self.master: Master | None = None
        self.record: Record | None = None
        self.stopping = False
        self._cut_now = False  # a second stop signal: no more grace

    async def serve(self) -> None:
        config = self.runtime.config
        measure = Measure(self)
        if self.worker is None:
            self.management = ManagementServer(config, exposition_registry(self.metrics), measure.problems,
                                               before_scrape=measure.refresh_trace_metrics)
            self.management.start()  # first: /healthz answers while the rest starts; a taken port stops us here
            config.state_dir.mkdir(parents=True, exist_ok=True)
            self.trace = TraceLog.open(config.trace_dir, origin=config.trace_origin,
                                       signing_key=trace_key_path(config.state_dir))
            await asyncio.to_thread(close_abandoned_transfers, self.trace, config.trace_dir)
        else:
            install_inherited_listeners(self.worker.listen_sockets)
            # Every record says which worker handled its transfer.
            self.trace = RemoteTraceLog.connect(writer_socket_path(config.state_dir),
                                                fields={"worker": self.worker.index})
        self.alerts = AlertLog(config.alerts_file)
        backpressure.install()
        answers.install()
        heads.install()
        heldheads.install()
        bodytimeout.install()
        h2limits.install()
        wslimits.install()
        proxyproto.install()
        idle.install()
        self.master = Master(options.Options())
        heads.add_options(self.master.options)
        bodytimeout.add_options(self.master.options)
        wslimits.add_options(self.master.options)
        CachedHookDispatch.install(self.master).on_error = fail_closed
        self.record = Record(self)
        self.first_request = FirstRequestDeadline(self)
        self.master.addons.add(
            proxyserver.Proxyserver(), proxyproto.ProxyProtocol(self),
            PlainListeners(), next_layer.NextLayer(), OnlyHttp(), tlsconfig.TlsConfig(), errorcheck.ErrorCheck(),
            ConnectionLimits(self, self.worker.count if self.worker else 1),
            Identify(self), Authorize(self), Grant(self), Inspect(self), Consent(self), self.record, measure,
            DiscardRefusedBodies(self),
            self.first_request, UpstreamDeadline(self),
            Announce(self), wslimits.ForgetMessages(),
        )
        self.master.options.update(**self._engine_options())
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        if self.worker is not None:
            loop.create_task(self._stop_when_orphaned(self.worker.parent))
        # Everything built so far (modules, rules, the engine) lives as long as the process: kept out
        # of the collector's sight, a collection only walks what transfers allocate.
        gc.collect()
        gc.freeze()
        try:
            await self.master.run()
        finally:
            if self.management is not None:
                self.management.stop()
            self.trace.close()
            self.alerts.close()

    async def _stop_when_orphaned(self, supervisor: int) -> None:
        """A worker whose supervisor is gone (killed outright) must not keep serving unsupervised."""
        while os.getppid() == supervisor:
            await asyncio.sleep(1.0)
        log.error("the supervisor is gone; stopping")
        self.stop()

    def stop(self) -> None:
        """SIGTERM, SIGINT: a graceful stop (`_drain`); a second signal cuts what is left at once."""
        if self.stopping:
            self._cut_now = True
            return
        self.stopping = True  # /readyz: not ready
        asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        """Stop taking new work in the order a balancer and kept-alive clients need, so that a drain
        cuts no request: first `drain_delay` not ready (/readyz 503) but still accepting and serving,
        every HTTP/1 answer closing its connection, while the balancer's checks move new connections
        away and clients use or give up their idle connections; then stop accepting, let the transfers
        in flight finish within `shutdown_grace` (counted from the signal), close the idle connections
        left, record the transfers still running at the deadline as errors and cut them, and only then
        stop the engine: the trace log closes after it, with every record in."""
        with contextlib.suppress(OSError):  # an orphaned worker's notify socket (its supervisor's) is gone
            sd_notify("STOPPING=1")
        config = self.runtime.config
        loop = asyncio.get_running_loop()
        deadline = loop.time() + config.shutdown_grace
        self.record.stopping = True  # open HTTP/1 connections close after their answer; HTTP/2 streams 503
        delayed = loop.time() + config.drain_delay
        if config.drain_delay:
            log.info("stopping: not ready, still serving for %g s (drain_delay)", config.drain_delay)
        while loop.time() < delayed and not self._cut_now:
            await asyncio.sleep(0.05)
        for server in list(self.master.addons.get("proxyserver").servers):
            try:
                await stop_listening(server)
            except Exception as exc:  # not listening (any more): nothing to stop
                log.debug("stopping %s: %s", server.mode.description, exc)
        if self.record.in_flight:
            log.info("stopping: waiting up to %.3g s for %d transfers in flight", deadline - loop.time(),
                     len(self.record.in_flight))
        # A connection accepted just before the stop has its request on the way: it is waited for too
        # (up to AWAITED_REQUEST) and served like the others; one silent that long is closed.
        awaited = loop.time() + AWAITED_REQUEST
        while (self.record.in_flight or (self.first_request.waiting and loop.time() < awaited)) \
                and loop.time() < deadline and not self._cut_now:
            await asyncio.sleep(0.05)
        # Idle HTTP/1 connections stay usable while transfers finish (each answer closes its own); the
        # ones left are closed before the engine stops, and a request that came just before is served.
        self._close_idle_connections()
        while self.record.in_flight and loop.time() < deadline and not self._cut_now:
            await asyncio.sleep(0.05)
        if self.record.in_flight:
            cut = await self.record.cut_in_flight(
                f"cut: the gateway stopped before the transfer ended (shutdown grace {config.shutdown_grace:g} s)")
            log.warning("stopping: %d transfers still in flight were cut and recorded as errors", cut)
        await asyncio.sleep(ANSWERS_OUT)
        self.master.shutdown()

    def _close_idle_connections(self) -> None:
        """Close now, rather than when the engine stops, the HTTP/1 connections waiting for a next request:
        one sent on such a connection later is refused by the kernel (its client sees its kept-alive
        connection closed before any answer, and may send it again: RFC 9112 9.3.1) instead of being
        read and then dropped as the engine stops. HTTP/1 has no way to warn an idle connection first."""
        handlers = self.master.addons.get("proxyserver").connections
        closing = [handler for handler in list(handlers.values()) if idle.idle_http1(handler)]
        for handler in closing:
            handler.close_connection(handler.client)
        if closing:
            log.info("stopping: %d idle client connections closed", len(closing))

    def _engine_options(self, config: Config | None = None) -> dict:
        config = config or self.runtime.config
        return {
            "mode": [listener.mitmproxy_spec for listener in config.listeners],
            # Lazy: no upstream connection (not even for CONNECT) before the pipeline has decided.
            "connection_strategy": "lazy",
            # No raw TCP relay: a tunnel's bytes that are neither TLS nor HTTP, or whatever follows a 101
            # upgrade to anything but WebSocket, would cross uninspected. Tunnel bytes are parsed as HTTP
            # instead (refused and recorded like any malformed request); such an upgrade is closed.
            "rawtcp": False,
            heads.HEAD_TIMEOUT_OPTION: config.request_head_timeout,
            bodytimeout.BODY_IDLE_OPTION: config.body_idle_timeout,
            bodytimeout.BODY_TOTAL_OPTION: config.body_timeout or 0.0,
            wslimits.MESSAGE_LIMIT_OPTION: config.spool_threshold,
            "confdir": str(ca_dir(config.state_dir)),
            "ssl_insecure": not config.verify_upstream,
            "ssl_verify_upstream_trusted_ca": str(trusted_upstream_ca(config.state_dir, config.upstream_ca_pem))
            if config.upstream_ca_pem else None,
        }

    def reload(self) -> None:
        """SIGHUP: load the configuration again; a bad one is rejected and the old one keeps serving."""
        sd_notify("RELOADING=1")
        try:
            self._apply(build_runtime(load_config(self.config_path, self.frontend)))
        except ConfigError as e:
            for error in e.errors:
                log.error("reload rejected: %s", error)
            self.metrics.config_loaded(False)
        except OSError as e:  # what it loaded could not be put in place (the state folder's disk full ...)
            log.error("reload rejected: %s", e)
            self.metrics.config_loaded(False)
        finally:
            sd_notify("READY=1")

    def _apply(self, runtime: Runtime) -> None:
        old = self.runtime.config
        for attr in ("state_dir", "trace_dir", "trace_origin", "alerts_file", "management_host", "management_port",
                     "management_auth", "workers"):
            if getattr(runtime.config, attr) != getattr(old, attr):
                log.warning("reload: %s changed; it takes effect only after a restart", attr)
        # Everything the configuration names is read again and put in place before the switch: the
        # upstream CA under a path of its own content, the management certificate and key.
        engine_options = self._engine_options(runtime.config)
        if self.management is not None:
            self.management.reload_tls(runtime.config.management_tls)
        self.runtime = runtime
        if self.master is not None:
            self.master.options.update(**engine_options)
        self.metrics.config_loaded(True)
        self.metrics.config_in_use(*same_config(runtime.config))
        log.info("configuration reloaded from %s", runtime.config.source)


class Announce:
    """Once every listener is bound: say where everything is, and tell systemd we are ready."""

    def __init__(self, server: GatewayServer):
        self.server = server

    def running(self) -> None:
        config = self.server.runtime.config
        if self.server.worker is not None:  # the supervisor says where everything is
            print(f"worker {self.server.worker.index} (pid {os.getpid()}) serving", flush=True)
            self._ready()
            return
        bound = [address[:2] for address in self.server.master.addons.get("proxyserver").listen_addrs()]
        announce(config, bound, self.server.management.url,
                 f"gateway pid {os.getpid()} (kill -HUP reloads the configuration)")
        self._ready()

    def _ready(self) -> None:
        sd_notify("READY=1")
        if (interval := watchdog_interval()) is not None:
            # Pinged from the event loop itself: a stalled loop stops the pings and systemd restarts us.
            asyncio.get_running_loop().create_task(_watchdog(interval))

    def done(self) -> None:
        sd_notify("STOPPING=1")


async def _watchdog(interval: float) -> None:
    while True:
        sd_notify("WATCHDOG=1")
        await asyncio.sleep(interval)
