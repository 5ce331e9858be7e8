"""Catalogued datasets across the namespace lab: the gateway in its own namespace with an authz section,
the datasets served by the sector server, a client in the extranet namespace using curl through the
forward proxy. Open data passes; conditional data needs the two-role grant and licence, and a refusal
reaches nothing in the sector; a contract's raw endpoint never passes, its product does; a revoked
grant stops."""

from __future__ import annotations

import json
import time

import pytest
import yaml

from gateway.authz.jose import claims_of
from gateway.ops.lab import Lab
from tests.authzkit import CATALOG, Kit
from tests.gatewayproc import REPO, start_gateway, start_upstream, trace_records, write_config
from tests.labs import built_lab
from tests.test_proxy_netns import UPSTREAM_PORT, logged_paths

LAB_CONFIG = REPO / "config" / "lab.yaml"
LAB_GATEWAY_NAME = yaml.safe_load(LAB_CONFIG.read_text())["gateway"]["name"]  # the grants' audience


def sector_catalogue(path, sector_host: str) -> str:
    """The shipped catalogue with its datasets (and uncatalogued paths) served by the lab's sector server."""
    catalogue = yaml.safe_load(CATALOG.read_text())
    for entry in [*catalogue["datasets"], *catalogue["uncatalogued"]]:
        entry["hosts"] = [sector_host]
    path.write_text(yaml.safe_dump(catalogue, allow_unicode=True, sort_keys=False))
    return str(path)


@pytest.fixture(scope="module")
def netlab(tmp_path_factory):
    labs = built_lab("gwz")
    lab = next(labs)
    root = tmp_path_factory.mktemp("authz-netns")
    kit = Kit(root / "keys")
    sector = lab.zones["sector-health"]
    config = yaml.safe_load(LAB_CONFIG.read_text())
    config["gateway"]["state_dir"] = str(root / "state")
    config["dlp"]["rules"] = str(REPO / "config" / "dlp")
    config["authz"] = {**kit.authz_section(), "catalog": sector_catalogue(root / "catalog.yaml", sector.host_ip)}
    path = write_config(root / "gateway.yaml", config)
    processes = []
    try:
        processes.append(start_upstream(sector.host_ip, UPSTREAM_PORT, root / "sector.log",
                                        prefix=lab.command("sec", [])))
        processes.append(start_gateway(path, prefix=lab.command("gw", [])))
        yield lab, root, kit
    finally:
        for process in processes:
            process.stop()
        labs.close()


def fetch(lab: Lab, path: str, grant: str | None = None, licence: str | None = None) -> tuple[int, dict, str]:
    """GET the sector server's `path` from the extranet client through the forward proxy, with curl:
    the status, the response's header fields (lower-cased names) and its body."""
    headers = []
    if grant is not None:
        headers += ["-H", f"X-Data-Grant: {grant}"]
    if licence is not None:
        headers += ["-H", f"X-Data-Licence: {licence}"]
    result = lab.run("ext", ["curl", "-sS", "-i", "--max-time", "10", "-x",
                             f"http://{lab.zones['extranet'].gateway_ip}:8080", *headers,
                             f"http://{lab.zones['sector-health'].host_ip}:{UPSTREAM_PORT}{path}"],
                     capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    head, _, body = result.stdout.partition("\n\n")  # text mode: CRLF read as LF
    status_line, *fields = head.split("\n")
    return (int(status_line.split(" ", 2)[1]),
            {name.strip().lower(): value.strip() for name, value in (f.split(":", 1) for f in fields)}, body)


def refused(answer: tuple[int, dict, str], reason: str) -> None:
    status, _, body = answer
    assert status == 403, answer
    assert [r["type"] for r in json.loads(body)["reasons"]] == [reason], body


def grant_record(root, headers: dict) -> dict:
    [record] = trace_records(root / "state" / "trace", "--id", headers["x-gateway-transfer-id"])
    return record["grant"]


def test_open_dataset_passes(netlab):
    lab, root, _ = netlab
    status, headers, body = fetch(lab, "/open/bus-stops/17")
    assert status == 200 and body == "ok", body
    grant = grant_record(root, headers)
    assert grant["dataset"] == "transport.bus-stops" and grant["class"] == "open" and grant["id"] is None
    assert "/open/bus-stops/17" in logged_paths(root, "sector")


def test_conditional_without_grant_is_refused_before_the_sector(netlab):
    lab, root, _ = netlab
    refused(fetch(lab, "/api/residents/2101"), "grant_missing")
    assert "/api/residents/2101" not in logged_paths(root, "sector")


def test_two_role_grant_with_licence_passes_and_is_recorded(netlab):
    lab, root, kit = netlab
    grant = kit.grant(aud=[LAB_GATEWAY_NAME])
    status, headers, body = fetch(lab, "/api/residents/2102", grant=grant, licence=kit.licence())
    assert status == 200, body
    assert [item["district"] for item in json.loads(body)] == ["碧江区"] * 4
    record = grant_record(root, headers)
    assert record["id"] == claims_of(json.loads(grant))["jti"] and record["result"] == "allow"
    assert (record["dataset"], record["class"], record["consumer"]) == ("health.residents", "conditional", "operator-a")
    [arrived] = [json.loads(line) for line in (root / "sector.log").read_text().splitlines()
                 if json.loads(line)["path"] == "/api/residents/2102"]
    assert arrived["data_headers"] == []  # the grant and licence were for the gateway, not the sector


def test_contract_raw_refused_with_three_roles_product_passes(netlab):
    lab, root, kit = netlab
    grant = kit.grant(signers=("bureau", "health", "hospital"), aud=[LAB_GATEWAY_NAME],
                      datasets=[{"id": "health.records"}], purpose="insurance-pricing")
    licence = kit.licence()
    refused(fetch(lab, "/raw/records/2103", grant=grant, licence=licence), "contract_raw")
    assert "/raw/records/2103" not in logged_paths(root, "sector")
    status, headers, body = fetch(lab, "/products/records-stats/2026", grant=grant, licence=licence)
    assert status == 200, body
    assert grant_record(root, headers)["class"] == "contract"
    assert "/products/records-stats/2026" in logged_paths(root, "sector")


def test_revoked_grant_is_refused(netlab):
    lab, root, kit = netlab
    claims = kit.grant_claims(aud=[LAB_GATEWAY_NAME])
    grant, licence = kit.sign(claims, ["bureau", "health"]), kit.licence()
    assert fetch(lab, "/api/residents/2104", grant=grant, licence=licence)[0] == 200
    kit.revoke(claims["jti"])
    time.sleep(1.5)  # the gateway looks at the list at most once a second
    refused(fetch(lab, "/api/residents/2105", grant=grant, licence=licence), "grant_revoked")
    assert "/api/residents/2105" not in logged_paths(root, "sector")
