"""Several proxy worker processes per machine, run by one supervisor (`gateway.workers: N` in the configuration, N > 1).

mitmproxy runs one event loop on one core. The supervisor is what systemd (or a terminal) sees:

- it binds every listener once, as N sockets sharing the address through SO_REUSEPORT (the kernel
  spreads new connections over them), and hands socket i of each listener down to worker i. The
  supervisor keeps its copies open, so connections that reach a worker while it is being replaced
  wait in its socket's queue instead of being refused, and no other program can take the port;
- it runs one trace-writer process (gateway.trace.remote) holding the machine's single trace log;
  workers hand it their records over a Unix socket and answer a transfer only once its record is
  durable. While the writer is away, workers refuse transfers (503) and the supervisor restarts it;
- it starts the N workers (`python -m gateway.proxy.worker WORKER`), restarts any that dies or stops
  answering its watchdog, and passes SIGHUP and shutdowns on to all of them;
- it talks to systemd for all of them: the workers' sd_notify messages (READY, RELOADING, WATCHDOG)
  reach the supervisor's own notify socket, and it sends READY=1 once every worker is ready;
- it serves the management listener: /metrics adds up every worker's metrics with prometheus-client's
  multiprocess mode (PROMETHEUS_MULTIPROC_DIR is `metrics/` in the state directory, emptied at start).

The shared sockets are in gateway.proxy.listeners, a worker's entry point in gateway.proxy.worker.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from gateway.config.load import (
    Config,
    ConfigError,
    Listener,
    format_host_port,
    load_config,
)
from gateway.ops.sdnotify import sd_notify, watchdog_interval
from gateway.proxy.listeners import reuse_port_socket
from gateway.proxy.state import announce, close_abandoned_transfers, ensure_ca, trace_key_path, writer_socket_path
from gateway.trace.remote import RemoteTraceLog
from gateway.transfer.disk import filesystem_problems
from gateway.transfer.spool import spool_dir

log = logging.getLogger("gateway.supervisor")

NOTIFY_SOCKET = "supervisor-notify.sock"
METRICS_DIR = "metrics"
START_TIMEOUT = 60.0  # seconds for the writer and every worker to come up at start
WORKER_WATCHDOG = 30.0  # a ready worker silent for this long is stuck: it is killed and replaced
STOP_MARGIN = 10.0  # seconds a worker may take past its shutdown grace before it is killed
RESTART_DELAYS = (0.2, 0.5, 1.0, 2.0, 5.0)  # after each quick death in a row (a crash loop slows down)
STABLE_AFTER = 10.0  # a process that lived this long starts its next crash count from zero
_UCRED = struct.Struct("3i")  # SCM_CREDENTIALS: pid, uid, gid


# ---- the supervisor -------------------------------------------------------------------------------


@dataclass
class Child:
    """A worker slot (index 0..N-1) or the trace writer (index None), across restarts."""

    index: int | None
    process: asyncio.subprocess.Process | None = None
    ready: bool = False
    started: float = 0.0
    last_ping: float = 0.0
    quick_deaths: int = 0
    became_ready: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def name(self) -> str:
        return "trace writer" if self.index is None else f"worker {self.index}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None


class Supervisor:
    def __init__(self, config_path: Path | None, frontend: str | None = None):
        from gateway.config.runtime import build_runtime

        self.config_path = config_path
        self.frontend = frontend
        self.config: Config = build_runtime(load_config(config_path, frontend)).config  # all checked now
        self.workers = [Child(i) for i in range(self.config.workers)]
        self.writer = Child(None)
        self.sockets: dict[Listener, list[socket.socket]] = {}
        self.stopping = False
        self.serving = False  # every process came up once; before that, a death ends the start
        self._start_failure: str | None = None
        self._stopped = asyncio.Event()
        self._notify: socket.socket | None = None
        self._reloading = False
        self.management = None
        # Before anything imports prometheus_client (workers inherit it): every process's metrics
        # go to files there, and /metrics adds them up. Counts of an earlier run must not add up.
        metrics_dir = self.config.state_dir / METRICS_DIR
        shutil.rmtree(metrics_dir, ignore_errors=True)
        metrics_dir.mkdir(parents=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)

    # Start.

    async def serve(self) -> int:
        """Serve until SIGTERM/SIGINT; the exit status of `gateway run`."""
        config = self.config
        state_dir = config.state_dir
        from gateway.ops.management import ManagementServer
        from gateway.ops.metrics import SupervisorMetrics, exposition_registry

        self.metrics = SupervisorMetrics()
        self.metrics.witnessed.directory = config.trace_dir
        self.management = ManagementServer(config, exposition_registry(self.metrics), self.problems)
        self.management.start()  # a taken port stops us here, as with one process
        try:
            self._bind_listeners()
            ensure_ca(state_dir)  # once, before workers race to create one each
            self._open_notify_socket()
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGHUP, self.reload)
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop)
            tasks = [self._task(self._keep(self.writer))]
            if not await self._wait_ready([self.writer]):
                return 1
            await asyncio.to_thread(self._close_abandoned)
            tasks += [self._task(self._keep(worker)) for worker in self.workers]
            if not await self._wait_ready(self.workers):
                return 1
            self.serving = True
            self._announce()
            sd_notify("READY=1")
            tasks.append(self._task(self._watchdog()))
            await self._stopped.wait()
            await self._shutdown()
            for task in tasks:
                task.cancel()
            return 0
        finally:
            self.management.stop()
            for sockets in self.sockets.values():
                for sock in sockets:
                    sock.close()
            if self._notify is not None:
                self._notify.close()
                (state_dir / NOTIFY_SOCKET).unlink(missing_ok=True)

    def _close_abandoned(self) -> None:
        """Through the writer, before the workers start: no process of the run before is left to send
        a completion (a writer restarted later leaves open records alone: live workers resend theirs)."""
        with RemoteTraceLog.connect(writer_socket_path(self.config.state_dir)) as trace:
            close_abandoned_transfers(trace, self.config.trace_dir)

    def _bind_listeners(self) -> None:
        for listener in self.config.listeners:
            self.sockets[listener] = [reuse_port_socket(listener) for _ in self.workers]

    def _open_notify_socket(self) -> None:
        path = self.config.state_dir / NOTIFY_SOCKET
        path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)  # tells which worker sent a message
        sock.bind(os.fspath(path))
        sock.setblocking(False)
        self._notify = sock
        asyncio.get_running_loop().add_reader(sock, self._on_notify)

    async def _wait_ready(self, children: list[Child]) -> bool:
        """All `children` ready; False (everything stopped) if one ended first, or on SIGTERM or timeout."""
        async def all_ready() -> None:
            for child in children:
                await child.became_ready.wait()

        ready = asyncio.ensure_future(all_ready())
        stopped = asyncio.ensure_future(self._stopped.wait())
        await asyncio.wait([ready, stopped], timeout=START_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        stopped.cancel()
        if ready.done() and not ready.cancelled() and not self._stopped.is_set():
            return True
        if self._start_failure is not None:
            print(f"gateway: {self._start_failure}", file=sys.stderr, flush=True)
        elif not self._stopped.is_set():
            late = [child.name for child in children if not child.ready]
            print(f"gateway: not ready after {START_TIMEOUT:.0f} s: {', '.join(late)}", file=sys.stderr, flush=True)
        await self._shutdown()
        return False

    def _announce(self) -> None:
        config = self.config
        announce(config, [(listener.host, listener.port) for listener in config.listeners], self.management.url,
                 f"gateway pid {os.getpid()} (kill -HUP reloads the configuration); "
                 f"workers: {len(self.workers)} (pids {', '.join(str(w.pid) for w in self.workers)}); "
                 f"trace writer pid {self.writer.pid}")

    def _task(self, coroutine) -> asyncio.Task:
        """A task of the supervisor's own: if it fails, nothing supervises any more, so stop everything."""
        task = asyncio.create_task(coroutine)

        def check(done: asyncio.Task) -> None:
            if not done.cancelled() and done.exception() is not None:
                log.critical("supervisor task failed; stopping the gateway", exc_info=done.exception())
                self.stop()

        task.add_done_callback(check)
        return task

    # Children.

    async def _keep(self, child: Child) -> None:
        """Run the child, and again each time it ends, until the gateway stops."""
        while not self.stopping:
            try:
                child.process = await self._spawn(child)
            except OSError as exc:
                log.error("cannot start the %s: %s", child.name, exc)
                await asyncio.sleep(RESTART_DELAYS[-1])
                continue
            child.started = child.last_ping = time.monotonic()
            if child.index is None:
                self._task(self._writer_ready(child))
            code = await child.process.wait()
            child.ready = False
            child.became_ready.clear()
            if self.stopping:
                return
            if not self.serving:  # at start: the same error would come again (e.g. a bad trace directory)
                self._start_failure = f"the {child.name} ended with status {code} while starting"
                self._stopped.set()
                return
            lived = time.monotonic() - child.started
            child.quick_deaths = 0 if lived >= STABLE_AFTER else child.quick_deaths + 1
            self.metrics.restarts.labels(process="trace-writer" if child.index is None else "worker").inc()
            _forget_metrics_of(child.process.pid)
            delay = RESTART_DELAYS[min(child.quick_deaths, len(RESTART_DELAYS)) - 1] if child.quick_deaths else 0
            log.error("%s (pid %d) ended with status %s after %.1f s; starting it again%s", child.name,
                      child.process.pid, code, lived, f" in {delay:.1f} s" if delay else "")
            await asyncio.sleep(delay)

    async def _spawn(self, child: Child) -> asyncio.subprocess.Process:
        config = self.config
        if child.index is None:
            argv = [sys.executable, "-m", "gateway.trace.remote", "--dir", str(config.trace_dir),
                    "--origin", config.trace_origin, "--key", str(trace_key_path(config.state_dir)),
                    "--socket", str(writer_socket_path(config.state_dir)), "--parent", str(os.getpid())]
            return await asyncio.create_subprocess_exec(*argv)
        for listener, sockets in self.sockets.items():
            if not sockets[child.index].getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                # Shut down by the worker's graceful stop (gateway.proxy.listeners.stop_listening).
                sockets[child.index].close()
                sockets[child.index] = reuse_port_socket(listener)
        fds = {listener: sockets[child.index].fileno() for listener, sockets in self.sockets.items()}
        argv = [sys.executable, "-m", "gateway.proxy.worker", str(child.index), "--parent", str(os.getpid()),
                "--of", str(len(self.workers)),
                "--listen-fds", ",".join(f"{format_host_port(l.host, l.port)}={fd}" for l, fd in fds.items())]
        if self.config_path is not None:
            argv += ["-c", str(self.config_path)]
        if self.frontend is not None:
            argv += ["--frontend", self.frontend]
        env = {**os.environ, "NOTIFY_SOCKET": str(config.state_dir / NOTIFY_SOCKET),
               "WATCHDOG_USEC": str(int(WORKER_WATCHDOG * 1e6))}
        env.pop("WATCHDOG_PID", None)
        return await asyncio.create_subprocess_exec(*argv, pass_fds=list(fds.values()), env=env)

    async def _writer_ready(self, child: Child) -> None:
        """The writer is ready once its socket takes connections."""
        path = writer_socket_path(self.config.state_dir)
        process = child.process
        while process.returncode is None and not self.stopping:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                try:
                    probe.connect(os.fspath(path))
                except OSError:
                    await asyncio.sleep(0.05)
                    continue
            child.ready = True
            child.became_ready.set()
            return

    def _on_notify(self) -> None:
        while True:
            try:
                data, ancillary, _, _ = self._notify.recvmsg(4096, socket.CMSG_SPACE(_UCRED.size))
            except BlockingIOError:
                return
            pid = next((_UCRED.unpack(bytes(d[:_UCRED.size]))[0] for level, kind, d in ancillary
                        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS), None)
            child = next((w for w in self.workers if w.pid is not None and w.pid == pid), None)
            if child is None:
                continue
            child.last_ping = time.monotonic()
            for line in data.decode(errors="replace").splitlines():
                if line == "READY=1":
                    child.ready = True
                    child.became_ready.set()
                    log.info("%s (pid %d) ready", child.name, pid)
                elif line == "RELOADING=1":
                    child.ready = False
                    child.became_ready.clear()
            if self._reloading and all(w.ready for w in self.workers):
                self._reloading = False
                sd_notify("READY=1")

    async def _watchdog(self) -> None:
        interval = watchdog_interval()
        while True:
            if interval is not None:
                sd_notify("WATCHDOG=1")
            now = time.monotonic()
            for worker in self.workers:
                process = worker.process
                if worker.ready and process and process.returncode is None and now - worker.last_ping > WORKER_WATCHDOG:
                    log.error("%s (pid %d) stopped answering its watchdog; killing it", worker.name, process.pid)
                    process.kill()
            await asyncio.sleep(min(interval or 1.0, 1.0))

    # Signals.

    def reload(self) -> None:
        """SIGHUP: every worker reloads the configuration (a bad one is rejected and the old one kept)."""
        sd_notify("RELOADING=1")
        self._reloading = True
        try:
            new = load_config(self.config_path, self.frontend)
        except ConfigError:
            new = None  # each worker logs the errors and keeps its configuration
        if new is not None:
            self._close_removed_listeners(new)
            try:
                self.management.reload_tls(new.management_tls)
            except OSError as e:
                log.error("reload: management TLS kept as it was: %s", e)
        for worker in self.workers:
            if worker.process is not None and worker.process.returncode is None:
                worker.process.send_signal(signal.SIGHUP)
        if not any(w.process and w.process.returncode is None for w in self.workers):
            self._reloading = False
            sd_notify("READY=1")

    def _close_removed_listeners(self, new: Config) -> None:
        """A listener dropped by a reload must stop queueing connections nobody will accept. (One added
        by a reload is bound by each worker itself, sharing the address through SO_REUSEPORT.)"""
        kept = {(l.host, l.port) for l in new.listeners}
        for listener in [l for l in self.sockets if (l.host, l.port) not in kept]:
            for sock in self.sockets.pop(listener):
                sock.close()

    def stop(self) -> None:
        if not self.stopping:
            self.stopping = True
            sd_notify("STOPPING=1")
            self._stopped.set()

    async def _shutdown(self) -> None:
        """Workers first (each answers what it has in hand), then the writer their records go to."""
        self.stopping = True
        timeout = self.config.shutdown_grace + STOP_MARGIN  # workers drain their transfers first
        for group in (self.workers, [self.writer]):
            running = [c.process for c in group if c.process is not None and c.process.returncode is None]
            for process in running:
                process.terminate()
            if running:
                _, late = await asyncio.wait([asyncio.ensure_future(p.wait()) for p in running], timeout=timeout)
                for process in running:
                    if process.returncode is None:
                        log.error("pid %d did not stop within %.0f s; killing it", process.pid, timeout)
                        process.kill()
                        await process.wait()

    def problems(self) -> list[str]:
        """/readyz: every worker and the trace writer up, room on disk (called from the management thread)."""
        problems = []
        if self.stopping:
            problems.append("stopping")
        if not self.writer.ready:
            problems.append("trace writer not running")
        late = [str(w.index) for w in self.workers if not w.ready]
        if late:
            problems.append(f"workers not ready: {', '.join(late)} of {len(self.workers)}")
        if not os.access(self.config.trace_dir, os.W_OK):
            problems.append(f"trace log directory not writable: {self.config.trace_dir}")
        return problems + filesystem_problems(self.config.trace_dir, spool_dir(self.config.state_dir))


def _forget_metrics_of(pid: int) -> None:
    """A dead worker's live gauges (open connections) must not count any more; its counters still do."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)


