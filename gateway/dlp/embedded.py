"""Encoded text hidden inside text: base64 (a JSON value, a form field, a data: URI, a JWT part, a
wrapped block) and percent-encoding (a URL or a form value, encoded once more than its container).

Longer than 400 lines: the two codings' finders share how what they decode is read (EncodedContent,
_reading) and how tokens are joined; base64 runs are found two ways (numpy for long texts, a regex
for short ones, which a test holds alike).

Encoding a table of ID numbers first is the easiest way past a scanner that reads text only as it is
written. `encoded_contents(data)` finds every run of base64 characters long enough to hide a
sensitive value (MIN_RUN characters, 12 bytes: an 11-digit mobile number), and every token (text
without whitespace, quotes, angle brackets, "&" or "=", as a URL or a form value is written) with
MIN_ESCAPES or more %XX escapes in it, or an escaped digit or letter, and decodes them. What comes
out is read as the scanner can (`EncodedContent.read_as`): a container it opens (zip, gzip, zstd),
text with a BOM, text in another charset (GB18030) and UTF-8 that may be a structure (JSON, XML,
lines) are undone like a body; other UTF-8 text is read as text, its \\u and &# escapes undone (and
full-width characters folded, as in any segment); anything else (an image, a hash, a random token) is scanned as bytes,
as a binary body is: the ASCII tokens in it are found.

Finding the base64 runs costs one numpy pass over the data, which finds every run of MIN_RUN
characters or more and drops there those on one line mostly of digits (an ID number: a bulk export
holds one in every record); the few others are read one by one. Both alphabets are read: standard (+/) and URL-safe
(-_). Lines of equal length (a multiple of 4, as MIME and PEM wrap base64) are one run; other lines
are runs of their own. A token is found from its first valid escape outwards and read once, and
decoded by the C quoted-printable decoder; the text tokens of one text are read as one content, so
a page of encoded links costs one more scan of its links, not one per link.
"""

import base64
import binascii
import bisect
import heapq
import html
import itertools
import re
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from gateway.dlp.budget import check_deadline
from gateway.dlp.coding import (
    GZIP_MAGIC, ZIP_MAGIC, ZSTD_MAGIC, first_start, is_utf8, may_match, unescape_u,
)

