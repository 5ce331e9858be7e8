"""ID numbers written in groups (6-8-4 or 6-4-4-4; spaces, hyphens or ideographic spaces) are found in
every kind of body, like grouped card and mobile numbers; digit runs that only look like them are not."""

from __future__ import annotations

import json
from urllib.parse import urlencode

import pytest

from gateway.dlp import load_rules
from gateway.dlp.fold import folded
from gateway.dlp.detectors import DETECTORS

GROUPED = ["310104 19800215 4231", "310104-19800215-4231", "310104\u300019800215\u30004231",
           "110105 1949 1231 002X", "110105-1949-1231-002X", "１１０１０５　１９４９１２３１　００２Ｘ"]


@pytest.fixture(scope="module", params=["hyperscan", "re"])
def outbound(request):
    try:
        return load_rules("config/dlp", engine=request.param).profile("outbound")
    except Exception as error:  # hyperscan missing: the fallback engine is tested all the same
        pytest.skip(f"engine {request.param} unavailable: {error}")


def _ids(profile, body: str, content_type: str) -> list[tuple[str, str]]:
    result = profile.scan(body.encode(), content_type=content_type)
    return [(f.masked, f.location) for f in result.findings if f.type == "cn_id_card"]


@pytest.mark.parametrize("number", GROUPED)
def test_found_in_text(outbound, number):
    found = _ids(outbound, f"申请人：张三，证件号码：{number}。联系地址：中山路1号。", "text/plain; charset=utf-8")
    assert len(found) == 1 and found[0][0][:4] in ("3101", "1101") and found[0][0].count("*") == 10


@pytest.mark.parametrize("number", GROUPED)
def test_found_in_json_csv_and_forms(outbound, number):
    assert _ids(outbound, json.dumps({"name": "张三", "zjhm": number}, ensure_ascii=False),
                "application/json") == [(_masked(number), "body:$.zjhm")]
    csv = f"姓名,证件号码,电话\n张三,{number},021-62345678\n"
    assert _ids(outbound, csv, "text/csv; charset=utf-8") == [(_masked(number), "body:csv row 2 column 证件号码")]
    form = urlencode({"name": "张三", "id": number})
    assert _ids(outbound, form, "application/x-www-form-urlencoded") == [(_masked(number), "body:form id")]


def _masked(number: str) -> str:
    """As the finding shows it: masked, full-width digits folded (an ideographic space alone is not)."""
    return DETECTORS["cn_id_card"].mask(folded(number.encode()).decode())


LOOK_ALIKES = [
    "日期：20240101 20240215 20240301 20240415",           # dates in a row
    "2024-01-15 2024-02-15 2024-03-15",
    "电话 138 0013 8000、139 0013 9000、137 0013 7000",     # a phone list
    "0755-86001234-8001 021-62345678-1234",                 # landlines with extensions
    "订单号 202401-20240215-0007 202402-20240301-0042",      # order numbers: no such region
    "物流单号 310104 19800215 4232",                          # right shape, wrong check character
    "310104 19800215-4231",                                   # mixed separators
    "310104 19800215 4231 7", "8 310104 19800215 4231",       # part of a longer digit run
    "批次 310104-19800215-4231-02",
    "1101 0519 4912 3100 2X",                                 # 4-4-4-4-2: not a way ID numbers are written
]


@pytest.mark.parametrize("text", LOOK_ALIKES)
def test_look_alike_digit_runs_are_not_flagged(outbound, text):
    assert _ids(outbound, text, "text/plain; charset=utf-8") == []
