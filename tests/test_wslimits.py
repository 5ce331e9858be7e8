"""WebSocket limits at wsproto's level: inflation is bounded step by step, and install() fails loudly
when mitmproxy or wsproto change the code it relies on."""

import pytest
import wsproto
from mitmproxy.proxy.layers.websocket import WebsocketLayer
from mitmproxy.test import tflow
from wsproto.events import BytesMessage, CloseConnection, Ping
from wsproto.extensions import PerMessageDeflate

from gateway.proxy import wslimits

LIMIT = 1 << 20


def deflate_pair() -> tuple[wsproto.Connection, wsproto.Connection, PerMessageDeflate]:
    """A client and a server that negotiated permessage-deflate, as mitmproxy sets them up."""
    client_deflate, server_deflate = PerMessageDeflate(), PerMessageDeflate()
    offer = client_deflate.offer()
    accepted = server_deflate.accept(offer)
    client_deflate.finalize(accepted)
    client = wsproto.Connection(wsproto.ConnectionType.CLIENT, [client_deflate])
    server = wsproto.Connection(wsproto.ConnectionType.SERVER, [server_deflate])
    return client, server, server_deflate


def test_a_deflate_bomb_is_stopped_while_it_inflates():
    wslimits.install()
    client, server, deflate = deflate_pair()
    flagged = []
    deflate.gateway_inflate_limit = (LIMIT + 1, lambda: flagged.append(True))

    wire = client.send(BytesMessage(data=bytes(64 << 20)))  # 64 MiB of zeros
    assert len(wire) < 256 << 10
    server.receive_data(wire)
    events = list(server.events())
    assert [type(e) for e in events] == [CloseConnection] and events[0].code == 1009
    assert flagged == [True]
    # Without the bound the same bytes inflate whole in one step.
    _, unbounded, _ = deflate_pair()
    unbounded.receive_data(wire)
    assert sum(len(e.data) for e in unbounded.events() if isinstance(e, BytesMessage)) == 64 << 20


def test_a_message_over_the_limit_is_closed_1009_and_flagged():
    flagged = []
    server = wsproto.Connection(wsproto.ConnectionType.SERVER, [])
    client = wsproto.Connection(wsproto.ConnectionType.CLIENT, [])
    server._proto._frame_decoder.extensions.append(wslimits.MessageSizeLimit(LIMIT, lambda: flagged.append(1)))
    server.receive_data(client.send(BytesMessage(data=bytes(LIMIT))))  # at the limit: passes
    server.receive_data(client.send(BytesMessage(data=b"x" * 1000, message_finished=False)))
    server.receive_data(client.send(BytesMessage(data=bytes(LIMIT), message_finished=True)))  # fragments add up
    kinds = [(type(e).__name__, getattr(e, "code", None)) for e in server.events()]
    assert kinds[0] == ("BytesMessage", None) and kinds[-1] == ("CloseConnection", 1009) and flagged == [1]


def test_install_refuses_a_changed_websocket_layer(monkeypatch):
    def start(self, event):
        yield from ()

    monkeypatch.setattr(WebsocketLayer, "start", start)
    with pytest.raises(RuntimeError, match="WebsocketLayer.start changed: review gateway/proxy/wslimits.py"):
        wslimits.install()


def test_messages_are_forgotten_once_handled():
    flow = tflow.twebsocketflow()
    assert flow.websocket.messages
    wslimits.ForgetMessages().websocket_message(flow)
    assert flow.websocket.messages == []


def test_pings_between_fragments_do_not_restart_the_count():
    """A PING is a final frame of its own: it must not end the message it interrupts."""
    flagged = []
    server = wsproto.Connection(wsproto.ConnectionType.SERVER, [])
    client = wsproto.Connection(wsproto.ConnectionType.CLIENT, [])
    server._proto._frame_decoder.extensions.append(wslimits.MessageSizeLimit(1000, lambda: flagged.append(1)))
    for _ in range(4):
        server.receive_data(client.send(BytesMessage(data=bytes(400), message_finished=False)))
        server.receive_data(client.send(Ping(payload=b"p")))
    kinds = [(type(e).__name__, getattr(e, "code", None)) for e in server.events()]
    assert kinds[-1] == ("CloseConnection", 1009) and flagged == [1], kinds
    assert sum(name == "BytesMessage" for name, _ in kinds) == 2  # the third 400 bytes pass the limit
