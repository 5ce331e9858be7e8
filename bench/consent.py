"""The consent registry and the per-record decision, measured alone (one core), and the gateway's
1 MiB response throughput with consent filtering against without it:

- importing a signed batch of N consents (default 1 million) into a fresh registry (verify, parse,
  insert, one transaction), and loading a worker's in-memory view of them (time and memory);
- looking subjects up: in SQLite (one per query; a response's 1,000 in one query) and in the view;
- per-record decisions over a JSON array response (30% of subjects consented, the rest masked), in
  records per second, against the baseline of only parsing and writing the same JSON back (orjson),
  for responses of 1, 2, 4 and 8 MiB; with the view (what the gateway does) and, for comparison, with
  one SQLite query per response (what it did before). Each size is measured --repeat times: the
  median and the spread (lowest-highest) are printed. Lookups and decisions are timed in this
  process's CPU time (one core's work, whatever else the shared machine runs); import and view
  loading in wall time (they wait on the disk too);
- the floors of a record's decision on the 1 MiB response: parsing, its subject key (one HMAC), the
  view lookup and writing back, each alone, beside the whole decision (microseconds of CPU);
- with --proxy: a real gateway (2 workers would share the 2 cores with wrk: 1 worker) publishing an
  upstream that answers GETs with 1 MiB JSON arrays, once as a consent dataset (30% consented, the rest
  masked) and once as the same dataset without `legal_basis: consent`, both paths' responses inspected
  by the audit-only DLP profile (--response-profile none: not inspected), measured interleaved with wrk
  (1 thread, 4 connections): requests/s and the ratio with/without. Twice: "warm", every answer the
  same array, and "cold", each answer the next of --cold-bodies arrays whose subjects are all different
  (what the processor's caches hold of the first no longer helps).

    .venv/bin/python bench/consent.py [--consents 1000000] [--repeat 3]
                                      [--proxy [--seconds 5 --rounds 2] [--response-profile audit-only|none]
                                       [--cold-bodies 40]]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import orjson

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gateway.authz.catalog import ConsentRule, Dataset, Field  # noqa: E402
from gateway.authz.consent import ConsentRegistry, RegistryView, Scope, batch_claims  # noqa: E402
from gateway.authz.jose import PLATFORM_ROLE, add_signature, draft, generate_key, load_private_key, public_authority  # noqa: E402
from gateway.authz.records import RecordFilter  # noqa: E402
from gateway.authz.subject import SubjectHasher, generate_secret, load_secret  # noqa: E402

SCOPE = Scope("operator-a", "elderly-care", "civil.residents")


def subject(i: int) -> str:
    return f"5206{i:013d}X"


def record(i: int) -> dict:
    return {"id_number": subject(i), "name": "张三明", "mobile": f"139{i % 10**8:08d}", "card": f"6228480012{i % 10**6:06d}",
            "district": "碧江区", "address": "贵州省铜仁市碧江区锦江大道1号", "age": 40 + i % 40}


def response(mib: float, consents: int, first: int = 0) -> tuple[bytes, int, int]:
    """A JSON array of about `mib` MiB, 3 in 10 of whose subjects consented (those below `consents`); its
    subjects are those of records first.. (another `first`, other subjects)."""
    count = int(mib * 2**20) // len(orjson.dumps(record(0)))
    items = [record((first + i) % consents if i % 10 < 3 else consents + first + i) for i in range(count)]
    return orjson.dumps(items), count, sum(1 for i in range(count) if i % 10 < 3)


def batch_file(path: Path, key, hasher: SubjectHasher, subjects: range, now: int) -> int:
    body = b"".join(orjson.dumps({"cid": f"c{i}", "subject": hasher.key(subject(i)).hex(), "consumer": "operator-a",
                                  "scenario": "elderly-care", "datasets": ["civil.residents"], "nbf": now - 60,
                                  "exp": now + 86400}) + b"\n" for i in subjects)
    claims = batch_claims(f"b-{now}-{len(subjects)}", now, body, len(subjects), hasher.key_check(), hasher.algorithm)
    path.write_bytes(json.dumps(add_signature(draft(claims), key, PLATFORM_ROLE)).encode() + b"\n" + body)
    return len(body)


def rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):11,.0f} ({min(values):,.0f}-{max(values):,.0f})"


def library(args: argparse.Namespace, root: Path) -> None:
    hasher = SubjectHasher(os.urandom(32))
    generate_key("platform", root / "platform.key", root / "platform.pub")
    key = load_private_key(root / "platform.key")
    platform = {key.kid: public_authority(key, PLATFORM_ROLE)}
    now = int(time.time())
    size = batch_file(root / "batch", key, hasher, range(args.consents), now)
    registry = ConsentRegistry(root / "consent.sqlite")
    started = time.perf_counter()
    with (root / "batch").open("rb") as stream:
        registry.import_batch(stream, platform, ("Ed25519",), hasher.key_check(), hasher.algorithm)
    seconds = time.perf_counter() - started
    print(f"import: {args.consents} consents ({size / 2**20:.0f} MiB) in {seconds:.1f} s "
          f"({args.consents / seconds:,.0f}/s)")

    memory, started = rss(), time.perf_counter()
    view = RegistryView(registry, 86400)
    view.consented(SCOPE, now)
    print(f"view: loaded {args.consents} consents in {time.perf_counter() - started:.2f} s, "
          f"{(rss() - memory) / 2**20:.0f} MiB more resident memory")

    keys = [hasher.key(subject(i * 7 % (args.consents * 2))) for i in range(20000)]
    started = time.process_time()
    for k in keys[:5000]:
        registry.valid(SCOPE, now, [k])
    single = (time.process_time() - started) / 5000
    started = time.process_time()
    for start in range(0, 20000, 1000):
        registry.valid(SCOPE, now, keys[start:start + 1000])
    batched = (time.process_time() - started) / 20000
    started = time.process_time()
    for start in range(0, 20000, 1000):
        view.consented(SCOPE, now)(keys[start:start + 1000])
    in_memory = (time.process_time() - started) / 20000
    print(f"lookup per subject: SQLite {single * 1e6:.1f} us one per query, {batched * 1e6:.2f} us a response's "
          f"1,000 in one query; view {in_memory * 1e6:.3f} us (a response's 1,000 at once, the change check included)")

    fields = {"id_number": Field("personal", ("cn_id_card",)), "name": Field("personal", ("name",)),
              "mobile": Field("personal", ("cn_mobile",)), "card": Field("personal", ("bank_card",)),
              "district": Field("public"), "address": Field("personal"), "age": Field("internal")}
    dataset = Dataset("civil.residents", "", "conditional", "s", "p", (), (), (), fields, None, (), {}, None, "",
                      ConsentRule("id_number", "mask", False))
    record_filter = RecordFilter(dataset, hasher)

    def sqlite_lookup(wanted):
        return set(registry.valid(SCOPE, now, wanted)[0])

    print(f"per-record decisions, records per CPU second: median (lowest-highest) of {args.repeat} runs; "
          "ratio = medians against parsing and writing the same JSON back")
    print(f"{'size':>5} {'records':>8} {'parse+write only':>30} {'decisions (view)':>30} {'ratio':>5} "
          f"{'decisions (SQLite)':>30}")
    for mib in (1, 2, 4, 8):
        body, count, passed = response(mib, args.consents)
        runs: dict[str, list[float]] = {"baseline": [], "view": [], "sqlite": []}
        for _ in range(args.repeat):  # interleaved, so drift on a shared machine hits all alike
            started = time.process_time()
            orjson.dumps(orjson.loads(body))
            runs["baseline"].append(count / (time.process_time() - started))
            for name, lookup in (("view", lambda: view.consented(SCOPE, now)), ("sqlite", lambda: sqlite_lookup)):
                started = time.process_time()
                outcome = record_filter.apply(body, "application/json", lookup())
                runs[name].append(count / (time.process_time() - started))
                assert outcome.passed == passed and outcome.masked == count - passed, outcome.counts()
        ratio = statistics.median(runs["view"]) / statistics.median(runs["baseline"])
        print(f"{mib:>3} MiB {count:>8} {spread(runs['baseline']):>30} {spread(runs['view']):>30} {ratio:>5.2f} "
              f"{spread(runs['sqlite']):>30}")
    floors(args, response(1, args.consents)[0], hasher, record_filter, lambda: view.consented(SCOPE, now))
    view.close()


def floors(args: argparse.Namespace, body: bytes, hasher: SubjectHasher, record_filter: RecordFilter, lookup) -> None:
    """What a record's decision cannot go below: the parts no decision skips, each alone, in CPU time."""
    items = orjson.loads(body)
    subjects = [item["id_number"] for item in items]
    keys = set(hasher.keys(subjects))
    parts = {"parse (orjson.loads)": lambda: orjson.loads(body), "subject keys (one HMAC each)": lambda: hasher.keys(subjects),
             "lookup (view)": lambda: lookup()(keys), "write (orjson.dumps)": lambda: orjson.dumps(items),
             "whole decision": lambda: record_filter.apply(body, "application/json", lookup())}
    costs: dict[str, list[float]] = {name: [] for name in parts}
    for _ in range(args.repeat * 3):
        for name, part in parts.items():
            started = time.process_time()
            part()
            costs[name].append((time.process_time() - started) / len(items) * 1e6)
    print(f"per record on the 1 MiB response, us of CPU, median (lowest-highest) of {args.repeat * 3}: "
          + "; ".join(f"{name} {statistics.median(c):.2f} ({min(c):.2f}-{max(c):.2f})" for name, c in costs.items()))


