"""Start real gateway and upstream processes for end-to-end tests."""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "config" / "gateway.yaml"
UPSTREAM_SERVER = REPO / "tests" / "upstream_server.py"


_handed_out: set[tuple[str, int]] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now, and never handed out before in this run: the kernel may give the same one to
    two calls in a row, and two servers told the same port would make a test talk to the wrong one."""
    while True:
        with socket.socket() as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
        if (host, port) not in _handed_out:
            _handed_out.add((host, port))
            return port


def test_workers() -> int:
    """Proxy worker processes for end-to-end tests: GATEWAY_TEST_WORKERS (default 1), or set by a
    test module's fixture (see tests/conftest.py's `workers` parameter)."""
    return int(os.environ.get("GATEWAY_TEST_WORKERS", "1"))


def gateway_config(state_dir: Path, workers: int | None = None, **sections) -> dict:
    """The shipped default configuration with its own state folder and free ports; `sections` replace."""
    config = copy.deepcopy(yaml.safe_load(DEFAULT_CONFIG.read_text()))
    config["gateway"]["state_dir"] = str(state_dir)
    config["gateway"]["workers"] = workers if workers is not None else test_workers()
    config["dlp"]["rules"] = str(REPO / "config" / "dlp")
    for listener in config["listeners"]:
        listener["listen"] = f"127.0.0.1:{free_port()}"
    config["management"]["listen"] = f"127.0.0.1:{free_port()}"
    config.update(sections)
    return config


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, allow_unicode=True, sort_keys=False))
    return path


def listener_url(config: dict, name: str) -> str:
    for listener in config["listeners"]:
        if listener["name"] == name:
            return f"http://{listener['listen']}"
    raise KeyError(name)


def metric_total(config: dict, series: str, containing: str = "") -> float:
    """The sum of a metric's series (those whose labels contain `containing`) on the gateway's /metrics."""
    text = httpx.get(f"http://{config['management']['listen']}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(series + "{") and containing in line)


class Process:
    """A child process whose output is collected line by line; `wait_for` blocks until a line appears.

    Every one started is remembered, so `stop_all()` (run when the test session ends) leaves none
    behind even when a fixture fails half-way through its setup."""

    started_processes: list["Process"] = []

    def __init__(self, argv: list[str], prefix: list[str] = (), env: dict | None = None):
        self.argv = argv
        self.lines: list[str] = []
        self._seen = threading.Condition()
        self.proc = subprocess.Popen([*prefix, *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env={**os.environ, **(env or {})})
        Process.started_processes.append(self)
        threading.Thread(target=self._read, daemon=True).start()

    @classmethod
    def stop_all(cls) -> None:
        for process in cls.started_processes:
            process.stop()
        cls.started_processes.clear()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._seen:
                self.lines.append(line.rstrip("\n"))
                self._seen.notify_all()
        with self._seen:
            self._seen.notify_all()

    def started(self, text: str, timeout: float = 30.0) -> "Process":
        """Wait for a line starting with `text`, the process's own readiness line (a traceback line
        merely containing it, such as "Address already in use" for "ready", does not count); a
        process that never says it, or has died, is stopped, not left behind."""
        try:
            self.wait_for(text, timeout, line_start=True)
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.argv[:3]} exited after {text!r}:\n" + "\n".join(self.lines[-40:]))
        except AssertionError:
            self.stop()
            raise
        return self

    def wait_for(self, text: str, timeout: float = 30.0, start: int = 0, line_start: bool = False) -> str:
        deadline = time.monotonic() + timeout
        with self._seen:
            while True:
                for line in self.lines[start:]:
                    if line.startswith(text) if line_start else text in line:
                        return line
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and not self._pending()):
                    raise AssertionError(f"{text!r} not seen from {self.argv[:3]} "
                                         f"(exit {self.proc.poll()}):\n" + "\n".join(self.lines[-40:]))
                self._seen.wait(min(remaining, 0.2))

    def _pending(self) -> bool:
        return not self.proc.stdout.closed and self.proc.poll() is None

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_gateway(config_path: Path, prefix: list[str] = (), env: dict | None = None) -> Process:
    return Process([sys.executable, "-m", "gateway", "run", "-c", str(config_path)], prefix,
                   env={"PYTHONUNBUFFERED": "1", **(env or {})}).started("alerts:")


def start_upstream(bind: str, port: int, log: Path, prefix: list[str] = (),
                   tls: tuple[Path, Path] | None = None) -> Process:
    """The logging upstream server; with `tls` (certificate, key) it serves HTTPS."""
    tls_args = ["--cert", str(tls[0]), "--key", str(tls[1])] if tls else []
    return Process([sys.executable, str(UPSTREAM_SERVER), "--bind", bind, "--port", str(port),
                    "--log", str(log), *tls_args], prefix).started("ready", timeout=10)


def trace_records(trace_dir: Path, *options: str, opened: bool = False) -> list[dict]:
    """The records `gateway trace show DIR [options]` lists, run as a user runs it (failing the test if it
    fails): one per transfer, its final record (an open record is left out once its completion is in the
    log), unless `opened`: then every record."""
    shown = subprocess.run([sys.executable, "-m", "gateway", "trace", "show", str(trace_dir), *options],
                           capture_output=True, text=True, timeout=60, cwd=REPO)
    assert shown.returncode == 0, shown.stderr
    # One record a line, split at "\n" only: str.splitlines() would also split inside a record at the
    # U+0085 or U+2028 a location quoting a body's bytes may hold.
    records = [json.loads(line)["record"] for line in shown.stdout.split("\n") if line]
    if opened:
        return records
    completed = {r["id"] for r in records if r.get("phase") == "done"}
    return [r for r in records if not (r.get("phase") == "open" and r["id"] in completed)]
