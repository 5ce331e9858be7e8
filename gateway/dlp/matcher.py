"""One multi-pattern pass over UTF-8 bytes: Hyperscan when available, Python `re` otherwise.

Both engines see the same patterns (written in their common subset) and report (pattern index, start,
end) candidates; they may report different overlapping candidates for the same text, which is why
callers validate every candidate and keep the longest valid one. Patterns matching one word as
written (a number as one run of digits) are found by gateway/dlp/tokens.py instead, for both engines:
Hyperscan would call Python back for each of the thousands a bulk export holds.
"""

import re
import threading
from dataclasses import dataclass

import numpy as np

from gateway.dlp import tokens
from gateway.dlp.coding import hyperscan

HYPERSCAN_AVAILABLE = hyperscan is not None


@dataclass(frozen=True)
class PatternSpec:
    regex: str
    caseless: bool = False
    alone: bool = False  # Hyperscan scans it with a database of its own (see Detector.own_database)


def literal_regex(text: str) -> str:
    """A regex matching `text` exactly, written with \\xHH escapes both engines read alike."""
    return "".join(chr(b) if chr(b).isalnum() and b < 0x80 else f"\\x{b:02x}" for b in text.encode("utf-8"))


class PatternError(ValueError):
    """A pattern that one of the engines rejects."""


class Matcher:
    def __init__(self, specs: list[PatternSpec], engine: str | None = None):
        """`engine` is "hyperscan", "re" or None for the best available."""
        self.specs = specs
        self.engine = engine or ("hyperscan" if HYPERSCAN_AVAILABLE else "re")
        if self.engine == "hyperscan" and not HYPERSCAN_AVAILABLE:
            raise PatternError("hyperscan is not installed")
        # Always compile with re too: it validates patterns the same way on both paths.
        self._compiled = [compile_re(spec) for spec in specs]
        self._databases: list = []
        self._local = threading.local()
        words = {index: form for index, spec in enumerate(specs) if not spec.caseless
                 and (form := tokens.word_pattern(spec.regex)) is not None}
        self._words = tokens.Words(words) if words else None
        self._rest = [index for index in range(len(specs)) if index not in words]
        if self.engine == "hyperscan" and self._rest:
            shared = [index for index in self._rest if not specs[index].alone]
            groups = ([shared] if shared else []) + [[index] for index in self._rest if specs[index].alone]
            self._databases = [_compile(specs, group) for group in groups]

    def scan(self, data: bytes) -> np.ndarray:
        """Every candidate as a row (pattern index, start, end) of byte offsets."""
        table, words = self.scan_apart(data)
        return table if not len(words) else words if not len(table) else np.concatenate([table, words])

    def scan_apart(self, data: bytes) -> tuple[np.ndarray, np.ndarray]:
        """The candidates as scan() gives them, in two tables: the regex engine's, and the word
        patterns' (gateway/dlp/tokens.py: whole words, in text order)."""
        if not self.specs or not data:
            return _NONE, _NONE
        hits: list[tuple[int, int, int]] = []
        if self.engine == "re":
            hits = [(index, m.start(), m.end()) for index in self._rest for m in self._compiled[index].finditer(data)]
        elif self._databases:
            scratches = getattr(self._local, "scratches", None)
            if scratches is None:  # Hyperscan scratch space must not be shared between threads
                scratches = self._local.scratches = [hyperscan.Scratch(database) for database in self._databases]
            for database, scratch in zip(self._databases, scratches):
                database.scan(data, match_event_handler=_collect, context=hits, scratch=scratch)
        # Most texts hold no candidate: then no array is built (a few us each, twice a transfer).
        table = np.array(hits, dtype=np.int64).reshape(-1, 3) if hits else _NONE
        return table, self._words.scan(data) if self._words else _NONE


_NONE = np.zeros((0, 3), dtype=np.int64)
_NONE.flags.writeable = False  # shared by every scan that finds nothing


def _compile(specs: list[PatternSpec], indexes: list[int]):
    """One Hyperscan block-mode database for specs[indexes]; matches report their index in `specs`."""
    database = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
    flags = [hyperscan.HS_FLAG_SOM_LEFTMOST | (hyperscan.HS_FLAG_CASELESS if specs[i].caseless else 0)
             for i in indexes]
    try:
        database.compile(expressions=[specs[i].regex.encode("utf-8") for i in indexes], ids=indexes,
                         elements=len(indexes), flags=flags)
    except hyperscan.error as error:
        raise PatternError(f"hyperscan rejects a pattern: {error}") from None
    return database


def _collect(pattern_id: int, start: int, end: int, flags: int, hits: list) -> None:
    hits.append((pattern_id, start, end))


def compile_re(spec: PatternSpec) -> re.Pattern[bytes]:
    try:
        return re.compile(spec.regex.encode("utf-8"), re.IGNORECASE if spec.caseless else 0)
    except re.error as error:
        raise PatternError(f"invalid pattern: {error}") from None
