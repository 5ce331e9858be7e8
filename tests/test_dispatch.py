"""The cached hook dispatch runs exactly the handlers mitmproxy's own manager runs, in its order."""

import asyncio
import json
import logging

from mitmproxy import exceptions, options
from mitmproxy.flow import Error
from mitmproxy.master import Master
from mitmproxy.proxy.layers.http import HttpRequestHook, HttpResponseHook
from mitmproxy.test import tflow

from gateway.filters import fail_closed
from gateway.proxy.dispatch import CachedHookDispatch
from gateway.transfer.model import METADATA_KEY, Transfer


class Recorder:
    def __init__(self, name: str, calls: list, children: list | None = None):
        self.name, self.calls = name, calls
        if children is not None:
            self.addons = children

    def request(self, flow):
        self.calls.append((self.name, "request"))

    async def response(self, flow):
        await asyncio.sleep(0)
        self.calls.append((self.name, "response"))


class Failing:
    name = "failing"

    def request(self, flow):
        raise ValueError("boom")


class Halting:
    name = "halting"

    def response(self, flow):
        raise exceptions.AddonHalt()


def run_hooks(cached: bool, *extra) -> list:
    async def main() -> list:
        calls: list = []
        master = Master(options.Options())
        if cached:
            CachedHookDispatch.install(master)
        child = Recorder("child", calls)
        master.addons.add(Recorder("first", calls, [child]), *extra, Recorder("last", calls))
        flow = tflow.tflow(resp=True)
        await master.addons.handle_lifecycle(HttpRequestHook(flow))
        await master.addons.handle_lifecycle(HttpResponseHook(flow))
        master.addons.add(Recorder("late", calls))  # added after the handlers were looked up
        await master.addons.handle_lifecycle(HttpRequestHook(flow))
        return calls

    return asyncio.run(main())


def test_same_handlers_in_the_same_order_as_mitmproxy():
    expected = run_hooks(cached=False)
    assert expected[:3] == [("first", "request"), ("child", "request"), ("last", "request")]
    assert run_hooks(cached=True) == expected
    assert ("late", "request") in expected


def test_a_failing_handler_is_logged_and_the_next_one_still_runs(caplog):
    with caplog.at_level(logging.ERROR):
        calls = run_hooks(True, Failing())
    assert ("last", "request") in calls
    assert any("Addon error: boom" in record.getMessage() for record in caplog.records)


def test_addon_halt_stops_the_event_like_mitmproxy():
    expected = run_hooks(False, Halting())
    assert ("last", "response") not in expected
    assert run_hooks(True, Halting()) == expected


def test_install_refuses_a_master_with_addons():
    async def main() -> None:
        master = Master(options.Options())
        master.addons.add(Recorder("x", []))
        try:
            CachedHookDispatch.install(master)
        except RuntimeError as e:
            assert "before adding addons" in str(e)
        else:
            raise AssertionError("installed over addons it would not know about")

    asyncio.run(main())


class FailingOn:
    """Raises in one hook, as a stage with a bug (or facing input nobody foresaw) would."""

    def __init__(self, hook: str):
        setattr(self, hook, self._fail)

    def _fail(self, flow):
        raise RecursionError("maximum recursion depth exceeded")


def test_the_gateway_fails_a_flow_closed_when_a_stage_raises():
    """Logged and passed on was fail-open: a body the DLP stage choked on crossed uninspected."""
    async def run(hook) -> tuple:
        master = Master(options.Options())
        CachedHookDispatch.install(master).on_error = fail_closed
        seen: list = []
        master.addons.add(FailingOn(hook.name), Recorder("record", seen))
        flow = tflow.tflow(resp=hook is HttpResponseHook)
        flow.metadata[METADATA_KEY] = transfer = Transfer("t-1", "forward", "127.0.0.1:5", "extranet", "h", 80)
        await master.addons.handle_lifecycle(hook(flow))
        return flow, transfer, seen

    async def both() -> list:  # one event loop: mitmproxy's log handler keeps the loop it was made on
        return [await run(HttpRequestHook), await run(HttpResponseHook)]

    (flow, transfer, seen), response_side = asyncio.run(both())
    assert flow.response.status_code == 500 and json.loads(flow.response.content)["transfer_id"] == "t-1"
    assert transfer.decision == "error" and list(transfer.reasons[0].locations) == ["request"]
    assert seen == [("record", "request")]  # the later stages still run: the record stage records it
    flow, transfer, seen = response_side
    assert flow.response.status_code == 200 and flow.error and flow.error.msg == Error.KILLED_MESSAGE
    assert transfer.decision == "error" and "RecursionError" in transfer.error
    assert seen == [("record", "response")]
