"""Answers the gateway gives where mitmproxy would answer by itself (a contained reach into its internals).

When an upstream cannot be reached (refused, timed out, an untrusted certificate) or fails before
the client got anything, mitmproxy's HttpStream.handle_protocol_error runs the `error` hook and then
has the client layer write its own HTML 502, which no addon can touch; the gateway's answers must
all carry X-Gateway-Transfer-Id. Wrapped here (the behaviour mitmproxy PR #7999 proposes upstream):
before the hook, a flow that can still be answered gets `flow.metadata[ANSWER_STATUS]`, the status
mitmproxy would send and why; if the hook then sets `flow.response`, that response goes to the
client instead of mitmproxy's page. HttpStream.check_invalid (a request or response refused as a
smuggling risk) is wrapped the same way. Invariant: nothing changes for a flow whose client already
has part of a response, for client-side errors, or when the hook sets no response.

A request head too malformed to parse (or whose framing is invalid) never becomes a flow here:
mitmproxy's Http1Server answers it 400 itself (and HttpStream does, for a request naming no
destination). Wrapped too: that answer is replaced by the one the `malformed_request` hook
(MalformedRequestHook, run before it is sent) puts in `MalformedRequest.answer`, so the pipeline
stages give it a transfer id, a trace record and a count like any other refused transfer. A head
still unfinished after MAX_REQUEST_HEAD bytes is refused 431 the same way, where mitmproxy would
buffer it without limit; an upstream's response head past MAX_RESPONSE_HEAD fails that upstream
(502, as above). Bytes that cannot begin an HTTP request (a binary or other protocol, say inside a
CONNECT tunnel) are refused 400 at once, and a head not finished within the `request_head_timeout`
option from its first byte is refused 408 (a slowloris, or a protocol where the server speaks first),
where mitmproxy would wait for the connection's idle timeout. An HTTP/1 message with trailers, which
mitmproxy cannot pass on (it raises, and the connection ends unanswered and unrecorded), is that
message's protocol error instead: a request's is recorded and its connection closed, an upstream's
answered 502 like any upstream failure. An HTTP/2 client resetting streams faster than RESET_RATE
a second (after a burst of RESET_BURST), or sending control frames faster than CONTROL_RATE (after
CONTROL_BURST), has its connection ended with ENHANCE_YOUR_CALM ("rapid reset", control floods; an
upstream flooding control frames fails with a plain protocol error), and an upstream connection whose opening was cancelled half way is closed (mitmproxy left it open).

`install()` checks the statements it relies on; tests/test_erroranswer.py fails loudly when a
mitmproxy upgrade changes them.
"""

from __future__ import annotations

import asyncio
import inspect
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import h2.connection
import h2.errors
import h2.events
import h2.exceptions
from h11._receivebuffer import ReceiveBuffer
from mitmproxy import connection, http, optmanager
from mitmproxy.net.http import http1
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.server import ConnectionHandler
from mitmproxy.proxy.layers.http import HttpStream, SendHttp
from mitmproxy.proxy.layers.http._base import ReceiveHttp
from mitmproxy.proxy.layers.http._http1 import Http1Client, Http1Server
from mitmproxy.proxy.layers.http._http2 import Http2Server
from mitmproxy.proxy.layers.http._events import ErrorCode, HttpEvent, ResponseData, ResponseEndOfMessage, \
    ResponseHeaders, ResponseProtocolError

