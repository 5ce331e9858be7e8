"""Every body framing in bounded memory, and every refusal an answer (issue 20).

A body of unknown length (chunked, an HTTP/1 response ending when its connection closes) is held in
memory up to `dlp.spool_threshold` (here 1 MiB), inspected and redacted like any buffered body; past
it, it is spooled and scanned as it arrives. Either way its head waits with it, so a blocked one is
answered 403 with its transfer id and nothing of it reaches the other side. The worker's peak
resident memory (VmHWM, reset before each transfer through /proc/PID/clear_refs) is asserted.
"""

from __future__ import annotations

import hashlib
import json
import random
import socket
import subprocess
import threading
from pathlib import Path

import pytest

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
BANK_CARD = "6228480012345671"
MIB = 1024 * 1024
PEAK_GROWTH_LIMIT = 150 * MIB  # a 64 MiB body held in memory took over 1 GB before


def random_bytes(size: int) -> bytes:
    """What the upstream's /random sends (tests/upstream_server.py)."""
    rng = random.Random(0)
    return b"".join(rng.randbytes(min(size - offset, MIB)) for offset in range(0, size, MIB))


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    port = free_port("127.0.0.2")
    config = gateway_config(root / "state", workers=1)
    config["dlp"]["spool_threshold"] = "1MiB"
    path = write_config(root / "gateway.yaml", config)
    upstream = start_upstream("127.0.0.2", port, root / "upstream.log")
    gateway = start_gateway(path)
    yield {"root": root, "config": config, "proxy": listener_url(config, "forward"),
           "upstream": f"http://127.0.0.2:{port}", "gateway": gateway}
    gateway.stop()
    upstream.stop()


class PeakMemory:
    """The growth of a process's peak resident memory over a block (VmHWM, reset at its start)."""

    def __init__(self, pid: int):
        self.proc = Path(f"/proc/{pid}")

    def _kib(self, field: str) -> int:
        line = next(line for line in (self.proc / "status").read_text().splitlines() if line.startswith(field))
        return int(line.split()[1])

    def __enter__(self) -> "PeakMemory":
        (self.proc / "clear_refs").write_text("5")  # resets VmHWM to the current RSS
        self.before = self._kib("VmRSS:") * 1024
        return self

    def __exit__(self, *exc) -> None:
        self.growth = self._kib("VmHWM:") * 1024 - self.before
        print(f"peak RSS growth: {self.growth / MIB:.0f} MiB")


def curl(lab, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "--max-time", "120", "-x", lab["proxy"], *args], input=stdin,
                          capture_output=True, timeout=180)


