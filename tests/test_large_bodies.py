"""Bodies above the spool threshold: spooled to disk while scanned, released only when clean, answered
with a refusal when not (their head is held with them: nothing of a blocked one leaves).

The gateway's peak resident memory (VmHWM) is read from /proc after a 1 GiB upload.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from gateway.dlp.tally import KEPT_LOCATIONS, places_digest
from tests.citizens import citizens, id_places
from tests.gatewayproc import (
    free_port,
    gateway_config,
    listener_url,
    start_gateway,
    start_upstream,
    trace_records,
    write_config,
)

ID_NUMBER = "11010519491231002X"
MIB = 1024 * 1024
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    root = tmp_path_factory.mktemp("large")
    port = free_port("127.0.0.2")
    config = gateway_config(root / "state")
    config["dlp"]["spool_threshold"] = "1MiB"
    path = write_config(root / "gateway.yaml", config)
    upstream = start_upstream("127.0.0.2", port, root / "upstream.log")
    gateway = start_gateway(path)
    yield {"root": root, "proxy": listener_url(config, "forward"), "upstream": f"http://127.0.0.2:{port}",
           "gateway": gateway}
    gateway.stop()
    upstream.stop()


def text_body(path: Path, size: int, tail: bytes = b"") -> Path:
    block = b"quarterly transport statistics for the district, nothing personal in here\n" * 14000
    with path.open("wb") as out:
        remaining = size - len(tail)
        while remaining > 0:
            piece = block[:remaining]
            out.write(piece)
            remaining -= len(piece)
        out.write(tail)
    return path


def curl(big, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "--max-time", "120", "-x", big["proxy"], *args],
                          capture_output=True, text=True, timeout=180)


def received(big) -> list[dict]:
    log = big["root"] / "upstream.log"  # written from the upstream's first request on
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def logged(big) -> list[dict]:
    return trace_records(big["root"] / "state" / "trace")


def test_clean_large_upload_is_released_byte_for_byte(big, tmp_path):
    body = text_body(tmp_path / "clean.txt", 20 * MIB)
    result = curl(big, "-H", "content-type: text/plain; charset=utf-8", "--data-binary", f"@{body}",
                  f"{big['upstream']}/sink?case=clean")
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer == {"bytes": 20 * MIB, "sha256": hashlib.sha256(body.read_bytes()).hexdigest()}
    record = next(r for r in logged(big) if r["url"].endswith("/sink?case=clean"))
    assert record["decision"] == "allow" and record["req_bytes"] == 20 * MIB
    assert record["req_digest"] == "sha256:" + answer["sha256"]


def refusal(result: subprocess.CompletedProcess) -> tuple[int, dict, str]:
    """curl run with `-i`: the status, the JSON body and the X-Gateway-Transfer-Id of its answer."""
    head, _, body = result.stdout.partition("\n\n")
    while head.split()[1] == "100":  # curl's Expect: 100-continue was answered first
        head, _, body = body.partition("\n\n")
    fields = dict(line.split(": ", 1) for line in head.splitlines()[1:])
    return int(head.split()[1]), json.loads(body), fields.get("X-Gateway-Transfer-Id", "")


def test_large_upload_with_an_id_number_at_the_end_is_refused_403_and_never_arrives(big, tmp_path):
    body = text_body(tmp_path / "leak.txt", 20 * MIB, tail=f" sfzh {ID_NUMBER}\n".encode())
    result = curl(big, "-i", "-H", "content-type: text/plain; charset=utf-8", "--data-binary", f"@{body}",
                  f"{big['upstream']}/sink?case=leak")
    assert result.returncode == 0, result.stderr
    status, answer, transfer_id = refusal(result)
    assert status == 403 and answer["transfer_id"] == transfer_id and transfer_id
    assert not any(r["path"] == "/sink?case=leak" for r in received(big))
    record = next(r for r in logged(big) if r["url"].endswith("/sink?case=leak"))
    assert record["decision"] == "block" and record["id"] == transfer_id and record["status"] == 403
    assert record["rules"][0]["type"] == "cn_id_card"
    assert record["req_bytes"] == body.stat().st_size


def test_chunked_upload_with_an_id_number_is_refused_403(big, tmp_path):
    body = text_body(tmp_path / "chunked.txt", 3 * MIB, tail=f" {ID_NUMBER}\n".encode())
    result = curl(big, "-i", "-H", "transfer-encoding: chunked", "-H", "content-type: text/plain; charset=utf-8",
                  "--data-binary", f"@{body}", f"{big['upstream']}/sink?case=chunked")
    assert result.returncode == 0, result.stderr
    status, answer, transfer_id = refusal(result)
    assert status == 403 and answer["transfer_id"] == transfer_id
    assert not any(r["path"] == "/sink?case=chunked" for r in received(big))


def test_large_response_with_a_bulk_of_id_numbers_is_withheld(big, tmp_path):
    # The inbound profile blocks ten or more ID numbers; these come in the last bytes of 20 MiB.
    result = curl(big, "-i", f"{big['upstream']}/big?bytes={20 * MIB}&ids=12")
    assert result.returncode == 0, result.stderr
    status, answer, transfer_id = refusal(result)  # the upstream's 200 head was held with its body
    assert status == 403 and answer["transfer_id"] == transfer_id
    record = next(r for r in logged(big) if "/big?" in r["url"] and "ids=12" in r["url"])
    assert record["decision"] == "block" and record["rules"][0]["type"] == "cn_id_card"
    assert record["id"] == transfer_id and record["status"] == 403
    out = tmp_path / "download"
    clean = curl(big, "-o", str(out), "-w", "%{http_code}", f"{big['upstream']}/big?bytes={20 * MIB}")
    assert clean.stdout == "200" and out.stat().st_size == 20 * MIB


def test_one_gib_upload_passes_inspected_in_bounded_memory(big, tmp_path):
    body = text_body(tmp_path / "gib.txt", 1024 * MIB)
    # -T streams the file (--data-binary would load it into curl's memory first).
    result = curl(big, "-X", "POST", "-H", "content-type: text/plain; charset=utf-8", "-T", str(body),
                  f"{big['upstream']}/sink?case=gib")
    body.unlink()
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["bytes"] == 1024 * MIB
    status = Path(f"/proc/{big['gateway'].proc.pid}/status").read_text()
    peak_kib = int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1])
    print(f"gateway peak RSS after a 1 GiB upload: {peak_kib / 1024:.0f} MiB")
    assert peak_kib < 300 * 1024



def test_a_bulk_export_past_the_buffering_threshold_is_refused_with_every_record_counted(big, tmp_path):
    """110,000 citizen records (14 MB of JSON): more detections than a stream held whole (it answered
    "too many candidate matches"); counted and digested, every one, and refused as the export it is."""
    people = citizens(110_000)
    export = json.dumps(people, ensure_ascii=False).encode()
    body = tmp_path / "export.json"
    body.write_bytes(export)
    result = curl(big, "-i", "-H", "content-type: application/json", "--data-binary", f"@{body}",
                  f"{big['upstream']}/sink?case=export")
    assert result.returncode == 0, result.stderr
    status, answer, transfer_id = refusal(result)
    places = id_places(export, people)
    first = [f"body:offset {offset}" for _, offset in places[:KEPT_LOCATIONS]]
    assert status == 403 and {"rule": "id-card", "type": "cn_id_card", "count": 110_000,
                              "locations": first} in answer["reasons"], answer
    record = next(r for r in logged(big) if r["url"].endswith("/sink?case=export"))
    assert record["decision"] == "block" and record["id"] == transfer_id
    assert {"rule": "id-card", "type": "cn_id_card", "action": "block", "count": 110_000, "locations": first,
            "locations_sha256": places_digest(places)} in record["rules"]
    assert not any(r["path"] == "/sink?case=export" for r in received(big))
