"""Everything the pipeline decides with, built from one configuration and swapped whole on reload."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.config.load import Config, ConfigError
from gateway.config.policy import Policy
from gateway.config.zones import ZoneMap, host_ip
from gateway.dlp import DlpConfigError, RuleSet, load_rules


@dataclass(frozen=True)
class Runtime:
    config: Config
    zones: ZoneMap
    policy: Policy
    rules: RuleSet

    def listener_name(self, host: str, port: int) -> str:
        """The listener a client reached, by the local address it connected to (wildcard binds last),
        as metrics, logs and records name it."""
        candidates = [listener for listener in self.config.listeners if listener.port == port]
        for listener in candidates:
            if listener.host == host:
                return listener.name
        if ":" in host:  # an IPv4-mapped address as the IPv4 one a listener names (parsed only then: per request)
            address = str(host_ip(host) or host)
            for listener in candidates:
                if listener.host == address:
                    return listener.name
        wildcard = [listener for listener in candidates if listener.host in ("0.0.0.0", "::")]
        return wildcard[0].name if wildcard else "unknown"


def build_runtime(config: Config) -> Runtime:
    """Load the DLP rules the configuration names and check every profile its policy uses."""
    try:
        rules = load_rules(config.dlp_rules)
    except DlpConfigError as e:
        raise ConfigError(list(e.errors)) from e
    errors = []
    for rule in config.rules:
        for key in ("request_profile", "response_profile"):
            profile = getattr(rule, key)
            if profile is not None and profile not in rules.profiles:
                errors.append(f"{rule.where}: policy.rules.{rule.name}.{key}: no DLP profile named "
                              f"'{profile}' in {config.dlp_rules} (profiles: {', '.join(sorted(rules.profiles))})")
    if errors:
        raise ConfigError(errors)
    return Runtime(config, ZoneMap(config.zones), Policy(config.rules, config.policy_default), rules)
