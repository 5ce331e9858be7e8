"""Where one machine's gateway keeps its state (the CA, the trace log's key and writer socket), and
what a start tells the operator: shared by the single process and the supervisor with its workers."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

from gateway.config.load import Config, format_host_port
from gateway.dlp import native
from gateway.trace import TraceError
from gateway.trace.abandoned import close_abandoned
from gateway.trace.log import SIGNING_KEY_FILE, VERIFIER_KEY_FILE
from gateway.trace.tiles import TileError
from gateway.transfer.model import utc_timestamp

log = logging.getLogger("gateway")

WRITER_SOCKET = "trace-writer.sock"
CA_BASENAME = "mitmproxy"  # mitmproxy's file names in the CA folder: mitmproxy-ca.pem, mitmproxy-ca-cert.pem


def ca_dir(state_dir: Path) -> Path:
    return state_dir / "ca"


def ca_certificate(state_dir: Path) -> Path:
    return ca_dir(state_dir) / f"{CA_BASENAME}-ca-cert.pem"


def ensure_ca(state_dir: Path) -> Path:
    """The gateway CA's certificate (what clients trust), creating the CA on first use."""
    from mitmproxy.certs import CertStore

    CertStore.from_store(ca_dir(state_dir), CA_BASENAME, 2048)
    return ca_certificate(state_dir)


def announce(config: Config, bound: list[tuple[str, int]], management_url: str, processes: str | None = None) -> None:
    """Say where everything is, once every listener is bound (the same for one process or several)."""
    for listener, (host, port) in zip(config.listeners, bound):
        target = f" -> {listener.upstream}" if listener.upstream else ""
        print(f"listener {listener.name}: {listener.mode} proxy on {format_host_port(host, port)}{target}",
              flush=True)
    if processes:
        print(processes, flush=True)
    print(f"metrics: {management_url}/metrics", flush=True)
    print(f"trace log: {config.trace_dir}", flush=True)
    print(f"alerts: {config.alerts_file}", flush=True)
    print(f"gateway CA certificate: {ca_certificate(config.state_dir)}", flush=True)
    if native.kernels is None:  # said where an admin looks first: the DLP is about twice as slow without them
        print("DLP C kernels not in use (not compiled at install, or GATEWAY_DLP_KERNELS=off): bulk exports are "
              "inspected about 2x slower; install gcc and the Python headers (python3-dev) and reinstall",
              flush=True)


def trusted_upstream_ca(state_dir: Path, pem: bytes) -> Path:
    """A copy of the upstream CA bundle named by its content, for mitmproxy, which caches a TLS context
    per CA path: changed content gets a new path, so a reload trusts what it loaded. (Earlier copies
    stay: a worker that has not reloaded yet may still need its own.)"""
    folder = state_dir / "upstream-ca"
    path = folder / f"{hashlib.sha256(pem).hexdigest()[:32]}.pem"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        partial.write_bytes(pem)
        os.replace(partial, path)  # whole, whichever worker writes it first
    return path


def trace_key_path(state_dir: Path) -> Path:
    return state_dir / SIGNING_KEY_FILE


def trace_verifier_key_path(state_dir: Path) -> Path:
    """Written beside the signing key when the gateway first starts."""
    return state_dir / VERIFIER_KEY_FILE


def writer_socket_path(state_dir: Path) -> Path:
    return state_dir / WRITER_SOCKET


def close_abandoned_transfers(trace: Any, trace_dir: Path) -> None:
    """At a start, before any worker serves: the transfers the run before forwarded and never completed
    (its process ended first) get their completion, as errors (gateway.trace.abandoned)."""
    try:
        closed = close_abandoned(trace, trace_dir, utc_timestamp())
    except (TraceError, TileError, OSError) as exc:
        log.error("transfers left open by the run before stay open: %s", exc)
        return
    if closed:
        log.warning("%d transfers left open by the run before (forwarded, no completion) closed as abandoned", closed)