MIN_RUN = 16
_ALPHABET = rb"A-Za-z0-9+/_-"
# Per byte: 0 outside the alphabet, 1 in it, 2 a letter (a run's sum is its length plus its letters).
_CLASSES = bytes(bool(re.fullmatch(rb"[" + _ALPHABET + rb"]", bytes([b]))) + bytes([b]).isalpha() for b in range(256))
_RUNS_PIECE = 1 << 18
_NUMPY_RUNS_FROM = 4096  # texts shorter than this (from their first run) are read by _LONG_RUN
_LONG_RUN = re.compile(rb"[" + _ALPHABET + rb"]{%d,}" % MIN_RUN)
_CONTINUING = b"\r\n="  # a run followed by one of these goes on (a wrapped line, padding)
_CONTINUED = np.zeros(256, dtype=bool)
_CONTINUED[list(_CONTINUING)] = True
# A run from its first character: lines joined by newlines, padding at the very end.
_RUN = re.compile(rb"[" + _ALPHABET + rb"]+(?:\r?\n[" + _ALPHABET + rb"]+)*=*")
# Where no stretch of the alphabet holds MIN_RUN // 2 letters (what a run of one line needs to be read,
# see _runs) and no run of MIN_RUN goes on past its line, no run is worth reading: one Hyperscan pass
# that says so spares the numpy pass over every number of an export (an ID number is a run of digits).
_MAY_BE_WORTH_READING = rb"(?:[0-9+/_-]*[A-Za-z]){%d}|[%s]{%d}[%s]" % (
    MIN_RUN // 2, _ALPHABET, MIN_RUN, b"".join(b"\\x%02x" % byte for byte in _CONTINUING))
_CONTAINER_MAGIC = (*ZIP_MAGIC, GZIP_MAGIC, ZSTD_MAGIC)
_TEXT_BOMS = (b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff")
_CONTAINER_OR_BOM = (*_CONTAINER_MAGIC, *_TEXT_BOMS)  # undone like a body, whatever follows
_CONTROL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_NOT_LETTERS = b"0123456789+/_-=\r\n"
MIN_ESCAPES = 3  # one CJK character in UTF-8 is three %XX escapes, three digits of a number too
_ESCAPE = re.compile(rb"%[0-9A-Fa-f]{2}")
_BAD_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")
# From an escape, MIN_ESCAPES of them: each step takes the text up to the next one, never backtracking.
_ENOUGH_ESCAPES = re.compile(rb"%%[0-9A-Fa-f]{2}(?:[^%%]*+(?:%%(?![0-9A-Fa-f]{2})[^%%]*+)*+%%[0-9A-Fa-f]{2}){%d}"
                             % (MIN_ESCAPES - 1))
# An escaped 0-9 A-Z a-z - . _ ~ (which never need escaping), or one escaped again and again ("%2531").
_NEEDLESS_ESCAPE = re.compile(rb"%(?:25)*(?:3[0-9]|[46][1-9A-Fa-f]|[57][0-9Aa]|2[DEde]|5[Ff]|7[Ee])")
_TOKEN = re.compile(rb"[^\x00-\x20\x7f\"'<>\\`&=]*")
BASE64, PERCENT = "base64", "percent-encoded"  # the codings, as locations name them
BODY, TEXT, BYTES = "body", "text", "bytes"  # how a content is read, see EncodedContent
_FOREIGN = "foreign"  # text in another charset than UTF-8 (GBK, say): tokens of it are joined, read as a body
# Between joined tokens: as long as the context window detectors look back over (engine.py), so the
# words of one token are never taken as the context of a value in the next.
TOKEN_SEPARATOR = b"\n" * 48
_SEPARATION = len(TOKEN_SEPARATOR)
MAX_STRUCTURED_TOKENS = 256  # tokens of a text undone as structures of their own; past that, read as text
MANY_ESCAPES = 1 << 16  # a text with this many "%" is decoded as a whole, not token by token
_UNQUOTE_PIECE = 1 << 16
# First bytes a token needs to be anything but plain text: a structure (after whitespace), a container, a BOM.
_MAY_OPEN_A_BODY = b"{[< \t\r\n\x0b\x0c" + bytes({magic[0] for magic in _CONTAINER_OR_BOM})


@dataclass(frozen=True)
class EncodedContent:
    start: int      # byte offsets of the encoded text in the data searched (of the first and last token)
    end: int
    coding: str     # BASE64 or PERCENT
    content: bytes | None  # what it decodes to (None: not base64 after all)
    read_as: str    # BODY: undone like a body (structure, container, charset); TEXT: UTF-8 text, escapes
                    # undone (folded when scanned); BYTES: scanned as they are
    piece_starts: Sequence[int] = ()   # tokens joined: where each begins in the content,
    piece_sources: Sequence[int] = ()  # and where it was in the data searched

    def source(self, offset: int) -> tuple[int, int]:
        """(offset in the data searched, offset within that token's decoded text) of a content offset."""
        if not self.piece_starts:
            return self.start, offset
        index = bisect.bisect_right(self.piece_starts, offset) - 1
        return self.piece_sources[index], offset - self.piece_starts[index]


def encoded_contents(data: bytes) -> Iterator[EncodedContent]:
    """What the base64 runs in `data` decode to, one content each, and what its percent-encoded
    tokens stand for (see percent_contents; a text with MANY_ESCAPES or more is decoded as a whole),
    in order of their first byte."""
    if len(data) < MIN_RUN and b"%" not in data:  # too short for a base64 run, no escape: the usual field
        return
    first = _first_run(data)
    if first is None and b"%" not in data:  # nothing to read: no generators made (a JSON value, a cell)
        return
    base64 = (base64_content(data, start, end) for start, end in _base64_runs(data, first))
    if b"%" in data and data.count(b"%") >= MANY_ESCAPES:  # memchr first: counting costs 25x more
        percent = _all_decoded(data)
    else:
        percent = percent_contents(data, list(percent_runs(data)))
    for found in heapq.merge(base64, percent, key=lambda found: found.start):
        check_deadline()
        if found.content is not None:
            yield found


def base64_content(data: bytes, start: int, end: int) -> EncodedContent:
    """What data[start:end], a base64 run, decodes to (content None when it cannot be base64)."""
    content = decode_run(data[start:end])
    read_as = BYTES if content is None else _reading(content)
    if read_as == TEXT:
        content = _readable_text(content)
    return EncodedContent(start, end, BASE64, content, BODY if read_as == _FOREIGN else read_as)


def percent_contents(data: bytes, tokens: list[tuple[int, int]]) -> list[EncodedContent]:
    """The tokens (start, end) of `data` decoded. The plain UTF-8 text tokens are joined (by
    TOKEN_SEPARATOR) into one content, so a page of encoded links costs one more scan of its links,
    not one per link; so are the tokens that decode to bytes, and those in another charset. A token
    that decodes to a structure (JSON, XML, lines: up to MAX_STRUCTURED_TOKENS of them) or a container
    is a content of its own, undone like a body. Joined contents know where each token was."""
    texts = [unquote_text(data[start:end]) for start, end in tokens]
    everything = b"\n".join(texts)
    if everything.count(b"\n") == len(texts) - 1 and is_utf8(everything):  # the usual case: all text
        readings = [_reading(text) if text[:1] in _MAY_OPEN_A_BODY else TEXT for text in texts]
    else:
        readings = [_reading(text) for text in texts]
    contents = []
    groups: dict[str, list[int]] = {TEXT: [], BYTES: [], _FOREIGN: []}  # indexes of the tokens joined
    if all(read_as == TEXT for read_as in readings):
        groups[TEXT] = range(len(texts))
    else:
        structured = 0
        for index, read_as in enumerate(readings):
            if read_as == BODY and not texts[index].startswith(_CONTAINER_OR_BOM):
                structured += 1
                if structured > MAX_STRUCTURED_TOKENS:
                    read_as = TEXT  # its values are still read, its field names no longer
            if read_as == BODY:
                contents.append(EncodedContent(*tokens[index], PERCENT, texts[index], BODY))
            else:
                groups[read_as].append(index)
    for read_as, indexes in groups.items():
        if not indexes:
            continue
        first, last = tokens[indexes[0]][0], tokens[indexes[-1]][1]
        joined = [texts[index] for index in indexes] if len(indexes) < len(texts) else texts
        sources = array("q", (tokens[index][0] for index in indexes))
        if read_as == TEXT and (b"\\u" in everything or b"&#" in everything):
            variants = [readable_texts(text) for text in joined]  # a variant of a token comes from it too
            sources = array("q", (source for source, texts_of_one in zip(sources, variants) for _ in texts_of_one))
            joined = [variant for texts_of_one in variants for variant in texts_of_one]
        content = TOKEN_SEPARATOR.join(joined)
        if read_as == _FOREIGN:  # decoded as a whole in its charset: located at its first token
            contents.append(EncodedContent(first, last, PERCENT, content, BODY))
            continue
        starts = array("q", itertools.accumulate(map(len, joined[:-1]), lambda at, size: at + size + _SEPARATION,
                                                 initial=0))
        contents.append(EncodedContent(first, last, PERCENT, content, read_as, starts, sources))
    return sorted(contents, key=lambda found: found.start)


def _all_decoded(data: bytes) -> list[EncodedContent]:
    """A text dense with escapes (a long log of encoded links, or a flood of tiny tokens made to cost
    a Python step each) decoded as a whole, in C. Its tokens are not classed one by one, so the whole
    is read every way one of them might need: as UTF-8 text made readable (bytes that are not UTF-8
    replaced); undone like a body too when it opens as JSON or XML, a container or with a BOM; and,
    when not all UTF-8, as GB18030 text and as bytes. Clear text in it is read again, and findings are
    located by their offset in the decoded text."""
    if _ESCAPE.search(data) is None:
        return []
    text = unquote_text(data)
    utf8 = is_utf8(text)
    as_utf8 = text if utf8 else text.decode("utf-8", "replace").encode()
    readings = [(_readable_text(as_utf8), TEXT)]
    if text.startswith(_CONTAINER_OR_BOM) or _opens_a_structure(text):
        readings.append((text, BODY))
    if not utf8:
        readings += [(_readable_text(text.decode("gb18030", "replace").encode("utf-8", "surrogatepass")), TEXT),
                     (text, BYTES)]
    return [EncodedContent(0, len(data), PERCENT, content, read_as) for content, read_as in readings]


def _readable_text(text: bytes) -> bytes:
    """readable_texts(text) as one content."""
    return TOKEN_SEPARATOR.join(readable_texts(text))


def readable_texts(text: bytes) -> list[bytes]:
    """UTF-8 text as written, and with its \\u and &# escapes undone when it has any (a value may be
    whole in either one only)."""
    if b"\\u" not in text and b"&#" not in text:
        return [text]
    written = text.decode("utf-8")
    unescaped = written
    if "\\u" in unescaped:
        unescaped = unescape_u(unescaped)
    if "&#" in unescaped:
        unescaped = html.unescape(unescaped)
    variants = dict.fromkeys((written, unescaped))
    return [variant.encode("utf-8", "surrogatepass") for variant in variants]


def encoded_runs(data: bytes) -> Iterator[tuple[int, int, str]]:
    """(start, end, coding) of every base64 run and percent-encoded token, by start."""
    return heapq.merge(((start, end, BASE64) for start, end in base64_runs(data)),
                       ((start, end, PERCENT) for start, end in percent_runs(data)))


def base64_runs(data: bytes) -> Iterator[tuple[int, int]]:
    """(start, end) of every run of base64 characters of MIN_RUN or more, in order."""
    return _base64_runs(data, _first_run(data))


def _first_run(data: bytes) -> int | None:
    """Where the first run of MIN_RUN base64 characters starts (one Hyperscan pass: most texts hold no run
    at all), or None when there is none, or none worth reading in a text long enough for numpy's pass."""
    first = first_start(_ALPHABET, MIN_RUN, data)
    if first is None or len(data) - first < _NUMPY_RUNS_FROM or may_match(_MAY_BE_WORTH_READING, data):
        return first
    return None


def _base64_runs(data: bytes, first: int | None) -> Iterator[tuple[int, int]]:
    """base64_runs, the first run starting at `first` (None: there is none)."""
    starts, ends, alone = _runs(data, first)
    searched_to = 0
    for start, end, one_line in zip(starts.tolist(), ends.tolist(), alone.tolist()):
        if start < searched_to:
            continue  # a later line of a wrapped run already read
        if one_line:  # one line, mostly letters (see _runs)
            searched_to = end
            yield start, end
            continue
        match = _RUN.match(data, start)
        assert match is not None  # the run starts there
        searched_to, run = match.end(), match.group()
        if b"\n" not in run:  # padding after it
            if _mostly_letters(run):
                yield start, searched_to
            continue
        for piece_start, piece_end in _pieces(run, start):
            if _mostly_letters(data[piece_start:piece_end]):
                yield piece_start, piece_end


def _runs(data: bytes, first: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Starts and ends of the runs of MIN_RUN base64 characters or more worth reading (the first
    starting at `first`), and whether each is alone on its line, without padding: those of one line
    mostly of digits are not (see _mostly_letters), found for all at once."""
    if first is None:
        none = np.zeros(0, dtype=np.int64)
        return none, none, np.zeros(0, dtype=bool)
    rest = data[first:] if first else data
    starts, ends, alone = _runs_from(rest) if len(rest) >= _NUMPY_RUNS_FROM else _runs_by_regex(rest)
    return starts + first, ends + first, alone


def _runs_by_regex(data: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """_runs_from, a run at a time: for a short text (a JSON value holding an ID number) numpy's fixed
    costs are 10x a regex's."""
    found = []
    for match in _LONG_RUN.finditer(data):
        start, end = match.span()
        alone = end == len(data) or data[end] not in _CONTINUING
        if not alone or _mostly_letters(match.group()):
            found.append((start, end, alone))
    if not found:
        none = np.zeros(0, dtype=np.int64)
        return none, none, np.zeros(0, dtype=bool)
    starts, ends, alone = zip(*found)
    return np.array(starts, dtype=np.int64), np.array(ends, dtype=np.int64), np.array(alone, dtype=bool)


def _runs_from(data: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """_runs of a text starting at a run."""
    classes = data.translate(_CLASSES)
    codes = np.frombuffer(classes, dtype=np.uint8)
    inside = codes != 0
    found_starts, found_ends = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.int64)]
    start = 0
    while start < len(data):  # by pieces cut outside runs: the edges of "%41%41..." would take 8 bytes a byte
        end = classes.find(b"\0", min(start + _RUNS_PIECE, len(data)))  # the next byte outside the alphabet
        end = len(data) if end == -1 else end
        piece = inside[start:end]
        edges = np.flatnonzero(piece[1:] != piece[:-1]) + (start + 1)
        edges = np.concatenate(([start] if piece[0] else [], edges, [end] if piece[-1] else [])).astype(np.int64)
        long_enough = edges[1::2] - edges[0::2] >= MIN_RUN
        found_starts.append(edges[0::2][long_enough])
        found_ends.append(edges[1::2][long_enough])
        start = end + 1
    starts, ends = np.concatenate(found_starts), np.concatenate(found_ends)
    buf = np.frombuffer(data, dtype=np.uint8)
    alone = (ends == len(data)) | ~_CONTINUED[buf[np.minimum(ends, len(data) - 1)]]
    bounds = np.stack([starts, ends], axis=1).ravel()
    if len(bounds) and bounds[-1] == len(data):
        bounds = bounds[:-1]  # the last sum then runs to the end
    lengths = ends - starts
    # a run's sum is at most twice its length: in 16 bits while that fits (2.5x quicker than in 64)
    letters = np.add.reduceat(codes, bounds, dtype=np.uint16 if lengths.max() <= 0x7FFF else np.int64)[0::2] \
        - lengths if len(bounds) else np.zeros(0, dtype=np.int64)
    worth = ~alone | (letters * 2 >= lengths)
    return starts[worth], ends[worth], alone[worth]


def _mostly_letters(run: bytes) -> bool:
    """Base64 of text or of a container is three quarters letters; a run mostly of digits is a
    number (an ID or card number, which the matcher reads as it is), not worth decoding."""
    return len(run.translate(None, _NOT_LETTERS)) * 2 >= len(run)


def decode_run(run: bytes) -> bytes | None:
    """The bytes a run of base64 (either alphabet, padding optional, newlines ignored) stands for;
    None when it cannot be base64 (both alphabets mixed, or one character too many)."""
    text = run.replace(b"\r", b"").replace(b"\n", b"").rstrip(b"=")
    urlsafe = b"-" in text or b"_" in text
    if (urlsafe and (b"+" in text or b"/" in text)) or len(text) % 4 == 1:
        return None
    try:
        return base64.b64decode(text + b"=" * (-len(text) % 4), altchars=b"-_" if urlsafe else None, validate=True)
    except binascii.Error:
        return None


def readable(content: bytes) -> bool:
    """Whether decoded bytes are worth scanning: a container the decoder opens, or text."""
    return _reading(content) != BYTES


def _reading(content: bytes) -> str:
    """BODY for a container, text with a BOM, or UTF-8 text that may be a structure (JSON, XML,
    lines); TEXT for other UTF-8 text (control characters and all); _FOREIGN for GB18030 text
    without control characters; BYTES for the rest."""
    if content.startswith(_CONTAINER_OR_BOM):
        return BODY
    if is_utf8(content):
        return BODY if b"\n" in content or _opens_a_structure(content) else TEXT
    if _CONTROL.search(content):
        return BYTES
    try:
        content.decode("gb18030")
    except UnicodeDecodeError:
        return BYTES
    return _FOREIGN


def _opens_a_structure(text: bytes) -> bool:
    opening = text.lstrip()[:5]
    return opening[:1] in (b"{", b"[") or opening == b"<?xml"


def _pieces(run: bytes, start: int) -> Iterator[tuple[int, int]]:
    """The run as one piece when its lines are wrapped base64, else each line long enough."""
    lines = run.split(b"\n")
    widths = {len(line.rstrip(b"\r")) for line in lines[:-1]}
    if len(lines) == 1 or (len(widths) == 1 and widths.pop() % 4 == 0 and len(lines[-1]) <= len(lines[0])):
        yield start, start + len(run)
        return
    for line in lines:
        width = len(line.rstrip(b"\r"))
        if width >= MIN_RUN:
            yield start, start + width
        start += len(line) + 1


def percent_runs(data: bytes) -> Iterator[tuple[int, int]]:
    """(start, end) of every token worth decoding, in order: one with MIN_ESCAPES or more %XX
    escapes, or one escaping a character that never needs it (a digit, a letter: "%311010..." hides
    an ID number behind one escape). A "%" not followed by two hex digits does not count: "100%%%"
    decodes to itself, and read again and again it would look nested too deeply to inspect."""
    first_sign = data.find(b"%")  # memchr, ten times quicker than the regex over text with no "%"
    escape = _ESCAPE.search(data, first_sign) if first_sign >= 0 else None
    if escape is None:
        return
    backwards = data[::-1]  # to find where each token begins
    while escape is not None:
        at = escape.start()
        before = _TOKEN.match(backwards, len(data) - at)  # the token's characters before this escape
        start, end = at - (before.end() - before.start()), token_end(data, at)
        if _ENOUGH_ESCAPES.match(data, at, end) or _NEEDLESS_ESCAPE.search(data, at, end):
            yield start, end
        escape = _ESCAPE.search(data, end)


def token_end(data: bytes, offset: int) -> int:
    """Where the token going on at `offset` ends."""
    return _TOKEN.match(data, offset).end()


def unquote_text(text: bytes) -> bytes:
    """The %XX escapes of a text (a token, or a whole text) decoded, a "%" without two hex digits
    kept as it is. Once each "=" and each bad "%" is escaped ("=3D", "%25") and each "%" made "=",
    the C quoted-printable decoder does exactly that (tested against urllib's unquote, line breaks
    and all), many times faster. A long text goes by pieces (re.sub keeps one per escape)."""
    if len(text) <= _UNQUOTE_PIECE:
        return _unquote_piece(text)
    pieces, start = [], 0
    while start < len(text):
        end = min(start + _UNQUOTE_PIECE, len(text))
        if end < len(text):
            end = escape_cut(text, end)
        pieces.append(_unquote_piece(text[start:end]))
        start = end
    return b"".join(pieces)


def escape_cut(data: bytes, offset: int) -> int:
    """`offset`, or the start of the %XX escape it would cut."""
    sign = data.rfind(b"%", max(offset - 2, 0), offset)
    return offset if sign == -1 else sign


def _unquote_piece(text: bytes) -> bytes:
    if b"=" in text:
        text = text.replace(b"=", b"=3D")
    if _BAD_ESCAPE.search(text):
        text = _BAD_ESCAPE.sub(b"%25", text)
    return binascii.a2b_qp(text.replace(b"%", b"="))
