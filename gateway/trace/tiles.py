"""C2SP tlog-tiles layout on disk, plus the journal that makes recent records durable.

DIR/checkpoint                  signed checkpoint, replaced atomically but lazily (at most every
                                half second under load, on idle and on close); the newest signed
                                checkpoint is the last one in the journal
DIR/tile/entries/<N>            full entry bundles: 256 big-endian uint16 length-prefixed entries
DIR/tile/<L>/<N>                full hash tiles: 256 SHA-256 hashes at tree height 8*L
DIR/tile/.../<N>.p/<W>          partial tiles for the checkpoint file's size (derived data)
DIR/journal                     durable copy of every record from its start index on: header (magic,
                                start index, a multiple of 256), then frames:
                                  entry       uint16 length (1..65535), the entry
                                  checkpoint  0x0000, uint16 length, the signed checkpoint note
                                Each group commit appends its entries and the signed checkpoint
                                covering them in one write and one fdatasync.
Full tiles and bundles are written once (temp file and rename) and never changed. Those at or past
the journal's start are derived copies, rebuilt from the journal after a crash; once a run of them
has been fsync'd the journal is replaced by one starting after them (rotation).
"""

import struct
from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

from gateway.trace.merkle import (
    HASH_SIZE,
    leaf_hashes,
    node_hash,
    parent_hashes,
    perfect_root,
    range_hash,
    root_of_nodes,
    tree_root,
)

TILE_HEIGHT = 8
TILE_WIDTH = 1 << TILE_HEIGHT
MAX_ENTRY = 0xFFFF
JOURNAL_MAGIC = b"GWTRACE2"  # version 2: entry and checkpoint frames
JOURNAL_HEADER = struct.Struct(">8sQ")


class TileError(ValueError):
    """A file of the log is missing, malformed or inconsistent."""


def index_path(n: int) -> str:
    """Tile index as zero-padded 3-digit path elements, all but the last prefixed with 'x'."""
    digits = f"{n:03d}"
    if len(digits) % 3:
        digits = "0" * (3 - len(digits) % 3) + digits
    groups = [digits[i:i + 3] for i in range(0, len(digits), 3)]
    return "/".join([f"x{g}" for g in groups[:-1]] + [groups[-1]])


def tile_path(level: int | str, n: int, width: int = TILE_WIDTH) -> str:
    """Relative path of a hash tile (level int) or entry bundle (level 'entries')."""
    path = f"tile/{level}/{index_path(n)}"
    return path if width == TILE_WIDTH else f"{path}.p/{width}"


class TiledTree:
    """The right edge of a growing tree kept as the unfinished tile of each level, with the rows of
    subtree hashes inside it, so that a batch of leaves is hashed a row at a time.

    Invariant: `levels[L][j]` holds the complete nodes at height 8*L + j inside the unfinished tile
    of level L, left to right; `levels[L][0]` is that tile's content, (size >> 8*L) % 256 hashes, and
    row j holds len(row 0) >> j of them. A tile that fills is handed back and its subtree hash
    becomes the next hash of the level above.
    """

    __slots__ = ("size", "levels")

    def __init__(self, size: int = 0, upper_rows: list[list[bytes]] | None = None) -> None:
        """A tree of `size` leaves (a multiple of 256 when not 0) whose unfinished tiles at levels
        1, 2, ... hold `upper_rows` (the subtree hashes of the full tiles below them)."""
        self.size = size
        self.levels: list[list[list[bytes]]] = [_tile_rows()]
        for level, hashes in enumerate(upper_rows or [], start=1):
            if len(hashes) != (size >> (TILE_HEIGHT * level)) % TILE_WIDTH:
                raise TileError(f"level {level} holds {len(hashes)} hashes, a tree of {size} has "
                                f"{(size >> (TILE_HEIGHT * level)) % TILE_WIDTH}")
            rows = _tile_rows()
            _extend_rows(rows, hashes)
            self.levels.append(rows)
        if size % TILE_WIDTH or size >> (TILE_HEIGHT * len(self.levels)):
            raise TileError(f"the tiles given do not make a tree of {size} leaves")

    def copy(self) -> "TiledTree":
        other = TiledTree()
        other.size = self.size
        other.levels = [[list(row) for row in rows] for rows in self.levels]
        return other

    def append(self, leaves: list[bytes]) -> list[tuple[int, int, list[bytes]]]:
        """Add leaf hashes; returns the tiles they complete as (level, index, hashes), lower levels
        and earlier tiles first."""
        completed: list[tuple[int, int, list[bytes]]] = []
        pos, total = 0, len(leaves)
        while pos < total:
            rows = self.levels[0]
            take = min(TILE_WIDTH - len(rows[0]), total - pos)
            _extend_rows(rows, leaves[pos:pos + take] if pos or take < total else leaves)
            pos += take
            self.size += take
            level = 0
            while len(rows[0]) == TILE_WIDTH:
                top = rows[TILE_HEIGHT - 1]
                completed.append((level, (self.size >> (TILE_HEIGHT * (level + 1))) - 1, rows[0]))
                self.levels[level] = _tile_rows()
                level += 1
                if level == len(self.levels):
                    self.levels.append(_tile_rows())
                rows = self.levels[level]
                _extend_rows(rows, [node_hash(top[0], top[1])])
        return completed

    def edge(self) -> list[bytes]:
        """The compact range: the hashes of the perfect subtrees covering the leaves, left to right."""
        return [row[-1] for rows in reversed(self.levels) for row in reversed(rows) if len(row) & 1]

    def root(self) -> bytes:
        return root_of_nodes(self.edge())


