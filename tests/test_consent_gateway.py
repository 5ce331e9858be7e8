"""Data subjects' consent through the real gateway: 1,000 records of 1,000 subjects, 300 consented to
this consumer and scenario, leave with exactly those 300 in clear and 700 masked (or dropped), counted in
the trace record and the metrics; a withdrawal counts from the next transfer; a consent for another
scenario, another consumer or expired does not count; a forged batch is refused at import; the usage
report equals the client's tally and refuses a tampered log; one transfer's evidence checks offline."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import subprocess
import sys
import time
import threading
import unicodedata
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit
from xml.etree import ElementTree

import httpx
import pytest

from gateway.authz.jose import generate_key
from gateway.authz.subject import generate_secret
from gateway.trace.note import SIG_COSIGNATURE_V1, Signer
from tests.authzkit import REPO, Kit
from tests.gatewayproc import (
    Process,
    free_port,
    gateway_config,
    listener_url,
    metric_total,
    start_gateway,
    trace_records,
    write_config,
)

SUBJECTS = [f"520602{1950 + i % 50:04d}{i % 12 + 1:02d}{i % 28 + 1:02d}{i:03d}X" for i in range(1000)]
CONSENTED = set(range(300))
CATALOG = """
datasets:
  - id: civil.residents
    title: 居民信息
    class: conditional
    sector: health
    provider: city-hospital
    hosts: [127.0.0.2]
    endpoints:
      - {methods: [GET], paths: ["/residents*"]}
    fields:
      id_number: {sensitivity: personal, tags: [cn_id_card]}
      name: {sensitivity: personal, tags: [name]}
      mobile: {sensitivity: personal, tags: [cn_mobile]}
      card: {sensitivity: personal, tags: [bank_card]}
      household: {sensitivity: personal, mask: token}
      district: {sensitivity: public}
    legal_basis: consent
    consent: {subject_field: id_number, unconsented: mask}
    price: {amount: 0.02, per: record, currency: CNY}
  - id: civil.residents-drop
    class: conditional
    sector: health
    provider: city-hospital
    hosts: [127.0.0.2]
    endpoints:
      - {methods: [GET], paths: ["/drop/*"]}
    fields:
      id_number: {sensitivity: personal, tags: [cn_id_card]}
      district: {sensitivity: public}
    legal_basis: consent
    consent: {subject_field: id_number, unconsented: drop}
    price: {amount: 1, per: request}
  - id: civil.residents-strict
    class: conditional
    sector: health
    provider: city-hospital
    hosts: [127.0.0.2]
    endpoints:
      - {methods: [GET], paths: ["/strict/*"]}
    fields:
      id_number: {sensitivity: personal, tags: [cn_id_card]}
    legal_basis: consent
    consent: {subject_field: id_number, unconsented: refuse}
  - id: civil.notes
    class: conditional
    sector: health
    provider: city-hospital
    hosts: [127.0.0.2]
    endpoints:
      - {methods: [GET], paths: ["/notes/*"]}
    fields:
      id_number: {sensitivity: personal, tags: [cn_id_card]}
      name: {sensitivity: personal, tags: [name]}
      note: {sensitivity: internal}
      district: {sensitivity: public}
    legal_basis: consent
    consent: {subject_field: id_number, unconsented: mask}
  - id: civil.public-ids
    class: conditional
    sector: health
    provider: city-hospital
    hosts: [127.0.0.2]
    endpoints:
      - {methods: [GET], paths: ["/public/*"]}
    fields:
      id_number: {sensitivity: public}
      district: {sensitivity: public}
    legal_basis: consent
    consent: {subject_field: id_number, unconsented: mask}
