"""Content understanding: turn a body into the text segments the matcher scans.

Longer than 400 lines: one walker over nested layers; each format's reader is a method of it,
sharing the walk's limits, its depth and the locations it builds.

A body is undone layer by layer (Content-Encoding, archives, multipart parts, charset, structure)
into `Segment`s: UTF-8 bytes with full-width digits, letters and separators folded to ASCII, each
knowing where it came from (offsets it reports are in the text as written). Large structured texts (JSON without escapes, CSV, plain text) stay one segment with a lazy
locator, so a clean body costs one pass; locations are only computed for what was found.
Anything that cannot be decoded within the limits becomes a `problem` (an `uninspectable` finding).
"""

import base64
import binascii
import bisect
import csv
import functools
import html
import io
import json
import quopri
import re
import zipfile
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from email.message import Message
from pathlib import PurePosixPath
from types import MappingProxyType
from urllib.parse import parse_qsl
from xml.etree import ElementTree

import numpy as np

from gateway.dlp.budget import check_deadline
from gateway.dlp.coding import (
    GZIP_MAGIC,
    ZIP_MAGIC,
    ZSTD_MAGIC,
    DecodeError,
    charset_and_text,
    check_inflated_size,
    decode_as,
    utf8_of_gbk,
    inflate,
    is_utf8,
    unescape_u,
)
from gateway.dlp.embedded import (
    BODY,
    TEXT,
    TOKEN_SEPARATOR,
    EncodedContent,
    encoded_contents,
)
from gateway.dlp.fold import Folded, fold
from gateway.dlp.native import kernels

MiB = 1 << 20


@dataclass(frozen=True)
class Limits:
    max_decoded_bytes: int = 64 * MiB   # per body, after decompression, archives included
    max_ratio: int = 200                # decompressed / compressed, checked above 1 MiB
    max_depth: int = 4                  # nested encodings, archives and parts
    max_archive_entries: int = 10_000
    stream_buffer_bytes: int = 8 * MiB  # a stream larger than this is scanned as text, window by window
    max_findings: int = 1000            # findings a scan keeps (values, masks); the rest only counted


Locator = Callable[[int], tuple[str, str | None]]


@dataclass
class Segment:
    data: bytes                  # what the matcher scans: UTF-8, full-width folded
    location: str
    field: str | None = None     # the key / column / part name the text is the value of
    original: bytes | None = None  # the decoded text as written (UTF-8), when folding changed it
    locate: Locator | None = None  # byte offset in the text as written -> (location, field), for large segments
    folding: Folded | None = None  # how data was folded from original

    def place(self, offset: int, base: int = 0) -> tuple[str, str | None]:
        """Where a byte offset of the data lies (a locator is told its offset in the text as written,
        plus `base`), and the field it is the value of."""
        return self.at(self.unfolded(offset), base)

    def at(self, written: int, base: int = 0) -> tuple[str, str | None]:
        """Where a byte offset of the text as written lies (see place)."""
        if self.locate is None:
            return self.location, self.field
        location, field_name = self.locate(base + written)
        return location, field_name or self.field

    def at_many(self, written: list[int], base: int = 0) -> list[tuple[str, str | None]]:
        """at() of each offset, in one pass where the locator has one (many: the findings a scan keeps)."""
        if self.locate is None:
            return [(self.location, self.field)] * len(written)
        many = getattr(self.locate, "many", None)
        offsets = [base + offset for offset in written]
        places = many(offsets) if many is not None else list(map(self.locate, offsets))
        return [(location, field_name or self.field) for location, field_name in places]

    def unfolded(self, offset: int) -> int:
        """The offset in the text as written of a byte offset of the data."""
        return offset if self.folding is None else self.folding.unfolded(offset)

    def written(self, start: int, end: int) -> str:
        """The text between two byte offsets of the data, as written (full-width digits, say)."""
        if self.original is None:
            return self.data[start:end].decode("utf-8", "replace")
        return self.original[self.unfolded(start):self.unfolded(end)].decode("utf-8", "replace")


@dataclass
class Decoded:
    segments: list[Segment] = field(default_factory=list)
    fields: list[tuple[str, str]] = field(default_factory=list)    # (location, field name)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (location, reason)


def text_segment(text: str, location: str, field: str | None = None, locate: Locator | None = None,
                 data: bytes | None = None) -> Segment:
    """A segment of `text` (`data` is it in UTF-8 when the caller has that already)."""
    return folded_segment(text.encode("utf-8", "surrogatepass") if data is None else data, location, field, locate)


def folded_segment(data: bytes, location: str, field: str | None = None, locate: Locator | None = None) -> Segment:
    """A segment of UTF-8 text, full-width folded when it needs it (a copy only then)."""
    folding = fold(data)
    if folding is None:
        return Segment(data, location, field, None, locate)
    return Segment(folding.data, location, field, data, locate, folding)


def child(location: str, part: str) -> str:
    return f"{location}:{part}" if ":" not in location else f"{location} / {part}"


def parse_media_type(content_type: str | None) -> tuple[str, Mapping[str, str]]:
    if not content_type:
        return "", _NO_PARAMS
    return _parse_media_type(content_type)


_NO_PARAMS: Mapping[str, str] = MappingProxyType({})


@functools.lru_cache(maxsize=512)  # a handful of distinct types per deployment; email's parser is slow
def _parse_media_type(content_type: str) -> tuple[str, Mapping[str, str]]:
    message = Message()
    message["content-type"] = content_type
    params = {k.lower(): v for k, v in message.get_params(failobj=[])[1:]}
    media = content_type.split(";", 1)[0].strip().lower()
    return media, MappingProxyType(params)  # cached, so read-only


def decode_body(body: bytes, content_type: str | None, content_encoding: str | None, limits: Limits,
                location: str = "body", depth: int = 0) -> Decoded:
    """A body's segments; `depth` is its nesting level when it was itself encoded in another."""
    decoded = Decoded()
    try:
        data = inflate(body, content_encoding, limits.max_decoded_bytes, limits.max_ratio)
    except DecodeError as error:
        decoded.problems.append((location, str(error)))
        return decoded
    media, params = parse_media_type(content_type)
    walker = _Walker(limits, decoded)
    try:
        walker.content(data, media, params, None, location, depth)
        walker.embedded(depth)
    except RecursionError:  # JSON or XML nested thousands deep: the parsers recurse
        decoded.problems.append((location, "structure nested too deeply to inspect"))
    return decoded


