"""Open records whose completion never came, and the completions that close them at the next start.

A forwarded transfer has an open record, durable before its first byte left, and a completion when it
ends (gateway.filters.record). The completion is missing when the process that forwarded it ended
first (killed, or its trace writer away for longer than a worker holds a completion for it). Such a
transfer stays open until the gateway starts again: then, before anything is forwarded and while no
process of the run before can still send a completion, each gets one, `decision: error`, naming
ABANDONED, with the open record's fields (who, where, what) so every reader of completions sees a
whole record. `gateway trace show --open` lists the transfers still open meanwhile.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from gateway.trace.audit import iter_entries

ABANDONED = ("abandoned: the process that forwarded it ended before its completion was durable "
             "(closed at the next start)")


def unfinished(records: Iterable[tuple[int, dict]]) -> list[tuple[int, dict]]:
    """(index, open record) of each transfer whose completion is not in the log, in log order."""
    opened: dict[Any, tuple[int, dict]] = {}
    for index, record in records:
        phase = record.get("phase")
        if phase == "open":
            opened[record.get("id")] = (index, record)
        elif phase == "done":
            opened.pop(record.get("id"), None)
    return list(opened.values())


def completions(directory: Path, size: int, time: str) -> list[dict[str, Any]]:
    """The completions closing every transfer left open in the log's first `size` records."""
    return [{**record, "time": time, "phase": "done", "status": None, "resp_bytes": None,
             "resp_digest": None, "decision": "error", "error": ABANDONED, "opened_index": index}
            for index, record in unfinished(_phased(iter_entries(directory, size)))]


def _phased(entries: Iterator[tuple[int, bytes]]) -> Iterator[tuple[int, dict]]:
    """The records with a phase (a cheap look first: most records have none); one that is not JSON
    is left to `trace verify`."""
    for index, entry in entries:
        if b'"phase"' in entry:
            try:
                yield index, json.loads(entry)
            except ValueError:
                continue


def close_abandoned(log: Any, directory: Path, time: str) -> int:
    """At a start, before anything is forwarded: append the completions through `log` (the TraceLog or
    RemoteTraceLog of the log in `directory`). Returns how many."""
    records = completions(directory, log.tree_size, time)
    for record in records:
        log.append_sync(record)
    return len(records)
