"""DLP rules: the shipped rule files load and pass their own examples; bad files get FILE:LINE errors."""

from pathlib import Path

import pytest

from gateway.dlp import DlpConfigError, load_rules
from gateway.dlp.matcher import HYPERSCAN_AVAILABLE

SHIPPED = Path(__file__).resolve().parent.parent / "config" / "dlp"
ENGINES = ["re"] + (["hyperscan"] if HYPERSCAN_AVAILABLE else [])


@pytest.mark.parametrize("engine", ENGINES)
def test_shipped_rules_pass_their_examples(engine):
    rules = load_rules(SHIPPED, engine=engine)
    assert rules.check_examples(engine) == []
    assert {"outbound", "inbound", "audit-only"} <= set(rules.profiles)
    assert all(rule.examples_match for rule in rules.rules.values())


def test_hyperscan_is_used_when_installed():
    if not HYPERSCAN_AVAILABLE:
        pytest.skip("hyperscan is not installed: only the re fallback can be tested")
    assert load_rules(SHIPPED).profile("outbound").matcher.engine == "hyperscan"


@pytest.mark.parametrize("engine", ENGINES)
def test_outbound_blocks_the_end_to_end_id_number(engine):
    outbound = load_rules(SHIPPED, engine=engine).profile("outbound")
    result = outbound.scan(b'{"sfzh": "11010519491231002X"}', content_type="application/json")
    assert result.action == "block"
    finding = next(f for f in result.findings if f.type == "cn_id_card")
    assert (finding.rule, finding.location, finding.masked) == ("id-card", "body:$.sfzh", "1101**********002X")
    assert finding.value == "11010519491231002X" and finding.confidence == "high"


def test_unknown_profile_lists_the_known_ones():
    rules = load_rules(SHIPPED)
    with pytest.raises(KeyError, match="audit-only, inbound, outbound"):
        rules.profile("nope")


def test_min_count_direction_and_exceptions(tmp_path):
    (tmp_path / "r.yaml").write_text("""
rules:
  - id: bulk
    detectors: [cn_mobile]
    min_count: 3
    action: block
    direction: response
    exceptions: {values: ["13800138000"], hosts: ["*.example.org"]}
    examples: {match: ["13900139000 13700137000 13600136000"]}
profiles:
  p: {rules: [bulk]}
""")
    profile = load_rules(tmp_path / "r.yaml").profile("p")
    three = b"13900139000 13700137000 13600136000"
    assert profile.scan(three, direction="response").action == "block"
    assert profile.scan(three, direction="request").action is None          # rule is response-only
    assert profile.scan(three, direction="response", host="api.example.org").action is None
    assert profile.scan(b"13800138000 13900139000 13700137000 13900139000", direction="response").action is None


def test_field_filter_and_field_name_rules(tmp_path):
    (tmp_path / "r.yaml").write_text("""
rules:
  - id: phone-field
    detectors: [cn_mobile]
    fields: [sjhm]
    action: warn
    examples: {match: ['{"sjhm": "13800138000"}'], no_match: ['{"other": "13800138000"}']}
  - id: column
    field_names: [身份证号]
    action: block
    examples: {match: ['{"身份证号": "****"}']}
profiles:
  p: {rules: [phone-field, column]}
""")
    rules = load_rules(tmp_path / "r.yaml")
    assert rules.check_examples() == []
    profile = rules.profile("p")
    csv = "姓名,身份证号\n张三,1101**********002X\n".encode()
    result = profile.scan(csv, content_type="text/csv")
    assert result.action == "block" and result.findings[0].type == "field_name"


BAD = """\
rules:
  - id: ok-rule
    detectors: [cn_mobile]
    action: warn
    examples: {match: ["13800138000"]}
  - id: bad-rule
    detectors: [cn_mobil]
    action: blok
    min_count: 0
    patterns: ["([a-z"]
    examples: {match: []}
  - id: ok-rule
    keywords: [x]
    action: audit
    examples: {match: ["x"]}
profiles:
  p:
    rules: [ok-rule, missing-rule]
    uninspectable: allow
"""


def test_errors_carry_file_line_and_key_path(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(BAD)
    with pytest.raises(DlpConfigError) as caught:
        load_rules(path)
    errors = caught.value.errors
    expected = [
        f"{path}:7: rules[1].detectors[0]: unknown detector 'cn_mobil'",
        f"{path}:10: rules[1].patterns[0]: invalid pattern",
        f"{path}:11: rules[1].examples.match: at least one example",
        f"{path}:9: rules[1].min_count: must be an integer >= 1 (got 0)",
        f"{path}:8: rules[1].action: must be one of block, redact, warn, audit (got 'blok')",
        f"{path}:12: rules[2].id: duplicate rule id 'ok-rule'",
        f"{path}:18: profiles.p.rules[1]: unknown rule 'missing-rule'",
        f"{path}:19: profiles.p.uninspectable: must be one of block, warn, audit (got 'allow')",
    ]
    for prefix in expected:
        assert any(error.startswith(prefix) for error in errors), (prefix, errors)


def test_yaml_syntax_error_has_a_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("rules:\n  - id: x\n    detectors: [cn_mobile\n")
    with pytest.raises(DlpConfigError) as caught:
        load_rules(path)
    assert caught.value.errors[0].startswith(f"{path}:")
    assert "(yaml)" in caught.value.errors[0]


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(DlpConfigError, match="no such file"):
        load_rules(tmp_path / "none.yaml")
    with pytest.raises(DlpConfigError, match="no \\*.yaml rule files"):
        load_rules(tmp_path)
