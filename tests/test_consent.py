"""The consent registry's in-memory view, alone: it answers as the registry does, and a withdrawal, an
import, an expiry or a consent's start counts from the next lookup; subject keys are HMAC whatever
the secret's length."""

from __future__ import annotations

import hmac
import io
import json
import os
import re
import unicodedata

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.authz.catalog import ConsentRule, Dataset, Field
from gateway.authz.consent import ConsentRegistry, RegistryView, Scope, batch_claims
from gateway.authz.jose import PLATFORM_ROLE, add_signature, draft, generate_key, load_private_key, public_authority
from gateway.authz.idscan import NFKC_DIGITS, NFKC_SEPARATORS, id_numbers, mask_id_numbers
from gateway.authz.records import RecordFilter, Unfilterable, read_records
from gateway.authz.subject import MASKS, SubjectHasher, column_masker, masker

NOW = 1_800_000_000
SCOPE = Scope("operator-a", "elderly-care", "civil.residents")


def subject(i: int) -> str:
    return f"5206{i:013d}X"


@pytest.fixture
def world(tmp_path):
    generate_key("platform", tmp_path / "platform.key", tmp_path / "platform.pub")
    key = load_private_key(tmp_path / "platform.key")
    secret = os.urandom(32)
    hasher = SubjectHasher(secret)
    registry = ConsentRegistry(tmp_path / "consent.sqlite")
    batches = iter(range(1000))

    def add(consents: list[dict]) -> None:
        body = b"".join(orjson.dumps({"consumer": "operator-a", "scenario": "elderly-care",
                                      "datasets": ["civil.residents"], "nbf": NOW - 60, "exp": NOW + 3600,
                                      **c}) + b"\n" for c in consents)
        claims = batch_claims(f"b{next(batches)}", NOW, body, len(consents), hasher.key_check(), hasher.algorithm)
        manifest = json.dumps(add_signature(draft(claims), key, PLATFORM_ROLE)).encode()
        registry.import_batch(io.BytesIO(manifest + b"\n" + body), {key.kid: public_authority(key, PLATFORM_ROLE)},
                              ("Ed25519",), hasher.key_check(), hasher.algorithm, now=NOW)

    def consent(i: int, **overrides) -> dict:
        return {"cid": f"c{i}", "subject": hasher.key(subject(i)).hex(), **overrides}

    yield {"registry": registry, "hasher": hasher, "secret": secret, "add": add, "consent": consent, "path": tmp_path / "consent.sqlite"}
    registry.close()


def consented(view: RegistryView, hasher: SubjectHasher, now: float, count: int = 20, scope: Scope = SCOPE) -> set[int]:
    keys = {hasher.key(subject(i)): i for i in range(count)}
    return {keys[k] for k in view.consented(scope, now)(keys)}


def test_view_follows_withdrawals_imports_expiry_and_start(world):
    add, consent, hasher = world["add"], world["consent"], world["hasher"]
    add([consent(i) for i in range(10)]
        + [consent(10, exp=NOW + 5), consent(11, nbf=NOW + 5, exp=NOW + 50)]
        + [consent(12, scenario="tourism"), consent(13, datasets=["civil.other"]), consent(14, separate=True)])
    # The view reads the registry through another connection, as a worker does beside the operator's tools.
    view = RegistryView(ConsentRegistry(world["path"]), max_age=3600)
    assert consented(view, hasher, NOW) == set(range(11)) | {14}
    assert view.loaded(SCOPE, NOW)
    separate = Scope("operator-a", "elderly-care", "civil.residents", separate=True)
    assert consented(view, hasher, NOW, scope=separate) == {14}

    # A withdrawal (by id, and all of a subject's) counts from the next lookup, without loading all again.
    assert world["registry"].withdraw(["c3"]) == 1
    assert world["registry"].withdraw(subject=hasher.key(subject(4)), consumer="operator-a") == 1
    assert not view.loaded(SCOPE, NOW)
    assert consented(view, hasher, NOW) == set(range(11)) - {3, 4} | {14}
    # A subject with a second consent keeps it when one is withdrawn.
    add([consent(105, subject=hasher.key(subject(5)).hex())])
    assert world["registry"].withdraw(["c5"]) == 1
    assert 5 in consented(view, hasher, NOW)

    # Expiry and start are compared with the time of each transfer.
    assert 10 not in consented(view, hasher, NOW + 5)
    assert 11 in consented(view, hasher, NOW + 5) and 11 not in consented(view, hasher, NOW + 50)

    # A later import is seen by the next lookup (and a withdrawal stays one).
    add([consent(15), consent(3)])
    assert consented(view, hasher, NOW) == set(range(11)) - {3, 4} | {14, 15}
    view.close()


