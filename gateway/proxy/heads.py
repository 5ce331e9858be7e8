"""HTTP/1 heads and framing mitmproxy would wait on, buffer without limit or fail on unrecorded.

A request head too malformed to parse (or whose framing is invalid) never becomes a flow: mitmproxy's
Http1Server answers it 400 itself. Wrapped here: that answer is replaced by the one the
`malformed_request` hook (MalformedRequestHook) puts in `MalformedRequest.answer`, so the pipeline
records and counts it like any other refused transfer. A head still unfinished after MAX_REQUEST_HEAD
bytes is refused 431 the same way, where mitmproxy would buffer it without limit; an upstream's
response head past MAX_RESPONSE_HEAD fails that upstream (502), and one mitmproxy cannot parse fails
it once (mitmproxy failed the stream again when the connection closed, and crashed). Bytes that
cannot begin an HTTP request (a binary or other protocol, TLS on a listener's own port, a first line
that is no request line: gateway.proxy.requestline) are refused 400 as soon as they arrive, and a head
not finished within the `request_head_timeout` option from its first byte is refused 408 (a
slowloris), where mitmproxy would wait for the end of a head that never comes, or for the
connection's idle timeout. An HTTP/1 message with trailers, which mitmproxy cannot pass on (it raises,
and the connection ends unanswered and unrecorded), is that message's protocol error instead: a
request's is answered 400 with its transfer id (nothing of it has left) and recorded, an upstream's
answered 502 like any upstream failure.
An upstream's interim (1xx) responses are dropped before its final one is read. Its 101 to any
protocol but WebSocket fails it (502, a RefusedUpgrade): mitmproxy sent the client that 101, then
closed the connection (with `rawtcp` it would relay both ways uninspected). An HTTP/2
client's request trailers (inspected like a head by the inspect stage) are dropped toward an HTTP/1
upstream: mitmproxy cannot write them there (it raised after the body, leaving the upstream
connection without the message's end).

`install()` checks the statements it relies on; tests/test_erroranswer.py fails loudly when a
mitmproxy upgrade changes them.
"""

from __future__ import annotations

import inspect
import re
import time
import uuid
from collections.abc import Callable

import h11._readers
import wsproto.handshake
from h11._receivebuffer import ReceiveBuffer
from mitmproxy import http, optmanager
from mitmproxy.net.http import http1
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.layers.http import HttpStream
from mitmproxy.proxy.layers.http._base import ReceiveHttp
from mitmproxy.proxy.layers.http._events import (
    ErrorCode,
    RequestProtocolError,
    RequestTrailers,
    ResponseHeaders,
    ResponseProtocolError,
)
from mitmproxy.proxy.layers.http._http1 import Http1Client, Http1Server

from gateway.proxy.patches import relay, wrap_method
from gateway.proxy.requestline import VERSION_REFUSED, drop_empty_lines, first_line_problem, unsupported_version
from gateway.transfer.edge import MALFORMED, TRAILERS, UPGRADE, MalformedRequest, MalformedRequestHook

# Request heads (request line and headers) longer than this are refused 431, as web servers do
# (nginx's default allows 4 buffers of 8 KiB for a whole head).
MAX_REQUEST_HEAD = 64 * 1024
MAX_REQUEST_FIELDS = 100  # header fields in a request head (Apache's LimitRequestFields)
# A chunk size that fits in 63 bits, as nginx reads it (h11 takes up to 20 hex digits, then waits for
# a chunk that never ends). Set into h11's chunk reader by install().
CHUNK_SIZE = rb"0*[0-7]?[0-9A-Fa-f]{1,15}"
H11_CHUNK_SIZE = rb"([0-9A-Fa-f]){1,20}"
MAX_RESPONSE_HEAD = 256 * 1024  # upstreams' heads get more room (long cookie and CSP headers)
HEAD_TIMEOUT_OPTION = "request_head_timeout"
TRAILERS_REFUSED = "HTTP/1 trailers are not passed on (they would cross uninspected)"


