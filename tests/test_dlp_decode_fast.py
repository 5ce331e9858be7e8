"""Decoding's fast paths find what the slow paths find: JSON without backslash escapes is scanned as
received (no str of it, no parse) and its keys found by numpy (decode._json_keys); texts with an escape,
in another charset or labelled otherwise take the slow paths; gzip is undone by ISA-L, and what it
cannot read is undone (or refused) by zlib."""

import gzip
import json
import random
import re
import zlib
from pathlib import Path

import pytest

from gateway.dlp import decode, load_rules, stream
from gateway.dlp.coding import DecodeError, charset_and_text, decode_as, inflate, utf8_of_gbk
from gateway.dlp.decode import Limits, decode_body
from gateway.dlp.native import kernels

SHIPPED = Path(__file__).resolve().parent.parent / "config" / "dlp"
ID = "11010519491231002X"  # valid check character
MOBILE = "13800138000"


def _keys_by_splitting(text: str) -> dict[str, None]:
    """The keys as the parse-free reading defines them: at each '":' (a regex when spaces may come
    before the colon)."""
    if re.search(r'"\s+:', text):
        return dict.fromkeys(re.findall(r'"([^"]*)"\s*:', text))
    return dict.fromkeys(piece[piece.rfind('"') + 1:] for piece in text.split('":')[:-1])


def test_spaces_are_those_str_regexes_match():
    assert set(decode._SPACES) == {chr(c) for c in range(0x110000) if re.match(r"\s", chr(c))}


@pytest.mark.parametrize("found_by", ["kernels", "numpy"])
def test_json_keys_as_splitting_finds_them(monkeypatch, found_by):
    if found_by == "kernels" and kernels is None:
        pytest.skip("the C kernels are not compiled here (no compiler at install)")
    if found_by == "numpy":
        monkeypatch.setattr(decode, "kernels", None)
    rng = random.Random(18)
    keys = ["xm", "sfzh", "身份证号", "", "k" * 15, "k" * 16, "k" * 17, "a" * 40 + "身", "x\u3000", "\x00"]
    pieces = ['"', '":', '" :', '"\u3000:', '"\n:', ",", "{", "}", "[", "]", "值", " ", ":", "1"]
    for _ in range(300):
        text = "".join(rng.choice(pieces + [f'"{rng.choice(keys)}":'] * 4) for _ in range(rng.randint(0, 60)))
        assert list(decode._json_keys(text.encode())[0]) == list(_keys_by_splitting(text)), text
    records = [{rng.choice(keys[:-1]): i, "sfzh": ID} for i in range(3000)]  # many keys, several sorts
    for text in (json.dumps(records, ensure_ascii=False), json.dumps(records, ensure_ascii=False, indent=1)):
        assert list(decode._json_keys(text.encode())[0]) == list(_keys_by_splitting(text)) \
            == list(dict.fromkeys(key for record in records for key in record))
    distinct = [{f"字段{i}": i, "sfzh": ID} for i in range(700)]  # many keys: the set of them grows
    text = json.dumps(distinct, ensure_ascii=False)
    assert list(decode._json_keys(text.encode())[0]) == ["字段0", "sfzh"] + [f"字段{i}" for i in range(1, 700)]


def _found(body: bytes, content_type: str) -> list[tuple[str, str, str | None, str]]:
    result = load_rules(SHIPPED).profile("outbound").scan(body, content_type=content_type)
    return sorted((f.type, f.value, f.field, f.location) for f in result.findings)


