"""The detectors' checks run over many candidates at once (numpy), for the forms a bulk export holds.

A JSON or CSV export has an ID number and a mobile number in every record: tens of thousands of
candidates per body, each costing microseconds of Python in validators.py. Here the candidates of
one detector are checked together, as rows of a matrix of their bytes: an ID number, a credit code,
a mobile number and a card number written as one run of characters. Any other form (grouped, with
+86, a detector without a batch check) goes through the detector's own check, value by value;
validators.py stays the reference (and what `gateway dlp explain` shows), and
tests/test_dlp_batch.py holds both to the same answers.

Where the C kernels (gateway/dlp/_kernels.c) are compiled, they run these checks, a loop per
detector instead of a numpy pass per step; the numpy checks below are the fallback, held to the
same answers.
"""

from datetime import date

import numpy as np

from gateway.dlp import validators as v
from gateway.dlp.detectors import DETECTORS
from gateway.dlp.native import kernels

_ZERO = ord("0")


def _table(size: int, members) -> np.ndarray:
    table = np.zeros(size, dtype=bool)
    table[list(members)] = True
    return table


_PROVINCES = _table(100, map(int, v.PROVINCE_CODES))
_MOBILE_PREFIXES = _table(1000, map(int, v.MOBILE_PREFIXES))
_ID_WEIGHTS = np.array([7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2], dtype=np.int64)
_ID_CHECK = np.frombuffer(b"10X98765432", dtype=np.uint8)
_DAYS = np.array([0, 31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31], dtype=np.int64)  # February: leap years
_USCC_VALUE = np.full(256, -1, dtype=np.int64)
_USCC_VALUE[np.frombuffer(v.USCC_CHARS.encode(), dtype=np.uint8)] = np.arange(len(v.USCC_CHARS))
_USCC_CHARS = np.frombuffer(v.USCC_CHARS.encode(), dtype=np.uint8)
_USCC_WEIGHTS = np.array([1, 3, 9, 27, 19, 26, 16, 17, 20, 29, 25, 13, 8, 24, 10, 30, 28], dtype=np.int64)
_ORG_WEIGHTS = np.array([3, 7, 9, 10, 5, 8, 4, 2], dtype=np.int64)
_ORG_CHECK = np.frombuffer(b"?123456789X0", dtype=np.uint8)  # indexed by 11 - total % 11 (1..11)
_USCC_CATEGORY = np.zeros((256, 256), dtype=bool)
for _authority, _categories in v._USCC_AUTHORITIES.items():
    _USCC_CATEGORY[ord(_authority), list(_categories.encode())] = True


def valid(name: str, data: bytes, starts: np.ndarray, ends: np.ndarray, today: date | None = None) -> np.ndarray:
    """Whether each candidate data[starts[i]:ends[i]] of detector `name` passes its checks, as
    DETECTORS[name].valid(token) would say."""
    buf = np.frombuffer(data, dtype=np.uint8)
    result = np.zeros(len(starts), dtype=bool)
    lengths = ends - starts
    done = np.zeros(len(starts), dtype=bool)
    for length, check in _BATCH.get(name, {}).items():
        rows = np.flatnonzero(lengths == length) if isinstance(length, int) else np.flatnonzero(
            (lengths >= length[0]) & (lengths <= length[1]))
        if len(rows):
            checked, answer = check(buf, starts[rows], ends[rows], today)
            result[rows[checked]] = answer
            done[rows[checked]] = True
    detector = DETECTORS[name]
    for row in np.flatnonzero(~done).tolist():  # the other forms, value by value
        result[row] = detector.valid(data[starts[row]:ends[row]].decode("utf-8", "replace"))
    return result


