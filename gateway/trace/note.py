"""C2SP signed notes (Ed25519), tlog checkpoints and tlog-cosignature/v1 witness cosignatures.

Key files use the formats of Go's golang.org/x/mod/sumdb/note so that independent tools read them:
  verifier key  <name>+<8 hex key id>+<base64(type byte || 32-byte public key)>
  signer key    PRIVATE+KEY+<name>+<8 hex key id>+<base64(type byte || 32-byte seed)>
Type 0x01 signs notes (the log's checkpoints); type 0x04 makes timestamped witness cosignatures.
"""

import base64
import binascii
import os
import struct
import time
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from gateway.trace.merkle import HASH_SIZE
from gateway.yamlnodes import private_file_problem

SIG_ED25519 = 0x01
SIG_COSIGNATURE_V1 = 0x04
MAX_SIGNATURES = 32
_DASH = "\u2014 "


class NoteError(ValueError):
    """A note, checkpoint, key or signature is malformed or does not verify."""


def _key_id(name: str, sig_type: int, public: bytes) -> int:
    return int.from_bytes(sha256(name.encode() + b"\n" + bytes([sig_type]) + public).digest()[:4], "big")


def _check_name(name: str) -> None:
    if not name or any(c.isspace() or c == "+" for c in name):
        raise NoteError(f"key name {name!r} must be non-empty without spaces or '+'")


