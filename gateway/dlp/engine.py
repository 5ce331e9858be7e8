"""Profiles: one compiled multi-pattern database per profile, candidate validation (in batches, see
gateway/dlp/batch.py), rule evaluation (over a bulk export's detections as columns, see
gateway/dlp/detections.py).

Longer than 400 lines: a profile's scan, its validation and the rule evaluation share the
compiled database and the candidates' bookkeeping.
"""

import bisect
import re
from collections import Counter, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain, repeat
from pathlib import Path
from urllib.parse import parse_qsl, unquote

import numpy as np

from gateway.dlp import batch
from gateway.dlp.budget import check_deadline
from gateway.dlp.coding import DecodeError
from gateway.dlp.decode import (
    Decoded,
    Limits,
    Segment,
    decode_body,
    decode_embedded,
    text_segment,
)
from gateway.dlp.detections import Columns, Detection, Detections
from gateway.dlp.detectors import DETECTORS, MAX_TOKEN_BYTES, Detector
from gateway.dlp.embedded import (
    BYTES,
    MIN_RUN,
    TOKEN_SEPARATOR,
    EncodedContent,
    encoded_contents,
)
from gateway.dlp.fold import folded
from gateway.dlp.matcher import Matcher, PatternError, PatternSpec, literal_regex
from gateway.dlp.native import kernels
from gateway.dlp.redact import ValueMasks, redact_body
from gateway.dlp.rules import (
    ACTIONS,
    DlpConfigError,
    ProfileSpec,
    Rule,
    canonical_value,
    parse_files,
    rule_files,
)
from gateway.dlp.stream import StreamScan
from gateway.dlp.tally import FindingGroup, Place, Tally, lines_of

