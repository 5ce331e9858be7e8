"""`gateway ca export` exports the CA of the gateway its configuration describes, and never makes one."""

from __future__ import annotations

import subprocess
import sys

from gateway.proxy.state import ensure_ca
from tests.gatewayproc import REPO, gateway_config, write_config


def export(config_path, output) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway", "ca", "export", "-c", str(config_path), "-o", str(output)],
                          capture_output=True, text=True, timeout=60, cwd=REPO)


def test_export_refuses_when_the_gateway_has_no_ca_yet_and_creates_none(tmp_path):
    path = write_config(tmp_path / "gateway.yaml", gateway_config(tmp_path / "state"))
    refused = export(path, tmp_path / "ca.pem")
    assert refused.returncode == 1
    assert f"no CA in {tmp_path / 'state' / 'ca'}" in refused.stderr and "first start" in refused.stderr
    assert not (tmp_path / "state").exists() and not (tmp_path / "ca.pem").exists()


def test_export_writes_the_ca_the_gateway_created(tmp_path):
    path = write_config(tmp_path / "gateway.yaml", gateway_config(tmp_path / "state"))
    certificate = ensure_ca(tmp_path / "state")  # as `gateway run` does on its first start
    exported = export(path, tmp_path / "ca.pem")
    assert exported.returncode == 0, exported.stderr
    assert (tmp_path / "ca.pem").read_bytes() == certificate.read_bytes()
