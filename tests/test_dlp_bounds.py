"""Bounded findings: a scan keeps at most `limits.max_findings` of them and counts the rest; records,
refusals and decision lines summarise them per rule, type and action, and always fit their limits."""

from __future__ import annotations

import gzip
import hashlib
import json
import tracemalloc
from types import SimpleNamespace

import pytest

from gateway.dlp import detections as detections_module
from gateway.dlp import engine, load_rules, stream, tally
from gateway.dlp.decode import Limits
from gateway.dlp.engine import single_rule_profile
from gateway.dlp.tally import (
    KEPT_LOCATIONS,
    LOCATION_CHARS,
    FindingGroup,
    Tally,
    locations_digest,
    places_digest,
)
from gateway.dlp.validators import luhn_valid
from gateway.filters.record import Record
from gateway.ops.decisionlog import DecisionLog
from gateway.trace.log import encode_record
from gateway.trace.tiles import MAX_ENTRY
from gateway.transfer.model import (
    MAX_REASON_GROUPS,
    REFUSAL_ROOM,
    Reason,
    Transfer,
    refusal_body,
)
from tests.citizens import citizens, citizens_json, id_places

RULES = "config/dlp"


@pytest.fixture(scope="module")
def rules():
    return load_rules(RULES)


def test_findings_past_the_limit_are_counted_with_a_digest_of_every_place(rules):
    body = citizens_json(1200)
    result = rules.profile("outbound").scan(body, content_type="application/json")
    assert result.action == "block" and len(result.findings) == 1000  # Limits().max_findings
    group = next(g for g in result.groups if g.rule == "id-card")
    assert group.count == 1200 and len(group.locations) == KEPT_LOCATIONS
    assert group.locations[:2] == ("body:$[0].sfzh", "body:$[1].sfzh")
    # Every place (text and byte offset), in the order found, is in the digest: the same as a scan
    # keeping them all gives.
    unbounded = single_rule_profile(rules.rules["id-card"], limits=Limits(max_findings=10_000))
    everything = unbounded.scan(body, content_type="application/json").findings
    assert len(everything) == 1200 and everything[-1].location == "body:$[1199].sfzh"
    assert group.locations_sha256 == places_digest(f.place for f in everything)
    assert group.locations_sha256 == places_digest(id_places(body, citizens(1200)))
    assert group.locations_sha256 != places_digest(id_places(body, citizens(1200))[:-1])


def test_values_past_the_limit_are_redacted_all_the_same(rules):
    """What is masked must not depend on how many findings were kept: all 1,500 cards are masked."""
    cards = [_card(index) for index in range(1500)]
    body = "\n".join(f"卡号 {card}" for card in cards).encode()
    profile = rules.profile("inbound")
    result = profile.scan(body, content_type="text/plain; charset=utf-8", direction="response")
    assert result.action == "redact" and len(result.findings) == 1000 and len(result.replacements) == 1500
    redacted = profile.redact(body, content_type="text/plain; charset=utf-8", result=result).decode()
    assert not any(card in redacted for card in cards)


def _card(index: int) -> str:
    first15 = f"622848{index:09d}"
    return next(first15 + digit for digit in "0123456789" if luhn_valid(first15 + digit))


