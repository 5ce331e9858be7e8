"""Records in a response body, and the two decisions made over them: the per-record consent decision
of a `legal_basis: consent` dataset, and a grant's field scope.

The records are a JSON array's items (the body's array, or the one array a top-level object holds,
whose other members must be plain values holding no ID number), a CSV's rows after its header line
(whose column names must be unique), or an XML document's record elements (the root's children when
they share one tag, or those of the one child of the root holding such a list; a record's fields are
its child elements and attributes by local name, each named once; the document's text and attributes
outside the records must hold no ID number). What leaves of a record is only what the catalogue lists (or the
grant names), and only plain values: a field the catalogue does not list, and any nested object or
array, is removed. A record whose subject consented passes so; a record that names another subject
as well (an ID number in one of its values, in one run or in groups) passes only when every subject it
names consented; the others are masked field by field (each catalogued field's mask; a field left as
it is, public or internal, with each ID number in it of a subject without consent masked), dropped,
or the whole body is refused. A body whose records cannot be found, or a JSON object naming a key
twice, is refused (`Unfilterable`): personal data of unknown shape does not leave in clear.
A grant for some fields (`project`) lets nothing but the records' granted fields leave: whatever the
body holds beside the records (a JSON object's other members, the XML root's and the records' holder's
attributes and text, the root's other children) is removed, whatever it holds.

Longer than 400 lines: the three body formats are read into, and written back from, the one shape the
decision works on; the readers could move to a module of their own once the branches changing this
one have been merged.
"""

from __future__ import annotations

import csv
import io
import json
import operator
import re
from collections import Counter
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from itertools import chain, compress, repeat
from xml.etree import ElementTree

import orjson

from gateway.authz.catalog import Dataset
from gateway.authz.idscan import id_numbers, mask_id_numbers, no_other_subjects, warm_up
from gateway.authz.subject import DROP, SubjectHasher, column_masker, drop, keep, masker

# subject keys -> those with consent
type Lookup = Callable[[Iterable[bytes]], set[bytes]]

PLAIN = (str, int, float, bool, type(None))


class Unfilterable(ValueError):
    """A body in which the records cannot be found or rewritten."""


@dataclass
class Records:
    """A body's records as dictionaries (a CSV row keyed by its header), and how to write them back."""
    items: list[dict]
    # (the records kept, the fields that may appear, envelope=False: nothing beside the records written)
    write: Callable[..., bytes]
    plain: bool = False  # known from the reading: every value of every record is a plain value
    outside: str | None = None  # why the body may hold personal data outside its records (refused then)
    json: bytes | None = None  # a JSON body holding no \u escape: its digits are all written as digits

    def check_outside(self) -> None:
        if self.outside is not None:
            raise Unfilterable(self.outside)


def read_records(body: bytes, content_type: str, envelope_checked: bool = True) -> Records:
    """The records; with `envelope_checked`, a JSON object's members beside them (an XML document's text
    and attributes outside them) must be plain values holding no ID number (they leave as they are)."""
    kind = content_type.split(";", 1)[0].strip().lower()
    if kind == "application/json" or kind.endswith("+json"):
        records = _json(body)
    elif kind == "text/csv":
        records = _csv(body, _charset(content_type))
    elif kind in ("application/xml", "text/xml") or kind.endswith("+xml"):
        records = _xml(body, _charset(content_type))
    else:
        raise Unfilterable(f"a body of type {kind or '(none given)'}: records are read from JSON arrays, CSV and "
                           "XML only")
    if envelope_checked:
        records.check_outside()
    return records


def project(body: bytes, content_type: str, fields: Collection[str]) -> tuple[bytes, int]:
    """The body with only `fields` (plain values) of each record, and nothing beside its records (the
    envelope is removed, so what it holds need not be checked); and how many records it holds."""
    records = read_records(body, content_type, envelope_checked=False)
    kept = [_plain(record, fields) for record in records.items]
    return records.write(kept, fields, envelope=False), len(kept)


def _plain(record: dict, fields: Collection[str]) -> dict:
    return {name: value for name, value in record.items() if name in fields and isinstance(value, PLAIN)}


@dataclass
class Outcome:
    body: bytes | None = None
    records: int = 0
    refused: int = 0  # records without consent, and the catalogue says refuse (none leaves)
    passed: int = 0
    masked: int = 0
    dropped: int = 0

    def counts(self) -> dict[str, int]:
        """As the trace record's `consent` holds them (`refused` only in a refused response's)."""
        counts = {"records": self.records, "passed": self.passed, "masked": self.masked, "dropped": self.dropped}
        return counts | {"refused": self.refused} if self.refused else counts


