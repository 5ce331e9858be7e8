"""Sensitive data hidden by percent-encoding it (once more than its container needs): found in bodies,
heads and streams, and located (that it cannot be redacted there: test_dlp_embedded)."""

import base64
import itertools
import json
import random
import time
import tracemalloc
from pathlib import Path
from urllib.parse import quote, unquote_to_bytes

import pytest

from gateway.dlp import embedded, load_rules
from gateway.dlp import stream as stream_module
from gateway.dlp.decode import Limits, decode_body
from gateway.dlp.embedded import (
    BODY,
    BYTES,
    MANY_ESCAPES,
    MIN_ESCAPES,
    TEXT,
    TOKEN_SEPARATOR,
    encoded_contents,
    percent_runs,
    unquote_text,
)
from tests.test_dlp_embedded import CARD, ID, _streamed, id_findings, streaming_profile

SHIPPED = Path(__file__).resolve().parent.parent / "config" / "dlp"


FULL_WIDTH_ID = ID.translate({ord(c): ord(c) + 0xFEE0 for c in "0123456789X"})
UNICODE_ESCAPED_ID = "".join(f"\\u{ord(c):04x}" for c in ID)


@pytest.fixture(scope="module")
def rules():
    return load_rules(SHIPPED)


def escaped(text: str) -> str:
    """Every byte as %XX, digits and letters too (what no URL encoder does unasked)."""
    return escaped_bytes(text.encode()).decode()


def escaped_bytes(data: bytes) -> bytes:
    return b"".join(b"%%%02X" % byte for byte in data)


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
        "one digit escaped": (json.dumps({"q": "%31" + ID[1:]}), "application/json",
                              "body:$.q / percent-encoded / offset 0"),
        "two digits escaped": (f"id 1101{escaped(ID[4:6])}{ID[6:]}", "text/plain",
                               "body:offset 3 / percent-encoded / offset 0"),
        "full-width digits": (escaped(FULL_WIDTH_ID), "text/plain", "body:offset 0 / percent-encoded / offset 0"),
        "\\u escapes": (escaped(UNICODE_ESCAPED_ID), "text/plain", "body:offset 0 / percent-encoded / offset 0"),
        "escaped again": (json.dumps({"q": "%2531" + ID[1:]}), "application/json",
                          "body:$.q / percent-encoded / offset 0 / percent-encoded / offset 0"),
        "full-width after a NUL": (json.dumps({"q": escaped("\x00" + FULL_WIDTH_ID)}), "application/json",
                                   "body:$.q / percent-encoded / offset 1"),
        "after a full-width token": (json.dumps({"a": quote("Ａ" * 30), "b": "x", "c": escaped(ID)}),
                                     "application/json", "body:$.c / percent-encoded / offset 0"),
        "beside an escaped digit": (escaped(ID + "\\u0031&#49;"), "text/plain",
                                    "body:offset 0 / percent-encoded / offset 0"),  # whole only as written
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
    for links in ([quote("绝密".encode("gbk"))], [quote("普通".encode("gbk")), quote("绝密".encode("gbk"))]):
        gbk = json.dumps({"links": links}).encode()  # tokens in another charset, read together
        assert rules.profile("outbound").scan(gbk, content_type="application/json").action == "block", links


@pytest.mark.parametrize("bytes_token", ["%FF%FF%FF", "%02d%02x%08X"], ids=["binary", "printf"])
def test_a_token_of_bytes_hides_nothing_in_the_others(rules, bytes_token):
    """A token that decodes to bytes (or a printf format that looks like escapes) is read apart:
    the text tokens beside it are still read as text (folded, charset-decoded, unescaped)."""
    outbound = rules.profile("outbound")
    for hidden in (escaped(FULL_WIDTH_ID), quote("绝密".encode("gbk")), escaped(UNICODE_ESCAPED_ID),
                   escaped("&#32477;&#23494;")):
        for body, content_type in ((json.dumps({"q": hidden, "z": bytes_token}), "application/json"),
                                   (f"{hidden} fmt {bytes_token}", "text/plain")):
            assert outbound.scan(body.encode(), content_type=content_type).action == "block", (hidden, body)


