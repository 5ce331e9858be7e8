"""Built-in detectors: a candidate pattern, a validation, a mask, and the field names that hint at them.

Patterns are written in the subset shared by Hyperscan and Python `re` and run over UTF-8 bytes, so
`\\b` has its ASCII meaning in both engines: a number only matches as a whole token (a CJK character
next to it is a boundary, a letter or digit is not). Patterns only find candidates; every candidate
then goes through the detector's checks.
"""

import re
from dataclasses import dataclass, field
from typing import Callable

from gateway.dlp import validators as v
from gateway.dlp.validators import Steps


def mask_middle(value: str, keep_start: int, keep_end: int) -> str:
    """Mask the letters and digits of `value` except the first and last few; separators stay."""
    if value.isalnum():  # no separator (most values): slices
        hidden = range(len(value))[keep_start: len(value) - keep_end if keep_end else None]
        return value[:hidden.start] + "*" * len(hidden) + value[hidden.stop:] if hidden else value
    positions = [i for i, c in enumerate(value) if c.isalnum()]
    hidden = set(positions[keep_start: len(positions) - keep_end] if keep_end else positions[keep_start:])
    return "".join("*" if i in hidden else c for i, c in enumerate(value))


def _digits(token: str) -> str:
    return "".join(c for c in token if c.isdigit())


def _mobile_digits(token: str) -> tuple[str, bool]:
    """The 11 national digits and whether the separators were consistent (3-4-4, one kind)."""
    body = token
    for prefix in ("+86", "0086"):
        if body.startswith(prefix):
            body = body[len(prefix):].lstrip(" -")
            break
    digits = _digits(body)
    separators = {c for c in body if not c.isdigit()}
    consistent = not separators or (len(separators) == 1 and len(body) == 13 and body[3] == body[8] != body[4])
    return digits, consistent


def _check_mobile(token: str) -> Steps:
    digits, consistent = _mobile_digits(token)
    return [("separators, if any, group the number 3-4-4", consistent)] + (v.check_mobile(digits) if consistent else [])


# An ID number may be written in groups, 6-8-4 or 6-4-4-4, with spaces, hyphens or ideographic spaces.
_ID_SEPARATORS = frozenset(" -\u3000")


def _check_id_card(token: str) -> Steps:
    separators = {c for c in token if c in _ID_SEPARATORS}
    if not separators:
        return v.check_id_card(token)
    groups = [len(group) for group in re.split("[ \\-\u3000]", token)]
    grouped = len(separators) == 1 and groups in ([6, 8, 4], [6, 4, 4, 4])
    steps: Steps = [("grouped 6-8-4 or 6-4-4-4 with one kind of separator", grouped)]
    return steps + v.check_id_card("".join(c for c in token if c not in _ID_SEPARATORS)) if grouped else steps


def _check_card(token: str) -> Steps:
    separators = {c for c in token if not c.isdigit()}
    steps: Steps = [("written as one run or in groups of four", not separators or len(separators) == 1)]
    return steps + v.check_bank_card(_digits(token)) if steps[0][1] else steps


def _check_landline(token: str) -> Steps:
    if token.startswith("("):
        area, number = token[1:].split(")", 1)
    else:
        area, number = token[: token.index(next(c for c in token if not c.isdigit()))], token
        number = number[len(area) + 1:]
    return v.check_landline(area, number.strip(" -"))


def _mask_email(token: str) -> str:
    local, _, domain = token.rpartition("@")
    return local[:1] + "*" * max(len(local) - 1, 1) + "@" + domain


def _mask_ipv4(token: str) -> str:
    parts = token.split(".")
    return ".".join(parts[:2] + ["*" * len(p) for p in parts[2:]])


