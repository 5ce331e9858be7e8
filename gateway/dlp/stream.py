"""Scanning a body that arrives in chunks, in bounded memory.

Up to `limits.stream_buffer_bytes` the chunks are buffered and `finish()` runs the full `scan()`
(structure, paths, archives). Past that, the body is scanned as decoded text, window by window:
chunks are decompressed and decoded incrementally, `\\u` escapes undone and full-width characters
folded, and each window is scanned together with the tail of the previous one, so a token cut by a
chunk boundary is still found whole. Only matches ending in the new part of a window are accepted;
a match ending too close to the window's end is left for the next window, which sees it whole.
"""

import codecs
import re

from gateway.dlp.coding import (
    GZIP_MAGIC, ZIP_MAGIC, DecodeError, Inflater, content_encodings, resolve_charset, sniff_charset,
)
from gateway.dlp.decode import FOLD_TABLE, Segment, child, decode_encoded, needs_folding, parse_media_type
from gateway.dlp.detectors import MAX_TOKEN_BYTES
from gateway.dlp.embedded import (
    PERCENT, EncodedContent, base64_content, decode_run, encoded_runs, percent_contents, readable, unquote_token,
)

WINDOW_BYTES = 1 << 20
SNIFF_BYTES = 1 << 16
OVERLAP_BYTES = MAX_TOKEN_BYTES + 64
MAX_STREAM_DETECTIONS = 100_000
_U_ESCAPE = re.compile(r"\\u([0-9a-fA-F]{4})")
_ARCHIVE_MAGIC = (ZIP_MAGIC[0], GZIP_MAGIC)
_BASE64_PART = re.compile(rb"(?i)content-transfer-encoding:[ \t]*base64")
_NOT_STREAMABLE = ("application/zip", "application/x-zip-compressed", "application/gzip", "application/x-gzip")


