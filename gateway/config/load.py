"""The gateway's configuration: one YAML file, or a front-end profile layered over the shared one.

`load_config` checks everything it can without touching the network and raises ConfigError listing
every problem as `FILE:LINE: key.path: message`. Unknown keys are errors: a typo must not silently
turn a rule off.

Longer than 400 lines: the schema of every section is read here, each with its own checks (files it
names are read and verified too); split per section it would scatter the one schema across modules.
"""

from __future__ import annotations

import ipaddress
import os
import re
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from gateway.authz.settings import AuthzSettings, parse_authz
from gateway.yamlnodes import (
    ConfigError,
    ErrorSink,
    Node,
    load_document,
    parse_duration,
    parse_size,
    private_file_problem,
)

__all__ = ["BasicAuth", "Config", "ConfigError", "Listener", "PolicyRule", "Zone", "load_config", "REPO_ROOT"]

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "config" / "gateway.yaml"
FRONTENDS_DIR = REPO_ROOT / "frontends"

type Network = ipaddress.IPv4Network | ipaddress.IPv6Network

ACTIONS = ("allow", "deny")
LISTENER_MODES = ("regular", "reverse")
DIGESTS = ("sha256", "sm3")
# Sections a front-end profile replaces whole, and sections it merges key by key.
REPLACED_SECTIONS = {"zones", "listeners", "policy"}
MERGED_SECTIONS = {"gateway", "dlp", "trace", "management", "alerts", "tls", "authz"}
MAX_WORKERS = 256
DEFAULT_MAX_CLIENT_CONNECTIONS = 1024
DEFAULT_INSPECTION_BUDGET = 5.0  # seconds of CPU (gateway.dlp.budget)
DEFAULT_MEMORY_BUDGET = 256 * 1024**2  # bytes of bodies held in memory per worker (gateway.transfer.memory)
MIN_MEMORY_BUDGET = 1024**2
DEFAULT_BODY_IDLE_TIMEOUT = 60.0  # seconds (nginx's client_body_timeout)
DEFAULT_TRACE_APPEND_TIMEOUT = 5.0  # seconds a record may take to be durable before its transfer is refused 503
MAX_TRACE_APPEND_TIMEOUT = 60.0  # longer and clients give up first: they must get the refusal
DEFAULT_UPSTREAM_TIMEOUT = 60.0  # seconds from a request sent to its response head (else 504)
MAX_SHUTDOWN_GRACE = 600.0  # seconds (systemd/gateway.service gives a stop 30 s: TimeoutStopSec)


@dataclass(frozen=True)
class Zone:
    name: str
    networks: tuple[Network, ...]
    interfaces: tuple[str, ...]


@dataclass(frozen=True)
class Listener:
    name: str
    mode: str
    host: str
    port: int
    upstream: str | None = None
    # PROXY protocol v2 (gateway.proxy.proxyproto): every connection must start with its header, sent by
    # a balancer whose address is in trusted_proxies; the header's source is then the client.
    proxy_protocol: bool = False
    trusted_proxies: tuple[Network, ...] = ()
    # FILE:LINE of its `listen` (a front-end profile's, when the profile sets the listeners), for messages
    # that ask an operator to correct it; not part of what the listener is.
    defined_at: str = field(default="", compare=False)

    @property
    def mitmproxy_spec(self) -> str:
        """The listener as a mitmproxy mode spec, e.g. `reverse:http://10.0.0.2:80@127.0.0.1:8081`."""
        mode = f"reverse:{self.upstream}" if self.mode == "reverse" else self.mode
        return f"{mode}@{format_host_port(self.host, self.port)}"


@dataclass(frozen=True)
class PolicyRule:
    name: str
    from_zone: str
    to_zone: str
    action: str
    hosts: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    listeners: tuple[str, ...] = ()
    request_profile: str | None = None
    response_profile: str | None = None
    where: str = ""  # FILE:LINE of the rule, for errors found later (unknown DLP profile)


