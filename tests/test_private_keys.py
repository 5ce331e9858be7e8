"""Private keys open to group or others are refused at start with a clear message (issue 20): the trace
signing key, the management TLS key (the authz signing keys: tests/test_authz.py)."""

from __future__ import annotations

import subprocess
import sys

from tests.gatewayproc import REPO, Process, gateway_config, start_gateway, write_config
from tests.test_metrics import self_signed


def test_a_trace_signing_key_open_to_others_stops_the_start(tmp_path):
    path = write_config(tmp_path / "gateway.yaml", gateway_config(tmp_path / "state"))
    start_gateway(path).stop()  # the first start creates the key, 0600
    key = tmp_path / "state" / "trace-signing.key"
    key.chmod(0o640)
    process = Process([sys.executable, "-m", "gateway", "run", "-c", str(path)])
    assert process.proc.wait(60) != 0
    assert f"{key} is open to group or others (mode 0640)" in process.output, process.output
    key.chmod(0o600)
    start_gateway(path).stop()  # and starts again once it is the owner's alone


def test_a_management_tls_key_open_to_others_fails_the_check(tmp_path):
    cert, key = self_signed(tmp_path)
    key.chmod(0o644)
    config = gateway_config(tmp_path / "state")
    config["management"]["tls"] = {"cert": str(cert), "key": str(key)}
    checked = subprocess.run([sys.executable, "-m", "gateway", "check", "-c",
                              str(write_config(tmp_path / "gateway.yaml", config))],
                             capture_output=True, text=True, timeout=60, cwd=REPO)
    assert checked.returncode == 2
    assert f"management.tls.key: {key} is open to group or others (mode 0644)" in checked.stderr, checked.stderr