"""
DATASETS = ["civil.residents", "civil.residents-drop", "civil.residents-strict", "civil.notes", "civil.public-ids"]


def gateway_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=120,
                          cwd=REPO)


def residents() -> list[dict]:
    return [{"id_number": subject, "name": "张" + "三四五"[i % 3] + ("明" if i % 2 else ""),
             "mobile": f"139{i:08d}", "card": f"6228480012{i:06d}", "household": f"H{i // 4}",
             "district": "碧江区", "note": "not catalogued"} for i, subject in enumerate(SUBJECTS)]


# Header fields the heads upstream adds to its answer, by the name a request asks for (?head=NAME): a
# test sets them here, so that no ID number goes out in a request's URL.
HEADS: dict[str, list[tuple[str, str | bytes]]] = {}


class HeadsUpstream(BaseHTTPRequestHandler):
    """Serves the lab's files with the header fields HEADS[?head=NAME] (a text value in UTF-8, bytes as
    they are); ?part=N answers them as a partial response (206): the file's first N bytes; ?chunked=1
    sends the body chunked (no Content-Length: the gateway holds it as a body of unknown length)."""
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        body = (self.server.files / url.path.lstrip("/")).read_bytes()
        kind = "text/csv" if url.path.endswith(".csv") else "application/json"
        status, fields = "200 OK", [("Content-Type", kind)]
        if "part" in query:
            fields.append(("Content-Range", f"bytes 0-{int(query['part'][0]) - 1}/{len(body)}"))
            status, body = "206 Partial Content", body[:int(query["part"][0])]
        fields += HEADS.get(query.get("head", [""])[0], [])
        if "chunked" in query:
            fields.append(("Transfer-Encoding", "chunked"))
            body = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
        else:
            fields.append(("Content-Length", str(len(body))))
        self.wfile.write(f"HTTP/1.1 {status}\r\n".encode() + b"".join(
            f"{name}: ".encode() + (value if isinstance(value, bytes) else value.encode()) + b"\r\n"
            for name, value in fields) + b"\r\n" + body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    root = tmp_path_factory.mktemp("consent")
    kit = Kit(root / "keys")
    generate_key("platform-kid", root / "platform.key", root / "platform.pub")
    generate_secret(root / "consent.secret")
    (root / "catalog.yaml").write_text(CATALOG)
    authz = kit.authz_section()
    authz["catalog"] = str(root / "catalog.yaml")
    authz["consent"] = {"platform": {"name": "subject-platform", "key": str(root / "platform.pub")},
                        "secret": str(root / "consent.secret"), "max_age": "1h"}
    config = gateway_config(root / "state", workers=2, authz=authz)
    config["dlp"]["spool_threshold"] = "1MiB"  # the spooled-response test's body is above it
    for rule in config["policy"]["rules"]:
        # The consent stage decides what of these personal records leaves; the inbound DLP profile would
        # block any response with this many ID numbers (a bulk export) before it.
        rule.pop("response_profile", None)
    path = write_config(root / "gateway.yaml", config)

    files = root / "www"
    (files / "drop").mkdir(parents=True)
    (files / "strict").mkdir()
    records = residents()
    (files / "residents.json").write_bytes(json.dumps({"total": 1000, "items": records}, ensure_ascii=False).encode())
    csv_text = "id_number,name,mobile,district\r\n" + "".join(
        f"{r['id_number']},{r['name']},{r['mobile']},{r['district']}\r\n" for r in records)
    (files / "residents.csv").write_bytes(csv_text.encode("gbk"))
    (files / "drop" / "residents.json").write_bytes(json.dumps(records).encode())
    (files / "strict" / "residents.json").write_bytes(json.dumps(records).encode())
    xml_records = "".join(f'<resident id_number="{r["id_number"]}"><name>{r["name"]}</name><mobile>{r["mobile"]}</mobile>'
                          f'<district>{r["district"]}</district><note>{r["note"]}</note></resident>\n' for r in records)
    (files / "residents.xml").write_bytes(f'<?xml version="1.0" encoding="GBK"?>\n<response><total>1000</total>'
                                          f'<items>\n{xml_records}</items></response>'.encode("gbk"))
    (files / "residents-big.json").write_bytes(json.dumps(records * 8).encode())  # above the spool threshold
    port = free_port("127.0.0.2")
    upstream = Process([sys.executable, "-m", "http.server", "--bind", "127.0.0.2", str(port), "--directory",
                        str(files)], env={"PYTHONUNBUFFERED": "1"}).started("Serving HTTP", timeout=10)
    heads = ThreadingHTTPServer(("127.0.0.2", 0), HeadsUpstream)
    heads.files = files
    threading.Thread(target=heads.serve_forever, daemon=True).start()
    gateway = start_gateway(path)
    lab = {"root": root, "kit": kit, "config": config, "path": path, "upstream": f"http://127.0.0.2:{port}",
           "heads": f"http://127.0.0.2:{heads.server_address[1]}",
           "grant": kit.grant(datasets=[{"id": d} for d in DATASETS]), "licence": kit.licence(),
           "tally": {}, "started": datetime.now(UTC) - timedelta(seconds=5)}
    yield lab
    gateway.stop()
    heads.shutdown()
    upstream.stop()


def issue(lab, consents: list[dict], name: str) -> subprocess.CompletedProcess:
    root = lab["root"]
    source = root / f"{name}.jsonl"
    source.write_text("".join(json.dumps(c) + "\n" for c in consents))
    made = gateway_cli("consent", "issue", str(source), "--secret", str(root / "consent.secret"),
                       "--key", str(root / "platform.key"), "-o", str(root / f"{name}.batch"))
    assert made.returncode == 0, made.stderr
    return made


def consent(i: int, **overrides) -> dict:
    now = int(time.time())
    return {"cid": f"c-{i}", "id": SUBJECTS[i], "consumer": "operator-a", "scenario": "elderly-care",
            "datasets": DATASETS, "nbf": now - 60, "exp": now + 86400, "separate": False, **overrides}


def get(lab, path: str, upstream: str = "upstream") -> httpx.Response:
    headers = {"X-Data-Grant": lab["grant"], "X-Data-Licence": lab["licence"]}
    with httpx.Client(proxy=listener_url(lab["config"], "forward"), timeout=30) as client:
        response = client.get(lab[upstream] + path, headers=headers)
    if response.status_code == 200:  # the client's own tally, for the usage report
        row = lab["tally"].setdefault(path.split("/")[1].split(".")[0], {"requests": 0, "records": 0, "bytes": 0})
        row["requests"] += 1
        row["bytes"] += len(response.content)
    return response


def record_of(lab, response: httpx.Response) -> dict:
    [record] = trace_records(lab["root"] / "state" / "trace", "--id", response.headers["X-Gateway-Transfer-Id"])
    return record


def consent_metric(lab, outcome: str, dataset: str = "civil.residents") -> float:
    return metric_total(lab["config"], "gateway_consent_records_total", f'dataset="{dataset}",outcome="{outcome}"')


def test_stale_registry_refuses_before_forwarding(lab):
    response = get(lab, "/residents.json")
    assert response.status_code == 403, response.text
    assert [r["type"] for r in response.json()["reasons"]] == ["consent_stale"]


def test_forged_batch_refused_at_import(lab):
    issue(lab, [consent(i) for i in range(10)], "forged")
    batch = lab["root"] / "forged.batch"
    lines = batch.read_bytes().split(b"\n")
    lines[3] = lines[3].replace(b"operator-a", b"operator-z")  # a consent moved to another consumer
    batch.write_bytes(b"\n".join(lines))
    imported = gateway_cli("consent", "import", str(batch), "-c", str(lab["path"]))
    assert imported.returncode == 1 and "altered after the platform signed it" in imported.stderr, imported.stderr
    # An altered copy of a batch imported before is refused as altered, not only as a repeat.
    issue(lab, [consent(i, consumer="operator-x") for i in range(10)], "intact")
    intact = lab["root"] / "intact.batch"
    assert gateway_cli("consent", "import", str(intact), "-c", str(lab["path"])).returncode == 0
    repeated = gateway_cli("consent", "import", str(intact), "-c", str(lab["path"]))
    assert repeated.returncode == 1 and "was imported before" in repeated.stderr, repeated.stderr
    intact.write_bytes(intact.read_bytes().replace(b"operator-x", b"operator-a", 1))
    altered = gateway_cli("consent", "import", str(intact), "-c", str(lab["path"]))
    assert altered.returncode == 1 and "altered after the platform signed it" in altered.stderr, altered.stderr
    # Signed by a key that is not the platform's (the bureau's): refused too.
    issue(lab, [consent(0)], "wrong-key")
    other = lab["root"] / "wrong-key.batch"
    shutil.copy(lab["root"] / "keys" / "bureau.key", lab["root"] / "bureau-copy.key")
    resigned = gateway_cli("consent", "issue", str(lab["root"] / "wrong-key.jsonl"), "--secret",
                           str(lab["root"] / "consent.secret"), "--key", str(lab["root"] / "bureau-copy.key"),
                           "-o", str(other))
    assert resigned.returncode == 0, resigned.stderr
    imported = gateway_cli("consent", "import", str(other), "-c", str(lab["path"]))
    assert imported.returncode == 1 and "unknown key" in imported.stderr, imported.stderr
    checked = gateway_cli("consent", "check", SUBJECTS[0], "--consumer", "operator-a", "--scenario", "elderly-care",
                          "-c", str(lab["path"]))
    assert checked.returncode == 1 and "NO CONSENT" in checked.stdout, checked.stdout


def test_issue_signs_only_what_import_takes(lab):
    """The platform's tool refuses, naming the line, a consent the gateway would refuse at import."""
    for broken, said in (({"nbf": None}, "missing nbf"), ({"exp": "2027-01-01"}, "exp: expected Unix"),
                         ({"datasets": []}, "datasets: expected a non-empty list"), ({"colour": "red"}, "unknown claim")):
        source = lab["root"] / "broken.jsonl"
        lines = [consent(0), {**consent(1), **broken}]
        source.write_text("".join(json.dumps({k: v for k, v in c.items() if v is not None}) + "\n" for c in lines))
        made = gateway_cli("consent", "issue", str(source), "--secret", str(lab["root"] / "consent.secret"),
                           "--key", str(lab["root"] / "platform.key"), "-o", str(lab["root"] / "broken.batch"))
        assert made.returncode == 2 and "broken.jsonl: line 2: " in made.stderr and said in made.stderr, made.stderr
        assert not (lab["root"] / "broken.batch").exists()


