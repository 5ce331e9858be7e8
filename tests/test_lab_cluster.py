"""Two gateway machines behind two HAProxy balancers sharing a VRRP floating address (keepalived), in
network namespaces: a machine killed under load loses no record, and a balancer's failure moves the
address (gateway.ops.labcluster)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from gateway.ops.lab import lab_supported
from tests.gatewayproc import REPO

pytestmark = pytest.mark.skipif(
    bool(lab_supported()) or not (shutil.which("haproxy") and shutil.which("keepalived")),
    reason=f"cluster lab unavailable: {lab_supported() or 'haproxy or keepalived missing (scripts/system-deps)'}")

# Clients in the client namespace: new connection per request to the floating address, one JSON line each.
LOAD = """
import http.client, json, sys, threading, time
proxy, url, seconds, threads = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
end = time.monotonic() + seconds
lock = threading.Lock()
def run(worker):
    n = 0
    while time.monotonic() < end:
        n += 1
        outcome = {"t": time.time(), "worker": worker, "n": n}
        try:
            conn = http.client.HTTPConnection(proxy, timeout=10)
            conn.request("GET", f"{url}?w={worker}&n={n}")
            response = conn.getresponse()
            response.read()
            outcome.update(status=response.status, id=response.getheader("X-Gateway-Transfer-Id"))
            conn.close()
        except Exception as e:
            outcome["error"] = type(e).__name__
            time.sleep(0.05)
        with lock:
            print(json.dumps(outcome), flush=True)
ts = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
[t.start() for t in ts]
[t.join() for t in ts]
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from gateway.ops.labcluster import ClusterLab

    # Named after this process, so that runs side by side (two checkouts) do not tear down each other's.
    lab = ClusterLab(f"gwct{os.getpid() % 100000}", 2, tmp_path_factory.mktemp("cluster"))
    lab.down()  # what a crashed earlier run of this process's name left
    try:
        problems = lab.up()
        assert not problems, problems
        yield lab
    finally:
        lab.down()


def gateway(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=120)
    assert not check or done.returncode == 0, done.stdout + done.stderr
    return done


def logged_ids(lab, gw: str) -> list[str]:
    """The ids of the transfers a machine's verified log holds a final record of (a forwarded
    transfer's completion, or a refused one's only record; not the open record before forwarding)."""
    state = lab.state_dir / gw / "state"
    gateway("trace", "verify", str(state / "trace"), "--pubkey", str(state / "trace-signing.pub"))
    shown = gateway("trace", "show", str(state / "trace")).stdout
    records = [json.loads(line)["record"] for line in shown.splitlines()]
    return [record["id"] for record in records if record.get("phase") != "open"]


def test_machine_killed_under_load_loses_no_record(cluster):
    from gateway.ops.labcluster import FLOATING, INET, PROXY_PORT, UPSTREAM_PORT

    load = subprocess.Popen(cluster.command("client", [
        sys.executable, "-c", LOAD, f"{FLOATING}:{PROXY_PORT}", f"http://{INET}.2:{UPSTREAM_PORT}/", "8", "4"]),
        stdout=subprocess.PIPE, text=True)
    time.sleep(2.5)
    killed_at = time.time()
    os.kill(cluster.pid("gw1"), signal.SIGKILL)  # the machine dies: its gateway and its witness service
    os.kill(cluster.pid("witness-gw1"), signal.SIGKILL)
    out, _ = load.communicate(timeout=60)
    outcomes = [json.loads(line) for line in out.splitlines()]
    answered = [o for o in outcomes if "status" in o]
    failed = [o for o in outcomes if "error" in o]
    print(f"{len(answered)} answered, {len(failed)} failed: {sorted({o['error'] for o in failed})}")
    assert len(answered) > 50
    assert all(o["status"] == 200 and o["id"] for o in answered), [o for o in answered if o["status"] != 200][:5]
    # The survivor took over: answers keep coming after the kill (HAProxy retried or redispatched).
    assert sum(o["t"] > killed_at + 3 for o in answered) > 10
    # Connections cut or refused only; no answer without an id.
    assert {o["error"] for o in failed} <= {"RemoteDisconnected", "ConnectionResetError", "ConnectionRefusedError",
                                           "BadStatusLine", "IncompleteRead", "TimeoutError"}

    cluster.start("gw1")  # the killed machine comes back: its log, cut by kill -9, still verifies
    cluster.start("witness-gw1")
    assert cluster.wait_ready("gw1", 60)
    ids = {gw: logged_ids(cluster, gw) for gw in cluster.gateways}
    for gw, logged in ids.items():
        assert len(logged) == len(set(logged)), f"{gw} recorded a transfer twice"
    both = set(ids["gw1"]) | set(ids["gw2"])
    assert not set(ids["gw1"]) & set(ids["gw2"]), "a transfer in both machines' logs"
    missing = [o["id"] for o in answered if o["id"] not in both]
    assert not missing, f"answered transfers without a record: {missing[:5]}"
    assert ids["gw1"] and ids["gw2"]  # both machines served

    # It catches up its witnesses: gw2's witness cosigns gw1's log to its end, gw1's witness (refusing
    # nothing it cosigned before the kill) cosigns what gw2 logged while it was down; the whole boundary
    # then verifies as one, and its usage sums every answered transfer.
    wait_cross_witnessed(cluster)
    peers = str(cluster.state_dir / "peers.yaml")
    verified = gateway("trace", "verify", "--peers", peers)
    assert verified.stdout.count("OK: ") == 2 and "not yet cosigned" not in verified.stdout, verified.stdout
    metered = json.loads(gateway("trace", "meter", "--peers", peers, "--by", "decision").stdout)
    alone = [json.loads(gateway("trace", "meter", str(cluster.state_dir / gw / "state" / "trace"), "--pubkey",
                                str(cluster.state_dir / gw / "state" / "trace-signing.pub")).stdout)
             for gw in cluster.gateways]
    assert metered["total"]["transfers"] == sum(one["total"]["transfers"] for one in alone) >= len(both)
    doctor = subprocess.run(cluster.command("gw1", [sys.executable, "-m", "gateway", "doctor", "-c",
                                                    str(cluster.state_dir / "gw1" / "gateway.yaml"), "--peers", peers]),
                            capture_output=True, text=True, cwd=REPO, timeout=60)
    assert doctor.returncode == 0 and "ok: 2 machines run the same configuration" in doctor.stdout, doctor.stdout


