"""Record before forward (gateway.filters.record), checked from outside under load: an upstream that logs
what it receives, a two-worker gateway, and its writer, a worker or the supervisor killed outright, or
the gateway stopped with SIGTERM. Every request the upstream received has a record in the verified log
(its open record at least), every answered transfer its completion, and no transfer has a record twice."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
from collections import Counter
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from tests.gatewayproc import (
    free_port,
    gateway_config,
    listener_url,
    start_gateway,
    start_upstream,
    trace_records,
    write_config,
)
from tests.test_workers import verify, worker_pids

CLIENTS = 4
GRACE = 5  # seconds: the test gateway's shutdown_grace


def alive(pid: int) -> bool:
    """Running (an exited child of a killed supervisor may linger as a zombie nobody reaps)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class Load:
    """CLIENTS threads sending GETs and POSTs, each marked (?m=...), through the forward listener; the
    upstream answers each 0.1 s after it logged it, so transfers are in flight whenever a process dies."""

    def __init__(self, proxy: str, upstream: str):
        self.proxy, self.upstream = proxy, upstream
        self.answered: dict[str, str] = {}  # marker -> transfer id, for 200 answers
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(n,), daemon=True) for n in range(CLIENTS)]

    def __enter__(self) -> "Load":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)

    def _client(self, n: int) -> None:
        client = httpx.Client(proxy=self.proxy, timeout=30)
        i = 0
        while not self.stop.is_set():
            i += 1
            marker = f"c{n}-{i}"
            try:
                if i % 2:
                    response = client.get(f"{self.upstream}/text?body=ok&delay=0.1&m={marker}")
                else:
                    response = client.post(f"{self.upstream}/echo?delay=0.1&m={marker}", content=b"x" * 2048,
                                           headers={"content-type": "text/plain"})
            except httpx.HTTPError:  # a connection a dying process held, or a stopped gateway
                client.close()
                client = httpx.Client(proxy=self.proxy, timeout=30)
                time.sleep(0.05)
                continue
            if response.status_code == 200:
                self.answered[marker] = response.headers["x-gateway-transfer-id"]
        client.close()


@pytest.fixture
def gateway(tmp_path):
    port = free_port("127.0.0.2")
    config = gateway_config(tmp_path / "state", workers=2)
    config["gateway"]["shutdown_grace"] = f"{GRACE}s"
    upstream = start_upstream("127.0.0.2", port, tmp_path / "upstream.log")
    process = start_gateway(write_config(tmp_path / "gateway.yaml", config))
    writer = int(next(line for line in process.lines if "trace writer pid" in line).rsplit(" ", 1)[1])
    yield {"gateway": process, "root": tmp_path, "proxy": listener_url(config, "forward"),
           "upstream": f"http://127.0.0.2:{port}", "writer": writer}
    process.stop(timeout=30)
    upstream.stop()


def check_log(lab, answered: dict[str, str], all_completed: bool) -> dict[str, list[dict]]:
    """The log verifies; every request the upstream logged has a record; every answer a completion;
    nothing twice. With `all_completed`, no transfer was left open either."""
    trace_dir = lab["root"] / "state" / "trace"
    verify(trace_dir, trace_dir / "trace-signing.pub")
    records = trace_records(trace_dir, opened=True)
    by_marker: dict[str, list[dict]] = {}
    for record in records:
        marker = parse_qs(urlsplit(record["url"] or "").query).get("m")
        if marker:
            by_marker.setdefault(marker[0], []).append(record)
    received = [parse_qs(urlsplit(json.loads(line)["path"]).query)["m"][0]
                for line in (lab["root"] / "upstream.log").read_text().splitlines()]
    assert len(received) > 20 and len(answered) > 20, (len(received), len(answered))
    assert len(set(received)) == len(received)
    unrecorded = [m for m in received if m not in by_marker]
    assert not unrecorded, f"{len(unrecorded)} of {len(received)} requests reached the upstream unrecorded"
    for marker, transfer_id in answered.items():
        final = [r for r in by_marker.get(marker, []) if r.get("phase") != "open"]
        assert [r["id"] for r in final] == [transfer_id] and final[0]["phase"] == "done", (marker, final)
        assert final[0]["status"] == 200 and final[0]["decision"] == "allow"
    phases = Counter((r["id"], r.get("phase") == "open") for r in records)
    twice = [key for key, count in phases.items() if count > 1]
    assert not twice, f"records written twice: {twice[:5]}"
    for marker in received:
        opened = [r for r in by_marker[marker] if r.get("phase") == "open"]
        assert len(opened) == 1, (marker, by_marker[marker])  # forwarded: its open record came first
    if all_completed:
        shown = trace_records(trace_dir, "--open", opened=True)
        assert not shown, f"{len(shown)} transfers left open: {shown[:3]}"
    return by_marker