class StreamScan:
    def __init__(self, profile, content_type: str | None, content_encoding: str | None, direction: str,
                 host: str | None):
        self.profile = profile
        self.content_type = content_type
        self.content_encoding = content_encoding
        self.direction = direction
        self.host = host
        self.limits = profile.limits
        self._buffer: bytearray | None = bytearray()
        self._finished = False
        self._problems: list[tuple[str, str]] = []
        self._detections = []
        self._compressed_bytes = 0
        self._inflated_bytes = 0
        self._inflaters: list[Inflater] = []
        self._decoder = None
        self._undecided = bytearray()  # inflated bytes held until there are enough to sniff the charset
        self._multipart = False
        self._probe_tail = b""          # end of the previous piece, for markers cut by a piece boundary
        self._pending_text = ""
        self._window = bytearray()     # decoded UTF-8 not yet scanned, preceded by the carried tail
        self._window_start = 0         # absolute offset of _window[0] in the decoded text
        self._accepted_until = 0       # matches ending at or before this offset were handled already
        self._slicing = False          # a long percent-encoded token is being read in slices, window by window

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

    def finish(self):
        if self._finished:
            raise RuntimeError("finish() called twice")
        self._finished = True
        if self._buffer is not None:
            return self.profile.scan(bytes(self._buffer), content_type=self.content_type,
                                     content_encoding=self.content_encoding, direction=self.direction,
                                     host=self.host)
        if not self._problems:
            try:
                for inflater in self._inflaters:
                    inflater.finish()
                self._decode(b"", final=True)
            except (DecodeError, UnicodeDecodeError) as error:
                self._fail(str(error))
        return self.profile.apply_rules(self._detections, self._problems, self.direction, self.host)

    # streaming mode -----------------------------------------------------------------------------
    def _fail(self, reason: str) -> None:
        if not self._problems:
            self._problems.append(("body", reason))
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
            for piece in pieces:
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
        self._push_text(self._decoder.decode(piece, final), final)

    def _push_text(self, text: str, final: bool = False) -> None:
        text = self._pending_text + text
        # keep back a possibly incomplete \uXXXX escape (a backslash among the last 5 characters)
        backslash = -1 if final else text.rfind("\\", max(len(text) - 5, 0))
        cut = backslash if backslash != -1 else len(text)
        self._pending_text = text[cut:]
        text = text[:cut]
        if "\\u" in text:
            text = _U_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), text)
        self._window += text.translate(FOLD_TABLE).encode("utf-8", "surrogatepass")
        if final or len(self._window) >= WINDOW_BYTES + OVERLAP_BYTES:
            self._scan_window(final)

    def _scan_window(self, final: bool) -> None:
        data = bytes(self._window)
        accept_end = len(data) if final else len(data) - OVERLAP_BYTES
        segment = Segment(data, "body", locate=lambda offset: (f"body:offset {offset}", None))
        low = self._accepted_until - self._window_start
        detections, overflow = self.profile.detect([segment], base_offset=self._window_start,
                                                   accept=(low, accept_end))
        if not self._add(detections, overflow):
            return
        held = self._scan_encoded(data, low, accept_end)
        self._accepted_until = self._window_start + accept_end
        # a token read in slices is decoded anew from here: keep enough raw text for a fully escaped match
        keep_from = min(max(accept_end - OVERLAP_BYTES * (3 if self._slicing else 1), 0), held)
        del self._window[:keep_from]
        self._window_start += keep_from

    def _scan_encoded(self, data: bytes, low: int, accept_end: int) -> int:
        """Scan what base64 runs and percent-encoded tokens ending in the window's new part hide (as
        `scan()` does); returns where the first one still open begins, held back so the next window
        sees it whole. A base64 run longer than a window is let go when it starts as binary (an
        image), else the stream fails closed: text that size cannot be held. A percent-encoded token
        longer than a window is read in slices (an escape is 3 bytes; a slice overlaps the last)."""
        held = len(data)
        continued, self._slicing = self._slicing, False
        contents: list[EncodedContent] = []
        tokens: list[tuple[int, int]] = []
        for start, end, coding in encoded_runs(data):
            if end <= low:
                continue  # scanned with an earlier window
            if coding == PERCENT and start < low and continued:  # the token read in slices goes on
                if not self._scan_slice(data, start, end, low, min(end, accept_end)):
                    return held
                self._slicing = end > accept_end
            elif coding == PERCENT and end > accept_end and end - start > WINDOW_BYTES:  # too long to hold
                if not self._scan_slice(data, start, end, start, accept_end):
                    return held
                self._slicing = True
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
        window_start = self._window_start
        for found in contents:
            if found.content is None:
                continue
            decoded = decode_encoded(found, self.limits, lambda offset: (f"body:offset {window_start + offset}", None))
            if not self._add(*self.profile.detect_decoded(decoded)):
                return held
            self._problems += decoded.problems
        return held

    def _scan_slice(self, data: bytes, start: int, end: int, low: int, high: int) -> bool:
        """Scan the part of a long percent-encoded token that is in the window, keeping what ends
        where its raw text is in [low, high) (the rest was found before or will be, whole, next);
        False when the stream failed."""
        start = _after_escape(data, start)
        text = _slice_text(data[start:end])
        accept = (len(_slice_text(data[start:_after_escape(data, low)])),
                  len(_slice_text(data[start:_after_escape(data, high)])))
        where = child(f"body:offset {self._window_start + start}", PERCENT)
        return self._add(*self.profile.detect([Segment(text, where)], accept=accept))

    def _add(self, detections, overflow: bool) -> bool:
        if overflow or len(self._detections) + len(detections) > MAX_STREAM_DETECTIONS:
            self._fail("too many candidate matches in the stream")
            return False
        self._detections += detections
        return True


def _after_escape(data: bytes, offset: int) -> int:
    """`offset`, or the end of the %XX escape it falls inside."""
    if data[offset - 1:offset] == b"%":
        return offset + 2
    if data[offset - 2:offset - 1] == b"%" and offset >= 2:
        return offset + 1
    return offset


def _slice_text(raw: bytes) -> bytes:
    """Part of a long token decoded, full-width characters folded (it may cut a character)."""
    text = unquote_token(raw)
    if needs_folding(text):
        text = text.decode("utf-8", "surrogateescape").translate(FOLD_TABLE).encode("utf-8", "surrogateescape")
    return text


def _readable_head(run: bytes) -> bool:
    """Whether the start of a long base64 run decodes to readable content (it may end in the
    middle of a character)."""
    head = decode_run(run[:len(run) // 4 * 4])
    return head is not None and any(readable(head[:len(head) - cut]) for cut in range(4))
