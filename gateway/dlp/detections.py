"""Validated matches before rules: a Detection each, or held as columns (numpy) for a bulk export.

A JSON or CSV export has an ID number and a mobile number in every record: tens of thousands of
detections in one text, of which a scan shows a thousand at most and counts the rest. Those of one
text are held as columns (start, end, offset as written, detector); the rules select, count and
digest them as arrays; the rows shown (the findings a scan keeps) are read a column at a time
(shown()), and a Detection (a value decoded, a location worked out) is made only for a row that a
rule must read one by one. A stream's windows' detectors' detections are copied out into columns of
their own (StreamColumns) as each window is let go. Detections from elsewhere (field names, keywords,
several texts) are Detection objects, held after the columns.
"""

from collections import Counter
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np

from gateway.dlp.batch import matrix
from gateway.dlp.decode import Segment, offset_locator
from gateway.dlp.detectors import DETECTORS, mask_middle, masks_of
from gateway.dlp.native import kernels
from gateway.dlp.tally import Place, in_runs


class Detection(NamedTuple):  # a tuple: 4x quicker to make than a dataclass
    """A validated match before rules: what it is, and where. Its location, field and mask are
    worked out when asked, from its segment and offset (or were once, see resolved())."""
    kind: str            # "detector", "pattern", "keyword" or "field"
    name: str            # detector name, or the rule id owning the pattern / keyword / field name
    type: str
    value: str           # as written in the decoded content
    token: str           # as matched (full-width folded): what the mask is made of
    segment: Segment | None  # the text it was found in; None once resolved, and for a field name
    offset: int          # its byte offset in that text as written (segment.original, or else segment.data)
    base: int = 0        # the offset of a stream's window in the body
    fixed: tuple[str, str | None, Place] | None = None  # (location, field, place) when segment is None

    def located(self) -> tuple[str, str | None]:
        """Its location and the field it is the value of."""
        if self.segment is None:
            return self.fixed[0], self.fixed[1]
        return self.segment.at(self.offset, self.base)

    def place(self) -> Place:
        if self.segment is None:
            return self.fixed[2]
        return self.segment.location, self.base + self.offset

    def resolved(self) -> "Detection":
        """Itself without its segment (a stream lets its windows go)."""
        return self if self.segment is None else self._replace(segment=None, fixed=(*self.located(), self.place()))

    def masked(self) -> str:
        if self.kind == "detector":
            return DETECTORS[self.name].mask(self.token)
        if self.kind == "pattern":
            return mask_middle(self.token, 2, 2) if len(self.token) > 6 else "*" * len(self.token)
        return self.token  # a keyword, a field name

    def confidence(self, field_name: str | None) -> str:
        if self.kind == "field" or (self.kind == "detector" and field_name is not None
                                    and field_name.strip().lower() in DETECTORS[self.name].hint_fields):
            return "high"
        return "normal"


_NO_ROWS = np.zeros(0, dtype=np.int64)
_HASH_WEIGHTS = np.random.default_rng(18).integers(1, 1 << 63, 64, dtype=np.uint64) * np.uint64(2) + np.uint64(1)


class Columns(NamedTuple):
    """Detectors' matches in one text, in text order: data[starts[i]:ends[i]] found by detector
    names[detector[i]]; written[i] and written_ends[i] are its offsets in the text as written
    (segment.original, or else segment.data, which is `data`)."""
    segment: Segment
    data: bytes
    starts: np.ndarray
    ends: np.ndarray
    written: np.ndarray
    written_ends: np.ndarray
    detector: np.ndarray
    names: list[str]
    base: int | np.ndarray = 0  # what a locator and a place add to `written`: one for all, or one a row

    def placed(self, rows) -> np.ndarray:
        """The rows' offsets as a locator reads them and their places say (written + base)."""
        return self.written[rows] + (self.base[rows] if isinstance(self.base, np.ndarray) else self.base)

    def base_of(self, row: int) -> int:
        return int(self.base[row]) if isinstance(self.base, np.ndarray) else self.base


