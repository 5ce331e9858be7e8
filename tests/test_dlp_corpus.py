"""Recall and precision of every detector over a generated corpus, in every encoding a transfer can carry.

Positives are generated with the real check algorithms (written again here, independently of
gateway.dlp.validators); negatives are look-alikes: bad check characters, impossible or future dates,
unknown regions, unallocated prefixes, digit runs inside longer numbers, hex hashes, timestamps.
Each (detector, encoding) document holds all positives and negatives of that detector among Faker
zh_CN filler; the test asserts recall and precision >= 0.99 per detector and per encoding, for
both the Hyperscan and the pure-Python engine.
"""

import base64
import gzip
import io
import json
import random
import zipfile
import zlib
from collections import defaultdict
from datetime import date, timedelta
from urllib.parse import urlencode
from xml.sax.saxutils import escape

import brotli
import pytest
from faker import Faker

from gateway.dlp import load_rules
from gateway.dlp.matcher import HYPERSCAN_AVAILABLE

try:
    from compression import zstd
except ImportError:
    from backports import zstd

DETECTORS = ["cn_id_card", "cn_mobile", "bank_card", "cn_uscc", "email", "cn_passport", "cn_landline",
             "cn_license_plate", "ipv4"]
ENCODINGS = ["text", "gzip", "deflate", "br", "zstd", "gbk", "gb18030", "utf16", "json", "json_escapes", "form",
             "multipart", "xml", "csv", "fullwidth", "xlsx", "docx", "zip"]
PER_KIND = 40

# ---- independent check algorithms ----------------------------------------------------------------
PROVINCES = ["11", "12", "13", "14", "15", "21", "22", "23", "31", "32", "33", "34", "35", "36", "37", "41", "42",
             "43", "44", "45", "46", "50", "51", "52", "53", "54", "61", "63", "64", "65"]
NOT_PROVINCES = ["19", "20", "24", "28", "30", "38", "40", "47", "55", "58", "66", "68", "72", "77", "80", "84"]


def id_check(first17: str) -> str:
    weights = [2 ** (17 - i) % 11 for i in range(17)]  # 7 9 10 5 8 4 2 1 6 3 ... (ISO 7064 MOD 11-2)
    return "10X98765432"[sum(int(c) * w for c, w in zip(first17, weights)) % 11]


def luhn_digit(partial: str) -> str:
    total = 0
    for i, c in enumerate(reversed(partial)):
        d = int(c)
        if i % 2 == 0:
            d = d * 2 - 9 if d * 2 > 9 else d * 2
        total += d
    return str((10 - total % 10) % 10)


USCC_ALPHABET = "0123456789ABCDEFGHJKLMNPQRTUWXY"


def uscc_check(first17: str) -> str:
    weights = [3 ** i % 31 for i in range(17)]
    return USCC_ALPHABET[(31 - sum(USCC_ALPHABET.index(c) * w for c, w in zip(first17, weights)) % 31) % 31]


def org_check(first8: str) -> str:
    weights = [3, 7, 9, 10, 5, 8, 4, 2]
    value = 11 - sum((int(c) if c.isdigit() else ord(c) - 55) * w for c, w in zip(first8, weights)) % 11
    return "X" if value == 10 else "0" if value == 11 else str(value)


MOBILE_OK = ["130", "131", "133", "135", "136", "138", "139", "147", "150", "152", "157", "158", "166", "173", "176",
             "177", "180", "181", "186", "189", "191", "195", "198", "199"]
MOBILE_BAD = ["154", "160", "161", "163", "164", "169", "179", "194"]
PLATE_PROVINCES = "京津沪渝冀豫云辽黑湘皖鲁新苏浙赣鄂桂甘晋蒙陕吉闽贵粤青藏川宁琼"
PLATE_LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZ"


# ---- value generators: (value, field name) --------------------------------------------------------
def digits(rng, n):
    return "".join(rng.choice("0123456789") for _ in range(n))


def id_parts(rng, province=None, birth=None):
    region = (province or rng.choice(PROVINCES)) + f"{rng.randint(1, 20):02d}{rng.randint(1, 30):02d}"
    birth = birth or (date(1930, 1, 1) + timedelta(days=rng.randint(0, 33000))).strftime("%Y%m%d")
    return region + birth + digits(rng, 3)


