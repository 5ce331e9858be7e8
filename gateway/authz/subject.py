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
import hashlib
import os
import re
import unicodedata
from collections.abc import Callable
from pathlib import Path

import numpy
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
ID_FORM = re.compile(r"[0-9]{17}[0-9X]|[0-9]{15}")  # an ID number already in normal form
ID_FORMS = re.compile(rf"(?:{ID_FORM.pattern})(?:\n(?:{ID_FORM.pattern}))*")  # such, one a line


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
    if type(value) is str and ID_FORM.fullmatch(value):
        return value
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
        self._subject_mac = self._mac(b"subject\0")
        self._token_mac = self._mac(b"token\0")

    def key(self, id_number: object) -> bytes | None:
        """The subject key of an ID number, or None when it is not one."""
        text = normal_id(id_number)
        return None if text is None else self._subject_mac(text.encode())

    def keys(self, values: list) -> list[bytes | None]:
        """The subject keys of many values (a response's subject fields): when all are ID numbers in normal
        form (checked at once), one HMAC per distinct number, else `key` value by value."""
        try:
            joined = "\n".join(values)
        except TypeError:  # a value that is not a string
            joined = None
        if joined is None or joined.count("\n") != len(values) - 1 or not ID_FORMS.fullmatch(joined):
            return [self.key(value) for value in values]
        if len(set(values)) == len(values):  # (a response's subjects usually are all different)
            return list(map(self._subject_mac, joined.encode().split(b"\n")))
        distinct = set(values)
        keys = dict(zip(distinct, map(self._subject_mac, map(str.encode, distinct))))
        return list(map(keys.__getitem__, values))

    def key_check(self) -> str:
        """A short fingerprint of the secret and algorithm: a batch made with another secret is refused."""
        return self._mac(f"key-check\0{self.algorithm}".encode())(b"").hex()[:16]

    def token(self, field: str, value: str) -> str:
        digest = self._token_mac(field.encode() + b"\0" + value.encode())
        return "tk_" + base64.b32encode(digest[:15]).decode().lower()

    def _mac(self, prefix: bytes) -> Callable[[bytes], bytes]:
        """HMAC of prefix + message: the state after the secret and prefix is made once and copied per
        message (a third of the cost of keying HMAC each time, which a response's thousands of subjects pay)."""
        if self.algorithm == "hmac-sm3":
            sm3 = crypto_hmac.HMAC(self._secret, hashes.SM3())
            sm3.update(prefix)

            def mac_sm3(message: bytes) -> bytes:
                copy = sm3.copy()
                copy.update(message)
                return copy.finalize()
            return mac_sm3
        # RFC 2104 from two hashlib states copied per message: the hmac module's copy() costs twice this.
        key = self._secret if len(self._secret) <= 64 else hashlib.sha256(self._secret).digest()
        inner = hashlib.sha256(bytes(b ^ 0x36 for b in key.ljust(64, b"\0")) + prefix)
        outer = hashlib.sha256(bytes(b ^ 0x5C for b in key.ljust(64, b"\0")))

        def mac_sha256(message: bytes) -> bytes:
            copy = inner.copy()
            copy.update(message)
            digest = outer.copy()
            digest.update(copy.digest())
            return digest.digest()
        return mac_sha256


# ---- masks ---------------------------------------------------------------------------------------


# A shape mask takes a field's value: a string, or a number masked as its digits (a mobile sent as
# 13912345678); anything else (objects, lists, true, false, null) is dropped.

def _text(value: object) -> str | None:
    if type(value) is str:
        return value
    return str(value) if type(value) is int else None  # bool is not int here


def _keep_ends(first: int, last: int, squeeze: str = "") -> Callable[[object], object]:
    """A mask keeping the first and last characters (after removing `squeeze`), starring the middle."""
    def mask(value: object) -> object:
        text = value if type(value) is str else _text(value)
        if text is None:
            return DROP
        if squeeze:
            text = text.replace(squeeze, "")
        middle = len(text) - first - last
        return text[:first] + "*" * middle + text[-last:] if middle > 0 else "*" * len(text)
    return mask


# (first, last, squeeze) of the masks keeping both ends
KEEP_ENDS = {"id": (6, 4, ""),           # 520602********123X
             "mobile": (3, 4, ""),       # 139****5678
             "bank-card": (6, 4, " ")}   # 622848******1234
mask_id, mask_mobile, mask_bank_card = (_keep_ends(*KEEP_ENDS[mask]) for mask in ("id", "mobile", "bank-card"))


def mask_name(value: object) -> object:
    text = _text(value)
    return DROP if text is None else _name_masked(text)


def _name_masked(text: str) -> str:
    """张** (the surname kept); a name of one character (王) is all surname: starred."""
    return text[:1] + "*" * (len(text) - 1) if len(text) > 1 else "*" * len(text)


def keep(value: object) -> object:
    return value


def drop(value: object) -> object:
    return DROP


def masker(mask: str, field: str, hasher: SubjectHasher) -> Callable[[object], object]:
    """The function one field's values go through in a record without consent; DROP removes it (`keep`
    and `drop` are these functions themselves, so a caller can skip the call)."""
    if mask == "keep":
        return keep
    if mask == "drop":
        return drop
    if mask == "token":
        return lambda value: hasher.token(field, str(value)) if isinstance(value, (str, int)) else DROP
    return {"id": mask_id, "mobile": mask_mobile, "bank-card": mask_bank_card, "name": mask_name}[mask]


def column_masker(mask: str, field: str, hasher: SubjectHasher) -> Callable[[list], list]:
    """What `masker` makes of each value, made of a whole column (one field of many records) at once."""
    one = masker(mask, field, hasher)
    if mask in KEEP_ENDS:
        first, last, squeeze = KEEP_ENDS[mask]
        return lambda values: _fixed_width_masked(values, first, last, squeeze) or list(map(one, values))
    if mask == "name":
        return _names_masked
    return lambda values: list(map(one, values))


def _names_masked(values: list) -> list:
    """`mask_name` of each value: of strings in one step each (a call per value costs twice this)."""
    if set(map(type, values)) != {str}:
        return list(map(mask_name, values))
    return [text[:1] + "*" * (len(text) - 1) if len(text) > 1 else "*" * len(text) for text in values]


def _fixed_width_masked(values: list, first: int, last: int, squeeze: str) -> list[str] | None:
    """`values` with the middle starred as one array, when they are ASCII strings of one width longer than
    the ends kept (an export's ID numbers, mobiles, cards); None for anything else."""
    try:
        joined = "\n".join(values)
    except TypeError:  # a value that is not a string
        return None
    width = len(values[0]) if values else 0
    if (width <= first + last or not joined.isascii() or joined.count("\n") != len(values) - 1
            or (squeeze and squeeze in joined) or set(map(len, values)) != {width}):
        return None
    rows = numpy.frombuffer((joined + "\n").encode(), numpy.uint8).reshape(len(values), width + 1).copy()
    rows[:, first:width - last] = ord("*")
    return rows.tobytes().decode().split("\n")[:-1]