class Detections(Sequence[Detection]):
    """Detections in text order: the rows of `columns` (if any), then `listed`. Row i is a
    Detection when asked for (self[i]); the rules read the columns below without making one."""

    def __init__(self, listed: Sequence[Detection] = (), columns: Columns | None = None):
        self.columns = columns
        self.listed = list(listed)
        self.bulk = 0 if columns is None else len(columns.starts)
        self._values: list[str] | None = None
        self._matrices: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return self.bulk + len(self.listed)

    def __getitem__(self, row):
        if isinstance(row, slice):
            return [self[index] for index in range(*row.indices(len(self)))]
        if row < 0:
            row += len(self)
        if row >= self.bulk:
            return self.listed[row - self.bulk]
        c = self.columns
        name = c.names[c.detector[row]]
        return Detection("detector", name, name, self.value(row), self.token(row), c.segment, int(c.written[row]),
                         c.base_of(row))

    def rows(self, rows: list[int]) -> list[Detection]:
        """self[row] for each of `rows` (the columns read at once)."""
        bulk = [row for row in rows if row < self.bulk]
        made = []
        if bulk:
            c = self.columns
            at = np.array(bulk, dtype=np.int64)
            text = c.data if c.segment.original is None else c.segment.original
            for name, start, end, written, written_end, placed in zip(
                    [c.names[index] for index in c.detector[at].tolist()], c.starts[at].tolist(), c.ends[at].tolist(),
                    c.written[at].tolist(), c.written_ends[at].tolist(), c.placed(at).tolist()):
                made.append(Detection("detector", name, name, text[written:written_end].decode("utf-8", "replace"),
                                      c.data[start:end].decode("utf-8", "replace"), c.segment, written,
                                      placed - written))
        return made + [self.listed[row - self.bulk] for row in rows[len(bulk):]]

    def shown(self, rows: list[int]) -> tuple[list[str], list[str], list[str]]:
        """Of the column rows `rows` (each < self.bulk): their types, values and masks, as columns
        (what self[row].type, .value and .masked() say)."""
        c = self.columns
        at = np.array(rows, dtype=np.int64)
        text = c.data if c.segment.original is None else c.segment.original
        written = c.written[at].tolist()
        values = [text[start:end].decode("utf-8", "replace") for start, end in zip(written, c.written_ends[at].tolist())]
        tokens = [c.data[start:end].decode("utf-8", "replace") for start, end in zip(c.starts[at].tolist(), c.ends[at].tolist())]
        detector = c.detector[at]
        types = [c.names[index] for index in detector.tolist()]
        if len(set(types)) == 1:
            masks = masks_of(DETECTORS[types[0]], tokens)
        else:
            masks = [""] * len(rows)  # a detector at a time
            for index in np.unique(detector).tolist():
                of = np.flatnonzero(detector == index).tolist()
                for place, mask in zip(of, masks_of(DETECTORS[c.names[index]], [tokens[i] for i in of])):
                    masks[place] = mask
        return types, values, masks

    def __iter__(self) -> Iterator[Detection]:
        return map(self.__getitem__, range(len(self)))

    def __add__(self, other: Sequence[Detection]) -> "Detections":
        return Detections(self.listed + list(other), self.columns)

    def token(self, row: int) -> str:
        c = self.columns
        return c.data[c.starts[row]:c.ends[row]].decode("utf-8", "replace")

    def value(self, row: int) -> str:
        """Row's value as written (a value with full-width characters: from the text as written)."""
        if row >= self.bulk:
            return self.listed[row - self.bulk].value
        if self._values is not None:
            return self._values[row]
        c = self.columns
        text = c.data if c.segment.original is None else c.segment.original
        return text[c.written[row]:c.written_ends[row]].decode("utf-8", "replace")

    def values(self) -> list[str]:
        """Every row's value (made once: a rule that reads values one by one)."""
        if self._values is None:
            c = self.columns
            if c is None:
                self._values = []
            else:
                text = c.data if c.segment.original is None else c.segment.original
                self._values = [text[start:end].decode("utf-8", "replace")
                                for start, end in zip(c.written.tolist(), c.written_ends.tolist())]
        return self._values + [d.value for d in self.listed]

    def sources(self) -> dict[tuple[bool, str], np.ndarray]:
        """Per source (from a detector, detector or rule id): its rows, in text order."""
        rows: dict[tuple[bool, str], np.ndarray] = {}
        if self.bulk:
            c = self.columns
            present = np.flatnonzero(np.bincount(c.detector)).tolist()
            for index in present:
                rows[(True, c.names[index])] = np.flatnonzero(c.detector == index) if len(present) > 1 \
                    else np.arange(self.bulk)
        listed: dict[tuple[bool, str], list[int]] = {}
        for row, d in enumerate(self.listed, start=self.bulk):
            listed.setdefault((d.kind == "detector", d.name), []).append(row)
        for key, more in listed.items():
            more = np.array(more, dtype=np.int64)
            rows[key] = np.concatenate([rows[key], more]) if key in rows else more
        return rows

    def types(self, rows: np.ndarray) -> tuple[list[str], np.ndarray]:
        """The types of `rows` in the order first found, and each row's type as an index in them."""
        bulk = rows[rows < self.bulk]
        names = [] if not len(bulk) else self.columns.names
        codes = [self.columns.detector[bulk]] if len(bulk) else []
        listed = [self.listed[row - self.bulk].type for row in rows[len(bulk):].tolist()]
        if listed:
            extra = list(dict.fromkeys(listed))
            codes.append(np.array([len(names) + extra.index(t) for t in listed], dtype=np.int64))
            names = [*names, *extra]
        code = np.concatenate(codes) if codes else _NO_ROWS
        present = np.flatnonzero(np.bincount(code, minlength=len(names)))  # a few codes: no sort of every row
        order = present[np.argsort([int(np.argmax(code == index)) for index in present.tolist()], kind="stable")]
        # one type per distinct name (a detector's type is its name; a listed row may share it)
        types = list(dict.fromkeys(names[i] for i in order.tolist()))
        index = np.full(len(names), -1, dtype=np.int64)
        index[order] = [types.index(names[i]) for i in order.tolist()]
        return types, index[code]

    def runs(self, rows: np.ndarray) -> list[tuple[str, list[int | None]]]:
        """The rows' places (see gateway.dlp.tally), as runs of one location and its offsets."""
        bulk = rows[rows < self.bulk]
        runs = []
        if len(bulk):
            c = self.columns
            runs.append((c.segment.location, c.placed(bulk).tolist()))
        if len(bulk) < len(rows):
            runs += in_runs(self.listed[row - self.bulk].place() for row in rows[len(bulk):].tolist())
        return runs

    def cells(self, rows: list[int]) -> list | None:
        """Of column rows: what tells their locations apart without making them (equal where the
        locations are), where the text's locator can tell (see decode._JsonLocator.cells); else None."""
        c = self.columns
        cells = getattr(c.segment.locate, "cells", None)
        return None if cells is None else cells(c.placed(rows).tolist())

    def _written_spans(self) -> tuple[np.ndarray, np.ndarray]:
        """The columns' values as written, as contiguous int64 starts and ends (what the kernels read)."""
        c = self.columns
        return tuple(np.ascontiguousarray(offsets, dtype=np.int64) for offsets in (c.written, c.written_ends))

    def _value_bytes(self) -> list[np.ndarray]:
        """The columns' values as written, as matrices of bytes, one per length (made once)."""
        if self._matrices is None:
            c = self.columns
            text = np.frombuffer(c.data if c.segment.original is None else c.segment.original, dtype=np.uint8)
            lengths = c.written_ends - c.written
            self._matrices = [matrix(text, c.written[lengths == length], length) for length in np.unique(lengths).tolist()]
        return self._matrices

    def value_lengths_and_units(self) -> tuple[set[int], str] | None:
        """Every length and every character of the values but those that are their own mask (a
        field name, a keyword): a superset (some may not be); None when working them out needs
        every value (characters outside ASCII in the columns)."""
        shown = [d.value for d in self.listed if d.kind not in ("field", "keyword") or d.token != d.value]
        lengths = {len(value) for value in shown if value}
        units = set("".join(shown))
        if self.bulk:
            c = self.columns
            if kernels is not None:
                text = c.data if c.segment.original is None else c.segment.original
                chars = np.flatnonzero(np.frombuffer(kernels.span_bytes(text, *self._written_spans()), dtype=np.uint8))
            else:
                chars = np.flatnonzero(sum(np.bincount(matrix.ravel(), minlength=256) for matrix in self._value_bytes()))
            if len(chars) and chars[-1] >= 0x80:
                return None
            lengths.update(np.unique(c.written_ends - c.written).tolist())
            units.update(map(chr, chars.tolist()))
        return lengths, "".join(sorted(units))

    def repeated(self) -> np.ndarray:
        """The rows whose value is found more than once, in text order. A bulk export's values are
        hashed (in C, into one table; without it with numpy, a length at a time) and only rows of
        equal bytes or hashes decoded and compared, so the cost stays that of one pass over the
        columns however many values repeat (a few do by chance in a large export)."""
        candidates = [np.arange(self.bulk, len(self), dtype=np.int64)]  # the listed rows: few
        if self.bulk and kernels is not None:  # one hash table over every row, in C
            c = self.columns
            text = c.data if c.segment.original is None else c.segment.original
            listed = [d.value.encode("utf-8", "surrogatepass") for d in self.listed]
            candidates.append(np.frombuffer(kernels.repeated_spans(text, *self._written_spans(), listed),
                                            dtype=np.int64))
        elif self.bulk:
            c = self.columns
            lengths = c.written_ends - c.written
            listed = {}  # byte length -> the listed values of that length
            for d in self.listed:
                encoded = np.frombuffer(d.value.encode("utf-8", "surrogatepass"), dtype=np.uint8)
                listed.setdefault(len(encoded), []).append(encoded)
            for length, same_length in zip(np.unique(lengths).tolist(), self._value_bytes()):
                rows = np.flatnonzero(lengths == length)
                # hashed (two equal hashes of unequal values only cost a value compared)
                hashes = same_length.astype(np.uint64) @ _HASH_WEIGHTS[:length] if length <= len(_HASH_WEIGHTS) \
                    else np.ascontiguousarray(same_length).view(f"V{length}").ravel()
                ordered = np.sort(hashes)
                if (ordered[1:] == ordered[:-1]).any():  # most often not: no order of rows needed
                    order = np.argsort(hashes, kind="stable")
                    same = hashes[order[1:]] == hashes[order[:-1]]
                    candidates.append(rows[order[np.concatenate((same, [False])) | np.concatenate(([False], same))]])
                for encoded in listed.get(length, ()):  # a listed value also among the columns'
                    candidates.append(rows[(same_length == encoded).all(axis=1)])
        rows = np.unique(np.concatenate(candidates))
        values = [self.value(row) for row in rows.tolist()]
        counts = Counter(values)
        return rows[np.array([counts[value] > 1 for value in values], dtype=bool)]