def test_unescaped_json_is_read_as_the_parsed_one():
    records = [{"姓名": "张三", "sfzh": ID, "备注": f"手机：{MOBILE}，证件（{ID}）"} for _ in range(50)]
    unescaped = json.dumps(records, ensure_ascii=False).encode()
    escaped = json.dumps(records).encode()  # \u escapes everywhere: parsed, value by value
    decoded = decode_body(unescaped, "application/json", None, Limits())
    assert len(decoded.segments) == 1 and decode._as_written(decoded.segments[0]) == unescaped  # as received
    parsed = decode_body(escaped, "application/json", None, Limits())
    assert [name for _, name in decoded.fields] == [name for _, name in parsed.fields] == ["姓名", "sfzh", "备注"]
    found, parsed_found = _found(unescaped, "application/json"), _found(escaped, "application/json")
    assert [f[:3] for f in found] == [f[:3] for f in parsed_found]  # a key's location is told differently
    assert [f for f in found if f[0] != "id_card_field"] == [f for f in parsed_found if f[0] != "id_card_field"]
    assert ("cn_id_card", ID, "sfzh", "body:$[49].sfzh") in found
    assert ("cn_mobile", MOBILE, "备注", "body:$[0].备注") in found
    assert sum(kind == "id_card_field" for kind, *_ in found) == 1  # the key "sfzh", once


def test_escaped_ids_and_full_width_digits_in_json_are_found():
    hidden = "".join(f"\\u{ord(c):04x}" for c in ID)
    body = ('[{"a": "' + hidden + '"}, {"b": "' + "".join(chr(ord(c) + 0xFEE0) for c in ID) + '"}]').encode()
    found = _found(body, "application/json")
    assert [(kind, field) for kind, _, field, _ in found if kind == "cn_id_card"] == [("cn_id_card", "a"),
                                                                                     ("cn_id_card", "b")]
    padded = json.dumps([{"b": "说明，" * 2000 + "１３８００１３８０００"}], ensure_ascii=False).encode()  # numpy folds it
    assert ("cn_mobile", "１３８００１３８０００", "b", "body:$[0].b") in _found(padded, "application/json")


def test_json_in_another_charset_or_badly_encoded():
    records = [{"sfzh": ID, "住址": "北京市（朝阳区）"}] * 20
    text = json.dumps(records, ensure_ascii=False)
    assert _found(text.encode("gbk"), "application/json; charset=gbk") == _found(text.encode(), "application/json")
    bad = text.encode()[:-3] + b"\xff]"
    assert [kind for kind, *_ in _found(bad, "application/json; charset=utf-8")] == ["uninspectable"]


def test_gbk_csv_with_an_id_number():
    body = ("姓名,身份证号,手机\n" + f"张三,{ID},１３８００１３８０００\n" * 200).encode("gbk")
    found = _found(body, "text/csv; charset=gbk")
    assert ("cn_id_card", ID, "身份证号", "body:csv row 201 column 身份证号") in found
    assert ("cn_mobile", "１３８００１３８０００", "手机", "body:csv row 2 column 手机") in found


def test_gzip_by_isal_reads_and_refuses_as_zlib_does():
    """gzip Content-Encoding is undone by ISA-L (coding.inflate); what zlib refuses is refused with
    zlib's words, a member with reserved header flags included (ISA-L would read it)."""
    text = ("姓名,身份证号\n" + f"张三,{ID}\n" * 2000).encode()
    members = gzip.compress(text[:5000]) + gzip.compress(text[5000:])
    assert inflate(members, "gzip", 1 << 30, 1000) == text == gzip.decompress(members)
    flagged = bytearray(gzip.compress(text))
    flagged[3] |= 0x20
    corrupt = gzip.compress(text)[:40] + b"\xff" * 40 + gzip.compress(text)[80:]
    for bad in (bytes(flagged), corrupt):
        with pytest.raises(zlib.error) as by_zlib:
            zlib.decompressobj(31).decompress(bad)
        with pytest.raises(DecodeError, match=re.escape(f"corrupt gzip data: {by_zlib.value}")):
            inflate(bad, "gzip", 1 << 30, 1000)
    assert ("cn_id_card", ID, "身份证号", "body:csv row 1000 column 身份证号") in \
        _found_encoded(members, "text/csv; charset=utf-8", "gzip")


def _found_encoded(body: bytes, content_type: str, encoding: str) -> list[tuple[str, str, str | None, str]]:
    result = load_rules(SHIPPED).profile("outbound").scan(body, content_type=content_type, content_encoding=encoding)
    return sorted((f.type, f.value, f.field, f.location) for f in result.findings)


