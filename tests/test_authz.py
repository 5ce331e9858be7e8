"""The grant library and the authorities' tools, without a gateway: signatures that must not verify,
claims that must not be accepted, the catalogue's errors as `gateway check` prints them, key files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace

import pytest

from gateway.authz.catalog import normal_path
from gateway.authz.claims import ClaimsError
from gateway.authz.claims import grant as grant_claims
from gateway.authz.jose import DocumentError, b64url, parse, unb64url, verify
from gateway.authz.quota import QuotaStore
from gateway.authz.sqlite import open_shared, write_transaction
from gateway.config.load import load_config
from tests.authzkit import CATALOG, Kit
from tests.gatewayproc import REPO, gateway_config, write_config

B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    return Kit(tmp_path_factory.mktemp("kit"))


@pytest.fixture(scope="module")
def settings(kit, tmp_path_factory):
    root = tmp_path_factory.mktemp("config")
    return load_config(write_config(root / "gateway.yaml", gateway_config(root / "state", authz=kit.authz_section())))\
        .authz


def gateway(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=60,
                          cwd=cwd or REPO)


def test_a_grant_altered_in_any_byte_fails(kit, settings):
    document = json.loads(kit.grant())
    verify(document, settings.authorities, settings.algorithms)  # the original verifies
    targets = [("payload", None)] + [("protected", i) for i in range(len(document["signatures"]))]
    tried = 0
    for member, index in targets:
        text = document["payload"] if index is None else document["signatures"][index]["protected"]
        for position, char in enumerate(text):
            altered = text[:position] + B64URL[(B64URL.index(char) + 1) % 64] + text[position + 1:]
            copy = json.loads(json.dumps(document))
            if index is None:
                copy["payload"] = altered
            else:
                copy["signatures"][index]["protected"] = altered
            with pytest.raises(DocumentError):
                verify(copy, settings.authorities, settings.algorithms)
            tried += 1
    assert tried > 500


def test_unknown_key_wrong_role_and_disallowed_algorithm_fail(kit, settings, tmp_path):
    claims = kit.grant_claims()
    # health's key signing as bureau: the key is configured for the sector role only.
    from gateway.authz.jose import add_signature, draft
    wrong_role = add_signature(draft(claims), kit.keys["health"], "bureau")
    with pytest.raises(DocumentError, match="signs as sector"):
        verify(wrong_role, settings.authorities, settings.algorithms)
    bad_alg = json.loads(kit.grant())
    header = json.loads(unb64url(bad_alg["signatures"][0]["protected"]))
    bad_alg["signatures"][0]["protected"] = b64url(json.dumps({**header, "alg": "HS256"}).encode())
    with pytest.raises(DocumentError, match="not allowed"):
        verify(bad_alg, settings.authorities, settings.algorithms)


def test_only_the_general_json_form_is_accepted(kit):
    document = json.loads(kit.grant())
    for bad in ("a.b.c", json.dumps({**document, "extra": 1}),
                json.dumps({"payload": document["payload"], **document["signatures"][0]}),  # flattened
                json.dumps({"payload": document["payload"],
                            "signatures": [{**document["signatures"][0], "header": {"kid": "x"}}]})):
        with pytest.raises(DocumentError) as caught:
            parse(bad)
        assert caught.value.kind == "malformed"


def test_unknown_or_missing_claims_are_rejected(kit):
    grant_claims(kit.grant_claims())
    for change in ({"extra": 1}, {"ver": 2}, {"exp": 0}, {"datasets": []},
                   {"datasets": [{"id": "x", "rows": 3}]}, {"quota": {"requests": {"week": 1}}}):
        with pytest.raises(ClaimsError):
            grant_claims({**kit.grant_claims(), **change})
    claims = kit.grant_claims()
    del claims["approval"]
    with pytest.raises(ClaimsError, match="approval"):
        grant_claims(claims)


def test_paths_are_matched_in_normal_form():
    assert normal_path("/api/residents/7/../8?x=1") == ("/api/residents/8", False)
    assert normal_path("/api/%72esidents/8") == ("/api/residents/8", False)
    assert normal_path("/api//residents/8/") == ("/api/residents/8/", False)
    assert normal_path("/api/residents/8") == ("/api/residents/8", True)
    assert normal_path("/api/residents;x=1/8") == ("/api/residents/8", False)
    assert normal_path("/api\\residents\\8")[1] is False


def test_a_catalogued_host_is_recognised_by_its_addresses(settings):
    """A catalogue naming a host matches requests to the addresses the name resolved to (and to any
    other name pinned to one of them); an address host matches its IPv4-mapped IPv6 form."""
    catalog = settings.catalog
    assert catalog.route("127.0.0.2", "127.0.0.2", "GET", "/api/residents/1").match.dataset.id == "health.residents"
    assert catalog.route("other.example", "::ffff:127.0.0.2", "GET", "/api/residents/1").match is not None
    assert catalog.route("other.example", "127.0.0.9", "GET", "/api/residents/1") is None
    named = replace(catalog, datasets=tuple(replace(d, hosts=("data.example",)) for d in catalog.datasets),
                    addresses={})
    assert named.route("alias.example", "10.1.2.3", "GET", "/api/residents/1") is None
    resolved = named.with_addresses(lambda name: ["10.1.2.3"] if name == "data.example" else [])
    route = resolved.route("alias.example", "10.1.2.3", "PUT", "/API/Residents/1")
    assert route.match.dataset.id == "health.residents" and not route.match.method_listed
    assert resolved.route("alias.example", "10.1.2.3", "GET", "/nothing").refusal[0] == "uncatalogued"


def test_quota_is_shared_and_survives_reopening(tmp_path):
    now = time.time()
    first, second = QuotaStore(tmp_path / "q.sqlite"), QuotaStore(tmp_path / "q.sqlite")
    limits = {"grant:g": {"requests": {"day": 3}}}
    assert first.take(limits, now) is None and second.take(limits, now) is None
    first.close()
    reopened = QuotaStore(tmp_path / "q.sqlite")
    assert reopened.take(limits, now) is None
    exceeded = second.take(limits, now)
    assert exceeded is not None and exceeded.measure == "requests" and exceeded.period == "day"
    assert reopened.usage("grant:g", now)["day"]["requests"] == 3


def test_a_write_that_fails_keeps_nothing_and_leaves_the_store_usable(tmp_path):
    # The stores' writes (quotas, consents, accepted revocations) share this transaction: a failure
    # half-way (a full disk, a lock held too long) must not leave a transaction open on the connection,
    # or every later write of that worker would fail ("cannot start a transaction within a transaction").
    db, other = open_shared(tmp_path / "s.sqlite", timeout=1), open_shared(tmp_path / "s.sqlite", timeout=1)
    db.execute("CREATE TABLE t (v INTEGER)")
    with pytest.raises(OSError):
        with write_transaction(db):
            db.execute("INSERT INTO t VALUES (1)")
            raise OSError("disk full")
    assert not db.in_transaction
    with write_transaction(db):
        db.execute("INSERT INTO t VALUES (2)")
    assert [row[0] for row in other.execute("SELECT v FROM t")] == [2]


def test_check_names_file_and_line_of_catalogue_errors(kit, tmp_path):
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(CATALOG.read_text().replace("class: conditional", "class: restricted", 1)
                       .replace("      - methods: [GET]\n        paths: [/open/bus-stops, /open/bus-stops/*]",
                                "      - methods: [GET]\n        paths: [/open/../bus-stops]\n        colour: red"))
    section = {**kit.authz_section(), "catalog": str(catalog)}
    config = write_config(tmp_path / "gateway.yaml", gateway_config(tmp_path / "state", authz=section))
    result = gateway("check", "-c", str(config))
    assert result.returncode == 2, result.stdout + result.stderr
    restricted_line = catalog.read_text().splitlines().index("    class: restricted") + 1
    assert f"{catalog}:{restricted_line}: datasets[1].class: 'restricted' is not one of: open, conditional, contract" \
        in result.stderr
    assert "datasets[0].endpoints[0].colour: unknown key" in result.stderr
    assert "datasets[0].endpoints[0].paths[0]: '/open/../bus-stops' must be an absolute path in normal form" \
        in result.stderr
    # The shipped catalogue itself is valid.
    good = write_config(tmp_path / "good.yaml", gateway_config(tmp_path / "state", authz=kit.authz_section()))
    assert gateway("check", "-c", str(good)).returncode == 0


def test_check_names_missing_authority_and_public_key_problems(kit, tmp_path):
    section = kit.authz_section()
    section["authorities"] = [a for a in section["authorities"] if a["role"] != "provider"]
    section["authorities"][0]["key"] = str(kit.root / "bureau.key")  # a private key given as public
    config = write_config(tmp_path / "gateway.yaml", gateway_config(tmp_path / "state", authz=section))
    result = gateway("check", "-c", str(config))
    assert result.returncode == 2
    assert "authz.authorities[0].key: " in result.stderr and "holds a private key" in result.stderr
    assert "datasets.health.records: no authority in role provider for city-hospital" in result.stderr


def test_tools_issue_cosign_inspect_revoke(kit, tmp_path):
    config = write_config(tmp_path / "gateway.yaml", gateway_config(tmp_path / "state", authz=kit.authz_section()))
    assert gateway("key", "generate", "--kid", "k1", "--out", str(tmp_path / "k1")).returncode == 0
    assert os.stat(tmp_path / "k1.key").st_mode & 0o777 == 0o600
    assert gateway("key", "generate", "--kid", "k1", "--out", str(tmp_path / "k1")).returncode == 2  # no overwrite
    os.chmod(tmp_path / "k1.key", 0o644)
    loose = gateway("grant", "revoke", "--list", str(tmp_path / "r.json"), "--key", str(tmp_path / "k1.key"))
    assert loose.returncode == 2 and "open to group or others" in loose.stderr

    request = tmp_path / "request.yaml"
    request.write_text("sub: operator-a\naud: [frontend-local]\ndatasets:\n  - id: health.residents\n"
                       "scenario: elderly-care\npurpose: elderly-care-subsidy\napproval: A-1\n")
    draft = tmp_path / "grant.json"
    assert gateway("grant", "request", str(request), "-o", str(draft), "--valid-for", "10d").returncode == 0
    assert gateway("grant", "sign", str(draft), "--key", str(kit.root / "bureau.key"), "--role", "bureau") \
        .returncode == 0
    half = gateway("grant", "inspect", str(draft), "-c", str(config))
    assert half.returncode == 1 and "still missing: sector (health)" in half.stdout, half.stdout + half.stderr
    assert gateway("grant", "sign", str(draft), "--key", str(kit.root / "health.key"), "--role", "sector") \
        .returncode == 0
    whole = gateway("grant", "inspect", str(draft), "-c", str(config))
    assert whole.returncode == 0 and "VALID" in whole.stdout, whole.stdout + whole.stderr
    later = gateway("grant", "inspect", str(draft), "-c", str(config), "--at", str(int(time.time()) + 11 * 86400))
    assert later.returncode == 1 and "not valid at" in later.stdout

    jti = json.loads(unb64url(json.loads(draft.read_text())["payload"]))["jti"]
    assert gateway("grant", "revoke", jti, "--list", str(kit.revocation_file), "--key",
                   str(kit.root / "bureau.key")).returncode == 0
    revoked = gateway("grant", "inspect", str(draft), "-c", str(config))
    assert revoked.returncode == 1 and "revoked" in revoked.stdout


def test_catalog_explain(kit, tmp_path):
    config = write_config(tmp_path / "gateway.yaml", gateway_config(tmp_path / "state", authz=kit.authz_section()))
    raw = gateway("catalog", "explain", "http://127.0.0.2:8000/raw/records/5", "-c", str(config))
    assert raw.returncode == 0
    assert "dataset: health.records" in raw.stdout and "class: contract" in raw.stdout
    assert "never leaves" in raw.stdout
    conditional = gateway("catalog", "explain", "http://127.0.0.2/api/residents/1?fields=age", "-c", str(config))
    assert "needs: a grant (X-Data-Grant) signed by bureau, sector (health)" in conditional.stdout
    none = gateway("catalog", "explain", "http://127.0.0.3/other", "-c", str(config))
    assert "the zone policy alone decides" in none.stdout
    closed = gateway("catalog", "explain", "http://127.0.0.2/other", "-c", str(config))
    assert "REFUSED (uncatalogued)" in closed.stdout, closed.stdout
    method = gateway("catalog", "explain", "http://127.0.0.2/api/residents/1", "-X", "DELETE", "-c", str(config))
    assert "REFUSED (grant_scope)" in method.stdout, method.stdout


def test_one_key_in_two_roles_is_refused(kit, tmp_path):
    """The bureau's key listed again under another kid as the sector's: one holder would sign in both roles."""
    alias = {**json.loads((kit.root / "bureau.pub").read_text()), "kid": "health-alias"}
    (tmp_path / "alias.pub").write_text(json.dumps(alias))
    section = kit.authz_section()
    section["authorities"] = [a if a["name"] != "health" else {**a, "key": str(tmp_path / "alias.pub")}
                              for a in section["authorities"]]
    config = write_config(tmp_path / "gateway.yaml", gateway_config(tmp_path / "state", authz=section))
    result = gateway("check", "-c", str(config))
    assert result.returncode == 2 and "one key may hold one role only" in result.stderr, result.stdout + result.stderr


def test_duplicate_names_in_a_protected_header_are_refused(kit, settings):
    document = json.loads(kit.grant())
    health = kit.keys["health"]
    protected = b64url(b'{"alg":"Ed25519","kid":"%s","role":"bureau","role":"sector"}' % health.kid.encode())
    signature = b64url(health.private_key.sign(f"{protected}.{document['payload']}".encode()))
    document["signatures"][1] = {"protected": protected, "signature": signature}
    with pytest.raises(DocumentError):
        verify(parse(json.dumps(document)), settings.authorities, settings.algorithms)


def test_an_older_batch_imported_later_changes_no_terms(tmp_path):
    import io

    from joserfc.jwk import OKPKey

    from gateway.authz.consent import ConsentError, ConsentRegistry, batch_claims
    from gateway.authz.jose import Authority, add_signature, draft, generate_key, load_private_key
    from gateway.authz.subject import SubjectHasher
    generate_key("p", tmp_path / "p.key", tmp_path / "p.pub")
    key = load_private_key(tmp_path / "p.key")
    platform = {"p": Authority("platform", "platform", None, "p", OKPKey.import_key(key.as_dict(private=False)))}
    hasher = SubjectHasher(b"s" * 32)
    subject = hasher.key("11010519491231002X")

    def batch(name: str, iat: int, datasets: list[str]) -> io.BytesIO:
        body = (json.dumps({"cid": "c1", "subject": subject.hex(), "consumer": "op", "scenario": "sc",
                            "datasets": datasets, "nbf": 0, "exp": 2**31}) + "\n").encode()
        claims = batch_claims(name, iat, body, 1, hasher.key_check(), hasher.algorithm)
        return io.BytesIO(json.dumps(add_signature(draft(claims), key, "platform")).encode() + b"\n" + body)

    registry, now = ConsentRegistry(tmp_path / "c.sqlite"), int(time.time())
    args = (platform, ("Ed25519",), hasher.key_check(), hasher.algorithm)
    registry.import_batch(batch("march", now, ["civil.residents"]), *args)
    registry.import_batch(batch("february", now - 30 * 86400, ["civil.residents", "health.records"]), *args)
    [consent] = registry.consents_of(subject)
    assert consent["datasets"] == ["civil.residents"] and consent["batch"] == "march"
    with pytest.raises(ConsentError, match="future"):
        registry.import_batch(batch("next-year", now + 365 * 86400, ["civil.residents"]), *args)


def test_usage_report_refuses_a_key_taken_from_inside_the_log(kit, tmp_path):
    # The report bills from a log only against a key obtained out of band: the copy a log folder holds
    # was written by whoever could write the log.
    config = write_config(tmp_path / "gateway.yaml", gateway_config(tmp_path / "state", authz=kit.authz_section()))
    log = tmp_path / "copied-log"
    log.mkdir()
    (log / "trace-signing.pub").write_text("gateway.local/trace+0badc0de+AAAA\n")
    result = gateway("usage", "report", "--from", "2026-01-01", "--to", "2026-02-01", "-c", str(config),
                     "--trace", str(log), "--pubkey", str(log / "trace-signing.pub"), "--no-record")
    assert result.returncode == 2, result.stderr
    assert "is inside the log it is to check" in result.stderr, result.stderr


def test_answers_outside_2xx_carrying_records_are_not_billed_but_tallied(settings):
    from gateway.authz.settlement import Settlement
    grant = {"result": "allow", "consumer": "operator-a", "dataset": "health.residents", "records": 7}
    settlement = Settlement(settings.catalog)
    settlement.add({"grant": grant, "status": 200, "decision": "allow", "consent": {"passed": 3, "masked": 2}})
    settlement.add({"grant": grant, "status": 500, "decision": "allow", "consent": {"passed": 1, "masked": 4}})
    settlement.add({"grant": grant, "status": 404, "decision": "warn"})  # as the upstream sent them: 7
    settlement.add({"grant": {**grant, "records": 0}, "status": 502, "decision": "allow"})
    settlement.add({"grant": grant, "status": 403, "decision": "block", "consent": {"passed": 9, "masked": 0}})
    assert settlement.totals()["requests"] == 1 and settlement.totals()["records"] == 5
    assert settlement.unbilled == {"requests": 2, "records": 12}