@dataclass(frozen=True)
class Detector:
    name: str
    description: str
    patterns: tuple[str, ...]
    check: Callable[[str], Steps]
    mask: Callable[[str], str]
    priority: int                 # wins when two detectors claim overlapping text
    hint_fields: frozenset[str] = field(default_factory=frozenset)
    context_words: tuple[str, ...] = ()  # when set, a hinting field name or one of these words nearby is required
    group_separators: bytes = b""  # a grouped match continued by one of these and a digit is part of a longer number
    extend_left: frozenset[int] = frozenset()  # bytes a match is grown over, leftwards, before validation
    # Scanned by Hyperscan with a database of its own: the e-mail pattern merged with the class-only number
    # patterns made the shared automaton about 10x slower on CJK text (2.5 ms against 0.2 + 0.1 ms per MiB).
    own_database: bool = False
    # The mask of a token of ASCII digits depends on its length only (it hides the same positions):
    # the findings a scan keeps are masked a length at a time (see masks_of()).
    mask_by_length: bool = False

    def valid(self, token: str) -> bool:
        return all(ok for _, ok in self.check(token))


def _hints(*names: str) -> frozenset[str]:
    return frozenset(n.lower() for n in names)


_NUMBER_SEP = r"[ \-]"
_ID_SEP = r"(?:[ \-]|\xe3\x80\x80)"  # or U+3000, in UTF-8 (an ideographic space is folded only beside full-width digits)
# An ID number written in groups (6-8-4 or 6-4-4-4), as a pattern over UTF-8 (the consent stage finds it too)
ID_CARD_GROUPED = rf"[1-8][0-9]{{5}}{_ID_SEP}(?:18|19|20)[0-9]{{2}}{_ID_SEP}?[01][0-9][0-3][0-9]{_ID_SEP}[0-9]{{3}}[0-9Xx]"
_PROVINCE_ALTERNATION = "(?:" + "|".join(v.PLATE_PROVINCES) + ")"

