"""Rule files: YAML with `rules:` and `profiles:`, loaded with every error as FILE:LINE: key.path: message."""

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from gateway.dlp.decode import Limits
from gateway.dlp.detectors import DETECTORS
from gateway.dlp.matcher import HYPERSCAN_AVAILABLE, Matcher, PatternError, PatternSpec

ACTIONS = ("block", "redact", "warn", "audit")        # strongest first
SEVERITIES = ("low", "medium", "high", "critical")
DIRECTIONS = ("request", "response", "both")
_RULE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")


class DlpConfigError(Exception):
    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("\n".join(errors))


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


class _Source:
    """A parsed YAML file: plain Python values plus the line of every key path."""

    def __init__(self, path: Path, errors: list[str]):
        self.path = path
        self.lines: dict[tuple, int] = {}
        self.errors = errors
        self.data: object = None
        try:
            loader = yaml.SafeLoader(path.read_text(encoding="utf-8"))
            try:
                node = loader.get_single_node()
            finally:
                loader.dispose()
            self.data = self._convert(node, (), loader) if node is not None else {}
        except yaml.MarkedYAMLError as error:
            mark = error.problem_mark or error.context_mark
            line = mark.line + 1 if mark else 1
            errors.append(f"{path}:{line}: (yaml): {error.problem or error}")
        except (OSError, UnicodeDecodeError) as error:
            errors.append(f"{path}:1: (file): {error}")

    def _convert(self, node: yaml.Node, path: tuple, loader: yaml.SafeLoader) -> object:
        self.lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            result = {}
            for key_node, value_node in node.value:
                key = loader.construct_object(key_node)
                if key in result:
                    self.error(path + (key,), "duplicate key", key_node.start_mark.line + 1)
                result[key] = self._convert(value_node, path + (key,), loader)
                self.lines[path + (key,)] = key_node.start_mark.line + 1
            return result
        if isinstance(node, yaml.SequenceNode):
            return [self._convert(item, path + (index,), loader) for index, item in enumerate(node.value)]
        return loader.construct_object(node)

    def line(self, path: tuple) -> int:
        while path and path not in self.lines:
            path = path[:-1]
        return self.lines.get(path, 1)

    def error(self, path: tuple, message: str, line: int | None = None) -> None:
        self.errors.append(f"{self.path}:{line or self.line(path)}: {format_path(path)}: {message}")


def format_path(path: tuple) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top)"


_RULE_KEYS = {"id", "description", "detectors", "patterns", "keywords", "case_sensitive", "field_names", "fields",
              "type", "min_count", "action", "severity", "direction", "exceptions", "examples"}
_PROFILE_KEYS = {"description", "rules", "uninspectable", "limits"}


def _string_list(source: _Source, value: object, path: tuple) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        source.error(path, "must be a list of non-empty strings")
        return ()
    return tuple(value)


def _choice(source: _Source, value: object, path: tuple, choices: tuple[str, ...], default: str | None) -> str:
    if value is None and default is not None:
        return default
    if value not in choices:
        source.error(path, f"must be one of {', '.join(choices)} (got {value!r})")
        return default or choices[0]
    return value


def _parse_rule(source: _Source, raw: object, path: tuple) -> Rule | None:
    if not isinstance(raw, dict):
        source.error(path, "a rule must be a mapping")
        return None
    errors_before = len(source.errors)
    for key in raw:
        if key not in _RULE_KEYS:
            source.error(path + (key,), f"unknown key (known: {', '.join(sorted(_RULE_KEYS))})")
    rule_id = raw.get("id")
    if not isinstance(rule_id, str) or not _RULE_ID.fullmatch(rule_id):
        source.error(path + ("id",), "required: letters, digits, '_', '-', '.'")
        rule_id = f"<rules{format_path(path[1:])}>"
    detectors = _string_list(source, raw.get("detectors"), path + ("detectors",))
    for index, name in enumerate(detectors):
        if name not in DETECTORS:
            source.error(path + ("detectors", index), f"unknown detector {name!r} (known: {', '.join(DETECTORS)})")
    patterns = _string_list(source, raw.get("patterns"), path + ("patterns",))
    case_sensitive = raw.get("case_sensitive", False)
    if not isinstance(case_sensitive, bool):
        source.error(path + ("case_sensitive",), "must be true or false")
        case_sensitive = False
    for index, pattern in enumerate(patterns):
        try:
            Matcher([PatternSpec(pattern, not case_sensitive)], "hyperscan" if HYPERSCAN_AVAILABLE else "re")
        except PatternError as error:
            source.error(path + ("patterns", index), str(error))
    keywords = _string_list(source, raw.get("keywords"), path + ("keywords",))
    field_names = _string_list(source, raw.get("field_names"), path + ("field_names",))
    fields = _string_list(source, raw.get("fields"), path + ("fields",))
    if not (detectors or patterns or keywords or field_names):
        source.error(path, "a rule needs detectors, patterns, keywords or field_names")
    description = raw.get("description", "")
    if not isinstance(description, str):
        source.error(path + ("description",), "must be a string")
        description = ""
    finding_type = raw.get("type")
    if finding_type is not None and not isinstance(finding_type, str):
        source.error(path + ("type",), "must be a string")
        finding_type = None
    min_count = raw.get("min_count", 1)
    if not isinstance(min_count, int) or isinstance(min_count, bool) or min_count < 1:
        source.error(path + ("min_count",), f"must be an integer >= 1 (got {min_count!r})")
        min_count = 1
    action = _choice(source, raw.get("action"), path + ("action",), ACTIONS, None)
    severity = _choice(source, raw.get("severity"), path + ("severity",), SEVERITIES, "medium")
    direction = _choice(source, raw.get("direction"), path + ("direction",), DIRECTIONS, "both")
    exceptions = raw.get("exceptions") or {}
    allow_values: tuple[str, ...] = ()
    allow_hosts: tuple[str, ...] = ()
    if not isinstance(exceptions, dict):
        source.error(path + ("exceptions",), "must be a mapping with values and/or hosts")
    else:
        for key in exceptions:
            if key not in ("values", "hosts"):
                source.error(path + ("exceptions", key), "unknown key (known: hosts, values)")
        allow_values = _string_list(source, exceptions.get("values"), path + ("exceptions", "values"))
        allow_hosts = _string_list(source, exceptions.get("hosts"), path + ("exceptions", "hosts"))
    examples = raw.get("examples")
    match: tuple[str, ...] = ()
    no_match: tuple[str, ...] = ()
    if not isinstance(examples, dict):
        source.error(path + ("examples",), "required: a mapping with match (and no_match) example texts")
    else:
        for key in examples:
            if key not in ("match", "no_match"):
                source.error(path + ("examples", key), "unknown key (known: match, no_match)")
        match = _string_list(source, examples.get("match"), path + ("examples", "match"))
        no_match = _string_list(source, examples.get("no_match"), path + ("examples", "no_match"))
        if not match:
            source.error(path + ("examples", "match"), "at least one example the rule must match")
    if len(source.errors) > errors_before:
        return None
    return Rule(
        id=rule_id, description=description, action=action, severity=severity, direction=direction,
        detectors=detectors, patterns=patterns, keywords=keywords, case_sensitive=case_sensitive,
        field_names=frozenset(n.lower() for n in field_names), fields=frozenset(n.lower() for n in fields),
        type=finding_type, min_count=min_count, allow_values=frozenset(canonical_value(v) for v in allow_values),
        allow_hosts=tuple(h.lower() for h in allow_hosts), examples_match=match, examples_no_match=no_match,
        source=f"{source.path}:{source.line(path)}",
    )