def wait_cross_witnessed(lab, timeout: float = 30.0) -> dict[str, int]:
    """Each machine's log size once the other's witness has cosigned it whole."""
    from gateway.trace.audit import WITNESSED_FILE, newest_checkpoint
    from gateway.trace.note import parse_checkpoint_body, parse_note

    def cosigned(trace):
        try:
            return parse_checkpoint_body(parse_note((trace / WITNESSED_FILE).read_bytes()).text).size
        except FileNotFoundError:
            return -1
    deadline = time.monotonic() + timeout
    while True:  # the log's newest checkpoint may be a journal frame not yet in its checkpoint file
        traces = {gw: lab.state_dir / gw / "state" / "trace" for gw in lab.gateways}
        now = {gw: (newest_checkpoint(trace, None)[1].size, cosigned(trace)) for gw, trace in traces.items()}
        if all(log == cosigned for log, cosigned in now.values()):
            return {gw: log for gw, (log, _) in now.items()}
        assert time.monotonic() < deadline, f"(log size, cosigned size) not caught up: {now}"
        time.sleep(0.5)


def test_rolling_restart_under_load_keeps_every_record(cluster):
    """`gateway drain` on each machine in turn, then a start, while clients keep going: nothing cut
    (each machine finishes its transfers in flight before it stops), no answer without its record,
    every log verifies, and the balancers keep serving through the whole roll."""
    from gateway.ops.labcluster import FLOATING, INET, PROXY_PORT, UPSTREAM_PORT

    before = {gw: set(logged_ids(cluster, gw)) for gw in cluster.gateways}
    load = subprocess.Popen(cluster.command("client", [
        sys.executable, "-c", LOAD, f"{FLOATING}:{PROXY_PORT}", f"http://{INET}.2:{UPSTREAM_PORT}/", "14", "4"]),
        stdout=subprocess.PIPE, text=True)
    time.sleep(1.5)
    for gw in cluster.gateways:
        drained = subprocess.run(cluster.command(gw, [
            sys.executable, "-m", "gateway", "drain", "-c", str(cluster.state_dir / gw / "gateway.yaml")]),
            capture_output=True, text=True, cwd=REPO, timeout=90)
        assert drained.returncode == 0 and "drained and stopped" in drained.stdout, drained.stdout + drained.stderr
        cluster.start(gw)
        assert cluster.wait_ready(gw, 60)
        time.sleep(2.5)  # the balancers' checks see it up again (rise 2, inter 1 s)
    out, _ = load.communicate(timeout=60)
    outcomes = [json.loads(line) for line in out.splitlines()]
    answered = [o for o in outcomes if "status" in o]
    failed = [o for o in outcomes if "error" in o]
    print(f"rolling restart: {len(answered)} answered, {len(failed)} cut or refused: "
          f"{sorted({o['error'] for o in failed})}")
    assert len(answered) > 100
    assert all(o["status"] == 200 and o["id"] for o in answered)
    # Each machine drained (gateway.shutdown_grace) before it stopped: no transfer in flight was cut.
    assert not failed, failed[:5]
    ids = {gw: set(logged_ids(cluster, gw)) - before[gw] for gw in cluster.gateways}
    assert not ids["gw1"] & ids["gw2"]
    missing = [o["id"] for o in answered if o["id"] not in ids["gw1"] | ids["gw2"]]
    assert not missing, f"answered transfers without a record: {missing[:5]}"


def test_floating_address_moves_when_a_balancer_stops(cluster):
    from gateway.ops.labcluster import FLOATING, INET, PROXY_PORT, UPSTREAM_PORT

    assert cluster.holder() == "lb1"  # the higher priority
    os.kill(cluster.pid("keepalived-lb1"), signal.SIGTERM)
    deadline = time.monotonic() + 15
    while cluster.holder() != "lb2":
        assert time.monotonic() < deadline, "lb2 did not take the floating address over"
        time.sleep(0.2)
    curl = subprocess.run(cluster.command("client", [
        "curl", "-s", "-D", "-", "-o", "/dev/null", "--max-time", "10", "--retry", "3", "--retry-connrefused",
        "-x", f"http://{FLOATING}:{PROXY_PORT}", f"http://{INET}.2:{UPSTREAM_PORT}/"]), capture_output=True, text=True)
    assert curl.stdout.startswith("HTTP/1.0 200") and "X-Gateway-Transfer-Id" in curl.stdout, curl.stdout