class RecordFilter:
    """One dataset's consent decision, its field masks built once."""

    def __init__(self, dataset: Dataset, hasher: SubjectHasher):
        assert dataset.consent is not None
        self.dataset = dataset
        self.rule = dataset.consent
        self.hasher = hasher
        # (a subject field the catalogue leaves as it is, public or internal, still gets the ID mask)
        mask_names = {name: "id" if name == self.rule.subject_field and field.mask_for_unconsented() == "keep"
                      else field.mask_for_unconsented() for name, field in dataset.fields.items()}
        self.masks = {name: masker(mask, name, hasher) for name, mask in mask_names.items()}
        self.column_masks = {name: column_masker(mask, name, hasher) for name, mask in mask_names.items()}
        # Left as they are in a masked record (public and internal ones): but for the ID numbers in them
        self.kept_fields = {name for name, mask in self.masks.items() if mask is keep}
        warm_up()

    def apply(self, body: bytes, content_type: str, lookup: Lookup, records: Records | None = None) -> Outcome:
        """`records`: the body's, when an earlier stage read them already (they are changed in place)."""
        if records is None:
            records = read_records(body, content_type)
        else:
            records.check_outside()
        masks, subject_field = self.masks, self.rule.subject_field
        items = records.items
        # Work over all records at once where it can (C loops, not a Python step per record or field):
        # a table's records usually hold only catalogued plain fields, and only their subject's ID number.
        if (records.plain or set(map(type, chain.from_iterable(map(dict.values, items)))) <= _PLAIN_TYPES) \
                and set().union(*items) <= masks.keys():
            listed = items
        else:
            listed = [_plain(record, masks) for record in items]
        passes: list[bool] = []
        named: list[set[bytes] | None] = []  # each block's: the subjects that consented, of those its values name
        # The body's own JSON, which holds all the records hold and writes every digit as a digit, is
        # scanned once for other subjects (not each block's records written again).
        clear = records.json is not None and no_other_subjects(
            records.json, list(map(dict.get, items, repeat(subject_field))))
        for block in _blocks(listed):
            block_passes, consented = self._passes(block, lookup, clear)
            passes += block_passes
            named.append(consented)
        outcome = Outcome(records=len(listed), passed=sum(passes))
        unconsented = outcome.records - outcome.passed
        if unconsented and self.rule.unconsented == "refuse":
            return Outcome(records=len(listed), refused=unconsented)
        if self.rule.unconsented == "drop":
            outcome.dropped = unconsented
            kept = [record for record, passed in zip(listed, passes) if passed]
        else:
            outcome.masked = unconsented
            kept = []
            for block, block_passes, consented in zip(_blocks(listed), _blocks(passes), named):
                unconsented_records = list(compress(block, map(operator.not_, block_passes)))
                masked = self._masked(unconsented_records)
                # A field left as it is (public, internal) keeps no ID number of a subject without consent:
                # each is masked inside the value, where the block's values name one.
                if consented is not None and self.kept_fields:
                    self._mask_id_numbers(masked, self.kept_fields, consented)
                if masked is unconsented_records:  # masked in place: the block's records are what is kept
                    kept += block
                    continue
                masked = iter(masked)
                kept += [record if passed else next(masked) for record, passed in zip(block, block_passes)]
        outcome.body = records.write(kept, masks)
        return outcome

    def _passes(self, listed: list[dict], lookup: Lookup, clear: bool) -> tuple[list[bool], set[bytes] | None]:
        """Which records pass: their own subject consented, and their values name no other subject (an
        ID number in one of them) that did not; and of the subjects their values name, those that
        consented (None: no value but a subject field's names one). `clear`: known already that none
        names another."""
        subjects = list(map(dict.get, listed, repeat(self.rule.subject_field)))
        own = self.hasher.keys(subjects)
        if not (clear or no_other_subjects(listed, subjects)):
            return self._passes_naming_others(listed, own, lookup)
        return list(map(lookup(filter(None, own)).__contains__, own)), None

    def _passes_naming_others(self, listed: list[dict], own: list[bytes | None],
                              lookup: Lookup) -> tuple[list[bool], set[bytes]]:
        """Record by record: a record passes when its own subject and every other subject its values name
        (an ID number in one of them) consented."""
        subject_field, subject_key = self.rule.subject_field, self.hasher.key
        # (a record without a subject of its own never passes: its values need no scan)
        others = [{k for n in id_numbers(value for name, value in record.items() if name != subject_field)
                   if (k := subject_key(n)) is not None} if key is not None else set()
                  for record, key in zip(listed, own)]
        consented = lookup({key for key in own if key is not None}.union(*others))
        return [key in consented and named <= consented for key, named in zip(own, others)], consented

    def _mask_id_numbers(self, records: list[dict], fields: set[str], consented: set[bytes]) -> None:
        """In place: in these fields of these (masked) records, each ID number of a subject not in
        `consented` masked, the rest of the value kept (a number holding one becomes that text)."""
        subject_key = self.hasher.key

        def unconsented(numbers: set[str]) -> set[str]:
            return {number for number in numbers if subject_key(number) not in consented}
        for record in records:
            for name in fields & record.keys():
                value = record[name]
                if isinstance(value, (str, int)) and not isinstance(value, bool):
                    text, masked = mask_id_numbers(str(value), unconsented)
                    if masked:
                        record[name] = text

    def _masked(self, records: list[dict]) -> list[dict]:
        """The records masked: when they all hold the same fields (a table's rows) and no mask drops a
        value, column by column and in place (the records are this body's own), else one by one."""
        fields = set().union(*records)
        if len(set(map(len, records))) != 1 or len(fields) != len(records[0]):
            return [self._mask(record) for record in records]
        masked, dropped = [], []
        for name in fields:
            mask = self.masks[name]
            if mask is drop:
                dropped.append(name)
            elif mask is not keep:
                values = self.column_masks[name](list(map(dict.__getitem__, records, repeat(name))))
                if DROP in values:
                    return [self._mask(record) for record in records]
                masked.append((name, values))
        for name, values in masked:
            list(map(operator.setitem, records, repeat(name), values))  # (C loops; a Python one costs 4x)
        for name in dropped:
            list(map(operator.delitem, records, repeat(name)))
        return records

    def _mask(self, record: dict) -> dict:
        masks, masked = self.masks, {}
        for name, value in record.items():  # only catalogued fields (`_plain`)
            mask = masks[name]
            if mask is keep or (value := mask(value)) is not DROP:
                masked[name] = value
        return masked


