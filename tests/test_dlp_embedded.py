"""Sensitive data hidden as base64 inside what crosses: found in bodies, heads and streams, located,
and never redacted into a false sense of safety."""

import base64
import gzip
import hashlib
import io
import json
import os
import random
import re
import uuid
import zipfile
from pathlib import Path

import pytest

from gateway.dlp import load_rules
from gateway.dlp import stream as stream_module
from gateway.dlp.coding import DecodeError
from gateway.dlp import embedded
from gateway.dlp.embedded import (
    MIN_RUN,
    base64_runs,
    decode_run,
    encoded_contents,
    readable,
)

SHIPPED = Path(__file__).resolve().parent.parent / "config" / "dlp"
ID = "11010519491231002X"
CARD = "6228480012345671"
TABLE = f"姓名,身份证号\n张三,{ID}\n".encode()


@pytest.fixture(scope="module")
def rules():
    return load_rules(SHIPPED)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def id_findings(result):
    return sorted(f.location for f in result.findings if f.type == "cn_id_card")


def test_every_way_of_hiding_an_id_number_in_base64_is_found_and_located(rules):
    outbound = rules.profile("outbound")
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("export.csv", TABLE)
    jwt = ".".join([base64.urlsafe_b64encode(b'{"alg":"HS256"}').rstrip(b"=").decode(),
                    base64.urlsafe_b64encode(json.dumps({"sfzh": ID}).encode()).rstrip(b"=").decode(), "c2ln"])
    cases = {
        "json value": (json.dumps({"file": b64(TABLE)}), "application/json",
                       "body:$.file / base64 / csv row 2 column 身份证号"),
        "JWT claim": (json.dumps({"token": jwt}), "application/json", "body:$.token / base64 / $.sfzh"),
        "GBK text": (b64(f"身份证号：{ID}".encode("gbk")), "text/plain", "body:offset 0 / base64 / offset 15"),  # in the text as written: the colon is 3 bytes
        "zip": (json.dumps({"attachment": b64(archive.getvalue())}), "application/json",
                "body:$.attachment / base64 / zip export.csv / csv row 2 column 身份证号"),
        "gzip": (f"data:application/gzip;base64,{b64(gzip.compress(ID.encode()))}", "text/plain",
                 "body:offset 29 / base64 / gzip content / offset 0"),
        "MIME-wrapped": (base64.encodebytes(b"padding line " * 20 + ID.encode()).decode(), "text/plain",
                         "body:offset 0 / base64 / offset 260"),
        "a NUL in front": (b64(b"\x00" + TABLE), "text/plain", "body:offset 0 / base64 / csv row 2 column 身份证号"),
        "base64 of base64": (f"x={b64(b64(ID.encode()).encode())}", "text/plain",
                             "body:offset 2 / base64 / offset 0 / base64 / offset 0"),
    }
    for name, (body, content_type, location) in cases.items():
        result = outbound.scan(body.encode(), content_type=content_type)
        assert result.action == "block", name
        assert location in id_findings(result), (name, id_findings(result))


def test_noise_that_is_also_base64_is_left_alone(rules):
    """Hashes, UUIDs, binary payloads and long words decode to bytes no scanner can read: not scanned,
    no finding, no uninspectable problem."""
    outbound = rules.profile("outbound")
    rng = random.Random(3)
    values = [hashlib.sha256(bytes([i])).hexdigest() for i in range(50)] + [uuid.UUID(int=rng.getrandbits(128)).hex
                                                                              for _ in range(50)]
    values += [b64(rng.randbytes(300)), b64(b"\x89PNG\r\n\x1a\n" + rng.randbytes(2000)), "Supercalifragilisticexpialidocious"]
    result = outbound.scan(json.dumps({"values": values}).encode(), content_type="application/json")
    assert result.action is None and result.findings == []
    assert not readable(rng.randbytes(300)) and not readable(b"\x89PNG\r\n\x1a\n" + rng.randbytes(64))


