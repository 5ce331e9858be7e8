"""Configuration loading: every error named by file, line and key; front-end profiles layered."""

import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config.load import ConfigError, load_config
from gateway.config.policy import Policy
from gateway.config.zones import ZoneMap

REPO = Path(__file__).resolve().parent.parent


def errors_of(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "gw.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return caught.value.errors


VALID = """\
gateway: {name: fe1, state_dir: state}
zones:
  extranet: {networks: [10.1.0.0/16]}
  internet: {networks: [0.0.0.0/0]}
listeners:
  - {name: forward, mode: regular, listen: 127.0.0.1:8080}
policy:
  rules:
    - {name: out, from: extranet, to: internet, action: allow}
dlp: {rules: dlp}
trace: {dir: trace, origin: example/fe1}
management: {listen: 127.0.0.1:9090}
"""


def test_shipped_default_configuration_loads():
    config = load_config(REPO / "config" / "gateway.yaml")
    assert [listener.name for listener in config.listeners] == ["forward", "publish-local"]
    assert config.policy_default == "deny"
    assert config.spool_threshold == 8 * 1024 * 1024


def test_valid_file_resolves_paths_relative_to_itself(tmp_path):
    path = tmp_path / "gw.yaml"
    path.write_text(VALID)
    config = load_config(path)
    assert config.state_dir == tmp_path / "state"
    assert config.trace_dir == tmp_path / "state" / "trace"
    assert config.dlp_rules == tmp_path / "dlp"


@pytest.mark.parametrize("written, seconds", [("500ms", 0.5), ("45s", 45.0), ("2m", 120.0), ("10", 10.0)])
def test_request_head_timeout_takes_a_duration(tmp_path, written, seconds):
    path = tmp_path / "gw.yaml"
    path.write_text(VALID.replace("state_dir: state}", f"state_dir: state, request_head_timeout: '{written}'}}"))
    assert load_config(path).request_head_timeout == seconds
    assert load_config(REPO / "config" / "gateway.yaml").request_head_timeout == 30.0


@pytest.mark.parametrize("written", ["0s", "-1", "5 min", "soon"])
def test_a_bad_request_head_timeout_names_file_line_and_key(tmp_path, written):
    errors = errors_of(tmp_path, VALID.replace("state_dir: state}",
                                               f"state_dir: state, request_head_timeout: '{written}'}}"))
    assert len(errors) == 1 and errors[0].startswith(f"{tmp_path}/gw.yaml:1: gateway.request_head_timeout: "
                                                      f"not a valid duration: '{written}'"), errors


def test_inspection_budget_defaults_and_takes_a_duration(tmp_path):
    path = tmp_path / "gw.yaml"
    path.write_text(VALID.replace("dlp: {rules: dlp}", "dlp: {rules: dlp, inspection_budget: 250ms}"))
    assert load_config(path).inspection_budget == 0.25
    assert load_config(REPO / "config" / "gateway.yaml").inspection_budget == 5.0


@pytest.mark.parametrize("written", ["0s", "-1", "forever"])
def test_a_bad_inspection_budget_names_file_line_and_key(tmp_path, written):
    errors = errors_of(tmp_path, VALID.replace("dlp: {rules: dlp}", f"dlp: {{rules: dlp, inspection_budget: '{written}'}}"))
    assert len(errors) == 1 and errors[0].startswith(f"{tmp_path}/gw.yaml:10: dlp.inspection_budget: "
                                                      f"not a valid duration: '{written}'"), errors


def test_memory_budget_and_body_idle_timeout_default_and_take_a_size_and_a_duration(tmp_path):
    path = tmp_path / "gw.yaml"
    path.write_text(VALID.replace("dlp: {rules: dlp}", "dlp: {rules: dlp, memory_budget: 64MiB}")
                    .replace("state_dir: state}", "state_dir: state, body_idle_timeout: 15s}"))
    config = load_config(path)
    assert (config.memory_budget, config.body_idle_timeout, config.body_timeout) == (64 * 1024 * 1024, 15.0, None)
    shipped = load_config(REPO / "config" / "gateway.yaml")
    assert (shipped.memory_budget, shipped.body_idle_timeout) == (256 * 1024 * 1024, 60.0)
    path.write_text(VALID.replace("state_dir: state}", "state_dir: state, body_timeout: 10m}"))
    assert load_config(path).body_timeout == 600.0


@pytest.mark.parametrize("written, error", [("512KiB", "at least 1 MiB"), ("0", "at least 1 MiB"),
                                            ("lots", "not a valid size: 'lots'")])
def test_a_bad_memory_budget_names_file_line_and_key(tmp_path, written, error):
    errors = errors_of(tmp_path, VALID.replace("dlp: {rules: dlp}", f"dlp: {{rules: dlp, memory_budget: '{written}'}}"))
    assert len(errors) == 1 and errors[0].startswith(f"{tmp_path}/gw.yaml:10: dlp.memory_budget: {error}"), errors


@pytest.mark.parametrize("key", ["body_idle_timeout", "body_timeout"])
@pytest.mark.parametrize("written", ["0s", "-1", "never"])
def test_a_bad_body_timeout_names_file_line_and_key(tmp_path, key, written):
    errors = errors_of(tmp_path, VALID.replace("state_dir: state}", f"state_dir: state, {key}: '{written}'}}"))
    assert len(errors) == 1 and errors[0].startswith(f"{tmp_path}/gw.yaml:1: gateway.{key}: "
                                                      f"not a valid duration: '{written}'"), errors


def test_shutdown_grace_takes_a_duration_up_to_ten_minutes(tmp_path):
    path = tmp_path / "gw.yaml"
    path.write_text(VALID.replace("state_dir: state}", "state_dir: state, shutdown_grace: 2500ms}"))
    assert load_config(path).shutdown_grace == 2.5
    assert load_config(REPO / "config" / "gateway.yaml").shutdown_grace == 10.0
    for written, error in [("0s", "not a valid duration: '0s'"), ("soon", "not a valid duration: 'soon'"),
                           ("11m", "at most 600 s")]:
        errors = errors_of(tmp_path, VALID.replace("state_dir: state}", f"state_dir: state, shutdown_grace: {written}}}"))
        assert len(errors) == 1 and errors[0].startswith(f"{tmp_path}/gw.yaml:1: gateway.shutdown_grace: ") \
            and error in errors[0], errors


def test_drain_delay_is_a_duration_within_the_shutdown_grace(tmp_path):
    path = tmp_path / "gw.yaml"
    path.write_text(VALID.replace("state_dir: state}", "state_dir: state, drain_delay: 3s}"))
    assert load_config(path).drain_delay == 3.0
    assert load_config(REPO / "config" / "gateway.yaml").drain_delay == 0.0  # a stop without a balancer: no wait
    errors = errors_of(tmp_path, VALID.replace("state_dir: state}", "state_dir: state, shutdown_grace: 5s, "
                                                                    "drain_delay: 5s}"))
    assert len(errors) == 1 and errors[0].startswith(f"{tmp_path}/gw.yaml:1: gateway.drain_delay: ") \
        and "shorter than shutdown_grace (5 s)" in errors[0], errors


def test_trace_append_timeout_takes_a_duration_up_to_a_minute(tmp_path):
    path = tmp_path / "gw.yaml"
    path.write_text(VALID.replace("origin: example/fe1}", "origin: example/fe1, append_timeout: 1500ms}"))
    assert load_config(path).trace_append_timeout == 1.5
    assert load_config(REPO / "config" / "gateway.yaml").trace_append_timeout == 5.0
    for written, error in [("0s", "not a valid duration: '0s'"), ("soon", "not a valid duration: 'soon'"),
                           ("2m", "at most 60 s")]:
        errors = errors_of(tmp_path, VALID.replace("origin: example/fe1}", f"origin: example/fe1, append_timeout: {written}}}"))
        assert len(errors) == 1 and errors[0].startswith(f"{tmp_path}/gw.yaml:11: trace.append_timeout: ") \
            and error in errors[0], errors


def test_upstream_timeout_takes_a_duration(tmp_path):
    path = tmp_path / "gw.yaml"
    path.write_text(VALID.replace("state_dir: state}", "state_dir: state, upstream_timeout: 90s}"))
    assert load_config(path).upstream_timeout == 90.0
    assert load_config(REPO / "config" / "gateway.yaml").upstream_timeout == 60.0
    for written in ("0s", "-5s", "later"):
        errors = errors_of(tmp_path, VALID.replace("state_dir: state}", f"state_dir: state, upstream_timeout: '{written}'}}"))
        assert len(errors) == 1 and errors[0].startswith(
            f"{tmp_path}/gw.yaml:1: gateway.upstream_timeout: not a valid duration: '{written}'"), errors


def test_max_client_connections_defaults_and_takes_a_positive_integer(tmp_path):
    path = tmp_path / "gw.yaml"
    path.write_text(VALID.replace("state_dir: state}", "state_dir: state, max_client_connections: 64}"))
    assert load_config(path).max_client_connections == 64
    assert load_config(REPO / "config" / "gateway.yaml").max_client_connections == 1024


@pytest.mark.parametrize("written", ["0", "-5", "many", "1.5"])
def test_a_bad_max_client_connections_names_file_line_and_key(tmp_path, written):
    errors = errors_of(tmp_path, VALID.replace("state_dir: state}",
                                               f"state_dir: state, max_client_connections: {written}}}"))
    assert len(errors) == 1 and errors[0].startswith(f"{tmp_path}/gw.yaml:1: gateway.max_client_connections: "), \
        errors


def test_unknown_key_is_an_error_with_file_line_and_path(tmp_path):
    errors = errors_of(tmp_path, VALID.replace("action: allow}", "action: allow, reqest_profile: x}"))
    assert errors == [f"{tmp_path}/gw.yaml:9: policy.rules[0].reqest_profile: unknown key "
                      "(expected one of: action, from, hosts, listeners, name, paths, request_profile, "
                      "response_profile, to)"]


def test_every_error_is_reported_not_only_the_first(tmp_path):
    text = (VALID.replace("10.1.0.0/16", "10.1.0.0/33")
            .replace("listen: 127.0.0.1:8080", "listen: localhost")
            .replace("to: internet", "to: intranet"))
    errors = errors_of(tmp_path, text)
    assert len(errors) == 3, errors
    assert errors[0].startswith(f"{tmp_path}/gw.yaml:3: zones.extranet.networks[0]: not a valid network")
    assert errors[1].startswith(f"{tmp_path}/gw.yaml:6: listeners[0].listen: not a valid HOST:PORT address")
    assert errors[2].startswith(f"{tmp_path}/gw.yaml:9: policy.rules[0].to: no zone named 'intranet'")


def test_syntax_error_names_the_line(tmp_path):
    errors = errors_of(tmp_path, VALID.replace("zones:\n", "zones:\n  - [\n", 1))
    assert len(errors) == 1 and errors[0].startswith(f"{tmp_path}/gw.yaml:")
    assert "(syntax)" in errors[0]


def test_reverse_listener_needs_an_upstream(tmp_path):
    errors = errors_of(tmp_path, VALID.replace("mode: regular", "mode: reverse"))
    assert errors == [f"{tmp_path}/gw.yaml:6: listeners[0]: a reverse listener needs 'upstream' "
                      "(the URL of the service it publishes)"]


def test_check_command_prints_errors_and_exits_2(tmp_path):
    path = tmp_path / "gw.yaml"
    path.write_text(VALID.replace("name: fe1", "name: fe1, colour: red"))
    result = subprocess.run([sys.executable, "-m", "gateway", "check", "-c", str(path)],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert f"{path}:1: gateway.colour: unknown key" in result.stderr


def test_check_command_accepts_the_shipped_configuration_and_every_frontend():
    result = subprocess.run([sys.executable, "-m", "gateway", "check", "--all-frontends"],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "config/gateway.yaml: ok" in result.stdout


def test_zone_map_longest_prefix_wins_and_unmatched_is_unknown():
    config = load_config(REPO / "config" / "gateway.yaml")
    zones = ZoneMap(config.zones)
    assert zones.zone_of("127.0.0.1") == "extranet"
    assert zones.zone_of("127.0.0.2") == "internet"
    assert zones.zone_of("::ffff:127.0.0.1") == "extranet"
    assert zones.zone_of("192.0.2.1") == "unknown"
    assert zones.zone_of("not-an-address") == "unknown"


def test_zone_from_interface_addresses(tmp_path):
    path = tmp_path / "gw.yaml"
    path.write_text(VALID.replace("{networks: [10.1.0.0/16]}", "{interfaces: [lo]}"))
    zones = ZoneMap(load_config(path).zones)  # reads lo's addresses with pyroute2
    assert zones.zone_of("127.0.0.9") == "extranet"


def test_policy_first_match_wins_and_default_denies(tmp_path):
    path = tmp_path / "gw.yaml"
    path.write_text(VALID.replace(
        "    - {name: out, from: extranet, to: internet, action: allow}",
        "    - {name: no-admin, from: extranet, to: internet, paths: ['/admin/*'], action: deny}\n"
        "    - {name: gov-only, from: extranet, to: internet, hosts: ['*.gov.cn'], action: allow}"))
    policy = Policy(load_config(path).rules)
    assert policy.decide("extranet", "internet", "data.gov.cn", "/api", "forward").rule == "gov-only"
    assert policy.decide("extranet", "internet", "data.gov.cn", "/admin/x", "forward").action == "deny"
    assert policy.decide("extranet", "internet", "example.com", "/api", "forward").rule == "default"
    assert policy.decide("internet", "extranet", "data.gov.cn", "/api", "forward").action == "deny"
    # A CONNECT (no path yet) to an allowed host opens; the path deny applies to requests inside.
    assert policy.decide("extranet", "internet", "data.gov.cn", None, "forward").action == "allow"