def test_subject_keys_are_hmac_whatever_the_secret(world):
    for secret in (b"k" * 32, b"x" * 64, os.urandom(100)):
        hasher = SubjectHasher(secret)
        assert hasher.key(subject(1)) == hmac.digest(secret, b"subject\x00" + subject(1).encode(), "sha256")
        assert hasher.key(" " + subject(1).lower()) == hasher.key(subject(1))
        assert hasher.key("5206" + "1" * 13 + "Y") is None
    # Many at once (a response's subject column): the same keys, whatever the mix of values and repeats.
    for algorithm in ("hmac-sha256", "hmac-sm3"):
        hasher = SubjectHasher(b"k" * 32, algorithm)
        for values in ([subject(1), subject(2)], [subject(1), subject(1), subject(3)],
                       [subject(1), " " + subject(2).lower(), int(subject(4)[:-1] + "1"), None, "520602900101123", ""]):
            assert hasher.keys(values) == [hasher.key(value) for value in values]


def test_xml_records_and_what_is_refused():
    hasher = SubjectHasher(os.urandom(32))
    fields = {"id_number": Field("personal", ("cn_id_card",)), "district": Field("public")}
    rule = ConsentRule("id_number", "drop", False)
    record_filter = RecordFilter(Dataset("d", "", "conditional", "s", "p", (), (), (), fields, None, (), {}, None, "",
                                         rule), hasher)
    consented = hasher.key(subject(1))

    def lookup(keys):
        return {key for key in keys if key == consented}
    body = (f'<ns:list xmlns:ns="urn:x"><ns:r><ns:id_number>{subject(1)}</ns:id_number></ns:r>'
            f'<ns:r><ns:id_number>{subject(2)}</ns:id_number></ns:r></ns:list>').encode()
    outcome = record_filter.apply(body, "application/vnd.x+xml", lookup)
    assert outcome.counts() == {"records": 2, "passed": 1, "masked": 0, "dropped": 1}
    assert subject(1).encode() in outcome.body and subject(2).encode() not in outcome.body
    # Only catalogued plain fields leave; a record naming an unconsented subject does not pass.
    other = "520102199003071234"  # an ID number as the scan sees one (a birth date where GB 11643 puts it)
    body = (f'<list><r><id_number>{subject(1)}</id_number><district>a</district><family><id_number>{other}'
            f'</id_number></family><note>x</note></r><r><id_number>{subject(1)}</id_number><district>{other}'
            '</district></r></list>').encode()
    outcome = record_filter.apply(body, "text/xml", lookup)
    assert outcome.counts() == {"records": 2, "passed": 1, "masked": 0, "dropped": 1}
    assert outcome.body == f"<list><r><id_number>{subject(1)}</id_number><district>a</district></r>\n</list>".encode()
    for refused, why in ((f"<resp><who>{other}</who><items><r/><r/></items></resp>".encode(), "outside its records"),
                         (f'<list><r id_number="{subject(1)}"><id_number>{subject(1)}</id_number></r></list>'.encode(),
                          "twice"),
                         (b'<!DOCTYPE r [<!ENTITY a "b">]><list><r/></list>', "document type"),
                         (b"<list><a/><b/></list>", "one list of record elements"),
                         (b"<list><r>", "not XML"),
                         ('<?xml version="1.0" encoding="GBK"?><l><r>\u00e9\u4e2d</r></l>'.encode("utf-8"), "not in GBK")):
        with pytest.raises(Unfilterable, match=why):
            record_filter.apply(refused, "text/xml", lookup)