def test_each_finding_is_located_at_its_own_token_and_text_between_is_not_read_twice(rules):
    outbound = rules.profile("outbound")
    body = json.dumps({"search": "https://s.example/?q=" + quote("天气"), "note": "x" * 50,
                       "next": "https://h.example/?u=" + escaped(ID)})
    assert id_findings(outbound.scan(body.encode(), content_type="application/json")) == [
        "body:$.next / percent-encoded / offset 0"]
    inbound = rules.profile("inbound")  # a card number in clear between two encoded words: found once
    body = f"see {quote('天气')} card {CARD} and {quote('预报')}".encode()
    result = inbound.scan(body, content_type="text/plain", direction="response")
    assert [f.location for f in result.findings] == ["body:offset 28"]
    masked = inbound.redact(body, content_type="text/plain", result=result)
    assert CARD.encode() not in masked


def test_words_of_one_token_are_no_context_for_the_next(rules):
    """A passport number needs a context word before it; one in an earlier link of the page is not it."""
    order_link = f'<a href="/orders/G12345678/{quote("详情")}">订单</a>\n'
    page = f'<a href="/s?q={quote("护照 办理")}">办理</a>\n<p>{"正文内容，" * 200}</p>\n{order_link}'
    assert rules.profile("outbound").scan(page.encode(), content_type="text/html").findings == []
    near = f"{quote('护照号码 G12345678')}"  # within the token itself it is context
    assert rules.profile("outbound").scan(near.encode(), content_type="text/plain").action == "warn"


def test_urls_encoded_again_and_again_are_no_nesting_problem(rules):
    """A login redirect encoded three times beside a JWT, in every value of a body, and an access
    log of such links within a small decoding budget: undone, with no problem to report."""
    def encode(url):
        return quote(url, safe="")
    thrice = "https://idp.example/auth?RelayState=" + encode(
        "https://sso.example/login?continue=" + encode("https://app.example/cb?lang=" + encode("中文")))
    claims = base64.urlsafe_b64encode(json.dumps({"redirect_uri": encode("https://app.example/cb?x=1")}).encode())
    jwt = f"eyJhbGciOiJIUzI1NiJ9.{claims.rstrip(b'=').decode()}.c2ln"
    body = json.dumps({"a": thrice, "state": jwt, "b": thrice}).encode()
    result = rules.profile("outbound").scan(body, content_type="application/json")
    assert result.findings == []
    links = (encode("https://app.example/s?q=" + quote("天气 预报") + f"&p={n}") for n in range(17_500))
    log = "".join(f'10.0.0.{n % 250} - "GET /login?next={link}"\n' for n, link in enumerate(links)).encode()
    limits = Limits(max_decoded_bytes=4 << 20)
    decoded = decode_body(log, "text/plain", None, limits)
    assert decoded.problems == [] and len(log) < limits.max_decoded_bytes


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
    data = b'x "https://h/a?q=%E7%BB%9D%E5%AF%86&y=1" 1%31%30%35 %20%21 %ZZ%20%21%22 a%2Db %FF%FF%00 %7B%22a%22:1%7D'
    tokens = [data[s:e] for s, e in percent_runs(data)]
    # a token ends at quotes, whitespace, "&" and "="; two escapes are too few unless one of them
    # needlessly escapes a digit, a letter or "-._~"; a bad escape is kept
    assert tokens == [b"%E7%BB%9D%E5%AF%86", b"1%31%30%35", b"%ZZ%20%21%22", b"a%2Db", b"%FF%FF%00", b"%7B%22a%22:1%7D"]
    starts = [data.index(token) for token in tokens]
    # text tokens are one content, joined by a separator; bytes another; a structure one of its own
    separated = [len(text) + len(TOKEN_SEPARATOR) for text in ("绝密".encode(), b"1105", b'%ZZ !"')]
    assert [(c.start, c.end, c.read_as, c.content, list(c.piece_starts), list(c.piece_sources))
            for c in encoded_contents(data)] == [
        (starts[0], starts[3] + 5, TEXT, TOKEN_SEPARATOR.join(["绝密".encode(), b"1105", b'%ZZ !"', b"a-b"]),
         [0, *itertools.accumulate(separated)], starts[:4]),
        (starts[4], starts[4] + 9, BYTES, b"\xff\xff\x00", [0], [starts[4]]),
        (starts[5], len(data), BODY, b'{"a":1}', [], [])]
    assert list(percent_runs(b"%20" * (MIN_ESCAPES - 1))) == []
    assert list(percent_runs(b"%20%20%%")) == []  # a "%" without two hex digits is no escape
    assert list(percent_runs(b"no escapes at all, 100%")) == []


