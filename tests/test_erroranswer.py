"""The error-answer extension point must fail loudly when mitmproxy changes the code it wraps."""

from mitmproxy.proxy.layers.http import HttpStream

from gateway import erroranswer


def test_install_accepts_this_mitmproxy_and_is_idempotent():
    erroranswer.install()
    wrapped = HttpStream.handle_protocol_error
    assert getattr(wrapped, "gateway_answers", False)
    erroranswer.install()  # a second engine in one process does not wrap twice
    assert HttpStream.handle_protocol_error is wrapped


def test_install_refuses_a_changed_mitmproxy(monkeypatch):
    def changed(self, event):  # an error path that no longer runs the error hook before answering
        yield from ()

    monkeypatch.setattr(HttpStream, "handle_protocol_error", changed)
    try:
        erroranswer.install()
    except RuntimeError as e:
        assert "review gateway/erroranswer.py" in str(e)
    else:
        raise AssertionError("install() accepted an error path it cannot answer from")