def test_nfkc_digits_are_every_character_nfkc_folds_into_a_digit_or_x():
    # The fast check of a response's records relies on this list: a character missing from it could
    # carry another subject's ID number past the check.
    listed = {code for first, last in NFKC_DIGITS for code in range(first, last + 1)}
    folding = {code for code in range(0x80, 0x110000)
               if unicodedata.decomposition(chr(code)) and re.search("[0-9Xx]", unicodedata.normalize("NFKC", chr(code)))}
    assert listed == folding
    # and a grouped one's separators: what folds into a space or a hyphen (others holding one fold into
    # it beside a combining mark or a letter, never between two digits)
    listed = {code for first, last in NFKC_SEPARATORS for code in range(first, last + 1)}
    assert listed == {code for code in range(0x80, 0x110000) if unicodedata.normalize("NFKC", chr(code)) in (" ", "-")}


def test_id_numbers_in_groups_and_masked_where_written():
    assert id_numbers(["家属 520602 19420315 7020", "520602-1993-0610-7539", "５２０６０２　１９６００９２５　６００８",
                       "520602\u00a019710722\u00a07012"]) == \
        {"520602194203157020", "520602199306107539", "520602196009256008", "520602197107227012"}
    assert id_numbers(["5206021 9420315 7020", "520602 19420315 70201", "0851-12345678"]) == set()
    text = "家属 ５２０６０２　１９４２０３１５　７０２０，本人 520602-1993-0610-7539；⑤⑳①⓪②①⑨⑨⓪⓪③⓪⑦①②③④ 止"
    assert mask_id_numbers(text, lambda numbers: numbers - {"520602199306107539"}) == \
        ("家属 520602********7020，本人 520602-1993-0610-7539；520102********1234 止", 2)
    assert mask_id_numbers("520602199003077504", lambda numbers: set()) == ("520602199003077504", 0)


def test_json_repeating_a_key_is_refused_however_written():
    """Each way the repeated-key check decides: colons only after keys, colons in values too (the document
    written again), \\u escapes (parsed again); a repeat hidden by an escaped colon is still found."""
    plain = '[{"id_number":"1","name":"a"},{"id_number":"2","name":"b"}]'
    for body, repeated in ((plain, None), ('[{"id_number":"1","name":"a","id_number":"2"}]', "id_number"),
                           ('[{"id_number":"1","note":"10:30"}]', None),
                           ('[{"id_number":"1","note":"10:30","id_number":"2"}]', "id_number"),
                           ('{"total":1,"items":[{"id_number" : "1","note":"x","note" :"y"}]}', "note"),
                           ('[{"id_number":"1","note":"\\u003a","id_number":"2"}]', "id_number"),
                           ('[{"id_number":"1","n":{"a":1,"a":2}}]', "a"),
                           ('[{"id_number":"\\u0031","note":"a:b"}]', None)):
        if repeated is None:
            assert len(read_records(body.encode(), "application/json").items) >= 1
        else:
            with pytest.raises(Unfilterable, match=f"repeating key\\(s\\) {repeated}"):
                read_records(body.encode(), "application/json")


def test_a_name_of_one_character_is_masked():
    hasher = SubjectHasher(os.urandom(32))
    assert [masker("name", "name", hasher)(name) for name in ("王", "王五", "欧阳小明", "")] == ["*", "王*", "欧***", ""]
    assert column_masker("name", "name", hasher)(["王", "王五"]) == ["*", "王*"]


