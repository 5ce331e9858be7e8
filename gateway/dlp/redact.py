"""Masking found values inside a body, keeping its structure, charset and compression."""

import base64
import gzip
import html
import io
import json
import re
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import AnyStr
from urllib.parse import parse_qsl, urlencode

import brotli

from gateway.dlp.coding import (
    GZIP_MAGIC,
    ZIP_MAGIC,
    ZSTD_MAGIC,
    DecodeError,
    content_encodings,
    decode_text,
    inflate,
)
from gateway.dlp.decode import _EXTENSION_TYPES, Limits, parse_media_type

try:
    from compression import zstd  # Python >= 3.14
except ImportError:
    from backports import zstd


def redact_body(body: bytes, content_type: str | None, content_encoding: str | None,
                replacements: dict[str, str], limits: Limits) -> bytes:
    """`body` with every key of `replacements` replaced by its mask; raises DecodeError if undecodable."""
    data = inflate(body, content_encoding, limits.max_decoded_bytes, limits.max_ratio)
    media, params = parse_media_type(content_type)
    redacted = _Redactor(replacements, limits).content(data, media, params, None, 0)
    if redacted == data:
        return body
    for encoding in reversed(content_encodings(content_encoding)):  # re-apply in the order of the header
        redacted = compress(redacted, encoding)
    return redacted


def compress(data: bytes, encoding: str) -> bytes:
    match encoding:
        case "gzip" | "x-gzip":
            return gzip.compress(data)
        case "deflate":
            return zlib.compress(data)
        case "br":
            return brotli.compress(data)
        case "zstd":
            return zstd.compress(data)
        case "identity":
            return data
    raise DecodeError(f"unsupported content-encoding {encoding!r}")


