"""An upstream that misbehaves on purpose, chosen by the request path (`/close-mid-head`, ...), over
plain TCP or TLS: the ways an upstream fails that mitmproxy answers by itself, `/silent`, read
and never answered, and `/long-head`, a 200 whose head has the size asked for. Its HTTP/2 side also sends `/h2-random?bytes=N`: N random bytes
(tests/upstream_server.py's) with no content-length, and `/h2-trailers?message=M`: a body, then
trailer fields `grpc-status: 0` and `grpc-message: M`."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import h2.config
import h2.connection
import h2.errors
import h2.events
import hyperframe.frame

from tests.upstream_server import random_bytes

# What the upstream writes after reading a request head, by path; None: it closes without a word.
ANSWERS: dict[str, bytes | None] = {
    "/close-before-head": None,
    "/close-mid-head": b"HTTP/1.1 200 OK\r\nContent-Ty",
    "/garbage-head": b"\x16\x03\x01 this is no HTTP\r\n\r\n",
    "/bad-header-line": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\na header line with no colon\r\n\r\nok",
    "/short-body": b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 100\r\n\r\nonly this",
    "/bad-chunk": b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n",
    "/cut-chunked": b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabc",
    "/cut-long-body": b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: 20971520\r\n\r\n"
                      + b"\x00" * 3 * 1024 * 1024,
    "/cut-long-chunked": b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                         + b"100000\r\n" + b"\x00" * 0x100000 + b"\r\n" + b"100000\r\n" + b"\x00" * 0x100000 + b"\r\n"
                         + b"100000\r\n" + b"\x00" * 1000,
    "/smuggling": b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
}
# `/long-head?size=N&chunk=C`: a 200 whose head is exactly N bytes (filler in one field), written C bytes
# at a time with a pause after each (0: in one write), then the body "ok".
LONG_HEAD = "/long-head"
LONG_HEAD_START = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\nX-Filler: "
# A path (HTTP/1 and HTTP/2 alike) the upstream reads and never answers, holding the connection open.
SILENT = "/silent"
SILENT_HOLD = 60.0  # seconds a silent connection is held (past any deadline a test sets)


# An HTTP/2 upstream's ways of failing a request, by path: raw bytes sent after its SETTINGS, built by
# _h2_answer ("reset": RST_STREAM at once; "goaway"; "reset-after-head": a head, then RST_STREAM;
# "garbage": noise; "bad-status": a head whose :status is no number; "close-after-head").
H2_FAILURES = ("/h2-reset", "/h2-goaway", "/h2-reset-after-head", "/h2-garbage", "/h2-bad-status",
               "/h2-close-after-head")


class BadUpstream:
    """A thread serving ANSWERS on `address:port` (with `tls`: certificate and key files). `requests`
    lists the paths asked for."""

    def __init__(self, address: str, tls: tuple[Path, Path] | None = None, http2: bool = False):
        self.listener = socket.create_server((address, 0))
        self.port = self.listener.getsockname()[1]
        self.context = None
        if tls is not None:
            self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.context.load_cert_chain(*map(str, tls))
            self.context.set_alpn_protocols(["h2"] if http2 else ["http/1.1"])
        self.requests: list[str] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError), contextlib.closing(conn):
            conn.settimeout(10)
            if self.context is not None:
                conn = self.context.wrap_socket(conn, server_side=True)
                if conn.selected_alpn_protocol() == "h2":
                    return self._answer_h2(conn)
            head = b""
            while b"\r\n\r\n" not in head:
                data = conn.recv(65536)
                if not data:
                    return
                head += data
            path = head.split(b" ", 2)[1].decode()
            self.requests.append(path)
            if path.split("?")[0] == SILENT:
                conn.settimeout(SILENT_HOLD)
                while conn.recv(65536):  # reads what comes, answers nothing, until the client goes
                    pass
                return
            if path.split("?")[0] == LONG_HEAD:
                return _send_long_head(conn, path)
            answer = ANSWERS.get(path.split("?")[0])
            if answer is not None:
                conn.sendall(answer)

    def _answer_h2(self, conn: ssl.SSLSocket) -> None:
        connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        connection.initiate_connection()
        conn.sendall(connection.data_to_send())
        while True:
            data = conn.recv(65536)
            if not data:
                return
            for event in connection.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    path = dict(event.headers)[b":path"].decode()
                    self.requests.append(path)
                    if path.split("?")[0] == SILENT:
                        conn.settimeout(SILENT_HOLD)
                        continue
                    if path.startswith("/h2-random?bytes="):
                        return _h2_stream(conn, connection, event.stream_id, int(path.split("=")[1]))
                    conn.sendall(connection.data_to_send() + _h2_answer(connection, event.stream_id, path))
                    if not path.startswith("/h2-trailers"):
                        return
                    # A whole answer: the connection stays open as a real server's would. Closing it with the
                    # gateway's frames unread made the kernel send RST, which could discard the answer
                    # before the gateway read it (a 502 "peer closed connection" that was the test's doing).
            conn.sendall(connection.data_to_send())

    def close(self) -> None:
        self.listener.close()


def _h2_answer(connection: h2.connection.H2Connection, stream_id: int, path: str) -> bytes:
    if path.startswith("/h2-trailers"):  # as gRPC answers: its status in trailer fields (?message=M)
        message = path.partition("?message=")[2] or "ok"
        message = "11010519491231002X" if message == "id-number" else message  # a resident ID number
        connection.send_headers(stream_id, [(":status", "200"), ("content-type", "text/plain; charset=utf-8")])
        connection.send_data(stream_id, b"trailers follow")
        connection.send_headers(stream_id, [("grpc-status", "0"), ("grpc-message", message)], end_stream=True)
        return connection.data_to_send()
    if path == "/h2-garbage":
        return b"\x00\x00\x08\x07\x00\x00\x00\x00\x01garbage!" * 3
    if path == "/h2-bad-status":
        head = hyperframe.frame.HeadersFrame(stream_id)
        head.data = connection.encoder.encode([(":status", "abc")])
        head.flags.add("END_HEADERS")
        return head.serialize()
    if path in ("/h2-reset-after-head", "/h2-close-after-head"):
        connection.send_headers(stream_id, [(":status", "200"), ("content-type", "text/plain"),
                                            ("content-length", "100")])
        connection.send_data(stream_id, b"only this")
    if path == "/h2-goaway":
        connection.close_connection(h2.errors.ErrorCodes.INTERNAL_ERROR)
    elif path != "/h2-close-after-head":
        connection.reset_stream(stream_id, h2.errors.ErrorCodes.INTERNAL_ERROR)
    return connection.data_to_send()


def _send_long_head(conn: socket.socket, path: str) -> None:
    query = {name: int(values[0]) for name, values in parse_qs(urlsplit(path).query).items()}
    answer = LONG_HEAD_START + b"a" * (query["size"] - len(LONG_HEAD_START) - 4) + b"\r\n\r\nok"
    chunk = query["chunk"] or len(answer)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for offset in range(0, len(answer), chunk):  # the gateway may cut it off (OSError, suppressed)
        conn.sendall(answer[offset:offset + chunk])
        time.sleep(0.005 if chunk >= 16384 else 0.0005)  # each piece its own segment, likely its own read


def _h2_stream(conn: ssl.SSLSocket, connection: h2.connection.H2Connection, stream_id: int, size: int) -> None:
    """`size` random bytes on `stream_id`, no content-length, as flow control lets them go."""
    connection.send_headers(stream_id, [(":status", "200"), ("content-type", "application/octet-stream")])
    pending = b""
    pieces = random_bytes(size)
    while True:
        if not pending:
            pending = next(pieces, b"")
            if not pending:
                break
        window = min(connection.local_flow_control_window(stream_id), connection.max_outbound_frame_size)
        if window > 0:
            connection.send_data(stream_id, pending[:window])
            pending = pending[window:]
        else:
            data = conn.recv(65536)
            if not data:
                return
            connection.receive_data(data)
        conn.sendall(connection.data_to_send())
    connection.end_stream(stream_id)
    conn.sendall(connection.data_to_send())
    while conn.recv(65536):  # until the gateway closes
        pass