def test_a_record_of_the_largest_possible_findings_list_fits_the_entry_limit(rules):
    """Every rule of the shipped configuration firing on every type it can give, in every part of a
    transfer, each a million times at locations as long and as costly to encode as a sender can make
    them, past MAX_REASON_GROUPS too: the record still fits, and says how many it could not itemise."""
    transfer = _transfer()
    long_location = "body:$." + "\x01键" * 10_000
    types = {(rule.id, name) for rule in rules.rules.values() for name in rule.detectors}
    types |= {(rule.id, rule.type or "pattern") for rule in rules.rules.values()}
    for part in range(MAX_REASON_GROUPS // len(types) + 2):
        tally = Tally()
        for rule, type in sorted(types):
            for action in ("block", "redact"):
                for index in range(KEPT_LOCATIONS + 1):
                    tally.add(rule, type, action, f"{long_location}{part}.{index}")
        transfer.escalate("block", [FindingGroup(g.rule, g.type, g.action, 1_000_000, g.locations,
                                                 g.locations_sha256) for g in tally.groups()])
    assert len(transfer.reasons) == MAX_REASON_GROUPS and transfer.reasons_omitted
    record = _record(transfer)
    assert len(encode_record(record)) <= MAX_ENTRY
    itemised = sum(entry["count"] for entry in record["rules"])
    total = sum(g.count for g in transfer.reasons) + sum(transfer.reasons_omitted.values())
    assert record["rules_omitted"] > 0 and itemised + record["rules_omitted"] == total
    assert len(refusal_body(transfer)) <= REFUSAL_ROOM + 200


def test_a_bulk_export_is_recorded_with_its_counts_and_first_locations(rules):
    transfer = _transfer()
    body = citizens_json(2000)
    result = rules.profile("outbound").scan(body, content_type="application/json")
    transfer.escalate("block", result.groups)
    record = _record(transfer)
    assert len(encode_record(record)) < 4096 and "rules_omitted" not in record
    entry = next(e for e in record["rules"] if e["rule"] == "id-card")
    assert entry == {"rule": "id-card", "type": "cn_id_card", "action": "block", "count": 2000,
                     "locations": [f"body:$[{i}].sfzh" for i in range(KEPT_LOCATIONS)],
                     "locations_sha256": places_digest(id_places(body, citizens(2000)))}
    answer = json.loads(refusal_body(transfer))
    assert {"rule": "id-card", "type": "cn_id_card", "count": 2000,
            "locations": entry["locations"]} in answer["reasons"]
    assert not any(person["sfzh"] in json.dumps(record, ensure_ascii=False) for person in citizens(2000))


@pytest.mark.parametrize("formatted", ["kernels", "python"])
def test_the_places_digest_reads_as_documented(monkeypatch, formatted):
    """Anyone re-scanning a body recomputes a group's digest from its docstring: one UTF-8 line per
    place, the location as a JSON string, a space and the offset (none for a place outside a text)."""
    if formatted == "kernels" and tally.kernels is None:
        pytest.skip("the C kernels are not compiled here (no compiler at install)")
    if formatted == "python":
        monkeypatch.setattr(tally, "kernels", None)
    places = [("body:$[0].sfzh", 7), ("body:$[0].sfzh", 10 ** 12), ('header:x-"名"', None), ('header:x-"名"', 0),
              ("body:csv row 2", 31)]
    lines = "".join(f"{json.dumps(location, ensure_ascii=False)}{'' if at is None else f' {at}'}\n"
                    for location, at in places)
    assert places_digest(places) == hashlib.sha256(lines.encode()).hexdigest()
    assert places_digest([]) == hashlib.sha256(b"").hexdigest()


def test_locations_are_cut_when_shown_but_digested_whole():
    transfer = _transfer()
    location = "body:$." + "长" * 1000
    transfer.escalate("block", [Reason("id-card", "cn_id_card", location, "block")])
    entry = _record(transfer)["rules"][0]
    assert entry["locations"] == [location[:LOCATION_CHARS] + "…"]
    assert entry["locations_sha256"] == locations_digest([location])


def test_a_decision_line_is_bounded_too():
    transfer = _transfer()
    transfer.escalate("block", [Reason(f"rule-{i}", "keyword", "body:" + "x" * 150, "block") for i in range(500)])
    lines = []
    DecisionLog(SimpleNamespace(write=lines.append, flush=lambda: None)).write(transfer)
    entry = json.loads(lines[0])
    assert len(lines[0]) < 20_000 and entry["reasons_omitted"] > 0
    assert len(entry["reasons"]) + entry["reasons_omitted"] == 500


def _transfer() -> Transfer:
    return Transfer(id="t-bounds", listener="forward", client_addr="127.0.0.1:5000", client_zone="extranet",
                    upstream_host="127.0.0.2", upstream_port=8000, upstream_zone="internet")


def _record(transfer: Transfer) -> dict:
    gateway = SimpleNamespace(runtime=SimpleNamespace(config=SimpleNamespace(name="frontend-test")))
    return Record(gateway)._fields(transfer, method="POST", url="http://127.0.0.2:8000/upload", status=403,
                                   req_bytes=1_000_000, resp_bytes=0, req_digest=None, resp_digest=None)


def test_a_scan_keeping_no_finding_records_and_redacts_the_same(rules):
    """The gateway scans with keep=KEEP_NONE: groups (counts, first locations, digests), the action and
    every value to redact must be those of a scan that keeps its findings."""
    from gateway.filters.inspect import KEEP_NONE
    profile = rules.profile("outbound")
    body = citizens_json(1500)
    kept, none = profile.scan(body, content_type="application/json"), \
        profile.scan(body, content_type="application/json", keep=KEEP_NONE)
    assert len(kept.findings) == 1000 and none.findings == []
    assert none.action == kept.action == "block"
    assert [g.entry() for g in none.groups] == [g.entry() for g in kept.groups]
    assert none.replacements == kept.replacements


@pytest.mark.parametrize("joined_by", ["kernels", "python"])
def test_a_streamed_export_holds_its_detections_as_columns_in_bounded_memory(rules, monkeypatch, joined_by):
    """Past the buffering threshold a body is scanned window by window; its detectors' detections are
    kept as columns (gateway/dlp/detections.py StreamColumns), not as objects of ~450 bytes: 110,000 ID
    numbers, more than a stream held whole, are counted and digested, every one, in a few MB."""
    if joined_by == "python":  # the arenas' copies made without the C kernels
        monkeypatch.setattr(detections_module, "kernels", None)
    elif detections_module.kernels is None:
        pytest.skip("the C kernels are not compiled here (no compiler at install)")
    people = citizens(110_000)
    body = json.dumps(people, ensure_ascii=False).encode()
    assert len(body) > Limits().stream_buffer_bytes
    scan = rules.profile("outbound").stream(content_type="application/json", keep=0)
    tracemalloc.start()
    try:
        for at in range(0, len(body), 1 << 16):
            scan.feed(body[at:at + (1 << 16)])
        result = scan.finish()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    group = next(g for g in result.groups if g.rule == "id-card")
    places = id_places(body, people)
    assert group.count == 110_000 and group.locations_sha256 == places_digest(places)
    assert group.locations == tuple(f"body:offset {offset}" for _, offset in places[:KEPT_LOCATIONS])
    assert result.action == "block" and not any(g.type == "uninspectable" for g in result.groups)
    assert peak < 40 * 2 ** 20, f"{peak / 2 ** 20:.0f} MiB traced while streaming a {len(body) / 2 ** 20:.0f} MiB export"


@pytest.mark.parametrize("escaped", [False, True])
def test_a_body_with_more_candidates_than_one_scan_reads_is_scanned_window_by_window(rules, monkeypatch, escaped):
    """Past the candidate limit a buffered body was refused as uninspectable, whatever it held: now it is
    scanned again window by window, as a body past the buffering threshold is: its one text as decoded
    (its field names beside it) or, decoded into many (JSON written with \\u escapes), the body itself."""
    monkeypatch.setattr(engine, "MAX_CANDIDATES", 3000)  # ~18,000 candidates in the body, ~1,500 in a window
    monkeypatch.setattr(stream, "WINDOW_BYTES", 1 << 14)  # (the first is 64 KiB: what the charset is sniffed from)
    people = citizens(6000)
    body = json.dumps(people, ensure_ascii=escaped).encode()
    result = rules.profile("outbound").scan(gzip.compress(body), content_type="application/json",
                                            content_encoding="gzip")
    assert not any(g.type == "uninspectable" for g in result.groups) and result.action == "block"
    group = next(g for g in result.groups if g.rule == "id-card")
    assert group.count == 6000
    if not escaped:  # places in the text as decoded, which is the body's; the key "sfzh" found beside
        assert group.locations_sha256 == places_digest(id_places(body, people))
        assert group.locations[0] == f"body:offset {id_places(body, people)[0][1]}"
        assert "id-card-column" in {g.rule for g in result.groups}


def test_a_compressed_export_of_110000_records_is_counted_whole(rules):
    """14 MB of JSON in 2 MB of gzip: buffered, decoded past the buffering threshold, then scanned
    window by window; it was refused as uninspectable (more candidates than one scan reads)."""
    people = citizens(110_000)
    body = json.dumps(people, ensure_ascii=False).encode()
    result = rules.profile("outbound").scan(gzip.compress(body, 1), content_type="application/json",
                                            content_encoding="gzip", keep=0)
    group = next(g for g in result.groups if g.rule == "id-card")
    assert group.count == 110_000 and group.locations_sha256 == places_digest(id_places(body, people))