_PLAIN_TYPES = frozenset(PLAIN)
BLOCK = 2048  # records worked on together: a block's objects stay in the CPU's cache from one pass to the next


def _blocks(items: list) -> Iterable[list]:
    return (items[start:start + BLOCK] for start in range(0, len(items), BLOCK))


# ---- bodies -------------------------------------------------------------------------------------


def _json(body: bytes) -> Records:
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise Unfilterable(f"not JSON: {e}") from None
    outside = None
    if isinstance(document, dict):
        arrays = [k for k, v in document.items() if isinstance(v, list)]
        if len(arrays) != 1:
            raise Unfilterable("a JSON object without exactly one array of records")
        key = arrays[0]
        beside = [v for k, v in document.items() if k != key]
        if not all(isinstance(v, PLAIN) for v in beside) or id_numbers(beside):
            outside = "a JSON object holding, beside its records, an object, another array or an ID number: " \
                      "personal data outside the records"
        items = document[key]

        def write(kept: list[dict], fields: Collection[str], envelope: bool = True) -> bytes:
            return orjson.dumps({**document, key: kept} if envelope else {key: kept})
    elif isinstance(document, list):
        items = document

        def write(kept: list[dict], fields: Collection[str], envelope: bool = True) -> bytes:
            return orjson.dumps(kept)
    else:
        raise Unfilterable("JSON that is neither an array of records nor an object holding one")
    if set(map(type, items)) - {dict}:
        raise Unfilterable("a JSON array item that is not an object (a record)")
    # Every "{" and "[" is a record's or the envelope's: no value is an object or an array (one inside a
    # string only makes the count miss, and the caller checks the values one by one).
    # (a one-byte find is a memchr, ten times faster than a count or a two-byte find over a MiB)
    plain = body.count(b"{") == len(items) + isinstance(document, dict) and body.find(b"[", body.find(b"[") + 1) < 0
    escaped = b"\\" in body and b"\\u" in body
    if repeated := _repeated_keys(body, document, items, escaped):
        raise Unfilterable(f"a JSON object repeating key(s) {', '.join(repeated)}")
    return Records(items, write, plain, outside, None if escaped else body)


