"""A worker's memory is bounded by `dlp.memory_budget`, not by how many bodies it holds (issue 20).

Before, each body under `dlp.spool_threshold` (8 MiB) was held in memory, so 60 stalled 8 MiB uploads
grew a worker to about 590 MiB and were held until mitmproxy's 600 s idle timeout. Here 40 uploads of
8 MiB each send 5 MiB and stall: past a budget of 32 MiB their bodies go to the spool, so the worker's
peak resident memory (VmHWM, reset through /proc/PID/clear_refs) grows by less than the budget plus a
margin, and after `gateway.body_idle_timeout` (2 s) each is answered 408 with its transfer id and
recorded; nothing reaches the upstream.
"""

from __future__ import annotations

import io
import re
import socket
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor

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
from tests.test_hostile_bodies import PeakMemory

MIB = 1024 * 1024
BUDGET = 32 * MIB
UPLOADS = 40
DECLARED, SENT = 8 * MIB, 5 * MIB  # each upload announces 8 MiB, sends 5 and stalls
# Not counted in the budget: each spooled body's scan holds a window of decoded text (1.06 MiB measured
# for this text), and the engine has buffers of its own. 40 stalled bodies held would take 200 MiB.
MARGIN = UPLOADS * 5 * MIB // 4 + 16 * MIB
TEXT = "户籍登记表：姓名，住址，联系方式（已脱敏）。\n".encode()  # clean text, as a city's exports hold


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    root = tmp_path_factory.mktemp("bodymemory")
    port = free_port("127.0.0.2")
    config = gateway_config(root / "state", workers=1)
    config["dlp"]["memory_budget"] = "32MiB"
    config["gateway"]["body_idle_timeout"] = "2s"
    path = write_config(root / "gateway.yaml", config)
    upstream = start_upstream("127.0.0.2", port, root / "upstream.log")
    gateway = start_gateway(path)
    yield {"root": root, "config": config, "proxy": listener_url(config, "forward"),
           "upstream": f"127.0.0.2:{port}", "gateway": gateway}
    gateway.stop()
    upstream.stop()


def body(size: int) -> bytes:
    """Whole lines of TEXT, `size` bytes at most (a character cut in two would be refused)."""
    return TEXT * (size // len(TEXT))


def stalled_upload(lab, marker: str) -> tuple[bytes, float]:
    """Sends the head and SENT bytes of a DECLARED-byte body, then nothing: the answer and when it came."""
    host, port = lab["proxy"].removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"POST http://{lab['upstream']}/echo?case={marker} HTTP/1.1\r\nHost: {lab['upstream']}\r\n"
                     f"Content-Type: text/plain; charset=utf-8\r\nContent-Length: {DECLARED}\r\n\r\n".encode())
        data = body(SENT)
        for offset in range(0, len(data), 256 * 1024):
            sock.sendall(data[offset:offset + 256 * 1024])
        sent = time.monotonic()
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer, time.monotonic() - sent


def test_stalled_uploads_stay_within_the_memory_budget_and_are_answered_408(lab):
    run = f"stall-{free_port()}"
    errors_before = metric_total(lab["config"], "gateway_transfers_total", 'action="error"')
    with PeakMemory(lab["gateway"].proc.pid) as memory, ThreadPoolExecutor(UPLOADS) as pool:
        answers = list(pool.map(lambda i: stalled_upload(lab, f"{run}-{i}"), range(UPLOADS)))
    assert memory.growth < BUDGET + MARGIN, f"peak RSS grew {memory.growth / MIB:.0f} MiB"
    ids = []
    for answer, waited in answers:
        head = answer.decode(errors="replace")
        assert head.startswith("HTTP/1.1 408"), head[:200]
        assert "request body timed out" in head and waited < 20
        ids.append(re.search(r"(?im)^x-gateway-transfer-id: (\S+)", head).group(1))
    records = {record["id"]: record for record in trace_records(lab["root"] / "state" / "trace")
               if run in (record["url"] or "")}
    assert set(records) == set(ids)
    for record in records.values():
        assert record["status"] == 408 and record["decision"] == "error", record
        assert "no byte of it for 2 s" in record["error"]
    log = lab["root"] / "upstream.log"
    assert not log.exists() or run not in log.read_text()
    assert metric_total(lab["config"], "gateway_transfers_total", 'action="error"') - errors_before == UPLOADS


def test_after_them_the_budget_is_back(lab):
    """The stalled transfers gave their budget back: a zip archive, which is read whole only in memory
    (a spooled one whose scan could not hold its start is refused uninspectable), passes again."""
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zipped:
        zipped.writestr("指南.txt", TEXT * 2000)
    with httpx.Client(proxy=lab["proxy"], timeout=30) as client:
        response = client.post(f"http://{lab['upstream']}/echo?case=after", content=archive.getvalue(),
                               headers={"content-type": "application/zip"})
        assert response.status_code == 200 and response.content == archive.getvalue(), response.text[:300]
        response = client.post(f"http://{lab['upstream']}/echo?case=after", content=body(4 * MIB),
                               headers={"content-type": "text/plain; charset=utf-8"})
    assert response.status_code == 200 and response.content == body(4 * MIB), response.text[:300]


def test_the_body_of_a_request_refused_at_its_head_is_dropped_as_it_arrives(lab):
    """mitmproxy buffered all of it before answering: 64 MiB after a head holding an ID number grew the
    worker by 130 MiB."""
    host, port = lab["proxy"].removeprefix("http://").rsplit(":", 1)
    size = 32 * MIB
    with PeakMemory(lab["gateway"].proc.pid) as memory, socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"POST http://{lab['upstream']}/echo?case=refused-head HTTP/1.1\r\nHost: {lab['upstream']}\r\n"
                     f"X-Applicant: 11010519491231002X\r\nContent-Length: {size}\r\n\r\n".encode())
        for _ in range(size // MIB):
            sock.sendall(b"x" * MIB)
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 403"), answer[:200]
    assert memory.growth < 16 * MIB, f"peak RSS grew {memory.growth / MIB:.0f} MiB"
    transfer_id = re.search(rb"(?im)^x-gateway-transfer-id: (\S+)", answer).group(1).decode()
    record = trace_records(lab["root"] / "state" / "trace", "--id", transfer_id)[0]
    assert record["status"] == 403 and record["req_bytes"] == size, record
