"""Full-width folding: UTF-8 text as the matcher reads it, with full-width digits, letters and the
separators next to them written as ASCII, and offsets in it mapped back to the text as written.

The characters to fold are found in C (gateway/dlp/_kernels.c fold_starts), or where it was not
compiled by a regex in small texts and with numpy in larger ones (one pass over the bytes for the first
bytes of U+FFxx and U+3000, tables for those few); a text without any is not copied.
"""

import bisect
import re
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gateway.dlp.native import kernels

# Full-width forms a value can be written with fold to ASCII: digits and letters, and the separators
# the detectors read (+ - . @ _ % and parentheses, the ideographic space to a space) where they touch a
# digit or a letter. Other full-width punctuation (，：；！？＂) and separators elsewhere (an indenting
# space, parentheses around words) are left as written: they end a token either way, and folding them
# would copy every Chinese text (a full-width quote or comma would even look like JSON or CSV structure).
_FOLDED_FORMS = "０１２３４５６７８９ＡＢＣＤＥＦＧＨＩＪＫＬＭＮＯＰＱＲＳＴＵＶＷＸＹＺａｂｃｄｅｆｇｈｉｊｋｌｍｎｏｐｑｒｓｔｕｖｗｘｙｚ" \
    "＋－．＠＿％（）\u3000"
_FOLDS = {form.encode(): (" " if form == "\u3000" else chr(ord(form) - 0xFEE0)).encode() for form in _FOLDED_FORMS}
assert all(len(form) == 3 for form in _FOLDS)  # each fold takes 2 bytes out (see Folded.unfolded)
_ALNUM = rb"[0-9A-Za-z]"
_FULL_WIDTH_ALNUM = rb"(?:\xef\xbc[\x90-\x99\xa1-\xba]|\xef\xbd[\x81-\x9a])"
_SEPARATOR = rb"(?:\xef\xbc[\x85\x88\x89\x8b\x8d\x8e\xa0\xbf]|\xe3\x80\x80)"  # ＋－．＠＿％（） and U+3000
assert len(re.findall(_FULL_WIDTH_ALNUM + b"|" + _SEPARATOR, _FOLDED_FORMS.encode())) == len(_FOLDS)
# For Python's re (small texts), every alternative starts with a separator's or a full-width form's first
# byte (a lookbehind first would make it try every position): 10x quicker.
_FOLDABLE = re.compile(_FULL_WIDTH_ALNUM + b"|" + _SEPARATOR + b"(?:(?=" + _ALNUM + b"|" + _FULL_WIDTH_ALNUM
                       + b")|(?<=" + _ALNUM + b"...)|(?<=" + _FULL_WIDTH_ALNUM + b"...))")
# The same for numpy (larger texts): what each character's 3 bytes are (see _fold_starts).
_IS_FORM, _IS_SEPARATOR = 1, 2


def _kind_at(code):
    """Where a character's kind is in _FOLD_KIND, from its first 3 bytes read as a little-endian number
    (an int or an array): its 2nd and 3rd bytes, and one bit telling its 1st (0xEF from 0xE3)."""
    return (code >> 8 & 0xFFFF) | (code & 4) << 14


_FOLD_KIND = np.zeros(2 << 16, dtype=np.uint8)
for _form in _FOLDS:
    _FOLD_KIND[_kind_at(int.from_bytes(_form, "little"))] = \
        _IS_FORM if re.fullmatch(_FULL_WIDTH_ALNUM, _form) else _IS_SEPARATOR
_FOLD_KIND_TABLE = _FOLD_KIND.tobytes()  # for the C kernel
_ASCII_ALNUM = np.zeros(256, dtype=bool)
_ASCII_ALNUM[[byte for byte in range(128) if re.fullmatch(_ALNUM, bytes([byte]))]] = True
_NUMPY_FOLD_FROM = 4096  # (at least 4 bytes) below this, the regex's search is quicker than numpy's fixed costs


@dataclass(frozen=True)
class Folded:
    """A UTF-8 text with its full-width forms folded, and where each folded character is in it."""
    data: bytes
    positions: Sequence[int]  # offsets in `data` of the folded characters, rising

    def unfolded(self, offset: int) -> int:
        """The offset in the text as written of an offset in the folded data."""
        return offset + 2 * bisect.bisect_left(self.positions, offset)


def fold(data: bytes) -> Folded | None:
    """UTF-8 text as the matcher reads it (see _FOLDED_FORMS); None when nothing in it needs folding,
    the usual case, which costs a search and no copy."""
    if b"\xef" not in data and b"\xe3\x80\x80" not in data:  # memchr first: most texts have neither
        return None
    if kernels is not None:
        starts = memoryview(kernels.fold_starts(_FOLD_KIND_TABLE, data)).cast("q").tolist()
    elif len(data) < _NUMPY_FOLD_FROM:
        starts = [match.start() for match in _FOLDABLE.finditer(data)]
    else:
        starts = _fold_starts(data)
    if not starts:
        return None
    parts: list[bytes | memoryview] = [b""] * (2 * len(starts) + 1)  # text, folded form, text, ..., text
    view = memoryview(data)  # the text between folds is copied once, by the join
    parts[0::2] = [view[begin:end] for begin, end in zip([0, *(start + 3 for start in starts)], [*starts, len(data)])]
    parts[1::2] = [_FOLDS[data[start:start + 3]] for start in starts]
    return Folded(b"".join(parts), array("q", (start - 2 * index for index, start in enumerate(starts))))


def folded(data: bytes) -> bytes:
    """`data` folded, or itself when nothing in it needs folding."""
    found = fold(data)
    return data if found is None else found.data


def _fold_starts(data: bytes) -> list[int]:
    """Where the characters _FOLDABLE finds start, found with numpy: one pass over the bytes for the
    first bytes of full-width forms and of the ideographic space (U+FFxx, U+3000), then tables over
    those few (in Chinese text, mostly punctuation left as written)."""
    buf = np.frombuffer(data, dtype=np.uint8)
    size = len(buf)
    leads = np.flatnonzero((buf[:size - 2] == 0xEF) | (buf[:size - 2] == 0xE3))  # with 3 bytes from there
    codes = np.ndarray((size - 3,), np.dtype("<u4"), data, 0, (1,))[np.minimum(leads, size - 4)]  # 4 bytes each
    if len(leads) and leads[-1] == size - 3:  # no 4th byte
        codes[-1] = int.from_bytes(data[-3:], "little")
    kind = _FOLD_KIND[_kind_at(codes)]
    forms, separators = leads[kind == _IS_FORM], leads[kind == _IS_SEPARATOR]
    if not len(separators):
        return forms.tolist()
    after, before = separators + 3, separators - 1  # a separator is folded next to a letter or digit
    touching = ((after < size) & _ASCII_ALNUM[buf[np.minimum(after, size - 1)]]) \
        | ((before >= 0) & _ASCII_ALNUM[buf[np.maximum(before, 0)]]) \
        | _among(forms, after) | _among(forms, separators - 3)
    return np.union1d(forms, separators[touching]).tolist()


def _among(rising: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Which `values` are in the sorted array `rising`."""
    if not len(rising):
        return np.zeros(len(values), dtype=bool)
    at = np.minimum(np.searchsorted(rising, values), len(rising) - 1)
    return rising[at] == values
