"""Check algorithms behind the built-in detectors (pure functions, no I/O).

Each `check_*` function takes a candidate token already stripped of separators and returns the
ordered list of checks it ran as (description, passed); it stops at the first failure, so
`all(passed for _, passed in steps)` tells whether the token is valid and `gateway dlp explain`
can show exactly which step decided.
"""

from datetime import date

Steps = list[tuple[str, bool]]

# GB/T 2260 province-level codes (71 Taiwan, 81 Hong Kong, 82 Macau, 83 residence permits).
PROVINCE_CODES = frozenset(
    "11 12 13 14 15 21 22 23 31 32 33 34 35 36 37 41 42 43 44 45 46 "
    "50 51 52 53 54 61 62 63 64 65 71 81 82 83".split()
)

_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK_CHARS = "10X98765432"


def id_card_check_char(first17: str) -> str:
    """ISO 7064 MOD 11-2 check character of a GB 11643 resident ID number."""
    return _ID_CHECK_CHARS[sum(int(c) * w for c, w in zip(first17, _ID_WEIGHTS)) % 11]


def _parse_date(yyyymmdd: str) -> date | None:
    try:
        return date(int(yyyymmdd[:4]), int(yyyymmdd[4:6]), int(yyyymmdd[6:8]))
    except ValueError:
        return None


def check_id_card(token: str, today: date | None = None) -> Steps:
    steps: Steps = []

    def step(label: str, ok: bool) -> bool:
        steps.append((label, ok))
        return ok

    if not step("18 characters: 17 digits then a digit or X",
                len(token) == 18 and token[:17].isdigit() and (token[17].isdigit() or token[17] in "Xx")):
        return steps
    if not step(f"province-level region code {token[:2]} exists (GB/T 2260)", token[:2] in PROVINCE_CODES):
        return steps
    born = _parse_date(token[6:14])
    if not step(f"birth date {token[6:14]} is a real date", born is not None):
        return steps
    assert born is not None
    today = today or date.today()
    if not step(f"birth date {born.isoformat()} is between 1900 and today", date(1900, 1, 1) <= born <= today):
        return steps
    expected = id_card_check_char(token[:17])
    step(f"MOD 11-2 check character: {expected} expected, {token[17]} written", token[17].upper() == expected)
    return steps


# Allocated 3-digit mobile prefixes (MIIT numbering plan; 140-144 are 13-digit IoT numbers).
MOBILE_PREFIXES = frozenset(
    [str(n) for n in range(130, 140)]
    + ["145", "146", "147", "148", "149"]
    + [str(n) for n in range(150, 160) if n != 154]
    + ["162", "165", "166", "167"]
    + [str(n) for n in range(170, 179) if n != 174]
    + [str(n) for n in range(180, 190)]
    + [str(n) for n in range(190, 200) if n != 194]
)


def check_mobile(digits: str) -> Steps:
    steps: Steps = [("11 digits", len(digits) == 11 and digits.isdigit())]
    if steps[-1][1]:
        steps.append((f"prefix {digits[:3]} is allocated to a mainland mobile network", digits[:3] in MOBILE_PREFIXES))
    return steps


def luhn_valid(digits: str) -> bool:
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char)
        if position % 2 == 1:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


# (brand, prefix ranges as (low, high) over the first len(low) digits, allowed lengths)
_CARD_BRANDS: tuple[tuple[str, tuple[tuple[str, str], ...], frozenset[int]], ...] = (
    ("UnionPay", (("62", "62"), ("81", "81")), frozenset(range(16, 20))),
    ("Visa", (("4", "4"),), frozenset({16, 19})),
    ("Mastercard", (("51", "55"), ("2221", "2720")), frozenset({16})),
    ("American Express", (("34", "34"), ("37", "37")), frozenset({15})),
    ("Discover", (("6011", "6011"), ("644", "649"), ("65", "65")), frozenset(range(16, 20))),
    ("JCB", (("3528", "3589"),), frozenset(range(16, 20))),
    ("Diners Club", (("36", "36"), ("300", "305"), ("38", "39")), frozenset({14, 16})),
    ("Mir", (("2200", "2204"),), frozenset(range(16, 20))),
)


def card_brand(digits: str) -> str | None:
    """The brand whose issuer prefix and length fit the number, if any."""
    for brand, ranges, lengths in _CARD_BRANDS:
        if len(digits) in lengths and any(low <= digits[: len(low)] <= high for low, high in ranges):
            return brand
    return None


def check_bank_card(digits: str) -> Steps:
    steps: Steps = [("15 to 19 digits", digits.isdigit() and 15 <= len(digits) <= 19)]
    if not steps[-1][1]:
        return steps
    brand = card_brand(digits)
    steps.append((f"issuer prefix and length match a card brand ({brand or 'none'})", brand is not None))
    if brand:
        steps.append(("Luhn checksum", luhn_valid(digits)))
    return steps


USCC_CHARS = "0123456789ABCDEFGHJKLMNPQRTUWXY"
_USCC_VALUE = {c: i for i, c in enumerate(USCC_CHARS)}
_USCC_WEIGHTS = (1, 3, 9, 27, 19, 26, 16, 17, 20, 29, 25, 13, 8, 24, 10, 30, 28)
_ORG_WEIGHTS = (3, 7, 9, 10, 5, 8, 4, 2)
# Registration authority (position 1) -> organisation categories (position 2), GB 32100 annex.
_USCC_AUTHORITIES = {
    "1": "1239", "2": "19", "3": "12349", "4": "129", "5": "1239", "6": "129",
    "7": "129", "8": "19", "9": "123", "A": "19", "N": "1239", "Y": "1",
}


