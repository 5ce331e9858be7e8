"""The data catalogue: datasets by upstream host, method and path, with their class and owners.

`config/catalog.yaml` lists datasets; a request that matches none follows the zone policy alone.
Paths are matched in normal form (percent-decoded, dot segments resolved) so that a request cannot
reach a catalogued endpoint by a spelling that its glob does not match.
"""

from __future__ import annotations

import ipaddress
import posixpath
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from pathlib import Path
from urllib.parse import unquote

from gateway.authz import CLASSES
from gateway.authz.claims import MEASURES, PERIODS, Limits
from gateway.authz.subject import MASK_BY_TAG, MASKS
from gateway.yamlnodes import ErrorSink, Node, load_document, parse_size

SENSITIVITIES = ("public", "internal", "sensitive", "personal")
PRICE_UNITS = ("request", "record", "MiB")
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
LEGAL_BASES = ("consent", "statutory", "public-interest")
UNCONSENTED = ("mask", "drop", "refuse")


@dataclass(frozen=True)
class Endpoint:
    methods: tuple[str, ...]
    paths: tuple[str, ...]  # globs over the normal-form path, e.g. /api/clinics/*
    where: str              # FILE:LINE, for `catalog explain`
    request_body: bool = False  # a granted request may carry a body (else refused: its meaning is not described)

    def matches(self, path: str) -> str | None:
        """The glob that matches the (lower-cased, normal-form) path, or None."""
        return next((p for p in self.paths if fnmatchcase(path, p.lower())), None)


@dataclass(frozen=True)
class Field:
    sensitivity: str
    tags: tuple[str, ...] = ()
    mask: str | None = None  # in a record without consent; None: from the tags and sensitivity

    def mask_for_unconsented(self) -> str:
        """Public and internal fields stay; a personal or sensitive one gets its mask, its tag's, or is dropped."""
        if self.mask is not None:
            return self.mask
        if self.sensitivity in ("public", "internal"):
            return "keep"
        return next((MASK_BY_TAG[tag] for tag in self.tags if tag in MASK_BY_TAG), "drop")


@dataclass(frozen=True)
class ConsentRule:
    """`legal_basis: consent`: each record leaves in clear only with its subject's consent."""
    subject_field: str      # the field holding the subject's ID number
    unconsented: str        # mask, drop or refuse (the whole transfer: consent_missing)
    separate: bool          # the subject's separate consent (单独同意) is needed


@dataclass(frozen=True)
class Dataset:
    id: str
    title: str
    cls: str
    sector: str
    provider: str
    hosts: tuple[str, ...]
    endpoints: tuple[Endpoint, ...]     # the raw data (of a contract dataset: never leaves)
    products: tuple[Endpoint, ...]      # a contract dataset's products of the trusted computing environment
    fields: dict[str, Field]
    field_param: str | None             # the query parameter selecting fields, e.g. `fields`
    purposes: tuple[str, ...]
    quota: Limits                       # per consumer, by default
    price: tuple[float, str, str] | None  # amount, unit, currency
    where: str
    consent: ConsentRule | None = None  # legal_basis: consent

    def required_roles(self) -> set[tuple[str, str | None]]:
        """The (role, org) pairs whose signatures a grant for this dataset needs."""
        if self.cls == "open":
            return set()
        roles = {("bureau", None), ("sector", self.sector)}
        if self.cls == "contract":
            roles.add(("provider", self.provider))
        return roles


@dataclass(frozen=True)
class Match:
    dataset: Dataset
    kind: str          # "endpoint" (raw data) or "product"
    endpoint: Endpoint
    pattern: str
    path: str          # the normal-form path matched
    normal: bool       # whether the request spelled its path in normal form
    method_listed: bool = True  # the endpoint lists the request's method (else: refused, grant_scope)


