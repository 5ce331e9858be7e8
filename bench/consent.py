"""The consent registry and the per-record decision, measured alone (one core):

- importing a signed batch of N consents (default 1 million) into a fresh registry (verify, parse,
  insert, one transaction);
- looking subjects up: one subject per query, and a response's 1,000 subjects in one call;
- per-record decisions over a JSON array response (30% of subjects consented, the rest masked), in
  records per second, against the baseline of only parsing and writing the same JSON back (orjson), for
  responses of 1, 2, 4 and 8 MiB.

    .venv/bin/python bench/consent.py [--consents 1000000]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.authz.catalog import ConsentRule, Dataset, Field  # noqa: E402
from gateway.authz.consent import ConsentRegistry, batch_claims  # noqa: E402
from gateway.authz.jose import PLATFORM_ROLE, add_signature, draft, generate_key, load_private_key, public_authority  # noqa: E402
from gateway.authz.records import RecordFilter  # noqa: E402
from gateway.authz.subject import SubjectHasher  # noqa: E402


def subject(i: int) -> str:
    return f"5206{i:013d}X"


def record(i: int) -> dict:
    return {"id_number": subject(i), "name": "张三明", "mobile": f"139{i % 10**8:08d}", "card": f"6228480012{i % 10**6:06d}",
            "district": "碧江区", "address": "贵州省铜仁市碧江区锦江大道1号", "age": 40 + i % 40}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--consents", type=int, default=1_000_000)
    args = parser.parse_args()
    hasher = SubjectHasher(os.urandom(32))
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        generate_key("platform", root / "platform.key", root / "platform.pub")
        key = load_private_key(root / "platform.key")
        platform = {key.kid: public_authority(key, PLATFORM_ROLE)}
        now = int(time.time())
        consented = range(0, args.consents)
        body = b"".join(orjson.dumps({"cid": f"c{i}", "subject": hasher.key(subject(i)).hex(), "consumer": "operator-a",
                                      "scenario": "elderly-care", "datasets": ["civil.residents"], "nbf": now - 60,
                                      "exp": now + 86400}) + b"\n" for i in consented)
        claims = batch_claims("b1", now, body, args.consents, hasher.key_check(), hasher.algorithm)
        batch = root / "batch"
        batch.write_bytes(json.dumps(add_signature(draft(claims), key, PLATFORM_ROLE)).encode() + b"\n" + body)
        registry = ConsentRegistry(root / "consent.sqlite")
        started = time.perf_counter()
        with batch.open("rb") as stream:
            registry.import_batch(stream, platform, ("Ed25519",), hasher.key_check(), hasher.algorithm)
        seconds = time.perf_counter() - started
        print(f"import: {args.consents} consents ({len(body) / 2**20:.0f} MiB) in {seconds:.1f} s "
              f"({args.consents / seconds:,.0f}/s)")

        keys = [hasher.key(subject(i * 7 % (args.consents * 2))) for i in range(20000)]
        started = time.perf_counter()
        for k in keys[:5000]:
            registry.consented([k], "operator-a", "elderly-care", "civil.residents", now)
        single = (time.perf_counter() - started) / 5000
        started = time.perf_counter()
        for start in range(0, 20000, 1000):
            registry.consented(keys[start:start + 1000], "operator-a", "elderly-care", "civil.residents", now)
        batched = (time.perf_counter() - started) / 20000
        print(f"lookup: {single * 1e6:.1f} us for one subject per query; {batched * 1e6:.2f} us per subject "
              f"with a response's 1,000 in one call")

        fields = {"id_number": Field("personal", ("cn_id_card",)), "name": Field("personal", ("name",)),
                  "mobile": Field("personal", ("cn_mobile",)), "card": Field("personal", ("bank_card",)),
                  "district": Field("public"), "address": Field("personal"), "age": Field("internal")}
        dataset = Dataset("civil.residents", "", "conditional", "s", "p", (), (), (), fields, None, (), {}, None, "",
                          ConsentRule("id_number", "mask", False))
        record_filter = RecordFilter(dataset, hasher)

        def lookup(wanted):
            return registry.consented(wanted, "operator-a", "elderly-care", "civil.residents", now)

        print("size     records   decisions/s   parse+write only/s   ratio")
        for mib in (1, 2, 4, 8):
            per = len(orjson.dumps(record(0)))
            count = mib * 2**20 // per
            # 30% of the subjects consented (those below args.consents), the others not.
            items = [record(i if i % 10 < 3 else args.consents + i) for i in range(count)]
            response = orjson.dumps(items)
            started = time.perf_counter()
            outcome = record_filter.apply(response, "application/json", lookup)
            decided = time.perf_counter() - started
            assert outcome.passed == sum(1 for i in range(count) if i % 10 < 3), outcome
            started = time.perf_counter()
            orjson.dumps(orjson.loads(response))
            baseline = time.perf_counter() - started
            print(f"{mib} MiB   {count:8d}   {count / decided:11,.0f}   {count / baseline:18,.0f}   "
                  f"{baseline / decided:.2f}")
        registry.close()


if __name__ == "__main__":
    main()
