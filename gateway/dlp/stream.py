"""Scanning a body that arrives in chunks, in bounded memory.

Up to `limits.stream_buffer_bytes` the chunks are buffered and `finish()` runs the full `scan()`
(structure, paths, archives). Past that, the body is scanned as decoded text, window by window:
chunks are decompressed and decoded incrementally, `\\u` escapes and `&#` references undone (and
full-width characters folded when a window is scanned), and each window is scanned together with the tail of the previous
one, so a token cut by a chunk boundary is still found whole. Only matches ending in the new part of
a window are accepted; a match ending too close to the window's end is left for the next window,
which sees it whole.
"""

import codecs
import html
import re
from dataclasses import replace

from gateway.dlp.budget import check_deadline
from gateway.dlp.coding import (
    GZIP_MAGIC, ZIP_MAGIC, DecodeError, Inflater, content_encodings, is_utf8, resolve_charset, sniff_charset,
    utf8_of_gbk,
    unescape_u,
)
from gateway.dlp.decode import (
    Segment,
    child,
    decode_body,
    decode_encoded,
    offset_locator,
    parse_media_type,
)
from gateway.dlp.detectors import MAX_TOKEN_BYTES
from gateway.dlp.embedded import (
    PERCENT,
    EncodedContent,
    base64_content,
    decode_run,
    encoded_runs,
    escape_cut,
    percent_contents,
    readable,
    token_end,
    unquote_text,
)
from gateway.dlp.detections import Detections, StreamColumns
from gateway.dlp.fold import fold

WINDOW_BYTES = 1 << 20
SNIFF_BYTES = 1 << 16
OVERLAP_BYTES = MAX_TOKEN_BYTES + 64
MAX_STREAM_DETECTIONS = 100_000  # held whole: keywords, patterns, what encoded text hides (~450 bytes each)
MAX_STREAM_ROWS = 500_000  # detectors' detections, held as columns (~80 bytes each): a bulk export's numbers
MIN_BASE64_VARIETY = 16  # distinct characters: base64 of any text uses more of the 64 at once
_ARCHIVE_MAGIC = (ZIP_MAGIC[0], GZIP_MAGIC)
_BASE64_PART = re.compile(rb"(?i)content-transfer-encoding:[ \t]*base64")
_NOT_STREAMABLE = ("application/zip", "application/x-zip-compressed", "application/gzip", "application/x-gzip")


