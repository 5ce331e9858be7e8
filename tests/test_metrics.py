"""Monitoring: the management listener (/metrics, /healthz, /readyz, TLS, basic auth), its configuration,
and the metrics and decision log of real transfers through a running gateway."""

from __future__ import annotations

import datetime
import io
import ipaddress
import json
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import bcrypt
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from mitmproxy.test import tflow
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.config.load import ConfigError, load_config
from gateway.dlp.tally import locations_digest
from gateway.filters.measure import Measure, connect_error_kind
from gateway.ops.decisionlog import DecisionLog
from gateway.ops.management import ManagementError, ManagementServer
from gateway.ops.metrics import UPSTREAM_ERROR_KINDS, GatewayMetrics
from gateway.transfer.model import METADATA_KEY, Reason, Transfer
from tests.gatewayproc import (
    free_port,
    gateway_config,
    listener_url,
    start_gateway,
    start_upstream,
    write_config,
)

# ---------------------------------------------------------------------------------------------------
# Helpers


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of a scrape, keyed by (sample name, labels), parsed by prometheus-client's own parser."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(scrape: dict, name: str, **labels: str) -> float:
    return scrape.get((name, frozenset(labels.items())), 0.0)


def management_config(**overrides) -> SimpleNamespace:
    settings = {"management_host": "127.0.0.1", "management_port": 0, "management_tls": None,
                "management_auth": None}
    return SimpleNamespace(**{**settings, **overrides})


def self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gateway management")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = directory / "mgmt.crt", directory / "mgmt.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_file.chmod(0o600)  # a private key: the gateway refuses one open to others
    return cert_file, key_file


@pytest.fixture
def served():
    """Start a management server on a free port; stopped after the test."""
    servers = []

    def start(config: SimpleNamespace, readiness=lambda: [], metrics: GatewayMetrics | None = None) -> ManagementServer:
        server = ManagementServer(config, (metrics or GatewayMetrics()).registry, readiness)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


# ---------------------------------------------------------------------------------------------------
# The management listener on its own


def test_endpoints_and_readiness(served):
    problems = ["engine not running"]
    metrics = GatewayMetrics(version="9.8.7")
    server = served(management_config(), readiness=lambda: list(problems), metrics=metrics)
    with httpx.Client(base_url=server.url) as client:
        assert client.get("/healthz").status_code == 200
        not_ready = client.get("/readyz")
        assert not_ready.status_code == 503 and "engine not running" in not_ready.text
        problems.clear()
        assert client.get("/readyz").status_code == 200
        assert client.get("/nowhere").status_code == 404
        assert client.post("/metrics").status_code == 405
        scrape = client.get("/metrics")
    assert scrape.status_code == 200 and scrape.headers["content-type"].startswith("text/plain")
    got = samples(scrape.text)
    assert value(got, "gateway_build_info", version="9.8.7") == 1
    assert value(got, "gateway_config_reloads_total", result="failure") == 0
    assert ("gateway_config_reloads_total", frozenset({("result", "failure")})) in got  # exported at 0
    assert any(name == "process_cpu_seconds_total" for name, _ in got)
    assert not any(name.endswith("_created") for name, _ in got)


def test_taken_address_is_a_clear_error(served):
    first = served(management_config())
    second = ManagementServer(management_config(management_port=first.port), GatewayMetrics().registry, list)
    with pytest.raises(ManagementError, match=f"127.0.0.1:{first.port}: cannot listen"):
        second.start()


def test_basic_auth_with_bcrypt_hash(served, tmp_path):
    password_hash = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)).decode()
    config = management_config(management_auth=SimpleNamespace(user="prom", password_hash=password_hash,
                                                                 password_file=None))
    server = served(config)
    with httpx.Client(base_url=server.url) as client:
        denied = client.get("/metrics")
        assert denied.status_code == 401 and denied.headers["www-authenticate"].startswith("Basic")
        assert client.get("/healthz").status_code == 401  # every path is protected
        assert client.get("/metrics", auth=("prom", "wrong")).status_code == 401
        assert client.get("/metrics", auth=("other", "s3cret")).status_code == 401
        assert client.get("/metrics", auth=("prom", "s3cret")).status_code == 200
        assert client.get("/metrics", auth=("prom", "s3cret")).status_code == 200  # remembered, still right
        assert client.get("/metrics", headers={"Authorization": "Basic !!!"}).status_code == 401