def _parse_limits(source: _Source, raw: object, path: tuple) -> Limits:
    if raw is None:
        return Limits()
    if not isinstance(raw, dict):
        source.error(path, "must be a mapping")
        return Limits()
    known = Limits.__dataclass_fields__
    values = {}
    for key, value in raw.items():
        if key not in known:
            source.error(path + (key,), f"unknown limit (known: {', '.join(known)})")
        elif not isinstance(value, int) or isinstance(value, bool) or value < 1:
            source.error(path + (key,), f"must be a positive integer (got {value!r})")
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


def parse_files(paths: list[Path]) -> tuple[dict[str, Rule], dict[str, ProfileSpec]]:
    """Parse rule files; raises DlpConfigError listing every problem."""
    errors: list[str] = []
    rules: dict[str, Rule] = {}
    raw_profiles: list[tuple[_Source, str, object, tuple]] = []
    for path in paths:
        source = _Source(path, errors)
        if source.data is None:
            continue
        if not isinstance(source.data, dict):
            source.error((), "a rule file is a mapping with rules: and/or profiles:")
            continue
        for key in source.data:
            if key not in ("rules", "profiles"):
                source.error((key,), "unknown top-level key (known: rules, profiles)")
        raw_rules = source.data.get("rules") or []
        if not isinstance(raw_rules, list):
            source.error(("rules",), "must be a list of rules")
            raw_rules = []
        for index, raw in enumerate(raw_rules):
            rule = _parse_rule(source, raw, ("rules", index))
            if rule is None:
                continue
            if rule.id in rules:
                source.error(("rules", index, "id"), f"duplicate rule id {rule.id!r} (first at {rules[rule.id].source})")
                continue
            rules[rule.id] = rule
        profiles = source.data.get("profiles") or {}
        if not isinstance(profiles, dict):
            source.error(("profiles",), "must be a mapping of profile name to profile")
            continue
        for name, raw in profiles.items():
            raw_profiles.append((source, name, raw, ("profiles", name)))
    profiles_out: dict[str, ProfileSpec] = {}
    for source, name, raw, path in raw_profiles:
        if not isinstance(raw, dict):
            source.error(path, "a profile must be a mapping")
            continue
        if name in profiles_out:
            source.error(path, f"duplicate profile {name!r}")
            continue
        for key in raw:
            if key not in _PROFILE_KEYS:
                source.error(path + (key,), f"unknown key (known: {', '.join(sorted(_PROFILE_KEYS))})")
        rule_ids = _string_list(source, raw.get("rules"), path + ("rules",))
        if not rule_ids:
            source.error(path + ("rules",), "a profile needs at least one rule")
        members = []
        for index, rule_id in enumerate(rule_ids):
            if rule_id in rules:
                members.append(rules[rule_id])
            else:
                source.error(path + ("rules", index), f"unknown rule {rule_id!r}")
        uninspectable = _choice(source, raw.get("uninspectable"), path + ("uninspectable",),
                                ("block", "warn", "audit"), "block")
        description = raw.get("description", "")
        profiles_out[name] = ProfileSpec(name, description if isinstance(description, str) else "",
                                         tuple(members), uninspectable, _parse_limits(source, raw.get("limits"),
                                                                                      path + ("limits",)))
    if not paths:
        errors.append("(rules): no rule files given")
    if errors:
        raise DlpConfigError(errors)
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
