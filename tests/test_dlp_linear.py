"""DLP cost linear in body size whatever the number of findings, and locations after full-width text.

The timing tests compare CPU time for 4x the records with 1x (the best of three runs each): linear is 4,
a return of per-finding work proportional to the text before it (as before: 1 MB with 8,000 records
took 8 s) makes it 12-16. The margin (< 7) keeps them from failing on a busy machine.
"""

import csv
import io
import json
import time
from pathlib import Path

import pytest

from gateway.dlp import load_rules
from gateway.dlp import stream as stream_module
from gateway.dlp.validators import id_card_check_char

SHIPPED = Path(__file__).resolve().parent.parent / "config" / "dlp"
FULL_WIDTH = str.maketrans({chr(c): chr(c + 0xFEE0) for c in range(0x21, 0x7F)})


@pytest.fixture(scope="module")
def outbound():
    return load_rules(SHIPPED).profile("outbound")


def id_number(index: int) -> str:
    first17 = f"3101041980{index % 12 + 1:02d}{index % 28 + 1:02d}{index % 1000:03d}"
    return first17 + id_card_check_char(first17)


def records(count: int) -> list[dict[str, str]]:
    return [{"xm": "张三", "sfzh": id_number(index), "sjhm": f"138{index:08d}",
             "dz": f"上海市徐汇区漕溪北路{index % 300}号，（第{index % 9}栋）：整体。"} for index in range(count)]


def json_export(count: int) -> tuple[bytes, str]:
    return json.dumps(records(count), ensure_ascii=False).encode(), "application/json"


def csv_export(count: int) -> tuple[bytes, str]:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["姓名", "身份证号", "手机号码", "住址"])
    writer.writerows(list(record.values()) for record in records(count))
    return out.getvalue().encode(), "text/csv"


def full_width_text(count: int) -> tuple[bytes, str]:
    """Prose with full-width punctuation and, on every line, an ID number written full-width."""
    return "\n".join(f"第{index}条，（ＧＤＰ）：身份证号{id_number(index).translate(FULL_WIDTH)}。"
                     for index in range(count)).encode(), "text/plain"


def one_long_value(count: int) -> tuple[bytes, str]:
    """One JSON string holding every ID number: each key is searched back from the finding."""
    return json.dumps({"note": "，".join(f"证件{id_number(index)}" for index in range(count))},
                      ensure_ascii=False).encode(), "application/json"


def cpu_seconds(profile, body: bytes, content_type: str, findings: int) -> float:
    best = float("inf")
    for _ in range(3):
        started = time.process_time()
        result = profile.scan(body, content_type=content_type)
        best = min(best, time.process_time() - started)
    assert sum(g.count for g in result.groups if g.type == "cn_id_card") == findings  # kept up to the cap, all counted
    return best


@pytest.mark.parametrize("build", [json_export, csv_export, full_width_text, one_long_value])
def test_four_times_the_findings_cost_about_four_times_as_much(outbound, build):
    small, large = 1500, 6000
    small_time = cpu_seconds(outbound, *build(small), small)
    large_time = cpu_seconds(outbound, *build(large), large)
    print(f"{build.__name__}: {small} records {small_time:.3f}s, {large} records {large_time:.3f}s "
          f"({large_time / small_time:.1f}x)")
    assert large_time < 7 * small_time, (small_time, large_time)


def test_locations_and_values_after_full_width_text_point_at_the_text_as_written(outbound):
    first, second = id_number(1), id_number(2)
    text = f"说明（ＧＤＰ）：１２３，编号ＡＢ－１２。身份证号{first.translate(FULL_WIDTH)}，又{second}。"
    body = text.encode()
    result = outbound.scan(body, content_type="text/plain")
    found = {f.value: f.location for f in result.findings if f.type == "cn_id_card"}
    written = first.translate(FULL_WIDTH)
    assert found == {written: f"body:offset {body.index(written.encode())}",
                     second: f"body:offset {body.index(second.encode())}"}


def test_json_and_csv_locations_after_full_width_values(outbound):
    rows = [{"dz": "（１２３）号，ＡＢ栋：" * (index + 1), "sfzh": id_number(index)} for index in range(3)]
    result = outbound.scan(json.dumps(rows, ensure_ascii=False).encode(), content_type="application/json")
    assert sorted(f.location for f in result.findings if f.type == "cn_id_card") == \
        [f"body:$[{index}].sfzh" for index in range(3)]
    table = "住址,身份证号\n" + "".join(f"\"（１２３），ＡＢ\",{id_number(index)}\n" for index in range(3))
    result = outbound.scan(table.encode(), content_type="text/csv")
    assert sorted(f.location for f in result.findings if f.type == "cn_id_card") == \
        [f"body:csv row {index + 2} column 身份证号" for index in range(3)]


def test_a_streamed_body_reports_offsets_in_the_text_as_written(monkeypatch):
    monkeypatch.setattr(stream_module, "WINDOW_BYTES", 4096)
    pieces, expected = [], []
    for index in range(40):
        pieces.append("文字（ＡＢ）１２，" * 40 + " ")
        expected.append(len("".join(pieces).encode()))
        pieces.append(id_number(index) + " ")
    body = "".join(pieces).encode()
    profile = load_rules(SHIPPED).profile("outbound")
    profile.limits = type(profile.limits)(stream_buffer_bytes=1)  # streamed from the first chunk
    stream = profile.stream(content_type="text/plain")
    for at in range(0, len(body), 1000):
        stream.feed(body[at:at + 1000])
    result = stream.finish()
    assert sorted(f.location for f in result.findings if f.type == "cn_id_card") == \
        sorted(f"body:offset {offset}" for offset in expected)


def test_redacting_four_times_the_values_costs_about_four_times_as_much(tmp_path):
    (tmp_path / "r.yaml").write_text("""
rules:
  - {id: ids, detectors: [cn_id_card], action: redact, examples: {match: ["11010519491231002X"]}}
profiles:
  r: {rules: [ids]}
""")
    profile = load_rules(tmp_path / "r.yaml").profile("r")
    times = []
    for count in (1500, 6000):
        body, content_type = json_export(count)
        result = profile.scan(body, content_type=content_type)
        best = float("inf")
        for _ in range(3):
            started = time.process_time()
            redacted = profile.redact(body, content_type=content_type, result=result)
            best = min(best, time.process_time() - started)
        assert id_number(count - 1).encode() not in redacted and redacted.count(b"**********") == count
        times.append(best)
    print(f"redact: 1500 values {times[0]:.3f}s, 6000 values {times[1]:.3f}s ({times[1] / times[0]:.1f}x)")
    assert times[1] < 7 * times[0], times