def test_records_naming_other_subjects_however_written_do_not_pass():
    """The decision over all records at once (a JSON table of catalogued plain fields) agrees with the
    exact scan record by record, for ID numbers written in every way the scan folds."""
    hasher = SubjectHasher(os.urandom(32))
    fields = {"id_number": Field("personal", ("cn_id_card",)), "district": Field("public"), "age": Field("internal")}
    record_filter = RecordFilter(Dataset("d", "", "conditional", "s", "p", (), (), (), fields, None, (), {}, None, "",
                                         ConsentRule("id_number", "drop", False)), hasher)
    other, allowed = "520102199003071234", "520102199003071250"  # IDs as the scan sees them
    consented = {hasher.key(subject(1)), hasher.key(allowed)}

    def lookup(keys):
        return {key for key in keys if key in consented}
    folded = str.maketrans("0123456789X", "０１２３４５６７８９Ｘ")
    naming_other = [other, other.translate(folded), other[:-1] + "Ｘ", other[:-1] + "x", int(other), "\x01" + other,
                    "地址" + other + "，", "⑤⑳①⓪②①⑨⑨⓪⓪③⓪⑦①②③④",  # circled numbers: 17 characters, 18 digits
                    "\U0001d7d3" + other[1:], other[:-1] + "Ⅹ", other[:2].translate(folded) + other[2:]]
    passing = [allowed, allowed.translate(folded), "贵州省铜仁市碧江区锦江大道1号，2单元（东）", "5201021990030712",
               "13912345678", 12345678901234567, "x" * 17, None, True, 1.5e17]
    values = naming_other + passing
    body = orjson.dumps([{"id_number": subject(1), "district": value, "age": 40} for value in values])
    outcome = record_filter.apply(body, "application/json", lookup)
    assert [record["district"] for record in orjson.loads(outcome.body)] == passing
    assert outcome.counts() == {"records": len(values), "passed": len(passing), "masked": 0, "dropped": len(naming_other)}
    # A nested value is no plain field: it does not leave, and what it names does not count.
    body = orjson.dumps([{"id_number": subject(1), "district": {"id": other}, "age": 40}])
    assert orjson.loads(record_filter.apply(body, "application/json", lookup).body) == [{"id_number": subject(1), "age": 40}]
    # Alone in a table of records that all pass otherwise, each is still found.
    for value in naming_other:
        body = orjson.dumps([{"id_number": subject(1), "district": "碧江区", "age": 40}] * 50
                            + [{"id_number": subject(1), "district": value, "age": 40}])
        assert record_filter.apply(body, "application/json", lookup).passed == 50, value


# Pieces of values that join into ID numbers written in every way the exact scan folds, and into near misses.
PIECES = ["520102199003071234", "520102199003071250", "5201021990030712", "34", "X", "x", "Ⅹ", "０", "５２０１０２",
          "１９９００３０７１２３４", "⑤⑳①⓪②", "①⑨⑨⓪⓪③⓪⑦①②③④", "²", "\x01", "\u0307", "，", "号", '"', "\\", " ", "1",
          "520102", "1990", "0307", "19900307", "1234", "-", "\u3000", "\u00a0", "\uff0d"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.sampled_from(PIECES), max_size=6).map("".join), min_size=1, max_size=8))