def test_undeclared_gbk_is_decoded_once_and_read_alike():
    """Sniffing tells GB18030 by decoding all of it: that text is the one scanned (coding.charset_and_text)."""
    text = "姓名,身份证号,手机\n" + f"张三,{ID},１３８００１３８０００\n" * 200
    assert charset_and_text(text.encode("gbk"), None) == ("gb18030", text)
    assert charset_and_text(text.encode("gbk"), "gbk") == ("gb18030", None)  # declared: decoded by the caller
    assert charset_and_text(text.encode(), None) == ("utf-8", None)
    assert _found(text.encode("gbk"), "text/csv") == _found(text.encode("gbk"), "text/csv; charset=gbk")


def test_gb18030_is_read_by_the_gbk_codec_where_that_reads_it_alike():
    """GBK's codec, quicker, reads GB 18030 text without four-byte forms (coding.decode_as): every form it
    takes is read as GB 18030's codec reads it, and text with a form GBK lacks, declared or sniffed, is
    read whole by GB 18030's codec."""
    forms = [bytes([byte]) for byte in range(0x80)]
    forms += [bytes([lead, trail]) for lead in range(0x81, 0xFF) for trail in range(0x40, 0x100)]
    gbk_reads = 0
    for form in forms:
        try:
            read = form.decode("gbk")
        except UnicodeDecodeError:
            continue
        gbk_reads += 1
        assert read == form.decode("gb18030") == decode_as(form, "gb18030"), form.hex()
    assert gbk_reads == 128 + 21791
    text = f"姓名,身份证号\n张𠀀,{ID}\n王€,{ID}\n"  # forms GBK lacks: U+20000 (four bytes), the euro sign
    encoded = text.encode("gb18030")
    with pytest.raises(UnicodeDecodeError):
        encoded.decode("gbk")
    assert decode_as(encoded, "gb18030") == text
    assert charset_and_text(encoded, None) == ("gb18030", text)
    assert ("cn_id_card", ID, "身份证号", "body:csv row 2 column 身份证号") in _found(encoded, "text/csv; charset=gbk")
    with pytest.raises(DecodeError, match="not valid gb18030"):
        decode_as(encoded[:-4] + b"\x81\x30", "gb18030")


@pytest.mark.skipif(kernels is None, reason="the C kernels are not compiled here (no compiler at install)")
def test_gbk_converted_in_c_is_what_the_codec_reads():
    """coding.utf8_of_gbk (C, no str between) gives for every two-byte form, and for text mixing them with
    ASCII, the UTF-8 of what Python's GBK codec reads; anything else (a form GBK lacks, a cut form, a
    four-byte GB 18030 form) is left to the codec: None. A GBK CSV, a CSV with a four-byte form and a GBK
    JSON are read alike either way."""
    forms = [bytes([lead, trail]) for lead in range(0x81, 0xFF) for trail in range(0x40, 0x100)]
    taken = 0
    for form in forms:
        try:
            expected = form.decode("gbk").encode()
        except UnicodeDecodeError:
            expected = None
        assert utf8_of_gbk(form) == expected, form.hex()
        taken += expected is not None
    assert taken > 20000
    rng = random.Random(6)
    readable = [form for form in forms if utf8_of_gbk(form) is not None] + [bytes([byte]) for byte in range(0x80)]
    text = b"".join(rng.choice(readable) for _ in range(50000))
    assert utf8_of_gbk(text) == text.decode("gbk").encode()
    for unread in (b"a\x80b", b"ab\x81", "€".encode("gb18030"), "𠀀".encode("gb18030"), b"\xff\xfe"):
        assert utf8_of_gbk(b"ok" + unread) is None, unread
    body = ("姓名,身份证号\n" + f"张三,{ID}\n" * 300).encode("gbk")
    assert ("cn_id_card", ID, "身份证号", "body:csv row 300 column 身份证号") in _found(body, "text/csv; charset=gbk")
    four_byte = body + "李𠀀,\n".encode("gb18030")  # read by GB 18030's codec: still every row
    assert _found(four_byte, "text/csv; charset=gbk") == _found(body, "text/csv; charset=gbk")
    assert [kind for kind, *_ in _found(body + b"\xff\n", "text/csv; charset=gbk")] == ["uninspectable"]
    records = json.dumps([{"sfzh": ID, "住址": "北京市（朝阳区）"}] * 20, ensure_ascii=False)
    assert _found(records.encode("gbk"), "application/json; charset=gbk") == _found(records.encode(), "application/json")


