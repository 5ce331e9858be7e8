"""Encoded text hidden inside text: base64 (a JSON value, a form field, a data: URI, a JWT part, a
wrapped block) and percent-encoding (a URL or a form value, encoded once more than its container).

Encoding a table of ID numbers first is the easiest way past a scanner that reads text only as it is
written. `encoded_contents(data)` finds every run of base64 characters long enough to hide a
sensitive value (MIN_RUN characters, 12 bytes: an 11-digit mobile number), and every token (text
without whitespace, quotes, angle brackets, "&" or "=", as a URL or a form value is written) with
MIN_ESCAPES or more %XX escapes in it, or an escaped digit or letter, and decodes them. What comes
out is undone like a body when the scanner can read it (`readable`): a container it opens (zip,
gzip, zstd) or text (a UTF BOM, or well-formed UTF-8 or GB18030 without control characters).
Anything else (an image, a hash, a random token, text with a NUL put in front) is scanned as bytes,
as a binary body is: the ASCII tokens in it are found.

Finding the base64 runs costs one Hyperscan pass over the data, reporting each run once, at its
first MIN_RUN characters (where the character before is not a base64 one); Python `re` does the
same more slowly when Hyperscan is missing. Both alphabets are read: standard (+/) and URL-safe
(-_). Lines of equal length (a multiple of 4, as MIME and PEM wrap base64) are one run; other lines
are runs of their own. A token is found from its first "%" outwards and read once, and decoded
by the C quoted-printable decoder; the plain text tokens of one text are read as one content, so a
page of encoded links costs one more scan of its links, not one per link.
"""

import base64
import binascii
import bisect
import functools
import heapq
import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass

from gateway.dlp.coding import GZIP_MAGIC, ZIP_MAGIC, ZSTD_MAGIC, is_utf8, match_ends
from gateway.dlp.matcher import hyperscan

