"""Records in a response body, and the two decisions made over them: the per-record consent decision
of a `legal_basis: consent` dataset, and a grant's field scope.

The records are a JSON array's items (the body's array, or the one array a top-level object holds,
whose other members must be plain values holding no ID number) or a CSV's rows after its header line
(whose column names must be unique). What leaves of a record is only what the catalogue lists (or the
grant names), and only plain values: a field the catalogue does not list, and any nested object or
array, is removed. A record whose subject consented passes so; a record that names another subject
as well (an ID number in one of its values) passes only when every subject it names consented; the
others are masked field by field (each catalogued field's mask), dropped, or the whole body is
refused. A body whose records cannot be found is refused (`Unfilterable`): personal data of unknown
shape does not leave in clear.
"""

from __future__ import annotations

import csv
import io
import re
import unicodedata
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

import orjson

from gateway.authz.catalog import Dataset
from gateway.authz.subject import DROP, SubjectHasher, masker

# subject keys -> those with consent
type Lookup = Callable[[Iterable[bytes]], set[bytes]]

PLAIN = (str, int, float, bool, type(None))
_ID_CANDIDATE = re.compile(rb"(?<![0-9])[1-8][0-9]{5}(?:18|19|20)[0-9]{2}[01][0-9][0-3][0-9]{4}[0-9Xx](?![0-9])")


class Unfilterable(ValueError):
    """A body in which the records cannot be found or rewritten."""


def id_numbers(values: Iterable[object]) -> set[str]:
    """What looks like a resident ID number (18 characters with a birth date where GB 11643 puts it) in
    these plain values, full-width forms folded. The check character is not required: the subject key
    does not require it either, and a false positive only masks a record."""
    text = "\0".join(str(v) for v in values if isinstance(v, (str, int)) and not isinstance(v, bool))
    if not text.isascii():
        text = unicodedata.normalize("NFKC", text)
    return {m.decode() for m in _ID_CANDIDATE.findall(text.encode())}


@dataclass
class Records:
    """A body's records as dictionaries (a CSV row keyed by its header), and how to write them back."""
    items: list[dict]
    write: Callable[[list[dict], Collection[str]], bytes]  # the records kept, the fields that may appear


def read_records(body: bytes, content_type: str, envelope_checked: bool = True) -> Records:
    """The records; with `envelope_checked`, a JSON object's members beside them must be plain values
    holding no ID number (they leave as they are)."""
    kind = content_type.split(";", 1)[0].strip().lower()
    if kind == "application/json" or kind.endswith("+json"):
        return _json(body, envelope_checked)
    if kind == "text/csv":
        return _csv(body, _charset(content_type))
    raise Unfilterable(f"a {kind or 'untyped'} body: records are read from JSON arrays and CSV only")


def count_records(body: bytes, content_type: str) -> int | None:
    """How many records a (decoded) body holds; None when it cannot be read as records."""
    try:
        return len(read_records(body, content_type, envelope_checked=False).items)
    except Unfilterable:
        return None


def project(body: bytes, content_type: str, fields: Collection[str]) -> tuple[bytes, int]:
    """The body with only `fields` (plain values) of each record, and how many records it holds."""
    records = read_records(body, content_type)
    kept = [_plain(record, fields) for record in records.items]
    return records.write(kept, fields), len(kept)


def _plain(record: dict, fields: Collection[str]) -> dict:
    return {name: value for name, value in record.items() if name in fields and isinstance(value, PLAIN)}


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
    """One dataset's consent decision, its field masks built once."""

    def __init__(self, dataset: Dataset, hasher: SubjectHasher):
        assert dataset.consent is not None
        self.dataset = dataset
        self.rule = dataset.consent
        self.hasher = hasher
        self.masks = {name: masker(field.mask_for_unconsented(), name, hasher)
                      for name, field in dataset.fields.items()}

    def apply(self, body: bytes, content_type: str, lookup: Lookup) -> Outcome:
        records = read_records(body, content_type)
        listed = [_plain(record, self.masks) for record in records.items]
        subject_field = self.rule.subject_field
        own = [self.hasher.key(record.get(subject_field)) for record in listed]
        # Every subject a record names (an ID number in any of its values), its own included.
        named = [{k for n in id_numbers(record.values()) if (k := self.hasher.key(n)) is not None} | {key}
                 for record, key in zip(listed, own)]
        consented = lookup({key for keys in named for key in keys if key is not None})
        outcome, kept = Outcome(records=len(listed)), []
        for record, key, keys in zip(listed, own, named):
            if key is not None and keys <= consented:
                outcome.passed += 1
                kept.append(record)
            elif self.rule.unconsented == "refuse":
                return Outcome(records=len(listed), refused=True)
            elif self.rule.unconsented == "drop":
                outcome.dropped += 1
            else:
                outcome.masked += 1
                kept.append(self._mask(record))
        outcome.body = records.write(kept, self.masks)
        return outcome

    def _mask(self, record: dict) -> dict:
        masked = {}
        for name, value in record.items():
            if (value := self.masks[name](value)) is not DROP:
                masked[name] = value
        return masked


# ---- bodies -------------------------------------------------------------------------------------


def _json(body: bytes, envelope_checked: bool) -> Records:
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise Unfilterable(f"not JSON: {e}") from None
    if isinstance(document, dict):
        arrays = [k for k, v in document.items() if isinstance(v, list)]
        if len(arrays) != 1:
            raise Unfilterable("a JSON object without exactly one array of records")
        key = arrays[0]
        beside = [v for k, v in document.items() if k != key]
        if envelope_checked and (not all(isinstance(v, PLAIN) for v in beside) or id_numbers(beside)):
            raise Unfilterable("a JSON object holding, beside its records, an object, another array or an ID "
                               "number: personal data outside the records")
        items = document[key]

        def write(kept: list[dict], fields: Collection[str]) -> bytes:
            return orjson.dumps({**document, key: kept})
    elif isinstance(document, list):
        items = document

        def write(kept: list[dict], fields: Collection[str]) -> bytes:
            return orjson.dumps(kept)
    else:
        raise Unfilterable("JSON that is neither an array of records nor an object holding one")
    if not all(isinstance(record, dict) for record in items):
        raise Unfilterable("a JSON array item that is not an object (a record)")
    return Records(items, write)


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

    def write(kept: list[dict], fields: Collection[str]) -> bytes:
        # A column cannot leave some rows: a field a record lost is an empty cell.
        columns = [name for name in header if name in fields]
        out = io.StringIO(newline="")
        writer = csv.writer(out, lineterminator=newline)
        writer.writerow(columns)
        writer.writerows([str(record.get(name, "")) for name in columns] for record in kept)
        return out.getvalue().encode(charset)
    return Records(items, write)


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
