"""Incremental decompression (Content-Encoding) and charset handling with output limits.

Every decompressor yields output in bounded pieces, so a small compressed input can never make a
single call allocate more than PIECE bytes: the caller counts the pieces and stops at its limit.
"""

import codecs
import functools
import re
import threading
import zlib
from collections.abc import Iterator

import brotli
from isal import isal_zlib

from gateway.dlp.native import kernels

try:
    import hyperscan
except ImportError:  # the fallback keeps the gateway working, only slower
    hyperscan = None

try:
    from compression import zstd  # Python >= 3.14
except ImportError:
    from backports import zstd

PIECE = 1 << 20


_U_ESCAPE = re.compile(r"\\u([0-9a-fA-F]{4})")


def unescape_u(text: str) -> str:
    return _U_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), text)


class DecodeError(ValueError):
    """Content that cannot be decoded; the message says why (it becomes an `uninspectable` finding)."""


class _IsalError(DecodeError):
    """A gzip member ISA-L could not decompress: told again as zlib tells it."""


class Inflater:
    """Incremental decoder for one Content-Encoding token; `isal`: gzip members are decompressed by
    ISA-L (about 3x quicker than zlib), which raises _IsalError where zlib would raise DecodeError."""

    SUPPORTED = ("gzip", "x-gzip", "deflate", "br", "zstd", "identity")

    def __init__(self, encoding: str, isal: bool = False):
        self.encoding = encoding.strip().lower()
        self._isal = isal and self.encoding in ("gzip", "x-gzip")
        if self.encoding not in self.SUPPORTED:
            raise DecodeError(f"unsupported content-encoding {encoding!r}")
        self._zlib = None
        self._started = False
        self._brotli = brotli.Decompressor() if self.encoding == "br" else None
        self._zstd = zstd.ZstdDecompressor() if self.encoding == "zstd" else None
        self._finished = self.encoding == "identity"

    def feed(self, data: bytes) -> Iterator[bytes]:
        try:
            if self.encoding == "identity":
                if data:
                    yield data
            elif self._brotli is not None:
                yield from self._feed_brotli(data)
            elif self._zstd is not None:
                yield from self._feed_zstd(data)
            else:
                yield from self._feed_zlib(data)
        except (zlib.error, brotli.error, zstd.ZstdError) as error:
            raise DecodeError(f"corrupt {self.encoding} data: {error}") from None
        except isal_zlib.error as error:
            raise _IsalError(f"corrupt {self.encoding} data: {error}") from None

    def finish(self) -> None:
        """Raise if the compressed stream ended before its end marker."""
        if self.encoding in ("gzip", "x-gzip", "deflate") and self._zlib is not None:
            self._finished = self._zlib.eof
        elif self._brotli is not None:
            self._finished = self._brotli.is_finished()
        elif self._zstd is not None:
            self._finished = self._zstd.eof
        if not self._finished:
            raise DecodeError(f"truncated {self.encoding} data")

    def _feed_zlib(self, data: bytes) -> Iterator[bytes]:
        while data:
            if self._zlib is None or (self._zlib.eof and self.encoding != "deflate"):
                if self._zlib is not None and self._zlib.eof and not data.strip(b"\0"):
                    return  # gzip trailer padding
                # ISA-L ignores a gzip header's reserved flags, which zlib refuses
                library = isal_zlib if self._isal and len(data) > 3 and not data[3] & 0xE0 else zlib
                self._zlib = library.decompressobj(self._wbits(data))
            elif self._zlib.eof:
                raise DecodeError("data after the end of the deflate stream")
            output = self._zlib.decompress(data, PIECE)
            if output:
                yield output
            while self._zlib.unconsumed_tail or len(output) == PIECE:
                output = self._zlib.decompress(self._zlib.unconsumed_tail, PIECE)
                if not output and not self._zlib.unconsumed_tail:
                    break
                yield output
            data = self._zlib.unused_data  # the next gzip member, if any

    def _wbits(self, first: bytes) -> int:
        if self.encoding != "deflate":
            return 16 + zlib.MAX_WBITS
        # "deflate" is zlib-wrapped per RFC 9110, but servers also send raw deflate
        wrapped = len(first) >= 2 and first[0] & 0x0F == 8 and ((first[0] << 8) | first[1]) % 31 == 0
        return zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS

    def _feed_brotli(self, data: bytes) -> Iterator[bytes]:
        output = self._brotli.process(data, output_buffer_limit=PIECE)
        if output:
            yield output
        while not self._brotli.can_accept_more_data():
            output = self._brotli.process(b"", output_buffer_limit=PIECE)
            if not output:
                break
            yield output

    def _feed_zstd(self, data: bytes) -> Iterator[bytes]:
        while True:
            if self._zstd.eof:
                if not data:
                    return
                self._zstd = zstd.ZstdDecompressor()  # next frame
            output = self._zstd.decompress(data, PIECE)
            data = b""
            if output:
                yield output
            if self._zstd.eof:
                data = self._zstd.unused_data
                if not data:
                    return
            elif self._zstd.needs_input:
                return


