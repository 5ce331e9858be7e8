"""Requests/s and latency through stock mitmdump (no addons) and through the gateway, in one run.

    .venv/bin/python bench/proxy.py [--seconds S] [--connections C] [--sizes 1024,1048576] [--workers 1,2]

With --workers, the gateway runs once per worker count instead (no mitmdump) and the ratios are
against the first count: `--workers 1,2` shows what a second worker process adds (gateway.proxy.supervisor).

Both proxies publish the same fast upstream on 127.0.0.2 as reverse proxies (the gateway's full pipeline:
zones, policy, DLP on both directions, a durable trace record per transfer, metrics), and the same load
generator (wrk, Debian's wrk package, one thread, keep-alive) POSTs clean bodies of each size through
them. Printed: requests/s, p50 and p99 latency for each, the CPU cores the proxy's processes used and how
busy the whole machine was, and the gateway/mitmdump ratios (the machine is shared and noisy: only
ratios from the same run mean much). ApacheBench is not used: it writes a POST's
headers and body separately, and Nagle's algorithm then adds ~40 ms to every request of both proxies.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.gatewayproc import (  # noqa: E402
    Process,
    free_port,
    gateway_config,
    start_gateway,
    write_config,
)

FAST_UPSTREAM = """
import asyncio, sys
# A minimal keep-alive HTTP/1.1 server answering every request with "ok": fast enough not to be the
# bottleneck of either proxy (a body is counted off as it arrives, never copied or kept).
class Upstream(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport, self.head, self.remaining = transport, bytearray(), None
    def data_received(self, data):
        view = memoryview(data)
        while view:
            if self.remaining is None:
                self.head += view
                end = self.head.find(b"\\r\\n\\r\\n")
                if end < 0:
                    return
                length = 0
                for line in bytes(self.head[:end]).lower().split(b"\\r\\n"):
                    if line.startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                view, self.head, self.remaining = memoryview(bytes(self.head[end + 4:])), bytearray(), length
            taken = min(self.remaining, len(view))
            view, self.remaining = view[taken:], self.remaining - taken
            if self.remaining == 0:
                self.remaining = None
                self.transport.write(b"HTTP/1.1 200 OK\\r\\nContent-Type: text/plain\\r\\nContent-Length: 2\\r\\n\\r\\nok")
async def main():
    server = await asyncio.get_running_loop().create_server(Upstream, "127.0.0.2", int(sys.argv[1]))
    print("ready", flush=True)
    await server.serve_forever()
asyncio.run(main())
"""


def clean_body(size: int) -> bytes:
    """Text that looks like business data but holds nothing sensitive (no digit runs a detector wants)."""
    words = ["report", "quarter", "district", "budget", "schedule", "transport", "clinic", "school",
             "数据", "开放", "目录", "统计", "交通", "教育", "卫生"]
    rng = random.Random(size)
    text = " ".join(rng.choice(words) for _ in range(size // 4 + 1)).encode()
    # Cut on a character boundary and pad: a body cut inside a character is (rightly) uninspectable.
    return text[:size].decode("utf-8", "ignore").encode().ljust(size, b" ")


WRK_SCRIPT = """
wrk.method = "POST"
local f = io.open(os.getenv("BENCH_BODY"), "rb")
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "text/plain; charset=utf-8"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %d %d %d %d %d %d\\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), e.connect + e.read + e.write + e.timeout, e.status))
end
"""


def wrk(port: int, body: Path, seconds: int, connections: int, script: Path) -> dict[str, float]:
    result = subprocess.run(
        ["wrk", "-t", "1", "-c", str(connections), "-d", f"{seconds}s", "-s", str(script),
         f"http://127.0.0.1:{port}/bench"],
        capture_output=True, text=True, timeout=seconds + 60, env={**os.environ, "BENCH_BODY": str(body)})
    found = re.search(r"RESULT (\d+) (\d+) (\d+) (\d+) (\d+) (\d+)", result.stdout)
    if result.returncode != 0 or not found:
        raise SystemExit(f"wrk failed: {result.stderr or result.stdout}")
    requests, duration_us, p50_us, p99_us, errors, non_2xx = map(int, found.groups())
    return {"rps": requests / (duration_us / 1e6), "p50": p50_us / 1000, "p99": p99_us / 1000,
            "failed": errors + non_2xx, "non_2xx": non_2xx}


def process_tree_cpu(pid: int) -> float:
    """CPU seconds used so far by a process and all its descendants (a supervisor, its workers, the writer)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total, pending = 0.0, [pid]
    while pending:
        current = pending.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
            for task in Path(f"/proc/{current}/task").iterdir():
                pending += [int(child) for child in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue  # ended meanwhile
    return total


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    # user nice system idle iowait irq softirq steal (guest time is inside user and nice already)
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = values[3] + values[4]  # idle, iowait
    ticks = os.sysconf("SC_CLK_TCK")
    return (sum(values) - idle) / ticks, sum(values) / ticks


def measured_wrk(pid: int, port: int, body: Path, seconds: int, connections: int, script: Path) -> dict[str, float]:
    """wrk's figures plus the cores the proxy (with its children) and the whole machine kept busy."""
    cpu_before, (busy_before, total_before) = process_tree_cpu(pid), machine_busy()
    started = time.monotonic()
    result = wrk(port, body, seconds, connections, script)
    wall = time.monotonic() - started
    busy_after, total_after = machine_busy()
    result["proxy_cores"] = (process_tree_cpu(pid) - cpu_before) / wall
    result["machine_busy"] = (busy_after - busy_before) / (total_after - total_before)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=8, help="length of each measured run")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--sizes", default="1024,1048576")
    parser.add_argument("--workers", help="compare the gateway with these worker counts, e.g. 1,2")
    parser.add_argument("--rounds", type=int, default=2,
                        help="interleaved runs of each proxy per size (this VM's CPU speed drifts by up to a "
                             "quarter from one run to the next: more rounds, steadier figures)")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is missing: apt-get install wrk")
    mitmdump = Path(sys.executable).with_name("mitmdump")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        script = root / "post.lua"
        script.write_text(WRK_SCRIPT)
        upstream_port = free_port("127.0.0.2")
        upstream = Process([sys.executable, "-c", FAST_UPSTREAM, str(upstream_port)])
        upstream.started("ready")
        ports: dict[str, int] = {}
        pids: dict[str, int] = {}
        processes = [upstream]

        def gateway(name: str, workers: int) -> None:
            config = gateway_config(root / name, workers=workers)
            config["listeners"][1]["upstream"] = f"http://127.0.0.2:{upstream_port}"
            ports[name] = int(config["listeners"][1]["listen"].rsplit(":", 1)[1])
            processes.append(start_gateway(write_config(root / f"{name}.yaml", config)))
            pids[name] = processes[-1].proc.pid

        if args.workers:
            for workers in (int(n) for n in args.workers.split(",")):
                gateway(f"gateway-{workers}w", workers)
        else:
            stock_port = free_port()
            processes.append(Process([str(mitmdump), "-q", "--mode",
                                      f"reverse:http://127.0.0.2:{upstream_port}@127.0.0.1:{stock_port}",
                                      "--set", f"confdir={root / 'mitmproxy'}"]))
            ports["mitmdump"] = stock_port
            pids["mitmdump"] = processes[-1].proc.pid
            gateway("gateway", 1)
        time.sleep(3)
        baseline = next(iter(ports))
        try:
            cores = os.cpu_count() or 1
            print(f"cpu cores: {cores}; wrk 1 thread, {args.connections} connections, "
                  f"{args.seconds} s runs, keep-alive POST of clean text")
            print("cores: CPU the proxy's processes used (per second of the run); others: cores everything else "
                  "used meanwhile (wrk, the upstream, and any other load on the machine)")
            print("busy: how busy the whole machine was; req/s / busy is what the run would serve with every core "
                  "at the same CPU cost per request, so a run near 100 % busy is bound by the machine, not the proxy")
            print(f"{'size':>9} {'proxy':<11} {'req/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'failed':>6} {'cores':>6} "
                  f"{'others':>6} {'busy':>5}")
            for size in (int(s) for s in args.sizes.split(",")):
                body = root / f"body-{size}"
                body.write_bytes(clean_body(size))
                for port in ports.values():  # warm-up
                    wrk(port, body, 2, args.connections, script)
                runs = {name: [] for name in ports}
                for _ in range(args.rounds):  # interleaved, so drift on a shared machine hits all alike
                    for name, port in ports.items():
                        runs[name].append(measured_wrk(pids[name], port, body, args.seconds, args.connections, script))
                best = {name: max(results, key=lambda r: r["rps"]) for name, results in runs.items()}
                for name, r in best.items():
                    print(f"{size:>9} {name:<11} {r['rps']:>9.0f} {r['p50']:>7.1f} {r['p99']:>7.1f} {r['failed']:>6} "
                          f"{r['proxy_cores']:>6.2f} {r['machine_busy'] * cores - r['proxy_cores']:>6.2f} "
                          f"{r['machine_busy']:>5.0%}")
                median = {name: statistics.median(r["rps"] for r in results) for name, results in runs.items()}
                for name in list(best)[1:]:
                    print(f"{size:>9} ratio {name}/{baseline}: req/s {best[name]['rps'] / best[baseline]['rps']:.2f}, "
                          f"p99 {best[name]['p99'] / max(best[baseline]['p99'], 0.001):.2f}; "
                          f"medians of {args.rounds} runs: req/s {median[name] / median[baseline]:.2f}"
                          + (f"; with the machine all theirs: at most "
                             f"{best[name]['rps'] / best[name]['machine_busy'] / best[baseline]['rps']:.2f}"
                             if args.workers else ""))
        finally:
            for process in reversed(processes):
                process.stop()


if __name__ == "__main__":
    main()
