"""Answers the gateway gives where mitmproxy would answer by itself (a contained reach into its internals).

When an upstream cannot be reached (refused, timed out, an untrusted certificate) or fails before
the client got anything, mitmproxy's HttpStream.handle_protocol_error runs the `error` hook and then
has the client layer write its own HTML 502, which no addon can touch; the gateway's answers must
all carry X-Gateway-Transfer-Id. Wrapped here (the behaviour mitmproxy PR #7999 proposes upstream):
before the hook, a flow that can still be answered gets `flow.metadata[ANSWER_STATUS]`, the status
mitmproxy would send and why; if the hook then sets `flow.response`, that response goes to the
client instead of mitmproxy's page. HttpStream.check_invalid (a request or response refused as a
smuggling risk) is wrapped the same way. Invariant: nothing changes for a flow whose client already
has part of a response, for client-side errors, or when the hook sets no response. The one client
errors answered are a request body's invalid framing (gateway.proxy.heads.MalformedBody), 400, and
its timing out (gateway.proxy.bodytimeout), 408, while nothing of the request has left (its head held with its body). A refused CONNECT closes its
connection.

A request naming no destination never becomes a flow: mitmproxy answers it 400 itself. Wrapped too:
that answer is replaced by the one the `malformed_request` hook (MalformedRequestHook, run before it
is sent) puts in `MalformedRequest.answer`, so the pipeline gives it a transfer id, a trace record and
a count like any other refused transfer (malformed heads: gateway.proxy.heads). An upstream connection
whose opening was cancelled half way is closed (mitmproxy left it open).

`install()` checks the statements it relies on; tests/test_erroranswer.py fails loudly when a
mitmproxy upgrade changes them.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

from mitmproxy import http
from mitmproxy.proxy import commands, layer
from mitmproxy.proxy.layers.http import DropStream, HttpStream, SendHttp
from mitmproxy.proxy.layers.http._events import (
    ErrorCode,
    HttpEvent,
    RequestProtocolError,
    ResponseData,
    ResponseEndOfMessage,
    ResponseHeaders,
    ResponseProtocolError,
)
from mitmproxy.proxy.server import ConnectionHandler

from gateway.proxy.heads import MalformedBody
from gateway.proxy.heldheads import head_held, request_held
from gateway.proxy.patches import relay, wrap_method
from gateway.transfer.edge import (
    ANSWER_STATUS,
    MALFORMED,
    UPSTREAM,
    MalformedRequest,
    MalformedRequestHook,
)


def install() -> None:
    wrap_method(HttpStream, "handle_protocol_error", _answer_upstream_failures,
          ("yield HttpErrorHook(self.flow)", "yield SendHttp(event, self.context.client)"))
    wrap_method(HttpStream, "check_invalid", _answer_invalid_messages,
          ("self.flow.error = flow.Error(err)", "yield HttpErrorHook(self.flow)",
           "ErrorCode.REQUEST_VALIDATION_FAILED"))
    wrap_method(HttpStream, "state_wait_for_request_headers", _answer_unknown_destinations,
          ("ErrorCode.DESTINATION_UNKNOWN",))
    wrap_method(HttpStream, "check_killed", _malformed_bodies_are_no_disconnects,
          ("for evt in self._paused_event_queue:", "if isinstance(evt, RequestProtocolError):"))
    wrap_method(HttpStream, "handle_connect_finish", _close_refused_tunnels,
          ("yield HttpConnectErrorHook(self.flow)",))
    wrap_method(ConnectionHandler, "open_connection", _close_abandoned_connections,
          ("await self.handle_hook(server_hooks.ServerConnectedHook(hook_data))",
           "await self.handle_connection(command.connection)"))


def _nothing_sent(stream: HttpStream) -> bool:
    """No byte of a response has gone to the client yet (a buffered one leaves only once complete)."""
    return stream.flow.response is None or head_held(stream) or stream.server_state in (
        stream.state_wait_for_response_headers, stream.state_consume_response_body)


def _answer_upstream_failures(original: Callable) -> Callable:
    def handle_protocol_error(self: HttpStream, event: HttpEvent) -> layer.CommandGenerator[None]:
        flow = self.flow
        if isinstance(event, RequestProtocolError) and request_held(self):
            # No upstream was told of the request (its head is held): mitmproxy must not tell it of the error.
            self.client_state = self.state_consume_request_body
        if isinstance(event, MalformedBody):  # answered only while nothing of the request has left
            status = event.status if self.client_state == self.state_consume_request_body else None
            cause = event.cause
        else:
            status = event.code.http_status_code() if isinstance(event, ResponseProtocolError) else None
            cause = getattr(event, "cause", UPSTREAM)  # a RefusedUpgrade (gateway.proxy.heads) has its own
        answerable = status is not None and _nothing_sent(self)
        if answerable:
            flow.metadata[ANSWER_STATUS] = (status, cause)
            answer_before = flow.response

        def substitute(command: commands.Command) -> layer.CommandGenerator[None] | None:
            if not answerable or flow.response is answer_before:
                return None
            if isinstance(command, SendHttp) and command.event is event:
                return _send(self, flow.response)
            if isinstance(event, MalformedBody) and isinstance(command, DropStream):
                return _then(_send(self, flow.response), command)  # mitmproxy sends nothing for it
            return None

        return (yield from relay(original(self, event), substitute))

    return handle_protocol_error


def _then(commands_first: layer.CommandGenerator[None], last: commands.Command) -> layer.CommandGenerator[None]:
    yield from commands_first
    yield last


def _malformed_bodies_are_no_disconnects(original: Callable) -> Callable:
    """After each hook mitmproxy peeks at the events queued meanwhile and takes a request protocol
    error among them for a client gone (the flow is killed, nothing answered). A MalformedBody is
    the client's own mistake, answered when its turn comes (_answer_upstream_failures)."""
    def check_killed(self: HttpStream, emit_error_hook: bool) -> layer.CommandGenerator[bool]:
        first_error = next((event for event in self._paused_event_queue
                            if isinstance(event, RequestProtocolError)), None)
        if isinstance(first_error, MalformedBody) and not self.flow.error:
            return False
        return (yield from original(self, emit_error_hook))

    return check_killed


def _close_refused_tunnels(original: Callable) -> Callable:
    """A CONNECT answered with a refusal: mitmproxy would keep the HTTP/1 connection open for another
    request; it is closed (the client asked for a tunnel, not a conversation)."""
    def handle_connect_finish(self: HttpStream) -> layer.CommandGenerator[None]:
        yield from original(self)
        if not 200 <= self.flow.response.status_code < 300 and self.context.client.alpn != b"h2":
            yield commands.CloseConnection(self.context.client)

    return handle_connect_finish


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

        return (yield from relay(original(self, request), substitute))

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

        return relay(original(self, event), substitute)

    return state_wait_for_request_headers


def _answer_unknown_destination(stream: HttpStream, error_page: SendHttp) -> layer.CommandGenerator[None]:
    malformed = MalformedRequest(str(uuid.uuid4()), stream.context.client, "request names no destination", 400)
    yield MalformedRequestHook(malformed)
    if malformed.answer is None:
        yield error_page
    else:
        yield from _send(stream, malformed.answer)



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


