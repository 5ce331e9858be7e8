"""Several proxy workers per machine (gateway.proxy.supervisor): shared listeners, one trace log written by one
writer process, one set of metrics, workers and writer replaced when they die, SIGHUP to all."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from mitmproxy.proxy.mode_servers import AsyncioServerInstance

from gateway.proxy import listeners, state
from gateway.trace import TraceError
from gateway.trace.remote import RemoteTraceLog
from tests.gatewayproc import (
    REPO,
    free_port,
    gateway_config,
    listener_url,
    start_gateway,
    start_upstream,
    trace_records,
    write_config,
)

ORIGIN = "test.gateway/workers"


# ---- the extension point into mitmproxy ----------------------------------------------------------


def test_listen_extension_accepts_this_mitmproxy(monkeypatch):
    monkeypatch.setattr(AsyncioServerInstance, "listen", AsyncioServerInstance.listen)
    listeners.install_inherited_listeners({})
    assert AsyncioServerInstance.listen.__qualname__.endswith("install_inherited_listeners.<locals>.listen")
    listeners.install_inherited_listeners({})  # a second install wraps mitmproxy's method, not ours
    assert AsyncioServerInstance.listen.gateway_original.__qualname__ == "AsyncioServerInstance.listen"


def test_listen_extension_refuses_a_changed_mitmproxy(monkeypatch):
    async def changed(self, host, port):  # a listen() that no longer calls asyncio.start_server(handler, host, port)
        return []

    monkeypatch.setattr(AsyncioServerInstance, "listen", changed)
    with pytest.raises(RuntimeError, match="review gateway/proxy/listeners.py"):
        listeners.install_inherited_listeners({})


def test_handed_down_sockets_are_found_by_address():
    a, b = socket.socket(), socket.socket()
    with a, b:
        sockets = listeners.parse_listen_fds(f"127.0.0.1:8080={a.fileno()},[::1]:8443={b.fileno()}")
        assert sorted(sockets) == [("127.0.0.1", 8080), ("::1", 8443)]
        assert sockets[("::1", 8443)].fileno() == b.fileno()
        for sock in sockets.values():
            sock.detach()  # still owned by a and b


# ---- the trace writer process and its client ------------------------------------------------------


def start_writer(root: Path) -> subprocess.Popen:
    socket_path = root / "w.sock"
    process = subprocess.Popen([sys.executable, "-m", "gateway.trace.remote", "--dir", str(root / "log"),
                                "--origin", ORIGIN, "--key", str(root / "key"), "--socket", str(socket_path)])
    deadline = time.monotonic() + 15
    while not socket_path.exists():
        assert process.poll() is None and time.monotonic() < deadline, "trace writer did not start"
        time.sleep(0.02)
    return process


def verify(directory: Path, pubkey: Path) -> str:
    result = subprocess.run([sys.executable, "-m", "gateway", "trace", "verify", str(directory), "--pubkey",
                             str(pubkey)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_two_clients_share_one_durable_log_and_fail_closed_while_the_writer_is_away(tmp_path):
    writer = start_writer(tmp_path)
    first = RemoteTraceLog.connect(tmp_path / "w.sock", fields={"worker": 0})
    second = RemoteTraceLog.connect(tmp_path / "w.sock", fields={"worker": 1})
    try:
        assert first.failure is None and second.failure is None

        async def produce(client: RemoteTraceLog, worker: int) -> list[int]:
            return await asyncio.gather(*(client.append({"id": f"{worker}-{i}"}) for i in range(300)))

        async def both() -> list[list[int]]:
            return await asyncio.gather(produce(first, 0), produce(second, 1))

        leaves = asyncio.run(both())
        leaves.append([second.append_sync({"id": "sync"})])
        everything = [leaf for part in leaves for leaf in part]
        assert sorted(everything) == list(range(601))  # one tree, no leaf given twice
        assert first.records_appended == 300 and second.records_appended == 301
        assert second.tree_size == 601

        writer.kill()  # no goodbye: like a crash
        writer.wait()
        deadline = time.monotonic() + 5
        while first.failure is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "trace writer unavailable" in str(first.failure)
        with pytest.raises(TraceError):
            first.append_sync({"id": "while-away"})
        with pytest.raises(TraceError):
            asyncio.run(first.append({"id": "while-away"}))

        writer = start_writer(tmp_path)  # recovers the log from its journal, and clients reconnect
        deadline = time.monotonic() + 5
        while (first.failure or second.failure) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert first.failure is None and second.failure is None
        assert first.append_sync({"id": "after"}) == 601
        assert first.tree_size == 602
    finally:
        first.close()
        second.close()
        writer.terminate()
        writer.wait(10)
    records = trace_records(tmp_path / "log")
    assert {r["worker"] for r in records} == {0, 1}
    assert "OK: 602 records" in verify(tmp_path / "log", tmp_path / "key.pub")


# ---- two workers end to end -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def machine(tmp_path_factory):
    root = tmp_path_factory.mktemp("workers")
    port = free_port("127.0.0.2")
    config = gateway_config(root / "state", workers=2)
    config["listeners"][1]["upstream"] = f"http://127.0.0.2:{port}"
    path = write_config(root / "gateway.yaml", config)
    upstream = start_upstream("127.0.0.2", port, root / "upstream.log")
    gateway = start_gateway(path)
    yield {"config": config, "path": path, "root": root, "gateway": gateway, "upstream": f"http://127.0.0.2:{port}",
           "management": f"http://{config['management']['listen']}"}
    gateway.stop()
    upstream.stop()


def one_transfer(machine, path: str = "/text?body=ok") -> httpx.Response:
    """A transfer on a connection of its own (so the kernel may pick either worker's socket)."""
    with httpx.Client(proxy=listener_url(machine["config"], "forward"), timeout=15) as client:
        return client.get(machine["upstream"] + path)


def records(machine) -> list[dict]:
    return trace_records(machine["root"] / "state" / "trace")


def metric(machine, name: str, **labels: str) -> float:
    text = httpx.get(machine["management"] + "/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        series, _, number = line.rpartition(" ")
        if all(f'{key}="{value}"' in series for key, value in labels.items()):
            total += float(number)
    return total


def worker_pids(machine) -> dict[int, int]:
    pids = {}
    for line in machine["gateway"].lines:
        if " serving" in line and line.startswith("worker "):
            index, pid = line.split()[1], line.split("pid ")[1].split(")")[0]
            pids[int(index)] = int(pid)
    return pids


def test_transfers_spread_over_both_workers_into_one_verified_log_and_add_up_in_metrics(machine):
    transfers_before = metric(machine, "gateway_transfers_total")
    records_before = metric(machine, "gateway_trace_records_total")
    ids = []
    for _ in range(40):
        response = one_transfer(machine)
        assert response.status_code == 200
        ids.append(response.headers["x-gateway-transfer-id"])
    logged = {r["id"]: r for r in records(machine)}
    assert set(ids) <= logged.keys()
    handled_by = {logged[i]["worker"] for i in ids}
    assert handled_by == {0, 1}, f"all 40 transfers went to worker(s) {handled_by}"
    assert "OK:" in verify(machine["root"] / "state" / "trace", machine["root"] / "state" / "trace" / "trace-signing.pub")
    assert metric(machine, "gateway_transfers_total") - transfers_before == 40
    assert metric(machine, "gateway_transfers_total", action="allow") >= 40
    assert metric(machine, "gateway_trace_records_total") - records_before == 80  # open + completion each
    assert metric(machine, "gateway_trace_tree_size") >= len(logged)


def test_open_connections_per_worker_add_up_to_the_machine_total(machine):
    clients = [httpx.Client(proxy=listener_url(machine["config"], "forward"), timeout=15) for _ in range(6)]
    try:
        for client in clients:
            assert client.get(machine["upstream"] + "/text?body=held").status_code == 200
        total = metric(machine, "gateway_active_connections", listener="forward")
        per_worker = [metric(machine, "gateway_worker_active_connections", worker=str(w), listener="forward")
                      for w in (0, 1)]
        assert total == 6
        assert sum(per_worker) == 6
    finally:
        for client in clients:
            client.close()


def test_sighup_reaches_every_worker(machine):
    reloads_before = metric(machine, "gateway_config_reloads_total", result="success")
    sighup_and_wait(machine["gateway"])
    assert metric(machine, "gateway_config_reloads_total", result="success") - reloads_before == 1  # one machine
    assert one_transfer(machine).status_code == 200


def sighup_and_wait(gateway, said: str = "configuration reloaded") -> None:
    """SIGHUP the supervisor and wait until both workers have logged `said`."""
    start = len(gateway.lines)
    gateway.signal(signal.SIGHUP)
    for index in (0, 1):
        gateway.wait_for(f"worker-{index} gateway: {said}", timeout=20, start=start)


@contextlib.contextmanager
def reloaded_with(machine, config: dict, said: str = "configuration reloaded") -> Iterator[None]:
    """The machine running `config` (reloaded by SIGHUP) for the block, then its own configuration again."""
    path, original = machine["path"], machine["path"].read_text()
    try:
        write_config(path, config)
        sighup_and_wait(machine["gateway"], said)
        yield
    finally:
        path.write_text(original)
        sighup_and_wait(machine["gateway"])


def test_a_listener_added_by_a_reload_is_served_by_every_worker(machine):
    """The supervisor holds no socket for it: each worker binds it itself, shared through SO_REUSEPORT."""
    config = copy.deepcopy(machine["config"])
    added = f"127.0.0.1:{free_port()}"
    config["listeners"].append({"name": "added", "mode": "reverse", "listen": added, "upstream": machine["upstream"]})
    with reloaded_with(machine, config):
        ids = []
        for _ in range(30):  # a connection each, so the kernel spreads them over the workers' sockets
            response = httpx.get(f"http://{added}/text?body=added", timeout=15)
            assert response.status_code == 200 and response.text == "added"
            ids.append(response.headers["x-gateway-transfer-id"])
        logged = {r["id"]: r for r in records(machine)}
        assert {logged[i]["listener"] for i in ids} == {"added"}
        assert {logged[i]["worker"] for i in ids} == {0, 1}


def test_a_reload_changing_the_worker_count_says_it_takes_a_restart(machine):
    """Each worker keeps counting itself one of the workers the supervisor started (its connection limits
    rest on that), and says the new count waits for a restart."""
    config = copy.deepcopy(machine["config"])
    config["gateway"]["workers"] = 3
    with reloaded_with(machine, config, said="reload: workers changed; it takes effect only after a restart"):
        assert len(worker_pids(machine)) == 2
        assert one_transfer(machine).status_code == 200


def test_a_killed_worker_loses_no_record_and_is_replaced(machine):
    gateway = machine["gateway"]
    pids = worker_pids(machine)
    victim = pids[0]
    answered: list[str] = []
    failures: list[str] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            try:
                response = one_transfer(machine)
            except httpx.HTTPError as exc:  # a connection the dying worker held
                failures.append(repr(exc))
                continue
            if response.status_code == 200:
                answered.append(response.headers["x-gateway-transfer-id"])
            else:
                failures.append(str(response.status_code))

    start = len(gateway.lines)
    threads = [threading.Thread(target=traffic, daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.0)
        os.kill(victim, signal.SIGKILL)
        gateway.wait_for(f"worker 0 (pid {victim}) ended", timeout=30, start=start)
        deadline = time.monotonic() + 30
        while worker_pids(machine)[0] == victim and time.monotonic() < deadline:
            time.sleep(0.1)
        gateway.wait_for(f"worker 0 (pid {worker_pids(machine)[0]}) ready", timeout=30, start=start)
        time.sleep(1.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert worker_pids(machine)[0] != victim
    assert len(answered) > 20
    logged = {r["id"]: r for r in records(machine)}
    missing = [i for i in answered if i not in logged]
    assert not missing, f"{len(missing)} answered transfers have no record"
    assert metric(machine, "gateway_process_restarts_total", process="worker") == 1
    after = [one_transfer(machine).headers["x-gateway-transfer-id"] for _ in range(30)]
    assert {r["worker"] for r in records(machine) if r["id"] in after} == {0, 1}  # the new worker 0 serves


def test_workers_refuse_transfers_while_the_writer_is_away(machine):
    gateway = machine["gateway"]
    writer_pid = int(next(line for line in gateway.lines if "trace writer pid" in line).rsplit(" ", 1)[1])
    os.kill(writer_pid, signal.SIGKILL)
    statuses = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and 503 not in statuses:
        statuses.append(one_transfer(machine).status_code)
    assert 503 in statuses, f"never refused while the trace writer was down: {statuses}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and one_transfer(machine).status_code != 200:
        time.sleep(0.1)
    assert one_transfer(machine).status_code == 200  # the supervisor started a new writer
    assert metric(machine, "gateway_process_restarts_total", process="trace-writer") == 1
    assert "OK:" in verify(machine["root"] / "state" / "trace", machine["root"] / "state" / "trace" / "trace-signing.pub")


def test_shutdown_stops_every_process(machine):
    gateway = machine["gateway"]
    pids = list(worker_pids(machine).values())
    assert gateway.stop() == 0
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not (machine["root"] / "state" / state.WRITER_SOCKET).exists()


def test_a_trace_log_that_cannot_open_stops_the_start_with_a_clear_line(tmp_path):
    config = gateway_config(tmp_path / "state", workers=2)
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "trace").write_text("not a directory")
    result = subprocess.run([sys.executable, "-m", "gateway", "run", "-c", str(write_config(tmp_path / "g.yaml", config))],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "gateway: the trace writer ended with status 1 while starting" in result.stderr
    assert "gateway trace writer:" in result.stderr  # the writer's own reason, just before


# ---- the end-to-end suite with two workers --------------------------------------------------------


def test_loopback_suite_passes_with_two_workers():
    """The gateway core's end-to-end module, run again with two workers (the rest: GATEWAY_TEST_WORKERS=2)."""
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             str(REPO / "tests" / "test_proxy_loopback.py")],
                            cwd=REPO, env={**os.environ, "GATEWAY_TEST_WORKERS": "2"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