@dataclass(frozen=True)
class Route:
    """Where a request to a catalogued host falls: a dataset's endpoint, a path listed as uncatalogued
    (match and refusal None: the zone policy alone), or a refusal (reason, detail) before any grant."""
    match: Match | None = None
    refusal: tuple[str, str] | None = None


@dataclass(frozen=True)
class Uncatalogued:
    """Paths on catalogued hosts that serve no dataset and may be reached on the zone policy alone."""
    hosts: tuple[str, ...]
    paths: tuple[str, ...]


@dataclass(frozen=True)
class Catalog:
    datasets: tuple[Dataset, ...] = field(default_factory=tuple)
    source: Path | None = None
    uncatalogued: tuple[Uncatalogued, ...] = ()
    # host pattern -> the addresses it stands for: an address literal itself, a name what it resolved to
    addresses: dict[str, frozenset[str]] = field(default_factory=dict)

    def with_addresses(self, resolve: Callable[[str], Iterable[str]]) -> Catalog:
        """The catalogue with its host names' addresses (a request naming such an address, or another
        name for it, is the catalogued host's); literal addresses need no resolver."""
        addresses = dict(self.addresses)
        for pattern in {p for d in self.datasets for p in d.hosts} | {p for u in self.uncatalogued for p in u.hosts}:
            if pattern not in addresses and not any(c in pattern for c in "*?["):
                addresses[pattern] = frozenset(a for a in map(normal_address, resolve(pattern)) if a)
        return replace(self, addresses=addresses)

    def _host(self, patterns: Iterable[str], host: str, address: str | None) -> bool:
        return any(fnmatchcase(host, p) or (address is not None and address in self.addresses.get(p, ()))
                   for p in patterns)

    def route(self, host: str, address: str | None, method: str, raw_path: str) -> Route | None:
        """None when no dataset is served by this host (or its address): the zone policy alone decides."""
        host, address = host.lower().rstrip("."), normal_address(address)
        datasets = [d for d in self.datasets if self._host(d.hosts, host, address)]
        if not datasets:
            return None
        path, normal = normal_path(raw_path)
        if not normal:
            return Route(refusal=("path_not_normal", "on a catalogued host the path must be in normal form: no "
                                  "%-escapes, dot segments, doubled slashes, ;parameters or backslashes"))
        lowered = path.lower()
        for dataset in datasets:
            for kind, endpoints in (("product", dataset.products), ("endpoint", dataset.endpoints)):
                for endpoint in endpoints:
                    if (pattern := endpoint.matches(lowered)) is not None:
                        return Route(Match(dataset, kind, endpoint, pattern, path, normal,
                                           method in endpoint.methods))
        if any(self._host(u.hosts, host, address) and any(fnmatchcase(lowered, p.lower()) for p in u.paths)
               for u in self.uncatalogued):
            return Route()
        return Route(refusal=("uncatalogued", f"{path} on {host}, a host serving catalogued datasets, is "
                              "neither a dataset's endpoint nor listed under 'uncatalogued'"))

    def match(self, host: str, method: str, raw_path: str, address: str | None = None) -> Match | None:
        route = self.route(host, address, method, raw_path)
        return route.match if route is not None else None

    def get(self, dataset_id: str) -> Dataset | None:
        return next((d for d in self.datasets if d.id == dataset_id), None)


def normal_address(address: str | None) -> str | None:
    """An IP address as compared: IPv4-mapped IPv6 as IPv4; None for anything that is not an address."""
    try:
        ip = ipaddress.ip_address((address or "").strip("[]"))
    except ValueError:
        return None
    return str(ip.ipv4_mapped if ip.version == 6 and ip.ipv4_mapped else ip)


