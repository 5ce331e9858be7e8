"""Offline auditing of a trace log directory: full verification, record listing, proofs.

Longer than 400 lines: verification is one walk over journal, tiles, bundles and checkpoints;
its checks share the walk's state and read best side by side.

Everything here reads files only and trusts nothing in them: hashes are recomputed from the
entries, and the only anchor is the checkpoint signature checked against a key given by the
auditor.
"""

import base64
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from gateway.trace.merkle import (
    HASH_SIZE,
    CompactRange,
    ProofError,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    leaf_hashes,
    root_of_nodes,
    verify_consistency,
    verify_inclusion,
)
from gateway.trace.note import (
    Checkpoint,
    Note,
    NoteError,
    Verifier,
    open_checkpoint,
    parse_checkpoint_body,
    parse_decimal,
    parse_note,
    verify_signature,
)
from gateway.trace.tiles import (
    JOURNAL_HEADER,
    TILE_HEIGHT,
    TILE_WIDTH,
    Journal,
    TiledTree,
    TileError,
    encode_entries,
    parse_entries,
    parse_journal,
    read_journal,
    tail_reader,
    tile_path,
    unfinished_write_problem,
)

PROOF_HEADER = "c2sp.org/tlog-proof@v1"
WITNESSED_FILE = "checkpoint.witnessed"  # newest checkpoint with the witnesses' cosignatures


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
    witnessed: Checkpoint | None = None  # the newest checkpoint meeting the witness policy
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


# Which files must exist. A tlog-tiles client reads the checkpoint file and then, for its tree
# size N, every full tile and entry bundle below N and the partial ones at N's right edge; the
# writer (gateway/trace/store.py) fsyncs the full ones before it writes a checkpoint file that
# covers them and never removes them. So, for the checkpoint file of size N and the journal
# starting at record S (everything before S exists only in full bundles):
#
#   - every full entry bundle and hash tile (any level) whose records all lie below max(N, S)
#     must exist at full length and match the records: missing, empty or short is an error,
#     even where the journal still holds its records;
#   - one past that is derived from the journal and may be missing or empty (not written yet, or
#     lost in a crash before the publication that would cover it); if it has data, it must match;
#   - partial tiles are written without fsync and replaced by wider ones as the log grows: each
#     one present must match (an empty one is a power loss), a missing one is not an error.


class _RootWalk:
    """The tree as the records are walked in order, the roots it must have at given sizes (signed
    checkpoints; a mismatch is reported once, as a problem) and the full hash tiles above level 0
    it completes, compared with those stored (those ending past `required_upto` may be missing).
    `verified` is the largest size at which a signed root matched the records."""

    def __init__(self, directory: Path, targets: dict[int, list[tuple[str, bytes]]], problems: list[str],
                 required_upto: int) -> None:
        self.directory = directory
        self.tree = TiledTree()
        self.targets = targets
        self.problems = problems
        self.required_upto = required_upto
        self.verified = 0

    @property
    def size(self) -> int:
        return self.tree.size

    def root(self) -> bytes:
        return self.tree.root()

    def check(self) -> None:
        for label, root in self.targets.pop(self.size, ()):
            if self.root() == root:
                self.verified = max(self.verified, self.size)
            elif self.problems:
                self.problems.append(f"{label}: root hash does not match the {self.size} records in the log")
            else:
                self.problems.append(self.changed_since_verified(f"{label} (size {self.size})"))

    def changed_since_verified(self, anchor: str) -> str:
        """The records are consistent with their stored hash tiles but not with `anchor`'s signed
        root: the first changed record is the first one no signed root checked so far vouches for."""
        vouched = f"records 0..{self.verified - 1} match" if self.verified else "no shorter one matches"
        return (f"{anchor}: root hash does not match the {self.size} records in the log: the first changed "
                f"record is record {self.verified} or a later one before {self.size} ({vouched} a signed "
                f"checkpoint; records altered, deleted, inserted or reordered together with their hash tiles)")

    def push_leaves(self, leaves: list[bytes]) -> None:
        first = self.size
        pos = 0
        for cut in sorted(size - first for size in self.targets if first < size < first + len(leaves)):
            self._append(leaves[pos:cut])  # stop at each size with a root to check
            pos = cut
        if pos < len(leaves):
            self._append(leaves[pos:] if pos else leaves)

    def _append(self, leaves: list[bytes]) -> None:
        for level, n, hashes in self.tree.append(leaves):
            if level:  # level 0 tiles are checked record by record by the caller
                span = TILE_WIDTH ** (level + 1)
                _check_tile(self.directory, level, n, hashes, n * span, self.problems, "",
                            derived=(n + 1) * span > self.required_upto)
        self.check()