def wait_for_writer_back(lab, start: int) -> None:
    lab["gateway"].wait_for("trace writer (pid", timeout=30, start=start)
    deadline = time.monotonic() + 30
    for probe in range(300):
        with httpx.Client(proxy=lab["proxy"], timeout=10) as client:
            if client.get(f"{lab['upstream']}/text?body=ok&m=probe-{probe}").status_code == 200:
                return
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    raise AssertionError("the gateway did not serve again after the writer was restarted")


def test_a_killed_trace_writer_loses_nothing_that_crossed(gateway):
    """The workers hold the records the writer did not answer and send them again to the new writer,
    which answers those it had already made durable without writing them twice."""
    start = len(gateway["gateway"].lines)
    with Load(gateway["proxy"], gateway["upstream"]) as load:
        time.sleep(1.5)
        os.kill(gateway["writer"], signal.SIGKILL)
        wait_for_writer_back(gateway, start)
        time.sleep(1.0)
    assert gateway["gateway"].stop(timeout=30) == 0
    check_log(gateway, load.answered, all_completed=True)


def test_a_killed_worker_leaves_its_forwarded_transfers_open_in_the_log(gateway):
    victim = worker_pids(gateway)[0]
    with Load(gateway["proxy"], gateway["upstream"]) as load:
        time.sleep(1.5)
        os.kill(victim, signal.SIGKILL)
        time.sleep(2.0)
    assert gateway["gateway"].stop(timeout=30) == 0
    by_marker = check_log(gateway, load.answered, all_completed=False)
    left_open = [m for m, rs in by_marker.items() if all(r.get("phase") == "open" for r in rs)]
    assert all(r["worker"] == 0 for m in left_open for r in by_marker[m])  # only the killed worker's
    shown = trace_records(gateway["root"] / "state" / "trace", "--open", opened=True)
    assert {r["id"] for r in shown} == {by_marker[m][0]["id"] for m in left_open}


def test_a_killed_supervisor_lets_its_workers_finish_and_record_what_they_forwarded(gateway):
    pids = [*worker_pids(gateway).values(), gateway["writer"]]
    with Load(gateway["proxy"], gateway["upstream"]) as load:
        time.sleep(1.5)
        gateway["gateway"].proc.kill()
        deadline = time.monotonic() + GRACE + 15
        while any(map(alive, pids)) and time.monotonic() < deadline:
            time.sleep(0.1)
    assert not any(map(alive, pids)), "workers or writer still running after their supervisor was killed"
    check_log(gateway, load.answered, all_completed=True)


def test_a_graceful_stop_finishes_the_transfers_in_flight_and_loses_no_record(gateway):
    with Load(gateway["proxy"], gateway["upstream"]) as load:
        time.sleep(1.5)
        started = time.monotonic()
        assert gateway["gateway"].stop(timeout=GRACE + 20) == 0
        took = time.monotonic() - started
    assert took < GRACE  # the transfers in flight finished; nothing had to wait for the grace period
    by_marker = check_log(gateway, load.answered, all_completed=True)
    assert not [r for rs in by_marker.values() for r in rs if r["decision"] == "error" and r.get("phase")]


def test_sigterm_to_every_process_at_once_finishes_the_transfers_in_flight_and_loses_no_record(gateway):
    """What `kill -- -PGID` (or systemd's KillMode=control-group) does: the writer, told to stop at the same
    time as the workers, keeps taking their records until the last of them is gone."""
    pids = [gateway["gateway"].proc.pid, *worker_pids(gateway).values(), gateway["writer"]]
    with Load(gateway["proxy"], gateway["upstream"]) as load:
        time.sleep(1.5)
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
        assert gateway["gateway"].proc.wait(timeout=GRACE + 20) == 0
    assert "trace writer unavailable" not in gateway["gateway"].output, gateway["gateway"].output[-3000:]
    check_log(gateway, load.answered, all_completed=True)