DETECTORS: dict[str, Detector] = {d.name: d for d in (
    Detector(
        "cn_id_card", "18-character resident ID number (GB 11643)",
        (r"\b[1-8][0-9]{5}(?:18|19|20)[0-9]{2}[01][0-9][0-3][0-9]{4}[0-9Xx]\b",
         rf"\b{ID_CARD_GROUPED}\b"),
        _check_id_card, lambda t: mask_middle(t, 4, 4), priority=60, group_separators=b" -", mask_by_length=True,
        hint_fields=_hints("sfzh", "sfz", "sfzhm", "zjhm", "idcard", "id_card", "idno", "id_no", "idnumber",
                           "id_number", "identity", "身份证", "身份证号", "身份证号码", "证件号", "证件号码"),
    ),
    Detector(
        "cn_uscc", "unified social credit code (GB 32100, embedded GB 11714 organisation code)",
        (r"\b[1-9ANY][1-9][0-9]{6}[0-9A-HJ-NPQRTUWXY]{10}\b",),
        v.check_uscc, lambda t: mask_middle(t, 4, 4), priority=50, mask_by_length=True,
        hint_fields=_hints("uscc", "tyshxydm", "xydm", "credit_code", "统一社会信用代码", "信用代码"),
    ),
    Detector(
        "bank_card", "payment card number (issuer prefix, length, Luhn)",
        (r"\b[0-9]{15,19}\b", rf"\b[0-9]{{4}}{_NUMBER_SEP}[0-9]{{4}}{_NUMBER_SEP}[0-9]{{4}}{_NUMBER_SEP}[0-9]{{4}}"
                              rf"(?:{_NUMBER_SEP}[0-9]{{1,3}})?\b"),
        _check_card, lambda t: mask_middle(t, 4, 4), priority=40, group_separators=b" -", mask_by_length=True,
        hint_fields=_hints("yhkh", "bankcard", "bank_card", "card_no", "cardno", "card_number", "银行卡号", "卡号"),
    ),
    Detector(
        "cn_mobile", "mainland mobile number (allocated prefix, optional +86)",
        # as one run of digits (gateway/dlp/tokens.py finds those), or with +86 or separators
        (r"\b1[3-9][0-9]{9}\b",
         rf"(?:(?:\+|\b00)86{_NUMBER_SEP}?1[3-9][0-9]{_NUMBER_SEP}?[0-9]{{4}}{_NUMBER_SEP}?"
         rf"|\b1[3-9][0-9](?:{_NUMBER_SEP}[0-9]{{4}}{_NUMBER_SEP}?|[0-9]{{4}}{_NUMBER_SEP}))[0-9]{{4}}\b"),
        _check_mobile, lambda t: mask_middle(t, len(_digits(t)) - 8, 4), priority=30, group_separators=b"-", mask_by_length=True,
        hint_fields=_hints("sjhm", "sjh", "mobile", "phone", "cellphone", "tel", "lxdh", "手机", "手机号",
                           "手机号码", "电话", "联系电话"),
    ),
    Detector(
        "cn_landline", "mainland landline number with area code",
        (r"(?:\(0[1-9][0-9]{1,2}\)|\b0[1-9][0-9]{1,2}[ \-])[ \-]?[2-9][0-9]{6,7}\b",),
        _check_landline, lambda t: mask_middle(t, 3, 2), priority=20,
        hint_fields=_hints("tel", "phone", "dh", "gddh", "电话", "座机", "固定电话", "联系电话"),
    ),
    Detector(
        "cn_passport", "passport number of the People's Republic of China",
        (r"\b(?:E[0-9A-HJ-NP-Z][0-9]{7}|[EG][0-9]{8}|[DSP][0-9]{8})\b",),
        v.check_passport, lambda t: mask_middle(t, 2, 2), priority=10,
        hint_fields=_hints("passport", "passport_no", "hzhm", "hzh", "护照", "护照号", "护照号码"),
        context_words=("护照", "passport"),
    ),
    Detector(
        "cn_license_plate", "vehicle licence plate",
        (_PROVINCE_ALTERNATION + r"[A-HJ-NP-Z][0-9A-HJ-NP-Z]{5,6}\b",),
        v.check_license_plate, lambda t: mask_middle(t, 2, 2), priority=10,
        hint_fields=_hints("cph", "cphm", "plate", "plate_no", "车牌", "车牌号", "车牌号码"),
    ),
    Detector(
        "email", "e-mail address",
        # the local part is grown leftwards in Python: bounded repeats before '@' are too large for Hyperscan
        (r"[A-Za-z0-9._%+\-]@[A-Za-z0-9][A-Za-z0-9.\-]*\.[A-Za-z]{2,24}\b",),
        v.check_email, _mask_email, priority=10, own_database=True, extend_left=frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ"
                                                                      b"abcdefghijklmnopqrstuvwxyz0123456789._%+-"),
        hint_fields=_hints("email", "mail", "yx", "dzyx", "邮箱", "电子邮箱", "电子邮件"),
    ),
    Detector(
        "ipv4", "internal IPv4 address (private and shared ranges)",
        (r"\b(?:10|172|192|100)\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\b",),
        v.check_internal_ipv4, _mask_ipv4, priority=10, group_separators=b".",
        hint_fields=_hints("ip", "ip_addr", "ipaddr", "host", "server", "内网地址"),
    ),
)}

# Longest token any built-in pattern can match; streaming keeps at least this much overlap.
MAX_TOKEN_BYTES = 320


def masks_of(detector: Detector, tokens: list[str]) -> list[str]:
    """detector.mask(token) of each token: a token of ASCII digits masked like the first one of its
    length (when the detector says that holds, and the mask hides one run), the others one by one."""
    if not detector.mask_by_length:
        return list(map(detector.mask, tokens))
    masks: list[str | None] = [None] * len(tokens)
    by_length: dict[int, list[int]] = {}
    for index, token in enumerate(tokens):
        if token.isascii() and token.isdigit():
            by_length.setdefault(len(token), []).append(index)
        else:
            masks[index] = detector.mask(token)
    for length, indexes in by_length.items():
        first = tokens[indexes[0]]
        mask = detector.mask(first)
        start, end = mask.find("*"), mask.rfind("*") + 1
        if start == -1 or mask != first[:start] + "*" * (end - start) + first[end:]:
            for index in indexes:
                masks[index] = detector.mask(tokens[index])
            continue
        stars = "*" * (end - start)
        for index in indexes:
            token = tokens[index]
            masks[index] = token[:start] + stars + token[end:]
    return masks