def decode_encoded(found: EncodedContent, limits: Limits, locate_source: Locator, depth: int) -> Decoded:
    """What one encoded text (at nesting `depth`) stands for, and what encoded text inside it hides
    (a stream's window)."""
    decoded = Decoded()
    walker = _Walker(limits, decoded)
    try:
        walker.encoded(found, locate_source, depth)
        walker.embedded(depth)
    except RecursionError:
        where = child(locate_source(found.start)[0], found.coding)
        decoded.problems.append((where, "structure nested too deeply to inspect"))
    return decoded


def decode_embedded(decoded: Decoded, limits: Limits) -> None:
    """Add to `decoded` what encoded text inside its segments hides (fields of a message head, say)."""
    try:
        _Walker(limits, decoded).embedded()
    except RecursionError:
        decoded.problems.append(("head", "structure nested too deeply to inspect"))


_EXTENSION_TYPES = {
    ".json": "application/json", ".csv": "text/csv", ".tsv": "text/tab-separated-values",
    ".xml": "application/xml", ".txt": "text/plain", ".html": "text/html", ".htm": "text/html",
    ".zip": "application/zip", ".xlsx": "application/zip", ".docx": "application/zip",
    ".gz": "application/gzip", ".zst": "application/zstd", ".js": "text/javascript", ".log": "text/plain",
}