def test_basic_auth_with_password_file_and_tls(served, tmp_path):
    cert, key = self_signed(tmp_path)
    password_file = tmp_path / "password"
    password_file.write_text("from-a-file\n")
    config = management_config(management_tls=(cert, key), management_auth=SimpleNamespace(
        user="prom", password_hash=None, password_file=password_file))
    server = served(config)
    assert server.url.startswith("https://")
    with httpx.Client(base_url=server.url, verify=ssl.create_default_context(cafile=cert)) as client:
        assert client.get("/metrics", auth=("prom", "from-a-file")).status_code == 200
        assert client.get("/metrics", auth=("prom", "from-a-file\n")).status_code == 401
    with pytest.raises(httpx.HTTPError):  # plain HTTP is not answered on a TLS listener
        httpx.get(server.url.replace("https://", "http://") + "/healthz", timeout=5)


# ---------------------------------------------------------------------------------------------------
# Configuration of the management listener


def _config_with_management(tmp_path: Path, management: dict) -> Path:
    config = gateway_config(tmp_path / "state")
    config["management"] = {**config["management"], **management}
    return write_config(tmp_path / "gateway.yaml", config)


def test_config_management_tls_and_auth(tmp_path):
    cert, key = self_signed(tmp_path)
    (tmp_path / "password").write_text("pw\n")
    (tmp_path / "password").chmod(0o644)
    path = _config_with_management(tmp_path, {"tls": {"cert": "mgmt.crt", "key": "mgmt.key"},
                                              "basic_auth": {"user": "prom", "password_file": "password"}})
    with pytest.raises(ConfigError) as caught:  # a password others can read is refused, as a private key is
        load_config(path)
    assert "management.basic_auth.password_file:" in "\n".join(caught.value.errors)
    assert "open to group or others (mode 0644)" in "\n".join(caught.value.errors)
    (tmp_path / "password").chmod(0o600)
    config = load_config(path)
    assert config.management_tls == (cert, key)  # relative to the configuration file
    assert config.management_auth.user == "prom"
    assert config.management_auth.password_file == tmp_path / "password"


@pytest.mark.parametrize("management, message", [
    ({"basic_auth": {"user": "prom", "password_hash": "plain-text"}}, "management.basic_auth.password_hash: expected a bcrypt hash"),
    ({"basic_auth": {"user": "prom"}}, "management.basic_auth: give exactly one of"),
    ({"basic_auth": {"user": "prom", "password_file": "missing"}}, "management.basic_auth.password_file: no such file"),
    ({"tls": {"cert": "mgmt.crt"}}, "management.tls: missing required key 'key'"),
    ({"tls": {"cert": "mgmt.key", "key": "mgmt.key"}}, "management.tls: cannot load certificate"),
    ({"metrics_path": "/m"}, "management.metrics_path: unknown key"),
])
def test_config_management_errors(tmp_path, management, message):
    self_signed(tmp_path)
    path = _config_with_management(tmp_path, management)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    errors = "\n".join(caught.value.errors)
    assert message in errors
    assert f"{path}:" in errors  # FILE:LINE: key.path: message


# ---------------------------------------------------------------------------------------------------
# Small pieces


@pytest.mark.parametrize("message, kind", [
    ("[Errno 111] Connect call failed ('127.0.0.2', 9)", "refused"),
    ("Multiple exceptions: [Errno 111] Connect call failed ('::1', 9, 0, 0), [Errno 111] ...", "refused"),
    ("[Errno -2] Name or service not known", "dns"),
    ("[Errno 113] No route to host", "unreachable"),
    ("[Errno 110] Connection timed out", "timeout"),
    ("connection cancelled", "connect"),
])
def test_connect_error_kinds(message, kind):
    assert connect_error_kind(message) == kind


