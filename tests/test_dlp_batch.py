"""Bulk paths say what their one-at-a-time references say: the batch checks (gateway/dlp/batch.py) what
the detectors' own checks say value by value (validators.py is the reference), on random tokens and on
tokens crafted to pass every check but one; a JSON locator jumping far ahead what its replay says; the
rules over a bulk export's detections held as columns what they say over the same detections made one
by one (gateway/dlp/detections.py)."""

from __future__ import annotations

import dataclasses
import json
import random
from collections import Counter
from datetime import date

import numpy as np
import pytest

from gateway.dlp import batch, decode, load_rules
from gateway.dlp import detections as detections_module
from gateway.dlp.decode import decode_body
from gateway.dlp.detections import Detections
from gateway.dlp.detectors import DETECTORS, masks_of
from gateway.dlp.engine import Finding, made_findings
from gateway.dlp.validators import USCC_CHARS, id_card_check_char, luhn_valid, org_code_check_char, uscc_check_char

RNG = random.Random(1118)


def _digits(count: int) -> str:
    return "".join(RNG.choice("0123456789") for _ in range(count))


def _id_numbers() -> list[str]:
    tokens = []
    for _ in range(4000):
        region = RNG.choice(["11", "31", "44", "65", "71", "83", "10", "20", "99", "00"]) + _digits(4)
        year = RNG.choice([1899, 1900, 1948, 1980, 2000, 2004, 2020, date.today().year, date.today().year + 1, 2100])
        month, day = RNG.randint(0, 13), RNG.randint(0, 32)
        if RNG.random() < 0.3:
            month, day = 2, RNG.choice([28, 29, 30])
        first17 = f"{region}{year:04d}{month:02d}{day:02d}{_digits(3)}"
        check = id_card_check_char(first17)
        last = RNG.choice([check, check.lower(), RNG.choice("0123456789Xx")])
        tokens.append(first17 + last)
    today = date.today()
    tokens.append("110105" + today.strftime("%Y%m%d") + "001")
    tokens[-1] += id_card_check_char(tokens[-1])
    tokens += ["11010519491231002X", "110105194912310021", "11010519800229001" + id_card_check_char("11010519800229001"),
               "11010520000229001" + id_card_check_char("11010520000229001"), "1101051980021500" + "1X",
               "A10105194912310021", "11010519491231002Y", "110105 19491231 002X"[:18]]
    tokens += ["".join(RNG.choice("0123456789Xx -") for _ in range(18)) for _ in range(500)]
    return tokens


def _uscc_codes() -> list[str]:
    tokens = []
    for _ in range(4000):
        head = RNG.choice("123456789ANY0Z") + RNG.choice("123456789") + RNG.choice(["11", "31", "44", "10", "99"]) \
               + _digits(4)
        org = "".join(RNG.choice(USCC_CHARS if RNG.random() < 0.3 else "0123456789") for _ in range(8))
        org_check = org_code_check_char(org) if RNG.random() < 0.8 else RNG.choice("0123456789X")
        first17 = head + org + org_check
        last = uscc_check_char(first17) if RNG.random() < 0.8 and all(c in USCC_CHARS for c in first17) \
            else RNG.choice(USCC_CHARS + "IOZSV")
        tokens.append(first17 + last)
    return tokens


def _mobiles() -> list[str]:
    tokens = [RNG.choice(["13", "14", "15", "16", "17", "19", "10", "12", "00", "18"]) + _digits(9) for _ in range(3000)]
    tokens += ["138 0013 8000", "138-0013-8000", "+86 13800138000", "008613800138000", "138 0013-8000", "1380013800X"]
    return tokens


def _cards() -> list[str]:
    tokens = []
    for _ in range(4000):
        prefix = RNG.choice(["62", "81", "4", "51", "55", "2221", "2720", "2721", "34", "37", "6011", "644", "649",
                             "65", "3528", "3589", "36", "300", "305", "38", "39", "2200", "2204", "2205", "1", "99"])
        length = RNG.randint(14, 20)
        body = prefix + _digits(max(length - len(prefix) - 1, 0))
        last = next(d for d in "0123456789" if luhn_valid(body + d)) if RNG.random() < 0.7 else RNG.choice("0123456789")
        tokens.append(body + last)
    tokens += ["6228 4800 0000 0000 0", "4111-1111-1111-1111", "4111 1111-1111 1111"]
    return tokens