def test_issue_says_which_consents_name_no_valid_id_number(lab):
    """A number failing GB 11643's check is most often mistyped: signed (a provider may hold the same), but said."""
    source = lab["root"] / "typo.jsonl"
    lines = [consent(0, id="520602199001011237"), consent(1, id="520602199001011234")]
    source.write_text("".join(json.dumps(c) + "\n" for c in lines))
    made = gateway_cli("consent", "issue", str(source), "--secret", str(lab["root"] / "consent.secret"),
                       "--key", str(lab["root"] / "platform.key"), "-o", str(lab["root"] / "typo.batch"))
    assert made.returncode == 0, made.stderr
    assert "warning: 1 of them name no valid GB 11643 ID number" in made.stderr, made.stderr
    assert "line 2 (MOD 11-2 check character: 7 expected, 4 written)" in made.stderr, made.stderr
    assert "line 1" not in made.stderr and "520602199001011234" not in made.stderr


def test_import_and_check(lab):
    now = int(time.time())
    consents = [consent(i) for i in CONSENTED]
    consents += [consent(i, scenario="tourism") for i in range(300, 350)]          # another scenario
    consents += [consent(i, nbf=now - 7200, exp=now - 60) for i in range(350, 400)]  # expired
    consents += [consent(i, consumer="operator-b") for i in range(400, 450)]       # another consumer
    issue(lab, consents, "first")
    imported = gateway_cli("consent", "import", str(lab["root"] / "first.batch"), "-c", str(lab["path"]))
    assert imported.returncode == 0 and "450 consents imported" in imported.stdout, imported.stderr
    args = ("--consumer", "operator-a", "--scenario", "elderly-care", "-c", str(lab["path"]))
    assert gateway_cli("consent", "check", SUBJECTS[7], *args).returncode == 0
    assert gateway_cli("consent", "check", SUBJECTS[310], *args).returncode == 1
    # `-`: the number read from standard input, out of sight of ps and the shell's history
    piped = subprocess.run([sys.executable, "-m", "gateway", "consent", "check", "-", *args], input=SUBJECTS[7] + "\n",
                           capture_output=True, text=True, timeout=120, cwd=REPO)
    assert piped.returncode == 0, piped.stdout + piped.stderr
    expired = gateway_cli("consent", "check", SUBJECTS[360], *args)
    assert expired.returncode == 1 and "expired" in expired.stdout, expired.stdout
    # The registry holds subject keys only, never a clear number.
    registry = (lab["root"] / "state" / "authz" / "consent.sqlite").read_bytes()
    assert SUBJECTS[7].encode() not in registry


def test_only_consented_records_leave_in_clear(lab):
    before = {o: consent_metric(lab, o) for o in ("passed", "masked")}
    response = get(lab, "/residents.json")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["total"] == 1000 and len(body["items"]) == 1000
    clear = {i for i, item in enumerate(body["items"]) if item["id_number"] == SUBJECTS[i]}
    assert clear == CONSENTED
    for i, item in enumerate(body["items"]):
        assert "note" not in item  # not in the catalogue: it leaves no record, consented or not
        if i in CONSENTED:
            assert item["mobile"] == f"139{i:08d}"
            continue
        assert item["id_number"] == SUBJECTS[i][:6] + "********" + SUBJECTS[i][-4:]
        assert item["mobile"] == "139****" + f"{i:08d}"[-4:]
        assert item["card"] == "622848******" + f"{i:06d}"[-4:]
        name = residents()[i]["name"]
        assert item["name"] == name[0] + "*" * (len(name) - 1)
        assert item["household"].startswith("tk_") and "note" not in item and item["district"] == "碧江区"
    # Keyed tokens: the same household gives the same token, another household another.
    assert body["items"][400]["household"] == body["items"][401]["household"] != body["items"][404]["household"]
    assert response.headers["content-length"] == str(len(response.content))
    record = record_of(lab, response)
    assert record["consent"] == {"records": 1000, "passed": 300, "masked": 700, "dropped": 0}
    assert record["grant"]["scenario"] == "elderly-care" and record["grant"]["consumer"] == "operator-a"
    lab["tally"]["residents"]["records"] += 1000
    assert consent_metric(lab, "passed") - before["passed"] == 300
    assert consent_metric(lab, "masked") - before["masked"] == 700


def test_gbk_csv_rows(lab):
    response = get(lab, "/residents.csv")
    assert response.status_code == 200, response.text
    rows = response.content.decode("gb18030").split("\r\n")
    assert rows[0] == "id_number,name,mobile,district" and len([r for r in rows[1:] if r]) == 1000
    clear = {i for i, row in enumerate(rows[1:1001]) if row.split(",")[0] == SUBJECTS[i]}
    assert clear == CONSENTED
    assert rows[1 + 500].split(",")[2] == "139****0500" and rows[1 + 500].split(",")[1].startswith("张")
    assert record_of(lab, response)["consent"]["passed"] == 300
    lab["tally"]["residents"]["records"] += 1000