# ---- through the gateway --------------------------------------------------------------------------

CATALOG = """
datasets:
  - id: civil.residents
    class: conditional
    sector: health
    provider: city-hospital
    hosts: [127.0.0.2]
    endpoints:
      - {methods: [GET], paths: ["/consent/*"]}
    fields: &fields
      id_number: {sensitivity: personal, tags: [cn_id_card]}
      name: {sensitivity: personal, tags: [name]}
      mobile: {sensitivity: personal, tags: [cn_mobile]}
      card: {sensitivity: personal, tags: [bank_card]}
      district: {sensitivity: public}
      address: {sensitivity: personal}
      age: {sensitivity: internal}
    legal_basis: consent
    consent: {subject_field: id_number, unconsented: mask}
  - id: civil.residents-plain
    class: conditional
    sector: health
    provider: city-hospital
    hosts: [127.0.0.2]
    endpoints:
      - {methods: [GET], paths: ["/plain/*"]}
    fields: *fields
"""

JSON_UPSTREAM = """
import asyncio, itertools, sys
# Answers every request (GET, no body) with a JSON file, keep-alive: the first file, or for a path
# holding /cold the next of the others in turn.
def answer(path):
    body = open(path, "rb").read()
    return (b"HTTP/1.1 200 OK\\r\\nContent-Type: application/json\\r\\nContent-Length: %d\\r\\n\\r\\n" % len(body)) + body
WARM = answer(sys.argv[2])
COLD = itertools.cycle([answer(path) for path in sys.argv[3:]])
class Upstream(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport, self.head = transport, b""
    def data_received(self, data):
        self.head += data
        while b"\\r\\n\\r\\n" in self.head:
            request, self.head = self.head.split(b"\\r\\n\\r\\n", 1)
            self.transport.write(next(COLD) if b"/cold" in request.split(b"\\r\\n", 1)[0] else WARM)
async def main():
    server = await asyncio.get_running_loop().create_server(Upstream, "127.0.0.2", int(sys.argv[1]))
    print("ready", flush=True)
    await server.serve_forever()
asyncio.run(main())
"""

