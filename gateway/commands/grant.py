"""The authorities' offline tools and the catalogue's explainer:

  gateway key generate --kid KID --out PREFIX       PREFIX.key (0600) and PREFIX.pub, Ed25519 JWK
  gateway grant request CLAIMS.yaml -o DRAFT        an unsigned grant from a consumer's request
  gateway grant sign FILE --key KEY --role ROLE     add one authority's signature
  gateway grant inspect FILE [-c CONFIG]            claims, signers, what is missing, the verdict
  gateway grant revoke [JTI ...] --list FILE --key KEY   add to (or re-issue) the bureau-signed list
  gateway licence issue --sub OPERATOR --scenario S --key KEY -o FILE
  gateway catalog explain URL [-X METHOD] [-c CONFIG]

None of them touches the network; keys never leave their files.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from gateway.authz import claims as claim_checks
from gateway.authz.claims import ClaimsError, utc
from gateway.authz.jose import (
    DEFAULT_ALGORITHM,
    ROLES,
    DocumentError,
    add_signature,
    claims_of,
    draft,
    generate_key,
    header,
    load_private_key,
    parse,
    public_authority,
    verify,
)
from gateway.config.load import DEFAULT_CONFIG, ConfigError, load_config
from gateway.config.zones import ipv4_spelled_otherwise
from gateway.yamlnodes import parse_duration


def register(subparsers: argparse._SubParsersAction) -> None:
    key = subparsers.add_parser("key", help="signing keys of the data authorities")
    key_commands = key.add_subparsers(dest="key_command", required=True, metavar="SUBCOMMAND")
    generate = key_commands.add_parser("generate", help="a new Ed25519 key pair: PREFIX.key (0600), PREFIX.pub")
    generate.add_argument("--kid", required=True, help="the key's id, as signatures and the configuration name it")
    generate.add_argument("--out", type=Path, required=True, help="path prefix of the two files")
    generate.set_defaults(func=_key_generate)

    grant = subparsers.add_parser("grant", help="data grants: request, sign, inspect, revoke")
    grant_commands = grant.add_subparsers(dest="grant_command", required=True, metavar="SUBCOMMAND")
    request = grant_commands.add_parser("request", help="an unsigned grant from a YAML or JSON file of claims")
    request.add_argument("claims", type=Path)
    request.add_argument("--valid-for", default="30d", help="exp - nbf when the claims give no exp (default 30d)")
    request.add_argument("-o", "--output", type=Path, required=True)
    request.set_defaults(func=_grant_request)

    sign = grant_commands.add_parser("sign", help="add this authority's signature (the file is rewritten)")
    sign.add_argument("file", type=Path)
    sign.add_argument("--key", type=Path, required=True, help="the authority's private key file (0600)")
    sign.add_argument("--role", required=True, choices=ROLES)
    sign.add_argument("-o", "--output", type=Path, help="write here instead of rewriting FILE")
    _authorities_arg(sign)
    sign.set_defaults(func=_grant_sign)

    inspect = grant_commands.add_parser("inspect", help="claims, signers, what is missing and the verdict; "
                                                        "exit 0 when valid")
    inspect.add_argument("file", type=Path)
    _config_arg(inspect)
    inspect.add_argument("--gateway", help="the gateway to judge for (default: the configuration's name)")
    inspect.add_argument("--at", help="the time to judge for (ISO 8601 or Unix seconds; default now)")
    inspect.set_defaults(func=_grant_inspect)

    revoke = grant_commands.add_parser("revoke", help="revoke grants (or licences) by id and sign the list again; "
                                                      "with no id, only re-issue it (keeps it fresh)")
    revoke.add_argument("ids", nargs="*", metavar="ID")
    revoke.add_argument("--list", type=Path, required=True, help="the revocation list file (created if absent)")
    revoke.add_argument("--key", type=Path, required=True, help="the bureau's private key file")
    revoke.add_argument("--reason", help="why (kept in the list)")
    revoke.set_defaults(func=_grant_revoke)

    licence = subparsers.add_parser("licence", help="data-operations licences (政府授信), signed by the bureau")
    licence_commands = licence.add_subparsers(dest="licence_command", required=True, metavar="SUBCOMMAND")
    issue = licence_commands.add_parser("issue", help="a licence naming an operator and its scenarios")
    issue.add_argument("--sub", required=True, help="the operator")
    issue.add_argument("--scenario", action="append", required=True, help="a scenario it may serve (repeat)")
    issue.add_argument("--lid", help="licence id (default: a new UUID)")
    issue.add_argument("--valid-for", default="365d")
    issue.add_argument("--key", type=Path, required=True, help="the bureau's private key file")
    issue.add_argument("-o", "--output", type=Path, required=True)
    _authorities_arg(issue)
    issue.set_defaults(func=_licence_issue)

    catalog = subparsers.add_parser("catalog", help="the data catalogue")
    catalog_commands = catalog.add_subparsers(dest="catalog_command", required=True, metavar="SUBCOMMAND")
    explain = catalog_commands.add_parser("explain", help="which dataset and class a URL falls in, and why")
    explain.add_argument("url")
    explain.add_argument("-X", "--method", default="GET")
    _config_arg(explain)
    explain.set_defaults(func=_catalog_explain)


def _config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--frontend", metavar="NAME")


def _authorities_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", type=Path, default=DEFAULT_CONFIG,
                        help="a gateway configuration whose authz.authorities the key is checked against, when it "
                             f"has them (default {DEFAULT_CONFIG})")


def _role_problem(args: argparse.Namespace, kid: str, role: str) -> str | None:
    """Why the gateway of `args.config` would not take this key's signature in this role; None when it
    would, or when there is no such gateway here (an authority's own machine signs offline)."""
    try:
        authz = load_config(args.config).authz
    except ConfigError:
        return None
    if authz is None:
        return None
    listed = authz.authorities.get(kid)
    if listed is None:
        return f"key {kid} is not among the authorities of {args.config}: that gateway refuses its signature"
    if listed.role != role:
        return f"key {kid} signs as {listed.role} for {args.config}, not as {role}: that gateway refuses it"
    return None


def _fail(message: str, status: int = 2) -> int:
    print(f"gateway: {message}", file=sys.stderr)
    return status


def _write(path: Path, document: dict[str, Any]) -> None:
    """One line of JSON: what a client puts in its X-Data-Grant header as it is."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(document, separators=(",", ":")) + "\n")
    temporary.replace(path)


def _read_document(path: Path) -> dict[str, Any]:
    return parse(path.read_bytes().strip())


def _when(text: str | None) -> float:
    if text is None:
        return time.time()
    if text.isdigit():
        return float(text)
    return datetime.fromisoformat(text).timestamp()


# ---- keys -------------------------------------------------------------------------------------


def _key_generate(args: argparse.Namespace) -> int:
    private, public = Path(f"{args.out}.key"), Path(f"{args.out}.pub")
    try:
        generate_key(args.kid, private, public)
    except FileExistsError:
        return _fail(f"{private} exists: a key is never overwritten")
    print(f"private key: {private} (0600, keep it offline)\npublic key: {public} (list it where its role is "
          "configured: authz.authorities, or authz.consent.platform.key for the data-subject platform)")
    return 0


# ---- grants -----------------------------------------------------------------------------------


def _grant_request(args: argparse.Namespace) -> int:
    try:
        claims = yaml.safe_load(args.claims.read_text(encoding="utf-8"))
        if not isinstance(claims, dict):
            raise ClaimsError("expected a mapping of claims")
        now = int(time.time())
        claims.setdefault("ver", claim_checks.VERSION)
        claims.setdefault("jti", str(uuid.uuid4()))
        claims.setdefault("iat", now)
        claims.setdefault("nbf", now)
        claims.setdefault("exp", int(claims["nbf"] + parse_duration(args.valid_for)))
        claim_checks.grant(claims)
    except (OSError, yaml.YAMLError, ClaimsError, ValueError, TypeError) as e:
        return _fail(f"{args.claims}: {e}")
    _write(args.output, draft(claims))
    print(f"grant {claims['jti']} drafted in {args.output}: now each required authority signs it")
    return 0


def _grant_sign(args: argparse.Namespace) -> int:
    try:
        key = load_private_key(args.key)
        document = _read_document(args.file)
        claims = claims_of(document)
        if "jti" in claims:
            claim_checks.grant(claims)
        if problem := _role_problem(args, key.kid, args.role):
            return _fail(f"{args.file}: not signed: {problem}")
        signed = add_signature(document, key, args.role)
    except (OSError, ValueError, DocumentError, ClaimsError) as e:
        return _fail(f"{args.file}: {e}")
    _write(args.output or args.file, signed)
    print(f"signed as {args.role} with key {key.kid}: {len(signed['signatures'])} signature(s)")
    return 0


def _grant_inspect(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config, args.frontend)
    except ConfigError as e:
        return _fail("\n".join(e.errors))
    if config.authz is None:
        return _fail(f"{config.source}: no authz section")
    settings = config.authz
    try:
        document = _read_document(args.file)
        claims = claims_of(document)
        at = _when(args.at)
    except (OSError, ValueError, DocumentError) as e:
        return _fail(f"{args.file}: {e}")
    problems: list[str] = []
    print(json.dumps(claims, ensure_ascii=False, indent=2))
    print("signatures:")
    for index, signature in enumerate(document["signatures"]):
        protected = header(signature)
        authority = settings.authorities.get(protected.get("kid"))
        single = {"payload": document["payload"], "signatures": [signature]}
        try:
            verify(single, settings.authorities, settings.algorithms)
            state = "valid"
        except DocumentError as e:
            state, _ = f"INVALID: {e.detail}", problems.append(f"signature {index}: {e.detail}")
        who = f"{authority.name} ({authority.role}{', ' + authority.org if authority.org else ''})" \
            if authority else "unknown key"
        print(f"  [{index}] kid={protected.get('kid')} role={protected.get('role')} alg={protected.get('alg')}: "
              f"{who}: {state}")
    try:
        grant = claim_checks.grant(claims)
    except ClaimsError as e:
        problems.append(f"claims: {e}")
        grant = None
    if grant is not None:
        signed = {(a.role, a.org) for s in document["signatures"]
                  if (a := settings.authorities.get(header(s).get("kid")))}
        for dataset_id in grant.datasets:
            dataset = settings.catalog.get(dataset_id)
            if dataset is None:
                problems.append(f"dataset {dataset_id}: not in the catalogue")
                continue
            missing = sorted(dataset.required_roles() - signed, key=str)
            print(f"dataset {dataset_id} ({dataset.cls}): " + (
                f"still missing: {', '.join(r + (f' ({o})' if o else '') for r, o in missing)}" if missing
                else "signed by every authority it needs"))
            if missing:
                problems.append(f"dataset {dataset_id}: signatures missing")
            if grant.exp - grant.nbf > settings.max_lifetime[dataset.cls]:
                problems.append(f"dataset {dataset_id}: lifetime longer than the {dataset.cls} maximum")
        gateway_name = args.gateway or config.name
        if gateway_name not in grant.aud:
            problems.append(f"not valid on gateway {gateway_name} (aud: {', '.join(grant.aud)})")
        if not grant.nbf <= at < grant.exp:
            problems.append(f"not valid at {utc(at)} (valid {utc(grant.nbf)} to {utc(grant.exp)})")
        if _revoked(settings, grant.jti):
            problems.append(f"revoked ({settings.revocation_file})")
    verdict = "VALID" if not problems else "NOT VALID"
    print(f"verdict for gateway {args.gateway or config.name} at {utc(at)}: {verdict}")
    for problem in problems:
        print(f"  - {problem}")
    return 0 if not problems else 1


def _revoked(settings, jti: str) -> bool:
    from gateway.authz.revocation import read_revocation_list

    try:
        revocations = read_revocation_list(settings.revocation_file.read_bytes(), settings.authorities,
                                           settings.algorithms)
    except (OSError, DocumentError, ClaimsError):
        return False
    return jti in revocations.revoked


def _grant_revoke(args: argparse.Namespace) -> int:
    try:
        key = load_private_key(args.key)
        entries: list[dict[str, Any]] = []
        if args.list.exists():
            # Only a list this key signed is extended: nobody can slip in a list without earlier revocations.
            current, _ = verify(_read_document(args.list), {key.kid: public_authority(key, "bureau")},
                                (DEFAULT_ALGORITHM,))
            entries = list(claim_checks.revocation_list(current) and current["revoked"])
    except (OSError, ValueError, DocumentError, ClaimsError) as e:
        return _fail(f"{args.list}: {e}")
    now = int(time.time())
    known = {entry["id"] for entry in entries}
    for identifier in args.ids:
        if identifier not in known:
            entries.append({"id": identifier, "at": now, **({"reason": args.reason} if args.reason else {})})
    claims = {"ver": claim_checks.VERSION, "iat": now, "revoked": entries}
    _write(args.list, add_signature(draft(claims), key, "bureau"))
    print(f"{args.list}: {len(entries)} revoked, issued {utc(now)}")
    return 0


def _licence_issue(args: argparse.Namespace) -> int:
    try:
        key = load_private_key(args.key)
        now = int(time.time())
        claims = {"ver": claim_checks.VERSION, "lid": args.lid or str(uuid.uuid4()), "sub": args.sub,
                  "scenarios": args.scenario, "iat": now, "nbf": now, "exp": int(now + parse_duration(args.valid_for))}
        claim_checks.licence(claims)
        if problem := _role_problem(args, key.kid, "bureau"):
            return _fail(f"licence not issued: {problem}")
        _write(args.output, add_signature(draft(claims), key, "bureau"))
    except (OSError, ValueError, ClaimsError) as e:
        return _fail(str(e))
    print(f"licence {claims['lid']} for {args.sub} ({', '.join(args.scenario)}) in {args.output}")
    return 0


# ---- catalogue --------------------------------------------------------------------------------


def _catalog_explain(args: argparse.Namespace) -> int:
    from urllib.parse import urlsplit

    try:
        config = load_config(args.config, args.frontend)
    except ConfigError as e:
        return _fail("\n".join(e.errors))
    parts = urlsplit(args.url)
    if not parts.hostname:
        return _fail(f"'{args.url}' is not an absolute URL")
    if ipv4_spelled_otherwise(parts.hostname):
        print(f"{args.method} {args.url}: REFUSED (host_not_canonical): {parts.hostname} is an IPv4 address "
              "written otherwise than as four decimal octets; the gateway refuses it whatever the catalogue says")
        return 1
    if config.authz is None:
        print(f"no catalogue configured ({config.source} has no authz section): the zone policy alone decides")
        return 0
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    route = config.authz.catalog.route(parts.hostname, parts.hostname, args.method, path or "/")
    if route is None:
        print(f"{args.method} {args.url}: no dataset of {config.authz.catalog.source} is served by this host "
              "(names resolve at the gateway: check its address too): the zone policy alone decides")
        return 0
    if route.refusal is not None:
        print(f"{args.method} {args.url}: REFUSED ({route.refusal[0]}): {route.refusal[1]}")
        return 1
    match = route.match
    if match is None:
        print(f"{args.method} {args.url}: listed under 'uncatalogued' in {config.authz.catalog.source}: "
              "the zone policy alone decides")
        return 0
    dataset = match.dataset
    print(f"{args.method} {args.url}\n  dataset: {dataset.id} {dataset.title}\n  class: {dataset.cls}\n"
          f"  sector: {dataset.sector}, provider: {dataset.provider}\n"
          f"  matched: host in {list(dataset.hosts)}, {match.kind} {match.endpoint.where} "
          f"method {args.method} path {match.path} ~ {match.pattern}")
    if not match.method_listed:
        print(f"  REFUSED (grant_scope): the endpoint does not list {args.method}")
        return 1
    if dataset.cls == "open":
        print("  needs: nothing beyond the zone policy (open data)")
    elif dataset.cls == "contract" and match.kind == "endpoint":
        print("  needs: nothing can: raw data of a contract dataset never leaves; only its products do")
        return 1
    else:
        roles = ", ".join(r + (f" ({o})" if o else "") for r, o in sorted(dataset.required_roles(), key=str))
        print(f"  needs: a grant (X-Data-Grant) signed by {roles}, and the operator's licence")
    return 0
