"""Patterns that match a whole word as written (`\\b`, character classes, `\\b`), found without a regex engine.

An ID number, a mobile or card number written as one run of digits is such a word. A bulk export
holds several in every record, and python-hyperscan calls back into Python once per match: that
callback alone held a scan to 90 MB/s. A word (a maximal run of [0-9A-Za-z_], what `\\b` bounds in
both engines over bytes) is found for the whole text at once with numpy, from where the first word
long enough starts (one Hyperscan pass: prose has none, and then costs no numpy pass); each word of
a length a pattern allows is matched position by position against the pattern's classes, all words
of one length together. The matcher hands such patterns here and scans only the rest with Hyperscan, which
then rarely matches anything in an export.

Only what re's own parser reads as \\b, then classes, literals, fixed or counted repeats of them and
alternatives of literals of one length, then \\b, is a word pattern: anything else (a separator, an
optional part) returns None and stays with the regex engine. tests/test_dlp_tokens.py holds each
word pattern to re.finditer's answers.

Words (a matcher's word patterns, compiled once) scans with the C kernel (gateway/dlp/_kernels.c: one
loop over the bytes, each word checked as it ends) where it is compiled, and with numpy (scan) where not.
"""

import re
import threading
from dataclasses import dataclass
from re import _constants as c
from re import _parser

import numpy as np

from gateway.dlp.batch import matrix
from gateway.dlp.coding import first_start
from gateway.dlp.native import kernels

_WORD_CLASS = b"0-9A-Za-z_"  # what \b bounds in both engines over bytes
_WORD = np.array([re.fullmatch(b"[%s]" % _WORD_CLASS, bytes([byte])) is not None for byte in range(256)])
_WORD_BYTES = _WORD.astype(np.uint8).tobytes()
_PIECE = 1 << 18
# The byte classes word patterns allow at their positions, one bit each, shared by every pattern: a word's
# bytes are looked up once (_CLASS_BITS[byte]: the bits of the classes it is in) for all patterns and
# positions, then each pattern tests one bit a position. Bits are given as patterns are built, never taken back.
_CLASS_BIT: dict[bytes, int] = {}
_CLASS_BITS = np.zeros(256, dtype=np.uint64)
_CLASSES_LOCK = threading.Lock()


@dataclass(frozen=True)
class WordPattern:
    """Per allowed word length, per position: the bit of the class of bytes allowed there; and
    alternatives of literals as (position, their codes, their width)."""
    by_length: dict[int, tuple[np.ndarray, tuple[tuple[int, np.ndarray, int], ...]]]


def word_pattern(regex: str) -> WordPattern | None:
    """The pattern as a WordPattern, or None when it is not one (see the module docstring)."""
    try:
        items = list(_parser.parse(regex.encode("utf-8")))
    except Exception:  # noqa: BLE001 - the matcher reports invalid patterns itself
        return None
    if len(items) < 3 or items[0] != (c.AT, c.AT_BOUNDARY) or items[-1] != (c.AT, c.AT_BOUNDARY):
        return None
    pieces = []  # (table, low, high) or (codes, width) for an alternation
    for op, arg in items[1:-1]:
        if op in (c.LITERAL, c.IN):
            table = _table(op, arg)
            if table is None:
                return None
            pieces.append((table, 1, 1))
        elif op == c.MAX_REPEAT and len(arg[2]) == 1 and arg[2][0][0] in (c.LITERAL, c.IN) \
                and arg[1] != c.MAXREPEAT:
            table = _table(*arg[2][0])
            if table is None:
                return None
            pieces.append((table, arg[0], arg[1]))
        elif op == c.BRANCH:
            alternatives = arg[1]
            if not all(all(o == c.LITERAL for o, _ in alt) for alt in alternatives) \
                    or len({len(alt) for alt in alternatives}) != 1 or not all(_WORD[v] for alt in alternatives
                                                                               for _, v in alt):
                return None
            width = len(alternatives[0])
            pieces.append((np.array(sorted({_code([v for _, v in alt]) for alt in alternatives}), dtype=np.int64),
                           width))
        else:
            return None
    if sum(1 for piece in pieces if len(piece) == 3 and piece[1] != piece[2]) > 1:
        return None  # one counted repeat at most: each length then places every class
    fixed = sum(piece[1] for piece in pieces if len(piece) == 2 or piece[1] == piece[2])  # width or count
    variable = next((piece for piece in pieces if len(piece) == 3 and piece[1] != piece[2]), None)
    lengths = [fixed] if variable is None else range(fixed + variable[1], fixed + variable[2] + 1)
    by_length = {}
    for length in lengths:
        tables, alternations = [], []
        for piece in pieces:
            if len(piece) == 2:
                alternations.append((len(tables), piece[0], piece[1]))
                tables += [_WORD] * piece[1]
            else:
                count = piece[1] if piece[1] == piece[2] else length - fixed
                tables += [piece[0]] * count
        bits = [_class_bit(table) for table in tables]
        if None in bits:
            return None
        by_length[length] = (np.array(bits, dtype=np.uint64), tuple(alternations))
    return WordPattern(by_length)