def test_xml_record_elements(lab):
    response = get(lab, "/residents.xml")
    assert response.status_code == 200, response.text
    text = response.content.decode("gbk")
    assert text.startswith('<?xml version="1.0" encoding="GBK"?>')
    root = ElementTree.fromstring(text.split("?>", 1)[1])
    assert root.find("total").text == "1000"
    items = root.find("items").findall("resident")
    assert len(items) == 1000
    assert {i for i, item in enumerate(items) if item.get("id_number") == SUBJECTS[i]} == CONSENTED
    # Consented or not, only catalogued fields leave (the note is not one).
    assert items[7].find("note") is None and items[7].find("mobile").text == "13900000007"
    masked = items[500]
    assert masked.get("id_number") == SUBJECTS[500][:6] + "********" + SUBJECTS[500][-4:]
    assert masked.find("mobile").text == "139****0500" and masked.find("note") is None
    assert masked.find("name").text.startswith("张") and masked.find("district").text == "碧江区"
    assert record_of(lab, response)["consent"] == {"records": 1000, "passed": 300, "masked": 700, "dropped": 0}
    lab["tally"]["residents"]["records"] += 1000


def test_drop_and_refuse(lab):
    dropped = get(lab, "/drop/residents.json")
    assert dropped.status_code == 200, dropped.text
    assert [item["id_number"] for item in dropped.json()] == SUBJECTS[:300]
    assert record_of(lab, dropped)["consent"] == {"records": 1000, "passed": 300, "masked": 0, "dropped": 700}
    lab["tally"]["drop"]["records"] += 300
    strict = get(lab, "/strict/residents.json")
    assert strict.status_code == 403 and [r["type"] for r in strict.json()["reasons"]] == ["consent_missing"]
    assert SUBJECTS[0] not in strict.text


def test_refused_response_counts_its_unconsented_records(lab):
    """`unconsented: refuse`: the record and the metrics say how many records lacked consent."""
    before = consent_metric(lab, "refused", "civil.residents-strict")
    strict = get(lab, "/strict/residents.json")
    assert strict.status_code == 403 and [r["type"] for r in strict.json()["reasons"]] == ["consent_missing"]
    assert "1000 records, 700 without the subject's consent" in strict.text
    assert record_of(lab, strict)["consent"] == {"records": 1000, "passed": 0, "masked": 0, "dropped": 0,
                                                 "refused": 700}
    assert consent_metric(lab, "refused", "civil.residents-strict") - before == 700


def test_header_ids_without_consent_never_leave_in_clear(lab):
    """An ID number in a response header of a subject without consent is masked where it is written
    (full-width, or beside other text too); a consented subject's stays; counted and named in the record.
    With `unconsented: refuse` the response is refused; a field still read as naming one once masked
    (GBK bytes) is refused too."""
    folder = lab["root"] / "www" / "residents"
    folder.mkdir(exist_ok=True)
    (folder / "heads.json").write_text(json.dumps([{"id_number": SUBJECTS[0], "district": "碧江区"}]))
    (lab["root"] / "www" / "strict" / "heads.json").write_text(json.dumps([{"id_number": SUBJECTS[0]}]))
    unconsented, consented = SUBJECTS[500], SUBJECTS[1]
    full_width = SUBJECTS[501].translate(str.maketrans("0123456789X", "０１２３４５６７８９Ｘ"))
    HEADS["mixed"] = [("X-Subject", unconsented), ("X-Family", f"家属 {full_width}; 户主 {consented}"),
                      ("X-Owner", consented)]
    response = get(lab, "/residents/heads.json?head=mixed", "heads")
    assert response.status_code == 200, response.text
    head = "\n".join(f"{name}: {value}" for name, value in response.headers.multi_items())
    assert unconsented not in head and SUBJECTS[501] not in head and full_width not in head
    assert response.headers["x-subject"] == unconsented[:6] + "********" + unconsented[-4:]
    assert response.headers["x-family"] == f"家属 {SUBJECTS[501][:6]}********{SUBJECTS[501][-4:]}; 户主 {consented}"
    assert response.headers["x-owner"] == consented
    assert response.json() == [{"id_number": SUBJECTS[0], "district": "碧江区"}]
    record = record_of(lab, response)
    assert record["consent"] == {"records": 1, "passed": 1, "masked": 0, "dropped": 0, "header_ids": 2}
    assert record["decision"] == "redact"
    assert {(r["type"], tuple(r["locations"])) for r in record["rules"]} == {
        ("consent_header_masked", ("header:X-Subject",)), ("consent_header_masked", ("header:X-Family",))}
    lab["tally"]["residents"]["records"] += 1
    HEADS["unconsented"] = [("X-Subject", unconsented)]
    chunked = get(lab, "/residents/heads.json?head=unconsented&chunked=1", "heads")
    assert chunked.status_code == 200 and chunked.headers["x-subject"] == unconsented[:6] + "********" + unconsented[-4:]
    lab["tally"]["residents"]["records"] += 1

    strict = get(lab, "/strict/heads.json?head=unconsented", "heads")
    assert strict.status_code == 403 and [r["type"] for r in strict.json()["reasons"]] == ["consent_missing"]
    assert unconsented not in strict.text and unconsented not in str(strict.headers)
    assert record_of(lab, strict)["consent"] == {"records": 1, "passed": 0, "masked": 0, "dropped": 0,
                                                 "header_ids": 1}

    HEADS["gbk"] = [("X-Family", "家属 ".encode("gbk") + full_width.encode("gbk"))]
    gbk = get(lab, "/residents/heads.json?head=gbk", "heads")
    assert gbk.status_code == 502 and [r["type"] for r in gbk.json()["reasons"]] == ["consent_unfilterable"]
    assert full_width.encode("gbk") not in gbk.content and "header:X-Family" in gbk.text
    assert record_of(lab, gbk)["consent"] == {"records": 1, "passed": 0, "masked": 0, "dropped": 0, "header_ids": 1}


def test_partial_and_unparsable_bodies_say_why_they_are_not_counted(lab):
    """A counted dataset's 206 and its truncated JSON are refused grant_uncountable, saying what happened."""
    folder = lab["root"] / "www" / "residents"
    folder.mkdir(exist_ok=True)
    (folder / "whole.json").write_text(json.dumps([{"id_number": SUBJECTS[0]}, {"id_number": SUBJECTS[1]}]))
    (folder / "truncated.json").write_text(json.dumps([{"id_number": SUBJECTS[0]}])[:-3])
    partial = get(lab, "/residents/whole.json?part=20", "heads")
    assert partial.status_code == 502 and [r["type"] for r in partial.json()["reasons"]] == ["grant_uncountable"]
    [where] = partial.json()["reasons"][0]["locations"]
    assert where.startswith("a partial response (206): records are counted in a whole body only"), where
    truncated = get(lab, "/residents/truncated.json")
    assert truncated.status_code == 502 and [r["type"] for r in truncated.json()["reasons"]] == ["grant_uncountable"]
    [where] = truncated.json()["reasons"][0]["locations"]
    assert where.startswith("response body: records are counted in whole JSON, CSV and XML bodies, and this one's "
                            "cannot be read (not JSON: "), where


