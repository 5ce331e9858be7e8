"""A trace writer alive but not answering (SIGSTOP: a hung disk looks the same to a worker), issue 20 item 3.

Within `trace.append_timeout` every transfer gets an answer: 503 with its transfer id, nothing forwarded
when its open record is the one not made durable, the answer withheld when its completion is. When the
writer resumes, transfers pass again with no restart, and the log verifies.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest

from tests.gatewayproc import (
    free_port,
    gateway_config,
    listener_url,
    metric_total,
    start_gateway,
    start_upstream,
    trace_records,
    write_config,
)
from tests.test_workers import verify

ID_NUMBER = "11010519491231002X"
APPEND_TIMEOUT = 2.0
MARGIN = 2.0  # seconds allowed past the timeout on a loaded machine


@pytest.fixture
def lab(tmp_path):
    port = free_port("127.0.0.2")
    config = gateway_config(tmp_path / "state", workers=2)
    config["trace"]["append_timeout"] = f"{APPEND_TIMEOUT}s"
    upstream = start_upstream("127.0.0.2", port, tmp_path / "upstream.log")
    process = start_gateway(write_config(tmp_path / "gateway.yaml", config))
    writer = int(next(line for line in process.lines if "trace writer pid" in line).rsplit(" ", 1)[1])
    stopped = False

    def stop_writer() -> None:
        nonlocal stopped
        os.kill(writer, signal.SIGSTOP)
        stopped = True

    def resume_writer() -> None:
        nonlocal stopped
        os.kill(writer, signal.SIGCONT)
        stopped = False

    yield {"root": tmp_path, "config": config, "proxy": listener_url(config, "forward"),
           "upstream": f"http://127.0.0.2:{port}", "gateway": process, "stop_writer": stop_writer,
           "resume_writer": resume_writer}
    if stopped:
        os.kill(writer, signal.SIGCONT)
    process.stop(timeout=30)
    upstream.stop()


def received(lab) -> str:
    log = lab["root"] / "upstream.log"
    return log.read_text() if log.exists() else ""


def timed_get(lab, url: str) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    with httpx.Client(proxy=lab["proxy"], timeout=60) as client:
        response = client.get(url)
    return response, time.monotonic() - started


def test_a_stalled_trace_writer_gets_transfers_answered_503_and_recovers_without_restart(lab):
    ok, _ = timed_get(lab, f"{lab['upstream']}/text?body=ok&m=before")
    assert ok.status_code == 200

    # The open record is not durable in time: refused, the upstream never hears of it.
    lab["stop_writer"]()
    refused, took = timed_get(lab, f"{lab['upstream']}/text?body=ok&m=unopened")
    print(f"open record stalled: {refused.status_code} after {took:.2f} s")
    assert refused.status_code == 503 and took < APPEND_TIMEOUT + MARGIN, (refused.status_code, took)
    assert refused.json()["transfer_id"] == refused.headers["x-gateway-transfer-id"]
    assert refused.json()["error"] == "trace log unavailable"
    assert "m=unopened" not in received(lab)

    # The writer is now known to be stalled: the next transfer (one refused on its content) is answered
    # 503 at once, and its record is not handed over to land later. Each worker learns it from its own
    # timed-out append: a first try that reaches the other worker waits out the timeout, the next cannot.
    for attempt in range(2):
        with httpx.Client(proxy=lab["proxy"], timeout=60) as client:
            started = time.monotonic()
            blocked = client.post(f"{lab['upstream']}/echo?m=blocked", json={"sfzh": ID_NUMBER})
            took = time.monotonic() - started
        print(f"while known stalled, try {attempt + 1}: {blocked.status_code} after {took:.2f} s")
        assert blocked.status_code == 503 and took < APPEND_TIMEOUT + MARGIN, (blocked.status_code, took)
        assert blocked.json()["transfer_id"] == blocked.headers["x-gateway-transfer-id"]
        if took < 1.0:
            break
    assert took < 1.0, f"refused after {took:.2f} s on both workers, not at once"
    assert "m=blocked" not in received(lab)
    lab["resume_writer"]()

    # The completion is not durable in time: the upstream's answer is withheld, the client gets 503.
    answer: list[tuple[httpx.Response, float]] = []

    def slow() -> None:
        with httpx.Client(proxy=lab["proxy"], timeout=60) as client:
            response = client.get(f"{lab['upstream']}/text?body=secret-answer&delay=1&m=withheld")
        answer.append((response, time.monotonic()))

    thread = threading.Thread(target=slow)
    thread.start()
    deadline = time.monotonic() + 15
    while "m=withheld" not in received(lab) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "m=withheld" in received(lab)  # forwarded: its open record was durable
    stopped_at = time.monotonic()
    lab["stop_writer"]()
    thread.join(30)
    [(withheld, answered_at)] = answer
    print(f"completion stalled: {withheld.status_code} {answered_at - stopped_at:.2f} s after the writer stopped "
          "(the upstream answers 1 s after the request)")
    assert withheld.status_code == 503 and answered_at - stopped_at < 1 + APPEND_TIMEOUT + MARGIN
    assert "secret-answer" not in withheld.text
    withheld_id = withheld.headers["x-gateway-transfer-id"]

    lab["resume_writer"]()
    after, took = timed_get(lab, f"{lab['upstream']}/text?body=ok&m=after")
    print(f"writer resumed: {after.status_code} after {took:.2f} s")
    assert after.status_code == 200 and took < MARGIN, took

    assert metric_total(lab["config"], "gateway_trace_append_timeouts_total", 'record="open"') >= 1
    assert metric_total(lab["config"], "gateway_trace_append_timeouts_total", 'record="done"') >= 1
    assert metric_total(lab["config"], "gateway_trace_append_timeouts_total", 'record="only"') >= 1
    trace_dir = lab["root"] / "state" / "trace"
    assert lab["gateway"].stop(timeout=30) == 0
    verify(trace_dir, trace_dir / "trace-signing.pub")
    # The writer made the late records durable once it resumed: the refused transfer's open record is
    # followed by its completion as answered (503, error); nothing left open.
    unopened = trace_records(trace_dir, "--id", refused.headers["x-gateway-transfer-id"], opened=True)
    assert [(r.get("phase"), r["status"], r["decision"]) for r in unopened] == [
        ("open", None, "allow"), ("done", 503, "error")]
    assert [r.get("phase") for r in trace_records(trace_dir, "--id", withheld_id, opened=True)] == ["open", "done"]
    assert not trace_records(trace_dir, "--open", opened=True)
    assert not trace_records(trace_dir, "--id", blocked.headers["x-gateway-transfer-id"], opened=True)
    alerts = [json.loads(line) for line in (lab["root"] / "state" / "alerts.jsonl").read_text().splitlines()]
    late = {a["id"]: a for a in alerts if a.get("trace", "").startswith("not durable in time")}
    assert {refused.headers["x-gateway-transfer-id"], withheld_id} <= set(late)
    [unsent] = [a for a in alerts if a["id"] == blocked.headers["x-gateway-transfer-id"]]
    assert (unsent["status"], unsent["trace"]) == (503, "not recorded")
