"""The upstream deadline's bookkeeping (gateway.proxy.upstreamdeadline): one timer for every request
in flight, and answered requests leave nothing that grows. The 504 a silent upstream gets is checked
end to end in test_upstream_failures."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from mitmproxy.test import tflow

from gateway.proxy.upstreamdeadline import UpstreamDeadline


def _deadline(timeout: float) -> UpstreamDeadline:
    config = SimpleNamespace(upstream_timeout=timeout)
    return UpstreamDeadline(SimpleNamespace(runtime=SimpleNamespace(config=config)))


def _sent():
    flow = tflow.tflow()
    flow.response = None
    return flow


def test_answered_requests_leave_a_bounded_heap_and_one_timer():
    async def run() -> None:
        deadline = _deadline(60.0)
        for _ in range(5000):
            flow = _sent()
            deadline.request(flow)
            deadline.responseheaders(flow)
        assert not deadline._waiting
        assert len(deadline._deadlines) <= 64 + 1, len(deadline._deadlines)
        assert deadline._timer is not None and not deadline._timer.cancelled()

    asyncio.run(run())


def test_a_request_past_its_deadline_is_timed_out_and_a_shortened_timeout_counts_at_once():
    async def run() -> None:
        deadline = _deadline(60.0)
        expired = []
        deadline._expired = lambda flow, timeout: expired.append((flow, timeout))
        slow, answered = _sent(), _sent()
        deadline.request(slow)
        deadline.request(answered)
        deadline.response(answered)
        deadline.gateway.runtime.config.upstream_timeout = 0.05  # a reload shortened it
        quick = _sent()
        deadline.request(quick)
        await asyncio.sleep(0.3)
        assert expired == [(quick, 0.05)]
        assert set(deadline._waiting) == {slow.id}  # still within its 60 s
        assert deadline._timer is not None

    asyncio.run(run())
