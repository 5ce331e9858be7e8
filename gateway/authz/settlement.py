"""Usage priced for settlement (可控可计量), from trace records that verified.

Only transfers that carried data count: a catalogued dataset's allowed transfers answered 2xx (an
answer the provider marked as failed is not billed; those that carried records out all the same are
tallied apart, `unbilled`, for the report to show). Each adds one request, the records that left (passed and masked, after the consent stage; otherwise as the
upstream sent them), the records masked and dropped, and the response bytes; the charge is the
catalogue's unit price per request, record or MiB (2^20 bytes).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.authz.catalog import Catalog

# Grouping keys, each read from a record's `grant` part or its time.
KEYS: dict[str, Callable[[dict], Any]] = {
    "consumer": lambda r: r["grant"].get("consumer"),
    "dataset": lambda r: r["grant"].get("dataset"),
    "class": lambda r: r["grant"].get("class"),
    "grant": lambda r: r["grant"].get("id"),
    "scenario": lambda r: r["grant"].get("scenario"),
    "frontend": lambda r: r.get("frontend"),
    "day": lambda r: str(r.get("time"))[:10],
    "month": lambda r: str(r.get("time"))[:7],
}
MEASURES = ("requests", "records", "masked", "dropped", "bytes")


def billable(record: dict) -> bool:
    grant = record.get("grant")
    status = record.get("status")
    return (isinstance(grant, dict) and grant.get("result") == "allow" and isinstance(status, int)
            and 200 <= status < 300 and record.get("decision") not in ("block", "deny", "error"))


def _whole(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _records_out(grant: dict, consent: dict) -> int:
    """The records that left: passed and masked after the consent stage, else as the upstream sent them."""
    return _whole(consent.get("passed")) + _whole(consent.get("masked")) if consent else _whole(grant.get("records"))


@dataclass
class Settlement:
    catalog: Catalog
    keys: tuple[str, ...] = ("consumer", "dataset")
    rows: dict[tuple, dict[str, Any]] = field(default_factory=dict)
    # allowed answers outside 2xx that carried records out: not billed, but not to go unseen
    unbilled: dict[str, int] = field(default_factory=lambda: {"requests": 0, "records": 0})

    def __post_init__(self) -> None:
        unknown = [key for key in self.keys if key not in KEYS]
        if unknown:
            raise ValueError(f"unknown grouping key(s) {', '.join(unknown)}: choose from {', '.join(KEYS)}")

    def add(self, record: dict) -> None:
        grant = record.get("grant")
        if not billable(record):
            if isinstance(grant, dict) and grant.get("result") == "allow" \
                    and record.get("decision") not in ("block", "deny", "error"):
                records = _records_out(grant, record.get("consent") or {})
                if records:
                    self.unbilled["requests"] += 1
                    self.unbilled["records"] += records
            return
        consent = record.get("consent") or {}
        records = _records_out(grant, consent)
        size = _whole(record.get("resp_bytes"))
        group = tuple(KEYS[key](record) for key in self.keys)
        row = self.rows.setdefault(group, {**dict(zip(self.keys, group)), **dict.fromkeys(MEASURES, 0),
                                           "amount": 0.0, "currency": None})
        row["requests"] += 1
        row["records"] += records
        row["masked"] += _whole(consent.get("masked"))
        row["dropped"] += _whole(consent.get("dropped"))
        row["bytes"] += size
        dataset = self.catalog.get(grant.get("dataset"))
        if dataset is not None and dataset.price is not None:
            amount, per, currency = dataset.price
            units = {"request": 1, "record": records, "MiB": size / 2**20}[per]
            row["amount"] = round(row["amount"] + amount * units, 6)
            row["currency"] = row["currency"] or currency

    def table(self) -> list[dict[str, Any]]:
        return [self.rows[group] for group in sorted(self.rows, key=lambda g: ["" if v is None else str(v) for v in g])]

    def totals(self) -> dict[str, Any]:
        total: dict[str, Any] = dict.fromkeys(MEASURES, 0)
        amounts: dict[str, float] = {}
        for row in self.rows.values():
            for measure in MEASURES:
                total[measure] += row[measure]
            if row["currency"]:
                amounts[row["currency"]] = round(amounts.get(row["currency"], 0.0) + row["amount"], 6)
        return {**total, "amount": amounts}
