"""Authorities, keys, grants and licences for the grant tests, made with the library the tools use."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

from gateway.authz.jose import add_signature, draft, generate_key, load_private_key

REPO = Path(__file__).resolve().parent.parent
CATALOG = REPO / "config" / "catalog.yaml"
GATEWAY_NAME = "frontend-local"  # the default configuration's name, which tests keep
# name -> (role, org); bureau-2 is a second bureau key (two signatures of one role count once).
AUTHORITIES = {"bureau": ("bureau", None), "bureau-2": ("bureau", None), "health": ("sector", "health"),
               "hospital": ("provider", "city-hospital")}


class Kit:
    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.keys = {}
        for name in AUTHORITIES:
            if not (root / f"{name}.key").exists():
                generate_key(f"{name}-kid", root / f"{name}.key", root / f"{name}.pub")
            self.keys[name] = load_private_key(root / f"{name}.key")
        self.revocation_file = root / "revocation.json"
        self.revoked: list[str] = []
        self.write_revocations()

    def authz_section(self, max_age: str = "1h") -> dict:
        return {
            "catalog": str(CATALOG),
            "authorities": [{"name": name, "role": role, **({"org": org} if org else {}),
                             "key": str(self.root / f"{name}.pub")} for name, (role, org) in AUTHORITIES.items()],
            "revocation": {"file": str(self.revocation_file), "max_age": max_age},
        }

    def sign(self, claims: dict, signers: list[str]) -> str:
        document = draft(claims)
        for name in signers:
            document = add_signature(document, self.keys[name], AUTHORITIES[name][0])
        return json.dumps(document, separators=(",", ":"))

    def grant_claims(self, **overrides) -> dict:
        now = int(time.time())
        claims = {"ver": 1, "jti": str(uuid.uuid4()), "sub": "operator-a", "aud": [GATEWAY_NAME],
                  "datasets": [{"id": "health.residents", "methods": ["GET"], "paths": ["/api/residents*"]}],
                  "scenario": "elderly-care", "purpose": "elderly-care-subsidy", "approval": "黔数据〔2026〕12号",
                  "nbf": now - 60, "exp": now + 86400}
        claims.update(overrides)
        return claims

    def grant(self, signers: tuple[str, ...] = ("bureau", "health"), **overrides) -> str:
        return self.sign(self.grant_claims(**overrides), list(signers))

    def licence(self, sub: str = "operator-a", scenarios: tuple[str, ...] = ("elderly-care",),
                signer: str = "bureau") -> str:
        now = int(time.time())
        return self.sign({"ver": 1, "lid": f"lic-{uuid.uuid4()}", "sub": sub, "scenarios": list(scenarios),
                          "nbf": now - 60, "exp": now + 86400 * 365}, [signer])

    def write_revocations(self, issued: int | None = None) -> None:
        now = int(time.time()) if issued is None else issued
        claims = {"ver": 1, "iat": now, "revoked": [{"id": jti, "at": now} for jti in self.revoked]}
        temporary = self.revocation_file.with_suffix(".tmp")
        temporary.write_text(self.sign(claims, ["bureau"]))
        temporary.replace(self.revocation_file)

    def revoke(self, jti: str) -> None:
        self.revoked.append(jti)
        self.write_revocations()