def test_decision_log_line():
    out = io.StringIO()
    transfer = Transfer(id="t-1", listener="forward", client_addr="127.0.0.1:5000", client_zone="extranet",
                        upstream_host="example.test", upstream_port=80, upstream_zone="internet")
    transfer.escalate("block", [Reason("cn-id-number", "cn_resident_id", "body:$.sfzh", "block")])
    DecisionLog(out).write(transfer, method="POST", status=403)
    entry = json.loads(out.getvalue())
    assert out.getvalue().count("\n") == 1
    assert entry["transfer_id"] == "t-1" and entry["decision"] == "block" and entry["status"] == 403
    assert entry["reasons"] == [{"rule": "cn-id-number", "type": "cn_resident_id", "action": "block", "count": 1,
                                 "locations": ["body:$.sfzh"], "locations_sha256": locations_digest(["body:$.sfzh"])}]
    assert (entry["src_zone"], entry["dst_zone"]) == ("extranet", "internet")


def test_redacted_transfer_counts_as_block():
    """A redacted transfer crossed with its sensitive part removed: counted as action="block"."""
    metrics, out = GatewayMetrics(), io.StringIO()
    measure = Measure(SimpleNamespace(metrics=metrics, trace=None, runtime=None, master=None), DecisionLog(out))
    flow = tflow.tflow(resp=True)
    transfer = Transfer(id=flow.id, listener="forward", client_addr="127.0.0.1:5000", client_zone="extranet",
                        upstream_host="example.test", upstream_port=80, upstream_zone="internet", recorded=True)
    transfer.escalate("redact", [Reason("bank-card-inbound", "bank_card", "body:offset 0", "redact")])
    flow.metadata[METADATA_KEY] = transfer
    measure.response(flow)
    measure.response(flow)  # a transfer is counted once, however many hooks see it
    got = samples(generate_latest(metrics.registry).decode())
    assert value(got, "gateway_transfers_total", listener="forward", src_zone="extranet", dst_zone="internet",
                 action="block") == 1
    assert value(got, "gateway_dlp_findings_total", rule="bank-card-inbound", type="bank_card", action="redact") == 1
    assert json.loads(out.getvalue())["decision"] == "redact"


# ---------------------------------------------------------------------------------------------------
# End to end: real transfers through a running gateway, counted in its /metrics


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    base = tmp_path_factory.mktemp("monitoring")
    upstream_port = free_port("127.0.0.2")
    config = gateway_config(base / "state")
    for listener in config["listeners"]:
        if listener["mode"] == "reverse":
            listener["upstream"] = f"http://127.0.0.2:{upstream_port}"
    path = write_config(base / "gateway.yaml", config)
    upstream = start_upstream("127.0.0.2", upstream_port, base / "upstream.log")
    process = start_gateway(path)
    management = "http://" + config["management"]["listen"]
    yield SimpleNamespace(process=process, config=config, path=path, management=management,
                          upstream=f"http://127.0.0.2:{upstream_port}", proxy=listener_url(config, "forward"),
                          reverse=listener_url(config, "publish-local"))
    process.stop()
    upstream.stop()


def scrape(gateway) -> dict:
    response = httpx.get(gateway.management + "/metrics", timeout=10)
    assert response.status_code == 200
    return samples(response.text)


def delta(before: dict, after: dict, name: str) -> dict[frozenset, float]:
    """How much each series of `name` moved (series that did not move are left out)."""
    keys = {labels for sample, labels in after if sample == name} | {labels for sample, labels in before if sample == name}
    moved = {labels: after.get((name, labels), 0) - before.get((name, labels), 0) for labels in keys}
    return {labels: amount for labels, amount in moved.items() if amount}


def series(**labels: str) -> frozenset:
    return frozenset(labels.items())


def decision_lines(process, start: int) -> list[dict]:
    return [json.loads(line) for line in process.lines[start:] if line.startswith('{"time"')]


def test_gateway_ready_and_healthy(gateway):
    assert httpx.get(gateway.management + "/healthz").status_code == 200
    ready = httpx.get(gateway.management + "/readyz")
    assert ready.status_code == 200, ready.text
    assert f"metrics: {gateway.management}/metrics" in gateway.process.output


