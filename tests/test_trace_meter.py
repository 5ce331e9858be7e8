"""Usage metering for settlement (`gateway trace meter`): totals of transfers and bytes by record fields,
computed only from a log that verifies, naming the signed checkpoint they cover."""

import csv
import io
import json
import shutil
from pathlib import Path

import pytest

from gateway.commands import trace as trace_commands
from gateway.trace.meter import Meter
from gateway.trace.tiles import tile_path
from tests.tracecli import run_trace as run
from tests.tracecli import write_log

ORIGIN = "gateway.test/meter"
RECORDS = 700  # two full bundles, the rest in the journal


def record(i: int) -> dict:
    return {"v": 1, "id": f"tx-{i:05d}", "time": f"2026-11-{25 + i % 2}T06:{i // 60 % 60:02d}:{i % 60:02d}.000Z",
            "listener": "forward", "frontend": "frontend-a",
            "client": {"addr": "10.0.0.1:5555", "zone": "health" if i % 3 else "extranet"},
            "upstream": {"host": "api.example", "zone": "internet"},
            "decision": ("allow", "block", "warn", "deny")[i % 4], "req_bytes": i, "resp_bytes": 10 * i,
            "grant": {"id": f"grant-{i % 2}"} if i % 5 == 0 else None, "rules": []}


@pytest.fixture(scope="module")
def logdir(tmp_path_factory) -> Path:
    return write_log(tmp_path_factory.mktemp("meter"), ORIGIN, map(record, range(RECORDS)))


def meter_json(base: Path, capsys, *options: str) -> dict:
    assert run("meter", str(base / "log"), "--pubkey", str(base / "key.pub"), *options) == 0
    return json.loads(capsys.readouterr().out)


def expected(keys, records) -> dict:
    """Independent sums: {group: (transfers, req_bytes, resp_bytes)}."""
    sums: dict[tuple, list[int]] = {}
    for r in records:
        group = tuple({"src_zone": r["client"]["zone"], "dst_zone": r["upstream"]["zone"], "decision": r["decision"],
                       "day": r["time"][:10], "grant": (r["grant"] or {}).get("id")}[key] for key in keys)
        total = sums.setdefault(group, [0, 0, 0])
        total[0] += 1
        total[1] += r["req_bytes"]
        total[2] += r["resp_bytes"]
    return {group: tuple(total) for group, total in sums.items()}


def as_sums(keys, groups: list[dict]) -> dict:
    return {tuple(g[key] for key in keys): (g["transfers"], g["req_bytes"], g["resp_bytes"]) for g in groups}


def test_totals_by_zones_and_decision_cover_the_signed_checkpoint(logdir, capsys):
    statement = meter_json(logdir, capsys)
    keys = ("src_zone", "dst_zone", "decision")
    assert statement["by"] == list(keys)
    assert as_sums(keys, statement["groups"]) == expected(keys, map(record, range(RECORDS)))
    assert statement["total"] == {"transfers": RECORDS, "open": 0, "req_bytes": sum(range(RECORDS)),
                                  "resp_bytes": 10 * sum(range(RECORDS))}
    assert statement["log"] == ORIGIN and statement["checkpoint"]["size"] == RECORDS
    assert statement["verifier_key"] == (logdir / "key.pub").read_text().strip()
    assert statement["key_from"] == str(logdir / "key.pub")
    # The root named is the one `trace verify` reports for the same log.
    assert run("verify", str(logdir / "log"), "--pubkey", str(logdir / "key.pub")) == 0
    assert statement["checkpoint"]["root"] in capsys.readouterr().out


def test_filters_and_other_keys(logdir, capsys):
    statement = meter_json(logdir, capsys, "--by", "day,grant", "--since", "2026-11-26T00:00:00Z",
                           "--zone", "extranet")
    chosen = [record(i) for i in range(RECORDS) if i % 2 and i % 3 == 0]
    assert as_sums(("day", "grant"), statement["groups"]) == expected(("day", "grant"), chosen)
    assert statement["filters"] == {"since": "2026-11-26T00:00:00Z", "zone": "extranet"}


def test_csv_has_a_header_and_one_row_per_group(logdir, capsys):
    assert run("meter", str(logdir / "log"), "--pubkey", str(logdir / "key.pub"), "--by", "decision",
               "--format", "csv") == 0
    out, err = capsys.readouterr()
    rows = list(csv.reader(io.StringIO(out)))
    anchor = json.loads(err.split("meter: covers ", 1)[1])  # the checkpoint the figures cover, on stderr
    assert anchor["checkpoint"]["size"] == RECORDS and anchor["log"] == ORIGIN
    assert rows[0] == ["decision", "transfers", "open", "req_bytes", "resp_bytes"]
    by_decision = expected(("decision",), map(record, range(RECORDS)))
    assert {(row[0],): tuple(map(int, row[1:2] + row[3:])) for row in rows[1:]} == by_decision
    assert {row[2] for row in rows[1:]} == {"0"}  # no open transfers