def content_encodings(header: str | None) -> list[str]:
    """Encodings in the order they must be undone (the header lists them in the order applied)."""
    if not header:
        return []
    return [token.strip().lower() for token in reversed(header.split(",")) if token.strip()]


def inflate(data: bytes, header: str | None, max_bytes: int, max_ratio: int) -> bytes:
    """Undo every Content-Encoding of `data` within the size and ratio limits."""
    for encoding in content_encodings(header):
        try:
            data = _inflated(data, Inflater(encoding, isal=True), max_bytes, max_ratio)
        except _IsalError:  # undone again by zlib: what it accepts is accepted, its error told
            data = _inflated(data, Inflater(encoding), max_bytes, max_ratio)
    return data


def _inflated(data: bytes, inflater: Inflater, max_bytes: int, max_ratio: int) -> bytes:
    pieces: list[bytes] = []
    total = 0
    for piece in inflater.feed(data):
        total += len(piece)
        check_inflated_size(total, len(data), max_bytes, max_ratio)
        pieces.append(piece)
    inflater.finish()
    return b"".join(pieces)


def check_inflated_size(inflated: int, compressed: int, max_bytes: int, max_ratio: int) -> None:
    if inflated > max_bytes:
        raise DecodeError(f"decompressed size exceeds the limit of {max_bytes} bytes")
    if inflated > PIECE and inflated > max_ratio * max(compressed, 1):
        raise DecodeError(f"compression ratio exceeds {max_ratio}:1 (a decompression bomb?)")


# Declared charsets that are decoded with a superset to tolerate real-world mislabelling.
_SUPERSETS = {"gb2312": "gb18030", "gbk": "gb18030", "cp936": "gb18030", "x-gbk": "gb18030",
              "iso-8859-1": "cp1252", "latin-1": "cp1252", "us-ascii": "utf-8", "ascii": "utf-8"}


def resolve_charset(declared: str) -> str:
    name = declared.strip().strip('"').lower()
    name = _SUPERSETS.get(name, name)
    try:
        return codecs.lookup(name).name
    except LookupError:
        raise DecodeError(f"unknown charset {declared!r}") from None


def sniff_charset(data: bytes, complete: bool = True) -> str:
    """Charset of undeclared text: BOM, then UTF-16 by its NUL pattern, then UTF-8, then GB18030.

    With complete=False `data` is the start of a stream and may end inside a character.
    """
    return _sniffed(data, complete)[0]