@dataclass(frozen=True)
class BasicAuth:
    """HTTP basic auth on the management listener: a bcrypt hash, or a file holding the password."""

    user: str
    password_hash: str | None = None
    password_file: Path | None = None


@dataclass(frozen=True)
class Config:
    source: Path
    name: str
    state_dir: Path
    zones: tuple[Zone, ...]
    listeners: tuple[Listener, ...]
    policy_default: str
    rules: tuple[PolicyRule, ...]
    dlp_rules: Path
    spool_threshold: int
    trace_dir: Path
    trace_origin: str
    body_digest: str
    management_host: str
    management_port: int
    alerts_file: Path
    upstream_ca: Path | None
    verify_upstream: bool
    management_tls: tuple[Path, Path] | None = None  # (certificate chain, private key) files
    # The upstream CA file's content as read and checked by this load: what the engine trusts, so a
    # reload after the file changed in place trusts the new content (mitmproxy caches by path).
    upstream_ca_pem: bytes | None = None
    management_auth: BasicAuth | None = None
    workers: int = 1  # proxy worker processes sharing the listeners (see gateway.proxy.supervisor)
    request_head_timeout: float = 30.0  # seconds from a request head's first byte to its end (else 408)
    shutdown_grace: float = 10.0  # seconds a stop waits for transfers in flight (then cuts them)
    drain_delay: float = 0.0  # seconds of a stop spent not ready but still serving (behind a balancer), in the grace
    max_client_connections: int = DEFAULT_MAX_CLIENT_CONNECTIONS  # per client address (gateway.proxy.connlimit)
    authz: AuthzSettings | None = None  # data catalogue and grants (gateway.authz); None: zone policy only
    inspection_budget: float = DEFAULT_INSPECTION_BUDGET  # CPU seconds a transfer's DLP inspection may take
    memory_budget: int = DEFAULT_MEMORY_BUDGET  # bytes of bodies a worker holds in memory (more are spooled)
    body_idle_timeout: float = DEFAULT_BODY_IDLE_TIMEOUT  # seconds without a byte of a request body (then 408)
    body_timeout: float | None = None  # seconds from a request head to the end of its body (then 408); None: no limit
    trace_append_timeout: float = DEFAULT_TRACE_APPEND_TIMEOUT  # a record not durable by then: 503
    upstream_timeout: float = DEFAULT_UPSTREAM_TIMEOUT  # a response head not begun by then: 504


def load_config(path: Path | str | None = None, frontend: str | None = None) -> Config:
    """Load and check a configuration; with `frontend`, `frontends/NAME.yaml` is layered over it."""
    sink = ErrorSink()
    base_file = Path(path) if path is not None else DEFAULT_CONFIG
    base = load_document(base_file.resolve(), sink)
    sections = base.mapping(allowed=REPLACED_SECTIONS | MERGED_SECTIONS) if base else None
    if frontend is not None:
        profile_file = FRONTENDS_DIR / f"{frontend}.yaml"
        if not profile_file.is_file():
            known = sorted(p.stem for p in FRONTENDS_DIR.glob("*.yaml"))
            raise ConfigError([f"{profile_file}:0: (file): no such front-end profile "
                               f"(known: {', '.join(known) or 'none'})"])
        profile = load_document(profile_file, sink)
        overlay = profile.mapping(allowed=REPLACED_SECTIONS | MERGED_SECTIONS) if profile else None
        if sections is not None and overlay is not None:
            sections = _layer(sections, overlay)
    if sections is None:
        sink.raise_if_any()
        raise ConfigError([f"{base_file}:1: (top): no configuration"])
    config = _parse(base_file.resolve(), sections, sink)
    sink.raise_if_any()
    assert config is not None
    return config


def _layer(base: dict[str, Node], overlay: dict[str, Node]) -> dict[str, Node]:
    """Overlay replaces whole sections, except mapping sections, which merge key by key."""
    merged = dict(base)
    for key, node in overlay.items():
        if key in MERGED_SECTIONS and key in base:
            merged[key] = _MergedNode(base[key], node)
        else:
            merged[key] = node
    return merged