UNINSPECTABLE = "uninspectable"
_ALNUM = frozenset(b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_ALNUM_BYTES = np.zeros(256, dtype=bool)
_ALNUM_BYTES[list(_ALNUM)] = True
_DIGIT_BYTES = np.zeros(256, dtype=bool)
_DIGIT_BYTES[list(b"0123456789")] = True
_CONTEXT_WINDOW = 48
assert len(TOKEN_SEPARATOR) >= _CONTEXT_WINDOW  # decoded tokens joined by it give each other no context
_MAY_BE_ENCODED = re.compile(r"%%|[A-Za-z0-9+/_-]{%d}" % MIN_RUN)  # percent-encoding, or a base64 run
# Candidates one scan reads at once (~60 bytes each while it runs: an 8 MiB export's 280,000 take ~22 MiB).
# A body with more is scanned again window by window (see Profile.scan), whose own limits fail closed.
MAX_CANDIDATES = 400_000
CLEAN_FIELDS_KEPT = 4096  # (name, value) pairs a profile remembers as holding nothing,
CLEAN_FIELD_SIZE = 1024   # each of at most this many characters (a few MiB at worst)


@dataclass(frozen=True, slots=True)  # slots: made twice as fast (a scan keeps up to 1,000)
class Finding:
    rule: str
    type: str
    action: str
    severity: str
    location: str
    masked: str
    value: str
    field: str | None = None
    confidence: str = "normal"  # "high" when the field name hints at this type
    # Where in which text: its location and the byte offset in it as written (None: not in a text,
    # e.g. a field name); what a group's digest covers (gateway.dlp.tally).
    place: Place | None = None


_NO_SPANS = np.zeros((0, 3), dtype=np.int64)  # rows (start, end, detector index)
_NO_SPANS.flags.writeable = False
_NEW_FINDING = object.__new__
_FINDING_FIELDS = {name: getattr(Finding, name).__set__ for name in Finding.__dataclass_fields__}


def made_findings(count: int, **columns: Iterable) -> list[Finding]:
    """`count` findings from a column per field: as Finding(**row) of each row makes them (every
    field given), a field at a time in C (a frozen dataclass's __init__ sets them one call each)."""
    assert columns.keys() == _FINDING_FIELDS.keys()
    made = [_NEW_FINDING(Finding) for _ in range(count)]
    for name, values in columns.items():
        deque(map(_FINDING_FIELDS[name], made, values), 0)
    return made


@dataclass
class ScanResult:
    findings: list[Finding] = field(default_factory=list)  # the first Limits.max_findings
    action: str | None = None
    # Every finding, kept or not, counted per rule, type and action (gateway.dlp.tally).
    groups: list[FindingGroup] | None = None
    # Every value to redact, kept or not: what is masked must not depend on how many there were.
    replacements: dict[str, str] | None = None

    def __post_init__(self) -> None:
        if self.groups is None:
            tally = Tally()
            for f in self.findings:
                tally.add(f.rule, f.type, f.action, f.location, f.place)
            self.groups = tally.groups()
        if self.replacements is None:
            self.replacements = _replacements(self.findings)

    @property
    def clean(self) -> bool:
        return self.action is None


def strongest(actions: list[str]) -> str | None:
    present = set(actions)
    return next((action for action in ACTIONS if action in present), None)


def _with_overflow(problems: list[tuple[str, str]], overflow: bool, location: str) -> list[tuple[str, str]]:
    """The decoding problems, and the candidate limit at `location` when it was hit."""
    return [*problems, (location, f"more than {MAX_CANDIDATES} candidate matches")] if overflow else list(problems)


class Profile:
    def __init__(self, spec: ProfileSpec, engine: str | None = None):
        self.name = spec.name
        self.description = spec.description
        self.rules = spec.rules
        self.uninspectable = spec.uninspectable
        self.limits = spec.limits
        self._refs: list[tuple[str, str, str]] = []  # per pattern: (kind, detector or rule id, keyword)
        specs: list[PatternSpec] = []
        detector_names = dict.fromkeys(name for rule in spec.rules for name in rule.detectors)
        for name in detector_names:
            for regex in DETECTORS[name].patterns:
                specs.append(PatternSpec(regex, alone=DETECTORS[name].own_database))
                self._refs.append(("detector", name, ""))
        for rule in spec.rules:
            for regex in rule.patterns:
                specs.append(PatternSpec(regex, caseless=not rule.case_sensitive))
                self._refs.append(("pattern", rule.id, ""))
            for keyword in rule.keywords:
                specs.append(PatternSpec(literal_regex(keyword), caseless=not rule.case_sensitive))
                self._refs.append(("keyword", rule.id, keyword))
        self.matcher = Matcher(specs, engine)
        self._detectors = list(detector_names)
        self._detector_sources = np.empty(len(self._detectors), dtype=object)  # ("detector", name) of each
        self._detector_sources[:] = [("detector", name) for name in self._detectors]
        # per pattern: the index of its detector in _detectors, or -1 (a rule's pattern or keyword)
        self._detector_of = np.array([self._detectors.index(name) if kind == "detector" else -1
                                      for kind, name, _ in self._refs] or [0], dtype=np.int64)
        # per pattern, for the kernels' settle_words: (detector index or -1, priority, check kind, continued
        # by a separator); None where the kernels are not compiled
        self._settle = None if kernels is None else np.array(
            [(self._detectors.index(name), DETECTORS[name].priority,
              0 if DETECTORS[name].extend_left else batch.KERNEL_KINDS.get(name, 0),
              bool(DETECTORS[name].group_separators)) if kind == "detector" else (-1, 0, 0, 0)
             for kind, name, _ in self._refs], dtype=np.int64).reshape(-1, 4)
        self._rule_of_field_name = {name: rule for rule in spec.rules for name in rule.field_names}
        self._clean_fields: set[tuple[str, str]] = set()  # see scan_fields
        self._clean_without_context: set[tuple[str, str]] = set()  # clean unless another field gives context
        # Words that may make a candidate in another field a finding: a field with one is never remembered clean.
        self._context_words = tuple({word.lower().encode() for name in detector_names
                                     for word in DETECTORS[name].context_words})

    def __repr__(self) -> str:
        return f"Profile({self.name!r}, {len(self.rules)} rules, engine={self.matcher.engine})"

    # public API ---------------------------------------------------------------------------------
    # `keep` in the scans below: how many findings to keep whole, with their values (None: the
    # limits' max_findings). The gateway keeps none: it records and answers the groups (counts,
    # first locations, digests), and redacts from the replacements, which hold every value however many.
    def scan(self, body: bytes, *, content_type: str | None = None, content_encoding: str | None = None,
             direction: str = "request", host: str | None = None, keep: int | None = None) -> ScanResult:
        decoded = decode_body(body, content_type, content_encoding, self.limits)
        text = decoded.segments[0] if len(decoded.segments) == 1 and not decoded.problems else None
        if text is not None and len(text.data) > self.limits.stream_buffer_bytes:  # decompressed past it
            return self._windowed(text, decoded, direction, host, keep)
        detections, overflow = self.detect_decoded(decoded)
        if overflow and not decoded.problems:  # more candidates than one scan reads
            if text is not None:
                return self._windowed(text, decoded, direction, host, keep)
            stream = self.stream(content_type=content_type, content_encoding=content_encoding, direction=direction,
                                 host=host, buffer_bytes=0, keep=keep)
            stream.feed(body)
            return stream.finish()
        return self.apply_rules(detections, _with_overflow(decoded.problems, overflow, "body"), direction, host, keep)

    def _windowed(self, text: Segment, decoded: Decoded, direction: str, host: str | None,
                  keep: int | None) -> ScanResult:
        """A body's one text scanned window by window, as a body past the buffering threshold is: a
        compressed bulk export of 100,000 records, say, whose detections (held as columns, see
        gateway/dlp/detections.py StreamColumns) are more than one scan reads. The UTF-8 it was decoded to is streamed,
        not the body inflated and decoded again (nor its escapes undone twice); its field names are
        detected beside it."""
        stream = self.stream(content_type="text/plain; charset=utf-8", direction=direction, host=host,
                             buffer_bytes=0, keep=keep)
        stream.feed_decoded(text.original or text.data)
        return stream.finish(also=self.field_detections(decoded.fields))

    def scan_head(self, path: str, headers: list[tuple[str, str]], *, direction: str = "request",
                  host: str | None = None, method: str = "", reason: str = "",
                  keep: int | None = None) -> ScanResult:
        """A message head: the request method (any token may be one), a response's reason phrase (any
        text may be one), the URL path (percent-decoded) and its query, and every header field but Host
        (the destination, which the zone policy decides on; scanning it would flag every transfer to an
        internal address)."""
        path, _, query = path.partition("?")
        fields = [("method", "", method)] if method else []
        fields += [("status", "", reason)] if reason else []
        fields += [("path", "", unquote(path))] if path.strip("/") else []
        fields += [(f"query:{name}", name, value) for name, value in parse_qsl(query, keep_blank_values=True)]
        fields += [(f"header:{name}", name, value) for name, value in headers if name.lower() != "host"]
        return self.scan_fields(fields, direction=direction, host=host, keep=keep)

    def scan_fields(self, fields: list[tuple[str, str, str]], *, direction: str = "request",
                    host: str | None = None, keep: int | None = None) -> ScanResult:
        """Named text values as (location, name, value): each value is scanned, and each name both as
        text and as a field name (an empty name is neither)."""
        # Heads repeat their fields (a client's User-Agent, a server's Content-Type): a (name, value)
        # in which nothing at all was detected cannot add to any finding, and is not scanned again.
        clean = self._clean_fields
        fields = [field for field in fields if (field[1], field[2]) not in clean]
        if self._clean_without_context and not self._may_give_context(fields):
            fields = [field for field in fields if (field[1], field[2]) not in self._clean_without_context]
        if not fields:
            return ScanResult([], None)
        # Most of the rest hold nothing either: one scan over all their texts at once, joined as
        # detect() joins them, settles that before a segment is built for each.
        texts = "\n".join(chain.from_iterable((value, name) for _, name, value in fields))
        data = folded(texts.encode("utf-8", "surrogatepass"))
        if not len(self.matcher.scan(data)) and not self.field_detections([(loc, name) for loc, name, _ in fields if name]) \
                and not any(map(self._worth_reading, encoded_contents(data))):
            self._remember_clean(fields, mentioning=[location for location, name, value in fields
                                                     if self._mentions_context(f"{name} {value}".encode())])
            return ScanResult([], None)
        # A candidate that does not validate, or encoded text (a JWT, an encoded link) to undo.
        decoded = Decoded()
        for location, name, value in fields:
            decoded.segments.append(text_segment(value, location, name or None))
            if name:
                decoded.fields.append((location, name))
                decoded.segments.append(text_segment(name, f"{location} (name)", name))
        decode_embedded(decoded, self.limits)
        without_context: list[str] = []
        detections, overflow = self.detect(decoded.segments, without_context=without_context)
        detections += self.field_detections(decoded.fields)
        if not detections and not decoded.problems and not overflow:
            # so the same token costs this once, not on every request (see _remember_clean)
            mentioning = [segment.location for segment in decoded.segments if self._mentions_context(segment.data)]
            self._remember_clean(fields, without_context, mentioning)
            return ScanResult([], None)
        return self.apply_rules(detections, _with_overflow(decoded.problems, overflow, "head"), direction, host, keep)

    def _worth_reading(self, found: EncodedContent) -> bool:
        """Whether encoded text needs the full decode: text or a container to undo, a candidate
        among its bytes, or more encoded text inside them."""
        return found.read_as != BYTES or bool(len(self.matcher.scan(found.content))) \
            or next(encoded_contents(found.content), None) is not None or self._mentions_context(found.content)

    def _remember_clean(self, fields: list[tuple[str, str, str]], unsure: list[str] = (),
                        mentioning: list[str] = ()) -> None:
        """Remember the fields as clean, but for long ones and those where a context word was read
        (`mentioning`: locations in them, the decoded text of encoded ones included); those where a
        candidate was dropped for want of context (`unsure`) are clean only in heads that cannot
        give it (see scan_fields)."""
        if len(self._clean_fields) + len(self._clean_without_context) > CLEAN_FIELDS_KEPT:
            self._clean_fields.clear()  # bounded: a stream of unique values only ever refills them
            self._clean_without_context.clear()
        for location, name, value in fields:
            if len(name) + len(value) > CLEAN_FIELD_SIZE or any(place.startswith(location) for place in mentioning):
                continue
            lacking = any(place.startswith(location) for place in unsure)
            (self._clean_without_context if lacking else self._clean_fields).add((name, value))

    def _mentions_context(self, data: bytes) -> bool:
        """Whether text (folded as the matcher reads it) holds a word some detector takes as context."""
        if not self._context_words:
            return False
        data = folded(data).lower()
        return any(word in data for word in self._context_words)

    def _may_give_context(self, fields: list[tuple[str, str, str]]) -> bool:
        """Whether fields hold a context word, or encoded text that may hide one."""
        return bool(self._context_words) and any(
            _MAY_BE_ENCODED.search(text) or self._mentions_context(text.encode("utf-8", "surrogatepass"))
            for _, name, value in fields for text in (name, value))

    def stream(self, *, content_type: str | None = None, content_encoding: str | None = None,
               direction: str = "request", host: str | None = None, buffer_bytes: int | None = None,
               keep: int | None = None) -> StreamScan:
        """A scan fed chunk by chunk; `buffer_bytes` (default: the limits' stream_buffer_bytes) is how much of
        the body it may hold to scan whole (structure, archives) before it scans text window by window."""
        return StreamScan(self, content_type, content_encoding, direction, host, buffer_bytes=buffer_bytes, keep=keep)

    def redact(self, body: bytes, *, content_type: str | None = None, content_encoding: str | None = None,
               result: ScanResult) -> bytes:
        replacements = result.replacements
        if not replacements:
            return body
        redacted = redact_body(body, content_type, content_encoding, replacements, self.limits)
        # Values the rewrite could not reach (inside base64, say) must not cross: the caller blocks.
        values = ValueMasks(dict.fromkeys((value.encode() for value in replacements), b""))
        left = {value for segment in decode_body(redacted, content_type, content_encoding, self.limits).segments
                for text in (segment.data, segment.original or b"") for value in values.found_in(text)}
        if left:
            raise DecodeError(f"{len(left)} value(s) to redact are where the body cannot be rewritten")
        return redacted

    # evaluation ---------------------------------------------------------------------------------
    def detect_all(self, decoded: Decoded, location: str) -> tuple[list[Detection], list[tuple[str, str]]]:
        """Detections in a decoded body, and its problems (the candidate limit, hit, is one at `location`)."""
        detections, overflow = self.detect_decoded(decoded)
        return detections, _with_overflow(decoded.problems, overflow, location)

    def detect_decoded(self, decoded: Decoded) -> tuple[list[Detection], bool]:
        """Detections in a decoded body's segments and field names, and whether the candidate limit was hit."""
        detections, overflow = self.detect(decoded.segments)
        return detections + self.field_detections(decoded.fields), overflow

    def apply_rules(self, detections: Sequence[Detection], problems: list[tuple[str, str]], direction: str,
                    host: str | None, keep: int | None = None) -> ScanResult:
        if not len(detections) and not problems:
            return ScanResult([], None)  # no rule finds anything in nothing (the common, clean case)
        if not isinstance(detections, Detections):
            detections = Detections(detections)
        found = _Findings(self.limits.max_findings if keep is None else keep, detections)
        for location, reason in problems:
            found.problem(Finding(UNINSPECTABLE, UNINSPECTABLE, self.uninspectable, "high", location, reason, reason,
                                  place=(location, None)))
        by_source = detections.sources()  # (from a detector, detector or rule id) -> its rows, in text order
        found.locate_repeated()
        for rule in self.rules:
            if not rule.applies_to(direction) or rule.host_allowed(host):
                continue
            sources = [by_source[source] for source in [*((True, name) for name in rule.detectors), (False, rule.id)]
                       if source in by_source]
            if not sources:
                continue
            selected = sources[0] if len(sources) == 1 else np.sort(np.concatenate(sources))  # in text order
            if rule.fields:
                selected = selected[[_rule_selects(rule, detections[row], found.located(row)[1])
                                     for row in selected.tolist()]]
            if rule.allow_values:
                selected = selected[[canonical_value(detections.value(row)) not in rule.allow_values
                                     for row in selected.tolist()]]
            if _distinct_values_reach(map(detections.value, selected.tolist()), len(selected), rule.min_count):
                found.add(rule, found.unrepeated(selected))
        groups = found.tally.groups()
        return ScanResult(found.kept, strongest([group.action for group in groups]), groups, found.replacements)

    def field_detections(self, fields: list[tuple[str, str]]) -> list[Detection]:
        wanted = self._rule_of_field_name
        if not wanted or not fields:
            return []
        out = []
        seen: set[tuple[str, str]] = set()
        for location, name in fields:
            rule = wanted.get(name.strip().lower())
            if rule is not None and (rule.id, name) not in seen:
                seen.add((rule.id, name))
                out.append(Detection("field", rule.id, rule.type or "field_name", name, name, None, -1,
                                     fixed=(location, name, (location, None))))
        return out

    def detect(self, segments: list[Segment], base_offset: int = 0, accept: tuple[int, int] | None = None,
               without_context: list[str] | None = None, columns: bool = False) -> tuple[list[Detection], bool]:
        """Validated detections in the segments, in text order, and whether the candidate limit was hit.

        `accept` (streaming) keeps only matches whose end offset e satisfies low < e <= high: the
        others were handled in the previous window or are found again, whole, in the next one.
        `without_context` collects where valid candidates were dropped for want of context words.
        `columns`: a stream's window may have its detectors' detections as columns too (see
        gateway.dlp.detections.StreamColumns), which otherwise come resolved.
        """
        if not segments:
            return [], False
        check_deadline()
        if len(segments) == 1:
            data, starts = segments[0].data, [0]
        else:
            data = b"\n".join(segment.data for segment in segments)  # a newline ends every token
            starts, position = [], 0
            for segment in segments:
                starts.append(position)
                position += len(segment.data) + 1
        table, words = self.matcher.scan_apart(data)  # every candidate at once: a bulk export has a few a record
        if len(table) + len(words) > MAX_CANDIDATES:
            return [], True
        if accept is not None:
            table, words = self._accepted(table, segments[0].folding, accept), \
                self._accepted(words, segments[0].folding, accept)  # a stream's window: one segment
        settled = _NO_SPANS
        if len(words) and self._settle is not None:  # most words are settled in C, the rest join the table
            settled, handed_back = kernels.settle_words(batch.KERNEL_TABLES, data, words, self._settle,
                                                              batch.day_number(None))
            settled = np.frombuffer(settled, dtype=np.int64).reshape(-1, 3)
            words = np.frombuffer(handed_back, dtype=np.int64).reshape(-1, 3)
        table = table if not len(words) else words if not len(table) else np.concatenate([table, words])
        if not len(table) and not len(settled):
            return [], False
        detector_of = self._detector_of[table[:, 0]]
        span_starts, span_ends, detector_index = _detector_spans(
            data, table[detector_of >= 0, 1:], detector_of[detector_of >= 0], self._detectors, settled)
        others = [(start, end, self._refs[pattern_id][:2]) for pattern_id, start, end in table[detector_of < 0].tolist()]
        sources = None
        if others:  # a rule's patterns and keywords: few
            sources = self._detector_sources[detector_index].tolist()
            spans = sorted(set(zip(span_starts.tolist(), span_ends.tolist(), sources)).union(others))
            span_starts = np.array([span[0] for span in spans], dtype=np.int64)
            span_ends = np.array([span[1] for span in spans], dtype=np.int64)
            sources = [span[2] for span in spans]
        return self._detections(segments, starts, data, span_starts, span_ends, detector_index, sources, base_offset,
                                accept is not None, without_context, columns), False

    @staticmethod
    def _accepted(table: np.ndarray, folding, accept: tuple[int, int]) -> np.ndarray:
        """The rows whose end, as written (before folding), is in the window `accept` (see detect)."""
        written_ends = table[:, 2] if folding is None else table[:, 2] + 2 * np.searchsorted(
            np.asarray(folding.positions, dtype=np.int64), table[:, 2], "left")
        return table[(accept[0] < written_ends) & (written_ends <= accept[1])]

    def _detections(self, segments: list[Segment], starts: list[int], data: bytes, span_starts: np.ndarray,
                    span_ends: np.ndarray, detector_index: np.ndarray, sources: list[tuple[str, str]] | None,
                    base_offset: int, resolve: bool, without_context: list[str] | None,
                    columns: bool = False) -> Sequence[Detection]:
        """Detections of the spans of `data` (the segments joined, each starting at its offset in
        `starts`) found by `sources` (kind, detector or rule id; None: the detectors of
        `detector_index`, by their index in self._detectors), in text order."""
        segment_of = np.searchsorted(np.array(starts, dtype=np.int64), span_starts, "right") - 1
        local_starts = span_starts - np.array(starts, dtype=np.int64)[segment_of]
        local_ends = local_starts + (span_ends - span_starts)
        written_starts, written_ends = local_starts.copy(), local_ends.copy()  # offsets in the text as written
        for index in np.flatnonzero(np.bincount(segment_of, minlength=len(segments))).tolist():  # no sort
            folding = segments[index].folding
            if folding is not None:
                rows = np.flatnonzero(segment_of == index)
                positions = np.asarray(folding.positions, dtype=np.int64)
                written_starts[rows] += 2 * np.searchsorted(positions, local_starts[rows], "left")
                written_ends[rows] += 2 * np.searchsorted(positions, local_ends[rows], "left")
        if sources is None:
            if len(segments) == 1 and (columns or not resolve) and not any(
                    DETECTORS[self._detectors[index]].context_words
                    for index in np.flatnonzero(np.bincount(detector_index, minlength=len(self._detectors))).tolist()):
                # One text and detectors needing no context words (a bulk export): kept as columns.
                return Detections(columns=Columns(segments[0], data, span_starts, span_ends, written_starts,
                                                  written_ends, detector_index, self._detectors, base_offset))
            sources = self._detector_sources[detector_index].tolist()
        new = tuple.__new__  # Detection(...) without its keyword handling: thousands
        detections = []
        rule_of = {rule.id: rule for rule in self.rules}
        for start, end, (kind, name), index, local_end, written_start, written_end in zip(
                span_starts.tolist(), span_ends.tolist(), sources, segment_of.tolist(), local_ends.tolist(),
                written_starts.tolist(), written_ends.tolist()):
            segment = segments[index]
            if local_end > len(segment.data):
                continue  # a custom pattern spanning two segments
            token = data[start:end].decode("utf-8", "replace")
            value = token if segment.original is None or written_end - written_start == end - start else \
                segment.original[written_start:written_end].decode("utf-8", "replace")  # e.g. full-width
            if kind == "detector":
                detector = DETECTORS[name]
                if detector.context_words:
                    field_name = segment.at(written_start, base_offset)[1]
                    if (field_name is None or field_name.strip().lower() not in detector.hint_fields) \
                            and not _has_context(data, start, detector):
                        if without_context is not None:
                            without_context.append(segment.location)
                        continue
                detection = new(Detection, (kind, name, name, value, token, segment, written_start, base_offset, None))
            else:
                detection = new(Detection, (kind, name, rule_of[name].type or kind, value, token, segment,
                                            written_start, base_offset, None))
            detections.append(detection.resolved() if resolve else detection)
        return detections


class _Findings:
    """What apply_rules gathers: the first `room` findings whole, every finding counted in the tally
    (its group's first locations named, every place digested), every value to redact masked. Only
    what is kept is located and masked: most findings of a bulk export are only counted, as rows."""

    def __init__(self, room: int, detections: Detections):
        self.room = room
        self.detections = detections
        self.kept: list[Finding] = []
        self.tally = Tally()
        self.replacements: dict[str, str] = {}
        self.masks = _Masks(detections)
        # the rows of values found twice, which rules tell apart by location (a bulk export: few or none)
        self.repeated = detections.repeated()
        # Locations name fields (a query parameter, a header, a CSV column) as the sender wrote them: a
        # sensitive value in a name is masked there too, since locations are recorded and logged.
        self.masked = _LocationMasks(self.masks)
        self._located: dict[int, tuple[str, str | None]] = {}
        self._cells: dict[int, object] = {}  # a repeated row -> what tells its location apart (locate_repeated)
        self._cells_apart = False  # whether those are all different
        self._lines: dict[bytes, bytes] = {}  # rows -> the lines their places add to a digest
        self._confidences: dict[tuple[str, str | None], str] = {}

    def located(self, row: int, detection: Detection | None = None) -> tuple[str, str | None]:
        """A row's location and field (`detection`: the row's, when made), each worked out once (a
        locator replays rising offsets: asked again for an earlier one, it starts over)."""
        place = self._located.get(row)
        if place is None:
            place = self._located[row] = (detection or self.detections[row]).located()
        return place

    def locate_all(self, rows: list[int], detections: list[Detection]) -> None:
        """Locate the rows (their detections: `detections`) not located yet, those of one text at once."""
        texts: dict[tuple[int, int], tuple[Segment, int, list[int], list[int]]] = {}
        for row, d in zip(rows, detections):
            if d.segment is not None and row not in self._located:
                _, _, text_rows, offsets = texts.setdefault((id(d.segment), d.base), (d.segment, d.base, [], []))
                text_rows.append(row)
                offsets.append(d.offset)
        for segment, base, text_rows, offsets in texts.values():
            self._located.update(zip(text_rows, segment.at_many(offsets, base)))

    def locate_repeated(self) -> None:
        """Tell apart the detections of values found more than once by location (see unrepeated()):
        by the cells a bulk export's locator tells apart without locating (see _JsonLocator.cells),
        else located all at once, as the findings kept are (a locator asked for one offset after another
        far into a large export would rebuild its structure for each; even at once, locating values far
        into one takes its whole structure, which grew the cost of a scan faster than its size)."""
        if not len(self.repeated):
            return
        rows = self.repeated.tolist()
        cells = self.detections.cells(rows) if rows[-1] < self.detections.bulk else None
        if cells is not None:
            self._cells.update(zip(rows, cells))
            self._cells_apart = len(set(cells)) == len(cells)  # no two in one place: none to drop
        else:
            self.locate_all(rows, self.detections.rows(rows))

    def problem(self, finding: Finding) -> None:
        self.tally.add(finding.rule, finding.type, finding.action, finding.location, finding.place)
        if len(self.kept) < self.room:
            self.kept.append(finding)

    def unrepeated(self, selected: np.ndarray) -> np.ndarray:
        """The rows but those of a value found at the same location before (only values seen
        twice are located to tell)."""
        if not len(self.repeated) or self._cells_apart:
            return selected
        at = np.flatnonzero(np.isin(selected, self.repeated))  # the other rows' values are found once
        if not len(at):
            return selected
        chosen = [self.detections.value(row) for row in selected[at].tolist()]
        counts = Counter(chosen)
        seen: set[tuple[str, str]] = set()
        keep = np.ones(len(selected), dtype=bool)
        for index, row, value in zip(at.tolist(), selected[at].tolist(), chosen):
            if counts[value] > 1:
                key = (value, self._cells[row] if row in self._cells else self.located(row)[0])
                keep[index] = key not in seen
                seen.add(key)
        return selected[keep]

    def add(self, rule: Rule, selected: np.ndarray) -> None:
        detections = self.detections
        types, type_of = detections.types(selected)
        for code, type in enumerate(types):
            group = selected if len(types) == 1 else selected[type_of == code]
            runs = detections.runs(group)
            key = group.tobytes()  # the same rows (rules on one detector): their places' lines made once
            lines = self._lines.get(key)
            if lines is None:
                lines = self._lines[key] = lines_of(runs)
            self.tally.extend(rule.id, type, rule.action, runs,
                              lambda index: self.masked(self.located(int(group[index]))[0]), lines)
        if rule.action == "redact":
            values = map(detections.value, selected.tolist())
            self.replacements.update((value, self.masks[value]) for value in values if value)
        rows = selected[:max(self.room - len(self.kept), 0)].tolist()
        if rows:
            self.kept += self.findings(rule, rows)

    def findings(self, rule: Rule, rows: list[int]) -> list[Finding]:
        """The findings of `rule` at the rows (rising, as rules select them: the columns' rows
        first): those of the columns made a column at a time (a bulk export keeps a thousand), the
        others from their Detection."""
        detections = self.detections
        bulk = rows[:bisect.bisect_left(rows, detections.bulk)]
        listed = detections.rows(rows[len(bulk):])
        self.locate_all(rows[len(bulk):], listed)
        types, values, masks = detections.shown(bulk) if bulk else ([], [], [])
        places = []
        if bulk:
            c = detections.columns
            missing = [row for row in bulk if row not in self._located]
            if missing:
                self._located.update(zip(missing, c.segment.at_many(c.placed(missing).tolist())))
            places = [(c.segment.location, offset) for offset in c.placed(bulk).tolist()]
        located = [self.located(row) for row in rows]  # each located above (or a field name's, fixed)
        locations = self.masked.many([location for location, _ in located])
        fields = self.masked.many([field_name for _, field_name in located])
        confidences = [self._confidences.get((name, field_name)) or self._confident(name, field_name)
                       for name, (_, field_name) in zip(types, located)]  # the columns' rows
        for d, (_, field_name) in zip(listed, located[len(bulk):]):
            types.append(d.type)
            values.append(d.value)
            masks.append(d.masked())
            confidences.append(d.confidence(field_name))
            places.append(d.place())
        return made_findings(len(rows), rule=repeat(rule.id), type=types, action=repeat(rule.action),
                             severity=repeat(rule.severity), location=locations, masked=masks, value=values,
                             field=fields, confidence=confidences, place=places)

    def _confident(self, detector: str, field_name: str | None) -> str:
        """Detection.confidence of a detector's detection in a field (worked out once per pair)."""
        confidence = self._confidences[(detector, field_name)] = \
            Detection("detector", detector, detector, "", "", None, 0).confidence(field_name)
        return confidence


def _redacts(finding: Finding) -> bool:
    return finding.action == "redact" and bool(finding.value) and finding.type != UNINSPECTABLE


def _replacements(findings: list[Finding]) -> dict[str, str]:
    return {f.value: f.masked for f in findings if _redacts(f)}


class _Masks(Mapping[str, str]):
    """Each detected value's mask, made when first asked for (most are never shown): the mask of
    the last detection of that value."""

    def __init__(self, detections: Detections):
        self.detections = detections
        self._rows: dict[str, int] | None = None  # value -> its last row, made when first asked
        self.made: dict[str, str] = {}

    @property
    def rows(self) -> dict[str, int]:
        if self._rows is None:
            self._rows = {value: row for row, value in enumerate(self.detections.values()) if value}
        return self._rows

    def __getitem__(self, value: str) -> str:
        masked = self.made.get(value)
        if masked is None:
            masked = self.made[value] = self.detections[self.rows[value]].masked()
        return masked

    def __contains__(self, value: object) -> bool:
        return value in self.rows

    def get(self, value: str, default: str | None = None) -> str | None:  # without Mapping's try/except
        return self[value] if value in self.rows else default

    def __iter__(self):
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)