@pytest.mark.parametrize("name,tokens", [("cn_id_card", _id_numbers()), ("cn_uscc", _uscc_codes()),
                                        ("cn_mobile", _mobiles()), ("bank_card", _cards()),
                                        ("email", ["a@b.cn", "x@y.png", "-@-.com"])])
@pytest.mark.parametrize("checks", ["numpy", "kernels"])
def test_batch_checks_agree_with_the_detectors_own(name, tokens, checks, monkeypatch):
    if checks == "kernels" and batch.KERNEL_TABLES is None:
        pytest.skip("the C kernels are not compiled here (no compiler at install)")
    monkeypatch.setattr(batch, "_BATCH", batch.NUMPY_CHECKS if checks == "numpy" else batch.KERNEL_CHECKS)
    data = b"\n".join(token.encode() for token in tokens)
    starts, at = [], 0
    for token in tokens:
        starts.append(at)
        at += len(token.encode()) + 1
    starts_array = np.array(starts, dtype=np.int64)
    ends_array = starts_array + np.array([len(token.encode()) for token in tokens], dtype=np.int64)
    expected = [DETECTORS[name].valid(token) for token in tokens]
    assert batch.valid(name, data, starts_array, ends_array).tolist() == expected
    # both answers are well represented: the crafted tokens pass and fail
    assert 0.02 < sum(expected) / len(expected) < 0.98, sum(expected)


def _json_texts() -> list[bytes]:
    rng = random.Random(18)

    def value(depth: int) -> object:
        roll = rng.random()
        if depth < 4 and roll < 0.25:
            return [value(depth + 1) for _ in range(rng.randint(0, 4))]
        if depth < 4 and roll < 0.5:
            return {rng.choice(["sfzh", "a b", "键", "x", "x"]): value(depth + 1) for _ in range(rng.randint(0, 4))}
        return rng.choice(["110105194912310021", "[{,:}]" * rng.randint(1, 30), "文本，", 7, None])

    texts = [json.dumps([value(0) for _ in range(20_000)], ensure_ascii=False).encode()]  # made in several steps
    texts.append(texts[0][:-1] + b"]]" + texts[0][1:])  # a closing bracket too many in the middle
    return texts


@pytest.mark.parametrize("text", _json_texts(), ids=["nested", "a bracket too many"])
def test_a_json_locator_jumping_far_ahead_says_what_its_replay_says(text, monkeypatch):
    """Locating a finding past thousands of brackets takes the replay's state at once (in C)."""
    offsets = sorted(random.Random(5).sample(range(len(text)), 300))
    monkeypatch.setattr(decode, "_REPLAYED_BRACKETS", 8)  # jump at every chance
    jumping = decode._JsonLocator(text, "body")
    located = [jumping(offset) for offset in offsets]
    assert jumping._arrays is not None  # it did jump
    monkeypatch.setattr(decode, "_REPLAYED_BRACKETS", 1 << 40)
    replaying = decode._JsonLocator(text, "body")
    assert located == [replaying(offset) for offset in offsets]
    assert replaying._arrays is None


@pytest.mark.parametrize("text", [*_json_texts(), b'{"a": 1, "b": {"c": [1, {"d": "x"}]}, "e" : 2}', b'[1, 2, 3]',
                                  b'{"k": [[]], "": {"": "v"}, "\\u00e9": {"x:y": 1}}'],
                         ids=["nested", "a bracket too many", "small", "flat", "odd keys"])
def test_a_json_locator_placing_many_offsets_at_once_says_what_it_says_of_each(text):
    """The findings a scan keeps are located in one pass (many), as each would be on its own."""
    rng = random.Random(len(text))
    for offsets in (sorted(rng.sample(range(len(text)), min(300, len(text)))),  # every kind of place, in order
                    sorted(rng.sample(range(min(len(text), 5000)), min(40, len(text))))):  # the first part only made
        assert decode._JsonLocator(text, "body").many(offsets) == list(map(decode._JsonLocator(text, "body"), offsets))


