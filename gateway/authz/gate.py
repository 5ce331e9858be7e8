"""The decision for one request to a catalogued dataset, with the reason when it is refused.

Order of checks (the first failure is the reason): contract raw endpoint, a method the endpoint does
not list (grant_scope, whatever the class), revocation view fresh,
grant present, well-formed and signed, the dataset among its own, signer roles, audience, time (a clock
up to CLOCK_SKEW ahead of ours may have signed it), revocation, scope, licence,
quota. Signature checks are cached by the presented document's SHA-256 (a grant is usually sent with
every request); everything that depends on time, the revocation list or usage is checked every time.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from gateway.authz import claims as claim_checks
from gateway.authz.catalog import Dataset, Match
from gateway.authz.claims import CLOCK_SKEW, ClaimsError, Grant, Licence, Limits, utc
from gateway.authz.jose import Authority, DocumentError, claims_of, parse, verify
from gateway.authz.quota import Exceeded, QuotaStore
from gateway.authz.revocation import RevocationView
from gateway.authz.settings import AuthzSettings

log = logging.getLogger(__name__)

CACHE_SIZE = 4096


@dataclass(frozen=True)
class Presented:
    """What the client sent: a grant (or an installed grant's id) and optionally its licence."""

    grant: str | None = None
    grant_id: str | None = None
    licence: str | None = None


@dataclass
class Decision:
    allowed: bool
    reason: str | None = None
    detail: str = ""
    status: int = 200
    exceeded: Exceeded | None = None
    record: dict[str, Any] = field(default_factory=dict)  # the trace record's `grant` field
    quota_scopes: dict[str, Limits] = field(default_factory=dict)  # where the response's size is counted
    fields: tuple[str, ...] | None = None  # the only fields the response may carry (None: all)
    count_records: bool = False  # the response's records must be counted (a records limit, a price per record)


@dataclass(frozen=True)
class _Verified:
    value: Any = None                  # Grant or Licence
    signers: tuple[Authority, ...] = ()
    failure: tuple[str, str] | None = None  # (kind, detail)


class Gate:
    def __init__(self, settings: AuthzSettings, gateway_name: str, quota: QuotaStore,
                 resolve: Callable[[str], Iterable[str]] = lambda name: (), state: Path | None = None):
        self.settings = settings
        self.catalog = settings.catalog.with_addresses(resolve)
        self.gateway_name = gateway_name
        self.quota = quota
        self.revocation = RevocationView(settings.revocation_file, settings.revocation_max_age,
                                         settings.authorities, settings.algorithms, state)
        self._cache: OrderedDict[tuple[str, str], _Verified] = OrderedDict()
        self.installed_grants = self._installed(settings.grants_dir, "jti")
        self.installed_licences = self._installed(settings.licences_dir, "sub")

    def decide(self, match: Match, method: str, raw_path: str, presented: Presented, now: float,
               has_body: bool = False) -> Decision:
        dataset = match.dataset
        record: dict[str, Any] = {"id": None, "hash": None, "licence": None, "dataset": dataset.id,
                                  "class": dataset.cls, "consumer": None, "scenario": None, "result": "allow"}

        def refuse(reason: str, detail: str, status: int = 403, exceeded: Exceeded | None = None) -> Decision:
            record["result"] = reason
            return Decision(False, reason, detail, status, exceeded, record)

        if dataset.cls == "contract" and match.kind == "endpoint":
            return refuse("contract_raw", f"raw endpoint of contract dataset {dataset.id}: only its products leave")
        if not match.method_listed:
            return refuse("grant_scope", f"method {method} is not one the catalogue lists for this endpoint "
                                         f"({match.endpoint.where})")
        if dataset.cls == "open":
            return Decision(True, record=record)
        self.revocation.refresh()
        if not self.revocation.fresh(now):
            age = self.revocation.age(now)
            return refuse("revocation_stale", "no valid revocation list" if age is None else
                          f"revocation list {int(age)} s old (max {int(self.settings.revocation_max_age)} s)")

        text = presented.grant
        if text is None and presented.grant_id is not None:
            text = self.installed_grants.get(presented.grant_id)
            if text is None:
                return refuse("grant_missing", f"no grant '{presented.grant_id}' installed on this gateway")
        if text is None:
            return refuse("grant_missing", f"dataset {dataset.id} is {dataset.cls}: send X-Data-Grant")
        digest = hashlib.sha256(text.encode()).hexdigest()
        record["hash"] = f"sha256:{digest}"
        verified = self._verify("grant", text, digest)
        if verified.failure is not None:
            kind, detail = verified.failure
            return refuse(f"grant_{kind}", detail)
        grant: Grant = verified.value
        record["id"], record["consumer"], record["scenario"] = grant.jti, grant.sub, grant.scenario

        if dataset.id not in grant.datasets:  # (before its signers: those another dataset needs do not matter)
            return refuse("grant_scope", f"dataset {dataset.id} is not in the grant")
        signed = {(a.role, a.org) for a in verified.signers}
        missing = sorted(dataset.required_roles() - signed, key=str)
        if missing:
            return refuse("grant_signer_missing", "not signed by " + ", ".join(
                role + (f" ({org})" if org else "") for role, org in missing))
        if self.gateway_name not in grant.aud:
            return refuse("grant_scope", f"not valid on gateway {self.gateway_name} (aud)")
        if now + CLOCK_SKEW < grant.nbf:
            return refuse("grant_expired", f"not valid before {utc(grant.nbf)}")
        if now >= grant.exp:
            return refuse("grant_expired", f"expired at {utc(grant.exp)}")
        if grant.exp - grant.nbf > self.settings.max_lifetime[dataset.cls]:
            return refuse("grant_expired", f"lifetime longer than the {dataset.cls} maximum "
                                           f"({int(self.settings.max_lifetime[dataset.cls])} s)")
        if self.revocation.revoked(grant.jti):
            return refuse("grant_revoked", f"grant {grant.jti} is revoked")
        problem = scope_problem(grant, dataset, match, method, raw_path)
        if not problem and has_body and not match.endpoint.request_body:
            problem = "a request body: the catalogue does not describe one for this endpoint (request_body)"
        if problem:
            return refuse("grant_scope", problem)

        licence_text = presented.licence or self.installed_licences.get(grant.sub)
        if licence_text is None:
            return refuse("licence_missing", f"no licence for operator {grant.sub}: send X-Data-Licence")
        licence_verified = self._verify("licence", licence_text, hashlib.sha256(licence_text.encode()).hexdigest())
        if licence_verified.failure is not None:
            return refuse("licence_invalid", licence_verified.failure[1])
        licence: Licence = licence_verified.value
        record["licence"] = licence.lid
        if problem := licence_problem(licence, licence_verified.signers, grant, now):
            return refuse("licence_invalid", problem)
        if self.revocation.revoked(licence.lid):
            return refuse("licence_invalid", f"licence {licence.lid} is revoked")

        scopes = {f"grant:{grant.jti}": grant.quota, f"consumer:{grant.sub}:dataset:{dataset.id}": dataset.quota}
        scopes = {scope: limits for scope, limits in scopes.items() if limits}
        exceeded = self.quota.take(scopes, now) if scopes else None
        if exceeded is not None:
            return refuse("grant_quota", f"{exceeded.scope}: {exceeded.measure} per {exceeded.period} "
                                         f"limit {exceeded.limit} reached", 429, exceeded)
        scope = grant.datasets[dataset.id]
        fields = scope.fields if scope.fields is not None and set(scope.fields) != set(dataset.fields) else None
        per_record = dataset.price is not None and dataset.price[1] == "record"
        return Decision(True, record=record, quota_scopes=scopes, fields=fields,
                        count_records=per_record or any("records" in limits for limits in scopes.values()))

    def refusal(self, match: Match, reason: str, detail: str) -> Decision:
        record = {"id": None, "hash": None, "licence": None, "dataset": match.dataset.id,
                  "class": match.dataset.cls, "consumer": None, "scenario": None, "result": reason}
        return Decision(False, reason, detail, 403, None, record)

    def _verify(self, kind: str, text: str, digest: str) -> _Verified:
        key = (kind, digest)
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        try:
            claims, signers = verify(parse(text), self.settings.authorities, self.settings.algorithms)
            value = claim_checks.grant(claims) if kind == "grant" else claim_checks.licence(claims)
            # counted by key (RFC 7638 thumbprint), not by the kid a signature names
            verified = _Verified(value, tuple({a.key.thumbprint(): a for a in signers}.values()))
        except DocumentError as e:
            verified = _Verified(failure=(e.kind, e.detail))
        except ClaimsError as e:
            verified = _Verified(failure=("malformed", f"claims: {e}"))
        self._cache[key] = verified
        if len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return verified

    @staticmethod
    def _installed(folder: Path | None, claim: str) -> dict[str, str]:
        """Documents installed on the gateway by one claim (unverified here: verified when used)."""
        found: dict[str, str] = {}
        for path in sorted(folder.glob("*.json")) if folder else ():
            try:
                text = path.read_text(encoding="utf-8").strip()
                value = claims_of(parse(text)).get(claim)
            except (OSError, ValueError, DocumentError) as e:
                log.error("installed document %s skipped: %s", path, e)
                continue
            if isinstance(value, str):
                found[value] = text
        return found


def scope_problem(grant: Grant, dataset: Dataset, match: Match, method: str, raw_path: str) -> str | None:
    """Why this request is outside what the grant allows for the dataset, or None."""
    scope = grant.datasets.get(dataset.id)
    if scope is None:
        return f"dataset {dataset.id} is not in the grant"
    if dataset.purposes and grant.purpose not in dataset.purposes:
        return f"purpose '{grant.purpose}' is not allowed for {dataset.id}"
    if not match.normal:
        return "path not in normal form (dot segments, doubled slashes, %-escapes or ;parameters)"
    if scope.methods is not None and method not in scope.methods:  # tokens: `get` is not GET (RFC 9110 9.1)
        return f"method {method} not granted"
    # Case-sensitive, as upstreams' paths are: /API/x is another resource than /api/x (the catalogue's
    # own match ignores case, which only refuses more).
    if scope.paths is not None and not any(fnmatchcase(match.path, p) for p in scope.paths):
        return "path not granted"
    if scope.fields is not None:
        unknown = [f for f in scope.fields if f not in dataset.fields]
        if unknown:
            return f"field(s) {', '.join(unknown)} not in the catalogue"
        if set(scope.fields) != set(dataset.fields):
            asked = _selected_fields(dataset, raw_path)
            if asked is None:
                return f"the grant covers some fields only: select them with ?{dataset.field_param or 'fields'}="
            outside = [f for f in asked if f not in scope.fields]
            if outside:
                return f"field(s) {', '.join(outside)} not granted"
    return None


def _selected_fields(dataset: Dataset, raw_path: str) -> list[str] | None:
    if dataset.field_param is None or "?" not in raw_path:
        return None
    pairs = parse_qsl(raw_path.split("?", 1)[1], keep_blank_values=True)
    if any(k != dataset.field_param and k.lower().removesuffix("[]") == dataset.field_param.lower() for k, _ in pairs):
        return None  # Fields=, fields[]=: an upstream may read them as the selector the grant did not see
    values = [v for k, v in pairs if k == dataset.field_param]
    if len(values) != 1:
        return None
    return [f.strip() for f in values[0].split(",") if f.strip()] or None


def licence_problem(licence: Licence, signers: tuple[Authority, ...], grant: Grant, now: float) -> str | None:
    if not any(signer.role == "bureau" for signer in signers):
        return "the licence is not signed by the bureau"
    if licence.sub != grant.sub:
        return f"licence {licence.lid} names operator {licence.sub}, the grant {grant.sub}"
    if grant.scenario not in licence.scenarios:
        return f"licence {licence.lid} does not cover scenario '{grant.scenario}'"
    if now + CLOCK_SKEW < licence.nbf:
        return f"licence {licence.lid} is not valid before {utc(licence.nbf)}"
    if now >= licence.exp:
        return f"licence {licence.lid} expired at {utc(licence.exp)}"
    return None
