"""Tamper suite for `gateway trace verify` and the proof commands: each kind of tampering is
detected (exit 1) and located; proofs round-trip and wrong ones are rejected."""

import base64
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.trace import TraceLog
from gateway.trace.log import open_store
from gateway.trace.note import Signer
from gateway.trace.tiles import encode_entries, read_journal, tile_path
from tests.tracecli import run_trace as run
from tests.tracecli import write_log

ORIGIN = "gateway.test/trace"
RECORDS = 600  # two full bundles, a third partial one in the journal


def record(i: int) -> dict:
    return {"v": 1, "id": f"tx-{i:05d}", "time": f"2026-11-26T06:{i // 60 % 60:02d}:{i % 60:02d}.000Z",
            "client": {"addr": "127.0.0.1:5555", "zone": "extranet" if i % 2 else "intranet"},
            "upstream": {"host": "127.0.0.2", "zone": "internet"}, "method": "POST", "status": 200,
            "decision": "block" if i % 7 == 0 else "allow",
            "rules": [{"rule": "cn-id-outbound", "type": "cn_id_card"}] if i % 7 == 0 else []}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    # Two immutable full bundles, the third in the journal.
    return write_log(tmp_path_factory.mktemp("pristine"), ORIGIN, map(record, range(RECORDS)))


@pytest.fixture
def logdir(pristine, tmp_path) -> Path:
    shutil.copytree(pristine, tmp_path / "copy")
    return tmp_path / "copy"


def verify(base: Path, capsys) -> tuple[int, str]:
    rc = run("verify", str(base / "log"), "--pubkey", str(base / "key.pub"))
    return rc, capsys.readouterr().out


def bundle(base: Path, n: int) -> Path:
    return base / "log" / tile_path("entries", n)


def split_entries(data: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(data):
        n = struct.unpack_from(">H", data, pos)[0]
        out.append(data[pos:pos + 2 + n])
        pos += 2 + n
    return out


def test_intact_log_verifies(logdir, capsys):
    rc, out = verify(logdir, capsys)
    assert rc == 0 and f"OK: {RECORDS} records" in out


def test_changed_byte_in_bundle(logdir, capsys):
    path = bundle(logdir, 1)
    data = bytearray(path.read_bytes())
    pos = data.index(b"tx-00300")
    data[pos + 7] ^= 1  # tx-00300 -> tx-00301
    path.write_bytes(bytes(data))
    rc, out = verify(logdir, capsys)
    assert rc == 1 and "record 300 " in out and "tile/entries/001 entry 44" in out


@pytest.mark.parametrize("kind", ["deleted", "inserted", "reordered"])
def test_record_deleted_inserted_reordered(logdir, capsys, kind):
    path = bundle(logdir, 0)
    entries = split_entries(path.read_bytes())
    if kind == "deleted":
        del entries[10]
    elif kind == "inserted":
        entries.insert(10, entries[3])
    else:
        entries[10], entries[11] = entries[11], entries[10]
    path.write_bytes(b"".join(entries))
    rc, out = verify(logdir, capsys)
    assert rc == 1 and "record 10 " in out, out
    if kind != "reordered":
        assert "tile/entries/000: holds" in out


def test_changed_record_in_journal_tail(logdir, capsys):
    journal = logdir / "log" / "journal"
    data = bytearray(journal.read_bytes())
    pos = data.index(b"tx-00555")
    data[pos + 7] = ord("6")
    journal.write_bytes(bytes(data))
    rc, out = verify(logdir, capsys)
    assert rc == 1 and "record 555 (journal entry 43)" in out


def test_tail_truncated_below_checkpoint(logdir, capsys):
    journal = logdir / "log" / "journal"
    data = journal.read_bytes()
    journal.write_bytes(data[:len(data) - 200])
    rc, out = verify(logdir, capsys)
    assert rc == 1 and "checkpoint covers 600 records" in out and "removed below the checkpoint" in out


def test_altered_checkpoint(logdir, capsys):
    cp = logdir / "log" / "checkpoint"
    cp.write_text(cp.read_text().replace("\n600\n", "\n599\n"))
    rc, out = verify(logdir, capsys)
    assert rc == 1 and "checkpoint: forged or altered" in out and "does not verify" in out


def test_forged_checkpoint_with_another_key(logdir, capsys):
    forger = Signer.generate(ORIGIN)
    cp = logdir / "log" / "checkpoint"
    body = cp.read_text().split("\n\n")[0] + "\n"
    cp.write_text(f"{body}\n{forger.sign_note(body)}")
    rc, out = verify(logdir, capsys)
    assert rc == 1 and "no signature by gateway.test/trace" in out


def test_consistent_rewrite_caught_by_root(logdir, capsys):
    """A record changed together with its level-0 tile is still caught by the signed root."""
    from gateway.trace.merkle import leaf_hash
    path = bundle(logdir, 0)
    entries = split_entries(path.read_bytes())
    entries[0] = entries[0].replace(b"POST", b"GETX")
    path.write_bytes(b"".join(entries))
    tile = logdir / "log" / tile_path(0, 0)
    hashes = bytearray(tile.read_bytes())
    hashes[0:32] = leaf_hash(entries[0][2:])
    tile.write_bytes(bytes(hashes))
    rc, out = verify(logdir, capsys)
    assert rc == 1 and "root hash does not match" in out


def test_missing_bundle_and_usage_errors(logdir, capsys):
    bundle(logdir, 1).unlink()
    rc, out = verify(logdir, capsys)
    assert rc == 1 and "tile/entries/001: missing" in out
    assert run("verify", str(logdir / "nope"), "--pubkey", str(logdir / "key.pub")) == 2
    capsys.readouterr()
    assert run("verify", str(logdir / "log"), "--pubkey", str(logdir / "missing.pub")) == 2
    assert "missing.pub: no such file" in capsys.readouterr().err


def test_show_filters(logdir, capsys):
    assert run("show", str(logdir / "log"), "--id", "tx-00042") == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(x)["index"] for x in lines] == [42]
    assert run("show", str(logdir / "log"), "--rule", "cn-id-outbound", "--zone", "extranet",
               "--since", "2026-11-26T06:01:00Z", "--until", "2026-11-26T06:02:00Z") == 0
    got = [json.loads(x)["record"]["id"] for x in capsys.readouterr().out.splitlines()]
    want = [record(i)["id"] for i in range(RECORDS) if i % 7 == 0 and i % 2 and 60 <= i % 3600 < 120]
    assert got == want and got