def test_a_csv_locator_placing_many_offsets_at_once_says_what_it_says_of_each():
    rng = random.Random(7)
    rows = [",".join(rng.choice(["1", '"a,b"', '"x\ny"', "", "张三", '"q""q"']) for _ in range(rng.randint(1, 6)))
            for _ in range(3000)]
    text = ("sfzh,,name\n" + "\n".join(rows)).encode()
    offsets = sorted(rng.sample(range(len(text)), 500))
    assert decode._CsvLocator(text, b",", ["sfzh", "", "name"], "body").many(offsets) == \
        list(map(decode._CsvLocator(text, b",", ["sfzh", "", "name"], "body"), offsets))


@pytest.mark.parametrize("made_by", ["kernels", "numpy"])
def test_a_structure_made_in_steps_is_the_text_with_its_strings_blanked(monkeypatch, made_by):
    if made_by == "kernels" and decode.kernels is None:
        pytest.skip("the C kernels are not compiled here (no compiler at install)")
    if made_by == "numpy":
        monkeypatch.setattr(decode, "kernels", None)
    text = _json_texts()[0]
    pieces = text.split(b'"')
    pieces[1::2] = [b" " * len(piece) for piece in pieces[1::2]]
    expected = b'"'.join(pieces)
    structure = decode._Structure(text, b"[]{}")
    for offset in sorted(random.Random(9).sample(range(len(text)), 50)) + [len(text) - 1]:
        structure.through(offset)
    assert bytes(structure.blanked) == expected and len(expected) > 4 << 16  # made in several steps
    assert structure.brackets == [at for at, byte in enumerate(expected) if byte in b"[]{}"]


def test_a_prefix_xor_over_packed_bits_is_the_accumulated_xor_across_every_byte_edge():
    """The structure's strings are told by xor over bits packed eight to a byte: a quote's state
    carries across each byte, and lengths need not be whole bytes."""
    rng = np.random.default_rng(18)
    for length in [*range(1, 41), 4095, 4096, 4097, 65_539]:
        for density in (0.02, 0.5, 0.98):
            bits = (rng.random(length) < density).astype(np.uint8)
            assert (decode._prefix_xor(bits) == np.bitwise_xor.accumulate(bits)).all(), (length, density)


