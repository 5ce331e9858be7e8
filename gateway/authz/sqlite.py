"""The authorisation layer's SQLite stores (consent registry, quotas, accepted revocations): every worker
of a gateway, and the operator's commands, open the same file at once."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def open_shared(path: Path, timeout: float) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are begun explicitly, see write_transaction) on a
    WAL journal, so that readers in other processes never wait for a writer; `timeout`: how long a
    writer waits for another's lock."""
    db = sqlite3.connect(path, timeout=timeout, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    return db


@contextmanager
def write_transaction(db: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE: the write lock is taken before the block reads, so what it checks (a limit, a
    batch imported before) still holds when it writes, whatever other processes do. Committed when the
    block ends (a block that returns early having written nothing commits nothing), rolled back if
    it raises."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
