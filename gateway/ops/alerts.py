"""The alert log: one JSON line per transfer that was warned about, blocked or denied.

Alerts are for people on duty (a SIEM tails this file); the trace log is the evidence.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any


class AlertLog:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._file = path.open("a", encoding="utf-8")

    def write(self, alert: dict[str, Any]) -> None:
        line = json.dumps(alert, ensure_ascii=False, separators=(",", ":")) + "\n"
        with self._lock:
            self._file.write(line)
            self._file.flush()

    def close(self) -> None:
        self._file.close()
