"""DLP throughput: the `outbound` profile against a plain-Python `re` baseline, measured in the same run.

(a) mixed JSON / CSV / text bodies with about 1 % sensitive values, (b) text with none.
The baseline runs the same detector patterns and keywords with Python's `re`, one pass per pattern,
and validates every candidate with the same checks (whole token, detector validation); it does no
content decoding beyond UTF-8, so it is a generous baseline. Both run on one core, one body at a time.

    python bench/dlp.py [--mb 50] [--body-kb 256]
"""

import argparse
import json
import random
import sys
import time
from pathlib import Path

from faker import Faker

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.dlp import load_rules  # noqa: E402
from gateway.dlp.detectors import DETECTORS  # noqa: E402
from gateway.dlp.matcher import PatternSpec, compile_re, literal_regex  # noqa: E402

ID_WEIGHTS = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2]


def sensitive_value(rng: random.Random) -> str:
    kind = rng.randrange(5)
    if kind == 0:
        s17 = f"{rng.choice(['11', '31', '44', '51'])}0105{rng.randint(1950, 2005)}{rng.randint(1, 12):02d}" \
              f"{rng.randint(1, 28):02d}{rng.randint(0, 999):03d}"
        return s17 + "10X98765432"[sum(int(c) * w for c, w in zip(s17, ID_WEIGHTS)) % 11]
    if kind == 1:
        return rng.choice(["138", "139", "186", "150"]) + f"{rng.randint(0, 99_999_999):08d}"
    if kind == 2:
        partial = "622848" + f"{rng.randint(0, 10**9 - 1):09d}"
        total = sum((d * 2 - 9 if d * 2 > 9 else d * 2) if i % 2 == 0 else d
                    for i, d in enumerate(int(c) for c in reversed(partial)))
        return partial + str((10 - total % 10) % 10)
    if kind == 3:
        return f"user{rng.randint(1, 99999)}@example.com"
    return f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"


class Corpus:
    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        fake = Faker("zh_CN")
        fake.seed_instance(seed)
        self.sentences = [fake.sentence(nb_words=12) for _ in range(3000)]
        self.names = [fake.name() for _ in range(500)]
        self.addresses = [fake.address().replace("\n", " ") for _ in range(500)]

    def clean_value(self) -> str:
        rng = self.rng
        return rng.choice([f"{rng.randint(1, 99999)}.{rng.randint(0, 99):02d}", f"ORD{rng.randint(10**11, 10**12)}",
                           str(rng.randint(1_600_000_000_000, 1_800_000_000_000)), rng.choice(self.names),
                           rng.choice(self.addresses), f"{rng.randint(2000, 2030)}-{rng.randint(1, 12):02d}-01"])

    def value(self, sensitive_ratio: float) -> str:
        return sensitive_value(self.rng) if self.rng.random() < sensitive_ratio else self.clean_value()

    def body(self, kind: str, size: int, sensitive_ratio: float) -> tuple[bytes, str]:
        rng, parts, total = self.rng, [], 0
        if kind == "json":
            rows = []
            while total < size:
                row = {"id": rng.randint(1, 10**9), "name": rng.choice(self.names), "note": rng.choice(self.sentences),
                       "v1": self.value(sensitive_ratio), "v2": self.value(sensitive_ratio)}
                rows.append(row)
                total += 160
            return json.dumps({"rows": rows}, ensure_ascii=False).encode(), "application/json"
        if kind == "csv":
            parts.append("id,name,note,v1,v2")
            while total < size:
                line = f"{rng.randint(1, 10**9)},{rng.choice(self.names)},{rng.choice(self.sentences)}," \
                       f"{self.value(sensitive_ratio)},{self.value(sensitive_ratio)}"
                parts.append(line)
                total += len(line.encode())
            return ("\n".join(parts) + "\n").encode(), "text/csv; charset=utf-8"
        while total < size:
            line = f"{rng.choice(self.sentences)} {self.value(sensitive_ratio)} {rng.choice(self.sentences)}"
            parts.append(line)
            total += len(line.encode())
        return ("\n".join(parts) + "\n").encode(), "text/plain; charset=utf-8"