class StreamColumns:
    """A stream's detectors' detections, window after window, as columns over arenas of their tokens
    and of their values as written (each followed by a newline; one arena while every value is its
    token, as a window without folding has it), and each one's offset in the body: the windows' text is
    let go, and a bulk export of 100,000 records (300,000 detections, past the buffering threshold) is
    held in ~20 MB, where Detection objects took ~450 bytes each. Rows come in text order; Detections
    reads them as a buffered body's columns (a row's base maps its offset in the values' arena to its
    offset in the body, which its location and place say)."""

    def __init__(self, location: str):
        self.location = location
        self.rows = 0
        self._tokens = bytearray()
        self._values: bytearray | None = None  # while None, each value is its token
        self._names: dict[str, int] = {}
        self._parts: list[tuple[np.ndarray, ...]] = []

    def add_columns(self, c: Columns) -> None:
        """A window's columns (values are its tokens where its segment keeps no text as written)."""
        remap = np.array([self._names.setdefault(name, len(self._names)) for name in c.names], dtype=np.int64)
        original = c.segment.original
        self._add(remap[c.detector], (c.data, c.starts, c.ends),
                  None if original is None else (original, c.written, c.written_ends), c.placed(slice(None)))

    def add_detections(self, found: list) -> None:
        """Detections made one by one (a window with keywords or context words)."""
        if not found:
            return
        tokens = [d.token.encode("utf-8", "surrogatepass") for d in found]
        values = [d.value.encode("utf-8", "surrogatepass") for d in found]
        detector = np.array([self._names.setdefault(d.name, len(self._names)) for d in found], dtype=np.int64)
        self._add(detector, _as_spans(tokens), None if values == tokens else _as_spans(values),
                  np.array([d.place()[1] for d in found], dtype=np.int64))

    def _add(self, detector: np.ndarray, tokens: tuple, values: tuple | None, placed: np.ndarray) -> None:
        if not len(detector):
            return
        if values is not None and self._values is None:
            self._values = bytearray(self._tokens)  # the values so far: their tokens, at the same offsets
        starts, ends = _append(self._tokens, *tokens)
        written, written_ends = (starts, ends) if self._values is None else \
            _append(self._values, *(tokens if values is None else values))
        self._parts.append((starts, ends, written, written_ends, detector, placed - written))
        self.rows += len(detector)

    def detections(self, listed: list) -> Detections | list:
        """The rows as columns, then `listed`."""
        if not self.rows:
            return listed
        parts = [np.concatenate(column) for column in zip(*self._parts)]
        segment = Segment(bytes(self._tokens), self.location,
                          original=None if self._values is None else bytes(self._values),
                          locate=offset_locator(self.location))
        return Detections(listed, Columns(segment, segment.data, *parts[:5], list(self._names), parts[5]))


def _as_spans(items: list[bytes]) -> tuple[bytes, np.ndarray, np.ndarray]:
    """Items as (a text, their starts and ends in it)."""
    lengths = np.fromiter(map(len, items), dtype=np.int64, count=len(items))
    ends = np.cumsum(lengths)
    return b"".join(items), ends - lengths, ends


def _append(arena: bytearray, text: bytes, starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Append the spans of `text` to the arena, each followed by a newline; their starts and ends there."""
    starts, ends = (np.ascontiguousarray(offsets, dtype=np.int64) for offsets in (starts, ends))
    lengths = ends - starts
    at = len(arena) + np.concatenate(([0], np.cumsum(lengths + 1)[:-1]))
    if kernels is not None:
        arena += kernels.join_spans(text, starts, ends)
    else:
        arena += b"".join(text[start:end] + b"\n" for start, end in zip(starts.tolist(), ends.tolist()))
    return at, at + lengths
