"""Sensitive data hidden by percent-encoding it (once more than its container needs): found in bodies,
heads and streams, and located (that it cannot be redacted there: test_dlp_embedded)."""

import json
import random
import time
from pathlib import Path
from urllib.parse import quote, unquote_to_bytes

import pytest

from gateway.dlp import load_rules
from gateway.dlp import stream as stream_module
from gateway.dlp.embedded import MIN_ESCAPES, PERCENT, encoded_contents, percent_runs, unquote_token
from tests.test_dlp_embedded import ID, _streamed, id_findings, streaming_profile

SHIPPED = Path(__file__).resolve().parent.parent / "config" / "dlp"


@pytest.fixture(scope="module")
def rules():
    return load_rules(SHIPPED)


def escaped(text: str) -> str:
    """Every byte as %XX, digits and letters too (what no URL encoder does unasked)."""
    return "".join(f"%{byte:02X}" for byte in text.encode())


def test_every_way_of_hiding_an_id_number_by_percent_encoding_is_found_and_located(rules):
    outbound = rules.profile("outbound")
    cases = {
        "json value": (json.dumps({"q": escaped(ID)}), "application/json", "body:$.q / percent-encoded / offset 0"),
        "partly escaped": (f"id 1{escaped(ID[1:9])}{ID[9:]} end", "text/plain",
                           "body:offset 3 / percent-encoded / offset 0"),
        "form value encoded twice": (f"a=1&b={quote(escaped(ID))}", "application/x-www-form-urlencoded",
                                     "body:form b / percent-encoded / offset 0"),
        "in a url": (json.dumps({"next": f"https://h.example/p?sfzh={escaped(ID)}&x=1"}), "application/json",
                     "body:$.next / percent-encoded / offset 0"),
        "lower-case hex": (escaped(ID).lower(), "text/plain", "body:offset 0 / percent-encoded / offset 0"),
    }
    for name, (body, content_type, location) in cases.items():
        result = outbound.scan(body.encode(), content_type=content_type)
        assert result.action == "block", name
        assert location in id_findings(result), (name, id_findings(result))


def test_a_classification_mark_in_an_encoded_url_is_found(rules):
    body = json.dumps({"link": f"https://files.example/docs/{quote('绝密-预算.docx')}"}).encode()
    result = rules.profile("outbound").scan(body, content_type="application/json")
    assert result.action == "block"
    assert [(f.type, f.location) for f in result.findings] == [
        ("classification_mark", "body:$.link / percent-encoded / offset 27")]


def test_ordinary_encoded_urls_are_left_alone(rules):
    """Search links, encoded paths and form data with nothing sensitive: no finding, no problem."""
    outbound = rules.profile("outbound")
    links = [f"https://search.example/s?q={quote(term)}&page={n}" for n, term in
             enumerate(["天气 预报", "地铁 线路图", "a/b c?d", "100% 确定"])]
    body = json.dumps({"links": links, "path": "/files/%E6%99%AE%E9%80%9A.txt",
                       "odd": ["100%%% sure", "%ZZ%ZZ%ZZ", "%2541%2541%2541"]}).encode()
    result = outbound.scan(body, content_type="application/json")
    assert result.action is None and result.findings == []


def test_tokens_escape_counts_and_boundaries():
    data = b'x "https://h/a?q=%E7%BB%9D%E5%AF%86&y=1" 1%31%30%35 %41%42 %ZZ%41%42%43'
    tokens = [data[s:e] for s, e in percent_runs(data)]
    # a token ends at quotes, whitespace, "&" and "="; two escapes are too few; a bad escape is kept
    assert tokens == [b"%E7%BB%9D%E5%AF%86", b"1%31%30%35", b"%ZZ%41%42%43"]
    # one content: the stretch from the first token to the last, each token decoded
    assert [(c.start, c.end, c.coding, c.content) for c in encoded_contents(data)] == [
        (17, len(data), PERCENT, '绝密&y=1" 1105 %41%42 %ZZABC'.encode())]
    assert list(percent_runs(b"%41" * (MIN_ESCAPES - 1))) == []
    assert list(percent_runs(b"%41%41%%")) == []  # a "%" without two hex digits is no escape
    assert list(percent_runs(b"no escapes at all, 100%")) == []


def test_tokens_decode_as_urllib_does():
    """The fast decoder (quoted-printable's, in C) agrees with urllib's unquote on any token."""
    rng = random.Random(5)
    alphabet = b"%%%%0123456789abcdefABCDEFxyz_.~+/:;!\xe7"
    for _ in range(20_000):
        token = bytes(rng.choice(alphabet) for _ in range(rng.randrange(1, 30)))
        assert unquote_token(token) == unquote_to_bytes(token), token


def test_finding_tokens_takes_linear_time():
    """Each token is read once: a megabyte of short tokens or of one long one is quick to go through
    (reading every token from every escape would take hours)."""
    for data in (b"%41 " * 300_000, b"a%41" * 300_000):
        started = time.perf_counter()
        runs = list(percent_runs(data))
        assert time.perf_counter() - started < 5
        assert runs == ([] if data.startswith(b"%41 ") else [(0, len(data))])


def test_heads_hide_nothing_either(rules):
    outbound = rules.profile("outbound")
    result = outbound.scan_head("/api", [("Referer", f"https://h.example/?u={escaped(ID)}")], direction="request")
    assert id_findings(result) == ["header:Referer / percent-encoded / offset 0"]
    plain = outbound.scan_head("/api", [("Referer", f"https://h.example/s?q={quote('天气 预报')}")],
                               direction="request")
    assert plain.action is None


def test_streams_find_percent_encoding_across_windows(tmp_path, monkeypatch):
    monkeypatch.setattr(stream_module, "WINDOW_BYTES", 8192)
    profile = streaming_profile(tmp_path)
    filler = "普通文本 " * 1500  # 24 KB: the hidden tokens fall across window boundaries
    hidden = [escaped("无关内容" * n + ID) for n in (1, 150, 250)]
    result = _streamed(profile, (filler + " " + " ".join(f"{h} {filler}" for h in hidden)).encode())
    assert result.action == "block" and len(id_findings(result)) == 3, result.findings
    assert all(" / percent-encoded / " in location for location in id_findings(result))
    long_text = escaped("无关内容" * 2000)  # longer than a window, text: cannot be held
    result = _streamed(profile, f"{filler} {long_text} {filler}".encode())
    assert result.action == "block" and [f.type for f in result.findings] == ["uninspectable"]
    assert "percent-encoded text longer than" in result.findings[0].value
