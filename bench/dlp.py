"""DLP throughput on data that looks like a city's: the `outbound` profile against a plain-Python `re`
baseline, measured in the same run, on one core, one body at a time.

Corpora, generated deterministically (seeded):
  prose        Chinese prose with full-width punctuation (，：；（）。), some of it next to ASCII, no finding
  json export  JSON array of records: Chinese name, resident ID number (valid check character), mobile,
               address with full-width punctuation; a finding in every record
  clean ...    the same exports with a case number, an amount and a date instead of the ID and mobile
  csv export   the same records as a UTF-8 CSV with Chinese column names
  gbk csv      the CSV encoded in GBK (declared charset=gbk)
  ... gzip     the JSON export and the GBK CSV sent with Content-Encoding: gzip
The baseline undoes the same Content-Encoding and charset, then runs every detector and keyword
with Python's `re`, one pass per detector (its patterns as one alternation: the mobile number's is
written as two patterns for the engine, see gateway/dlp/tokens.py, and two passes would slow the
baseline) and per keyword, and validates every candidate with the same checks (whole token,
detector validation); it builds no findings or locations, so it is a generous baseline.

The engine is timed as the gateway runs it: findings counted per rule, type and action, with their first
locations and the digest of all their places, every value to redact masked, but none kept whole
(gateway/filters/inspect.py, KEEP_NONE). `listing` is the same scan keeping the first 1,000 findings
whole, with their values, locations and masks, as `gateway dlp scan` lists them.

Where the time goes, beside: the decode alone; the candidate scan alone (of the decoded segments:
Hyperscan for most patterns, numpy for the numbers written as one word, gateway/dlp/tokens.py);
detection (the scan, whole-token checks, validation, overlaps; a bulk export's valid candidates kept as
columns, gateway/dlp/detections.py); the rules (each rule's rows selected, counted and digested from
the columns, the first findings made, located and masked); and validation alone, every
whole-token candidate checked by its detector, in batches as the engine does (gateway/dlp/batch.py)
and value by value as the baseline does. Then the growth
table: time for 1, 2, 4 and 8 MiB bodies of the exports and of the prose (time must double with size,
not quadruple).
Each figure is the median of --repeat runs, with the spread (min-max) beside it.

    python bench/dlp.py [--records 1000,10000,100000] [--mb 8] [--repeat 3] [--growth 1,2,4,8]
    GATEWAY_DLP_KERNELS=off python bench/dlp.py ...   # the numpy paths, as without the C module

The first line printed says whether the C module (gateway/dlp/_kernels.c) ran.

An export of 100,000 records (16 MB of JSON) is past the buffering threshold: the gateway scans it as it
arrives, window by window (gateway/dlp/stream.py), and so does the bench (fed 64 KiB at a time); its gzip
(2-4 MB) is buffered, and decoded past the threshold, then scanned window by window too (Profile.scan).
Such rows show no parts (there is no one decode, scan and so on to time alone).
"""

import argparse
import csv
import gzip
import io
import json
import random
import statistics
import sys
import time
from pathlib import Path

from faker import Faker

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from gateway.dlp import batch  # noqa: E402
from gateway.dlp import load_rules, native  # noqa: E402
from gateway.dlp.coding import decode_text, inflate  # noqa: E402
from gateway.dlp.decode import decode_body, parse_media_type  # noqa: E402
from gateway.dlp.detectors import DETECTORS  # noqa: E402
from gateway.dlp.engine import UNINSPECTABLE  # noqa: E402
from gateway.dlp.matcher import PatternSpec, compile_re, literal_regex  # noqa: E402
from gateway.dlp.validators import id_card_check_char  # noqa: E402
from gateway.filters.inspect import KEEP_NONE as GATEWAY_KEEPS  # noqa: E402  (timed as the gateway scans)

MiB = 1 << 20
REGIONS = ["110105", "310104", "440305", "510107", "320102", "330106", "420106", "610113"]
MOBILE_PREFIXES = ["138", "139", "186", "150", "177", "199", "135", "181"]
COLUMNS = ("xm", "sfzh", "sjhm", "dz")
CSV_HEADER = ("姓名", "身份证号", "手机号码", "住址")


