"""Signing keys and multi-signature JWS documents (General JSON serialization, RFC 7515 §7.2.1).

A document is `{"payload": B64URL(claims JSON), "signatures": [{"protected": B64URL(header),
"signature": ...}, ...]}`; every protected header holds exactly `alg`, `kid` and `role`, and there is
no unprotected header. Authorities add one signature each (`add_signature`); the gateway verifies
every one against the configured public keys (`verify`). The algorithm is joserfc's registry name:
Ed25519 by default (RFC 9864); another one (SM2) is registered with `JWSRegistry.register` and listed
in `authz.algorithms`.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import KeySet, OKPKey
from joserfc.registry import HeaderParameter

from gateway.yamlnodes import private_file_problem

DEFAULT_ALGORITHM = "Ed25519"
HEADER_KEYS = frozenset({"alg", "kid", "role"})
ROLES = ("bureau", "sector", "provider")
PLATFORM_ROLE = "platform"  # the data-subject platform, signing consents (gateway.authz.consent)
MAX_DOCUMENT = 64 * 1024  # bytes of a presented document: a grant is about 2 KiB


class DocumentError(Exception):
    """A document that cannot be accepted; `kind` is "malformed" or "signature"."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


@dataclass(frozen=True)
class Authority:
    """A public key the configuration trusts, with the role it signs in (and, for a sector authority or
    a provider, which sector or provider it speaks for)."""

    name: str
    role: str
    org: str | None
    kid: str
    key: Any  # a joserfc key


@dataclass(frozen=True)
class Signer:
    kid: str
    role: str


# ---- keys --------------------------------------------------------------------------------------


def generate_key(kid: str, private_path: Path, public_path: Path) -> None:
    """An Ed25519 key pair as JWK files: the private one created 0600 (never world- or group-readable,
    not even for a moment), the public one 0644."""
    key = OKPKey.generate_key("Ed25519", parameters={"kid": kid})
    private = json.dumps(key.as_dict(private=True), indent=2) + "\n"
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(private)
    public_path.write_text(json.dumps(key.as_dict(private=False), indent=2) + "\n")


def load_private_key(path: Path) -> OKPKey:
    """A signing key file; refused when others than its owner may read it."""
    if problem := private_file_problem(path):
        raise ValueError(problem)
    key = _read_jwk(path)
    if not key.is_private:
        raise ValueError(f"{path} holds a public key, not a signing key")
    return key


def public_authority(key: OKPKey, role: str) -> Authority:
    """A signing key's public half as an authority, to check what that key signed before."""
    return Authority(key.kid, role, None, key.kid, OKPKey.import_key(key.as_dict(private=False)))


def load_public_key(path: Path) -> OKPKey:
    key = _read_jwk(path)
    if key.is_private:
        raise ValueError(f"{path} holds a private key: give the gateway the public key only")
    return key


def _read_jwk(path: Path) -> OKPKey:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        key = OKPKey.import_key(data)
    except (OSError, ValueError, JoseError) as e:
        raise ValueError(f"cannot read a JWK from {path}: {e}") from None
    if not key.kid:
        raise ValueError(f"{path}: the key has no 'kid'")
    return key


# ---- documents ---------------------------------------------------------------------------------