def test_a_transfer_still_running_at_the_end_of_the_grace_period_is_recorded_as_an_error(gateway):
    result: list[object] = []

    def slow() -> None:
        try:
            with httpx.Client(proxy=gateway["proxy"], timeout=60) as client:
                result.append(client.get(f"{gateway['upstream']}/text?body=ok&delay=60&m=slow").status_code)
        except httpx.HTTPError as exc:
            result.append(exc)

    thread = threading.Thread(target=slow, daemon=True)
    thread.start()
    log = gateway["root"] / "upstream.log"
    deadline = time.monotonic() + 15
    while not (log.exists() and "m=slow" in log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    started = time.monotonic()
    assert gateway["gateway"].stop(timeout=GRACE + 20) == 0
    assert GRACE - 0.5 < time.monotonic() - started < GRACE + 10
    thread.join(10)
    assert result and isinstance(result[0], httpx.HTTPError)  # cut: no answer
    trace_dir = gateway["root"] / "state" / "trace"
    slow_records = [r for r in trace_records(trace_dir, opened=True) if "m=slow" in (r["url"] or "")]
    assert [r["phase"] for r in slow_records] == ["open", "done"]
    assert slow_records[1]["decision"] == "error" and "shutdown grace" in slow_records[1]["error"]
    assert "cut and recorded as errors" in gateway["gateway"].output


def test_a_connection_made_while_the_gateway_stops_is_answered_or_refused_never_dropped(gateway):
    """Clients connecting right at SIGTERM, while a slow transfer keeps the workers draining: a
    connection the kernel accepted gets an HTTP answer (served, its transfer recorded), the others are
    refused at connect. Before, a worker's socket stayed open in its supervisor: connections queued
    there for the whole drain and were reset, their requests sent and never answered."""
    holder = threading.Thread(target=lambda: httpx.Client(proxy=gateway["proxy"], timeout=30).get(
        f"{gateway['upstream']}/text?body=ok&delay=3&m=holder"), daemon=True)
    holder.start()
    log = gateway["root"] / "upstream.log"
    deadline = time.monotonic() + 15
    while not (log.exists() and "m=holder" in log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    host, port = urlsplit(gateway["proxy"]).hostname, urlsplit(gateway["proxy"]).port
    gateway["gateway"].signal(signal.SIGTERM)
    connected: list[tuple[str, socket.socket]] = []
    refused = 0
    for n in range(30):  # over 1.5 s of the drain
        sock = socket.socket()
        try:
            sock.connect((host, port))
        except ConnectionRefusedError:
            sock.close()
            refused += 1
        else:
            marker = f"late-{n}"
            sock.sendall(f"GET {gateway['upstream']}/text?body=ok&m={marker} HTTP/1.1\r\n"
                         f"Host: {urlsplit(gateway['upstream']).netloc}\r\nConnection: close\r\n\r\n".encode())
            connected.append((marker, sock))
        time.sleep(0.05)
    answers: dict[str, bytes] = {}
    for marker, sock in connected:
        sock.settimeout(20)
        data = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                data += chunk
        sock.close()
        answers[marker] = data
    assert gateway["gateway"].proc.wait(GRACE + 20) == 0
    holder.join(10)
    dropped = [marker for marker, data in answers.items() if not data.startswith(b"HTTP/1.1 ")]
    assert not dropped, f"{len(dropped)} of {len(answers)} accepted connections got no answer ({refused} refused):\n" + gateway["gateway"].output[-3000:]
    assert refused > 0  # the listeners closed at the stop, not at the exit
    trace_dir = gateway["root"] / "state" / "trace"
    ids = {r["id"] for r in trace_records(trace_dir, opened=True)}
    for marker, data in answers.items():
        transfer_id = next(line.split(b":", 1)[1].strip().decode() for line in data.split(b"\r\n")
                           if line.lower().startswith(b"x-gateway-transfer-id:"))
        assert transfer_id in ids, (marker, data[:200])


@pytest.mark.parametrize("workers", [1, 2])
def test_a_transfer_left_open_by_a_killed_gateway_is_closed_as_abandoned_at_the_next_start(tmp_path, workers):
    """Every process killed outright while a transfer was forwarded: its open record stays open (no
    process of that run is left to complete it) until the gateway starts again, which closes it with a
    completion `decision: error`, "abandoned", once: before, it stayed open for good."""
    port = free_port("127.0.0.2")
    config = gateway_config(tmp_path / "state", workers=workers)
    path = write_config(tmp_path / "gateway.yaml", config)
    upstream = start_upstream("127.0.0.2", port, tmp_path / "upstream.log")
    process = start_gateway(path)
    trace_dir = tmp_path / "state" / "trace"

    def stuck() -> list[dict]:
        return [r for r in trace_records(trace_dir, opened=True) if "m=stuck" in (r["url"] or "")]

    try:
        def request() -> None:
            with contextlib.suppress(httpx.HTTPError), httpx.Client(proxy=listener_url(config, "forward"),
                                                                   timeout=60) as client:
                client.get(f"http://127.0.0.2:{port}/text?body=ok&delay=60&m=stuck")

        threading.Thread(target=request, daemon=True).start()
        log = tmp_path / "upstream.log"
        deadline = time.monotonic() + 15
        while not (log.exists() and "m=stuck" in log.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        pids = [process.proc.pid]
        if workers > 1:
            pids += [*worker_pids({"gateway": process}).values(),
                     int(next(line for line in process.lines if "trace writer pid" in line).rsplit(" ", 1)[1])]
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        process.proc.wait(10)
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [r.get("phase") for r in stuck()] == ["open"]
        process = start_gateway(path)
        closed = stuck()
        assert [r.get("phase") for r in closed] == ["open", "done"]
        assert closed[1]["decision"] == "error" and closed[1]["error"].startswith("abandoned")
        assert closed[1]["id"] == closed[0]["id"] and closed[1]["url"] == closed[0]["url"]
        assert not trace_records(trace_dir, "--open", opened=True)
        assert "1 transfers left open by the run before" in process.output
        process.stop()
        process = start_gateway(path)  # nothing left to close: nothing twice
        assert [r.get("phase") for r in stuck()] == ["open", "done"]
        verify(trace_dir, trace_dir / "trace-signing.pub")
    finally:
        process.stop()
        upstream.stop()


def test_a_stopping_gateway_serves_a_request_on_an_open_connection_and_closes_it(tmp_path):
    """Behind a TCP balancer a client's keep-alive connection stays on its machine: a request it sends
    while the machine drains is served (not refused 503) and the connection closed after the answer,
    so that the client's next request opens a new connection, which the balancer sends elsewhere."""
    port = free_port("127.0.0.2")
    config = gateway_config(tmp_path / "state", workers=1)
    config["gateway"]["shutdown_grace"] = f"{GRACE}s"
    upstream = start_upstream("127.0.0.2", port, tmp_path / "upstream.log")
    process = start_gateway(write_config(tmp_path / "gateway.yaml", config))
    proxy, target = listener_url(config, "forward"), f"http://127.0.0.2:{port}"
    slow: list[object] = []
    try:
        with httpx.Client(proxy=proxy, timeout=30) as idle, httpx.Client(proxy=proxy, timeout=30) as busy:
            assert idle.get(f"{target}/text?body=ok&m=before").status_code == 200  # its connection stays open
            thread = threading.Thread(target=lambda: slow.append(
                busy.get(f"{target}/text?body=ok&delay=3&m=slow").status_code))
            thread.start()
            time.sleep(1)  # the slow transfer is in flight: the drain waits for it
            os.kill(process.proc.pid, signal.SIGTERM)
            time.sleep(0.5)
            during = idle.get(f"{target}/text?body=ok&m=during")
            thread.join(15)
        assert during.status_code == 200 and during.headers.get("connection") == "close", (during, during.text)
        assert slow == [200]
        assert process.stop(timeout=GRACE + 20) == 0
    finally:
        process.stop(timeout=30)
        upstream.stop()
    records = trace_records(tmp_path / "state" / "trace")
    assert [r["status"] for r in records if "m=during" in (r["url"] or "")] == [200]
