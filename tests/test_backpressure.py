"""The one extension point the gateway puts into mitmproxy must fail loudly when mitmproxy changes."""

from mitmproxy.proxy.server import ConnectionHandler

from gateway.proxy import backpressure


def test_install_accepts_this_mitmproxy_and_paces_server_event():
    backpressure.install()
    assert getattr(ConnectionHandler.server_event, "gateway_paced", False)
    backpressure.install()  # idempotent: a second engine in one process does not wrap twice
    assert ConnectionHandler.server_event.__qualname__.endswith("install.<locals>.server_event")


def test_install_refuses_a_changed_mitmproxy(monkeypatch):
    async def changed(self, event):  # a server_event that no longer hands the event to its layer
        return None

    monkeypatch.setattr(ConnectionHandler, "server_event", changed)
    try:
        backpressure.install()
    except RuntimeError as e:
        assert "review gateway/proxy/backpressure.py" in str(e)
    else:
        raise AssertionError("install() accepted a server_event it cannot pace")
