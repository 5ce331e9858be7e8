"""The claims of grants, licences and revocation lists, checked field by field.

Unknown claims are errors (a claim the gateway does not understand must not be ignored), as are
missing mandatory ones and values of the wrong type. `ClaimsError` carries the first problem found.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

VERSION = 1
PERIODS = ("day", "month")
MEASURES = ("requests", "records", "bytes")
# Seconds the clock of a machine that issues documents (the bureau's, the data-subject platform's) may run
# ahead of this one's: a grant valid from its signing, a batch or list issued just now, is not refused for it.
CLOCK_SKEW = 300


def utc(seconds: float) -> str:
    """A document's time (Unix seconds, as claims hold it) as people read it: 2026-12-06T05:12:00Z."""
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class ClaimsError(ValueError):
    pass


@dataclass(frozen=True)
class DatasetScope:
    id: str
    methods: tuple[str, ...] | None   # None: every method the catalogue lists
    paths: tuple[str, ...] | None     # None: every path the catalogue lists (globs)
    fields: tuple[str, ...] | None    # None: every field


# limits[measure][period] -> a whole number
type Limits = dict[str, dict[str, int]]


@dataclass(frozen=True)
class Grant:
    jti: str
    sub: str
    aud: tuple[str, ...]
    datasets: dict[str, DatasetScope]
    scenario: str
    purpose: str
    approval: str
    nbf: int
    exp: int
    quota: Limits


@dataclass(frozen=True)
class Licence:
    lid: str
    sub: str
    scenarios: tuple[str, ...]
    nbf: int
    exp: int


@dataclass(frozen=True)
class RevocationList:
    iat: int
    revoked: frozenset[str]  # grant jti and licence ids


GRANT_CLAIMS = {"ver", "jti", "sub", "aud", "datasets", "scenario", "purpose", "approval", "nbf", "exp", "iat",
                "quota"}
GRANT_REQUIRED = GRANT_CLAIMS - {"iat", "quota"}


def grant(claims: dict[str, Any]) -> Grant:
    _keys("grant", claims, GRANT_CLAIMS, GRANT_REQUIRED)
    _version(claims)
    nbf, exp = _times(claims)
    datasets: dict[str, DatasetScope] = {}
    for index, entry in enumerate(_list(claims, "datasets", dict)):
        where = f"datasets[{index}]"
        _keys(where, entry, {"id", "methods", "paths", "fields"}, {"id"})
        scope = DatasetScope(_text(entry, "id", where), _strings(entry, "methods", where, upper=True),
                             _strings(entry, "paths", where), _strings(entry, "fields", where))
        if scope.id in datasets:
            raise ClaimsError(f"{where}: dataset '{scope.id}' listed twice")
        datasets[scope.id] = scope
    if not datasets:
        raise ClaimsError("datasets: at least one dataset")
    return Grant(jti=_text(claims, "jti"), sub=_text(claims, "sub"), aud=tuple(_list(claims, "aud", str)),
                 datasets=datasets, scenario=_text(claims, "scenario"), purpose=_text(claims, "purpose"),
                 approval=_text(claims, "approval"), nbf=nbf, exp=exp, quota=limits(claims.get("quota", {}), "quota"))


def licence(claims: dict[str, Any]) -> Licence:
    _keys("licence", claims, {"ver", "lid", "sub", "scenarios", "nbf", "exp", "iat"},
          {"ver", "lid", "sub", "scenarios", "nbf", "exp"})
    _version(claims)
    nbf, exp = _times(claims)
    return Licence(lid=_text(claims, "lid"), sub=_text(claims, "sub"),
                   scenarios=tuple(_list(claims, "scenarios", str)), nbf=nbf, exp=exp)


def revocation_list(claims: dict[str, Any]) -> RevocationList:
    _keys("revocation list", claims, {"ver", "iat", "revoked"}, {"ver", "iat", "revoked"})
    _version(claims)
    entries = claims["revoked"]
    if not isinstance(entries, list):
        raise ClaimsError("revoked: expected a list (empty when nothing is revoked)")
    revoked = set()
    for index, entry in enumerate(entries):
        where = f"revoked[{index}]"
        _keys(where, entry, {"id", "at", "reason"}, {"id", "at"})
        revoked.add(_text(entry, "id", where))
        _integer(entry, "at", where)
    return RevocationList(iat=_integer(claims, "iat"), revoked=frozenset(revoked))


def limits(value: Any, where: str) -> Limits:
    """`{requests|records|bytes: {day|month: N}}`."""
    if not isinstance(value, dict):
        raise ClaimsError(f"{where}: expected an object")
    _keys(where, value, set(MEASURES), set())
    result: Limits = {}
    for measure, periods in value.items():
        if not isinstance(periods, dict):
            raise ClaimsError(f"{where}.{measure}: expected an object of day/month limits")
        _keys(f"{where}.{measure}", periods, set(PERIODS), set())
        result[measure] = {period: _integer(periods, period, f"{where}.{measure}") for period in periods}
    return result


def _keys(where: str, value: dict[str, Any], allowed: set[str], required: set[str]) -> None:
    if not isinstance(value, dict):
        raise ClaimsError(f"{where}: expected an object")
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise ClaimsError(f"{where}: unknown claim(s) {', '.join(unknown)}")
    missing = sorted(required - set(value))
    if missing:
        raise ClaimsError(f"{where}: missing claim(s) {', '.join(missing)}")


def _version(claims: dict[str, Any]) -> None:
    if claims["ver"] != VERSION:
        raise ClaimsError(f"ver: unsupported version {claims['ver']!r} (this gateway reads {VERSION})")


def _times(claims: dict[str, Any]) -> tuple[int, int]:
    nbf, exp = _integer(claims, "nbf"), _integer(claims, "exp")
    if "iat" in claims:
        _integer(claims, "iat")
    if exp <= nbf:
        raise ClaimsError("exp must be after nbf")
    return nbf, exp


def _text(value: dict[str, Any], key: str, where: str = "") -> str:
    item = value.get(key)
    if not isinstance(item, str) or not item.strip():
        raise ClaimsError(f"{where + '.' if where else ''}{key}: expected a non-empty string")
    return item


def _integer(value: dict[str, Any], key: str, where: str = "") -> int:
    item = value.get(key)
    if not isinstance(item, int) or isinstance(item, bool) or item < 0:
        raise ClaimsError(f"{where + '.' if where else ''}{key}: expected a whole number")
    return item


def _list(value: dict[str, Any], key: str, kind: type) -> list:
    items = value.get(key)
    if not isinstance(items, list) or not items or not all(isinstance(i, kind) and i for i in items):
        raise ClaimsError(f"{key}: expected a non-empty list of {'strings' if kind is str else 'objects'}")
    return items


def _strings(value: dict[str, Any], key: str, where: str, upper: bool = False) -> tuple[str, ...] | None:
    if key not in value:
        return None
    items = value[key]
    if not isinstance(items, list) or not items or not all(isinstance(i, str) and i for i in items):
        raise ClaimsError(f"{where}.{key}: expected a non-empty list of strings")
    return tuple(i.upper() for i in items) if upper else tuple(items)
