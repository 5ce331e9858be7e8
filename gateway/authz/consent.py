"""The consent registry (数据主体授权): consents issued by the data-subject platform, in SQLite.

A batch is one file: its first line a JWS (General JSON, jose.py) signed by the platform's key, whose
claims name the batch, when it was issued, how many consents follow and the SHA-256 of the bytes that
follow; then one consent per line (JSON). One signature covers a million consents, and the file is read
as it streams: an altered line changes the digest, and nothing of a batch that does not verify is kept
(one transaction). A consent:

    {"cid": "...", "subject": HEX, "consumer": "operator-a", "scenario": "elderly-care",
     "datasets": ["health.residents"], "nbf": 1767225600, "exp": 1798761600,
     "separate": true, "withdrawn": false}

`subject` is the subject key (gateway.authz.subject: a keyed hash of the ID number, never the number).
`separate` says the subject gave separate consent (单独同意), which a dataset may require. A consent
once withdrawn stays withdrawn, whatever a later batch says; `withdraw` (the operator's hand) only ever
takes consent away, so it needs no signature. The registry's age is that of the newest batch the
platform issued: the platform issues one (empty if nothing changed) at least every `max_age`.

Several workers read the file at once (WAL). A worker does not ask SQLite for each record: it holds,
per consumer, scenario, dataset (and separate consent), the subject keys valid now with when each
ends (`RegistryView`), loaded once and then kept current from the `changes` table, which every write
appends to (a withdrawal: the subjects it touched; an import: "everything"). Each transfer first reads
the newest change number (one index probe), so a withdrawal counts from the next transfer; an expired
consent stops counting at its `exp` (compared per record), one not valid yet starts counting when its
`nbf` comes (the view is loaded again then).
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import compress, repeat
from pathlib import Path
from typing import IO, Any

import orjson

from gateway.authz.claims import CLOCK_SKEW
from gateway.authz.jose import PLATFORM_ROLE, Authority, DocumentError, parse, verify
from gateway.authz.records import Lookup
from gateway.authz.sqlite import open_shared, write_transaction

VERSION = 1
CONSENT_KEYS = {"cid", "subject", "consumer", "scenario", "datasets", "nbf", "exp", "separate", "withdrawn"}
CONSENT_REQUIRED = CONSENT_KEYS - {"separate", "withdrawn"}
BATCH_KEYS = {"ver", "batch", "iat", "count", "sha256", "subject_key", "key_check"}
INSERT_CHUNK = 20000
LOOKUP_CHUNK = 900  # host parameters per query, under SQLite's old default limit of 999

SCHEMA = """
CREATE TABLE IF NOT EXISTS consents (
    cid TEXT PRIMARY KEY, subject BLOB NOT NULL, consumer TEXT NOT NULL, scenario TEXT NOT NULL,
    datasets TEXT NOT NULL, nbf INTEGER NOT NULL, exp INTEGER NOT NULL, separate INTEGER NOT NULL,
    withdrawn INTEGER NOT NULL, batch TEXT NOT NULL, iat INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS consents_by_subject
    ON consents (consumer, scenario, subject, withdrawn, nbf, exp, separate, datasets);
-- Every write appends here; subject NULL: look everything up again (an import).
CREATE TABLE IF NOT EXISTS changes (seq INTEGER PRIMARY KEY AUTOINCREMENT, subject BLOB);
CREATE TABLE IF NOT EXISTS batches (
    batch TEXT PRIMARY KEY, iat INTEGER NOT NULL, imported INTEGER NOT NULL, count INTEGER NOT NULL,
    sha256 TEXT NOT NULL);
"""


class ConsentError(ValueError):
    """A batch or consent that is refused; the message says where."""


@dataclass(frozen=True)
class Batch:
    batch: str
    iat: int
    count: int
    sha256: str


def consent_row(line: bytes, number: int) -> tuple:
    """One consent line as a row of the consents table (without the batch), or ConsentError."""
    try:
        c = orjson.loads(line)
    except orjson.JSONDecodeError as e:
        raise ConsentError(f"line {number}: not JSON ({e})") from None
    if not isinstance(c, dict):
        raise ConsentError(f"line {number}: expected an object")
    if unknown := set(c) - CONSENT_KEYS:
        raise ConsentError(f"line {number}: unknown claim(s) {', '.join(sorted(unknown))}")
    if missing := CONSENT_REQUIRED - set(c):
        raise ConsentError(f"line {number}: missing {', '.join(sorted(missing))}")
    for key in ("cid", "consumer", "scenario"):
        if not isinstance(c[key], str) or not c[key]:
            raise ConsentError(f"line {number}: {key}: expected a non-empty string")
    try:
        subject = bytes.fromhex(c["subject"])
    except (TypeError, ValueError):
        subject = b""
    if len(subject) != 32:
        raise ConsentError(f"line {number}: subject: expected a subject key (64 hex digits), never a clear number")
    datasets = c["datasets"]
    if not isinstance(datasets, list) or not datasets or not all(isinstance(d, str) and d and "," not in d
                                                                  for d in datasets):
        raise ConsentError(f"line {number}: datasets: expected a non-empty list of dataset ids")
    for key in ("nbf", "exp"):
        if not isinstance(c[key], int) or isinstance(c[key], bool):
            raise ConsentError(f"line {number}: {key}: expected Unix seconds")
    if c["exp"] <= c["nbf"]:
        raise ConsentError(f"line {number}: exp must be after nbf")
    flags = []
    for key in ("separate", "withdrawn"):
        value = c.get(key, False)
        if not isinstance(value, bool):
            raise ConsentError(f"line {number}: {key}: expected true or false")
        flags.append(int(value))
    return (c["cid"], subject, c["consumer"], c["scenario"], "," + ",".join(datasets) + ",", c["nbf"], c["exp"],
            *flags)


def read_manifest(line: bytes, platform: dict[str, Authority], algorithms: tuple[str, ...],
                  key_check: str, subject_hash: str) -> Batch:
    """The batch's signed first line, verified: signed by the platform, for this registry's secret."""
    try:
        claims, signers = verify(parse(line.strip()), platform, algorithms)
    except DocumentError as e:
        raise ConsentError(f"line 1: {e.detail}") from None
    if not all(signer.role == PLATFORM_ROLE for signer in signers):
        raise ConsentError("line 1: not signed by the data-subject platform")
    if set(claims) != BATCH_KEYS:
        raise ConsentError(f"line 1: expected exactly the claims {', '.join(sorted(BATCH_KEYS))}")
    if claims["ver"] != VERSION:
        raise ConsentError(f"line 1: version {claims['ver']!r} (this gateway reads {VERSION})")
    if claims["subject_key"] != subject_hash or claims["key_check"] != key_check:
        raise ConsentError(f"line 1: subject keys made with another secret or hash ({claims['subject_key']}, "
                           f"check {claims['key_check']}; this registry: {subject_hash}, check {key_check})")
    if not (isinstance(claims["batch"], str) and isinstance(claims["iat"], int) and isinstance(claims["count"], int)
            and isinstance(claims["sha256"], str)):
        raise ConsentError("line 1: batch, iat, count or sha256 of the wrong type")
    return Batch(claims["batch"], claims["iat"], claims["count"], claims["sha256"])


def batch_claims(batch: str, iat: int, body: bytes, count: int, key_check: str, subject_hash: str) -> dict[str, Any]:
    """The claims the platform signs for a batch whose consent lines are `body`."""
    return {"ver": VERSION, "batch": batch, "iat": iat, "count": count, "sha256": hashlib.sha256(body).hexdigest(),
            "subject_key": subject_hash, "key_check": key_check}


@dataclass(frozen=True)
class Scope:
    """What a consent must name to count for a transfer."""
    consumer: str
    scenario: str
    dataset: str
    separate: bool = False


class ConsentRegistry:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = open_shared(path, timeout=30)
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        if "iat" not in {row[1] for row in self._db.execute("PRAGMA table_info(consents)")}:
            # a registry made before each consent kept its batch's issue time
            self._db.execute("ALTER TABLE consents ADD COLUMN iat INTEGER NOT NULL DEFAULT 0")
        self._lock = threading.Lock()

    # ---- writing (the operator's tools) -------------------------------------------------------

    def import_batch(self, stream: IO[bytes], platform: dict[str, Authority], algorithms: tuple[str, ...],
                     key_check: str, subject_hash: str, now: float | None = None) -> Batch:
        """Verify and import one batch file in one transaction; ConsentError (nothing kept) otherwise."""
        manifest = read_manifest(stream.readline(), platform, algorithms, key_check, subject_hash)
        if manifest.iat > (now or time.time()) + CLOCK_SKEW:
            raise ConsentError(f"line 1: issued in the future (iat {manifest.iat}): it would never age")
        digest, count = hashlib.sha256(), 0
        with self._lock, write_transaction(self._db):
            rows: list[tuple] = []
            for number, line in enumerate(stream, start=2):
                digest.update(line)
                if not line.strip():
                    continue
                rows.append((*consent_row(line, number), manifest.batch, manifest.iat))
                count += 1
                if len(rows) >= INSERT_CHUNK:
                    self._insert(rows)
                    rows = []
            self._insert(rows)
            if digest.hexdigest() != manifest.sha256:
                raise ConsentError("the consents do not match the signed digest: the file was altered "
                                   "after the platform signed it")
            if count != manifest.count:
                raise ConsentError(f"{count} consents, the signed batch says {manifest.count}")
            # (only now: an altered copy of a batch imported before is refused as altered, not as a repeat)
            if self._db.execute("SELECT 1 FROM batches WHERE batch=?", (manifest.batch,)).fetchone():
                raise ConsentError(f"batch {manifest.batch} was imported before")
            self._db.execute("INSERT INTO batches VALUES (?, ?, ?, ?, ?)", (
                manifest.batch, manifest.iat, int(now or time.time()), count, manifest.sha256))
            # Every reader loads everything again: the changes before this one are moot.
            seq = self._db.execute("INSERT INTO changes (subject) VALUES (NULL)").lastrowid
            self._db.execute("DELETE FROM changes WHERE seq < ?", (seq,))
        return manifest

    def _insert(self, rows: list[tuple]) -> None:
        # A consent withdrawn before stays withdrawn; otherwise the terms of the batch the platform issued
        # last hold (an older batch imported later changes nothing but a withdrawal).
        self._db.executemany(
            "INSERT INTO consents VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (cid) DO UPDATE SET "
            "subject=iif(excluded.iat >= iat, excluded.subject, subject), "
            "consumer=iif(excluded.iat >= iat, excluded.consumer, consumer), "
            "scenario=iif(excluded.iat >= iat, excluded.scenario, scenario), "
            "datasets=iif(excluded.iat >= iat, excluded.datasets, datasets), "
            "nbf=iif(excluded.iat >= iat, excluded.nbf, nbf), exp=iif(excluded.iat >= iat, excluded.exp, exp), "
            "separate=iif(excluded.iat >= iat, excluded.separate, separate), "
            "withdrawn=max(withdrawn, excluded.withdrawn), "
            "batch=iif(excluded.iat >= iat, excluded.batch, batch), iat=max(iat, excluded.iat)", rows)

    def withdraw(self, cids: Iterable[str] = (), subject: bytes | None = None, consumer: str | None = None,
                 scenario: str | None = None) -> int:
        """Withdraw consents by id, or a subject's (optionally for one consumer or scenario); how many."""
        cids = list(cids)
        if cids:
            where, values = f"cid IN ({','.join('?' * len(cids))})", cids
        elif subject is None:
            raise ValueError("withdraw what: consent ids or a subject")
        else:
            conditions, values = ["subject=?"], [subject]
            for column, value in (("consumer", consumer), ("scenario", scenario)):
                if value is not None:
                    conditions.append(f"{column}=?")
                    values.append(value)
            where = " AND ".join(conditions)
        with self._lock, write_transaction(self._db):
            touched = [row[0] for row in self._db.execute(
                f"UPDATE consents SET withdrawn=1 WHERE withdrawn=0 AND {where} RETURNING subject", values)]
            self._db.executemany("INSERT INTO changes (subject) VALUES (?)", [(s,) for s in set(touched)])
        return len(touched)

    # ---- reading (the consent stage, `consent check`) -----------------------------------------

    def issued(self) -> int | None:
        """When the platform issued the newest batch imported (Unix seconds), or None."""
        with self._lock:
            return self._db.execute("SELECT max(iat) FROM batches").fetchone()[0]

    def last_change(self) -> int:
        with self._lock:
            return self._db.execute("SELECT coalesce(max(seq), 0) FROM changes").fetchone()[0]

    def changes_since(self, seq: int) -> tuple[int, set[bytes] | None]:
        """The newest change number and the subjects changed after `seq` (None: everything may have)."""
        with self._lock:
            rows = self._db.execute("SELECT seq, subject FROM changes WHERE seq > ? ORDER BY seq", (seq,)).fetchall()
        if not rows:
            return seq, set()
        subjects = {subject for _, subject in rows}
        return rows[-1][0], None if None in subjects else subjects

    def valid(self, scope: Scope, now: float, subjects: Iterable[bytes] | None = None) -> tuple[dict[bytes, int], float]:
        """The subjects (all, or those of `subjects`) with an unwithdrawn consent in `scope` valid at `now`,
        each with when its consent ends; and when the first consent still to start does (or infinity)."""
        query = ("SELECT subject, datasets, nbf, exp FROM consents WHERE consumer=? AND scenario=? AND withdrawn=0 "
                 "AND exp>? AND separate>=?")
        values = (scope.consumer, scope.scenario, int(now), int(scope.separate))
        wanted = None if subjects is None else list(subjects)
        chunks = [None] if wanted is None else [wanted[i:i + LOOKUP_CHUNK] for i in range(0, len(wanted), LOOKUP_CHUNK)]
        needle = f",{scope.dataset},"
        valid: dict[bytes, int] = {}
        starts = math.inf
        with self._lock:
            for chunk in chunks:
                rows = self._db.execute(query, values) if chunk is None else self._db.execute(
                    f"{query} AND subject IN ({','.join('?' * len(chunk))})", (*values, *chunk))
                for subject, datasets, nbf, exp in rows:
                    if needle not in datasets:
                        continue
                    if nbf > now:
                        starts = min(starts, nbf)
                    elif exp > valid.get(subject, 0):
                        valid[subject] = exp
        return valid, starts

    def consents_of(self, subject: bytes) -> Iterator[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT cid, consumer, scenario, datasets, nbf, exp, separate, withdrawn, batch "
                                    "FROM consents WHERE subject=? ORDER BY cid", (subject,)).fetchall()
        for cid, consumer, scenario, datasets, nbf, exp, separate, withdrawn, batch in rows:
            yield {"cid": cid, "consumer": consumer, "scenario": scenario, "datasets": datasets.strip(",").split(","),
                   "nbf": nbf, "exp": exp, "separate": bool(separate), "withdrawn": bool(withdrawn), "batch": batch}

    def close(self) -> None:
        self._db.close()


@dataclass
class _Valid:
    subjects: dict[bytes, int]  # subject key -> when its consent ends (Unix seconds)
    reload_at: float            # when a consent not valid yet starts: load again then
    touched: float = field(default_factory=time.monotonic)


class RegistryView:
    """The registry as one worker's consent stage sees it: its age looked at most once a second, and the
    valid subjects of each scope in memory, kept current from the registry's changes on every transfer."""

    CHECK_INTERVAL = 1.0
    MAX_SCOPES = 64  # scopes kept in memory; the least recently used goes first

    def __init__(self, registry: ConsentRegistry, max_age: float):
        self.registry = registry
        self.max_age = max_age
        self._issued: int | None = None
        self._checked = float("-inf")
        self._scopes: dict[Scope, _Valid] = {}
        self._seq = registry.last_change()
        self._lock = threading.Lock()  # the stage looks up from worker threads too
        # Scopes load (seconds for a million consents) through a connection of their own, so the
        # event loop's quick looks through `registry` never wait for one.
        self._loader = ConsentRegistry(registry.path)

    def age(self, now: float) -> float | None:
        if time.monotonic() - self._checked >= self.CHECK_INTERVAL:
            self._checked = time.monotonic()
            self._issued = self.registry.issued()
        return None if self._issued is None else now - self._issued

    def fresh(self, now: float) -> bool:
        age = self.age(now)  # negative: issued in the future (a clock too far ahead), not trusted
        return age is not None and -CLOCK_SKEW <= age <= self.max_age

    def loaded(self, scope: Scope, now: float) -> bool:
        """Whether `consented` can answer for `scope` without loading it whole (a cheap look, no lock)."""
        held = self._scopes.get(scope)
        return held is not None and held.reload_at > now and self.registry.last_change() == self._seq

    def consented(self, scope: Scope, now: float) -> Lookup:
        """A lookup answering which of a response's subject keys consented, current as of now."""
        with self._lock:
            self._catch_up(now)
            held = self._scopes.get(scope)
            if held is None or held.reload_at <= now:
                if held is None and len(self._scopes) >= self.MAX_SCOPES:
                    del self._scopes[min(self._scopes, key=lambda s: self._scopes[s].touched)]
                held = self._scopes[scope] = _Valid(*self._loader.valid(scope, now))
            held.touched = time.monotonic()
            subjects = held.subjects
        ends_after_now = float(now).__lt__  # (a float's compares ints too; an int's would not take a float)

        def lookup(keys: Iterable[bytes]) -> set[bytes]:
            keys = list(keys)  # (C loops: a Python step per key costs twice this)
            return set(compress(keys, map(ends_after_now, map(subjects.get, keys, repeat(0)))))
        return lookup

    def _catch_up(self, now: float) -> None:
        seq, changed = self.registry.changes_since(self._seq)
        if seq == self._seq:
            return
        if changed is None:
            self._scopes.clear()
        else:
            for scope, held in self._scopes.items():
                fresh, _ = self._loader.valid(scope, now, changed)
                for subject in changed:
                    held.subjects.pop(subject, None)
                held.subjects.update(fresh)
        self._seq = seq

    def close(self) -> None:
        self.registry.close()
        self._loader.close()

