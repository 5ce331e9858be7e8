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
from gateway.dlp.decode import FOLD_TABLE, Decoded, Segment, child, decode_body, parse_media_type
from gateway.dlp.detectors import MAX_TOKEN_BYTES
from gateway.dlp.embedded import BASE64, PERCENT, decode_run, encoded_runs, percent_decoded, readable

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
        self._undecided = bytearray()
        self._multipart = False
        self._probe_tail = b""          # end of the previous piece, for markers cut by a piece boundary  # inflated bytes held until there is enough to sniff the charset
        self._pending_text = ""
        self._window = bytearray()     # decoded UTF-8 not yet scanned, preceded by the carried tail
        self._window_start = 0         # absolute offset of _window[0] in the decoded text
        self._accepted_until = 0       # matches ending at or before this offset were handled already

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
        if overflow or len(self._detections) + len(detections) > MAX_STREAM_DETECTIONS:
            self._fail("too many candidate matches in the stream")
            return
        self._detections += detections
        held = self._scan_encoded(data, low, accept_end)
        self._accepted_until = self._window_start + accept_end
        keep_from = min(max(accept_end - OVERLAP_BYTES, 0), held)
        del self._window[:keep_from]
        self._window_start += keep_from

    def _scan_encoded(self, data: bytes, low: int, accept_end: int) -> int:
        """Scan what base64 runs and percent-encoded tokens ending in the window's new part hide (as
        `scan()` does, the tokens as one stretch); returns where the first one still open begins,
        held back so the next window sees it whole. One longer than a window is let go when it
        starts as binary (an image), else the stream fails closed: text that size cannot be held."""
        held = len(data)
        complete: dict[str, list[tuple[int, int]]] = {BASE64: [], PERCENT: []}
        for start, end, coding in encoded_runs(data):
            if end <= low:
                continue  # scanned with an earlier window
            if end > accept_end:
                if end - start <= WINDOW_BYTES:
                    held = min(held, start)
                elif _readable_head(data[start:start + WINDOW_BYTES], coding):
                    self._fail(f"{coding} text longer than {WINDOW_BYTES} bytes in a streamed body cannot be inspected")
                    return held
                continue
            complete[coding].append((start, end))
        contents = [(start, decode_run(data[start:end]), BASE64) for start, end in complete[BASE64]]
        if tokens := complete[PERCENT]:
            contents.append((tokens[0][0], percent_decoded(data, tokens), PERCENT))
        for start, content, coding in contents:
            if content is None:
                continue
            where = child(f"body:offset {self._window_start + start}", coding)
            decoded = decode_body(content, None, None, self.limits, location=where) if readable(content) \
                else Decoded([Segment(content, where)])  # binary: scanned as received
            detections, overflow = self.profile.detect_decoded(decoded)
            if overflow or len(self._detections) + len(detections) > MAX_STREAM_DETECTIONS:
                self._fail("too many candidate matches in the stream")
                return held
            self._detections += detections
            self._problems += decoded.problems
        return held


def _readable_head(run: bytes, coding: str) -> bool:
    """Whether the start of a long run decodes to readable content (it may end in the middle of a
    character or of an escape)."""
    head = decode_run(run[:len(run) // 4 * 4]) if coding == BASE64 else percent_decoded(run, [(0, len(run))])
    return head is not None and any(readable(head[:len(head) - cut]) for cut in range(4))