def test_no_unconsented_personal_data_beside_or_inside_records(lab):
    """Only the catalogue's fields leave, as plain values; a record naming a second subject passes only
    when both consented; personal data beside the records, or a CSV repeating a column, is refused."""
    folder = lab["root"] / "www" / "residents"
    folder.mkdir(exist_ok=True)
    clear, other, other_consented = SUBJECTS[0], SUBJECTS[500], SUBJECTS[1]
    (folder / "nested.json").write_text(json.dumps([
        {"id_number": clear, "name": "张三", "district": "碧江区", "family": [{"id_number": other, "name": "李四"}]},
        {"id_number": clear, "name": "张三", "household": other},            # names an unconsented subject
        {"id_number": clear, "name": "张三", "household": other_consented},  # both consented
    ], ensure_ascii=False))
    response = get(lab, "/residents/nested.json")
    assert response.status_code == 200, response.text
    first, second, third = response.json()
    assert first == {"id_number": clear, "name": "张三", "district": "碧江区"}  # the family (nested) never leaves
    assert second["id_number"] == clear[:6] + "********" + clear[-4:] and other not in response.text
    assert third == {"id_number": clear, "name": "张三", "household": other_consented}
    assert record_of(lab, response)["consent"] == {"records": 3, "passed": 2, "masked": 1, "dropped": 0}
    lab["tally"]["residents"]["records"] += 3

    (folder / "meta.json").write_text(json.dumps({"items": [{"id_number": clear}],
                                                  "requested_by": {"id_number": other, "name": "李四"}}))
    (folder / "flat.json").write_text(json.dumps({"items": [{"id_number": clear}], "requested_by": other}))
    (folder / "twocol.csv").write_text(f"id_number,name,id_number\r\n{clear},张三,{other}\r\n")
    (folder / "broken.json").write_text(json.dumps([{"id_number": clear}, {"id_number": other}])[:-3])
    for path in ("/residents/meta.json", "/residents/flat.json", "/residents/twocol.csv", "/residents/broken.json"):
        response = get(lab, path)
        assert response.status_code == 502, (path, response.text)
        # (a CSV repeating a column is not even counted: the grant stage refuses it first)
        assert [r["type"] for r in response.json()["reasons"]] in (["consent_unfilterable"], ["grant_uncountable"])
        assert other not in response.text


FULL_WIDTH = str.maketrans("0123456789X", "０１２３４５６７８９Ｘ")


def serve(lab, name: str, records: list[dict]) -> httpx.Response:
    folder = lab["root"] / "www" / "notes"
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(json.dumps(records, ensure_ascii=False))
    return get(lab, f"/notes/{name}")


def named_in_clear(text: str, number: str) -> bool:
    """The ID number is in the text, however written: full-width, in groups, with any separators."""
    return number in re.sub(r"[\s\-]", "", unicodedata.normalize("NFKC", text))


def test_masked_records_keep_no_unconsented_id_number_in_any_field(lab):
    """A masked record's public and internal fields stay, but for the ID numbers of subjects without
    consent in them, each masked as the ID field is; an ID number of a consented subject may stay."""
    relative, own, public = "520602194001137005", "520602199003077504", "520602199407117541"
    consented, unconsented = SUBJECTS[0], SUBJECTS[500]
    records = [
        {"id_number": consented, "name": "张三", "note": f"家属 {relative}", "district": "碧江区"},
        {"id_number": consented, "name": "张三", "note": f"家属 {relative.translate(FULL_WIDTH)}"},
        {"id_number": own, "name": "王", "note": f"本人 {own}", "district": "万山区"},
        {"id_number": consented, "name": "张三", "district": public},
        {"id_number": unconsented, "name": "李四", "note": f"家属 {SUBJECTS[1]}"},  # a consented relative
    ]
    response = serve(lab, "inside.json", records)
    assert response.status_code == 200, response.text
    first, second, third, fourth, fifth = response.json()
    assert first == {"id_number": consented[:6] + "********" + consented[-4:], "name": "张*",
                     "note": "家属 520602********7005", "district": "碧江区"}
    assert second["note"] == "家属 520602********7005"
    assert third == {"id_number": "520602********7504", "name": "*", "note": "本人 520602********7504", "district": "万山区"}
    assert fourth["district"] == "520602********7541"
    assert fifth["note"] == f"家属 {SUBJECTS[1]}" and fifth["name"] == "李*"
    for number in (relative, own, public, consented, unconsented):
        assert not named_in_clear(response.text, number), number
    assert record_of(lab, response)["consent"] == {"records": 5, "passed": 0, "masked": 5, "dropped": 0}
    # The same in CSV rows and XML records (here the dataset's `district` is the public field).
    folder = lab["root"] / "www" / "residents"
    folder.mkdir(exist_ok=True)
    (folder / "inside.csv").write_text(f"id_number,name,district\r\n{consented},张三,{public}\r\n{own},王,家 {own}\r\n")
    (folder / "inside.xml").write_text(f'<response><resident id_number="{consented}"><district>{public}</district>'
                                       f'</resident><resident id_number="{own}"><district>家 {own}</district></resident>'
                                       '</response>')
    expected = [(consented[:6] + "********" + consented[-4:], "520602********7541"),
                ("520602********7504", "家 520602********7504")]
    csv_response = get(lab, "/residents/inside.csv")
    rows = [row.split(",") for row in csv_response.content.decode().split("\r\n")[1:] if row]
    assert [(row[0], row[2]) for row in rows] == expected and rows[1][1] == "*", csv_response.content.decode()
    xml_response = get(lab, "/residents/inside.xml")
    xml_records = ElementTree.fromstring(xml_response.content).findall("resident")
    assert [(r.get("id_number"), r.find("district").text) for r in xml_records] == expected, xml_response.text
    for checked in (csv_response, xml_response):
        text = checked.content.decode()
        assert not any(named_in_clear(text, number) for number in (own, public, consented)), text
        assert record_of(lab, checked)["consent"] == {"records": 2, "passed": 0, "masked": 2, "dropped": 0}
        lab["tally"]["residents"]["records"] += 2