def claim_more_usage(path: Path, record: int) -> None:
    """Record `record` (in the file at `path`) claims more request bytes, its length unchanged."""
    data = path.read_bytes()
    before = f'"id":"tx-{record:05d}","listener":"forward","req_bytes":{record},'.encode()
    assert data.count(before) == 1 and not str(record).startswith("9")
    path.write_bytes(data.replace(before, before.replace(b':%d,' % record, b':9%s,' % str(record)[1:].encode())))


def test_a_tampered_log_gives_no_figures(logdir, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(logdir, copy)
    claim_more_usage(copy / "log" / tile_path("entries", 0), 1)
    assert run("meter", str(copy / "log"), "--pubkey", str(copy / "key.pub")) == 1
    out = capsys.readouterr().out
    assert out.startswith("TAMPERED: record 1 ") and "transfers" not in out


@pytest.mark.parametrize("where, record", [(tile_path("entries", 1), 300), ("journal", 650)])
def test_records_changed_after_the_verify_give_no_figures(logdir, tmp_path, capsys, monkeypatch, where, record):
    """The figures come from the records read after the verify: they must be the ones it checked."""
    copy = tmp_path / "copy"
    shutil.copytree(logdir, copy)
    verify = trace_commands.verify_log

    def verify_then_alter(*args, **kwargs):
        report = verify(*args, **kwargs)
        claim_more_usage(copy / "log" / where, record)
        return report

    monkeypatch.setattr(trace_commands, "verify_log", verify_then_alter)
    assert run("meter", str(copy / "log"), "--pubkey", str(copy / "key.pub")) == 1
    out = capsys.readouterr().out
    assert out == f"TAMPERED: the {RECORDS} records read do not hash to the root of the checkpoint\n"


@pytest.mark.parametrize("by, error", [("src_zone,colour", "unknown grouping key(s) colour"),
                                       ("decision,decision", "a grouping key is given twice")])
def test_a_bad_grouping_is_a_usage_error(logdir, capsys, by, error):
    assert run("meter", str(logdir / "log"), "--pubkey", str(logdir / "key.pub"), "--by", by) == 2
    assert error in capsys.readouterr().err


def test_records_without_the_fields_count_as_none_and_zero_bytes():
    meter = Meter(("src_zone", "grant", "listener")).add_all([
        {"client": "not a dict", "req_bytes": True, "resp_bytes": -5},
        {"client": {"zone": "a"}, "grant": "g-1", "req_bytes": 7, "listener": ["x"]},
    ])
    assert meter.table() == [
        {"src_zone": None, "grant": None, "listener": None, "transfers": 1, "open": 0, "req_bytes": 0, "resp_bytes": 0},
        {"src_zone": "a", "grant": "g-1", "listener": '["x"]', "transfers": 1, "open": 0, "req_bytes": 7,
         "resp_bytes": 0},
    ]


def test_a_forwarded_transfer_counts_once_and_one_without_completion_counts_as_open():
    """Open record + completion = one transfer (by the completion's figures); an open record whose
    completion never came is a transfer too, counted as open; a refusal is its only record."""
    def rec(i, phase, grant="g-1", **fields):
        return {"id": f"t{i}", "grant": {"id": grant}, "decision": "allow", **({"phase": phase} if phase else {}),
                **fields}
    records = [rec(1, "open", req_bytes=5), rec(2, "open", req_bytes=None), rec(1, "done", req_bytes=5, resp_bytes=9),
               rec(3, None, decision="deny", req_bytes=0, resp_bytes=80), rec(4, "open", grant="g-2", req_bytes=3)]
    table = Meter(("grant",)).add_all(records).table()
    assert table == [
        {"grant": "g-1", "transfers": 3, "open": 1, "req_bytes": 5, "resp_bytes": 89},
        {"grant": "g-2", "transfers": 1, "open": 1, "req_bytes": 3, "resp_bytes": 0},
    ]


def test_verify_warns_about_open_transfers_and_show_lists_them(tmp_path, capsys):
    records = [{"id": "a", "phase": "open"}, {"id": "b", "phase": "open"}, {"id": "a", "phase": "done"},
               {"id": "c", "decision": "deny"}]
    base = write_log(tmp_path, ORIGIN, records)
    assert run("verify", str(base / "log"), "--pubkey", str(base / "key.pub")) == 0
    out, err = capsys.readouterr()
    assert out.startswith("OK: 4 records") and "warning: 1 transfers are open" in err and " b;" in err
    assert run("show", str(base / "log"), "--open") == 0
    out, _ = capsys.readouterr()
    assert [json.loads(line) for line in out.splitlines()] == [{"index": 1, "record": records[1]}]
