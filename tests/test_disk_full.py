"""The trace log's and the spool's filesystem full (issue 20, item 7), each on a small tmpfs of its own.

While it is full: transfers are refused 503 before anything is forwarded (the upstream receives
nothing), the log says why, each refusal is an alert line, and /readyz names the condition. When the
filler is deleted, transfers pass again without a restart, and nothing is lost: the trace log
verifies, every answered transfer is in it (or, for a refusal the full trace log could not take, in
the alert log, which says so).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

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

MIB = 1024 * 1024
TMPFS_SIZE = "24m"  # above the 16 MiB the gateway keeps free (gateway.transfer.disk.DISK_RESERVE)


@contextlib.contextmanager
def tmpfs(folder: Path):
    folder.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0700", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        reason = f"cannot mount a tmpfs (needs root or CAP_SYS_ADMIN): {mounted.stderr.strip()}"
        print(reason)
        pytest.skip(reason)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder: Path) -> Path:
    """A file taking every free byte of `folder`'s filesystem."""
    filler = folder / "filler"
    with filler.open("wb", buffering=0) as out:
        for size in (MIB, 4096, 1):
            try:
                while True:
                    out.write(b"\0" * size)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
    return filler


@contextlib.contextmanager
def running_gateway(tmp_path: Path, full: str, workers: int = 1):
    """A gateway (one worker, or a supervisor of `workers`) whose state folder's `full` (trace or spool)
    is a tmpfs of its own."""
    state = tmp_path / "state"
    with tmpfs(state / full) as folder:
        port = free_port("127.0.0.2")
        config = gateway_config(state, workers=workers)
        config["dlp"]["spool_threshold"] = "1MiB"
        upstream = start_upstream("127.0.0.2", port, tmp_path / "upstream.log")
        gateway = start_gateway(write_config(tmp_path / "gateway.yaml", config))
        body = tmp_path / "body"
        body.write_bytes(os.urandom(4 * MIB))
        try:
            yield {"folder": folder, "state": state, "gateway": gateway, "body": body, "upstream_log": tmp_path / "upstream.log",
                   "proxy": listener_url(config, "forward"), "upstream": f"http://127.0.0.2:{port}",
                   "management": f"http://{config['management']['listen']}"}
        finally:
            gateway.stop()
            upstream.stop()


def transfer(lab, case: str, *args: str, path: str = "/sink") -> tuple[int, str]:
    done = subprocess.run(["curl", "-sS", "--max-time", "60", "-x", lab["proxy"], "-o", "/dev/null",
                           "-H", "content-type: application/octet-stream",
                           "-w", "%{http_code} %header{x-gateway-transfer-id}", *args,
                           f"{lab['upstream']}{path}{'&' if '?' in path else '?'}case={case}"],
                          capture_output=True, text=True, timeout=90)
    status, _, transfer_id = done.stdout.partition(" ")
    return int(status), transfer_id


def upstream_saw(lab, case: str) -> bool:
    log = lab["upstream_log"]
    return log.exists() and f"case={case}" in log.read_text()


def readiness(lab) -> tuple[int, str]:
    answer = httpx.get(lab["management"] + "/readyz", timeout=10)
    return answer.status_code, answer.text