class _OwnMasksLeftOut(Mapping[str, str]):
    """The masks but for the values that are their own mask (a field name, a keyword)."""

    def __init__(self, masks: _Masks):
        self.masks = masks

    def _shown(self, value: str) -> bool:
        row = self.masks.rows.get(value)
        if row is None:
            return False
        d = self.masks.detections[row]
        return d.kind not in ("field", "keyword") or d.token != value

    def __getitem__(self, value: str) -> str:
        if not self._shown(value):
            raise KeyError(value)
        return self.masks[value]

    def get(self, value: str, default: str | None = None) -> str | None:
        return self.masks[value] if self._shown(value) else default

    def __iter__(self):
        return filter(self._shown, self.masks.rows)

    def __len__(self) -> int:
        return sum(1 for _ in self)


class _LocationMasks:
    """The values found masked in locations and field names, each location settled once."""

    def __init__(self, masks: _Masks):
        self.masks = masks
        self.masked: ValueMasks | None = None  # built when a first location is asked for
        self.done: dict[str, str] = {}

    def __call__(self, text: str) -> str:
        if not len(self.masks.detections):
            return text
        masked = self.done.get(text)
        if masked is None:
            masked = self.done[text] = self._masks()(text)
        return masked

    def _masks(self) -> ValueMasks:
        if self.masked is None:  # every value's characters and lengths (from columns: without the values)
            self.masked = ValueMasks(_OwnMasksLeftOut(self.masks),
                                     *(self.masks.detections.value_lengths_and_units() or (None, None)))
        return self.masked

    def many(self, texts: list[str | None]) -> list[str | None]:
        """self(text) of each text (None stays None), the texts not masked yet masked in one pass."""
        if not len(self.masks.detections):
            return texts
        self.settle([text for text in texts if text])
        done = self.done
        return [None if text is None else done.get(text) or self(text) for text in texts]

    def settle(self, texts: list[str]) -> None:
        """Mask the texts in one pass (joined by newlines, which no mask can span, when no value holds one)."""
        texts = list(dict.fromkeys(text for text in texts if text not in self.done))
        if len(texts) < 2 or not len(self.masks.detections):
            return
        masks = self._masks()
        if masks.runs is not None and (masks.runs.search("\n" * masks.lengths[-1])  # a newline may be in a value
                                       or any("\n" in text for text in texts)):
            return  # each masked when asked for
        self.done.update(zip(texts, masks("\n".join(texts)).split("\n")))


