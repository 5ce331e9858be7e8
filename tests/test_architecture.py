"""The folder tree is the architecture (docs/architecture.md): imports point one way, from the entry
points and the proxy edge down to the libraries, and the libraries stay plain."""

import ast
import sys
from pathlib import Path

import pytest

GATEWAY = Path(__file__).resolve().parent.parent / "gateway"

# Each package may import only packages of a later row (the same row: none of the others). The one
# top-level module with a row, yamlnodes, is the base every checked file is read with; the other
# top-level modules (cli, __main__) are entry points: they may import anything, nothing may import them.
LAYERS = [
    {"commands"},
    {"proxy"},
    {"filters"},
    {"ops"},
    {"transfer"},
    {"config"},
    {"authz"},
    {"dlp", "trace"},
    {"yamlnodes"},
]
RANK = {package: rank for rank, row in enumerate(LAYERS) for package in row}
# Plain libraries: no proxy engine, no network, easy to test and benchmark alone.
PLAIN = {"dlp", "trace", "config", "authz", "yamlnodes"}
MAX_LINES = 400
LONG_FILE_REASON = "Longer than 400 lines:"


def modules() -> list[Path]:
    return sorted(p for p in GATEWAY.rglob("*.py") if "__pycache__" not in p.parts)


def package_of(path: Path) -> str:
    parts = path.relative_to(GATEWAY).parts
    return parts[0] if len(parts) > 1 else path.stem


def imported(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of this file, at any depth (lazy imports count too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
            if node.module == "gateway":
                found += [(node.lineno, f"gateway.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
    return found


def test_every_package_has_a_layer():
    packages = {package_of(p) for p in modules() if p.parent != GATEWAY}
    assert packages == set(RANK) - {"yamlnodes"}, "a new package needs its place in LAYERS and docs/architecture.md"


def test_imports_point_down_the_layers():
    wrong = []
    for path in modules():
        source = package_of(path)
        for line, module in imported(path):
            parts = module.split(".")
            if parts[0] != "gateway" or len(parts) < 2 or parts[1] == source or source not in RANK \
                    or parts[1] == "__version__":
                continue
            target = parts[1]
            where = f"{path.relative_to(GATEWAY.parent)}:{line} imports {module}"
            if target not in RANK:
                wrong.append(f"{where}: an entry point")
            elif source in RANK and RANK[target] <= RANK[source]:
                wrong.append(f"{where}: against the direction ({source} is above {target})")
    assert wrong == []


def test_plain_libraries_import_no_proxy_engine():
    wrong = [f"{path.relative_to(GATEWAY.parent)}:{line} imports {module}"
             for path in modules() if package_of(path) in PLAIN
             for line, module in imported(path) if module.split(".")[0] in {"mitmproxy", "h2", "wsproto"}]
    assert wrong == []


def test_the_check_finds_a_wrong_import(tmp_path, monkeypatch):
    """The checks above can fail: a library importing the pipeline is caught."""
    fake = tmp_path / "gateway"
    (fake / "dlp").mkdir(parents=True)
    (fake / "dlp" / "bad.py").write_text("from gateway.filters import runtime\nimport mitmproxy.http\n")
    monkeypatch.setattr(sys.modules[__name__], "GATEWAY", fake)
    with pytest.raises(AssertionError, match="against the direction"):
        test_imports_point_down_the_layers()
    with pytest.raises(AssertionError, match="imports mitmproxy.http"):
        test_plain_libraries_import_no_proxy_engine()


def test_long_files_say_why():
    long = [f"{path.relative_to(GATEWAY.parent)}: {count} lines" for path in modules()
            if (count := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES
            and LONG_FILE_REASON not in (ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or "")]
    assert long == [], f"split them, or state the reason in the docstring ('{LONG_FILE_REASON} ...')"
