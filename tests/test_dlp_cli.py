"""`gateway dlp scan | explain | test` through the registered argparse commands."""

import gzip
import json

from gateway.cli import main

ID = "11010519491231002X"


def run(capsys, *argv):
    status = main(["dlp", *argv])
    captured = capsys.readouterr()
    return status, [json.loads(line) for line in captured.out.splitlines() if line.startswith("{")], captured


def test_scan_files_stdin_and_exit_status(tmp_path, capsys, monkeypatch):
    sensitive = tmp_path / "export.json"
    sensitive.write_bytes(gzip.compress(json.dumps({"rows": [{"sfzh": ID}]}).encode()))
    clean = tmp_path / "clean.txt"
    clean.write_text("nothing to see 1700000000000")
    status, records, _ = run(capsys, "scan", "--content-type", "application/json", "--content-encoding", "gzip",
                             str(sensitive))
    assert status == 1
    record = next(r for r in records if r["type"] == "cn_id_card")
    assert record["source"] == str(sensitive) and record["location"] == "body:$.rows[0].sfzh"
    assert record["masked"] == "1101**********002X" and record["action"] == "block" and "value" not in record
    assert record["place"] == ["body", json.dumps({"rows": [{"sfzh": ID}]}).index(ID)]  # what digests cover
    status, records, _ = run(capsys, "scan", str(clean))
    assert (status, records) == (0, [])
    monkeypatch.setattr("sys.stdin", type("In", (), {"buffer": __import__("io").BytesIO(f"id {ID}".encode())})())
    status, records, _ = run(capsys, "scan", "--show-values", "-")
    assert status == 1 and records[0]["value"] == ID and records[0]["source"] == "-"


def test_scan_raw_http_messages(tmp_path, capsys):
    request = tmp_path / "req.http"
    request.write_bytes(b"POST /submit?sfzh=" + ID.encode() + b" HTTP/1.1\r\nHost: example.com\r\n"
                        b"X-Contact: 13900139000\r\n"
                        b"Content-Type: application/x-www-form-urlencoded\r\nTransfer-Encoding: chunked\r\n\r\n"
                        b"9\r\nmobile=13\r\n9\r\n800138000\r\n0\r\n\r\n")
    response = tmp_path / "resp.http"
    body = gzip.compress(b"card 6228480012345671")
    response.write_bytes(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Holder: " + ID.encode() +
                         b"\r\nContent-Encoding: gzip\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body) + body)
    status, records, _ = run(capsys, "scan", "--http", str(request), str(response))
    assert status == 1
    assert {(r["profile"], r["type"], r["location"]) for r in records} >= {
        ("outbound", "cn_id_card", "query:sfzh"), ("outbound", "cn_mobile", "body:form mobile"),
        ("inbound", "bank_card", "body:offset 5"), ("outbound", "cn_mobile", "header:X-Contact"),
        ("inbound", "cn_id_card", "header:X-Holder")}  # heads as the gateway inspects them


def test_scan_takes_the_upstream_host_as_the_gateway_does(tmp_path, capsys):
    """A rule's exceptions.hosts applies to a rescan as it did in the gateway: the host comes from the
    request (absolute URL, else Host), or --host for a response or a plain file."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(f"""rules:
  - id: id-card
    detectors: [cn_id_card]
    action: block
    exceptions: {{hosts: ["*.partner.example"]}}
    examples: {{match: ["{ID}"], no_match: ["nothing"]}}
profiles:
  outbound: {{rules: [id-card]}}
  inbound: {{rules: [id-card]}}
""")
    body = json.dumps({"sfzh": ID}).encode()
    for host, target, found in (("api.partner.example", "/submit", False), ("example.com", "/submit", True),
                                ("example.com", "http://api.partner.example/submit", False)):
        message = tmp_path / "req.http"
        message.write_bytes(f"POST {target} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                            f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        status, records, _ = run(capsys, "scan", "--rules", str(rules), "--http", str(message))
        assert (status, bool(records)) == (int(found), found), (host, target, records)
    plain = tmp_path / "export.json"
    plain.write_bytes(body)
    assert run(capsys, "scan", "--rules", str(rules), str(plain))[0] == 1
    assert run(capsys, "scan", "--rules", str(rules), "--host", "files.partner.example", str(plain))[0] == 0


def test_scan_errors_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  - id: x\n    action: nope\n")
    status, _, captured = run(capsys, "scan", "--rules", str(bad), str(bad))
    assert status == 2 and f"{bad}:3: rules[0].action" in captured.err
    status, _, captured = run(capsys, "scan", str(tmp_path / "missing.txt"))
    assert status == 2 and "missing.txt" in captured.err
    status, _, captured = run(capsys, "scan", "--profile", "nope", str(bad))
    assert status == 2 and "known: audit-only, inbound, outbound" in captured.err


def test_scan_mitmproxy_flow_files(tmp_path, capsys):
    from mitmproxy import io as flow_io
    from mitmproxy.test import tflow

    flow = tflow.tflow(resp=True)
    flow.request.url = f"http://example.com/api?sfzh={ID}"
    flow.request.headers["content-type"] = "application/json"
    flow.request.content = json.dumps({"note": "机密文件"}).encode()
    flow.response.headers["content-type"] = "text/plain"
    flow.response.headers["x-holder"] = ID
    flow.response.content = b"ok"
    path = tmp_path / "flows.mitm"
    with open(path, "wb") as stream:
        flow_io.FlowWriter(stream).add(flow)
    status, records, _ = run(capsys, "scan", "--flows", str(path))
    assert status == 1
    assert {(r["type"], r["location"]) for r in records} >= {("cn_id_card", "query:sfzh"),
                                                              ("classification_mark", "body:$.note"),
                                                              ("cn_id_card", "header:x-holder")}
    assert all(ID not in r["source"] for r in records)  # the URL in the source is masked


def test_explain_shows_each_validation_step(capsys):
    assert main(["dlp", "explain", "110105194912310021"]) == 0
    out = capsys.readouterr().out
    assert "cn_id_card: '110105194912310021' at byte 0: rejected" in out
    assert "✗ MOD 11-2 check character: X expected, 1 written" in out and "profile outbound: no rule triggers" in out
    assert main(["dlp", "explain", ID]) == 0
    out = capsys.readouterr().out
    assert "cn_id_card: '11010519491231002X' at byte 0: MATCH" in out and "rule id-card (block" in out


def test_test_command_reports_failing_examples(tmp_path, capsys):
    assert main(["dlp", "test"]) == 0
    assert "all pass" in capsys.readouterr().out
    rules = tmp_path / "r.yaml"
    rules.write_text("rules:\n  - id: m\n    detectors: [cn_mobile]\n    action: warn\n"
                     "    examples: {match: ['12345678901'], no_match: ['13800138000']}\n")
    assert main(["dlp", "test", str(rules)]) == 1
    out = capsys.readouterr().out
    assert f"FAIL {rules}:2: rule m: example should match: '12345678901'" in out
    assert "example should not match: '13800138000'" in out and "2 failed" in out