def positives(kind, rng):
    if kind == "cn_id_card":
        s = id_parts(rng)
        return s + id_check(s), "sfzh"
    if kind == "cn_mobile":
        n = rng.choice(MOBILE_OK) + digits(rng, 8)
        form = rng.randrange(5)
        text = [n, f"+86 {n}", f"{n[:3]}-{n[3:7]}-{n[7:]}", f"{n[:3]} {n[3:7]} {n[7:]}", f"0086{n}"][form]
        return text, "sjhm"
    if kind == "bank_card":
        prefix = rng.choice(["622202", "621700", "622848", "436742", "4", "51", "53", "2221", "356", "6011"])
        length = 16 if prefix[0] in "2345" or prefix == "6011" else rng.choice([16, 19])
        partial = prefix + digits(rng, length - 1 - len(prefix))
        number = partial + luhn_digit(partial)
        if rng.random() < 0.4:
            number = " ".join(number[i:i + 4] for i in range(0, len(number), 4))
        return number, "yhkh"
    if kind == "cn_uscc":
        head = rng.choice(["91", "92", "93", "11", "12", "51", "52", "Y1", "N2"]) + rng.choice(PROVINCES) + digits(rng, 4)
        org = "".join(rng.choice("0123456789ABCDEFGHJKLMNPQRTUWXY") for _ in range(8))
        first17 = head + org + org_check(org)
        return first17 + uscc_check(first17), "tyshxydm"
    if kind == "email":
        local = rng.choice(["zhang.san", "li_si", "wang+dlp", "chen99", "a"])
        domain = rng.choice(["example.com", "mail.example.cn", "corp.example.com.cn", "qq.com", "163.com"])
        return f"{local}{rng.randint(1, 999)}@{domain}", "email"
    if kind == "cn_passport":
        value = rng.choice([f"E{digits(rng, 8)}", f"E{rng.choice('ABCDEFGHJK')}{digits(rng, 7)}", f"G{digits(rng, 8)}"])
        return value, "hzhm"
    if kind == "cn_landline":
        area = rng.choice(["010", "021", "020", "0755", "0571", "0931"])
        number = rng.choice("23456789") + digits(rng, 7 if len(area) == 3 else rng.choice([6, 7]))
        return rng.choice([f"{area}-{number}", f"({area}){number}", f"{area} {number}"]), "gddh"
    if kind == "cn_license_plate":
        province = rng.choice(PLATE_PROVINCES)
        serial = rng.choice([digits(rng, 5), rng.choice(PLATE_LETTERS) + digits(rng, 4),
                             rng.choice("DF") + digits(rng, 5)])
        return province + rng.choice(PLATE_LETTERS) + serial, "cph"
    if kind == "ipv4":
        return rng.choice([f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
                           f"172.{rng.randint(16, 31)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
                           f"192.168.{rng.randint(0, 255)}.{rng.randint(1, 254)}"]), "ip"
    raise AssertionError(kind)