@pytest.mark.parametrize("piece", [1 << 16, 7], ids=["whole", "by-pieces"])
def test_texts_decode_as_urllib_does(monkeypatch, piece):
    """The fast decoder (quoted-printable's, in C) agrees with urllib's unquote on any token, and on
    any text ("=", whitespace and line breaks included), read whole or by pieces."""
    monkeypatch.setattr(embedded, "_UNQUOTE_PIECE", piece)
    rng = random.Random(5)
    for alphabet in (b"%%%%0123456789abcdefABCDEFxyz_.~+/:;!\xe7", b"%%%%0123456789abcdefABCDEF= \t\r\n_x\xe7\x00"):
        for _ in range(20_000):
            text = bytes(rng.choice(alphabet) for _ in range(rng.randrange(1, 40)))
            assert unquote_text(text) == unquote_to_bytes(text), text


def test_a_text_dense_with_escapes_is_decoded_as_a_whole(rules):
    """Past MANY_ESCAPES, token by token would cost a Python step each: the text is decoded at once,
    and what it hides is still found."""
    outbound = rules.profile("outbound")
    flood = "%41 " * MANY_ESCAPES
    referenced_id = escaped("".join(f"&#{ord(c)};" for c in ID))
    hidden_forms = (escaped(ID), escaped(FULL_WIDTH_ID), quote("绝密"), quote(escaped(ID)),
                    escaped(UNICODE_ESCAPED_ID), referenced_id, quote("绝密".encode("gbk")))
    # one token of bytes, or of GBK text, must not change how the rest is read (it is read every way)
    for spoiler in ("", "%FF%01%02 ", quote("你好".encode("gbk")) + " "):
        for hidden in hidden_forms:
            body = f"{spoiler}{flood}{hidden} {flood}".encode()
            started = time.perf_counter()
            result = outbound.scan(body, content_type="text/plain")
            assert result.action == "block", (spoiler, hidden)
            assert time.perf_counter() - started < 5
    as_json = json.dumps([flood + referenced_id]).encode()  # read as JSON too
    assert outbound.scan(as_json, content_type="text/plain").action == "block"
    assert outbound.scan(flood.encode(), content_type="text/plain").findings == []


def test_finding_tokens_takes_linear_time():
    """Each token is read once: a megabyte of short tokens or of one long one is quick to go through
    (reading every token from every escape would take hours)."""
    for data in (b"%20 " * 300_000, b"a%41" * 300_000):
        started = time.perf_counter()
        runs = list(percent_runs(data))
        assert time.perf_counter() - started < 5
        assert runs == ([] if data.startswith(b"%20 ") else [(0, len(data))])


