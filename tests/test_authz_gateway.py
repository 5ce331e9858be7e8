"""Catalogued datasets through the real gateway: open passes; conditional and contract ones need a
grant signed by the right authorities, in scope, unrevoked, within quota, with the operator's licence;
each refusal names its own reason, and the trace record carries the grant."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from gateway.authz.jose import (
    add_signature,
    claims_of,
    draft,
    generate_key,
    load_private_key,
)
from tests.authzkit import Kit
from tests.gatewayproc import (
    free_port,
    gateway_config,
    listener_url,
    metric_total,
    start_gateway,
    start_upstream,
    trace_records,
    write_config,
)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    root = tmp_path_factory.mktemp("authz")
    kit = Kit(root / "keys")
    port = free_port("127.0.0.2")
    config = gateway_config(root / "state", authz=kit.authz_section())
    path = write_config(root / "gateway.yaml", config)
    upstream = start_upstream("127.0.0.2", port, root / "upstream.log")
    gateway = start_gateway(path)
    yield {"kit": kit, "config": config, "root": root, "upstream": f"http://127.0.0.2:{port}"}
    gateway.stop()
    upstream.stop()


def get(lab, path: str, method: str = "GET", grant: str | None = None, licence: str | None = None,
        **headers: str) -> httpx.Response:
    if grant is not None:
        headers["X-Data-Grant"] = grant
    if licence is not None:
        headers["X-Data-Licence"] = licence
    with httpx.Client(proxy=listener_url(lab["config"], "forward"), timeout=15) as client:
        return client.request(method, lab["upstream"] + path, headers=headers)


def refused(response: httpx.Response, reason: str, status: int = 403) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == "grant refused"
    assert [r["type"] for r in body["reasons"]] == [reason], body
    return body


def record_of(lab, response: httpx.Response) -> dict:
    transfer_id = response.headers["X-Gateway-Transfer-Id"]
    [record] = trace_records(lab["root"] / "state" / "trace", "--id", transfer_id)
    return record


def upstream_saw(lab, path: str) -> list[dict]:
    lines = (lab["root"] / "upstream.log").read_text().splitlines()
    return [entry for line in lines if (entry := json.loads(line))["path"] == path]


def raw_request(lab, target: str, method: str = "GET") -> tuple[int, dict | None]:
    """One request sent byte for byte as written (no client normalising its URL), and its status and JSON."""
    host, port = listener_url(lab["config"], "forward").removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=15) as connection:
        authority = target.split("/", 3)[2]
        connection.sendall(f"{method} {target} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n".encode())
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    try:
        return int(head.split(b" ", 2)[1]), json.loads(body)
    except ValueError:
        return int(head.split(b" ", 2)[1]), None


def test_catalogued_host_is_closed_by_default(lab):
    """Found by path first: a method the endpoint does not list, another spelling of its path or another
    path of the host is refused, never passed on the zone policy as if uncatalogued (no grant sent)."""
    log = lab["root"] / "upstream.log"
    seen_before = len(log.read_text().splitlines()) if log.exists() else 0
    for method in ("PUT", "PATCH", "DELETE", "OPTIONS", "PROPFIND", "SEARCH", "QUERY"):
        refused(get(lab, "/api/residents/1", method), "grant_scope")
    assert get(lab, "/api/residents/1", "HEAD").status_code == 403
    refused(get(lab, "/raw/records/1", "PUT"), "contract_raw")
    # Case does not make another endpoint: the dataset's, whose grant is missing.
    for path in ("/API/residents/1", "/Api/Residents", "/RAW/records/1"):
        status, body = raw_request(lab, lab["upstream"] + path)
        assert status == 403 and body["reasons"][0]["type"] in ("grant_missing", "contract_raw"), (path, body)
    for path in ("/api/residents;x=1/1", "/api;/residents/1", "/api/residents;jsessionid=1", "/api\\residents\\1",
                 "/api/%72esidents/1", "/api//residents/1", "/api/./residents/1", "/elsewhere;x=1"):
        status, body = raw_request(lab, lab["upstream"] + path)
        assert status == 403 and [r["type"] for r in body["reasons"]] == ["path_not_normal"], (path, body)
    refused(get(lab, "/other/thing"), "uncatalogued")
    assert get(lab, "/elsewhere").status_code == 200  # listed under 'uncatalogued'
    port = lab["upstream"].rsplit(":", 1)[1]
    # Other spellings of the catalogued host's address: refused before anything resolves them.
    for host in ("2130706434", "127.2", "0x7f.0.0.2", "0177.0.0.2", "127.0.0.02"):
        status, body = raw_request(lab, f"http://{host}:{port}/api/residents/1")
        assert status == 403 and [r["type"] for r in body["reasons"]] == ["host_not_canonical"], (host, body)
    seen = [json.loads(line)["path"] for line in log.read_text().splitlines()[seen_before:]]
    assert seen == ["/elsewhere"], seen  # nothing else reached the upstream


def test_open_dataset_passes_without_grant(lab):
    response = get(lab, "/open/bus-stops/17")
    assert response.status_code == 200, response.text
    grant = record_of(lab, response)["grant"]
    assert grant["dataset"] == "transport.bus-stops" and grant["class"] == "open" and grant["id"] is None


def test_uncatalogued_path_follows_zone_policy(lab):
    response = get(lab, "/elsewhere")
    assert response.status_code == 200
    assert record_of(lab, response)["grant"] is None


def test_valid_grant_passes_and_is_recorded(lab):
    kit = lab["kit"]
    grant, licence = kit.grant(), kit.licence()
    response = get(lab, "/api/residents/42", grant=grant, licence=licence)
    assert response.status_code == 200, response.text
    record = record_of(lab, response)["grant"]
    jti = claims_of(json.loads(grant))["jti"]
    assert record["id"] == jti and record["consumer"] == "operator-a" and record["licence"].startswith("lic-")
    assert record["dataset"] == "health.residents" and record["class"] == "conditional"
    assert record["hash"].startswith("sha256:") and record["result"] == "allow"
    # The grant and licence were for the gateway: the upstream never saw them.
    assert upstream_saw(lab, "/api/residents/42")[-1]["data_headers"] == []
    assert metric_total(lab["config"], "gateway_grant_decisions_total",
                        'class="conditional",result="allow"') >= 1


def test_conditional_without_grant(lab):
    refused(get(lab, "/api/residents/1"), "grant_missing")
    assert upstream_saw(lab, "/api/residents/1") == []


def test_one_signature_only(lab):
    kit = lab["kit"]
    refused(get(lab, "/api/residents/2", grant=kit.grant(signers=("bureau",)), licence=kit.licence()),
            "grant_signer_missing")


def test_two_signatures_of_one_role(lab):
    kit = lab["kit"]
    body = refused(get(lab, "/api/residents/3", grant=kit.grant(signers=("bureau", "bureau-2")),
                       licence=kit.licence()), "grant_signer_missing")
    assert "sector (health)" in body["reasons"][0]["locations"][0]


def test_expired_and_not_yet_valid(lab):
    kit, now = lab["kit"], int(time.time())
    body = refused(get(lab, "/api/residents/4", grant=kit.grant(nbf=now - 7200, exp=now - 3600),
                       licence=kit.licence()), "grant_expired")
    assert f"expired at {time.strftime('%Y-%m-%dT', time.gmtime(now - 3600))}" in body["reasons"][0]["locations"][0]
    body = refused(get(lab, "/api/residents/4", grant=kit.grant(nbf=now + 3600, exp=now + 7200),
                       licence=kit.licence()), "grant_expired")
    assert "not valid before 20" in body["reasons"][0]["locations"][0], body
    # A grant signed a moment ago by a bureau whose clock runs a minute ahead of the gateway's is taken.
    ahead = get(lab, "/api/residents/4", grant=kit.grant(nbf=now + 60, exp=now + 3600), licence=kit.licence())
    assert ahead.status_code == 200, ahead.text


def test_lifetime_beyond_the_class_maximum(lab):
    kit, now = lab["kit"], int(time.time())
    refused(get(lab, "/api/residents/4", grant=kit.grant(nbf=now - 60, exp=now + 91 * 86400),
                licence=kit.licence()), "grant_expired")


def test_grant_for_another_gateway(lab):
    kit = lab["kit"]
    refused(get(lab, "/api/residents/5", grant=kit.grant(aud=["frontend-other"]), licence=kit.licence()),
            "grant_scope")


def test_out_of_scope_path_method_field(lab):
    kit = lab["kit"]
    narrow = [{"id": "health.residents", "methods": ["GET"], "paths": ["/api/residents/7"], "fields": ["age"]}]
    grant, licence = kit.grant(datasets=narrow), kit.licence()
    assert get(lab, "/api/residents/7?fields=age", grant=grant, licence=licence).status_code == 200
    refused(get(lab, "/api/residents/8?fields=age", grant=grant, licence=licence), "grant_scope")       # path
    refused(get(lab, "/api/residents/7?fields=age", "POST", grant=grant, licence=licence), "grant_scope")  # method
    refused(get(lab, "/api/residents/7?fields=age,name", grant=grant, licence=licence), "grant_scope")  # field
    refused(get(lab, "/api/residents/7", grant=grant, licence=licence), "grant_scope")  # fields unselected
    # Another spelling of a path the grant does not cover is not a way around it.
    status, body = raw_request(lab, lab["upstream"] + "/api/residents/7/../8?fields=age")
    assert status == 403 and body["reasons"][0]["type"] == "path_not_normal", body


def test_revoked_grant(lab):
    kit = lab["kit"]
    claims = kit.grant_claims()
    grant, licence = kit.sign(claims, ["bureau", "health"]), kit.licence()
    assert get(lab, "/api/residents/9", grant=grant, licence=licence).status_code == 200
    kit.revoke(claims["jti"])
    time.sleep(1.5)  # each worker looks at the list at most once a second
    refused(get(lab, "/api/residents/9", grant=grant, licence=licence), "grant_revoked")


def test_over_quota(lab):
    kit = lab["kit"]
    grant, licence = kit.grant(quota={"requests": {"day": 2}}), kit.licence()
    for _ in range(2):
        assert get(lab, "/api/residents/10", grant=grant, licence=licence).status_code == 200
    response = get(lab, "/api/residents/10", grant=grant, licence=licence)
    refused(response, "grant_quota", status=429)
    assert response.headers["RateLimit-Policy"] == '"requests-day";q=2'
    assert response.headers["RateLimit"].startswith('"requests-day";r=0;t=')
    assert int(response.headers["Retry-After"]) > 0


def test_licence_missing_and_for_another_scenario(lab):
    kit = lab["kit"]
    refused(get(lab, "/api/residents/11", grant=kit.grant()), "licence_missing")
    refused(get(lab, "/api/residents/11", grant=kit.grant(), licence=kit.licence(scenarios=("tourism",))),
            "licence_invalid")
    refused(get(lab, "/api/residents/11", grant=kit.grant(), licence=kit.licence(sub="operator-b")),
            "licence_invalid")
    refused(get(lab, "/api/residents/11", grant=kit.grant(), licence=kit.licence(signer="health")),
            "licence_invalid")


def test_contract_raw_refused_product_passes(lab):
    kit = lab["kit"]
    datasets = [{"id": "health.records"}]
    grant = kit.grant(signers=("bureau", "health", "hospital"), datasets=datasets, purpose="insurance-pricing")
    licence = kit.licence()
    refused(get(lab, "/raw/records/1", grant=grant, licence=licence), "contract_raw")
    assert upstream_saw(lab, "/raw/records/1") == []
    assert get(lab, "/products/records-stats/2026", grant=grant, licence=licence).status_code == 200
    two_roles = kit.grant(datasets=datasets, purpose="insurance-pricing")
    refused(get(lab, "/products/records-stats/2026", grant=two_roles, licence=licence), "grant_signer_missing")
    # A grant for another dataset is refused for that, not for the signers this dataset would need.
    refused(get(lab, "/products/records-stats/2026", grant=kit.grant(), licence=licence), "grant_scope")


def test_altered_grant_and_unknown_key(lab, tmp_path):
    kit = lab["kit"]
    document = json.loads(kit.grant())
    payload = document["payload"]
    document["payload"] = payload[:40] + ("A" if payload[40] != "A" else "B") + payload[41:]
    refused(get(lab, "/api/residents/12", grant=json.dumps(document), licence=kit.licence()), "grant_signature")
    refused(get(lab, "/api/residents/12", grant="{not json", licence=kit.licence()), "grant_malformed")
    generate_key("stranger-kid", tmp_path / "s.key", tmp_path / "s.pub")
    stranger_key = load_private_key(tmp_path / "s.key")
    forged = add_signature(add_signature(draft(kit.grant_claims()), stranger_key, "bureau"),
                           kit.keys["health"], "sector")
    body = refused(get(lab, "/api/residents/12", grant=json.dumps(forged), licence=kit.licence()), "grant_signature")
    assert "unknown key" in body["reasons"][0]["locations"][0]


def test_revocation_reaches_every_worker_and_a_stale_view_refuses(tmp_path):
    kit = Kit(tmp_path / "keys")
    port = free_port("127.0.0.2")
    config = gateway_config(tmp_path / "state", workers=2, authz=kit.authz_section(max_age="6s"))
    path = write_config(tmp_path / "gateway.yaml", config)
    upstream = start_upstream("127.0.0.2", port, tmp_path / "upstream.log")
    gateway = start_gateway(path)
    lab = {"config": config, "root": tmp_path, "upstream": f"http://127.0.0.2:{port}"}
    try:
        kit.write_revocations()  # issued now: a slow start must not have used up its 6 s already
        time.sleep(1.2)
        claims = kit.grant_claims()
        grant, licence = kit.sign(claims, ["bureau", "health"]), kit.licence()
        first = get(lab, "/api/residents/1", grant=grant, licence=licence)
        assert first.status_code == 200, first.text
        kit.revoke(claims["jti"])
        revoked_at = time.time()
        time.sleep(1.5)
        answers = [get(lab, "/api/residents/1", grant=grant, licence=licence) for _ in range(12)]
        for answer in answers:  # each on a connection of its own: the kernel spreads them over both workers
            refused(answer, "grant_revoked")
        workers = {record_of(lab, answer)["worker"] for answer in answers}
        assert workers == {0, 1}, workers
        # Nobody re-issues the list: once older than max_age (6 s), conditional data stops.
        time.sleep(max(0.0, revoked_at + 6.5 - time.time()))
        other = kit.grant()
        for _ in range(4):
            refused(get(lab, "/api/residents/2", grant=other, licence=licence), "revocation_stale")
        assert get(lab, "/open/bus-stops/1").status_code == 200  # open data does not depend on it
        kit.write_revocations()  # the bureau re-issues it
        time.sleep(1.5)
        for _ in range(4):
            assert get(lab, "/api/residents/2", grant=other, licence=licence).status_code == 200
        metrics = httpx.get(f"http://{config['management']['listen']}/metrics", timeout=10).text
        [issued] = [float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                    if line.startswith("gateway_revocation_list_issued_timestamp_seconds ")]
        assert issued > revoked_at
    finally:
        gateway.stop()
        upstream.stop()


def test_granted_fields_are_enforced_on_the_response(lab):
    """The upstream ignores ?fields=: the gateway removes what the grant does not cover; selector names
    an upstream may read otherwise, and request bodies the catalogue does not describe, are refused."""
    kit = lab["kit"]
    grant = kit.grant(datasets=[{"id": "health.residents", "methods": ["GET", "POST"], "paths": ["/api/residents*"],
                                 "fields": ["age", "district"]}])
    licence = kit.licence()
    response = get(lab, "/api/residents/13?fields=age", grant=grant, licence=licence)
    assert response.status_code == 200, response.text
    assert [sorted(item) for item in response.json()] == [["age", "district"]] * 4
    assert "张三" not in response.text and record_of(lab, response)["grant"]["records"] == 4
    for query in ("fields=age&Fields=name", "fields=age&fields%5B%5D=name", "FIELDS=name"):
        refused(get(lab, f"/api/residents/13?{query}", grant=grant, licence=licence), "grant_scope")
    with httpx.Client(proxy=listener_url(lab["config"], "forward"), timeout=15) as client:
        posted = client.post(lab["upstream"] + "/api/residents/13?fields=age", content=b'{"fields":["name"]}',
                             headers={"X-Data-Grant": grant, "X-Data-Licence": licence})
    refused(posted, "grant_scope")


def test_gzip_records_are_counted_and_a_response_past_the_limit_refused(lab):
    kit = lab["kit"]
    grant, licence = kit.grant(quota={"records": {"day": 6}}), kit.licence()
    first = get(lab, "/api/residents/14?encoding=gzip", grant=grant, licence=licence)
    assert first.status_code == 200 and len(first.json()) == 4, first.text
    assert record_of(lab, first)["grant"]["records"] == 4
    # Admitted (4 of 6 used), but its 4 records would make 8: refused, and not counted.
    refused(get(lab, "/api/residents/14?encoding=gzip", grant=grant, licence=licence), "grant_quota", status=429)
    small = kit.grant(quota={"records": {"day": 4}})
    assert get(lab, "/api/residents/14?encoding=gzip", grant=small, licence=licence).status_code == 200
    refused(get(lab, "/api/residents/14", grant=small, licence=licence), "grant_quota", status=429)


def test_revocation_is_not_rolled_back_by_restart_future_or_omission(tmp_path):
    kit = Kit(tmp_path / "keys")
    kit.write_revocations(issued=int(time.time()) - 600)
    older = kit.revocation_file.read_bytes()
    port = free_port("127.0.0.2")
    config = gateway_config(tmp_path / "state", authz=kit.authz_section())
    path = write_config(tmp_path / "gateway.yaml", config)
    upstream = start_upstream("127.0.0.2", port, tmp_path / "upstream.log")
    gateway = start_gateway(path)
    lab = {"config": config, "root": tmp_path, "upstream": f"http://127.0.0.2:{port}"}
    try:
        claims = kit.grant_claims()
        grant, licence = kit.sign(claims, ["bureau", "health"]), kit.licence()
        assert get(lab, "/api/residents/1", grant=grant, licence=licence).status_code == 200
        kit.revoke(claims["jti"])
        time.sleep(1.5)
        refused(get(lab, "/api/residents/1", grant=grant, licence=licence), "grant_revoked")
        # The older list put back, and the gateway restarted: refused, not taken as the view.
        gateway.stop()
        kit.revocation_file.write_bytes(older)
        gateway = start_gateway(path)
        refused(get(lab, "/api/residents/1", grant=grant, licence=licence), "revocation_stale")
        kit.revoked = []
        kit.write_revocations(issued=int(time.time()) + 365 * 86400)  # a list from the future never ages
        time.sleep(1.5)
        refused(get(lab, "/api/residents/1", grant=grant, licence=licence), "revocation_stale")
        kit.write_revocations()  # a current list omitting the revoked grant does not bring it back
        time.sleep(1.5)
        refused(get(lab, "/api/residents/1", grant=grant, licence=licence), "grant_revoked")
        kit.revocation_file.unlink()  # no list: refused at once
        time.sleep(1.5)
        refused(get(lab, "/api/residents/1", grant=kit.grant(), licence=licence), "revocation_stale")
    finally:
        gateway.stop()
        upstream.stop()
