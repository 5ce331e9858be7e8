"""Offline auditing of a trace log directory: full verification, record listing, proofs.

Everything here reads files only and trusts nothing in them: hashes are recomputed from the
entries, and the only anchor is the checkpoint signature checked against a key given by the
auditor.
"""

import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from gateway.trace.merkle import (
    HASH_SIZE, ProofError, consistency_proof, inclusion_proof, leaf_hash, perfect_root, tree_root,
    verify_consistency, verify_inclusion,
)
from gateway.trace.note import (
    Checkpoint, Note, NoteError, Verifier, open_checkpoint, parse_checkpoint_body, parse_note,
    verify_signature,
)
from gateway.trace.tiles import (
    TILE_HEIGHT, TILE_WIDTH, TileError, parse_entries, read_journal, tail_reader, tile_path,
)

PROOF_HEADER = "c2sp.org/tlog-proof@v1"


class AuditIOError(OSError):
    """The directory cannot be read at all (exit status 2, not evidence of tampering)."""


@dataclass
class WitnessPolicy:
    witnesses: list[Verifier]
    quorum: int

    def check(self, note: Note) -> list[str]:
        """Names of witnesses whose valid cosignature is on `note`; raises NoteError below quorum
        or if any configured witness's signature is present but invalid."""
        good = []
        for w in self.witnesses:
            try:
                verify_signature(note, w)
                good.append(w.name)
            except NoteError as exc:
                if "no signature" not in str(exc):
                    raise
        if len(good) < self.quorum:
            raise NoteError(f"checkpoint has {len(good)} valid witness cosignature(s), policy requires {self.quorum}")
        return good


@dataclass
class VerifyReport:
    records: int = 0
    checkpoint: Checkpoint | None = None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise AuditIOError(f"{path}: {exc.strerror}") from exc


class _Nodes:
    """Node hashes recomputed from entries: one hash per full bundle, plus leaf hashes of the
    journal and of the bundle holding the checkpoint's edge when that edge is inside one."""

    def __init__(self, tail_start: int) -> None:
        self.bundle_roots: list[bytes] = []
        self.bundle_leaves: dict[int, list[bytes]] = {}
        self.tail_start = tail_start
        self.tail: list[bytes] = []

    def node_hash(self, height: int, index: int) -> bytes:
        if height >= TILE_HEIGHT:
            span = height - TILE_HEIGHT
            return perfect_root(self.bundle_roots[index << span:(index + 1) << span])
        first = index << height
        bundle = first >> TILE_HEIGHT
        if bundle in self.bundle_leaves:
            leaves, offset = self.bundle_leaves[bundle], first & (TILE_WIDTH - 1)
        else:
            leaves, offset = self.tail, first - self.tail_start
        return perfect_root(leaves[offset:offset + (1 << height)])


