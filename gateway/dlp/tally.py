"""Findings grouped per rule, type and action: a count, the first few locations and a digest of where they all are.

A bulk export holds a finding in every record: thousands of them. What is kept of them (a scan
result, a transfer's reasons, its trace record, the client's refusal) must stay bounded whatever the
body, yet still say how many there were and pin down where: each group keeps its count, its first
`KEPT_LOCATIONS` locations, and the SHA-256 of every finding's place in the order found, which anyone
re-scanning the body can recompute (`Finding.place`, see places_digest()). A place is the location of
the text a finding is in and its byte offset there as written: cheap to have for every finding, where
a location (`body:$[7311].sfzh`) costs microseconds to build and is built only for findings shown.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import groupby
from operator import itemgetter

from gateway.dlp.native import kernels

KEPT_LOCATIONS = 5
# Where a finding is: the location of the text it was found in, and its byte offset in that text as
# written (None for one not in a text: a field name, an uninspectable part, a reason of the gateway's own).
Place = tuple[str, int | None]
LOCATION_CHARS = 200  # a location names fields as the sender wrote them: a longer one is cut when shown


@dataclass(frozen=True)
class FindingGroup:
    rule: str
    type: str
    action: str
    count: int
    locations: tuple[str, ...]  # the first KEPT_LOCATIONS, in the order found
    locations_sha256: str       # of all `count` places, see places_digest()

    def entry(self, kept: int = KEPT_LOCATIONS) -> dict:
        """As trace records, alerts and the decision log write it."""
        return {"rule": self.rule, "type": self.type, "action": self.action, "count": self.count,
                "locations": [_cut(location) for location in self.locations[:kept]],
                "locations_sha256": self.locations_sha256}

    def public(self, kept: int = KEPT_LOCATIONS) -> dict:
        """As a refusal shows it to the client."""
        return {"rule": self.rule, "type": self.type, "count": self.count,
                "locations": [_cut(location) for location in self.locations[:kept]]}


def places_digest(places: Iterable[Place]) -> str:
    """SHA-256 of the places, one line each (UTF-8, non-ASCII as is): the location as a JSON string,
    then, for a place in a text, a space and the offset in decimal; and a newline."""
    return hashlib.sha256(lines_of(in_runs(places))).hexdigest()


def in_runs(places: Iterable[Place]) -> list[tuple[str, list[int | None]]]:
    """Places as runs of one location and its offsets (most places of a scan share their text's)."""
    return [(location, [offset for _, offset in run]) for location, run in groupby(places, key=itemgetter(0))]


def locations_digest(locations: Iterable[str]) -> str:
    """The digest of places that are locations only (no offset in a text)."""
    return places_digest((location, None) for location in locations)


class Tally:
    """Groups findings as they are added, in the order their group was first seen."""

    def __init__(self) -> None:
        self._groups: dict[tuple[str, str, str], tuple[list[int], list[str], "hashlib._Hash"]] = {}

    def add(self, rule: str, type: str, action: str, location: str, place: Place | None = None) -> None:
        """One finding at `location` (its place: `place`, or the location alone)."""
        self.extend(rule, type, action, in_runs([place or (location, None)]), lambda _: location)

    def extend(self, rule: str, type: str, action: str, runs: list[tuple[str, list[int | None]]],
               locate: Callable[[int], str], lines: bytes | None = None) -> None:
        """Findings at the places of `runs` (see in_runs), in the order found; locate(i) is the
        location of the i-th, asked for the first few only; `lines`: lines_of(runs), when made before."""
        group = self._groups.get((rule, type, action))
        if group is None:
            group = self._groups[(rule, type, action)] = ([0], [], hashlib.sha256())
        count, locations, hasher = group
        added = sum(len(offsets) for _, offsets in runs)
        count[0] += added
        locations += [locate(index) for index in range(min(KEPT_LOCATIONS - len(locations), added))]
        hasher.update(lines_of(runs) if lines is None else lines)

    def groups(self) -> list[FindingGroup]:
        return [FindingGroup(rule, type, action, count[0], tuple(locations), hasher.hexdigest())
                for (rule, type, action), (count, locations, hasher) in self._groups.items()]


def single(rule: str, type: str, location: str, action: str) -> FindingGroup:
    """One reason that is not a scan's finding (a policy deny, a framing error, ...)."""
    return FindingGroup(rule, type, action, 1, (location,), places_digest([(location, None)]))


def fit(groups: list[FindingGroup], room: int, public: bool = False) -> tuple[list[dict], int]:
    """The groups' entries in at most `room` bytes of JSON, and how many findings had no room.

    Each group keeps its first locations while they fit, then one, then none (its count and digest
    still say how many and which); groups that do not fit even so are left out, counted."""
    shown = (lambda group, kept: group.public(kept)) if public else (lambda group, kept: group.entry(kept))
    for kept in (KEPT_LOCATIONS, 1, 0):
        entries = [shown(group, kept) for group in groups]
        if _size(entries) <= room:
            return entries, 0
    used = 2  # the brackets
    for index, entry in enumerate(entries):
        used += _size(entry) + 1
        if used > room:
            return entries[:index], sum(group.count for group in groups[index:])
    return entries, 0


def _size(value: object) -> int:
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())


def lines_of(runs: list[tuple[str, list[int | None]]]) -> bytes:
    """What the digest of the places of `runs` reads (see places_digest)."""
    pieces = []
    for location, offsets in runs:
        text = json.dumps(location, ensure_ascii=False)
        if None in offsets:
            pieces += [(text if offset is None else f"{text} {offset}") + "\n" for offset in offsets]
        elif kernels is not None:  # a bulk export's thousand offsets: formatted in C
            pieces.append(kernels.place_lines(text.encode("utf-8", "surrogatepass"), offsets))
        else:
            pieces.append("".join(f"{text} {offset}\n" for offset in offsets))
    return b"".join(piece if isinstance(piece, bytes) else piece.encode("utf-8", "surrogatepass") for piece in pieces)


def _cut(location: str) -> str:
    return location if len(location) <= LOCATION_CHARS else location[:LOCATION_CHARS] + "…"