MIN_RUN = 16
_ALPHABET = rb"A-Za-z0-9+/_-"
_RUN_START = rb"(?:^|[^" + _ALPHABET + rb"])[" + _ALPHABET + rb"]{%d}" % MIN_RUN
_RUN_START_RE = re.compile(rb"(?<![" + _ALPHABET + rb"])[" + _ALPHABET + rb"]{%d}" % MIN_RUN)
# A run from its first character: lines joined by newlines, padding at the very end.
_RUN = re.compile(rb"[" + _ALPHABET + rb"]+(?:\r?\n[" + _ALPHABET + rb"]+)*=*")
_CONTAINER_MAGIC = (*ZIP_MAGIC, GZIP_MAGIC, ZSTD_MAGIC)
_TEXT_BOMS = (b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff")
_CONTROL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_NOT_LETTERS = b"0123456789+/_-=\r\n"
MIN_ESCAPES = 3  # one CJK character in UTF-8 is three %XX escapes, three digits of a number too
_ESCAPE = re.compile(rb"%[0-9A-Fa-f]{2}")
_BAD_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")
_NEEDLESS_ESCAPE = re.compile(rb"%(?:3[0-9]|[46][1-9A-Fa-f]|[57][0-9Aa]|2[DEde]|5[Ff]|7[Ee])")  # 0-9 A-Z a-z - . _ ~
_TOKEN = re.compile(rb"[^\x00-\x20\x7f\"'<>\\`&=]*")
BASE64, PERCENT = "base64", "percent-encoded"  # the codings, as locations name them
BODY, TEXT, BYTES = "body", "text", "bytes"  # how a content is read, see EncodedContent
_MAY_OPEN_A_BODY = b"{[< \t\x0b\x0c" + bytes({magic[0] for magic in (*_CONTAINER_MAGIC, *_TEXT_BOMS)})


@dataclass(frozen=True)
class EncodedContent:
    start: int      # byte offsets of the encoded text in the data searched (of the first and last token)
    end: int
    coding: str     # BASE64 or PERCENT
    content: bytes  # what it decodes to
    read_as: str    # BODY: undone like a body (structure, container, charset); TEXT: plain UTF-8 text;
                    # BYTES: scanned as they are
    pieces: tuple[tuple[int, int], ...] = ()  # (offset in content, offset in data) of each token joined

    def source(self, offset: int) -> tuple[int, int]:
        """(offset in the data searched, offset within that token's decoded text) of a content offset."""
        if not self.pieces:
            return self.start, offset
        piece = self.pieces[bisect.bisect_right(self.pieces, offset, key=lambda piece: piece[0]) - 1]
        return piece[1], offset - piece[0]


def encoded_contents(data: bytes) -> Iterator[EncodedContent]:
    """What the base64 runs in `data` decode to, one content each, and what its percent-encoded
    tokens stand for (see percent_contents), in order of their first byte."""
    base64 = (base64_content(data, start, end) for start, end in base64_runs(data))
    percent = percent_contents(data, list(percent_runs(data)))
    for found in heapq.merge(base64, percent, key=lambda found: found.start):
        if found.content is not None:
            yield found


def base64_content(data: bytes, start: int, end: int) -> EncodedContent:
    """What data[start:end], a base64 run, decodes to (content None when it cannot be base64)."""
    content = decode_run(data[start:end])
    read_as = BODY if content is not None and readable(content) else BYTES
    return EncodedContent(start, end, BASE64, content, read_as)


def percent_contents(data: bytes, tokens: list[tuple[int, int]]) -> list[EncodedContent]:
    """The tokens (start, end) of `data` decoded. Plain text (UTF-8 on one line, opening no JSON or
    XML) is read as one content, the texts joined by newlines, so a page of encoded links costs one
    more scan of its links, not one per link; so are the tokens that decode to bytes. A token that
    decodes to a structure, a container or text in another charset is a content of its own, undone
    like a body. Each content knows where its tokens are (`pieces`), to locate what is found."""
    texts = [unquote_token(data[start:end]) for start, end in tokens]
    everything = b"\n".join(texts)
    if everything.count(b"\n") >= len(texts) or _CONTROL.search(everything) or not is_utf8(everything):
        readings = [_reading(text) for text in texts]
    else:  # the usual case, all text: only a token opening with what a structure or container may is looked at
        readings = [_reading(text) if text[:1] in _MAY_OPEN_A_BODY else TEXT for text in texts]
    joined: dict[str, list[tuple[int, int, bytes]]] = {TEXT: [], BYTES: []}
    contents = []
    for (start, end), text, read_as in zip(tokens, texts, readings):
        if read_as == BODY:
            contents.append(EncodedContent(start, end, PERCENT, text, BODY))
        else:
            joined[read_as].append((start, end, text))
    for read_as, found in joined.items():
        if found:
            offsets = itertools.accumulate((len(text) + 1 for _, _, text in found[:-1]), initial=0)
            pieces = tuple((offset, start) for offset, (start, _, _) in zip(offsets, found))
            content = b"\n".join(text for _, _, text in found)
            contents.append(EncodedContent(found[0][0], found[-1][1], PERCENT, content, read_as, pieces))
    return sorted(contents, key=lambda found: found.start)


def encoded_runs(data: bytes) -> Iterator[tuple[int, int, str]]:
    """(start, end, coding) of every base64 run and percent-encoded token, by start."""
    return heapq.merge(((start, end, BASE64) for start, end in base64_runs(data)),
                       ((start, end, PERCENT) for start, end in percent_runs(data)))


def base64_runs(data: bytes) -> Iterator[tuple[int, int]]:
    """(start, end) of every run of base64 characters of MIN_RUN or more, in order."""
    searched_to = 0
    for start in _run_starts(data):
        if start < searched_to:
            continue  # a later line of a wrapped run already read
        match = _RUN.match(data, start)
        assert match is not None  # the run start was just found there
        searched_to = match.end()
        for piece_start, piece_end in _pieces(match.group(), start):
            if _mostly_letters(data[piece_start:piece_end]):
                yield piece_start, piece_end


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
    """TEXT for plain UTF-8 text (one line, opening no JSON or XML), BODY for other text or a
    container, BYTES for the rest."""
    if content.startswith(_CONTAINER_MAGIC) or content.startswith(_TEXT_BOMS):
        return BODY
    if _CONTROL.search(content):
        return BYTES
    if is_utf8(content):
        return BODY if b"\n" in content or content.lstrip()[:1] in (b"{", b"[", b"<") else TEXT
    try:
        content.decode("gb18030")
    except UnicodeDecodeError:
        return BYTES
    return BODY


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


def _run_starts(data: bytes) -> Iterator[int]:
    if hyperscan is None:
        for match in _RUN_START_RE.finditer(data):
            yield match.start()
        return
    for end in match_ends(_run_database(), data):
        yield end - MIN_RUN


@functools.cache
def _run_database():
    database = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
    database.compile(expressions=[_RUN_START], ids=[0], elements=1, flags=[0])
    return database


def percent_runs(data: bytes) -> Iterator[tuple[int, int]]:
    """(start, end) of every token worth decoding, in order: one with MIN_ESCAPES or more %XX
    escapes, or one escaping a character that never needs it (a digit, a letter: "%311010..." hides
    an ID number behind one escape). A "%" not followed by two hex digits does not count: "100%%%"
    decodes to itself, and read again and again it would look nested too deeply to inspect."""
    escape = _ESCAPE.search(data)
    if escape is None:
        return
    backwards = data[::-1]  # to find where each token begins
    while escape is not None:
        at = escape.start()
        before = _TOKEN.match(backwards, len(data) - at)  # the token's characters before this escape
        start, end = at - (before.end() - before.start()), _TOKEN.match(data, at).end()
        if _escapes_enough(data, at, end) or _NEEDLESS_ESCAPE.search(data, at, end):
            yield start, end
        escape = _ESCAPE.search(data, end)


def _escapes_enough(data: bytes, start: int, end: int) -> bool:
    """Whether data[start:end] holds MIN_ESCAPES valid escapes (counting no further: a token may be long)."""
    signs = data.count(b"%", start, end)
    if signs < MIN_ESCAPES:
        return False
    if _BAD_ESCAPE.search(data, start, end) is None:
        return True  # every sign an escape, as in any encoded link
    return sum(1 for _ in itertools.islice(_ESCAPE.finditer(data, start, end), MIN_ESCAPES)) == MIN_ESCAPES


def unquote_token(token: bytes) -> bytes:
    """A token's %XX escapes decoded (a "%" without two hex digits kept as it is). A token holds no
    "=" or line break, so once each bad "%" is escaped itself ("%25") and each "%" made "=", the C
    quoted-printable decoder does exactly that, many times faster than urllib's unquote."""
    if _BAD_ESCAPE.search(token):
        token = _BAD_ESCAPE.sub(b"%25", token)
    return binascii.a2b_qp(token.replace(b"%", b"="))
