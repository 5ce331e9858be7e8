"""The per-record consent decision over one response body of a `legal_basis: consent` dataset.

The records are a JSON array's items (the body's array, or the one array a top-level object holds), a
CSV's rows after its header line, or an XML document's record elements (the root's children when they
share one tag, or those of the one child of the root holding such a list; a record's fields are its
child elements and attributes, by local name). Each record's subject ID (the dataset's `subject_field`) is turned
into its subject key, all of them are looked up at once, and a record whose subject consented passes
as it is; the others are masked field by field (each catalogued field's mask; fields the catalogue
does not know are dropped), dropped, or the whole body is refused. A body whose records cannot be
found is refused (`Unfilterable`): personal data of unknown shape does not leave in clear.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from xml.etree import ElementTree

import orjson

from gateway.authz.catalog import Dataset
from gateway.authz.subject import DROP, SubjectHasher, drop, keep, masker

# subject keys -> those with consent
type Lookup = Callable[[Iterable[bytes]], set[bytes]]


class Unfilterable(ValueError):
    """A body in which the records cannot be found or rewritten."""


@dataclass
class Outcome:
    body: bytes | None = None
    records: int = 0
    refused: bool = False  # a record without consent, and the catalogue says refuse
    passed: int = 0
    masked: int = 0
    dropped: int = 0

    def counts(self) -> dict[str, int]:
        return {"records": self.records, "passed": self.passed, "masked": self.masked, "dropped": self.dropped}


class RecordFilter:
    """One dataset's decision, its field masks built once."""

    def __init__(self, dataset: Dataset, hasher: SubjectHasher):
        assert dataset.consent is not None
        self.dataset = dataset
        self.rule = dataset.consent
        self.hasher = hasher
        self.masks = {name: masker(field.mask_for_unconsented(), name, hasher)
                      for name, field in dataset.fields.items()}

    def apply(self, body: bytes, content_type: str, lookup: Lookup) -> Outcome:
        kind = content_type.split(";", 1)[0].strip().lower()
        if kind == "application/json" or kind.endswith("+json"):
            return self._json(body, lookup)
        if kind == "text/csv":
            return self._csv(body, _charset(content_type), lookup)
        if kind in ("application/xml", "text/xml") or kind.endswith("+xml"):
            return self._xml(body, _charset(content_type), lookup)
        raise Unfilterable(f"a {kind or 'untyped'} body: records are read from JSON arrays, CSV and XML only")

    # ---- one record ---------------------------------------------------------------------------

    def _mask(self, record: dict) -> dict:
        masks, masked = self.masks, {}
        for name, value in record.items():
            mask = masks.get(name, drop)
            if mask is keep:
                masked[name] = value
            elif mask is not drop and (value := mask(value)) is not DROP:
                masked[name] = value
        return masked

    def _decide[R](self, records: list[R], subjects: list[object], mask: Callable[[R], R],
                   lookup: Lookup) -> tuple[Outcome, list[R]]:
        """Each record with its subject's ID (`subjects`, in order): those consented, kept, the others
        masked or dropped; or refused."""
        subject_key = self.hasher.key
        keys = [subject_key(subject) for subject in subjects]
        consented = lookup(key for key in keys if key is not None)
        passes = [key in consented for key in keys]  # a record without a subject ID: None, never in it
        outcome = Outcome(records=len(records), passed=sum(passes))
        unconsented = outcome.records - outcome.passed
        if unconsented and self.rule.unconsented == "refuse":
            return Outcome(records=len(records), refused=True), []
        if self.rule.unconsented == "drop":
            outcome.dropped = unconsented
            return outcome, [record for record, passed in zip(records, passes) if passed]
        outcome.masked = unconsented
        return outcome, [record if passed else mask(record) for record, passed in zip(records, passes)]

    # ---- bodies -------------------------------------------------------------------------------

    def _json(self, body: bytes, lookup: Lookup) -> Outcome:
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError as e:
            raise Unfilterable(f"not JSON: {e}") from None
        holder, key = None, None
        if isinstance(document, dict):
            arrays = [k for k, v in document.items() if isinstance(v, list)]
            if len(arrays) != 1:
                raise Unfilterable("a JSON object without exactly one array of records")
            holder, key = document, arrays[0]
            records = document[key]
        elif isinstance(document, list):
            records = document
        else:
            raise Unfilterable("JSON that is neither an array of records nor an object holding one")
        if not all(isinstance(record, dict) for record in records):
            raise Unfilterable("a JSON array item that is not an object (a record)")
        field = self.rule.subject_field
        outcome, kept = self._decide(records, [record.get(field) for record in records], self._mask, lookup)
        if outcome.refused:
            return outcome
        if holder is not None:
            holder[key] = kept
            kept = holder
        outcome.body = orjson.dumps(kept)
        return outcome

    def _csv(self, body: bytes, charset: str | None, lookup: Lookup) -> Outcome:
        text, charset = _decode(body, charset)
        newline = "\r\n" if "\r\n" in text[:4096] else "\n"
        rows = list(csv.reader(io.StringIO(text, newline="")))
        if not rows:
            raise Unfilterable("an empty CSV: no header line")
        header, records = rows[0], [row for row in rows[1:] if row]
        if self.rule.subject_field not in header:
            raise Unfilterable(f"the CSV header has no column '{self.rule.subject_field}'")
        column = header.index(self.rule.subject_field)
        # A column cannot leave some rows: a dropped field is an empty cell.
        masks = [self.masks.get(name, drop) for name in header]

        def mask(row: list[str]) -> list[str]:
            return ["" if (masked := mask(value)) is DROP else str(masked) for mask, value in zip(masks, row)]

        outcome, kept = self._decide(records, [row[column] if column < len(row) else None for row in records], mask,
                                     lookup)
        if outcome.refused:
            return outcome
        out = io.StringIO(newline="")
        writer = csv.writer(out, lineterminator=newline)
        writer.writerow(header)
        writer.writerows(kept)
        outcome.body = out.getvalue().encode(charset)
        return outcome


    def _xml(self, body: bytes, charset: str | None, lookup: Lookup) -> Outcome:
        # Read as text in its declared encoding (GBK too, which the XML parser itself does not know),
        # and written back in it.
        declared = XML_DECLARATION.match(body)
        encoding = (declared.group(1).decode() if declared and declared.group(1) else None) or charset or "utf-8"
        try:
            text = body.decode("utf-8-sig" if encoding.lower() in ("utf-8", "utf8") else encoding)
        except (UnicodeDecodeError, LookupError):
            raise Unfilterable(f"an XML body not in {encoding}") from None
        if "<!DOCTYPE" in text or "<!ENTITY" in text:  # no entity expansion, no external entities
            raise Unfilterable("an XML body with a document type declaration")
        try:
            root = ElementTree.fromstring(XML_DECLARATION_TEXT.sub("", text, count=1))
        except ElementTree.ParseError as e:
            raise Unfilterable(f"not XML: {e}") from None
        container = root
        if len({element.tag for element in container}) != 1:
            holders = [element for element in root if len(element)]
            container = holders[0] if len(holders) == 1 else None
        if container is None or len({element.tag for element in container}) != 1:
            raise Unfilterable("an XML document without one list of record elements")
        records = list(container)
        field = self.rule.subject_field
        outcome, kept = self._decide(records, [_xml_field(record, field) for record in records], self._mask_element,
                                     lookup)
        if outcome.refused:
            return outcome
        container[:] = kept
        written = ElementTree.tostring(root, encoding="unicode")
        if declared:
            written = f'<?xml version="1.0" encoding="{encoding}"?>\n' + written
        outcome.body = written.encode(encoding)
        return outcome

    def _mask_element(self, record: ElementTree.Element) -> ElementTree.Element:
        """A record element without consent: its attributes and child elements masked, kept or removed."""
        for name, value in list(record.attrib.items()):
            masked = self.masks.get(_local(name), drop)(value)
            if masked is DROP:
                del record.attrib[name]
            else:
                record.attrib[name] = str(masked)
        for element in list(record):
            mask = self.masks.get(_local(element.tag), drop)
            if mask is keep:
                continue
            # A field holding elements or attributes of its own is not a value to shape: removed.
            masked = DROP if len(element) or element.attrib else mask(element.text or "")
            if masked is DROP:
                record.remove(element)
            else:
                element.text = str(masked)
        if record.text and record.text.strip():  # text of the record itself, outside any field
            record.text = None
        return record