class _MergedNode(Node):
    """A mapping section whose entries come from two files (each entry keeps its own file and line)."""

    def __init__(self, base: Node, overlay: Node):
        super().__init__(overlay.raw, overlay.file, overlay.path, overlay.sink)
        self.base = base

    def mapping(self, allowed=None, required=frozenset()):
        lower = self.base.mapping(allowed) or {}
        upper = Node.mapping(self, allowed) or {}
        entries = {**lower, **upper}
        for key in sorted(required - entries.keys()):
            self.error(f"missing required key '{key}'")
        return entries


def _parse(source: Path, sections: dict[str, Node], sink: ErrorSink) -> Config | None:
    def section(name: str, allowed: set[str], required: set[str] = frozenset()) -> dict[str, Node]:
        node = sections.get(name)
        if node is None:
            if required:
                sink.errors.append(f"{source}:1: {name}: missing required section")
            return {}
        return node.mapping(allowed, required) or {}

    gw = section("gateway", {"name", "state_dir", "workers", "request_head_timeout", "max_client_connections",
                             "shutdown_grace", "drain_delay", "body_idle_timeout", "body_timeout", "upstream_timeout"},
                 {"name", "state_dir"})
    name = gw["name"].string() if "name" in gw else None
    state_dir = gw["state_dir"].path_value() if "state_dir" in gw else None
    workers = gw["workers"].integer(minimum=1) if "workers" in gw else default_workers()
    if workers is not None and workers > MAX_WORKERS:
        gw["workers"].error(f"at most {MAX_WORKERS} workers")
    head_timeout = gw["request_head_timeout"].parsed(parse_duration, "duration") \
        if "request_head_timeout" in gw else 30.0
    body_idle = gw["body_idle_timeout"].parsed(parse_duration, "duration") if "body_idle_timeout" in gw \
        else DEFAULT_BODY_IDLE_TIMEOUT
    body_total = gw["body_timeout"].parsed(parse_duration, "duration") if "body_timeout" in gw else None
    grace = gw["shutdown_grace"].parsed(parse_duration, "duration") if "shutdown_grace" in gw else 10.0
    if grace is not None and grace > MAX_SHUTDOWN_GRACE:
        gw["shutdown_grace"].error(f"at most {MAX_SHUTDOWN_GRACE:.0f} s (systemd's TimeoutStopSec must be longer)")
    drain_delay = gw["drain_delay"].parsed(parse_duration, "duration") if "drain_delay" in gw else 0.0
    if drain_delay is not None and grace is not None and drain_delay >= grace:
        gw["drain_delay"].error(f"must be shorter than shutdown_grace ({grace:g} s): the delay is spent within it")
    upstream_timeout = gw["upstream_timeout"].parsed(parse_duration, "duration") if "upstream_timeout" in gw \
        else DEFAULT_UPSTREAM_TIMEOUT
    client_connections = gw["max_client_connections"].integer(minimum=1) if "max_client_connections" in gw \
        else DEFAULT_MAX_CLIENT_CONNECTIONS

    zones = _zones(sections.get("zones"), sink, source)
    zone_names = {z.name for z in zones} | {"unknown"}
    listeners = _listeners(sections.get("listeners"), sink, source)
    policy_default, rules = _policy(sections.get("policy"), zone_names, {l.name for l in listeners}, sink, source)

    dlp = section("dlp", {"rules", "spool_threshold", "inspection_budget", "memory_budget"}, {"rules"})
    dlp_rules = dlp["rules"].path_value() if "rules" in dlp else None
    spool = dlp["spool_threshold"].parsed(parse_size, "size") if "spool_threshold" in dlp else 8 * 1024**2
    budget = dlp["inspection_budget"].parsed(parse_duration, "duration") if "inspection_budget" in dlp \
        else DEFAULT_INSPECTION_BUDGET
    memory = dlp["memory_budget"].parsed(parse_size, "size") if "memory_budget" in dlp else DEFAULT_MEMORY_BUDGET
    if memory is not None and memory < MIN_MEMORY_BUDGET:
        dlp["memory_budget"].error(f"at least {MIN_MEMORY_BUDGET // 1024**2} MiB")

    trace = section("trace", {"dir", "origin", "body_digest", "append_timeout"}, {"dir", "origin"})
    trace_dir = _state_path(trace.get("dir"), state_dir)
    origin = trace["origin"].string() if "origin" in trace else None
    if origin is not None and (not origin or "\n" in origin or origin != origin.strip()):
        trace["origin"].error("the origin must be one non-empty line without surrounding spaces")
    digest = trace["body_digest"].string(DIGESTS) if "body_digest" in trace else "sha256"
    append_timeout = trace["append_timeout"].parsed(parse_duration, "duration") if "append_timeout" in trace \
        else DEFAULT_TRACE_APPEND_TIMEOUT
    if append_timeout is not None and append_timeout > MAX_TRACE_APPEND_TIMEOUT:
        trace["append_timeout"].error(f"at most {MAX_TRACE_APPEND_TIMEOUT:.0f} s (clients would give up before "
                                      "their refusal)")

    management = section("management", {"listen", "tls", "basic_auth"}, {"listen"})
    mgmt = management["listen"].parsed(_host_port, "HOST:PORT address") if "listen" in management else None
    mgmt_tls = _management_tls(management["tls"]) if "tls" in management else None
    mgmt_auth = _basic_auth(management["basic_auth"]) if "basic_auth" in management else None

    alerts = section("alerts", {"file"})
    alerts_file = _state_path(alerts.get("file"), state_dir) if "file" in alerts else (
        state_dir / "alerts.jsonl" if state_dir else None)

    tls = section("tls", {"upstream_ca", "verify_upstream"})
    upstream_ca = tls["upstream_ca"].path_value() if "upstream_ca" in tls else None
    upstream_ca_pem = _ca_bundle(tls["upstream_ca"], upstream_ca) if upstream_ca is not None else None
    verify = tls["verify_upstream"].boolean() if "verify_upstream" in tls else True

    authz = parse_authz(sections["authz"]) if "authz" in sections else None

    if sink.errors:
        return None
    return Config(
        source=source, name=name, state_dir=state_dir, zones=zones, listeners=listeners,
        policy_default=policy_default, rules=rules, dlp_rules=dlp_rules, spool_threshold=spool,
        trace_dir=trace_dir, trace_origin=origin, body_digest=digest,
        management_host=mgmt[0], management_port=mgmt[1], alerts_file=alerts_file,
        upstream_ca=upstream_ca, upstream_ca_pem=upstream_ca_pem, verify_upstream=verify, management_tls=mgmt_tls,
        management_auth=mgmt_auth,
        workers=workers, request_head_timeout=head_timeout, max_client_connections=client_connections,
        shutdown_grace=grace, drain_delay=drain_delay, authz=authz,
        inspection_budget=budget, memory_budget=memory, body_idle_timeout=body_idle,
        body_timeout=body_total, trace_append_timeout=append_timeout, upstream_timeout=upstream_timeout,
    )


