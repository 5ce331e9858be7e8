"""Backpressure while a spooled body is released: the one place the gateway reaches into mitmproxy.

mitmproxy's ConnectionHandler.server_event runs all the commands an event produces without awaiting,
and drains its write buffers only after it has read more input. A body released from the spool at the
end of a transfer is produced in one such run, so all of it would wait in a socket's write buffer in
memory. Here each run is paced: it stops once a connection's write buffer is above HIGH_WATER, the
buffers are drained, and the same run resumes. Invariant: at most HIGH_WATER plus one chunk is
buffered per connection, and the layer's commands keep their order (one run at a time per handler).

`install()` checks that mitmproxy still calls `self.layer.handle_event(event)` in server_event and still
has `drain_writers`; tests/test_backpressure.py fails loudly when an upgrade changes that.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Iterator

from mitmproxy.proxy import commands, events
from mitmproxy.proxy.server import ConnectionHandler

HIGH_WATER = 4 * 1024 * 1024
_CALL_SITE = "self.layer.handle_event(event)"


class _PacedCommands:
    """The layer's commands, stopping (resumably) whenever a write buffer is above HIGH_WATER."""

    def __init__(self, handler: ConnectionHandler, source: Iterator[commands.Command]):
        self.handler = handler
        self.source = source
        self.paused = False
        self._wrote = False

    def __iter__(self) -> "_PacedCommands":
        return self

    def __next__(self) -> commands.Command:
        # Only a write can raise a buffer above HIGH_WATER: check after writes, not after every command.
        self.paused = self._wrote and self._over_high_water()
        if self.paused:
            raise StopIteration
        command = next(self.source)
        self._wrote = isinstance(command, commands.SendData)
        return command

    def _over_high_water(self) -> bool:
        for io in self.handler.transports.values():
            writer = io.writer
            if writer is not None and writer.transport.get_write_buffer_size() > HIGH_WATER:
                return True
        return False


class _Replay:
    """Stands in for the handler's layer during one run, handing server_event the paced commands."""

    def __init__(self, paced: _PacedCommands):
        self.paced = paced

    def handle_event(self, event: events.Event) -> _PacedCommands:
        return self.paced


def install() -> None:
    if getattr(ConnectionHandler.server_event, "gateway_paced", False):
        return
    unpaced = ConnectionHandler.server_event
    if _CALL_SITE not in inspect.getsource(unpaced) or not hasattr(ConnectionHandler, "drain_writers"):
        raise RuntimeError("mitmproxy's ConnectionHandler changed: review gateway/proxy/backpressure.py")

    async def server_event(self: ConnectionHandler, event: events.Event) -> None:
        lock = self.__dict__.setdefault("_gateway_run_lock", asyncio.Lock())
        async with lock:
            layer = self.layer
            paced = _PacedCommands(self, layer.handle_event(event))
            while True:
                self.layer = _Replay(paced)
                try:
                    await unpaced(self, event)
                finally:
                    self.layer = layer
                if not paced.paused:
                    return
                await self.drain_writers()

    server_event.gateway_paced = True
    ConnectionHandler.server_event = server_event