def _repeated_keys(body: bytes, document: dict | list, items: list[dict], escaped: bool) -> list[str]:
    """The keys some object of the body names twice (orjson keeps the last value: a record could pass as
    one subject holding another's values). Every key is followed by a colon, and a repeat's colon (and
    any in its strings) is lost in parsing: a body holding no more colons than the records and the
    envelope have keys (a one-byte count: 0.3 ms a MiB), or, without \\u escapes (which could write a
    colon as another), than the document written again holds (a colon in a value, a nested object: 1.5
    ms), repeats none; else the body is parsed again, each object's keys compared (8 ms)."""
    colons = body.count(b":")
    if colons == sum(map(len, items)) + (len(document) if isinstance(document, dict) else 0):
        return []
    if not escaped and colons == orjson.dumps(document).count(b":"):
        return []
    repeated: set[str] = set()

    def pairs_hook(pairs: list[tuple[str, object]]) -> None:
        if len(pairs) != len({key for key, _ in pairs}):
            repeated.update(key for key, count in Counter(key for key, _ in pairs).items() if count > 1)
    try:
        json.loads(body, object_pairs_hook=pairs_hook)
    except (ValueError, RecursionError) as e:
        raise Unfilterable(f"JSON whose keys cannot be checked for repeats: {e}") from None
    return sorted(repeated)


def _csv(body: bytes, charset: str | None) -> Records:
    text, charset = _decode(body, charset)
    newline = "\r\n" if "\r\n" in text[:4096] else "\n"
    rows = list(csv.reader(io.StringIO(text, newline="")))
    if not rows:
        raise Unfilterable("an empty CSV: no header line")
    header = rows[0]
    if repeated := sorted({name for name in header if header.count(name) > 1}):
        raise Unfilterable(f"the CSV header repeats column(s) {', '.join(repeated)}")
    items = []
    for row in rows[1:]:
        if not row:
            continue
        if len(row) > len(header):
            raise Unfilterable("a CSV row with more cells than its header has columns")
        items.append(dict(zip(header, row)))

    def write(kept: list[dict], fields: Collection[str], envelope: bool = True) -> bytes:
        # A column cannot leave some rows: a field a record lost is an empty cell.
        columns = [name for name in header if name in fields]
        out = io.StringIO(newline="")
        writer = csv.writer(out, lineterminator=newline)
        writer.writerow(columns)
        writer.writerows([str(record.get(name, "")) for name in columns] for record in kept)
        return out.getvalue().encode(charset)
    return Records(items, write, plain=True)  # cells are strings


def _xml(body: bytes, charset: str | None) -> Records:
    # Read as text in its declared encoding (GBK too, which the XML parser itself does not know), and
    # written back in it.
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
        # (so no other child of the root holds elements: the records' siblings are plain values)
        holders = [element for element in root if len(element)]
        container = holders[0] if len(holders) == 1 else None
    if container is None or len({element.tag for element in container}) != 1:
        raise Unfilterable("an XML document without one list of record elements")
    elements = list(container)
    container[:] = []
    outside = "an XML document holding an ID number outside its records: personal data outside the records" \
        if id_numbers(value for element in root.iter() for value in (element.text, element.tail,
                                                                      *element.attrib.values())) else None
    names: dict[str, str] = {}  # a field's local name -> its name as written
    attributes: set[str] = set()  # fields written as attributes (the others as child elements)
    items = []
    for element in elements:
        fields = [(name, value, True) for name, value in element.attrib.items()]
        # A field holding elements or attributes of its own is not a plain value: never written back.
        fields += [(child.tag, child if len(child) or child.attrib else child.text or "", False) for child in element]
        record = {}
        for name, value, attribute in fields:
            local = _local(name)
            if local in record:
                raise Unfilterable(f"an XML record naming its field '{local}' twice")
            record[local] = value
            names.setdefault(local, name)
            if attribute:
                attributes.add(local)
        items.append(record)
    tag = elements[0].tag

    def write(kept: list[dict], fields: Collection[str], envelope: bool = True) -> bytes:
        if not envelope:  # the root's other children go, and its and the holder's text and attributes
            for element in {root, container}:
                element.attrib.clear()
                element.text = None
            if container is not root:
                container.tail = None
                root[:] = [container]
        for record in kept:
            element = ElementTree.SubElement(container, tag)
            element.tail = "\n"
            for name, value in record.items():
                if name in attributes:
                    element.set(names[name], str(value))
                else:
                    ElementTree.SubElement(element, names[name]).text = str(value)
        written = ElementTree.tostring(root, encoding="unicode")
        if declared:
            written = f'<?xml version="1.0" encoding="{encoding}"?>\n' + written
        return written.encode(encoding)
    return Records(items, write, outside=outside)


XML_DECLARATION = re.compile(rb"\s*<\?xml(?:[^>]*?\sencoding=[\"']([A-Za-z0-9._-]+)[\"'])?[^>]*\?>")
XML_DECLARATION_TEXT = re.compile(r"\A\s*<\?xml[^>]*\?>")


def _local(name: str) -> str:
    return name.rsplit("}", 1)[-1]


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
