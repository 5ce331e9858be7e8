"""A held body's head waits with it: nothing of a message leaves before its body's verdict.

mitmproxy sends a streamed message's head at once (HttpStream.start_request_stream opens the
upstream connection and sends the request head; start_response_stream sends the client the
response head), so a body found bad afterwards could only be cut: the client saw an empty reply or
`200 OK` and a truncated body, and the upstream had already been told of the request. For a body
the gateway holds anyway (gateway.transfer.spool.HeldBody, set by the inspect stage) the head is
held too, here:
- a body that stayed under the spool threshold goes back to mitmproxy's buffered path, as if it
  had never been streamed: inspected, redacted or refused by the `request`/`response` hooks;
- a spooled one is judged when it ends: refused, the flow's answer (the refusal the inspect stage
  set) is sent like any other; clean, the `release_held_request` hook runs (the trace's open record
  is written then), then the head is sent (a request's upstream connection opened only then) and the
  body released from the spool.
A request body of unknown length held whole is given its Content-Length (`_give_length`). The body of
a request refused at its head is held the same way, to be dropped as it arrives
(gateway.filters.discard), where mitmproxy would buffer all of it before sending the refusal.

`install()` checks the statements it relies on; tests/test_erroranswer.py fails loudly when a
mitmproxy upgrade changes them.
"""

from __future__ import annotations

from collections.abc import Callable

from mitmproxy import http
from mitmproxy.proxy import layer
from mitmproxy.proxy.layers.http import HttpStream, SendHttp
from mitmproxy.proxy.layers.http._events import (
    RequestData,
    RequestEndOfMessage,
    RequestHeaders,
    RequestTrailers,
    ResponseData,
    ResponseEndOfMessage,
    ResponseHeaders,
    ResponseTrailers,
)

from gateway.proxy.patches import wrap_method
from gateway.transfer.edge import ReleaseHeldRequestHook
from gateway.transfer.spool import HeldBody

HELD_REQUEST, HELD_RESPONSE = "gateway_held_request", "gateway_held_response"


def install() -> None:
    wrap_method(HttpStream, "start_request_stream", _hold_request_head,
                ("ok = yield from self.make_server_connection()", "self.client_state = self.state_stream_request_body"))
    wrap_method(HttpStream, "state_stream_request_body", _judge_held_request,
                ("chunks = self.flow.request.stream(b\"\")", "yield HttpRequestHook(self.flow)"))
    wrap_method(HttpStream, "start_response_stream", _hold_response_head,
                ("self.server_state = self.state_stream_response_body",))
    wrap_method(HttpStream, "state_stream_response_body", _judge_held_response,
                ("chunks = self.flow.response.stream(b\"\")", "yield from self.send_response(already_streamed=True)"))


def request_held(stream: HttpStream) -> bool:
    """Whether nothing of this stream's request has left yet (its head held with its body)."""
    return getattr(stream, HELD_REQUEST, False)


def head_held(stream: HttpStream) -> bool:
    """Whether this stream's client still has nothing of its response (the head held with its body)."""
    return getattr(stream, HELD_RESPONSE, False)


def _hold_request_head(original: Callable) -> Callable:
    def start_request_stream(self: HttpStream) -> layer.CommandGenerator[None]:
        if not isinstance(self.flow.request.stream, HeldBody):
            return (yield from original(self))
        setattr(self, HELD_REQUEST, True)  # no upstream connection, no head sent: see _judge_held_request
        self.client_state = self.state_stream_request_body
        return None

    return start_request_stream


def _judge_held_request(original: Callable) -> Callable:
    def state_stream_request_body(self: HttpStream, event) -> layer.CommandGenerator[None]:
        if not getattr(self, HELD_REQUEST, False):
            return (yield from original(self, event))
        body: HeldBody = self.flow.request.stream
        if isinstance(event, RequestData):
            body.add(event.data)
            return None
        if isinstance(event, RequestTrailers):
            self.flow.request.trailers = event.trailers
            return None
        assert isinstance(event, RequestEndOfMessage)
        held = body.in_memory()
        passed = held is None and body.conclude()
        if passed:
            yield ReleaseHeldRequestHook(self.flow)  # the trace's open record, durable before the head leaves
            if (yield from self.check_killed(True)):
                return None
        if not passed or self.flow.response is not None:
            # Small enough to have stayed in memory, or refused: mitmproxy's buffered path inspects
            # it (the `request` hook) or sends the refusal set meanwhile.
            setattr(self, HELD_REQUEST, False)
            self.flow.request.stream = False
            self.request_body_buf += held or b""
            _give_length(self.flow.request, len(held or b""))
            return (yield from self.state_consume_request_body(event))
        ok = yield from self.make_server_connection()
        setattr(self, HELD_REQUEST, False)
        if not ok:
            self.client_state = self.state_errored
            return None
        _give_length(self.flow.request, body.spool.size)
        yield SendHttp(RequestHeaders(self.stream_id, self.flow.request, end_stream=False), self.context.server)
        return (yield from original(self, event))  # releases the spooled body, then the `request` hook

    return state_stream_request_body


def _give_length(request: http.Request, size: int) -> None:
    """A request body of unknown length (HTTP/2 without content-length), now held whole, is given its
    length: mitmproxy would send it to an HTTP/1 upstream with neither Content-Length nor chunked
    framing, so the upstream read no body and took the body's bytes for its next request (smuggling)."""
    if size and "content-length" not in request.headers and "transfer-encoding" not in request.headers:
        request.headers["content-length"] = str(size)


def _hold_response_head(original: Callable) -> Callable:
    def start_response_stream(self: HttpStream) -> layer.CommandGenerator[None]:
        if not isinstance(self.flow.response.stream, HeldBody):
            return (yield from original(self))
        setattr(self, HELD_RESPONSE, True)  # the client gets nothing yet: see _judge_held_response
        self.server_state = self.state_stream_response_body
        return None

    return start_response_stream


def _judge_held_response(original: Callable) -> Callable:
    def state_stream_response_body(self: HttpStream, event) -> layer.CommandGenerator[None]:
        if not head_held(self):
            return (yield from original(self, event))
        body: HeldBody = self.flow.response.stream
        if isinstance(event, ResponseData):
            body.add(event.data)
            return None
        if isinstance(event, ResponseTrailers):
            self.flow.response.trailers = event.trailers
            return None
        assert isinstance(event, ResponseEndOfMessage)
        held = body.in_memory()
        if held is not None:
            setattr(self, HELD_RESPONSE, False)
            self.flow.response.stream = False
            self.response_body_buf += held
            return (yield from self.state_consume_response_body(event))  # the `response` hook inspects it
        passed = body.conclude()
        setattr(self, HELD_RESPONSE, False)
        if not passed:  # the inspect stage set the refusal as the flow's response: it goes out whole
            self.flow.response.stream = False
            return (yield from self.send_response())
        yield SendHttp(ResponseHeaders(self.stream_id, self.flow.response, end_stream=False), self.context.client)
        return (yield from original(self, event))  # releases the spooled body, then the `response` hook

    return state_stream_response_body