def test_runs_alphabets_and_wrapping():
    assert decode_run(base64.urlsafe_b64encode(b"\xfb\xff" * 12)) == b"\xfb\xff" * 12
    assert decode_run(b"ab+c-d_e" * 3) is None  # both alphabets mixed
    assert decode_run(b"a" * 17) is None  # one character too many for any byte count
    wrapped = base64.encodebytes(TABLE * 4)
    assert [(s, e) for s, e in base64_runs(b"x\n" + wrapped)] == [(2, 2 + len(wrapped.rstrip(b"\n")))]
    lines = b"A" * MIN_RUN + b"\n" + b"B" * (MIN_RUN + 3) + b"\nshort\n"  # unequal lines: runs of their own
    assert list(base64_runs(lines)) == [(0, MIN_RUN), (MIN_RUN + 1, 2 * MIN_RUN + 4)]
    assert list(base64_runs(b"A" * (MIN_RUN - 1))) == []
    assert [c.content for c in encoded_contents(b"[" + b64(TABLE).encode() + b"]")] == [TABLE]


def _runs_one_by_one(data: bytes) -> list[tuple[int, int]]:
    """base64_runs as it was written before its numpy pass: every run start found by a regex, then read."""
    runs, searched_to = [], 0
    for start in (m.start() for m in re.finditer(rb"(?<![A-Za-z0-9+/_-])[A-Za-z0-9+/_-]{%d}" % MIN_RUN, data)):
        if start < searched_to:
            continue
        match = embedded._RUN.match(data, start)
        searched_to, run = match.end(), match.group()
        pieces = [(start, searched_to)] if b"\n" not in run else list(embedded._pieces(run, start))
        runs += [(s, e) for s, e in pieces if embedded._mostly_letters(data[s:e])]
    return runs


# numpy for every text (after the Hyperscan pass that tells whether a run may be worth reading), or the
# regex for every text
@pytest.mark.parametrize("numpy_from", [0, 1 << 40])
def test_runs_found_at_once_are_those_found_one_by_one(monkeypatch, numpy_from):
    monkeypatch.setattr(embedded, "_RUNS_PIECE", 64)  # many pieces, cut at every place they can be
    monkeypatch.setattr(embedded, "_NUMPY_RUNS_FROM", numpy_from)
    rng = random.Random(18)
    pieces = [ID, "13800138000", b64(TABLE), base64.encodebytes(TABLE * 3).decode(), "=", "==", "\n", "\r\n", " ",
              ",", '"', "号", "A" * MIN_RUN, "a1" * 9, "a1" * 8, "9" * 20, "-_", "+/", "Zm9vYmFy"]
    for _ in range(2000):
        data = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 14))).encode()
        assert list(base64_runs(data)) == _runs_one_by_one(data), data


def test_a_wrapped_run_is_read_though_none_of_its_lines_holds_half_a_run_of_letters(monkeypatch):
    """The Hyperscan pass before numpy's lets a run through when it goes on past its line, whatever its
    letters: wrapped, these lines of 7 letters each are mostly letters."""
    monkeypatch.setattr(embedded, "_NUMPY_RUNS_FROM", 0)
    data = b"x " + b"0" * 9 + b"a" * 7 + b"\n" + b"a" * 7 + b" y"
    assert list(base64_runs(data)) == _runs_one_by_one(data) == [(2, 26)]


def test_runs_longer_than_16_bits_count_are_told_right():
    """Letters are counted in 16 bits (by numpy) while every run is short enough; a run of 40,000 is not."""
    for run, expected in ((b"9" * 30_000 + b"A" * 10_000, False), (b"9" * 19_000 + b"A" * 21_000, True)):
        data = b"x, " + run + b" ,y"
        assert (list(base64_runs(data)) == [(3, 40_003)]) is expected == (_runs_one_by_one(data) == [(3, 40_003)])


def test_too_deep_nesting_is_uninspectable(rules):
    hidden = ID.encode()
    for _ in range(8):
        hidden = base64.b64encode(hidden)
    result = rules.profile("outbound").scan(hidden, content_type="text/plain")
    assert result.action == "block" and [f.type for f in result.findings] == ["uninspectable"]
    assert "nesting deeper" in result.findings[0].value


def test_heads_hide_nothing_either(rules):
    outbound = rules.profile("outbound")
    token = base64.urlsafe_b64encode(json.dumps({"holder": ID}).encode()).decode()
    result = outbound.scan_head(f"/api?q={token}", [("X-Claims", token)], direction="request")
    assert id_findings(result) == ["header:X-Claims / base64 / $.holder", "query:q / base64 / $.holder"]
    clean = b64(os.urandom(64))
    assert outbound.scan_head(f"/api?q={clean}", [("Cookie", f"s={clean}")], direction="request").action is None