def test_show_lists_records_the_lazily_replaced_checkpoint_file_does_not_cover_yet(logdir, capsys):
    # A record is answered once its journal frame is durable; the checkpoint file follows later.
    lagging = (logdir / "log" / "checkpoint").read_bytes()
    with TraceLog.open(logdir / "log", origin=ORIGIN, signing_key=logdir / "key") as log:
        for i in range(RECORDS, RECORDS + 3):
            log.append_sync(record(i))
    (logdir / "log" / "checkpoint").write_bytes(lagging)
    for key in ((), ("--pubkey", str(logdir / "key.pub"))):
        assert run("show", str(logdir / "log"), "--id", f"tx-{RECORDS + 2:05d}", *key) == 0
        assert [json.loads(x)["index"] for x in capsys.readouterr().out.splitlines()] == [RECORDS + 2]


def test_show_piped_into_head_ends_quietly(logdir):
    pipeline = subprocess.run(f"{sys.executable} -m gateway trace show {logdir / 'log'} | head -n 1",
                              shell=True, capture_output=True, text=True, timeout=60)
    assert json.loads(pipeline.stdout)["index"] == 0
    assert pipeline.stderr == ""  # no "Broken pipe" complaint once head has its line


def test_prove_and_check_proof_round_trip(logdir, tmp_path, capsys):
    proof = tmp_path / "p.tlog-proof"
    pub = str(logdir / "key.pub")
    for tx in ("tx-00000", "tx-00300", "tx-00599"):
        assert run("prove", str(logdir / "log"), tx, "--pubkey", pub, "-o", str(proof)) == 0
        assert run("check-proof", str(proof), "--pubkey", pub) == 0
        assert json.loads(capsys.readouterr().out)["record"]["id"] == tx
    # A wrong proof: one flipped bit in a proof hash, a changed record, a surplus element.
    text = proof.read_text()
    head, _, note = text.partition("\n\n")
    lines = head.split("\n")
    flipped = bytearray(base64.b64decode(lines[3]))
    flipped[0] ^= 1
    bad_hash = "\n".join(lines[:3] + [base64.b64encode(flipped).decode()] + lines[4:]) + "\n\n" + note
    other = base64.b64encode(json.dumps(record(1), sort_keys=True, separators=(",", ":")).encode()).decode()
    bad_record = "\n".join([lines[0], f"extra {other}"] + lines[2:]) + "\n\n" + note
    surplus = "\n".join(lines + [lines[-1]]) + "\n\n" + note
    other_script_digit = text.replace("\nindex 599\n", "\nindex \u0665\u0669\u0669\n")
    assert other_script_digit != text
    for bad in (bad_hash, bad_record, surplus, other_script_digit):
        proof.write_text(bad)
        assert run("check-proof", str(proof), "--pubkey", pub) == 1
        assert "INVALID" in capsys.readouterr().out
    proof.write_bytes(b"\xff" + text.encode())  # not UTF-8: INVALID, not a traceback
    assert run("check-proof", str(proof), "--pubkey", pub) == 1
    assert "INVALID" in capsys.readouterr().out
    assert run("prove", str(logdir / "log"), "tx-99999", "--pubkey", pub) == 1