def test_a_subject_field_classed_public_is_masked_without_consent(lab):
    """The catalogue may class the subject field public: a record without consent still leaves its number
    masked (any 18 characters, a birth date where GB 11643 puts it or not)."""
    folder = lab["root"] / "www" / "public"
    folder.mkdir(exist_ok=True)
    odd = "520602000000007504"  # no birth date: not what an ID number inside a text is taken to be
    (folder / "ids.json").write_text(json.dumps([{"id_number": number, "district": "碧江区"}
                                                 for number in (SUBJECTS[0], SUBJECTS[500], odd)]))
    response = get(lab, "/public/ids.json")
    assert response.status_code == 200, response.text
    assert [item["id_number"] for item in response.json()] == \
        [SUBJECTS[0], SUBJECTS[500][:6] + "********" + SUBJECTS[500][-4:], "520602********7504"]
    assert record_of(lab, response)["consent"] == {"records": 3, "passed": 1, "masked": 2, "dropped": 0}


def grouped(number: str, separator: str = " ", groups: tuple[int, ...] = (6, 8, 4)) -> str:
    at = [sum(groups[:i]) for i in range(len(groups) + 1)]
    return separator.join(number[start:end] for start, end in zip(at, at[1:]))


def test_id_numbers_written_in_groups_name_their_subject(lab):
    """6-8-4 and 6-4-4-4 groups with a space, hyphen or ideographic space (full-width digits too), as the
    DLP detector reads them, name a subject: of one without consent, the record does not pass and the
    number is masked; of a consented one, the record passes as it was."""
    consented = SUBJECTS[0]
    forms = [grouped("520602194203157020"), grouped("520602199306107539", "-"),
             grouped("520602196009256008", "-", (6, 4, 4, 4)),
             grouped("520602197107227012".translate(FULL_WIDTH), "\u3000")]
    records = [{"id_number": consented, "name": "张三", "note": f"家属 {form}"} for form in forms]
    records.append({"id_number": consented, "name": "张三", "note": f"家属 {grouped(SUBJECTS[1])}"})
    response = serve(lab, "grouped.json", records)
    assert response.status_code == 200, response.text
    items = response.json()
    for number, item in zip(["520602194203157020", "520602199306107539", "520602196009256008", "520602197107227012"],
                            items):
        assert item["note"] == f"家属 {number[:6]}********{number[-4:]}", item
        assert not named_in_clear(response.text, number), number
    assert items[-1] == records[-1]  # a consented relative, grouped: in clear
    assert record_of(lab, response)["consent"] == {"records": 5, "passed": 1, "masked": 4, "dropped": 0}
    # Dropped where the dataset drops such records.
    folder = lab["root"] / "www" / "drop"
    (folder / "grouped.json").write_text(json.dumps([{"id_number": consented, "district": form} for form in forms]
                                                    + [{"id_number": consented, "district": "碧江区"}]))
    dropped = get(lab, "/drop/grouped.json")
    assert dropped.status_code == 200 and dropped.json() == [{"id_number": consented, "district": "碧江区"}], dropped.text
    assert record_of(lab, dropped)["consent"] == {"records": 5, "passed": 1, "masked": 0, "dropped": 4}
    lab["tally"]["drop"]["records"] += 1


def test_json_record_repeating_a_key_is_refused(lab):
    """orjson keeps a repeated key's last value: the record would pass as the consented subject while
    holding the other's values. Refused, as a CSV repeating a column is."""
    body = (f'[{{"id_number":"{SUBJECTS[500]}","name":"乙","note":"乙的记录","id_number":"{SUBJECTS[0]}"}},'
            f'{{"id_number":"{SUBJECTS[1]}","name":"甲"}}]')
    folder = lab["root"] / "www" / "notes"
    folder.mkdir(exist_ok=True)
    (folder / "repeated.json").write_text(body)
    response = get(lab, "/notes/repeated.json")
    assert response.status_code == 502, response.text
    assert [r["type"] for r in response.json()["reasons"]] == ["consent_unfilterable"]
    assert "乙" not in response.text and SUBJECTS[500] not in response.text
    # A colon inside a value makes the gateway read the keys again: still one of each, it passes.
    response = serve(lab, "colon.json", [{"id_number": SUBJECTS[0], "name": "甲", "note": "10:30 来访"}])
    assert response.status_code == 200 and response.json()[0]["note"] == "10:30 来访", response.text


def test_spooled_response_refused_whole(lab):
    """A body the gateway spools is never held whole, so its records cannot be filtered: the client
    gets a clear refusal with the transfer id in place of the upstream's answer, and it is recorded."""
    assert (lab["root"] / "www" / "residents-big.json").stat().st_size > 2**20
    response = get(lab, "/residents-big.json")
    assert response.status_code == 502, response.text[:300]
    assert response.headers["content-type"].startswith("application/json")
    assert [r["type"] for r in response.json()["reasons"]] == ["consent_unfilterable"]
    assert "dlp.spool_threshold" in response.text and SUBJECTS[0] not in response.text
    record = record_of(lab, response)
    assert record["status"] == 502 and record["decision"] == "deny"
    assert [r["type"] for r in record["rules"]] == ["consent_unfilterable"]
    # The connection and the gateway go on: the next transfer is filtered as before.
    assert get(lab, "/residents.json").status_code == 200
    lab["tally"]["residents"]["records"] += 1000


def test_withdrawal_takes_effect_on_next_transfer(lab):
    withdrawn = gateway_cli("consent", "withdraw", "--id", SUBJECTS[5], "-c", str(lab["path"]))
    assert withdrawn.returncode == 0 and "1 consent(s) withdrawn" in withdrawn.stdout, withdrawn.stderr
    # A later batch from the platform repeating the consent does not bring it back.
    issue(lab, [consent(5)], "repeat")
    assert gateway_cli("consent", "import", str(lab["root"] / "repeat.batch"), "-c", str(lab["path"])).returncode == 0
    response = get(lab, "/residents.json")
    items = response.json()["items"]
    assert {i for i, item in enumerate(items) if item["id_number"] == SUBJECTS[i]} == CONSENTED - {5}
    assert record_of(lab, response)["consent"]["passed"] == 299
    lab["tally"]["residents"]["records"] += 1000


