"""Read YAML with file and line kept for every value, so errors can say `FILE:LINE: key.path: message`.

Readers walk PyYAML's composed node tree instead of plain dicts; each read either returns the value or
records an error and returns None, so one pass reports every error in a file, not only the first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(Exception):
    """Every problem found in a configuration, each formatted `FILE:LINE: key.path: message`."""

    def __init__(self, errors: list[str]):
        super().__init__("\n".join(errors))
        self.errors = errors


@dataclass
class ErrorSink:
    errors: list[str] = field(default_factory=list)

    def add(self, node: "Node", message: str) -> None:
        self.errors.append(f"{node.file}:{node.line}: {node.path or '(top)'}: {message}")

    def raise_if_any(self) -> None:
        if self.errors:
            raise ConfigError(self.errors)


@dataclass
class Node:
    """One YAML value with where it came from."""

    raw: yaml.Node
    file: Path
    path: str
    sink: ErrorSink
    key_raw: yaml.Node | None = None  # the mapping key this value is stored under, if any

    @property
    def line(self) -> int:
        return self.raw.start_mark.line + 1

    def error(self, message: str) -> None:
        self.sink.add(self, message)

    def key_error(self, message: str) -> None:
        """An error about the key this value is stored under (unknown, duplicate), at the key's line."""
        key_node = Node(self.key_raw, self.file, self.path, self.sink) if self.key_raw is not None else self
        self.sink.add(key_node, message)

    def absent(self, key: str) -> "Node":
        """Stands for a key this mapping lacks: a null whose errors name the key's path at the line where the
        mapping starts (its own key's line when it has one)."""
        mark = (self.key_raw or self.raw).start_mark
        null = yaml.ScalarNode("tag:yaml.org,2002:null", "", mark, mark)
        return self._child(null, key)

    def _child(self, raw: yaml.Node, key: str | int, key_raw: yaml.Node | None = None) -> "Node":
        if isinstance(key, int):
            path = f"{self.path}[{key}]"
        else:
            path = f"{self.path}.{key}" if self.path else key
        return Node(raw, self.file, path, self.sink, key_raw)

    def entries(self) -> dict[str, "Node"] | None:
        """The mapping's entries (keys that are not strings and duplicate keys are errors), or None without
        an error when this is not a mapping, for readers that word that error themselves."""
        if not isinstance(self.raw, yaml.MappingNode):
            return None
        entries: dict[str, Node] = {}
        for key_raw, value_raw in self.raw.value:
            key = key_raw.value if isinstance(key_raw, yaml.ScalarNode) else None
            child = self._child(value_raw, str(key), key_raw)
            if not isinstance(key, str):
                Node(key_raw, self.file, self.path, self.sink).error("keys must be strings")
            elif key in entries:
                child.key_error("duplicate key")
            else:
                entries[key] = child
        return entries

    def mapping(self, allowed: set[str] | None = None, required: set[str] = frozenset()) -> dict[str, "Node"] | None:
        """The mapping's entries; unknown keys, missing keys and duplicates are errors."""
        entries = self.entries()
        if entries is None:
            self.error(f"expected a mapping, got {_kind(self.raw)}")
            return None
        for key in list(entries):
            if allowed is not None and key not in allowed:
                entries.pop(key).key_error(f"unknown key (expected one of: {', '.join(sorted(allowed))})")
        for key in sorted(required - entries.keys()):
            self.error(f"missing required key '{key}'")
        return entries

    def items(self) -> Iterator["Node"]:
        """The sequence's items (a single scalar is an error, not a one-item list)."""
        if not isinstance(self.raw, yaml.SequenceNode):
            self.error(f"expected a list, got {_kind(self.raw)}")
            return
        for index, item in enumerate(self.raw.value):
            yield self._child(item, index)

    def plain(self) -> Any:
        """The value as plain Python data (dicts, lists, scalars) without type checks, for readers that check
        types themselves and word their own errors. Only what PyYAML cannot build (an unknown tag) is an error."""
        try:
            return yaml.SafeLoader(" ").construct_object(self.raw, deep=True)
        except yaml.constructor.ConstructorError as e:
            self.error(f"cannot read this value: {e.problem}")
            return None

    def scalar(self) -> Any:
        if not isinstance(self.raw, yaml.ScalarNode):
            self.error(f"expected a single value, got {_kind(self.raw)}")
            return None
        return self.plain()

    def string(self, choices: tuple[str, ...] | None = None) -> str | None:
        value = self.scalar()
        if value is None and isinstance(self.raw, yaml.ScalarNode):
            self.error("expected a string, got nothing")
            return None
        if value is not None and not isinstance(value, str):
            value = str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
            if value is None:
                self.error("expected a string")
                return None
        if value is not None and choices is not None and value not in choices:
            self.error(f"'{value}' is not one of: {', '.join(choices)}")
            return None
        return value

    def integer(self, minimum: int | None = None) -> int | None:
        value = self.scalar()
        if not isinstance(value, int) or isinstance(value, bool):
            if isinstance(self.raw, yaml.ScalarNode):
                self.error(f"expected a whole number, got '{self.raw.value}'")
            return None
        if minimum is not None and value < minimum:
            self.error(f"must be at least {minimum}")
            return None
        return value

    def boolean(self) -> bool | None:
        value = self.scalar()
        if not isinstance(value, bool):
            if isinstance(self.raw, yaml.ScalarNode):
                self.error(f"expected true or false, got '{self.raw.value}'")
            return None
        return value

    def parsed[T](self, parse: Callable[[str], T], what: str) -> T | None:
        """A string turned into a value by `parse`; its ValueError becomes an error at this node."""
        text = self.string()
        if text is None:
            return None
        try:
            return parse(text)
        except ValueError as e:
            self.error(f"not a valid {what}: {e}")
            return None

    def path_value(self) -> Path | None:
        """A file system path; relative paths are relative to the file that names them."""
        text = self.string()
        if text is None:
            return None
        return (self.file.parent / text).resolve()