def _registry(algorithms: tuple[str, ...]) -> jws.JWSRegistry:
    return jws.JWSRegistry(header_registry={"role": HeaderParameter("the signer's role", "str", True)},
                           algorithms=list(algorithms))


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(text: str) -> bytes:
    if not isinstance(text, str) or not text or "=" in text:
        raise ValueError("not base64url without padding")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def draft(claims: dict[str, Any]) -> dict[str, Any]:
    """An unsigned document: the payload every signature will cover, no signature yet."""
    payload = json.dumps(claims, ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode()
    return {"payload": b64url(payload), "signatures": []}


def add_signature(document: dict[str, Any], key: OKPKey, role: str,
                  algorithm: str = DEFAULT_ALGORITHM) -> dict[str, Any]:
    """The document with one more signature, over the same payload segment."""
    if role not in (*ROLES, PLATFORM_ROLE):
        raise ValueError(f"unknown role '{role}' (roles: {', '.join((*ROLES, PLATFORM_ROLE))})")
    if any(header(s).get("kid") == key.kid for s in document["signatures"]):
        raise ValueError(f"key '{key.kid}' has already signed this document")
    payload = unb64url(document["payload"])
    member = {"protected": {"alg": algorithm, "kid": key.kid, "role": role}}
    signed = jws.serialize_json([member], payload, key, registry=_registry((algorithm,)))
    assert signed["payload"] == document["payload"]
    return {"payload": document["payload"], "signatures": [*document["signatures"], *signed["signatures"]]}


def header(signature: dict[str, Any]) -> dict[str, Any]:
    try:
        value = json.loads(unb64url(signature["protected"]), object_pairs_hook=_no_duplicates)
    except (KeyError, ValueError, TypeError):
        return {}
    return value if isinstance(value, dict) else {}


def parse(text: str | bytes) -> dict[str, Any]:
    """A document's JSON form, checked for shape only (no signature checked)."""
    if len(text) > MAX_DOCUMENT:
        raise DocumentError("malformed", f"larger than {MAX_DOCUMENT} bytes")
    try:
        document = json.loads(text, object_pairs_hook=_no_duplicates)
    except ValueError as e:
        raise DocumentError("malformed", f"not JWS JSON serialization: {e}") from None
    if not isinstance(document, dict) or set(document) != {"payload", "signatures"}:
        raise DocumentError("malformed", "expected exactly the members 'payload' and 'signatures' "
                                         "(the General JSON serialization)")
    if not isinstance(document["payload"], str) or not isinstance(document["signatures"], list):
        raise DocumentError("malformed", "'payload' must be a string and 'signatures' a list")
    for index, signature in enumerate(document["signatures"]):
        if not isinstance(signature, dict) or set(signature) != {"protected", "signature"}:
            raise DocumentError("malformed", f"signature {index}: expected exactly 'protected' and 'signature' "
                                             "(no unprotected header)")
    return document


def claims_of(document: dict[str, Any]) -> dict[str, Any]:
    try:
        claims = json.loads(unb64url(document["payload"]), object_pairs_hook=_no_duplicates)
    except ValueError as e:
        raise DocumentError("malformed", f"payload is not base64url JSON: {e}") from None
    if not isinstance(claims, dict):
        raise DocumentError("malformed", "the payload must be a JSON object")
    return claims


def verify(document: dict[str, Any], authorities: dict[str, Authority],
           algorithms: tuple[str, ...]) -> tuple[dict[str, Any], list[Authority]]:
    """The claims and the authorities whose signatures are all valid; DocumentError otherwise. Every
    signature must be valid, by a known key, in the role that key is configured for."""
    if not document["signatures"]:
        raise DocumentError("signature", "no signature")
    signers: list[Authority] = []
    for index, signature in enumerate(document["signatures"]):
        protected = header(signature)
        if set(protected) != HEADER_KEYS:
            raise DocumentError("malformed", f"signature {index}: the protected header must hold exactly "
                                             "alg, kid and role")
        if protected["alg"] not in algorithms:
            raise DocumentError("signature", f"signature {index}: algorithm '{protected['alg']}' not allowed")
        authority = authorities.get(protected["kid"]) if isinstance(protected["kid"], str) else None
        if authority is None:
            raise DocumentError("signature", f"signature {index}: unknown key '{protected['kid']}'")
        if protected["role"] != authority.role:
            raise DocumentError("signature", f"signature {index}: key '{authority.kid}' signs as "
                                             f"{authority.role}, not {protected['role']}")
        signers.append(authority)
    keys = KeySet([authority.key for authority in {a.kid: a for a in signers}.values()])
    try:
        jws.deserialize_json(document, keys, registry=_registry(algorithms))
    except JoseError as e:
        raise DocumentError("signature", f"a signature does not verify ({e.error or type(e).__name__})") from None
    except (ValueError, TypeError, KeyError) as e:
        raise DocumentError("malformed", f"cannot verify: {e}") from None
    return claims_of(document), signers


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate member name")
    return result