# flow.metadata key: (status, UPSTREAM or MALFORMED) when the error hook may answer the client.
ANSWER_STATUS = "gateway_error_answer"
UPSTREAM, MALFORMED = "upstream", "malformed"
# Request heads (request line and headers) longer than this are refused 431, as web servers do
# (nginx's default allows 4 buffers of 8 KiB for a whole head).
MAX_REQUEST_HEAD = 64 * 1024
MAX_RESPONSE_HEAD = 256 * 1024  # upstreams' heads get more room (long cookie and CSP headers)
HEAD_TIMEOUT_OPTION = "request_head_timeout"
TRAILERS_REFUSED = "HTTP/1 trailers are not passed on (they would cross uninspected)"
# An HTTP/2 client resetting streams faster than this ends its connection (CVE-2023-44487, "rapid
# reset": each reset stream still costs a flow begun and ended, and floods of them stalled a worker).
RESET_BURST = 100
RESET_RATE = 20.0  # resets a second, after the burst
RESETS_REFUSED = "too many HTTP/2 stream resets (rapid reset)"
# Frames that cost the gateway work but ask nothing of an upstream: a client sending them by the
# hundred thousand a second kept a worker's core busy and other clients waiting seconds (measured with
# WINDOW_UPDATE). A download's own WINDOW_UPDATEs are earned by the DATA frames sent (_credit_window_updates).
CONTROL_EVENTS = (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged, h2.events.PingReceived,
                  h2.events.PriorityUpdated)
CONTROL_BURST = 20_000
CONTROL_RATE = 10_000.0  # frames a second, after the burst
CONTROL_REFUSED = "too many HTTP/2 control frames (WINDOW_UPDATE, SETTINGS, PING or PRIORITY flood)"
# RFC 9110 token characters: a request line starts with a method made of them, then a space.
TOKEN_BYTES = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


@dataclass
class MalformedRequest:
    """A request head that could not be parsed: no flow, nothing forwarded."""

    id: str
    client: connection.Client
    reason: str
    status: int                          # 400; 408 for a head too slow, 431 for one too long
    upstream: tuple[str, int] | None = None  # where the connection leads, when known (a CONNECT tunnel's target)
    transfer: object | None = None       # the pipeline's Transfer for it (set by the identify stage)
    answer: http.Response | None = None  # what the client gets instead of mitmproxy's page


@dataclass
class MalformedRequestHook(commands.StartHook):
    malformed: MalformedRequest


def install() -> None:
    wrap_method(HttpStream, "handle_protocol_error", _answer_upstream_failures,
          ("yield HttpErrorHook(self.flow)", "yield SendHttp(event, self.context.client)"))
    wrap_method(Http1Server, "read_headers", _answer_malformed_heads,
          ("request_head = self.buf.maybe_extract_lines()", "except ValueError as e:", "if self.request:",
           "yield commands.SendData(self.conn, make_error_response(400, str(e)))"))
    wrap_method(Http1Server, "_handle_event", _take_head_deadlines, ("yield from self.state(event)",))
    if not isinstance(getattr(ReceiveBuffer(), "_data", None), bytearray):
        raise RuntimeError("h11's ReceiveBuffer changed (no _data bytearray): review gateway/erroranswer.py")
    wrap_method(HttpStream, "check_invalid", _answer_invalid_messages,
          ("self.flow.error = flow.Error(err)", "yield HttpErrorHook(self.flow)",
           "ErrorCode.REQUEST_VALIDATION_FAILED"))
    wrap_method(HttpStream, "state_wait_for_request_headers", _answer_unknown_destinations,
          ("ErrorCode.DESTINATION_UNKNOWN",))
    wrap_method(Http1Client, "read_headers", _limit_response_heads,
          ("response_head = self.buf.maybe_extract_lines()", "self.state = self.read_body"))
    for cls in (Http1Server, Http1Client):
        wrap_method(cls, "read_body", _refuse_trailers,
              ('raise NotImplementedError(f"HTTP trailers are not implemented yet.")',
               "code=self.ReceiveProtocolError.code"))
    wrap_method(ConnectionHandler, "open_connection", _close_abandoned_connections,
          ("await self.handle_hook(server_hooks.ServerConnectedHook(hook_data))",
           "await self.handle_connection(command.connection)"))
    wrap_method(Http2Server, "handle_h2_event", _limit_stream_resets,
          ("isinstance(event, h2.events.RequestReceived)", "return (yield from super().handle_h2_event(event))"))
    wrap_method(h2.connection.H2Connection, "receive_data", _limit_control_frames,
          ("for frame in self.incoming_buffer:", "return events"))
    wrap_method(h2.connection.H2Connection, "send_data", _credit_window_updates,
          ("self.outbound_flow_control_window -= frame_size",))