@pytest.mark.parametrize("data", [b"%" * (8 << 20), b"%41" * ((8 << 20) // 3) + b"%"], ids=["signs", "bad-escape"])
def test_long_tokens_are_read_in_bounded_memory(data):
    """Counting escapes stops at MIN_ESCAPES, and a bad escape is decoded without urllib's pieces."""
    tracemalloc.start()
    try:
        contents = list(encoded_contents(data))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * len(data), peak
    assert [c.content[-1:] for c in contents] == ([] if data.startswith(b"%%") else [b"%"])


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


@pytest.mark.parametrize("around", [("无关内容" * 2000).encode(), b"\xff" * 24_000], ids=["text", "bytes"])
def test_a_token_longer_than_a_window_is_streamed_on_its_own(tmp_path, monkeypatch, around):
    """Too long to hold, it is decoded window by window into a stream of its own: each ID number
    anywhere in it is found once, whether the token is text or bytes (it is cut between escapes)."""
    monkeypatch.setattr(stream_module, "WINDOW_BYTES", 8192)
    profile = streaming_profile(tmp_path)
    filler = ("普通文本 " * 1500).encode()
    for cut in (0, 1, 2, *range(15_354, 15_378, 3), 20_000):  # the ID spans the first window's end
        token = escaped_bytes(around[:cut] + ID.encode() + around[cut:] + ID.encode() + around)
        result = _streamed(profile, filler + b" " + token + b" " + filler)
        assert [f.type for f in result.findings] == ["cn_id_card"] * 2, (cut, result.findings)
        assert all(" / percent-encoded" in f.location for f in result.findings)
    clean = _streamed(profile, filler + b" " + escaped_bytes(around * 3) + b" " + filler)
    assert clean.action is None and clean.findings == []


def test_a_long_token_ending_in_a_window_overlap_is_read_once(tmp_path, monkeypatch):
    """Its stream concludes where it ends; its tail, in the next window's overlap, is not a token anew."""
    monkeypatch.setattr(stream_module, "WINDOW_BYTES", 8192)
    profile = streaming_profile(tmp_path)
    filler, around = ("普通文本 " * 1500).encode(), ("无关内容" * 2000).encode()
    for lead in range(0, 9000, 63):  # the token's end sweeps across window ends
        body = filler + b" " + escaped_bytes(around[:lead] + around + ID.encode()) + b" " + filler
        assert [f.type for f in _streamed(profile, body).findings] == ["cn_id_card"], lead


def test_nesting_is_counted_alike_streamed_or_not(tmp_path, monkeypatch):
    monkeypatch.setattr(stream_module, "WINDOW_BYTES", 8192)
    profile = streaming_profile(tmp_path)
    text = ("无关内容" * 40).encode()
    for _ in range(5):  # one level deeper than max_depth
        text = escaped_bytes(text)
    body = ("普通文本 " * 100).encode() + b" " + text + b" x"
    for result in (_streamed(profile, body), profile.scan(body, content_type="text/plain")):
        assert [(f.type, f.value) for f in result.findings] == [("uninspectable", "nesting deeper than 4 levels")]


def test_what_a_long_token_hides_once_more_is_found(tmp_path, monkeypatch):
    """The stream of a long token reads it as a body: escaped again, \\u-escaped or base64 inside is
    undone too; base64 text too long to hold there fails closed, as in the body itself."""
    monkeypatch.setattr(stream_module, "WINDOW_BYTES", 8192)
    profile = streaming_profile(tmp_path)
    around = ("无关内容" * 2000).encode()
    for hidden in (escaped_bytes(ID.encode()), UNICODE_ESCAPED_ID.encode(), base64.b64encode(f"证件 {ID}".encode())):
        result = _streamed(profile, b"x " + escaped_bytes(around + b" " + hidden + b" " + around) + b" y")
        assert [f.type for f in result.findings] == ["cn_id_card"], (hidden, result.findings)
        assert result.findings[0].location.startswith("body:offset 2 / percent-encoded / offset ")
    long_base64 = base64.b64encode(("无关内容" * 8000 + ID).encode())  # longer than the charset sniff too
    result = _streamed(profile, b"x " + escaped_bytes(around + b" " + long_base64 + b" " + around) + b" y")
    assert [f.type for f in result.findings] == ["uninspectable"]
    assert "base64 text longer than" in result.findings[0].value


def test_a_large_form_streams_with_a_large_encoded_field(tmp_path, monkeypatch):
    monkeypatch.setattr(stream_module, "WINDOW_BYTES", 8192)
    profile = streaming_profile(tmp_path)
    blob = base64.b64encode(random.Random(1).randbytes(200_000)).decode()
    form = f"name=photo&image={quote(blob, safe='')}&x=1&id={quote(escaped(ID))}".encode()
    result = _streamed(profile, form, "application/x-www-form-urlencoded")
    assert [f.type for f in result.findings] == ["cn_id_card"]