def test_usage_report_equals_client_tally(lab):
    start = lab["started"].isoformat()
    end = (datetime.now(UTC) + timedelta(minutes=1)).isoformat()
    made = gateway_cli("usage", "report", "--from", start, "--to", end, "--by", "consumer,dataset",
                       "-c", str(lab["path"]), "-o", str(lab["root"] / "report.json"))
    assert made.returncode == 0 and "no billable transfer" not in made.stderr, made.stderr
    report = json.loads((lab["root"] / "report.json").read_text())
    rows = {row["dataset"]: row for row in report["groups"]}
    # A range the logs hold nothing billable in: the report is empty, and says so.
    empty = gateway_cli("usage", "report", "--from", "2020-01-01", "--to", "2020-02-01", "--no-record",
                        "-c", str(lab["path"]), "-o", str(lab["root"] / "empty.json"))
    assert empty.returncode == 0 and "note: no billable transfer from 2020-01-01" in empty.stderr, empty.stderr
    assert json.loads((lab["root"] / "empty.json").read_text())["groups"] == []
    tally = lab["tally"]
    for path, dataset in (("residents", "civil.residents"), ("drop", "civil.residents-drop")):
        for measure in ("requests", "records", "bytes"):
            assert rows[dataset][measure] == tally[path][measure], (dataset, measure, rows, tally)
    assert rows["civil.residents"]["amount"] == pytest.approx(0.02 * tally["residents"]["records"])
    assert rows["civil.residents-drop"]["amount"] == tally["drop"]["requests"]
    # The settlement record names the report's SHA-256 and its totals.
    digest = hashlib.sha256((lab["root"] / "report.json").read_bytes()).hexdigest()
    settlement = [r for r in trace_records(lab["root"] / "state" / "trace") if r.get("type") == "settlement"]
    assert settlement[-1]["report_sha256"] == digest and settlement[-1]["totals"] == report["totals"]
    lab["settled"] = ("--from", start, "--to", end, "--by", "consumer,dataset")


def test_usage_report_checked_against_its_settlement_record(lab):
    checked = gateway_cli("usage", "report", *lab["settled"], "--check", "-c", str(lab["path"]))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "EQUAL: the records settled give the same report, byte for byte" in checked.stdout
    # A transfer of the range that reached the log after the settlement: still equal, and named.
    assert get(lab, "/drop/residents.json").status_code == 200
    lab["tally"]["drop"]["records"] += 299  # subject 5 withdrew
    checked = gateway_cli("usage", "report", *lab["settled"], "--check", "-c", str(lab["path"]))
    assert checked.returncode == 0 and "EQUAL" in checked.stdout, checked.stdout + checked.stderr
    assert "since the settlement: 1 request(s) of the range came into the logs, 299 record(s)" in checked.stdout
    # The catalogue's price changed since: the same records no longer give the settled amount.
    root = lab["root"]
    (root / "catalog-repriced.yaml").write_text(CATALOG.replace("amount: 0.02", "amount: 0.03"))
    config = json.loads(json.dumps(lab["config"]))
    config["authz"]["catalog"] = str(root / "catalog-repriced.yaml")
    repriced = write_config(root / "gateway-repriced.yaml", config)
    checked = gateway_cli("usage", "report", *lab["settled"], "--check", "-c", str(repriced))
    assert checked.returncode == 1, checked.stdout + checked.stderr
    assert "DIFFERS: totals: amount settled" in checked.stdout and "EQUAL" not in checked.stdout
    assert re.search(r"amount settled [0-9.]+ CNY, recounted [0-9.]+ CNY", checked.stdout), checked.stdout
    # Another grouping was never settled.
    other = [*lab["settled"][:-1], "dataset"]
    checked = gateway_cli("usage", "report", *other, "--check", "-c", str(lab["path"]))
    assert checked.returncode == 1 and "no settlement record" in checked.stderr, checked.stdout + checked.stderr


def test_usage_report_needs_witness_cosignatures_when_asked(lab):
    root, trace_dir = lab["root"], lab["root"] / "state" / "trace"
    key = Signer.generate("witness.test/w1", SIG_COSIGNATURE_V1)
    (root / "witness.key").write_text(key.skey() + "\n")
    (root / "witness.vkey").write_text(key.verifier.vkey() + "\n")
    port = free_port()
    witness = Process([sys.executable, "-m", "gateway", "trace", "witness", "--listen", f"127.0.0.1:{port}",
                       "--key", str(root / "witness.key"), "--state", str(root / "wstate"),
                       "--log", f"{lab['config']['trace']['origin']}={lab['root'] / 'state' / 'trace-signing.pub'}"]).started("witness")
    report = [*lab["settled"][:-1], "dataset", "--witness", str(root / "witness.vkey"), "-c", str(lab["path"])]

    def push() -> None:
        pushed = gateway_cli("trace", "witness-push", str(trace_dir), f"http://127.0.0.1:{port}",
                             "--pubkey", str(root / "state" / "trace-signing.pub"), "--witness-key", str(root / "witness.vkey"))
        assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    try:
        refused = gateway_cli("usage", "report", *report, "--no-record")
        assert refused.returncode == 1 and "witness policy not met" in refused.stderr, refused.stderr
        assert refused.stdout == ""
        push()
        made = gateway_cli("usage", "report", *report, "-o", str(root / "witnessed.json"))
        assert made.returncode == 0, made.stderr
        assert json.loads((root / "witnessed.json").read_text())["logs"][0]["witnessed"] == ["witness.test/w1"]
        # The settlement record itself counts once a cosigned checkpoint covers it.
        checked = gateway_cli("usage", "report", *report, "--check")
        assert checked.returncode == 1 and "no settlement record" in checked.stderr, checked.stdout + checked.stderr
        push()
        checked = gateway_cli("usage", "report", *report, "--check")
        assert checked.returncode == 0 and "EQUAL" in checked.stdout, checked.stdout + checked.stderr
    finally:
        witness.stop()


def test_usage_report_refuses_tampered_log(lab):
    copy = lab["root"] / "tampered"
    shutil.copytree(lab["root"] / "state" / "trace", copy)
    journal = copy / "journal"
    data = journal.read_bytes()
    at = data.index(b'"passed":300')
    journal.write_bytes(data[:at] + b'"passed":900' + data[at + 12:])
    made = gateway_cli("usage", "report", "--from", "2000-01-01", "--to", "2100-01-01", "--trace", str(copy),
                       "--pubkey", str(lab["root"] / "state" / "trace" / "trace-signing.pub"), "--no-record",
                       "-c", str(lab["path"]))
    assert made.returncode == 1 and "does not verify" in made.stderr and "record" in made.stderr, made.stderr
    assert made.stdout == ""


