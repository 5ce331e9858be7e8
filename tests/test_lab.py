"""The namespace lab really separates the zones: hosts reach the gateway, not each other."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from gateway.config.load import REPO_ROOT
from gateway.ops.lab import Lab, LabError, lab_down, lab_up
from tests.labs import built_lab

# A tiny TCP server and client run inside namespaces with this interpreter.
SERVE_ONCE = textwrap.dedent(
    """
    import socket, sys
    server = socket.create_server((sys.argv[1], int(sys.argv[2])))
    print("listening", flush=True)
    server.settimeout(10)
    conn, peer = server.accept()
    conn.sendall(b"hello from " + sys.argv[1].encode())
    conn.close()
    """
)
CONNECT = textwrap.dedent(
    """
    import socket, sys
    try:
        with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])) as s:
            print(s.recv(100).decode())
    except OSError as exc:
        print("failed:", exc)
        sys.exit(1)
    """
)


@pytest.fixture(scope="module")
def lab():
    yield from built_lab("tl")


def serve(lab: Lab, ns: str, address: str, port: int):
    server = lab.popen(ns, [sys.executable, "-c", SERVE_ONCE, address, str(port)], stdout=-1, text=True)
    assert server.stdout.readline().strip() == "listening"
    return server


def connect(lab: Lab, ns: str, address: str, port: int, timeout: float = 2.0):
    return lab.run(ns, [sys.executable, "-c", CONNECT, address, str(port), str(timeout)], capture_output=True, text=True)


def test_topology_names_and_addresses(lab):
    assert set(lab.zones) == {"extranet", "sector-health", "internet"}
    ext = lab.zones["extranet"]
    assert (ext.gateway_ip, ext.host_ip, ext.network) == ("198.18.1.1", "198.18.1.2", "198.18.1.0/24")
    assert all(len(z.gateway_ifname) <= 15 and len(z.host_ifname) <= 15 for z in lab.zones.values())
    assert lab.exists()
    assert lab.forwarding() is False


def test_up_is_idempotent(lab):
    lab.up()
    out = lab.run("gw", ["ip", "-4", "-o", "addr", "show", "dev", "ext0"], capture_output=True, text=True, check=True)
    assert out.stdout.count("198.18.1.1/24") == 1


@pytest.mark.parametrize("ns", ["ext", "sec", "inet"])
def test_host_reaches_gateway_over_tcp(lab, ns):
    link = lab.zone_of_ns(ns)
    server = serve(lab, "gw", link.gateway_ip, 7001)
    result = connect(lab, ns, link.gateway_ip, 7001)
    server.wait(5)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == f"hello from {link.gateway_ip}"


def test_gateway_reaches_host_over_tcp(lab):
    sec = lab.zones["sector-health"]
    server = serve(lab, "sec", sec.host_ip, 7002)
    result = connect(lab, "gw", sec.host_ip, 7002)
    server.wait(5)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hosts_cannot_cross_zones_unless_gateway_forwards(lab):
    inet = lab.zones["internet"]
    server = serve(lab, "inet", inet.host_ip, 7003)
    try:
        blocked = connect(lab, "ext", inet.host_ip, 7003, timeout=1.0)
        assert blocked.returncode == 1, "extranet reached the internet host with forwarding off"
        lab.set_forwarding(True)
        carried = connect(lab, "ext", inet.host_ip, 7003)
        assert carried.returncode == 0, carried.stdout + carried.stderr
        assert carried.stdout.strip() == f"hello from {inet.host_ip}"
    finally:
        lab.set_forwarding(False)
        server.kill()
        server.wait()


def test_two_labs_coexist_and_down_removes_everything(lab):
    other = Lab(prefix=f"{lab.prefix}b")
    other.up()
    try:
        assert other.exists() and lab.exists()
        # A process left behind must not keep the lab alive. Wait until it runs inside the namespace
        # (`ip netns exec` enters it only after starting), as a real leftover would.
        stray = other.popen("ext", ["sh", "-c", "echo inside; exec sleep 60"], stdout=subprocess.PIPE, text=True)
        assert stray.stdout.readline().strip() == "inside"
    finally:
        other.down()
    assert stray.wait(5) is not None
    assert not other.exists()
    remaining = os.listdir("/var/run/netns")
    assert not [name for name in remaining if name.startswith(f"{other.prefix}-")]
    assert lab.exists()


def test_a_state_folder_holds_one_lab_and_another_is_refused_before_anything_is_touched(tmp_path):
    """`lab up` / `lab down --prefix OTHER` on a state folder a lab runs from would take its services
    for the other's (and stop them with it): refused, its pid files left alone."""
    (tmp_path / "lab.json").write_text(json.dumps({"prefix": "gwlab", "config": "config/lab.yaml"}) + "\n")
    (tmp_path / "gateway.pid").write_text("4242\n")
    other = Lab(prefix="gwl2")
    for act in (lambda: lab_up(other, REPO_ROOT / "config" / "lab.yaml", tmp_path), lambda: lab_down(other, tmp_path)):
        with pytest.raises(LabError, match="holds the lab 'gwlab'"):
            act()
    assert (tmp_path / "gateway.pid").read_text() == "4242\n" and not other.exists()


def test_vagrantfile_is_valid_ruby_and_reads_the_lab_config():
    ruby = shutil.which("ruby")
    if ruby is None:
        pytest.skip("ruby is missing (Debian package ruby): cannot check the Vagrantfile's syntax")
    vagrantfile = REPO_ROOT / "Vagrantfile"
    result = subprocess.run([ruby, "-c", str(vagrantfile)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "Syntax OK" in result.stdout, result.stderr
    # Evaluate its topology (no Vagrant needed): the VMs get the namespace lab's addresses.
    probe = (
        "module Vagrant; def self.configure(*) end; end; "
        f"load {str(vagrantfile)!r}; "
        "ZONES.each { |z| puts [z[:zone], z[:host], z[:gateway_ip], z[:host_ip], z[:prefix]].join(' ') }"
    )
    result = subprocess.run([ruby, "-e", probe], capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    expected = [
        f"{link.zone} {link.ns} {link.gateway_ip} {link.host_ip} {link.prefixlen}" for link in Lab().zones.values()
    ]
    assert result.stdout.split("\n")[:-1] == expected