def install() -> None:
    wrap_method(Http1Server, "read_headers", _answer_malformed_heads,
          ("request_head = self.buf.maybe_extract_lines()", "except ValueError as e:", "if self.request:",
           "yield commands.SendData(self.conn, make_error_response(400, str(e)))"))
    wrap_method(Http1Server, "_handle_event", _take_head_deadlines, ("yield from self.state(event)",))
    if not isinstance(getattr(ReceiveBuffer(), "_data", None), bytearray):
        raise RuntimeError("h11's ReceiveBuffer changed (no _data bytearray): review gateway/proxy/heads.py")
    wrap_method(Http1Client, "read_headers", _limit_response_heads,
          ("response_head = self.buf.maybe_extract_lines()", "self.state = self.read_body",
           'f"Cannot parse HTTP response: {e}"'))
    for cls in (Http1Server, Http1Client):
        wrap_method(cls, "read_body", _read_body,
              ('raise NotImplementedError(f"HTTP trailers are not implemented yet.")',
               "yield commands.CloseConnection(self.conn)", 'f"HTTP/1 protocol error: {e}"',
               "code=self.ReceiveProtocolError.code"))
    if not all(statement in inspect.getsource(HttpStream.send_response) for statement in WEBSOCKET_TEST):
        raise RuntimeError("HttpStream.send_response changed how it tells a WebSocket: review gateway/proxy/heads.py")
    wrap_method(Http1Client, "send", _drop_request_trailers, ('raise AssertionError(f"Unexpected event: {event}")',))
    chunk_header = h11._readers.chunk_header_re.pattern
    if CHUNK_SIZE not in chunk_header:
        if H11_CHUNK_SIZE not in chunk_header:
            raise RuntimeError("h11's chunk_header_re changed: review gateway/proxy/heads.py")
        h11._readers.chunk_header_re = re.compile(chunk_header.replace(H11_CHUNK_SIZE, CHUNK_SIZE))


def add_options(options: optmanager.OptManager) -> None:
    options.add_option(HEAD_TIMEOUT_OPTION, float, 30.0,
                       "Seconds a client has to send a whole request head, from its first byte (408 after).")


def _answer_malformed_heads(original: Callable) -> Callable:
    def read_headers(self: Http1Server, event: events.Event) -> layer.CommandGenerator[None]:
        received = isinstance(event, events.DataReceived)
        dropped = drop_empty_lines(self.buf) if received else 0
        problem = _head_problem(self.buf) if received else None
        if problem is not None:
            # Before mitmproxy parses it: a head that arrived in one write is as limited as one in pieces.
            yield from _refuse_head(self, *problem)
            return
        refused = False

        def substitute(command: commands.Command) -> layer.CommandGenerator[None] | None:
            nonlocal refused
            if isinstance(command, commands.SendData):  # the only data read_headers sends: its 400
                refused = True
                # mitmproxy's reason quotes the client's bytes (a URL may hold personal data): not kept.
                return _answer_malformed(self, 400, "request head could not be parsed", command.data)
            if refused and isinstance(command, ReceiveHttp):
                # A head that parsed but whose framing did not (an invalid Content-Length): mitmproxy
                # would now open a flow for it, already answered; it is one malformed request instead.
                return _nothing()
            return None

        yield from relay(original(self, event), substitute)
        if self.request is not None or self.state == self.done:
            self.gateway_head_started = None
        elif (problem := first_line_problem(self.buf)) is not None:
            # mitmproxy would wait for a head that never comes, or relay the bytes raw in a tunnel.
            yield from _refuse_head(self, *problem)
        elif (self.buf or dropped) and getattr(self, "gateway_head_started", None) is None:
            # Empty lines begin a head too: a client sending nothing else is cut off like a slowloris.
            self.gateway_head_started = time.monotonic()
            if getattr(self, "gateway_head_wakeup", None) is None:
                yield from _request_head_wakeup(self, self.context.options.request_head_timeout)

    return read_headers


def _head_problem(buf: ReceiveBuffer) -> tuple[int, str] | None:
    """Why the request head received so far is refused before it is parsed, if it is: longer than
    MAX_REQUEST_HEAD (mitmproxy would buffer an unfinished one without limit, its own FIXME, and pass
    a finished one of any size), more than MAX_REQUEST_FIELDS fields, or not HTTP/1.0 or 1.1 (an
    h2c preface `PRI * HTTP/2.0` inside a tunnel, `HTTP/9.9`)."""
    data = buf._data
    if _head_too_long(data, MAX_REQUEST_HEAD):
        return 431, f"request head larger than {MAX_REQUEST_HEAD} bytes"
    end = _HEAD_END.search(data, 0, MAX_REQUEST_HEAD)
    if end is None:
        return None
    if data.count(b"\n", 0, end.start()) > MAX_REQUEST_FIELDS:
        # Lines, not fields (a field may be folded over several): more lines than fields allowed is enough.
        return 431, f"request head with more than {MAX_REQUEST_FIELDS} header fields"
    if unsupported_version(bytes(data[:end.start()]).split(b"\n", 1)[0].rstrip(b"\r")):
        return 505, VERSION_REFUSED
    return None


_HEAD_END = re.compile(rb"\n\r?\n")


