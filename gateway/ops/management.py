"""The management listener: /metrics, /healthz and /readyz on their own address, apart from the proxies.

Built from prometheus-client's own pieces (its WSGI exposition app, which negotiates the text or
OpenMetrics format and gzip, and its threading WSGI server), served on a daemon thread so a scrape
never waits for the proxy's event loop. Optional TLS (certificate and key files) and HTTP basic auth
(a bcrypt hash, as Prometheus' own exporters use, or a password file) protect every path.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import socket
import ssl
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import bcrypt
from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

if TYPE_CHECKING:
    from gateway.config.load import BasicAuth, Config

log = logging.getLogger(__name__)

type StartResponse = Callable[[str, list[tuple[str, str]]], Any]
type WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]



def _text() -> list[tuple[str, str]]:
    return [("Content-Type", "text/plain; charset=utf-8")]  # a new list each time: wsgiref appends to it


class ManagementError(Exception):
    pass


class BasicAuthCheck:
    """Checks `Authorization: Basic` headers; a header that passed once is remembered (bcrypt is slow on
    purpose, and Prometheus sends the same header on every scrape)."""

    def __init__(self, auth: BasicAuth):
        self.user = auth.user.encode()
        if auth.password_file is not None:
            lines = auth.password_file.read_bytes().splitlines()
            self._password = lines[0] if lines else b""
            self._hash = None
        else:
            self._password = None
            self._hash = auth.password_hash.encode()
        self._accepted: set[bytes] = set()
        self._lock = threading.Lock()

    def allows(self, header: str | None) -> bool:
        if not header or not header.startswith("Basic "):
            return False
        token = hashlib.sha256(header.encode()).digest()
        with self._lock:
            if token in self._accepted:
                return True
        try:
            user, sep, password = base64.b64decode(header[6:], validate=True).partition(b":")
        except (binascii.Error, ValueError):
            return False
        if not sep or not hmac.compare_digest(user, self.user):
            return False
        if self._hash is not None:
            ok = bcrypt.checkpw(password, self._hash)
        else:
            ok = hmac.compare_digest(password, self._password)
        if ok:
            with self._lock:
                self._accepted.add(token)
        return ok


def management_app(registry: CollectorRegistry, readiness: Callable[[], list[str]],
                   before_scrape: Callable[[], None] | None = None, auth: BasicAuthCheck | None = None) -> WsgiApp:
    """The WSGI app: /metrics (prometheus-client's exposition), /healthz, /readyz."""
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if auth is not None and not auth.allows(environ.get("HTTP_AUTHORIZATION")):
            start_response("401 Unauthorized", [*_text(), ("WWW-Authenticate", 'Basic realm="gateway management"')])
            return [b"unauthorized\n"]
        path = environ.get("PATH_INFO", "")
        if environ["REQUEST_METHOD"] not in ("GET", "HEAD"):
            start_response("405 Method Not Allowed", [*_text(), ("Allow", "GET, HEAD")])
            return [b"method not allowed\n"]
        if path == "/metrics":
            if before_scrape is not None:
                before_scrape()
            return metrics_app(environ, start_response)
        if path == "/healthz":
            start_response("200 OK", _text())
            return [b"ok\n"]
        if path == "/readyz":
            problems = readiness()
            if problems:
                start_response("503 Service Unavailable", _text())
                return [("not ready: " + "; ".join(problems) + "\n").encode()]
            start_response("200 OK", _text())
            return [b"ready\n"]
        start_response("404 Not Found", _text())
        return [b"not found (try /metrics, /healthz, /readyz)\n"]

    return app


class _QuietHandler(WSGIRequestHandler):
    timeout = 10  # seconds a scraper may idle mid-request (or mid-handshake) before its thread gives up

    def log_message(self, format: str, *args: Any) -> None:
        pass  # scrapes every few seconds would drown the decision log


class _Server(ThreadingWSGIServer):
    tls_context: ssl.SSLContext | None = None

    def get_request(self):
        # The TLS handshake happens in the request's own thread (on first read), not in the accept loop,
        # so a client that never finishes it cannot stall other scrapes.
        sock, address = super().get_request()
        if self.tls_context is not None:
            sock = self.tls_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address


class ManagementServer:
    def __init__(self, config: Config, registry: CollectorRegistry, readiness: Callable[[], list[str]],
                 before_scrape: Callable[[], None] | None = None):
        self.host, self.port = config.management_host, config.management_port
        self.tls = config.management_tls
        auth = BasicAuthCheck(config.management_auth) if config.management_auth else None
        self.app = management_app(registry, readiness, before_scrape, auth)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind and serve on a daemon thread; a taken or invalid address is a ManagementError."""
        server_class = type("_BoundServer", (_Server,), {"address_family": _family(self.host)})
        try:
            server = make_server(self.host, self.port, self.app, server_class, handler_class=_QuietHandler)
        except OSError as e:
            raise ManagementError(f"management listener {self.url}: cannot listen: {e.strerror or e}") from e
        if self.tls is not None:
            server.tls_context = tls_context(*self.tls)
        self.port = server.server_address[1]  # the real one when configured with port 0
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="management", daemon=True)
        self._thread.start()

    def reload_tls(self, tls: tuple[Path, Path] | None) -> None:
        """A reload: new connections get the certificate and key as the files hold them now. Turning TLS
        on or off changes the scheme scrapers use: that waits for a restart."""
        if (tls is None) != (self.tls is None):
            log.warning("reload: management.tls turned %s; it takes effect only after a restart",
                        "on" if tls else "off")
            return
        if tls is not None and self._server is not None:
            self._server.tls_context = tls_context(*tls)
            self.tls = tls

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET
