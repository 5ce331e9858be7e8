"""Word patterns (gateway/dlp/tokens.py) find what the regex engines find, and the split mobile
pattern finds what the single one did."""

import importlib.util
import os
import random
import re
import shutil
import string
import sysconfig
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from gateway.dlp import batch, tokens
from gateway.dlp.detectors import DETECTORS
from gateway.dlp.matcher import Matcher, PatternSpec

WORD_PATTERNS = [pattern for detector in DETECTORS.values() for pattern in detector.patterns
                 if tokens.word_pattern(pattern) is not None]
# Pieces a text is made of: numbers of every length near the detectors', letters, the characters
# around and inside words (_ is a word character to \b, a CJK character is not).
PIECES = ["1", "0", "9", "X", "x", "A", "Y", "_", " ", "-", ",", '"', "\n", "号", "，", "+86",
          "11010519491231002X", "110105194912310021", "13800138000", "6222021234567890128", "91350100M000100Y43",
          "18", "19", "20", "210105184912310021"]


def texts(count: int) -> list[bytes]:
    rng = random.Random(18)
    out = []
    for _ in range(count):
        pieces = [rng.choice(PIECES) for _ in range(rng.randint(1, 12))]
        # and runs of random digits of every length near 11-19
        pieces += ["".join(rng.choice("0123456789") for _ in range(rng.randint(9, 21)))]
        rng.shuffle(pieces)
        out.append("".join(pieces).encode())
    return out


def test_the_bulk_forms_are_word_patterns():
    """The forms a bulk export holds in every record are found without a regex engine."""
    assert len(WORD_PATTERNS) == 4  # ID number, credit code, card and mobile number as one run


@pytest.mark.parametrize("pattern", WORD_PATTERNS)
def test_word_pattern_finds_what_re_finds(pattern, monkeypatch):
    monkeypatch.setattr(tokens, "_PIECE", 8)  # many pieces, cut at every place they can be
    form = tokens.word_pattern(pattern)
    compiled = re.compile(pattern.encode())
    for text in texts(3000):
        expected = [m.span() for m in compiled.finditer(text)]
        assert sorted((start, end) for _, start, end in tokens.scan({0: form}, text).tolist()) == expected, text


@pytest.mark.skipif(tokens.kernels is None, reason="the C kernels are not compiled here (no compiler at install)")
def test_the_c_kernel_finds_what_numpy_finds_in_text_order():
    """Every word pattern at once, as a matcher holds them (indexes with gaps: the other patterns'),
    in text order; and the kernel is what a matcher uses where it is compiled."""
    words = {index * 2 + 1: tokens.word_pattern(pattern) for index, pattern in enumerate(WORD_PATTERNS)}
    native, fallback = tokens.Words(words), tokens.Words(words, native=False)
    assert native._kernel is not None and fallback._kernel is None
    found = 0
    for text in texts(3000) + [b"", b"-" * 40, ("\u53f7" * 9 + "110105194912310021").encode()]:
        rows = native.scan(text).tolist()
        assert sorted(rows, key=lambda row: (row[1], row[0])) == rows, text
        assert sorted(rows) == sorted(fallback.scan(text).tolist()), text
        found += len(rows)
    assert found > 1000
    assert Matcher([PatternSpec(pattern) for pattern in WORD_PATTERNS])._words._kernel is not None


@pytest.mark.skipif(tokens.kernels is None, reason="the C kernels are not compiled here (no compiler at install)")
def test_the_c_kernels_refuse_what_would_read_outside_the_text():
    kernels, tables = tokens.kernels, batch.KERNEL_TABLES
    one, far = np.array([1], dtype=np.int64), np.array([19], dtype=np.int64)
    with pytest.raises(ValueError, match="outside the text"):
        kernels.check(tables, 1, b"110105194912310021", one, far, 20261206)
    with pytest.raises(ValueError, match="as many"):
        kernels.check(tables, 1, b"110105194912310021", one, np.zeros(2, dtype=np.int64), 20261206)
    with pytest.raises(ValueError, match="int64"):
        kernels.check(tables, 3, b"13800138000", b"\0" * 7, b"\0" * 7, 20261206)
    with pytest.raises(ValueError, match="no such check"):
        kernels.check(tables, 9, b"13800138000", one, one, 20261206)
    with pytest.raises(ValueError, match="alternation outside"):
        kernels.compile_words(bytes(256 * 8), [(0, 2, bytes(16), ((1, 2, bytes(8)),))])
    patterns = np.array([[0, 60, 1, 1]], dtype=np.int64)
    for rows in ([[0, 0, 19]], [[1, 0, 18]], [[0, 5, 18], [0, 0, 4]]):  # past the end, no such pattern, not in order
        with pytest.raises(ValueError, match="words of the text"):
            kernels.settle_words(tables, b"110105194912310021", np.array(rows, dtype=np.int64), patterns, 20261206)
    for spans in ((one, far), (far, one), (np.array([-1], dtype=np.int64), one)):  # past the end, reversed, before
        with pytest.raises(ValueError, match="outside the text"):
            kernels.repeated_spans(b"110105194912310021", *spans, [])
        with pytest.raises(ValueError, match="outside the text"):
            kernels.span_bytes(b"110105194912310021", *spans)
        with pytest.raises(ValueError, match="outside the text"):
            kernels.join_spans(b"110105194912310021", *spans)
    with pytest.raises(ValueError, match="within the data"):
        kernels.blank_strings(b'"a"', 2, 4, False, b"[]")
    with pytest.raises(ValueError, match="wrong size"):
        kernels.fold_starts(bytes(10), "１".encode())
    with pytest.raises(OverflowError):
        kernels.place_lines(b'"body"', [1, -1])
    with pytest.raises(ValueError, match="256 flags"):
        kernels.json_keys(b'{"a":1}', bytes(255))