def _head_too_long(data: bytearray, limit: int) -> bool:
    """Whether the head at the start of `data` is longer than `limit` bytes, counted up to and with the
    empty line that ends it: known once `limit` bytes have come without its end, however the head was
    cut into reads (not from what the buffer held when one arrived)."""
    return len(data) >= limit and _HEAD_END.search(data, 0, limit) is None


def _refuse_head(server: Http1Server, status: int, reason: str) -> layer.CommandGenerator[None]:
    yield from _answer_malformed(server, status, reason, _plain_answer(status, reason))
    yield commands.CloseConnection(server.conn)
    server.buf = ReceiveBuffer()  # the connection is done: free what it sent at once
    server.state = server.done


def _request_head_wakeup(server: Http1Server, delay: float) -> layer.CommandGenerator[None]:
    server.gateway_head_wakeup = commands.RequestWakeup(delay)
    yield server.gateway_head_wakeup


def _take_head_deadlines(original: Callable) -> Callable:
    """The wake-ups read_headers asked for come back here; every other event goes on as before.
    One wake-up is outstanding per connection at a time: a head begun after an earlier one finished
    gets the time left to it when that wake-up comes."""
    def _handle_event(self: Http1Server, event: events.Event) -> layer.CommandGenerator[None]:
        # Not a generator itself: every other event gets the original's generator, with no extra layer.
        if isinstance(event, events.Wakeup) and event.command is getattr(self, "gateway_head_wakeup", None):
            return _head_deadline_reached(self)
        return original(self, event)

    return _handle_event


def _head_deadline_reached(server: Http1Server) -> layer.CommandGenerator[None]:
    server.gateway_head_wakeup = None
    started = getattr(server, "gateway_head_started", None)
    if started is None or server.state != server.read_headers:
        return
    timeout = server.context.options.request_head_timeout
    left = started + timeout - time.monotonic()
    if left > 0.001:
        yield from _request_head_wakeup(server, left)
    else:
        yield from _refuse_head(server, 408, f"request head not received within {timeout:g} s")


def _answer_malformed(server: Http1Server, status: int, reason: str, fallback: bytes) -> layer.CommandGenerator[None]:
    malformed = MalformedRequest(str(uuid.uuid4()), server.conn, reason, status, server.context.server.address)
    yield MalformedRequestHook(malformed)
    answer = fallback if malformed.answer is None else http1.assemble_response(malformed.answer)
    yield commands.SendData(server.conn, answer)


def _nothing() -> layer.CommandGenerator[None]:
    yield from ()


def _plain_answer(status: int, reason: str) -> bytes:
    return http1.assemble_response(http.Response.make(status, reason.encode(), {"Connection": "close"}))


def _limit_response_heads(original: Callable) -> Callable:
    def read_headers(self: Http1Client, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.DataReceived) and self.request is not None:
            _drop_interim_responses(self.buf)
            if self.stream_id is not None and _head_too_long(self.buf._data, MAX_RESPONSE_HEAD):
                # Before mitmproxy parses it: it takes a finished head of any size (one finished by the
                # read that took it past the limit passed), and would buffer an endless one without limit.
                yield commands.CloseConnection(self.conn)
                _stop_reading(self)
                yield ReceiveHttp(ResponseProtocolError(
                    self.stream_id, f"response head larger than {MAX_RESPONSE_HEAD} bytes",
                    ErrorCode.GENERIC_SERVER_ERROR))
                return
        refused = False

        def substitute(command: commands.Command) -> layer.CommandGenerator[None] | None:
            nonlocal refused
            if refused:
                return _nothing()  # the 101's empty body, then what follows it as raw data: none of it goes on
            if not isinstance(command, ReceiveHttp):
                return None
            if isinstance(command.event, ResponseHeaders) and _uninspectable_upgrade(self, command.event.response):
                refused = True
                return _refuse_upgrade(self, command.event.response)
            if isinstance(command.event, ResponseProtocolError):
                # A head it could not parse: mitmproxy closes the connection but stays in read_headers, so
                # the close it sees next fails the stream a second time ("server closed connection"). The
                # client, answered 502 meanwhile, is on its next request: Http1Server asserted on the id.
                _stop_reading(self)
            return None

        yield from relay(original(self, event), substitute)
        if refused:
            _stop_reading(self)

    return read_headers


# How mitmproxy's HttpStream.send_response tells a WebSocket handshake, which it goes on with; after
# any other 101 it only closes the connection (rawtcp is off). _uninspectable_upgrade tells it alike.
WEBSOCKET_TEST = ('self.flow.response.headers.get("upgrade", "").lower() == "websocket"',
                  'self.flow.request.headers.get("Sec-WebSocket-Version", "").encode()',
                  "== wsproto.handshake.WEBSOCKET_VERSION", "and self.context.options.websocket")