def test_counters_move_by_exactly_the_transfers_made(gateway):
    warned_body = "联系电话 138-0013-8000".encode()
    closed_port = free_port("127.0.0.2")
    before = scrape(gateway)
    log_start = len(gateway.process.lines)
    with httpx.Client(proxy=gateway.proxy, timeout=10) as client:
        clean = [client.get(f"{gateway.upstream}/") for _ in range(3)]
        blocked = client.post(f"{gateway.upstream}/echo", json={"sfzh": "11010519491231002X"})
        warned = client.post(f"{gateway.upstream}/echo", content=warned_body)
        denied = client.get(f"http://127.0.0.1:{free_port()}/")  # extranet -> extranet: no policy rule allows it
        failed = client.get(f"http://127.0.0.2:{closed_port}/")
    published = httpx.get(f"{gateway.reverse}/", timeout=10)
    assert [r.status_code for r in clean] == [200, 200, 200] and published.status_code == 200
    assert (blocked.status_code, warned.status_code, denied.status_code, failed.status_code) == (403, 200, 403, 502)
    assert warned.headers["x-gateway-warning"] == "mobile"
    after = scrape(gateway)

    forward = {"listener": "forward", "src_zone": "extranet"}
    assert delta(before, after, "gateway_transfers_total") == {
        series(**forward, dst_zone="internet", action="allow"): 3,
        series(listener="publish-local", src_zone="extranet", dst_zone="internet", action="allow"): 1,
        series(**forward, dst_zone="internet", action="block"): 1,
        series(**forward, dst_zone="internet", action="warn"): 1,
        series(**forward, dst_zone="extranet", action="deny"): 1,
        series(**forward, dst_zone="internet", action="error"): 1,
    }
    assert delta(before, after, "gateway_dlp_findings_total") == {
        series(rule="id-card", type="cn_id_card", action="block"): 1,
        series(rule="id-card-column", type="id_card_field", action="warn"): 1,  # the "sfzh" key itself
        series(rule="mobile", type="cn_mobile", action="warn"): 1,
    }
    # Only what crossed: the warned request and its echo, and the four "ok" answers; not the blocked body.
    assert delta(before, after, "gateway_transfer_bytes_total") == {
        series(src_zone="extranet", dst_zone="internet", direction="request"): len(warned_body),
        series(src_zone="extranet", dst_zone="internet", direction="response"): len(warned_body) + 4 * len(b"ok"),
    }
    assert delta(before, after, "gateway_upstream_errors_total") == {series(listener="forward", kind="refused"): 1}
    assert delta(before, after, "gateway_transfer_duration_seconds_count") == {
        series(src_zone="extranet", dst_zone="internet"): 7, series(src_zone="extranet", dst_zone="extranet"): 1}
    # Two request bodies were inspected (blocked, warned); five answers (four "ok", one echo).
    assert delta(before, after, "gateway_inspection_duration_seconds_count") == {
        series(direction="request"): 2, series(direction="response"): 5}
    # A refused transfer is one trace record (blocked, denied), a forwarded one two: open and completion
    # (warned, the failed upstream, four "ok"); the checkpoint covers them all.
    assert delta(before, after, "gateway_trace_records_total") == {series(): 2 + 2 * 6}
    assert value(after, "gateway_trace_tree_size") - value(before, "gateway_trace_tree_size") == 14
    assert value(after, "gateway_trace_last_checkpoint_timestamp_seconds") >= value(
        after, "gateway_config_last_reload_success_timestamp_seconds")

    # One JSON line per decision that is not a plain allow, naming the transfer the client saw.
    gateway.process.wait_for('"decision":"error"', start=log_start, timeout=5)
    lines = decision_lines(gateway.process, log_start)
    assert [line["decision"] for line in lines] == ["block", "warn", "deny", "error"]
    assert [line["transfer_id"] for line in lines] == [
        blocked.json()["transfer_id"], warned.headers["x-gateway-transfer-id"], denied.json()["transfer_id"],
        failed.headers["x-gateway-transfer-id"]]
    assert "11010519491231002X" not in "\n".join(gateway.process.lines[log_start:])  # never the value