class StreamScan:
    def __init__(self, profile, content_type: str | None, content_encoding: str | None, direction: str,
                 host: str | None, *, location: str = "body", depth: int = 0, buffer_bytes: int | None = None,
                 keep: int | None = None):
        self.profile = profile
        self.location = location  # of the body, or of a long encoded token within one (see _follow_token)
        self.depth = depth
        self.content_type = content_type
        self.content_encoding = content_encoding
        self.direction = direction
        self.host = host
        self.keep = keep  # findings kept whole (see Profile.scan)
        self.limits = profile.limits if buffer_bytes is None else replace(profile.limits, stream_buffer_bytes=buffer_bytes)
        self._buffer: bytearray | None = bytearray()
        self._finished = False
        self._problems: list[tuple[str, str]] = []
        self._detections = []  # held whole (see MAX_STREAM_DETECTIONS)
        self._columns = StreamColumns(location)  # the windows' detectors' detections
        self._compressed_bytes = 0
        self._inflated_bytes = 0
        self._inflaters: list[Inflater] = []
        self._decoder = None
        self._undecided = bytearray()  # inflated bytes held until there are enough to sniff the charset
        # UTF-8 and GBK text is read without the codec's str (see _utf8_part, _gbk_part) while it can be:
        self._as_utf8 = None  # what makes a piece's whole characters UTF-8, the rest held back
        self._held = b""      # the start of a character cut by a piece's end (a GBK line's start)
        self._multipart = False
        self._probe_tail = b""          # end of the previous piece, for markers cut by a piece boundary
        self._pending_text = ""
        self._window = bytearray()     # decoded UTF-8 not yet scanned, preceded by the carried tail (folded
                                       # when scanned: offsets are in the text as written)
        self._window_start = 0         # absolute offset of _window[0] in the decoded text
        self._accepted_until = 0       # matches ending at or before this offset were handled already
        self._token: StreamScan | None = None  # a percent-encoded token too long to hold, decoded into its own stream
        self._token_read_to = 0        # absolute offset up to which its raw text (all of it, once ended) was read

    def feed(self, chunk: bytes) -> None:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        if not chunk:
            return
        if self._buffer is not None:
            self._buffer += chunk
            if len(self._buffer) > self.limits.stream_buffer_bytes:
                buffered, self._buffer = bytes(self._buffer), None
                self._start_streaming(buffered)
            return
        self._stream(chunk)

    def feed_decoded(self, text: bytes) -> None:
        """Text already decoded as a buffered scan reads it (UTF-8, escapes undone: a bulk export's one
        text, see Profile.scan), scanned window by window with no charset or escape to undo again.
        Instead of feed(), and once."""
        if self._finished or self._buffer is None or self._buffer:
            raise RuntimeError("feed_decoded() on a stream fed already")
        self._buffer, self._charset = None, "utf-8"
        for piece in _cut(text, WINDOW_BYTES):
            check_deadline()
            self._window += piece
            if len(self._window) >= WINDOW_BYTES + OVERLAP_BYTES:
                self._scan_window(False)
            if self._problems:
                return

    def finish(self, also: list = ()):
        """The scan's result; `also`: detections found beside the body's text (its field names)."""
        if self._finished:
            raise RuntimeError("finish() called twice")
        self._finished = True
        detections, problems = self._conclude()
        return self.profile.apply_rules(detections + list(also), problems, self.direction, self.host, self.keep)

    def _conclude(self) -> tuple[list, list[tuple[str, str]]]:
        """The detections and problems of the whole body, once it has all been fed."""
        if self._buffer is not None:
            decoded = decode_body(bytes(self._buffer), self.content_type, self.content_encoding, self.limits,
                                  location=self.location, depth=self.depth)
            return self.profile.detect_all(decoded, self.location)
        if not self._problems:
            try:
                for inflater in self._inflaters:
                    inflater.finish()
                self._decode(b"", final=True)
            except (DecodeError, UnicodeDecodeError) as error:
                self._fail(str(error))
        return self._columns.detections(self._detections), self._problems

    # streaming mode -----------------------------------------------------------------------------
    def _fail(self, reason: str) -> None:
        if not self._problems:
            self._problems.append((self.location, reason))
        self._window.clear()

    def _start_streaming(self, first: bytes) -> None:
        media, params = parse_media_type(self.content_type)
        if media in _NOT_STREAMABLE or "openxmlformats" in media:
            self._fail(f"{media} body larger than {self.limits.stream_buffer_bytes} bytes cannot be inspected")
            return
        self._multipart = media.startswith("multipart/")
        try:
            self._inflaters = [Inflater(encoding) for encoding in content_encodings(self.content_encoding)]
            self._charset = resolve_charset(params["charset"]) if params.get("charset") else None
        except DecodeError as error:
            self._fail(str(error))
            return
        self._stream(first)

    def _stream(self, chunk: bytes) -> None:
        if self._problems:
            return  # already uninspectable: the rest is not decoded
        self._compressed_bytes += len(chunk)
        pieces = [chunk]
        try:
            for inflater in self._inflaters:
                pieces = [out for piece in pieces for out in inflater.feed(piece)]
            # a window's worth at a time: the first chunk is the whole buffer (stream_buffer_bytes), which
            # scanned as one window would read more candidates than one scan may (MAX_CANDIDATES)
            for piece in (part for piece in pieces for part in _cut(piece, WINDOW_BYTES)):
                check_deadline()
                self._inflated_bytes += len(piece)
                if self._inflaters and self._inflated_bytes > (1 << 20) and \
                        self._inflated_bytes > self.limits.max_ratio * self._compressed_bytes:
                    raise DecodeError(f"compression ratio exceeds {self.limits.max_ratio}:1 (a decompression bomb?)")
                self._refuse_hidden_content(piece)
                self._decode(piece)
        except (DecodeError, UnicodeDecodeError) as error:
            self._fail(str(error) if isinstance(error, DecodeError) else f"body is not valid text: {error.reason}")

    def _refuse_hidden_content(self, piece: bytes) -> None:
        """Text windows cannot see into archives or a multipart body's base64 parts (base64 and
        percent-encoding inside the text are decoded, see _scan_encoded): a stream holding them fails
        closed."""
        probe = self._probe_tail + piece
        if self._inflated_bytes == len(piece) and probe.startswith(_ARCHIVE_MAGIC):
            raise DecodeError(f"archive larger than {self.limits.stream_buffer_bytes} bytes cannot be inspected")
        if self._multipart and (any(magic in probe for magic in _ARCHIVE_MAGIC) or _BASE64_PART.search(probe)):
            raise DecodeError(f"multipart body larger than {self.limits.stream_buffer_bytes} bytes with an "
                              "archive or base64 part cannot be inspected")
        self._probe_tail = probe[-64:]

    def _decode(self, piece: bytes, final: bool = False) -> None:
        if self._decoder is None:
            self._undecided += piece
            if len(self._undecided) < SNIFF_BYTES and not final:
                return
            piece, self._undecided = bytes(self._undecided), bytearray()
            charset = self._charset or sniff_charset(piece[:SNIFF_BYTES], complete=final)
            self._decoder = codecs.getincrementaldecoder(charset)("strict")
            self._as_utf8 = {"utf-8": _utf8_part, "gb18030": _gbk_part}.get(codecs.lookup(charset).name)
        if self._as_utf8 is not None:
            data = self._held + piece
            utf8, held = self._as_utf8(data, final)
            if utf8 is not None and len(held) <= WINDOW_BYTES:
                self._held = held
                if self._pending_text or b"\\" in utf8 or b"&" in utf8:  # escapes to undo: as text
                    self._push_text(utf8.decode("utf-8"), final)
                else:
                    self._push_utf8(utf8, final)
                return
            self._as_utf8, piece, self._held = None, data, b""  # the codec reads the rest, from here
        self._push_text(self._decoder.decode(piece, final), final)

    def _push_utf8(self, utf8: bytes, final: bool) -> None:
        """Text with no escape to undo, UTF-8 already: into the window as it is (_push_text's end)."""
        self._window += utf8
        if final or len(self._window) >= WINDOW_BYTES + OVERLAP_BYTES:
            self._scan_window(final)

    def _push_text(self, text: str, final: bool = False) -> None:
        text = self._pending_text + text
        cut = len(text)
        # keep back a possibly incomplete \uXXXX escape or &#...; reference ("&#1114111;": 10 characters)
        for mark, reach in (("\\", 5), ("&", 10)):
            at = -1 if final else text.rfind(mark, max(len(text) - reach, 0))
            cut = min(cut, at) if at != -1 else cut
        self._pending_text = text[cut:]
        text = text[:cut]
        if "\\u" in text:
            text = unescape_u(text)
        if "&#" in text:  # HTML and XML character references, as a buffered body's plain text undoes them
            text = html.unescape(text)
        self._push_utf8(text.encode("utf-8", "surrogatepass"), final)

    def _scan_window(self, final: bool) -> None:
        data = bytes(self._window)
        accept_end = len(data) if final else len(data) - OVERLAP_BYTES
        folding = fold(data)  # values are reported folded (as before), offsets in the text as written
        segment = Segment(data if folding is None else folding.data, self.location,
                          locate=offset_locator(self.location), folding=folding)
        low = self._accepted_until - self._window_start
        detections, overflow = self.profile.detect([segment], base_offset=self._window_start,
                                                   accept=(low, accept_end), columns=True)
        if not self._add_window(detections, overflow):
            return
        held = self._scan_encoded(data, low, accept_end, final)
        self._accepted_until = self._window_start + accept_end
        keep_from = min(max(accept_end - OVERLAP_BYTES, 0), held)
        if self._token is not None:
            keep_from = min(keep_from, self._token_read_to - self._window_start)
        del self._window[:keep_from]
        self._window_start += keep_from

    def _scan_encoded(self, data: bytes, low: int, accept_end: int, final: bool) -> int:
        """Scan what base64 runs and percent-encoded tokens ending in the window's new part hide (as
        `scan()` does); returns where the first one still open begins, held back so the next window
        sees it whole. A base64 run longer than a window is let go when it starts as binary (an
        image), else the stream fails closed: text that size cannot be held. A percent-encoded token
        longer than a window is decoded into a stream of its own (an escape is 3 bytes long: the
        token is cut between escapes), which reads it as this one reads the body."""
        held = len(data)
        if self._token is not None and not self._follow_token(data, accept_end, final):
            return held
        contents: list[EncodedContent] = []
        tokens: list[tuple[int, int]] = []
        for start, end, coding in encoded_runs(data):
            if end <= low or (coding == PERCENT and start < self._token_read_to - self._window_start):
                continue  # scanned with an earlier window, or (part of) the long token, read already
            if coding == PERCENT and end > accept_end and end - start > WINDOW_BYTES:
                if self.depth >= self.limits.max_depth:
                    self._fail(f"nesting deeper than {self.limits.max_depth} levels")
                    return held
                where = child(child(self.location, f"offset {self._window_start + start}"), PERCENT)
                self._token = StreamScan(self.profile, None, None, self.direction, self.host, location=where,
                                         depth=self.depth + 1)
                self._token_read_to = self._window_start + start
                if not self._follow_token(data, accept_end, final):
                    return held
            elif end > accept_end:
                if end - start <= WINDOW_BYTES:
                    held = min(held, start)
                elif _readable_head(data[start:start + WINDOW_BYTES]):
                    self._fail(f"{coding} text longer than {WINDOW_BYTES} bytes in a streamed body cannot be inspected")
                    return held
            elif coding == PERCENT:
                tokens.append((start, end))
            else:
                contents.append(base64_content(data, start, end))
        contents += percent_contents(data, tokens)
        location, window_start = self.location, self._window_start
        for found in contents:
            if found.content is None:
                continue
            decoded = decode_encoded(found, self.limits,
                                     lambda offset: (child(location, f"offset {window_start + offset}"), None),
                                     self.depth + 1)
            if not self._add(*self.profile.detect_decoded(decoded)):
                return held
            self._problems += decoded.problems
        return held

    def _follow_token(self, data: bytes, accept_end: int, final: bool) -> bool:
        """Decode the long token's raw text in this window into its stream, up to the window's
        accepted end (never cutting an escape), and conclude that stream where the token ends (its
        tail, in the next window's overlap, is then not read again). False when the stream failed."""
        begin = self._token_read_to - self._window_start
        end = token_end(data, begin)
        ends_here = end < len(data) or final
        cut = end if ends_here else max(escape_cut(data, min(end, accept_end)), begin)
        self._token.feed(unquote_text(data[begin:cut]))
        self._token_read_to = self._window_start + cut
        if not ends_here:
            return True
        detections, problems = self._token._conclude()
        self._token = None
        if problems:
            self._problems += problems
            self._window.clear()
            return False
        return self._add(detections, False)

    def _add_window(self, detections, overflow: bool) -> bool:
        """A window's detections: its detectors' as columns (copied out of the window), the rest whole."""
        if overflow or self._columns.rows + len(detections) > MAX_STREAM_ROWS:
            self._fail("too many candidate matches in the stream")
            return False
        if isinstance(detections, Detections) and detections.columns is not None:
            self._columns.add_columns(detections.columns)
            return self._add(detections.listed, False)
        self._columns.add_detections([d for d in detections if d.kind == "detector"])  # made one by one
        return self._add([d for d in detections if d.kind != "detector"], False)

    def _add(self, detections, overflow: bool) -> bool:
        if overflow or len(self._detections) + len(detections) > MAX_STREAM_DETECTIONS:
            self._fail("too many candidate matches in the stream")
            return False
        self._detections += [detection.resolved() for detection in detections]  # windows are let go
        return True