def _witnessed_checkpoints(directory: Path, verifier: Verifier, file_note: Note, policy: WitnessPolicy | None,
                           report: VerifyReport) -> list[tuple[str, Checkpoint]]:
    """The newest checkpoint (checkpoint file or WITNESSED_FILE) meeting the witness policy; its
    root is then checked against the log like any other."""
    if policy is None:
        return []
    candidates = [("checkpoint", file_note)]
    try:
        candidates.append((WITNESSED_FILE, open_checkpoint(_read(directory / WITNESSED_FILE), verifier)[0]))
    except FileNotFoundError:
        pass
    except NoteError as exc:
        report.problems.append(f"{WITNESSED_FILE}: forged or altered: {exc}")
        return []
    best: tuple[str, Checkpoint, list[str]] | None = None
    errors = []
    for label, note in candidates:
        try:
            names = policy.check(note)
        except NoteError as exc:
            errors.append(f"{label}: {exc}")
            continue
        checkpoint = parse_checkpoint_body(note.text)
        if best is None or checkpoint.size > best[1].size:
            best = (label, checkpoint, names)
    if best is None:
        report.problems.append(f"checkpoint: witness policy not met: {'; '.join(errors)}")
        return []
    report.notes.append(f"{best[0]} at size {best[1].size} cosigned by {', '.join(best[2])}")
    report.witnessed = best[1]
    return [(best[0], best[1])]


def _signed_note(data: bytes, verifier: Verifier) -> tuple[Note, Checkpoint] | None:
    try:
        return open_checkpoint(data, verifier)
    except NoteError:
        return None


def verify_log(directory: Path, verifier: Verifier, policy: WitnessPolicy | None = None) -> VerifyReport:
    """Recompute the whole log and compare it with its stored tiles, its checkpoint file and the
    signed checkpoints in its journal; the newest valid one is reported."""
    report = VerifyReport()
    problems = report.problems
    if not directory.is_dir():
        raise AuditIOError(f"{directory}: not a directory")
    try:
        file_note, file_cp = open_checkpoint(_read(directory / "checkpoint"), verifier)
    except FileNotFoundError:
        problems.append("checkpoint: missing")
        return report
    except NoteError as exc:
        problems.append(f"checkpoint: forged or altered: {exc}")
        return report
    try:
        journal = parse_journal(_read(directory / "journal"))
    except FileNotFoundError:
        problems.append("journal: missing")
        return report
    except TileError as exc:
        problems.append(f"journal: {exc}")
        return report
    start = journal.start
    report.records = journal.end
    targets: dict[int, list[tuple[str, bytes]]] = {file_cp.size: [("checkpoint", file_cp.root)]}
    witnessed = _witnessed_checkpoints(directory, verifier, file_note, policy, report)
    for label, cp in witnessed:
        targets.setdefault(cp.size, []).append((label, cp.root))
    if file_cp.size > journal.end:
        problems.append(f"journal: checkpoint covers {file_cp.size} records but the log ends at record "
                        f"{journal.end - 1}: records removed below the checkpoint")
        return report
    required_upto = max(start, file_cp.size)
    walk = _RootWalk(directory, targets, problems, required_upto)
    walk.check()
    # Full bundles below the journal: every entry against the level-0 tile, tiles against the level above.
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
        leaves = leaf_hashes(bundle)
        _check_tile(directory, 0, n, leaves, n * TILE_WIDTH, problems, bundle_name)
        if len(leaves) != TILE_WIDTH:  # keep the walk aligned past a bundle of the wrong length
            leaves = (leaves + [b"\0" * HASH_SIZE] * TILE_WIDTH)[:TILE_WIDTH]
        walk.push_leaves(leaves)
    newest = (file_cp, file_note)
    tail = leaf_hashes(journal.entries)
    _check_derived(directory, journal, tail, problems, required_upto)
    # The journal: each checkpoint frame must be signed by the log and match the records before it.
    good_end = JOURNAL_HEADER.size
    frames = journal.checkpoints

    def signed(note: bytes) -> bool:
        return _signed_note(note, verifier) is not None

    for f, (size, end, data) in enumerate(frames):  # in journal order: sizes never decrease
        walk.push_leaves(tail[walk.size - start:size - start])
        if problems:
            break
        opened = _signed_note(data, verifier)
        if opened is None or opened[1].size != size or opened[1].root != walk.root():
            if not unfinished_write_problem(journal, good_end, verifier.name, signed):
                report.notes.append(f"journal: write cut short after byte {good_end} (crash): "
                                    f"records from {size if opened is None else walk.size} on were "
                                    f"never acknowledged; the writer drops them at next start")
                break
            frame = f"journal: checkpoint frame at byte {end - len(data) - 4} (size {size})"
            if opened is None or walk.verified >= size:  # the records match another signed root of this size
                problems.append(f"{frame}: forged or altered")
            else:
                problems.append(walk.changed_since_verified(frame))
            break
        walk.verified = size
        if size >= newest[0].size:
            newest = (opened[1], opened[0])
        good_end = end
    else:
        if not problems and (problem := unfinished_write_problem(journal, good_end, verifier.name, signed)):
            problems.append(f"journal: {problem}")
    walk.push_leaves(tail[walk.size - start:])
    if not problems:
        _check_upper_partials(directory, walk.tree, problems)
    report.checkpoint = newest[0]
    if newest[0].size < start:
        report.notes.append(f"checkpoint ({newest[0].size}) is behind the full bundles ({start}); "
                            f"the writer catches up at next start")
    if report.records > newest[0].size:
        report.notes.append(f"journal: {report.records - newest[0].size} record(s) past the newest "
                            f"checkpoint (not yet acknowledged)")
    for size in sorted(walk.targets):
        for label, _ in walk.targets[size]:
            problems.append(f"{label}: covers {size} records but the log holds {report.records}")
    return report


