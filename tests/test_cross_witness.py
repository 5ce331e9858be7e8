"""Two gateway machines on loopback whose trace logs cosign each other (`gateway cluster witness`, the C2SP
tlog-witness protocol): `trace verify --peers` checks every origin and its cross-witness, `trace meter
--peers` sums both logs only once each verifies, a witness killed with kill -9 catches up when it is back,
the management listener exports the last cosignature time and the configuration digest, and
`gateway doctor --peers` notices a machine whose configuration differs."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from gateway.trace.audit import WITNESSED_FILE, newest_checkpoint
from gateway.trace.note import parse_checkpoint_body, parse_note
from gateway.trace.peers import load_peers
from gateway.yamlnodes import ConfigError
from tests.gatewayproc import (
    REPO,
    Process,
    free_port,
    gateway_config,
    listener_url,
    start_gateway,
    write_config,
)

MACHINES = ("gw-a", "gw-b")


def gateway(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=120)


def start_witness(boundary: dict, name: str) -> Process:
    process = Process([sys.executable, "-m", "gateway", "cluster", "witness", "-c", str(boundary[name]["path"]),
                       "--peers", str(boundary["peers"]), "--interval", "0.3"])
    process.wait_for("pushing", timeout=30)
    return process


@pytest.fixture(scope="module")
def boundary(tmp_path_factory):
    base = tmp_path_factory.mktemp("boundary")
    machines: dict = {}
    entries = ""
    for name in MACHINES:
        state = base / name
        config = gateway_config(state, workers=1)
        config["gateway"]["name"] = name
        config["trace"]["origin"] = f"test.boundary/{name}/trace"
        path = write_config(base / f"{name}.yaml", config)
        witness_url = f"http://127.0.0.1:{free_port()}"
        entry = gateway("cluster", "peer", "-c", str(path), "--witness", witness_url,
                        "--management", f"http://{config['management']['listen']}", "--log", str(state / "trace"))
        assert entry.returncode == 0, entry.stderr
        entries += entry.stdout
        machines[name] = {"config": config, "path": path, "trace": state / "trace", "state": state}
    (base / "peers.yaml").write_text("peers:\n" + entries)
    boundary = {**machines, "peers": base / "peers.yaml", "base": base}
    for name in MACHINES:
        boundary[name]["gateway"] = start_gateway(boundary[name]["path"])
        boundary[name]["witness"] = start_witness(boundary, name)
    yield boundary
    for name in MACHINES:
        boundary[name]["witness"].stop()
        boundary[name]["gateway"].stop()


def traffic(boundary: dict, count: int) -> None:
    """Transfers through each machine (its published upstream is down: each is answered 502 and recorded)."""
    for name in MACHINES:
        for _ in range(count):
            assert httpx.get(listener_url(boundary[name]["config"], "publish-local"), timeout=10).status_code == 502


def sizes(trace: Path) -> tuple[int, int]:
    """(the log's newest checkpoint size, the size the other machine's witness cosigned). The newest
    checkpoint may be a journal frame the checkpoint file does not show yet: pushes send that one."""
    size = newest_checkpoint(trace, None)[1].size
    try:
        witnessed = parse_checkpoint_body(parse_note((trace / WITNESSED_FILE).read_bytes()).text).size
    except FileNotFoundError:
        witnessed = 0
    return size, witnessed


def wait_witnessed(boundary: dict, timeout: float = 20.0) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        now = {name: sizes(boundary[name]["trace"]) for name in MACHINES}
        if all(size == witnessed and size > 0 for size, witnessed in now.values()):
            return {name: size for name, (size, _) in now.items()}
        assert time.monotonic() < deadline, f"not cosigned up to date: {now}"
        time.sleep(0.2)


def test_logs_cosign_each_other_and_verify_as_one_boundary(boundary):
    traffic(boundary, 3)
    records = wait_witnessed(boundary)
    verified = gateway("trace", "verify", "--peers", str(boundary["peers"]))
    assert verified.returncode == 0, verified.stdout + verified.stderr
    for name in MACHINES:
        assert f"OK: {name} (test.boundary/{name}/trace): {records[name]} records" in verified.stdout
    other = {"gw-a": "gw-b", "gw-b": "gw-a"}
    for name in MACHINES:  # each log carries the other machine's witness cosignature
        assert f"cosigned by {other[name]}/witness" in verified.stderr, verified.stderr

    metered = gateway("trace", "meter", "--peers", str(boundary["peers"]), "--by", "decision")
    assert metered.returncode == 0, metered.stderr
    report = json.loads(metered.stdout)
    assert {log["log"] for log in report["logs"]} == {f"test.boundary/{name}/trace" for name in MACHINES}
    assert all(log["witnessed"] for log in report["logs"])
    alone = [json.loads(gateway("trace", "meter", str(boundary[name]["trace"]), "--pubkey",
                                str(boundary[name]["state"] / "trace-signing.pub"), "--by", "decision").stdout)
             for name in MACHINES]
    assert report["total"]["transfers"] == sum(one["total"]["transfers"] for one in alone) >= 6

    # What Prometheus sees on each machine: when the other's witness last cosigned, and what it runs.
    for name in MACHINES:
        text = httpx.get(f"http://{boundary[name]['config']['management']['listen']}/metrics", timeout=10).text
        stamps = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                  if line.startswith(f'gateway_trace_witnessed_timestamp_seconds{{witness="{other[name]}/witness"}}')]
        assert stamps and time.time() - stamps[0] < 30, text[-2000:]
        assert 'gateway_config_info{catalog_version="none",digest="' in text


def test_verify_peers_refuses_a_log_without_its_cross_witness(boundary, tmp_path):
    wait_witnessed(boundary)
    copies = yaml.safe_load(boundary["peers"].read_text())
    for peer in copies["peers"]:  # an auditor's copies of the logs
        peer["log"] = str(shutil.copytree(peer["log"], tmp_path / peer["name"]))
    (tmp_path / "gw-b" / WITNESSED_FILE).unlink()
    (tmp_path / "peers.yaml").write_text(yaml.safe_dump(copies))
    verified = gateway("trace", "verify", "--peers", str(tmp_path / "peers.yaml"))
    assert verified.returncode == 1
    assert "OK: gw-a" in verified.stdout
    assert "TAMPERED: gw-b (test.boundary/gw-b/trace): checkpoint: witness policy not met" in verified.stdout
    metered = gateway("trace", "meter", "--peers", str(tmp_path / "peers.yaml"))
    assert metered.returncode == 1 and "groups" not in metered.stdout  # no figures at all


def test_a_witness_killed_with_kill_9_catches_up_when_back(boundary):
    """gw-a's witness service dies: gw-b's log goes on without gw-a's cosignature (its pushes are refused),
    gw-a's pushes stop; once restarted, both logs are cosigned up to their new sizes."""
    before = wait_witnessed(boundary)
    boundary["gw-a"]["witness"].signal(signal.SIGKILL)
    boundary["gw-a"]["witness"].proc.wait(10)
    traffic(boundary, 2)
    time.sleep(1.5)  # several push rounds of gw-b's service, all failing
    stalled = {name: sizes(boundary[name]["trace"]) for name in MACHINES}
    assert all(size > witnessed for size, witnessed in stalled.values()), stalled
    assert "witness push to gw-a failed" in boundary["gw-b"]["witness"].output
    boundary["gw-a"]["witness"] = start_witness(boundary, "gw-a")
    after = wait_witnessed(boundary)
    assert all(after[name] > before[name] for name in MACHINES)
    assert "witness push to gw-a works again" in boundary["gw-b"]["witness"].output
    verified = gateway("trace", "verify", "--peers", str(boundary["peers"]))
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_doctor_peers_compares_configuration_digests(boundary):
    doctor = gateway("doctor", "-c", str(boundary["gw-a"]["path"]), "--peers", str(boundary["peers"]))
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert "ok: 2 machines run the same configuration" in doctor.stdout
    # gw-b reloads a configuration with another policy: doctor names it.
    config = boundary["gw-b"]["config"]
    config["policy"]["default"] = "allow"
    write_config(boundary["gw-b"]["path"], config)
    boundary["gw-b"]["gateway"].signal(signal.SIGHUP)
    boundary["gw-b"]["gateway"].wait_for("configuration reloaded", timeout=30)
    doctor = gateway("doctor", "-c", str(boundary["gw-a"]["path"]), "--peers", str(boundary["peers"]))
    assert doctor.returncode == 1, doctor.stdout
    assert "PROBLEM: gw-b differs from this configuration: digest" in doctor.stdout
    assert "PROBLEM: gw-a" not in doctor.stdout


def test_peers_file_errors_name_file_line_and_key(tmp_path):
    peers = tmp_path / "peers.yaml"
    peers.write_text("peers:\n  - name: a\n    log_key: nonsense\n    witness_key: x+1+AA\n"
                     "    witness: ftp://a\n  - name: b\n")
    with pytest.raises(ConfigError) as caught:
        load_peers(peers)
    errors = "\n".join(caught.value.errors)
    assert f"{peers}:3: peers[0].log_key: not a verifier key" in errors
    assert f"{peers}:5: peers[0].witness: expected a http:// URL" in errors
    assert f"{peers}:6: peers[1]: missing required key 'log_key'" in errors
