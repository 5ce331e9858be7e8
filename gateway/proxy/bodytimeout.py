"""A request body that stops arriving is answered 408, not held open.

mitmproxy waits for a request body's next byte as long as the connection lives (its `tcp_timeout`,
600 s without traffic), holding what arrived so far, in memory or in the spool. Here each request
stream watches its body: no byte of it for the `body_idle_timeout` option's seconds (the configuration's
`gateway.body_idle_timeout`) and it fails as a BodyTimedOut, which gateway.proxy.answers answers 408
with the transfer's id (nothing of a request has left before its body's verdict), and the record stage
records. So is one not finished within the `body_timeout` option's seconds from its head
(`gateway.body_timeout`, off unless set): a client sending a byte just often enough would hold it
for ever. For HTTP/1 the connection is then closed; for HTTP/2 the stream is answered and dropped.

`install()` checks the statements it relies on; tests/test_erroranswer.py fails loudly when a
mitmproxy upgrade changes them.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from mitmproxy import optmanager
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.layers.http import HttpStream
from mitmproxy.proxy.layers.http._events import ErrorCode, RequestData, RequestHeaders

from gateway.proxy.heads import MalformedBody
from gateway.proxy.patches import wrap_method
from gateway.transfer.edge import TIMEOUT

BODY_IDLE_OPTION = "body_idle_timeout"
BODY_TOTAL_OPTION = "body_timeout"
# A stream is looked at this often while its body arrives, not once per timeout: mitmproxy cannot
# cancel a wake-up, and one pending holds its stream, and so the finished flow and its bodies, until due.
WATCH_INTERVAL = 1.0


class BodyTimedOut(MalformedBody):
    """No byte of a request body within the idle timeout: answered 408."""

    status = 408
    cause = TIMEOUT


def install() -> None:
    wrap_method(HttpStream, "_handle_event", _watch_request_bodies,
                ("yield from self.client_state(event)", "yield from self.handle_protocol_error(event)"))


def add_options(options: optmanager.OptManager) -> None:
    options.add_option(BODY_IDLE_OPTION, float, 60.0,
                       "Seconds a client may send no byte of a request body it has begun (408 after).")
    options.add_option(BODY_TOTAL_OPTION, float, 0.0,
                       "Seconds a client has to send a whole request body, from its head (408 after; 0: no limit).")


def _watch_request_bodies(original: Callable) -> Callable:
    def _handle_event(self: HttpStream, event: events.Event) -> layer.CommandGenerator[None]:
        # Not a generator itself: the events it does not watch get the original's generator as they did.
        if isinstance(event, events.Wakeup) and event.command is getattr(self, "gateway_body_wakeup", None):
            return _idle_check(self)
        if isinstance(event, RequestData):
            self.gateway_body_last = time.monotonic()
        elif isinstance(event, RequestHeaders) and not event.end_stream:
            return _watch_body(self, original(self, event))
        return original(self, event)

    return _handle_event


def _receiving_body(stream: HttpStream) -> bool:
    return stream.client_state in (stream.state_consume_request_body, stream.state_stream_request_body)


def _watch_body(stream: HttpStream, produced: layer.CommandGenerator[None]) -> layer.CommandGenerator[None]:
    yield from produced  # the request head's hooks
    if _receiving_body(stream) and getattr(stream, "gateway_body_wakeup", None) is None:
        stream.gateway_body_started = stream.gateway_body_last = time.monotonic()
        yield from _wakeup(stream, stream.context.options.body_idle_timeout)


def _wakeup(stream: HttpStream, delay: float) -> layer.CommandGenerator[None]:
    stream.gateway_body_wakeup = commands.RequestWakeup(min(delay, WATCH_INTERVAL))
    yield stream.gateway_body_wakeup


def _idle_check(stream: HttpStream) -> layer.CommandGenerator[None]:
    stream.gateway_body_wakeup = None
    if not _receiving_body(stream):
        return
    options, now = stream.context.options, time.monotonic()
    idle_left = stream.gateway_body_last + options.body_idle_timeout - now
    total_left = stream.gateway_body_started + options.body_timeout - now if options.body_timeout else idle_left
    if min(idle_left, total_left) > 0.001:
        yield from _wakeup(stream, min(idle_left, total_left))
        return
    why = f"no byte of it for {options.body_idle_timeout:g} s" if idle_left <= 0.001 else \
        f"not received within {options.body_timeout:g} s"
    yield from stream.handle_protocol_error(BodyTimedOut(
        stream.stream_id, f"request body timed out: {why}", ErrorCode.GENERIC_CLIENT_ERROR))
