"""`gateway doctor` in the namespace lab: silent on the correct boundary, precise on each hole."""

import sys
from pathlib import Path

import pytest

from gateway.config.load import REPO_ROOT, load_config
from gateway.ops.doctor import diagnose
from gateway.ops.lab import Lab
from tests.labs import built_lab

LAB_CONFIG = REPO_ROOT / "config" / "lab.yaml"
FRONTENDS = sorted(p.stem for p in (REPO_ROOT / "frontends").glob("*.yaml"))


@pytest.fixture(scope="module")
def lab():
    yield from built_lab("td")


@pytest.fixture
def fresh(lab):
    """Each test starts from, and leaves, the correct lab."""
    lab.up()
    yield lab
    lab.set_forwarding(False)
    for zone in lab.zones:
        lab.set_link(zone, True)
    lab.run("gw", ["ip", "route", "flush", "198.18.2.0/25"])


def doctor(lab: Lab, config: Path = LAB_CONFIG, *extra: str):
    """The real command, run inside the lab's gateway namespace."""
    argv = [sys.executable, "-m", "gateway", "doctor", "-c", str(config), *extra]
    return lab.run("gw", argv, capture_output=True, text=True, timeout=60)


def test_every_frontend_profile_is_valid():
    assert {"extranet-internet", "extranet-sector", "sector-internet"} <= set(FRONTENDS)
    for name in FRONTENDS:
        config = load_config(REPO_ROOT / "config" / "gateway.yaml", frontend=name)
        assert all(zone.interfaces for zone in config.zones), f"{name}: zones should name their interfaces"
        assert config.policy_default == "deny"


def test_correct_lab_passes(fresh):
    result = doctor(fresh)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("ok:")


def test_forwarding_on_is_named_with_its_fix(fresh):
    fresh.set_forwarding(True)
    result = doctor(fresh)
    assert result.returncode == 1
    assert "IPv4 forwarding is on for zone interfaces ext0 (extranet), sec0 (sector-health), inet0 (internet)" \
        in result.stdout
    assert "fix: sysctl -w net.ipv4.ip_forward=0" in result.stdout


def test_interface_down_is_named(fresh):
    fresh.set_link("sector-health", False)
    result = doctor(fresh)
    assert result.returncode == 1
    assert "PROBLEM: zone sector-health: interface sec0 is administratively down" in result.stdout
    assert "fix: ip link set sec0 up" in result.stdout
    assert "forwarding" not in result.stdout


def test_route_leaving_by_the_wrong_interface(fresh):
    fresh.run("gw", ["ip", "route", "add", "198.18.2.0/25", "dev", "ext0"], check=True)
    problems = diagnose(load_config(LAB_CONFIG), netns=fresh.netns("gw"))
    assert [p.message for p in problems] == [
        "route to 198.18.2.0/25 (zone sector-health) leaves by ext0, in zone extranet"
    ]
    assert "ip route del 198.18.2.0/25 dev ext0" in problems[0].fix


def test_named_interface_missing_or_without_address(fresh, tmp_path):
    config = tmp_path / "gateway.yaml"
    text = LAB_CONFIG.read_text()
    text = text.replace("networks: [198.18.1.0/24]", "networks: [198.18.1.0/24]\n    interfaces: [ext9]")
    text = text.replace("networks: [198.18.3.0/24]", "networks: [10.99.0.0/16]\n    interfaces: [inet0]")
    config.write_text(text)
    problems = [p.message for p in diagnose(load_config(config), netns=fresh.netns("gw"))]
    assert "zone extranet: interface ext9 does not exist" in problems
    assert "zone internet: interface inet0 has no address in 10.99.0.0/16" in problems


def test_frontend_profile_on_the_wrong_machine_is_caught(fresh):
    # The extranet-internet profile expects 10.10.0.0/16 behind ext0; the lab has 198.18.1.0/24.
    result = doctor(fresh, REPO_ROOT / "config" / "gateway.yaml", "--frontend", "extranet-internet")
    assert result.returncode == 1
    assert "zone extranet: interface ext0 has no address in 10.10.0.0/16" in result.stdout
    assert "listener forward: no interface has its address 10.10.0.1" in result.stdout
    # The fix names where that address is written: the profile's line, not the base configuration.
    profile = REPO_ROOT / "frontends" / "extranet-internet.yaml"
    line = next(n for n, text in enumerate(profile.read_text().splitlines(), 1) if "10.10.0.1:" in text)
    assert f"listeners[forward].listen ({profile}:{line})" in result.stdout