def test_consistency_with_old_checkpoint(logdir, tmp_path, capsys):
    old = tmp_path / "old-checkpoint"
    shutil.copy(logdir / "log" / "checkpoint", old)
    with TraceLog.open(logdir / "log", origin=ORIGIN, signing_key=logdir / "key") as log:
        for i in range(RECORDS, RECORDS + 300):
            log.append_sync(record(i))
    pub = str(logdir / "key.pub")
    assert run("consistency", str(logdir / "log"), str(old), "--pubkey", pub) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["old_size"], result["new_size"]) == (600, 900) and result["proof"]
    # A rewritten history (a split view) cannot be proven consistent with the old checkpoint.
    other = tmp_path / "other"
    with TraceLog.open(other, origin=ORIGIN, signing_key=logdir / "key") as log:
        for i in range(700):
            log.append_sync(record(i + 1))
    assert run("consistency", str(other), str(old), "--pubkey", pub) == 1
    assert "INCONSISTENT" in capsys.readouterr().out


def test_witness_cosignature_policy(logdir, tmp_path, capsys):
    """verify --witness / --witness-policy require valid tlog-cosignature/v1 cosignatures."""
    from gateway.trace.note import SIG_COSIGNATURE_V1
    w1 = Signer.generate("witness.test/a", SIG_COSIGNATURE_V1)
    w2 = Signer.generate("witness.test/b", SIG_COSIGNATURE_V1)
    cp = logdir / "log" / "checkpoint"
    signed = cp.read_text()
    body = signed.split("\n\n")[0] + "\n"
    log_args = ["verify", str(logdir / "log"), "--pubkey", str(logdir / "key.pub")]
    assert run(*log_args, "--witness", w1.verifier.vkey()) == 1
    assert "witness policy not met" in capsys.readouterr().out
    cp.write_text(signed + w1.cosign(body))
    assert run(*log_args, "--witness", w1.verifier.vkey()) == 0
    policy = tmp_path / "policy"
    policy.write_text(f"witness {w1.verifier.vkey()}\nwitness {w2.verifier.vkey()}\nquorum 2\n")
    assert run(*log_args, "--witness-policy", str(policy)) == 1
    policy.write_text(f"witness {w1.verifier.vkey()}\nwitness {w2.verifier.vkey()}\nquorum 1\n")
    assert run(*log_args, "--witness-policy", str(policy)) == 0
    # A cosignature over a different checkpoint body does not count.
    cp.write_text(signed + w1.cosign(body.replace("\n600\n", "\n601\n")))
    assert run(*log_args, "--witness", w1.verifier.vkey()) == 1


def test_altered_checkpoint_frame_in_journal(logdir, capsys):
    """The journal's signed checkpoint frames are checked like the checkpoint file."""
    journal = logdir / "log" / "journal"
    data = journal.read_bytes()
    pos = data.index(b"\n550\n")
    journal.write_bytes(data[:pos] + b"\n551\n" + data[pos + 5:])
    rc, out = verify(logdir, capsys)
    assert rc == 1 and "journal: checkpoint frame at byte" in out and "(size 550): forged or altered" in out
    # The last frame's signature: a frame that landed whole is no torn write, even the last one.
    journal.write_bytes(data[:-2] + bytes([data[-2] ^ 1]) + data[-1:])
    rc, out = verify(logdir, capsys)
    assert rc == 1 and "journal: checkpoint frame at byte" in out and "(size 600): forged or altered" in out