def _uninspectable_upgrade(client: Http1Client, response: http.Response) -> bool:
    return response.status_code == 101 and not (
        response.headers.get("upgrade", "").lower() == "websocket"
        and client.request.headers.get("Sec-WebSocket-Version", "").encode() == wsproto.handshake.WEBSOCKET_VERSION
        and client.context.options.websocket)


class RefusedUpgrade(ResponseProtocolError):
    """An upstream's 101 to a protocol the gateway cannot inspect: answered 502 and recorded as
    refused (gateway.filters.record), where mitmproxy sent the client the 101, then closed."""

    cause = UPGRADE


def _refuse_upgrade(client: Http1Client, response: http.Response) -> layer.CommandGenerator[None]:
    yield commands.CloseConnection(client.conn)
    protocol = response.headers.get("upgrade", "")[:64]
    yield ReceiveHttp(RefusedUpgrade(client.stream_id, f"upstream switched protocols to {protocol!r}: "
                                     "only WebSocket is inspected", ErrorCode.GENERIC_SERVER_ERROR))


def _stop_reading(client: Http1Client) -> None:
    client.buf = ReceiveBuffer()
    client.state = client.done


def _drop_interim_responses(buf: ReceiveBuffer) -> None:
    """An upstream's interim responses (1xx: 103 Early Hints, an unasked 100 Continue) are dropped, as
    mitmproxy does over HTTP/2: it would take the first for the final response, answer the client
    with it, and take the real one for garbage. 101 stays: it is the final answer to an upgrade."""
    while (end := _HEAD_END.search(buf._data, 0, MAX_RESPONSE_HEAD)) is not None \
            and (status := _INTERIM_STATUS.match(buf._data, 0, end.start())) is not None \
            and status.group(1) != b"101":
        buf.maybe_extract_lines()


_INTERIM_STATUS = re.compile(rb"HTTP/1\.[01] (1[0-9][0-9])[ \r\n]")


def _drop_request_trailers(original: Callable) -> Callable:
    def send(self: Http1Client, event) -> layer.CommandGenerator[None]:
        if isinstance(event, RequestTrailers):
            return _nothing()
        return original(self, event)

    return send


def _read_body(original: Callable) -> Callable:
    def read_body(self: Http1Server | Http1Client, event: events.Event) -> layer.CommandGenerator[None]:
        try:
            produced = original(self, event)
            return (yield from (_answer_bad_framing(self, produced) if isinstance(self, Http1Server) else produced))
        except NotImplementedError as exc:
            if "trailers" not in str(exc):
                raise
        if isinstance(self, Http1Server):  # answered first, then the connection is closed
            self.state = self.done
            self.buf = ReceiveBuffer()
            yield ReceiveHttp(RefusedTrailers(self.stream_id, TRAILERS_REFUSED, self.ReceiveProtocolError.code))
            return None
        yield commands.CloseConnection(self.conn)
        self.state = self.done
        code = self.ReceiveProtocolError.code
        yield ReceiveHttp(self.ReceiveProtocolError(self.stream_id, TRAILERS_REFUSED, code=code))
        return None

    return read_body


class MalformedBody(RequestProtocolError):
    """A request body whose framing is invalid (a chunk size that is not hexadecimal, or too large):
    answered 400 by gateway.proxy.answers while nothing of the request has left."""

    status = 400
    cause = MALFORMED


class RefusedTrailers(MalformedBody):
    """HTTP/1 request trailers, which mitmproxy cannot pass on: answered 400 like a framing error."""

    cause = TRAILERS


def _answer_bad_framing(server: Http1Server, produced: layer.CommandGenerator[None]) -> layer.CommandGenerator[None]:
    """mitmproxy closes the connection on a request body's framing error, then reports the error, so
    the client gets no answer: here the error comes first (as a MalformedBody) and the connection is
    closed after the answer, and nothing more is read from it."""
    result = None
    while True:
        try:
            command = produced.send(result)
        except StopIteration as done:
            return done.value
        if isinstance(command, commands.CloseConnection) and command.connection is server.conn:
            try:
                following = produced.send(None)
            except StopIteration as done:
                yield command
                return done.value
            error = getattr(following, "event", None)
            if type(error) is RequestProtocolError and error.message.startswith("HTTP/1 protocol error"):
                server.state = server.done
                server.buf = ReceiveBuffer()
                result = yield ReceiveHttp(MalformedBody(error.stream_id, error.message, error.code))
                continue
            yield command
            command = following
        result = yield command