def _partial_widths(directory: Path, level: int | str, n: int) -> list[int]:
    """Widths of the partial tiles stored for tile n of `level` (the writer's temp files aside)."""
    try:
        names = os.listdir(directory / f"{tile_path(level, n)}.p")
    except FileNotFoundError:
        return []
    return sorted(parsed for name in names if (parsed := parse_decimal(name)) is not None and parsed)


def _check_derived(directory: Path, journal: Journal, tail: list[bytes], problems: list[str],
                   required_upto: int) -> None:
    """Compare the journal with the full and partial bundles and level 0 tiles derived from it: the
    full ones below `required_upto` must exist whole, the others when present (they may lag, and
    partial ones be of any size it reached); a difference locates a changed record."""
    start = journal.start
    for n in range(start // TILE_WIDTH, (start + len(tail)) // TILE_WIDTH + 1):
        first = n * TILE_WIDTH - start
        leaves = tail[first:first + TILE_WIDTH]
        # Wider partial tiles than the records read were published since, by a writer still running.
        widths = {*_partial_widths(directory, "entries", n), *_partial_widths(directory, 0, n), TILE_WIDTH}
        for width in sorted(w for w in widths if w <= len(leaves)):
            for name, expected in ((tile_path("entries", n, width), encode_entries(journal.entries[first:first + width])),
                                   (tile_path(0, n, width), b"".join(leaves[:width]))):
                required = width == TILE_WIDTH and (n + 1) * TILE_WIDTH <= required_upto
                try:
                    stored = _read(directory / name)
                except FileNotFoundError:
                    if required:
                        problems.append(f"{name}: missing (records {n * TILE_WIDTH}..{n * TILE_WIDTH + 255}, "
                                        f"covered by the checkpoint)")
                        return
                    continue
                if required and len(stored) < len(expected):
                    problems.append(f"{name}: {len(stored)} bytes, the records {n * TILE_WIDTH}.."
                                    f"{n * TILE_WIDTH + 255} covered by the checkpoint make {len(expected)}")
                    return
                if stored and stored != expected:
                    copy = parse_entries(stored)[0] if "entries" in name else [
                        stored[i:i + HASH_SIZE] for i in range(0, len(stored), HASH_SIZE)]
                    mine = journal.entries[first:first + width] if "entries" in name else leaves[:width]
                    i = next((i for i, (a, b) in enumerate(zip(copy, mine)) if a != b), min(len(copy), len(mine)))
                    problems.append(f"record {n * TILE_WIDTH + i} (journal entry {first + i}): differs from {name}")
                    return


def _check_upper_partials(directory: Path, tree: TiledTree, problems: list[str]) -> None:
    """Partial hash tiles above level 0 (what a tlog-tiles client reads at the right edge) against
    the tree the records made: the walk's unfinished tile of each level, or for a stale partial of
    the tile before it, that full tile (checked by the walk). One wider than the records read is left
    alone: a running writer may have published it since."""
    level = 1
    while level < len(tree.levels) or _partial_widths(directory, level, 0):
        complete = tree.size >> (TILE_HEIGHT * level)  # nodes at this height
        last = complete // TILE_WIDTH
        for n in (last - 1, last) if last else (0,):
            for width in _partial_widths(directory, level, n):
                name = tile_path(level, n, width)
                if n * TILE_WIDTH + width > complete:
                    continue
                try:
                    stored = _read(directory / name)
                    expected = (b"".join(tree.levels[level][0][:width]) if n == last else
                                _read(directory / tile_path(level, n))[:width * HASH_SIZE])
                except FileNotFoundError:
                    continue  # replaced by a wider one meanwhile, or its full tile not derived yet
                if stored not in (b"", expected):
                    problems.append(f"{name}: does not match the tiles below it")
                    return
        level += 1


def _check_tile(directory: Path, level: int, n: int, hashes: list[bytes], first_record: int,
                problems: list[str], source: str, derived: bool = False) -> None:
    name = tile_path(level, n)
    unit = TILE_WIDTH ** level
    try:
        stored = _read(directory / name)
    except FileNotFoundError:
        if not derived:  # see "Which files must exist" above
            problems.append(f"{name}: missing (records {first_record}..{first_record + TILE_WIDTH * unit - 1})")
        return
    if stored == b"".join(hashes) or (derived and not stored):  # not yet covered by a checkpoint file: a power loss may empty it
        return
    if not derived and len(stored) < TILE_WIDTH * HASH_SIZE:
        problems.append(f"{name}: {len(stored)} bytes, a full tile holds {TILE_WIDTH * HASH_SIZE} (truncated)")
        return
    for i in range(TILE_WIDTH):
        if stored[i * HASH_SIZE:(i + 1) * HASH_SIZE] != (hashes[i] if i < len(hashes) else b""):
            if level == 0:
                problems.append(f"record {first_record + i} ({source} entry {i}): altered, deleted, "
                                f"inserted or reordered: its hash differs from {name} hash {i}")
            else:
                problems.append(f"{name}: hash {i} (records {first_record + i * unit}.."
                                f"{first_record + (i + 1) * unit - 1}) does not match the tiles below it")
            return


def newest_checkpoint(directory: Path, verifier: Verifier | None) -> tuple[Note, Checkpoint]:
    """The newest checkpoint signed by the log: the checkpoint file, or a later one in the journal
    (the file is replaced lazily, so a record just answered may be covered only by a journal frame).
    Journal frames past the records present are ignored. With no verifier the signatures are not
    checked: enough to list records, never to vouch for them."""
    def opened(data: bytes) -> tuple[Note, Checkpoint]:
        return parse_signed_checkpoint(data) if verifier is None else open_checkpoint(data, verifier)

    try:
        note, checkpoint = opened(_read(directory / "checkpoint"))
    except FileNotFoundError:
        raise AuditIOError(f"{directory / 'checkpoint'}: missing") from None
    try:
        journal = parse_journal(_read(directory / "journal"))
    except (FileNotFoundError, TileError):
        return note, checkpoint
    for size, _, data in reversed(journal.checkpoints):
        if size <= checkpoint.size:
            break
        try:
            newer = opened(data)
        except NoteError:
            continue
        if newer[1].size == size:
            return newer
    return note, checkpoint


def iter_entries(directory: Path, size: int) -> Iterator[tuple[int, bytes]]:
    """(index, entry) for the first `size` records: full bundles, then the journal."""
    journal = read_journal(directory / "journal")
    start, entries = journal.start, journal.entries
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


def iter_committed_entries(directory: Path, checkpoint: Checkpoint) -> Iterator[tuple[int, bytes]]:
    """iter_entries for the records `checkpoint` covers, then ProofError unless the entries read
    are exactly those its root commits to. A figure computed from them is then bound to the
    signed checkpoint even if the files changed after a verify."""
    edge = CompactRange()
    read = 0
    for index, entry in iter_entries(directory, checkpoint.size):
        edge.push(0, leaf_hash(entry))
        read += 1
        yield index, entry
    if read != checkpoint.size:
        raise ProofError(f"read {read} records, the checkpoint covers {checkpoint.size}")
    if root_of_nodes([value for _, value in edge.nodes]) != checkpoint.root:
        raise ProofError(f"the {read} records read do not hash to the root of the checkpoint")


def format_inclusion_proof(index: int, entry: bytes, proof: list[bytes], checkpoint_note: bytes) -> str:
    """C2SP tlog-proof@v1 text; the record itself rides in the `extra` line."""
    lines = [PROOF_HEADER, f"extra {base64.b64encode(entry).decode()}", f"index {index}"]
    lines += [base64.b64encode(p).decode() for p in proof]
    return "\n".join(lines) + "\n\n" + checkpoint_note.decode()


def latest_record(directory: Path, size: int, transfer_id: str) -> tuple[int, bytes] | None:
    """The index and entry of the last of the first `size` records whose id is `transfer_id` (a
    transfer's completion, written after its open record), or None."""
    found = None
    for index, entry in iter_entries(directory, size):
        try:
            if json.loads(entry).get("id") == transfer_id:
                found = (index, entry)
        except ValueError:
            continue
    return found


def prove_inclusion(directory: Path, verifier: Verifier, index: int, entry: bytes,
                    signed: tuple[Note, Checkpoint] | None = None) -> str:
    """The tlog-proof of record `index` against `signed` (a checkpoint covering it; default: the newest)."""
    note, checkpoint = signed or newest_checkpoint(directory, verifier)
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
    index = parse_decimal(lines[2][6:]) if lines[2].startswith("index ") else None
    if index is None:
        raise ProofError("proof has no index line")
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
    note, new = newest_checkpoint(directory, verifier)
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