def _b64decode(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error:
        raise NoteError(f"{what} is not valid base64") from None


@dataclass(frozen=True)
class Verifier:
    name: str
    sig_type: int
    public: bytes

    @property
    def key_id(self) -> int:
        return _key_id(self.name, self.sig_type, self.public)

    def vkey(self) -> str:
        material = base64.b64encode(bytes([self.sig_type]) + self.public).decode()
        return f"{self.name}+{self.key_id:08x}+{material}"

    def _ed25519(self) -> Ed25519PublicKey:
        return Ed25519PublicKey.from_public_bytes(self.public)


def parse_vkey(text: str) -> Verifier:
    """Parse a verifier key line `name+hexid+base64`."""
    parts = text.strip().split("+", 2)  # base64 key material may itself contain '+'
    if len(parts) != 3:
        raise NoteError("verifier key must look like name+keyid+base64key")
    name, hex_id, material_b64 = parts
    _check_name(name)
    material = _b64decode(material_b64, "verifier key")
    if len(material) != 33 or material[0] not in (SIG_ED25519, SIG_COSIGNATURE_V1):
        raise NoteError("verifier key is not an Ed25519 note or cosignature key")
    verifier = Verifier(name, material[0], material[1:])
    if hex_id.lower() != f"{verifier.key_id:08x}":
        raise NoteError(f"verifier key id {hex_id} does not match the key")
    return verifier


class Signer:
    def __init__(self, name: str, sig_type: int, private: Ed25519PrivateKey) -> None:
        _check_name(name)
        self.name = name
        self.sig_type = sig_type
        self._private = private
        public = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.verifier = Verifier(name, sig_type, public)
        self._id_bytes = self.verifier.key_id.to_bytes(4, "big")

    @classmethod
    def generate(cls, name: str, sig_type: int = SIG_ED25519) -> "Signer":
        return cls(name, sig_type, Ed25519PrivateKey.generate())

    def skey(self) -> str:
        seed = self._private.private_bytes_raw()
        material = base64.b64encode(bytes([self.sig_type]) + seed).decode()
        return f"PRIVATE+KEY+{self.name}+{self.verifier.key_id:08x}+{material}"

    def sign_note(self, text: str) -> str:
        """Signature line over the note text (sig type 0x01)."""
        sig = self._private.sign(text.encode())
        return f"{_DASH}{self.name} {base64.b64encode(self._id_bytes + sig).decode()}\n"

    def cosign(self, checkpoint_text: str, timestamp: int | None = None) -> str:
        """tlog-cosignature/v1 signature line over a checkpoint body (sig type 0x04)."""
        ts = int(time.time()) if timestamp is None else timestamp
        message = f"cosignature/v1\ntime {ts}\n{checkpoint_text}".encode()
        sig = struct.pack(">Q", ts) + self._private.sign(message)
        return f"{_DASH}{self.name} {base64.b64encode(self._id_bytes + sig).decode()}\n"


def parse_skey(text: str) -> Signer:
    parts = text.strip().split("+", 4)
    if len(parts) != 5 or parts[:2] != ["PRIVATE", "KEY"]:
        raise NoteError("signer key must look like PRIVATE+KEY+name+keyid+base64key")
    name, hex_id, material_b64 = parts[2:]
    material = _b64decode(material_b64, "signer key")
    if len(material) != 33 or material[0] not in (SIG_ED25519, SIG_COSIGNATURE_V1):
        raise NoteError("signer key is not an Ed25519 key")
    signer = Signer(name, material[0], Ed25519PrivateKey.from_private_bytes(material[1:]))
    if hex_id.lower() != f"{signer.verifier.key_id:08x}":
        raise NoteError(f"signer key id {hex_id} does not match the key")
    return signer


def load_or_create_signer(path: Path, name: str, sig_type: int) -> Signer:
    """Load the signer key at `path`, or create it (mode 0600) with its .pub verifier key beside it."""
    if path.exists():
        if problem := private_file_problem(path):
            raise NoteError(problem)
        signer = parse_skey(path.read_text())
        if signer.name != name or signer.sig_type != sig_type:
            raise NoteError(f"{path}: the key is for {signer.name!r} (type {signer.sig_type}), expected "
                            f"{name!r} (type {sig_type}): a key made for another log or witness (another front "
                            "end or machine name); a gateway configuration so renamed needs a state_dir of its own")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        signer = Signer.generate(name, sig_type)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, (signer.skey() + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    pub = path.with_suffix(".pub")
    if not pub.exists() or pub.read_text().strip() != signer.verifier.vkey():
        pub.write_text(signer.verifier.vkey() + "\n")
    return signer


@dataclass
class SignatureLine:
    name: str
    key_id: int
    signature: bytes


@dataclass
class Note:
    text: str
    signatures: list[SignatureLine] = field(default_factory=list)

    def render(self, extra_lines: str = "") -> str:
        lines = "".join(f"{_DASH}{s.name} {base64.b64encode(s.key_id.to_bytes(4, 'big') + s.signature).decode()}\n"
                        for s in self.signatures)
        return f"{self.text}\n{lines}{extra_lines}"


def parse_note(data: str | bytes) -> Note:
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError:
            raise NoteError("note is not valid UTF-8") from None
    if any(ord(c) < 0x20 and c != "\n" for c in data):
        raise NoteError("note contains control characters")
    split = data.rfind("\n\n")
    if split < 0 or not data.endswith("\n"):
        raise NoteError("note has no blank line before its signatures")
    text, sig_block = data[:split + 1], data[split + 2:]
    signatures = []
    for line in sig_block[:-1].split("\n"):
        if not line.startswith(_DASH):
            raise NoteError(f"malformed signature line {line[:40]!r}")
        name, _, sig_b64 = line[len(_DASH):].partition(" ")
        _check_name(name)
        raw = _b64decode(sig_b64, "signature")
        if len(raw) < 5:
            raise NoteError("signature too short")
        signatures.append(SignatureLine(name, int.from_bytes(raw[:4], "big"), raw[4:]))
    if not signatures or len(signatures) > MAX_SIGNATURES:
        raise NoteError(f"note must carry 1 to {MAX_SIGNATURES} signatures")
    return Note(text, signatures)


def verify_signature(note: Note, verifier: Verifier) -> int | None:
    """Check the signature by `verifier` on `note`. Returns None for a note signature, the
    cosignature timestamp for a cosignature; raises NoteError if absent or invalid."""
    for sig in note.signatures:
        if sig.name != verifier.name or sig.key_id != verifier.key_id:
            continue
        try:
            if verifier.sig_type == SIG_ED25519:
                verifier._ed25519().verify(sig.signature, note.text.encode())
                return None
            if len(sig.signature) != 72:
                raise NoteError(f"cosignature by {verifier.name} has the wrong length")
            ts = struct.unpack(">Q", sig.signature[:8])[0]
            message = f"cosignature/v1\ntime {ts}\n{note.text}".encode()
            verifier._ed25519().verify(sig.signature[8:], message)
            return ts
        except InvalidSignature:
            raise NoteError(f"signature by {verifier.name} does not verify") from None
    raise NoteError(f"no signature by {verifier.name} ({verifier.key_id:08x})")


@dataclass(frozen=True)
class Checkpoint:
    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()

    def body(self) -> str:
        ext = "".join(line + "\n" for line in self.extensions)
        return f"{self.origin}\n{self.size}\n{base64.b64encode(self.root).decode()}\n{ext}"


def parse_decimal(text: str) -> int | None:
    """A size or index as C2SP notes and proofs write it: ASCII digits without a leading zero
    (str.isdigit alone takes any script's digits: "١" would read as 1); None for anything else."""
    if text.isascii() and text.isdigit() and (text == "0" or not text.startswith("0")):
        return int(text)
    return None


def parse_checkpoint_body(text: str) -> Checkpoint:
    lines = text.split("\n")
    if len(lines) < 4 or lines[-1] != "":
        raise NoteError("checkpoint body must have origin, size and root hash lines")
    origin, size_text, root_b64 = lines[:3]
    if not origin:
        raise NoteError("checkpoint origin is empty")
    size = parse_decimal(size_text)
    if size is None:
        raise NoteError(f"checkpoint size {size_text!r} is not a decimal number")
    root = _b64decode(root_b64, "checkpoint root hash")
    if len(root) != HASH_SIZE:
        raise NoteError(f"checkpoint root hash is {len(root)} bytes, expected {HASH_SIZE}")
    return Checkpoint(origin, size, root, tuple(lines[3:-1]))


def open_checkpoint(data: str | bytes, verifier: Verifier) -> tuple[Note, Checkpoint]:
    """Parse a signed checkpoint and check the log's signature and origin."""
    note = parse_note(data)
    verify_signature(note, verifier)
    checkpoint = parse_checkpoint_body(note.text)
    if checkpoint.origin != verifier.name:
        raise NoteError(f"checkpoint origin {checkpoint.origin!r} does not match key {verifier.name!r}")
    return note, checkpoint