def add_options(options: optmanager.OptManager) -> None:
    options.add_option(HEAD_TIMEOUT_OPTION, float, 30.0,
                       "Seconds a client has to send a whole request head, from its first byte (408 after).")


def wrap_method(cls: type, name: str, wrapper: Callable, relied_on: tuple[str, ...]) -> None:
    """Replace cls.name by wrapper(original), once, after checking the original still holds the
    statements the wrapper relies on (an upgrade that changes them fails loudly at start)."""
    original = getattr(cls, name)
    if getattr(original, "gateway_answers", False):
        return  # a second engine in one process
    if not all(statement in inspect.getsource(original) for statement in relied_on):
        raise RuntimeError(f"{cls.__module__}.{cls.__name__}.{name} changed: "
                           f"review {wrapper.__module__.replace('.', '/')}.py")
    wrapped = wrapper(original)
    wrapped.gateway_answers = True
    setattr(cls, name, wrapped)


Substitute = Callable[[commands.Command], layer.CommandGenerator[None] | None]


def _relay(produced: layer.CommandGenerator[None], substitute: Substitute) -> layer.CommandGenerator[None]:
    """A layer method's commands passed on (with their results sent back), except those that
    `substitute` replaces with commands of its own."""
    result = None
    while True:
        try:
            command = produced.send(result)
        except StopIteration as done:
            return done.value
        replacement = substitute(command)
        if replacement is None:
            result = yield command
        else:
            result = yield from replacement


def _nothing_sent(stream: HttpStream) -> bool:
    """No byte of a response has gone to the client yet (a buffered one leaves only once complete)."""
    return stream.flow.response is None or stream.server_state in (
        stream.state_wait_for_response_headers, stream.state_consume_response_body)


def _answer_upstream_failures(original: Callable) -> Callable:
    def handle_protocol_error(self: HttpStream, event: HttpEvent) -> layer.CommandGenerator[None]:
        flow = self.flow
        status = event.code.http_status_code() if isinstance(event, ResponseProtocolError) else None
        answerable = status is not None and _nothing_sent(self)
        if answerable:
            flow.metadata[ANSWER_STATUS] = (status, UPSTREAM)
            answer_before = flow.response

        def substitute(command: commands.Command) -> layer.CommandGenerator[None] | None:
            if answerable and flow.response is not answer_before and isinstance(command, SendHttp) \
                    and command.event is event:
                return _send(self, flow.response)
            return None

        return (yield from _relay(original(self, event), substitute))

    return handle_protocol_error


def _answer_invalid_messages(original: Callable) -> Callable:
    """A request (or an upstream's response head) mitmproxy refuses as a smuggling risk: it runs the
    error hook, then answers 400 (502) with its own page, which the hook's answer replaces."""
    def check_invalid(self: HttpStream, request: bool) -> layer.CommandGenerator[bool]:
        flow = self.flow
        answer_before = flow.response

        def substitute(command: commands.Command) -> layer.CommandGenerator[None] | None:
            if flow.error is not None and ANSWER_STATUS not in flow.metadata:
                # check_invalid sets the error before its first command: mark it before the hooks run.
                flow.metadata[ANSWER_STATUS] = (400, MALFORMED) if request else (502, UPSTREAM)
            if isinstance(command, SendHttp) and isinstance(command.event, ResponseProtocolError) \
                    and command.connection is self.context.client and flow.response is not answer_before:
                return _send(self, flow.response)
            return None

        return (yield from _relay(original(self, request), substitute))

    return check_invalid


def _send(stream: HttpStream, response: http.Response) -> layer.CommandGenerator[None]:
    """`response` instead of mitmproxy's own page. An HTTP/1 request the client has not finished
    sending leaves the connection's framing unknown, so it is then closed, as mitmproxy would."""
    client = stream.context.client
    content = response.raw_content or b""
    yield SendHttp(ResponseHeaders(stream.stream_id, response, not content), client)
    if content:
        yield SendHttp(ResponseData(stream.stream_id, content), client)
    yield SendHttp(ResponseEndOfMessage(stream.stream_id), client)
    if stream.client_state != stream.state_done and client.alpn != b"h2":
        yield commands.CloseConnection(client)