def _export(count: int, *, repeats: bool, full_width: bool, extras: bool) -> list[dict]:
    rng = random.Random(count)
    records = []
    for index in range(count):
        first17 = f"{rng.choice(['110105', '310104', '440305'])}{rng.randint(1940, 2010)}" \
                  f"{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}{rng.randint(0, 999):03d}"
        record = {"xm": "张三", "sfzh": first17 + id_card_check_char(first17),
                  "sjhm": rng.choice(["138", "139", "186"]) + f"{rng.randint(0, 99_999_999):08d}", "dz": "上海市，1号"}
        if full_width and index % 7 == 0:  # folded: the value as written differs from the token
            record["sfzh"] = record["sfzh"].translate({ord(c): ord(c) + 0xFEE0 for c in "0123456789"})
        if extras and index % 5 == 0:
            record["yhkh"] = "6228480012345671"
            record["email"] = f"u{index}@example.cn"
            record[record["sjhm"]] = "a key that is a mobile number (masked in locations)"
        records.append(record)
    if repeats:  # values found twice, at the same place and elsewhere
        records += records[: count // 3]
    return records


def _body(records: list[dict], as_csv: bool) -> tuple[bytes, str]:
    """The records as a CSV export (a column per key seen) or a JSON array, and its content type."""
    if as_csv:
        columns = list(dict.fromkeys(key for record in records for key in record))
        body = "\n".join([",".join(columns)] + [",".join(record.get(c, "") for c in columns) for record in records])
        return body.encode(), "text/csv"
    return json.dumps(records, ensure_ascii=False).encode(), "application/json"


RULES = f"""
rules:
  - {{id: ids, detectors: [cn_id_card], action: block, examples: {{match: ["11010519491231002X"]}}}}
  - {{id: ids-but-one, detectors: [cn_id_card], action: warn, exceptions: {{values: ["{{allowed}}"]}},
     examples: {{match: ["11010519491231002X"]}}}}
  - {{id: mobiles-in-sjhm, detectors: [cn_mobile], fields: [sjhm], action: audit, examples: {{match: ['{{"sjhm": "13800138000"}}']}}}}
  - {{id: many-mobiles, detectors: [cn_mobile], min_count: 50, action: block, examples: {{match: ["13800138000"]}}, }}
  - {{id: contacts, detectors: [cn_mobile, email, bank_card], field_names: [sjhm], action: redact,
     examples: {{match: ["13800138000"]}}}}
profiles:
  small: {{rules: [ids, ids-but-one, mobiles-in-sjhm, many-mobiles, contacts], limits: {{max_findings: 37}}}}
  wide: {{rules: [contacts, ids, many-mobiles], limits: {{max_findings: 5000}}}}
"""


@pytest.mark.parametrize("count,repeats,full_width,extras", [(400, False, False, False), (400, True, False, True),
                                                             (300, True, True, True), (40, False, True, False)])
@pytest.mark.parametrize("as_csv", [False, True])
def test_rules_over_columns_say_what_they_say_over_detection_objects(tmp_path, count, repeats, full_width, extras,
                                                                     as_csv):
    records = _export(count, repeats=repeats, full_width=full_width, extras=extras)
    (tmp_path / "r.yaml").write_text(RULES.replace("{allowed}", records[1]["sfzh"]))
    body, content_type = _body(records, as_csv)
    for name in ("small", "wide"):
        profile = load_rules(tmp_path / "r.yaml").profile(name)
        decoded = decode_body(body, content_type, None, profile.limits)
        detections, problems = profile.detect_all(decoded, "body")
        assert isinstance(detections, Detections) and detections.bulk > count  # the columns were used
        # the same detections made one by one: a second (empty) text takes detect() off the columns' path
        made, _ = profile.detect([*decoded.segments, decode.text_segment("", "elsewhere")])
        made += profile.field_detections(decoded.fields)
        assert not isinstance(made, Detections) and list(detections) == made
        for direction in ("request", "response"):
            columns = profile.apply_rules(detections, problems, direction, None)
            objects = profile.apply_rules(made, problems, direction, None)
            assert columns.findings == objects.findings and columns.groups == objects.groups
            assert columns.replacements == objects.replacements and columns.action == objects.action
            assert columns.findings and columns.replacements  # both said something to compare
        values = detections.values()
        counts = Counter(values)
        assert detections.repeated().tolist() == [row for row, value in enumerate(values) if counts[value] > 1]
        assert len(detections.repeated()) or not repeats



def test_masks_made_a_length_at_a_time_are_each_tokens_own_mask():
    """masks_of() masks the ASCII-digit tokens of one length like the first: what each detector's mask says."""
    rng = random.Random(18)
    tokens = ["".join(rng.choice("0123456789") for _ in range(length)) for length in range(0, 24) for _ in range(5)]
    tokens += ["11010519491231002X", "110105 19491231 0021", "138-0013-8000", "+86 13800138000", "１３８００１３８０００",
               "a@b.cn", "10.1.2.3", "京A12345", "(010)12345678", "E12345678", "91350100M000100Y43", ""]
    for detector in DETECTORS.values():
        shuffled = rng.sample(tokens, len(tokens))
        assert masks_of(detector, shuffled) == [detector.mask(token) for token in shuffled], detector.name


def test_findings_made_a_field_at_a_time_are_those_made_one_by_one():
    rows = [("r", "cn_id_card", "block", "high", f"body:$[{i}].sfzh", "1101**", str(i), "sfzh" if i % 2 else None,
             "normal" if i % 3 else "high", ("body", i)) for i in range(50)]
    names = list(Finding.__dataclass_fields__)
    made = made_findings(len(rows), **{name: [row[i] for row in rows] for i, name in enumerate(names)})
    assert made == [Finding(*row) for row in rows]
    assert [hash(f) for f in made] == [hash(Finding(*row)) for row in rows]
    with pytest.raises(AssertionError):  # every field is given
        made_findings(1, rule=["r"])


@pytest.mark.parametrize("as_csv", [False, True])
def test_kept_findings_from_columns_are_those_made_finding_by_finding(tmp_path, as_csv):
    """The findings a scan keeps of a bulk export (made as columns) are what each detection says of
    itself: its location replayed on its own (not many at once), its mask, value and confidence."""
    records = _export(300, repeats=False, full_width=True, extras=True)
    for record in records[::5]:  # an ID number under a key that is a mobile number: a masked location
        record[record["sjhm"]] = record["sfzh"]
    (tmp_path / "r.yaml").write_text(RULES.replace("{allowed}", "none"))
    body, content_type = _body(records, as_csv)
    profile = load_rules(tmp_path / "r.yaml").profile("wide")
    detections, problems = profile.detect_all(decode_body(body, content_type, None, profile.limits), "body")
    assert detections.bulk > 600  # the columns were used
    result = profile.apply_rules(detections, problems, "request", None)
    expected = []
    for rule, detectors in (("contacts", {"cn_mobile", "email", "bank_card"}), ("ids", {"cn_id_card"}),
                            ("many-mobiles", {"cn_mobile"})):
        rule_of = {r.id: r for r in profile.rules}[rule]
        for d in detections:
            if d.kind == "detector" and d.name in detectors:
                location, field_name = d.segment.at(d.offset, d.base)  # located on its own
                expected.append(Finding(rule, d.type, rule_of.action, rule_of.severity, location, d.masked(),
                                        d.value, field_name, d.confidence(field_name), d.place()))
    kept = [f for f in result.findings if f.rule != "contacts" or f.type != "field_name"]
    assert any("****" in f.location for f in kept)  # a location naming a mobile number: compared unmasked below
    assert len(kept) == len(expected) > 1000
    for made, one_by_one in zip(kept, expected):
        if made.location != one_by_one.location:  # a key that is a mobile number: masked in location and field
            assert "****" in made.location and len(made.location) == len(one_by_one.location)
            assert made.field == one_by_one.field[:3] + "****" + one_by_one.field[7:]
            made = dataclasses.replace(made, location=one_by_one.location, field=one_by_one.field)
        assert made == one_by_one
    assert {f.confidence for f in kept} == {"high", "normal"} and any(f.masked != f.value for f in kept)


def test_kept_findings_of_columns_at_a_base_offset_are_placed_as_their_detections(tmp_path):
    """Columns of a text at an offset in a body (a stream's window) place their findings there."""
    (tmp_path / "r.yaml").write_text(RULES.replace("{allowed}", "none"))
    profile = load_rules(tmp_path / "r.yaml").profile("wide")
    body, content_type = _body(_export(60, repeats=False, full_width=False, extras=False), as_csv=False)
    detections, problems = profile.detect_all(decode_body(body, content_type, None, profile.limits), "body")
    shifted = Detections(detections.listed, detections.columns._replace(base=100_000))
    result = profile.apply_rules(shifted, problems, "request", None)
    places = {f.place for f in result.findings if f.type != "field_name"}
    assert places == {d.place() for d in shifted if d.kind == "detector"}
    assert len(places) == 120 and min(offset for _, offset in places) >= 100_000


REPEATS_RULES = """
rules:
  - {id: ids, detectors: [cn_id_card], action: block, examples: {match: ["11010519491231002X"]}}
  - {id: mobiles, detectors: [cn_mobile], action: audit, examples: {match: ["13800138000"]}}
profiles:
  p: {rules: [ids, mobiles], limits: {max_findings: 37}}
"""


@pytest.mark.parametrize("hashed_by", ["kernels", "numpy"])
@pytest.mark.parametrize("as_csv", [False, True])
def test_a_few_values_repeated_in_a_bulk_export_are_told_apart_without_decoding_every_value(tmp_path, monkeypatch,
                                                                                            as_csv, hashed_by):
    """A large export holds a few equal ID or mobile numbers by chance. Only their rows are decoded
    and located (every value was, in Python: an 8 MiB export cost 5x a 4 MiB one), and rules still
    count a value twice in two records and once where it is twice in one field."""
    records = _export(3000, repeats=False, full_width=False, extras=False)
    records[2900]["sjhm"] = records[10]["sjhm"]  # one mobile in two records: two findings
    records[2950]["dz"] = f"{records[20]['sfzh']} 又 {records[20]['sfzh']}"  # one ID in two records, twice in one
    if as_csv:
        body = "\n".join(["xm,sfzh,sjhm,dz"] + [",".join(r[c] for c in ("xm", "sfzh", "sjhm", "dz"))
                                                for r in records]).encode()
        content_type = "text/csv"
    else:
        body, content_type = json.dumps(records, ensure_ascii=False).encode(), "application/json"
    if hashed_by == "kernels" and detections_module.kernels is None:
        pytest.skip("the C kernels are not compiled here (no compiler at install)")
    if hashed_by == "numpy":
        monkeypatch.setattr(detections_module, "kernels", None)
    (tmp_path / "r.yaml").write_text(REPEATS_RULES)  # no rule to redact (which reads every value)
    profile = load_rules(tmp_path / "r.yaml").profile("p")
    decoded = decode_body(body, content_type, None, profile.limits)
    detections, problems = profile.detect_all(decoded, "body")
    assert isinstance(detections, Detections) and detections.bulk == 6002
    result = profile.apply_rules(detections, problems, "request", None)
    assert detections._values is None  # no value decoded but those of the repeated rows
    assert {group.rule: group.count for group in result.groups} == {"ids": 3001, "mobiles": 3000}
    made, _ = profile.detect([*decoded.segments, decode.text_segment("", "elsewhere")])  # as Detection objects
    objects = profile.apply_rules(made, problems, "request", None)
    assert result.findings == objects.findings and result.groups == objects.groups
    counts = Counter(detections.values())
    assert detections.repeated().tolist() == [row for row, value in enumerate(detections.values()) if counts[value] > 1]


@pytest.mark.parametrize("full_width", [False, True])
def test_the_values_characters_and_lengths_are_alike_in_c_and_numpy(tmp_path, monkeypatch, full_width):
    """What location masks are built from: every length and character of a bulk export's values (None
    where a value holds a character outside ASCII, a full-width digit)."""
    if detections_module.kernels is None:
        pytest.skip("the C kernels are not compiled here (no compiler at install)")
    body, content_type = _body(_export(300, repeats=False, full_width=full_width, extras=True), as_csv=False)
    (tmp_path / "r.yaml").write_text(RULES.replace("{allowed}", "11010519491231002X"))
    profile = load_rules(tmp_path / "r.yaml").profile("wide")
    detections, _ = profile.detect_all(decode_body(body, content_type, None, profile.limits), "body")
    assert detections.bulk > 300
    in_c = detections.value_lengths_and_units()
    monkeypatch.setattr(detections_module, "kernels", None)
    assert detections.value_lengths_and_units() == in_c
    assert (in_c is None) == full_width and (full_width or {11, 16, 18} <= in_c[0] and "X" in in_c[1])


@pytest.mark.parametrize("shape", ["repeated key", "value in a key", "quoted csv", "json", "csv"])
def test_values_repeated_where_cells_cannot_tell_them_apart_are_located(tmp_path, shape):
    """A bulk export's repeated values are told apart by their strings or cells without locating them
    (decode._JsonLocator.cells) only where that is exact: a JSON object naming a key twice (both values at
    one path), a value written in a key and a CSV with quotes are located. Each way counts as the
    detections one by one do."""
    records = _export(400, repeats=False, full_width=False, extras=False)
    twice = records[20]["sfzh"]
    records[300]["sfzh"] = twice  # one ID in two records: two findings
    if shape in ("csv", "quoted csv"):
        if shape == "quoted csv":
            records[5]["dz"] = '"上海市,1号"'  # a quoted cell (its comma is not a delimiter)
        lines = ["xm,sfzh,sjhm,dz"] + [",".join(r[c] for c in ("xm", "sfzh", "sjhm", "dz")) for r in records]
        body, content_type = "\n".join(lines).encode(), "text/csv"
    else:
        body = json.dumps(records, ensure_ascii=False)
        if shape == "repeated key":  # the same ID twice at one path: found once
            body = body.replace(f'"sfzh": "{twice}"', f'"sfzh": "{twice}", "sfzh": "{twice}"', 1)
        if shape == "value in a key":
            body = body.replace('"dz"', f'"{twice}"', 1)
        body, content_type = body.encode(), "application/json"
    (tmp_path / "r.yaml").write_text(REPEATS_RULES)
    profile = load_rules(tmp_path / "r.yaml").profile("p")
    decoded = decode_body(body, content_type, None, profile.limits)
    detections, problems = profile.detect_all(decoded, "body")
    assert isinstance(detections, Detections) and detections.bulk >= 800
    repeated = detections.repeated().tolist()
    told_apart = detections.cells(repeated) is not None
    assert told_apart == (shape in ("json", "csv")) or decode.kernels is None
    result = profile.apply_rules(detections, problems, "request", None)
    made, _ = profile.detect([*decoded.segments, decode.text_segment("", "elsewhere")])  # as Detection objects
    objects = profile.apply_rules(made, problems, "request", None)
    assert result.groups == objects.groups and result.findings == objects.findings
    ids = next(group.count for group in result.groups if group.rule == "ids")
    assert ids == 400 + (shape == "value in a key")
