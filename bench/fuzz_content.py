"""Coverage-guided fuzzing by hand (atheris; `pip install -e '.[fuzz]'`) of the targets the CI runs
briefly with hypothesis (tests/fuzzing.py): no crash, no hang (-timeout), bounded memory (-rss_limit_mb).

    .venv/bin/python bench/fuzz_content.py body   -max_total_time=600 -timeout=10 -rss_limit_mb=2048
    .venv/bin/python bench/fuzz_content.py rules  -max_total_time=300
    .venv/bin/python bench/fuzz_content.py config -max_total_time=300

Seeds (issue 20's cases) are written to a corpus folder first; findings land in the working directory.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import atheris  # noqa: E402

with atheris.instrument_imports():
    from tests import fuzzing  # noqa: E402


def body(data: bytes) -> None:
    provider = atheris.FuzzedDataProvider(data)
    content_type = fuzzing.CONTENT_TYPES[provider.ConsumeIntInRange(0, len(fuzzing.CONTENT_TYPES) - 1)]
    encoding = fuzzing.CONTENT_ENCODINGS[provider.ConsumeIntInRange(0, len(fuzzing.CONTENT_ENCODINGS) - 1)]
    fuzzing.scan_and_redact(provider.ConsumeBytes(provider.remaining_bytes()), content_type, encoding)


TARGETS = {"body": body, "rules": fuzzing.load_rules_text, "config": fuzzing.load_config_text}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(TARGETS)}}} [libFuzzer options]")
    target = TARGETS[sys.argv[1]]
    corpus = Path(tempfile.mkdtemp(prefix=f"fuzz-{sys.argv[1]}-"))
    for index, seed in enumerate(fuzzing.SEEDS):
        (corpus / f"seed-{index}").write_bytes(b"\x00\x00" + seed if target is body else seed)
    atheris.Setup([sys.argv[0], *sys.argv[2:], str(corpus)], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