def test_partial_tiles_above_level_0_are_checked(logdir, capsys):
    """A tlog-tiles client reads the right edge from partial tiles; each one must match the records."""
    partial = logdir / "log" / tile_path(1, 0, 2)
    good = partial.read_bytes()
    partial.write_bytes(bytes(len(good)))
    rc, out = verify(logdir, capsys)
    assert rc == 1 and "tile/1/000.p/2: does not match the tiles below it" in out
    partial.write_bytes(b"")  # written without fsync: a power loss may leave it empty
    assert verify(logdir, capsys)[0] == 0
    wider = logdir / "log" / tile_path(1, 0, 3)  # as a running writer may publish after verify read the journal
    wider.write_bytes(good + good[:32])
    assert verify(logdir, capsys)[0] == 0


BIG = 70_000  # past tile/0/270 (records 69,120..69,375); the journal still starts at record 0
OLD_CHECKPOINT = 69_000  # a checkpoint file from before tile/0/270 was complete


@pytest.fixture(scope="module")
def big_log(tmp_path_factory) -> Path:
    """BASE/log of BIG records, all in the journal (full tiles past its start are derived), and
    BASE/old-checkpoint, the checkpoint file as it was at OLD_CHECKPOINT records."""
    base = tmp_path_factory.mktemp("big")
    store = open_store(base / "log", ORIGIN, base / "key", rotate_bundles=1000)
    entries = [json.dumps(record(i), sort_keys=True, separators=(",", ":")).encode() for i in range(BIG)]
    for first, last in ((0, OLD_CHECKPOINT), (OLD_CHECKPOINT, BIG)):
        for batch in range(first, last, 4096):
            store.commit(entries[batch:min(batch + 4096, last)])
            store.maintain()
        store.publish()
        if first == 0:
            shutil.copy(base / "log" / "checkpoint", base / "old-checkpoint")
    store.finish_sync()
    store.close_files()
    (base / "key.pub").write_text(store.signer.verifier.vkey() + "\n")
    assert read_journal(base / "log" / "journal").start == 0
    return base


@pytest.mark.parametrize("name", [tile_path(0, 270), tile_path("entries", 270), tile_path(1, 0)])
def test_full_file_covered_by_the_checkpoint_must_exist_even_where_the_journal_holds_it(big_log, tmp_path, capsys, name):
    """The writer fsyncs a full tile or bundle before the checkpoint file covering it: a C2SP client
    reading that checkpoint needs it, so missing, emptied or cut short it is an error."""
    base = tmp_path / "big"
    shutil.copytree(big_log, base)
    assert verify(base, capsys)[0] == 0
    path = base / "log" / name
    good = path.read_bytes()
    for damage in ("missing", "empty", "short"):
        if damage == "missing":
            path.unlink()
        else:
            path.write_bytes(b"" if damage == "empty" else good[:-32])
        rc, out = verify(base, capsys)
        assert rc == 1 and f"TAMPERED: {name}: " in out, (damage, out)
        assert ("missing" in out) if damage == "missing" else ("bytes" in out), out
    # Not yet derived: the checkpoint file is older than the tile (a crash before its publication).
    if name != tile_path(1, 0):
        shutil.copy(big_log / "old-checkpoint", base / "log" / "checkpoint")
        for damage in (None, b""):
            if damage is None:
                path.unlink()
            else:
                path.write_bytes(damage)
            rc, out = verify(base, capsys)
            assert rc == 0 and f"OK: {BIG} records" in out, out
        path.write_bytes(good[:-32] + bytes(32))  # present, but wrong: always an error
        assert verify(base, capsys)[0] == 1


def test_swapped_records_with_rewritten_tiles_name_the_first_changed_record(logdir, capsys):
    """Records 10 and 11 swapped and every hash tile rewritten to match: only the signed roots
    disagree. The journal's first frame is at its start (512): the message must not blame an
    empty range "512..511" but name the first record no signed root vouches for."""
    from gateway.trace.merkle import leaf_hashes, perfect_root
    path = bundle(logdir, 0)
    entries = split_entries(path.read_bytes())
    entries[10], entries[11] = entries[11], entries[10]
    path.write_bytes(b"".join(entries))
    leaves = leaf_hashes([e[2:] for e in entries])
    (logdir / "log" / tile_path(0, 0)).write_bytes(b"".join(leaves))
    for partial in (logdir / "log" / "tile" / "1" / "000.p").iterdir():
        data = bytearray(partial.read_bytes())
        data[:32] = perfect_root(leaves)
        partial.write_bytes(bytes(data))
    assert read_journal(logdir / "log" / "journal").checkpoints[0][0] == 512
    rc, out = verify(logdir, capsys)
    assert rc == 1 and "the first changed record is record 0 or a later one before 512" in out, out
    assert "512..511" not in out


