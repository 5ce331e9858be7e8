"""WebSocket limits mitmproxy does not have (a contained reach into its WebsocketLayer, like erroranswer).

mitmproxy buffers every WebSocket message whole before its `websocket_message` hook, without limit,
inflates permessage-deflate frames without limit, and keeps every message of a connection in the
flow for the connection's life. A client (or upstream) could exhaust a worker's memory with one
endless fragmented message, one compressed bomb, or a long chat. Here:
- a message may hold at most the `websocket_max_message` option's bytes after inflation (the
  gateway sets it to `dlp.spool_threshold`: a message is scanned in memory like a body that is not
  spooled). Past that, the connection is closed on both sides with 1009 (message too big), nothing
  of that message is passed on, and the flow gets `flow.metadata[TOO_BIG]` = the direction;
- one inflation step yields at most that many bytes plus one (the bomb is stopped as it inflates);
- `ForgetMessages` (last in the addon chain) drops each message from the flow once every stage
  has handled it;
- control frames (ping and pong payloads, close reasons) reach no hook: a sensitive value in one is
  masked before mitmproxy relays (or logs) it, and the transfer is marked redacted.
`install()` checks the statements it relies on; tests fail loudly when a mitmproxy upgrade changes them.
"""

from __future__ import annotations

import inspect
import zlib
from collections.abc import Callable

import wsproto.events
from mitmproxy import http, optmanager
from mitmproxy.proxy.layers.websocket import WebsocketLayer
from wsproto.extensions import Extension, PerMessageDeflate
from wsproto.frame_protocol import (
    CloseReason,
    FrameDecoder,
    FrameProtocol,
    Opcode,
    RsvBits,
)

from gateway.dlp import mask_text
from gateway.proxy.patches import wrap_method
from gateway.transfer.edge import TOO_BIG
from gateway.transfer.model import METADATA_KEY, Reason

MESSAGE_LIMIT_OPTION = "websocket_max_message"


def install() -> None:
    wrap_method(WebsocketLayer, "start", _limit_messages,
                ("self.client_ws = WebsocketConnection(", "self.server_ws = WebsocketConnection(",
                 "yield WebsocketStartHook(self.flow)"))
    if "    _handle_event = start\n" not in inspect.getsource(WebsocketLayer):
        raise RuntimeError("mitmproxy's WebsocketLayer no longer starts with start(): review gateway/proxy/wslimits.py")
    WebsocketLayer._handle_event = WebsocketLayer.start  # the class attribute still named the unwrapped one
    wrap_method(PerMessageDeflate, "frame_inbound_payload_data", _bounded_inflation,
                ("return self._decompressor.decompress(bytes(data))",))
    if "self._frame_decoder = FrameDecoder(self.client, self.extensions)" not in inspect.getsource(FrameProtocol) \
            or "extension.frame_inbound_payload_data(self" not in inspect.getsource(FrameDecoder):
        raise RuntimeError("wsproto's frame decoding changed: review gateway/proxy/wslimits.py")


def add_options(options: optmanager.OptManager) -> None:
    options.add_option(MESSAGE_LIMIT_OPTION, int, 8 << 20,
                       "Largest WebSocket message, in bytes after inflation (1009 closes the connection past it).")


class MessageSizeLimit(Extension):
    """Last of a connection's extensions, so it counts the bytes as inflated; never negotiated."""

    name = "gateway-message-size-limit"

    def __init__(self, limit: int, on_exceeded: Callable[[], None]) -> None:
        self.limit = limit
        self.on_exceeded = on_exceeded
        self.size = 0  # bytes of the message being received
        self.control = False  # the frame being received is a control frame (PING, PONG, CLOSE)

    def enabled(self) -> bool:
        return True

    def offer(self) -> bool:
        return False  # never offered in a handshake: it only counts

    def frame_inbound_header(self, proto, opcode: Opcode, rsv: RsvBits, payload_length: int) -> RsvBits:
        # Control frames may come between a message's fragments: they neither count nor end it.
        self.control = opcode.iscontrol()
        return RsvBits(False, False, False)

    def frame_inbound_payload_data(self, proto, data: bytes) -> bytes | CloseReason:
        if self.control:
            return data
        self.size += len(data)
        if self.size > self.limit:
            self.on_exceeded()
            return CloseReason.MESSAGE_TOO_BIG
        return data

    def frame_inbound_complete(self, proto, fin: bool) -> None:
        if fin and not self.control:
            self.size = 0


def _limit_messages(original):
    def start(self, event):
        result = yield from original(self, event)
        limit = self.context.options.websocket_max_message
        for ws, direction in ((self.client_ws, "request"), (self.server_ws, "response")):
            extensions = ws._proto._frame_decoder.extensions  # the list inbound frames go through
            exceeded = _flag(self.flow, direction)
            for extension in extensions:
                if isinstance(extension, PerMessageDeflate):
                    extension.gateway_inflate_limit = (limit + 1, exceeded)
            extensions.append(MessageSizeLimit(limit, exceeded))
            ws.events = _masking_control_frames(ws.events, self.flow, direction)
        return result
    return start


def _masking_control_frames(events: Callable, flow: http.HTTPFlow, direction: str) -> Callable:
    def masked_events():
        for event in events():
            if isinstance(event, (wsproto.events.Ping, wsproto.events.Pong)) and event.payload:
                text = bytes(event.payload).decode("utf-8", "surrogateescape")
                if (masked := mask_text(text)) != text:
                    _note_masked(flow, direction, type(event).__name__.lower())
                    event = type(event)(payload=masked.encode("utf-8", "surrogateescape"))
            elif isinstance(event, wsproto.events.CloseConnection) and event.reason:
                if (masked := mask_text(event.reason)) != event.reason:
                    _note_masked(flow, direction, "close reason")
                    event = wsproto.events.CloseConnection(code=event.code, reason=masked)
            yield event
    return masked_events


def _note_masked(flow: http.HTTPFlow, direction: str, frame: str) -> None:
    transfer = flow.metadata.get(METADATA_KEY)
    if transfer is not None:
        where = f"{'client' if direction == 'request' else 'upstream'} websocket {frame}"
        transfer.escalate("redact", [Reason("websocket", "control-frame", where, "redact")])


def _flag(flow: http.HTTPFlow, direction: str) -> Callable[[], None]:
    def exceeded() -> None:
        flow.metadata.setdefault(TOO_BIG, direction)
    return exceeded


def _bounded_inflation(original):
    def frame_inbound_payload_data(self, proto, data):
        limit = getattr(self, "gateway_inflate_limit", None)
        if limit is None or not self._inbound_compressed or not self._inbound_is_compressible:
            return original(self, proto, data)
        bound, exceeded = limit
        try:
            inflated = self._decompressor.decompress(bytes(data), bound)
        except zlib.error:
            return CloseReason.INVALID_FRAME_PAYLOAD_DATA
        if self._decompressor.unconsumed_tail:  # more than the limit from this piece alone
            exceeded()
            return CloseReason.MESSAGE_TOO_BIG
        return inflated
    return frame_inbound_payload_data


class ForgetMessages:
    """The last addon: a message is dropped from the flow once every stage has handled it (mitmproxy
    would keep them all for the connection's life)."""

    def websocket_message(self, flow: http.HTTPFlow) -> None:
        if flow.websocket is not None:
            flow.websocket.messages.clear()