@pytest.mark.parametrize("hide", [lambda text: b64(text.encode()),
                                  lambda text: "".join(f"%{byte:02X}" for byte in text.encode())],
                         ids=["base64", "percent-encoded"])
def test_a_value_to_redact_inside_encoded_text_cannot_be_redacted(rules, hide):
    inbound = rules.profile("inbound")
    body = f"card {CARD} and hidden {hide(f'card {CARD}')}".encode()
    result = inbound.scan(body, content_type="text/plain", direction="response")
    assert result.action == "redact"
    with pytest.raises(DecodeError, match="cannot be rewritten"):
        inbound.redact(body, content_type="text/plain", result=result)
    plain = f"card {CARD} ok".encode()  # where it can be rewritten it still is
    masked = inbound.redact(plain, content_type="text/plain",
                            result=inbound.scan(plain, content_type="text/plain", direction="response"))
    assert CARD.encode() not in masked and masked.startswith(b"card ")


def streaming_profile(tmp_path):
    """ID numbers blocked; every body streamed in windows (nothing is buffered for a whole scan)."""
    (tmp_path / "s.yaml").write_text(f"""
rules:
  - {{id: ids, detectors: [cn_id_card], action: block, examples: {{match: ["{ID}"]}}}}
profiles:
  s: {{rules: [ids], uninspectable: block, limits: {{stream_buffer_bytes: 1}}}}
""")
    return load_rules(tmp_path / "s.yaml").profile("s")


def _streamed(profile, body: bytes, content_type: str = "text/plain"):
    scan = profile.stream(content_type=content_type)
    for i in range(0, len(body), 3000):
        scan.feed(body[i:i + 3000])
    return scan.finish()


def test_streams_find_base64_across_windows_and_let_long_binary_runs_go(rules, tmp_path, monkeypatch):
    monkeypatch.setattr(stream_module, "WINDOW_BYTES", 8192)
    profile = streaming_profile(tmp_path)
    filler = "普通文本 " * 1500  # 24 KB: the hidden runs fall across window boundaries
    hidden = [b64(("无关内容 " * n).encode() + f"{ID}".encode()) for n in (10, 300, 450)]
    result = _streamed(profile, (filler + " " + " ".join(f"{h} {filler}" for h in hidden)).encode())
    assert result.action == "block" and len(id_findings(result)) == 3, result.findings
    assert all(" / base64 / " in location for location in id_findings(result))
    rng = random.Random(9)
    image = b64(b"\x89PNG\r\n\x1a\n" + rng.randbytes(30000))  # longer than a window, binary: passes
    assert _streamed(profile, f"{filler} {image} {filler}".encode()).action is None
    long_text = b64(("无关内容 " * 3000).encode())  # longer than a window, text: cannot be held
    result = _streamed(profile, f"{filler} {long_text} {filler}".encode())
    assert result.action == "block" and [f.type for f in result.findings] == ["uninspectable"]


def test_base64_in_streams_counts_against_the_detection_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(stream_module, "WINDOW_BYTES", 8192)
    monkeypatch.setattr(stream_module, "MAX_STREAM_DETECTIONS", 2)
    profile = streaming_profile(tmp_path)
    hidden = " ".join(b64(f"无关内容 {ID} {n}".encode()) for n in range(5))  # five detections, all as base64
    result = _streamed(profile, f"{'普通文本 ' * 3000} {hidden} {'普通文本 ' * 3000}".encode())
    assert "too many candidate matches in the stream" in [f.value for f in result.findings]
    assert sum(f.type == "cn_id_card" for f in result.findings) <= 2


def test_runs_in_large_texts_are_found_from_the_first():
    """Past 64 KiB a Hyperscan pass finds where the first run starts, and numpy reads from there."""
    prose = "无敏感内容的普通文本，编号2025。".encode() * 5000
    assert list(base64_runs(prose)) == []
    encoded = b64(TABLE).encode()
    text = prose + b" " + encoded + b" " + prose + b"[" + encoded + b"]"
    assert list(base64_runs(text)) == _runs_one_by_one(text) == [
        (len(prose) + 1, len(prose) + 1 + len(encoded)), (len(text) - 1 - len(encoded), len(text) - 1)]
