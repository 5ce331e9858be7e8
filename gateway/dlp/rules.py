"""Rule files: YAML with `rules:` and `profiles:`, loaded with every error as FILE:LINE: key.path: message."""

import re
from dataclasses import dataclass
from pathlib import Path

from gateway.dlp.decode import Limits
from gateway.dlp.detectors import DETECTORS
from gateway.dlp.matcher import HYPERSCAN_AVAILABLE, Matcher, PatternError, PatternSpec
from gateway.yamlnodes import ConfigError, ErrorSink, Node, load_document

ACTIONS = ("block", "redact", "warn", "audit")        # strongest first
SEVERITIES = ("low", "medium", "high", "critical")
DIRECTIONS = ("request", "response", "both")
_RULE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")


class DlpConfigError(ConfigError):
    """Every problem found in the DLP rule files, each formatted `FILE:LINE: key.path: message` (`.errors`)."""


@dataclass(frozen=True)
class Rule:
    id: str
    description: str
    action: str
    severity: str
    direction: str
    detectors: tuple[str, ...] = ()
    patterns: tuple[str, ...] = ()
    keywords: tuple[str, ...] = ()
    case_sensitive: bool = False
    field_names: frozenset[str] = frozenset()  # a field of one of these names is a finding by itself
    fields: frozenset[str] = frozenset()       # only values under these field names count
    type: str | None = None                    # finding type of pattern / keyword / field-name matches
    min_count: int = 1                         # distinct values needed to trigger
    allow_values: frozenset[str] = frozenset()
    allow_hosts: tuple[str, ...] = ()
    examples_match: tuple[str, ...] = ()
    examples_no_match: tuple[str, ...] = ()
    source: str = ""                           # FILE:LINE of the rule

    def applies_to(self, direction: str) -> bool:
        return self.direction in ("both", direction)

    def host_allowed(self, host: str | None) -> bool:
        if not host or not self.allow_hosts:
            return False
        host = host.lower().rstrip(".")
        return any(host == h or (h.startswith("*.") and host.endswith(h[1:])) for h in self.allow_hosts)


def canonical_value(value: str) -> str:
    """The form exceptions and min_count compare: no separators, upper case."""
    return "".join(c for c in value if c not in " -").upper()


_RULE_KEYS = {"id", "description", "detectors", "patterns", "keywords", "case_sensitive", "field_names", "fields",
              "type", "min_count", "action", "severity", "direction", "exceptions", "examples"}
_PROFILE_KEYS = {"description", "rules", "uninspectable", "limits"}


class _Entries:
    """A mapping's entries read with the rule files' wording: unknown keys are errors, absent keys read as None."""

    def __init__(self, node: Node, entries: dict[str, Node], known: set[str] | list[str], what: str):
        self.node = node
        self.entries = entries
        listed = ", ".join(sorted(known) if isinstance(known, set) else known)
        for key, child in entries.items():
            if key not in known:
                child.key_error(f"unknown {what} (known: {listed})")

    @classmethod
    def of(cls, node: Node, known: set[str] | list[str], not_mapping: str, what: str = "key") -> "_Entries | None":
        """The entries of `node`, or None after the error `not_mapping` when it is not a mapping."""
        entries = node.entries()
        if entries is None:
            node.error(not_mapping)
            return None
        return cls(node, entries, known, what)

    def at(self, key: str) -> Node:
        """The entry, or a stand-in naming the key's path at the mapping's line."""
        return self.entries.get(key) or self.node.absent(key)

    def get(self, key: str, default: object = None) -> object:
        entry = self.entries.get(key)
        return entry.plain() if entry is not None else default

    def strings(self, key: str) -> tuple[str, ...]:
        value = self.get(key)
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
            self.at(key).error("must be a list of non-empty strings")
            return ()
        return tuple(value)

    def string_items(self, key: str) -> list[tuple[Node, str]]:
        """A list of strings with each item's node, for errors about one item."""
        values = self.strings(key)
        return list(zip(self.at(key).items(), values)) if values else []

    def choice(self, key: str, choices: tuple[str, ...], default: str | None) -> str:
        value = self.get(key)
        if value is None and default is not None:
            return default
        if value not in choices:
            self.at(key).error(f"must be one of {', '.join(choices)} (got {value!r})")
            return default or choices[0]
        return value