def _sniffed(data: bytes, complete: bool) -> tuple[str, str | None]:
    """sniff_charset, and the text when telling GB18030 took decoding all of it."""
    if data.startswith(codecs.BOM_UTF8):
        return "utf-8-sig", None
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16", None
    head = data[:4096]
    if len(head) >= 4:
        even_nuls, odd_nuls = head[0::2].count(0), head[1::2].count(0)
        half = len(head) // 2
        if odd_nuls > 0.3 * half and even_nuls < 0.05 * half:
            return "utf-16-le", None
        if even_nuls > 0.3 * half and odd_nuls < 0.05 * half:
            return "utf-16-be", None
    if complete and is_utf8(data):
        return "utf-8", None
    if complete:
        try:
            return "gb18030", _gb18030(data)
        except UnicodeDecodeError:
            return "latin-1", None  # binary content: ASCII tokens are still found
    for charset in ("utf-8", "gb18030"):  # a stream's start, which may end inside a character
        try:
            codecs.getincrementaldecoder(charset)().decode(data, final=False)
            return charset, None
        except UnicodeDecodeError:
            pass
    return "latin-1", None  # binary content: ASCII tokens are still found


def charset_and_text(data: bytes, declared: str | None) -> tuple[str, str | None]:
    """The charset a whole text is decoded with (the declared one, else sniffed), and the text when
    sniffing decoded it already (undeclared GB18030), so that it is decoded once."""
    charset, text = (resolve_charset(declared), None) if declared else _sniffed(data, True)
    if charset.startswith("utf-16") and data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        charset = "utf-16"
    return charset, text


def decode_as(data: bytes, charset: str) -> str:
    try:
        return _gb18030(data) if charset == "gb18030" else data.decode(charset)
    except UnicodeDecodeError as error:
        raise DecodeError(f"body is not valid {charset} (byte {error.start})") from None


def _gb18030(data: bytes) -> str:
    """GB 18030 text, read by the GBK codec where it can (15% quicker): every form GBK reads, GB 18030
    reads alike (tests/test_dlp_decode_fast.py checks each). Text holding a form GBK lacks (a four-byte
    form, the euro sign) is read again, by GB 18030's codec."""
    try:
        return data.decode("gbk")
    except UnicodeDecodeError:
        return data.decode("gb18030")


def utf8_of_gbk(data: bytes) -> bytes | None:
    """GB 18030 text as UTF-8, converted in C with no str between (a GBK export: 0.8 ms a MB against
    3.9 for decoding and encoding it); None where the kernels are not compiled or the text holds a form
    GBK lacks (decode_as then reads it, or says where it is not GB 18030)."""
    return None if kernels is None else kernels.gbk_to_utf8(_gbk_forms(), data)


@functools.cache
def _gbk_forms() -> bytes:
    """Per two-byte form (lead * 256 + trail): its UTF-8 as Python's GBK codec reads it, and the UTF-8's
    length as the 4th byte (0: a form GBK lacks). Built once, on the first GBK text (~20 ms)."""
    table = bytearray(65536 * 4)
    for lead in range(0x81, 0xFF):
        for trail in range(0x40, 0xFF):
            try:
                character = bytes((lead, trail)).decode("gbk")
            except UnicodeDecodeError:
                continue
            utf8 = character.encode("utf-8")
            if len(character) == 1 and len(utf8) <= 3:
                at = 4 * (lead * 256 + trail)
                table[at:at + len(utf8)] = utf8
                table[at + 3] = len(utf8)
    return bytes(table)


def decode_text(data: bytes, declared: str | None) -> tuple[str, str]:
    """The text and the charset it was decoded with."""
    charset, text = charset_and_text(data, declared)
    return (decode_as(data, charset) if text is None else text), charset


# Containers the decoder opens whatever a body is labelled: zip (local file header, or the end record
# of an empty archive), gzip (deflate method) and zstd frames.
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
GZIP_MAGIC = b"\x1f\x8b\x08"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