def _distinct_values_reach(values: Iterable[str], size: int, count: int) -> bool:
    """Whether `size` values hold at least `count` distinct ones (as min_count compares them)."""
    if size < count or not size:
        return False
    written: set[str] = set()  # a value written alike again is not put in canonical form again
    seen: set[str] = set()
    for value in values:
        if value not in written:
            written.add(value)
            seen.add(canonical_value(value))
            if len(seen) >= count:
                return True
    return False


def _rule_selects(rule: Rule, detection: Detection, field_name: str | None) -> bool:
    if detection.kind == "detector":
        chosen = detection.name in rule.detectors
    else:
        chosen = detection.name == rule.id
    if not chosen:
        return False
    if rule.fields and detection.kind != "field":
        return field_name is not None and field_name.strip().lower() in rule.fields
    return True


def _detector_spans(data: bytes, spans: np.ndarray, detector_of: np.ndarray, names: list[str],
                    settled: np.ndarray = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The detectors' candidates (rows of (start, end), detector_of naming their detectors by index
    in `names`) that are whole tokens, valid, and win over those they overlap: the stronger
    detector's (an ID number is not also a card number), then the longer (one e-mail address, not
    its prefix); as arrays of starts, ends and detector indexes, in text order. Each step runs over
    all candidates at once; only runs of valid candidates overlapping one another are settled one by one.
    `settled`: rows (start, end, detector index) already whole, valid and each the strongest on its
    span (words the kernels settled), in text order; they compete with the others' overlaps only."""
    none = np.zeros(0, dtype=np.int64)
    settled = _NO_SPANS if settled is None else settled
    if not len(spans):
        return settled[:, 0], settled[:, 1], settled[:, 2]
    starts, ends = spans[:, 0].copy(), spans[:, 1]
    present = np.flatnonzero(np.bincount(detector_of)).tolist()
    for index in present:
        grow = DETECTORS[names[index]].extend_left
        if grow:  # e-mail local parts, grown leftwards: value by value (few)
            for row in np.flatnonzero(detector_of == index).tolist():
                start = starts[row]
                floor = max(start - MAX_TOKEN_BYTES, 0)
                while start > floor and data[start - 1] in grow:
                    start -= 1
                starts[row] = start
    buf = np.frombuffer(data, dtype=np.uint8)
    last = len(buf) - 1
    before, after = buf[np.maximum(starts - 1, 0)], buf[np.minimum(ends, last)]
    keep = ~((starts > 0) & _ALNUM_BYTES[before]) & ~((ends <= last) & _ALNUM_BYTES[after])
    separators = {index: DETECTORS[names[index]].group_separators for index in present
                  if DETECTORS[names[index]].group_separators}
    if separators:  # a grouped number next to another group of digits is part of a longer number
        joined = np.zeros(256, dtype=bool)
        joined[list(b"".join(separators.values()))] = True
        near = keep & (((ends < last) & joined[after] & _DIGIT_BYTES[buf[np.minimum(ends + 1, last)]])
                       | ((starts >= 2) & joined[before] & _DIGIT_BYTES[buf[np.maximum(starts - 2, 0)]]))
        for row in np.flatnonzero(near).tolist():  # few: each by its own detector's separators
            own = separators.get(int(detector_of[row]))
            if own:
                keep[row] = not _continued(data, int(starts[row]), int(ends[row]), own)
    starts, ends, detector_of = starts[keep], ends[keep], detector_of[keep]
    if not len(starts):
        return settled[:, 0], settled[:, 1], settled[:, 2]
    starts, ends, detector_of = _in_text_order(starts, ends, detector_of, len(names), len(data))  # repeats dropped
    same_span = np.zeros(len(starts), dtype=bool)
    same_span[1:] = (starts[1:] == starts[:-1]) & (ends[1:] == ends[:-1])
    first = np.ones(len(starts), dtype=bool)
    first[1:] = ~same_span[1:] | (detector_of[1:] != detector_of[:-1])
    starts, ends, detector_of, same_span = starts[first], ends[first], detector_of[first], same_span[first]
    # Validated strongest detector first: a candidate whose very span a stronger one holds validly is
    # taken by it (an ID number is no card number) and needs no check of its own.
    span_of = np.cumsum(~same_span) - 1
    taken = np.zeros(len(starts), dtype=bool)  # per span
    valid = np.zeros(len(starts), dtype=bool)
    priority = np.array([DETECTORS[name].priority for name in names])[detector_of]
    for level in sorted({DETECTORS[names[index]].priority for index in present}, reverse=True):
        rows = np.flatnonzero((priority == level) & ~taken[span_of])
        for index in np.flatnonzero(np.bincount(detector_of[rows])).tolist():
            chosen = rows[detector_of[rows] == index]
            valid[chosen] = batch.valid(names[index], data, starts[chosen], ends[chosen])
        taken[span_of[rows[valid[rows]]]] = True
    starts, ends, detector_of = starts[valid], ends[valid], detector_of[valid]
    if len(settled):
        starts, ends, detector_of = _in_text_order(np.concatenate([starts, settled[:, 0]]),
                                                   np.concatenate([ends, settled[:, 1]]),
                                                   np.concatenate([detector_of, settled[:, 2]]), len(names), len(data))
    if not len(starts):
        return none, none, none
    # Runs of candidates overlapping one another: a run starts where no earlier candidate reaches.
    reach = np.maximum.accumulate(ends)
    run_starts = np.ones(len(starts), dtype=bool)
    run_starts[1:] = starts[1:] >= reach[:-1]
    run_of = np.cumsum(run_starts) - 1
    alone = np.bincount(run_of)[run_of] == 1
    if alone.all():
        return starts, ends, detector_of
    runs: dict[int, list[tuple[int, int, int, int]]] = {}
    for start, end, index, run in zip(starts[~alone].tolist(), ends[~alone].tolist(), detector_of[~alone].tolist(),
                                      run_of[~alone].tolist()):
        runs.setdefault(run, []).append((start, end, -DETECTORS[names[index]].priority, index))
    settled = np.array([taken for run in runs.values() for taken in _strongest(run)], dtype=np.int64).reshape(-1, 3)
    starts = np.concatenate([starts[alone], settled[:, 0]])
    ends = np.concatenate([ends[alone], settled[:, 1]])
    detector_of = np.concatenate([detector_of[alone], settled[:, 2]])
    order = np.argsort(starts, kind="stable")
    return starts[order], ends[order], detector_of[order]


