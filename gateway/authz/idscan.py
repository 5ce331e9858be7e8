"""What looks like a resident ID number in a record's values: found exactly, value by value
(`id_numbers`), or ruled out for many records at once (`no_other_subjects`), which a response of
thousands of records takes in C loops rather than a Python step per value; and masked where it is
written in a text (`mask_id_numbers`: a response's header fields)."""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Callable, Iterable

import orjson

from gateway.authz.subject import mask_id
from gateway.dlp.matcher import Matcher, PatternSpec, literal_regex

_ID_CANDIDATE = re.compile(rb"(?<![0-9])[1-8][0-9]{5}(?:18|19|20)[0-9]{2}[01][0-9][0-3][0-9]{4}[0-9Xx](?![0-9])")
_ID_CANDIDATE_TEXT = re.compile(_ID_CANDIDATE.pattern.decode(), re.ASCII)
# The characters NFKC folds into something holding an ASCII digit or X (full-width digits, circled and
# parenthesised numbers, superscripts, Roman numerals, mathematical digits, ...), as code point ranges:
# text without them shows its ID numbers in ASCII already. tests/test_consent.py recomputes them from
# unicodedata.
NFKC_DIGITS = (
    (0xb2, 0xb3), (0xb9, 0xb9), (0xbc, 0xbe), (0x2e3, 0x2e3), (0x2070, 0x2070), (0x2074, 0x2079),
    (0x2080, 0x2089), (0x2093, 0x2093), (0x213b, 0x213b), (0x2150, 0x215f), (0x2168, 0x216b), (0x2178, 0x217b),
    (0x2189, 0x2189), (0x2460, 0x249b), (0x24b3, 0x24b3), (0x24cd, 0x24cd), (0x24e7, 0x24e7), (0x24ea, 0x24ea),
    (0x3251, 0x325f), (0x32b1, 0x32cb), (0x3358, 0x3370), (0x3378, 0x3379), (0x339f, 0x33a6), (0x33a8, 0x33a8),
    (0x33af, 0x33af), (0x33d3, 0x33d3), (0x33e0, 0x33fe), (0xff10, 0xff19), (0xff38, 0xff38), (0xff58, 0xff58),
    (0x1d417, 0x1d417), (0x1d431, 0x1d431), (0x1d44b, 0x1d44b), (0x1d465, 0x1d465), (0x1d47f, 0x1d47f),
    (0x1d499, 0x1d499), (0x1d4b3, 0x1d4b3), (0x1d4cd, 0x1d4cd), (0x1d4e7, 0x1d4e7), (0x1d501, 0x1d501),
    (0x1d51b, 0x1d51b), (0x1d535, 0x1d535), (0x1d54f, 0x1d54f), (0x1d569, 0x1d569), (0x1d583, 0x1d583),
    (0x1d59d, 0x1d59d), (0x1d5b7, 0x1d5b7), (0x1d5d1, 0x1d5d1), (0x1d5eb, 0x1d5eb), (0x1d605, 0x1d605),
    (0x1d61f, 0x1d61f), (0x1d639, 0x1d639), (0x1d653, 0x1d653), (0x1d66d, 0x1d66d), (0x1d687, 0x1d687),
    (0x1d6a1, 0x1d6a1), (0x1d7ce, 0x1d7ff), (0x1f100, 0x1f10a), (0x1f127, 0x1f127), (0x1f147, 0x1f147),
    (0x1fbf0, 0x1fbf9),
)
_DIGIT_OR_X = bytes.maketrans(b"123456789Xx", b"0" * 11)  # every character an ID number is made of -> "0"
_ID_LENGTH_RUN = b"0" * 18


def id_numbers(values: Iterable[object]) -> set[str]:
    """What looks like a resident ID number (18 characters with a birth date where GB 11643 puts it) in
    these plain values, full-width forms folded. The check character is not required: the subject key
    does not require it either, and a false positive only masks a record."""
    text = "\0".join(str(v) for v in values if isinstance(v, (str, int)) and not isinstance(v, bool))
    if not text.isascii():
        text = unicodedata.normalize("NFKC", text)
    return {m.decode() for m in _ID_CANDIDATE.findall(text.encode())}


def mask_id_numbers(text: str, unconsented: Callable[[set[str]], set[str]]) -> tuple[str, int]:
    """`text` with each ID number in it (as `id_numbers` finds them, full-width forms folded) that
    `unconsented` returns, of all those found, written as the ID mask shows it (520602********123X),
    the rest of the text as it was; and how many were masked. (Each character is folded alone, so that
    a match is found where it was written; the caller checks the result with `id_numbers`.)"""
    if text.isascii():
        folded, origin = text, range(len(text))
    else:
        pieces = [unicodedata.normalize("NFKC", character) for character in text]
        folded = "".join(pieces)
        origin = [at for at, piece in enumerate(pieces) for _ in piece]  # a folded character's place in `text`
    found = list(_ID_CANDIDATE_TEXT.finditer(folded))
    masked = unconsented({match.group() for match in found}) if found else set()
    kept, at = [], 0
    for match in found:
        if match.group() in masked:
            start, end = origin[match.start()], origin[match.end() - 1] + 1
            kept += [text[at:start], mask_id(match.group().upper())]
            at = end
    return "".join(kept) + text[at:], len(kept) // 2


@functools.cache
def _nfkc_digits() -> Matcher:
    """A matcher of the UTF-8 of NFKC_DIGITS (Hyperscan: a MiB in a fraction of a millisecond)."""
    return Matcher([PatternSpec("|".join(literal_regex(chr(code)) for first, last in NFKC_DIGITS
                                         for code in range(first, last + 1)))])


def no_other_subjects(listed: list[dict] | bytes, subjects: list) -> bool:
    """True when no value of these records but their subject field's can hold an ID number, checked over
    all of them at once in their JSON (as orjson writes `listed`, or `listed` is JSON bytes holding at
    least what the records hold, every digit written as a digit: a body without \\u escapes as it was
    read), with each character NFKC folds into a digit or X (full-width digits, ...) replaced by what it
    folds into: no more runs of 18 digits or X's than the subject fields' own values make. (orjson writes
    non-ASCII text as it is; what it escapes is no digit, and an escape such as \\u0001 only lengthens a
    run; NFKC of a whole value neither joins runs nor makes digits but from these characters: a value
    naming an ID number adds at least one run.) False, when a value may name another subject or only
    seems to, sends the caller to the exact scan, record by record."""
    try:
        text = listed if isinstance(listed, bytes) else orjson.dumps(listed)
        own = orjson.dumps(subjects)
    except orjson.JSONEncodeError:  # (a lone surrogate, say): the exact scan decides
        return False
    if not text.isascii():
        # (UTF-8 is self-synchronising: a character's bytes are found only where that character is)
        for character in {text[start:end] for _, start, end in _nfkc_digits().scan(text)}:
            folded = unicodedata.normalize("NFKC", character.decode()).encode()
            text, own = text.replace(character, folded), own.replace(character, folded)
    return text.translate(_DIGIT_OR_X).count(_ID_LENGTH_RUN) == own.translate(_DIGIT_OR_X).count(_ID_LENGTH_RUN)


def warm_up() -> None:
    """Compile the matcher now (~20 ms), not in the first response's time."""
    _nfkc_digits()
