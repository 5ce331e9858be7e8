"""Do the machines of a boundary decide alike? The configuration digest and catalogue version each
machine serves (`gateway_config_info` on its management listener), and `gateway doctor --peers`,
which compares them.

The digest covers what decides a transfer and must be the same on every machine: zones, listeners
(but their addresses), policy, the DLP rule files' contents, limits, upstream TLS trust, and the
authorisation settings (catalogue, authorities, lifetimes). It leaves out what differs per machine:
the gateway's name, state folder, trace origin, listener and management addresses, management TLS
and auth, worker count, alerts file, and file paths (their contents count instead). Installed grants,
licences and the revocation list change while machines run and are not part of it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from gateway.config.load import Config
from gateway.trace.peers import Peers

DIGEST_CHARS = 16  # hex digits shown: 64 bits tell configurations apart
MACHINE_LOCAL = {"source", "name", "state_dir", "trace_dir", "trace_origin", "management_host", "management_port",
                 "management_tls", "management_auth", "alerts_file", "workers", "upstream_ca", "dlp_rules", "authz"}
LOCAL_FIELDS = {"Listener": {"host", "port"}, "PolicyRule": {"where"}}  # addresses, FILE:LINE of a field


def config_digest(config: Config) -> str:
    shared = {f.name: _plain(getattr(config, f.name)) for f in dataclasses.fields(config)
              if f.name not in MACHINE_LOCAL}
    shared["dlp_rules"] = _tree_digest(config.dlp_rules)
    if config.authz is not None:
        a = config.authz
        shared["authz"] = {
            "catalog": catalog_version(config),
            "authorities": sorted([x.name, x.role, x.org, x.kid] for x in a.authorities.values()),
            "algorithms": list(a.algorithms), "max_lifetime": a.max_lifetime,
            "revocation_max_age": a.revocation_max_age,
            "consent": None if a.consent is None else {"platform": sorted(a.consent.platform),
                                                       "max_age": a.consent.max_age},
        }
    text = json.dumps(shared, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:DIGEST_CHARS]


def same_config(config: Config) -> tuple[str, str]:
    """(digest, catalogue version), the labels of gateway_config_info."""
    return config_digest(config), catalog_version(config)


def catalog_version(config: Config) -> str:
    """The data catalogue file's SHA-256 (first hex digits); "none" without an authz section."""
    if config.authz is None or config.authz.catalog.source is None:
        return "none"
    return _tree_digest(config.authz.catalog.source)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        skip = LOCAL_FIELDS.get(type(value).__name__, set())
        # (a field outside comparison, such as where a listener is written, is not part of what it is)
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)
                if f.name not in skip and f.compare}
    if isinstance(value, (tuple, list)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, bytes):
        return hashlib.sha256(value).hexdigest()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)  # addresses and networks


def _tree_digest(path: Path | None) -> str:
    """SHA-256 over a file's bytes, or over a folder's files (relative names and contents, sorted)."""
    if path is None:
        return "none"
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        digest.update(f"{file.relative_to(path) if file != path else ''}\0".encode())
        digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()[:DIGEST_CHARS]


def served(management_url: str, timeout: float = 5.0) -> dict[str, str]:
    """What a machine's management listener says it runs: digest, catalog_version, version."""
    context = ssl.create_default_context() if management_url.startswith("https:") else None
    with urllib.request.urlopen(management_url.rstrip("/") + "/metrics", timeout=timeout, context=context) as answer:
        text = answer.read().decode()
    found: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "gateway_config_info" and sample.value == 1:
                found.update(digest=sample.labels["digest"], catalog_version=sample.labels["catalog_version"])
            elif sample.name == "gateway_build_info" and sample.value == 1:
                found["version"] = sample.labels["version"]
    return found


def compare_peers(config: Config, peers: Peers, version: str) -> tuple[list[str], list[str]]:
    """(lines, problems): each machine's digest, catalogue and version against this configuration's."""
    expected = {"digest": config_digest(config), "catalog_version": catalog_version(config), "version": version}
    lines = [f"{'this configuration':20} digest {expected['digest']}  catalogue {expected['catalog_version']}  "
             f"version {version}  ({config.source})"]
    problems = []
    for peer in peers.peers:
        if peer.management is None:
            problems.append(f"{peer.name}: no management URL in {peers.source}")
            continue
        try:
            got = served(peer.management)
        except (OSError, urllib.error.URLError, ValueError) as exc:
            problems.append(f"{peer.name}: {peer.management} unreachable: {getattr(exc, 'reason', exc)}")
            continue
        lines.append(f"{peer.name:20} digest {got.get('digest', '?')}  catalogue {got.get('catalog_version', '?')}  "
                     f"version {got.get('version', '?')}  ({peer.management})")
        differ = [key for key in ("digest", "catalog_version", "version") if got.get(key) != expected[key]]
        if differ:
            problems.append(f"{peer.name} differs from this configuration: " + "; ".join(
                f"{key} {got.get(key, '(none served)')}, here {expected[key]}" for key in differ))
    return lines, problems