GET_SCRIPT = """
wrk.method = "GET"
wrk.path = os.getenv("BENCH_PATH")
wrk.headers["X-Data-Grant"] = os.getenv("BENCH_GRANT")
wrk.headers["X-Data-Licence"] = os.getenv("BENCH_LICENCE")
"""


def proxy(args: argparse.Namespace, root: Path) -> None:
    import shutil
    import subprocess

    from bench.proxy import WRK_SCRIPT, measured_wrk
    from tests.authzkit import Kit
    from tests.gatewayproc import Process, free_port, gateway_config, start_gateway, write_config

    if not shutil.which("wrk"):
        raise SystemExit("wrk is missing: apt-get install wrk")
    kit = Kit(root / "keys")
    generate_key("platform-kid", root / "platform.key", root / "platform.pub")
    generate_secret(root / "consent.secret")
    (root / "catalog.yaml").write_text(CATALOG)
    authz = kit.authz_section()
    authz["catalog"] = str(root / "catalog.yaml")
    authz["consent"] = {"platform": {"name": "subject-platform", "key": str(root / "platform.pub")},
                        "secret": str(root / "consent.secret"), "max_age": "1h"}
    config = gateway_config(root / "state", workers=1, authz=authz)
    for rule in config["policy"]["rules"]:
        # The consent stage, not the bulk-ID blocking profile, decides here: both paths' responses are
        # inspected by a profile that records and blocks nothing (audit-only), as a boundary inspects
        # what crosses it; `none` measures the two paths with no response inspection at all.
        if args.response_profile == "none":
            rule.pop("response_profile", None)
        else:
            rule["response_profile"] = args.response_profile
    body, count, passed = response(1, 100_000)
    (root / "response.json").write_bytes(body)
    for k in range(args.cold_bodies):  # all different subjects: 30% of 100,000 consented, the others
        (root / f"cold-{k}.json").write_bytes(response(1, 100_000, (k + 1) * count)[0])
    upstream_port = free_port("127.0.0.2")
    config["listeners"][1]["upstream"] = f"http://127.0.0.2:{upstream_port}"
    port = int(config["listeners"][1]["listen"].rsplit(":", 1)[1])
    path = write_config(root / "gateway.yaml", config)

    hasher = SubjectHasher(load_secret(root / "consent.secret"))
    batch_file(root / "proxy.batch", load_private_key(root / "platform.key"), hasher, range(100_000), int(time.time()))
    imported = subprocess.run([sys.executable, "-m", "gateway", "consent", "import", str(root / "proxy.batch"),
                               "-c", str(path)], capture_output=True, text=True, cwd=REPO)
    if imported.returncode != 0:
        raise SystemExit(f"consent import failed: {imported.stderr}")

    script = root / "get.lua"
    script.write_text(GET_SCRIPT + WRK_SCRIPT[WRK_SCRIPT.index("done = "):])
    os.environ["BENCH_GRANT"] = kit.grant(datasets=[{"id": "civil.residents"}, {"id": "civil.residents-plain"}])
    os.environ["BENCH_LICENCE"] = kit.licence()
    processes = [Process([sys.executable, "-c", JSON_UPSTREAM, str(upstream_port), str(root / "response.json"),
                          *(str(root / f"cold-{k}.json") for k in range(args.cold_bodies))])]
    try:
        processes[0].started("ready")
        processes.append(start_gateway(path))
        pid = processes[-1].proc.pid
        import httpx
        for name, tail in itertools.product(("consent", "plain"), ("residents", "cold")):
            # each path answers 200, the consent one masked
            started = time.perf_counter()
            answer = httpx.get(f"http://127.0.0.1:{port}/{name}/{tail}", timeout=120,
                               headers={"X-Data-Grant": os.environ["BENCH_GRANT"],
                                        "X-Data-Licence": os.environ["BENCH_LICENCE"]})
            print(f"  one {name} response ({tail}) alone: {time.perf_counter() - started:.3f} s")
            assert answer.status_code == 200, answer.text[:500]
            clear = sum(1 for item in answer.json() if "*" not in item["id_number"])
            assert clear == (passed if name == "consent" else count), (name, clear)
        print(f"gateway, 1 worker, a {len(body) / 2**20:.1f} MiB JSON response of {count} records "
              f"({passed} consented), response DLP profile {args.response_profile}: "
              f"wrk 1 thread, {args.connections} connections, {args.seconds} s runs; warm: the same "
              f"response each time, cold: {args.cold_bodies} responses in turn, {args.cold_bodies * count:,} "
              "subjects")
        paths = {f"{name} {kind}": f"/{name}/{'residents' if kind == 'warm' else 'cold'}"
                 for kind in ("warm", "cold") for name in ("plain", "consent")}
        runs: dict[str, list[dict]] = {name: [] for name in paths}
        for name, path in paths.items():  # warm-up
            os.environ["BENCH_PATH"] = path
            measured_wrk(pid, port, script, 2, args.connections, script)
        for _ in range(args.rounds):
            for name, path in paths.items():
                os.environ["BENCH_PATH"] = path
                runs[name].append(measured_wrk(pid, port, script, args.seconds, args.connections, script))
        for name, results in runs.items():
            rps = [r["rps"] for r in results]
            print(f"  {name:<13} req/s {spread(rps)}  MiB/s {statistics.median(rps) * len(body) / 2**20:6.1f}  "
                  f"p50 {statistics.median(r['p50'] for r in results):.0f} ms  "
                  f"failed {sum(r['failed'] for r in results)}  gateway cores "
                  f"{statistics.median(r['proxy_cores'] for r in results):.2f}  req per gateway CPU second "
                  f"{statistics.median(r['rps'] / max(r['proxy_cores'], 1e-9) for r in results):.1f}")
        for kind in ("warm", "cold"):
            consent, plain = runs[f"consent {kind}"], runs[f"plain {kind}"]
            ratios = [c["rps"] / max(p["rps"], 1e-9) for c, p in zip(consent, plain)]
            # On a shared machine the gateway may not get its core: the cost per request in its own CPU
            # time is what a dedicated core would turn into throughput.
            per_cpu = [(c["rps"] / max(c["proxy_cores"], 1e-9)) / max(p["rps"] / max(p["proxy_cores"], 1e-9), 1e-9)
                       for c, p in zip(consent, plain)]
            print(f"  ratio consent/plain, {kind}: req/s median {statistics.median(ratios):.2f} "
                  f"(per round: {', '.join(f'{r:.2f}' for r in ratios)}); req per gateway CPU second median "
                  f"{statistics.median(per_cpu):.2f} (per round: {', '.join(f'{r:.2f}' for r in per_cpu)})")
    finally:
        for process in reversed(processes):
            process.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--consents", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--proxy", action="store_true", help="also measure through a real gateway")
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--cold-bodies", type=int, default=40, help="responses of different subjects taken in turn "
                                                                     "on the cold path")
    parser.add_argument("--response-profile", default="audit-only",
                        help="DLP profile inspecting both paths' responses (default audit-only, which blocks "
                             "nothing); none: no response inspection on either path")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        library(args, Path(folder))
        if args.proxy:
            proxy(args, Path(folder) / "proxy")


if __name__ == "__main__":
    main()
