"""Which transfers may cross: rules per zone pair and direction, first match wins, default deny."""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from gateway.config.load import PolicyRule


@dataclass(frozen=True)
class Verdict:
    action: str                      # "allow" or "deny"
    rule: str                        # the matching rule's name, or "default"
    request_profile: str | None = None
    response_profile: str | None = None


class Policy:
    def __init__(self, rules: tuple[PolicyRule, ...], default: str = "deny"):
        self.rules = rules
        self.default = Verdict(default, "default")

    def decide(self, src_zone: str, dst_zone: str, host: str, path: str | None, listener: str) -> Verdict:
        """The verdict for one transfer. With `path=None` (a CONNECT, path still unknown) a rule with
        path patterns counts as a possible match: the tunnel opens and each request is decided again."""
        host = host.lower().rstrip(".")
        for rule in self.rules:
            if not _zone_matches(rule.to_zone, dst_zone) or not _source_matches(rule, src_zone, host, listener):
                continue
            if rule.paths and path is not None and not any(fnmatchcase(path, p) for p in rule.paths):
                continue
            if rule.paths and path is None and rule.action == "deny":
                continue  # a path-specific deny cannot close the whole tunnel
            return Verdict(rule.action, rule.name, rule.request_profile, rule.response_profile)
        return self.default

    def may_allow(self, src_zone: str, host: str, listener: str) -> bool:
        """Whether any transfer from `src_zone` to `host` could be allowed, whatever zone the host
        resolves to and whatever its path: when not, it is denied without resolving the name."""
        host = host.lower().rstrip(".")
        return self.default.action == "allow" or any(
            rule.action == "allow" and _source_matches(rule, src_zone, host, listener) for rule in self.rules)

    def request_profiles(self, src_zone: str, host: str, listener: str) -> list[str]:
        """The request profiles of every allow rule a transfer from `src_zone` to `host` could match,
        whatever zone the host resolves to and whatever its path: the host name is scanned with each of
        them before it is resolved (a DNS query would carry what the name holds out of the machine)."""
        host = host.lower().rstrip(".")
        profiles = []
        for rule in self.rules:
            if rule.action == "allow" and rule.request_profile is not None and rule.request_profile not in profiles \
                    and _source_matches(rule, src_zone, host, listener):
                profiles.append(rule.request_profile)
        return profiles


def _source_matches(rule: PolicyRule, src_zone: str, host: str, listener: str) -> bool:
    """Whether the rule can apply to a transfer from `src_zone` through `listener` to (lower-case) `host`."""
    return (_zone_matches(rule.from_zone, src_zone)
            and (not rule.listeners or listener in rule.listeners)
            and (not rule.hosts or any(fnmatchcase(host, pattern.lower()) for pattern in rule.hosts)))


def _zone_matches(pattern: str, zone: str) -> bool:
    # "*" matches every configured zone but never "unknown": unknown sources stay denied.
    return pattern == zone or (pattern == "*" and zone != "unknown")
