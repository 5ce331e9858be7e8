"""What may begin an HTTP/1 request, judged as soon as the bytes tell (gateway.proxy.heads refuses the rest).

mitmproxy reads a request head only once it has ended: bytes that can never become one (another
protocol's first line, binary, TLS on a listener's own port) waited for an end that never came, then
408. Here a head is refused at its first byte that cannot begin a request line (the method is token
characters up to a space), or when its first line has ended and mitmproxy's own parser does not read it
as a request line (`EHLO example.com`, `GET /`), or it names another HTTP version (505). Empty lines
before a request line are dropped as they arrive (RFC 9112, section 2.2).
"""

from __future__ import annotations

import re

from h11._receivebuffer import ReceiveBuffer
from mitmproxy.net.http import http1
from mitmproxy.net.tls import starts_like_tls_record

HTTP1_VERSIONS = (b"HTTP/1.0", b"HTTP/1.1")
NOT_HTTP = "not an HTTP request"
VERSION_REFUSED = "HTTP version not supported (HTTP/1.0 and HTTP/1.1 are)"
TLS_RECORD_START = b"\x16\x03"  # a handshake record, TLS 1.x (mitmproxy.net.tls.starts_like_tls_record)
TLS_REFUSED = "TLS where plain HTTP was expected"  # a listener's own port: gateway.proxy.tunnels.PlainListeners
# RFC 9110 token characters: a request line starts with a method made of them, then a space.
TOKEN_BYTES = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_VERSION = re.compile(rb"HTTP/[0-9]+\.[0-9]+")  # another request line is mitmproxy's to refuse (400)
_EMPTY_LINES = re.compile(rb"[\r\n]*")


def drop_empty_lines(buf: ReceiveBuffer) -> int:
    """Drops the empty lines at the start of a head as they arrive (RFC 9112, section 2.2: a server
    skips them) and says how many bytes they were. h11 took one a read: a request sent in one write
    behind an empty line waited unread for more bytes (408), and a stream of them was held without limit."""
    count = _EMPTY_LINES.match(buf._data).end()
    if count:
        buf.maybe_extract_at_most(count)
    return count


def first_line_problem(buf: ReceiveBuffer) -> tuple[int, str] | None:
    """Why the head received so far (empty lines dropped) cannot begin a request, as soon as that is
    known: its method is not token characters up to a space (binary, TLS, a leading space), or its
    first line, once ended, is no request line mitmproxy's parser reads (`EHLO example.com`, `GET /`:
    mitmproxy would wait for the head's end, then refuse it) or names another HTTP version (505)."""
    data = buf._data
    if TLS_RECORD_START.startswith(data):
        return None  # one or two bytes that may begin TLS: a third tells (gateway.proxy.tunnels)
    method = bytes(data[:64]).partition(b" ")[0]
    if data[:1] == b" " or not all(byte in TOKEN_BYTES for byte in method):
        return 400, TLS_REFUSED if starts_like_tls_record(data) else NOT_HTTP
    end = data.find(b"\n")
    if end == -1:
        return None
    request_line = bytes(data[:end]).removesuffix(b"\r")
    if unsupported_version(request_line):
        return 505, VERSION_REFUSED
    try:
        http1.read_request_head([request_line])
    except ValueError:
        return 400, NOT_HTTP
    return None


def unsupported_version(request_line: bytes) -> bool:
    """Whether a request line names an HTTP version but 1.0 or 1.1 (`HTTP/9.9`, `PRI * HTTP/2.0`)."""
    parts = request_line.split(b" ")
    return len(parts) == 3 and _VERSION.fullmatch(parts[2]) is not None and parts[2] not in HTTP1_VERSIONS