def default_workers() -> int:
    """One worker per core this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _state_path(node: Node | None, state_dir: Path | None) -> Path | None:
    """Paths under the state directory: relative ones are taken relative to it."""
    if node is None:
        return None
    text = node.string()
    if text is None or state_dir is None:
        return None
    return (state_dir / text).resolve()


def format_host_port(host: str, port: int) -> str:
    """`host:port`, with an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"'{text}' (expected HOST:PORT, e.g. 127.0.0.1:8080)")
    host = host.strip("[]")
    ipaddress.ip_address(host)  # listeners bind addresses, not names
    return host, int(port)


BCRYPT_HASH = re.compile(r"\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}")


def _ca_bundle(node: Node, path: Path) -> bytes | None:
    """The CA certificates (PEM) in `path`, checked to load: a file that changed into something else
    fails the load (and a reload) rather than leaving the old trust in place unnoticed."""
    try:
        pem = path.read_bytes()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(cadata=pem.decode("ascii"))
    except (UnicodeDecodeError, ssl.SSLError) as e:  # before OSError, of which SSLError is one
        node.error(f"{path} holds no PEM CA certificates: {e}")
        return None
    except OSError as e:
        node.error(f"cannot read {path}: {e.strerror or e}")
        return None
    if not sum(context.cert_store_stats().values()):
        node.error(f"{path} holds no PEM CA certificates")
        return None
    return pem