@pytest.mark.parametrize("engine", ["hyperscan", "re"])
def test_matcher_reports_word_matches_with_the_others(engine):
    specs = [PatternSpec(pattern) for pattern in DETECTORS["cn_mobile"].patterns]
    hits = Matcher(specs, engine).scan(b"tel 13800138000, +86 139-0013-9000; x13800138000")
    assert sorted(map(tuple, hits.tolist())) == [(0, 4, 15), (1, 17, 34)]


def test_past_64_byte_classes_a_pattern_stays_with_the_regex_engine(monkeypatch):
    """Word patterns share 64 class bits (tokens._class_bit): one needing a 65th is not a word pattern."""
    monkeypatch.setattr(tokens, "_CLASS_BIT", {})
    monkeypatch.setattr(tokens, "_CLASS_BITS", np.zeros(256, dtype=np.uint64))
    classes = [f"[0-{digit}]" for digit in string.digits] + [f"[A-{letter}]" for letter in string.ascii_uppercase] \
        + [f"[a-{letter}]" for letter in string.ascii_lowercase] + ["[0-9A-Z]", "[0-9a-z]"]
    assert len(classes) == 64
    assert all(tokens.word_pattern(rf"\b{cls}{{4}}\b") is not None for cls in classes)
    assert tokens.word_pattern(r"\b[0-9_]{4}\b") is None
    form = tokens.word_pattern(r"\b[A-C]{4}\b")  # a class given a bit before
    assert tokens.scan({0: form}, b"ABCA ABCD CCCC").tolist() == [[0, 0, 4], [0, 10, 14]]


def test_patterns_that_are_not_one_word_stay_with_the_regex_engine():
    for pattern in (r"\b[0-9]{4}[ \-][0-9]{4}\b", r"[0-9]{11}", r"\b[0-9]+\b", r"\b(?:E[0-9]{8}|G[0-9]{7})\b",
                    r"\b[0-9.]{8}\b"):
        assert tokens.word_pattern(pattern) is None, pattern


MOBILE = (r"(?:(?:\+|\b00)86[ \-]?|\b)1[3-9][0-9][ \-]?[0-9]{4}[ \-]?[0-9]{4}\b")  # as one pattern, before


def test_the_split_mobile_patterns_match_what_the_single_one_did():
    plain, rest = (re.compile(p) for p in DETECTORS["cn_mobile"].patterns)
    single = re.compile(MOBILE)
    rng = random.Random(18)
    for _ in range(20000):
        text = "".join(rng.choice(["+", "00", "86", " ", "-", "1", "3", "8", "0013", "8000", "x", "9"])
                       for _ in range(rng.randint(1, 10)))
        assert bool(single.fullmatch(text)) == bool(plain.fullmatch(text) or rest.fullmatch(text)), text


@pytest.mark.parametrize("engine", ["hyperscan", "re"])
def test_words_are_found_from_the_first_long_one_in_large_texts(engine):
    """Past 64 KiB a Hyperscan pass finds where the first word long enough starts, and numpy reads
    from there: words after it, and a text holding none, are answered as by the regex."""
    prose = "无敏感内容的普通文本，编号2025。".encode() * 5000  # ~140 KB, words of 4 characters only
    specs = [PatternSpec(pattern) for pattern in DETECTORS["cn_mobile"].patterns]
    matcher = Matcher(specs, engine)
    assert len(matcher.scan(prose)) == 0
    text = prose + b" 13800138000 " + prose + b"x13900139000 13900139000"
    first = len(prose) + 1
    assert sorted(map(tuple, matcher.scan(text).tolist())) == [
        (0, first, first + 11), (0, len(text) - 11, len(text))]


def test_words_are_read_in_bounded_memory():
    """Text of many short words (hostile, or a table of small numbers) is read by pieces: the words'
    edges would otherwise take 8 bytes for every 2 of text."""
    data = b"13800138000 " + b"a " * (4 << 20)  # a long word first: all of it is read
    matcher = Matcher([PatternSpec(pattern) for pattern in DETECTORS["cn_mobile"].patterns], "hyperscan")
    tracemalloc.start()
    try:
        found = matcher.scan(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * len(data), peak
    assert found.tolist() == [[0, 0, 11]]


def test_the_c_kernels_are_compiled_where_a_compiler_and_the_python_headers_are():
    """The kernels are optional at install (a machine without a compiler gets the numpy fallback): where
    both are present, as where CI runs, an install that left them out is a broken build, not a fallback."""
    compiler = shutil.which(sysconfig.get_config_var("CC").split()[0] if sysconfig.get_config_var("CC") else "cc")
    headers = Path(sysconfig.get_paths()["include"], "Python.h").exists()
    if not (compiler and headers):
        pytest.skip(f"no compiler ({compiler}) or no Python.h ({headers}): the numpy fallback runs here")
    assert importlib.util.find_spec("gateway.dlp._kernels") is not None, \
        "gateway/dlp/_kernels.c was not compiled: `pip install -e .` printed why"
    if os.environ.get("GATEWAY_DLP_KERNELS", "").lower() not in ("off", "0", "no"):
        assert tokens.kernels is not None, "compiled, but not imported: gateway/dlp/native.py"