def _tile_rows() -> list[list[bytes]]:
    return [[] for _ in range(TILE_HEIGHT)]


def _extend_rows(rows: list[list[bytes]], hashes: list[bytes]) -> None:
    """Add hashes to a tile's bottom row and the nodes they complete to the rows above."""
    rows[0].extend(hashes)
    for below, row in zip(rows, rows[1:]):
        new = parent_hashes(below, 2 * len(row))
        if not new:
            break  # no new node at this height, so none above it either
        row.extend(new)


_U16 = struct.Struct(">H").pack


def encode_entries(entries: list[bytes]) -> bytes:
    """The entries as length-prefixed frames (the bundle format, and the journal's entry frames),
    built in one join."""
    if entries:
        longest, shortest = max(map(len, entries)), min(map(len, entries))
        if longest > MAX_ENTRY:
            raise TileError(f"entry of {longest} bytes exceeds the {MAX_ENTRY}-byte limit")
        if not shortest:
            raise TileError("empty entry (a zero length marks a checkpoint frame in the journal)")
    return b"".join(chain.from_iterable(zip(map(_U16, map(len, entries)), entries)))


def parse_entries(data: bytes) -> tuple[list[bytes], int]:
    """Entries in a bundle or journal body, and the byte length of the complete ones.
    A torn final entry (short prefix or data) is left out; the caller decides what that means."""
    entries: list[bytes] = []
    append = entries.append
    pos, end = 0, len(data)
    while pos + 2 <= end:
        stop = pos + 2 + ((data[pos] << 8) | data[pos + 1])
        if stop > end:
            break
        append(data[pos + 2:stop])
        pos = stop
    return entries, pos


def encode_checkpoint_frame(note: bytes) -> bytes:
    return struct.pack(">HH", 0, len(note)) + note


@dataclass
class Journal:
    start: int
    entries: list[bytes]
    # Signed checkpoints in the order written: (tree size, end offset of the frame, note bytes).
    checkpoints: list[tuple[int, int, bytes]]
    entry_offsets: list[int]  # byte offset of each entry's frame
    used: int  # header plus complete frames
    data: bytes

    @property
    def end(self) -> int:
        return self.start + len(self.entries)


def parse_journal(data: bytes, name: str = "journal") -> Journal:
    """Frames of a journal; parsing stops at a torn frame or the zero fill after the last one."""
    if len(data) < JOURNAL_HEADER.size:
        raise TileError(f"{name}: shorter than its header")
    magic, start = JOURNAL_HEADER.unpack_from(data)
    if magic != JOURNAL_MAGIC or start % TILE_WIDTH:
        raise TileError(f"{name}: bad header (not a version 2 trace journal)")
    entries: list[bytes] = []
    offsets: list[int] = []
    checkpoints: list[tuple[int, int, bytes]] = []
    add_entry, add_offset = entries.append, offsets.append
    pos, end = JOURNAL_HEADER.size, len(data)
    while pos + 2 <= end:
        n = (data[pos] << 8) | data[pos + 1]
        if n:
            stop = pos + 2 + n
            if stop > end:
                break
            add_offset(pos)
            add_entry(data[pos + 2:stop])
            pos = stop
            continue
        if pos + 4 > end:
            break
        m = (data[pos + 2] << 8) | data[pos + 3]
        if not m or pos + 4 + m > end:
            break  # zero fill (records are never empty) or a torn checkpoint frame
        checkpoints.append((start + len(entries), pos + 4 + m, data[pos + 4:pos + 4 + m]))
        pos += 4 + m
    return Journal(start, entries, checkpoints, offsets, pos, data)


def read_journal(path: Path) -> Journal:
    return parse_journal(path.read_bytes(), path.name)