def negatives(kind, rng):
    common = [f"{rng.randint(1_600_000_000_000, 1_800_000_000_000)}",                  # timestamp (ms)
              "".join(rng.choice("0123456789abcdef") for _ in range(40))]              # hex hash
    if kind == "cn_id_card":
        s = id_parts(rng)
        good = s + id_check(s)
        bad_date = id_parts(rng, birth=rng.choice(["19990230", "20011301", "19850000", "19770431"]))
        future = id_parts(rng, birth="20990101")
        unknown = id_parts(rng, province=rng.choice(NOT_PROVINCES))
        wrong = next(c for c in "0123456789X" if c != id_check(s))
        options = [s + wrong, bad_date + id_check(bad_date), future + id_check(future), unknown + id_check(unknown),
                   "12" + good, good + "07", *common]
        return rng.choice(options), "v"
    if kind == "cn_mobile":
        n = rng.choice(MOBILE_OK) + digits(rng, 8)
        options = [rng.choice(MOBILE_BAD) + digits(rng, 8), n + digits(rng, 2), "9" + n, n[:10], f"tx{n}",
                   f"{n[:3]}-{n[3:7]}-{n[7:]}-{digits(rng, 4)}", *common]
        return rng.choice(options), "v"
    if kind == "bank_card":
        prefix = rng.choice(["622202", "4367", "5"])
        partial = prefix + digits(rng, 15 - len(prefix))
        good = partial + luhn_digit(partial)
        bad = partial + str((int(luhn_digit(partial)) + rng.randint(1, 9)) % 10)
        unknown = "9" + digits(rng, 14)
        options = [bad, unknown + luhn_digit(unknown), good + digits(rng, 4), "88" + good + "0",
                   " ".join(bad[i:i + 4] for i in range(0, 16, 4)), *common]
        return rng.choice(options), "v"
    if kind == "cn_uscc":
        org = "".join(rng.choice("0123456789ABCDEFGHJKLMNPQRTUWXY") for _ in range(8))
        first17 = "91" + rng.choice(PROVINCES) + digits(rng, 4) + org + org_check(org)
        bad_org = "91" + rng.choice(PROVINCES) + digits(rng, 4) + org + next(c for c in "0123456789" if c != org_check(org))
        options = [first17 + next(c for c in USCC_ALPHABET if c != uscc_check(first17)),
                   bad_org + uscc_check(bad_org), "99" + first17[2:] + uscc_check("99" + first17[2:]),
                   first17[:10] + "IO" + first17[12:] + "0", *common]
        return rng.choice(options), "v"
    if kind == "email":
        return rng.choice(["logo@2x.png", "user@localhost", "a@b.c", "foo@@example.com", "icon@3x.jpg",
                           "mail at example dot com", *common]), "v"
    if kind == "cn_passport":
        return rng.choice([f"A{digits(rng, 8)}", f"E{digits(rng, 7)}", f"E{digits(rng, 9)}", f"EI{digits(rng, 7)}",
                           *common]), rng.choice(["hzhm", "sku"])
    if kind == "cn_landline":
        return rng.choice([f"026-{rng.choice('2345678')}{digits(rng, 7)}", f"010-{rng.choice('23456789')}{digits(rng, 6)}",
                           f"0755-{digits(rng, 9)}", f"01-{digits(rng, 8)}", f"010-0{digits(rng, 7)}", *common]), "v"
    if kind == "cn_license_plate":
        return rng.choice([f"京I{digits(rng, 5)}", f"沪O{digits(rng, 5)}", f"京A{digits(rng, 4)}",
                           f"粤B{digits(rng, 7)}", f"中A{digits(rng, 5)}", "苏ABCDEF", *common]), "v"
    if kind == "ipv4":
        return rng.choice(["8.8.8.8", f"203.0.113.{rng.randint(1, 254)}", "10.256.1.1", "192.168.1.1.5",
                           "010.1.1.1", f"v10.0.0.{rng.randint(1, 9)}", "172.32.0.1", *common]), "v"
    raise AssertionError(kind)


LABELS = {"sfzh": "身份证号：", "sjhm": "手机 ", "yhkh": "卡号", "tyshxydm": "统一社会信用代码 ", "email": "邮箱：",
          "hzhm": "护照号码：", "gddh": "电话 ", "cph": "车牌", "ip": "地址 ", "v": "编号 ", "sku": "SKU "}


# ---- document builders ----------------------------------------------------------------------------
def fullwidth(text):
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in text)


def text_body(items, filler):
    return "\n".join(f"{filler()} {LABELS[f]}{v} {filler()}" for v, f in items) + "\n"


def rows(items, fake):
    return [{"name": fake.name(), "note": fake.sentence(), f: v} for v, f in items]


def u_escape_all(value):
    return "".join(f"\\u{ord(c):04x}" for c in value)


