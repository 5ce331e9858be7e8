"""The `authz` section of the gateway configuration, read with the same FILE:LINE errors:

    authz:
      catalog: catalog.yaml           # the data catalogue (relative to this file)
      authorities:                    # public keys the gateway trusts, each in one role
        - {name: city-bureau, role: bureau, key: keys/bureau.pub}
        - {name: health-commission, role: sector, org: health, key: keys/health.pub}
        - {name: hospital-group, role: provider, org: hospital-group, key: keys/hospital.pub}
      algorithms: [Ed25519]           # JWS algorithms accepted (allowlist)
      grants: grants                  # folder of grants installed on the gateway (X-Data-Grant-Id)
      licences: licences              # folder of operators' licences installed on the gateway
      revocation: {file: revocation.json, max_age: 1h}
      max_lifetime: {conditional: 90d, contract: 30d}
      consent:                        # data-subject consent (gateway.authz.consent), for legal_basis: consent
        platform: {name: subject-platform, key: keys/platform.pub}   # signs the consent batches
        secret: consent.secret        # 0600: the subject-key secret the platform shares
        subject_hash: hmac-sha256     # or hmac-sm3
        registry: /var/lib/gateway/authz/consent.sqlite   # default: STATE/authz/consent.sqlite
        max_age: 1d                   # older than this (newest batch's iat), consent datasets are refused
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gateway.authz.catalog import Catalog, load_catalog
from gateway.authz.jose import DEFAULT_ALGORITHM, PLATFORM_ROLE, ROLES, Authority, load_public_key
from gateway.authz.subject import SUBJECT_HASHES, SubjectHasher, load_secret
from gateway.yamlnodes import Node, parse_duration

DEFAULT_MAX_LIFETIME = {"conditional": 90 * 86400.0, "contract": 30 * 86400.0}
DEFAULT_REVOCATION_MAX_AGE = 3600.0
DEFAULT_CONSENT_MAX_AGE = 86400.0


@dataclass(frozen=True)
class ConsentSettings:
    platform: dict[str, Authority]  # the data-subject platform's key, by kid
    hasher: SubjectHasher
    registry: Path | None           # None: STATE/authz/consent.sqlite
    max_age: float

    def registry_path(self, state_dir: Path) -> Path:
        return self.registry or state_dir / "authz" / "consent.sqlite"


@dataclass(frozen=True)
class AuthzSettings:
    catalog: Catalog
    authorities: dict[str, Authority]  # by kid
    algorithms: tuple[str, ...]
    grants_dir: Path | None
    licences_dir: Path | None
    revocation_file: Path
    revocation_max_age: float
    max_lifetime: dict[str, float]  # seconds, by class
    consent: ConsentSettings | None = None


def parse_authz(node: Node) -> AuthzSettings | None:
    errors_before = len(node.sink.errors)
    e = node.mapping({"catalog", "authorities", "algorithms", "grants", "licences", "revocation", "max_lifetime",
                      "consent"},
                     {"catalog", "authorities", "revocation"}) or {}
    catalog_file = e["catalog"].path_value() if "catalog" in e else None
    catalog = load_catalog(catalog_file, node.sink) if catalog_file else Catalog()
    authorities = _authorities(e["authorities"]) if "authorities" in e else {}
    algorithms = tuple(a for i in e["algorithms"].items() if (a := i.string())) if "algorithms" in e \
        else (DEFAULT_ALGORITHM,)
    folders = {}
    for key in ("grants", "licences"):
        folders[key] = e[key].path_value() if key in e else None
        if folders[key] is not None and not folders[key].is_dir():
            e[key].error(f"no such folder: {folders[key]}")
    revocation = e["revocation"].mapping({"file", "max_age"}, {"file"}) or {} if "revocation" in e else {}
    revocation_file = revocation["file"].path_value() if "file" in revocation else None
    max_age = revocation["max_age"].parsed(parse_duration, "duration") if "max_age" in revocation \
        else DEFAULT_REVOCATION_MAX_AGE
    max_lifetime = dict(DEFAULT_MAX_LIFETIME)
    if "max_lifetime" in e:
        for cls, value in (e["max_lifetime"].mapping(set(DEFAULT_MAX_LIFETIME)) or {}).items():
            max_lifetime[cls] = value.parsed(parse_duration, "duration")
    _check_coverage(catalog, authorities, node)
    consent = _consent(e["consent"]) if "consent" in e else None
    if consent is not None and {a.key.thumbprint() for a in consent.platform.values()} & \
            {a.key.thumbprint() for a in authorities.values()}:
        e["consent"].error("the data-subject platform's key is also an authority's: one key may hold one role only")
    if consent is None and "consent" not in e:
        for dataset in catalog.datasets:
            if dataset.consent is not None:
                node.sink.errors.append(f"{dataset.where}: datasets.{dataset.id}: legal_basis consent needs "
                                        "authz.consent (the platform's key and the registry secret)")
    if len(node.sink.errors) > errors_before:
        return None
    return AuthzSettings(catalog, authorities, algorithms, folders["grants"], folders["licences"],
                         revocation_file, max_age, max_lifetime, consent)


def _consent(node: Node) -> ConsentSettings | None:
    e = node.mapping({"platform", "secret", "subject_hash", "registry", "max_age"}, {"platform", "secret"}) or {}
    platform = {}
    if "platform" in e:
        p = e["platform"].mapping({"name", "key"}, {"name", "key"}) or {}
        key_file = p["key"].path_value() if "key" in p else None
        try:
            key = load_public_key(key_file) if key_file else None
        except ValueError as error:
            p["key"].error(str(error))
            key = None
        if key is not None and "name" in p:
            platform[key.kid] = Authority(p["name"].string() or "", PLATFORM_ROLE, None, key.kid, key)
    algorithm = e["subject_hash"].string(SUBJECT_HASHES) if "subject_hash" in e else SUBJECT_HASHES[0]
    hasher = None
    secret_file = e["secret"].path_value() if "secret" in e else None
    if secret_file is not None and algorithm is not None:
        try:
            hasher = SubjectHasher(load_secret(secret_file), algorithm)
        except (OSError, ValueError) as error:
            e["secret"].error(str(error))
    registry = e["registry"].path_value() if "registry" in e else None
    max_age = e["max_age"].parsed(parse_duration, "duration") if "max_age" in e else DEFAULT_CONSENT_MAX_AGE
    if not platform or hasher is None or max_age is None:
        return None
    return ConsentSettings(platform, hasher, registry, max_age)


def _authorities(node: Node) -> dict[str, Authority]:
    """The trusted keys by kid; one key (by its RFC 7638 thumbprint, whatever kid it is listed under) in
    two places is refused: its holder would sign in two roles, a grant needing both with one signature."""
    authorities: dict[str, Authority] = {}
    thumbprints: dict[str, str] = {}
    for item in node.items():
        e = item.mapping({"name", "role", "org", "key"}, {"name", "role", "key"}) or {}
        name = e["name"].string() if "name" in e else None
        role = e["role"].string(ROLES) if "role" in e else None
        org = e["org"].string() if "org" in e else None
        if role in ("sector", "provider") and org is None:
            item.error(f"a {role} authority needs 'org' (the {role} it speaks for)")
        if role == "bureau" and org is not None:
            e["org"].key_error("the bureau speaks for no sector or provider")
        key_file = e["key"].path_value() if "key" in e else None
        key = None
        if key_file is not None:
            try:
                key = load_public_key(key_file)
            except ValueError as error:
                e["key"].error(str(error))
        if key is not None and key.kid in authorities:
            e["key"].error(f"key '{key.kid}' is listed twice")
        elif key is not None and key.thumbprint() in thumbprints:
            e["key"].error(f"the same key as '{thumbprints[key.thumbprint()]}' (listed under another kid): one "
                           "key may hold one role only")
        elif name and role and key is not None:
            thumbprints[key.thumbprint()] = key.kid
            authorities[key.kid] = Authority(name, role, org, key.kid, key)
    return authorities


def _check_coverage(catalog: Catalog, authorities: dict[str, Authority], node: Node) -> None:
    """Every role a catalogued dataset needs has a key: otherwise no grant for it could ever be valid."""
    present = {(a.role, a.org) for a in authorities.values()}
    for dataset in catalog.datasets:
        for role, org in sorted(dataset.required_roles(), key=str):
            if (role, org) not in present:
                node.sink.errors.append(f"{dataset.where}: datasets.{dataset.id}: no authority in role {role}"
                                        f"{' for ' + org if org else ''} is configured (authz.authorities)")
