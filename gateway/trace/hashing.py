"""Incremental body hashers for trace records: SHA-256, or SM3 where national algorithms apply."""

import hashlib

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes


class BodyHasher:
    """hashlib-like: update(), digest(), hexdigest(), plus digest_string() -> 'sha256:HEX'."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._digest: bytes | None = None
        if name == "sha256":
            self._h = hashlib.sha256()
            self._finish = self._h.digest
        elif name == "sm3":
            try:
                self._h = hashes.Hash(hashes.SM3())
                self._finish = self._h.finalize
            except UnsupportedAlgorithm:
                raise ValueError("SM3 is not supported by this platform's cryptography/OpenSSL build") from None
        else:
            raise ValueError(f"unknown body hash {name!r}: use 'sha256' or 'sm3'")

    def update(self, data: bytes) -> None:
        if self._digest is not None:
            raise ValueError("hasher already finalised")
        self._h.update(data)

    def digest(self) -> bytes:
        if self._digest is None:
            self._digest = self._finish()
        return self._digest

    def hexdigest(self) -> str:
        return self.digest().hex()

    def digest_string(self) -> str:
        return f"{self.name}:{self.hexdigest()}"


def body_hasher(name: str) -> BodyHasher:
    return BodyHasher(name)