def _kind(raw: yaml.Node) -> str:
    if isinstance(raw, yaml.MappingNode):
        return "a mapping"
    if isinstance(raw, yaml.SequenceNode):
        return "a list"
    return f"'{raw.value}'" if raw.value != "" else "nothing"


def load_document(file: Path, sink: ErrorSink, *, syntax_label: str = "syntax",
                  empty_ok: bool = False) -> Node | None:
    """The file's single YAML document as a Node; syntax errors are recorded with their position, under
    `(syntax_label)` in place of a key path. An empty file is an error unless `empty_ok` (then None)."""
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        sink.errors.append(f"{file}:0: (file): cannot read: {e}")
        return None
    try:
        raw = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else 0
        sink.errors.append(f"{file}:{line}: ({syntax_label}): {e.problem or e}")
        return None
    except yaml.YAMLError as e:
        sink.errors.append(f"{file}:0: ({syntax_label}): {e}")
        return None
    if raw is None:
        if not empty_ok:
            sink.errors.append(f"{file}:1: (top): the file is empty")
        return None
    return Node(raw, file, "", sink)


SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": 1024**2, "mb": 1000**2,
              "mib": 1024**2, "g": 1024**3, "gb": 1000**3, "gib": 1024**3}


def parse_size(text: str) -> int:
    """'8MiB', '512k', '1000' -> bytes."""
    number = text.strip().rstrip("bBiIkKmMgG ")
    unit = text.strip()[len(number):].strip().lower()
    if unit not in SIZE_UNITS or not number.isdigit():
        raise ValueError(f"'{text}' (use a whole number with an optional unit: KiB, MiB, GiB, kB, MB, GB)")
    return int(number) * SIZE_UNITS[unit]


DURATION_UNITS = {"": 1.0, "s": 1.0, "ms": 0.001, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """'30s', '500ms', '2m', '1h', '90d', '10' -> seconds (more than zero)."""
    stripped = text.strip()
    number = stripped.rstrip("msMShHdD ")
    unit = stripped[len(number):].strip().lower()
    try:
        seconds = float(number) * DURATION_UNITS[unit]
    except (KeyError, ValueError):
        raise ValueError(f"'{text}' (use a number with an optional unit: ms, s, m, h, d)") from None
    if not 0 < seconds < float("inf"):
        raise ValueError(f"'{text}' (must be more than zero)")
    return seconds


def private_file_problem(path: Path) -> str | None:
    """Why a private key or password file must not be used (group or others may read or write it), or
    None: a secret others can read is no longer the gateway's alone. Checked by everything that loads one."""
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        return (f"{path} is open to group or others (mode {mode:04o}): a private key or password must be its "
                "owner's alone; chmod 600 it")
    return None