def _utf8_part(data: bytes, final: bool) -> tuple[bytes | None, bytes]:
    """UTF-8 text's whole characters (None where it is not well-formed UTF-8) and the start of a
    character its end cut, held for the next piece."""
    cut = len(data)
    if not final:
        for back in range(1, min(4, len(data)) + 1):  # the last character's first byte
            byte = data[-back]
            if byte & 0xC0 != 0x80:
                if byte >= 0xC0 and back < (2 if byte < 0xE0 else 3 if byte < 0xF0 else 4):
                    cut = len(data) - back
                break
    return (data[:cut] if is_utf8(data[:cut]) else None), data[cut:]


def _gbk_part(data: bytes, final: bool) -> tuple[bytes | None, bytes]:
    """GBK text's whole lines as UTF-8, converted in C (None where the kernels are not compiled or a line
    holds a form GBK lacks, such as GB 18030's four-byte ones), and the last line's start, held: a
    newline is never part of a two-byte form, so a line is whole characters."""
    cut = len(data) if final else data.rfind(b"\n") + 1
    return utf8_of_gbk(data[:cut]) if cut else b"", data[cut:]


def _cut(data: bytes, size: int) -> list[bytes]:
    return [data] if len(data) <= size else [data[at:at + size] for at in range(0, len(data), size)]


def _readable_head(run: bytes) -> bool:
    """Whether the start of a long base64 run decodes to readable content (it may end in the
    middle of a character). A run of a few characters repeated that decodes to no UTF-8 text (`aaaa…`,
    `AAAA…`: filler, a few bytes repeated that read only as GB18030 or NUL "text") holds no content;
    one that does (a word of text repeated, which may hide a value after it) is content."""
    head = decode_run(run[:len(run) // 4 * 4])
    if head is None:
        return False
    heads = [head[:len(head) - cut] for cut in range(4)]
    if len(set(run)) < MIN_BASE64_VARIETY and not any(is_utf8(text) and b"\0" not in text for text in heads):
        return False
    return any(readable(text) for text in heads)