def test_swapped_records_in_the_journal_with_rewritten_derived_files(tmp_path, capsys):
    """The same in the journal, one signed frame per record: the first changed record is named exactly."""
    from gateway.trace.merkle import leaf_hashes
    base = tmp_path / "j"
    with TraceLog.open(base / "log", origin=ORIGIN, signing_key=base / "key") as log:
        for i in range(300):
            log.append_sync(record(i))
    journal = base / "log" / "journal"
    data = bytearray(journal.read_bytes())
    a, b = data.index(b"tx-00100"), data.index(b"tx-00102")  # same length, same zone
    data[a:a + 8], data[b:b + 8] = data[b:b + 8], data[a:a + 8]
    journal.write_bytes(bytes(data))
    entries = read_journal(journal).entries
    (base / "log" / tile_path("entries", 0)).write_bytes(encode_entries(entries[:256]))
    (base / "log" / tile_path(0, 0)).write_bytes(b"".join(leaf_hashes(entries[:256])))
    rc, out = verify(base, capsys)
    assert rc == 1 and "the first changed record is record 100 or a later one before 101" in out, out


def test_journal_region_records_checked_against_frames_and_derived_tiles(tmp_path, capsys):
    """With the default rotation every record is still in the journal: a changed record is caught by
    its batch's signed checkpoint frame and located by the derived bundle."""
    base = tmp_path / "j"
    with TraceLog.open(base / "log", origin=ORIGIN, signing_key=base / "key") as log:
        for i in range(300):
            log.append_sync(record(i))
    assert verify(base, capsys)[0] == 0
    journal = base / "log" / "journal"
    good = journal.read_bytes()
    data = bytearray(good)
    pos = data.index(b"tx-00100")
    data[pos + 7] = ord("9")
    journal.write_bytes(bytes(data))
    rc, out = verify(base, capsys)
    assert rc == 1 and "record 100 (journal entry 100): differs from tile/entries/000" in out
    # A torn last batch (zeroed sector after the last good frame) is a note, not tampering.
    journal.write_bytes(good + b"\x00\x30" + b'{"id":"never-acknowledged"' + bytes(600))
    rc, out = verify(base, capsys)
    assert rc == 0, out


def test_every_log_command_takes_the_configuration_or_dir_and_says_what_a_wrong_folder_lacks(tmp_path, capsys):
    """`-c CONFIG` finds trace.dir and the verifier key beside the gateway's signing key; DIR still
    works with DIR's copy of that key, under the same name; the state folder is not a log."""
    from gateway.proxy.state import trace_key_path
    from tests.gatewayproc import gateway_config, write_config
    state = tmp_path / "state"
    config = gateway_config(state)
    with TraceLog.open(state / "trace", origin=config["trace"]["origin"], signing_key=trace_key_path(state)) as log:
        for i in range(300):
            log.append_sync(record(i))
    assert sorted(p.name for p in state.glob("*.pub")) == ["trace-signing.pub"]
    assert sorted(p.name for p in (state / "trace").glob("*.pub")) == ["trace-signing.pub"]
    config_file = write_config(tmp_path / "gateway.yaml", config)
    old = tmp_path / "old-checkpoint"
    shutil.copy(state / "trace" / "checkpoint", old)
    for log_args in (["-c", str(config_file)], [str(state / "trace")]):
        assert run("verify", *log_args) == 0 and "OK: 300 records" in capsys.readouterr().out
        assert run("show", *log_args, "--id", "tx-00007") == 0
        assert json.loads(capsys.readouterr().out)["index"] == 7
        assert run("prove", *log_args, "tx-00007", "-o", str(tmp_path / "proof")) == 0
        assert run("meter", *log_args, "--by", "decision") == 0
        assert json.loads(capsys.readouterr().out)["total"]["transfers"] == 300
        assert run("consistency", *log_args, str(old)) == 0
    for key_args in (["-c", str(config_file)], ["--pubkey", str(state / "trace-signing.pub")]):
        assert run("check-proof", str(tmp_path / "proof"), *key_args) == 0
    capsys.readouterr()
    assert run("verify", str(state)) == 2  # the state folder, not its trace/
    err = capsys.readouterr().err
    assert "not a trace log directory: expected its 'checkpoint' and 'journal' files" in err and "trace/" in err, err
    assert run("verify", str(state / "trace"), "-c", str(config_file)) == 2
    assert "either as DIR or with -c CONFIG" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text("gateway: [\n")
    assert run("verify", "-c", str(tmp_path / "bad.yaml")) == 2
    assert "bad.yaml" in capsys.readouterr().err
