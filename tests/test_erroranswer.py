"""The error-answer extension points must fail loudly when mitmproxy changes the code they wrap."""

import h2.connection
import h2.frame_buffer
import pytest
from mitmproxy.proxy.layers.http import HttpStream
from mitmproxy.proxy.layers.http._http1 import Http1Client, Http1Server

from gateway.proxy import answers, bodytimeout, h2limits, heads, heldheads


def install_all() -> None:
    """What the engine installs of the error-answer extension points."""
    answers.install()
    heads.install()
    heldheads.install()
    bodytimeout.install()
    h2limits.install()


def test_install_accepts_this_mitmproxy_and_is_idempotent():
    install_all()
    def wrapped() -> tuple:
        return (HttpStream.handle_protocol_error, HttpStream.state_wait_for_request_headers,
                HttpStream.check_invalid, Http1Server.read_headers, Http1Server._handle_event,
                Http1Client.read_headers, Http1Server.read_body, Http1Client.read_body,
                h2.connection.H2Connection.receive_data, h2.connection.H2Connection.send_data,
                HttpStream.start_request_stream, HttpStream.state_stream_request_body,
                HttpStream.start_response_stream, HttpStream.state_stream_response_body,
                HttpStream.check_killed, HttpStream.handle_connect_finish, h2.frame_buffer.FrameBuffer.__next__,
                HttpStream._handle_event, Http1Client.send)

    assert all(getattr(function, "gateway_answers", False) for function in wrapped())
    before = wrapped()
    install_all()  # a second engine in one process does not wrap twice
    assert wrapped() == before


@pytest.mark.parametrize("cls, name, module", [
    (HttpStream, "handle_protocol_error", "answers"), (Http1Server, "read_headers", "heads"),
    (HttpStream, "state_wait_for_request_headers", "answers"), (HttpStream, "check_invalid", "answers"),
    (Http1Client, "read_headers", "heads"), (Http1Server, "_handle_event", "heads"),
    (Http1Server, "read_body", "heads"), (Http1Client, "read_body", "heads"),
    (HttpStream, "start_request_stream", "heldheads"), (HttpStream, "state_stream_request_body", "heldheads"),
    (HttpStream, "start_response_stream", "heldheads"), (HttpStream, "state_stream_response_body", "heldheads"),
    (HttpStream, "check_killed", "answers"), (HttpStream, "handle_connect_finish", "answers"),
    (h2.frame_buffer.FrameBuffer, "__next__", "h2limits"), (HttpStream, "_handle_event", "bodytimeout"),
    (Http1Client, "send", "heads")])
def test_install_refuses_a_changed_mitmproxy(monkeypatch, cls, name, module):
    def changed(self, event):  # an error path that no longer answers the way the wrapper relies on
        yield from ()

    monkeypatch.setattr(cls, name, changed)
    with pytest.raises(RuntimeError, match=f"{cls.__name__}.{name} changed: review gateway/proxy/{module}.py"):
        install_all()


def test_install_refuses_a_changed_receive_buffer(monkeypatch):
    class Changed:  # h11 keeping its bytes elsewhere: the request-line check could not read them
        pass

    monkeypatch.setattr(heads, "ReceiveBuffer", Changed)
    with pytest.raises(RuntimeError, match="ReceiveBuffer changed"):
        install_all()