def test_known_label_sets_are_exported_at_zero_from_the_start(tmp_path):
    """Before any transfer: every listener's upstream error kinds and both inspection directions."""
    from tests.gatewayproc import gateway_config, start_gateway, write_config
    config = gateway_config(tmp_path / "state")
    process = start_gateway(write_config(tmp_path / "gateway.yaml", config))
    try:
        got = samples(httpx.get(f"http://{config['management']['listen']}/metrics", timeout=10).text)
    finally:
        process.stop()
    expected = [("gateway_upstream_errors_total", {"listener": listener["name"], "kind": kind})
                for listener in config["listeners"] for kind in UPSTREAM_ERROR_KINDS]
    expected += [("gateway_inspection_duration_seconds_count", {"direction": direction})
                 for direction in ("request", "response")]
    for name, labels in expected:
        assert got.get((name, frozenset(labels.items()))) == 0, (name, labels)


def test_trace_append_duration_observed(gateway):
    before = scrape(gateway)
    with httpx.Client(proxy=gateway.proxy, timeout=10) as client:
        assert client.get(f"{gateway.upstream}/").status_code == 200
    after = scrape(gateway)
    assert delta(before, after, "gateway_trace_append_duration_seconds_count") == {series(): 1}


def test_active_connections_follow_open_clients(gateway):
    def active() -> float:
        return value(scrape(gateway), "gateway_active_connections", listener="forward")

    idle = active()
    with httpx.Client(proxy=gateway.proxy, timeout=10) as client:
        assert client.get(f"{gateway.upstream}/").status_code == 200  # the connection stays open (keep-alive)
        assert active() == idle + 1
    for _ in range(50):
        if active() == idle:
            break
        time.sleep(0.1)
    assert active() == idle


def wait_for_each_worker(gateway, text: str, start: int) -> None:
    """A SIGHUP reaches every worker, each in its own time: wait until each has logged `text`."""
    deadline = time.monotonic() + 30
    while sum(text in line for line in gateway.process.lines[start:]) < gateway.config["gateway"]["workers"]:
        assert time.monotonic() < deadline, f"{text!r} not logged by every worker"
        time.sleep(0.05)


def test_config_reloads_are_counted(gateway):
    before = scrape(gateway)
    good = gateway.path.read_text()
    start = len(gateway.process.lines)
    gateway.process.signal(signal.SIGHUP)
    wait_for_each_worker(gateway, "configuration reloaded", start)
    after_good = scrape(gateway)
    try:
        gateway.path.write_text(good.replace("policy:", "policy:\n  bogus: 1", 1))
        start = len(gateway.process.lines)
        gateway.process.signal(signal.SIGHUP)
        wait_for_each_worker(gateway, "reload rejected", start)
    finally:
        gateway.path.write_text(good)
    after_bad = scrape(gateway)
    assert delta(before, after_good, "gateway_config_reloads_total") == {series(result="success"): 1}
    assert delta(after_good, after_bad, "gateway_config_reloads_total") == {series(result="failure"): 1}
    loaded = "gateway_config_last_reload_success_timestamp_seconds"
    assert value(after_good, loaded) > value(before, loaded)
    assert value(after_bad, loaded) == value(after_good, loaded)  # a rejected reload changes nothing


def test_multiprocess_mode_sums_workers(tmp_path):
    """With PROMETHEUS_MULTIPROC_DIR, /metrics shows the total of every worker process (issue 7's layout)."""
    worker = ("from gateway.ops.metrics import GatewayMetrics\n"
              "GatewayMetrics().transfers.labels('forward', 'extranet', 'internet', 'allow').inc(3)\n")
    reader = ("from prometheus_client import generate_latest\n"
              "from gateway.ops.metrics import GatewayMetrics, exposition_registry\n"
              "print(generate_latest(exposition_registry(GatewayMetrics())).decode())\n")
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    for _ in range(2):
        subprocess.run([sys.executable, "-c", worker], env=env, check=True, cwd=Path(__file__).parent.parent)
    text = subprocess.run([sys.executable, "-c", reader], env=env, check=True, capture_output=True, text=True,
                          cwd=Path(__file__).parent.parent).stdout
    assert value(samples(text), "gateway_transfers_total", listener="forward", src_zone="extranet",
                 dst_zone="internet", action="allow") == 6
