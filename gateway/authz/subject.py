"""Subject keys and masks: what the consent registry and the consent stage make of personal values.

A subject key is a keyed hash (HMAC-SHA256, or HMAC-SM3) of the normalised ID number, with a secret
the registry and the data-subject platform share: the registry never holds a clear number, and an ID
number (about 10^10 plausible values) cannot be found again by hashing them all without the secret.

Masks follow JR/T 0171-2020 where it gives a pattern (ID number: the first 6 and last 4 characters;
mobile: the first 3 and last 4 digits; bank card: the first 6 and last 4 digits); `token` is a keyed
tokenisation (the same value always gives the same token, so masked records stay joinable), `drop`
removes the field.
"""

from __future__ import annotations

import base64
import hmac
import os
import unicodedata
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac

SUBJECT_HASHES = ("hmac-sha256", "hmac-sm3")
MIN_SECRET = 32  # bytes
MASKS = ("keep", "id", "mobile", "bank-card", "name", "token", "drop")
# The mask a field gets from its catalogue tags when the catalogue names none (DLP type names and
# plain words); a personal or sensitive field with none of them is dropped.
MASK_BY_TAG = {"cn_id_card": "id", "id-number": "id", "cn_mobile": "mobile", "mobile": "mobile",
               "bank_card": "bank-card", "bank-card": "bank-card", "name": "name"}
DROP = object()  # a mask's answer: remove the field


def load_secret(path: Path) -> bytes:
    """The registry secret: a file only its owner may read, of at least MIN_SECRET bytes."""
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise ValueError(f"{path} is readable by others (mode {mode:04o}); chmod 600 it")
    secret = path.read_bytes().strip()
    if len(secret) < MIN_SECRET:
        raise ValueError(f"{path}: the secret must be at least {MIN_SECRET} bytes")
    return secret


def generate_secret(path: Path) -> None:
    """A new random secret, created 0600 (never overwritten)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(base64.b64encode(os.urandom(MIN_SECRET)).decode() + "\n")


def normal_id(value: object) -> str | None:
    """An ID number as it is hashed: full-width forms folded (NFKC), spaces removed, the check character
    upper-case; None for anything that is not 15 or 18 characters of digits (and a final X)."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        return None
    text = value if value.isascii() else unicodedata.normalize("NFKC", value)
    text = text.replace(" ", "").upper()
    if len(text) not in (15, 18) or not (text[:-1].isdigit() and (text[-1].isdigit() or text[-1] == "X")):
        return None
    return text


class SubjectHasher:
    def __init__(self, secret: bytes, algorithm: str = "hmac-sha256"):
        if algorithm not in SUBJECT_HASHES:
            raise ValueError(f"unknown subject hash '{algorithm}' (one of: {', '.join(SUBJECT_HASHES)})")
        self.algorithm = algorithm
        self._secret = secret
        self._mac: Callable[[bytes, bytes], bytes] = _hmac_sm3 if algorithm == "hmac-sm3" else _hmac_sha256

    def key(self, id_number: object) -> bytes | None:
        """The subject key of an ID number, or None when it is not one."""
        text = normal_id(id_number)
        return None if text is None else self._mac(self._secret, b"subject\0" + text.encode())

    def key_check(self) -> str:
        """A short fingerprint of the secret and algorithm: a batch made with another secret is refused."""
        return self._mac(self._secret, f"key-check\0{self.algorithm}".encode()).hex()[:16]

    def token(self, field: str, value: str) -> str:
        digest = self._mac(self._secret, b"token\0" + field.encode() + b"\0" + value.encode())
        return "tk_" + base64.b32encode(digest[:15]).decode().lower()


def _hmac_sha256(secret: bytes, message: bytes) -> bytes:
    return hmac.digest(secret, message, "sha256")


def _hmac_sm3(secret: bytes, message: bytes) -> bytes:
    mac = crypto_hmac.HMAC(secret, hashes.SM3())
    mac.update(message)
    return mac.finalize()


# ---- masks ---------------------------------------------------------------------------------------


def _keep_ends(text: str, first: int, last: int) -> str:
    if len(text) <= first + last:
        return "*" * len(text)
    return text[:first] + "*" * (len(text) - first - last) + text[-last:]


def mask_id(text: str) -> str:
    return _keep_ends(text, 6, 4)       # 520602********123X


def mask_mobile(text: str) -> str:
    return _keep_ends(text, 3, 4)       # 139****5678


def mask_bank_card(text: str) -> str:
    return _keep_ends(text.replace(" ", ""), 6, 4)


def mask_name(text: str) -> str:
    return text[:1] + "*" * (len(text) - 1)  # 张** (the surname kept)


def masker(mask: str, field: str, hasher: SubjectHasher) -> Callable[[object], object]:
    """The function one field's values go through in a record without consent; DROP removes it."""
    if mask == "keep":
        return lambda value: value
    if mask == "drop":
        return lambda value: DROP
    if mask == "token":
        return lambda value: hasher.token(field, str(value)) if isinstance(value, (str, int)) else DROP
    shape = {"id": mask_id, "mobile": mask_mobile, "bank-card": mask_bank_card, "name": mask_name}[mask]
    # A number (a mobile sent as 13912345678) is masked as its digits; objects and lists are dropped.
    return lambda value: shape(str(value)) if isinstance(value, (str, int)) and not isinstance(value, bool) else DROP
