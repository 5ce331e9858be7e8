"""HTTP/2 floods: an HTTP/2 client resetting streams faster than RESET_RATE a second (after a burst of
RESET_BURST), or sending control frames faster than CONTROL_RATE (after CONTROL_BURST), has its
connection ended with ENHANCE_YOUR_CALM ("rapid reset", control floods; an upstream flooding control
frames fails with a plain protocol error). A frame announcing more than the connection's maximum frame
size ends the connection with GOAWAY (FRAME_SIZE_ERROR) as soon as its header has arrived.

`install()` checks the statements it relies on; tests/test_erroranswer.py fails loudly when an h2 or
mitmproxy upgrade changes them.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.frame_buffer
import hyperframe.frame
from mitmproxy.proxy import layer
from mitmproxy.proxy.layers.http._http2 import Http2Server

from gateway.proxy.patches import wrap_method

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


def install() -> None:
    wrap_method(Http2Server, "handle_h2_event", _limit_stream_resets,
          ("isinstance(event, h2.events.RequestReceived)", "return (yield from super().handle_h2_event(event))"))
    wrap_method(h2.connection.H2Connection, "receive_data", _limit_control_frames,
          ("for frame in self.incoming_buffer:", "return events"))
    wrap_method(h2.connection.H2Connection, "send_data", _credit_window_updates,
          ("self.outbound_flow_control_window -= frame_size",))
    wrap_method(h2.frame_buffer.FrameBuffer, "__next__", _refuse_overlong_frames_at_their_header,
          ("if len(self._data) < length + 9:", "self._validate_frame_length(length)"))


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


def _refuse_overlong_frames_at_their_header(original: Callable) -> Callable:
    """h2 checks a frame's length against the maximum only once the whole frame has arrived: garbage
    whose first bytes announce 8 MiB made it wait for them, the connection held open without an answer
    until the head deadline (31 s). The length is checked as soon as the frame header is in, and the
    FrameTooLargeError ends the connection with GOAWAY like any other HTTP/2 protocol error."""
    def __next__(self: h2.frame_buffer.FrameBuffer) -> hyperframe.frame.Frame:
        if len(self._data) >= FRAME_HEADER_SIZE:
            self._validate_frame_length(int.from_bytes(self._data[:3], "big"))
        return original(self)

    return __next__


FRAME_HEADER_SIZE = 9  # a 24-bit length, then type, flags and stream id (RFC 9113, section 4.1)


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


