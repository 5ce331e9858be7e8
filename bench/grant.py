"""What grant verification adds to a request: the gate's decision for a conditional dataset with a
valid grant and licence (signatures cached by the document's hash, as the gateway runs it), against
the same decision verifying both documents' signatures every time, and the baseline of an open
dataset's decision. Prints medians and the 99th percentile in microseconds.

    .venv/bin/python bench/grant.py [--rounds 5000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.authz.gate import Gate, Presented  # noqa: E402
from gateway.authz.quota import QuotaStore  # noqa: E402
from gateway.config.load import load_config  # noqa: E402
from tests.authzkit import Kit  # noqa: E402
from tests.gatewayproc import gateway_config, write_config  # noqa: E402


def timed(decide, rounds: int) -> list[float]:
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        decision = decide()
        samples.append((time.perf_counter() - started) * 1e6)
        assert decision.allowed, decision
    return samples


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        kit = Kit(root / "keys")
        config = load_config(write_config(root / "gateway.yaml", gateway_config(root / "state",
                                                                                  authz=kit.authz_section())))
        gate = Gate(config.authz, config.name, QuotaStore(root / "quota.sqlite"))
        catalog = config.authz.catalog
        grant, licence = kit.grant(), kit.licence()
        presented = Presented(grant=grant, licence=licence)
        conditional = catalog.match("127.0.0.2", "GET", "/api/residents/1")
        open_match = catalog.match("127.0.0.2", "GET", "/open/bus-stops/1")

        def uncached():
            gate._cache.clear()
            return gate.decide(conditional, "GET", "/api/residents/1", presented, time.time())

        runs = {
            "open dataset (baseline)": timed(lambda: gate.decide(open_match, "GET", "/open/bus-stops/1", Presented(),
                                                                 time.time()), args.rounds),
            "conditional, cached signatures": timed(lambda: gate.decide(conditional, "GET", "/api/residents/1",
                                                                        presented, time.time()), args.rounds),
            "conditional, verified every time": timed(uncached, max(200, args.rounds // 10)),
        }
        baseline = statistics.median(runs["open dataset (baseline)"])
        print(f"grant size {len(grant)} bytes, licence {len(licence)} bytes, {args.rounds} rounds")
        for name, samples in runs.items():
            median = statistics.median(samples)
            p99 = statistics.quantiles(samples, n=100)[98]
            print(f"{name:36s} median {median:8.1f} us  p99 {p99:8.1f} us  ({median / baseline:6.1f}x baseline)")


if __name__ == "__main__":
    main()