class _Walker:
    def __init__(self, limits: Limits, decoded: Decoded):
        self.limits = limits
        self.out = decoded
        self.budget = limits.max_decoded_bytes

    def problem(self, location: str, reason: str) -> None:
        self.out.problems.append((location, reason))

    def content(self, data: bytes, media: str, params: Mapping[str, str], filename: str | None,
                location: str, depth: int) -> None:
        check_deadline()
        if depth > self.limits.max_depth:
            self.problem(location, f"nesting deeper than {self.limits.max_depth} levels")
            return
        if not media or media == "application/octet-stream":
            media = _EXTENSION_TYPES.get(PurePosixPath(filename or "").suffix.lower(), media)
        if data.startswith(ZIP_MAGIC) or media in (
                "application/zip", "application/x-zip-compressed") or "openxmlformats" in media:
            self.archive(data, location, depth)
        elif data.startswith((GZIP_MAGIC, ZSTD_MAGIC)):  # compressed whatever the label says: no hiding
            encoding = "gzip" if data.startswith(GZIP_MAGIC) else "zstd"
            try:
                inner = inflate(data, encoding, self.budget, self.limits.max_ratio)
            except DecodeError as error:
                self.problem(location, str(error))
                return
            inner_name = filename.rsplit(".", 1)[0] if filename and filename.endswith((".gz", ".zst")) else None
            inner_media = "" if media in ("application/gzip", "application/x-gzip", "application/zstd") else media
            self.content(inner, inner_media, {}, inner_name, child(location, f"{encoding} content"), depth + 1)
        elif media.startswith("multipart/") and params.get("boundary"):
            self.multipart(data, params["boundary"], location, depth)
        else:
            self.text(data, media, params.get("charset"), location)

    def embedded(self, depth: int = 0) -> None:
        """Base64 and percent-encoding hidden in the segments (at nesting `depth`) and in what they
        decode to, each content one level deeper than the segment it was found in (see
        gateway.dlp.embedded)."""
        depths = [depth] * len(self.out.segments)
        index = 0
        while index < len(self.out.segments):
            segment, segment_depth = self.out.segments[index], depths[index]
            index += 1
            check_deadline()
            for found in encoded_contents(segment.data):
                before = len(self.out.segments)
                if not self.encoded(found, segment.place, segment_depth + 1):
                    return
                depths += [segment_depth + 1] * (len(self.out.segments) - before)

    def encoded(self, found: EncodedContent, locate_source: Locator, depth: int) -> bool:
        """Scan what encoded text stands for: undone like a body, or scanned as it is (text made
        readable, or bytes as a binary body is); `locate_source` locates an offset of the text it
        was found in. False when the decoding budget is spent."""
        where = child(locate_source(found.start)[0], found.coding)
        if len(found.content) > self.budget:
            self.problem(where, f"decoded content exceeds {self.limits.max_decoded_bytes} bytes")
            return False
        self.budget -= len(found.content)
        if depth > self.limits.max_depth:
            self.problem(where, f"nesting deeper than {self.limits.max_depth} levels")
        elif found.read_as == BODY:
            self.content(found.content, "", _NO_PARAMS, None, where, depth)
        else:  # text made readable, or bytes: scanned as they are
            locate = _token_locator(found, locate_source)
            if found.read_as == TEXT:
                self.out.segments.append(folded_segment(found.content, where, None, locate))
            else:
                self.out.segments.append(Segment(found.content, where, None, None, locate))
        return True

    def text(self, data: bytes, media: str, charset: str | None, location: str) -> None:
        try:
            used_charset, text = charset_and_text(data, charset)
            # An undeclared charset sniffed as UTF-8 was checked well-formed already; a declared one not yet.
            if used_charset == "utf-8" and media in ("", "text/plain") and (not charset or is_utf8(data)):
                head = data[:_HEAD_BYTES].decode("utf-8", "ignore")
                if head.lstrip()[:1] not in ("{", "[") and not _looks_like_csv(head):
                    self.plain_utf8(data, location)
                    return
            elif used_charset == "utf-8" and media.endswith("json") and not _contains(data, b"\\") \
                    and (not charset or is_utf8(data)):  # scanned as received: no str of it is needed
                self.json_unescaped(data, location)
                return
            # UTF-8 input is scanned as received, GBK text as converted in C (no str of it between)
            raw = data if used_charset == "utf-8" else utf8_of_gbk(data) if used_charset == "gb18030" \
                and text is None else None
            # A CSV reader needs a str of the header line only: the whole text's str costs 1.4 ms a MB
            csv_as_utf8 = media in _CSV_MEDIA and raw is not None and (raw is not data or is_utf8(data))
            if text is None and not csv_as_utf8:
                text = decode_as(data, used_charset) if raw is None or raw is data else raw.decode("utf-8")
        except DecodeError as error:
            self.problem(location, str(error))
            return
        if text is None:
            self.csv(None, "\t" if "tab" in media else ",", location, raw)
            return
        head = text[:256].lstrip()
        starts_like_json = head[:1] in ("{", "[")
        if media.endswith("json"):
            self.json(text, location, raw, strict=False)
        elif media in ("", "text/plain") and starts_like_json and self.json(text, location, raw, strict=True):
            pass
        elif media == "application/x-www-form-urlencoded":
            self.form(text, location)
        elif media.endswith("xml") or (media == "" and head.startswith("<?xml")):
            self.xml(text, location)
        elif media in _CSV_MEDIA:
            self.csv(text, "\t" if "tab" in media else ",", location, raw)
        elif media in ("", "text/plain") and _looks_like_csv(text):
            self.csv(text, ",", location, raw)
        else:
            self.plain(text, location, raw)

    def plain_utf8(self, data: bytes, location: str) -> None:
        """Well-formed UTF-8 plain text, scanned as received: a str of it is built only when
        unescaping needs one (decoding a MiB of CJK text costs more than scanning it)."""
        if _contains(data, b"\\u") or _contains(data, b"&#"):
            self.plain(data.decode("utf-8"), location, data)
        else:
            self.out.segments.append(folded_segment(data, location, None, offset_locator(location)))

    def plain(self, text: str, location: str, data: bytes | None = None) -> None:
        check_deadline()
        self.out.segments.append(text_segment(text, location, None, offset_locator(location), data))
        if _contains(text, "\\u"):  # JavaScript, malformed JSON: what a \u escape hides is scanned too
            self.out.segments.append(text_segment(unescape_u(text), child(location, "unescaped"), None,
                                                  lambda offset: (child(location, f"unescaped offset {offset}"), None)))
        if _contains(text, "&#"):  # HTML and XML character references
            self.out.segments.append(text_segment(html.unescape(text), child(location, "unescaped"), None,
                                                  lambda offset: (child(location, f"unescaped offset {offset}"), None)))

    # JSON --------------------------------------------------------------------------------------
    def json(self, text: str, location: str, raw: bytes | None, strict: bool) -> bool:
        """Scan `text` as JSON; False (and nothing scanned) when strict and it does not parse."""
        if "\\" not in text:
            if strict:
                try:
                    json.loads(text)
                except ValueError:
                    return False
            self.json_unescaped(raw if raw is not None else text.encode("utf-8", "surrogatepass"), location)
            return True
        try:
            document = json.loads(text, object_pairs_hook=_JsonObject, parse_float=str, parse_int=str)
        except ValueError:
            if strict:
                return False
            self.plain(text, location)
            return True
        seen_keys: set[str] = set()
        for path, key, value, is_key in _walk_json(document, "$", None):
            if is_key:
                if key not in seen_keys:
                    seen_keys.add(key)
                    self.out.fields.append((child(location, path), key))
            self.out.segments.append(text_segment(value, child(location, path + (" (key)" if is_key else "")), key))
        return True

    def json_unescaped(self, data: bytes, location: str) -> None:
        """JSON (UTF-8) without backslash escapes: its strings are as written, so the text is scanned
        as one segment, located lazily, and its keys found without parsing it."""
        segment = folded_segment(data, location)
        keys, keys_unique = _json_keys(data)
        segment.locate = _JsonLocator(data, location, keys_unique)
        self.out.segments.append(segment)
        for key in keys:
            self.out.fields.append((child(location, "$ key " + json.dumps(key, ensure_ascii=False)), key))

    # form, multipart -----------------------------------------------------------------------------
    def form(self, text: str, location: str) -> None:
        for name, value in parse_qsl(text, keep_blank_values=True):
            self.out.fields.append((child(location, f"form {name}"), name))
            self.out.segments.append(text_segment(value, child(location, f"form {name}"), name))
            self.out.segments.append(text_segment(name, child(location, f"form {name} (name)"), name))

    def multipart(self, data: bytes, boundary: str, location: str, depth: int) -> None:
        # A delimiter counts only at the start of a line (RFC 2046): "--boundary--" inside a value
        # neither ends the body nor hides the parts after it.
        delimiters = list(re.finditer(rb"(?:\A|\r?\n)--" + re.escape(boundary.encode("latin-1"))
                                      + rb"(--)?[ \t]*(?=\r?\n|\Z)", data))
        if not delimiters:
            self.text(data, "text/plain", None, location)
            return
        # Preamble and epilogue are for recipients to ignore, but a lenient one may not: read them too.
        self._outside_parts(data[:delimiters[0].start()], child(location, "preamble"))
        closed = False
        ends = [delimiter.start() for delimiter in delimiters[1:]] + [len(data)]
        for index, (delimiter, end) in enumerate(zip(delimiters, ends), start=1):
            if delimiter.group(1):  # the close delimiter
                closed = True
                self._outside_parts(data[delimiter.end():], child(location, "epilogue"))
                break
            piece = data[delimiter.end():end].removeprefix(b"\r\n").removeprefix(b"\n")
            head, separator, content = piece.partition(b"\r\n\r\n")
            if not separator:
                head, separator, content = piece.partition(b"\n\n")
            headers = Message()
            for line in head.decode("utf-8", "replace").splitlines():
                name, colon, value = line.partition(":")
                if colon:
                    headers[name.strip()] = value.strip()
            name = headers.get_param("name", header="content-disposition") or f"#{index}"
            filename = headers.get_param("filename", header="content-disposition")
            name, filename = str(name), (str(filename) if filename else None)
            label = f"part {name}" + (f" ({filename})" if filename else "")
            part_location = child(location, label)
            self.out.fields.append((part_location, name))
            transfer = (headers.get("content-transfer-encoding") or "").strip().lower()
            if transfer in ("base64", "quoted-printable"):  # a recipient may ignore the label
                self.text(content, "text/plain", None, child(part_location, "as sent"))
            try:
                if transfer == "base64":
                    content = base64.b64decode(content, validate=False)
                elif transfer == "quoted-printable":
                    content = quopri.decodestring(content)
            except (binascii.Error, ValueError):
                self.problem(part_location, f"invalid {transfer} part")
                continue
            media, params = parse_media_type(headers.get("content-type"))
            if not filename and not media:
                media = "text/plain"
            before = len(self.out.segments)
            self.content(content, media, params, filename, part_location, depth + 1)
            for segment in self.out.segments[before:]:
                segment.field = segment.field or name
        if not closed:
            self.problem(location, "multipart body without its closing boundary")

    def _apart(self, texts: list[str], location: str) -> None:
        """Short texts read as one segment, TOKEN_SEPARATOR apart (one is no context for the next)."""
        texts = [text for text in texts if text.strip()]
        if texts:
            self.out.segments.append(text_segment(TOKEN_SEPARATOR.decode().join(texts), location))

    def _outside_parts(self, data: bytes, location: str) -> None:
        if data.strip():
            self.text(data, "text/plain", None, location)

    # XML ----------------------------------------------------------------------------------------
    def xml(self, text: str, location: str) -> None:
        if "<!DOCTYPE" in text or "<!ENTITY" in text:  # no entity expansion: scan the text as written
            self.plain(text, location)
            return
        try:
            root = ElementTree.fromstring(text)
        except ElementTree.ParseError:
            self.plain(text, location)
            return
        self._xml_element(root, "", location)
        # The parser drops comments and processing instructions; a recipient may still read them.
        self._apart(_between(text, "<!--", "-->") + _between(text, "<?", "?>"),
                    child(location, "xml comments and processing instructions"))

    def _xml_element(self, element: ElementTree.Element, parent_path: str, location: str) -> None:
        tag = element.tag.rsplit("}", 1)[-1] if isinstance(element.tag, str) else "?"
        path = f"{parent_path}/{tag}"
        self.out.fields.append((child(location, "xml " + path), tag))
        for name, value in element.attrib.items():
            attribute = name.rsplit("}", 1)[-1]
            self.out.segments.append(text_segment(value, child(location, f"xml {path}/@{attribute}"), attribute))
        if element.text and element.text.strip():
            self.out.segments.append(text_segment(element.text, child(location, "xml " + path), tag))
        for sub in element:
            self._xml_element(sub, path, location)
            if sub.tail and sub.tail.strip():
                self.out.segments.append(text_segment(sub.tail, child(location, "xml " + path), tag))

    # CSV ----------------------------------------------------------------------------------------
    def csv(self, text: str | None, delimiter: str, location: str, raw: bytes | None) -> None:
        """A CSV text: `raw` is it in UTF-8 when the caller has that, and then `text` may be None."""
        if text is None:
            text = raw[:re.search(rb"[\r\n]|\Z", raw).start()].decode("utf-8")
        first_line = re.split(r"[\r\n]", text, maxsplit=1)[0]  # the csv module ends a line at either
        header = next(csv.reader([first_line], delimiter=delimiter), [])
        for column in header:
            if column.strip():
                self.out.fields.append((child(location, f"csv column {column.strip()}"), column.strip()))
        segment = text_segment(text, location, data=raw)
        segment.locate = _CsvLocator(_as_written(segment), delimiter.encode(), [c.strip() for c in header], location)
        self.out.segments.append(segment)

    # archives -----------------------------------------------------------------------------------
    def archive(self, data: bytes, location: str, depth: int) -> None:
        try:
            archive = zipfile.ZipFile(io.BytesIO(data))
            entries = archive.infolist()
        except (zipfile.BadZipFile, ValueError, EOFError) as error:
            self.problem(location, f"not a readable zip archive: {error}")
            return
        if len(entries) > self.limits.max_archive_entries:
            self.problem(location, f"archive has more than {self.limits.max_archive_entries} entries")
            return
        names = {entry.filename for entry in entries}
        members: dict[str, bytes] = {}
        for entry in entries:
            if entry.is_dir():
                continue
            member_location = child(location, f"zip {entry.filename}")
            if entry.flag_bits & 0x1:
                self.problem(member_location, "encrypted archive member")
                continue
            if entry.file_size > self.budget:
                self.problem(member_location, "archive member exceeds the size limit")
                continue
            try:
                with archive.open(entry) as stream:
                    content = stream.read(self.budget + 1)
                check_inflated_size(len(content), max(entry.compress_size, 1), self.budget, self.limits.max_ratio)
            except DecodeError as error:
                self.problem(member_location, str(error))
                continue
            except (zipfile.BadZipFile, zlib.error, NotImplementedError, EOFError, OSError) as error:
                self.problem(member_location, f"unreadable archive member: {error}")
                continue
            self.budget -= len(content)
            members[entry.filename] = content
        read: set[str] = set()
        if "xl/workbook.xml" in names:
            read = self.xlsx(members, location)
        elif "word/document.xml" in names:
            read = self.docx(members, location)
        # The members a workbook or document reader does not read as such (properties, comments,
        # embedded files) are read like those of any archive.
        for name, content in members.items():
            if name not in read:
                self.content(content, "", {}, name, child(location, f"zip {name}"), depth + 1)

    def xlsx(self, members: dict[str, bytes], location: str) -> set[str]:
        """Cells of every sheet, by sheet, reference and column header; the members read."""
        read = {"xl/sharedStrings.xml"}
        try:
            shared = [_xml_text(item) for item in _xml_root(members.get("xl/sharedStrings.xml")).iter()
                      if _local(item.tag) == "si"]
            used: set[int] = set()
            for sheet_name, path in _xlsx_sheets(members):
                read.add(path)
                header: dict[str, str] = {}
                root = _xml_root(members.get(path))
                # Formulas' literals, headers and footers, validation lists: not cell values.
                self._apart([item.text for item in root.iter() if _local(item.tag) not in ("v", "t") and item.text],
                            child(location, f"xlsx {sheet_name} other text"))
                for cell in root.iter():
                    if _local(cell.tag) != "c":
                        continue
                    reference = cell.get("r", "")
                    value = _xlsx_cell_value(cell, shared, used)
                    if value is None or not value.strip():
                        continue
                    column, row = reference.rstrip("0123456789"), reference[len(reference.rstrip("0123456789")):]
                    if row == "1":
                        header[column] = value.strip()
                        self.out.fields.append((child(location, f"xlsx {sheet_name}!{reference}"), value.strip()))
                    name = header.get(column)
                    label = f"xlsx {sheet_name}!{reference}" + (f" column {name}" if name and row != "1" else "")
                    self.out.segments.append(text_segment(value, child(location, label), name if row != "1" else None))
            self._apart([text for index, text in enumerate(shared) if index not in used],
                        child(location, "xlsx shared strings no cell shows"))
        except (ElementTree.ParseError, KeyError, ValueError, IndexError) as error:
            self.problem(location, f"unreadable xlsx workbook: {error}")
        return read

    def docx(self, members: dict[str, bytes], location: str) -> set[str]:
        """Paragraphs of the body, headers, footers, notes and comments; the members read."""
        read: set[str] = set()
        try:
            for name in sorted(members):
                if not re.fullmatch(r"word/(document|header\d*|footer\d*|footnotes|endnotes|comments)\.xml", name):
                    continue
                read.add(name)
                part = PurePosixPath(name).stem
                root = _xml_root(members[name])
                paragraphs = [item for item in root.iter() if _local(item.tag) == "p"]
                for number, paragraph in enumerate(paragraphs, start=1):
                    text = "".join(t.text or "" for t in paragraph.iter() if _local(t.tag) == "t")
                    if text.strip():
                        self.out.segments.append(text_segment(text, child(location, f"docx {part} paragraph {number}")))
                # Deleted text of tracked changes, field codes, pictures' descriptions: not in a w:t.
                self._apart([text for item in root.iter() for text in (
                    *item.attrib.values(), item.text if _local(item.tag) != "t" else None) if text],
                    child(location, f"docx {part} other text and attributes"))
        except ElementTree.ParseError as error:
            self.problem(location, f"unreadable docx document: {error}")
        return read


