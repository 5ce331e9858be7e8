"""A request body that stops arriving is answered 408, not held open.

mitmproxy waits for a request body's next byte as long as the connection lives (its `tcp_timeout`,
600 s without traffic), holding what arrived so far, in memory or in the spool. Here each request
stream watches its body: no byte of it for the `body_idle_timeout` option's seconds (the configuration's
`gateway.body_idle_timeout`) and it fails as a BodyTimedOut, which gateway.proxy.answers answers 408
with the transfer's id (nothing of a request has left before its body's verdict), and the record stage
records (rule `timeout`, type `body-idle`). So is one not finished within the `body_timeout` option's
seconds from its head (`gateway.body_timeout`, off unless set), as a BodyPastDeadline (type
`body-deadline`): a client sending a byte just often enough would hold it for ever. For HTTP/1 the
connection is then closed; for HTTP/2 the stream is answered and dropped.

The streams receiving a body are looked at together, once every WATCH_INTERVAL, by one timer per
worker, so a body is answered up to WATCH_INTERVAL after its timeout. (A wake-up of each stream's own,
a timer task per request with a body, cost about 20-25 us of a 1 KiB transfer's CPU.) A stream
past its timeout is then sent a wake-up as mitmproxy sends one a stream asked for.

`install()` checks the statements it relies on; tests/test_erroranswer.py fails loudly when a
mitmproxy upgrade changes them.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import time
from collections.abc import Callable

from mitmproxy import optmanager
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.layers.http import HttpLayer, HttpStream
from mitmproxy.utils import asyncio_utils
from mitmproxy.proxy.layers.http._events import ErrorCode, RequestData, RequestHeaders

from gateway.proxy.heads import MalformedBody
from gateway.proxy.patches import wrap_method
from gateway.transfer.edge import BODY_DEADLINE, BODY_IDLE, connection_handler

BODY_IDLE_OPTION = "body_idle_timeout"
BODY_TOTAL_OPTION = "body_timeout"
# How often the streams receiving a body are looked at: the most a body is answered past its timeout.
WATCH_INTERVAL = 1.0
# How mitmproxy routes a wake-up to the stream that asked for it, which _wake relies on.
_WAKEUP_ROUTE = "stream = self.command_sources.pop(event.command)"


class BodyTimedOut(MalformedBody):
    """No byte of a request body within the idle timeout: answered 408."""

    status = 408
    cause = BODY_IDLE


class BodyPastDeadline(BodyTimedOut):
    """A request body still not whole `body_timeout` after its head (however steadily it came): 408."""

    cause = BODY_DEADLINE


def install() -> None:
    if _WAKEUP_ROUTE not in inspect.getsource(HttpLayer._handle_event) or \
            "self.command_sources = {}" not in inspect.getsource(HttpLayer.__init__):
        raise RuntimeError("mitmproxy's HttpLayer changed: review gateway/proxy/bodytimeout.py")
    wrap_method(HttpStream, "_handle_event", _watch_request_bodies,
                ("yield from self.client_state(event)", "yield from self.handle_protocol_error(event)"))


def add_options(options: optmanager.OptManager) -> None:
    options.add_option(BODY_IDLE_OPTION, float, 60.0,
                       "Seconds a client may send no byte of a request body it has begun (408 after).")
    options.add_option(BODY_TOTAL_OPTION, float, 0.0,
                       "Seconds a client has to send a whole request body, from its head (408 after; 0: no limit).")


class _Watch:
    """The streams receiving a request body, looked at together by one timer (one per worker)."""

    def __init__(self) -> None:
        self.streams: list[HttpStream] = []
        self.timer: asyncio.TimerHandle | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def add(self, stream: HttpStream) -> None:
        loop = asyncio.get_running_loop()
        if loop is not self.loop:  # a new engine's loop (tests run several): the old one's streams are gone
            self.streams, self.timer, self.loop = [], None, loop
        self.streams.append(stream)
        if self.timer is None:
            self.timer = loop.call_later(WATCH_INTERVAL, self.look)

    def look(self) -> None:
        """Forget the streams whose body is whole (or cut); wake those past their timeout."""
        self.timer = None
        now, waiting = time.monotonic(), []
        for stream in self.streams:
            if not _receiving_body(stream):
                continue
            if min(_time_left(stream, now)) > 0.001:
                waiting.append(stream)
            else:
                _wake(stream)
        self.streams = waiting
        if waiting:
            self.timer = self.loop.call_later(WATCH_INTERVAL, self.look)


_WATCH = _Watch()


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
    if _receiving_body(stream) and not hasattr(stream, "gateway_body_started"):
        stream.gateway_body_started = stream.gateway_body_last = time.monotonic()
        _WATCH.add(stream)


def _time_left(stream: HttpStream, now: float) -> tuple[float, float]:
    """(seconds left before the stream's body is idle too long, before its deadline (inf: none))."""
    options = stream.context.options
    idle_left = stream.gateway_body_last + options.body_idle_timeout - now
    total_left = stream.gateway_body_started + options.body_timeout - now if options.body_timeout else math.inf
    return idle_left, total_left


def _wake(stream: HttpStream) -> None:
    """Send the stream a wake-up, as mitmproxy sends one a stream asked for: each HTTP layer on the way
    (a tunnel's outer one too) passes it to the layer below it that the request came through."""
    handler = connection_handler(stream.context.client)
    if handler is None:
        return  # the connection has ended
    wakeup = stream.gateway_body_wakeup = commands.RequestWakeup(0)
    layers = stream.context.layers
    for below, each in enumerate(layers, 1):
        if isinstance(each, HttpLayer):
            each.command_sources[wakeup] = layers[below]
    asyncio_utils.create_task(handler.server_event(events.Wakeup(wakeup)), name="request body timeout",
                              keep_ref=True, client=stream.context.client.peername)


def _idle_check(stream: HttpStream) -> layer.CommandGenerator[None]:
    stream.gateway_body_wakeup = None
    if not _receiving_body(stream):
        return
    options = stream.context.options
    idle_left, total_left = _time_left(stream, time.monotonic())
    if min(idle_left, total_left) > 0.001:  # a byte came meanwhile
        _WATCH.add(stream)
        return
    if idle_left <= total_left:  # the limit it reached first (the watch may see both past)
        timed_out, why = BodyTimedOut, f"no byte of it for {options.body_idle_timeout:g} s"
    else:
        timed_out, why = BodyPastDeadline, f"not received within {options.body_timeout:g} s"
    yield from stream.handle_protocol_error(timed_out(
        stream.stream_id, f"request body timed out: {why}", ErrorCode.GENERIC_CLIENT_ERROR))