class CityData:
    """Records and prose drawn from seeded pools (Faker is too slow to call per record)."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        fake = Faker("zh_CN")
        fake.seed_instance(seed)
        self.names = [fake.name() for _ in range(800)]
        self.addresses = [f"{fake.province()}{fake.city()}{fake.district()}区{fake.street_name()}"
                          f"{self.rng.randint(1, 300)}号，{self.rng.randint(1, 30)}栋{self.rng.randint(1, 2800)}室"
                          f"（{fake.company_prefix()}小区）" for _ in range(800)]
        punctuation = "，，，。；：！？、"
        self.sentences = [fake.sentence(nb_words=12)[:-1] + self.rng.choice(punctuation) for _ in range(2000)]
        self.asides = [f"（{fake.company()}）", f"（{self.rng.randint(2000, 2030)}年）", "（试行）",
                       f"（第{self.rng.randint(1, 99)}号）", "（GDP）", "（“十四五”）"]

    def record(self) -> dict[str, str]:
        rng = self.rng
        first17 = f"{rng.choice(REGIONS)}{rng.randint(1940, 2010)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}" \
                  f"{rng.randint(0, 999):03d}"
        return {"xm": rng.choice(self.names), "sfzh": first17 + id_card_check_char(first17),
                "sjhm": rng.choice(MOBILE_PREFIXES) + f"{rng.randint(0, 99_999_999):08d}",
                "dz": rng.choice(self.addresses)}

    def clean_record(self) -> dict[str, str]:
        rng = self.rng
        return {"xm": rng.choice(self.names), "sfzh": f"YW{rng.randint(2015, 2025)}{rng.randint(0, 10**8 - 1):08d}",
                "sjhm": f"{rng.randint(1, 99999)}.{rng.randint(0, 99):02d}",
                "dz": f"{rng.randint(2015, 2025)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d} "
                      + rng.choice(self.addresses)}

    def records(self, count: int, clean: bool = False) -> list[dict[str, str]]:
        return [self.clean_record() if clean else self.record() for _ in range(count)]

    def prose(self, size: int) -> bytes:
        """Paragraphs of at most `size` bytes (a body of the spool threshold's size is buffered whole)."""
        paragraphs, total = [], 0
        while True:
            paragraph = "　　" + "".join(self.rng.choice(self.sentences) for _ in range(6)) \
                        + self.rng.choice(self.asides) + "。"
            total += len(paragraph.encode()) + bool(paragraphs)
            if total > size and paragraphs:
                return "\n".join(paragraphs).encode()
            paragraphs.append(paragraph)


def json_export(records: list[dict[str, str]]) -> bytes:
    return json.dumps(records, ensure_ascii=False).encode()


def csv_export(records: list[dict[str, str]], encoding: str = "utf-8") -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    writer.writerows([record[column] for column in COLUMNS] for record in records)
    return out.getvalue().encode(encoding)


def records_for(data: CityData, size: int, export) -> list[dict[str, str]]:
    """As many records as an export of at most `size` bytes holds (about: records differ in length)."""
    per_record = len(export(data.records(200))) / 200
    records = data.records(max(int(size / per_record), 1))
    while len(records) > 1 and len(export(records)) > size:
        records = records[:int(len(records) * 0.995)]
    return records


# A body: (label, bytes, content type, content encoding, records in it)
Body = tuple[str, bytes, str, str | None, int]


def corpora(data: CityData, record_counts: list[int], prose_bytes: int) -> list[Body]:
    bodies: list[Body] = [("prose (clean)", data.prose(prose_bytes), "text/plain; charset=utf-8", None, 0)]
    clean = data.records(record_counts[-1], clean=True)
    as_json, as_gbk = json_export(clean), csv_export(clean, "gbk")
    bodies += [(f"clean json {len(clean):,}", as_json, "application/json", None, 0),
               (f"clean csv {len(clean):,}", csv_export(clean), "text/csv; charset=utf-8", None, 0),
               (f"clean gbk csv {len(clean):,}", as_gbk, "text/csv; charset=gbk", None, 0),
               (f"clean json {len(clean):,} gzip", gzip.compress(as_json, 6), "application/json", "gzip", 0),
               (f"clean gbk csv {len(clean):,} gzip", gzip.compress(as_gbk, 6), "text/csv; charset=gbk", "gzip", 0)]
    for count in record_counts:
        records = data.records(count)
        as_json, as_csv, as_gbk = json_export(records), csv_export(records), csv_export(records, "gbk")
        bodies += [(f"json export {count:,}", as_json, "application/json", None, count),
                   (f"csv export {count:,}", as_csv, "text/csv; charset=utf-8", None, count),
                   (f"gbk csv {count:,}", as_gbk, "text/csv; charset=gbk", None, count),
                   (f"json export {count:,} gzip", gzip.compress(as_json, 6), "application/json", "gzip", count),
                   (f"gbk csv {count:,} gzip", gzip.compress(as_gbk, 6), "text/csv; charset=gbk", "gzip", count)]
    return bodies


class Baseline:
    """The same detectors and keywords as plain Python `re`, one pass per pattern, same validation,
    after the same Content-Encoding and charset are undone."""

    def __init__(self, profile):
        self.detector_patterns = [(DETECTORS[name], compile_re(PatternSpec(
                                      "|".join(f"(?:{regex})" for regex in DETECTORS[name].patterns))))
                                  for name in dict.fromkeys(n for r in profile.rules for n in r.detectors)]
        self.keyword_patterns = [compile_re(PatternSpec(literal_regex(k), not r.case_sensitive))
                                 for r in profile.rules for k in r.keywords]

    def scan(self, body: bytes, content_type: str, content_encoding: str | None) -> int:
        data = inflate(body, content_encoding, 1 << 30, 1 << 30)
        charset = parse_media_type(content_type)[1].get("charset")
        text, used = decode_text(data, charset)
        if used != "utf-8":
            data = text.encode("utf-8")
        found = 0
        for detector, pattern in self.detector_patterns:
            for match in pattern.finditer(data):
                start, end = match.span()
                if (start and chr(data[start - 1]).isalnum() and data[start - 1] < 128) or \
                        (end < len(data) and chr(data[end]).isalnum() and data[end] < 128):
                    continue
                if detector.valid(data[start:end].decode("utf-8", "replace")):
                    found += 1
        for pattern in self.keyword_patterns:
            found += sum(1 for _ in pattern.finditer(data))
        return found


def candidates(profile, segments) -> list[tuple[bytes, str, list[tuple[int, int]], np.ndarray]]:
    """Per segment and detector: (data, detector, its whole-token candidates as (start, end), as a list and
    as an array)."""
    found = []
    for segment in segments:
        data, by_detector = segment.data, {}
        for pattern, start, end in map(tuple, profile.matcher.scan(data)):  # rows of a table (or tuples)
            kind, name, _ = profile._refs[pattern]
            if kind == "detector" and (start == 0 or not chr(data[start - 1]).isalnum() or data[start - 1] > 127) \
                    and (end == len(data) or not chr(data[end]).isalnum() or data[end] > 127):
                by_detector.setdefault(name, []).append((start, end))
        found += [(data, name, spans, np.array(spans, dtype=np.int64).reshape(-1, 2))
                  for name, spans in by_detector.items()]
    return found


def validate_each(found) -> int:
    """Validation alone, value by value (validators.py, as the baseline does)."""
    return sum(DETECTORS[name].valid(data[start:end].decode("utf-8", "replace"))
               for data, name, spans, _ in found for start, end in spans)


def validate_batches(found) -> int:
    """Validation alone, in batches (as the engine does)."""
    return sum(int(batch.valid(name, data, spans[:, 0], spans[:, 1]).sum()) for data, name, _, spans in found)


def timed(function, repeat: int) -> tuple[float, float, float, object]:
    """(median, min, max) CPU seconds of `repeat` calls, and the last result."""
    times, result = [], None
    for _ in range(repeat):
        started = time.process_time()
        result = function()
        times.append(time.process_time() - started)
    return statistics.median(times), min(times), max(times), result


def gateway_scan(profile, body: bytes, content_type: str, content_encoding: str | None, keep: int | None):
    """The body scanned as the gateway scans it: whole, or past the buffering threshold as it arrives."""
    if len(body) <= profile.limits.stream_buffer_bytes:
        return profile.scan(body, content_type=content_type, content_encoding=content_encoding, keep=keep)
    scan = profile.stream(content_type=content_type, content_encoding=content_encoding, keep=keep)
    for at in range(0, len(body), 1 << 16):
        scan.feed(body[at:at + (1 << 16)])
    return scan.finish()


def uninspectable(result) -> bool:
    return any(group.type == UNINSPECTABLE for group in result.groups)


def rate(size: int, seconds: float) -> float:
    return size / max(seconds, 1e-9) / 1e6


def spread(size: int, low: float, high: float) -> str:
    return f"{rate(size, high):.0f}-{rate(size, low):.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", default="1000,10000,100000",
                        help="records per export body (default 1000,10000,100000)")
    parser.add_argument("--mb", type=float, default=8, help="size of the prose body in MB (default 8)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure; the median is shown (default 3)")
    parser.add_argument("--growth", default="1,2,4,8", help="MiB sizes of the growth table (default 1,2,4,8)")
    parser.add_argument("--rules", default=str(ROOT / "config" / "dlp"))
    args = parser.parse_args()

    data = CityData(seed=18)
    profile = load_rules(args.rules).profile("outbound")
    baseline = Baseline(profile)
    for kind in (False, True):  # compile the lazily built Hyperscan databases before anything is timed
        profile.scan(json_export(data.records(1000, clean=kind)), content_type="application/json")
    print(f"engine: {profile.matcher.engine}, {'with' if native.kernels else 'without'} the C kernels; "
          f"CPU time of one core, median of {args.repeat} runs (spread min-max)")
    print(f"{'':72}{'parts alone, MB/s: decode  scan  detect  rules  validate (batch, each)':>78}")
    print(f"{'corpus':26} {'size':>9} {'findings':>9} {'engine MB/s':>18} {'re baseline MB/s':>18} {'ratio':>6}"
          f" {'decode':>12} {'scan':>7} {'detect':>7} {'rules':>7} {'validate':>10} {'(each)':>8}"
          f" {'listing':>8}")
    for label, body, content_type, content_encoding, _ in corpora(
            data, [int(n) for n in args.records.split(",")], int(args.mb * 1e6)):
        size = len(inflate(body, content_encoding, 1 << 30, 1 << 30))  # rates are of the decoded body
        engine, low, high, result = timed(
            lambda: gateway_scan(profile, body, content_type, content_encoding, GATEWAY_KEEPS), args.repeat)
        listing = timed(lambda: gateway_scan(profile, body, content_type, content_encoding, None), args.repeat)[0]
        base, base_low, base_high, _ = timed(lambda: baseline.scan(body, content_type, content_encoding), args.repeat)
        row = (f"{label:26} {size / 1e6:7.2f}MB {sum(group.count for group in result.groups):9,} "
               f"{rate(size, engine):7.1f} ({spread(size, low, high):>9}) "
               f"{rate(size, base):7.1f} ({spread(size, base_low, base_high):>9}) {base / engine:5.1f}x")
        if size > profile.limits.stream_buffer_bytes:  # scanned window by window: no parts to time alone
            print(row + f" {'(window by window)':>52} {rate(size, listing):8.1f}"
                  + ("  refused: uninspectable" if uninspectable(result) else ""))
            continue
        decoded = decode_body(body, content_type, content_encoding, profile.limits)
        decode_time = timed(lambda: decode_body(body, content_type, content_encoding, profile.limits), args.repeat)[0]
        scan_time = timed(lambda: [profile.matcher.scan(s.data) for s in decoded.segments], args.repeat)[0]
        detect_time, _, _, (detections, problems) = timed(lambda: profile.detect_all(decoded, "body"), args.repeat)
        rules_time = timed(lambda: profile.apply_rules(detections, problems, "request", None, GATEWAY_KEEPS),
                           args.repeat)[0]
        found = candidates(profile, decoded.segments)
        batch_time = timed(lambda: validate_batches(found), args.repeat)[0]
        each_time = timed(lambda: validate_each(found), args.repeat)[0]
        print(row + f" {rate(size, decode_time):10.0f} {rate(size, scan_time):7.0f} {rate(size, detect_time):7.0f}"
              f" {rate(size, rules_time):7.0f}"
              f" {rate(size, batch_time):10.0f} {rate(size, each_time):8.0f} {rate(size, listing):8.1f}"
              + ("  refused: uninspectable" if uninspectable(result) else ""))

    print("\ngrowth: CPU seconds of one scan as the body doubles (x: against the 1st size; linear is 2, 4, 8)")
    sizes = [float(mib) for mib in args.growth.split(",")]
    refused = False
    for label, make, content_type in (
            ("json export", lambda size: json_export(records_for(data, size, json_export)), "application/json"),
            ("csv export", lambda size: csv_export(records_for(data, size, csv_export)), "text/csv"),
            ("prose", data.prose, "text/plain; charset=utf-8")):
        row, first = [], None
        for mib in sizes:
            body = make(int(mib * MiB))
            seconds, low, high, result = timed(
                lambda: gateway_scan(profile, body, content_type, None, GATEWAY_KEEPS), args.repeat)
            mark = "*" if uninspectable(result) else ""
            refused = refused or bool(mark)
            first = first or seconds
            row.append(f"{mib:g} MiB {seconds:6.3f}s{mark} ({low:.3f}-{high:.3f}) x{seconds / first:4.1f}")
        print(f"  {label:12} " + " | ".join(row))
    if refused:
        print("  * refused as uninspectable")


if __name__ == "__main__":
    main()