def _as_written(segment: Segment) -> bytes:
    return segment.data if segment.original is None else segment.original


def _contains(text: str | bytes, needle: str | bytes) -> bool:
    """`needle in text`, its first character looked for first: a one-character search runs at memchr speed,
    CPython's search for two characters about 25x slower (1 ms per MiB of CJK text), and most texts lack both."""
    return needle[0] in text and needle in text


def _token_locator(found: EncodedContent, locate_source: Locator) -> Locator:
    """Where an offset of tokens decoded and joined lies: at that offset of its own token's text."""
    def locate(offset: int) -> tuple[str, str | None]:
        source, within = found.source(offset)
        location, field = locate_source(source)
        return child(child(location, found.coding), f"offset {within}"), field
    return locate


def offset_locator(location: str) -> Locator:
    def locate(offset: int) -> tuple[str, str | None]:
        return child(location, f"offset {offset}"), None
    locate.cells = lambda offsets: offsets  # one location an offset: they tell locations apart (see _JsonLocator.cells)
    return locate


_HEAD_CHARS = 4096
_CSV_MEDIA = ("text/csv", "text/tab-separated-values", "application/csv")
_HEAD_BYTES = 4 * _HEAD_CHARS  # enough UTF-8 for the first _HEAD_CHARS characters


