"""The revocation list as one worker sees it: a bureau-signed document, re-read when its file changes.

Each worker looks at the file's identity (inode, size, mtime) at most once a second, so a revocation
written by `gateway grant revoke` reaches every worker within about a second without a restart or a
signal. A list that does not verify, is older than the newest one ever accepted, or issued in the
future (beyond CLOCK_SKEW) is ignored (and logged): the view held then ages, and once older than
`max_age` the gateway refuses conditional and contract transfers. A deleted or unreadable file leaves
no view: refused at once. The highest issue time accepted and every id ever revoked are kept in the
state folder (`state/authz/revocation.sqlite`), so an older list put back is refused after a reload,
a restart or a worker's respawn too, and a revocation is never undone by a list that omits it.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from gateway.authz import claims as claim_checks
from gateway.authz.claims import CLOCK_SKEW, ClaimsError, RevocationList
from gateway.authz.jose import Authority, DocumentError, parse, verify
from gateway.authz.sqlite import open_shared, write_transaction

log = logging.getLogger(__name__)

CHECK_INTERVAL = 1.0  # seconds between looks at the file
SCHEMA = """
CREATE TABLE IF NOT EXISTS accepted (one INTEGER PRIMARY KEY CHECK (one = 1), iat INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS revoked (id TEXT PRIMARY KEY);
"""


def read_revocation_list(text: bytes, authorities: dict[str, Authority],
                         algorithms: tuple[str, ...]) -> RevocationList:
    """A verified list: every signature valid, and one by the bureau."""
    claims, signers = verify(parse(text), authorities, algorithms)
    if not any(signer.role == "bureau" for signer in signers):
        raise DocumentError("signature", "the revocation list is not signed by the bureau")
    return claim_checks.revocation_list(claims)


class RevocationView:
    def __init__(self, path: Path, max_age: float, authorities: dict[str, Authority], algorithms: tuple[str, ...],
                 state: Path | None = None):
        self.path = path
        self.max_age = max_age
        self.authorities = authorities
        self.algorithms = algorithms
        self.current: RevocationList | None = None
        self._identity: tuple[int, int, int] | None = None
        self._checked = float("-inf")
        self._db = None
        if state is not None:
            state.parent.mkdir(parents=True, exist_ok=True)
            self._db = open_shared(state, timeout=10)
            self._db.executescript(SCHEMA)

    def _accepted(self) -> tuple[int, frozenset[str]]:
        """The highest issue time any worker accepted, and every id ever revoked (kept in the state folder)."""
        if self._db is None:
            return (self.current.iat if self.current else -1), frozenset()
        row = self._db.execute("SELECT iat FROM accepted").fetchone()
        return (row[0] if row else -1), frozenset(r[0] for r in self._db.execute("SELECT id FROM revoked"))

    def _accept(self, fresh: RevocationList) -> RevocationList:
        if self._db is None:
            return fresh
        with write_transaction(self._db):
            self._db.execute("INSERT INTO accepted VALUES (1, ?) ON CONFLICT (one) DO UPDATE SET iat=max(iat, excluded.iat)",
                             (fresh.iat,))
            self._db.executemany("INSERT OR IGNORE INTO revoked VALUES (?)", [(i,) for i in fresh.revoked])
        return RevocationList(fresh.iat, fresh.revoked | self._accepted()[1])

    def refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked < CHECK_INTERVAL:
            return
        self._checked = now
        try:
            stat = os.stat(self.path)
        except OSError as e:
            if self._identity is not None or self.current is None:
                log.error("revocation list unreadable, no view held (conditional and contract data refused): %s", e)
            self._identity, self.current = None, None
            return
        identity = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        if identity == self._identity:
            return
        self._identity = identity
        try:
            fresh = read_revocation_list(self.path.read_bytes(), self.authorities, self.algorithms)
        except (OSError, DocumentError, ClaimsError) as e:
            log.error("revocation list %s rejected, keeping the view of %s: %s", self.path,
                      self.current.iat if self.current else "none", e)
            return
        newest, _ = self._accepted()
        if fresh.iat < max(newest, self.current.iat if self.current else -1):
            # a warning: at start an error would stop the gateway, which must stay up and refuse instead
            log.warning("revocation list %s is older than one accepted before (iat %d < %d): ignored", self.path,
                      fresh.iat, newest)
            return
        if fresh.iat > time.time() + CLOCK_SKEW:
            log.warning("revocation list %s issued in the future (iat %d): ignored", self.path, fresh.iat)
            return
        self.current = self._accept(fresh)

    def age(self, now: float) -> float | None:
        """Seconds since the bureau issued the list held, or None without one."""
        return None if self.current is None else now - self.current.iat

    def fresh(self, now: float) -> bool:
        age = self.age(now)
        return age is not None and -CLOCK_SKEW <= age <= self.max_age

    def revoked(self, identifier: str) -> bool:
        return self.current is None or identifier in self.current.revoked