def _class_bit(table: np.ndarray) -> int | None:
    """The bit of the class of bytes `table` allows, given on first sight; None once all 64 are given
    (the pattern then stays with the regex engine)."""
    key = table.tobytes()
    with _CLASSES_LOCK:
        bit = _CLASS_BIT.get(key)
        if bit is None and len(_CLASS_BIT) < 64:
            bit = _CLASS_BIT[key] = 1 << len(_CLASS_BIT)
            _CLASS_BITS[table] |= np.uint64(bit)
    return bit


def _table(op, arg) -> np.ndarray | None:
    """The bytes a literal or a class allows; None for a class with anything but ranges and literals,
    or allowing a byte outside words (a match could then span two words)."""
    table = np.zeros(256, dtype=bool)
    if op == c.LITERAL:
        table[arg] = True
    else:
        for kind, value in arg:
            if kind == c.LITERAL:
                table[value] = True
            elif kind == c.RANGE:
                table[value[0]:value[1] + 1] = True
            else:
                return None
    return table if not (table & ~_WORD).any() else None


def _code(values) -> int:
    code = 0
    for value in values:
        code = code * 256 + value
    return code


def shortest_word(patterns: dict[int, WordPattern]) -> int:
    """The length of the shortest word any of the patterns matches."""
    return min(length for pattern in patterns.values() for length in pattern.by_length)


class Words:
    """A matcher's word patterns (by their index in it), compiled once for every text it scans."""

    def __init__(self, patterns: dict[int, WordPattern], native: bool = True):
        self.patterns = patterns
        self.shortest = shortest_word(patterns)
        self._kernel = None
        if native and kernels is not None:
            forms = [(index, length, bits.tobytes(), tuple((position, width, codes.astype(np.int64).tobytes())
                                                          for position, codes, width in alternations))
                     for index, pattern in sorted(patterns.items())
                     for length, (bits, alternations) in sorted(pattern.by_length.items())]
            with _CLASSES_LOCK:  # every bit these patterns use is given by now; later ones only add others
                class_bits = _CLASS_BITS.tobytes()
            self._kernel = kernels.compile_words(class_bits, forms)

    def scan(self, data: bytes) -> np.ndarray:
        """Every word of `data` the patterns match, as rows (pattern index, start, end)."""
        if self._kernel is None:
            return scan(self.patterns, data, self.shortest)
        start = first_start(_WORD_CLASS, self.shortest, data)
        if start is None:
            return _NO_WORDS
        return np.frombuffer(kernels.scan_words(self._kernel, data, start), dtype=np.int64).reshape(-1, 3)


def scan(patterns: dict[int, WordPattern], data: bytes, shortest: int | None = None) -> np.ndarray:
    """Every word of `data` the patterns match, as rows (pattern index, start, end); `shortest` is
    shortest_word(patterns), for a caller that scans many texts with the same patterns."""
    shortest = shortest_word(patterns) if shortest is None else shortest
    start = first_start(_WORD_CLASS, shortest, data)  # a word that long starts there (a Hyperscan pass)
    if start is None:
        return _NO_WORDS  # prose, most often: no numpy pass at all
    # bytes.translate: the word mask in one C pass and one copy (indexing a table with the bytes
    # converts them to 8-byte indexes first); a non-word byte before and after gives every word two edges
    word = np.frombuffer(b"\0" + data.translate(_WORD_BYTES) + b"\0", dtype=bool)  # word[i + 1]: data[i]
    buf = np.frombuffer(data, dtype=np.uint8)
    found = [np.zeros((0, 3), dtype=np.int64)]
    while start < len(data):  # by pieces cut between words: the edges of "a a a ..." would take 8 bytes a byte
        end = min(start + _PIECE, len(data))
        end += int(np.argmin(word[end + 1:]))  # to the next byte outside words, or the end
        edges = np.flatnonzero(word[start + 1:end + 2] != word[start:end + 1]) + start
        found += _matches(patterns, buf, edges[0::2], edges[1::2] - edges[0::2])
        start = end + 1
    return np.concatenate(found)


_NO_WORDS = np.zeros((0, 3), dtype=np.int64)
_NO_WORDS.flags.writeable = False  # shared by every scan that finds nothing


def _matches(patterns: dict[int, WordPattern], buf: np.ndarray, starts: np.ndarray,
             lengths: np.ndarray) -> list[np.ndarray]:
    """The words (their starts and lengths) the patterns match, as tables of rows (pattern index, start, end)."""
    found = []
    for length in sorted({length for pattern in patterns.values() for length in pattern.by_length}):
        at = starts[lengths == length]
        if not len(at):
            continue
        chars = matrix(buf, at, length)  # the words of this length, one a row
        classes = _CLASS_BITS[chars]
        for index, pattern in patterns.items():
            if length not in pattern.by_length:
                continue
            bits, alternations = pattern.by_length[length]
            ok = (classes & bits).all(axis=1)
            for position, codes, width in alternations:
                code = np.zeros(len(at), dtype=np.int64)
                for column in range(position, position + width):
                    code = code * 256 + chars[:, column]
                ok &= np.isin(code, codes)
            matched = at[ok]
            found.append(np.stack([np.full(len(matched), index), matched, matched + length], axis=1))
    return found
