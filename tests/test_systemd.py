"""The systemd units pass `systemd-analyze verify` and keep their hardening."""

import configparser
import shutil
import subprocess

import pytest

from gateway.config.load import DEFAULT_CONFIG, REPO_ROOT, load_config
from gateway.proxy.supervisor import STOP_MARGIN
from gateway.yamlnodes import parse_duration

UNITS = ["gateway.service", "gateway-sentinel.service", "gateway-witness.service"]
INSTALL_PREFIX = "/opt/gateway"


def unit(name: str) -> dict[str, list[str]]:
    """[Service] entries of a unit, repeated keys kept in order."""
    parser = configparser.ConfigParser(strict=False, interpolation=None, dict_type=_MultiDict, delimiters=("=",))
    parser.optionxform = str
    parser.read(REPO_ROOT / "systemd" / name)
    return {key: value.split("\n") for key, value in parser["Service"].items()}


class _MultiDict(dict):
    """configparser helper: a repeated key accumulates its values (as systemd does)."""

    def __setitem__(self, key, value):
        if key in self and isinstance(value, list) and isinstance(self[key], list):
            self[key].extend(value)
        else:
            super().__setitem__(key, value)


@pytest.mark.parametrize("name", UNITS)
def test_systemd_analyze_verify(name, tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is missing (Debian package systemd)")
    # verify insists that ExecStart programs exist: render the unit for this checkout the way
    # scripts/install renders it for its prefix.
    if not (REPO_ROOT / ".venv" / "bin" / "gateway").exists():
        pytest.skip("no .venv/bin/gateway in this checkout to stand in for the installed one")
    rendered = tmp_path / name
    rendered.write_text((REPO_ROOT / "systemd" / name).read_text().replace(INSTALL_PREFIX, str(REPO_ROOT)))
    result = subprocess.run([analyze, "verify", "--man=no", str(rendered)], capture_output=True, text=True,
                            cwd=tmp_path, timeout=60)
    # verify exits 0 even for unknown keys or syscall groups: any message is a failure.
    assert result.returncode == 0 and result.stderr == "" and result.stdout == "", result.stderr + result.stdout


def test_gateway_unit_is_a_hardened_notify_service():
    service = unit("gateway.service")
    assert service["Type"] == ["notify"]  # not notify-reload: Debian 12's systemd 252 lacks it
    assert service["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert service["WatchdogSec"] and service["User"] == ["gateway"]
    for directory in ("StateDirectory", "LogsDirectory", "ConfigurationDirectory"):
        assert service[directory] == ["gateway"]
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
                       "PrivateTmp": "yes"}.items():
        assert service[key] == [value], key
    assert service["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]
    assert "AF_PACKET" not in service["RestrictAddressFamilies"][0]
    assert service["SystemCallFilter"][0] == "@system-service"


def test_only_the_sentinel_gets_raw_sockets():
    sentinel = unit("gateway-sentinel.service")
    assert sentinel["CapabilityBoundingSet"] == ["CAP_NET_RAW"]
    assert sentinel["AmbientCapabilities"] == ["CAP_NET_RAW"]
    assert "AF_PACKET" in sentinel["RestrictAddressFamilies"][0].split()
    assert sentinel["NoNewPrivileges"] == ["yes"] and sentinel["ProtectSystem"] == ["strict"]
    assert sentinel["ExecStart"][0].split()[1:3] == ["sentinel", "-c"]


def test_stopping_the_unit_gives_the_drain_its_time():
    """`systemctl stop`/`restart` (and the package's upgrade, which stops the service in prerm) must let
    the gateway drain: SIGTERM to the main process only, which stops the workers, then the trace writer
    (the default KillMode=control-group signals them all at once: the writer quits under the draining
    workers and their transfers are cut unrecorded), and no kill before the supervisor's own deadline."""
    service = unit("gateway.service")
    assert "ExecStop" not in service  # the stop is the signal, not a command
    assert service["KillMode"] == ["mixed"]
    assert service.get("KillSignal", ["SIGTERM"]) == ["SIGTERM"]
    timeout = parse_duration(service["TimeoutStopSec"][0])
    for frontend in [None, *sorted(path.stem for path in (REPO_ROOT / "frontends").glob("*.yaml"))]:
        grace = load_config(DEFAULT_CONFIG, frontend).shutdown_grace
        # The supervisor kills a worker STOP_MARGIN after the grace; systemd must wait longer than that.
        assert timeout > grace + STOP_MARGIN, (frontend, timeout, grace)


def test_witness_unit_runs_unprivileged_beside_the_gateway():
    witness = unit("gateway-witness.service")
    assert witness["ExecStart"][0].split()[1:5] == ["cluster", "witness", "-c", "/etc/gateway/gateway.yaml"]
    assert "--peers /etc/gateway/peers.yaml" in witness["ExecStart"][0]
    assert witness["User"] == ["gateway"] and witness["StateDirectory"] == ["gateway"]  # the log it pushes
    assert witness["CapabilityBoundingSet"] == [""] and witness["NoNewPrivileges"] == ["yes"]