@pytest.mark.skipif(kernels is None, reason="the C kernels are not compiled here (no compiler at install)")
def test_json_keys_tell_whether_an_object_names_a_key_twice():
    """What lets a locator tell equal values apart by their strings (decode._JsonLocator.cells): no object
    naming a key twice and brackets that match; anything else, or too many keys to compare, says no."""
    many = "{" + ",".join(f'"k{i}":{i}' for i in range(80)) + "}"
    for text, unique in (('{"a":1,"b":2}', True), ('[{"a":1},{"a":1}]', True), ('{"a":{"a":1},"b":[{"a":2}]}', True),
                         ('{"a":"{[","b":"}"}', True), ('{"a":1,"a":2}', False), ('[{"a":1,"b":{"c":1},"a":3}]', False),
                         ('{"a":1}}', False), ('{"a":[1}', False), ('{"a":1', False), ('"x":1', False),
                         ('[1,2]]', False), (many, False)):
        assert decode._json_keys(text.encode())[1] is unique, text
        assert decode.kernels.json_keys(text.encode(), decode._SPACE_FIRST_FLAGS)[1] is unique, text


@pytest.mark.parametrize("charset", ["utf-8", "gbk"])
def test_a_stream_reads_utf8_and_gbk_without_the_codec_as_the_codec_does(monkeypatch, charset):
    """A streamed UTF-8 or GBK body goes into the scan window without a str between (GBK converted in C, a
    line at a time), until a piece it cannot read so (a GB 18030 four-byte form, bytes that are not
    UTF-8): then the codec reads the rest. Either way the same findings, at the same offsets."""
    if charset == "gbk" and kernels is None:
        pytest.skip("the C kernels are not compiled here (no compiler at install): GBK is read by the codec")
    lines = [f"{i},张三{i},{ID if i % 3 else MOBILE},和平里{i}号（东）\n" for i in range(3000)]
    lines[2700] = f"2700,𠀀某,\\u0031\\u0031{ID[2:]},&#49;{MOBILE[1:]}\n"  # a four-byte form; escapes to undo
    body = "".join(lines).encode("gb18030" if charset == "gbk" else charset)
    profile = load_rules(SHIPPED).profile("outbound")

    def streamed() -> list[tuple]:
        scan = profile.stream(content_type=f"text/plain; charset={charset}", buffer_bytes=0, keep=10_000)
        for at in range(0, len(body), 4093):  # pieces that cut characters and lines
            scan.feed(body[at:at + 4093])
        return sorted((f.type, f.value, f.location) for f in scan.finish().findings)

    read = []  # pieces made UTF-8 without the codec
    for name in ("_utf8_part", "_gbk_part"):
        monkeypatch.setattr(stream, name, lambda data, final, part=getattr(stream, name):
                            (lambda made: read.append(made[0] is not None) or made)(part(data, final)))
    fast = streamed()
    assert read.count(True) > 5, read  # the pieces before the four-byte form (GBK), all of them (UTF-8)
    monkeypatch.setattr(stream, "_utf8_part", lambda data, final: (None, b""))
    monkeypatch.setattr(stream, "_gbk_part", lambda data, final: (None, b""))
    assert fast == streamed() and len(fast) >= 3000
    start = len("".join(lines[:2700]).encode())  # offsets in the text as decoded (UTF-8)
    escaped_line = [(t, v) for t, v, location in fast
                    if start <= int(location.split()[-1]) < start + len(lines[2700].encode())]
    assert ("cn_id_card", ID) in escaped_line and ("cn_mobile", MOBILE) in escaped_line
