"""Usage counters per grant and per consumer and dataset, by day and month, in one SQLite file.

Shared by every worker of the machine and kept across restarts: the file lives in the state folder
(`state/authz/quota.sqlite`), in WAL mode; each request's check-and-count is one IMMEDIATE
transaction, so two workers cannot both take the last request of a quota. Kept beside the trace log
rather than rebuilt from it: rebuilding means reading every record of the month at each start, and
the trace log does not know a response's record count.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

from gateway.authz.claims import Limits
from gateway.authz.sqlite import open_shared, write_transaction

SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    scope TEXT NOT NULL, period TEXT NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0, records INTEGER NOT NULL DEFAULT 0, bytes INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (scope, period))
"""


@dataclass(frozen=True)
class Exceeded:
    scope: str
    measure: str
    period: str
    limit: int
    reset: int  # seconds until the period ends

    @property
    def policy(self) -> str:
        """As RateLimit-Policy names it (draft-ietf-httpapi-ratelimit-headers)."""
        return f"{self.measure}-{self.period}"


def periods(now: float) -> dict[str, tuple[str, int]]:
    """The current day and month (local time) and the seconds until each ends."""
    local = time.localtime(now)
    day_end = time.mktime((local.tm_year, local.tm_mon, local.tm_mday + 1, 0, 0, 0, 0, 0, -1))
    month_end = time.mktime((local.tm_year, local.tm_mon + 1, 1, 0, 0, 0, 0, 0, -1))
    return {"day": (time.strftime("%Y-%m-%d", local), int(day_end - now) + 1),
            "month": (time.strftime("%Y-%m", local), int(month_end - now) + 1)}


class QuotaStore:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = open_shared(path, timeout=10)
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(SCHEMA)
        self._lock = threading.Lock()

    def take(self, scopes: dict[str, Limits], now: float) -> Exceeded | None:
        """Count one request against every scope, unless one of them is already spent (then nothing): a
        request, or a records or bytes limit already reached."""
        current = periods(now)
        with self._lock, write_transaction(self._db):
            for scope, limits in scopes.items():
                for period, (key, reset) in current.items():
                    row = self._db.execute("SELECT requests, records, bytes FROM usage WHERE scope=? AND period=?",
                                           (scope, key)).fetchone() or (0, 0, 0)
                    used = dict(zip(("requests", "records", "bytes"), row))
                    for measure, by_period in limits.items():
                        limit = by_period.get(period)
                        if limit is not None and used[measure] >= limit:
                            return Exceeded(scope, measure, period, limit, reset)
            for scope in scopes:
                for key, _ in current.values():
                    self._db.execute("INSERT INTO usage (scope, period, requests) VALUES (?, ?, 1) "
                                     "ON CONFLICT (scope, period) DO UPDATE SET requests = requests + 1",
                                     (scope, key))
        return None

    def add(self, scopes: dict[str, Limits], records: int, size: int, now: float) -> Exceeded | None:
        """Count what a held response carries, unless it would take a scope past its records or bytes
        limit: then nothing is counted and the response is refused (checked and counted in one
        transaction, so responses in flight at once cannot all pass a limit)."""
        if not scopes or (not records and not size):
            return None
        current = periods(now)
        with self._lock, write_transaction(self._db):
            for scope, limits in scopes.items():
                for period, (key, reset) in current.items():
                    row = self._db.execute("SELECT records, bytes FROM usage WHERE scope=? AND period=?",
                                           (scope, key)).fetchone() or (0, 0)
                    for measure, used, more in (("records", row[0], records), ("bytes", row[1], size)):
                        limit = limits.get(measure, {}).get(period)
                        if limit is not None and more and used + more > limit:
                            return Exceeded(scope, measure, period, limit, reset)
            for scope in scopes:
                for key, _ in current.values():
                    self._db.execute("INSERT INTO usage (scope, period, records, bytes) VALUES (?, ?, ?, ?) "
                                     "ON CONFLICT (scope, period) DO UPDATE SET records = records + ?, "
                                     "bytes = bytes + ?", (scope, key, records, size, records, size))
        return None

    def usage(self, scope: str, now: float) -> dict[str, dict[str, int]]:
        result = {}
        for period, (key, _) in periods(now).items():
            row = self._db.execute("SELECT requests, records, bytes FROM usage WHERE scope=? AND period=?",
                                   (scope, key)).fetchone() or (0, 0, 0)
            result[period] = dict(zip(("requests", "records", "bytes"), row))
        return result

    def close(self) -> None:
        self._db.close()