def matrix(buf: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
    """The `length` bytes of `buf` (uint8) from each of `starts`, one row each: rows of a view with a row at
    every byte, so no index per byte (made directly: sliding_window_view's checks cost more than the rows
    of a small body)."""
    return np.ndarray((max(len(buf) - length + 1, 0), length), np.uint8, buf, 0, (1, 1))[starts]


def _all_digits(chars: np.ndarray) -> np.ndarray:
    return ((chars >= _ZERO) & (chars <= _ZERO + 9)).all(axis=1)


def _id_card(buf, starts, ends, today):
    """check_id_card over 18-character candidates: all are decided here."""
    chars = matrix(buf, starts, 18)
    digits = chars[:, :17].astype(np.int64) - _ZERO
    last = chars[:, 17]
    shaped = _all_digits(chars[:, :17]) & (((last >= _ZERO) & (last <= _ZERO + 9)) | (last == ord("X"))
                                           | (last == ord("x")))
    digits = np.where(shaped[:, None], digits, 0)  # keep table lookups in range
    region = _PROVINCES[digits[:, 0] * 10 + digits[:, 1]]
    year = digits[:, 6] * 1000 + digits[:, 7] * 100 + digits[:, 8] * 10 + digits[:, 9]
    month = digits[:, 10] * 10 + digits[:, 11]
    day = digits[:, 12] * 10 + digits[:, 13]
    leap = (year % 4 == 0) & ((year % 100 != 0) | (year % 400 == 0))
    month_days = _DAYS[np.clip(month, 0, 12)] - ((month == 2) & ~leap)
    real_date = (year >= 1) & (month >= 1) & (month <= 12) & (day >= 1) & (day <= month_days)
    today = today or date.today()
    born = year * 10000 + month * 100 + day
    in_range = (born >= 19000101) & (born <= today.year * 10000 + today.month * 100 + today.day)
    check = _ID_CHECK[(digits @ _ID_WEIGHTS) % 11]
    upper = np.where(last == ord("x"), ord("X"), last)
    return np.ones(len(starts), dtype=bool), shaped & region & real_date & in_range & (check == upper)


def _uscc(buf, starts, ends, today):
    """check_uscc over 18-character candidates: all are decided here."""
    chars = matrix(buf, starts, 18)
    values = _USCC_VALUE[chars]
    alphabet = (values >= 0).all(axis=1)
    category = _USCC_CATEGORY[chars[:, 0], chars[:, 1]]
    division_digits = _all_digits(chars[:, 2:8])
    division = division_digits & _PROVINCES[np.where(division_digits, (chars[:, 2].astype(np.int64) - _ZERO) * 10
                                                     + chars[:, 3] - _ZERO, 0)]
    org = chars[:, 8:16].astype(np.int64)
    org_values = np.where(org <= _ZERO + 9, org - _ZERO, org - 55)
    org_check = _ORG_CHECK[11 - (org_values @ _ORG_WEIGHTS) % 11]
    check = _USCC_CHARS[(31 - (np.where(values[:, :17] >= 0, values[:, :17], 0) @ _USCC_WEIGHTS) % 31) % 31]
    return np.ones(len(starts), dtype=bool), alphabet & category & division & (org_check == chars[:, 16]) \
        & (check == chars[:, 17])


def _mobile(buf, starts, ends, today):
    """_check_mobile over 11-character candidates that are all digits (others: value by value)."""
    chars = matrix(buf, starts, 11)
    plain = _all_digits(chars)
    prefix = (chars[:, 0].astype(np.int64) - _ZERO) * 100 + (chars[:, 1] - _ZERO) * 10 + (chars[:, 2] - _ZERO)
    return plain, _MOBILE_PREFIXES[np.where(plain, prefix, 0)][plain]


def _card(buf, starts, ends, today):
    """_check_card over runs of 15-19 digits (others: value by value)."""
    checked = np.zeros(len(starts), dtype=bool)
    answers = np.zeros(len(starts), dtype=bool)
    lengths = ends - starts
    for length in range(15, 20):
        rows = np.flatnonzero(lengths == length)
        if not len(rows):
            continue
        chars = matrix(buf, starts[rows], length)
        plain = _all_digits(chars)
        digits = chars[plain].astype(np.int64) - _ZERO
        prefixes = {k: digits[:, :k] @ (10 ** np.arange(k - 1, -1, -1)) for k in range(1, 5)}
        branded = np.zeros(len(digits), dtype=bool)
        for _, ranges, brand_lengths in v._CARD_BRANDS:
            if length in brand_lengths:
                for low, high in ranges:
                    prefix = prefixes[len(low)]
                    branded |= (prefix >= int(low)) & (prefix <= int(high))
        reversed_digits = digits[:, ::-1]
        doubled = reversed_digits[:, 1::2] * 2
        total = reversed_digits[:, ::2].sum(axis=1) + np.where(doubled > 9, doubled - 9, doubled).sum(axis=1)
        checked[rows[plain]] = True
        answers[rows[plain]] = branded & (total % 10 == 0)
    return checked, answers[checked]


# The kernels' checks (gateway/dlp/_kernels.c), by the number its enum gives each; their tables.
KERNEL_KINDS = {"cn_id_card": 1, "cn_uscc": 2, "cn_mobile": 3, "bank_card": 4}
KERNEL_TABLES = None if kernels is None else kernels.compile_checks(
    _PROVINCES.tobytes(), _MOBILE_PREFIXES.tobytes(), _USCC_VALUE.astype(np.int8).tobytes(), _USCC_CATEGORY.tobytes(),
    # (low, high, prefix digits, bit mask of the lengths) per brand's prefix range
    np.array([(int(low), int(high), len(low), sum(1 << length for length in lengths))
              for _, ranges, lengths in v._CARD_BRANDS for low, high in ranges], dtype=np.int64).tobytes())


def day_number(today: date | None) -> int:
    """A day as the number yyyymmdd (today by default), as the kernels compare birth dates."""
    today = today or date.today()
    return today.year * 10000 + today.month * 100 + today.day


def _kernel_check(kind: int):
    def check(buf, starts, ends, today):
        codes = np.frombuffer(kernels.check(KERNEL_TABLES, kind, buf, np.ascontiguousarray(starts, dtype=np.int64),
                                            np.ascontiguousarray(ends, dtype=np.int64), day_number(today)),
                              dtype=np.uint8)
        decided = codes != 2  # 2: a form the detector's own check reads
        return decided, codes[decided] == 1
    return check


# Per detector: candidate length (or inclusive range) -> check(buf, starts, ends, today) returning
# (which candidates it decided, their answers).
NUMPY_CHECKS = {
    "cn_id_card": {18: _id_card},
    "cn_uscc": {18: _uscc},
    "cn_mobile": {11: _mobile},
    "bank_card": {(15, 19): _card},
}
KERNEL_CHECKS = {name: {length: _kernel_check(KERNEL_KINDS[name]) for length in lengths}
                 for name, lengths in NUMPY_CHECKS.items()}
_BATCH = NUMPY_CHECKS if kernels is None else KERNEL_CHECKS