def _management_tls(node: Node) -> tuple[Path, Path] | None:
    entries = node.mapping({"cert", "key"}, {"cert", "key"}) or {}
    cert = entries["cert"].path_value() if "cert" in entries else None
    key = entries["key"].path_value() if "key" in entries else None
    if cert is None or key is None:
        return None
    if key.is_file() and (problem := private_file_problem(key)):
        entries["key"].error(problem)
        return None
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        node.error(f"cannot load certificate {cert} with key {key}: {e}")
        return None
    return cert, key


def _basic_auth(node: Node) -> BasicAuth | None:
    entries = node.mapping({"user", "password_hash", "password_file"}, {"user"}) or {}
    user = entries["user"].string() if "user" in entries else None
    if user is not None and (not user or ":" in user):
        entries["user"].error("a user name must be non-empty and without ':'")
    password_hash = entries["password_hash"].string() if "password_hash" in entries else None
    if password_hash is not None and not BCRYPT_HASH.fullmatch(password_hash):
        entries["password_hash"].error("expected a bcrypt hash ($2b$...; see docs/monitoring.md)")
    password_file = entries["password_file"].path_value() if "password_file" in entries else None
    if password_file is not None and not password_file.is_file():
        entries["password_file"].error(f"no such file: {password_file}")
    elif password_file is not None and (problem := private_file_problem(password_file)):
        entries["password_file"].error(problem)
    if ("password_hash" in entries) == ("password_file" in entries):
        node.error("give exactly one of 'password_hash' and 'password_file'")
    if not user or node.sink.errors:
        return None
    return BasicAuth(user, password_hash, password_file)


def _zones(node: Node | None, sink: ErrorSink, source: Path) -> tuple[Zone, ...]:
    if node is None:
        sink.errors.append(f"{source}:1: zones: missing required section")
        return ()
    zones = []
    for name, zone_node in (node.mapping() or {}).items():
        if name == "unknown":
            zone_node.error("'unknown' is reserved for addresses in no zone")
            continue
        entries = zone_node.mapping({"networks", "interfaces"}) or {}
        networks = tuple(n for item in entries["networks"].items()
                         if (n := item.parsed(lambda t: ipaddress.ip_network(t, strict=True), "network")))\
            if "networks" in entries else ()
        interfaces = tuple(i for item in entries["interfaces"].items() if (i := item.string()))\
            if "interfaces" in entries else ()
        if not networks and not interfaces and not sink.errors:
            zone_node.error("a zone needs networks or interfaces")
        zones.append(Zone(name, networks, interfaces))
    return tuple(zones)


def _listeners(node: Node | None, sink: ErrorSink, source: Path) -> tuple[Listener, ...]:
    if node is None:
        sink.errors.append(f"{source}:1: listeners: missing required section")
        return ()
    listeners: list[Listener] = []
    seen: set[str] = set()
    for item in node.items():
        entries = item.mapping({"name", "mode", "listen", "upstream", "proxy_protocol", "trusted_proxies"},
                               {"name", "mode", "listen"})
        if not entries:
            continue
        name = entries["name"].string() if "name" in entries else None
        mode = entries["mode"].string(LISTENER_MODES) if "mode" in entries else None
        address = entries["listen"].parsed(_host_port, "HOST:PORT address") if "listen" in entries else None
        upstream = None
        if name in seen:
            entries["name"].error(f"duplicate listener name '{name}'")
        seen.add(name)
        if mode == "reverse":
            if "upstream" not in entries:
                item.error("a reverse listener needs 'upstream' (the URL of the service it publishes)")
            else:
                upstream = entries["upstream"].parsed(_upstream_url, "upstream URL")
        elif "upstream" in entries:
            entries["upstream"].error("only reverse listeners have an upstream")
        proxy_protocol, trusted = _proxy_protocol(item, entries)
        if name and mode and address:
            listen = entries["listen"]
            listeners.append(Listener(name, mode, address[0], address[1], upstream, proxy_protocol, trusted,
                                      defined_at=f"{listen.file}:{listen.line}"))
    if not listeners and not sink.errors:
        node.error("at least one listener is needed")
    return tuple(listeners)


