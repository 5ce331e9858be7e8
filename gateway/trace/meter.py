"""Usage metered from trace records, for settlement ("可控可计量").

Totals of transfers and bytes, grouped by fields of the records (zones, listener, decision, grant, day,
...). The command line (`gateway trace meter`) computes them only from a log that verifies, and names
the signed checkpoint they cover, so whoever holds the log's public key can recompute the same figures.

A forwarded transfer has two records (gateway.filters.record): its open record and its completion. Each
transfer counts once: by its completion, or (if none came: cut by a crash, or still in flight) by its
open record, as `open` too, with the request bytes it names.
"""

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any


def _side(side: str, key: str) -> Callable[[dict], Any]:
    def value(record: dict) -> Any:
        part = record.get(side)
        return part.get(key) if isinstance(part, dict) else None
    return value


def _grant(record: dict) -> Any:
    grant = record.get("grant")
    return grant.get("id") if isinstance(grant, dict) else grant


def _day(record: dict) -> Any:
    when = record.get("time")
    return when[:10] if isinstance(when, str) else None


# Grouping keys: how each is read from a record (None where the record lacks it).
KEYS: dict[str, Callable[[dict], Any]] = {
    "src_zone": _side("client", "zone"),
    "dst_zone": _side("upstream", "zone"),
    "upstream": _side("upstream", "host"),
    "listener": lambda record: record.get("listener"),
    "frontend": lambda record: record.get("frontend"),
    "decision": lambda record: record.get("decision"),
    "grant": _grant,
    "day": _day,
}
DEFAULT_KEYS = ("src_zone", "dst_zone", "decision")


@dataclass
class Usage:
    transfers: int = 0
    open: int = 0  # of these, transfers with an open record and no completion
    req_bytes: int = 0
    resp_bytes: int = 0

    def add(self, record: dict) -> None:
        self.transfers += 1
        self.open += record.get("phase") == "open"
        self.req_bytes += _count(record.get("req_bytes"))
        self.resp_bytes += _count(record.get("resp_bytes"))

    def as_dict(self) -> dict[str, int]:
        return {"transfers": self.transfers, "open": self.open, "req_bytes": self.req_bytes,
                "resp_bytes": self.resp_bytes}


def _scalar(value: Any) -> Any:
    """A group value as it can be a dict key and a CSV cell: lists and objects as canonical JSON."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False) if isinstance(value, (list, dict)) else value


def _count(value: Any) -> int:
    # bool is an int too, but never a byte count
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


@dataclass
class Meter:
    """Usage by group: `rows` maps the values of `keys` to their totals; `total` sums every transfer.
    Feed it every record in log order (`add`, with `counted` False for those a filter leaves out),
    then `finish()`."""
    keys: tuple[str, ...] = DEFAULT_KEYS
    rows: dict[tuple, Usage] = field(default_factory=dict)
    total: Usage = field(default_factory=Usage)
    unfinished: dict[Any, dict] = field(default_factory=dict)  # open records without a completion yet, by id

    def __post_init__(self) -> None:
        unknown = [key for key in self.keys if key not in KEYS]
        if unknown:
            raise ValueError(f"unknown grouping key(s) {', '.join(unknown)}: choose from {', '.join(KEYS)}")
        if len(set(self.keys)) != len(self.keys):
            raise ValueError(f"a grouping key is given twice: {', '.join(self.keys)}")

    def add(self, record: dict, counted: bool = True) -> None:
        phase = record.get("phase")
        if phase == "open":
            if counted:
                self.unfinished[record.get("id")] = record
            return
        if phase == "done":
            self.unfinished.pop(record.get("id"), None)
        if counted:
            self._count(record)

    def finish(self) -> "Meter":
        """Count the transfers whose completion never came, by their open record."""
        for record in self.unfinished.values():
            self._count(record)
        self.unfinished.clear()
        return self

    def _count(self, record: dict) -> None:
        group = tuple(_scalar(KEYS[key](record)) for key in self.keys)
        usage = self.rows.get(group)
        if usage is None:
            usage = self.rows[group] = Usage()
        usage.add(record)
        self.total.add(record)

    def add_all(self, records: Iterable[dict]) -> "Meter":
        for record in records:
            self.add(record)
        return self.finish()

    @property
    def columns(self) -> list[str]:
        return [*self.keys, *Usage().as_dict()]

    def table(self) -> list[dict[str, Any]]:
        """One dict per group (its key values, then its totals), sorted by the key values."""
        ordered = sorted(self.rows.items(), key=lambda item: [("" if v is None else str(v)) for v in item[0]])
        return [{**dict(zip(self.keys, group)), **usage.as_dict()} for group, usage in ordered]