class _Redactor:
    def __init__(self, replacements: dict[str, str], limits: Limits):
        self.replacements = replacements
        self.masked = ValueMasks(replacements)
        self.limits = limits
        self._escaped: re.Pattern[str] | None = None

    def content(self, data: bytes, media: str, params: dict[str, str], filename: str | None, depth: int) -> bytes:
        if depth > self.limits.max_depth:
            raise DecodeError("nesting too deep to redact")
        if not media or media == "application/octet-stream":
            media = _EXTENSION_TYPES.get(PurePosixPath(filename or "").suffix.lower(), media)
        if data.startswith(ZIP_MAGIC[0]):
            return self.archive(data, depth)
        if data.startswith((GZIP_MAGIC, ZSTD_MAGIC)):  # as decode.py: compressed whatever the label
            encoding = "gzip" if data.startswith(GZIP_MAGIC) else "zstd"
            inner = inflate(data, encoding, self.limits.max_decoded_bytes, self.limits.max_ratio)
            name = filename.rsplit(".", 1)[0] if filename and filename.endswith((".gz", ".zst")) else None
            inner_media = "" if media in ("application/gzip", "application/x-gzip", "application/zstd") else media
            return compress(self.content(inner, inner_media, {}, name, depth + 1), encoding)
        if media.startswith("multipart/") and params.get("boundary"):
            return self.multipart(data, params["boundary"], depth)
        text, charset = decode_text(data, params.get("charset"))
        if media.endswith("json") or (media in ("", "text/plain") and text.lstrip()[:1] in ("{", "[")):
            text = self.json(text)
        elif media == "application/x-www-form-urlencoded":
            pairs = [(self.text(name), self.text(value)) for name, value in parse_qsl(text, keep_blank_values=True)]
            text = urlencode(pairs)
        else:
            text = self.text(text)
        return text.encode(charset, "surrogatepass" if charset.startswith("utf") else "strict")

    def text(self, text: str) -> str:
        text = self.masked(text)
        if self.replacements and ("\\u" in text or "&#" in text):
            text = self.escaped.sub(lambda m: self._mask_of(m.group()), text)
        return text

    @property
    def escaped(self) -> re.Pattern[str]:
        """The values with any of their characters written as escapes: a large pattern, built when a
        text has escapes."""
        if self._escaped is None:  # longest first, so a value containing another one is masked whole
            values = sorted(self.replacements, key=len, reverse=True)
            self._escaped = re.compile("|".join(_escaped_pattern(value) for value in values), re.IGNORECASE)
        return self._escaped

    def _mask_of(self, escaped_text: str) -> str:
        plain = html.unescape(re.sub(r"\\u([0-9a-fA-F]{4})", lambda m: chr(int(m.group(1), 16)), escaped_text))
        for value, masked in self.replacements.items():
            if plain.upper() == value.upper():
                return masked
        return escaped_text

    def json(self, text: str) -> str:
        try:
            document = json.loads(text)
        except ValueError:
            return self.text(text)
        return json.dumps(self._json_value(document), ensure_ascii=text.isascii())

    def _json_value(self, value: object) -> object:
        if isinstance(value, dict):
            return {self._json_value(k): self._json_value(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self._json_value(item) for item in value]
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            masked = self.text(str(value))
            return value if masked == str(value) else masked
        return value

    def multipart(self, data: bytes, boundary: str, depth: int) -> bytes:
        delimiter = b"--" + boundary.encode("latin-1")
        pieces = data.split(delimiter)
        out = [pieces[0]]
        for piece in pieces[1:]:
            if piece.startswith(b"--"):
                out.append(piece)
                continue
            newline = b"\r\n" if b"\r\n\r\n" in piece else b"\n"
            head, separator, content = piece.partition(newline + newline)
            trailing = newline if content.endswith(newline) else b""
            content = content[: len(content) - len(trailing)] if trailing else content
            header_text = head.decode("utf-8", "replace").lower()
            media_match = re.search(r"content-type:\s*([^\r\n]+)", header_text)
            media, params = parse_media_type(media_match.group(1) if media_match else None)
            filename_match = re.search(r'filename="?([^";\r\n]+)', head.decode("utf-8", "replace"))
            filename = filename_match.group(1) if filename_match else None
            if not media and not filename:
                media = "text/plain"
            if "content-transfer-encoding: base64" in header_text:
                inner = self.content(base64.b64decode(content), media, params, filename, depth + 1)
                content = base64.encodebytes(inner).replace(b"\n", newline)
            else:
                content = self.content(content, media, params, filename, depth + 1)
            out.append(head + separator + content + trailing)
        return delimiter.join(out)

    def archive(self, data: bytes, depth: int) -> bytes:
        source = zipfile.ZipFile(io.BytesIO(data))
        output = io.BytesIO()
        with zipfile.ZipFile(output, "w") as target:
            for entry in source.infolist():
                content = source.read(entry)
                if not entry.is_dir():
                    content = self.content(content, "", {}, entry.filename, depth + 1) \
                        if not entry.filename.endswith(".xml") else self._xml(content)
                target.writestr(entry, content)
        return output.getvalue()

    def _xml(self, data: bytes) -> bytes:
        text, charset = decode_text(data, None)
        return self.text(text).encode(charset)


class ValueMasks:
    """Masks a set of values (str, or bytes) wherever they are in a text, leftmost and longest first,
    or tells which are in it. A bulk export has thousands of values: a text is not searched value by
    value (that cost grew with values x text) but run by run of the values' characters (a regex, in
    C), each run looked up by its substrings of the values' lengths."""

    def __init__(self, masks: Mapping[AnyStr, AnyStr], lengths: set[int] | None = None, units: str | None = None):
        """`lengths` and `units` (of str values), when given, are every length and character the
        values may have (more do no harm): then the values are not read to work them out."""
        self.masks = masks
        as_bytes = False
        if lengths is None:
            lengths = {len(value) for value in masks}
            as_bytes = bool(masks) and isinstance(next(iter(masks)), bytes)
            units = sorted(set(next(iter(masks))[:0].join(masks))) if masks else ""  # characters, or bytes (joined in C)
        self.lengths = sorted(lengths - {0}, reverse=True)
        self.runs: re.Pattern | None = None
        if self.lengths and units:
            shortest = self.lengths[-1]
            self.runs = re.compile(b"[%s]{%d,}" % (re.escape(bytes(units)), shortest) if as_bytes
                                   else f"[{re.escape(''.join(units))}]{{{shortest},}}")

    def __call__(self, text: AnyStr) -> AnyStr:
        return text if self.runs is None else self.runs.sub(self._masked_run, text)

    def found_in(self, text: AnyStr) -> set[AnyStr]:
        """The values that are in `text` (overlapping ones included)."""
        if self.runs is None:
            return set()
        return {run[at:at + size] for match in self.runs.finditer(text) for run in (match.group(),)
                for size in self.lengths for at in range(len(run) - size + 1) if run[at:at + size] in self.masks}

    def _masked_run(self, match: re.Match) -> AnyStr:
        run, pieces, at, copied = match.group(), [], 0, 0
        while at < len(run):
            for size in self.lengths:
                masked = self.masks.get(run[at:at + size])
                if masked is not None:
                    pieces += (run[copied:at], masked)
                    at = copied = at + size
                    break
            else:
                at += 1
        return run[:0].join(pieces) + run[copied:] if pieces else run


def _escaped_pattern(value: str) -> str:
    """A regex matching `value` with any of its characters written as a \\uXXXX escape or a character reference."""
    return "".join(f"(?:{re.escape(c)}|\\\\u{ord(c):04x}|&#0*{ord(c)};|&#x0*{ord(c):x};)" for c in value)