def unfinished_write_problem(journal: Journal, begin: int, origin: str,
                             signed: Callable[[bytes], bool]) -> str | None:
    """Why the journal's bytes from offset `begin` (where its last good checkpoint frame ends) cannot
    be a write cut short by a crash; None when they can be, or are only the zero fill kept ahead.

    Invariant: commits are serial (a write of entry frames and, last, the signed checkpoint covering
    them starts only once the previous write is durable), so a crash leaves at most one write
    unfinished; its 512-byte sectors land whole or not at all on the zero fill, or the file ends
    early. So past `begin` there is at most one signed checkpoint, nothing but zeros after it, and
    if a checkpoint frame (signed or not) ends the write, a whole zero sector before that end (else
    the whole write landed and would have parsed, verified and matched). Entries are JSON (never a
    NUL byte), so no sector of them is zero."""
    data = journal.data
    last = begin + len(data[begin:].rstrip(b"\0"))
    if last == begin:
        return None
    frames: list[tuple[int, int]] = []
    line = origin.encode() + b"\n"
    at = data.find(line, begin + 4, last)
    while at != -1 and len(frames) < 2:
        length = (data[at - 2] << 8) | data[at - 1]
        if data[at - 4:at - 2] == b"\0\0" and signed(data[at:at + length]):
            frames.append((at - 4, at + length))
        at = data.find(line, at + 1, last)
    if len(frames) > 1:
        return (f"signed checkpoints at bytes {frames[0][0]} and {frames[1][0]} follow byte {begin}, where the "
                f"records stop parsing or matching; a crash leaves at most one commit unfinished")
    if frames:
        frame_end = frames[0][1]
        if last > frame_end:
            return f"bytes follow the signed checkpoint at byte {frames[0][0]}, which ends a commit"
    else:  # a checkpoint frame that parsed whole but is not the log's: landed whole, or torn inside?
        whole = [end for _, end, _ in journal.checkpoints if end > begin]
        if not whole:
            return None  # the unfinished write's checkpoint frame never landed whole
        frame_end = whole[0]
    # A sector of this write that did not land is zero from where the write began in it (the sector
    # `begin` falls in keeps the previous commit's bytes before `begin`).
    if not any(not data[max(i, begin):i + 512].strip(b"\0") for i in range(begin // 512 * 512, frame_end, 512)):
        return (f"the commit from byte {begin} to {frame_end} landed whole (no sector of it is missing), "
                f"yet its records or checkpoint do not parse, verify or match")
    return None


class TileReader:
    """Node hashes of a tree of `size` leaves read from full tiles on disk, with the leaves past the
    last full bundle supplied by the caller (from the journal). Partial tiles are derived, never
    read, so stale partial files cannot mislead proofs."""

    def __init__(self, directory: Path, size: int, tail_start: int, tail_leaf_hashes: list[bytes]) -> None:
        self.directory = directory
        self.size = size
        self.tail_start = tail_start
        self.tail = tail_leaf_hashes
        self._cache: dict[tuple[int, int], list[bytes]] = {}

    def tile(self, level: int, n: int) -> list[bytes]:
        """Hashes at height 8*level of tile n (full, or the partial one at the right edge)."""
        key = (level, n)
        if key in self._cache:
            return self._cache[key]
        available = self.size >> (TILE_HEIGHT * level)  # nodes at this height that are complete
        width = min(TILE_WIDTH, available - n * TILE_WIDTH)
        if width <= 0:
            raise TileError(f"tile {level}/{n} lies beyond tree size {self.size}")
        full_end = (self.tail_start >> (TILE_HEIGHT * (level + 1)))  # full tiles on disk at this level
        if n < full_end:
            path = self.directory / tile_path(level, n)
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                raise TileError(f"{tile_path(level, n)}: missing") from None
            if len(data) != TILE_WIDTH * HASH_SIZE:
                raise TileError(f"{tile_path(level, n)}: {len(data)} bytes, a full tile has {TILE_WIDTH * HASH_SIZE}")
            hashes = [data[i:i + HASH_SIZE] for i in range(0, width * HASH_SIZE, HASH_SIZE)]
        elif level == 0:
            first = n * TILE_WIDTH - self.tail_start
            hashes = self.tail[first:first + width]
        else:
            hashes = [perfect_root(self.tile(level - 1, n * TILE_WIDTH + i)) for i in range(width)]
        self._cache[key] = hashes
        return hashes

    def node_hash(self, height: int, index: int) -> bytes:
        level, rest = divmod(height, TILE_HEIGHT)
        first = index << rest
        tile = self.tile(level, first >> TILE_HEIGHT)
        offset = first & (TILE_WIDTH - 1)
        return perfect_root(tile[offset:offset + (1 << rest)])

    def root(self, size: int | None = None) -> bytes:
        return tree_root(self.node_hash, self.size if size is None else size)

    def range_hash(self, start: int, end: int) -> bytes:
        return range_hash(self.node_hash, start, end)


def tail_reader(directory: Path, size: int) -> TileReader:
    """TileReader for a log directory whose tail comes from its journal."""
    journal = read_journal(directory / "journal")
    start, entries = journal.start, journal.entries
    if size < start:
        return TileReader(directory, size, start, [])
    if size > start + len(entries):
        raise TileError(f"log holds {start + len(entries)} records, fewer than {size}")
    return TileReader(directory, size, start, leaf_hashes(entries[:size - start]))