XML_DECLARATION = re.compile(rb"\s*<\?xml(?:[^>]*?\sencoding=[\"']([A-Za-z0-9._-]+)[\"'])?[^>]*\?>")
XML_DECLARATION_TEXT = re.compile(r"\A\s*<\?xml[^>]*\?>")


def _local(name: object) -> str:
    return name.rsplit("}", 1)[-1] if isinstance(name, str) else ""


def _xml_field(record: ElementTree.Element, name: str) -> str | None:
    """A record's field: an attribute, else a child element's text (namespaces aside)."""
    for attribute, value in record.attrib.items():
        if _local(attribute) == name:
            return value
    for element in record:
        if _local(element.tag) == name:
            return element.text
    return None


def _charset(content_type: str) -> str | None:
    for parameter in content_type.split(";")[1:]:
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "charset":
            return value.strip().strip('"') or None
    return None


def _decode(body: bytes, charset: str | None) -> tuple[str, str]:
    """The CSV's text and the charset to write it back in: the one declared, else UTF-8, else GB 18030
    (which reads GBK)."""
    for candidate in ([charset] if charset else ["utf-8", "gb18030"]):
        try:
            return body.decode(candidate), candidate
        except (UnicodeDecodeError, LookupError):
            continue
    raise Unfilterable(f"a CSV body not in {charset or 'UTF-8 or GB 18030'}")
