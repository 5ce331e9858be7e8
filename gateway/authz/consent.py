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

Several workers read the file at once (WAL); a response's subjects are looked up in one query, answered
from the index alone (it covers every column the lookup reads).
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson

from gateway.authz.jose import PLATFORM_ROLE, Authority, DocumentError, parse, verify

VERSION = 1
CONSENT_KEYS = {"cid", "subject", "consumer", "scenario", "datasets", "nbf", "exp", "separate", "withdrawn"}
CONSENT_REQUIRED = CONSENT_KEYS - {"separate", "withdrawn"}
BATCH_KEYS = {"ver", "batch", "iat", "count", "sha256", "subject_key", "key_check"}
INSERT_CHUNK = 20000
CLOCK_SKEW = 300  # seconds a batch's issue time may lie ahead of this machine's clock
LOOKUP_CHUNK = 900  # host parameters per query, under SQLite's old default limit of 999

SCHEMA = """
CREATE TABLE IF NOT EXISTS consents (
    cid TEXT PRIMARY KEY, subject BLOB NOT NULL, consumer TEXT NOT NULL, scenario TEXT NOT NULL,
    datasets TEXT NOT NULL, nbf INTEGER NOT NULL, exp INTEGER NOT NULL, separate INTEGER NOT NULL,
    withdrawn INTEGER NOT NULL, batch TEXT NOT NULL, iat INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS consents_by_subject
    ON consents (consumer, scenario, subject, withdrawn, nbf, exp, separate, datasets);
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


def _row(line: bytes, number: int) -> tuple:
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


class ConsentRegistry:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
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
        with self._lock:
            if self._db.execute("SELECT 1 FROM batches WHERE batch=?", (manifest.batch,)).fetchone():
                raise ConsentError(f"batch {manifest.batch} was imported before")
            self._db.execute("BEGIN IMMEDIATE")
            try:
                rows: list[tuple] = []
                for number, line in enumerate(stream, start=2):
                    digest.update(line)
                    if not line.strip():
                        continue
                    rows.append((*_row(line, number), manifest.batch, manifest.iat))
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
                self._db.execute("INSERT INTO batches VALUES (?, ?, ?, ?, ?)", (
                    manifest.batch, manifest.iat, int(now or time.time()), count, manifest.sha256))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
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
        with self._lock:
            if cids:
                marks = ",".join("?" * len(cids))
                return self._db.execute(f"UPDATE consents SET withdrawn=1 WHERE withdrawn=0 AND cid IN ({marks})",
                                        cids).rowcount
            if subject is None:
                raise ValueError("withdraw what: consent ids or a subject")
            where, values = ["subject=?", "withdrawn=0"], [subject]
            for column, value in (("consumer", consumer), ("scenario", scenario)):
                if value is not None:
                    where.append(f"{column}=?")
                    values.append(value)
            return self._db.execute(f"UPDATE consents SET withdrawn=1 WHERE {' AND '.join(where)}", values).rowcount

    # ---- reading (the consent stage, `consent check`) -----------------------------------------

    def issued(self) -> int | None:
        """When the platform issued the newest batch imported (Unix seconds), or None."""
        with self._lock:
            return self._db.execute("SELECT max(iat) FROM batches").fetchone()[0]

    def consented(self, subjects: Iterable[bytes], consumer: str, scenario: str, dataset: str, now: float,
                  separate: bool = False) -> set[bytes]:
        """The subjects among `subjects` with a valid, unwithdrawn consent to `consumer` for `scenario`
        covering `dataset` now (and separate consent where the dataset needs it)."""
        wanted = list(set(subjects))
        found: set[bytes] = set()
        needle = f",{dataset},"
        with self._lock:
            for start in range(0, len(wanted), LOOKUP_CHUNK):
                chunk = wanted[start:start + LOOKUP_CHUNK]
                rows = self._db.execute(
                    f"SELECT subject, datasets FROM consents WHERE consumer=? AND scenario=? AND withdrawn=0 "
                    f"AND nbf<=? AND exp>? AND separate>=? AND subject IN ({','.join('?' * len(chunk))})",
                    (consumer, scenario, int(now), int(now), int(separate), *chunk))
                found.update(subject for subject, datasets in rows if needle in datasets)
        return found

    def consents_of(self, subject: bytes) -> Iterator[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT cid, consumer, scenario, datasets, nbf, exp, separate, withdrawn, batch "
                                    "FROM consents WHERE subject=? ORDER BY cid", (subject,)).fetchall()
        for cid, consumer, scenario, datasets, nbf, exp, separate, withdrawn, batch in rows:
            yield {"cid": cid, "consumer": consumer, "scenario": scenario, "datasets": datasets.strip(",").split(","),
                   "nbf": nbf, "exp": exp, "separate": bool(separate), "withdrawn": bool(withdrawn), "batch": batch}

    def close(self) -> None:
        self._db.close()


class RegistryView:
    """The registry as the consent stage sees it: its age looked at most once a second."""

    CHECK_INTERVAL = 1.0

    def __init__(self, registry: ConsentRegistry, max_age: float):
        self.registry = registry
        self.max_age = max_age
        self._issued: int | None = None
        self._checked = float("-inf")

    def age(self, now: float) -> float | None:
        if time.monotonic() - self._checked >= self.CHECK_INTERVAL:
            self._checked = time.monotonic()
            self._issued = self.registry.issued()
        return None if self._issued is None else now - self._issued

    def fresh(self, now: float) -> bool:
        age = self.age(now)  # negative: issued in the future (a clock too far ahead), not trusted
        return age is not None and -CLOCK_SKEW <= age <= self.max_age