def xlsx(table):
    columns = sorted({k for row in table for k in row})
    shared, cells = [], []
    def ref(ci, ri):
        return f"{chr(65 + ci)}{ri}"
    def cell(ci, ri, text):
        shared.append(text)
        return f'<c r="{ref(ci, ri)}" t="s"><v>{len(shared) - 1}</v></c>'
    cells.append(f'<row r="1">{"".join(cell(ci, 1, c) for ci, c in enumerate(columns))}</row>')
    for ri, row in enumerate(table, start=2):
        cells.append(f'<row r="{ri}">' + "".join(cell(ci, ri, row[c]) for ci, c in enumerate(columns) if c in row) + "</row>")
    ns = 'xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main"'
    rel = 'xmlns:r="http://schemas.openxmlformats.org/officeDocument/2006/relationships"'
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("[Content_Types].xml", '<?xml version="1.0"?><Types/>')
        z.writestr("xl/workbook.xml", f'<workbook {ns} {rel}><sheets><sheet name="人员" sheetId="1" r:id="rId1"/></sheets></workbook>')
        z.writestr("xl/_rels/workbook.xml.rels", '<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/'
                   'relationships"><Relationship Id="rId1" Target="worksheets/sheet1.xml"/></Relationships>')
        z.writestr("xl/sharedStrings.xml", f'<sst {ns}>' + "".join(f"<si><t>{escape(s)}</t></si>" for s in shared) + "</sst>")
        z.writestr("xl/worksheets/sheet1.xml", f'<worksheet {ns}><sheetData>{"".join(cells)}</sheetData></worksheet>')
    return out.getvalue()


def docx(paragraphs):
    ns = 'xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main"'
    body = "".join(f"<w:p><w:r><w:t>{escape(p)}</w:t></w:r></w:p>" for p in paragraphs)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("word/document.xml", f"<w:document {ns}><w:body>{body}</w:body></w:document>")
    return out.getvalue()


def csv_text(table):
    columns = sorted({k for row in table for k in row})
    quote = lambda s: '"' + s.replace('"', '""') + '"' if any(c in s for c in ',"\n') else s
    return "\n".join([",".join(columns)] + [",".join(quote(row.get(c, "")) for c in columns) for row in table]) + "\n"


def build(encoding, items, fake):
    """(body, content_type, content_encoding) holding `items` in the given encoding."""
    filler = fake.sentence
    plain = text_body(items, filler)
    if encoding in ("text", "gzip", "deflate", "br", "zstd"):
        raw = plain.encode()
        compressed = {"text": raw, "gzip": gzip.compress(raw), "deflate": zlib.compress(raw),
                      "br": brotli.compress(raw), "zstd": zstd.compress(raw)}[encoding]
        return compressed, "text/plain; charset=utf-8", None if encoding == "text" else encoding
    if encoding == "gbk":
        return plain.encode("gbk", "replace"), "text/plain; charset=GBK", None
    if encoding == "gb18030":
        return plain.encode("gb18030"), "text/plain", None          # undeclared: sniffed
    if encoding == "utf16":
        return plain.encode("utf-16"), "text/plain", None           # BOM
    if encoding == "fullwidth":
        return "\n".join(f"{filler()} {LABELS[f]}{fullwidth(v)} {filler()}" for v, f in items).encode(), None, None
    table = rows(items, fake)
    if encoding == "json":
        return json.dumps({"rows": table}, ensure_ascii=False).encode(), "application/json", None
    if encoding == "json_escapes":
        text = json.dumps({"rows": table}, ensure_ascii=True)
        for value, _ in items:  # escape every character, ASCII digits included, as an evader would
            text = text.replace(json.dumps(value)[1:-1], u_escape_all(value), 1)
        return text.encode(), "application/json; charset=utf-8", None
    if encoding == "form":
        return urlencode([(f, v) for v, f in items] + [("note", filler())]).encode(), \
            "application/x-www-form-urlencoded", None
    if encoding == "multipart":
        boundary = "----dlpboundary7MA4YWxkTrZu0gW"
        parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{f}"\r\n\r\n{v}\r\n' for v, f in items[::2]]
        attachment = csv_text(rows(items[1::2], fake)).encode("gb18030")
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="名单.csv"\r\n'
                     f"Content-Type: text/csv; charset=gb18030\r\nContent-Transfer-Encoding: base64\r\n\r\n"
                     + base64.encodebytes(attachment).decode() + "\r\n")
        body = "".join(parts) + f"--{boundary}--\r\n"
        return body.encode(), f"multipart/form-data; boundary={boundary}", None
    if encoding == "xml":
        inner = "".join(f"<row><name>{escape(r['name'])}</name><{f}>{escape(v)}</{f}></row>" for r, (v, f) in zip(table, items))
        return f'<?xml version="1.0" encoding="UTF-8"?><rows>{inner}</rows>'.encode(), "application/xml", None
    if encoding == "csv":
        return csv_text(table).encode(), "text/csv; charset=utf-8", None
    if encoding == "xlsx":
        return xlsx(table), "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet", None
    if encoding == "docx":
        return docx(plain.splitlines()), "application/vnd.openxmlformats-officedocument.wordprocessingml.document", None
    if encoding == "zip":
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
            half = len(items) // 2
            z.writestr("notes/a.txt", text_body(items[:half], filler))
            inner = io.BytesIO()
            with zipfile.ZipFile(inner, "w", zipfile.ZIP_DEFLATED) as nested:
                nested.writestr("b.csv", csv_text(table[half:]))
            z.writestr("nested.zip", inner.getvalue())
        return out.getvalue(), "application/zip", None
    raise AssertionError(encoding)


