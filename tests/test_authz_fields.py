"""A grant for some fields through the real gateway: only the records' granted fields leave. What an
upstream writes beside the records (a JSON wrapper's other members, the XML root's attributes, text and
other children), header and trailer fields outside a short standard list, and a partial (206) body
holding a slice rather than records, do not. (The dataset is priced per request here: a dataset whose
records are counted refuses a 206 as uncountable already.)"""

from __future__ import annotations

import pytest

from tests.authzkit import CATALOG, Kit
from tests.gatewayproc import free_port, gateway_config, start_gateway, start_upstream, write_config
from tests.test_authz_gateway import get, record_of, refused

PER_RECORD = "price: {amount: 0.02, per: record, currency: CNY}"

LEAKS = ("张三", "13912345678", "zhangsan")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    root = tmp_path_factory.mktemp("fields")
    kit = Kit(root / "keys")
    catalog = CATALOG.read_text()
    assert PER_RECORD in catalog
    (root / "catalog.yaml").write_text(catalog.replace(PER_RECORD, "price: {amount: 1, per: request, currency: CNY}"))
    port = free_port("127.0.0.2")
    config = gateway_config(root / "state", authz=kit.authz_section() | {"catalog": str(root / "catalog.yaml")})
    upstream = start_upstream("127.0.0.2", port, root / "upstream.log")
    gateway = start_gateway(write_config(root / "gateway.yaml", config))
    yield {"kit": kit, "config": config, "root": root, "upstream": f"http://127.0.0.2:{port}"}
    gateway.stop()
    upstream.stop()


@pytest.fixture(scope="module")
def granted(lab):
    kit = lab["kit"]
    grant = kit.grant(datasets=[{"id": "health.residents", "methods": ["GET"], "paths": ["/api/residents*"],
                                 "fields": ["age", "district"]}])
    return {"grant": grant, "licence": kit.licence()}


def fetch(lab, granted, query: str):
    return get(lab, f"/api/residents/21?fields=age&{query}", grant=granted["grant"], licence=granted["licence"])


def test_values_beside_json_records_are_removed(lab, granted):
    response = fetch(lab, granted, "shape=wrapped")
    assert response.status_code == 200, response.text
    assert response.json() == {"data": [{"age": 70, "district": "碧江区"}]}  # no note, no total


@pytest.mark.parametrize("shape, expected", [
    ("xml-attr", '<rs><r age="70"><district>碧江区</district></r>\n<r age="71"><district>碧江区</district></r>\n</rs>'),
    ("xml-text", '<rs><r age="70"><district>碧江区</district></r>\n<r age="71"><district>碧江区</district></r>\n</rs>'),
    ("xml-total", '<rs><items><r age="70"><district>碧江区</district></r>\n<r age="71"><district>碧江区</district></r>\n'
                  "</items></rs>"),
])
def test_xml_outside_the_records_is_removed(lab, granted, shape, expected):
    response = fetch(lab, granted, f"shape={shape}")
    assert response.status_code == 200, response.text
    assert response.text == expected
    assert not any(leak in response.text for leak in LEAKS)


def test_header_fields_outside_the_standard_list_are_removed_and_recorded(lab, granted):
    response = fetch(lab, granted, "head=resident&head=plain")
    assert response.status_code == 200, response.text
    assert "x-resident-name" not in response.headers and "x-other" not in response.headers
    assert not any(leak in str(response.headers) for leak in LEAKS)
    assert response.headers["content-type"] == "application/json"
    assert int(response.headers["content-length"]) == len(response.content)
    grant = record_of(lab, response)["grant"]
    # (the upstream's Server too: free text, not a record's field)
    assert grant["headers_dropped"] == ["header:Server", "header:X-Resident-Name", "header:X-Other"]


def test_a_partial_response_is_refused(lab, granted):
    body = refused(fetch(lab, granted, "partial=1"), "grant_unfilterable", 502)
    assert "records are reduced to the granted fields in a whole body only (Content-Range: bytes 0-" in str(body)