def test_usage_report_trusts_no_key_inside_the_log(lab):
    """A log forged from scratch carries its own trace-signing.pub: without --pubkey it is not verified against it."""
    from gateway.trace import TraceLog
    forged = lab["root"] / "forged-trace"
    with TraceLog.open(forged, origin="gateway.local/frontend-local/trace", signing_key=lab["root"] / "evil.key") as log:
        log.append_sync({"v": 1, "id": "forged-0", "time": "2026-12-01T00:00:00Z", "status": 200, "decision": "allow",
                         "resp_bytes": 1, "grant": {"id": "g", "dataset": "civil.residents", "class": "conditional",
                                                    "consumer": "operator-b", "result": "allow", "records": 10**6}})
    args = ("usage", "report", "--from", "2026-11-01", "--to", "2027-01-01", "--trace", str(forged), "--no-record",
            "-c", str(lab["path"]))
    made = gateway_cli(*args)
    assert made.returncode == 2 and "--pubkey" in made.stderr and made.stdout == "", made.stdout + made.stderr
    trusted = lab["root"] / "state" / "trace-signing.pub"
    made = gateway_cli(*args, "--pubkey", str(trusted))
    assert made.returncode == 1 and "does not verify" in made.stderr and made.stdout == "", made.stdout + made.stderr


def test_evidence_for_one_transfer(lab):
    response = get(lab, "/residents.json")
    transfer_id = response.headers["X-Gateway-Transfer-Id"]
    lab["tally"]["residents"]["records"] += 1000
    evidence = lab["root"] / "evidence.json"
    trace_dir = lab["root"] / "state" / "trace"
    made = gateway_cli("trace", "evidence", str(trace_dir), transfer_id, "-o", str(evidence),
                       "--pubkey", str(trace_dir / "trace-signing.pub"))
    assert made.returncode == 0, made.stderr
    checked = gateway_cli("trace", "check-evidence", str(evidence), "--pubkey", str(trace_dir / "trace-signing.pub"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert json.loads(checked.stdout)["record"]["consent"]["passed"] == 299
    # As the other trace commands: the log and its key found from the configuration.
    by_config = lab["root"] / "evidence-by-config.json"
    made = gateway_cli("trace", "evidence", transfer_id, "-o", str(by_config), "-c", str(lab["path"]))
    assert made.returncode == 0 and by_config.read_text() == evidence.read_text(), made.stderr
    checked = gateway_cli("trace", "check-evidence", str(by_config), "-c", str(lab["path"]))
    assert checked.returncode == 0 and json.loads(checked.stdout)["transfer_id"] == transfer_id, checked.stdout
    # and it says which key it took: the gateway's own, not one a party obtained out of band
    assert f"note: checking against {lab['root'] / 'state' / 'trace-signing.pub'}" in checked.stderr, checked.stderr
    bundle = json.loads(evidence.read_text())
    forged = bundle["proof"].split("\n")
    entry = json.loads(base64.b64decode(forged[1][6:]))
    entry["consent"]["passed"] = 1000
    forged[1] = "extra " + base64.b64encode(json.dumps(entry).encode()).decode()
    bundle["proof"] = "\n".join(forged)
    evidence.write_text(json.dumps(bundle))
    checked = gateway_cli("trace", "check-evidence", str(evidence), "--pubkey", str(trace_dir / "trace-signing.pub"))
    assert checked.returncode == 1 and "INVALID" in checked.stdout, checked.stdout


def test_usage_report_over_cross_witnessed_logs(lab, tmp_path):
    """`usage report --peers`: the machines' logs (here this gateway's and a second machine's), each
    verified with its key and its cross-witness cosignature before anything is summed."""
    import threading

    from gateway.trace.note import SIG_COSIGNATURE_V1, Signer, parse_vkey
    from gateway.trace.witness import WitnessConfig, WitnessState, push_checkpoint, serve
    from tests.tracecli import write_log

    logs = {"gw1": shutil.copytree(lab["root"] / "state" / "trace", tmp_path / "gw1"),
            "gw2": write_log(tmp_path / "gw2", "test.consent/gw2/trace", [{"id": "t-1", "time": "2000-01-02"}])
            / "log"}
    trusted = lab["root"] / "state" / "trace-signing.pub"  # the gateway's own key, not the log copy's
    log_keys = {"gw1": trusted.read_text().strip(),
                "gw2": (tmp_path / "gw2" / "key.pub").read_text().strip()}
    witnesses = {name: Signer.generate(f"test.consent/{name}/witness", SIG_COSIGNATURE_V1) for name in logs}
    other = {"gw1": "gw2", "gw2": "gw1"}
    for name in logs:  # each machine's witness cosigns the other's log
        state = WitnessState(tmp_path / f"{name}-witness", {parse_vkey(log_keys[other[name]]).name:
                                                             parse_vkey(log_keys[other[name]])}, witnesses[name])
        server = serve(("127.0.0.1", 0), state)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        push_checkpoint(logs[other[name]], parse_vkey(log_keys[other[name]]),
                        WitnessConfig(f"http://127.0.0.1:{server.server_address[1]}", witnesses[name].verifier.vkey()))
        server.shutdown()
    peers = tmp_path / "peers.yaml"
    peers.write_text("peers:\n" + "".join(
        f"  - {{name: {name}, log_key: '{log_keys[name]}', witness_key: '{witnesses[name].verifier.vkey()}', "
        f"witness: 'http://127.0.0.1:9', log: {logs[name]}}}\n" for name in logs))
    args = ("usage", "report", "--from", "2000-01-01", "--to", "2100-01-01", "--no-record", "-c", str(lab["path"]))
    single = gateway_cli(*args, "--trace", str(logs["gw1"]), "--pubkey", str(trusted))
    both = gateway_cli(*args, "--peers", str(peers))
    assert both.returncode == 0, both.stderr
    report = json.loads(both.stdout)
    assert [log["log"] for log in report["logs"]] == [parse_vkey(log_keys[name]).name for name in logs]
    assert all(log["witnessed"] for log in report["logs"])
    assert report["groups"] == json.loads(single.stdout)["groups"]  # the second log holds nothing priced
    (logs["gw2"] / "checkpoint.witnessed").unlink()
    refused = gateway_cli(*args, "--peers", str(peers))
    assert refused.returncode == 1 and "witness policy not met" in refused.stderr and refused.stdout == ""