def _answer_malformed_heads(original: Callable) -> Callable:
    def read_headers(self: Http1Server, event: events.Event) -> layer.CommandGenerator[None]:
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

        yield from _relay(original(self, event), substitute)
        if self.request is not None or self.state == self.done or not self.buf:
            self.gateway_head_started = None
        elif len(self.buf) > MAX_REQUEST_HEAD:
            # Still no end of the head: mitmproxy would buffer it without limit (its own FIXME).
            yield from _refuse_head(self, 431, f"request head larger than {MAX_REQUEST_HEAD} bytes")
        elif not _could_start_request(self.buf):
            # mitmproxy would wait for a head that never comes, or relay the bytes raw in a tunnel.
            yield from _refuse_head(self, 400, "not an HTTP request")
        elif getattr(self, "gateway_head_started", None) is None:
            self.gateway_head_started = time.monotonic()
            if getattr(self, "gateway_head_wakeup", None) is None:
                yield from _request_head_wakeup(self, self.context.options.request_head_timeout)

    return read_headers


def _could_start_request(buf: ReceiveBuffer) -> bool:
    """Whether the head received so far can begin a request line: after any empty lines (RFC 9112
    lets servers skip them), a method's token characters up to the first space."""
    start = bytes(buf._data[:64]).lstrip(b"\r\n")
    method = start.partition(b" ")[0]
    return (not start or start[0] != 0x20) and all(byte in TOKEN_BYTES for byte in method)


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


def _answer_unknown_destinations(original: Callable) -> Callable:
    """A request with neither an absolute URL nor a Host header: mitmproxy answers 400 before any hook."""
    def state_wait_for_request_headers(self: HttpStream, event: HttpEvent) -> layer.CommandGenerator[None]:
        request = getattr(event, "request", None)
        if request is not None and request.host:
            return original(self, event)  # it names its destination: nothing to watch for (the usual case)

        def substitute(command: commands.Command) -> layer.CommandGenerator[None] | None:
            if isinstance(command, SendHttp) and isinstance(command.event, ResponseProtocolError) \
                    and command.event.code == ErrorCode.DESTINATION_UNKNOWN:
                return _answer_unknown_destination(self, command)
            return None

        return _relay(original(self, event), substitute)

    return state_wait_for_request_headers


def _answer_unknown_destination(stream: HttpStream, error_page: SendHttp) -> layer.CommandGenerator[None]:
    malformed = MalformedRequest(str(uuid.uuid4()), stream.context.client, "request names no destination", 400)
    yield MalformedRequestHook(malformed)
    if malformed.answer is None:
        yield error_page
    else:
        yield from _send(stream, malformed.answer)


def _nothing() -> layer.CommandGenerator[None]:
    yield from ()


def _plain_answer(status: int, reason: str) -> bytes:
    return http1.assemble_response(http.Response.make(status, reason.encode(), {"Connection": "close"}))


def _limit_response_heads(original: Callable) -> Callable:
    def read_headers(self: Http1Client, event: events.Event) -> layer.CommandGenerator[None]:
        yield from original(self, event)
        if self.response is None and self.stream_id is not None and self.state != self.done \
                and len(self.buf) > MAX_RESPONSE_HEAD:
            # An upstream that never ends its head would be buffered without limit: it has failed.
            yield commands.CloseConnection(self.conn)
            self.buf = ReceiveBuffer()
            self.state = self.done
            yield ReceiveHttp(ResponseProtocolError(
                self.stream_id, f"response head larger than {MAX_RESPONSE_HEAD} bytes", ErrorCode.GENERIC_SERVER_ERROR))

    return read_headers