def normal_path(raw_path: str) -> tuple[str, bool]:
    """The path without its query, percent-decoded, `;parameters` removed from each segment, dot segments
    and doubled slashes resolved, and whether the request already spelled it so (one that did not, or
    holds a backslash, is refused on a catalogued host)."""
    path = raw_path.split("?", 1)[0] or "/"
    decoded = "/".join(segment.split(";", 1)[0] for segment in unquote(path).split("/"))
    resolved = posixpath.normpath(decoded) if decoded.startswith("/") else "/" + decoded
    resolved = "/" + resolved.lstrip("/")
    if decoded.endswith("/") and resolved != "/":
        resolved += "/"
    return resolved, resolved == path and "\\" not in path


def load_catalog(file: Path, sink: ErrorSink) -> Catalog:
    root = load_document(file, sink)
    if root is None:
        return Catalog((), file)
    top = root.mapping({"datasets", "uncatalogued"}, {"datasets"}) or {}
    datasets: list[Dataset] = []
    for item in top["datasets"].items() if "datasets" in top else ():
        dataset = _dataset(item)
        if dataset is None:
            continue
        if any(d.id == dataset.id for d in datasets):
            item.error(f"duplicate dataset id '{dataset.id}'")
        datasets.append(dataset)
    uncatalogued = tuple(_uncatalogued(item) for item in top["uncatalogued"].items()) if "uncatalogued" in top else ()
    addresses = {p: frozenset({a}) for d in datasets for p in d.hosts if (a := normal_address(p))}
    addresses.update({p: frozenset({a}) for u in uncatalogued for p in u.hosts if (a := normal_address(p))})
    return Catalog(tuple(datasets), file, uncatalogued, addresses)


def _uncatalogued(node: Node) -> Uncatalogued:
    e = node.mapping({"hosts", "paths"}, {"hosts", "paths"}) or {}
    hosts = tuple(h.lower() for i in e["hosts"].items() if (h := i.string())) if "hosts" in e else ()
    paths = tuple(p for i in e["paths"].items() if (p := i.string())) if "paths" in e else ()
    for path, path_node in zip(paths, e["paths"].items() if "paths" in e else ()):
        _check_glob(path, path_node)
    return Uncatalogued(hosts, paths)


def _check_glob(path: str, node: Node) -> None:
    if not path.startswith("/") or normal_path(path.replace("*", "x"))[0] != path.replace("*", "x"):
        node.error(f"'{path}' must be an absolute path in normal form (no '..', '//' or %-escapes)")


DATASET_KEYS = {"id", "title", "class", "sector", "provider", "hosts", "endpoints", "products", "fields",
                "field_param", "purposes", "quota", "price", "legal_basis", "consent"}


def _dataset(node: Node) -> Dataset | None:
    errors_before = len(node.sink.errors)
    e = node.mapping(DATASET_KEYS, {"id", "class", "sector", "provider", "hosts", "endpoints"}) or {}
    text = lambda key: e[key].string() if key in e else None  # noqa: E731
    cls = e["class"].string(CLASSES) if "class" in e else None
    hosts = tuple(h.lower() for i in e["hosts"].items() if (h := i.string())) if "hosts" in e else ()
    endpoints = _endpoints(e["endpoints"]) if "endpoints" in e else ()
    products = _endpoints(e["products"]) if "products" in e else ()
    if cls == "contract" and not products:
        node.error("a contract dataset needs 'products': only they may leave, never the raw endpoints")
    if cls in ("open", "conditional") and "products" in e:
        e["products"].key_error("only a contract dataset has products")
    fields = {}
    for name, field_node in (e["fields"].mapping() or {}).items() if "fields" in e else ():
        f = field_node.mapping({"sensitivity", "tags", "mask"}, {"sensitivity"}) or {}
        sensitivity = f["sensitivity"].string(SENSITIVITIES) if "sensitivity" in f else None
        tags = tuple(t for i in f["tags"].items() if (t := i.string())) if "tags" in f else ()
        mask = f["mask"].string(MASKS) if "mask" in f else None
        fields[name] = Field(sensitivity or "", tags, mask)
    field_param = text("field_param")
    if field_param is not None and not fields:
        e["field_param"].error("a field selector needs the dataset's 'fields'")
    purposes = tuple(p for i in e["purposes"].items() if (p := i.string())) if "purposes" in e else ()
    quota = _limits(e["quota"]) if "quota" in e else {}
    price = _price(e["price"]) if "price" in e else None
    consent = _consent_rule(e, cls, fields, node)
    if len(node.sink.errors) > errors_before:
        return None
    return Dataset(id=text("id"), title=text("title") or "", cls=cls, sector=text("sector"),
                   provider=text("provider"), hosts=hosts, endpoints=endpoints, products=products,
                   fields=fields, field_param=field_param, purposes=purposes, quota=quota, price=price,
                   where=f"{node.file}:{node.line}", consent=consent)


