"""C2SP tlog-witness on loopback with a real `gateway trace witness` process: it cosigns a growing
log, refuses a rollback and a split view (another history under the same key and origin), answers
the spec's status codes; verify with a witness policy passes or fails accordingly."""

import base64
import http.client
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.trace import TraceLog
from gateway.trace.note import SIG_COSIGNATURE_V1, Signer

ORIGIN = "gateway.test/trace"


def cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway.cli", "trace", *argv], capture_output=True,
                          text=True, timeout=60)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def append(base: Path, log_dir: str, ids: range) -> None:
    with TraceLog.open(base / log_dir, origin=ORIGIN, signing_key=base / "key") as log:
        for i in ids:
            log.append_sync({"id": f"{log_dir}-{i}"})


@pytest.fixture
def witness(tmp_path):
    append(tmp_path, "log", range(0))  # creates the log key
    key = Signer.generate("witness.test/w1", SIG_COSIGNATURE_V1)
    (tmp_path / "witness.key").write_text(key.skey() + "\n")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "trace", "witness", "--listen", f"127.0.0.1:{port}",
                             "--key", str(tmp_path / "witness.key"), "--state", str(tmp_path / "wstate"),
                             "--log", f"{ORIGIN}={tmp_path / 'key.pub'}"], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert "listening" in line, line
    yield f"http://127.0.0.1:{port}", key.verifier.vkey(), port
    proc.terminate()
    proc.wait(timeout=10)


def post(port: int, body: bytes) -> tuple[int, str, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/add-checkpoint", body)
    r = conn.getresponse()
    return r.status, r.getheader("Content-Type"), r.read().decode()


def test_witness_cosigns_growth_and_refuses_rollback_and_split_view(tmp_path, witness):
    url, wkey, port = witness
    pub = str(tmp_path / "key.pub")
    logdir = str(tmp_path / "log")
    policy = ["verify", logdir, "--pubkey", pub, "--witness", wkey]
    append(tmp_path, "log", range(0, 300))
    assert cli(*policy).returncode == 1  # not cosigned yet
    saved = tmp_path / "saved"
    shutil.copytree(tmp_path / "log", saved)  # the log as it was at 300 (for the rollback below)
    out = cli("witness-push", logdir, url, "--pubkey", pub, "--witness-key", wkey)
    assert out.returncode == 0 and out.stdout.startswith("\u2014 witness.test/w1 "), out
    result = cli(*policy)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "at size 300 cosigned by witness.test/w1" in result.stderr
    append(tmp_path, "log", range(300, 700))
    out = cli("witness-push", logdir, url, "--pubkey", pub, "--witness-key", wkey)
    assert out.returncode == 0, out
    assert "at size 700 cosigned" in cli(*policy).stderr
    # Rollback: the saved copy at 300 (the witness holds 700).
    out = cli("witness-push", str(saved), url, "--pubkey", pub, "--witness-key", wkey)
    assert out.returncode == 1 and "beyond this log's 300" in out.stdout, out
    # Split view: another history under the same key and origin, longer than what was cosigned.
    append(tmp_path, "other", range(900))
    (tmp_path / "other" / "witness-witness.test_w1.size").write_text("700\n")
    out = cli("witness-push", str(tmp_path / "other"), url, "--pubkey", pub, "--witness-key", wkey)
    assert out.returncode == 1 and "422" in out.stdout, out
    other_policy = ["verify", str(tmp_path / "other"), "--pubkey", pub, "--witness", wkey]
    assert cli(*other_policy).returncode == 1
    # A cosignature copied from the real log onto the other history does not count.
    shutil.copy(tmp_path / "log" / "checkpoint.witnessed", tmp_path / "other" / "checkpoint.witnessed")
    result = cli(*other_policy)
    assert result.returncode == 1 and "root hash does not match" in result.stdout, result.stdout


def test_witness_status_codes(tmp_path, witness):
    url, wkey, port = witness
    append(tmp_path, "log", range(10))
    note = (tmp_path / "log" / "checkpoint").read_text()
    assert post(port, b"garbage")[0] == 400
    status, kind, body = post(port, f"old 0\n\n{note}".encode())
    assert status == 200 and body.startswith("\u2014 witness.test/w1 ")
    status, kind, body = post(port, f"old 3\n\n{note}".encode())
    assert (status, kind, body) == (409, "text/x.tlog.size", "10\n")
    assert post(port, f"old 11\n\n{note}".encode())[0] == 400  # old size beyond the checkpoint
    forger = Signer.generate(ORIGIN)
    text = note.split("\n\n")[0] + "\n"
    assert post(port, f"old 10\n\n{text}\n{forger.sign_note(text)}".encode())[0] == 403
    stranger = Signer.generate("other.test/log")
    body_text = f"other.test/log\n5\n{base64.b64encode(bytes(32)).decode()}\n"
    assert post(port, f"old 0\n\n{body_text}\n{stranger.sign_note(body_text)}".encode())[0] == 404
    # Same size, different root (a split view at equal size): 409.
    signer_key = (tmp_path / "key").read_text()
    from gateway.trace.note import parse_skey
    same_size = f"{ORIGIN}\n10\n{base64.b64encode(bytes(32)).decode()}\n"
    status, _, body = post(port, f"old 10\n\n{same_size}\n{parse_skey(signer_key).sign_note(same_size)}".encode())
    assert (status, body) == (409, "10\n")
    # The cosigned state is persisted per log.
    assert any(p.read_text().split("\n")[1] == "10" for p in (tmp_path / "wstate").iterdir())
    # An equal size takes no proof; sizes are ASCII decimals.
    assert post(port, f"old 10\n{base64.b64encode(bytes(32)).decode()}\n\n{note}".encode())[0] == 422
    assert post(port, f"old \u0661\u0660\n\n{note}".encode())[0] == 400
    for length in ["abc", "-1"]:  # answered at once, never read until the client gives up
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(f"POST /add-checkpoint HTTP/1.1\r\nHost: w\r\nContent-Length: {length}\r\n\r\n".encode())
            assert sock.recv(4096).startswith(b"HTTP/1.1 400"), length
    # A damaged state file: answered 500, nothing cosigned for that log.
    for state in (tmp_path / "wstate").iterdir():
        state.write_text("garbage\n")
    assert post(port, f"old 10\n\n{note}".encode())[0] == 500


def test_log_pushes_checkpoints_to_witness_in_background(tmp_path, witness):
    from gateway.trace import WitnessConfig
    url, wkey, port = witness
    with TraceLog.open(tmp_path / "log", origin=ORIGIN, signing_key=tmp_path / "key",
                       witnesses=[WitnessConfig(url, wkey)]) as log:
        for i in range(500):
            log.append_sync({"id": f"bg-{i}"})
    assert log.witness_error is None
    result = cli("verify", str(tmp_path / "log"), "--pubkey", str(tmp_path / "key.pub"), "--witness", wkey)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "at size 500 cosigned by witness.test/w1" in result.stderr