def canonical(kind, value):
    value = "".join(chr(ord(c) - 0xFEE0) if "！" <= c <= "～" else c for c in value)
    value = "".join(c for c in value if c not in " -()").upper()
    return value[-11:] if kind == "cn_mobile" else value


RULES = "rules:\n" + "".join(
    f"  - {{id: r-{k}, detectors: [{k}], action: audit, examples: {{match: ['x']}}}}\n" for k in DETECTORS
) + "profiles:\n  corpus: {rules: [" + ", ".join(f"r-{k}" for k in DETECTORS) + "]}\n"


@pytest.fixture(scope="module")
def corpus():
    rng = random.Random(20261126)
    fake = Faker("zh_CN")
    fake.seed_instance(11)
    documents = []
    for kind in DETECTORS:
        for encoding in ENCODINGS:
            pos = [positives(kind, rng) for _ in range(PER_KIND)]
            neg = [negatives(kind, rng) for _ in range(PER_KIND)]
            items = pos + neg
            rng.shuffle(items)
            documents.append((kind, encoding, {canonical(kind, v) for v, _ in pos}, build(encoding, items, fake)))
    return documents


@pytest.mark.parametrize("engine", ["re", "hyperscan"])
def test_recall_and_precision_per_detector_and_encoding(engine, corpus, tmp_path):
    if engine == "hyperscan" and not HYPERSCAN_AVAILABLE:
        pytest.skip("hyperscan is not installed")
    rule_file = tmp_path / "corpus.yaml"
    rule_file.write_text(RULES)
    profile = load_rules(rule_file, engine=engine).profile("corpus")
    planted = defaultdict(int)
    found_true = defaultdict(int)
    found_false = defaultdict(set)
    per_cell = {}
    for kind, encoding, expected, (body, content_type, content_encoding) in corpus:
        result = profile.scan(body, content_type=content_type, content_encoding=content_encoding)
        assert not [f for f in result.findings if f.type == "uninspectable"], (kind, encoding, result.findings)
        found = {canonical(f.type, f.value) for f in result.findings if f.type == kind}
        true_positives = len(found & expected)
        planted[kind] += len(expected)
        found_true[kind] += true_positives
        for finding in result.findings:  # any detector firing on what was not planted for it
            if finding.type != kind or canonical(kind, finding.value) not in expected:
                found_false[finding.type].add((encoding, kind, finding.value))
        per_cell[(kind, encoding)] = true_positives / len(expected)
    print(f"\nengine={engine}: detector recall precision (documents: {len(corpus)})")
    for kind in DETECTORS:
        recall = found_true[kind] / planted[kind]
        precision = found_true[kind] / (found_true[kind] + len(found_false[kind]))
        print(f"  {kind:17} {recall:.4f} {precision:.4f}  positives={planted[kind]} false={len(found_false[kind])}")
        assert recall >= 0.99, (kind, recall, [cell for cell, r in per_cell.items() if r < 1])
        assert precision >= 0.99, (kind, precision, sorted(found_false[kind])[:10])
        if found_false[kind]:
            print("    false:", sorted(found_false[kind])[:5])
    weak = {cell: r for cell, r in per_cell.items() if r < 0.99}
    assert not weak, weak