# Well-formed UTF-8 (RFC 3629 section 4): no overlong forms, no surrogates, nothing past U+10FFFF.
_TAIL = rb"[\x80-\xbf]"
_UTF8_CHAR = (rb"[\x00-\x7f]|[\xc2-\xdf]" + _TAIL + rb"|\xe0[\xa0-\xbf]" + _TAIL
              + rb"|[\xe1-\xec\xee\xef]" + _TAIL * 2 + rb"|\xed[\x80-\x9f]" + _TAIL
              + rb"|\xf0[\x90-\xbf]" + _TAIL * 2 + rb"|[\xf1-\xf3]" + _TAIL * 3 + rb"|\xf4[\x80-\x8f]" + _TAIL * 2)
_UTF8_TEXT = rb"\A(?:" + _UTF8_CHAR + rb")*\z"  # matches (once, at the end) exactly when all is well-formed
_HYPERSCAN_FROM = 64 * 1024  # below this, Python's decoder is as fast as a call into Hyperscan
# A regex looking for a run tries up to the run's length at every byte: ~15 us a KiB of text, against
# a Hyperscan call's ~0.7 us fixed cost and ~1.5 us for a KiB (up to 64 KiB: 1 ms against 50-80 us).
_RUN_HYPERSCAN_FROM = 64
_scratches = threading.local()


@functools.cache
def _utf8_database():
    database = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
    database.compile(expressions=[_UTF8_TEXT], ids=[0], elements=1,
                     flags=[hyperscan.HS_FLAG_SINGLEMATCH | hyperscan.HS_FLAG_ALLOWEMPTY])
    return database


def is_utf8(data: bytes) -> bool:
    """Whether `data` is well-formed UTF-8, decided as Python's decoder decides, without building the
    string: for large bodies Hyperscan runs the check with the GIL released (a scan thread then leaves
    the event loop free), where decoding a MiB of CJK text holds the GIL for ~2 ms."""
    if data.isascii():
        return True
    if hyperscan is None or len(data) < _HYPERSCAN_FROM:
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            return False
        return True
    return bool(match_ends(_utf8_database(), data))


def match_ends(database, data: bytes) -> list[int]:
    """End offsets of the matches a Hyperscan block-mode database reports in `data` (released GIL)."""
    ends: list[int] = []
    database.scan(data, match_event_handler=_note_end, context=ends, scratch=_scratch(database))
    return ends


def first_start(characters: bytes, count: int, data: bytes) -> int | None:
    """Where the first run of `count` bytes of the class `characters` (as written in a regex: b"0-9A-Z")
    starts in `data`, or None: one Hyperscan pass reporting one match (a regex search for small data),
    so that a numpy pass over a whole text is made only when the text holds such a run, and from there."""
    if hyperscan is None or len(data) < _RUN_HYPERSCAN_FROM:
        match = _run_regex(characters, count).search(data)
        return None if match is None else match.start()
    ends = match_ends(_first_match_database(b"[%s]{%d}" % (characters, count)), data)
    return ends[0] - count if ends else None  # the first run to reach `count` bytes starts there


def may_match(expression: bytes, data: bytes) -> bool:
    """False only when the regex surely matches nowhere in `data`: one Hyperscan pass that ends at the
    first match. Without Hyperscan, True: a backtracking engine could take quadratic time to say no."""
    return hyperscan is None or bool(match_ends(_first_match_database(expression), data))


@functools.cache
def _run_regex(characters: bytes, count: int) -> re.Pattern[bytes]:
    return re.compile(b"[%s]{%d}" % (characters, count))


@functools.cache
def _first_match_database(expression: bytes):
    """One expression, reported once: Hyperscan stops scanning at its first match."""
    database = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
    database.compile(expressions=[expression], ids=[0], elements=1, flags=[hyperscan.HS_FLAG_SINGLEMATCH])
    return database


def _scratch(database):
    scratches = getattr(_scratches, "by_database", None)
    if scratches is None:
        scratches = _scratches.by_database = {}
    scratch = scratches.get(database)
    if scratch is None:  # Hyperscan scratch space must not be shared between threads
        scratch = scratches[database] = hyperscan.Scratch(database)
    return scratch


def _note_end(pattern: int, start: int, end: int, flags: int, ends: list[int]) -> None:
    ends.append(end)