def _close_abandoned_connections(original: Callable) -> Callable:
    """mitmproxy closes an upstream connection only in handle_connection. Cancelled between connecting
    and getting there (its client connection ended meanwhile, say by a flood of reset streams), it
    left the socket open for good: close it."""
    async def open_connection(self: ConnectionHandler, command: commands.OpenConnection) -> None:
        try:
            await original(self, command)
        except asyncio.CancelledError:
            io = self.transports.pop(command.connection, None)
            if io is not None and io.writer is not None:
                io.writer.close()
            raise

    return open_connection


def _limit_stream_resets(original: Callable) -> Callable:
    """A token bucket per HTTP/2 client connection: RESET_BURST stream resets at once, RESET_RATE a
    second after that; past it, or past the control-frame budget (`_limit_control_frames`), the
    connection ends with ENHANCE_YOUR_CALM (its open streams fail as errors)."""
    def handle_h2_event(self: Http2Server, event: h2.events.Event) -> layer.CommandGenerator[bool]:
        refused = None
        if isinstance(event, h2.events.StreamReset) and event.remote_reset:
            if not _bucket(self, "_gateway_resets", RESET_BURST, RESET_RATE).take():
                refused = RESETS_REFUSED
        elif isinstance(event, ControlFlood):
            refused = CONTROL_REFUSED
        if refused is not None:
            yield from self.protocol_error(refused, h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
            return True
        return (yield from original(self, event))

    return handle_h2_event


class ControlFlood(h2.exceptions.ProtocolError):
    """Raised from receive_data past the control-frame budget; mitmproxy hands it on as an event."""


def _limit_control_frames(original: Callable) -> Callable:
    """A token bucket per HTTP/2 connection for frames that ask nothing of the other side's stream
    (counted here, before mitmproxy's buffering layer swallows the WINDOW_UPDATE events). Each DATA
    frame this side sends earns the two WINDOW_UPDATE frames (stream and connection) a peer may
    answer it with (`_credit_window_updates`), so a fast download never runs the bucket dry."""
    def receive_data(self: h2.connection.H2Connection, data) -> list[h2.events.Event]:
        events = original(self, data)
        control = sum(isinstance(event, CONTROL_EVENTS) for event in events)
        if control and not _control_bucket(self).take(control):
            raise ControlFlood(CONTROL_REFUSED)
        return events

    return receive_data


def _credit_window_updates(original: Callable) -> Callable:
    def send_data(self: h2.connection.H2Connection, *args, **kwargs) -> None:
        original(self, *args, **kwargs)
        _control_bucket(self).give(2)

    return send_data


class TokenBucket:
    """`burst` tokens at first, refilled at `rate` a second, never above `burst`."""

    __slots__ = ("burst", "rate", "tokens", "since")

    def __init__(self, burst: float, rate: float) -> None:
        self.burst, self.rate = burst, rate
        self.tokens, self.since = burst, time.monotonic()

    def take(self, count: int = 1) -> bool:
        """Take `count` tokens; False when that runs the bucket dry."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.since) * self.rate) - count
        self.since = now
        return self.tokens >= 0

    def give(self, count: int) -> None:
        self.tokens = min(self.burst, self.tokens + count)


def _bucket(holder: object, attribute: str, burst: float, rate: float) -> TokenBucket:
    """The bucket kept in holder.attribute, made full on first use."""
    bucket = getattr(holder, attribute, None)
    if bucket is None:
        bucket = TokenBucket(burst, rate)
        setattr(holder, attribute, bucket)
    return bucket


def _control_bucket(connection: h2.connection.H2Connection) -> TokenBucket:
    return _bucket(connection, "_gateway_control_frames", CONTROL_BURST, CONTROL_RATE)


def _refuse_trailers(original: Callable) -> Callable:
    def read_body(self: Http1Server | Http1Client, event: events.Event) -> layer.CommandGenerator[None]:
        try:
            return (yield from original(self, event))
        except NotImplementedError as exc:
            if "trailers" not in str(exc):
                raise
        yield commands.CloseConnection(self.conn)
        self.state = self.done
        code = self.ReceiveProtocolError.code
        yield ReceiveHttp(self.ReceiveProtocolError(self.stream_id, TRAILERS_REFUSED, code=code))
        return None

    return read_body
