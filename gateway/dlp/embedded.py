"""Encoded text hidden inside text: base64 (a JSON value, a form field, a data: URI, a JWT part, a
wrapped block) and percent-encoding (a URL or a form value, encoded once more than its container).

Encoding a table of ID numbers first is the easiest way past a scanner that reads text only as it is
written. `encoded_contents(data)` finds every run of base64 characters long enough to hide a
sensitive value (MIN_RUN characters, 12 bytes: an 11-digit mobile number), and every token (text
without whitespace, quotes, angle brackets, "&" or "=", as a URL or a form value is written) with
MIN_ESCAPES or more %XX escapes in it, and decodes them. What comes out is undone like a body when the
scanner can read it (`readable`): a container it opens (zip, gzip, zstd) or text (a UTF BOM, or
well-formed UTF-8 or GB18030 without control characters). Anything else (an image, a hash, a random
token, text with a NUL put in front) is scanned as bytes, as a binary body is: the ASCII tokens in
it are found.

Finding the base64 runs costs one Hyperscan pass over the data, reporting each run once, at its
first MIN_RUN characters (where the character before is not a base64 one); Python `re` does the
same more slowly when Hyperscan is missing. Both alphabets are read: standard (+/) and URL-safe
(-_). Lines of equal length (a multiple of 4, as MIME and PEM wrap base64) are one run; other lines
are runs of their own. A token is found from its first "%" outwards and read once; the tokens of
one text are decoded (by the C quoted-printable decoder) into one content, so a page of encoded
links costs one more scan of the page, not one per link.
"""

import base64
import binascii
import functools
import heapq
import re
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

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
_BAD_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")
_TOKEN = re.compile(rb"[^\x00-\x20\x7f\"'<>\\`&=]*")
BASE64, PERCENT = "base64", "percent-encoded"  # the codings, as locations name them


@dataclass(frozen=True)
class EncodedContent:
    start: int      # byte offsets of the encoded text in the data searched
    end: int
    coding: str     # BASE64 or PERCENT
    content: bytes  # what it decodes to
    readable: bool  # text or a container (undone like a body); else bytes, scanned as they are


def encoded_contents(data: bytes) -> Iterator[EncodedContent]:
    """What the base64 runs in `data` decode to, one content each, and what its percent-encoded
    tokens stand for, as one content (the stretch from the first token to the last, each token
    decoded: a page of encoded links is read once, not link by link), in order."""
    tokens = list(percent_runs(data))
    percent = [(tokens[0][0], tokens[-1][1], PERCENT, percent_decoded(data, tokens))] if tokens else []
    base64 = ((start, end, BASE64, decode_run(data[start:end])) for start, end in base64_runs(data))
    for start, end, coding, content in heapq.merge(base64, percent):
        if content is not None:
            yield EncodedContent(start, end, coding, content, readable(content))


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
    if content.startswith(_CONTAINER_MAGIC) or content.startswith(_TEXT_BOMS):
        return True
    if _CONTROL.search(content):
        return False
    if is_utf8(content):
        return True
    try:
        content.decode("gb18030")
    except UnicodeDecodeError:
        return False
    return True


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
    """(start, end) of every token with MIN_ESCAPES or more %XX escapes in it, in order. (A "%" not
    followed by two hex digits does not count: "100%%%" decodes to itself, and read again and
    again it would look nested too deeply to inspect.)"""
    at = data.find(b"%")
    if at < 0:
        return
    backwards = data[::-1]  # to find where each token begins
    while at >= 0:
        before = _TOKEN.match(backwards, len(data) - at)  # the token's characters before this "%"
        start, end = at - (before.end() - before.start()), _TOKEN.match(data, at).end()
        signs = data.count(b"%", start, end)
        if signs >= MIN_ESCAPES and signs - len(_BAD_ESCAPE.findall(data, start, end)) >= MIN_ESCAPES:
            yield start, end
        at = data.find(b"%", end)


def percent_decoded(data: bytes, tokens: list[tuple[int, int]]) -> bytes:
    """data from the first token's start to the last one's end, each token (start, end) decoded."""
    pieces = []
    for (start, end), following in zip(tokens, [*(start for start, _ in tokens[1:]), tokens[-1][1]]):
        pieces += (unquote_token(data[start:end]), data[end:following])
    return b"".join(pieces)


def unquote_token(token: bytes) -> bytes:
    """A token's %XX escapes decoded (a "%" without two hex digits kept as it is). A token holds no
    "=" or line break, so once each "%" is made "=" the C quoted-printable decoder does exactly that,
    many times faster than urllib's unquote, which is left the tokens with a bad escape."""
    if _BAD_ESCAPE.search(token):
        return unquote_to_bytes(token)
    return binascii.a2b_qp(token.replace(b"%", b"="))