def verify_log(directory: Path, verifier: Verifier, policy: WitnessPolicy | None = None) -> VerifyReport:
    """Recompute the whole log and compare it with its stored tiles and signed checkpoint."""
    report = VerifyReport()
    problems = report.problems
    if not directory.is_dir():
        raise AuditIOError(f"{directory}: not a directory")
    try:
        note, checkpoint = open_checkpoint(_read(directory / "checkpoint"), verifier)
        report.checkpoint = checkpoint
    except FileNotFoundError:
        problems.append("checkpoint: missing")
        return report
    except NoteError as exc:
        problems.append(f"checkpoint: forged or altered: {exc}")
        return report
    if policy is not None:
        try:
            names = policy.check(note)
            report.notes.append(f"cosigned by {', '.join(names) or 'no witness'}")
        except NoteError as exc:
            problems.append(f"checkpoint: witness policy not met: {exc}")
    try:
        start, entries, used, length = read_journal(directory / "journal")
    except FileNotFoundError:
        problems.append("journal: missing")
        return report
    except TileError as exc:
        problems.append(f"journal: {exc}")
        return report
    if used < length:
        report.notes.append(f"journal: torn record after byte {used} (crash; dropped at next start)")
    size = checkpoint.size
    nodes = _Nodes(start)
    # Full bundles: every entry against the level-0 tile, every tile against the level above.
    level_rows: list[list[bytes]] = [[]]  # recomputed hashes of the unfinished tile per level >= 1
    for n in range(start // TILE_WIDTH):
        bundle_name = tile_path("entries", n)
        try:
            data = _read(directory / bundle_name)
        except FileNotFoundError:
            problems.append(f"{bundle_name}: missing (records {n * TILE_WIDTH}..{n * TILE_WIDTH + 255})")
            return report
        bundle, used_bytes = parse_entries(data)
        if used_bytes != len(data):
            problems.append(f"{bundle_name}: {len(data) - used_bytes} trailing bytes after entry {len(bundle)}")
        if len(bundle) != TILE_WIDTH:
            problems.append(f"{bundle_name}: holds {len(bundle)} records, a full bundle holds {TILE_WIDTH} "
                            f"(records deleted or inserted)")
        leaves = [leaf_hash(e) for e in bundle]
        _check_tile(directory, 0, n, leaves, n * TILE_WIDTH, problems, bundle_name)
        leaves = (leaves + [b"\0" * HASH_SIZE] * TILE_WIDTH)[:TILE_WIDTH]
        nodes.bundle_roots.append(perfect_root(leaves))
        if n * TILE_WIDTH < size < (n + 1) * TILE_WIDTH:
            nodes.bundle_leaves[n] = leaves
        _carry(directory, level_rows, 1, n, nodes.bundle_roots[-1], problems)
    report.records = start + len(entries)
    nodes.tail = [leaf_hash(e) for e in entries]
    if size > report.records:
        problems.append(f"journal: checkpoint covers {size} records but the log ends at record "
                        f"{report.records - 1}: records removed below the checkpoint")
        return report
    if size < start:
        report.notes.append(f"checkpoint ({size}) is behind the full bundles ({start}); the writer catches up at next start")
    if report.records > size:
        report.notes.append(f"journal: {report.records - size} record(s) past the checkpoint (not yet acknowledged)")
    if size > start:
        _check_partial(directory, size, start, entries, nodes.tail, problems)
    if tree_root(nodes.node_hash, size) != checkpoint.root:
        problems.append(f"checkpoint: root hash does not match the {size} records in the log"
                        + ("" if problems else " (records altered together with their hash tiles)"))
    return report


def _check_tile(directory: Path, level: int, n: int, hashes: list[bytes], first_record: int,
                problems: list[str], source: str) -> None:
    name = tile_path(level, n)
    try:
        stored = _read(directory / name)
    except FileNotFoundError:
        problems.append(f"{name}: missing")
        return
    if stored == b"".join(hashes):
        return
    unit = TILE_WIDTH ** level
    for i in range(TILE_WIDTH):
        if stored[i * HASH_SIZE:(i + 1) * HASH_SIZE] != (hashes[i] if i < len(hashes) else b""):
            if level == 0:
                problems.append(f"record {first_record + i} ({source} entry {i}): altered, deleted, "
                                f"inserted or reordered: its hash differs from {name} hash {i}")
            else:
                problems.append(f"{name}: hash {i} (records {first_record + i * unit}.."
                                f"{first_record + (i + 1) * unit - 1}) does not match the tiles below it")
            return


def _carry(directory: Path, rows: list[list[bytes]], level: int, n_below: int, value: bytes,
           problems: list[str]) -> None:
    """Feed the hash of full tile `n_below` at level-1 into the level tile; check finished tiles."""
    while len(rows) <= level:
        rows.append([])
    row = rows[level]
    row.append(value)
    if len(row) == TILE_WIDTH:
        n = n_below // TILE_WIDTH
        _check_tile(directory, level, n, row, n * TILE_WIDTH ** (level + 1), problems, "")
        rows[level] = []
        _carry(directory, rows, level + 1, n, perfect_root(row), problems)


def _check_partial(directory: Path, size: int, start: int, entries: list[bytes], tail: list[bytes],
                   problems: list[str]) -> None:
    """Compare the journal with the partial bundle and level-0 tile of the checkpoint, when present
    (they are derived copies, so they locate a changed journal record)."""
    n, width = divmod(size, TILE_WIDTH)
    if not width or start != n * TILE_WIDTH:
        return
    bundle_name, tile_name = tile_path("entries", n, width), tile_path(0, n, width)
    try:
        copy, _ = parse_entries(_read(directory / bundle_name))
        for i, (a, b) in enumerate(zip(copy, entries)):
            if a != b:
                problems.append(f"record {start + i} (journal entry {i}): differs from {bundle_name}")
                return
    except FileNotFoundError:
        pass
    try:
        stored = _read(directory / tile_name)
        for i, h in enumerate(tail[:width]):
            if stored[i * HASH_SIZE:(i + 1) * HASH_SIZE] != h:
                problems.append(f"record {start + i} (journal entry {i}): altered, deleted, inserted or "
                                f"reordered: its hash differs from {tile_name} hash {i}")
                return
    except FileNotFoundError:
        pass


def read_checkpoint(directory: Path, verifier: Verifier) -> tuple[Note, Checkpoint]:
    try:
        return open_checkpoint(_read(directory / "checkpoint"), verifier)
    except FileNotFoundError:
        raise AuditIOError(f"{directory / 'checkpoint'}: missing") from None


def iter_entries(directory: Path, size: int) -> Iterator[tuple[int, bytes]]:
    """(index, entry) for the first `size` records: full bundles, then the journal."""
    start, entries, _, _ = read_journal(directory / "journal")
    index = 0
    for n in range(start // TILE_WIDTH):
        if index >= size:
            return
        bundle, _ = parse_entries(_read(directory / tile_path("entries", n)))
        for entry in bundle:
            if index >= size:
                return
            yield index, entry
            index += 1
    for entry in entries:
        if index >= size:
            return
        yield index, entry
        index += 1


def format_inclusion_proof(index: int, entry: bytes, proof: list[bytes], checkpoint_note: bytes) -> str:
    """C2SP tlog-proof@v1 text; the record itself rides in the `extra` line."""
    lines = [PROOF_HEADER, f"extra {base64.b64encode(entry).decode()}", f"index {index}"]
    lines += [base64.b64encode(p).decode() for p in proof]
    return "\n".join(lines) + "\n\n" + checkpoint_note.decode()


def prove_inclusion(directory: Path, verifier: Verifier, index: int, entry: bytes) -> str:
    note, checkpoint = read_checkpoint(directory, verifier)
    reader = tail_reader(directory, checkpoint.size)
    proof = inclusion_proof(reader.node_hash, index, checkpoint.size)
    verify_inclusion(index, checkpoint.size, leaf_hash(entry), proof, checkpoint.root)
    return format_inclusion_proof(index, entry, proof, note.render().encode())


def check_inclusion_proof(text: str, verifier: Verifier, policy: WitnessPolicy | None = None) -> tuple[int, dict, Checkpoint]:
    """Verify a tlog-proof file offline; returns (index, record, checkpoint)."""
    head, sep, note_text = text.partition("\n\n")
    lines = head.split("\n")
    if not sep or lines[0] != PROOF_HEADER or len(lines) < 3:
        raise ProofError(f"not a {PROOF_HEADER} proof")
    if not lines[1].startswith("extra "):
        raise ProofError("proof carries no record (extra line)")
    entry = base64.b64decode(lines[1][6:], validate=True)
    if not lines[2].startswith("index ") or not lines[2][6:].isdigit():
        raise ProofError("proof has no index line")
    index = int(lines[2][6:])
    proof = [base64.b64decode(x, validate=True) for x in lines[3:]]
    note, checkpoint = open_checkpoint(note_text, verifier)
    if policy is not None:
        policy.check(note)
    verify_inclusion(index, checkpoint.size, leaf_hash(entry), proof, checkpoint.root)
    return index, json.loads(entry), checkpoint


def prove_consistency(directory: Path, verifier: Verifier, old_note: bytes) -> dict:
    """Consistency proof from an auditor's old checkpoint to the current one, checked before
    it is returned. Raises ProofError when the log does not extend the old checkpoint."""
    _, old = open_checkpoint(old_note, verifier)
    note, new = read_checkpoint(directory, verifier)
    if old.size > new.size:
        raise ProofError(f"the log shrank: old checkpoint has {old.size} records, current {new.size} (rollback)")
    reader = tail_reader(directory, new.size)
    if reader.root(old.size) != old.root:
        raise ProofError(f"the log's first {old.size} records do not hash to the old checkpoint's root "
                         f"(history rewritten or a split view)")
    proof = consistency_proof(reader.node_hash, old.size, new.size)
    verify_consistency(old.size, new.size, old.root, new.root, proof)
    return {"old_size": old.size, "new_size": new.size, "old_root": base64.b64encode(old.root).decode(),
            "new_root": base64.b64encode(new.root).decode(),
            "proof": [base64.b64encode(p).decode() for p in proof], "new_checkpoint": note.render()}


def parse_signed_checkpoint(data: bytes) -> tuple[Note, Checkpoint]:
    """Checkpoint without checking the signature (the caller checks against its verifiers)."""
    note = parse_note(data)
    return note, parse_checkpoint_body(note.text)