class Baseline:
    """The same detectors and keywords as plain Python `re`, one pass per pattern, same validation."""

    def __init__(self, profile):
        self.detector_patterns = [(DETECTORS[name], compile_re(PatternSpec(regex)))
                                  for name in dict.fromkeys(n for r in profile.rules for n in r.detectors)
                                  for regex in DETECTORS[name].patterns]
        self.keyword_patterns = [compile_re(PatternSpec(literal_regex(k), not r.case_sensitive))
                                 for r in profile.rules for k in r.keywords]

    def scan(self, body: bytes) -> int:
        body.decode("utf-8")
        found = 0
        for detector, pattern in self.detector_patterns:
            for match in pattern.finditer(body):
                start, end = match.span()
                if (start and chr(body[start - 1]).isalnum() and body[start - 1] < 128) or \
                        (end < len(body) and chr(body[end]).isalnum() and body[end] < 128):
                    continue
                if detector.valid(body[start:end].decode("utf-8", "replace")):
                    found += 1
        for pattern in self.keyword_patterns:
            found += sum(1 for _ in pattern.finditer(body))
        return found


def measure(label: str, bodies: list[tuple[bytes, str]], scan) -> float:
    size = sum(len(b) for b, _ in bodies)
    started = time.perf_counter()
    found = 0
    for body, content_type in bodies:
        found += scan(body, content_type)
    elapsed = time.perf_counter() - started
    rate = size / elapsed / 1e6
    print(f"  {label:34} {rate:8.1f} MB/s  ({elapsed:6.2f} s, {found} findings)")
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=50, help="size of each corpus in MB (default 50)")
    parser.add_argument("--body-kb", type=int, default=256, help="size of each body in KB (default 256)")
    parser.add_argument("--rules", default=str(ROOT / "config" / "dlp"))
    args = parser.parse_args()

    corpus = Corpus(seed=7)
    body_size, total = args.body_kb * 1024, int(args.mb * 1e6)
    mixed, clean = [], []
    while sum(len(b) for b, _ in mixed) < total:
        mixed.append(corpus.body(("json", "csv", "text")[len(mixed) % 3], body_size, sensitive_ratio=0.01))
    while sum(len(b) for b, _ in clean) < total:
        clean.append(corpus.body("text", body_size, sensitive_ratio=0.0))

    hyperscan_profile = load_rules(args.rules).profile("outbound")
    re_profile = load_rules(args.rules, engine="re").profile("outbound")
    baseline = Baseline(hyperscan_profile)
    results = {}
    for name, bodies in (("a: mixed JSON/CSV/text, ~1% sensitive", mixed), ("b: clean text", clean)):
        size = sum(len(b) for b, _ in bodies) / 1e6
        print(f"{name} ({size:.1f} MB in {len(bodies)} bodies of {args.body_kb} KB)")
        base = measure("baseline: re, one pass per pattern", bodies, lambda b, t: baseline.scan(b))
        engine = measure(f"engine: {hyperscan_profile.matcher.engine}",
                         bodies, lambda b, t: len(hyperscan_profile.scan(b, content_type=t).findings))
        fallback = measure("engine: re fallback", bodies, lambda b, t: len(re_profile.scan(b, content_type=t).findings))
        results[name[0]] = (base, engine, fallback)
        print(f"  ratio engine/baseline: {engine / base:.1f}x   (re fallback/baseline: {fallback / base:.1f}x)")
    a, b = results["a"], results["b"]
    print(f"goals: a >= 3x baseline: {a[1] / a[0]:.1f}x {'ok' if a[1] / a[0] >= 3 else 'MISSED'}; "
          f"b >= 10x baseline: {b[1] / b[0]:.1f}x {'ok' if b[1] / b[0] >= 10 else 'MISSED'}; "
          f"b >= 100 MB/s: {b[1]:.0f} MB/s {'ok' if b[1] >= 100 else 'MISSED'}")


if __name__ == "__main__":
    main()