def _looks_like_csv(text: str) -> bool:
    """Undeclared text whose first lines have the same number (>= 1) of commas."""
    lines = text[:_HEAD_CHARS].splitlines()[:3]
    return len(lines) >= 2 and lines[0].count(",") >= 1 and all(line.count(",") == lines[0].count(",")
                                                               for line in lines[1:])


def _between(text: str, opening: str, closing: str) -> list[str]:
    """The texts between each `opening` and the next `closing`, in one pass (a regex with a lazy
    group rescans to the end for every opening that is never closed: quadratic)."""
    found = []
    at = text.find(opening)
    while at != -1:
        end = text.find(closing, at + len(opening))
        if end == -1:
            break
        found.append(text[at + len(opening):end])
        at = text.find(opening, end + len(closing))
    return found


def _local(tag: object) -> str:
    return tag.rsplit("}", 1)[-1] if isinstance(tag, str) else ""


def _xml_root(data: bytes | None) -> ElementTree.Element:
    if data is None:
        return ElementTree.Element("empty")
    if b"<!ENTITY" in data:
        raise ElementTree.ParseError("entity declarations are not accepted")
    return ElementTree.fromstring(data)


def _xml_text(element: ElementTree.Element) -> str:
    return "".join(item.text or "" for item in element.iter() if _local(item.tag) == "t")


def _xlsx_sheets(members: dict[str, bytes]) -> list[tuple[str, str]]:
    relations = {rel.get("Id"): rel.get("Target", "") for rel in _xml_root(
        members.get("xl/_rels/workbook.xml.rels")).iter() if _local(rel.tag) == "Relationship"}
    sheets = []
    for sheet in _xml_root(members.get("xl/workbook.xml")).iter():
        if _local(sheet.tag) != "sheet":
            continue
        rel_id = next((v for k, v in sheet.attrib.items() if _local(k) == "id"), None)
        target = relations.get(rel_id, "")
        path = target.lstrip("/") if target.startswith("/") else f"xl/{target}"
        if path in members:
            sheets.append((sheet.get("name", path), path))
    listed = {path for _, path in sheets}
    # sheets missing from the workbook index are scanned too: nothing inside an archive is skipped
    sheets += [(PurePosixPath(n).stem, n) for n in sorted(members)
               if n.startswith("xl/worksheets/") and n.endswith(".xml") and n not in listed]
    return sheets


def _xlsx_cell_value(cell: ElementTree.Element, shared: list[str], used: set[int]) -> str | None:
    """A cell's value; the shared string it shows is added to `used`."""
    kind = cell.get("t")
    if kind == "inlineStr":
        return _xml_text(cell)
    value = next((item.text for item in cell if _local(item.tag) == "v"), None)
    if value is None:
        return None
    if kind == "s":
        used.add(int(value))
        return shared[int(value)]
    return value


_JSON_KEY = re.compile(r'"([^"]*)"\s*:')  # only used on JSON without backslashes
# What str's \s matches (tests/test_dlp_decode_fast.py checks), to find '"' then spaces then ':' in UTF-8 bytes.
_SPACES = "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200b))) \
    + "\u2028\u2029\u202f\u205f\u3000"
_SPACE_BEFORE_COLON = re.compile(b'"(?:' + b"|".join(re.escape(space.encode()) for space in _SPACES) + b")+:")
_SPACE_FIRST_BYTE = np.zeros(256, dtype=bool)
_SPACE_FIRST_BYTE[[space.encode()[0] for space in _SPACES]] = True
_SPACE_FIRST_FLAGS = _SPACE_FIRST_BYTE.tobytes()  # for the C kernel
_KEY_BYTES = 16  # keys up to this long are told apart by numpy, 4 bytes a sort; longer ones one by one
_WORD_MASKS = np.array([0, 0xFF, 0xFFFF, 0xFFFFFF, 0xFFFFFFFF], dtype=np.uint64)  # a word's first n bytes