def uscc_check_char(first17: str) -> str:
    """GB 32100 check character (MOD 31 over the 31-character alphabet)."""
    remainder = sum(_USCC_VALUE[c] * w for c, w in zip(first17, _USCC_WEIGHTS)) % 31
    return USCC_CHARS[(31 - remainder) % 31]


def org_code_check_char(first8: str) -> str:
    """GB 11714 organisation code check character (MOD 11, 10 -> X)."""
    total = sum((int(c) if c.isdigit() else ord(c) - 55) * w for c, w in zip(first8, _ORG_WEIGHTS))
    value = 11 - total % 11
    return {10: "X", 11: "0"}.get(value, str(value))


def check_uscc(token: str) -> Steps:
    steps: Steps = [("18 characters of the GB 32100 alphabet (no I, O, Z, S, V)",
                     len(token) == 18 and all(c in _USCC_VALUE for c in token))]
    if not steps[-1][1]:
        return steps
    categories = _USCC_AUTHORITIES.get(token[0], "")
    steps.append((f"registration authority {token[0]} with category {token[1]}", token[1] in categories))
    if not steps[-1][1]:
        return steps
    steps.append((f"administrative division {token[2:8]} in a real province", token[2:8].isdigit()
                  and token[2:4] in PROVINCE_CODES))
    if not steps[-1][1]:
        return steps
    expected_org = org_code_check_char(token[8:16])
    steps.append((f"embedded organisation code check character: {expected_org} expected, {token[16]} written "
                  "(GB 11714)", token[16] == expected_org))
    if not steps[-1][1]:
        return steps
    expected = uscc_check_char(token[:17])
    steps.append((f"check character: {expected} expected, {token[17]} written (GB 32100 MOD 31)",
                  token[17] == expected))
    return steps


def check_email(token: str) -> Steps:
    local, _, domain = token.rpartition("@")
    labels = domain.split(".")
    steps: Steps = [("local part of 1-64 characters", 0 < len(local) <= 64 and ".." not in local)]
    if steps[-1][1]:
        steps.append(("domain labels are non-empty and do not start or end with '-'",
                      all(label and label[0] != "-" and label[-1] != "-" for label in labels)))
    if steps[-1][1]:
        steps.append((f"top-level domain .{labels[-1]} is not a file extension",
                      labels[-1].lower() not in _FILE_EXTENSIONS))
    return steps


_FILE_EXTENSIONS = frozenset("png jpg jpeg gif svg webp bmp ico css js map json xml txt html htm".split())

PASSPORT_PREFIXES = ("E", "G", "D", "S", "P")


def check_passport(token: str) -> Steps:
    ok = len(token) == 9 and (
        (token[0] in "EG" and token[1:].isdigit())
        or (token[0] == "E" and token[1] in USCC_CHARS[10:] and token[2:].isdigit())
        or (token[0] in "DSP" and token[1:].isdigit())
    )
    return [("9 characters: E/G/D/S/P, an optional letter after E, then digits", ok)]


_LANDLINE_3 = frozenset({"010", "020", "021", "022", "023", "024", "025", "027", "028", "029"})


def check_landline(area: str, number: str) -> Steps:
    steps: Steps = [(f"area code {area} is a mainland code",
                     area in _LANDLINE_3 or (len(area) == 4 and area[1] in "3456789"))]
    if steps[-1][1]:
        expected = (8,) if area in _LANDLINE_3 else (7, 8)
        steps.append((f"local number of {' or '.join(map(str, expected))} digits not starting with 0 or 1",
                      len(number) in expected and number[0] in "23456789"))
    return steps


PLATE_PROVINCES = "京津沪渝冀豫云辽黑湘皖鲁新苏浙赣鄂桂甘晋蒙陕吉闽贵粤青藏川宁琼"
_PLATE_LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZ"


def check_license_plate(token: str) -> Steps:
    steps: Steps = [(f"province abbreviation {token[:1]}", token[:1] in PLATE_PROVINCES)]
    if not steps[-1][1]:
        return steps
    steps.append(("issuing authority letter (not I or O)", len(token) > 1 and token[1] in _PLATE_LETTERS))
    if not steps[-1][1]:
        return steps
    serial = token[2:]
    regular = len(serial) == 5 and all(c in _PLATE_LETTERS or c.isdigit() for c in serial) \
        and sum(c.isalpha() for c in serial) <= 2
    new_energy = len(serial) == 6 and (
        (serial[0] in "DF" and serial[1] in _PLATE_LETTERS + "0123456789" and serial[2:].isdigit())
        or (serial[:5].isdigit() and serial[5] in "DF")
    )
    steps.append(("serial of 5 characters (at most 2 letters) or a 6-character new-energy serial",
                  regular or new_energy))
    return steps


def check_internal_ipv4(token: str) -> Steps:
    parts = token.split(".")
    ok = len(parts) == 4 and all(p.isdigit() and int(p) <= 255 and (p == "0" or p[0] != "0") for p in parts)
    steps: Steps = [("four decimal octets 0-255 without leading zeros", ok)]
    if ok:
        a, b = int(parts[0]), int(parts[1])
        internal = a == 10 or (a == 172 and 16 <= b <= 31) or (a == 192 and b == 168) or (a == 100 and 64 <= b <= 127)
        steps.append(("internal range (10/8, 172.16/12, 192.168/16, 100.64/10)", internal))
    return steps