def _consent_rule(e: dict[str, Node], cls: str | None, fields: dict[str, Field], node: Node) -> ConsentRule | None:
    basis = e["legal_basis"].string(LEGAL_BASES) if "legal_basis" in e else None
    if basis != "consent":
        if "consent" in e:
            e["consent"].key_error("'consent' settings need legal_basis: consent")
        return None
    if cls == "open":
        e["legal_basis"].error("legal_basis consent needs a conditional or contract dataset: its grant names "
                               "the consumer and scenario a consent is for")
    if "consent" not in e:
        node.error("legal_basis consent needs 'consent: {subject_field: FIELD}'")
        return None
    c = e["consent"].mapping({"subject_field", "unconsented", "separate"}, {"subject_field"}) or {}
    subject_field = c["subject_field"].string() if "subject_field" in c else None
    if subject_field is not None and subject_field not in fields:
        c["subject_field"].error(f"'{subject_field}' is not one of the dataset's fields")
    unconsented = c["unconsented"].string(UNCONSENTED) if "unconsented" in c else "mask"
    separate = c["separate"].boolean() if "separate" in c else False
    if subject_field is None or unconsented is None or separate is None:
        return None
    return ConsentRule(subject_field, unconsented, separate)


def _endpoints(node: Node) -> tuple[Endpoint, ...]:
    endpoints = []
    for item in node.items():
        e = item.mapping({"methods", "paths", "request_body"}, {"methods", "paths"}) or {}
        methods = tuple(m.upper() for i in e["methods"].items() if (m := i.string())) if "methods" in e else ()
        for method, method_node in zip(methods, e["methods"].items() if "methods" in e else ()):
            if method not in METHODS:
                method_node.error(f"'{method}' is not one of: {', '.join(METHODS)}")
        paths = tuple(p for i in e["paths"].items() if (p := i.string())) if "paths" in e else ()
        for path, path_node in zip(paths, e["paths"].items() if "paths" in e else ()):
            _check_glob(path, path_node)
        request_body = e["request_body"].boolean() if "request_body" in e else False
        endpoints.append(Endpoint(methods, paths, f"{item.file}:{item.line}", bool(request_body)))
    return tuple(endpoints)


def _limits(node: Node) -> Limits:
    limits: Limits = {}
    for measure, periods in (node.mapping(set(MEASURES)) or {}).items():
        limits[measure] = {}
        for period, value in (periods.mapping(set(PERIODS)) or {}).items():
            number = value.parsed(parse_size, "size") if measure == "bytes" else value.integer(minimum=0)
            if number is not None:
                limits[measure][period] = number
    return limits


def _price(node: Node) -> tuple[float, str, str] | None:
    e = node.mapping({"amount", "per", "currency"}, {"amount", "per"}) or {}
    amount = e["amount"].scalar() if "amount" in e else None
    if "amount" in e and (not isinstance(amount, (int, float)) or isinstance(amount, bool) or amount < 0):
        e["amount"].error("expected a number, 0 or more")
        return None
    per = e["per"].string(PRICE_UNITS) if "per" in e else None
    currency = e["currency"].string() if "currency" in e else "CNY"
    return (float(amount), per, currency) if per and currency else None