def _parse_rule(node: Node, rules: dict[str, Rule]) -> Rule | None:
    """The rule at `node`, or None after recording its errors; `rules` are those read before it."""
    raw = _Entries.of(node, _RULE_KEYS, "a rule must be a mapping")
    if raw is None:
        return None
    errors_before = len(node.sink.errors)
    rule_id = raw.get("id")
    if not isinstance(rule_id, str) or not _RULE_ID.fullmatch(rule_id):
        raw.at("id").error("required: letters, digits, '_', '-', '.'")
        rule_id = f"<{node.path}>"
    detectors = raw.string_items("detectors")
    for item, name in detectors:
        if name not in DETECTORS:
            item.error(f"unknown detector {name!r} (known: {', '.join(DETECTORS)})")
    patterns = raw.string_items("patterns")
    case_sensitive = raw.get("case_sensitive", False)
    if not isinstance(case_sensitive, bool):
        raw.at("case_sensitive").error("must be true or false")
        case_sensitive = False
    for item, pattern in patterns:
        try:
            Matcher([PatternSpec(pattern, not case_sensitive)], "hyperscan" if HYPERSCAN_AVAILABLE else "re")
        except PatternError as error:
            item.error(str(error))
    keywords = raw.strings("keywords")
    field_names = raw.strings("field_names")
    fields = raw.strings("fields")
    if not (detectors or patterns or keywords or field_names):
        node.error("a rule needs detectors, patterns, keywords or field_names")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raw.at("description").error("must be a string")
        description = ""
    finding_type = raw.get("type")
    if finding_type is not None and not isinstance(finding_type, str):
        raw.at("type").error("must be a string")
        finding_type = None
    min_count = raw.get("min_count", 1)
    if not isinstance(min_count, int) or isinstance(min_count, bool) or min_count < 1:
        raw.at("min_count").error(f"must be an integer >= 1 (got {min_count!r})")
        min_count = 1
    action = raw.choice("action", ACTIONS, None)
    severity = raw.choice("severity", SEVERITIES, "medium")
    direction = raw.choice("direction", DIRECTIONS, "both")
    allow_values: tuple[str, ...] = ()
    allow_hosts: tuple[str, ...] = ()
    if raw.get("exceptions"):
        exceptions = _Entries.of(raw.at("exceptions"), {"values", "hosts"},
                                 "must be a mapping with values and/or hosts")
        if exceptions is not None:
            allow_values = exceptions.strings("values")
            allow_hosts = exceptions.strings("hosts")
    match: tuple[str, ...] = ()
    no_match: tuple[str, ...] = ()
    examples = _Entries.of(raw.at("examples"), {"match", "no_match"},
                           "required: a mapping with match (and no_match) example texts")
    if examples is not None:
        match = examples.strings("match")
        no_match = examples.strings("no_match")
        if not match:
            examples.at("match").error("at least one example the rule must match")
    if len(node.sink.errors) > errors_before:
        return None
    if rule_id in rules:
        raw.at("id").error(f"duplicate rule id {rule_id!r} (first at {rules[rule_id].source})")
        return None
    return Rule(
        id=rule_id, description=description, action=action, severity=severity, direction=direction,
        detectors=tuple(name for _, name in detectors), patterns=tuple(pattern for _, pattern in patterns),
        keywords=keywords, case_sensitive=case_sensitive,
        field_names=frozenset(n.lower() for n in field_names), fields=frozenset(n.lower() for n in fields),
        type=finding_type, min_count=min_count, allow_values=frozenset(canonical_value(v) for v in allow_values),
        allow_hosts=tuple(h.lower() for h in allow_hosts), examples_match=match, examples_no_match=no_match,
        source=f"{node.file}:{node.line}",
    )


def _parse_limits(node: Node) -> Limits:
    raw = _Entries.of(node, list(Limits.__dataclass_fields__), "must be a mapping", what="limit")
    if raw is None:
        return Limits()
    values = {}
    for key, entry in raw.entries.items():
        if key not in Limits.__dataclass_fields__:
            continue  # reported as an unknown limit
        value = entry.plain()
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            entry.error(f"must be a positive integer (got {value!r})")
        else:
            values[key] = value
    return Limits(**values)


@dataclass(frozen=True)
class ProfileSpec:
    name: str
    description: str
    rules: tuple[Rule, ...]
    uninspectable: str
    limits: Limits


def _parse_profile(name: str, node: Node, rules: dict[str, Rule]) -> ProfileSpec | None:
    raw = _Entries.of(node, _PROFILE_KEYS, "a profile must be a mapping")
    if raw is None:
        return None
    rule_ids = raw.string_items("rules")
    if not rule_ids:
        raw.at("rules").error("a profile needs at least one rule")
    members = []
    for item, rule_id in rule_ids:
        if rule_id in rules:
            members.append(rules[rule_id])
        else:
            item.error(f"unknown rule {rule_id!r}")
    uninspectable = raw.choice("uninspectable", ("block", "warn", "audit"), "block")
    description = raw.get("description", "")
    limits = _parse_limits(raw.at("limits")) if raw.get("limits") is not None else Limits()
    return ProfileSpec(name, description if isinstance(description, str) else "", tuple(members), uninspectable,
                       limits)


def parse_files(paths: list[Path]) -> tuple[dict[str, Rule], dict[str, ProfileSpec]]:
    """Parse rule files; raises DlpConfigError listing every problem."""
    sink = ErrorSink()
    rules: dict[str, Rule] = {}
    profile_nodes: list[tuple[str, Node]] = []
    for path in paths:
        document = load_document(path, sink, syntax_label="yaml", empty_ok=True)
        if document is None:
            continue
        top = _Entries.of(document, ["rules", "profiles"], "a rule file is a mapping with rules: and/or profiles:",
                          what="top-level key")
        if top is None:
            continue
        if top.get("rules"):
            if not isinstance(top.get("rules"), list):
                top.at("rules").error("must be a list of rules")
            else:
                for item in top.at("rules").items():
                    if rule := _parse_rule(item, rules):
                        rules[rule.id] = rule
        if top.get("profiles"):
            profiles = top.at("profiles").entries()
            if profiles is None:
                top.at("profiles").error("must be a mapping of profile name to profile")
                continue
            profile_nodes += profiles.items()
    profiles_out: dict[str, ProfileSpec] = {}
    for name, node in profile_nodes:
        spec = _parse_profile(name, node, rules)
        if spec is None:
            continue
        if name in profiles_out:
            node.error(f"duplicate profile {name!r}")
            continue
        profiles_out[name] = spec
    if not paths:
        sink.errors.append("(rules): no rule files given")
    if sink.errors:
        raise DlpConfigError(sink.errors)
    return rules, profiles_out


def rule_files(path: str | Path) -> list[Path]:
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
        if not files:
            raise DlpConfigError([f"{path}:1: (rules): no *.yaml rule files in this folder"])
        return files
    if not path.is_file():
        raise DlpConfigError([f"{path}:1: (rules): no such file or folder"])
    return [path]
