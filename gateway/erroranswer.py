"""Let the `error` hook answer an upstream failure: the second, last reach into mitmproxy internals.

When an upstream cannot be reached (refused, timed out, an untrusted certificate) mitmproxy's
HttpStream.handle_protocol_error runs the `error` hook and then has the client layer write its own
HTML 502, which no addon can touch; the gateway's answers must all carry X-Gateway-Transfer-Id.
Wrapped here (the behaviour mitmproxy PR #7999 proposes upstream): before the hook, a flow that can
still be answered gets `flow.metadata[ANSWER_STATUS]`, the status mitmproxy would send; if the hook
then sets `flow.response`, that response goes to the client instead of mitmproxy's page. Invariant:
nothing changes for a flow whose client already has response headers, for client-side errors, or
when the hook sets no response.

`install()` checks the two statements it relies on; tests/test_erroranswer.py fails loudly when a
mitmproxy upgrade changes them.
"""

from __future__ import annotations

import inspect

from mitmproxy import http
from mitmproxy.proxy import layer
from mitmproxy.proxy.layers.http import HttpStream, SendHttp
from mitmproxy.proxy.layers.http._events import HttpEvent, ResponseData, ResponseEndOfMessage, \
    ResponseHeaders, ResponseProtocolError

ANSWER_STATUS = "gateway_error_answer_status"
_RELIED_ON = ("yield HttpErrorHook(self.flow)", "yield SendHttp(event, self.context.client)")


def install() -> None:
    original = HttpStream.handle_protocol_error
    if getattr(original, "gateway_answers", False):
        return
    source = inspect.getsource(original)
    if not all(statement in source for statement in _RELIED_ON):
        raise RuntimeError("mitmproxy's HttpStream.handle_protocol_error changed: review gateway/erroranswer.py")

    def handle_protocol_error(self: HttpStream, event: HttpEvent) -> layer.CommandGenerator[None]:
        flow = self.flow
        status = event.code.http_status_code() if isinstance(event, ResponseProtocolError) else None
        answerable = status is not None and flow.response is None
        if answerable:
            flow.metadata[ANSWER_STATUS] = status
        commands = original(self, event)
        result = None
        while True:
            try:
                command = commands.send(result)
            except StopIteration as done:
                return done.value
            if (answerable and flow.response is not None and isinstance(command, SendHttp)
                    and command.event is event):
                result = yield from _send(self, flow.response)
            else:
                result = yield command

    handle_protocol_error.gateway_answers = True  # type: ignore[attr-defined]
    HttpStream.handle_protocol_error = handle_protocol_error  # type: ignore[method-assign]


def _send(stream: HttpStream, response: http.Response) -> layer.CommandGenerator[None]:
    content = response.raw_content or b""
    yield SendHttp(ResponseHeaders(stream.stream_id, response, not content), stream.context.client)
    if content:
        yield SendHttp(ResponseData(stream.stream_id, content), stream.context.client)
    yield SendHttp(ResponseEndOfMessage(stream.stream_id), stream.context.client)