def _in_text_order(starts: np.ndarray, ends: np.ndarray, detector_of: np.ndarray, detectors: int,
                   size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Spans sorted by start, end and detector (one key, quicker to sort than three, while they fit)."""
    lengths = ends - starts
    order = np.argsort((starts << 23) | (lengths << 5) | detector_of, kind="stable") \
        if lengths.max() < 1 << 18 and detectors <= 32 and size < 1 << 40 else np.lexsort((detector_of, ends, starts))
    return starts[order], ends[order], detector_of[order]


def _strongest(run: list[tuple[int, int, int, int]]) -> list[tuple[int, int, int]]:
    """Of valid candidates (start, end, -priority, detector) overlapping one another, those taken
    strongest first, then longest, each unless it overlaps one taken before."""
    taken: list[tuple[int, int, int]] = []
    taken_starts: list[int] = []
    taken_ends: list[int] = []  # taken spans do not overlap, so ends are sorted like starts
    for start, end, _, name in sorted(run, key=lambda c: (c[2], c[0] - c[1], c[0])):
        index = bisect.bisect_left(taken_starts, start)
        if (index and taken_ends[index - 1] > start) or (index < len(taken_starts) and taken_starts[index] < end):
            continue
        taken_starts.insert(index, start)
        taken_ends.insert(index, end)
        taken.append((start, end, name))
    return taken


def _continued(data: bytes, start: int, end: int, separators: bytes) -> bool:
    """A grouped number followed or preceded by another group belongs to a longer number."""
    if data[start:end].rstrip(b"Xx").isdigit():  # not grouped (an ID number may end in X)
        return False
    after = data[end:end + 2]
    before = data[max(start - 2, 0):start]
    return (len(after) == 2 and after[0] in separators and after[1:].isdigit()) or \
        (len(before) == 2 and before[1] in separators and before[:1].isdigit())


def _has_context(data: bytes, start: int, detector: Detector) -> bool:
    window = data[max(start - _CONTEXT_WINDOW, 0):start].lower()
    return any(word.lower().encode("utf-8") in window for word in detector.context_words)


class RuleSet:
    def __init__(self, rules: dict[str, Rule], profiles: dict[str, ProfileSpec], engine: str | None = None):
        self.rules = rules
        self.profiles: dict[str, Profile] = {}
        for name, spec in profiles.items():
            try:
                self.profiles[name] = Profile(spec, engine)
            except PatternError as error:  # each pattern compiled alone; together they can still be too large
                where = spec.rules[0].source if spec.rules else "(rules):1"
                raise DlpConfigError([f"{where}: profiles.{name}: {error}"]) from None

    def check_examples(self, engine: str | None = None) -> list[str]:
        """Run every rule's examples alone; one message per failing example ("" when all pass)."""
        failures = []
        for rule in self.rules.values():
            profile = single_rule_profile(rule, engine)
            direction = "response" if rule.direction == "response" else "request"
            for expected, examples in ((True, rule.examples_match), (False, rule.examples_no_match)):
                for text in examples:
                    result = profile.scan(text.encode("utf-8"), direction=direction)
                    matched = any(f.rule == rule.id for f in result.findings)
                    if matched != expected:
                        found = ", ".join(f"{f.type} {f.masked} at {f.location}" for f in result.findings)
                        failures.append(f"{rule.source}: rule {rule.id}: example should "
                                        f"{'match' if expected else 'not match'}: {text!r}"
                                        + (f" (found {found})" if found else ""))
        return failures

    def profile(self, name: str) -> Profile:
        try:
            return self.profiles[name]
        except KeyError:
            raise KeyError(f"unknown DLP profile {name!r} (known: {', '.join(sorted(self.profiles)) or 'none'})") \
                from None


def load_rules(path: str | Path, *, engine: str | None = None) -> RuleSet:
    """Load a rule file or a folder of *.yaml files; `engine` forces "hyperscan" or "re"."""
    rules, profiles = parse_files(rule_files(path))
    return RuleSet(rules, profiles, engine)


def single_rule_profile(rule: Rule, engine: str | None = None, limits: Limits | None = None) -> Profile:
    """A profile made of one rule: how a rule's examples are run."""
    return Profile(ProfileSpec(f"rule:{rule.id}", "", (rule,), "block", limits or Limits()), engine)