PROXY_PROTOCOL_VERSIONS = ("v2",)


def _proxy_protocol(item: Node, entries: dict[str, Node]) -> tuple[bool, tuple[Network, ...]]:
    """`proxy_protocol: v2` with a non-empty `trusted_proxies` list, or neither."""
    version = entries["proxy_protocol"].string(PROXY_PROTOCOL_VERSIONS) if "proxy_protocol" in entries else None
    nodes = list(entries["trusted_proxies"].items()) if "trusted_proxies" in entries else []
    trusted = tuple(n for node in nodes if (n := node.parsed(lambda t: ipaddress.ip_network(t, strict=True), "network")))
    if "proxy_protocol" in entries and "trusted_proxies" not in entries:
        item.error("a listener with proxy_protocol needs trusted_proxies (the balancers' networks)")
    elif "trusted_proxies" in entries and "proxy_protocol" not in entries:
        entries["trusted_proxies"].error("only a listener with 'proxy_protocol: v2' has trusted proxies")
    elif "trusted_proxies" in entries and not nodes:
        entries["trusted_proxies"].error("at least one network is needed (e.g. 10.0.0.5/32 for one balancer)")
    return version is not None, trusted


def _upstream_url(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"'{text}' (expected http://HOST[:PORT] or https://HOST[:PORT])")
    if parts.path not in ("", "/") or parts.query:
        raise ValueError(f"'{text}' (no path or query: the listener publishes the whole service)")
    return f"{parts.scheme}://{parts.netloc}"


def _policy(node: Node | None, zones: set[str], listeners: set[str], sink: ErrorSink,
            source: Path) -> tuple[str, tuple[PolicyRule, ...]]:
    if node is None:
        return "deny", ()
    entries = node.mapping({"default", "rules"}) or {}
    default = entries["default"].string(ACTIONS) if "default" in entries else "deny"
    rules = []
    for item in entries["rules"].items() if "rules" in entries else ():
        fields = item.mapping(
            {"name", "from", "to", "action", "hosts", "paths", "listeners", "request_profile",
             "response_profile"},
            {"name", "from", "to", "action"}) or {}
        values = {}
        for key in ("name", "request_profile", "response_profile"):
            values[key] = fields[key].string() if key in fields else None
        for key in ("from", "to"):
            zone = fields[key].string() if key in fields else None
            if zone is not None and zone != "*" and zone not in zones:
                fields[key].error(f"no zone named '{zone}' (zones: {', '.join(sorted(zones))}, or *)")
            values[key] = zone
        values["action"] = fields["action"].string(ACTIONS) if "action" in fields else None
        for key in ("hosts", "paths", "listeners"):
            values[key] = tuple(v for i in fields[key].items() if (v := i.string())) if key in fields else ()
        for listener_node, name in zip(fields["listeners"].items() if "listeners" in fields else (),
                                       values["listeners"]):
            if name not in listeners:
                listener_node.error(f"no listener named '{name}'")
        if all(values[k] for k in ("name", "from", "to", "action")):
            rules.append(PolicyRule(
                name=values["name"], from_zone=values["from"], to_zone=values["to"], action=values["action"],
                hosts=values["hosts"], paths=values["paths"], listeners=values["listeners"],
                request_profile=values["request_profile"], response_profile=values["response_profile"],
                where=f"{item.file}:{item.line}"))
    return default or "deny", tuple(rules)
