"""A reload reads again every file the configuration names, or fails loudly (issue 20): an upstream CA
changed in place is trusted after SIGHUP (mitmproxy caches TLS contexts by path), one that no longer
holds certificates fails the reload (`result="failure"`) and the old trust keeps serving."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess

import pytest

from tests.certs import make_ca_and_server
from tests.gatewayproc import free_port, gateway_config, listener_url, metric_total, start_gateway, start_upstream, \
    write_config


@pytest.fixture
def sector(tmp_path):
    """Two TLS upstreams, each with a certificate of its own CA; the gateway trusts the first CA."""
    servers = {}
    processes = []
    try:
        for name in ("old", "new"):
            folder = tmp_path / name
            folder.mkdir()
            ca, cert, key = make_ca_and_server(folder, "127.0.0.2")
            port = free_port("127.0.0.2")
            processes.append(start_upstream("127.0.0.2", port, folder / "upstream.log", tls=(cert, key)))
            servers[name] = (ca, f"https://127.0.0.2:{port}")
        trusted = tmp_path / "sector-ca.pem"
        shutil.copyfile(servers["old"][0], trusted)
        config = gateway_config(tmp_path / "state", tls={"upstream_ca": str(trusted)})
        gateway = start_gateway(write_config(tmp_path / "gateway.yaml", config))
        processes.append(gateway)
        yield gateway, config, trusted, servers
    finally:
        for process in processes:
            process.stop()


def status(config: dict, url: str) -> str:
    done = subprocess.run(["curl", "-sS", "-k", "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code}",
                           "-x", listener_url(config, "forward"), f"{url}/text?body=x"],
                          capture_output=True, text=True, timeout=30)
    return done.stdout


def reload(gateway, text: str) -> None:
    """SIGHUP to the pid the gateway announced at its start, as an operator reads it there."""
    pid = int(gateway.wait_for("gateway pid ").split("gateway pid ", 1)[1].split()[0])
    assert pid == gateway.proc.pid
    mark = len(gateway.lines)
    os.kill(pid, signal.SIGHUP)
    gateway.wait_for(text, start=mark)


def test_an_upstream_ca_changed_in_place_is_trusted_after_reload(sector):
    gateway, config, trusted, servers = sector
    assert status(config, servers["old"][1]) == "200"
    assert status(config, servers["new"][1]) == "502"  # its CA is not trusted yet
    trusted.write_bytes(servers["new"][0].read_bytes())  # the same path, new content
    reload(gateway, "configuration reloaded")
    assert status(config, servers["new"][1]) == "200"
    assert status(config, servers["old"][1]) == "502"  # the old CA is no longer trusted


def test_an_upstream_ca_that_no_longer_loads_fails_the_reload_and_the_old_one_serves(sector):
    gateway, config, trusted, servers = sector
    failures = metric_total(config, "gateway_config_reloads_total", 'result="failure"')
    trusted.write_text("-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n")
    reload(gateway, "reload rejected")
    assert f"tls.upstream_ca: {trusted} holds no PEM CA certificates" in gateway.output
    assert metric_total(config, "gateway_config_reloads_total", 'result="failure"') == failures + 1
    assert status(config, servers["old"][1]) == "200"