def _json_keys(data: bytes) -> tuple[dict[str, None], bool]:
    """The distinct keys of a JSON text without backslash escapes (UTF-8), in order, and whether it is
    known that no object names a key twice and the brackets match (told in C only). A string cannot hold
    a quote there, so each '":' ends a key, which starts after the quote before it (or after the '":'
    before it, as splitting at '":' would have it): found for all keys at once with numpy, and the
    distinct ones picked by sorting their lengths and 4-byte words (a bulk export holds a few keys
    tens of thousands of times); in C where it was compiled, one pass and a hash set. Keys followed by
    spaces before their colon are left to a regex."""
    if kernels is not None:
        found = kernels.json_keys(data, _SPACE_FIRST_FLAGS)
        if found is not None:
            return dict.fromkeys(key.decode("utf-8", "surrogatepass") for key in found[0]), found[1]
    buf = np.frombuffer(data, dtype=np.uint8)
    quotes = np.flatnonzero(buf == ord('"'))
    after = buf[np.minimum(quotes + 1, len(buf) - 1)]  # a quote at the very end reads itself
    if _SPACE_FIRST_BYTE[after].any() and _SPACE_BEFORE_COLON.search(data):
        return dict.fromkeys(_JSON_KEY.findall(data.decode("utf-8", "surrogatepass"))), False
    at_marker = after == ord(":")
    ends = quotes[at_marker]  # each '":'
    previous_quote = np.concatenate(([-1], quotes))[np.flatnonzero(at_marker)]
    starts = np.maximum(previous_quote + 1, np.concatenate(([0], ends[:-1] + 2)))
    lengths = ends - starts
    sorted_out = (len(buf) >= 4) & (lengths <= _KEY_BYTES) & (starts + (lengths + 3) // 4 * 4 <= len(buf))
    rows = np.flatnonzero(~sorted_out).tolist()
    chosen = np.flatnonzero(sorted_out)
    if len(chosen):
        words = np.ndarray((len(buf) - 3,), np.dtype("<u4"), data, 0, (1,))  # the 4 bytes at each offset
        first, length = starts[chosen], lengths[chosen]
        code = length.astype(np.uint64)  # a key's group among those alike so far
        for at in range(0, int(length.max()), 4):
            if at:
                code = np.unique(code, return_inverse=True)[1].astype(np.uint64)
            left = np.clip(length - at, 0, 4)
            word = words[np.where(left > 0, first + at, 0)].astype(np.uint64) & _WORD_MASKS[left]
            code = code << np.uint64(32) | word
        rows += chosen[np.unique(code, return_index=True)[1]].tolist()
    rows.sort()
    return dict.fromkeys(data[start:end].decode("utf-8", "surrogatepass")
                         for start, end in zip(starts[rows].tolist(), ends[rows].tolist())), False


_REPLAYED_BRACKETS = 2048  # past this many brackets ahead, a JSON locator jumps rather than replays
_OPEN_OBJECT, _OPEN_ARRAY = b"{["


def _prefix_xor(bits: np.ndarray) -> np.ndarray:
    """np.bitwise_xor.accumulate of an array of 0s and 1s (uint8), computed on the bits packed eight to
    a byte: three shifts within each byte, the accumulation over bytes only (3x quicker per byte)."""
    packed = np.packbits(bits, bitorder="little")
    packed ^= packed << 1
    packed ^= packed << 2
    packed ^= packed << 4  # each bit: the xor of it and the bits before it in its byte
    carried = np.bitwise_xor.accumulate(packed >> 7)  # the xor of whole bytes up to each
    packed[1:] ^= np.uint8(0xFF) * carried[:-1]
    return np.unpackbits(packed, count=len(bits), bitorder="little")


def _offsets_of(text: bytes | bytearray, byte: int, end: int) -> np.ndarray:
    """The offsets of `byte` in text[:end], rising (numpy's nonzero beats memchr on bytes this dense).
    The view is gone when this returns: a growing bytearray can grow again."""
    return np.flatnonzero(np.frombuffer(text, dtype=np.uint8, count=min(end, len(text))) == byte)


class _Structure:
    """A text with the inside of every "..." replaced by spaces (same length): what is left is
    structure. Exact for texts without backslash escapes (JSON) and for CSV, where a quote inside a
    quoted field is doubled and so toggles twice. Made only as far as it is read, in growing steps:
    the findings a scan keeps are a bulk export's first ones, which need its first part only."""

    def __init__(self, data: bytes, brackets: bytes = b""):
        self.data = data
        self.blanked = bytearray()
        self.quoted = False  # whether the part made ends inside a string
        self.bracket_bytes = brackets
        self.brackets: list[int] = []  # offsets of those bytes in the structure made

    def through(self, offset: int) -> bytearray:
        """The structure, made at least up to `offset` (and so searchable before it): in C, or where it
        was not compiled in a few whole-array passes of uint8 arithmetic and comparisons, which numpy
        vectorises (np.where, np.isin and byte lookups take several times longer on a bulk export)."""
        made = len(self.blanked)
        if offset >= made and made < len(self.data):
            end = min(max(offset + 1, 2 * made, 1 << 16), len(self.data))
            if kernels is not None:
                blanked, self.quoted, found = kernels.blank_strings(self.data, made, end, self.quoted,
                                                                    self.bracket_bytes)
                self.blanked += blanked
                self.brackets += memoryview(found).cast("q").tolist()
            else:
                self._blank_with_numpy(made, end)
        return self.blanked

    def _blank_with_numpy(self, made: int, end: int) -> None:
        part = np.frombuffer(self.data, dtype=np.uint8, count=end - made, offset=made)
        quotes = (part == ord('"')).view(np.uint8)
        inside = _prefix_xor(quotes)  # 1 from an opening quote on, 0 from its closing one
        if self.quoted:
            inside ^= 1
        self.quoted = bool(inside[-1])
        blank = (inside > quotes).view(np.uint8)  # inside a string, but not its opening quote
        part = part ^ blank * (part ^ np.uint8(ord(" ")))  # a space where blank is 1
        self.blanked += part.data
        if self.bracket_bytes:
            found = functools.reduce(np.logical_or, [part == byte for byte in self.bracket_bytes])
            self.brackets += (made + np.flatnonzero(found)).tolist()


class _JsonObject(list):
    """A JSON object as its (key, value) pairs: a key given twice keeps both values (a recipient
    may read either one)."""


def _walk_json(value: object, path: str, key: str | None):
    """(path, field, text, is_key) for every key and scalar of a JSON document parsed with numbers
    kept as written (a float would render an ID number as 1.10105e+17)."""
    if isinstance(value, _JsonObject):
        for name, item in value:
            item_path = _json_path(path, name)
            yield item_path, name, name, True
            yield from _walk_json(item, item_path, name)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _walk_json(item, f"{path}[{index}]", key)
    elif isinstance(value, str):
        yield path, key, value, False
    elif value is not None and not isinstance(value, bool):
        yield path, key, str(value), False


def _json_path(parent: str, key: str) -> str:
    return f"{parent}.{key}" if key.isidentifier() else f"{parent}[{json.dumps(key, ensure_ascii=False)}]"


class _JsonLocator:
    """Maps a byte offset of a JSON text without backslash escapes to the path of the value there.

    Only brackets are replayed in Python; array indexes and keys are then found with C-speed counts
    and searches over the text with its strings blanked. For rising offsets (findings in text order)
    everything is counted incrementally: the whole text costs one pass, however many findings it holds.
    """

    def __init__(self, data: bytes, location: str, keys_unique: bool = False):
        self.data = data
        self.location = location
        self.keys_unique = keys_unique  # known: no object names a key twice, the brackets match
        self.made = _Structure(data, b"[]{}")
        self.structure = self.made.blanked
        self._arrays: tuple | None = None  # see _jump
        self._reset()

    def _reset(self) -> None:
        self.position = 0            # brackets before this index are replayed into the stack
        self.counted_to = 0          # commas before this offset are counted into the stack's levels
        self.stack: list[_JsonLevel] = []

    def __call__(self, offset: int) -> tuple[str, str | None]:
        structure = self.made.through(offset)
        if offset < self.counted_to:
            self._reset()  # an offset before the replayed part: start again
        brackets, stack = self.made.brackets, self.stack
        if bisect.bisect_left(brackets, offset, self.position) - self.position > _REPLAYED_BRACKETS:
            self._jump(offset)
            stack = self.stack
        while self.position < len(brackets) and brackets[self.position] < offset:
            at = brackets[self.position]
            self.position += 1
            self._count_commas(at)
            self.counted_to = at + 1
            char = structure[at]
            if char == _OPEN_OBJECT or char == _OPEN_ARRAY:
                stack.append(_JsonLevel(char == _OPEN_OBJECT, at))
            elif stack:
                stack.pop()
        self._count_commas(offset)
        self.counted_to = max(self.counted_to, offset)
        path, field_name = "$", None
        for depth, level in enumerate(stack):
            if level.is_object:  # the member's key ends just before the last colon at this depth
                key = self._key(level, stack[depth + 1].opened if depth + 1 < len(stack) else offset)
                path, field_name = _json_path(path, key), key
            else:
                path = f"{path}[{level.commas}]"
        return child(self.location, path), field_name

    def _jump(self, offset: int) -> None:
        """Take the state the replay would have at `offset` (past many brackets: a finding far into
        a large export) from all brackets and commas at once, in C; the replay's own way is left for
        a structure with a closing bracket too many, which it ignores."""
        _, positions, opens, depths, commas, comma_depths = self._structure_arrays()
        replayed = int(np.searchsorted(positions, offset))
        if replayed and depths[:replayed].min() < 0:
            return
        depth = int(depths[replayed - 1]) if replayed else 0
        openings = [int(np.flatnonzero(opens[:replayed] & (depths[:replayed] == level))[-1])
                    for level in range(1, depth + 1)]
        self.stack = []
        for level, at in enumerate(openings, start=1):
            opened = int(positions[at])
            ends = int(positions[openings[level]]) if level < depth else offset  # its members end there
            low, high = np.searchsorted(commas, (opened, ends))
            own = int(np.count_nonzero(comma_depths[low:high] == level))
            self.stack.append(_JsonLevel(self.data[opened] == _OPEN_OBJECT, opened, own))
        self.position, self.counted_to = replayed, offset

    def _structure_arrays(self) -> tuple:
        """(size made, bracket offsets, which open, depth after each, comma offsets, depth at each) of
        the structure made so far."""
        made = self.made
        if self._arrays is None or self._arrays[0] != len(made.blanked):
            data = np.frombuffer(self.data, dtype=np.uint8)
            positions = np.array(made.brackets, dtype=np.int64)
            opens = np.isin(data[positions], (_OPEN_OBJECT, _OPEN_ARRAY))
            depths = np.cumsum(np.where(opens, 1, -1))  # after each bracket
            commas = _offsets_of(made.blanked, ord(","), len(made.blanked))
            before = np.searchsorted(positions, commas)  # brackets before each comma
            comma_depths = np.where(before > 0, depths[np.maximum(before - 1, 0)], 0)
            self._arrays = (len(made.blanked), positions, opens, depths, commas, comma_depths)
        return self._arrays

    def many(self, offsets: list[int]) -> list[tuple[str, str | None]]:
        """What self(offset) says of each offset, from all brackets, commas, colons and quotes at
        once (as _jump takes its state); a structure with a closing bracket too many is replayed."""
        if len(offsets) < 2:
            return list(map(self, offsets))
        at = np.array(offsets, dtype=np.int64)
        self.made.through(int(at.max()))
        _, positions, opens, depths, commas, comma_depths = self._structure_arrays()
        replayed = np.searchsorted(positions, at)  # brackets before each offset
        if replayed.max() and depths[:replayed.max()].min() < 0:
            return list(map(self, offsets))
        depth = np.where(replayed > 0, depths[np.maximum(replayed - 1, 0)], 0)
        # as far as the last offset (the keys before each are searched): a structure made through
        # a large export for a finding near its end is not searched again for the first findings
        searched, text = int(at.max()) + 1, np.frombuffer(self.data, dtype=np.uint8)
        colons, quotes = _offsets_of(self.structure, ord(":"), searched), _offsets_of(self.structure, ord('"'), searched)
        levels = []  # per depth: (is_object, index or key start and end) of each offset at least that deep
        opened = [np.zeros(0, dtype=np.int64)] * (int(depth.max()) + 2)
        for level in range(1, int(depth.max()) + 1):
            openings = positions[opens & (depths == level)]
            opened[level] = openings[np.searchsorted(openings, at[depth >= level]) - 1]
        for level in range(1, int(depth.max()) + 1):
            rows = depth >= level
            start = opened[level]
            deeper = depth[rows] > level  # their members end where the next level opens
            end = at[rows].copy()
            end[deeper] = opened[level + 1]
            own = commas[comma_depths == level]
            index = np.searchsorted(own, end) - np.searchsorted(own, start)
            colon = colons[np.maximum(np.searchsorted(colons, end) - 1, 0)] if len(colons) else end * 0 - 1
            colon = np.where((colon >= start) & (colon < end), colon, -1)
            closing = quotes[np.maximum(np.searchsorted(quotes, colon) - 1, 0)] if len(quotes) else colon * 0 - 1
            closing = np.where((colon >= 0) & (closing >= start) & (closing < colon), closing, -1)
            opening = quotes[np.maximum(np.searchsorted(quotes, closing) - 1, 0)] if len(quotes) else closing * 0 - 1
            opening = np.where((closing > 0) & (opening >= start) & (opening < closing), opening, -1)
            levels.append((np.flatnonzero(rows).tolist(), (text[start] == _OPEN_OBJECT).tolist(),
                           index.tolist(), opening.tolist(), closing.tolist()))
        root = child(self.location, "$")  # the location and the path's root: each path grows from it
        paths: list[list] = [[root, None] for _ in offsets]
        members: dict[bytes | None, tuple[str, str]] = {}  # a key as written -> (its path step, the key)
        for rows, is_object, indexes, openings, closings in levels:
            for row, obj, index, opening, closing in zip(rows, is_object, indexes, openings, closings):
                place = paths[row]
                if obj:
                    written = self.data[opening + 1:closing] if opening != -1 else None
                    member = members.get(written)
                    if member is None:
                        key = "?" if written is None else written.decode("utf-8", "replace")
                        member = members[written] = (_json_path("", key), key)
                    place[0] += member[0]
                    place[1] = member[1]
                else:
                    place[0] += f"[{index}]"
        return [(path, field_name) for path, field_name in paths]

    def cells(self, offsets: list[int]) -> list[tuple[str, int]] | None:
        """For rising offsets, what tells their locations apart without making them: where no object
        names a key twice, two values are at one path only inside one string. A value in a string is
        known by the string's closing quote, one outside strings (a number) by its own offset: from a
        count of the quotes before each and a search to the next, where locating values far into a large
        export takes its whole structure. None (locate them) where that is not known or a value is in a
        key (whose path is its member's)."""
        if not self.keys_unique or offsets != sorted(offsets):
            return None
        cells, quotes, counted = [], 0, 0
        for offset in offsets:
            quotes += self.data.count(b'"', counted, offset)
            counted = offset
            if not quotes % 2:
                cells.append(("token", offset))
                continue
            closing = self.data.find(b'"', offset)
            if closing == -1 or self.data[closing + 1:closing + 2] == b":":
                return None
            cells.append(("string", closing))
        return cells

    def _count_commas(self, to: int) -> None:
        """Commas between the last counted offset and `to` separate members of the innermost level."""
        if self.stack and to > self.counted_to:
            self.stack[-1].commas += self.structure.count(b",", self.counted_to, to)

    def _key(self, level: "_JsonLevel", end: int) -> str:
        """The key of the member of `level` going on at `end`: searched back from `end` only to where
        the previous search for this level ended."""
        colon = self.structure.rfind(b":", max(level.searched_to, level.opened), end)
        if colon != -1 and colon != level.colon:
            closing = self.structure.rfind(b'"', level.opened, colon)
            opening = self.structure.rfind(b'"', level.opened, closing) if closing > 0 else -1
            level.colon = colon
            level.key = self.data[opening + 1:closing].decode("utf-8", "replace") if opening != -1 else "?"
        level.searched_to = max(level.searched_to, end)
        return level.key


@dataclass
class _JsonLevel:
    is_object: bool
    opened: int          # offset of its bracket
    commas: int = 0      # its own commas counted so far (an array's index)
    searched_to: int = 0  # an object's key: searched for up to here,
    colon: int = -1      # found at this colon,
    key: str = "?"       # and it is this


class _CsvLocator:
    """Maps a byte offset of a CSV text to its row (1 = the header) and column name; rising offsets
    are counted incrementally (one pass for the whole text)."""

    def __init__(self, data: bytes, delimiter: bytes, header: list[str], location: str):
        self.data = data
        self.delimiter = delimiter
        self.header = header
        self.location = location
        self.made = _Structure(data)
        self.structure = self.made.blanked
        self.quoted: bool | None = None  # whether the text holds a quote (see cells)
        self._reset()

    def _reset(self) -> None:
        self.counted_to, self.rows_before, self.columns_before = 0, 0, 0

    def __call__(self, offset: int) -> tuple[str, str | None]:
        self.made.through(offset)
        if offset < self.counted_to:
            self._reset()
        newlines = self.structure.count(b"\n", self.counted_to, offset)
        if newlines:
            self.rows_before += newlines
            self.counted_to = self.structure.rfind(b"\n", self.counted_to, offset) + 1
            self.columns_before = 0
        self.columns_before += self.structure.count(self.delimiter, self.counted_to, offset)
        self.counted_to = offset
        column = self.columns_before
        name = self.header[column] if column < len(self.header) and self.header[column] else None
        return child(self.location, f"csv row {self.rows_before + 1} column {name or column + 1}"), name

    def cells(self, offsets: list[int]) -> list[int] | None:
        """What tells the offsets' locations apart without making them: in a CSV text without quotes,
        the cell an offset is in ends at the next delimiter or line end, and two offsets are in one cell
        only if that is one place. None (locate them) in a text with quotes."""
        if self.quoted is None:
            self.quoted = b'"' in self.data
        if self.quoted:
            return None
        cells = []
        for offset in offsets:
            ends = [end for end in (self.data.find(self.delimiter, offset), self.data.find(b"\n", offset)) if end != -1]
            cells.append(min(ends, default=len(self.data)))
        return cells

    def many(self, offsets: list[int]) -> list[tuple[str, str | None]]:
        """What self(offset) says of each offset, from all newlines and delimiters at once."""
        at = np.array(offsets, dtype=np.int64)
        self.made.through(int(at.max()) if len(at) else 0)
        made = len(self.structure)
        newlines = _offsets_of(self.structure, ord("\n"), made)
        delimiters = _offsets_of(self.structure, self.delimiter[0], made) if len(self.delimiter) == 1 else None
        if delimiters is None:
            return list(map(self, offsets))
        rows = np.searchsorted(newlines, at)  # newlines before each offset
        line_starts = np.where(rows > 0, newlines[np.maximum(rows - 1, 0)] + 1, 0) if len(newlines) else at * 0
        columns = np.searchsorted(delimiters, at) - np.searchsorted(delimiters, line_starts)
        places = []
        for row, column in zip(rows.tolist(), columns.tolist()):
            name = self.header[column] if column < len(self.header) and self.header[column] else None
            places.append((child(self.location, f"csv row {row + 1} column {name or column + 1}"), name))
        return places
