"""The revocation list as one worker sees it: a bureau-signed document, re-read when its file changes.

Each worker looks at the file's identity (inode, size, mtime) at most once a second, so a revocation
written by `gateway grant revoke` reaches every worker within about a second without a restart or a
signal. A list that does not verify, or is older than the one held, is ignored (and logged): the view
held then ages, and once older than `max_age` the gateway refuses conditional and contract transfers.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from gateway.authz import claims as claim_checks
from gateway.authz.claims import ClaimsError, RevocationList
from gateway.authz.jose import Authority, DocumentError, parse, verify

log = logging.getLogger(__name__)

CHECK_INTERVAL = 1.0  # seconds between looks at the file


def read_revocation_list(text: bytes, authorities: dict[str, Authority],
                         algorithms: tuple[str, ...]) -> RevocationList:
    """A verified list: every signature valid, and one by the bureau."""
    claims, signers = verify(parse(text), authorities, algorithms)
    if not any(signer.role == "bureau" for signer in signers):
        raise DocumentError("signature", "the revocation list is not signed by the bureau")
    return claim_checks.revocation_list(claims)


class RevocationView:
    def __init__(self, path: Path, max_age: float, authorities: dict[str, Authority], algorithms: tuple[str, ...]):
        self.path = path
        self.max_age = max_age
        self.authorities = authorities
        self.algorithms = algorithms
        self.current: RevocationList | None = None
        self._identity: tuple[int, int, int] | None = None
        self._checked = float("-inf")

    def refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked < CHECK_INTERVAL:
            return
        self._checked = now
        try:
            stat = os.stat(self.path)
        except OSError as e:
            if self._identity is not None or self.current is None:
                log.error("revocation list unreadable: %s", e)
            self._identity = None
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
        if self.current is not None and fresh.iat < self.current.iat:
            log.error("revocation list %s is older than the one held (iat %d < %d): ignored", self.path,
                      fresh.iat, self.current.iat)
            return
        self.current = fresh

    def age(self, now: float) -> float | None:
        """Seconds since the bureau issued the list held, or None without one."""
        return None if self.current is None else max(0.0, now - self.current.iat)

    def fresh(self, now: float) -> bool:
        age = self.age(now)
        return age is not None and age <= self.max_age

    def revoked(self, identifier: str) -> bool:
        return self.current is None or identifier in self.current.revoked