def test_the_decision_over_all_records_agrees_with_the_exact_scan(values):
    hasher = SubjectHasher(b"k" * 32)
    fields = {"id_number": Field("personal", ("cn_id_card",)), "note": Field("public")}
    record_filter = RecordFilter(Dataset("d", "", "conditional", "s", "p", (), (), (), fields, None, (), {}, None, "",
                                         ConsentRule("id_number", "drop", False)), hasher)
    consented = {hasher.key(subject(1)), hasher.key("520102199003071250")}  # not 520102199003071234
    records = [{"id_number": subject(1), "note": value} for value in values]
    outcome = record_filter.apply(orjson.dumps(records), "application/json", lambda keys: set(keys) & consented)
    expected = [record for record in records if {hasher.key(n) for n in id_numbers([record["note"]])} <= consented]
    assert orjson.loads(outcome.body) == expected


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.sampled_from(PIECES), max_size=6).map("".join), min_size=1, max_size=8), st.booleans())
def test_a_masked_record_keeps_no_unconsented_id_number(values, consented_own):
    """Whatever a kept (public) field holds, no ID number of a subject without consent leaves in clear."""
    hasher = SubjectHasher(b"k" * 32)
    fields = {"id_number": Field("personal", ("cn_id_card",)), "note": Field("public")}
    record_filter = RecordFilter(Dataset("d", "", "conditional", "s", "p", (), (), (), fields, None, (), {}, None, "",
                                         ConsentRule("id_number", "mask", False)), hasher)
    consented = {hasher.key("520102199003071250")} | ({hasher.key(subject(1))} if consented_own else set())
    records = [{"id_number": subject(1), "note": value} for value in values]
    outcome = record_filter.apply(orjson.dumps(records), "application/json", lambda keys: set(keys) & consented)
    for record in orjson.loads(outcome.body):
        assert {hasher.key(n) for n in id_numbers(record.values())} <= consented, record


def test_a_subject_field_left_as_it_is_keeps_no_unconsented_number():
    """A catalogue may class the subject field itself public: its number is masked in a masked record."""
    hasher = SubjectHasher(os.urandom(32))
    fields = {"id_number": Field("public"), "district": Field("public")}
    record_filter = RecordFilter(Dataset("d", "", "conditional", "s", "p", (), (), (), fields, None, (), {}, None, "",
                                         ConsentRule("id_number", "mask", False)), hasher)
    records = [{"id_number": subject(i), "district": "碧江区"} for i in range(4)]
    outcome = record_filter.apply(orjson.dumps(records), "application/json", lambda keys: set(keys) & {hasher.key(subject(1))})
    assert [record["id_number"] for record in orjson.loads(outcome.body)] == \
        [subject(i) if i == 1 else subject(i)[:6] + "********" + subject(i)[-4:] for i in range(4)]


def test_column_masks_mask_as_the_value_masks_do():
    hasher = SubjectHasher(os.urandom(32))
    columns = [[subject(i) for i in range(5)], ["13912345678", "13812345678"], ["6228 4800 1234 5678", "6228480012345678"],
               ["6228480012345678", "6228480012345679"], ["1391234567", "13912345678"], ["139\n1234567", "13912345678"],
               ["１３９１２３４５６７８", "１３９１２３４５６７９"], [13912345678, "13912345678"], ["1234", "5678"], [None, "x"],
               ["张三明", "李四"], []]
    for mask in MASKS:
        for values in columns:
            assert column_masker(mask, "f", hasher)(values) == [masker(mask, "f", hasher)(v) for v in values], (mask, values)


def test_escaped_digits_in_the_body_are_digits():
    """The quick scan for other subjects reads the body itself only when it writes every digit as a
    digit: an ID number written with \\u escapes in another field is still found."""
    hasher = SubjectHasher(os.urandom(32))
    fields = {"id_number": Field("personal", ("cn_id_card",)), "note": Field("public")}
    record_filter = RecordFilter(Dataset("d", "", "conditional", "s", "p", (), (), (), fields, None, (), {}, None, "",
                                         ConsentRule("id_number", "drop", False)), hasher)
    consented = {hasher.key(subject(1))}
    other = "520102199003071234"
    escaped = "".join(f"\\u{ord(c):04x}" for c in other)
    body = ("[" + ",".join([f'{{"id_number":"{subject(1)}","note":"碧江区"}}'] * 50
                           + [f'{{"id_number":"{subject(1)}","note":"{escaped}"}}']) + "]").encode()
    outcome = record_filter.apply(body, "application/json", lambda keys: set(keys) & consented)
    assert outcome.counts() == {"records": 51, "passed": 50, "masked": 0, "dropped": 1}
    assert other not in outcome.body.decode()