def answer_of(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """An HTTP/1 answer as `curl -i` prints it (interim 100 answers skipped): status, fields, body."""
    head, _, body = raw.partition(b"\r\n\r\n")
    while head.split()[1] == b"100":
        head, _, body = body.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    fields = {name.lower(): value for name, value in (line.split(": ", 1) for line in lines[1:])}
    return int(lines[0].split()[1]), fields, body


def record_of(lab, transfer_id: str) -> dict:
    return trace_records(lab["root"] / "state" / "trace", "--id", transfer_id)[0]


def received(lab) -> list[dict]:
    return [json.loads(line) for line in (lab["root"] / "upstream.log").read_text().splitlines()]


@pytest.mark.parametrize("framing", ["close", "chunked"])
def test_a_large_download_of_unknown_length_passes_in_bounded_memory(lab, tmp_path, framing):
    out = tmp_path / "download"
    with PeakMemory(lab["gateway"].proc.pid) as memory:
        result = curl(lab, "-o", str(out), "-D", "-", f"{lab['upstream']}/random?bytes={64 * MIB}&framing={framing}")
    assert result.returncode == 0, result.stderr
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(random_bytes(64 * MIB)).digest()
    status, fields, _ = answer_of(result.stdout + b"\r\n")
    record = record_of(lab, fields["x-gateway-transfer-id"])
    assert (status, record["decision"], record["resp_bytes"]) == (200, "allow", 64 * MIB)
    assert memory.growth < PEAK_GROWTH_LIMIT


def test_a_large_chunked_upload_passes_in_bounded_memory(lab):
    body = random_bytes(64 * MIB)
    with PeakMemory(lab["gateway"].proc.pid) as memory:
        # -T - reads stdin: sent chunked, its length unknown
        result = curl(lab, "-T", "-", "-X", "POST", f"{lab['upstream']}/sink?case=chunked-upload", stdin=body)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    assert memory.growth < PEAK_GROWTH_LIMIT


def test_twenty_mib_of_random_bytes_close_delimited_pass_as_with_a_length(lab, tmp_path):
    for framing in ("close", "length"):
        out = tmp_path / framing
        result = curl(lab, "-o", str(out), "-w", "%{http_code}", f"{lab['upstream']}/random?bytes={20 * MIB}&framing={framing}")
        assert (result.returncode, result.stdout) == (0, b"200"), (framing, result.stderr)
        assert out.stat().st_size == 20 * MIB


def test_a_small_close_delimited_response_is_still_redacted(lab):
    result = curl(lab, "-i", f"{lab['upstream']}/card?framing=close")
    status, fields, body = answer_of(result.stdout)
    assert status == 200 and body.startswith(b"card ") and BANK_CARD.encode() not in body
    assert record_of(lab, fields["x-gateway-transfer-id"])["decision"] == "redact"


@pytest.mark.parametrize("framing", ["close", "chunked"])
def test_a_blocked_download_past_the_threshold_is_answered_403_not_200(lab, framing):
    # 12 ID numbers at the end of 4 MiB: past the in-memory threshold, the inbound profile blocks them.
    result = curl(lab, "-i", f"{lab['upstream']}/big?bytes={4 * MIB}&ids=12&framing={framing}")
    assert result.returncode == 0, result.stderr
    status, fields, body = answer_of(result.stdout)
    transfer_id = fields["x-gateway-transfer-id"]
    assert status == 403 and json.loads(body)["transfer_id"] == transfer_id
    record = record_of(lab, transfer_id)
    assert (record["decision"], record["status"]) == ("block", 403)
    assert record["rules"][0]["type"] == "cn_id_card"


def test_a_redaction_past_the_threshold_becomes_a_403(lab):
    # A card number must be masked, but a spooled body cannot be rewritten: refused, not cut.
    result = curl(lab, "-i", f"{lab['upstream']}/card?framing=close&pad={2 * MIB}")
    status, fields, body = answer_of(result.stdout)
    assert status == 403 and json.loads(body)["transfer_id"] == fields["x-gateway-transfer-id"]


class RawUpstream:
    """A TCP listener that records every byte any connection sends it (and answers nothing)."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.2", 0))
        self.port = self.sock.getsockname()[1]
        self.received = bytearray()
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                self.received += data

    def close(self) -> None:
        self.sock.close()


def exchange(lab, raw: bytes, timeout: float = 15.0) -> bytes:
    """Send `raw` in one write to the forward listener; everything it answers until it closes or goes quiet."""
    host, port = lab["proxy"].removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(raw)
        answer = b""
        try:
            while data := sock.recv(65536):
                answer += data
        except TimeoutError:
            pass
    return answer


def chunked(pieces: list[bytes]) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces) + b"0\r\n\r\n"


@pytest.mark.parametrize("size", [1000, 3 * MIB])
def test_a_blocked_chunked_upload_is_answered_403_and_its_head_never_leaves(lab, size):
    upstream = RawUpstream()
    try:
        half = ID_NUMBER.encode()[:9], ID_NUMBER.encode()[9:]
        filler = b"x" * size
        body = chunked([filler + b" sfzh " + half[0], half[1] + b" end"])  # the ID split across two chunks
        raw = (f"POST http://127.0.0.2:{upstream.port}/upload HTTP/1.1\r\nHost: 127.0.0.2:{upstream.port}\r\n"
               "Content-Type: text/plain\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n").encode() + body
        status, fields, answer = answer_of(exchange(lab, raw))
    finally:
        upstream.close()
    assert status == 403 and json.loads(answer)["transfer_id"] == fields["x-gateway-transfer-id"]
    assert (upstream.connections, bytes(upstream.received)) == (0, b"")
    record = record_of(lab, fields["x-gateway-transfer-id"])
    assert (record["decision"], record["status"]) == ("block", 403)


# Limits exact whatever the segmentation: each head below arrives in one write.

def last_record(lab) -> dict:
    return trace_records(lab["root"] / "state" / "trace")[-1]


def refused_head(lab, raw: bytes, status: int) -> dict:
    """The answer to `raw` is the gateway's refusal `status` with a transfer id, and recorded so."""
    answer = exchange(lab, raw)
    got, fields, body = answer_of(answer)
    assert got == status, answer[:300]
    record = record_of(lab, fields["x-gateway-transfer-id"])
    assert (record["status"], record["decision"]) == (status, "error")
    return json.loads(body)


def request_to(lab, port: int, *lines: str, body: bytes = b"") -> bytes:
    head = [f"POST http://127.0.0.2:{port}/x HTTP/1.1", f"Host: 127.0.0.2:{port}", *lines]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


@pytest.mark.parametrize("fields", [["X-Big: " + "a" * 100 * 1024], [f"X-F{i}: v" for i in range(10_000)]],
                         ids=["100-KiB-field", "10000-fields"])
def test_a_head_too_large_in_one_write_is_refused_431(lab, fields):
    upstream = RawUpstream()
    try:
        refused_head(lab, request_to(lab, upstream.port, *fields, "Content-Length: 0"), 431)
    finally:
        upstream.close()
    assert upstream.connections == 0


@pytest.mark.parametrize("size", [b"ffffffffffffffffffff", b"zz", b"-5"])
def test_an_invalid_chunk_size_is_answered_400_and_recorded(lab, size):
    upstream = RawUpstream()
    try:
        raw = request_to(lab, upstream.port, "Transfer-Encoding: chunked", body=b"5\r\nhello\r\n" + size + b"\r\nxyz")
        refused_head(lab, raw, 400)
    finally:
        upstream.close()
    assert upstream.connections == 0


def test_an_http_version_other_than_1_0_or_1_1_is_refused_505(lab):
    upstream = RawUpstream()
    try:
        raw = request_to(lab, upstream.port, "Content-Length: 0").replace(b"HTTP/1.1", b"HTTP/9.9", 1)
        refused_head(lab, raw, 505)
    finally:
        upstream.close()
    assert upstream.connections == 0


def test_an_h2c_preface_inside_a_plain_connect_is_not_forwarded(lab):
    upstream = RawUpstream()
    host, port = lab["proxy"].removeprefix("http://").rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(f"CONNECT 127.0.0.2:{upstream.port} HTTP/1.1\r\nHost: 127.0.0.2:{upstream.port}\r\n\r\n".encode())
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
            sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            answer = b""
            while data := sock.recv(65536):
                answer += data
    finally:
        upstream.close()
    assert answer.startswith(b"HTTP/1.1 505"), answer[:200]
    assert b"PRI" not in bytes(upstream.received)


def test_a_refused_connect_closes_its_connection(lab):
    host, port = lab["proxy"].removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        # The shipped policy opens no tunnel from the extranet to the extranet (127.0.0.1).
        sock.sendall(b"CONNECT 127.0.0.1:25 HTTP/1.1\r\nHost: 127.0.0.1:25\r\n\r\n")
        answer = b""
        while data := sock.recv(65536):  # ends: the gateway closed the connection
            answer += data
    status, fields, _ = answer_of(answer)
    assert status == 403 and fields["x-gateway-transfer-id"]


def test_a_long_run_of_one_letter_is_not_refused_as_base64(lab):
    # Base64's alphabet, but filler: it decodes to three bytes repeated, no content to inspect.
    body = b"a" * (16 * MIB)
    result = curl(lab, "-T", "-", "-X", "POST", "-H", "content-type: text/plain",
                  f"{lab['upstream']}/sink?case=letters", stdin=body)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["bytes"] == len(body)