def wait_until_ready(lab, ready: bool, timeout: float = 15.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        status, text = readiness(lab)
        if (status == 200) == ready:
            return text
        assert time.monotonic() < deadline, f"/readyz still {status} {text!r}"
        time.sleep(0.2)


def alerts(lab) -> dict[str, dict]:
    path = lab["state"] / "alerts.jsonl"
    return {alert["id"]: alert for alert in map(json.loads, path.read_text().splitlines())} if path.exists() else {}


def verified_records(lab) -> dict[str, dict]:
    trace = lab["state"] / "trace"
    verified = subprocess.run([sys.executable, "-m", "gateway", "trace", "verify", str(trace), "--pubkey",
                               str(lab["state"] / "trace-signing.pub")], capture_output=True, text=True,
                              timeout=60, cwd=REPO)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    return {record["id"]: record for record in trace_records(trace)}


def test_a_full_trace_log_filesystem_refuses_transfers_before_forwarding_and_recovers(tmp_path):
    with running_gateway(tmp_path, "trace") as lab:
        passed = [transfer(lab, "before")]
        filler = fill(lab["folder"])
        assert "trace log filesystem full" in wait_until_ready(lab, False)

        refused = [transfer(lab, f"full-{n}", *(["--data-binary", "@" + str(lab["body"])] if n % 2 else []))
                   for n in range(5)]
        assert all(status == 503 and len(transfer_id) == 36 for status, transfer_id in refused), refused
        assert not any(upstream_saw(lab, f"full-{n}") for n in range(5))  # nothing was forwarded
        assert "trace log unavailable" in lab["gateway"].wait_for(f"refusing transfer {refused[0][1]}")
        status, text = readiness(lab)
        assert status == 503 and "trace log" in text, text

        filler.unlink()
        wait_until_ready(lab, True)
        passed += [transfer(lab, "after"), transfer(lab, "after-upload", "--data-binary", "@" + str(lab["body"]))]
        assert [status for status, _ in passed] == [200, 200, 200]
        assert upstream_saw(lab, "after") and upstream_saw(lab, "after-upload")

        records, alerted = verified_records(lab), alerts(lab)
        assert all(records[transfer_id]["status"] == 200 for _, transfer_id in passed)
        for _, transfer_id in refused:  # in the trace log, or (when it could not take it) in the alert log
            record = records.get(transfer_id) or alerted[transfer_id]
            assert (record["status"], record["decision"]) == (503, "error"), record
            assert alerted[transfer_id]["rules"][0]["rule"] == "trace-log"


@pytest.mark.parametrize("full", ["trace", "spool"])
def test_readyz_of_several_workers_says_a_filesystem_is_full(tmp_path, full):
    """The supervisor's /readyz, as the single process's: a load balancer stops sending what every worker
    would refuse."""
    with running_gateway(tmp_path, full, workers=2) as lab:
        wait_until_ready(lab, True)
        filler = fill(lab["folder"])
        assert f"{'trace log' if full == 'trace' else 'spool'} filesystem full" in wait_until_ready(lab, False)
        filler.unlink()
        wait_until_ready(lab, True)


@pytest.mark.parametrize("direction", ["upload", "chunked upload", "download"])
def test_a_full_spool_filesystem_refuses_long_bodies_503_and_recovers(tmp_path, direction):
    with running_gateway(tmp_path, "spool") as lab:
        args = {"upload": ["--data-binary", "@" + str(lab["body"])],
                "chunked upload": ["-T", str(lab["body"]), "-H", "transfer-encoding: chunked"],
                "download": []}[direction]
        path = f"/random?bytes={4 * MIB}&framing=chunked" if direction == "download" else "/sink"
        passed = [transfer(lab, "before", *args, path=path)]
        filler = fill(lab["folder"])
        assert "spool filesystem full" in wait_until_ready(lab, False)

        status, refused = transfer(lab, "full", *args, path=path)
        assert status == 503 and len(refused) == 36, (status, refused)
        if direction != "download":
            assert not upstream_saw(lab, "full")  # the head was held with the body: nothing forwarded
        assert "spool unavailable: spool write failed" in lab["gateway"].wait_for(f"refusing transfer {refused}")
        assert alerts(lab)[refused]["rules"][0]["rule"] == "spool"

        filler.unlink()
        wait_until_ready(lab, True)
        passed.append(transfer(lab, "after", *args, path=path))
        assert [status for status, _ in passed] == [200, 200]

        records = verified_records(lab)
        assert all(records[transfer_id]["status"] == 200 for _, transfer_id in passed)
        assert (records[refused]["status"], records[refused]["decision"]) == (503, "error")
        assert records[refused]["rules"][0]["rule"] == "spool"


def test_a_trace_log_whose_write_failed_takes_records_again_once_space_returns(tmp_path):
    """The library alone: a commit failing with ENOSPC stops the log; it is opened again (recovered as
    after a crash) once there is room, with every acknowledged record kept."""
    from gateway.trace import TraceError, TraceLog

    with tmpfs(tmp_path / "trace") as folder:
        log = TraceLog.open(folder, origin="test.example/disk-full", signing_key=tmp_path / "key")
        try:
            acknowledged = [log.append_sync({"n": n}) for n in range(3)]
            filler = fill(folder)
            with pytest.raises(TraceError, match="No space left on device"):
                for n in range(3, 10_000):  # the journal's last page may still take a few
                    acknowledged.append(log.append_sync({"n": n, "pad": "x" * 2000}))
            assert log.failure is not None
            filler.unlink()
            deadline = time.monotonic() + 10
            while log.failure is not None:
                assert time.monotonic() < deadline, log.failure
                time.sleep(0.1)
            acknowledged.append(log.append_sync({"n": "after"}))
        finally:
            log.close()
        assert acknowledged == list(range(len(acknowledged)))  # nothing acknowledged was lost or reordered
        verified = subprocess.run([sys.executable, "-m", "gateway", "trace", "verify", str(folder), "--pubkey",
                                   str(folder / "trace-signing.pub")], capture_output=True, text=True, timeout=60, cwd=REPO)
        assert verified.returncode == 0, verified.stdout + verified.stderr
