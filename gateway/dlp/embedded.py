"""Base64 hidden inside text: a JSON value, a form field, a data: URI, a JWT part, a wrapped block.

Encoding a table of ID numbers first is the easiest way past a scanner that reads text only as it is
written. `encoded_contents(data)` finds every run of base64 characters long enough to hide a
sensitive value (MIN_RUN characters, 12 bytes: an 11-digit mobile number) and decodes it. What
comes out is undone like a body when the scanner can read it (`readable`): a container it opens
(zip, gzip, zstd) or text (a UTF BOM, or well-formed UTF-8 or GB18030 without control characters).
Anything else (an image, a hash, a random token, text with a NUL put in front) is scanned as bytes,
as a binary body is: the ASCII tokens in it are found.

Finding the runs costs one Hyperscan pass over the data, reporting each run once, at its first
MIN_RUN characters (where the character before is not a base64 one); Python `re` does the same
more slowly when Hyperscan is missing. Both alphabets are read: standard (+/) and URL-safe (-_).
Lines of equal length (a multiple of 4, as MIME and PEM wrap base64) are one run; other lines are
runs of their own.
"""

import base64
import binascii
import functools
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


@dataclass(frozen=True)
class EncodedContent:
    start: int      # byte offsets of the base64 text in the data searched
    end: int
    content: bytes  # what it decodes to
    readable: bool  # text or a container (undone like a body); else bytes, scanned as they are


def encoded_contents(data: bytes) -> Iterator[EncodedContent]:
    """What every base64 run in `data` decodes to, in order."""
    for start, end in base64_runs(data):
        content = decode_run(data[start:end])
        if content is not None:
            yield EncodedContent(start, end, content, readable(content))


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

