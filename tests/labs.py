"""The namespace lab as a test fixture: built fresh for a module, removed after it."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from gateway.ops.lab import Lab, lab_supported


def built_lab(prefix: str) -> Iterator[Lab]:
    """Yield a freshly built lab named `prefix` + pid (so parallel runs do not collide); skip, saying
    why, where namespaces cannot be made."""
    reason = lab_supported()
    if reason:
        pytest.skip(f"namespace lab unavailable: {reason}")
    lab = Lab(prefix=f"{prefix}{os.getpid() % 100000}")
    lab.down()
    lab.up()
    try:
        yield lab
    finally:
        lab.down()
